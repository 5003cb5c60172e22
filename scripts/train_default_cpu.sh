#!/usr/bin/env bash
# The CPU recipe for the default model's LoRA denoiser (work in progress, issue 5).
# Every step is resumable: rerun this script after a stop and it continues where it was.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
tt=.venv/bin/twotower
mkdir -p runs/prompts runs/distill

# 1. offline text (twotower/data/recipe.py), split into paragraphs that serve as prompts
[ -f runs/prompts/offline_paragraphs.jsonl ] || .venv/bin/python - <<'PY'
import json
from twotower.data.recipe import offline_sources
from twotower.data.sources import read_documents
with open("runs/prompts/offline_paragraphs.jsonl", "w") as f:
    for spec in offline_sources():
        for doc in read_documents(spec):
            for para in doc.split("\n\n"):
                if len(para) >= 200:
                    f.write(json.dumps({"text": para}) + "\n")
PY

# 2. self-distillation: the AR model continues the first 48 tokens of every paragraph (greedy)
$tt data distill --prompts runs/prompts/offline_paragraphs.jsonl --prefix-tokens 48 --max-new-tokens 128 \
    --batch-size 16 --out runs/distill/offline_cont.jsonl --dtype bfloat16
[ -d runs/data/distill ] || $tt data prepare runs/distill/offline_cont.jsonl --val-fraction 0.03 --out runs/data/distill \
    --licence "SmolLM2-135M-Instruct (Apache-2.0) continuations of the Rust book (MIT OR Apache-2.0) and Debian Python policy"

# 3. LoRA denoiser, block-size curriculum 4 -> 8 -> 16, checkpoints every 25 steps
$tt train --data runs/data/distill --out-dir runs/lora-r16 --flavour lora --lora-rank 16 --lora-alpha 16 \
    --steps 3000 --lr 5e-4 --warmup-steps 30 --seq-len 256 --batch-size 8 --curriculum 4:150 8:400 \
    --block-size 16 --eval-every 50 --save-every 25 --val-batches 2 --val-prompts 4 --log-every 5 --threads 2 "$@"
