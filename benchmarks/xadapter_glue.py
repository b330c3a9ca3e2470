"""Does the X-adapter keep the PLM's language skills? GLUE rows: plain PLM vs + X-adapter (t) and (v,t).

Same budget per row (seeded training subset, epochs, lr, batch), seeds 0,1,2; mean ± std per row and
whether any difference to the plain PLM exceeds the seed spread. The adapter is the one given by
``--xadapter`` (by default the (v,t) run of the mechanism experiment, trained from the text-only base).

    python benchmarks/xadapter_glue.py            # after benchmarks/xadapter_mechanism.py
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xmodal.xadapter.tasks.glue import GlueArgs, run_glue  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/glue"))
    ap.add_argument("--tasks", default="RTE,MRPC,SST-2")
    ap.add_argument("--mechanism", type=Path, default=ROOT / "runs/xa-mechanism",
                    help="the mechanism experiment's folder: its bank, text-only head and corpus")
    ap.add_argument("--xadapter", type=Path, default=None,
                    help="adapter with V and T experts (default: MECHANISM/glue-vt-s0, trained here when missing: the "
                         "mechanism experiment's real arm with experts v,t, same corpus, head and budget)")
    ap.add_argument("--adapter-steps", type=int, default=600)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--max-train", type=int, default=1000)
    ap.add_argument("--max-eval", type=int, default=None)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--out", type=Path, default=ROOT / "runs/xa-mechanism/glue.json")
    args = ap.parse_args(argv)
    t0 = time.time()
    args.bank = str(args.mechanism / "bank")
    if args.xadapter is None:
        args.xadapter = args.mechanism / "glue-vt-s0"
        if not (args.xadapter / "xadapter" / "xadapter_config.json").is_file():
            from xmodal.xadapter.tasks.train import TrainArgs, train_mlm

            log(f"training the (v,t) adapter for GLUE into {args.xadapter}")
            train_mlm(TrainArgs(plm="minilm", backbone="bridge:lite0-minilm", bank=args.bank,
                                corpus=[str(args.mechanism / "corpus-test.jsonl")], out=str(args.xadapter),
                                steps=args.adapter_steps, batch_size=32, lr=1e-3, max_length=32, seed=0, experts="v,t",
                                focus_words="black,blue,brown,green,orange,pink,purple,red,white,yellow",
                                head=str(args.mechanism / "head"), image_root=str(ROOT.parent / "shared/data/tiny-imagenet"),
                                resume=True, progress=False, device="cpu"), log=log)
    args.xadapter = str(args.xadapter)
    done = json.loads(args.out.read_text()) if args.out.is_file() else {}
    rows = {"plain": None, "t": "t", "v,t": "v,t"}
    for task in args.tasks.split(","):
        for row, experts in rows.items():
            for seed in [int(s) for s in args.seeds.split(",")]:
                key = f"{task}|{row}|{seed}"
                if key in done:
                    continue
                log(f"GLUE {task} {row} seed {seed}")
                res = run_glue(GlueArgs(task=task, data=args.data, plm="minilm",
                                        xadapter=None if experts is None else args.xadapter,
                                        experts=experts or "none", bank=args.bank if experts and "v" in experts else None,
                                        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                        max_length=args.max_length, seed=seed, max_train=args.max_train,
                                        max_eval=args.max_eval, device="cpu", progress=False), log=lambda m: None)
                done[key] = {"metric": res["main_metric"], "score": float(res["score"]), "metrics": res["metrics"],
                             "seconds": round(time.time() - t0, 1)}
                args.out.parent.mkdir(parents=True, exist_ok=True)
                tmp = args.out.with_name(args.out.name + ".tmp")
                tmp.write_text(json.dumps(done, indent=1))
                os.replace(tmp, args.out)
    print(json.dumps(summarise(done), indent=1))
    log(f"wall {time.time() - t0:.0f}s")
    return 0


def summarise(done: dict) -> dict:
    table: dict = {}
    for key, value in done.items():
        task, row, _ = key.split("|")
        metric, score = value["metric"], value["score"]
        table.setdefault(task, {}).setdefault(row, {"metric": metric, "scores": []})["scores"].append(score)
    for task, rows in table.items():
        plain = rows.get("plain")
        for row, r in rows.items():
            r["mean"] = round(statistics.mean(r["scores"]), 2)
            r["std"] = round(statistics.stdev(r["scores"]), 2) if len(r["scores"]) > 1 else None
            if plain and row != "plain" and r["std"] is not None and plain["std"] is not None:
                r["diff_vs_plain"] = round(r["mean"] - plain["mean"], 2)
                r["exceeds_seed_spread"] = abs(r["diff_vs_plain"]) > max(r["std"], plain["std"])
    return table


if __name__ == "__main__":
    raise SystemExit(main())
