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


class Linear(nn.Linear):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.packing = packing_available()  # set False to force plain F.linear
        self._packed: torch.Tensor | None = None
        self._packed_key: tuple | None = None

    def __getstate__(self) -> dict:
        # the packed copy is an opaque oneDNN tensor that cannot be copied or pickled; it is a
        # cache anyway and is rebuilt on the next forward
        state = self.__dict__.copy()
        state["_packed"] = state["_packed_key"] = None
        return state

    def _packed_weight(self) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype)
        if key != self._packed_key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), _PACK_BATCH_HINT)
            self._packed_key = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        usable = (
            self.packing
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype
            and packing_available(x.dtype)
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        )
        if not usable:
            return F.linear(x, self.weight, self.bias)
        bias = self.bias.detach() if self.bias is not None else None
        return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), bias, "none", [], "")
