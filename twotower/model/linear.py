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

import weakref

import torch
import torch.nn.functional as F
from torch import nn

_PACK_BATCH_HINT = 16  # oneDNN picks the layout for this many rows; good for both 1 and 16


_AVAILABLE: dict[torch.dtype, bool] = {}  # a plain dict, which a compiled graph reads as a constant


def packing_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build and this CPU can prepack a weight of ``dtype``."""
    if dtype not in _AVAILABLE:
        _AVAILABLE[dtype] = _can_pack(dtype)
    return _AVAILABLE[dtype]


def _can_pack(dtype: torch.dtype) -> bool:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        # the same check oneDNN's bf16 reorder makes before it raises "bf16 path needs ..."
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(check is not None and check())
    return False


def _packable(x: torch.Tensor, weight: torch.Tensor, packing: bool = True) -> bool:
    """Whether the packed product serves x @ weight.T: on the CPU, in a dtype oneDNN packs here,
    and not where autograd needs the product (the packed one has no backward)."""
    return (packing and x.device.type == "cpu" and x.dtype == weight.dtype and packing_available(x.dtype)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def _packed_product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, exact: bool = True) -> torch.Tensor:
    """x @ W.T + bias through W's packed copy. Exact inference needs a row's product to be the
    same alone as among others, and on some CPUs oneDNN takes another kernel for one row than
    for several (measured, torch 2.13, AVX512-BF16 EPYC: every one of 64 rows differed in the
    last bits for a 1536 -> 576 product in fp32, 4 of 64 in bf16; two or more rows gave a row the
    same bits wherever it sat). There a lone row goes with a zero row for company, which costs
    ~35-70 us a product (the pad and the two-row kernel; ~5 ms per fp32 SmolLM2 step on a 2-core
    EPYC). Where ``lone_row_is_exact`` finds that the one-row kernel gives the bits of the
    several-row one for this shape (the same 2-core EPYC with AVX2 only: every shape of
    SmolLM2), the row goes alone. ``exact=False`` (``--no-exact``) never pairs."""
    if not exact or x.numel() != x.shape[-1] or lone_row_is_exact(packed, x.dtype, bias is not None):
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    pair = F.pad(x.reshape(1, -1), (0, 0, 0, 1))
    return torch.ops.mkldnn._linear_pointwise(pair, packed, bias, "none", [], "")[:1].view(*x.shape[:-1], -1)


PROBE_ROWS = 16  # rows of the probe's several-row product (the packing's batch hint)
# (dtype, weight shape, bias, threads) -> whether a lone row's product has its bits among others
_LONE_ROW_EXACT: dict[tuple, bool] = {}


def lone_row_is_exact(packed: torch.Tensor, dtype: torch.dtype, bias: bool) -> bool:
    """Whether one row's product through the packed weight ``packed`` (N, K) is bitwise its
    product among PROBE_ROWS rows, for this CPU, dtype, shape and thread count: probed once per
    such key on random rows and the weight itself (where the kernels differ, they differ on
    nearly every row: another order of the sums)."""
    key = (dtype, tuple(packed.shape), bias, torch.get_num_threads())
    known = _LONE_ROW_EXACT.get(key)
    if known is None:
        n, inner = packed.shape
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(PROBE_ROWS, inner, generator=gen).to(dtype)
        b = torch.randn(n, generator=gen).to(dtype) if bias else None
        many = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        known = all(torch.equal(torch.ops.mkldnn._linear_pointwise(x[i : i + 1], packed, b, "none", [], ""), many[i : i + 1])
                    for i in range(0, PROBE_ROWS, 3))
        _LONE_ROW_EXACT[key] = known
    return known


class WeightPacks:
    """oneDNN-packed copies of weight matrices (a Linear's, or one per expert), made lazily and
    rebuilt whenever a weight is replaced, modified in place or cast. The packed product of a
    row does not depend on how many rows share the call (measured: bitwise, fp32 and bf16, 1 to
    64 rows, a lone row paired with a zero row: ``_packed_product``), which plain ``F.linear``
    does not give (its one-row path is another kernel)."""

    def __init__(self) -> None:
        self._packs: dict = {}

    def __getstate__(self) -> dict:
        # opaque oneDNN tensors cannot be copied or pickled; they are a cache, rebuilt on use
        return {}

    def __setstate__(self, state: dict) -> None:
        self._packs = {}

    @torch.compiler.disable  # a compiled graph runs it as it is (keyed by name, not by tensor)
    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, name=None,
               packing: bool = True) -> torch.Tensor:
        if not _packable(x, weight, packing):
            return F.linear(x, weight, bias)
        key = (weight.data_ptr(), weight._version, weight.dtype)
        entry = self._packs.get(name)
        if entry is None or entry[0] != key:
            entry = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_BATCH_HINT))
            self._packs[name] = entry
        bias = bias.detach() if bias is not None else None
        return _packed_product(x, entry[1], bias)


# The packed copies of Linear weights, keyed on the weight tensor itself (its id, checked
# through a weak reference and dropped with the weight): a compiled graph gets every layer's
# weight as an input and so finds that layer's copy without a per-layer constant.
_PACKED: dict[int, tuple[weakref.ref, tuple, torch.Tensor]] = {}


def _pack_of(weight: torch.Tensor) -> torch.Tensor:
    key = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))
    entry = _PACKED.get(id(weight))
    if entry is None or entry[0]() is not weight or entry[1] != key:
        if entry is None or entry[0]() is not weight:
            weakref.finalize(weight, _PACKED.pop, id(weight), None)
        entry = (weakref.ref(weight), key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_BATCH_HINT))
        _PACKED[id(weight)] = entry
    return entry[2]


def packed_bytes(module: nn.Module) -> int:
    """The bytes of the packed copies held for ``module``'s Linears and MoE experts."""
    held = [_PACKED[id(p)][2] for p in module.parameters() if id(p) in _PACKED and _PACKED[id(p)][0]() is p]
    held += [entry[1] for m in module.modules() if isinstance(getattr(m, "packs", None), WeightPacks)
             for entry in m.packs._packs.values()]
    return sum(t.numel() * t.element_size() for t in held)


@torch.library.custom_op("twotower::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, exact: bool) -> torch.Tensor:
    """x @ weight.T + bias through the weight's packed copy: one opaque op, so that a compiled
    graph calls the row-invariant oneDNN product rather than the compiler's own."""
    return _packed_product(x, _pack_of(weight), bias, exact)


@packed_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, exact: bool) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.packing = packing_available()  # set False to force plain F.linear
        self.exact = True  # a lone row's product the same as among others (Backbone.set_exact)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if not _packable(x, weight, self.packing):
            return F.linear(x, weight, bias)
        bias = bias.detach() if bias is not None else None
        if torch.compiler.is_compiling():
            return packed_linear(x, weight, bias, self.exact)
        return _packed_product(x, _pack_of(weight), bias, self.exact)
