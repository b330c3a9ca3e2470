"""Few-shot speed with features cached: (1) the whole sweep of one dataset (all methods × shots × seeds),
(2) one fit of every method on a 202-class, 16-shot problem.

(1) runs the grid into a fresh temporary results folder, so every method is fitted again while every
feature comes from the on-disk cache (run `xmodal bench` with the same --augment-views/--augment-scope
first; an uncached run also extracts, and the script prints how long that took).
(2) times one fit per method on the real 202-class problem: the Tiny-ImageNet subset, 16 shots, seed 1,
features from the cache (as `xmodal bench` left them; --big-data synthetic: Gaussian clusters of the same
shape instead — faster to set up, but iterative fits such as the linear probe's L-BFGS converge sooner on
them, so the real features are the figure that counts).

Usage: python benchmarks/fewshot_speed.py [--data cifar10:../shared/data/cifar10] [--shots 1,2,4,8,16] [--big-data SPEC|synthetic]
       [--seeds 1,2,3] [--augment-views 0] [--augment-scope split] [--cache-dir DIR] [--threads N]
       [--skip-sweep] [--skip-big]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict

import torch

from xmodal.bench.sweep import run_sweep
from xmodal.fewshot import available_methods, create_method
from xmodal.fewshot._synthetic import make_task


def sweep(args) -> None:
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        result = run_sweep(args.backbone, [args.data], args.shots, args.seeds, args.methods, out,
                           cache_dir=args.cache_dir, augment_views=args.augment_views,
                           augment_scope=args.augment_scope, progress=False, write_report=False)
        wall = time.perf_counter() - t0
    rows = result.rows
    fit = defaultdict(lambda: defaultdict(list))
    for r in rows:
        fit[r["method"]][r["shots"]].append(r["fit_time_s"])
    shots = sorted({r["shots"] for r in rows})
    feat = sum({(r["shots"], r["seed"]): r.get("features_time_s") or 0.0 for r in rows}.values())
    verdict = "under" if wall < 180 else "OVER"
    print(f"(1) Sweep: {len(rows)} rows ({args.data}, {args.backbone}, shots {args.shots}, seeds {args.seeds}, "
          f"views {args.augment_views}) in {wall:.1f} s wall ({verdict} the 3-minute target) on "
          f"{torch.get_num_threads()} thread(s); features gathered in {feat:.1f} s of that\n")
    print("Mean fit time per method (s):\n")
    print("| method | " + " | ".join(f"{k}-shot" for k in shots) + " |")
    print("|---|" + "---:|" * len(shots))
    for method, per in fit.items():
        print(f"| {method} | " + " | ".join(f"{statistics.mean(per[k]):.3f}" for k in shots) + " |")
    print()


def big(args) -> None:
    names = available_methods() if args.methods == "all" else args.methods.split(",")
    if args.big_data == "synthetic":
        support, val, test, text = make_task(num_classes=202, dim=args.dim, shots=16, val_per_class=4,
                                             test_per_class=1, views=args.augment_views, spread=3.0,
                                             text_noise=2.0, seed=0)
        times = {}
        for name in names:
            m = create_method(name, seed=1)
            t0 = time.perf_counter()
            m.fit(support, val, text)
            times[name] = time.perf_counter() - t0
        what = f"synthetic features, D={args.dim}"
    else:  # the real problem: one 16-shot episode (seed 1) of the dataset, features from the cache
        with tempfile.TemporaryDirectory() as out:
            result = run_sweep(args.backbone, [args.big_data], [16], [1], names, out, cache_dir=args.cache_dir,
                               augment_views=args.augment_views, augment_scope=args.augment_scope,
                               test_per_class=10, progress=False, write_report=False)
        times = {r["method"]: r["fit_time_s"] for r in result.rows}
        classes = {r["num_classes"] for r in result.rows}
        what = f"{args.big_data} features, seed 1, {'/'.join(map(str, sorted(classes)))} classes"
    total = sum(times.values())
    verdict = "under" if total < 60 else "OVER"
    print(f"(2) 16 shots ({what}, {args.augment_views} views), one fit of each of {len(times)} methods: "
          f"{total:.1f} s in all ({verdict} the 60-s target) on {torch.get_num_threads()} thread(s)\n")
    print("| method | fit s |\n|---|---:|")
    print("\n".join(f"| {name} | {dt:.2f} |" for name, dt in times.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="bridge:lite0-minilm")
    p.add_argument("--data", default="cifar10:../shared/data/cifar10")
    p.add_argument("--shots", default="1,2,4,8,16")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--methods", default="all")
    p.add_argument("--augment-views", type=int, default=0)
    p.add_argument("--augment-scope", default="split")
    p.add_argument("--cache-dir", default=os.environ.get("XMODAL_CACHE", ".xmodal-cache"))
    p.add_argument("--big-data", default="imagefolder:../shared/data/tiny-imagenet",
                   help="dataset of the 202-class fit (its cached features), or 'synthetic' (Gaussian clusters "
                        "of the same shape: 202 × 16 support, 808 validation, --dim)")
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--skip-big", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU cores visible: {os.cpu_count()}; load average {os.getloadavg()[0]:.1f} (shared machine)\n")
    if not args.skip_sweep:
        sweep(args)
    if not args.skip_big:
        big(args)


if __name__ == "__main__":
    main()
