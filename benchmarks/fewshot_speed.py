"""How long the few-shot sweep takes once features are cached, and each method's fit time.

Runs the full grid (all methods x shots x seeds) into a fresh temporary results folder, so every
method is fitted again while every feature comes from the on-disk cache (run `xmodal bench` or
`make demo` first to fill it; an uncached run also extracts, and the script says how long that took).
Prints the total wall time, the feature-loading time, and mean fit time per method at each shot count.

Usage: python benchmarks/fewshot_speed.py [--data cifar10:../shared/data/cifar10] [--shots 1,2,4,8,16]
       [--seeds 1,2,3] [--augment-scope union]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict

import torch

from xmodal.bench.sweep import run_sweep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="bridge:lite0-minilm")
    p.add_argument("--data", default="cifar10:../shared/data/cifar10")
    p.add_argument("--shots", default="1,2,4,8,16")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--methods", default="all")
    p.add_argument("--augment-scope", default="union")
    p.add_argument("--cache-dir", default=".xmodal-cache")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        result = run_sweep(args.backbone, [args.data], args.shots, args.seeds, args.methods, out,
                           cache_dir=args.cache_dir, augment_scope=args.augment_scope, progress=False,
                           write_report=False)
        wall = time.perf_counter() - t0
    rows = result.rows
    fit = defaultdict(lambda: defaultdict(list))
    for r in rows:
        fit[r["method"]][r["shots"]].append(r["fit_time_s"])
    shots = sorted({r["shots"] for r in rows})
    feat = max((r.get("features_time_s") or 0.0) for r in rows)
    print(f"Sweep: {len(rows)} rows ({args.data}, {args.backbone}, shots {args.shots}, seeds {args.seeds}) "
          f"in {wall:.1f} s wall on {torch.get_num_threads()} threads; feature loading/extraction "
          f"(largest per-episode figure) {feat:.1f} s\n")
    print("Mean fit time per method (s):\n")
    print("| method | " + " | ".join(f"{k}-shot" for k in shots) + " |")
    print("|---|" + "---:|" * len(shots))
    for method, per in fit.items():
        print(f"| {method} | " + " | ".join(f"{statistics.mean(per[k]):.3f}" for k in shots) + " |")


if __name__ == "__main__":
    main()
