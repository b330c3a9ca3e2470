"""The saved-classifier folder: ``adapter.safetensors`` + ``xmodal_classifier.json`` (PEFT-style, no pickle).

Writing goes to a temporary folder beside the target that is renamed into place only when complete, so a
crash never leaves a half-written classifier. One digest covers the whole classifier: the JSON records the
SHA-256 of the tensor file, and ``digest`` is the SHA-256 of the canonical JSON itself (every field but
``digest``: class names, method parameters and state, backbone, the tensor file's checksum). Reading checks
the format, the version, that digest and the tensor checksum before anything is trusted; ``force=True``
(``--force``) loads a changed folder anyway, with a warning.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..cache import file_digest
from ..errors import InputError
from ..filemode import apply_umask
from ..jsonio import dumps

FORMAT = "xmodal-classifier"
FORMAT_VERSION = 2  # 2: the whole-classifier digest; 1 (no digest) loads only with force
DIGEST_KEY = "digest"
TENSORS_FILE = "adapter.safetensors"
CONFIG_FILE = "xmodal_classifier.json"
OWN_FILES = {TENSORS_FILE, CONFIG_FILE}


def write_artefact(target: str | Path, tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> Path:
    """Write the folder atomically; an existing classifier folder at ``target`` is replaced as a whole.

    A non-empty folder holding anything but a saved classifier is refused rather than overwritten.
    """
    target = Path(target).expanduser()
    if target.exists():
        if not target.is_dir():
            raise InputError(f"cannot save the classifier to {target}: it is a file",
                             hint="choose a folder path that does not exist yet (--out DIR)")
        foreign = sorted(p.name for p in target.iterdir() if p.name not in OWN_FILES)
        if foreign:
            raise InputError(f"refusing to overwrite {target}: it holds files that are not a saved classifier "
                             f"({', '.join(foreign[:3])})", hint="choose a new or empty folder (--out DIR)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        tensor_path = tmp / TENSORS_FILE
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tensor_path),
                  metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        doc = {k: v for k, v in doc.items() if k != DIGEST_KEY}
        doc["files"] = {TENSORS_FILE: {"sha256": file_digest(tensor_path), "bytes": tensor_path.stat().st_size}}
        doc[DIGEST_KEY] = doc_digest(doc)
        with open(tmp / CONFIG_FILE, "w") as fh:
            fh.write(dumps(doc, indent=2) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        apply_umask(tmp)  # mkdtemp and safetensors create owner-only modes
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def doc_digest(doc: dict[str, Any]) -> str:
    """SHA-256 of the description in canonical JSON (sorted keys, no spaces), the ``digest`` field left out."""
    body = {k: v for k, v in doc.items() if k != DIGEST_KEY}
    return hashlib.sha256(dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _refuse_or_warn(message: str, hint: str, force: bool) -> None:
    if not force:
        raise InputError(message, hint=hint)
    warnings.warn(f"{message}; loading anyway because of --force (force=True): predictions may be wrong",
                  stacklevel=3)


def read_artefact(folder: str | Path, force: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, doc) of a saved classifier, after checking format, version, digest and tensor checksum.

    ``force``: a digest or checksum mismatch (an edited or damaged folder) and a folder written before the
    digest existed are loaded with a warning instead of refused.
    """
    folder = Path(folder).expanduser()
    refit = "fit and save it again (xmodal fit ... --out DIR)"
    if not folder.is_dir():
        raise InputError(f"no saved classifier at {folder}: not a folder",
                         hint="pass the folder written by FewShotClassifier.save / xmodal fit --out")
    config = folder / CONFIG_FILE
    tensor_path = folder / TENSORS_FILE
    missing = [p.name for p in (config, tensor_path) if not p.is_file()]
    if missing:
        raise InputError(f"{folder} is not a complete saved classifier: missing {', '.join(missing)}",
                         hint=f"pass the folder written by xmodal fit --out, or {refit}")
    try:
        doc = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{config} is not valid JSON ({exc})", hint=refit) from None
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if fmt != FORMAT:
        raise InputError(f"{config} is not an xmodal classifier description (format {fmt!r}, expected {FORMAT!r})",
                         hint=refit)
    version = doc.get("format_version")
    force_hint = f"restore the original folder, or {refit}, or pass --force to load it anyway"
    if version == 1:
        _refuse_or_warn(f"{folder} was saved in classifier format version 1, before the whole-classifier digest: "
                        f"edits to {CONFIG_FILE} (class names, parameters) cannot be detected", f"{refit}, or "
                        "pass --force to load it unchecked", force)
    elif version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise InputError(f"{folder} uses classifier format version {version!r}; this xmodal reads version "
                         f"{FORMAT_VERSION}",
                         hint="upgrade xmodal to load it" if newer else f"load it with the xmodal that wrote it, or {refit}")
    else:
        recorded, actual_doc = doc.get(DIGEST_KEY), doc_digest(doc)
        if recorded != actual_doc:
            _refuse_or_warn(f"{config} does not match its recorded digest (recorded {str(recorded)[:12]}…, found "
                            f"{actual_doc[:12]}…): the description (class names, method parameters or state) was "
                            "edited or damaged", force_hint, force)
    entry = doc["files"].get(TENSORS_FILE) if isinstance(doc.get("files"), dict) else None
    expected = entry.get("sha256") if isinstance(entry, dict) else None
    actual = file_digest(tensor_path)
    if not expected or expected != actual:
        _refuse_or_warn(f"{tensor_path} does not match the checksum recorded in {CONFIG_FILE} "
                        f"(recorded {str(expected)[:12]}…, found {actual[:12]}…): the file was changed or damaged",
                        force_hint, force)
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"cannot read {tensor_path}: {exc}", hint=refit) from None
    return tensors, doc
