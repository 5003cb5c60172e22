#!/usr/bin/env bash
# Issue 5's figures on chat requests that no recipe distils: requests 90000-90023 of twotower's
# built-in list (`chat_instructions(100000)`; the recipes answer the first ones), 64 new tokens,
# blocks of 16 unless said otherwise:
#   left_prefix/      unverified mask diffusion, left_prefix rule, thresholds 0.7 and 0.9, with the judge
#   verified_dial/    verified drafts of the confident run from the left, thresholds 0.7 and 0.9
#   verified_drafts/  verified whole-block drafts (one step per block), blocks of 4 and 16
# Usage: scripts/eval_heldout.sh MODEL OUT_DIR [more `eval quality` options, e.g. --untrained-denoiser]
# TWOTOWER (default: the twotower command) and PYTHON (default: python3) may be set.
set -euo pipefail
model=$1
out=$2
shift 2
tt=${TWOTOWER:-twotower}
mkdir -p "$out"
[ -f "$out/prompts.jsonl" ] || "${PYTHON:-python3}" - "$out/prompts.jsonl" <<'PY'
import json, sys
from twotower.data.instructions import chat_instructions
with open(sys.argv[1], "w") as f:
    for kind, text in chat_instructions(100000, seed=0)[90000:90024]:
        f.write(json.dumps({"kind": kind, "text": text}) + "\n")
PY
common=(--model "$model" --prompts-file "$out/prompts.jsonl" --max-new-tokens 64 --batch-size 8
        --humaneval-problems 0 --commit-rule left_prefix "$@")
$tt eval quality "${common[@]}" --thresholds 0.7 0.9 --block-sizes 16 --output-dir "$out/left_prefix"
$tt eval quality "${common[@]}" --judge none --verify --thresholds 0.7 0.9 --block-sizes 16 \
    --output-dir "$out/verified_dial"
$tt eval quality "${common[@]}" --judge none --verify --steps-per-block 1 --thresholds 0.9 --block-sizes 4 16 \
    --output-dir "$out/verified_drafts"
