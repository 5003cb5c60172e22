"""Text prompts to token ids: one user turn through the tokenizer's chat template (with the
assistant's header, so the model answers), or the plain text. Also the prompt-set file that
`bench speed` and `eval quality` share."""

from __future__ import annotations

from pathlib import Path

from ..data.sources import jsonl_records

PROMPT_SET = Path(__file__).parents[1] / "bench" / "prompts.jsonl"


def load_prompt_set(path: str | Path = PROMPT_SET, count: int | None = None) -> list[dict]:
    """A prompt set: one JSON object a line with "kind" and "text"; the first ``count`` rows
    (None: all)."""
    path = Path(path)
    rows = []
    for number, row in jsonl_records(path):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise ValueError(f"{path}:{number}: no \"text\"")
        rows.append(row)
    if count is not None:
        if not 1 <= count <= len(rows):
            raise ValueError(f"the prompt count must be between 1 and {len(rows)} for {path}, got {count}")
        rows = rows[:count]
    return rows


def encode_prompt(tokenizer, text: str, chat: bool, add_special_tokens: bool = True) -> list[int]:
    if not text.strip():
        raise ValueError("the prompt is empty")
    if tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer: text prompts need one")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat: this model's tokenizer has no chat template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        return list(ids)
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
