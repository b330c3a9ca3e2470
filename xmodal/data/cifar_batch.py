"""Read one CIFAR-10 python batch file without running code from it.

The official batches are Python pickles: ``{b"batch_label": bytes, b"labels": [int], b"data": uint8 (N, 3072),
b"filenames": [bytes]}``. A pickle can name any importable callable, so ``pickle.load`` on a file a user
points us at would execute whatever it names. This reader uses an ``Unpickler`` whose ``find_class`` only
hands out the numpy functions that rebuild a plain array (and the latin-1 bytes codec that protocol-2
pickles written by Python 3 use for ``bytes``); every other global is refused before it is called. The
result is then checked structurally: a dict with the four expected keys and plain values only.
"""
from __future__ import annotations

import codecs
import importlib
import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError

MAX_BATCH_BYTES = 512 * 1024 * 1024  # the real batches are ~31 MB; refuse absurd files before reading them
EXPECTED_KEYS = {"batch_label", "labels", "data", "filenames"}
PIXELS = 3 * 32 * 32


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What protocol-2 pickles call (``_codecs.encode(str, "latin1")``) to rebuild ``bytes``; nothing else."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() not in {"latin1", "iso88591"}:
        raise pickle.UnpicklingError("only latin-1 bytes literals are allowed in a CIFAR-10 batch")
    return codecs.encode(text, "latin1")


def _numpy_attr(modules: tuple[str, ...], name: str) -> Any:
    for module in modules:
        try:
            with warnings.catch_warnings():  # numpy 2 warns on the numpy.core alias old pickles use
                warnings.simplefilter("ignore")
                return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {name} in {modules}")


_MULTIARRAY = ("numpy._core.multiarray", "numpy.core.multiarray")
_NUMERIC = ("numpy._core.numeric", "numpy.core.numeric")
# (module, name) a genuine batch may name -> how to get the callable; nothing else resolves
_ALLOWED = {
    **{(m, "_reconstruct"): lambda: _numpy_attr(_MULTIARRAY, "_reconstruct") for m in _MULTIARRAY},
    **{(m, "_frombuffer"): lambda: _numpy_attr(_NUMERIC, "_frombuffer") for m in _NUMERIC},
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only "
                                         "arrays, lists and bytes")
        return factory()

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent references are not allowed in a CIFAR-10 batch")


def _plain(value: Any) -> bool:
    """bytes / str / int / lists of those / a numeric ndarray: nothing with behaviour."""
    if isinstance(value, (bytes, str, int)) and not isinstance(value, bool):
        return True
    if isinstance(value, np.ndarray):
        return type(value) is np.ndarray and value.dtype.kind in "uib"
    if isinstance(value, list):
        return all(isinstance(v, (bytes, str, int)) and not isinstance(v, bool) for v in value)
    return False


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, labels (N,) int64) of one batch file; anything else is a DatasetError."""
    path = Path(path)
    expected = "a dict with b'data' (N, 3072) uint8, b'labels' (N ints in 0..9), b'batch_label', b'filenames'"
    try:
        size = path.stat().st_size
        if size > MAX_BATCH_BYTES:
            raise DatasetError(f"CIFAR-10 batch file {path} is {size} bytes, far larger than a real batch",
                               hint="point cifar10:PATH at the extracted cifar-10-batches-py folder")
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read CIFAR-10 batch file {path}: {exc.strerror or exc}",
                           hint="check the path and its permissions") from exc
    try:
        obj = _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # any malformed or hostile stream; nothing it names has been called
        raise DatasetError(f"CIFAR-10 batch file {path} is not a valid python batch ({expected}): {exc}",
                           hint="re-extract cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html")
    if not isinstance(obj, dict) or type(obj) is not dict:
        raise DatasetError(f"CIFAR-10 batch file {path} holds a {type(obj).__name__}, expected {expected}")
    d = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    unknown = [k for k in d if k not in EXPECTED_KEYS]
    bad = [k for k, v in d.items() if k in EXPECTED_KEYS and not _plain(v)]
    if unknown or bad or "data" not in d or "labels" not in d:
        what = (f"unexpected keys {unknown[:5]}" if unknown else f"non-plain values for {bad}" if bad
                else "no 'data' or 'labels'")
        raise DatasetError(f"CIFAR-10 batch file {path}: {what}; expected {expected}")
    data, labels = d["data"], d["labels"]
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != PIXELS:
        shape = getattr(data, "shape", type(data).__name__)
        raise DatasetError(f"CIFAR-10 batch file {path}: b'data' is {shape}, expected (N, {PIXELS}) uint8")
    if data.dtype != np.uint8 and (data.size and (data.min() < 0 or data.max() > 255)):
        raise DatasetError(f"CIFAR-10 batch file {path}: pixel values outside 0..255")
    y = np.asarray(labels)
    if y.ndim != 1 or (y.size and y.dtype.kind not in "iu"):
        raise DatasetError(f"CIFAR-10 batch file {path}: b'labels' must be a list of ints")
    y = y.astype(np.int64)
    if len(y) != len(data) or (len(y) and (y.min() < 0 or y.max() > 9)):
        raise DatasetError(f"CIFAR-10 batch file {path}: {len(data)} images but {len(y)} labels in 0..9")
    x = data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x), y
