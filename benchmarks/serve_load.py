"""Load benchmark of ``xmodal serve``: served throughput and latency against in-process ``predict``.

1. Fit a classifier with the offline default backbone (``bridge:lite0-minilm``, a stand-in for CLIP) on a
   small CIFAR-10 subset and save it (features come from the on-disk cache after the first run).
2. In process: ``predict_proba`` over the benchmark images (already decoded PIL images, the library's default
   batch size) — measured before *and* after the served run, so drift from other load shows.
3. Served: start ``xmodal serve`` (a real uvicorn process on a loopback port), then N concurrent clients post
   one PNG each per request (multipart) until a fixed number of requests is done (or a time limit passes).
   Each answer's top-1 is compared with the in-process top-1.

Prints images/s, p50/p95/p99 latency, errors, top-1 disagreements, batch sizes seen by the server, and
served / in-process throughput. The client runs on the same machine, so its CPU time counts against the
server; on a shared machine the figures move with other load (say so when quoting them).

    .venv/bin/python benchmarks/serve_load.py                      # 16 clients, 320 requests
    .venv/bin/python benchmarks/serve_load.py --clients 32 --requests 640 --json
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = f"cifar10:{ROOT.parent / 'shared' / 'data' / 'cifar10'}"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="dataset spec to fit on; its test split feeds the requests")
    p.add_argument("--backbone", default="bridge:lite0-minilm")
    p.add_argument("--method", default="tip-adapter")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=64, help="distinct test images the requests cycle through")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--requests", type=int, default=320, help="requests in the timed run (one image each)")
    p.add_argument("--max-seconds", type=float, default=300.0, help="stop the timed run after this long")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--cache-dir", default=str(ROOT / ".xmodal-cache"))
    p.add_argument("--model-dir", default=None, help="save the fitted classifier here (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    return p.parse_args()


def fit_and_save(args: argparse.Namespace, model_dir: Path) -> float:
    from xmodal.classifier import FewShotClassifier

    t0 = time.perf_counter()
    clf = FewShotClassifier(backbone=args.backbone, method=args.method, shots=args.shots, seed=args.seed,
                            cache_dir=args.cache_dir, device="cpu")
    clf.fit(args.data)
    clf.save(model_dir)
    return time.perf_counter() - t0


def request_images(args: argparse.Namespace) -> list[bytes]:
    """PNG bytes of the first ``--images`` test images (what a client would upload)."""
    from xmodal import load_dataset

    ds = load_dataset(args.data)
    out = []
    for sample in ds.samples("test")[: args.images]:
        buf = io.BytesIO()
        ds.load_image(sample).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def in_process(model_dir: Path, images: list[Image.Image], n: int, args: argparse.Namespace) -> tuple[float, list[str]]:
    """Images/s of ``predict_proba`` on ``n`` decoded images (cycling), after one warm-up call; and the top-1s."""
    from xmodal.classifier import FewShotClassifier

    clf = FewShotClassifier.load(model_dir, device="cpu", cache_dir=args.cache_dir)
    top1 = clf.predict(images)  # warm-up and the reference answers
    batch = [images[i % len(images)] for i in range(n)]
    t0 = time.perf_counter()
    clf.predict_proba(batch)
    seconds = time.perf_counter() - t0
    del clf
    gc.collect()
    return n / seconds, top1


async def drive(url: str, payloads: list[bytes], top1: list[str], args: argparse.Namespace) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    disagreements = 0
    counter = iter(range(args.requests))
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        # warm-up: every connection once, not timed
        await asyncio.gather(*(client.post("/v1/classify", files={"file": ("w.png", payloads[i % len(payloads)],
                                                                          "image/png")})
                               for i in range(args.clients)))
        before = (await client.get("/healthz")).json()
        deadline = time.perf_counter() + args.max_seconds

        async def worker() -> None:
            nonlocal disagreements
            for i in counter:
                if time.perf_counter() > deadline:
                    return
                k = i % len(payloads)
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/classify", files={"file": (f"{k}.png", payloads[k], "image/png")})
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                elif r.json()["results"][0]["label"] != top1[k]:
                    disagreements += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.clients)))
        wall = time.perf_counter() - t0
        after = (await client.get("/healthz")).json()
    ok = len(latencies) - sum(1 for e in errors if e.startswith("HTTP"))
    batches = after["batches"] - before["batches"]
    return {"wall_seconds": wall, "completed": ok, "errors": len(errors), "error_samples": errors[:5],
            "top1_disagreements": disagreements, "latencies": latencies, "batches": batches,
            "mean_batch": (after["images"] - before["images"]) / batches if batches else 0.0,
            "largest_batch": after["largest_batch"]}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def main() -> int:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from xmodal.serve.process import ServerProcess

    with tempfile.TemporaryDirectory(prefix="xmodal-serve-bench-") as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else Path(tmp) / "model"
        fit_seconds = fit_and_save(args, model_dir)
        payloads = request_images(args)
        images = [Image.open(io.BytesIO(p)).convert("RGB") for p in payloads]
        before_ips, top1 = in_process(model_dir, images, args.requests, args)
        server_args = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                       "--no-access-log", "--log-level", "warning", "--device", "cpu"]
        env = {k: v for k, v in os.environ.items() if k != "XMODAL_API_TOKEN"}
        with ServerProcess(model_dir, server_args, env=env) as server:
            served = asyncio.run(drive(server.url, payloads, top1, args))
        after_ips, _ = in_process(model_dir, images, args.requests, args)

    served_ips = served["completed"] / served["wall_seconds"]
    reference = (before_ips + after_ips) / 2
    lat = served.pop("latencies")
    result = {
        "backbone": f"{args.backbone}" + (" (offline stand-in, not CLIP)" if args.backbone.startswith("bridge:") else ""),
        "method": args.method, "shots": args.shots, "data": args.data, "clients": args.clients,
        "requests": args.requests, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
        "fit_seconds": round(fit_seconds, 2),
        "served_images_per_s": round(served_ips, 2),
        "in_process_images_per_s": {"before": round(before_ips, 2), "after": round(after_ips, 2)},
        "ratio_served_to_in_process": round(served_ips / reference, 3),
        "latency_ms": {q: round(1000 * percentile(lat, int(q[1:])), 1) for q in ("p50", "p95", "p99")},
        **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in served.items()},
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "load_average": [round(x, 2) for x in os.getloadavg()]},
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"xmodal serve load test — {result['method']} ({args.shots}-shot) on {result['backbone']}, "
              f"{args.clients} concurrent clients, {served['completed']} requests of one image each")
        print(f"  served        {served_ips:8.2f} images/s   latency p50 {result['latency_ms']['p50']} ms · "
              f"p95 {result['latency_ms']['p95']} ms · p99 {result['latency_ms']['p99']} ms")
        print(f"  in-process    {before_ips:8.2f} images/s before, {after_ips:.2f} after (predict_proba, decoded images)")
        print(f"  ratio         {result['ratio_served_to_in_process']:.3f} (served / mean in-process; target >= 0.8)")
        print(f"  errors        {served['errors']}   top-1 disagreements with in-process: "
              f"{served['top1_disagreements']}")
        print(f"  batches       {served['batches']} forward passes, mean {served['mean_batch']:.1f} images, "
              f"largest {served['largest_batch']}")
        m = result["machine"]
        print(f"  machine       {m['cpus']} CPUs ({m['cpu']}), torch threads {m['torch_threads']}, "
              f"load average {m['load_average']} (shared machine: figures move with other load)")
        for e in served["error_samples"]:
            print(f"  error sample  {e}", file=sys.stderr)
    return 0 if served["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
