"""The controlled X-adapter experiment: does the V-expert's visual input change what the PLM says?

Three arms share the PLM, corpus, steps, seeds, masking and the freshly trained MLM head recipe; only
the V-expert's input differs:

  real      the k images retrieved for the (masked) text from the pool
  shuffled  each retrieved image replaced by an image of another class (a fixed cycle over classes),
            so the visual input has the same distribution but no link to the text
  zero      all-zero visual features (same modules, no visual information)

Each arm is trained with several seeds and probed on the image-grounded colour probe (colours read
from the pool's own pixels), on the Memory Colors items whose object is in the pool, and on the whole
of Memory Colors. Results: ``OUT/results.json`` and ``OUT/results.md`` (tables, paired bootstrap interval
of real − shuffled, and the diagnosis: retrieval precision, V-expert update size, attention over the
retrieved images, per-class confusions). Every step is resumable: finished runs and probes are reused.

Run through ``benchmarks/xadapter_controlled.sh`` (which sets the budget and writes the logs).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

COLOURS = ["black", "blue", "brown", "green", "grey", "orange", "pink", "purple", "red", "white", "yellow"]
CAPTION_TEMPLATES = ["a {} on the table.", "there is a {} in this picture.", "a close up of a {}.",
                     "a {} next to a man.", "a picture of a {} outside."]


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)


def atomic_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
def colour_corpus(src: Path, dest: Path) -> tuple[int, int]:
    """Captions of ``src`` that contain a basic colour term (the adaptation corpus of every arm)."""
    pat = re.compile(r"\b(" + "|".join(COLOURS) + r")\b", re.I)
    kept, total = [], 0
    for line in src.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        total += 1
        text = json.loads(line)["text"]
        if pat.search(text):
            kept.append(json.dumps({"text": text}))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text("\n".join(kept) + "\n", encoding="utf-8")
    os.replace(tmp, dest)
    return len(kept), total


def retrieval_precision(bank, backbone, k: int, corpus: Path) -> dict:
    """Share of retrieved images whose class is the query's noun, for three kinds of query."""
    from xmodal.xadapter.context import row_classes

    classes = row_classes(bank)
    names = sorted(set(classes))
    out = {}

    def score(queries: list[tuple[str, str]]) -> dict:
        texts = [q for q, _ in queries]
        _, idx = bank.search_texts(backbone, texts, k)
        hits = [[classes[r] == c for r in row] for row, (_, c) in zip(idx.tolist(), queries)]
        p = sum(map(sum, hits)) / (k * len(hits))
        top1 = sum(h[0] for h in hits) / len(hits)
        return {"queries": len(hits), "precision_at_k": round(100 * p, 2), "top1": round(100 * top1, 2), "k": k}

    out["class_prompt"] = score([(f"a photo of a {c}.", c) for c in names])
    out["caption_template"] = score([(t.format(c), c) for c in names for t in CAPTION_TEMPLATES])
    # real captions of the corpus that name exactly one pool class
    found = []
    pats = {c: re.compile(r"\b" + re.escape(c.lower()) + r"s?\b") for c in names}
    for line in corpus.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        text = json.loads(line)["text"]
        hit = [c for c, p in pats.items() if p.search(text.lower())]
        if len(hit) == 1:
            found.append((text, hit[0]))
    if found:
        out["corpus_caption"] = score(found[:2000])
        out["corpus_caption"]["classes"] = len({c for _, c in found[:2000]})
    out["chance"] = round(100 / len(names), 2)
    return out


# ------------------------------------------------------------------------------------------------
def train_arm(args, arm: str, seed: int, corpus: Path) -> dict:
    from xmodal.xadapter.train import TrainArgs, train_mlm

    out = Path(args.out) / f"{arm}-s{seed}"
    summary = out / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        if s.get("finished"):
            return s
    targs = TrainArgs(plm=args.plm, backbone=args.backbone, bank=args.bank, corpus=[str(corpus)], out=str(out),
                      steps=args.steps, batch_size=args.batch_size, lr=args.lr, mask_ratio=args.mask_ratio,
                      max_length=args.max_length, device="cpu", resume=True, seed=seed, experts=args.experts,
                      k=args.k, save_every=args.save_every, visual=arm, focus_words=",".join(COLOURS),
                      progress=False, head=args.head or None)
    return train_mlm(targs, log=log)


class ExpertProbe:
    """Records, per call of a V-expert, the update size and the attention over the retrieved images."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.mask_pos: torch.Tensor | None = None

    def wrap(self, expert, layer: str):
        original = expert.delta
        probe = self

        def delta(h, x, x_mask):
            out = original(h, x, x_mask)
            if probe.mask_pos is not None:
                with torch.no_grad():
                    b, n, _ = h.shape
                    xt = expert.in_norm(expert.in_proj(x.to(expert.in_proj.weight.dtype)))
                    dh = expert.attn_dim // expert.heads
                    q = expert.q(h).view(b, n, expert.heads, dh).transpose(1, 2)
                    kk = expert.k(xt).view(b, x.shape[1], expert.heads, dh).transpose(1, 2)
                    att = (q @ kk.transpose(-1, -2) / math.sqrt(dh)).softmax(-1).mean(1)   # (B, n, m)
                    rows = torch.arange(b)
                    pos = probe.mask_pos
                    probe.records.append({
                        "layer": layer,
                        "ratio": (out[rows, pos].norm(dim=-1) / h[rows, pos].norm(dim=-1)).tolist(),
                        "attention": att[rows, pos].tolist(),
                    })
            return out

        expert.delta = delta


def probe_model(args, run_dir: Path, arm: str, visual: str, data: str, details: bool, diagnose: bool,
                bank, backbone) -> dict:
    from xmodal.xadapter.context import ContextBuilder, row_classes
    from xmodal.xadapter.modules import load_xadapter
    from xmodal.xadapter.plm import load_mlm
    from xmodal.xadapter.probe import probe_colors, read_color_csv

    model, tokenizer, _, _ = load_mlm(args.plm)
    stack = load_xadapter(model, run_dir / "xadapter")
    stack.set_experts(args.experts)
    builder = ContextBuilder(stack.config, backbone, bank, device="cpu", visual=visual)
    items = read_color_csv(data)
    diag = None
    if diagnose:
        classes = row_classes(bank)
        expert_probe = ExpertProbe()
        for name, layer in stack.adapters.items():
            if "v" in layer.experts:
                expert_probe.wrap(layer.experts["v"], name)
        retrieved: list[list[int]] = []
        fed: list[list[int]] = []
        original_build = builder.build

        def build(texts, experts):
            ctx = original_build(texts, experts)
            retrieved.extend(builder.last_rows.tolist() if builder.last_rows is not None else [[]] * len(texts))
            fed.extend(builder.last_fed_rows.tolist() if builder.last_fed_rows is not None else [[]] * len(texts))
            return ctx

        builder.build = build
        original_forward = model.forward

        def forward(*a, **kw):
            ids = kw.get("input_ids")
            expert_probe.mask_pos = (ids == tokenizer.mask_token_id).float().argmax(1)
            return original_forward(*a, **kw)

        model.forward = forward
    result = probe_colors(model, tokenizer, items, templates="valm", builder=builder, batch_size=64, device="cpu",
                          details=details)
    if diagnose:
        # per prediction (same order as result["predictions"]): retrieved classes, update ratio, attention
        item_class = {f"{it.descriptor} {it.item}".strip(): it.item for it in items}
        preds = result["predictions"]
        layers = sorted({r["layer"] for r in expert_probe.records})
        ratio = {l: [] for l in layers}
        att = {l: [] for l in layers}
        for r in expert_probe.records:
            ratio[r["layer"]].extend(r["ratio"])
            att[r["layer"]].extend(r["attention"])
        prec, att_same = [], {l: [] for l in layers}
        for i, p in enumerate(preds):
            want = item_class[p["item"]]
            rows = retrieved[i] if i < len(retrieved) else []
            fed_rows = fed[i] if i < len(fed) else []
            if rows:
                prec.append(sum(classes[r] == want for r in rows) / len(rows))
            for l in layers:
                if fed_rows and i < len(att[l]):
                    att_same[l].append(sum(w for w, r in zip(att[l][i], fed_rows) if classes[r] == want))
        mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
        entropy = {l: mean([-sum(w * math.log(max(w, 1e-12)) for w in a) for a in att[l]]) for l in layers}
        diag = {
            "retrieval_precision": mean(prec),
            "v_update_ratio": {l: mean(ratio[l]) for l in layers},
            "attention_entropy": entropy, "attention_max_entropy": round(math.log(args.k), 4),
            "attention_on_query_class": {l: mean(att_same[l]) for l in layers},
        }
        result["diagnosis"] = diag
    return result


# ------------------------------------------------------------------------------------------------
def per_item_correct(result: dict) -> dict[str, float]:
    """Accuracy per object over the templates."""
    acc: dict[str, list[int]] = {}
    for p in result["predictions"]:
        acc.setdefault(p["item"], []).append(int(p["pred"] == p["gold"]))
    return {k: sum(v) / len(v) for k, v in acc.items()}


def paired_bootstrap(a: list[dict[str, float]], b: list[dict[str, float]], reps: int, seed: int = 0) -> dict:
    """95 % interval of mean accuracy(a) − accuracy(b), in points.

    ``a`` and ``b`` hold one {object: accuracy} per seed, paired by seed. Each replicate resamples objects
    and, independently, seeds (both with replacement), so the interval covers object and seed variation.
    """
    items = sorted(a[0])
    n_seed = len(a)
    diff = torch.tensor([[a[s][i] - b[s][i] for i in items] for s in range(n_seed)], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    oi = torch.randint(len(items), (reps, len(items)), generator=gen)
    si = torch.randint(n_seed, (reps, n_seed), generator=gen)
    per_seed = diff[:, oi].mean(-1)                              # (n_seed, reps)
    reps_mean = per_seed.gather(0, si.T).mean(0)                 # (reps,)
    lo, hi = torch.quantile(reps_mean, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"mean": round(100 * float(diff.mean()), 2), "ci95": [round(100 * lo, 2), round(100 * hi, 2)],
            "reps": reps, "objects": len(items), "seeds": n_seed,
            "per_seed": [round(100 * float(d), 2) for d in diff.mean(1)]}


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return round(m, 2), round(sd, 2)


# ------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="controlled X-adapter experiment (real vs shuffled vs zero visual input)")
    ap.add_argument("--out", default="runs/xa-controlled")
    ap.add_argument("--bank", required=True)
    ap.add_argument("--backbone", default="bridge:lite0-minilm")
    ap.add_argument("--plm", default="minilm")
    ap.add_argument("--corpus-src", default="../shared/data/text/lxmert_train.jsonl")
    ap.add_argument("--probe", default="data/probes/tiny-imagenet-colors.csv")
    ap.add_argument("--probe-in-pool", default="data/probes/memory-colors-in-tiny-imagenet.csv")
    ap.add_argument("--memory-colors", default="", help="also probe the whole Memory Colors CSV (slower)")
    ap.add_argument("--arms", default="real,shuffled,zero")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--mask-ratio", type=float, default=0.15)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--experts", default="v")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--bootstrap", type=int, default=10000)
    ap.add_argument("--head", default="", help="text-only head folder (`xmodal xadapter head`): every arm starts from "
                                              "it, frozen; without it each arm trains a fresh head (the earlier recipe)")
    args = ap.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from xmodal.backbones import load_backbone
    from xmodal.xadapter.context import load_bank

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    corpus = out / "corpus-colour-captions.jsonl"
    n_kept, n_total = colour_corpus(Path(args.corpus_src), corpus)
    log(f"corpus: {n_kept} of {n_total} captions contain a colour term -> {corpus}")
    backbone = load_backbone(args.backbone, device="cpu")
    bank = load_bank(args.bank, backbone)
    rp_path = out / "retrieval.json"
    if not rp_path.is_file():
        atomic_json(rp_path, retrieval_precision(bank, backbone, args.k, Path(args.corpus_src)))
    retrieval = json.loads(rp_path.read_text())
    log(f"retrieval precision: {retrieval}")

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    probes = {"image-grounded": args.probe, "memory-colors-in-pool": args.probe_in_pool}
    if args.memory_colors:
        probes["memory-colors"] = args.memory_colors
    results: dict = {"arms": arms, "seeds": seeds, "runs": {}}
    for seed in seeds:
        for arm in arms:
            t0 = time.time()
            summary = train_arm(args, arm, seed, corpus)
            run_dir = out / f"{arm}-s{seed}"
            log(f"trained {arm} seed {seed}: loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} "
                f"({time.time() - t0:.0f}s)")
            run = {"train": {k: summary.get(k) for k in ("first_loss", "last_loss", "seconds", "steps", "params")}}
            evals = [(name, path, arm) for name, path in probes.items()]
            if arm == "real" and seed == seeds[0]:   # test-time swaps on one real-trained model
                evals += [("image-grounded@shuffled", args.probe, "shuffled"), ("image-grounded@zero", args.probe, "zero")]
            for name, path, visual in evals:
                dest = run_dir / f"probe-{name.replace('@', '-at-')}.json"
                if not dest.is_file():
                    r = probe_model(args, run_dir, arm, visual, path, details=True,
                                    diagnose=name.startswith("image-grounded"), bank=bank, backbone=backbone)
                    atomic_json(dest, r)
                r = json.loads(dest.read_text())
                run[name] = r
                log(f"  probe {name} ({visual} visual input): {r['accuracy']:.2f}")
            results["runs"][f"{arm}-s{seed}"] = run

    # ----- summary --------------------------------------------------------------------------------
    table = {}
    for name in list(probes) + ["image-grounded@shuffled", "image-grounded@zero"]:
        for arm in arms:
            accs = [results["runs"][f"{arm}-s{s}"][name]["accuracy"] for s in seeds
                    if name in results["runs"][f"{arm}-s{s}"]]
            if accs:
                table.setdefault(name, {})[arm] = {"mean": mean_std(accs)[0], "std": mean_std(accs)[1], "runs": accs}
    results["table"] = table
    for control in ("shuffled", "zero"):  # paired bootstrap of (i) real retrieval − each control arm
        if "real" in arms and control in arms:
            results[f"real_minus_{control}"] = {
                name: paired_bootstrap([per_item_correct(results["runs"][f"real-s{s}"][name]) for s in seeds],
                                       [per_item_correct(results["runs"][f"{control}-s{s}"][name]) for s in seeds],
                                       args.bootstrap)
                for name in probes}
    # majority-colour baseline of each probe, and per-class confusions (image-grounded, pooled over seeds)
    from xmodal.xadapter.probe import read_color_csv

    base = {}
    for name, path in probes.items():
        golds = [it.color for it in read_color_csv(path)]
        top = max(set(golds), key=golds.count)
        base[name] = {"majority_colour": top, "accuracy": round(100 * golds.count(top) / len(golds), 2),
                      "objects": len(golds)}
    results["majority_baseline"] = base
    confusions = {}
    for arm in arms:
        conf: dict = {}
        for s in seeds:
            for p in results["runs"][f"{arm}-s{s}"]["image-grounded"]["predictions"]:
                conf.setdefault(p["item"], {}).setdefault(p["pred"], 0)
                conf[p["item"]][p["pred"]] += 1
        confusions[arm] = conf
    results["per_class_predictions"] = confusions
    results["diagnosis"] = {f"{arm}-s{s}": results["runs"][f"{arm}-s{s}"]["image-grounded"].get("diagnosis")
                            for arm in arms for s in seeds}
    results["retrieval"] = retrieval
    results["budget"] = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "mask_ratio", "max_length",
                                                         "experts", "k", "plm", "backbone")}
    results["corpus"] = {"file": str(corpus), "captions": n_kept, "source": args.corpus_src, "source_captions": n_total}
    results["wall_seconds"] = round(time.time() - t_start, 1)
    for run in results["runs"].values():   # keep results.json small: predictions stay in the per-run files
        for v in run.values():
            if isinstance(v, dict):
                v.pop("predictions", None)
    atomic_json(out / "results.json", results)
    log(f"results -> {out / 'results.json'}")
    print(json.dumps({"table": table, "real_minus_shuffled": results.get("real_minus_shuffled")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
