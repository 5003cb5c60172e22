"""Terminal rendering of block denoising (``twotower generate --show-steps``): each block's
positions fill in live, every token coloured by the denoiser step that committed it. Under
verified decoding each draft is a block of one step, and the AR model's own tokens (at a
rejected position, or after a draft it accepted whole) are shown in reverse video."""

from __future__ import annotations

from rich.console import Console
from rich.live import Live
from rich.text import Text

from ..generate.diffusion import StepEvent

PALETTE = ["green", "cyan", "yellow", "magenta", "blue", "bright_green", "bright_cyan", "bright_yellow"]
MASK = "\u2591"  # light shade: a position still masked


class StepDisplay:
    """Feeds on ``step_callback`` and ``callback`` of one row (row 0) of a decoding call."""

    def __init__(self, tokenizer, console: Console | None = None) -> None:
        self.tokenizer = tokenizer
        self.console = console or Console(stderr=False, highlight=False)
        self.done = Text()  # committed text of finished blocks
        self.block_tokens: list[int] = []
        self.block_steps: list[int] = []
        self.accepted_in_block = 0
        self.live = Live(self.done, console=self.console, refresh_per_second=20, transient=False)

    def __enter__(self) -> StepDisplay:
        self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        self.live.update(self.done)
        self.live.stop()

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=True)

    def on_step(self, event: StepEvent) -> None:
        tokens = event.tokens[0].tolist()
        if event.step == 0:  # a new block
            self.block_steps = [-1] * len(tokens)
            self.accepted_in_block = 0
        for j, committed in enumerate(event.committed[0].tolist()):
            if committed:
                self.block_steps[j] = event.step
        self.block_tokens = tokens
        view = self.done.copy()
        for j, tok in enumerate(tokens):
            if tok < 0:
                view.append(MASK, style="dim")
            else:
                view.append(self._piece(tok), style=PALETTE[self.block_steps[j] % len(PALETTE)])
        self.live.update(view)

    def on_token(self, row: int, token: int) -> None:
        if row != 0:
            return
        j = self.accepted_in_block
        self.accepted_in_block += 1
        if j < len(self.block_tokens) and self.block_tokens[j] == token:
            style = PALETTE[self.block_steps[j] % len(PALETTE)]
        else:
            style = "reverse"  # the AR model's token: at a rejected position or after the draft
        self.done.append(self._piece(token), style=style)
        self.live.update(self.done)
