"""nn.Linear with oneDNN-prepacked weights for CPU inference.

On CPU, ``F.linear`` on a plain row-major weight is far from memory speed for the shapes of
decoding: measured on 2 cores for SmolLM2's matrices, prepacking cut fp32 time per token
by ~40% for 1 new token and ~3x for a 16-token block (bf16: ~25% and ~2x). The packed copy
is made lazily, rebuilt whenever the weight is replaced, modified in place or cast, and never
used when autograd needs the product (it has no backward), so training is unaffected. oneDNN's
bf16 kernels need avx512bw/vl/dq or avx_ne_convert; on CPUs without them (many AVX2 runners)
bf16 takes the plain path, which works everywhere.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

_PACK_BATCH_HINT = 16  # oneDNN picks the layout for this many rows; good for both 1 and 16


@functools.cache
def packing_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build and this CPU can prepack a weight of ``dtype``."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        # the same check oneDNN's bf16 reorder makes before it raises "bf16 path needs ..."
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(check is not None and check())
    return False


class WeightPacks:
    """oneDNN-packed copies of weight matrices (a Linear's, or one per expert), made lazily and
    rebuilt whenever a weight is replaced, modified in place or cast. The packed product of a
    row does not depend on how many rows share the call (measured: bitwise, fp32, 1 to 64
    rows), which plain ``F.linear`` does not give (its one-row path is another kernel)."""

    def __init__(self) -> None:
        self._packs: dict = {}

    def __getstate__(self) -> dict:
        # opaque oneDNN tensors cannot be copied or pickled; they are a cache, rebuilt on use
        return {}

    def __setstate__(self, state: dict) -> None:
        self._packs = {}

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, name=None,
               packing: bool = True) -> torch.Tensor:
        usable = (
            packing
            and x.device.type == "cpu"
            and x.dtype == weight.dtype
            and packing_available(x.dtype)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        )
        if not usable:
            return F.linear(x, weight, bias)
        key = (weight.data_ptr(), weight._version, weight.dtype)
        entry = self._packs.get(name)
        if entry is None or entry[0] != key:
            entry = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_BATCH_HINT))
            self._packs[name] = entry
        bias = bias.detach() if bias is not None else None
        return torch.ops.mkldnn._linear_pointwise(x, entry[1], bias, "none", [], "")


class Linear(nn.Linear):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.packing = packing_available()  # set False to force plain F.linear
        self.packs = WeightPacks()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.packs.linear(x, self.weight, self.bias, packing=self.packing)
