"""Markdown tables of the controlled X-adapter experiment from ``results.json`` (xadapter_controlled.py).

    python benchmarks/xadapter_controlled_table.py runs/xa-controlled/results.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ARM_NAMES = {"real": "(i) real retrieval", "shuffled": "(ii) shuffled retrieval (images of other classes)",
             "zero": "(iii) zero visual input"}
PROBE_NAMES = {"image-grounded": "image-grounded colours (tiny-imagenet-colors.csv)",
               "memory-colors-in-pool": "Memory Colors, objects in the pool",
               "memory-colors": "Memory Colors (all 109 objects)"}


def gold_probability(run_dir: Path) -> dict | None:
    """Mean probability of the gold colour (softmax within the candidates) and mean rank of the gold colour
    on the image-grounded probe: finer than argmax accuracy when every prediction is one colour."""
    path = run_dir / "probe-image-grounded.json"
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
    cands = r["candidates"]
    probs, ranks, preds = [], [], {}
    for p in r["predictions"]:
        g = cands.index(p["gold"])
        probs.append(p["probs"][g])
        ranks.append(1 + sum(x > p["probs"][g] for x in p["probs"]))
        preds[p["pred"]] = preds.get(p["pred"], 0) + 1
    return {"gold_prob": 100 * sum(probs) / len(probs), "gold_rank": sum(ranks) / len(ranks), "preds": preds}


def _ms(xs: list[float]) -> str:
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return f"{m:.2f} ± {sd:.2f}"


def render(res: dict, root: Path | None = None) -> str:
    b = res["budget"]
    lines = [f"Budget: {b['steps']} MLM steps x batch {b['batch_size']}, lr {b['lr']}, experts {b['experts']}, "
             f"k={b['k']}, PLM {b['plm']} (fresh MLM head trained in every arm), VLM {b['backbone']} "
             f"(stand-in, not CLIP); corpus {res['corpus']['captions']} colour captions; seeds "
             f"{', '.join(map(str, res['seeds']))}; wall time {res['wall_seconds'] / 60:.0f} min.", ""]
    arms = res["arms"]
    lines.append("| probe | majority colour | " + " | ".join(ARM_NAMES[a] for a in arms) + " | (i) − (ii), 95 % CI |")
    lines.append("|---|---|" + "---|" * len(arms) + "---|")
    for name, label in PROBE_NAMES.items():
        if name not in res["majority_baseline"]:
            continue
        row = res["table"].get(name, {})
        base = res["majority_baseline"][name]
        cells = [f"{row[a]['mean']:.2f} ± {row[a]['std']:.2f}" if a in row else "–" for a in arms]
        d = (res.get("real_minus_shuffled") or {}).get(name)
        diff = f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d else "–"
        lines.append(f"| {label} ({base['objects']} objects) | {base['accuracy']:.2f} ({base['majority_colour']}) | "
                     + " | ".join(cells) + f" | {diff} |")
    lines += ["", "Accuracy in % (mean ± std over seeds; 9 templates per object). The interval is a paired "
              "bootstrap over objects and seeds."]
    swaps = [n for n in ("image-grounded@shuffled", "image-grounded@zero") if n in res["table"]]
    if swaps and "real" in res["table"].get("image-grounded", {}):
        real = res["table"]["image-grounded"]["real"]
        lines += ["", "Test-time swaps on the models trained with real retrieval (image-grounded probe): "
                  f"real {real['mean']:.2f} ± {real['std']:.2f}, "
                  + ", ".join(f"{n.split('@')[1]} {res['table'][n]['real']['mean']:.2f} ± "
                              f"{res['table'][n]['real']['std']:.2f}" for n in swaps) + "."]
    if root is not None:
        rows = []
        for a in arms:
            g = [gold_probability(root / f"{a}-s{s}") for s in res["seeds"]]
            g = [x for x in g if x]
            if g:
                preds = {}
                for x in g:
                    for k, v in x["preds"].items():
                        preds[k] = preds.get(k, 0) + v
                top = ", ".join(f"{k} {v}" for k, v in sorted(preds.items(), key=lambda kv: -kv[1])[:3])
                rows.append(f"| {ARM_NAMES[a]} | {_ms([x['gold_prob'] for x in g])} | "
                            f"{_ms([x['gold_rank'] for x in g])} | {top} |")
        if rows:
            lines += ["", "| arm (image-grounded probe) | probability of the gold colour, % | rank of the gold colour "
                      "| most frequent predictions (all seeds) |", "|---|---|---|---|"] + rows
    r = res["retrieval"]
    lines += ["", "| retrieval query (k = %d) | queries | precision@k | top-1 |" % r["class_prompt"]["k"], "|---|---|---|---|"]
    for key, label in (("class_prompt", '"a photo of a {class}."'), ("caption_template", "caption-like templates"),
                       ("corpus_caption", "corpus captions naming one pool class")):
        if key in r:
            lines.append(f"| {label} | {r[key]['queries']} | {r[key]['precision_at_k']:.2f} | {r[key]['top1']:.2f} |")
    lines.append(f"| chance | | {r['chance']:.2f} | {r['chance']:.2f} |")
    lines += ["", "| run | retrieval precision on probe prompts | V update / hidden norm (per layer) | "
              "attention entropy (max %s) | attention on query-class images |" %
              next((d["attention_max_entropy"] for d in res["diagnosis"].values() if d), "–"), "|---|---|---|---|---|"]
    for run, d in res["diagnosis"].items():
        if not d:
            continue
        fmt = lambda m: ", ".join(f"{v:.3f}" if v is not None else "–" for v in m.values())  # noqa: E731
        rp = f"{100 * d['retrieval_precision']:.1f} %" if d["retrieval_precision"] is not None else "–"
        lines.append(f"| {run} | {rp} | {fmt(d['v_update_ratio'])} | {fmt(d['attention_entropy'])} | "
                     f"{fmt(d['attention_on_query_class'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: xadapter_controlled_table.py RESULTS_JSON", file=sys.stderr)
        return 2
    path = Path(argv[0])
    sys.stdout.write(render(json.loads(path.read_text()), path.parent))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
