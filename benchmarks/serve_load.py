"""Load benchmark of ``xmodal serve``: served throughput and latency against in-process ``predict``.

1. Fit a classifier with the offline default backbone (``bridge:lite0-minilm``, a stand-in for CLIP) on a
   small CIFAR-10 subset and save it (features come from the on-disk cache after the first run).
2. Start ``xmodal serve`` on it (a real uvicorn process on a loopback port) and load the same saved
   classifier in this process.
3. ``--rounds`` times, alternating so drifting machine load hits both sides alike:
   * in process: ``predict_proba`` over ``--requests`` decoded images (default batch size), called from the
     main thread as a script would, and from a worker thread as the server calls its model (torch's CPU
     threading behaves differently in the two on a busy machine), while the server sits idle;
   * served: ``--clients`` concurrent httpx clients post one PNG each per request (multipart) until
     ``--requests`` requests are done (or ``--max-seconds`` pass). Each answer's top-1 is compared with the
     in-process top-1.

Prints images/s, p50/p95/p99 latency, errors, top-1 disagreements, batch sizes seen by the server, and the
ratio of served to in-process throughput (median over rounds), against ``predict`` from the main thread and
against the faster of the two in-process variants. The client runs on the same machine, so its
CPU time counts against the server. On a shared machine wall-clock figures move with other load, so CPU
time is reported too: images per CPU-second, in process vs served (server + client process), is the
comparison that other load disturbs least.

    .venv/bin/python benchmarks/serve_load.py                      # 16 clients, 3 rounds of 192 requests
    .venv/bin/python benchmarks/serve_load.py --clients 32 --requests 320 --json
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
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
    p.add_argument("--requests", type=int, default=192, help="requests per round (one image each)")
    p.add_argument("--rounds", type=int, default=3, help="alternating in-process / served rounds")
    p.add_argument("--max-seconds", type=float, default=300.0, help="stop a served round after this long")
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


def in_process_round(clf, images: list[Image.Image], n: int, in_thread: bool) -> dict:
    """Wall and CPU time of ``predict_proba`` on ``n`` decoded images (cycling through ``images``), called from
    this (main) thread, or from a worker thread as the server calls its model."""
    batch = [images[i % len(images)] for i in range(n)]
    cpu0, t0 = time.process_time(), time.perf_counter()
    if in_thread:
        worker = threading.Thread(target=clf.predict_proba, args=(batch,))
        worker.start()
        worker.join()
    else:
        clf.predict_proba(batch)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"images_per_s": n / wall, "images_per_cpu_s": n / cpu, "wall_seconds": wall}


def _cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


async def served_round(url: str, server: psutil.Process, payloads: list[bytes], top1: list[str],
                       args: argparse.Namespace) -> dict:
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

        server_cpu0, client_cpu0, t0 = _cpu_seconds(server), time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.clients)))
        wall = time.perf_counter() - t0
        server_cpu, client_cpu = _cpu_seconds(server) - server_cpu0, time.process_time() - client_cpu0
        after = (await client.get("/healthz")).json()
    ok = len(latencies) - sum(1 for e in errors if e.startswith("HTTP"))
    batches = after["batches"] - before["batches"]
    return {"completed": ok, "errors": errors, "disagreements": disagreements, "latencies": latencies,
            "wall_seconds": wall, "images_per_s": ok / wall,
            "images_per_cpu_s": ok / (server_cpu + client_cpu) if server_cpu + client_cpu > 0 else float("nan"),
            "server_cpu_s": server_cpu, "client_cpu_s": client_cpu, "batches": batches,
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
    from xmodal.classifier import FewShotClassifier
    from xmodal.serve.process import ServerProcess

    rounds = []
    with tempfile.TemporaryDirectory(prefix="xmodal-serve-bench-") as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else Path(tmp) / "model"
        fit_seconds = fit_and_save(args, model_dir)
        payloads = request_images(args)
        images = [Image.open(io.BytesIO(p)).convert("RGB") for p in payloads]
        clf = FewShotClassifier.load(model_dir, device="cpu", cache_dir=args.cache_dir)
        top1 = clf.predict(images)  # the reference answers; also warms the model up
        server_args = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                       "--no-access-log", "--log-level", "warning", "--device", "cpu"]
        env = {k: v for k, v in os.environ.items() if k != "XMODAL_API_TOKEN"}
        with ServerProcess(model_dir, server_args, env=env) as server:
            server_proc = psutil.Process(server.pid)
            for _ in range(args.rounds):
                local = in_process_round(clf, images, args.requests, in_thread=False)
                threaded = in_process_round(clf, images, args.requests, in_thread=True)
                remote = asyncio.run(served_round(server.url, server_proc, payloads, top1, args))
                rounds.append({"in_process": local, "in_process_thread": threaded, "served": remote})

    lat = [x for r in rounds for x in r["served"].pop("latencies")]
    errors = [e for r in rounds for e in r["served"].pop("errors")]
    ratio = [r["served"]["images_per_s"] / r["in_process"]["images_per_s"] for r in rounds]
    cpu_ratio = [r["served"]["images_per_cpu_s"] / r["in_process"]["images_per_cpu_s"] for r in rounds]
    best = [r["served"]["images_per_s"] / max(r["in_process"]["images_per_s"], r["in_process_thread"]["images_per_s"])
            for r in rounds]
    med = statistics.median
    result = {
        "backbone": args.backbone + (" (offline stand-in, not CLIP)" if args.backbone.startswith("bridge:") else ""),
        "method": args.method, "shots": args.shots, "data": args.data, "clients": args.clients,
        "requests_per_round": args.requests, "rounds": args.rounds, "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms, "fit_seconds": round(fit_seconds, 2),
        "served_images_per_s": round(med([r["served"]["images_per_s"] for r in rounds]), 2),
        "in_process_images_per_s": round(med([r["in_process"]["images_per_s"] for r in rounds]), 2),
        "in_process_thread_images_per_s": round(med([r["in_process_thread"]["images_per_s"] for r in rounds]), 2),
        "ratio_served_to_best_in_process": round(med(best), 3),
        "ratio_to_best_per_round": [round(x, 3) for x in best],
        "ratio_served_to_in_process": round(med(ratio), 3),
        "ratio_per_round": [round(x, 3) for x in ratio],
        "cpu_ratio_served_to_in_process": round(med(cpu_ratio), 3),
        "cpu_ratio_per_round": [round(x, 3) for x in cpu_ratio],
        "latency_ms": {q: round(1000 * percentile(lat, int(q[1:])), 1) for q in ("p50", "p95", "p99")},
        "completed": sum(r["served"]["completed"] for r in rounds), "errors": len(errors), "error_samples": errors[:5],
        "top1_disagreements": sum(r["served"]["disagreements"] for r in rounds),
        "mean_batch": round(med([r["served"]["mean_batch"] for r in rounds]), 2),
        "largest_batch": max(r["served"]["largest_batch"] for r in rounds),
        "rounds_detail": [{side: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r[side].items()}
                           for side in ("in_process", "in_process_thread", "served")} for r in rounds],
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "load_average": [round(x, 2) for x in os.getloadavg()]},
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        r = result
        print(f"xmodal serve load test — {r['method']} ({args.shots}-shot) on {r['backbone']}, {args.clients} "
              f"concurrent clients, {args.rounds} rounds x {args.requests} requests of one image each")
        print(f"  served        {r['served_images_per_s']:8.2f} images/s (median of rounds)   latency p50 "
              f"{r['latency_ms']['p50']} ms · p95 {r['latency_ms']['p95']} ms · p99 {r['latency_ms']['p99']} ms")
        print(f"  in-process    {r['in_process_images_per_s']:8.2f} images/s (predict_proba on decoded images, "
              f"main thread); {r['in_process_thread_images_per_s']:.2f} called from a worker thread")
        print(f"  ratio         {r['ratio_served_to_in_process']:.3f} served / in-process images/s "
              f"(per round {r['ratio_per_round']}; target >= 0.8)")
        print(f"  ratio (best)  {r['ratio_served_to_best_in_process']:.3f} served / the faster in-process variant "
              f"(per round {r['ratio_to_best_per_round']})")
        print(f"  CPU ratio     {r['cpu_ratio_served_to_in_process']:.3f} served (server + client) / in-process "
              f"images per CPU-second (per round {r['cpu_ratio_per_round']})")
        print(f"  errors        {r['errors']} of {r['completed'] + r['errors']} requests   top-1 disagreements "
              f"with in-process: {r['top1_disagreements']}")
        print(f"  batches       mean {r['mean_batch']:.1f} images per forward pass, largest {r['largest_batch']}")
        m = r["machine"]
        print(f"  machine       {m['cpus']} CPUs ({m['cpu']}), torch threads {m['torch_threads']}, load average "
              f"{m['load_average']} (shared machine: wall-clock figures move with other load)")
        for e in r["error_samples"]:
            print(f"  error sample  {e}", file=sys.stderr)
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
