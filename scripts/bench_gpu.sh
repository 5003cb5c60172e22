#!/usr/bin/env bash
# GPU numbers for the README's Results: our AR vs mask diffusion with the shipped denoiser (and
# transformers' generate() as the usual baseline) on one GPU, then tokens/NFE and agreement from
# eval quality. Sized for about 7 minutes on one H100 (prompts, tokens and repeats kept small).
# Usage: scripts/bench_gpu.sh [OUT_DIR]; TWOTOWER (default: the twotower command) may be set.
set -euo pipefail
out=${1:-bench_results/gpu}
tt=${TWOTOWER:-twotower}
$tt bench speed --device cuda --prompts 8 --max-new-tokens 64 --repeats 2 --modes mask_diffusion transformers \
    --thresholds 0.5 0.7 0.9 --block-sizes 16 --batch-sizes 1 8 --output-dir "$out/speed"
# every lossless strategy (verified whole-block drafting, two forwards a step, and its fused twin,
# one forward a step): the output is AR's; is it faster than AR where a 16-token forward costs about
# what a 1-token forward does? The cost model in speed.json says what the pass counts predict.
$tt bench speed --device cuda --prompts 8 --max-new-tokens 64 --repeats 2 --modes mask_diffusion fused \
    --block-sizes 4 8 16 --batch-sizes 1 --commit-rule left_prefix --verify --steps-per-block 1 \
    --output-dir "$out/speed_verified"
$tt eval quality --device cuda --thresholds 0.5 0.7 0.8 0.9 --max-new-tokens 128 --batch-size 16 --judge none \
    --humaneval-problems 0 --output-dir "$out/quality"
