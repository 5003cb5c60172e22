"""Prompts to token ids. A prompt is token ids, a text (plain, or one user turn through the chat
template), or a conversation: a list of ``{"role", "content"}`` messages (a system prompt and
several turns) rendered with the tokenizer's chat template, with the assistant's header so the
model answers. Also the prompt-set file that ``bench speed`` and ``eval quality`` share."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import DataError, UsageError
from ..files import jsonl_records

PROMPT_SET = Path(__file__).parents[1] / "bench" / "prompts.jsonl"
ROLES = ("system", "user", "assistant", "tool")


def load_prompt_set(path: str | Path = PROMPT_SET, count: int | None = None) -> list[dict]:
    """A prompt set: one JSON object a line with "kind" and "text"; the first ``count`` rows
    (None: all)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such prompt file")
    rows = []
    for number, row in jsonl_records(path):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise DataError(f"{path}:{number}: no \"text\"")
        rows.append(row)
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(rows):
            raise UsageError(f"the prompt count must be between 1 and {len(rows)} for {path}, got {count!r}")
        rows = rows[:count]
    return rows


def check_text(text: str, what: str) -> None:
    """Text a tokenizer can take: a command line's bytes that are not UTF-8 arrive as lone
    surrogates, which no tokenizer encodes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"{what} is not valid UTF-8 text (character {e.start})") from None


def check_messages(messages: Sequence) -> list[dict]:
    """A conversation: a non-empty list of {"role", "content"} messages with text content."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise UsageError("a conversation is a non-empty list of {\"role\", \"content\"} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not {"role", "content"} <= set(m):
            raise UsageError(f"message {i} must be an object with \"role\" and \"content\", got {m!r}")
        if m["role"] not in ROLES:
            raise UsageError(f"message {i}: unknown role {m['role']!r} (choose from {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise UsageError(f"message {i}: content must be text, got {type(m['content']).__name__}")
        check_text(m["content"], f"message {i}")
    if not any(m["content"].strip() for m in messages):
        raise UsageError("the conversation is empty: every message has blank content")
    return [dict(m) for m in messages]


def _needs_template(tokenizer) -> None:
    if tokenizer is None:
        raise UsageError("text prompts need a tokenizer: this model has none (give token ids)")
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("chat: this model's tokenizer has no chat template")


def encode_messages(tokenizer, messages: Sequence) -> list[int]:
    """A conversation through the chat template, ending with the assistant's header."""
    messages = check_messages(messages)
    _needs_template(tokenizer)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(ids["input_ids"])


def encode_prompt(tokenizer, text: str, chat: bool, add_special_tokens: bool = True) -> list[int]:
    """A text prompt: plain, or as one user turn through the chat template."""
    if not isinstance(text, str):
        raise UsageError(f"a text prompt must be a string, got {type(text).__name__}")
    if not text.strip():
        raise UsageError("the prompt is empty")
    check_text(text, "the prompt")
    if chat:
        return encode_messages(tokenizer, [{"role": "user", "content": text}])
    if tokenizer is None:
        raise UsageError("text prompts need a tokenizer: this model has none (give token ids)")
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def _is_conversation(value) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and bool(value) and isinstance(value[0], dict)


def _is_scalar(value) -> bool:
    """A single token id (or a value that prepare_prompts will reject as one): a Python or
    NumPy number, or a 0-d tensor."""
    if isinstance(value, int | float):
        return True
    return getattr(value, "ndim", None) == 0 or (isinstance(value, torch.Tensor) and value.dim() == 0)


def _is_token_ids(value) -> bool:
    if isinstance(value, torch.Tensor) or hasattr(value, "__array__"):
        return True
    return isinstance(value, Sequence) and not isinstance(value, str) and all(_is_scalar(v) for v in value)


def encode_prompts(prompts, tokenizer=None, chat: bool = False) -> list[list[int]] | torch.Tensor | object:
    """What ``decode`` takes, as token ids: a tensor or array (passed on as it is), one prompt
    (token ids, a text, a conversation) or a list of them (a batch of any mix of kinds).
    ``chat`` puts text prompts through the chat template as user turns; conversations always
    are. Token ids are checked later, where the model is known."""
    if isinstance(prompts, str) or _is_conversation(prompts) or _is_token_ids(prompts):
        prompts = [prompts]
    elif not isinstance(prompts, Sequence) or not prompts:
        raise UsageError(f"prompts must be a text, token ids, a conversation or a non-empty list of them, got {prompts!r}")
    if len(prompts) == 1 and (isinstance(prompts[0], torch.Tensor) or hasattr(prompts[0], "__array__")):
        return prompts[0]  # a tensor (1-D or a padded 2-D batch) goes on to prepare_prompts
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(encode_prompt(tokenizer, p, chat))
        elif _is_conversation(p):
            out.append(encode_messages(tokenizer, p))
        else:
            out.append(p)
    return out
