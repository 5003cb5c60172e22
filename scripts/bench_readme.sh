#!/usr/bin/env bash
# The runs behind the README's Results section (CPU, 2 threads); each writes JSON, Markdown and
# (bench speed) a plot; scripts/readme_results.py then writes the section from them. About 1.9
# hours on the 2-core build machine; keep the machine otherwise idle, or the timings suffer.
# Usage: scripts/bench_readme.sh [OUT_DIR]; STAGES="1 4" runs only those stages (default: all).
set -euo pipefail
cd "$(dirname "$0")/.."
tt=.venv/bin/twotower
out=${1:-bench_results}
stages=" ${STAGES:-1 2 3 4 5 6 7 8 9 10} "
want() { [[ "$stages" == *" $1 "* ]]; }
common=(--threads 2 --prompts 8 --max-new-tokens 64 --repeats 2)
# The shipped denoiser recommends left_prefix; stages 1-6 pin the released threshold rule, 7-8 left_prefix.
# 1. the dial with the shipped denoiser, against our AR and transformers' greedy and prompt-lookup decoding
if want 1; then $tt bench speed "${common[@]}" --repeats 3 --thresholds 0.5 0.7 0.8 0.9 0.95 --block-sizes 16 \
    --batch-sizes 1 --commit-rule threshold --output-dir "$out/speed_trained"; fi
# 2. other block sizes at threshold 0.9
if want 2; then $tt bench speed "${common[@]}" --modes mask_diffusion --thresholds 0.9 --block-sizes 4 8 32 \
    --batch-sizes 1 --commit-rule threshold --output-dir "$out/speed_blocks"; fi
# 3. the untrained denoiser, for comparison
if want 3; then $tt bench speed "${common[@]}" --modes mask_diffusion --thresholds 0.9 --block-sizes 16 \
    --batch-sizes 1 --untrained-denoiser --output-dir "$out/speed_untrained"; fi
# 4. batches of 4 requests
if want 4; then $tt bench speed "${common[@]}" --modes mask_diffusion --thresholds 0.9 --block-sizes 16 \
    --batch-sizes 4 --commit-rule threshold --output-dir "$out/speed_batch4"; fi
# 5. quality: agreement, judge perplexity (Gemma-3-270M), block NLL, HumanEval pass@1 on 10 problems
if want 5; then $tt eval quality --threads 2 --thresholds 0.7 0.8 0.9 --max-new-tokens 64 --humaneval-problems 10 \
    --humaneval-max-new-tokens 128 --commit-rule threshold --output-dir "$out/quality_trained"; fi
if want 6; then $tt eval quality --threads 2 --thresholds 0.9 --max-new-tokens 64 --humaneval-problems 10 \
    --humaneval-max-new-tokens 128 --untrained-denoiser --output-dir "$out/quality_untrained"; fi
# 7, 8. the left_prefix commit rule (only a contiguous confident prefix is committed), speed and quality
if want 7; then $tt bench speed "${common[@]}" --modes mask_diffusion --thresholds 0.8 0.9 --block-sizes 16 \
    --batch-sizes 1 --commit-rule left_prefix --output-dir "$out/speed_left_prefix"; fi
if want 8; then $tt eval quality --threads 2 --thresholds 0.8 0.9 --max-new-tokens 64 --humaneval-problems 10 \
    --humaneval-max-new-tokens 128 --commit-rule left_prefix --output-dir "$out/quality_left_prefix"; fi
# 9. verified drafting: the denoiser drafts each block in one forward, the context tower keeps the
#    agreeing prefix plus its own next token (output = AR greedy, so no quality stage is needed)
if want 9; then $tt bench speed "${common[@]}" --repeats 3 --modes mask_diffusion --thresholds 0.9 --block-sizes 4 8 16 \
    --batch-sizes 1 4 --commit-rule left_prefix --verify --steps-per-block 1 --output-dir "$out/speed_verified"; fi
# 10. verified drafting with the dial: each denoiser forward drafts the run of targets above the
#     threshold (at least one) and the context tower checks it (output = AR greedy)
if want 10; then $tt bench speed "${common[@]}" --repeats 3 --modes mask_diffusion --thresholds 0.5 0.7 0.9 \
    --block-sizes 16 --batch-sizes 1 --commit-rule left_prefix --verify --output-dir "$out/speed_verified_dial"; fi
