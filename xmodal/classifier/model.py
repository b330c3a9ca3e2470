"""``FewShotClassifier``: fit a few-shot method once on your images, save it, classify new images anywhere.

scikit-learn in feel (parameters in ``__init__``, nothing done there; ``fit`` / ``predict`` /
``predict_proba``; fitted attributes end in ``_``) and PEFT in storage (a folder with a safetensors file
of tensors and a JSON description; no pickle). Support and validation features are built by the few-shot
harness's own code (``fewshot_split`` + ``FeatureBank.fit_sets``), so a classifier fitted here makes the
same choices as ``xmodal fewshot`` for the same method, shots and seed; every hyper-parameter is chosen by
the method on validation only.
"""
from __future__ import annotations

import datetime as _dt
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..features import DEFAULT_CACHE_DIR  # XMODAL_CACHE or .xmodal-cache, like the feature cache
from ..errors import CacheMismatchError, CorruptImageError, InputError, UsageError, XmodalError
from ..progress import epoch_reporter
from .abstain import DEFAULT_TARGET_ACCURACY, UNKNOWN, check_min_score, suggest_min_score
from .artefact import FORMAT, FORMAT_VERSION, read_artefact, write_artefact
from .inputs import item_name, normalise_inputs, to_pil

DEFAULT_BACKBONE = "bridge:lite0-minilm"  # the offline default (a stand-in for CLIP), as on the command line


def _resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


@dataclass
class Prediction:
    """One input's result from :meth:`FewShotClassifier.iter_predict`: probabilities or the error that stopped it."""

    index: int
    source: str
    proba: torch.Tensor | None = None
    error: str | None = None


class FewShotClassifier:
    """A few-shot image classifier on a frozen vision-language backbone.

    backbone      backbone spec (``xmodal backbones``); the offline default is a stand-in, not CLIP
    method        registered few-shot method (``xmodal.available_methods()``)
    shots         K support images per class, or None for every training image
    seed          episode seed (which images are support / validation) and the method's seed
    method_params passed to the method's constructor (e.g. ``epochs=10`` for trained methods)

    Fitted attributes: ``classes_``, ``method_`` (the fitted FewShotMethod), ``backbone_`` (the loaded backbone),
    ``selected_`` (hyper-parameters chosen on validation), ``val_accuracy_``, ``info_`` (provenance).
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, method: str = "xmadapter", shots: int | None = None,
                 seed: int = 0, *, cache_dir: str | Path = DEFAULT_CACHE_DIR, device: str = "auto",
                 augment_views: int = 10, batch_size: int = 64, num_workers: int = 0, progress: bool = False,
                 abstain_target: float = DEFAULT_TARGET_ACCURACY, **method_params: Any) -> None:
        self.backbone = backbone
        self.method = method
        self.shots = shots
        self.seed = seed
        self.cache_dir = cache_dir
        self.device = device
        self.augment_views = augment_views
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.progress = progress
        self.abstain_target = abstain_target
        self.method_params = method_params

    def get_params(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "method": self.method, "shots": self.shots, "seed": self.seed,
                "cache_dir": str(self.cache_dir), "device": self.device, "augment_views": self.augment_views,
                "batch_size": self.batch_size, "num_workers": self.num_workers,
                "abstain_target": self.abstain_target, **self.method_params}

    # ------------------------------------------------------------------------------------------ fit

    def fit(self, data: Any) -> "FewShotClassifier":
        """Fit on a dataset spec (``imagefolder:PATH``, ``cifar10:PATH`` ...), an ImageFolder path
        (``PATH/train/<class>/*.jpg``, optional ``val/``) or an ``ImageDataset``."""
        from ..backbones import load_backbone
        from ..feature_bank import FeatureBank  # the harness's support/val construction, reused as is
        from ..cache import stable_hash
        from ..fewshot import available_methods, create_method
        from .plan import plan_split, resolve_dataset

        if self.method not in available_methods():
            raise UsageError(f"unknown few-shot method {self.method!r}",
                             hint=f"use one of: {', '.join(available_methods())}")
        if self.shots is not None and (isinstance(self.shots, bool) or not isinstance(self.shots, int)
                                       or self.shots < 1):
            raise UsageError(f"shots must be a positive integer or None (all training images), got {self.shots!r}",
                             hint="use --shots 1 or more, or leave it out to use every training image")
        start = time.perf_counter()
        target = float(self.abstain_target)
        if not 0.0 < target <= 1.0:
            raise UsageError(f"abstain_target must lie in (0, 1], got {self.abstain_target!r}",
                             hint="e.g. abstain_target=0.95 (the accuracy the suggested min_score aims at)")
        # the dataset is listed and split before any model is loaded: a dataset error comes at once
        dataset, data_spec = resolve_dataset(data)
        split = plan_split(dataset, self.shots, self.seed)  # val=[]: cross-validate over the support (feasible)
        device = _resolve_device(self.device)
        bb = load_backbone(self.backbone, device=device, cache_dir=str(self.cache_dir))
        bank = FeatureBank(bb, dataset, augment_views=self.augment_views, augment_scope="support",
                           cache_dir=str(self.cache_dir), device=device, batch_size=self.batch_size,
                           num_workers=self.num_workers, progress=self.progress)
        text = bank.text_classifier()
        on_epoch, close_epochs = epoch_reporter(f"fit {self.method}", enabled=self.progress)

        def make_method() -> Any:
            try:
                made = create_method(self.method, seed=self.seed, device=device,
                                     logit_scale=float(getattr(bb, "logit_scale", 100.0)), **self.method_params)
            except TypeError as exc:
                raise UsageError(f"bad parameter for method {self.method!r}: {exc}",
                                 hint="check the method's parameters in docs/fewshot.md") from None
            if made.needs_backbone:  # tower methods (CoOp, CoCoOp, CLIP-LoRA) train inside the backbone
                from ..fewshot.pixels import PixelSource

                made.bind_backbone(bb, PixelSource(dataset, bb, self.seed) if made.needs_images else None)
            made.on_epoch = on_epoch  # progress per epoch of a trained method (every fold's member too)
            return made

        method = make_method()  # a bad parameter is reported before any feature is extracted
        if split.val:
            support, val = bank.fit_sets(split)
            torch.manual_seed(self.seed)  # as the harness does before every fit
            method.fit(support, val, text.clone())
            with torch.no_grad():
                from ..fewshot.pixels import set_scores

                held_probs = set_scores(method, val).float().softmax(-1).cpu()
            held_labels, n_held, selection = val.labels.cpu(), len(val), "validation set"
        else:  # no image left for validation: k-fold cross-validation over the support images
            from .crossfit import fit_crossfitted

            support, _ = bank.fit_sets(split)
            method, held_probs, held_labels = fit_crossfitted(make_method, support, text, self.seed)
            n_held, selection = len(held_labels), method.selection
        close_epochs()
        self.method_ = method
        self.backbone_ = bb
        self.classes_ = list(dataset.classnames)
        self.templates_ = list(dataset.templates)
        self.selected_ = _jsonable(method.selected_)
        self.val_accuracy_ = float((held_probs.argmax(-1) == held_labels).float().mean())
        self.feature_dim_ = int(support.dim)
        self.selection_ = selection
        abstain = suggest_min_score(held_probs, held_labels, target)
        self.info_ = {
            "dataset": {"spec": data_spec, "name": str(getattr(dataset, "name", data_spec)),
                        "shots": self.shots, "seed": int(self.seed), "selection": selection,
                        "val_rule": split.val_rule if split.val else f"{selection}: each fold validates the member "
                                                                         "fitted on the other folds",
                        "n_support": len(support), "n_val": n_held, "augment_views": int(self.augment_views),
                        "augment_scope": "support" if self.augment_views > 0 else "none",
                        "support_ids_sha256": stable_hash(sorted(support.ids), 64),
                        "val_ids_sha256": stable_hash(sorted(val.ids) if split.val else [], 64)},
            "validation": {"top1": self.val_accuracy_, "n": n_held, "selection": selection,
                           "note": ("accuracy on the validation images the hyper-parameters were chosen on "
                                    "(optimistic; not a test score)") if split.val else
                                   ("out-of-fold accuracy: each support image scored by the member that did not "
                                    "train on it and chose its settings on it (optimistic; not a test score)")},
            "abstain": {**abstain, "on": "validation images" if split.val else "out-of-fold support images",
                        "rule": "lowest threshold on the top class probability whose accepted images reach "
                                "target_accuracy"},
            "fit_seconds": round(time.perf_counter() - start, 3),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        }
        return self

    # ------------------------------------------------------------------------------------------ predict

    def _require_fitted(self) -> None:
        if not hasattr(self, "method_"):
            raise UsageError("this FewShotClassifier is not fitted",
                             hint="call .fit(data) or FewShotClassifier.load(dir) first")

    @torch.no_grad()
    def proba_of_images(self, images: list) -> torch.Tensor:
        """(N, C) class probabilities of already-decoded RGB PIL images, in one forward pass (server batch path)."""
        self._require_fitted()
        if not images:
            return torch.empty(0, len(self.classes_))
        bb = self.backbone_
        pixels = torch.stack([bb.preprocess(img) for img in images]).to(bb.device)
        pixels = pixels.contiguous(memory_format=torch.channels_last)  # as the feature extractor runs it
        if getattr(self.method_, "needs_images", False):  # an adapted image tower scores the pixels itself
            scores = self.method_.image_scores(pixels)
        else:
            scores = self.method_.decision_scores(bb.encode_images(pixels).float())
        return scores.float().softmax(dim=-1).cpu()

    def iter_predict(self, inputs: Any, batch_size: int | None = None,
                     skip_corrupt: bool = False) -> Iterator[Prediction]:
        """Yield one :class:`Prediction` per input, in order, batch by batch. An unreadable image yields a
        Prediction with ``error`` set (or nothing with ``skip_corrupt``) and the run goes on."""
        self._require_fitted()
        items = normalise_inputs(inputs)
        size = max(1, int(batch_size or self.batch_size))
        for lo in range(0, len(items), size):
            chunk = items[lo:lo + size]
            decoded, failed = [], []
            for i, item in enumerate(chunk, start=lo):
                try:
                    decoded.append((i, to_pil(item)))
                except (CorruptImageError, OSError) as exc:
                    failed.append(Prediction(i, item_name(item, i), error=str(exc)))
            probs = self.proba_of_images([img for _, img in decoded]) if decoded else None
            ready = {p.index: p for p in failed}
            for row, (i, _) in enumerate(decoded):
                ready[i] = Prediction(i, item_name(chunk[i - lo], i), proba=probs[row])
            for i in sorted(ready):
                if ready[i].error is not None and skip_corrupt:
                    continue
                yield ready[i]

    def predict_proba(self, inputs: Any, batch_size: int | None = None) -> torch.Tensor:
        """(N, C) class probabilities (softmax of the method's scores); columns follow ``classes_``.
        An unreadable image raises CorruptImageError naming it."""
        rows = []
        for p in self.iter_predict(inputs, batch_size):
            if p.error is not None:
                raise CorruptImageError(p.error, hint="remove or replace the file (xmodal predict --skip-corrupt "
                                                      "skips such files)")
            rows.append(p.proba)
        return torch.stack(rows) if rows else torch.empty(0, len(self.classes_))

    def predict(self, inputs: Any, batch_size: int | None = None, min_score: float | str | None = None) -> list[str]:
        """The most probable class name of each input; ``"unknown"`` where its probability is below
        ``min_score`` (a number in [0, 1], or ``"auto"``: the threshold suggested at fit time)."""
        threshold = self.resolve_min_score(min_score)
        proba = self.predict_proba(inputs, batch_size)
        return [self.label_of(p, threshold) for p in proba]

    def label_of(self, proba: torch.Tensor, min_score: float | None = None) -> str:
        """The class name of one probability row, or ``"unknown"`` when its top probability is below min_score."""
        score, index = proba.max(dim=-1)
        if min_score is not None and float(score) < min_score:
            return UNKNOWN
        return self.classes_[int(index)]

    def resolve_min_score(self, min_score: float | str | None) -> float | None:
        """None, a probability in [0, 1], or ``"auto"`` → the threshold chosen on held-out images at fit time."""
        if isinstance(min_score, str):
            if min_score.strip().lower() != "auto":
                try:
                    min_score = float(min_score)
                except ValueError:
                    raise UsageError(f"min_score must be a number between 0 and 1 or 'auto', got {min_score!r}",
                                     hint="use e.g. --min-score 0.5 or --min-score auto") from None
            else:
                self._require_fitted()
                saved = (self.info_.get("abstain") or {})
                if saved.get("min_score") is None:
                    raise UsageError("this classifier has no suggested min_score (none was chosen at fit time, or "
                                     f"no threshold reached {saved.get('target_accuracy', 'the target')} accuracy on "
                                     "its held-out images)", hint="give a number, e.g. --min-score 0.5, or refit "
                                                                   "with a lower abstain target")
                return self._no_unknown_class(float(saved["min_score"]))
        return self._no_unknown_class(check_min_score(min_score))

    def _no_unknown_class(self, threshold: float | None) -> float | None:
        """Abstaining answers "unknown": refused when that is also a class name (the answer would be ambiguous)."""
        if threshold is not None and UNKNOWN in getattr(self, "classes_", []):
            raise UsageError(f"a class is named {UNKNOWN!r}, so abstaining (min_score) could not be told apart from it",
                             hint=f"rename the {UNKNOWN!r} class folder and fit again, or leave --min-score out")
        return threshold

    def top_k(self, inputs: Any, k: int = 5, batch_size: int | None = None) -> list[list[tuple[str, float]]]:
        """The ``k`` most probable (class name, probability) pairs of each input, best first."""
        if k < 1:
            raise UsageError(f"k must be >= 1, got {k}", hint="use --top-k 1 or more")
        return [self.top_k_of(p, k) for p in self.predict_proba(inputs, batch_size)]

    def top_k_of(self, proba: torch.Tensor, k: int) -> list[tuple[str, float]]:
        vals, idx = proba.topk(min(k, proba.shape[-1]))
        return [(self.classes_[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist())]

    # ------------------------------------------------------------------------------------------ save / load

    def to_doc(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON description) of the fitted classifier, as written by :meth:`save`."""
        self._require_fitted()
        from ..version import __version__
        from ..backbones.transforms import describe

        tensors, state = self.method_.get_state()
        bb = self.backbone_
        doc = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "xmodal_version": __version__,
            "created": self.info_.get("created"),
            "method": {"name": self.method_.name, "training_free": bool(getattr(self.method_, "training_free", True)),
                       "params": _jsonable(self.method_params), "selected": self.selected_,
                       "label": self.card()["method_label"], "state": state},
            "classes": list(self.classes_),
            "templates": list(self.templates_),
            "backbone": {"spec": bb.spec, "name": bb.name, "fingerprint": bb.fingerprint(),
                         "stand_in": bool(bb.is_stand_in), "logit_scale": float(getattr(bb, "logit_scale", 100.0))},
            "preprocessing": {"transform": describe(bb.preprocess), "image_size": int(bb.image_size),
                              "mean": list(bb.mean), "std": list(bb.std)},
            "feature_dim": int(self.feature_dim_),
            **{k: v for k, v in self.info_.items() if k != "created"},
        }
        return tensors, doc

    def save(self, folder: str | Path) -> Path:
        """Write ``adapter.safetensors`` + ``xmodal_classifier.json`` to ``folder`` (atomically)."""
        tensors, doc = self.to_doc()
        return write_artefact(folder, tensors, doc)

    @classmethod
    def load(cls, folder: str | Path, device: str = "auto", *, backbone: Any = None, force: bool = False,
             cache_dir: str | Path = DEFAULT_CACHE_DIR) -> "FewShotClassifier":
        """Load a saved classifier. The backbone (the saved spec, or ``backbone``: a spec or a loaded backbone)
        must have the fingerprint recorded at fit time, and the folder must match its digest (nothing edited);
        a mismatch is refused unless ``force=True``, which loads it with a warning."""
        from ..backbones import load_backbone
        from .crossfit import method_from_state

        tensors, doc = read_artefact(folder, force=force)
        try:
            saved_bb, method_doc, classes = doc["backbone"], doc["method"], doc["classes"]
            spec, fingerprint = str(saved_bb["spec"]), str(saved_bb["fingerprint"])
            info = {k: doc[k] for k in ("dataset", "validation", "fit_seconds", "abstain") if k in doc}
            if not (isinstance(classes, list) and classes and isinstance(method_doc.get("state"), dict)
                    and isinstance(method_doc.get("params") or {}, dict) and isinstance(info.get("dataset", {}), dict)
                    and isinstance(info.get("validation", {}), dict)):
                raise TypeError("a field has the wrong type")
        except (KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{folder}: xmodal_classifier.json is malformed ({type(exc).__name__}: {exc})",
                             hint="the JSON was edited or truncated; fit and save the classifier again") from None
        dev = _resolve_device(device)
        if backbone is None or isinstance(backbone, str):
            bb = load_backbone(backbone or spec, device=dev, cache_dir=str(cache_dir))
        else:
            bb = backbone.to(dev)
        if bb.fingerprint() != fingerprint:
            msg = (f"backbone mismatch: {folder} was fitted with {spec} (fingerprint {fingerprint}) but the backbone "
                   f"given is {bb.spec} (fingerprint {bb.fingerprint()})")
            if not force:
                raise CacheMismatchError(msg, hint="load it with the backbone it was fitted with, refit it on this "
                                                   "backbone, or pass force=True (xmodal predict --force) to use "
                                                   "it anyway (predictions are wrong if the embedding spaces differ)")
            warnings.warn(msg + "; loading anyway because force=True", stacklevel=2)
        method = method_from_state(tensors, method_doc["state"], device=dev)
        if getattr(method, "needs_backbone", False):  # only the adapters were saved: they run in this backbone
            method.bind_backbone(bb)
        clf = cls(backbone=spec, method=method_doc["name"], shots=info.get("dataset", {}).get("shots"),
                  seed=info.get("dataset", {}).get("seed", 0), cache_dir=cache_dir, device=device,
                  **(method_doc.get("params") or {}))
        clf.method_, clf.backbone_ = method, bb
        clf.classes_ = [str(c) for c in classes]
        clf.templates_ = list(doc.get("templates") or [])
        clf.selected_ = method_doc.get("selected") or {}
        clf.val_accuracy_ = (info.get("validation") or {}).get("top1")
        clf.feature_dim_ = int(doc.get("feature_dim") or 0)
        clf.selection_ = str((info.get("validation") or {}).get("selection") or "validation set")
        clf.info_ = {**info, "created": doc.get("created")}
        clf.doc_ = doc
        _check_consistent(clf, bb, folder)
        return clf

    def card(self) -> dict[str, Any]:
        """What a service shows about the model: method, backbone (and whether it is a stand-in), classes,
        validation accuracy, when it was made."""
        from ..fewshot.selection import became, summary_line

        self._require_fitted()
        bb = self.backbone_
        ds = self.info_.get("dataset", {})
        turned = became(self.method_.name, self.selected_)
        return {"method": self.method_.name,
                "method_label": f"{self.method_.name} → {turned}" if turned else self.method_.name,
                "became": turned, "chosen": summary_line(self.method_.name, self.selected_),
                "backbone": bb.spec, "backbone_name": bb.name,
                "backbone_fingerprint": bb.fingerprint(), "stand_in": bool(bb.is_stand_in),
                "classes": list(self.classes_), "num_classes": len(self.classes_),
                "validation_accuracy": self.val_accuracy_, "validation_note": "chosen on these images; optimistic",
                "shots": ds.get("shots"), "seed": ds.get("seed"), "dataset": ds.get("spec"),
                "selected": self.selected_, "selection": getattr(self, "selection_", "validation set"),
                "abstain": self.info_.get("abstain"), "created": self.info_.get("created"),
                "format_version": FORMAT_VERSION}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items() if k not in ("cache_dir", "num_workers"))
        return f"FewShotClassifier({params})"


def _check_consistent(clf: FewShotClassifier, bb: Any, folder: Any) -> None:
    """The restored method must score ``len(classes)`` classes from ``feature_dim`` features."""
    probe = torch.zeros(1, int(bb.embed_dim))
    probe[0, 0] = 1.0
    try:
        with torch.no_grad():
            if getattr(clf.method_, "needs_images", False):
                size = int(getattr(bb, "image_size", 224))
                scores = clf.method_.image_scores(torch.zeros(1, 3, size, size, device=bb.device))
            else:
                scores = clf.method_.decision_scores(probe.to(_resolve_device(clf.device)))
    except (XmodalError, RuntimeError) as exc:
        raise InputError(f"{folder}: the saved method does not accept {bb.spec} features: {exc}",
                         hint="load it with the backbone it was fitted with") from None
    if scores.shape[-1] != len(clf.classes_):
        raise InputError(f"{folder}: the method scores {scores.shape[-1]} classes but the JSON lists "
                         f"{len(clf.classes_)}", hint="the files do not belong together; fit and save again")


def _jsonable(value: Any) -> Any:
    """Plain JSON values (tensors → lists/numbers, non-finite floats → strings) for the description file."""
    import json
    import math

    def default(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            return o.tolist() if o.numel() != 1 else o.item()
        if hasattr(o, "item"):
            return o.item()
        if isinstance(o, (set, tuple)):
            return list(o)
        return str(o)

    def clean(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return str(o)
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return o

    return clean(json.loads(json.dumps(value, default=default)))


__all__ = ["FewShotClassifier", "Prediction", "DEFAULT_BACKBONE"]
