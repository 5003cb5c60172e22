#!/usr/bin/env bash
# The GPU recipe for the default model's LoRA denoiser, about 8 minutes on one H100:
#   1. self-distillation: the frozen AR model answers built-in chat requests (greedy, fp32)
#   2. tokenized shards of those chats (chat template rendered, 2% held out for validation)
#   3. LoRA denoiser training (bf16 autocast) fitted to a time budget
#   4. tokens per NFE and agreement with AR on the bench prompts (eval quality, no judge)
# Every step resumes: rerun with the same arguments after a stop.
# Usage: scripts/train_default_gpu.sh [OUT_DIR] [DISTILL_SECONDS] [TRAIN_SECONDS]
# MODEL (default smollm2-135m), TWOTOWER (default: the twotower command) and DEVICE (default cuda)
# may be set; DISTILL_BATCH, ANSWER_TOKENS, SEQ_LEN, BATCH and EVAL_TOKENS shrink the run (the test
# suite runs the whole recipe on a tiny random model this way). INIT_FROM (a saved two-tower
# directory or a registry name with a shipped denoiser) continues from that denoiser instead of
# starting from the AR model (at block size 16 from the first step: the block-8 warm-up is for a
# denoiser that starts as AR); MASK_PATTERN (random, suffix) picks the training masks; AR_DISTILL
# (a weight, default 0) adds the KL to the AR model at each block's first hidden target; COMPILE=1
# trains with torch.compile (untested on a GPU so far: try it on a short run first); TRAIN_ARGS
# (words) are appended to the train command and override its options (scripts/train_default_cpu.sh
# sets the CPU's learning rate, threads and checkpoint cadence this way). On this
# workplace's lent GPU machine, scripts/device/ packs and runs it.
set -euo pipefail
out=${1:-runs/gpu}
distill_s=${2:-150}
train_s=${3:-210}
model=${MODEL:-smollm2-135m}
tt=${TWOTOWER:-twotower}
mkdir -p "$out"

# 1. as many answers as fit in the time; 100k is only a ceiling on the built-in request list
$tt data distill --model "$model" --instructions 100000 --chat --max-new-tokens "${ANSWER_TOKENS:-256}" \
    --batch-size "${DISTILL_BATCH:-1024}" \
    --dtype float32 --time-budget "$distill_s" --out "$out/distill/chat.jsonl"

# 2.
[ -f "$out/data/manifest.json" ] || $tt data prepare "$out/distill/chat.jsonl" --model "$model" --field messages \
    --loss-on assistant --val-fraction 0.02 --out "$out/data" \
    --licence "answers by $model to twotower's built-in requests (Apache-2.0 requests; model licence applies)"

# 3. block 8 first, then 16 (unless continuing); 64 x 512 tokens a step
$tt train --model "$model" --data "$out/data" --out-dir "$out/train" --flavour lora --lora-rank 16 --lora-alpha 16 \
    --steps 100000 --time-budget-s "$train_s" --lr 8e-4 --warmup-steps 30 --decay-fraction 0.2 \
    --seq-len "${SEQ_LEN:-512}" --batch-size "${BATCH:-64}" $([ -n "${INIT_FROM:-}" ] || echo --curriculum 8:100) --block-size 16 \
    --eval-every 100 --save-every 100 --val-batches 2 --val-prompts 8 --log-every 10 \
    --mask-pattern "${MASK_PATTERN:-random}" --ar-distill "${AR_DISTILL:-0}" ${INIT_FROM:+--init-from "$INIT_FROM"} $([ "${COMPILE:-0}" = 1 ] && echo --compile) \
    ${TRAIN_ARGS:-}

# 4. (EVAL=0 skips it)
[ "${EVAL:-1}" = 0 ] || $tt eval quality --model "$out/train/final" --device "${DEVICE:-cuda}" \
    --thresholds 0.5 0.7 0.8 0.9 0.95 --max-new-tokens "${EVAL_TOKENS:-128}" --batch-size 16 --judge none --humaneval-problems 0 \
    --output-dir "$out/eval"
