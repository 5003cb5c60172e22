"""Log-probabilities of the tokens a response carries, in OpenAI's two formats.

They are the AR model's: ``log_softmax`` of the context tower's raw logits (temperature 1, before
top-p), at the position of each token, which is the distribution the lossless strategies follow.
So they are the same whichever of ar, verified or fused produced the tokens (the tokens are the
same, and every one of them was scored by that model). The unverified dial commits the
denoiser's tokens without asking the AR model, so it has none (the request is refused).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

MAX_TOP_CHAT = 20  # OpenAI's limits: top_logprobs on chat, logprobs on completions
MAX_TOP_COMPLETION = 5


@dataclass(frozen=True)
class TokenScore:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the most likely tokens at this position, likeliest first


def score_tokens(tokens: list[int], logits: torch.Tensor, top: int) -> list[TokenScore]:
    """Each token's log-probability under its logits row ((n, V) for n tokens) and the ``top``
    likeliest alternatives there."""
    logprobs = logits[: len(tokens)].float().log_softmax(-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
    if top:
        values, ids = logprobs.topk(top, dim=-1)
        alternatives = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        alternatives = [()] * len(tokens)
    return [TokenScore(t, lp, alt) for t, lp, alt in zip(tokens, chosen, alternatives)]


class TokenText:
    """A token's text and its exact bytes. A byte-level BPE token can hold part of a character
    (its bytes are then not UTF-8 on their own), which ``decode`` would turn into U+FFFD; such a
    token is written as OpenAI does, ``bytes:\\xe6``, and its bytes are given exactly."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._bytes: dict[int, bytes] = {}  # a vocabulary's worth at most
        self.byte_of = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and json.loads(backend.to_str()).get("decoder", {}).get("type") == "ByteLevel":
            self.byte_of = {char: byte for byte, char in bytes_to_unicode().items()}

    def bytes(self, token: int) -> bytes:
        if token not in self._bytes:
            self._bytes[token] = self._read_bytes(token)
        return self._bytes[token]

    def _read_bytes(self, token: int) -> bytes:
        if self.byte_of is not None and token not in self.special:
            piece = self.tokenizer.convert_ids_to_tokens(token)
            if piece is not None and all(c in self.byte_of for c in piece):
                return bytes(self.byte_of[c] for c in piece)
        return self.tokenizer.decode([token]).encode("utf-8")

    def text(self, token: int) -> str:
        raw = self.bytes(token)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def shown(self, score: TokenScore) -> bool:
        """Whether a token is part of the visible answer (a stop token such as EOS is not)."""
        return score.token not in self.special


def chat_logprobs(scores: list[TokenScore], texts: TokenText) -> dict:
    """``choices[i].logprobs`` of a chat completion (or of one chunk's tokens)."""

    def entry(token: int, logprob: float) -> dict:
        return {"token": texts.text(token), "logprob": logprob, "bytes": list(texts.bytes(token))}

    return {"content": [entry(s.token, s.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in s.top]}
                        for s in scores if texts.shown(s)], "refusal": None}


def completion_logprobs(scores: list[TokenScore], texts: TokenText, offset: int = 0) -> tuple[dict, int]:
    """``choices[i].logprobs`` of a (legacy) completion, its text offsets counted from ``offset``
    characters into the answer; returns it and the offset after its tokens."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for s in scores:
        if not texts.shown(s):
            continue
        piece = texts.text(s.token)
        out["tokens"].append(piece)
        out["token_logprobs"].append(s.logprob)
        top: dict[str, float] = {}
        for t, lp in s.top:
            top.setdefault(texts.text(t), lp)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(texts.bytes(s.token).decode("utf-8", errors="ignore"))
    return out, offset
