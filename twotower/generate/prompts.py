"""Text prompts to token ids: one user turn through the tokenizer's chat template (with the
assistant's header, so the model answers), or the plain text."""

from __future__ import annotations


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
