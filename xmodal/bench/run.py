"""One few-shot episode: features -> K-shot split -> fit every method on support + val -> top-1 on test.

Protocol guarantees (see docs/bench.md):

* methods see the support and validation ``FeatureSet`` s and the zero-shot text classifier in
  ``fit``; at test time they get a bare ``(N, D)`` feature tensor. Test labels are read only after
  ``predict`` returned, to count correct predictions.
* every row carries its provenance (backbone spec + fingerprint, dataset, templates, chosen
  hyper-parameters, version, commit, timing ...), see ``ROW_FIELDS``.

Features come from ``xmodal.features.extract_features`` (cached on disk). A ``FeatureBank`` keeps
the features of one (backbone, dataset) in memory so every (shots, seed) of a sweep reuses them; the
augmented views of the training images are extracted either once for the whole train split
(``augment_scope="split"``, the sweep default), for the union of all support sets of a sweep
(``"union"``), or only for the support images of the episode at hand (``"support"``, the default for
a single episode).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..fewshot.base import FewShotMethod, available_methods, create_method
from ..errors import DatasetError, InputError, UsageError
# the feature bank lives below the harness (FewShotClassifier uses it too); its names stay importable from here
from ..feature_bank import (AUGMENT_SCOPES, FeatureBank, _default_extract, _default_split,  # noqa: F401
                           fixed_test_subset)
from ..featureset import FeatureSet
from ..jsonio import plain
from ..progress import Progress, epoch_reporter
from .provenance import git_commit, git_dirty, method_config, utc_timestamp, xmodal_version

ROW_SCHEMA = 1

# Every row written by the harness has at least these fields (tests check this).
ROW_FIELDS = (
    "schema", "method", "training_free", "backbone", "backbone_name", "backbone_fingerprint", "stand_in",
    "dataset", "dataset_name", "num_classes", "shots", "seed", "templates", "val_rule", "hparams",
    "top1", "n_correct", "n_test", "n_support", "n_val", "augment_views", "augment_scope",
    "fit_time_s", "predict_time_s", "wall_time_s", "features_time_s", "device",
    "xmodal_version", "git_commit", "git_dirty", "timestamp",
)


class ProtocolError(InputError):
    """An episode would break the evaluation protocol (e.g. a test image in the support or val set)."""


class UnknownMethodError(UsageError, ValueError):
    """A requested few-shot method name is not registered."""


def resolve_methods(methods: str | Sequence[str]) -> list[str]:
    """``"all"`` / ``"a,b"`` / ``["a", "b"]`` -> validated list of registered method names (order kept)."""
    available = available_methods()
    if isinstance(methods, str):
        # "all": zero-shot first (the reference row), then registry order
        if methods.strip() == "all":
            names = sorted(available, key=lambda m: m != "zeroshot")
        else:
            names = [m.strip() for m in methods.split(",") if m.strip()]
    else:
        names = list(methods)
    if not names:
        raise UnknownMethodError(f"no method given; available: {', '.join(available)} (or 'all')")
    unknown = [m for m in names if m not in available]
    if unknown:
        raise UnknownMethodError(f"unknown few-shot method(s) {', '.join(map(repr, unknown))}; "
                                 f"available: {', '.join(available)} (or 'all')")
    return list(dict.fromkeys(names))


def _plain_json(value: dict[str, Any]) -> dict[str, Any]:
    """``selected_`` as plain JSON values (tensors / numpy scalars converted), as the store will hold it."""
    return plain(dict(value))


def _dataset_spec(dataset: Any) -> str:
    return str(getattr(dataset, "spec", None) or getattr(dataset, "name", type(dataset).__name__))


@dataclass
class Episode:
    """Context of one (backbone, dataset, shots, seed) episode, shared by its rows."""

    backbone_spec: str
    dataset_spec: str
    shots: int
    seed: int
    split: Any
    support: FeatureSet
    val: FeatureSet
    test: FeatureSet
    text_classifier: torch.Tensor
    features_time_s: float

    def context(self, bank: FeatureBank, device: str | None) -> dict[str, Any]:
        backbone = bank.backbone
        return {
            "schema": ROW_SCHEMA,
            "backbone": self.backbone_spec,
            "backbone_name": str(getattr(backbone, "name", self.backbone_spec)),
            "backbone_fingerprint": str(backbone.fingerprint()),
            "stand_in": bool(getattr(backbone, "is_stand_in", False)),
            "dataset": self.dataset_spec,
            "dataset_name": str(getattr(bank.dataset, "name", self.dataset_spec)),
            "num_classes": len(bank.dataset.classnames),
            "shots": int(self.shots),
            "seed": int(self.seed),
            "templates": list(bank.dataset.templates),
            "val_rule": str(getattr(self.split, "val_rule", "")),
            "n_support": len(self.support),
            "n_val": len(self.val),
            "n_test": len(self.test),
            "test_per_class": bank.test_per_class,
            "augment_views": int(bank.augment_views),
            "augment_scope": bank.augment_scope if bank.augment_views > 0 else "none",
            "features_time_s": round(self.features_time_s, 4),
            "device": str(device or "cpu"),
            "xmodal_version": xmodal_version(),
            "git_commit": git_commit(),
            "git_dirty": git_dirty(),
        }


def prepare_episode(bank: FeatureBank, shots: int, seed: int, *, backbone_spec: str | None = None,
                    dataset_spec: str | None = None,
                    split_fn: Callable[[Any, int, int], Any] = _default_split) -> Episode:
    start = time.perf_counter()
    split = split_fn(bank.dataset, shots, seed)
    if bank.test_per_class:
        split = dataclasses.replace(split, test=fixed_test_subset(split.test, bank.test_per_class))
    if not split.test:
        raise DatasetError(f"{_dataset_spec(bank.dataset)} has no test samples; cannot score an episode",
                           hint="add a test/ split (ImageFolder) or 'test' entries (split file)")
    leaked = ({s.id for s in split.support} | {s.id for s in split.val}) & {s.id for s in split.test}
    if leaked:
        raise ProtocolError(f"{len(leaked)} test image(s) also in the support/val set (e.g. {sorted(leaked)[:3]}); "
                            "the dataset's splits overlap, refusing to score this episode")
    support, val, test = bank.episode(split)
    text = bank.text_classifier()
    return Episode(
        backbone_spec=backbone_spec or str(getattr(bank.backbone, "spec", "unknown")),
        dataset_spec=dataset_spec or _dataset_spec(bank.dataset),
        shots=shots, seed=seed, split=split, support=support, val=val, test=test,
        text_classifier=text, features_time_s=time.perf_counter() - start,
    )


def evaluate_method(method: FewShotMethod, episode: Episode) -> dict[str, Any]:
    """Fit on support + val, predict on bare test features, then (only then) count correct ones."""
    seed = int(episode.seed)
    torch.manual_seed(seed)
    start = time.perf_counter()
    method.fit(episode.support, episode.val, episode.text_classifier.clone())
    fit_time = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        if getattr(method, "needs_images", False):  # an adapted image tower: scored on the test images
            from ..fewshot.pixels import predict_ids

            pred = predict_ids(method, list(episode.test.ids))
        else:
            pred = method.predict(episode.test.features.clone())
    predict_time = time.perf_counter() - start
    pred = torch.as_tensor(pred).reshape(-1).cpu().long()
    labels = episode.test.labels  # first and only use of test labels: scoring
    if pred.shape != labels.shape:
        raise ValueError(f"{method.name}.predict returned {tuple(pred.shape)} predictions for {labels.numel()} test images")
    n_correct = int((pred == labels).sum())
    return {
        "method": method.name,
        "training_free": bool(getattr(method, "training_free", True)),
        "hparams": _plain_json(getattr(method, "selected_", {}) or {}),
        "top1": 100.0 * n_correct / max(labels.numel(), 1),
        "n_correct": n_correct,
        "fit_time_s": round(fit_time, 4),
        "predict_time_s": round(predict_time, 4),
    }


def run_episode(bank: FeatureBank, shots: int, seed: int, methods: str | Sequence[str] = "all", *,
                backbone_spec: str | None = None, dataset_spec: str | None = None,
                skip: Callable[[str], bool] | None = None,
                on_row: Callable[[dict[str, Any]], None] | None = None,
                device: str | None = None, logit_scale: float | None = None,
                split_fn: Callable[[Any, int, int], Any] = _default_split,
                progress: bool = False) -> list[dict[str, Any]]:
    """Run ``methods`` on one episode; returns the rows (each also handed to ``on_row`` as soon as done).

    ``skip(method_name)`` -> True leaves a method out (a resumed sweep's finished rows). When every
    method is skipped no feature is touched. ``progress``: one step per method fit and, for trained methods,
    one per epoch, on stderr (``xmodal.progress``).
    """
    names = resolve_methods(methods)
    todo = [m for m in names if not (skip and skip(m))]
    if not todo:
        return []
    episode = prepare_episode(bank, shots, seed, backbone_spec=backbone_spec, dataset_spec=dataset_spec,
                              split_fn=split_fn)
    context = episode.context(bank, device if device is not None else bank.device)
    scale = float(logit_scale if logit_scale is not None else getattr(bank.backbone, "logit_scale", 100.0))
    rows = []
    with Progress(len(todo), f"{shots}-shot seed {seed}", unit="method", enabled=progress) as bar:
        for name in todo:
            start = time.perf_counter()
            method = create_method(name, seed=seed, device=device or bank.device or "cpu", logit_scale=scale)
            if method.needs_backbone:  # tower methods train inside the backbone's towers (and on the images)
                from ..fewshot.pixels import PixelSource

                method.bind_backbone(bank.backbone, PixelSource(bank.dataset, bank.backbone, seed)
                                     if method.needs_images else None)
            config = method_config(method)
            method.on_epoch, close_epochs = epoch_reporter(f"fit {name}", enabled=progress)
            try:
                result = evaluate_method(method, episode)
            finally:
                close_epochs()
                method.on_epoch = None
            row = {**context, **result, "method_config": config,
                   "wall_time_s": round(time.perf_counter() - start, 4), "timestamp": utc_timestamp()}
            rows.append(row)
            bar.update(1, note=f"{name} {result['top1']:.2f}% in {result['fit_time_s']:.1f} s")
            if on_row is not None:
                on_row(row)
    return rows
