"""Derive an image-grounded colour probe from the pixels of an ImageFolder pool.

Method (documented in docs/xadapter-results.md, "The image-grounded colour probe"):

1. Central region: the middle half of each image side (the central 25 % of the area), where the object
   of an ImageNet photo usually is; the border is mostly background.
2. Each pixel of that region gets one of the 11 Berlin-Kay basic colour terms from its HSV value
   (thresholds in ``colour_term``): value < 0.2 -> black; saturation < 0.2 -> white (value >= 0.75)
   or grey; otherwise by hue (red, orange, yellow, green, blue, purple, pink bands), with dark
   orange/yellow (value < 0.6) -> brown and light, weakly saturated red -> pink.
3. Grey pixels are dropped (in these photos they are mostly background, shadow and desaturated
   texture, and "grey" would otherwise top 136 of 202 classes); the other ten terms are renormalised.
   Per image, the share of each term; per class, the mean share over its images (every image counts
   equally), and the share of images whose own top term is the class's top term (agreement).
4. A class is kept when its top term covers at least ``--min-share`` of the central pixels on
   average, leads the runner-up by ``--min-ratio`` times, and is the top term of at least
   ``--min-agreement`` of its images. Nothing about any model enters this choice.

Outputs a Memory-Colors-format CSV (Index,Descriptor,Item,Color + evidence columns) that
``xmodal probe colors --data`` reads, and (``--memory-colors``) the Memory Colors items whose
object is one of the pool's classes.

    python scripts/make_color_probe.py --pool ../shared/data/tiny-imagenet/train \
        --out data/probes/tiny-imagenet-colors.csv \
        --memory-colors ../shared/data/color/memory_colors.csv \
        --memory-out data/probes/memory-colors-in-tiny-imagenet.csv
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

TERMS = ["black", "blue", "brown", "green", "grey", "orange", "pink", "purple", "red", "white", "yellow"]
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def colour_term(h: np.ndarray, s: np.ndarray, v: np.ndarray, min_sat: float = 0.2) -> np.ndarray:
    """Vectorised HSV (h in degrees [0, 360), s and v in [0, 1]) -> index into TERMS."""
    out = np.full(h.shape, TERMS.index("grey"), dtype=np.int64)
    chromatic = (s >= min_sat) & (v >= 0.2)
    out[(v >= 0.75) & (s < min_sat)] = TERMS.index("white")
    hue_terms = [(0, 15, "red"), (15, 40, "orange"), (40, 70, "yellow"), (70, 170, "green"),
                 (170, 260, "blue"), (260, 300, "purple"), (300, 345, "pink"), (345, 360, "red")]
    for lo, hi, name in hue_terms:
        out[chromatic & (h >= lo) & (h < hi)] = TERMS.index(name)
    # dark orange / dark yellow reads as brown
    out[chromatic & (h >= 15) & (h < 70) & (v < 0.6)] = TERMS.index("brown")
    # light, weakly saturated red reads as pink
    out[chromatic & ((h < 15) | (h >= 345)) & (s < 0.5) & (v >= 0.7)] = TERMS.index("pink")
    out[v < 0.2] = TERMS.index("black")
    return out


def image_shares(path: Path, drop: tuple[str, ...] = ("grey",)) -> np.ndarray:
    """Share of each colour term over the central region of one image, ``drop`` terms removed."""
    with Image.open(path) as im:
        hsv = np.asarray(im.convert("RGB").convert("HSV"), dtype=np.float64)
    hgt, wid = hsv.shape[:2]
    crop = hsv[hgt // 4: hgt - hgt // 4, wid // 4: wid - wid // 4]
    h, s, v = crop[..., 0] * 360.0 / 256.0, crop[..., 1] / 255.0, crop[..., 2] / 255.0
    counts = np.bincount(colour_term(h, s, v).ravel(), minlength=len(TERMS)).astype(np.float64)
    for name in drop:
        counts[TERMS.index(name)] = 0.0
    return counts / max(counts.sum(), 1.0)


def class_colours(pool: Path, drop: tuple[str, ...] = ("grey",)) -> list[dict]:
    rows = []
    for folder in sorted(p for p in pool.iterdir() if p.is_dir()):
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTS)
        if not files:
            continue
        shares = np.stack([image_shares(f, drop) for f in files])
        mean = shares.mean(0)
        order = np.argsort(-mean)
        top, second = int(order[0]), int(order[1])
        agreement = float((shares.argmax(1) == top).mean())
        rows.append({"class": folder.name, "color": TERMS[top], "share": float(mean[top]),
                     "runner_up": TERMS[second], "runner_up_share": float(mean[second]),
                     "agreement": agreement, "images": len(files)})
    return rows


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


def memory_colors_in_pool(memory_csv: Path, classes: list[str], synonyms: dict[str, list[str]]) -> list[list]:
    """Memory Colors rows whose item names one of the pool's classes (folder name or a WordNet synonym)."""
    names = {}
    for cls in classes:
        for name in [cls] + synonyms.get(cls, []):
            names[name.strip().lower()] = cls
    out = []
    with open(memory_csv, newline="", encoding="utf-8-sig") as fh:
        for row in csv.DictReader(fh):
            item = row["Item"].strip().lower()
            candidates = {item, item.rstrip("s"), item[:-2] if item.endswith("es") else item}
            hit = next((c for c in candidates if c in names), None)
            if hit is not None:
                cls = names[hit]
                how = "class name" if hit == cls.lower() else "WordNet synonym"
                out.append([row["Index"], row["Descriptor"], row["Item"], row["Color"], cls, how])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", required=True, type=Path, help="ImageFolder split: <pool>/<class>/*.jpg")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--min-share", type=float, default=0.3)
    ap.add_argument("--min-ratio", type=float, default=1.4)
    ap.add_argument("--min-agreement", type=float, default=0.4)
    ap.add_argument("--drop", default="grey",
                    help="comma list of terms whose pixels are ignored (grey: mostly photo backgrounds)")
    ap.add_argument("--classes-tsv", type=Path, default=None, help="wnid, folder name, synonyms (for matching)")
    ap.add_argument("--memory-colors", type=Path, default=None)
    ap.add_argument("--memory-out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not args.pool.is_dir():
        print(f"error: {args.pool} is not a folder of class folders", file=sys.stderr)
        return 3
    drop = tuple(t.strip() for t in args.drop.split(",") if t.strip())
    unknown = [t for t in drop if t not in TERMS]
    if unknown:
        print(f"error: --drop {unknown} are not colour terms; use some of {', '.join(TERMS)}", file=sys.stderr)
        return 2
    rows = class_colours(args.pool, drop)
    kept = [r for r in rows if r["share"] >= args.min_share
            and r["share"] >= args.min_ratio * r["runner_up_share"] and r["agreement"] >= args.min_agreement]
    out_rows = [[i, article(r["class"]) + " ", r["class"], r["color"], f"{r['share']:.3f}", r["runner_up"],
                 f"{r['runner_up_share']:.3f}", f"{r['agreement']:.3f}", r["images"]]
                for i, r in enumerate(kept, 1)]
    write_csv(args.out, ["Index", "Descriptor", "Item", "Color", "share", "runner_up", "runner_up_share",
                         "agreement", "images"], out_rows)
    counts = {t: sum(r["color"] == t for r in kept) for t in TERMS}
    print(f"{len(kept)} of {len(rows)} classes kept -> {args.out}; colours: "
          + ", ".join(f"{t} {n}" for t, n in counts.items() if n), file=sys.stderr)
    if args.memory_colors is not None:
        tsv = args.classes_tsv or args.pool.parent / "classes.tsv"
        synonyms: dict[str, list[str]] = {}
        if tsv.is_file():
            for line in tsv.read_text(encoding="utf-8").splitlines():
                parts = line.split("\t")
                if len(parts) >= 3:
                    synonyms[parts[1]] = [s.strip() for s in parts[2].split(",")]
        mc = memory_colors_in_pool(args.memory_colors, [r["class"] for r in rows], synonyms)
        dest = args.memory_out or args.out.with_name("memory-colors-in-pool.csv")
        write_csv(dest, ["Index", "Descriptor", "Item", "Color", "pool_class", "matched_by"], mc)
        print(f"{len(mc)} Memory Colors items name a pool class -> {dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
