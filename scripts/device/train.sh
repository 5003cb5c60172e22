#!/usr/bin/env bash
# The last call on a lent GPU machine (see pack.sh): installs what pack.sh carried, trains the
# default denoiser with scripts/train_default_gpu.sh (warm-started from the shipped one, suffix
# masks, the AR-distillation term) and leaves in $OUT what comes back:
#   adapter/       the trained denoiser, weights in bf16 (model.safetensors, config.json; < 16 MiB)
#   metrics.jsonl  loss.png  manifest.json  run.log
#   heldout.tgz    scripts/eval_heldout.sh's JSON without the judge, when the time allows
# Here, afterwards: scripts/eval_heldout.sh ADAPTER_DIR OUT (with the judge, on the CPU) against
# the shipped denoiser's figures, then scripts/export_denoiser.py ADAPTER_DIR
# twotower/weights/smollm2-135m to ship it.
# DISTILL_S and TRAIN_S (seconds; default 100 and 270) size the run to end inside one call's
# 600 s; the held-out evaluation gets what is left of BUDGET_S (default 570) after them; INIT_FROM, MASK_PATTERN, AR_DISTILL and the rest of train_default_gpu.sh's variables may
# be set. SITE (default /tmp/site) and DEVICE (default cuda) let a CPU rehearse it, shrunk.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?OUT must name the folder whose files come back}"
deadline=$((SECONDS + ${BUDGET_S:-570}))
site=${SITE:-/tmp/site}
bash scripts/device/unpack.sh .device "$site"
export PYTHONPATH=$site:$PWD PYTHONUNBUFFERED=1 TWOTOWER="python3 -m twotower.cli" DEVICE=${DEVICE:-cuda}

run=runs/device
INIT_FROM=${INIT_FROM-smollm2-135m} MASK_PATTERN=${MASK_PATTERN:-suffix} AR_DISTILL=${AR_DISTILL:-1} EVAL=0 \
    bash scripts/train_default_gpu.sh "$run" "${DISTILL_S:-100}" "${TRAIN_S:-270}" > "$OUT/run.log" 2>&1 \
    || { tail -n 40 "$OUT/run.log"; exit 1; }
python3 scripts/export_denoiser.py "$run/train/final" "$OUT/adapter"
cp "$run/train/metrics.jsonl" "$run/train/loss.png" "$run/data/manifest.json" "$OUT/"
tail -n 1 "$run/train/metrics.jsonl"

left=$((deadline - SECONDS))
if [ "$left" -gt 60 ]; then
    timeout "$left" bash scripts/eval_heldout.sh "$run/train/final" "$run/heldout" --device "$DEVICE" --judge none \
        >> "$OUT/run.log" 2>&1 || echo "eval_heldout.sh stopped after ${left}s: what it finished is in heldout.tgz"
    tar -czf "$OUT/heldout.tgz" -C "$run" heldout
else
    echo "no time left for eval_heldout.sh (${left}s)"
fi
