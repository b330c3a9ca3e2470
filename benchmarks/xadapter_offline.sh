#!/usr/bin/env bash
# X-adapter results with the offline defaults (docs/xadapter-results.md).
#
#   PLM   MiniLM-L6 (--plm minilm; a bare BertModel, the MLM head is created and trained here)
#   VLM   bridge:lite0-minilm (EfficientNet-Lite0 + MiniLM ridge bridge; a stand-in, not CLIP)
#   pool  CIFAR-10 subset, train split (2000 images) -> retrieval bank, pooled embeddings only
#   text  ../shared/data/text/lxmert_train.jsonl (captions)
#
# Steps: bank -> MLM adaptation -> colour probe (experts v,t / v / t / none) -> GLUE RTE and MRPC
# (plain PLM vs adapted model with experts v,t and t, same budget). Every command writes its
# --json document to runs/xadapter-offline/<name>.json and its log to <name>.log; the wall time
# of each command goes to runs/xadapter-offline/timings.jsonl. Finally the table is printed by
# benchmarks/xadapter_table.py (also written to runs/xadapter-offline/table.md).
#
# Run from the repository root:  bash benchmarks/xadapter_offline.sh
# Only some steps:               STEPS="probe glue" bash benchmarks/xadapter_offline.sh
# Budgets (defaults = the ones used for docs/xadapter-results.md on 2 CPU cores):
#   TRAIN_STEPS, TRAIN_BATCH, TRAIN_SEED, GLUE_MAX_TRAIN, GLUE_EPOCHS, GLUE_LR, GLUE_SEED, GLUE_MAX_LENGTH
# A step whose JSON file already exists is skipped (delete the file to rerun it); FORCE=1 reruns all.
set -euo pipefail

cd "$(dirname "$0")/.."

XMODAL=${XMODAL:-.venv/bin/xmodal}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/xadapter-offline}
DATA=${DATA:-../shared/data}
STEPS=${STEPS:-"bank train probe glue table"}
CACHE_DIR=${CACHE_DIR:-.xmodal-cache}

PLM=${PLM:-minilm}
VLM=${VLM:-bridge:lite0-minilm}
POOL=${POOL:-cifar10:$DATA/cifar10}
CORPUS=${CORPUS:-$DATA/text/lxmert_train.jsonl}
COLORS=${COLORS:-$DATA/color/memory_colors.csv}
GLUE_DATA=${GLUE_DATA:-$DATA/glue}

TRAIN_STEPS=${TRAIN_STEPS:-200}
TRAIN_BATCH=${TRAIN_BATCH:-32}
TRAIN_SEED=${TRAIN_SEED:-0}
GLUE_MAX_TRAIN=${GLUE_MAX_TRAIN:-800}
GLUE_EPOCHS=${GLUE_EPOCHS:-2}
GLUE_SEED=${GLUE_SEED:-0}
GLUE_LR=${GLUE_LR:-5e-5}
GLUE_MAX_LENGTH=${GLUE_MAX_LENGTH:-128}
GLUE_TASKS=${GLUE_TASKS:-"RTE MRPC"}
GLUE_T_ONLY=${GLUE_T_ONLY:-1}   # also the T-expert-only rows
FORCE=${FORCE:-0}

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

BANK=$OUT/bank
ADAPT=$OUT/adapt
ADAPTER=$ADAPT/xadapter
mkdir -p "$OUT"

want() { [[ " $STEPS " == *" $1 "* ]]; }

# run NAME CMD... : CMD --json > OUT/NAME.json, stderr > OUT/NAME.log, wall time -> timings.jsonl
run() {
    local name=$1; shift
    local json=$OUT/$name.json
    if [[ -s $json && $FORCE != 1 ]] && ! grep -q '"error"' "$json"; then
        echo "[xadapter-offline] $name: $json exists, skipped" >&2
        return 0
    fi
    echo "[xadapter-offline] $name: $*" >&2
    local t0 t1 rc=0
    t0=$(date +%s.%N)
    "$@" --json >"$json.tmp" 2>"$OUT/$name.log" || rc=$?
    t1=$(date +%s.%N)
    mv "$json.tmp" "$json"
    local secs
    secs=$("$PY" -c "print(round($t1 - $t0, 1))")
    printf '{"name": "%s", "seconds": %s, "rc": %d, "command": %s}\n' "$name" "$secs" "$rc" \
        "$("$PY" -c 'import json,sys; print(json.dumps(" ".join(sys.argv[1:])))' "$@" --json)" >>"$OUT/timings.jsonl"
    echo "[xadapter-offline] $name: rc=$rc, ${secs}s" >&2
    if [[ $rc != 0 ]]; then
        cat "$json" >&2
        tail -n 20 "$OUT/$name.log" >&2
        return "$rc"
    fi
}

# ---- 1. retrieval bank (pooled embeddings are all the default --features pooled reads) -------------
if want bank; then
    if [[ $FORCE == 1 ]]; then rm -rf "$BANK"; fi
    run bank "$XMODAL" xadapter bank --backbone "$VLM" --data "$POOL" --split train --out "$BANK" \
        --index exact --no-tokens --cache-dir "$CACHE_DIR"
fi

# ---- 2. MLM adaptation on the caption corpus ----------------------------------------------------
if want train; then
    if [[ $FORCE == 1 || ! -s $OUT/train.json ]] || grep -q '"error"' "$OUT/train.json"; then rm -rf "$ADAPT"; fi
    run train "$XMODAL" xadapter train --plm "$PLM" --backbone "$VLM" --bank "$BANK" --corpus "$CORPUS" \
        --out "$ADAPT" --steps "$TRAIN_STEPS" --batch-size "$TRAIN_BATCH" --seed "$TRAIN_SEED" --experts v,t
    "$PY" - "$OUT/train.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
p = s["params"]
print(f"[xadapter-offline] trainable params: {p['trainable']:,} = {p['trainable_pct_of_plm']:.2f}% of the PLM's "
      f"{p['plm']:,} (adapters {p['adapter']:,}, new MLM head {p['new_head']:,}); "
      f"MLM loss {s['first_loss']:.3f} -> {s['last_loss']:.3f} in {s['steps_done']} steps, {s['seconds']}s",
      file=sys.stderr)
EOF
fi

# ---- 3. colour probe: the adapted model, and the same model with experts switched off ---------------
if want probe; then
    for experts in v,t none v t; do
        tag=${experts/,/}
        run "probe-colors-$tag" "$XMODAL" probe colors --data "$COLORS" --plm "$PLM" --xadapter "$ADAPTER" \
            --bank "$BANK" --experts "$experts"
    done
fi

# ---- 4. GLUE: plain PLM vs adapted model (experts v,t and t), same budget and seed -----------------
if want glue; then
    budget=(--epochs "$GLUE_EPOCHS" --max-train "$GLUE_MAX_TRAIN" --lr "$GLUE_LR" --seed "$GLUE_SEED"
            --max-length "$GLUE_MAX_LENGTH")
    for task in $GLUE_TASKS; do
        run "glue-$task-plain" "$XMODAL" glue --task "$task" --data "$GLUE_DATA" --plm "$PLM" "${budget[@]}"
        run "glue-$task-vt" "$XMODAL" glue --task "$task" --data "$GLUE_DATA" --plm "$PLM" --xadapter "$ADAPTER" \
            --bank "$BANK" --experts v,t "${budget[@]}"
        if [[ $GLUE_T_ONLY == 1 ]]; then
            run "glue-$task-t" "$XMODAL" glue --task "$task" --data "$GLUE_DATA" --plm "$PLM" --xadapter "$ADAPTER" \
                --experts t "${budget[@]}"
        fi
    done
fi

# ---- 5. table -----------------------------------------------------------------------------------
if want table; then
    "$PY" benchmarks/xadapter_table.py "$OUT" | tee "$OUT/table.md"
fi
