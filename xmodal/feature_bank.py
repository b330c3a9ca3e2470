"""Features of one (backbone, dataset) for few-shot episodes: support, validation and test sets.

The harness (``xmodal.bench``) and ``FewShotClassifier`` both build support and validation sets here, so
fitting a classifier for use follows exactly the protocol its benchmark numbers come from. Everything is
backed by the on-disk cache of ``xmodal.features``; nothing here knows about methods or result stores.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from .featureset import FeatureSet

AUGMENT_SCOPES = ("split", "union", "support")


def _default_extract(*args: Any, **kwargs: Any) -> FeatureSet:
    from .features import extract_features

    return extract_features(*args, **kwargs)


def _default_split(dataset: Any, shots: int, seed: int) -> Any:
    from .data import fewshot_split

    return fewshot_split(dataset, shots, seed)


@dataclass
class FeatureBank:
    """In-memory features of one (backbone, dataset), backed by the on-disk cache of ``extract_features``."""

    backbone: Any
    dataset: Any
    augment_views: int = 10
    augment_scope: str = "split"
    augment_seed: int = 0
    cache_dir: str = ".xmodal-cache"
    device: str | None = None
    batch_size: int = 64
    num_workers: int = 0
    progress: bool = True
    skip_corrupt: bool = False
    dtype: str | None = None  # extraction precision (None: fp32); part of the feature-cache key
    decode: str = "pil"  # "pil" or "tensor" (eval features only; views always decode with PIL)
    test_per_class: int | None = None  # score a fixed, seeded subset of the test split (budget option)
    extract_fn: Callable[..., FeatureSet] = _default_extract
    _plain: dict[str, FeatureSet] = field(default_factory=dict, repr=False)
    _views: FeatureSet | None = field(default=None, repr=False)
    _view_samples: list | None = field(default=None, repr=False)
    _text: torch.Tensor | None = field(default=None, repr=False)
    _split_ids: dict[str, set[str]] = field(default_factory=dict, repr=False)
    extract_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.augment_scope not in AUGMENT_SCOPES:
            raise ValueError(f"augment_scope must be one of {AUGMENT_SCOPES}, got {self.augment_scope!r}")

    # ----- extraction ---------------------------------------------------------------------
    def _extract(self, split: str, samples: list | None = None, views: int = 0) -> FeatureSet:
        start = time.perf_counter()
        extra: dict[str, Any] = {"skip_corrupt": True} if self.skip_corrupt else {}  # fakes need not know these
        if self.dtype is not None:
            extra["dtype"] = self.dtype
        if self.decode != "pil":
            extra["decode"] = self.decode
        fs = self.extract_fn(
            self.backbone, self.dataset, split, samples=samples, augment_views=views,
            augment_seed=self.augment_seed, cache_dir=self.cache_dir, batch_size=self.batch_size,
            device=self.device, num_workers=self.num_workers, progress=self.progress, **extra,
        )
        self.extract_seconds += time.perf_counter() - start
        return fs

    def plain(self, split: str) -> FeatureSet:
        """Deterministic (no augmentation) features of a whole split."""
        if split not in self._plain:
            if split == "train" and self.augment_views > 0 and self.augment_scope == "split":
                # the whole-split views extraction also holds the deterministic features: reuse them
                self._plain[split] = _without_views(self._train_views([]))
            else:
                self._plain[split] = self._extract(split)
        return self._plain[split]

    def _plain_rows(self, split: str, samples: list) -> FeatureSet:
        """Deterministic features of ``samples`` (in that order) from ``split``.

        Validation drawn from the train split (datasets without a val split) would otherwise extract the
        whole train split (60,000 images for Fashion-MNIST). With ``augment_scope`` 'union' the rows come
        from the union extraction where it holds them (it also stores the deterministic features; without
        views it is a plain extraction of every support and validation image of the grid), and only the
        rest is extracted; with 'support' exactly these samples are extracted (cached on disk per
        sample set). The features are the same either way.
        """
        ids = [s.id for s in samples]
        if split != "train" or split in self._plain or self.augment_scope == "split":
            return self.plain(split).subset(ids)
        have = None
        if self.augment_scope == "union" and (self._views is not None or self._view_samples is not None):
            have = self._train_views([])  # the grid's union (with views, or plain when there are none)
        known = set(have.ids) if have is not None else set()
        missing = {s.id: s for s in samples if s.id not in known}
        parts = []
        if have is not None and len(missing) < len(ids):
            parts.append(_without_views(have.subset([i for i in ids if i in known])))
        if missing:
            parts.append(self._extract("train", samples=[missing[i] for i in sorted(missing)]))
        return _concat(parts).subset(ids)

    def use_view_samples(self, samples: Iterable) -> None:
        """For ``augment_scope="union"``: the training samples whose views the sweep will need."""
        unique = {s.id: s for s in samples}
        self._view_samples = [unique[i] for i in sorted(unique)]
        self._views = None

    def _train_views(self, support: list) -> FeatureSet:
        if self.augment_scope == "support":
            unique = {s.id: s for s in support}
            return self._extract("train", samples=[unique[i] for i in sorted(unique)], views=self.augment_views)
        if self._views is None:
            samples = self._view_samples if self.augment_scope == "union" else None
            if self.augment_scope == "union" and samples is None:
                raise RuntimeError("augment_scope='union' needs use_view_samples(...) before the first episode")
            self._views = self._extract("train", samples=samples, views=self.augment_views)
        return self._views

    def text_classifier(self) -> torch.Tensor:
        if self._text is None:
            from .zeroshot import text_classifier

            self._text = text_classifier(self.backbone, list(self.dataset.classnames), list(self.dataset.templates))
        return self._text

    def _ids(self, split: str) -> set[str]:
        if split not in self._split_ids:
            self._split_ids[split] = {s.id for s in self.dataset.samples(split)}
        return self._split_ids[split]

    def _split_holding(self, samples: list, prefer: Sequence[str]) -> str:
        ids = {s.id for s in samples}
        candidates = [s for s in prefer if s in self.dataset.splits()]
        candidates += [s for s in self.dataset.splits() if s not in candidates]
        for split in candidates:
            if ids <= self._ids(split):
                return split
        raise KeyError(f"{getattr(self.dataset, 'name', self.dataset)}: samples not found in any one split")

    # ----- one episode ----------------------------------------------------------------------
    def episode(self, split: Any) -> tuple[FeatureSet, FeatureSet, FeatureSet]:
        """(support with views, val without views, test) FeatureSets for a ``FewShotSplit``."""
        support, val = self.fit_sets(split)
        test_split = self._split_holding(split.test, ("test",))
        if self.test_per_class:
            key = f"{test_split}@{self.test_per_class}"
            if key not in self._plain:  # only the subset's images are extracted (cached on disk as one set)
                unique = {s.id: s for s in split.test}
                self._plain[key] = self._extract(test_split, samples=[unique[i] for i in sorted(unique)])
            test = _without_views(self._plain[key].subset([s.id for s in split.test]))
        else:
            test = _without_views(self.plain(test_split).subset([s.id for s in split.test]))
        return support, val, test

    def fit_sets(self, split: Any) -> tuple[FeatureSet, FeatureSet]:
        """(support with views, val without views): what a method is fitted on; test features are not touched
        (a saved classifier is fitted this way, so its validation is the harness's)."""
        support_ids = [s.id for s in split.support]
        if self.augment_views > 0:
            support = self._train_views(split.support).subset(support_ids)
        elif self.augment_scope in ("support", "union"):  # no views: only the needed images (big train splits)
            support = self._plain_rows("train", split.support)
        else:
            support = self.plain("train").subset(support_ids)
        if not split.val:  # no validation set (the caller cross-validates over the support): nothing to extract
            return support, FeatureSet(features=support.features[:0], labels=support.labels[:0], ids=[],
                                       classnames=support.classnames, meta=dict(support.meta))
        val_split = self._split_holding(split.val, ("val", "train"))
        val = _without_views(self._plain_rows(val_split, split.val))
        return support, val


def _without_views(fs: FeatureSet) -> FeatureSet:
    if fs.views is None:
        return fs
    return FeatureSet(features=fs.features, labels=fs.labels, ids=fs.ids, classnames=fs.classnames, meta=fs.meta)


def fixed_test_subset(samples: list, per_class: int, seed: int = 0) -> list:
    """The first ``per_class`` images of each class in a seeded permutation (the same for every episode, so
    every method, shot count and seed is scored on one fixed test subset). Order: class, then id."""
    import numpy as np

    if per_class < 1:
        raise ValueError(f"test_per_class must be >= 1, got {per_class}")
    groups: dict[int, list] = {}
    for s in samples:
        groups.setdefault(int(s.label), []).append(s)
    out = []
    for label in sorted(groups):
        group = sorted(groups[label], key=lambda s: s.id)
        keep = np.random.default_rng([seed, label]).permutation(len(group))[:per_class]
        out.extend(group[i] for i in sorted(keep.tolist()))
    return out


def _concat(parts: list[FeatureSet]) -> FeatureSet:
    parts = [_without_views(p) for p in parts]
    if len(parts) == 1:
        return parts[0]
    return FeatureSet(features=torch.cat([p.features for p in parts]), labels=torch.cat([p.labels for p in parts]),
                      ids=[i for p in parts for i in p.ids], classnames=parts[0].classnames, meta=dict(parts[0].meta))


