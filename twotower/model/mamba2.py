"""Mamba-2 mixer in plain PyTorch: the SSD chunked scan (after mamba2-minimal), a single-token
recurrent step, and per-token states for rollback. SSM math runs in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import exact
from .cache import ForwardContext, MambaState
from .config import BackboneConfig
from .linear import Linear


def segsum(x: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T) with out[..., i, j] = sum(x[..., j+1 : i+1]) for j <= i, -inf above.

    Built from a masked cumulative sum rather than a difference of cumsums, which is more stable."""
    t = x.shape[-1]
    x = x[..., None].expand(*x.shape, t)
    x = x.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device), -1), 0)
    out = x.cumsum(-2)
    return out.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device)), float("-inf"))


def ssd_chunk_scan(
    x: torch.Tensor,  # (b, l, h, p), already multiplied by dt
    a: torch.Tensor,  # (b, l, h): dt * A (log decay per token, <= 0)
    B: torch.Tensor,  # (b, l, h, n)
    C: torch.Tensor,  # (b, l, h, n)
    chunk_size: int,
    initial_state: torch.Tensor | None = None,  # (b, h, p, n)
    return_chunk_states: bool = False,
):
    """y_t = C_t . h_t with h_t = exp(a_t) h_{t-1} + B_t x_t, computed chunk by chunk.
    Returns y (b, l, h, p) and the state after the last token (b, h, p, n); with
    ``return_chunk_states`` also the state at the start of every chunk (b, c, h, p, n)."""
    b, length, h, p = x.shape
    pad = (-length) % chunk_size
    if pad:
        x, a, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, a, B, C))
    nc = x.shape[1] // chunk_size
    x, B, C = (t.reshape(b, nc, chunk_size, h, t.shape[-1]) for t in (x, B, C))
    a = a.reshape(b, nc, chunk_size, h).permute(0, 3, 1, 2)  # (b, h, c, l)
    a_cum = a.cumsum(-1)

    # 1. within each chunk: a causal, decay-weighted "attention" of C over B
    decay = torch.exp(segsum(a))  # (b, h, c, l, s)
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, decay, x)
    # 2. state contributed by each chunk at its end
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, h, c, l)
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, x)
    # 3. carry states across chunks, starting from the initial state
    if initial_state is None:
        initial_state = torch.zeros_like(chunk_states[:, 0])
    states = torch.cat([initial_state[:, None], chunk_states], dim=1)  # (b, c+1, h, p, n)
    chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    states, final = states[:, :-1], states[:, -1]
    # 4. contribution of each chunk's starting state to its outputs
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(a_cum))
    y = (y_diag + y_off).reshape(b, nc * chunk_size, h, p)[:, :length]
    if return_chunk_states:
        return y, final, states
    return y, final


def ssd_all_states(
    x: torch.Tensor, a: torch.Tensor, B: torch.Tensor, initial_state: torch.Tensor
) -> torch.Tensor:
    """State after every token, (b, l, h, p, n), for rolling back to any position (short l)."""
    a_cum = a.cumsum(1)  # (b, l, h)
    decay = torch.exp(segsum(a.transpose(1, 2)))  # (b, h, t, s)
    states = torch.einsum("bhts,bshn,bshp->bthpn", decay, B, x)
    return states + torch.exp(a_cum)[..., None, None] * initial_state[:, None]


def ssm_step(
    state: torch.Tensor, x: torch.Tensor, a: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence. x (b, h, p) already times dt, a (b, h), B/C (b, h, n).
    The output sums over the state size in a fixed order: the same for any batch."""
    state = state * torch.exp(a)[..., None, None] + x[..., None] * B[:, :, None, :]
    return (state * C[:, :, None, :]).sum(-1), state


def ssm_sequential(
    x: torch.Tensor, a: torch.Tensor, B: torch.Tensor, C: torch.Tensor, h0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence token by token, ``ssm_step`` for each (exact inference: a token's output
    is the one its single-token step gives). Returns y (b, l, h, p) and the state after every
    token (b, l, h, p, n)."""
    ys, states, state = [], [], h0
    for i in range(x.shape[1]):
        y, state = ssm_step(state, x[:, i], a[:, i], B[:, i], C[:, i])
        ys.append(y)
        states.append(state)
    return torch.stack(ys, 1), torch.stack(states, 1)


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) normalised per group of channels (norm_before_gate=False)."""

    def __init__(self, dim: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size, self.eps = group_size, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        h = y.float() * exact.silu(z.float())
        g = h.view(*h.shape[:-1], -1, self.group_size)
        g = g * torch.rsqrt((g * g).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.view(h.shape).to(dtype)


class Mamba2(nn.Module):
    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        m = cfg.mamba
        self.m = m
        self.d_inner = m.num_heads * m.head_dim
        self.conv_dim = self.d_inner + 2 * m.n_groups * m.state_size
        self.in_proj = Linear(cfg.hidden_size, self.d_inner + self.conv_dim + m.num_heads, bias=m.use_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, m.conv_kernel, groups=self.conv_dim, bias=m.use_conv_bias
        )
        self.dt_bias = nn.Parameter(torch.ones(m.num_heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, m.num_heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(m.num_heads))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // m.n_groups, cfg.norm_eps)
        self.out_proj = Linear(self.d_inner, cfg.hidden_size, bias=m.use_bias)
        self.exact = True  # inference token by token (see forward); False: the chunked scan

    def forward(self, hidden: torch.Tensor, ctx: ForwardContext, state: MambaState | None) -> torch.Tensor:
        return self.out_proj(self.scan_projected(self.in_proj(hidden), ctx, state))

    def scan_projected(self, projected: torch.Tensor, ctx: ForwardContext, state: MambaState | None) -> torch.Tensor:
        """The gated, normed scan output (B, T, d_inner) of in_proj's output (B, T, ·): conv and
        SSM continue from ``state`` and, where ``ctx.write``, are stored back into it."""
        m = self.m
        rows, length, width = projected.shape
        if ctx.blocks > 1:  # independent blocks (denoiser training): one scan row per block
            projected = projected.reshape(rows * ctx.blocks, length // ctx.blocks, width)
        b, t, _ = projected.shape
        valid = ctx.valid[..., None].to(projected.dtype) if ctx.valid is not None else None
        z, xbc, dt = projected.split([self.d_inner, self.conv_dim, m.num_heads], dim=-1)
        if valid is not None:
            # Zero the conv inputs at padding (not just the hidden states: in_proj may have a
            # bias), so a padded row sees the same zero history as the row alone.
            xbc = xbc * valid

        # causal depthwise conv over [previous K-1 inputs ; new inputs]
        # .to: a denoiser on another device or in another dtype (a fast drafter) reads the
        # context tower's state across them
        past = state.conv.to(xbc.device, xbc.dtype) if state is not None else xbc.new_zeros(b, self.conv_dim, m.conv_kernel - 1)
        window = torch.cat([past, xbc.transpose(1, 2)], dim=-1)
        xbc = exact.silu(exact.depthwise_conv(window, self.conv1d)).transpose(1, 2)
        if valid is not None:
            xbc = xbc * valid
        x, B, C = xbc.split([self.d_inner, m.n_groups * m.state_size, m.n_groups * m.state_size], dim=-1)

        # discretise in fp32: a = dt * A (log decay), x scaled by dt
        dt = exact.softplus(dt.float() + self.dt_bias.float()).clamp(m.dt_min, m.dt_max)  # (b, t, h)
        a = dt * -torch.exp(self.A_log.float())
        x = x.float().view(b, t, m.num_heads, m.head_dim)
        heads_per_group = m.num_heads // m.n_groups
        B = B.float().view(b, t, m.n_groups, m.state_size).repeat_interleave(heads_per_group, dim=2)
        C = C.float().view(b, t, m.n_groups, m.state_size).repeat_interleave(heads_per_group, dim=2)
        xdt = x * dt[..., None]
        h0 = state.ssm.to(xdt.device) if state is not None else None

        boundaries = None
        if not torch.is_grad_enabled() and not ctx.boundary_every and self.exact:
            # inference: token by token, so that a token's output is bitwise its single-token step's
            if h0 is None:
                h0 = xdt.new_zeros(b, m.num_heads, m.head_dim, m.state_size)
            y, states = ssm_sequential(xdt, a, B, C, h0)
            final = states[:, -1]
        elif ctx.record:
            if h0 is None:
                h0 = xdt.new_zeros(b, m.num_heads, m.head_dim, m.state_size)
            states = ssd_all_states(xdt, a, B, h0)
            y = torch.einsum("bthpn,bthn->bthp", states, C)
            final = states[:, -1]
        elif t == 1 and h0 is not None:
            y, final = ssm_step(h0, xdt[:, 0], a[:, 0], B[:, 0], C[:, 0])
            y = y[:, None]
        elif ctx.boundary_every:
            # chunks aligned with the blocks give the state at every block boundary for free
            y, final, boundaries = ssd_chunk_scan(xdt, a, B, C, ctx.boundary_every, h0, return_chunk_states=True)
        else:
            y, final = ssd_chunk_scan(xdt, a, B, C, m.chunk_size, h0)
        y = y + x * self.D.float()[:, None]

        if state is not None and ctx.write:
            state.conv = window[..., -(m.conv_kernel - 1) :].detach().clone()
            state.ssm = final.detach()
            state.conv_window = window.detach() if ctx.record or boundaries is not None else None
            state.ssm_history = torch.cat([h0[:, None], states], dim=1).detach() if ctx.record else None
            state.boundary_ssm = torch.cat([boundaries, final[:, None]], dim=1).detach() if boundaries is not None else None
        y = self.norm(y.reshape(b, t, self.d_inner).to(projected.dtype), z)
        return y.reshape(rows, length, self.d_inner)
