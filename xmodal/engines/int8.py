"""Opt-in int8 on CPU: ONNX Runtime static quantisation (QDQ) of the exact fp32 export, of the
convolutions and matrix products only (pooling, residual adds and the final normalisation stay fp32:
quantising them too dropped the offline default's cosine to fp32 from 0.992 to 0.907 on CIFAR-10), with
the first layers kept in fp32 (they carry the most quantisation error for the least time).

It changes the numbers, so its features have their own cache key; the quantised graph is keyed by the
backbone fingerprint, tower, recipe and the calibration images, cached beside the fp32 export with a
sidecar (SHA-256 verified on load) like the fp32 export.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ..cache import atomic_write_text, file_digest, stable_hash
from ..errors import ResourceError
from ..filemode import apply_umask
from ..jsonio import dumps
from .onnx import EngineUnavailable, OnnxTower, _session, load_or_export

if TYPE_CHECKING:
    from ..encoders.base import VisionLanguageBackbone

INT8_RECIPE = {"format": "qdq", "ops": ["Conv", "MatMul", "Gemm"], "weights": "int8 per-channel",
               "activations": "uint8", "calibration": "minmax", "fp32_first": 9, "calib_images": 64, "version": 2}


def _first_nodes(model_path: Path, k: int) -> list[str]:
    """Names of the first ``k`` compute-heavy nodes (Conv, MatMul, Gemm) in graph order."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    heavy = [n.name for n in graph.node if n.op_type in {"Conv", "MatMul", "Gemm"}]
    return heavy[:min(k, len(heavy) // 4)]  # a tiny model keeps most of its few layers quantised


def _quantize(fp32_path: Path, target: Path, pixels: torch.Tensor, input_name: str) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{input_name: pixels[i:i + 16].numpy()} for i in range(0, len(pixels), 16)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(dir=target.parent) as tmp, warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=INT8_RECIPE["ops"],
                        nodes_to_exclude=_first_nodes(prepared, INT8_RECIPE["fp32_first"]),
                        extra_options={"CalibTensorRangeSymmetric": False})


def int8_tower(backbone: "VisionLanguageBackbone", tower: str, cache_dir: str | Path,
               calib_pixels: Callable[[], torch.Tensor], calib_id: str) -> OnnxTower:
    """The int8 QDQ tower of ``backbone`` calibrated on ``calib_pixels()`` (identified by ``calib_id``)."""
    try:
        fp32 = load_or_export(backbone, tower, cache_dir)
    except EngineUnavailable as exc:
        raise ResourceError(f"--dtype int8 needs the ONNX export of {backbone.spec}, which is unavailable: {exc}",
                            hint="use --dtype fp32 or --dtype bf16") from exc
    root = Path(cache_dir) / "onnx"
    key = stable_hash([fp32.record["sha256"], tower, INT8_RECIPE, calib_id])
    side = root / f"{key}.int8.json"
    if side.is_file():
        try:
            record = json.loads(side.read_text())
            path = root / record["file"]
            if record.get("fp32_sha256") == fp32.record["sha256"] and file_digest(path) == record["sha256"]:
                session, name = _session(path)
                return OnnxTower(session, name, path, record)
            reason = "it does not match its record"
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"re-quantising the int8 {tower} tower of {backbone.spec}: cached model {side} is unusable "
                      f"({reason})", stacklevel=3)
    fd, name = tempfile.mkstemp(prefix=f".{key}.", suffix=".int8.onnx.tmp", dir=root)
    os.close(fd)
    tmp = Path(name)
    try:
        _quantize(fp32.path, tmp, calib_pixels().float().contiguous(), fp32.input_name)
        digest = file_digest(tmp)
        final = root / f"{key}-{digest[:12]}.int8.onnx"
        apply_umask(tmp)  # mkstemp creates it owner-only
        os.replace(tmp, final)
    except Exception as exc:
        raise ResourceError(f"int8 quantisation of {backbone.spec} failed ({type(exc).__name__}: {exc})",
                            hint="use --dtype fp32 or --dtype bf16") from exc
    finally:
        tmp.unlink(missing_ok=True)
    import onnxruntime

    record = {"file": final.name, "sha256": digest, "fp32_sha256": fp32.record["sha256"], "tower": tower,
              "spec": backbone.spec, "fingerprint": backbone.fingerprint(), "calibration": calib_id,
              "int8": INT8_RECIPE, "onnxruntime": onnxruntime.__version__, "probe": fp32.record["probe"]}
    atomic_write_text(side, dumps(record, indent=1))
    session, name = _session(final)
    return OnnxTower(session, name, final, record)
