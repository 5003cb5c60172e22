"""Terminal rendering of block denoising (``twotower generate --show-steps``): each block's
positions fill in live, every token coloured by the denoiser step that committed it. Under
verified decoding each draft is a block of one step, and the AR model's own tokens (at a
rejected position, or after a draft it accepted whole) are shown in reverse video."""

from __future__ import annotations

from rich.console import Console
from rich.live import Live
from rich.text import Text

from ..generate.diffusion import StepEvent
from ..generate.trace import AR_TOKEN, RowTrace

PALETTE = ["green", "cyan", "yellow", "magenta", "blue", "bright_green", "bright_cyan", "bright_yellow"]
MASK = "\u2591"  # light shade: a position still masked


class StepDisplay:
    """Feeds on ``step_callback`` and ``callback`` of one row (row 0) of a decoding call."""

    def __init__(self, tokenizer, console: Console | None = None) -> None:
        self.tokenizer = tokenizer
        self.console = console or Console(stderr=False, highlight=False)
        self.done = Text()  # committed text of finished blocks
        self.trace = RowTrace(0)
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
        self.trace.on_step(event)
        view = self.done.copy()
        for tok, step in zip(self.trace.tokens, self.trace.steps):
            if tok < 0:
                view.append(MASK, style="dim")
            else:
                view.append(self._piece(tok), style=PALETTE[step % len(PALETTE)])
        self.live.update(view)

    def on_token(self, row: int, token: int) -> None:
        if row != 0:
            return
        step = self.trace.on_token(token)
        # the AR model's own token (at a rejected position or after the draft) in reverse video
        style = "reverse" if step == AR_TOKEN else PALETTE[step % len(PALETTE)]
        self.done.append(self._piece(token), style=style)
        self.live.update(self.done)
