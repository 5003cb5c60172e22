"""The greedy pick of an fp32 LM head, proved instead of computed.

Greedy decoding reads one number per row of the LM head's logits: their argmax (an AR step's
token, a verified check's verdict). SmolLM2's tied 49152 x 576 fp32 head costs 4-5.5 ms for a
row on a 2-core AVX2 EPYC (oneDNN, packed), a fifth of a compiled int4 AR step; an int8 product
through the CPU's quantized engine costs 0.8-1.6 ms, and a bound on its error leaves a handful
of tokens that can still be the argmax. Scoring those exactly proves the pick.

For a row x and a vocabulary row W_r, the full head computes F_r = fl(W_r . x) in fp32, within
eps_r = gamma_K sum_k |W_rk x_k| of the exact l_r = W_r . x whatever its kernel's order of
summation (gamma_K = K u / (1 - K u), u = 2^-24). The engine multiplies int8 codes Q_r (one
scale per row) by x quantized per call, x1, summing exactly in int32; a second product takes the
residual x - x1, quantized in turn, x2. With a = y1 + y2 their sum, Cauchy-Schwarz gives
    |l_r - a_r| <= ||W_r - Q_r|| ||x|| + ||Q_r|| ||x - x1 - x2|| + (the products' float rounding),
and b_r adds eps_r (<= gamma_K ||W_r|| ||x||). A token with a_r + b_r below the largest
a_j - b_j has F_r < F_j, so it is not the argmax. The others (on SmolLM2's held-out text 6 in the
median row, 79 at most) are scored exactly in fp64, L_c; if the best one's L - eps beats every
other one's L + eps, its F is the row's unique maximum: the token torch.argmax of the full head
returns. A row without that proof (a near tie: 5 of 659 rows there; a non-finite state; more
than MAX_CANDIDATES contenders) gets the full head. So the tokens are always the full head's;
only the time differs: on that EPYC, one row took 5.3-5.6 ms with the full head against 2.5-3.3
ms proved (caches hot or flushed), three rows 5.2 against 2.8-3.8 ms, eight rows about even.

It needs fp32 weights and states, a CPU with the x86/fbgemm quantized engine whose products pass
an exactness check on the head itself (``certifier_for``), and fp32 products at full precision
(with bf16 products allowed, eps does not hold). Elsewhere the full head runs, as before.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable

import torch

from .quant import dynamic_int8_head_unavailable, dynamic_int8_pack, dynamic_int8_product, dynamic_int8_quantize

log = logging.getLogger(__name__)

MAX_CANDIDATES = 256  # contenders scored exactly per row; a row with more gets the full head
MIN_HEAD_PARAMS = 1 << 22  # below this a full head costs less than the proof (Backbone.certify_argmax=None)
_U = 2.0**-24
_PRODUCT_ROUNDING = 2.0**-18  # of the largest |y|: the engine's float rounding is a few u of |y_r|
SLACK = 1.05  # on every bound: covers the fp32 rounding of computing the bounds themselves


class CertifiedArgmax:
    """``full_head(x).argmax(-1)`` for rows x (R, K) fp32 of a fp32 head ``weight`` (V, K),
    proved from two int8 products where it can be (see the module's text). ``proved`` and
    ``unproved`` count rows of either kind."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.detach()
        self.packed, codes = dynamic_int8_pack(self.weight)
        values = codes.dequantize()
        k = self.weight.shape[1]
        self.gamma = k * _U / (1 - k * _U)
        # b = [||x||, ||x - x1 - x2||, rounding] @ coefficients: one small product per call (fp32
        # norms: their rounding, ~K u relative, is inside SLACK)
        self.coefficients = torch.stack([
            (self.weight - values).norm(dim=1) + self.gamma * self.weight.norm(dim=1),
            values.norm(dim=1),
            torch.ones(len(values)),
        ])
        self.largest_code_norm = float(self.coefficients[1].max())
        self.inexact = self._check_products(values)
        self.proved = 0
        self.unproved = 0

    def _check_products(self, values: torch.Tensor) -> str | None:
        """Why the engine's products cannot be trusted for this head, in words (a product off
        the exact sum of its quantized values, as AVX2's saturating int8 pairs would be);
        None when they can. Checked on a random row and on one built to make row 0's sum large."""
        x = torch.randn(2, self.weight.shape[1], generator=torch.Generator().manual_seed(0))
        x[0, 0] = 40.0  # an outlier, as final hidden states have
        x[1] = self.weight[0].sign() * 3
        y = dynamic_int8_product(x, self.packed).double()
        quantized = dynamic_int8_quantize(x).dequantize().double()
        exact = torch.cat([quantized @ part.double().T for part in values.split(8192)], 1)
        error = float((y - exact).abs().max())
        if not error <= _PRODUCT_ROUNDING * float(exact.abs().max()):
            return f"the quantized engine's int8 products are off their exact sums by {error:.3g}"
        return None

    @torch.no_grad()  # tokens carry no gradient
    def __call__(self, x: torch.Tensor, full_head: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """x (R, K) fp32 -> (R,) int64: the argmax of ``full_head(x)``, which runs only for the
        rows whose pick could not be proved (its rows are the same alone as among others)."""
        finite = x.isfinite().all(1)
        if not bool(finite.all()):  # such a row would spoil the call's shared quantization
            picks = full_head(x).argmax(-1)  # (every row's are the same alone as among others)
            self.unproved += int((~finite).sum())
            if bool(finite.any()):
                picks[finite] = self(x[finite], full_head)
            return picks
        x = x.contiguous()
        approx, left, residual = self._products(x)
        norm = x.norm(dim=1)
        # the products' rounding, relative to |y1|, |y2| <= max ||Q_r|| (||x1||, ||x2||)
        rounding = _PRODUCT_ROUNDING * self.largest_code_norm * (norm + 2 * residual + left)
        bound = (SLACK * torch.stack([norm, left, rounding], 1)) @ self.coefficients
        contenders = (approx + bound) >= (approx - bound).amax(1, keepdim=True)
        picks = torch.empty(len(x), dtype=torch.long, device=x.device)
        unproved = []
        exact_x = x.double()
        for row in range(len(x)):
            pick = self._prove(exact_x[row], contenders[row].nonzero()[:, 0])
            if pick is None:
                unproved.append(row)
            else:
                picks[row] = pick
        if unproved:
            picks[unproved] = full_head(x[unproved]).argmax(-1)
        self.proved += len(x) - len(unproved)
        self.unproved += len(unproved)
        return picks

    def _products(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sum of the int8 products of x (R, K) and of its residual x - x1 (R, V), and per
        row a bound on the norm of what neither product saw, ||x - x1 - x2|| (with the rounding
        of computing the residual), and the residual's norm.

        One call serves both where it can: the residual times 2^m stays inside x's range, so the
        call's shared quantization is x's own, and reading the head once instead of twice saves
        ~1 ms a step (49152 x 576, 2-core AVX2 EPYC, cold caches: 3.9 -> 2.8 ms a row)."""
        rows = len(x)
        own = dynamic_int8_quantize(x)
        residual = x - own.dequantize()
        largest = float(residual.abs().max())
        room = min(-float(x.min()), float(x.max()))  # x's range about 0, the narrower side
        joint = None
        if largest > 0 and room > 0:
            scale = 2.0 ** max(0, math.floor(math.log2(room / largest)))  # exact: a power of two
            stacked = torch.cat([x, residual * scale])
            joint = dynamic_int8_quantize(stacked)
            if (joint.q_scale(), joint.q_zero_point()) != (own.q_scale(), own.q_zero_point()):
                joint = None  # (a zero point nudged otherwise: two calls)
        if joint is not None:
            y = dynamic_int8_product(stacked, self.packed)
            y1, y2 = y[:rows], y[rows:] * (1 / scale)
            seen = joint.dequantize()[rows:] * (1 / scale)
        else:
            y1 = dynamic_int8_product(x, self.packed)
            y2 = dynamic_int8_product(residual, self.packed)
            seen = dynamic_int8_quantize(residual).dequantize()
        # what neither product saw, with the rounding of computing the residual
        residual_norm = residual.norm(dim=1)
        return y1 + y2, (residual - seen).norm(dim=1) + 4 * _U * residual_norm, residual_norm

    def _prove(self, x: torch.Tensor, candidates: torch.Tensor) -> int | None:
        """The candidate whose full-head logit is provably the row's unique maximum, or None."""
        if not 0 < len(candidates) <= MAX_CANDIDATES:
            return None
        products = self.weight[candidates].double() * x
        exact = products.sum(1)
        eps = SLACK * self.gamma * products.abs().sum(1)
        best = int(exact.argmax())
        rivals = exact + eps
        rivals[best] = float("-inf")
        return int(candidates[best]) if bool(exact[best] - eps[best] > rivals.max()) else None


def full_precision_products() -> bool:
    """Whether fp32 matrix products run in fp32 here (not bf16 or tf32, which eps does not cover)."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    mkldnn = getattr(torch.backends.mkldnn, "matmul", None)
    return getattr(mkldnn, "fp32_precision", "none") in ("none", "ieee")


# one certifier per head weight, keyed on the tensor (weakly) and rebuilt when it changes
_CERTIFIERS: dict[int, tuple[weakref.ref, tuple, CertifiedArgmax | None]] = {}
_SAID: set[str] = set()  # "why not" said already (once a process: a second head would repeat it)


def certifier_for(weight: torch.Tensor) -> CertifiedArgmax | None:
    """The CertifiedArgmax of a fp32 CPU head ``weight``, or None (with a one-line note, once)
    where its proof cannot run here."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or not full_precision_products():
        return None
    key = (weight.data_ptr(), weight._version, tuple(weight.shape))
    entry = _CERTIFIERS.get(id(weight))
    if entry is not None and entry[0]() is weight and entry[1] == key:
        return entry[2]
    if entry is None or entry[0]() is not weight:
        weakref.finalize(weight, _CERTIFIERS.pop, id(weight), None)
    why_not = dynamic_int8_head_unavailable()
    certifier = CertifiedArgmax(weight) if why_not is None else None
    if certifier is not None and certifier.inexact is not None:
        why_not, certifier = certifier.inexact, None
    if why_not is not None and not _SAID:
        _SAID.add(why_not)
        log.info("twotower: greedy picks take the full LM head (%s)", why_not)
    _CERTIFIERS[id(weight)] = (weakref.ref(weight), key, certifier)
    return certifier
