"""Does the V-expert read the pictures? The held-out-object mechanism test (docs/xadapter-results.md).

One script, resumable (every stage's output is kept in ``--out`` and reused when present):

1. the pool's retrieval bank (``xmodal xadapter bank``) and each image's pixel colour (the method of
   ``scripts/make_color_probe.py``); an image is *reliable* when its top colour covers >= 30 % of its
   non-grey central pixels and >= 1.4x the runner-up;
2. the class split: held-out = the 47 classes of ``data/probes/tiny-imagenet-colors.csv`` + the pool
   classes of ``data/probes/memory-colors-in-tiny-imagenet.csv``; adaptation = the rest; a development
   split (``--dev``) holds a seeded fifth of the adaptation classes out instead, for choosing settings;
3. the adaptation corpus: per reliable image of an adaptation class, one caption naming the object and
   its colour and one that does not name it, both paired with that image (the colour word is always
   masked). Nothing of a held-out class appears in it;
4. the text-only base: the PLM's MLM head trained alone on the shared caption + Wikipedia text
   (``xadapter head``), frozen and shared by every arm;
5. arms real / shuffled (images of other classes) / zero visual input x seeds, V-expert only, from the
   same base with the same steps, batches and masking;
6. probes on held-out classes only: (a) paired image ("The color of this {object} is [MASK]." shown that
   image; gold = the image's pixel colour), (b) retrieval (VaLM's templates, k images retrieved from the
   pool; gold = the class's image-grounded colour) and (c) the Memory Colors items in the pool; the
   text-only row, the ceiling (a linear colour read-out fitted on the adaptation classes' image
   embeddings, applied to the same visual inputs), paired bootstrap intervals, diagnostics.

Writes ``OUT/results.json`` (+ ``docs/results/xadapter-mechanism.json`` with ``--publish``) and prints
the Markdown table.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xmodal.xadapter.model.modules import get_xadapter, load_xadapter  # noqa: E402
from xmodal.xadapter.model.plm import load_mlm  # noqa: E402
from xmodal.xadapter.retrieval.context import load_bank, row_classes, shuffle_map  # noqa: E402
from xmodal.xadapter.tasks.head import HeadArgs, load_head, train_head  # noqa: E402
from xmodal.xadapter.tasks.probe import VALM_TEMPLATES, ColorItem, candidate_probs, fill_template, read_color_csv  # noqa: E402
from xmodal.xadapter.tasks.train import TrainArgs, train_mlm  # noqa: E402

COLOURS = ["black", "blue", "brown", "green", "orange", "pink", "purple", "red", "white", "yellow"]
NAMED = ["The color of this {o} is {c}.", "This {o} is {c}.", "A photo of a {c} {o}.", "The {o} in the picture is {c}.",
         "Its color is {c}: a {o}."]
UNNAMED = ["The color of this is {c}.", "It is {c}.", "A photo of something {c}.", "The thing in the picture is {c}.",
           "Its color is {c}."]
PAIRED_PROBE = "The color of this {o} is [MASK]."


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def atomic_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False))
    os.replace(tmp, path)


def colour_script():
    spec = importlib.util.spec_from_file_location("make_color_probe", ROOT / "scripts" / "make_color_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----- 1. bank + pixel colours -------------------------------------------------------------------
def ensure_bank(args) -> Path:
    bank = args.out / "bank"
    if not (bank / "bank.json").is_file():
        log("building the retrieval bank of the pool")
        subprocess.run([sys.executable, "-m", "xmodal", "xadapter", "bank", "--backbone", args.backbone,
                        "--data", f"imagefolder:{args.pool}", "--split", "train", "--out", str(bank),
                        "--index", "exact", "--no-tokens", "--cache-dir", str(args.cache_dir), "--json"],
                       check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    return bank


def pixel_colours(args, ids: list[str]) -> dict[str, list[float]]:
    """Bank id -> share of each of the 10 non-grey colour terms (cached)."""
    path = args.out / "pixel_colours.json"
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("ids") == ids:
            return dict(zip(ids, data["shares"]))
    mod = colour_script()
    keep = [mod.TERMS.index(c) for c in COLOURS]
    shares = [[round(float(x), 5) for x in mod.image_shares(args.pool / sid)[keep]] for sid in ids]
    atomic_json(path, {"ids": ids, "terms": COLOURS, "shares": shares})
    return dict(zip(ids, shares))


def reliable_colour(shares: list[float], min_share: float = 0.30, min_ratio: float = 1.4) -> str | None:
    order = np.argsort(-np.asarray(shares))
    top, second = shares[order[0]], shares[order[1]]
    if top >= min_share and top >= min_ratio * max(second, 1e-9):
        return COLOURS[order[0]]
    return None


# ----- 2-3. split and corpus ---------------------------------------------------------------------
def class_split(classes: list[str], dev: bool) -> dict:
    probe = read_color_csv(ROOT / "data/probes/tiny-imagenet-colors.csv")
    held = sorted({it.item.strip() for it in probe})
    with open(ROOT / "data/probes/memory-colors-in-tiny-imagenet.csv", newline="") as fh:
        memory = sorted({row["pool_class"] for row in csv.DictReader(fh)})
    held_out = sorted(set(held) | set(memory))
    missing = [c for c in held_out if c not in classes]
    if missing:
        raise SystemExit(f"probe classes not in the pool: {missing}")
    adaptation = sorted(c for c in classes if c not in held_out)
    rng = random.Random(20261203)
    dev_classes = sorted(rng.sample(adaptation, len(adaptation) // 5))
    if dev:
        return {"train": [c for c in adaptation if c not in dev_classes], "eval": dev_classes,
                "held_out_probe": held, "memory": memory, "protocol": "development"}
    return {"train": adaptation, "eval": held_out, "held_out_probe": held, "memory": memory, "protocol": "test"}


def write_corpus(path: Path, items: list[tuple[str, str, str]], seed: int = 0) -> int:
    """items: (bank id, class, colour) -> one caption naming the object and one not naming it per image."""
    rng = random.Random(seed)
    rows = []
    for sid, obj, colour in items:
        rows.append({"text": rng.choice(NAMED).format(o=obj, c=colour), "image": sid})
        rows.append({"text": rng.choice(UNNAMED).format(c=colour), "image": sid})
    rng.shuffle(rows)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    return len(rows)


def obj_name(cls: str) -> str:
    """Class folder name as it reads inside a sentence ("American lobster" stays, "Egyptian cat" stays)."""
    return cls if cls[:1].isupper() and cls[1:2].islower() and " " in cls else cls.lower()


# ----- 6. probes ---------------------------------------------------------------------------------
class Inputs:
    """The probe items and, per visual mode, what the V-expert sees."""

    def __init__(self, prompts, gold, candidates, rows, bank, shuffle):
        self.prompts, self.gold, self.candidates, self.rows = prompts, gold, candidates, rows   # rows: (N, m)
        self.bank, self.shuffle = bank, shuffle

    def visual(self, mode: str) -> torch.Tensor:
        rows = self.rows if mode != "shuffled" else self.shuffle[self.rows]
        feats = self.bank.embeddings(rows).float().clone()
        return torch.zeros_like(feats) if mode == "zero" else feats

    def mean_embedding(self, mode: str = "real") -> np.ndarray:
        v = self.visual(mode).mean(1)
        return torch.nn.functional.normalize(v, dim=-1).numpy()


def retrieval_inputs(items: list[ColorItem], tokenizer, bank, backbone, k: int, shuffle) -> Inputs:
    prompts, queries, gold = [], [], []
    for t in VALM_TEMPLATES:
        for it in items:
            p, q = fill_template(t, it, tokenizer)
            prompts.append(p)
            queries.append(q)
            gold.append(it.color)
    _, rows = bank.search_texts(backbone, queries, k)
    return Inputs(prompts, gold, sorted({it.color for it in items}), rows.cpu(), bank, shuffle)


def accuracy(probs: torch.Tensor, inputs: Inputs) -> np.ndarray:
    pred = probs.argmax(-1).tolist()
    return np.array([inputs.candidates[p] == g for p, g in zip(pred, inputs.gold)], dtype=np.float64)


def bootstrap_ci(diff_per_item: np.ndarray, n: int = 2000, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff_per_item), size=(n, len(diff_per_item)))
    means = diff_per_item[idx].mean(1) * 100
    return [round(float(np.percentile(means, 2.5)), 2), round(float(np.percentile(means, 97.5)), 2)]


def diagnostics(model, inputs: Inputs, tokenizer) -> dict:
    """Attention entropy over the visual inputs and the expert update's size with real vs zero input."""
    stack = get_xadapter(model)
    out = {}
    sel = slice(0, min(256, len(inputs.prompts)))
    enc = tokenizer(inputs.prompts[sel], return_tensors="pt", padding=True)
    at = enc["input_ids"] == tokenizer.mask_token_id
    for mode in ("real", "zero"):
        stack.trace = []
        with torch.no_grad(), stack.context(visual=inputs.visual(mode)[sel]):
            model(**enc)
        ratios, ent = [], []
        for idx, name, h, x, mask, delta in stack.trace:
            ratios.append(round(float((delta[at].norm(dim=-1) / h[at].norm(dim=-1)).mean()), 4))
            if mode == "real" and x.shape[1] > 1:
                att = stack.adapters[str(idx)].experts[name].attention(h, x, mask)    # (B, H, n, m)
                a = att.permute(0, 2, 1, 3)[at]                                       # (B, H, m) at the mask
                ent.append(round(float(-(a.clamp_min(1e-12).log() * a).sum(-1).mean()), 4))
        out[f"update_norm_ratio_{mode}"] = ratios
        if ent:
            out["attention_entropy"] = ent
            out["attention_entropy_max"] = round(float(np.log(inputs.rows.shape[1])), 4)
    stack.trace = None
    return out


def ceiling(train_x: np.ndarray, train_y: list[str], inputs: Inputs, test_x: np.ndarray) -> np.ndarray:
    """Linear colour read-out (logistic regression) restricted to the probe's candidate colours."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000, C=1.0)
    clf.fit(train_x, train_y)
    cols = [list(clf.classes_).index(c) for c in inputs.candidates]
    pred = clf.predict_proba(test_x)[:, cols].argmax(1)
    return np.array([inputs.candidates[p] == g for p, g in zip(pred, inputs.gold)], dtype=np.float64)


def summarise(per_arm: dict[str, list[np.ndarray]], text_only: np.ndarray, ceil: np.ndarray, items_per: int) -> dict:
    """Per-seed accuracies, the rows and the paired bootstrap intervals (items resampled, seeds averaged)."""
    res = {arm: [round(float(a.mean() * 100), 2) for a in accs] for arm, accs in per_arm.items()}
    real = np.mean(per_arm["real"], 0)
    res["text_only"] = round(float(text_only.mean() * 100), 2)
    res["ceiling"] = round(float(ceil.mean() * 100), 2)
    if "shuffled" in per_arm:
        res["real_minus_shuffled_ci"] = bootstrap_ci(real - np.mean(per_arm["shuffled"], 0))
    if "zero" in per_arm:
        res["real_minus_zero_ci"] = bootstrap_ci(real - np.mean(per_arm["zero"], 0))
    res["real_minus_text_only_ci"] = bootstrap_ci(real - text_only)
    res["n"] = int(len(real))
    res["items_per_object"] = items_per
    return res


LABELS = {"paired_images": "(a) paired image, held-out classes", "retrieval_classes": "(b) retrieval, 47 held-out classes",
          "memory_colors_in_pool": "(c) retrieval, Memory Colors objects in the pool"}


def _pm(values: list[float]) -> str:
    m = float(np.mean(values))
    return f"{m:.2f} ± {float(np.std(values, ddof=1)):.2f}" if len(values) > 1 else f"{m:.2f}"


def markdown(results: dict) -> str:
    """The headline table: arms (mean ± std over seeds), text-only, ceiling and the paired intervals."""
    head = ("| probe | n | majority | text-only | (i) real | (ii) shuffled | (iii) zero | ceiling (linear read-out) "
            "| (i) − (ii), 95 % CI | (i) − text-only, 95 % CI |")
    lines = [head, "|" + "---|" * 10]
    for key, label in LABELS.items():
        r = results.get(key)
        if not r:
            continue
        ci = lambda name: "[{:+.2f}, {:+.2f}]".format(*r[name]) if name in r else "–"  # noqa: E731
        lines.append(f"| {label} | {r['n']} | {r['majority'][1]:.2f} ({r['majority'][0]}) | {r['text_only']:.2f} "
                     f"| {_pm(r.get('real', [float('nan')]))} | {_pm(r['shuffled']) if 'shuffled' in r else '–'} "
                     f"| {_pm(r['zero']) if 'zero' in r else '–'} | {r['ceiling']:.2f} | {ci('real_minus_shuffled_ci')} "
                     f"| {ci('real_minus_text_only_ci')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", type=Path, default=ROOT.parent / "shared/data/tiny-imagenet")
    ap.add_argument("--text", type=Path, default=ROOT.parent / "shared/data/text")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/xa-mechanism")
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("XMODAL_CACHE", ROOT / ".xmodal-cache")))
    ap.add_argument("--backbone", default="bridge:lite0-minilm")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--arms", default="real,shuffled,zero")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--layers", default="top2")
    ap.add_argument("--k", type=int, default=4, help="images retrieved per prompt in the retrieval probes")
    ap.add_argument("--head-max-steps", type=int, default=800)
    ap.add_argument("--head-min-improvement", type=float, default=0.02)
    ap.add_argument("--head-lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dev", action="store_true", help="development protocol: evaluate on held-out adaptation classes")
    ap.add_argument("--tag", default="", help="suffix of the run folders (to keep development variants apart)")
    ap.add_argument("--publish", action="store_true", help="also write docs/results/xadapter-mechanism.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")

    bank_dir = ensure_bank(args)
    from xmodal.backbones import load_backbone

    backbone = load_backbone(args.backbone)
    bank = load_bank(bank_dir, backbone)
    ids = list(bank.ids)
    classes_of = row_classes(bank)
    shares = pixel_colours(args, ids)
    colour_of = {sid: reliable_colour(shares[sid]) for sid in ids}
    split = class_split(sorted(set(classes_of)), args.dev)
    train_set, eval_set = set(split["train"]), set(split["eval"])
    log(f"reliable-colour images: {sum(c is not None for c in colour_of.values())} of {len(ids)}; "
        f"{len(split['train'])} adaptation classes, {len(split['eval'])} evaluation classes ({split['protocol']})")

    # corpus
    train_items = [(sid, c, colour_of[sid]) for sid, c in zip(ids, classes_of) if c in train_set and colour_of[sid]]
    corpus = args.out / f"corpus-{split['protocol']}.jsonl"
    if not corpus.is_file():
        write_corpus(corpus, [(sid, obj_name(c), col) for sid, c, col in train_items])
    leaked = [c for c in eval_set if obj_name(c).lower() in corpus.read_text().lower()]
    if leaked:
        log(f"note: evaluation class names occur inside adaptation text (as substrings): {leaked}")

    # text-only base
    head_dir = args.out / "head"
    if not (head_dir / "head.json").is_file():
        train_head(HeadArgs(corpus=[str(args.text / "lxmert_train.jsonl")],
                            out=str(head_dir), max_steps=args.head_max_steps, batch_size=32, lr=args.head_lr,
                            max_length=32, window=100, min_improvement=args.head_min_improvement, resume=True,
                            progress=False), log=log)
    head_meta = json.loads((head_dir / "head.json").read_text())

    # arms
    runs = {}
    for arm in arms:
        for seed in seeds:
            run = args.out / f"{split['protocol']}{args.tag}-{arm}-s{seed}"
            runs[(arm, seed)] = run
            if (run / "xadapter" / "xadapter_config.json").is_file():
                continue
            log(f"training arm {arm} seed {seed}")
            train_mlm(TrainArgs(plm="minilm", backbone=args.backbone, bank=str(bank_dir), corpus=[str(corpus)],
                                out=str(run), steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                max_length=32, seed=seed, experts="v", layers=args.layers, visual=arm,
                                focus_words=",".join(COLOURS), head=str(head_dir), image_root=str(args.pool),
                                save_every=500, resume=True, progress=False, device="cpu"), log=log)

    # probes
    model0, tok, _, _ = load_mlm("minilm")
    load_head(model0, head_dir)
    model0.eval()
    shuffle = shuffle_map(classes_of, seed=0)
    row_of = {sid: r for r, sid in enumerate(ids)}
    eval_imgs = [(sid, c, colour_of[sid]) for sid, c in zip(ids, classes_of) if c in eval_set and colour_of[sid]]
    paired = Inputs([PAIRED_PROBE.format(o=obj_name(c)).replace("[MASK]", tok.mask_token) for _, c, _ in eval_imgs],
                    [col for _, _, col in eval_imgs], COLOURS,
                    torch.tensor([[row_of[sid]] for sid, _, _ in eval_imgs]), bank, shuffle)
    probes = {"paired_images": paired}
    if not args.dev:
        probes["retrieval_classes"] = retrieval_inputs(read_color_csv(ROOT / "data/probes/tiny-imagenet-colors.csv"),
                                                       tok, bank, backbone, args.k, shuffle)
        probes["memory_colors_in_pool"] = retrieval_inputs(
            read_color_csv(ROOT / "data/probes/memory-colors-in-tiny-imagenet.csv"), tok, bank, backbone, args.k, shuffle)
    # ceiling read-out: fitted on the adaptation classes' reliable images
    emb = bank.all_embeddings().float().numpy()
    tr_x = np.stack([emb[row_of[sid]] for sid, _, _ in train_items])
    tr_y = [col for _, _, col in train_items]

    results = {"protocol": split["protocol"], "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
               "layers": args.layers, "k": args.k, "seeds": seeds, "backbone": args.backbone + " (stand-in, not CLIP)",
               "adaptation_classes": len(split["train"]), "evaluation_classes": sorted(eval_set),
               "corpus_rows": 2 * len(train_items), "head": {k: head_meta[k] for k in ("steps", "stopped", "loss_per_window")}}
    for name, inp in probes.items():
        per_arm = {arm: [] for arm in arms}
        diag = {}
        for (arm, seed), run in runs.items():
            model, _, _, _ = load_mlm("minilm")
            load_xadapter(model, run)
            model.eval()
            per_arm[arm].append(accuracy(candidate_probs(model, tok, inp.prompts, inp.candidates, inp.visual(arm)), inp))
            if arm == "real":
                swap = {m: round(float(accuracy(candidate_probs(model, tok, inp.prompts, inp.candidates,
                                                                inp.visual(m)), inp).mean() * 100), 2)
                        for m in ("shuffled", "zero")}
                diag[f"real-s{seed}"] = {"test_time_input": swap, **diagnostics(model, inp, tok)}
        text_only = accuracy(candidate_probs(model0, tok, inp.prompts, inp.candidates), inp)
        test_x = emb[inp.rows[:, 0].numpy()] if inp.rows.shape[1] == 1 else inp.mean_embedding()
        ceil = ceiling(tr_x, tr_y, inp, test_x)
        majority = max(set(inp.gold), key=inp.gold.count)
        results[name] = {**summarise(per_arm, text_only, ceil, 1 if name == "paired_images" else len(VALM_TEMPLATES)),
                         "majority": [majority, round(100 * inp.gold.count(majority) / len(inp.gold), 2)],
                         "candidates": inp.candidates, "diagnostics": diag}
        log(f"{name}: " + json.dumps({k: v for k, v in results[name].items() if k != "diagnostics"}))
    results["wall_s"] = round(time.time() - t0, 1)
    results["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    atomic_json(args.out / f"results-{split['protocol']}{args.tag}.json", results)
    if args.publish and not args.dev:
        atomic_json(ROOT / "docs/results/xadapter-mechanism.json", results)
    table = markdown(results)
    (args.out / f"results-{split['protocol']}{args.tag}.md").write_text(table + "\n")
    print(table)
    log(f"wall time {results['wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
