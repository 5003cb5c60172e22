#!/usr/bin/env bash
# The runs behind the README's Results section (CPU, 2 threads); each writes JSON, Markdown and
# (bench speed) a plot. About 1.5 hours on the 2-core build machine. STAGE=N skips stages < N.
set -euo pipefail
cd "$(dirname "$0")/.."
tt=.venv/bin/twotower
out=${1:-bench_results}
stage=${STAGE:-1}
common=(--threads 2 --prompts 8 --max-new-tokens 64 --repeats 2)
# 1. the dial with the shipped denoiser, against our AR and transformers' greedy and prompt-lookup decoding
[ "$stage" -gt 1 ] || $tt bench speed "${common[@]}" --thresholds 0.5 0.7 0.8 0.9 0.95 --block-sizes 16 \
    --batch-sizes 1 --output-dir "$out/speed_trained"
# 2. other block sizes at threshold 0.9
[ "$stage" -gt 2 ] || $tt bench speed "${common[@]}" --modes mask_diffusion --thresholds 0.9 --block-sizes 4 8 32 \
    --batch-sizes 1 --output-dir "$out/speed_blocks"
# 3. the untrained denoiser, for comparison
[ "$stage" -gt 3 ] || $tt bench speed "${common[@]}" --modes mask_diffusion --thresholds 0.9 --block-sizes 16 \
    --batch-sizes 1 --untrained-denoiser --output-dir "$out/speed_untrained"
# 4. batches of 4 requests
[ "$stage" -gt 4 ] || $tt bench speed "${common[@]}" --modes mask_diffusion --thresholds 0.9 --block-sizes 16 \
    --batch-sizes 4 --output-dir "$out/speed_batch4"
# 5. quality: agreement, judge perplexity (Gemma-3-270M), block NLL, HumanEval pass@1 on 10 problems
[ "$stage" -gt 5 ] || $tt eval quality --threads 2 --thresholds 0.7 0.8 0.9 --max-new-tokens 64 --humaneval-problems 10 \
    --humaneval-max-new-tokens 128 --output-dir "$out/quality_trained"
$tt eval quality --threads 2 --thresholds 0.9 --max-new-tokens 64 --humaneval-problems 10 \
    --humaneval-max-new-tokens 128 --untrained-denoiser --output-dir "$out/quality_untrained"
