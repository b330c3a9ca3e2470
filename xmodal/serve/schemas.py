"""Typed request and response bodies of the HTTP API (they also make the OpenAPI document at ``/docs``)."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field


class LabelScore(BaseModel):
    label: str = Field(description="Class name.")
    score: float = Field(description="Probability of this class (the row sums to 1 over all classes).")


class ImageResult(BaseModel):
    index: int = Field(description="Position of the image in the request (0-based).")
    filename: Optional[str] = Field(None, description="The upload's file name, when the client sent one.")
    label: str = Field(description="Most probable class, or 'unknown' when its probability is below min_score.")
    score: float = Field(description="Its probability.")
    top_k: list[LabelScore] = Field(description="The k most probable classes, most probable first.")


class ClassifyResponse(BaseModel):
    model: str = Field(description="Method and backbone that produced the scores.")
    results: list[ImageResult]


class ModelCard(BaseModel):
    """What the saved classifier says about itself (``xmodal_classifier.json``)."""

    model_config = ConfigDict(extra="allow")

    method: str
    method_label: Optional[str] = Field(None, description="The method and what it became, e.g. 'xmadapter → kept "
                                                          "Tip-Adapter-F stage (sign test p = 0.75)'.")
    selection: Optional[str] = Field(None, description="How hyper-parameters were chosen: 'validation set' or "
                                                       "'k-fold CV over support, k=...'.")
    backbone: str
    stand_in: bool = Field(description="True when the backbone is an offline stand-in, not a real CLIP.")
    classes: list[str]
    val_accuracy: Optional[float] = Field(None, description="Top-1 on the validation split used to pick "
                                                            "hyper-parameters (0..1), when there was one.")
    shots: Optional[int] = None
    created: Optional[str] = None
    details: dict[str, Any] = Field(default_factory=dict, description="Everything else the card holds.")


class Health(BaseModel):
    status: str = "ok"
    queued: int = Field(description="Images waiting for a forward pass.")
    batches: int = Field(description="Forward passes run since start.")
    images: int = Field(description="Images classified since start.")
    largest_batch: int


class ErrorBody(BaseModel):
    error: str = Field(description="What went wrong.")
    type: str = Field(description="Machine-readable kind, e.g. not_an_image, body_too_large, unauthorized.")
    hint: str = Field("", description="How to fix it.")
