"""Compiled decoding passes: ``torch.compile`` of a span of sub-layers, one graph reused by
every span of a backbone (their weights are the graph's inputs, not its constants).

Why spans and not the whole forward: one graph of SmolLM2's 60 sub-layers took ~8 minutes to
compile on 2 cores, a span of 6 ~1.5; and the bookkeeping around the layers (cache lengths,
masks, the checks that read token ids and positions) stays eager, outside the graph, so that
nothing in it reads a tensor's values. What the compiler removes is the per-op dispatch of the
small ops: norms, RoPE, exact attention's ~30 ops, activations, residuals (measured on a 2-core
AVX2 EPYC, int4 SmolLM2, one token after 256: 57 ms eager, 32-39 ms compiled).

Compiled passes are close to exact, not bitwise:
- the products stay the row-invariant kernels, called as opaque ops (``linear.packed_linear``,
  the quantized kernels), and exact attention keeps its fixed-shape reductions; but inductor
  fuses a 1-token step's attention (no mask) otherwise than a masked k-token check, so a row's
  logits can differ between them in the last bits (4e-6 measured on a tiny fp32 model; bitwise
  equal on int4 SmolLM2 over 24 steps). Verified decoding then equals compiled AR except where
  such a difference flips a near tie (the tests see the same tokens);
- the compiler's fused kernels round their elementwise chains and norms otherwise than eager's
  op-by-op ones, so compiled logits differ from eager's too (greedy tokens are the same in the
  tests). Exact inference's guarantee (model/exact.py) is the eager path's.
Prompts (more than ``max_tokens`` tokens per row) run eager, compiled or not: they are one pass
each, and compiling their shapes too would only add variants.
"""

from __future__ import annotations

import functools
import logging
import shutil
from collections.abc import Callable, Iterator

import torch

from ..errors import UsageError
from .lora_rows import COMPILED_PASSES

log = logging.getLogger(__name__)

MAX_TOKENS = 64  # tokens per row of the passes that run compiled: AR steps, drafts, checks, blocks
# sub-layers per compiled call: every call costs ~0.1 ms of guards and wrappers (2-core EPYC), so
# fewer, longer graphs are faster (int4 SmolLM2, step vs eager: 2 sub-layers 0.63x, 6 0.58x, all 60
# 0.57x) but longer to compile (39 s, 79 s, ~8 min)
SPAN = 6
RECOMPILE_LIMIT = 64  # graph variants per function (pass shapes x layer kinds x batch 1 or more)


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot run on ``device`` here, in words; None when it can."""
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python"
    if device.type == "cpu":
        cxx = torch._inductor.config.cpp.cxx[-1] or "g++"
        return None if shutil.which(cxx) else f"no C++ compiler ({cxx}) for inductor's CPU kernels"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "no triton for inductor's GPU kernels"
    return f"no inductor backend for {device.type}"


def spans(layers: int) -> Iterator[slice]:
    """The sub-layers a pass runs together, SPAN at a time: each span one call of a compiled
    function, which takes the span's modules as arguments (a compiled module would be tied to
    its instance)."""
    return (slice(lo, min(lo + SPAN, layers)) for lo in range(0, layers, SPAN))


class LayerCompiler:
    """Runs a function of a span of sub-layers compiled when its pass has at most
    ``max_tokens`` tokens per row and no gradients are recorded, eagerly otherwise. One
    compiled version per function, shared by all spans. If compiling fails, it says so once and
    runs eagerly from then on."""

    def __init__(self, max_tokens: int = MAX_TOKENS) -> None:
        if max_tokens < 1:
            raise UsageError(f"max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self.failed: str | None = None
        self._compiled: dict[Callable, Callable] = {}
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)

    def __call__(self, fn: Callable, tokens: int, *args):
        if self.failed or tokens > self.max_tokens or torch.is_grad_enabled():
            return fn(*args)
        compiled = self._compiled.get(fn)
        if compiled is None:
            compiled = self._compiled[fn] = torch.compile(fn, dynamic=True)
        try:
            # sizes 1 are not special-cased: one graph serves a 1-token step and a k-token check,
            # 1 row and a batch, so that they run the same kernels (closer rows) and
            # compile once (a test model: 29 recompilations otherwise)
            with COMPILED_PASSES, torch.fx.experimental._config.patch(backed_size_oblivious=True):
                return compiled(*args)
        except UsageError:
            raise
        except Exception as e:  # a compiler or toolchain failure: the eager path still works
            self.failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
            log.warning("twotower: compiling the decoding passes failed (%s); running eager from here on", self.failed)
            return fn(*args)

    def __deepcopy__(self, memo: dict) -> LayerCompiler:
        return self  # a copied backbone (a merged denoiser) shares the compiled graphs: weights are inputs

    def describe(self) -> str:
        if self.failed:
            return f"compile failed, eager ({self.failed})"
        return f"compiled passes of <= {self.max_tokens} tokens"


@functools.cache
def _note_unavailable(reason: str) -> None:
    log.warning("twotower: --compile: %s; running eager", reason)


def compiler_for(device: torch.device, max_tokens: int = MAX_TOKENS) -> LayerCompiler | None:
    """A LayerCompiler for a backbone on ``device``, or None (with a one-line note) where
    torch.compile cannot run."""
    reason = compile_unavailable(device)
    if reason:
        _note_unavailable(reason)
        return None
    return LayerCompiler(max_tokens)
