"""End-to-end feature-extraction throughput (JPEG decode -> tensor -> embedding), and where the time goes.

CPU: the offline default ``bridge:lite0-minilm`` on CIFAR-10 JPEGs (shared subset, or generated).
GPU (when present): ``openclip:ViT-B-16`` with random weights in bf16 on generated 500x375 JPEGs,
through the PIL data-loader path and the batched torchvision (nvJPEG) decode path.
Reference on one H100: bare ViT-B/16 tower ~8,600 img/s bf16; PIL decode+resize ~1,600 img/s with
16 processes; nvJPEG batched decode ~5,800 img/s. Target: >= 5,000 img/s end to end.

Usage: python benchmarks/features.py [--n 512] [--gpu-n 4096] [--workers N]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from xmodal.backbones import load_backbone
from xmodal.data import load_dataset
from xmodal.features import extract_features

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


def row(name: str, n: int, seconds: float) -> None:
    print(f"| {name} | {n} | {seconds:.2f} | {n / seconds:,.0f} |")


def cpu_bench(n: int, workers: int) -> None:
    bb = load_backbone("bridge:lite0-minilm")
    if (SHARED_CIFAR / "test").is_dir():
        ds = load_dataset(f"imagefolder:{SHARED_CIFAR}")
        label = "CIFAR-10 32x32 JPEG -> 224"
    else:
        ds = load_dataset(f"imagefolder:{make_jpegs(Path(tempfile.mkdtemp()), n)}")
        label = "generated 500x375 JPEG"
    samples = ds.samples("test")[:n]
    print(f"\n### CPU ({torch.get_num_threads()} threads), {bb.name}, {label}\n")
    print("| stage | images | seconds | images/s |\n|---|---|---|---|")
    row("decode + preprocess only (PIL, 1 process)", n, timed(lambda: [bb.preprocess(ds.load_image(s)) for s in samples]))
    pixels = torch.stack([bb.preprocess(ds.load_image(s)) for s in samples[:64]])
    row("image tower only (batch 64, channels-last)", 64, timed(lambda: bb.encode_images(pixels), repeat=2))
    for w in sorted({0, workers}):
        with tempfile.TemporaryDirectory() as cache:
            row(f"end to end, PIL, {w} loader workers", n,
                timed(lambda: extract_features(bb, ds, "test", samples=samples, cache_dir=cache, num_workers=w,
                                               progress=False)))
    with tempfile.TemporaryDirectory() as cache:
        extract_features(bb, ds, "test", samples=samples, cache_dir=cache, progress=False)
        row("cached (second run reads the cache)", n,
            timed(lambda: extract_features(bb, ds, "test", samples=samples, cache_dir=cache, progress=False)))


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
    row("image tower only (batch 512)", 2048, timed(tower, repeat=3))
    for decode, w in (("pil", workers), ("tensor", 4)):
        with tempfile.TemporaryDirectory() as cache:
            run = lambda: extract_features(bb, ds, "test", cache_dir=cache, batch_size=512, dtype="bf16",  # noqa: E731
                                           num_workers=w, decode=decode, progress=False)
            row(f"end to end, decode={decode}, {w} workers", n, timed(run))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=512, help="images for the CPU run")
    parser.add_argument("--gpu-n", type=int, default=4096, help="images for the GPU run")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    args = parser.parse_args()
    cpu_bench(args.n, min(args.workers, 1))
    if torch.cuda.is_available():
        gpu_bench(args.gpu_n, args.workers)
    else:
        print("\n(no GPU: the openclip:ViT-B-16 bf16 figures need one)")


if __name__ == "__main__":
    main()
