"""Weight-only quantization of a frozen backbone: fewer bytes per step for both towers.

- ``int8``: one scale per output channel (symmetric), through PyTorch's packed kernel
  ``aten._weight_int8pack_mm``.
- ``int4``: groups of 32 input channels with a scale and a zero each (asymmetric, min/max),
  through PyTorch's ``aten._weight_int4pack_mm_for_cpu`` (CPU) or ``aten._weight_int4pack_mm``
  (CUDA). The groups are the GGUF's Q4_1 blocks, so a backbone imported from a Q4_1 GGUF
  (the default model) gets its own 4-bit codes back: the quantizer recovers each block's
  minimum and step exactly up to float rounding, and what differs from the dequantized GGUF
  weights is the kernels' bf16 scales (``QuantReport`` measures it).

Every projection (attention, MLP, Mamba in/out) is quantized; the LM head is not: its logits
are what every token is chosen from, and no packed kernel here keeps them. On SmolLM2 the head is
the GGUF's Q8_0 table (8-bit blocks of 32; requantizing it reproduces it exactly) and top-1
agreement with the fp32 head on the held-out text was 94.8% for per-channel int8, 96.8% for Q8_0
rebuilt from two int4 products (bf16 scales), 78.2% for int4, against 99.4% for the fp32 head
taking bf16 activations: the kernels' bf16 scales are what costs (2-core AMD EPYC, torch 2.13). Embeddings, norms, convolutions, MoE experts
and routers keep their dtype. On CPU the kernels take bf16
activations (their fast path on AVX2 and AVX512 alike; their fp32 path is scalar, measured
~18x slower on an AVX2 EPYC), so a quantized Linear computes in bf16 and returns the model's
dtype. Both kernels give a row the same bits whatever its batch mates (tested), so exact
inference and verified decoding keep their guarantees against the same quantized model.

Where a kernel is missing (an old torch, a device without it), the layer keeps its quantized
values and multiplies by them dequantized: the same model, slower, said once in the log.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from .linear import Linear

log = logging.getLogger(__name__)

SCHEMES = ("none", "int8", "int4")
# a drafter's own scheme (load_model's quantize_drafter): one of those, or "fast", a copy of the
# denoiser that drafts for verified decoding alone in int4 and the device's fastest numerics
FAST_DRAFTER = "fast"
DRAFTER_SCHEMES = (*SCHEMES, FAST_DRAFTER)
GROUP = 32  # int4 group size: the GGUF's Q4_0/Q4_1/Q8_0 block
INNER_K_TILES = 2  # the int4 packing's tile parameter (CUDA: 2, 4 or 8; the CPU packing ignores it)
COMPUTE_DTYPE = torch.bfloat16  # the kernels' fast activation dtype on CPU, their only one on CUDA


@dataclass
class QuantReport:
    scheme: str
    layers: int = 0
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    max_abs_error: float = 0.0  # of the values the kernel multiplies by, against the original weights
    kernel: str = ""  # the product used, or the fallback
    abs_error_sum: float = 0.0
    abs_weight_sum: float = 0.0

    @property
    def mean_rel_error(self) -> float:
        """Mean |error| / mean |weight| over all quantized weights."""
        return self.abs_error_sum / max(self.abs_weight_sum, 1e-30)

    def add(self, weight: torch.Tensor, used: torch.Tensor, held_bytes: int) -> None:
        """One more layer: its original weight, the values its product uses, the bytes it holds."""
        error = (used - weight.float()).abs()
        self.layers += 1
        self.weight_bytes_before += weight.numel() * weight.element_size()
        self.weight_bytes_after += held_bytes
        self.max_abs_error = max(self.max_abs_error, float(error.max()))
        self.abs_error_sum += float(error.sum())
        self.abs_weight_sum += float(weight.float().abs().sum())

    def describe(self) -> str:
        return (f"{self.scheme} weights ({self.layers} layers, {self.weight_bytes_before / 2**20:.0f} -> "
                f"{self.weight_bytes_after / 2**20:.0f} MiB, mean relative error {self.mean_rel_error:.2e}, {self.kernel})")


def int8_scales(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) -> one symmetric int8 scale per row (N,), fp32."""
    return (weight.detach().float().abs().amax(1) / 127).clamp_min(1e-12)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> int8 codes (N, K) and one scale per row (N,), symmetric."""
    w = weight.detach().float()
    scales = int8_scales(w)
    codes = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scales


def quantize_int4(weight: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) -> 4-bit codes 0..15 (N, K) int32, and per group of ``group`` columns a step and a
    minimum (N, K / group): w ~ code * step + minimum (Q4_1's form)."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // group, group)
    low, high = w.amin(-1), w.amax(-1)
    steps = ((high - low) / 15).clamp_min(1e-12)
    codes = torch.round((w - low[..., None]) / steps[..., None]).clamp(0, 15).to(torch.int32)
    return codes.reshape(n, k), steps, low


def int4_scales_zeros(steps: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The int4 kernels' (K / group, N, 2) scales and zeros for w = (code - 8) * scale + zero,
    in the compute dtype, from quantize_int4's steps and minima (N, K / group)."""
    return torch.stack([steps, low + 8 * steps], -1).transpose(0, 1).contiguous().to(COMPUTE_DTYPE)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """quantize_int4's codes (N, K) in the int4 kernel's packed layout for their device."""
    if codes.device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INNER_K_TILES)
    packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack(packed, INNER_K_TILES * 4)


def quantized_product(scheme: str, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) in the compute dtype times the quantized weight: (M, N)."""
    if scheme == "int8":
        return torch.ops.aten._weight_int8pack_mm(x, codes, scales)
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, codes, GROUP, scales)
    return torch.ops.aten._weight_int4pack_mm(x, codes, GROUP, scales)


class QuantLinear(nn.Module):
    """A frozen Linear whose weight is held quantized (``int8`` or ``int4``)."""

    def __init__(self, linear: nn.Linear, scheme: str, report: QuantReport) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.scheme = scheme
        self.out_features, self.in_features = weight.shape
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        if scheme == "int8":
            codes, scales = quantize_int8(weight)
            self.register_buffer("scales", scales.to(COMPUTE_DTYPE))
            self.register_buffer("codes", codes)
            used = codes.float() * self.scales.float()[:, None]  # what the kernel multiplies by
        elif scheme == "int4":
            if self.in_features % GROUP:
                raise UsageError(f"int4 needs in_features divisible by {GROUP}, got {self.in_features}")
            codes, steps, low = quantize_int4(weight)
            self.register_buffer("scales", int4_scales_zeros(steps, low))
            self.register_buffer("codes", pack_int4(codes))
            scale, zero = self.scales.float().transpose(0, 1).unbind(-1)  # (N, K / group) each
            used = ((codes.reshape(self.out_features, -1, GROUP).float() - 8) * scale[..., None]
                    + zero[..., None]).reshape(self.out_features, -1)
        else:
            raise UsageError(f"unknown quantization {scheme!r} (choose from {', '.join(SCHEMES)})")
        kernel = _kernel_works(scheme, weight.device.type)
        # the fallback's weights: a buffer, so that a module cast (the fast verify drafter's) casts them too
        self.register_buffer("_dequantized", None if kernel else used.to(weight.dtype), persistent=False)
        report.add(weight, used, sum(b.numel() * b.element_size() for b in self.buffers()))
        if not kernel:
            report.kernel = f"no {scheme} kernel on {weight.device.type}: dequantized weights (same values, no speed-up)"
        elif not report.kernel:
            report.kernel = f"aten {scheme} kernel, {str(COMPUTE_DTYPE).removeprefix('torch.')} activations"

    def _apply(self, fn, recurse: bool = True):
        """A module cast (``.to(dtype)``, as of the fast verify drafter) casts the bias and the
        fallback's weights but never the scales: the kernels take them in COMPUTE_DTYPE only
        (an fp32 drafter on a CPU without bf16 kernels cast them to fp32, and every product
        failed). Device moves apply to everything."""
        super()._apply(fn, recurse)
        if self.scales.dtype != COMPUTE_DTYPE:
            self.scales = self.scales.to(COMPUTE_DTYPE)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dequantized is not None:
            return F.linear(x, self._dequantized, self.bias)
        y = quantized_product(self.scheme, x.reshape(-1, self.in_features).to(COMPUTE_DTYPE), self.codes, self.scales)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.scheme}"


@functools.cache
def _kernel_works(scheme: str, device_type: str) -> bool:
    """Whether this torch build has the scheme's kernel on this device (a tiny product, once)."""
    try:
        x = torch.randn(2, GROUP * 2, device=device_type, dtype=COMPUTE_DTYPE)
        w = torch.randn(16, GROUP * 2, device=device_type)
        if scheme == "int8":
            codes, scales = quantize_int8(w)
            quantized_product(scheme, x, codes, scales.to(COMPUTE_DTYPE))
        else:
            codes, steps, low = quantize_int4(w)
            quantized_product(scheme, x, pack_int4(codes), int4_scales_zeros(steps, low))
        return True
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        log.warning("twotower: no %s kernel on %s in this torch (%s): quantized weights are used dequantized",
                    scheme, device_type, str(e).splitlines()[0][:120])
        return False


def _targets(module: nn.Module):
    """(parent, attribute name, Linear) of every projection to quantize, inside PEFT's LoRA
    wrappers too (their base layer is replaced; the adapters stay as they are)."""
    for child in list(module.modules()):
        for attr, sub in list(child.named_children()):
            if type(sub) is Linear:
                yield child, attr, sub


def quantize_backbone(backbone: nn.Module, scheme: str) -> QuantReport:
    """Replace every projection of ``backbone`` but its LM head by a QuantLinear of ``scheme``
    (``none``: nothing)."""
    if scheme not in SCHEMES:
        raise UsageError(f"unknown quantization {scheme!r} (choose from {', '.join(SCHEMES)})")
    report = QuantReport(scheme)
    if scheme == "none":
        return report
    lm_head = getattr(backbone, "lm_head", None)
    for parent, attr, linear in list(_targets(backbone)):
        if linear is lm_head:
            continue
        if linear.weight.requires_grad:
            raise UsageError("quantization is for frozen weights (inference); this layer is trainable")
        setattr(parent, attr, QuantLinear(linear, scheme, report))
    log.info("twotower: %s", report.describe())
    return report


def dynamic_int8_pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> the quantized engine's packed int8 weight (one scale per row: quantize_int8's
    codes) and those codes as a quantized tensor (``.dequantize()``: the values it multiplies by)."""
    w = weight.detach().float()
    scales = int8_scales(w).double()
    with warnings.catch_warnings():  # quantized tensors are deprecated for new code, not removed
        warnings.simplefilter("ignore", UserWarning)
        codes = torch.quantize_per_channel(w, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(codes, None), codes


def dynamic_int8_product(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x (R, K) fp32 times a dynamic_int8_pack weight: x quantized per call (one scale and zero
    for the whole call: ``dynamic_int8_quantize(x)``), the int8 products summed exactly in
    int32, scaled back to fp32."""
    # reduce_range: 7-bit activations, so that AVX2's pairwise int8 products cannot saturate
    return torch.ops.quantized.linear_dynamic(x, packed, True)


def dynamic_int8_quantize(x: torch.Tensor) -> torch.Tensor:
    """``x`` (R, K) fp32 quantized as dynamic_int8_product quantizes it (a quantized tensor:
    ``.dequantize()`` gives the values the product multiplies by)."""
    return torch.quantize_per_tensor_dynamic(x, torch.quint8, True)


class DynamicInt8Head(nn.Module):
    """An LM head for a drafter alone: int8 weights (one scale per vocabulary row) times the
    activations quantized per call, through the CPU's quantized engine (fbgemm/x86,
    ``quantized::linear_dynamic``). Its cost is nearly flat in rows: on a 2-core AVX2 EPYC,
    SmolLM2's 49152 x 576 head took ~1.0 ms for 1 to 3 rows against ~5.4-5.9 ms for the fp32 one
    (oneDNN, packed), and the fast verify drafter's drafts were accepted as often. The call's
    activations share one scale, so a row's logits depend on its batch mates: only drafts, whose
    numbers never reach a verified output, may use it, never an exact pass."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self._packed, _ = dynamic_int8_pack(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = dynamic_int8_product(x.reshape(-1, self.in_features).float(), self._packed)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 dynamic"


@functools.cache
def dynamic_int8_head_unavailable() -> str | None:
    """Why DynamicInt8Head cannot run on this CPU and torch build, in words; None when it can."""
    if not any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm")):
        return f"torch has no x86/fbgemm quantized engine here ({', '.join(torch.backends.quantized.supported_engines)})"
    try:
        head = DynamicInt8Head(torch.eye(8, 32))
        y = head(torch.arange(32.0).reshape(1, 32) / 32)
    except Exception as e:  # a torch without the deprecated quantized tensors, or a broken engine
        return f"the quantized engine failed: {type(e).__name__}: {e}"
    return None if int(y.argmax()) == 7 else "the quantized engine gave wrong logits"
