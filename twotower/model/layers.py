"""Norms, rotary embeddings and the attention, MLP and MoE mixers (Mamba-2 is in mamba2.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from . import exact, exact_sdpa
from .cache import ForwardContext, KVCache
from .config import BackboneConfig, MoEConfig, RopeConfig
from .linear import Linear, WeightPacks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16 variance is too coarse), scale in the input dtype as Llama does.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind == "default":
        return inv_freq
    if rope.kind != "llama3":
        raise UsageError(f"unsupported RoPE scaling {rope.kind!r} (supported: default, llama3)")
    # Llama 3.1 scaling: keep high frequencies, divide low ones by `factor`, interpolate between.
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryTable(nn.Module):
    """Precomputed cos/sin for every position, looked up per row (rows have their own positions)."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int) -> None:
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions).float(), rope_inv_freq(rope, head_dim))
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if int(positions.max()) >= self.cos.shape[0]:
            raise UsageError(f"position {int(positions.max())} beyond the model's {self.cos.shape[0]} positions")
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)  # (B, T, D)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, D) rotated by cos and sin (B, T, D). (No size-1 axis is passed in for the
    heads: a compiled pass treats every size alike, model/compiled.py, and broadcasts only
    axes that are 1 in its own graph.)"""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, bias = cfg.hidden_size, cfg.attention_bias
        # q, k and v in one matrix: one larger GEMV per token is markedly faster on CPU than three
        self.qkv_proj = Linear(h, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, h, bias=cfg.attention_out_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        # inference without gradients takes exact_attention (batch- and shape-invariant); training
        # and exact=False take SDPA's fused kernels
        self.exact = True

    def forward(
        self,
        x: torch.Tensor,
        ctx: ForwardContext,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        return self.o_proj(self.attend_projected(*self.project(x, rope), ctx, cache))

    def project(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, Hq, T, D), k and v (B, Hkv, T, D) of the tokens x (B, T, H), rotated."""
        b, t, _ = x.shape
        qkv = self.qkv_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, heads, T, D)
        qk, v = qkv.split([self.n_heads + self.n_kv, self.n_kv], dim=1)
        if self.q_norm is not None:
            q, k = qk.split([self.n_heads, self.n_kv], dim=1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=1)
        if rope is not None:
            qk = apply_rope(qk, *rope)  # q and k rotated together: half the small ops
        q, k = qk.split([self.n_heads, self.n_kv], dim=1)
        return q, k, v

    def attend_projected(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext, cache: KVCache | None
    ) -> torch.Tensor:
        """The attention output (B, T, Hq * D) before o_proj: the context tower stores its keys
        in ``cache`` and reads all up to them; the denoiser (``ctx.write`` False) reads the
        context keys of the cache and appends its block's own, unstored."""
        b, _, t, _ = q.shape
        exactly = self.exact and not torch.is_grad_enabled()
        # exact attention on SDPA's kernel where the device passes its probe (model/exact_sdpa.py)
        rows = exact_sdpa.row_multiple(q.device, self.head_dim, self.n_heads // self.n_kv) if exactly else 0
        unit = exact_sdpa.KEY_BLOCK if rows else exact.KEY_CHUNK  # the keys exact attention reads are whole units
        length = None  # real key slots, where exact attention reads whole units beyond them
        if cache is not None and ctx.write:
            k, v = cache.write(k, v, ctx)
            if exactly:
                length = k.shape[2]
                k, v = cache.whole_units(length, unit)
        elif cache is not None:  # denoiser: the context tower's keys, then the block's own (not stored)
            # (the context tower's cache may live on another device)
            pad = -(ctx.prefix_len + t) % unit if exactly else 0
            k, v = (torch.cat([c.narrow(2, 0, ctx.prefix_len).to(x.device, x.dtype), x, x.new_zeros(b, self.n_kv, pad,
                                                                                                  self.head_dim)], dim=2)
                    for c, x in ((cache.k, k), (cache.v, v)))
            length = ctx.prefix_len + t
        if rows:
            y = exact_sdpa.attention(q, k, v, ctx.attn_mask, ctx.is_causal, length, ctx.key_layout, rows)
        elif exactly:
            y = exact.attention(q, k, v, ctx.attn_mask, ctx.is_causal, length, ctx.key_layout)
        else:
            y = attend(q, k, v, ctx.attn_mask, ctx.is_causal)
        return y.transpose(1, 2).reshape(b, t, -1)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool = False
) -> torch.Tensor:
    """Scaled dot-product attention of q (B, Hq, T, D) over k, v (B, Hkv, L, D), Hq a multiple
    of Hkv (query head h reads key/value head h // (Hq / Hkv)); ``mask`` (B or 1, 1, T, L) bool."""
    group = q.shape[1] // k.shape[1]
    if group == 1 or mask is None or q.device.type == "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=group > 1)
    return grouped_query_folded(q, k, v, mask)


def grouped_query_folded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GQA with a mask as plain multi-head attention over the key/value heads: the query heads
    that share a key/value head are stacked along the query axis (and the mask with them).

    On CUDA, SDPA's fused kernels do not take a mask together with ``enable_gqa``; it falls
    back to the math kernel, which repeats K/V per query head and materialises the fp32 score
    matrix: the denoiser's masked attention (training and decoding) and left-padded batches
    (distillation) would pay that on every layer. Folded, the memory-efficient kernel runs and
    K/V are never copied."""
    b, hq, t, d = q.shape
    kv_heads = k.shape[1]
    group = hq // kv_heads
    folded = q.reshape(b, kv_heads, group * t, d)  # row r*T + i = query i of head j*group + r
    mask = mask[:, :, None].expand(-1, -1, group, -1, -1).reshape(mask.shape[0], 1, group * t, mask.shape[-1])
    y = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask)
    return y.reshape(b, hq, t, d)


def relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


class MLP(nn.Module):
    """SwiGLU (Llama; gate and up fused in one matrix, gate first) or squared-ReLU (NemotronH)."""

    def __init__(self, hidden: int, intermediate: int, activation: str, bias: bool = False) -> None:
        super().__init__()
        if activation not in ("swiglu", "relu2"):
            raise UsageError(f"unsupported MLP activation {activation!r}")
        self.gated = activation == "swiglu"
        self.up_proj = Linear(hidden, 2 * intermediate if self.gated else intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.up_proj(x).chunk(2, dim=-1)
            return self.down_proj(exact.silu(gate) * up)
        return self.down_proj(relu2(self.up_proj(x)))


class MoE(nn.Module):
    """Top-k routed experts plus an optional shared expert.

    Sigmoid routing (NemotronH / DeepSeek-V3): scores = sigmoid(router logits); experts are
    chosen on scores + correction bias within the best ``topk_group`` of ``n_group`` groups;
    weights are the uncorrected scores, optionally normalised, times ``routed_scaling_factor``.
    Softmax routing: weights = softmax(logits) top-k, optionally normalised.
    """

    def __init__(self, hidden: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n, inter = cfg.num_experts, cfg.expert_intermediate_size
        self.router = nn.Linear(hidden, n, bias=False)
        self.register_buffer("correction_bias", torch.zeros(n))
        self.gated = cfg.activation == "swiglu"
        self.gate_proj = nn.Parameter(torch.empty(n, inter, hidden)) if self.gated else None
        self.up_proj = nn.Parameter(torch.empty(n, inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, inter))
        for p in (self.gate_proj, self.up_proj, self.down_proj):
            if p is not None:
                nn.init.normal_(p, std=0.02)
        self.shared = (
            MLP(hidden, cfg.shared_expert_intermediate_size, cfg.activation)
            if cfg.shared_expert_intermediate_size
            else None
        )
        self.packs = WeightPacks()  # the experts' (and fp32 router's) packed copies: row-invariant products

    def _router_logits(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Router logits in ``dtype``, each token's bitwise the same whatever else is routed
        with it: the packed product in fp32; in fp64 (which oneDNN does not pack) per-token sums
        of products, a fixed reduction per token."""
        weight = self.router.weight
        if dtype == torch.float32 and x.dtype == torch.float32:
            return self.packs.linear(x, weight, name="router")
        if torch.is_grad_enabled():
            return F.linear(x.to(dtype), weight.to(dtype))
        w = weight.to(dtype)
        step = max(1, (1 << 22) // w.numel())
        return torch.cat([(x[i:i + step, None].to(dtype) * w).sum(-1) for i in range(0, x.shape[0], step)])

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        dtype = torch.float64 if cfg.router_dtype == "float64" else torch.float32
        logits = self._router_logits(x, dtype)
        if cfg.scoring == "softmax":
            scores = exact.softmax(logits)
            weights, idx = scores.topk(cfg.top_k, dim=-1)
        else:
            scores = exact.sigmoid(logits)
            choice = scores + self.correction_bias.to(dtype)
            if cfg.n_group > 1:
                grouped = choice.view(-1, cfg.n_group, cfg.num_experts // cfg.n_group)
                group_scores = grouped.topk(2, dim=-1).values.sum(-1)
                keep = group_scores.topk(cfg.topk_group, dim=-1).indices
                group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
                choice = choice.masked_fill(~group_mask.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
            idx = choice.topk(cfg.top_k, dim=-1).indices
            weights = scores.gather(1, idx)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, idx = self.route(flat)
        out = torch.zeros_like(flat, dtype=weights.dtype)
        # Loop over the experts that received tokens (the experts' own loop, as in transformers).
        for e in idx.unique().tolist():
            token, slot = torch.where(idx == e)
            h = flat[token]
            linear = self.packs.linear
            if self.gated:
                h = exact.silu(linear(h, self.gate_proj[e], name=("gate", e))) * linear(h, self.up_proj[e], name=("up", e))
            else:
                h = relu2(linear(h, self.up_proj[e], name=("up", e)))
            h = linear(h, self.down_proj[e], name=("down", e))
            out.index_add_(0, token, h.to(out.dtype) * weights[token, slot, None])
        out = out.to(x.dtype).view(shape)
        if self.shared is not None:
            out = out + self.shared(x)
        return out
