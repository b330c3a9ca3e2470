"""Feature-extraction speed: every engine side by side, ratios within one run, and the end-to-end path
against the tower alone.

For the offline default ``bridge:lite0-minilm`` (``--backbone`` to change) on the shared CIFAR-10 test images
and on 500x375 JPEGs made from them (upscaled, written to a temporary folder):

* image tower only (preprocessed batches of 64): PyTorch fp32 eager, ONNX Runtime fp32 (exact),
  bf16 autocast (+ torch.compile), ONNX Runtime int8 QDQ; fidelity of each against PyTorch fp32
  (cosine mean / min, agreement of the zero-shot top-1 with fp32's);
* end to end (decode -> transform -> tower -> cache write, a fresh cache each time): PyTorch fp32 with
  nothing overlapping the tower, the auto engine with nothing overlapping (``no_workers``: decoding between
  tower calls), with one loader process, and with the defaults (decode threads overlapping the tower), on
  both image sets, and a cached rerun; each as img/s and as a fraction of the same engine's tower alone.

``--json`` prints one JSON document with every figure instead of Markdown tables. ``openclip:ViT-B-32`` with
random weights (``--no-vit`` to skip) and, with a GPU, ``openclip:ViT-B-16`` bf16 follow.

Timings are wall clock on whatever else the machine runs (the load average at start and end is printed):
compare ratios within one run; rerun when the machine is quiet.
Usage: python benchmarks/features.py [--json] [--n 512] [--large-n 256] [--fid-n 256] [--vit-n 128]
       [--no-compile] [--no-vit] [--no-reduced] [--backbone SPEC] [--data DATASET-SPEC] [--cache-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
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
from xmodal.features import DEFAULT_CACHE_DIR, _calibration_id, _calibration_samples, extract_features
from xmodal.zeroshot import text_classifier

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def make_jpegs(root: Path, n: int, size=(500, 375), classes: int = 10) -> Path:
    """``n`` random-texture JPEGs of ``size`` (used where no real images are at hand, e.g. the GPU run)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / "test" / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.BILINEAR).save(d / f"{i:05d}.jpg", quality=90)
    return root


def upscaled_jpegs(ds, samples, root: Path, size=(500, 375)) -> Path:
    """The given images upscaled (bicubic) to ``size`` and saved as JPEG (quality 90) in an ImageFolder."""
    for i, s in enumerate(samples):
        d = root / "test" / f"class{s.label}"
        d.mkdir(parents=True, exist_ok=True)
        ds.load_image(s).resize(size, Image.BICUBIC).save(d / f"{i:05d}.jpg", quality=90)
    return root


def load_avg() -> float:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else float("nan")


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


def _dataset(spec: str | None):
    if spec:
        return load_dataset(spec), spec
    if (SHARED_CIFAR / "test").is_dir():
        return load_dataset(f"cifar10:{SHARED_CIFAR}"), "CIFAR-10 test images (32x32) -> 224"
    return load_dataset(f"imagefolder:{make_jpegs(Path(tempfile.mkdtemp()), 512)}"), "generated 500x375 JPEG"


def _load(spec: str, engine: str, cache: str):
    """Seeded: a spec without weights (random init) must give the same model to every engine compared."""
    torch.manual_seed(0)
    return load_backbone(spec, engine=engine, cache_dir=cache)


def _batched(fn, pixels: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([fn(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])


def tower_rows(spec: str, ds, fid_n: int, compile_bf16: bool, cache: str, reduced: bool = True) -> dict:
    """Tower-only throughput and fidelity of every engine for ``spec``: {engine: {img_s, x_torch, cos_mean,
    cos_min, top1_agreement, once, label}}."""
    bb = _load(spec, "torch", cache)
    samples = ds.samples("test")
    samples = samples[:: max(1, len(samples) // fid_n)][:fid_n]
    pixels = torch.stack([bb.preprocess(ds.load_image(s)) for s in samples])
    weights = text_classifier(bb, ds.classnames, ds.templates[:1])
    onnx_bb = _load(spec, "onnx", cache)
    t = time.perf_counter()
    engine = onnx_bb.active_engine("image")
    prep_onnx = time.perf_counter() - t
    engines = [("torch", "PyTorch fp32 eager, channels-last", bb.encode_images, "-"),
               ("onnx", f"ONNX Runtime fp32 ({engine})", onnx_bb.encode_images, f"export {prep_onnx:.1f} s")]
    if reduced:
        from xmodal.engines.bf16 import bf16_tower
        from xmodal.engines.int8 import int8_tower

        calib = _calibration_samples(ds, samples)
        t = time.perf_counter()
        int8 = int8_tower(onnx_bb, "image", cache,
                          lambda: torch.stack([bb.preprocess(ds.load_image(s)) for s in calib]), _calibration_id(calib))
        prep_int8 = time.perf_counter() - t
        os.environ.setdefault("XMODAL_COMPILE", "1" if compile_bf16 else "0")
        bf16 = bf16_tower(bb, "image", compile=compile_bf16)
        t = time.perf_counter()
        bf16(pixels[:64])  # compiles
        prep_bf16 = time.perf_counter() - t
        engines += [("bf16", f"bf16 autocast{', compiled' if bf16.compiled else ' (eager)'}", bf16,
                     f"compile {prep_bf16:.1f} s"),
                    ("int8", "ONNX Runtime int8 QDQ, first convs fp32", int8, f"quantise {prep_int8:.1f} s")]
    rows: dict = {}
    ref, base = None, None
    for key, label, fn, once in engines:
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
        rows[key] = {"label": label, "img_s": rate, "x_torch": rate / base, "cos_mean": fid["cos_mean"],
                     "cos_min": fid["cos_min"], "top1_agreement": agree, "once": once}
    return {"backbone": bb.name, "images": len(pixels), "threads": torch.get_num_threads(), "rows": rows}


def end_to_end_rows(spec: str, ds, n: int, cache: str, large=None, repeat: int = 2) -> dict:
    """Decode + transform + tower + cache write, a fresh cache each time (exports prepared beforehand):
    {key: {img_s, label, engine}}; ``large`` = (dataset, n) of the 500x375 JPEGs."""
    torch_bb = _load(spec, "torch", cache)
    auto_bb = _load(spec, "auto", cache)
    engine = auto_bb.active_engine("image")
    sets = {"": (ds, ds.samples("test")[:n])}
    if large is not None:
        sets["_large_jpeg"] = (large, large.samples("test"))
    plans = [("torch_no_workers", "PyTorch fp32, nothing overlapping the tower", torch_bb,
              {"num_workers": 0, "decode_threads": 0}, [""]),
             ("no_workers", f"{engine} fp32 (auto engine), decoding between tower calls", auto_bb,
              {"num_workers": 0, "decode_threads": 0}, list(sets)),
             ("one_worker_process", f"{engine} fp32, 1 loader process", auto_bb, {"num_workers": 1}, list(sets)),
             ("default", f"{engine} fp32, defaults (decode threads overlapping the tower)", auto_bb, {}, list(sets))]
    rows: dict = {}
    for key, label, bb, kw, which in plans:
        for suffix in which:
            data, samples = sets[suffix]

            def run():
                with tempfile.TemporaryDirectory() as feats:
                    extract_features(bb, data, "test", samples=samples, cache_dir=feats, progress=False, **kw)

            seconds = timed(run, repeat=repeat if bb is auto_bb else 1)
            rows[key + suffix] = {"label": label + (", 500x375 JPEG" if suffix else ""), "images": len(samples),
                                  "img_s": len(samples) / seconds, "engine": bb.active_engine("image")}
    samples = sets[""][1]
    with tempfile.TemporaryDirectory() as feats:
        extract_features(auto_bb, ds, "test", samples=samples, cache_dir=feats, progress=False)
        seconds = timed(lambda: extract_features(auto_bb, ds, "test", samples=samples, cache_dir=feats,
                                                 progress=False))
    rows["cached_rerun"] = {"label": "cached rerun (verified read)", "images": len(samples),
                            "img_s": len(samples) / seconds, "engine": engine}
    return {"backbone": auto_bb.name, "engine": engine, "rows": rows}


def print_tower(t: dict) -> None:
    print(f"\n#### {t['backbone']}: image tower only, {t['images']} images in batches of 64, {t['threads']} threads\n")
    print("| engine | img/s | x PyTorch fp32 | cos mean / min vs fp32 | zero-shot top-1 agreement | one-off |")
    print("|---|---:|---:|---|---:|---|")
    for r in t["rows"].values():
        print(f"| {r['label']} | {r['img_s']:,.1f} | {r['x_torch']:.2f} | {r['cos_mean']:.5f} / {r['cos_min']:.5f} | "
              f"{r['top1_agreement']:.3f} | {r['once']} |")


def print_e2e(e: dict, towers: dict) -> None:
    print(f"\n#### {e['backbone']}: end to end, batch 64\n")
    print("| path | images | img/s | x PyTorch fp32 end to end | x same engine's tower alone |")
    print("|---|---:|---:|---:|---:|")
    base = e["rows"]["torch_no_workers"]["img_s"]
    for r in e["rows"].values():
        tower = towers.get(r["engine"], {}).get("img_s")
        ratio = f"{r['img_s'] / tower:.2f}" if tower else "-"
        print(f"| {r['label']} | {r['images']} | {r['img_s']:,.1f} | {r['img_s'] / base:.2f} | {ratio} |")


def summary_json(tower: dict, e2e: dict, extra: dict) -> dict:
    """The machine-readable document: rates per engine and path, ratios, fidelity."""
    rows = tower["rows"]
    out = {"backbone": tower["backbone"], "engine": e2e["engine"],
           "tower_img_s": {k: r["img_s"] for k, r in rows.items()},
           "tower_x_torch": {k: r["x_torch"] for k, r in rows.items()},
           "cos_min": {k: r["cos_min"] for k, r in rows.items() if k != "torch"},
           "cos_mean": {k: r["cos_mean"] for k, r in rows.items() if k != "torch"},
           "top1_agreement": {k: r["top1_agreement"] for k, r in rows.items() if k != "torch"},
           "e2e_img_s": {k: r["img_s"] for k, r in e2e["rows"].items()},
           "e2e_x_tower": {k: r["img_s"] / rows[r["engine"]]["img_s"] for k, r in e2e["rows"].items()
                           if r["engine"] in rows and k != "cached_rerun"}}
    return {**out, **extra}


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON document with every figure")
    parser.add_argument("--backbone", default="bridge:lite0-minilm", help="backbone measured (default: offline)")
    parser.add_argument("--data", help="dataset spec (default: the shared CIFAR-10 test images)")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="where exports persist")
    parser.add_argument("--n", type=int, default=512, help="images end to end")
    parser.add_argument("--large-n", type=int, default=256, help="500x375 JPEGs end to end (0: skip)")
    parser.add_argument("--fid-n", type=int, default=256, help="images for tower speed and fidelity")
    parser.add_argument("--repeat", type=int, default=2, help="best of this many end-to-end runs per row")
    parser.add_argument("--vit-n", type=int, default=128, help="images for openclip:ViT-B-32 (tower and end to end)")
    parser.add_argument("--no-compile", action="store_true", help="bf16 row eager (compiling takes minutes here)")
    parser.add_argument("--no-reduced", action="store_true", help="skip the bf16 and int8 rows")
    parser.add_argument("--no-vit", action="store_true", help="skip openclip:ViT-B-32")
    parser.add_argument("--gpu-n", type=int, default=4096, help="images for the GPU run")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="GPU loader workers")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="No pretrained weights")
    start_load = load_avg()
    ds, label = _dataset(args.data)
    cache = args.cache_dir  # exports and the bridge's ridge map persist; features go to temp folders
    say = (lambda *a: None) if args.json else print
    say(f"### CPU: {os.cpu_count()} cores, load average {start_load:.1f} at start; data: {label}")
    with tempfile.TemporaryDirectory() as tmp:
        large = None
        if args.large_n > 0:
            picked = ds.samples("test")[:args.large_n]
            large = load_dataset(f"imagefolder:{upscaled_jpegs(ds, picked, Path(tmp))}")
        tower = tower_rows(args.backbone, ds, args.fid_n, not args.no_compile, cache, not args.no_reduced)
        e2e = end_to_end_rows(args.backbone, ds, args.n, cache, large, args.repeat)
    if not args.json:
        print_tower(tower)
        print_e2e(e2e, tower["rows"])
    doc = summary_json(tower, e2e, {"data": label, "cpu_count": os.cpu_count(), "load_avg": start_load})
    if not args.no_vit:
        vit_tower = tower_rows("openclip:ViT-B-32", ds, args.vit_n, not args.no_compile, cache, not args.no_reduced)
        vit_e2e = end_to_end_rows("openclip:ViT-B-32", ds, args.vit_n, cache, None, 1)
        if not args.json:
            print_tower(vit_tower)
            print_e2e(vit_e2e, vit_tower["rows"])
        doc["vit_b32"] = summary_json(vit_tower, vit_e2e, {})
    if torch.cuda.is_available():
        if args.json:
            doc["gpu"] = torch.cuda.get_device_name()  # the GPU table is printed without --json
        else:
            gpu_bench(args.gpu_n, args.workers)
    else:
        doc["gpu"] = None
        say("\n(no GPU: the openclip:ViT-B-16 bf16 GPU figures need one)")
    doc["load_avg_end"] = load_avg()
    if args.json:
        json.dump(doc, sys.stdout, indent=1)
        print()
    else:
        print(f"\nload average at end: {doc['load_avg_end']:.1f}")


if __name__ == "__main__":
    main()
