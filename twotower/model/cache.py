"""Inference state of a backbone: per-row lengths, a preallocated KV cache per attention
sub-layer, conv and SSM states per Mamba-2 sub-layer.

Rows of a batch live in one slot space. Row ``b`` holds real tokens in slots
``starts[b] .. lengths[b]-1`` (left padding before ``starts[b]``); its next token goes to
slot ``lengths[b]`` and has RoPE position ``lengths[b] - starts[b]``. Rows may have different
lengths (after a per-row rollback), so every write and every mask is per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UsageError
from .config import BackboneConfig
from .exact import key_layout
from .exact_sdpa import padded_keys


class KVCache:
    """Keys/values of one attention sub-layer, (batch, kv_heads, max_len, head_dim)."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device) -> None:
        # room for whole units of keys, which exact attention reads (model/exact.py: chunks of 64;
        # model/exact_sdpa.py: blocks of 512, a multiple of those)
        capacity = padded_keys(max_len)
        self.k = torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def write(self, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new (B, H, T, D) keys/values and return all keys/values up to ``ctx.kv_len``."""
        if ctx.uniform_slot is not None:
            s = ctx.uniform_slot
            self.k[:, :, s : s + k.shape[2]] = k
            self.v[:, :, s : s + v.shape[2]] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[rows, :, ctx.slots] = k.transpose(1, 2)
            self.v[rows, :, ctx.slots] = v.transpose(1, 2)
        # narrow, not a slice: a compiled pass then knows the length (a slice's is a min with the capacity)
        return self.k.narrow(2, 0, ctx.kv_len), self.v.narrow(2, 0, ctx.kv_len)

    def rows(self, keep: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values of the rows ``keep``, in a slot space of ``capacity`` whole chunks."""
        k, v = self.k[keep], self.v[keep]
        pad = capacity - k.shape[2]
        if pad > 0:
            k = torch.nn.functional.pad(k, (0, 0, 0, pad))
            v = torch.nn.functional.pad(v, (0, 0, 0, pad))
        return k, v

    def whole_units(self, length: int, unit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the first ``length`` slots and what follows them up to a whole number
        of ``unit`` slots (the rest is to be masked)."""
        end = -(-length // unit) * unit
        return self.k.narrow(2, 0, end), self.v.narrow(2, 0, end)


class MambaState:
    """Conv state (last K-1 conv inputs) and SSM state of one Mamba-2 sub-layer.

    When an extension is recorded, the conv input window and the SSM state after every new
    token are kept so that ``rollback`` can return each row to any position inside it.
    """

    def __init__(self, batch: int, conv_dim: int, kernel: int, heads: int, head_dim: int, state: int, dtype, device) -> None:
        self.conv = torch.zeros(batch, conv_dim, kernel - 1, dtype=dtype, device=device)
        self.ssm = torch.zeros(batch, heads, head_dim, state, dtype=torch.float32, device=device)
        self.conv_window: torch.Tensor | None = None  # (B, conv_dim, K-1+T) of the last recorded extension
        self.ssm_history: torch.Tensor | None = None  # (B, T+1, H, P, N): state before and after each token
        self.boundary_ssm: torch.Tensor | None = None  # (B, T/every + 1, H, P, N) with boundary_every

    @classmethod
    def view(cls, conv: torch.Tensor, ssm: torch.Tensor) -> MambaState:
        """A read-only state over existing tensors (the denoiser's seeds)."""
        state = cls.__new__(cls)
        state.conv, state.ssm = conv, ssm
        state.conv_window = state.ssm_history = state.boundary_ssm = None
        return state

    def after(self, keep: torch.Tensor) -> MambaState:
        """A read-only state as it stood after the first ``keep[b]`` tokens of row b's last
        recorded extension (a fused pass seeds the denoiser there)."""
        if self.conv_window is None or self.ssm_history is None:
            raise RuntimeError("Mamba state can only roll back inside an extension made with record=True")
        k = self.conv.shape[-1]
        rows = torch.arange(keep.shape[0], device=keep.device)
        idx = keep[:, None] + torch.arange(k, device=keep.device)  # (B, K-1)
        conv = torch.gather(self.conv_window, 2, idx[:, None, :].expand(-1, self.conv.shape[1], -1)).contiguous()
        return MambaState.view(conv, self.ssm_history[rows, keep].contiguous())

    def rollback(self, keep: torch.Tensor) -> None:
        """Keep only the first ``keep[b]`` tokens of row b's last recorded extension."""
        kept = self.after(keep)
        self.conv, self.ssm = kept.conv, kept.ssm
        self.conv_window = self.ssm_history = None  # positions changed: the record no longer applies


@dataclass
class ForwardContext:
    """Everything a sub-layer needs to know about where the current tokens sit."""

    positions: torch.Tensor  # (B, T) RoPE positions
    attn_mask: torch.Tensor | None  # (B, 1, T, kv_len) bool, True = attend; None with is_causal or T == 1
    is_causal: bool = False  # no cache, no padding: let SDPA build the causal mask
    slots: torch.Tensor | None = None  # (B, T) cache slots of the new tokens; None = no cache
    uniform_slot: int | None = None  # all rows write at the same slot (fast path)
    kv_len: int = 0
    valid: torch.Tensor | None = None  # (B, T) False at left-padding positions (zeroed for Mamba)
    record: bool = False  # keep per-token Mamba states for rollback
    boundary_every: int | None = None  # keep Mamba states every this many tokens (training context pass)
    # Denoiser passes read the context tower's state and never write it:
    write: bool = True
    prefix_len: int = 0  # context key slots each query may see (masked per row by attn_mask)
    blocks: int = 1  # the T tokens of a row are this many independent blocks (Mamba restarts each)
    # where attn_mask's queries see keys out of key order (exact.key_layout), read once per
    # forward rather than per layer: a compiled layer must not read the mask's values
    # (model/compiled.py)
    key_layout: tuple[int, int] | None = None


def left_padding(valid: torch.Tensor, allow_empty_rows: bool = False) -> torch.Tensor:
    """Number of padding slots per row of a (B, T) left-padding mask (True = real token).
    Empty rows are allowed only where a cache is being filled in pieces (a prompt's context
    part may be empty while its last token still comes)."""
    if bool((valid[:, 1:].int() < valid[:, :-1].int()).any()):
        raise UsageError("attention_mask must describe left padding (zeros, then ones)")
    if not allow_empty_rows and not bool(valid[:, -1].all()):
        raise UsageError("every row needs at least one real token")
    return (~valid).sum(1)


def append_context(
    lengths: torch.Tensor,
    starts: torch.Tensor,
    num_new: int,
    valid: torch.Tensor | None = None,
    record: bool = False,
    tree: torch.Tensor | None = None,
) -> ForwardContext:
    """Context for ``num_new`` tokens written after each row's ``lengths[b]`` slots. ``tree``
    (B, T, T) bool: the new tokens are a token tree rather than a sequence, token i seeing the
    new tokens j with ``tree[b, i, j]`` (its ancestors and itself, token 0 the root) besides
    every cached one; its position is the row's next one plus its depth. A path of the tree
    then gets the keys and positions it would get as a sequence of its own (verified tree
    drafts, generate/tree.py)."""
    device = lengths.device
    slots = lengths[:, None] + torch.arange(num_new, device=device)  # (B, T)
    kv_len = int(lengths.max()) + num_new
    uniform = bool((lengths == lengths[0]).all())
    positions = slots - starts[:, None]
    if tree is not None:
        keys = torch.arange(kv_len, device=device)
        mask = ((keys >= starts[:, None, None]) & (keys < lengths[:, None, None])).expand(-1, num_new, -1).clone()
        mask.scatter_(2, slots[:, None, :].expand(-1, num_new, -1), tree)
        mask = mask[:, None]
        positions = lengths[:, None] - starts[:, None] + tree.sum(-1) - 1  # the row's next position + depth
        torch._dynamo.mark_static(mask, 1)
    elif uniform and num_new == 1 and not bool(starts.any()):
        mask = None  # a single query that sees every slot written so far
    else:
        keys = torch.arange(kv_len, device=device)
        mask = (keys <= slots[:, :, None]) & (keys >= starts[:, None, None])
        # A padding query sees no real key; let it see itself so that no row of the mask is empty
        # (some SDPA kernels return NaN there, and NaN would leak through later layers).
        mask = (mask | (keys == slots[:, :, None]))[:, None]
        torch._dynamo.mark_static(mask, 1)  # the heads axis: a broadcast, not a size (model/compiled.py)
    return ForwardContext(
        positions=positions,
        attn_mask=mask,
        slots=slots,
        uniform_slot=int(lengths[0]) if uniform else None,
        kv_len=kv_len,
        valid=valid,
        record=record,
        key_layout=key_layout(mask),
    )


class ModelCache:
    def __init__(self, config: BackboneConfig, batch: int, max_len: int, dtype=torch.float32, device="cpu") -> None:
        self.max_len = max_len
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.starts = torch.zeros(batch, dtype=torch.long, device=device)
        self.layers: list[KVCache | MambaState | None] = []
        for kind in config.layer_types:
            if kind == "attention":
                self.layers.append(
                    KVCache(batch, config.num_key_value_heads, max_len, config.head_dim, dtype, device)
                )
            elif kind == "mamba":
                m = config.mamba
                conv_dim = m.num_heads * m.head_dim + 2 * m.n_groups * m.state_size
                self.layers.append(
                    MambaState(batch, conv_dim, m.conv_kernel, m.num_heads, m.head_dim, m.state_size, dtype, device)
                )
            else:
                self.layers.append(None)

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def context(self, num_new: int, valid: torch.Tensor | None = None, record: bool = False,
                tree: torch.Tensor | None = None) -> ForwardContext:
        """Context for appending ``num_new`` tokens to every row (a token tree: append_context)."""
        if int(self.lengths.max()) + num_new > self.max_len:
            raise UsageError(
                f"cache overflow: {int(self.lengths.max())} + {num_new} tokens exceed its {self.max_len} slots"
            )
        if tree is not None and any(isinstance(s, MambaState) for s in self.layers):
            raise UsageError("a token tree needs an attention-only model: Mamba-2 states do not branch")
        return append_context(self.lengths, self.starts, num_new, valid, record, tree)

    def set_left_padding(self, valid: torch.Tensor, allow_empty_rows: bool = False) -> None:
        """Declare a fresh cache's left padding from the first call's (B, T) attention mask."""
        if bool(self.lengths.any()):
            raise UsageError("attention_mask (left padding) is only accepted on the first call on a cache")
        self.starts = left_padding(valid, allow_empty_rows)

    def advance(self, num_new: int) -> None:
        self.lengths += num_new

    def regroup(self, keep: torch.Tensor, joining: ModelCache | None = None) -> None:
        """Keep the rows ``keep`` (in that order), then append the rows of ``joining`` (a cache of
        the same model, prefilled apart): how a server's batch lets finished rows leave and new
        requests join between steps. Slot spaces stay per row, so every row's tokens, positions
        and masks are what they were; Mamba records of the last extension are dropped."""
        keep = keep.to(self.lengths.device)
        caches = [self] if joining is None else [self, joining]
        self.max_len = max(c.max_len for c in caches)
        capacity = padded_keys(self.max_len)
        every = [torch.arange(c.batch_size, device=keep.device) for c in caches]
        every[0] = keep
        self.lengths = torch.cat([c.lengths[i] for c, i in zip(caches, every)])
        self.starts = torch.cat([c.starts[i] for c, i in zip(caches, every)])
        for n, layer in enumerate(self.layers):
            parts = [c.layers[n] for c in caches]
            if isinstance(layer, KVCache):
                rows = [part.rows(i, capacity) for part, i in zip(parts, every)]
                layer.k = torch.cat([r[0] for r in rows])
                layer.v = torch.cat([r[1] for r in rows])
            elif isinstance(layer, MambaState):
                layer.conv = torch.cat([part.conv[i] for part, i in zip(parts, every)])
                layer.ssm = torch.cat([part.ssm[i] for part, i in zip(parts, every)])
                layer.conv_window = layer.ssm_history = layer.boundary_ssm = None

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the keys/values of slots ``src`` (B, n) to slots ``dst`` (B, n), row by row (a
        row with nothing to move gives src == dst): the accepted path of a token tree moved to
        the slots of a sequence (its positions were the sequence's already)."""
        rows = torch.arange(src.shape[0], device=src.device)[:, None]
        for layer in self.layers:
            if isinstance(layer, KVCache):
                layer.k[rows, :, dst] = layer.k[rows, :, src]
                layer.v[rows, :, dst] = layer.v[rows, :, src]

    def rollback(self, lengths: torch.Tensor) -> None:
        """Return every row to ``lengths[b]`` tokens (slots). Mamba layers need the last
        extension to have been recorded and the target to lie inside it."""
        lengths = lengths.to(self.lengths)
        if bool((lengths > self.lengths).any()) or bool((lengths < self.starts).any()):
            raise ValueError("rollback target outside the cached tokens")
        mamba = [s for s in self.layers if isinstance(s, MambaState)]
        if mamba:
            first = self.lengths - mamba[0].ssm_history.shape[1] + 1 if mamba[0].ssm_history is not None else None
            if first is None or bool((lengths < first).any()):
                raise ValueError("Mamba states can only roll back inside the last recorded extension")
            for s in mamba:
                s.rollback(lengths - first)
        self.lengths = lengths.clone()
