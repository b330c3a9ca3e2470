"""Markdown table of the X-adapter offline-default runs (benchmarks/xadapter_offline.sh).

    python benchmarks/xadapter_table.py [runs/xadapter-offline]

Reads the --json documents the script saved (bank.json, train.json, probe-colors-*.json,
glue-<TASK>-*.json) and timings.jsonl, and prints one table: rows = (task, model/experts),
columns = the metric(s) exactly as the commands reported them, the wall time, and what each row used.
Missing files are skipped; a file holding {"error": ...} is shown as a failed row.
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

PROBE_ORDER = [("vt", "X-adapter, experts v,t (adapted model)"), ("v", "X-adapter, experts v only"),
               ("t", "X-adapter, experts t only"), ("none", "same model, adapters off (experts none)")]
GLUE_ORDER = [("plain", "plain PLM (no adapters)"), ("vt", "+ X-adapter, experts v,t"),
              ("t", "+ X-adapter, experts t")]


def _load(path: Path) -> dict | None:
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text:
        return None
    return json.loads(text.splitlines()[-1])


def _timings(out: Path) -> dict[str, dict]:
    rows = {}
    path = out / "timings.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["name"]] = row  # the last run of a name wins
    return rows


def _flag(command: str | None, name: str) -> str | None:
    if not command:
        return None
    parts = shlex.split(command)
    for i, p in enumerate(parts[:-1]):
        if p == name:
            return parts[i + 1]
    return None


def _plm_name(plm: str) -> str:
    return "MiniLM-L6" if plm == "minilm" else plm


def _secs(timings: dict, name: str) -> str:
    t = timings.get(name)
    return f"{t['seconds']:.0f}" if t else "–"


def build(out: Path) -> str:
    timings = _timings(out)
    bank = _load(out / "bank.json") or {}
    train = _load(out / "train.json") or {}
    corpus = _flag(timings.get("train", {}).get("command"), "--corpus") or "?"
    batch = _flag(timings.get("train", {}).get("command"), "--batch-size") or "?"
    train_seed = _flag(timings.get("train", {}).get("command"), "--seed") or "?"
    vlm = train.get("backbone") or bank.get("backbone") or "?"
    pool = (f"{bank.get('dataset', '?')} {bank.get('split', '?')} ({bank.get('size', '?')} images, "
            f"{bank.get('index', '?')} index)") if bank else "?"
    plm = _plm_name(train.get("plm", "minilm"))
    adapt = (f"{train.get('steps_done', '?')} MLM steps × batch {batch} on {Path(corpus).name}, seed {train_seed}, "
             f"{train.get('feature_source', '?')} features, k={train.get('k', '?')}") if train else "?"

    lines = []
    if train and "error" not in train:
        p = train["params"]
        lines.append(f"Adaptation: {plm} + X-adapter (experts {','.join(train['experts'])} after layers "
                     f"{train['layers']}), VLM {vlm}"
                     f"{' (stand-in, not CLIP)' if train.get('stand_in_backbone') else ''}, pool {pool}, corpus "
                     f"{corpus}; {train['steps_done']} steps, MLM loss {train['first_loss']:.3f} → "
                     f"{train['last_loss']:.3f}, {train['seconds']:.0f} s. Trainable parameters "
                     f"{p['trainable']:,} = {p['trainable_pct_of_plm']:.2f}% of the PLM's {p['plm']:,} "
                     f"(adapters {p['adapter']:,}, new MLM head {p['new_head']:,}). Bank build "
                     f"{_secs(timings, 'bank')} s.")
        lines.append("")
    elif train:
        lines.append(f"Adaptation failed: {train['error']}")
        lines.append("")

    lines.append("| task | model / experts | metric | time (s) | what it used |")
    lines.append("|---|---|---|---|---|")

    for tag, label in PROBE_ORDER:
        r = _load(out / f"probe-colors-{tag}.json")
        if r is None:
            continue
        name = f"probe-colors-{tag}"
        if "error" in r:
            lines.append(f"| Memory Colors probe | {label} | error: {r['error']} | {_secs(timings, name)} | |")
            continue
        used = (f"PLM {_plm_name(r['plm'])} + its trained MLM head; adapter: {adapt}; VLM {vlm}; pool {pool}; "
                f"{r['templates']} templates ({r['n_templates']}) × {r['n_objects']} objects = "
                f"{r['predictions']} predictions, argmax over {len(r['candidates'])} colours")
        lines.append(f"| Memory Colors probe | {label} | accuracy {r['accuracy']:.2f} | {_secs(timings, name)} | "
                     f"{used} |")

    tasks = sorted({p.name.split("-")[1] for p in out.glob("glue-*-*.json")},
                   key=lambda t: ["RTE", "MRPC"].index(t) if t in ("RTE", "MRPC") else 99)
    for task in tasks:
        for tag, label in GLUE_ORDER:
            name = f"glue-{task}-{tag}"
            r = _load(out / f"{name}.json")
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {task} dev | {label} | error: {r['error']} | {_secs(timings, name)} | |")
                continue
            metrics = "; ".join(f"{split}: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()) if len(r["metrics"]) > 1
                                else ", ".join(f"{k} {v:.2f}" for k, v in m.items())
                                for split, m in r["metrics"].items())
            cmd = timings.get(name, {}).get("command")
            max_train = _flag(cmd, "--max-train")
            max_len = _flag(cmd, "--max-length") or "128"
            used = (f"PLM {_plm_name(r['plm'])}, {'full fine-tuning' if r['mode'] == 'full' else 'PLM frozen'}; "
                    f"train {r['train_size']} examples" + (f" (--max-train {max_train}, seeded subset)" if max_train else "")
                    + f", dev {sum(r['dev_size'].values())}; epochs {r['epochs']:g} = {r['steps']} steps, lr {r['lr']:g}, "
                    f"batch {r['batch_size']}, max length {max_len}, seed {r['seed']}")
            if r.get("xadapter"):
                used += f"; adapter: {adapt}; VLM {vlm}"
                if "v" in r["experts"]:
                    used += f"; pool {pool}"
            lines.append(f"| {task} dev | {label} | {metrics} | {_secs(timings, name)} | {used} |")

    total = sum(t["seconds"] for t in timings.values())
    lines.append("")
    lines.append(f"Wall time of all commands: {total:.0f} s ({total / 60:.1f} min).")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    out = Path(argv[1] if len(argv) > 1 else "runs/xadapter-offline")
    if not out.is_dir():
        print(f"no run folder {out}; run benchmarks/xadapter_offline.sh first", file=sys.stderr)
        return 1
    print(build(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
