"""Feature-extraction speed: every engine side by side, ratios to the PyTorch fp32 path, in one run.

For each backbone (default: the offline stand-in ``bridge:lite0-minilm`` on CIFAR-10 JPEGs, and
``openclip:ViT-B-32`` with random weights as a CPU-only CLIP user would run it):

* image tower only (preprocessed batches of 64): PyTorch fp32 eager, ONNX Runtime fp32 (exact),
  bf16 autocast + torch.compile, ONNX Runtime int8 QDQ; fidelity of each against PyTorch fp32
  (cosine mean / min over the images, and agreement of the zero-shot top-1 with fp32's);
* end to end (JPEG decode -> transform -> tower -> cache write): PyTorch fp32 without loader workers
  (the old default), ONNX Runtime without workers, ONNX Runtime with the default worker count, and a
  cached rerun.

GPU (when present): ``openclip:ViT-B-16`` random weights in bf16 on generated 500x375 JPEGs through
the PIL loader and through ``decode="tensor"`` (nvJPEG).

Timings are wall clock on whatever else the machine runs: on a shared machine, rerun when it is quiet.
Usage: python benchmarks/features.py [--n 512] [--fid-n 256] [--vit-n 128] [--no-compile] [--no-vit]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from xmodal.backbones import load_backbone
from xmodal.data import load_dataset
from xmodal.engines.onnx import compare
from xmodal.features import DEFAULT_CACHE_DIR, _calibration_id, _calibration_samples, auto_workers, extract_features
from xmodal.zeroshot import text_classifier

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def make_jpegs(root: Path, n: int, size=(500, 375), classes: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / "test" / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.BILINEAR).save(d / f"{i:05d}.jpg", quality=90)
    return root


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def _dataset():
    if (SHARED_CIFAR / "test").is_dir():
        return load_dataset(f"cifar10:{SHARED_CIFAR}"), "CIFAR-10 32x32 JPEG -> 224"
    return load_dataset(f"imagefolder:{make_jpegs(Path(tempfile.mkdtemp()), 512)}"), "generated 500x375 JPEG"


def _load(spec: str, engine: str, cache: str):
    """Seeded: a spec without weights (random init) must give the same model to every engine compared."""
    torch.manual_seed(0)
    return load_backbone(spec, engine=engine, cache_dir=cache)


def _batched(fn, pixels: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([fn(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])


def tower_table(spec: str, ds, fid_n: int, compile_bf16: bool, cache: str) -> None:
    """Tower-only throughput and fidelity of every engine for ``spec``."""
    from xmodal.engines.bf16 import bf16_tower
    from xmodal.engines.int8 import int8_tower

    bb = _load(spec, "torch", cache)
    samples = ds.samples("test")
    samples = samples[:: max(1, len(samples) // fid_n)][:fid_n]
    pixels = torch.stack([bb.preprocess(ds.load_image(s)) for s in samples])
    weights = text_classifier(bb, ds.classnames, ds.templates[:1])
    onnx_bb = _load(spec, "onnx", cache)
    t = time.perf_counter()
    engine = onnx_bb.active_engine("image")
    prep_onnx = time.perf_counter() - t
    calib = _calibration_samples(ds, samples)
    t = time.perf_counter()
    int8 = int8_tower(onnx_bb, "image", cache, lambda: torch.stack([bb.preprocess(ds.load_image(s)) for s in calib]),
                      _calibration_id(calib))
    prep_int8 = time.perf_counter() - t
    os.environ.setdefault("XMODAL_COMPILE", "1" if compile_bf16 else "0")
    bf16 = bf16_tower(bb, "image", compile=compile_bf16)
    t = time.perf_counter()
    bf16(pixels[:64])  # compiles
    prep_bf16 = time.perf_counter() - t
    engines = [("PyTorch fp32 eager, channels-last", bb.encode_images, "-"),
               (f"ONNX Runtime fp32 ({engine})", onnx_bb.encode_images, f"export {prep_onnx:.1f} s"),
               (f"bf16 autocast{', compiled' if bf16.compiled else ' (eager)'}", bf16, f"compile {prep_bf16:.1f} s"),
               ("ONNX Runtime int8 QDQ, first convs fp32", int8, f"quantise {prep_int8:.1f} s")]
    print(f"\n#### {bb.name}: image tower only, {len(pixels)} images in batches of 64, "
          f"{torch.get_num_threads()} threads\n")
    print("| engine | img/s | x PyTorch fp32 | cos mean / min vs fp32 | zero-shot top-1 agreement | one-off |")
    print("|---|---:|---:|---|---:|---|")
    ref, base = None, None
    for name, fn, once in engines:
        fn(pixels[:8])  # warm-up
        out = None

        def run():
            nonlocal out
            out = _batched(fn, pixels)

        seconds = timed(run, repeat=2)
        rate = len(pixels) / seconds
        if ref is None:
            ref, base = out, rate
        fid = compare(out, ref)
        agree = ((out.float() @ weights.T).argmax(1) == (ref @ weights.T).argmax(1)).float().mean().item()
        print(f"| {name} | {rate:,.1f} | {rate / base:.2f} | {fid['cos_mean']:.5f} / {fid['cos_min']:.5f} | "
              f"{agree:.3f} | {once} |")


def end_to_end_table(spec: str, ds, n: int, cache: str) -> None:
    """Decode + transform + tower + cache write, fresh cache each row (exports prepared beforehand)."""
    samples = ds.samples("test")[:n]
    torch_bb = _load(spec, "torch", cache)
    onnx_bb = _load(spec, "auto", cache)
    onnx_bb.active_engine("image")
    workers = auto_workers(len(samples), 64, torch.device("cpu"))
    print(f"\n#### {torch_bb.name}: end to end, {n} images, batch 64\n")
    print("| path | img/s | x PyTorch fp32 |\n|---|---:|---:|")
    base = None
    rows = [("PyTorch fp32, 0 loader workers (old default)", torch_bb, 0),
            (f"{onnx_bb.active_engine()} fp32 (auto engine), 0 loader workers", onnx_bb, 0),
            (f"{onnx_bb.active_engine()} fp32 (auto engine), {workers} loader worker(s) (default)", onnx_bb, None)]
    for name, bb, w in rows:
        with tempfile.TemporaryDirectory() as feats:
            seconds = timed(lambda: extract_features(bb, ds, "test", samples=samples, cache_dir=feats,
                                                     num_workers=w, progress=False))
        rate = n / seconds
        base = base or rate
        print(f"| {name} | {rate:,.1f} | {rate / base:.2f} |")
    with tempfile.TemporaryDirectory() as feats:
        extract_features(onnx_bb, ds, "test", samples=samples, cache_dir=feats, progress=False)
        seconds = timed(lambda: extract_features(onnx_bb, ds, "test", samples=samples, cache_dir=feats, progress=False))
    print(f"| cached rerun (verified read) | {n / seconds:,.0f} | {n / seconds / base:.2f} |")


def gpu_bench(n: int, workers: int) -> None:
    bb = load_backbone("openclip:ViT-B-16", device="cuda")  # no tag: random weights, same compute
    ds = load_dataset(f"imagefolder:{make_jpegs(Path(tempfile.mkdtemp()), n)}")
    print(f"\n### GPU {torch.cuda.get_device_name()}, openclip:ViT-B-16 (random weights), bf16, 500x375 JPEG\n")
    print("| stage | images | seconds | images/s |\n|---|---|---|---|")
    x = torch.randn(512, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)

    def tower():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(4):
                bb.encode_images(x)

    tower()
    s = timed(tower, repeat=3)
    print(f"| image tower only (batch 512) | 2048 | {s:.2f} | {2048 / s:,.0f} |")
    for decode, w in (("pil", workers), ("tensor", 4)):
        with tempfile.TemporaryDirectory() as cache:
            s = timed(lambda: extract_features(bb, ds, "test", cache_dir=cache, batch_size=512, dtype="bf16",
                                               num_workers=w, decode=decode, progress=False))
            print(f"| end to end, decode={decode}, {w} workers | {n} | {s:.2f} | {n / s:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=512, help="images end to end (offline default)")
    parser.add_argument("--fid-n", type=int, default=256, help="images for tower speed and fidelity")
    parser.add_argument("--vit-n", type=int, default=128, help="images for openclip:ViT-B-32 (tower and end to end)")
    parser.add_argument("--no-compile", action="store_true", help="bf16 row eager (compiling takes minutes here)")
    parser.add_argument("--no-vit", action="store_true", help="skip openclip:ViT-B-32")
    parser.add_argument("--no-lite0", action="store_true", help="skip bridge:lite0-minilm")
    parser.add_argument("--gpu-n", type=int, default=4096, help="images for the GPU run")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="GPU loader workers")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="No pretrained weights")
    ds, label = _dataset()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"### CPU: {os.cpu_count()} cores, load average {load:.1f} at start; data: {label}")
    cache = str(DEFAULT_CACHE_DIR)  # exports and the bridge's ridge map persist; features go to temp folders
    if not args.no_lite0:
        tower_table("bridge:lite0-minilm", ds, args.fid_n, not args.no_compile, cache)
        end_to_end_table("bridge:lite0-minilm", ds, args.n, cache)
    if not args.no_vit:
        tower_table("openclip:ViT-B-32", ds, args.vit_n, not args.no_compile, cache)
        end_to_end_table("openclip:ViT-B-32", ds, args.vit_n, cache)
    if torch.cuda.is_available():
        gpu_bench(args.gpu_n, args.workers)
    else:
        print("\n(no GPU: the openclip:ViT-B-16 bf16 GPU figures need one)")


if __name__ == "__main__":
    main()
