"""Inference that is exact: a row's numbers are bitwise the same whatever its batch mates and
however many tokens share its pass (one for AR, k + 1 for a verification, a block for the
denoiser), in fp32 and bf16. What breaks that in plain PyTorch on a CPU, measured on torch
2.13: SDPA's kernels (their reductions depend on the query and key counts), ``F.linear``'s
one-row path (another kernel than for several rows; the oneDNN-packed product in
``linear.WeightPacks`` does not vary), and the vectorised sigmoid, SiLU, softplus, GELU and pow,
whose values depend on an element's place in the tensor (exp, log1p, tanh, rsqrt do not). Here
those are built from operations that do not vary: exp and correctly rounded arithmetic, and
reductions whose size and order are fixed.

Attention runs on SDPA's own kernel at fixed shapes where the device passes that path's probe
(model/exact_sdpa.py); ``attention`` here is the fallback everywhere else.

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


def key_layout(mask: torch.Tensor | None) -> tuple[int, int]:
    """Where a (..., T, L) mask's queries see their keys out of key order: (in_place, moved).
    A query whose mask hides a key before one it sees (left padding, a denoiser block after rows
    of other lengths, a node of a token tree off its first path) must have its keys compacted
    (its seen keys first, in key order) to get the bits it gets alone. ``in_place``: the leading
    keys, in whole KEY_CHUNKs, before any such hidden key of any query (every query reads them
    where they lie); ``moved``: the first query index from which on queries may need it (those
    before it need none). (0, T) where no query needs it (and (0, 0) without a mask)."""
    t = 0 if mask is None else mask.shape[-2]
    if mask is None or mask.shape[-1] < 2:
        return 0, t
    seen_later = mask.flip(-1).cummax(-1).values.flip(-1)[..., 1:]  # (..., T, L - 1): some later key seen
    hidden_first = ~mask[..., :-1] & seen_later  # (..., T, L - 1)
    per_query = hidden_first.flatten(0, -3).any(-1).any(0)  # (T,)
    if not bool(per_query.any()):
        return 0, t
    first_key = int(hidden_first.long().argmax(-1).masked_fill(~hidden_first.any(-1), mask.shape[-1]).min())
    return first_key // KEY_CHUNK * KEY_CHUNK, int(per_query.long().argmax())


def _whole_chunks(k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, length: int):
    """Keys and values padded with zeros to whole chunks (..., L', D), and the mask with them
    (False there), or where there is no mask, a (L',) mask of the real keys if any were added."""
    pad = -k.shape[-2] % KEY_CHUNK
    if pad:  # zero keys and values, masked, so that the chunks are whole
        k, v = (torch.cat([x, x.new_zeros(*x.shape[:-2], pad, x.shape[-1])], dim=-2) for x in (k, v))
    padded = k.shape[-2]
    if mask is None:
        mask = torch.arange(padded, device=k.device) < length if padded > length else None
    elif mask.shape[-1] < padded:
        mask = torch.cat([mask, mask.new_zeros(*mask.shape[:-1], padded - mask.shape[-1])], dim=-1)
    return k, v, mask


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool = False,
    length: int | None = None, layout: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Attention whose result for a query depends only on that query and the keys it sees, in
    key order: bitwise the same whatever its batch mates and however many queries share the pass
    (one for AR, k + 1 for a verification, a block for the denoiser, the nodes of a token tree).

    The scores and the weighted values are products whose shapes are fixed per query (the query
    heads sharing a key/value head times head_dim, and chunks of KEY_CHUNK keys), so they take
    the same kernel for any pass; the softmax's denominator and the chunks' weighted values are
    accumulated chunk by chunk in key order; all in fp32 (bf16 inputs are widened exactly).
    Every query reads the keys where they lie; a query that sees its keys out of order (see
    ``key_layout``) then has the chunks past the in-place ones summed again over its own keys in
    key order, which is what it sums alone.

    Shapes as ``layers.attend``: q (B, Hq, T, D), k and v (B, Hkv, L, D), mask (B or 1, 1, T,
    ``length``) bool; keys from ``length`` (default L) on are padding, never seen. ``layout``:
    ``key_layout(mask)``, computed here when None (a read of the mask that a compiled graph
    would break at: a pass computes it once, ``ForwardContext.key_layout``)."""
    out_dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    b, hq, t, d = q.shape
    kv_heads = k.shape[1]
    length = k.shape[2] if length is None else length
    group = hq // kv_heads
    if mask is None and is_causal:
        mask = torch.ones(t, length, dtype=torch.bool, device=q.device).tril(length - t)[None, None]
        layout = (0, t)  # every query's keys in key order
    if mask is not None:
        mask = mask.narrow(-1, 0, length)  # narrow, not slices: a compiled pass knows the sizes (model/compiled.py)
    in_place, moved = (0, t) if mask is None else key_layout(mask) if layout is None else layout
    k, v, mask = _whole_chunks(k, v, mask, length)
    padded = k.shape[-2]
    q = q.view(b, kv_heads, group, t, d).transpose(2, 3) * (1.0 / math.sqrt(d))  # (B, Hkv, T, g, D)
    # one set of keys per row: (B, Hkv) problems of T * g query columns
    seen = None if mask is None else mask if mask.dim() == 1 else \
        mask[:, :, :, None].expand(-1, -1, -1, group, -1).reshape(mask.shape[0], 1, t * group, padded)
    weights, sums = _softmax_parts(_scores(q.reshape(b, kv_heads, t * group, d), k), seen)
    # (the rows are query-major: query i's g columns are rows i * g .. i * g + g - 1)
    outs = []
    if moved:  # the queries before `moved` see their keys in key order: read in place
        rows = moved * group
        parts = _chunk_values(weights.narrow(2, 0, rows), v)  # (B, Hkv, moved * g, chunks, D)
        outs.append(_in_key_order(parts, -2) / _in_key_order(sums.narrow(2, 0, rows), -1)[..., None])
    if moved < t:  # the others: the in-place chunks, then their own keys past them in their key order
        m, tail, kept = t - moved, padded - in_place, in_place // KEY_CHUNK
        # bounds a compiled pass cannot prove: without them it sizes the narrows below with clamps
        # that its generated code fails to print
        torch._check(in_place >= 0)
        torch._check(in_place <= padded)
        order = torch.sort((~mask.narrow(2, moved, m).narrow(3, in_place, tail)).to(torch.uint8), dim=-1,
                           stable=True).indices
        # narrowed while flat, then unflattened: inductor cannot lower a slice of the unflattened view
        moved_rows = weights.narrow(2, moved * group, m * group)
        own = moved_rows.narrow(3, in_place, tail).unflatten(2, (m, group))
        own = own.gather(-1, order[:, :, :, None].expand(b, kv_heads, m, group, tail))  # (B, Hkv, m, g, tail)
        # their values in their key order: one index_select over the rows' tails (a gather with
        # an expanded index is ~3x slower on the CPU)
        slot = (order[:, 0].expand(b, m, tail) + torch.arange(b, device=q.device)[:, None, None] * tail).reshape(-1)
        own_v = v.narrow(2, in_place, tail).transpose(1, 2).reshape(b * tail, kv_heads, d).index_select(0, slot)
        own_v = own_v.reshape(b, m, tail, kv_heads, d).permute(0, 3, 1, 2, 4)  # (B, Hkv, m, tail, D)
        own_sums = _in_key_order(own.unflatten(-1, (tail // KEY_CHUNK, KEY_CHUNK)), -1)
        own_parts = _chunk_values(own, own_v)  # (B, Hkv, m, g, tail chunks, D)
        if kept:
            shared = _chunk_values(moved_rows.narrow(3, 0, in_place), v.narrow(2, 0, in_place))
            shared = shared.reshape(b, kv_heads, m, group, kept, d)
            own_parts = torch.cat([shared, own_parts], -2)
            own_sums = torch.cat([sums.narrow(2, moved * group, m * group).narrow(3, 0, kept).unflatten(2, (m, group)),
                                  own_sums], -1)
        y_moved = _in_key_order(own_parts, -2) / _in_key_order(own_sums, -1)[..., None]  # (B, Hkv, m, g, D)
        outs.append(y_moved.reshape(b, kv_heads, m * group, d))
    y = (outs[0] if len(outs) == 1 else torch.cat(outs, 2)).reshape(b, kv_heads, t, group, d)
    return y.transpose(2, 3).reshape(b, hq, t, d).to(out_dtype)


QUERY_COLUMNS = 16  # query columns per product: a fixed width, whatever the pass's query count


def _in_blocks(x: torch.Tensor, blocks: int) -> torch.Tensor:
    """(..., n, X) -> (..., blocks, QUERY_COLUMNS, X), zero rows filling the last block."""
    pad = blocks * QUERY_COLUMNS - x.shape[-2]
    if pad:
        x = torch.cat([x, x.new_zeros(*x.shape[:-2], pad, x.shape[-1])], dim=-2)
    return x.unflatten(-2, (blocks, QUERY_COLUMNS))


def _per_block(x: torch.Tensor, blocks: int, inner: int = 2) -> torch.Tensor:
    """A blocks axis before x's last ``inner`` dims, materialised (a broadcast would change the
    product's kernel)."""
    x = x.unsqueeze(-inner - 1)
    return x.expand(*x.shape[:-inner - 1], blocks, *x.shape[-inner:]).contiguous() if blocks > 1 else x


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The scores (..., n, L) of the query columns q (..., n, D) against the keys k (..., L, D):
    (L, D) x (D, QUERY_COLUMNS) products, the queries QUERY_COLUMNS at a time as the columns, so
    keys are read in place, never copied per query."""
    *batch, n, _ = q.shape
    blocks = -(-n // QUERY_COLUMNS)
    columns = _in_blocks(q, blocks).transpose(-1, -2).contiguous()  # (..., blocks, D, Q)
    scores = torch.matmul(_per_block(k, blocks), columns)  # (..., blocks, L, Q)
    return scores.transpose(-1, -2).reshape(*batch, blocks * QUERY_COLUMNS, k.shape[-2])[..., :n, :]


def _softmax_parts(scores: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The unnormalised softmax weights (..., n, L) of masked scores, L whole chunks, and each
    chunk's sum (..., n, chunks), accumulated in key order: ``sum`` picks its order by the
    tensor's shape (measured, torch 2.13 CPU: a chunk summed alone and beside a second chunk
    differed in the last bit)."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = (scores - scores.amax(-1, keepdim=True)).exp()
    return weights, _in_key_order(weights.unflatten(-1, (scores.shape[-1] // KEY_CHUNK, KEY_CHUNK)), -1)


def _chunk_values(weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Each chunk's weighted values (..., n, chunks, D) for the weights (..., n, L) of the
    values v (..., L, D): (QUERY_COLUMNS, C) x (C, D) products per chunk of C keys."""
    *batch, n, length = weights.shape
    blocks, chunks = -(-n // QUERY_COLUMNS), length // KEY_CHUNK
    w = _in_blocks(weights, blocks).unflatten(-1, (chunks, KEY_CHUNK)).transpose(-2, -3).contiguous()
    values = _per_block(v.unflatten(-2, (chunks, KEY_CHUNK)), blocks, inner=3)  # (..., blocks, chunks, C, D)
    parts = torch.matmul(w, values)  # (..., blocks, chunks, Q, D)
    return parts.transpose(-2, -3).reshape(*batch, blocks * QUERY_COLUMNS, chunks, v.shape[-1])[..., :n, :, :]
