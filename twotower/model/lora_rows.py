"""LoRA deltas on some token rows only, so that one pass of the shared frozen weights serves
both towers of the lora flavour (the fused step, model/fused.py): the context tower's rows take
the base product alone, the denoiser's rows the base product plus their adapters' delta.

Each PEFT LoRA layer of a TwoTower carries ``lora_delta_on_rows`` as a forward hook. Outside
``lora_rows_from`` it does nothing; inside, with the adapters switched off (so PEFT returns
the base product for every row), it adds ``lora_B(lora_A(x)) * scaling`` to the tokens from
the given index on along dim 1, as PEFT's own forward would for those tokens alone.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

_DELTA_FROM: ContextVar[int | None] = ContextVar("lora_delta_from", default=None)
# A compiled pass cannot read a ContextVar, so it reads this module global instead (as a guarded
# constant). It is set only while COMPILED_PASSES is held, and every compiled call takes that lock
# too (model/compiled.py), so no other thread's compiled pass runs while it is set.
_compiled_delta_from: int | None = None
COMPILED_PASSES = threading.RLock()


@contextmanager
def lora_rows_from(start: int) -> Iterator[None]:
    """Inside: every LoRA layer adds its delta to tokens ``start:`` (dim 1) of its input only."""
    global _compiled_delta_from
    with COMPILED_PASSES:
        token = _DELTA_FROM.set(start)
        previous, _compiled_delta_from = _compiled_delta_from, start
        try:
            yield
        finally:
            _DELTA_FROM.reset(token)
            _compiled_delta_from = previous


def lora_delta_on_rows(module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    start = _compiled_delta_from if torch.compiler.is_compiling() else _DELTA_FROM.get()
    if start is None:
        return None
    if not module.disable_adapters:
        raise RuntimeError("a fused pass needs the adapters switched off (the hook adds their delta itself)")
    x = args[0].narrow(1, start, args[0].shape[1] - start)  # (narrow: a compiled pass knows its length)
    rows = output.narrow(1, start, output.shape[1] - start)
    for name in module.active_adapters:
        if name in module.lora_A:
            lora_a, lora_b = module.lora_A[name], module.lora_B[name]
            delta = lora_b(lora_a(module.lora_dropout[name](x.to(lora_a.weight.dtype)))) * module.scaling[name]
            rows = rows + delta
    output.narrow(1, start, output.shape[1] - start).copy_(rows)  # the base product is this call's own
    # tensor: no copy of the other rows
    return output
