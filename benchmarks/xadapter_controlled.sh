#!/usr/bin/env bash
# The controlled X-adapter experiment (docs/xadapter-results.md): real vs shuffled vs zero visual input,
# same PLM / corpus / steps / seeds / MLM-head recipe, 3 seeds per arm, probes + paired bootstrap.
#
# Budget (environment variables, defaults = the run reported in docs/xadapter-results.md):
#   STEPS=100 BATCH=16 LR=5e-4 SEEDS=0,1,2 ARMS=real,shuffled,zero EXPERTS=v K=4
#   OUT=runs/xa-controlled  POOL=../shared/data/tiny-imagenet  BACKBONE=bridge:lite0-minilm
#   HEAD=runs/xa-mechanism/head  (the text-only base of benchmarks/xadapter_mechanism.py; empty = a fresh head per arm)
# Measured on 2 CPU cores shared with other jobs: bank 47 min, then 9 adaptation runs + probes ~35 min;
# Every step is resumable: rerun the script to continue.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/xa-controlled}
POOL=${POOL:-../shared/data/tiny-imagenet}
BACKBONE=${BACKBONE:-bridge:lite0-minilm}
mkdir -p "$OUT"

# 1. the image pool (skipped when a bank is already there; it verifies itself on load)
if [ ! -f "$OUT/bank/bank.json" ]; then
  $PY -m xmodal xadapter bank --backbone "$BACKBONE" --data "imagefolder:$POOL" --split train \
      --out "$OUT/bank" --index exact --no-tokens --cache-dir .xmodal-cache --json > "$OUT/bank.json" 2> "$OUT/bank.log"
fi

# 2. the image-grounded colour probe, from the pool's pixels (deterministic; rewritten only if missing)
if [ ! -f data/probes/tiny-imagenet-colors.csv ]; then
  $PY scripts/make_color_probe.py --pool "$POOL/train" --out data/probes/tiny-imagenet-colors.csv \
      --memory-colors ../shared/data/color/memory_colors.csv \
      --memory-out data/probes/memory-colors-in-tiny-imagenet.csv
fi

# 3. train 3 arms x seeds, probe, statistics, diagnosis
$PY benchmarks/xadapter_controlled.py --out "$OUT" --bank "$OUT/bank" --backbone "$BACKBONE" \
    --steps "${STEPS:-100}" --batch-size "${BATCH:-16}" --lr "${LR:-5e-4}" --seeds "${SEEDS:-0,1,2}" \
    --arms "${ARMS:-real,shuffled,zero}" --experts "${EXPERTS:-v}" --k "${K:-4}" --head "${HEAD:-}" 2> >(tee -a "$OUT/controlled.log" >&2)

# 4. the Markdown tables for the docs and the README
$PY benchmarks/xadapter_controlled_table.py "$OUT/results.json" > "$OUT/results.md"
cat "$OUT/results.md"
