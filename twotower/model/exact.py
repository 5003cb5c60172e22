"""Inference that is exact: a row's numbers are bitwise the same whatever its batch mates and
however many tokens share its pass (one for AR, k + 1 for a verification, a block for the
denoiser), in fp32 and bf16. What breaks that in plain PyTorch on a CPU, measured on torch
2.13: SDPA's kernels (their reductions depend on the query and key counts), ``F.linear``'s
one-row path (another kernel than for several rows; the oneDNN-packed product in
``linear.WeightPacks`` does not vary), and the vectorised sigmoid, SiLU, softplus, GELU and pow,
whose values depend on an element's place in the tensor (exp, log1p, tanh, rsqrt do not). Here
those are built from operations that do not vary: exp and correctly rounded arithmetic, and
reductions whose size and order are fixed.

Each function takes the fast, non-exact PyTorch path when autograd records (training), where
bitwise invariance buys nothing and the fused kernels save memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) if torch.is_grad_enabled() else x / (1 + torch.exp(-x))


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x) if torch.is_grad_enabled() else 1 / (1 + torch.exp(-x))


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(x)), and x itself above 20 (as F.softplus)."""
    if torch.is_grad_enabled():
        return F.softplus(x)
    return torch.where(x > 20, x, torch.log1p(torch.exp(x.clamp(max=20))))


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Over the last dim, which must be small enough for one reduction (router logits)."""
    if torch.is_grad_enabled():
        return x.softmax(-1)
    e = torch.exp(x - x.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


class SiLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu(x)


def depthwise_conv(window: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """A causal depthwise conv1d over ``window`` (B, C, K - 1 + T): each output a sum over the
    kernel's K taps in a fixed order, the same for one token as for many."""
    if torch.is_grad_enabled():
        return conv(window)
    taps = window.unfold(-1, conv.kernel_size[0], 1)  # (B, C, T, K)
    out = (taps * conv.weight[:, 0, None, :]).sum(-1)
    return out + conv.bias[:, None] if conv.bias is not None else out


KEY_CHUNK = 64  # keys summed at a time; the chunk sums are then accumulated in key order


def _in_key_order(chunks: torch.Tensor, dim: int) -> torch.Tensor:
    """The sum of ``chunks`` along ``dim`` accumulated from the first chunk to the last (a
    cumulative sum: a sequential loop, in double precision on the CPU), so that trailing chunks
    of zeros, the keys a query does not see, leave the bits unchanged."""
    return chunks.cumsum(dim).select(dim, -1)


def mask_gaps(mask: torch.Tensor | None) -> bool:
    """Whether some query of a (..., T, L) attention mask hides a key before one it sees."""
    return mask is not None and bool((mask[..., 1:] & ~mask[..., :-1]).any())


def _compact_keys(k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
    """Per query, its visible keys first, in key order (the rest after them, masked): a row's
    keys then sit where they sit when the row runs alone, whatever left padding or block layout
    the batch put around them. Returns k, v (B, Hkv, T, L, D) and the mask (B, 1, T, L)."""
    order = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices  # (B|1, 1, T, L)
    b, t, length = max(mask.shape[0], k.shape[0]), order.shape[2], order.shape[3]
    index = order.expand(b, k.shape[1], t, length)[..., None].expand(-1, -1, -1, -1, k.shape[-1])
    gather = lambda x: x[:, :, None].expand(b, -1, t, -1, -1).gather(3, index)  # noqa: E731
    return gather(k), gather(v), mask.gather(3, order.expand(mask.shape[0], 1, t, length))


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool = False,
    length: int | None = None, gaps: bool | None = None,
) -> torch.Tensor:
    """Attention whose result for a query depends only on that query and the keys it sees, in
    key order: bitwise the same whatever its batch mates and however many queries share the pass
    (one for AR, k + 1 for a verification, a block for the denoiser).

    The scores and the weighted values are products whose shapes are fixed per query (the query
    heads sharing a key/value head times head_dim, and chunks of KEY_CHUNK keys), so they take
    the same kernel for any pass; the softmax's denominator and the chunks' weighted values are
    accumulated chunk by chunk in key order; all in fp32 (bf16 inputs are widened exactly).

    Shapes as ``layers.attend``: q (B, Hq, T, D), k and v (B, Hkv, L, D), mask (B or 1, 1, T,
    ``length``) bool; keys from ``length`` (default L) on are padding, never seen. ``gaps``:
    whether a query's mask hides a key before one it sees (``mask_gaps``; computed here when
    None, a read of the mask that a compiled graph would break at)."""
    out_dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    b, hq, t, d = q.shape
    kv_heads = k.shape[1]
    length = k.shape[2] if length is None else length
    group = hq // kv_heads
    if mask is None and is_causal:
        mask = torch.ones(t, length, dtype=torch.bool, device=q.device).tril(length - t)[None, None]
    gathered = mask is not None and (mask_gaps(mask) if gaps is None else gaps)
    if gathered:
        k, v, mask = _compact_keys(k[:, :, :length], v[:, :, :length], mask)
    pad = -k.shape[-2] % KEY_CHUNK
    if pad:  # zero keys and values, masked, so that the chunks are whole
        k, v = (torch.cat([x, x.new_zeros(*x.shape[:-2], pad, d)], dim=-2) for x in (k, v))
    padded = k.shape[-2]
    if mask is None:
        mask = torch.arange(padded, device=q.device) < length if padded > length else None
    elif mask.shape[-1] < padded:
        mask = torch.cat([mask, mask.new_zeros(*mask.shape[:-1], padded - mask.shape[-1])], dim=-1)
    q = q.view(b, kv_heads, group, t, d).transpose(2, 3) * (1.0 / math.sqrt(d))  # (B, Hkv, T, g, D)
    if gathered:  # each query its own keys: (B, Hkv, T) problems of g query columns
        seen = mask[:, :, :, None]  # (B|1, 1, T, 1, L)
        y = _columns(q, k, v, seen)
    else:  # one set of keys per row: (B, Hkv) problems of T * g query columns
        seen = None if mask is None else mask if mask.dim() == 1 else \
            mask[:, :, :, None].expand(-1, -1, -1, group, -1).reshape(mask.shape[0], 1, t * group, padded)
        y = _columns(q.reshape(b, kv_heads, t * group, d), k, v, seen).view(b, kv_heads, t, group, d)
    return y.transpose(2, 3).reshape(b, hq, t, d).to(out_dtype)


QUERY_COLUMNS = 16  # query columns per product: a fixed width, whatever the pass's query count


def _columns(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention of the query columns q (..., n, D) over the keys k, v (..., L, D), L a
    whole number of chunks, ``mask`` broadcastable to (..., n, L) or None. Returns (..., n, D).

    The scores are (L, D) x (D, QUERY_COLUMNS) products, the queries QUERY_COLUMNS at a time as
    the columns (zero columns fill the last product), so keys are read in place, never copied
    per query; the weighted values are (QUERY_COLUMNS, C) x (C, D) products per chunk of C keys.
    A score depends neither on the number of keys (the product's rows) nor on its column, nor
    a weighted value on its row (measured bitwise on torch 2.13's CPU kernels, fp32; the tests in
    tests/test_exact.py check it wherever they run); the sums over keys run chunk by chunk in
    key order, so trailing chunks of unseen keys leave the bits unchanged."""
    *batch, n, d = q.shape
    length = k.shape[-2]
    blocks = -(-n // QUERY_COLUMNS)
    pad = blocks * QUERY_COLUMNS - n

    def in_blocks(x: torch.Tensor) -> torch.Tensor:  # (..., n, X) -> (..., blocks, QUERY_COLUMNS, X)
        if pad:
            x = torch.cat([x, x.new_zeros(*x.shape[:-2], pad, x.shape[-1])], dim=-2)
        return x.unflatten(-2, (blocks, QUERY_COLUMNS))

    def per_block(x: torch.Tensor, inner: int = 2) -> torch.Tensor:
        """A blocks axis before x's last ``inner`` dims, materialised (a broadcast would change
        the product's kernel)."""
        x = x.unsqueeze(-inner - 1)
        return x.expand(*x.shape[:-inner - 1], blocks, *x.shape[-inner:]).contiguous() if blocks > 1 else x

    columns = in_blocks(q).transpose(-1, -2).contiguous()  # (..., blocks, D, Q)
    scores = torch.matmul(per_block(k), columns)  # (..., blocks, L, Q)
    scores = scores.transpose(-1, -2).reshape(*batch, blocks * QUERY_COLUMNS, length)[..., :n, :]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = (scores - scores.amax(-1, keepdim=True)).exp()  # (..., n, L)
    chunks = length // KEY_CHUNK
    denominator = _in_key_order(weights.unflatten(-1, (chunks, KEY_CHUNK)).sum(-1), -1)  # (..., n)
    w = in_blocks(weights).unflatten(-1, (chunks, KEY_CHUNK)).transpose(-2, -3).contiguous()  # (.., blocks, chunks, Q, C)
    values = per_block(v.unflatten(-2, (chunks, KEY_CHUNK)), inner=3)  # (..., blocks, chunks, C, D)
    numerator = _in_key_order(torch.matmul(w, values), -3)  # (..., blocks, Q, D)
    numerator = numerator.reshape(*batch, blocks * QUERY_COLUMNS, d)[..., :n, :]
    return numerator / denominator[..., None]
