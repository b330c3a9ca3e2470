"""Choose XMAdapter's defaults without touching any test split.

Protocol: for each (shots, seed) the support and validation sets are drawn as usual from the *train*
split; every remaining train image forms a development set. Variants of XMAdapter (γ learned /
searched on validation, MLP / linear networks) and Tip-Adapter(-F) are fitted on support + val and
scored on the development set. Augmented views are not used here (plain features), which makes this
a proxy: it ranks variants, the harness measures them.

Usage: python benchmarks/xmadapter_variants_dev.py [--data cifar10:../shared/data/cifar10] [--backbone ...]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from xmodal import create_method, extract_features, fewshot_split, load_backbone, load_dataset
from xmodal.zeroshot import text_classifier

VARIANTS = {
    "tip-adapter": ("tip-adapter", {}),
    "tip-adapter-f": ("tip-adapter-f", {}),
    "xmadapter-tf": ("xmadapter-tf", {}),
    "xmadapter (γ learned, MLP)": ("xmadapter", {"gamma_mode": "learned", "net_arch": "mlp"}),
    "xmadapter (γ searched, MLP)": ("xmadapter", {"gamma_mode": "search", "net_arch": "mlp"}),
    "xmadapter (γ learned, linear)": ("xmadapter", {"gamma_mode": "learned", "net_arch": "linear"}),
    "xmadapter (γ searched, linear)": ("xmadapter", {"gamma_mode": "search", "net_arch": "linear"}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="cifar10:../shared/data/cifar10")
    p.add_argument("--backbone", default="bridge:lite0-minilm")
    p.add_argument("--shots", default="1,4,16")
    p.add_argument("--seeds", default="1,2,3")
    args = p.parse_args()
    torch.set_num_threads(1)
    bb = load_backbone(args.backbone)
    ds = load_dataset(args.data)
    train = extract_features(bb, ds, "train", progress=False)
    weights = text_classifier(bb, ds.classnames, ds.templates)
    scores: dict[str, dict[int, list[float]]] = {v: {} for v in VARIANTS}
    shots_list = [int(s) for s in args.shots.split(",")]
    for shots in shots_list:
        for seed in [int(s) for s in args.seeds.split(",")]:
            ep = fewshot_split(ds, shots, seed)
            used = {s.id for s in ep.support} | {s.id for s in ep.val}
            support = train.subset([s.id for s in ep.support])
            val = train.subset([s.id for s in ep.val])
            dev = train.subset([i for i in train.ids if i not in used])
            for name, (method, params) in VARIANTS.items():
                m = create_method(method, seed=seed, logit_scale=bb.logit_scale, **params)
                m.fit(support, val, weights)
                acc = 100 * (m.predict(dev.features) == dev.labels).float().mean().item()
                scores[name].setdefault(shots, []).append(acc)
    print(f"Development-set top-1 (%), {args.data} train split minus support/val, {bb.name}, "
          f"mean over seeds {args.seeds}\n")
    print("| variant | " + " | ".join(f"{k}-shot" for k in shots_list) + " | mean |")
    print("|---|" + "---:|" * (len(shots_list) + 1))
    for name, per in scores.items():
        means = [statistics.mean(per[k]) for k in shots_list]
        print(f"| {name} | " + " | ".join(f"{m:.2f}" for m in means) + f" | {statistics.mean(means):.2f} |")


if __name__ == "__main__":
    main()
