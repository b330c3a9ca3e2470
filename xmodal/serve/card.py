"""The model card the API and the page show, built from what the saved classifier says about itself."""
from __future__ import annotations

from typing import Any

from .schemas import ModelCard

_FIELDS = {  # card field -> keys the classifier's card may use for it, first match wins
    "method": ("method",),
    "method_label": ("method_label",),
    "selection": ("selection",),
    "backbone": ("backbone", "backbone_spec"),
    "stand_in": ("stand_in", "is_stand_in", "backbone_stand_in"),
    "classes": ("classes", "class_names", "classnames"),
    "val_accuracy": ("val_accuracy", "validation_accuracy", "val_top1", "val_acc"),
    "shots": ("shots",),
    "created": ("created", "created_at", "creation_time"),
}

_PRIVATE = {"dataset"}  # the training data's spec holds a local path: not published over HTTP


def model_card(classifier: Any) -> ModelCard:
    """Normalise ``classifier.card()`` to a ``ModelCard``; the class list always comes from ``classes_``."""
    raw = dict(classifier.card()) if hasattr(classifier, "card") else {}
    values: dict[str, Any] = {}
    used: set[str] = set()
    for name, keys in _FIELDS.items():
        for key in keys:
            if key in raw:
                values[name] = raw[key]
                used.add(key)
                break
    backbone = values.get("backbone")
    if isinstance(backbone, dict):  # {"spec": ..., "stand_in": ...}
        values.setdefault("stand_in", backbone.get("stand_in", backbone.get("is_stand_in")))
        values["backbone"] = backbone.get("spec") or backbone.get("name") or str(backbone)
    values["classes"] = [str(c) for c in classifier.classes_]
    values.setdefault("method", getattr(classifier, "method", "unknown"))
    values.setdefault("backbone", getattr(classifier, "backbone", "unknown"))
    values["stand_in"] = bool(values.get("stand_in") or False)
    acc = values.get("val_accuracy")
    values["val_accuracy"] = float(acc) if isinstance(acc, (int, float)) else None
    if values.get("created") is not None:
        values["created"] = str(values["created"])
    details = {k: v for k, v in raw.items() if k not in used and k not in _PRIVATE}
    return ModelCard(**values, details=_jsonable(details))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
