"""Provenance stamped on every result row: package version, git commit, time, and the identity of what the
row was computed from (backbone weights, dataset content, extraction options)."""
from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
import re
import subprocess
from pathlib import Path
from typing import Any

from ..version import __version__

_PKG_DIR = Path(__file__).resolve().parents[1]  # the xmodal package folder


@functools.lru_cache(maxsize=1)
def xmodal_version() -> str:
    """Installed distribution version, else ``xmodal.__version__``, else pyproject's, else "unknown"."""
    try:
        return importlib.metadata.version("xmodal")
    except importlib.metadata.PackageNotFoundError:
        pass
    version = __version__
    if version:
        return str(version)
    pyproject = _PKG_DIR.parent / "pyproject.toml"
    if pyproject.is_file():
        match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), flags=re.MULTILINE)
        if match:
            return match.group(1)
    return "unknown"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(_PKG_DIR), *args], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """HEAD of the repository the package was imported from, or "unknown" (e.g. a wheel install)."""
    return _git("rev-parse", "HEAD") or "unknown"


@functools.lru_cache(maxsize=1)
def git_dirty() -> bool | None:
    """True when tracked files differ from HEAD (results may not be reproducible from the commit)."""
    if git_commit() == "unknown":
        return None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def utc_timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


# ----- identity of what a result row was computed from ------------------------------------------------
IDENTITY_FIELDS = ("backbone_fingerprint", "dataset", "features")


def dataset_identity(dataset: Any) -> dict[str, Any]:
    """What makes two loads of a dataset the same data: its cache id, class names, prompt templates and,
    per split, the digest the feature cache keys on (sample ids + labels + file sizes and mtimes, from
    ``xmodal.features``) plus the pixel digest of in-memory arrays. Any added, removed, relabelled or
    edited image changes the split's entry."""
    from ..cache import stable_hash
    from ..features import _sample_signature

    splits = {}
    for split in dataset.splits():
        samples = dataset.samples(split)
        splits[split] = stable_hash([stable_hash(_sample_signature(samples), 32), dataset.content_key(split)], 16)
    return {"cache_id": str(dataset.cache_id),
            "classes": stable_hash([list(dataset.classnames), list(dataset.templates)], 16),
            "splits": splits}


def result_identity(backbone: Any, dataset: Any, **features: Any) -> dict[str, Any]:
    """Everything besides (method, shots, seed) that determines a result row: the backbone's weights and
    preprocessing (its fingerprint), the dataset's content, and the feature-extraction options that change
    the numbers (augmented views and their scope and seed, dtype, decode path, engine, skipped images)."""
    from ..cache import stable_hash

    detail = {"backbone_fingerprint": str(backbone.fingerprint()), "dataset": dataset_identity(dataset),
              "features": dict(sorted(features.items()))}
    return {"identity": stable_hash(detail, 20), "identity_detail": detail}


def method_config(method: Any) -> str:
    """Digest of a method's constructor parameters except ``seed`` and ``device`` (scikit-learn's
    ``get_params``): a row made with other settings — a changed default after an upgrade — is never reused."""
    import hashlib

    import torch

    from ..cache import stable_hash
    from ..fewshot.state import constructor_params

    def plain(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            data = v.detach().cpu().contiguous().numpy().tobytes()
            return {"tensor": list(v.shape), "dtype": str(v.dtype), "sha": hashlib.sha256(data).hexdigest()[:16]}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v if v is None or isinstance(v, (bool, int, float, str)) else repr(v)

    params = {k: plain(v) for k, v in constructor_params(method).items() if k not in ("seed", "device")}
    return stable_hash(params, 12)


def describe_identity_change(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two ``identity_detail`` dicts (what changed, in words)."""
    if not isinstance(old, dict):
        return ["the stored rows predate data identities (an older xmodal), so they cannot be verified"]
    out = []
    if old.get("backbone_fingerprint") != new.get("backbone_fingerprint"):
        out.append(f"backbone weights (fingerprint {old.get('backbone_fingerprint')} -> "
                   f"{new.get('backbone_fingerprint')})")
    od, nd = old.get("dataset") or {}, new.get("dataset") or {}
    if od.get("cache_id") != nd.get("cache_id"):
        out.append(f"dataset location ({od.get('cache_id')} -> {nd.get('cache_id')})")
    if od.get("classes") != nd.get("classes"):
        out.append("class names or prompt templates")
    osp, nsp = od.get("splits") or {}, nd.get("splits") or {}
    changed = sorted(s for s in set(osp) | set(nsp) if osp.get(s) != nsp.get(s))
    if changed:
        out.append(f"dataset content of split(s) {', '.join(changed)} (images added, removed, relabelled or edited)")
    of, nf = old.get("features") or {}, new.get("features") or {}
    for k in sorted(set(of) | set(nf)):
        if of.get(k) != nf.get(k):
            out.append(f"{k} {of.get(k)!r} -> {nf.get(k)!r}")
    return out or ["the recorded identity differs"]
