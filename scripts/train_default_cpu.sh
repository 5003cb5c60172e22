#!/usr/bin/env bash
# The default model's recipe sized for a 2-core CPU: scripts/train_default_gpu.sh continuing from
# the shipped denoiser (a CPU hour sees ~0.5M tokens, too few to start from the AR model) with
# suffix masks and the KL to AR at each block's first hidden target, 8 x 256 tokens a step, a lower
# learning rate, checkpoints every 25 steps. No evaluation here: scripts/eval_heldout.sh measures
# the result against the shipped denoiser. Rerun with the same arguments after a stop: distillation
# appends another DISTILL_SECONDS of answers (0: none), training resumes from its last checkpoint.
# Usage: scripts/train_default_cpu.sh [OUT_DIR] [DISTILL_SECONDS] [TRAIN_SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
TWOTOWER=.venv/bin/twotower DEVICE=cpu DISTILL_BATCH=64 SEQ_LEN=256 BATCH=8 EVAL=0 \
INIT_FROM=smollm2-135m MASK_PATTERN=suffix AR_DISTILL=1 \
TRAIN_ARGS="--lr 2e-4 --warmup-steps 10 --threads 2 --eval-every 100 --save-every 25 --val-prompts 4" \
    exec bash scripts/train_default_gpu.sh "${1:-runs/cpu}" "${2:-1500}" "${3:-5400}"
