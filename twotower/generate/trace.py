"""Where each of a row's final tokens came from: the denoiser step that committed it (or
drafted it, under verification), or the AR model itself (a correction at a rejected position,
or the token after a draft it accepted whole). ``generate --show-steps`` and the server's live
view both draw from this, fed by a decoding call's step and token callbacks."""

from __future__ import annotations

from dataclasses import dataclass, field

from .diffusion import StepEvent

AR_TOKEN = -1  # the origin of a token the AR model gave, not the denoiser


@dataclass
class RowTrace:
    row: int  # the row's id (StepEvent.rows)
    tokens: list[int] = field(default_factory=list)  # the current block's targets, -1 where still masked
    steps: list[int] = field(default_factory=list)  # the step that committed each target, -1 where none yet
    final_in_block: int = 0  # final tokens received since the block began

    def on_step(self, event: StepEvent) -> bool:
        """Take a step; False when this row had nothing in it (finished, or not in the batch)."""
        if event.rows is None:
            at = self.row
        elif self.row in event.rows:
            at = event.rows.index(self.row)
        else:
            return False
        tokens = event.tokens[at].tolist()
        if event.step == 0:  # a new block (verified: a new draft)
            self.steps = [-1] * len(tokens)
            self.final_in_block = 0
        for j, committed in enumerate(event.committed[at].tolist()):
            if committed:
                self.steps[j] = event.step
        self.tokens = tokens
        return any(t >= 0 for t in tokens) or bool(event.committed[at].any())

    def on_token(self, token: int) -> int:
        """A final token's origin: the step that committed it, or AR_TOKEN."""
        j = self.final_in_block
        self.final_in_block += 1
        if j < len(self.tokens) and self.tokens[j] == token:
            return self.steps[j]
        return AR_TOKEN

    def committed_prefix(self) -> list[int]:
        """The block's targets committed from its left end, with no mask before them."""
        out = []
        for tok in self.tokens:
            if tok < 0:
                break
            out.append(tok)
        return out
