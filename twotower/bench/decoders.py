"""The contenders of ``bench speed`` behind one interface: a decoder takes a batch of prompts
(token ids) and returns the generated tokens that count, with its forward passes where the
engine reports them. Ours, transformers ``generate()`` (plain or with prompt-lookup drafts) and
llama.cpp on the same GGUF."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..generate import DecodingSettings, decode, prepare_prompts


@dataclass
class Decoded:
    tokens: list[list[int]]  # per row, counted tokens only
    nfe: int | None  # forward passes of the call; None where the engine does not tell
    # ours: every forward after the prompt pass, by its shape (stats.forward_shapes)
    forward_shapes: dict[str, int] | None = None


Decoder = Callable[[list[list[int]]], Decoded]


def counted(tokens: Sequence[int], eos: set[int]) -> list[int]:
    """The generated tokens that count: up to and including the first EOS, nothing after it."""
    out = []
    for tok in tokens:
        out.append(int(tok))
        if tok in eos:
            break
    return out


def ours(model, settings: DecodingSettings, eos: set[int]) -> Decoder:
    """Our decoding with ``settings`` through the one entry point, with its own NFE count."""

    def run(batch: list[list[int]]) -> Decoded:
        out = decode(model, batch, settings)
        return Decoded([counted(row, eos) for row in out.tokens], out.stats.nfe, dict(out.stats.forward_shapes))

    return run


class ForwardCounter:
    """Counts a module's forward calls (transformers does not report its NFE)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.count = 0
        module.register_forward_hook(self._hook)

    def _hook(self, *_) -> None:
        self.count += 1


def transformers_decoder(
    hf, forwards: ForwardCounter, eos: set[int], pad: int, max_new_tokens: int, lookup: int | None = None
) -> Decoder:
    """transformers ``generate()``, greedy with its KV cache; ``lookup`` turns on prompt-lookup
    decoding (n-gram drafts from the prompt, verified by the model in one forward)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(eos),
                              pad_token_id=pad, prompt_lookup_num_tokens=lookup)

    def decode(batch: list[list[int]]) -> Decoded:
        p = prepare_prompts(batch, pad_token_id=pad)
        mask = p.attention_mask if p.attention_mask is not None else torch.ones_like(p.input_ids, dtype=torch.bool)
        before = forwards.count
        with torch.inference_mode():
            out = hf.generate(p.input_ids.to(hf.device), attention_mask=mask.long().to(hf.device),
                              generation_config=config)
        width = p.input_ids.shape[1]
        return Decoded([counted(row[width:].tolist(), eos) for row in out], forwards.count - before)

    return decode


def llama_cpp_decoder(gguf: Path, eos: set[int], max_new_tokens: int, n_ctx: int) -> Decoder:
    """llama.cpp on the same GGUF. Its Python API decodes one sequence at a time, so it only
    runs at batch size 1; it does not report forward passes."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=torch.get_num_threads(), verbose=False)

    def decode(batch: list[list[int]]) -> Decoded:
        rows = []
        for prompt in batch:
            row = []
            for tok in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                row.append(int(tok))
                if tok in eos or len(row) >= max_new_tokens:
                    break
            rows.append(row)
        return Decoded(rows, None)

    return decode
