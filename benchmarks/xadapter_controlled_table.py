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


def render(res: dict) -> str:
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
    sys.stdout.write(render(json.loads(Path(argv[0]).read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
