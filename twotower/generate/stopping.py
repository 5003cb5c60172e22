"""When each row of a decoding call ends, decided per row as its tokens become final: at a stop
token (kept, as the model had to produce it), at the token that completes a stop string (kept;
the row's text is cut before the string), or at ``max_new_tokens``.

Every decoding loop feeds its newly final tokens through ``Stopper.extend``, so a stop string is
found wherever it falls: inside a block, or across the boundary of two blocks or drafts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import UsageError

STOP = "stop"  # finish reasons, as OpenAI-style APIs name them
LENGTH = "length"
CANCELLED = "cancelled"  # ended from outside (a server's client left, a deadline passed)

ShouldStop = Callable[[int], str | None]  # (row) -> a finish reason to end the row now, or None


def check_stop_strings(value) -> tuple[str, ...]:
    """Stop strings as a tuple: one string or a list of non-empty strings."""
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence) or any(not isinstance(s, str) or not s for s in value):
        raise UsageError(f"stop strings must be non-empty strings, got {value!r}")
    return tuple(value)


def row_stop_strings(value, batch: int) -> list[tuple[str, ...]]:
    """Stop strings per row: one set for every row (a string or a list of strings), or a list
    of ``batch`` such sets (rows of one call that came from different requests)."""
    if isinstance(value, str) or (isinstance(value, Sequence) and all(isinstance(s, str) for s in value)):
        return [check_stop_strings(value)] * batch
    if not isinstance(value, Sequence) or len(value) != batch:
        raise UsageError(f"stop strings must be strings, or one list of them per row ({batch} rows), got {value!r}")
    return [check_stop_strings(v) for v in value]


def row_limits(max_new_tokens, batch: int) -> list[int]:
    """``max_new_tokens`` per row: one positive integer for every row, or a list of ``batch``."""
    values = max_new_tokens if isinstance(max_new_tokens, Sequence) else [max_new_tokens] * batch
    if len(values) != batch:
        raise UsageError(f"max_new_tokens: {len(values)} values for {batch} rows")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise UsageError(f"max_new_tokens must be a positive integer, got {v!r}")
    return list(values)


class Stopper:
    """Every row's final tokens and, once it has ended, why. ``max_new_tokens`` and
    ``stop_strings`` may differ per row (see ``row_limits``, ``row_stop_strings``);
    ``should_stop`` may end a row from outside, read whenever a loop asks which rows go on."""

    def __init__(self, batch: int, max_new_tokens: int | Sequence[int], stop_ids: set[int],
                 stop_strings: Sequence[str] | Sequence[Sequence[str]] = (), tokenizer=None,
                 should_stop: ShouldStop | None = None) -> None:
        self.stop_strings = row_stop_strings(stop_strings, batch)
        if any(self.stop_strings) and tokenizer is None:
            raise UsageError("stop strings need a tokenizer to read the text")
        self.max_new_tokens = row_limits(max_new_tokens, batch)
        self.stop_ids = stop_ids
        self.tokenizer = tokenizer
        self.should_stop = should_stop
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.reasons: list[str | None] = [None] * batch  # set when the row has finished

    def add(self, max_new_tokens: Sequence[int], stop_strings: Sequence[Sequence[str]]) -> list[int]:
        """Rows that join (a server's batch): their ids, after every row so far."""
        first = len(self.tokens)
        strings = row_stop_strings(list(stop_strings), len(max_new_tokens))
        if any(strings) and self.tokenizer is None:
            raise UsageError("stop strings need a tokenizer to read the text")
        self.max_new_tokens += row_limits(list(max_new_tokens), len(max_new_tokens))
        self.stop_strings += strings
        self.tokens += [[] for _ in max_new_tokens]
        self.reasons += [None] * len(max_new_tokens)
        return list(range(first, len(self.tokens)))

    def _poll(self) -> None:
        if self.should_stop is not None:
            for row, reason in enumerate(self.reasons):
                if reason is None:
                    self.reasons[row] = self.should_stop(row)

    @property
    def finished(self) -> list[bool]:
        self._poll()
        return [r is not None for r in self.reasons]

    @property
    def all_finished(self) -> bool:
        self._poll()
        return all(r is not None for r in self.reasons)

    def extend(self, row: int, new: Sequence[int]) -> list[int]:
        """Take a row's newly final tokens; return those kept (nothing after the row ends)."""
        kept = []
        for tok in new:
            if self.reasons[row] is not None:
                break
            self.tokens[row].append(tok)
            kept.append(tok)
            if tok in self.stop_ids or (self.stop_strings[row] and self._stop_string_at(row) is not None):
                self.reasons[row] = STOP
            elif len(self.tokens[row]) >= self.max_new_tokens[row]:
                self.reasons[row] = LENGTH
        return kept

    def _stop_string_at(self, row: int) -> int | None:
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        return stop_string_at(text, self.stop_strings[row])


def stop_string_at(text: str, stop_strings: Sequence[str]) -> int | None:
    """Where the first stop string starts in ``text``, if one occurs."""
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(hits) if hits else None


def visible_text(tokenizer, tokens: Sequence[int], stop_strings: Sequence[str] = ()) -> str:
    """A row's text as a user sees it: special tokens skipped, cut before a stop string."""
    text = tokenizer.decode(list(tokens), skip_special_tokens=True)
    cut = stop_string_at(text, stop_strings) if stop_strings else None
    return text if cut is None else text[:cut]


class TextStream:
    """One row's text as its tokens arrive, for streaming: each ``push`` returns the new text
    that is final. Text is held back while it ends in an incomplete multi-byte character or in
    what may be the start of a stop string (a stop string can span tokens, blocks and drafts);
    after a stop string nothing more is returned, and the string itself never is."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.tokens: list[int] = []
        self.sent = 0  # characters returned so far
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = stop_string_at(text, self.stop_strings) if self.stop_strings else None
        if cut is not None:
            self.stopped = True
            return self._upto(text, cut)
        end = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 sequence decodes to U+FFFD
        return self._upto(text, end - self._held(text[:end]))

    def finish(self) -> str:
        """What is left once the row has ended."""
        if self.stopped:
            return ""
        self.stopped = True
        return self._upto(self.tokenizer.decode(self.tokens, skip_special_tokens=True), None)

    def _held(self, text: str) -> int:
        """Length of the longest end of ``text`` that a stop string starts with."""
        return max((n for s in self.stop_strings for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)

    def _upto(self, text: str, end: int | None) -> str:
        new = text[self.sent : end]
        self.sent += len(new)
        return new
