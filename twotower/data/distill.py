"""Self-distillation: continuations and chat answers written by the frozen AR backbone itself.
A denoiser that must agree with its AR model learns fastest from that model's own greedy
text, which is far more predictable than human text.

Output is JSONL, appended one finished batch at a time; a rerun resumes after the last
complete line (a line cut by a kill is dropped and redone)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from ..errors import DataError, UsageError
from ..generate import DecodingSettings, decode
from ..generate.prompts import encode_prompt


def _resume_point(path: Path, chat: bool) -> int:
    """Number of complete records in ``path``, dropping a last line cut by a kill. A file that
    holds anything but this command's records is refused: appending to it (or cutting its last
    line) would change a file this command did not write."""
    if not path.exists():
        return 0
    if not path.is_file():
        raise UsageError(f"--out {path} is not a file")
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    key = "messages" if chat else "text"
    for number, line in enumerate(data[:end].split(b"\n")[:-1], 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or key not in record:
            raise DataError(f"{path}:{number}: not a {'chat' if chat else 'text'} record of `twotower data distill`; "
                            "refusing to append to a file it did not write (give a new --out)")
    if end < len(data):  # the last line has no newline: a record cut by a kill, dropped and redone
        with open(path, "r+b") as f:
            f.truncate(end)
    return data[:end].count(b"\n")


def distill(
    backbone,
    tokenizer,
    prompts: Sequence[str],
    out_path: str | Path,
    chat: bool = False,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    temperature: float = 0.0,
    seed: int = 0,
    time_budget_s: float | None = None,
) -> int:
    """Generate a completion for every prompt not yet in ``out_path``; returns how many were
    written by this call. Chat records hold ``messages`` (render with the chat template);
    plain records hold ``text`` = prompt + continuation. With ``time_budget_s`` no new batch
    starts after that many seconds (a rerun goes on where this one stopped)."""
    for name, value, low in (("batch_size", batch_size, 1), ("max_new_tokens", max_new_tokens, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")
    if not prompts:
        raise DataError("no prompts to distill")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = _resume_point(out, chat)
    if start > len(prompts):
        raise DataError(f"{out} holds {start} records but there are only {len(prompts)} prompts: another prompt set?")
    written = 0
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    with open(out, "a", encoding="utf-8") as f, tqdm(total=len(prompts), initial=start, desc="distill") as bar:
        for first in range(start, len(prompts), batch_size):
            if deadline is not None and time.monotonic() > deadline:
                break
            batch = list(prompts[first : first + batch_size])
            ids = [encode_prompt(tokenizer, p, chat, add_special_tokens=False) for p in batch]
            # one seed per batch position: a resumed run draws exactly what the killed one would have
            settings = DecodingSettings(mode="ar", max_new_tokens=max_new_tokens, temperature=temperature,
                                        seed=seed + first)
            out_tokens = decode(backbone, ids, settings).tokens
            for prompt, tokens in zip(batch, out_tokens):
                completion = tokenizer.decode(tokens, skip_special_tokens=True)
                if chat:
                    record = {"messages": [{"role": "user", "content": prompt},
                                           {"role": "assistant", "content": completion}]}
                else:
                    record = {"text": prompt + completion}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            written += len(batch)
            bar.update(len(batch))
    return written
