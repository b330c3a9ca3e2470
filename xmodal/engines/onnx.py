"""Exact ONNX Runtime CPU engine: a backbone tower exported once per fingerprint, verified, then reused.

Why: on CPU, ONNX Runtime runs the same fp32 graphs several times faster than eager PyTorch (fused
conv + activation kernels, no per-op dispatch). The export is checked against PyTorch on a probe batch
(cosine >= ``PROBE_COS`` per row, max abs diff recorded) before it is used, so features do not change and
the feature-cache key stays the same.

Layout in the cache folder (``<cache>/onnx/``):
  <key>-<sha12>.onnx   the graph, named by its own content digest (concurrent exporters never clash)
  <key>.json           sidecar: which file, its SHA-256, fingerprint, tower, versions, probe fidelity
The sidecar is written last (atomically); on load the file's digest and the sidecar's identity fields
must match, else the export is redone.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..cache import atomic_write_text, file_digest, stable_hash
from ..filemode import apply_umask
from ..jsonio import dumps

if TYPE_CHECKING:
    from ..encoders.base import VisionLanguageBackbone

FORMAT = 1
OPSET = 17
PROBE_COS = 0.99999
TOWERS = ("image", "tokens")


class EngineUnavailable(RuntimeError):
    """The ONNX path cannot serve this tower; the message says why (the caller falls back to PyTorch)."""


@dataclass
class OnnxTower:
    """A verified ONNX Runtime session for one tower: ``tower(pixels) -> tensor``, fp32, on CPU."""

    session: Any
    input_name: str
    path: Path
    record: dict

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: x})[0])

    @property
    def max_abs_diff(self) -> float:
        return float(self.record["probe"]["max_abs_diff"])


class _Tower(torch.nn.Module):
    """The PyTorch function of one tower as a module (the backbone's modules registered for export)."""

    def __init__(self, backbone: "VisionLanguageBackbone", tower: str) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleList(backbone.modules())
        self.fn = backbone.torch_tower(tower)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.fn(pixels)


def export_key(backbone: "VisionLanguageBackbone", tower: str) -> str:
    return stable_hash([backbone.fingerprint(), tower, backbone.image_size, torch.__version__, OPSET, FORMAT])


def probe_batch(backbone: "VisionLanguageBackbone", n: int = 3) -> torch.Tensor:
    """Seeded pixels shaped like the tower's input (drawn from a private generator, not the global one)."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(n, 3, backbone.image_size, backbone.image_size, generator=gen)


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """Per-row cosine (mean/min) and max abs difference of two (N, ...) tensors."""
    a, b = got.float().flatten(1), ref.float().flatten(1)
    cos = F.cosine_similarity(a, b, dim=1)
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "max_abs_diff": float((a - b).abs().max()), "n": int(a.shape[0])}


def _session(path: Path) -> tuple[Any, str]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.inter_op_num_threads = 1
    # no busy-waiting between ops: loader workers (and other programs) share these cores
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return session, session.get_inputs()[0].name


def _export(backbone: "VisionLanguageBackbone", tower: str, target: Path) -> None:
    module = _Tower(backbone, tower).eval()
    example = probe_batch(backbone, 2)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernel has no ONNX form
    try:
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # tracer and deprecation chatter; correctness is checked by the probe
            torch.onnx.export(module, (example,), str(target), input_names=["pixels"], output_names=["out"],
                              dynamic_axes={"pixels": {0: "batch"}, "out": {0: "batch"}}, opset_version=OPSET,
                              dynamo=False, do_constant_folding=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _reference(backbone: "VisionLanguageBackbone", tower: str, pixels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return backbone.torch_tower(tower)(pixels).float()


def load_or_export(backbone: "VisionLanguageBackbone", tower: str, cache_dir: str | Path) -> OnnxTower:
    """The verified ONNX tower for ``backbone`` (exported into ``cache_dir`` on first use)."""
    if tower not in TOWERS:
        raise EngineUnavailable(f"no ONNX export for tower {tower!r}")
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise EngineUnavailable(f"onnxruntime is not installed ({exc})") from exc
    if backbone.device.type != "cpu":
        raise EngineUnavailable(f"the ONNX engine runs on CPU and the backbone is on {backbone.device}")
    root = Path(cache_dir) / "onnx"
    key = export_key(backbone, tower)
    side = root / f"{key}.json"
    identity = {"format": FORMAT, "fingerprint": backbone.fingerprint(), "tower": tower,
                "torch": torch.__version__, "opset": OPSET, "image_size": backbone.image_size}
    if side.is_file():
        problem = None
        try:
            record = json.loads(side.read_text())
            path = root / record["file"]
            if any(record.get(k) != v for k, v in identity.items()):
                problem = "its record names another model or exporter"
            elif not path.is_file():
                problem = f"{path.name} is missing"
            elif file_digest(path) != record["sha256"]:
                problem = f"{path.name} does not match its recorded SHA-256"
            else:
                session, name = _session(path)
                return OnnxTower(session, name, path, record)
        except Exception as exc:  # unreadable sidecar or session: export again
            problem = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"re-exporting the ONNX {tower} tower of {backbone.spec}: cached export {side} is unusable "
                      f"({problem})", stacklevel=3)
    root.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{key}.", suffix=".onnx.tmp", dir=root)
    os.close(fd)
    tmp = Path(name)
    try:
        _export(backbone, tower, tmp)
        digest = file_digest(tmp)
        final = root / f"{key}-{digest[:12]}.onnx"
        apply_umask(tmp)  # mkstemp creates it owner-only
        os.replace(tmp, final)  # content-addressed: a concurrent exporter writes the same name or its own
    except Exception as exc:
        raise EngineUnavailable(f"export failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    finally:
        tmp.unlink(missing_ok=True)
    try:
        session, name = _session(final)
        probe = probe_batch(backbone)
        fidelity = compare(torch.from_numpy(session.run(None, {name: probe.numpy()})[0]),
                           _reference(backbone, tower, probe))
    except Exception as exc:
        raise EngineUnavailable(f"exported graph does not run ({type(exc).__name__}: {exc})") from exc
    if not fidelity["cos_min"] >= PROBE_COS:
        final.unlink(missing_ok=True)
        raise EngineUnavailable(f"export differs from PyTorch (cosine min {fidelity['cos_min']:.6f} < {PROBE_COS}, "
                                f"max abs diff {fidelity['max_abs_diff']:.2e})")
    import onnxruntime

    record = {**identity, "spec": backbone.spec, "file": final.name, "sha256": digest, "probe": fidelity,
              "onnxruntime": onnxruntime.__version__}
    atomic_write_text(side, dumps(record, indent=1))
    return OnnxTower(session, name, final, record)
