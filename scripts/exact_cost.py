"""The cost of exact inference on the shipped model: exact time over fused-kernel time for AR, the
verified preset and its fused twin, two chat prompts x 48 tokens, batch 1, 2 threads, interleaved
(exact, then not, in every round; the first round is a warm-up).

Usage: python scripts/exact_cost.py float32|bfloat16
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from twotower.checkpoints.two_tower import load_model
from twotower.generate import decode, resolve_settings
from twotower.generate.prompts import encode_messages

QUESTIONS = ["Explain how a bicycle works.", "Write a short poem about the sea."]
ROUNDS = 3


def main(dtype_name: str) -> None:
    torch.set_num_threads(2)
    loaded = load_model("smollm2-135m", getattr(torch, dtype_name))
    rows = [encode_messages(loaded.tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    preset = resolve_settings(loaded.recommended, max_new_tokens=48, stop_token_ids=())
    strategies = {"ar": resolve_settings(mode="ar", max_new_tokens=48, stop_token_ids=()), "verified": preset,
                  "fused": preset.replace(fused=True)}
    for name, settings in strategies.items():
        ratios = []
        for round_ in range(ROUNDS):
            seconds = {}
            for exact in (True, False):
                loaded.model.context.set_exact(exact)
                start = time.perf_counter()
                for row in rows:
                    decode(loaded.model, [row], settings)
                seconds[exact] = time.perf_counter() - start
            if round_:
                ratios.append(seconds[True] / seconds[False])
        print(f"{dtype_name} {name} exact/fused-kernels time: {' '.join(f'{r:.2f}' for r in ratios)} "
              f"median {statistics.median(ratios):.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "float32")
