"""Exact attention on PyTorch's own fused kernel, where the device allows it.

SDPA's CPU flash kernel gives a query the same bits whatever else shares the call once the
call's shapes are fixed where the kernel's sums depend on them:
- the keys padded to whole blocks of its key split (KEY_BLOCK), masked past the real ones: the
  products over a block then always have KEY_BLOCK columns;
- the query heads that share a key/value head stacked as the rows of one problem (a query's
  heads at rows i * g .. i * g + g - 1), padded with zero rows to a multiple of a row count.
Measured on torch 2.13, 2-core AVX2 EPYC, fp32: with rows in fours, a query's output was
bitwise the same alone, among 1 to 64 queries, in batches of 2 with other lengths and across 1
to 3 key blocks; with rows in twos (for some head sizes) or threes, or keys padded to 64 or
256, it was not. That is a fact about one kernel on one CPU, so ``row_multiple`` probes it on
the device before any use (rows in 4, 8 or 16, the first that passes), and ``exact.attention``
(fixed-shape products and chunked sums: ~2x the time for one token after 256) serves wherever
none does. One process uses one of the two for a given device, head size and group.

A query that sees its keys out of key order (``exact.key_layout``: a tree node off its first
path, a denoiser block after rows of other lengths, a left-padded pass) gets its seen keys moved
to the front in key order, where they lie when it runs alone; the queries of a row that see the
same keys share one such copy (a denoiser block), the others get one each (tree nodes).
All in fp32 (bf16 inputs are widened exactly), as ``exact.attention``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .exact import key_layout

KEY_BLOCK = 512  # keys per block of the CPU flash kernel's key split
ROW_MULTIPLES = (4, 8, 16)  # the rows of a problem padded to a multiple of one of these: the first exact

_ROWS: dict[tuple, int] = {}  # (device type, head_dim, group) -> the probe's row multiple, 0: not exact


def padded_keys(length: int) -> int:
    """``length`` key slots rounded up to whole KEY_BLOCKs (a KV cache's capacity too)."""
    return -(-length // KEY_BLOCK) * KEY_BLOCK


def _folded(q: torch.Tensor, kv_heads: int, rows: int) -> torch.Tensor:
    """(B, Hq, T, D) -> (B, Hkv, R, D): query i's heads of a key/value head at rows i * g ..
    i * g + g - 1, zero rows up to a multiple of ``rows``."""
    b, hq, t, d = q.shape
    n = t * (hq // kv_heads)
    folded = q.view(b, kv_heads, hq // kv_heads, t, d).transpose(2, 3).reshape(b, kv_heads, n, d)
    return F.pad(folded, (0, 0, 0, -n % rows))


def _unfolded(y: torch.Tensor, hq: int, t: int) -> torch.Tensor:
    b, kv_heads, _, d = y.shape
    g = hq // kv_heads
    return y[:, :, : t * g].reshape(b, kv_heads, t, g, d).transpose(2, 3).reshape(b, hq, t, d)


def _row_mask(seen: torch.Tensor, group: int, rows: int) -> torch.Tensor:
    """A (B or 1, 1, T, L) mask of queries as the (B or 1, 1, rows, L) mask of their folded rows;
    the zero rows after them see every key (their outputs are dropped)."""
    b, _, t, length = seen.shape
    mask = seen[:, :, :, None].expand(b, 1, t, group, length).reshape(b, 1, t * group, length)
    if rows > t * group:
        mask = torch.cat([mask, mask.new_ones(b, 1, rows - t * group, length)], dim=2)
    return mask


def _in_order(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seen: torch.Tensor, rows: int) -> torch.Tensor:
    """Queries that see a prefix of the keys: one call over the keys where they lie. ``seen``:
    a (B or 1, 1, T, L) mask, or one (1, 1, 1, L) for every query (built here: a compiled pass
    broadcasts only axes that are 1 in its own graph, model/compiled.py)."""
    hq, t = q.shape[1], q.shape[2]
    folded = _folded(q, k.shape[1], rows)
    if seen.dim() == 4:
        seen = _row_mask(seen, hq // k.shape[1], folded.shape[2])
    else:
        seen = seen[None, None, None]
    y = F.scaled_dot_product_attention(folded, k, v, attn_mask=seen, scale=1.0 / math.sqrt(q.shape[-1]))
    return _unfolded(y, hq, t)


@torch.compiler.disable  # which queries share keys is read from the mask's values
def _compacted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seen: torch.Tensor, rows: int) -> torch.Tensor:
    """Queries whose seen keys are not a prefix: each set of seen keys of a row moved to the
    front in key order (one copy per distinct set), then one call over all the sets."""
    b, hq, m, d = q.shape
    padded = k.shape[2]
    seen = seen.expand(b, 1, m, padded)[:, 0]
    keys, values, lengths, members = [], [], [], []
    for row in range(b):
        sets, which = torch.unique(seen[row], dim=0, return_inverse=True)  # (U, L), (m,)
        order = torch.sort((~sets).to(torch.uint8), dim=-1, stable=True).indices  # seen keys first, in key order
        keys.append(k[row][:, order].transpose(0, 1))  # (U, Hkv, L, D)
        values.append(v[row][:, order].transpose(0, 1))
        lengths.append(sets.sum(-1))
        members += [(row, (which == u).nonzero()[:, 0]) for u in range(sets.shape[0])]
    width = max(len(idx) for _, idx in members)
    queries = q.new_zeros(len(members), hq, width, d)
    for n, (row, idx) in enumerate(members):
        queries[n, :, : len(idx)] = q[row][:, idx]
    mask = (torch.arange(padded, device=q.device) < torch.cat(lengths)[:, None])[:, None, None].expand(-1, 1, width, -1)
    y = _in_order(queries, torch.cat(keys), torch.cat(values), mask, rows)
    out = q.new_empty(b, hq, m, d)
    for n, (row, idx) in enumerate(members):
        out[row][:, idx] = y[n, :, : len(idx)]
    return out


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool = False,
    length: int | None = None, layout: tuple[int, int] | None = None, rows: int = ROW_MULTIPLES[0],
) -> torch.Tensor:
    """``exact.attention``'s contract on SDPA's kernel (see the module docstring), with the
    rows of each problem padded to a multiple of ``rows`` (``row_multiple``'s). k and v
    (B, Hkv, L', D) hold at least ``length`` real keys (default L'); what follows them up to
    ``padded_keys(length)`` is read and masked (padded with zeros where L' is shorter)."""
    out_dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    t = q.shape[2]
    length = k.shape[2] if length is None else length
    padded = padded_keys(length)
    if k.shape[2] < padded:
        k, v = (F.pad(x, (0, 0, 0, padded - x.shape[2])) for x in (k, v))
    k, v = k.narrow(2, 0, padded), v.narrow(2, 0, padded)
    if mask is None and is_causal:
        mask = torch.ones(t, length, dtype=torch.bool, device=q.device).tril(length - t)[None, None]
        layout = (0, t)
    if mask is None:  # every query sees every real key
        seen, moved = torch.arange(padded, device=q.device) < length, t
    else:
        mask = mask.narrow(-1, 0, length)
        _, moved = key_layout(mask) if layout is None else layout
        seen = F.pad(mask, (0, padded - length), value=False)
    if moved == t:
        return _in_order(q, k, v, seen, rows).to(out_dtype)
    parts = [_in_order(q[:, :, :moved], k, v, seen[:, :, :moved], rows)] if moved else []
    parts.append(_compacted(q[:, :, moved:], k, v, seen[:, :, moved:], rows))
    return torch.cat(parts, 2).to(out_dtype)


def row_multiple(device: torch.device, head_dim: int, group: int) -> int:
    """The row multiple with which ``attention`` is exact on ``device`` for heads of
    ``head_dim`` and ``group`` query heads per key/value head, 0 where none is: probed once per
    such key on random queries, against each query computed alone. Only CPUs are probed; other
    devices take ``exact.attention``. A compiled pass reads the verdict
    (``Backbone.compile_passes`` probes first, eagerly); one traced before any probe takes
    ``exact.attention``."""
    key = (device.type, head_dim, group)
    if key not in _ROWS:
        if torch.compiler.is_compiling():
            return 0
        passing = (rows for rows in ROW_MULTIPLES if _probe(head_dim, group, rows)) if device.type == "cpu" else ()
        _ROWS[key] = next(passing, 0)
    return _ROWS[key]


def _probe(head_dim: int, group: int, rows: int) -> bool:
    gen = torch.Generator().manual_seed(0)
    kv_heads, total = 2, 2 * KEY_BLOCK + 100
    q = torch.randn(2, kv_heads * group, total, head_dim, generator=gen)
    k, v = (torch.randn(2, kv_heads, total, head_dim, generator=gen) for _ in range(2))

    def run(batch: list[int], starts: list[int], t: int) -> torch.Tensor:  # queries start..start+t-1, causal
        qs = torch.stack([q[r, :, s : s + t] for r, s in zip(batch, starts)])
        length = max(starts) + t
        pos = torch.tensor(starts)[:, None] + torch.arange(t)
        mask = (torch.arange(length) <= pos[:, :, None])[:, None]
        return attention(qs, k[batch], v[batch], mask, length=length, rows=rows)

    for p in (40, KEY_BLOCK + 200):
        alone = run([0], [p], 1)[0, :, 0]
        among = [run([0], [p - 2], 4)[0, :, 2], run([0], [p - 7], 16)[0, :, 7], run([0], [p], 5)[0, :, 0],
                 run([0, 1], [p, total - 10], 1)[0, :, 0], run([1, 0], [total - 40, p - 1], 3)[1, :, 1]]
        # out of key order: the same query and keys with a hidden key in between
        mask = torch.ones(1, 1, 1, p + 2, dtype=torch.bool)
        mask[..., p] = False  # key p hidden, key p + 1 (the original key p) seen
        shifted_k = torch.cat([k[:1, :, :p], k[:1, :, p : p + 1] * 0, k[:1, :, p : p + 1]], 2)
        shifted_v = torch.cat([v[:1, :, :p], v[:1, :, p : p + 1] * 0, v[:1, :, p : p + 1]], 2)
        among.append(attention(q[:1, :, p : p + 1], shifted_k, shifted_v, mask, rows=rows)[0, :, 0])
        if not all(torch.equal(alone, y) for y in among):
            return False
    return True
