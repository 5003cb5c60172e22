"""The two towers: a frozen context tower (the AR backbone) and a denoiser tower that fills a
block of S tokens at once, reading the context tower's state of the same sub-layer.

Block semantics (AR-aligned, "token shift", DESIGN.md §1): for targets x[p..p+S-1] the block
input is [x[p-1], M, ..., M] at positions p-1..p+S-2, output i predicts x[p+i], and the denoiser
sees the context state of positions < p-1. With ``token_shift=False`` (the released model's
diffusion mode) the input is [M, ..., M] at p..p+S-1 over a context that includes x[p-1].
"""

from __future__ import annotations

import copy
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UsageError
from .backbone import Backbone
from .cache import ForwardContext, MambaState, ModelCache
from .compiled import spans
from .devices import resolve_device
from .exact import key_layout
from .lora_rows import lora_delta_on_rows
from .timecond import TimeConditioning

LORA_TARGETS = ["qkv_proj", "o_proj", "up_proj", "down_proj", "in_proj", "out_proj"]


@dataclass
class DenoiserConfig:
    flavour: str = "lora"  # "full": own copy of the backbone; "lora": shared frozen weights + LoRA
    block_size: int = 16
    mask_token_id: int | None = None  # None: an id past the vocabulary with a learned embedding
    token_shift: bool = True
    modulation_order: str = "norm_first"  # or "released": Mamba/attention modulate before the norm
    time_freq_dim: int = 256
    time_scale: float = 1000.0
    lora_rank: int = 32
    lora_alpha: float = 32.0  # alpha/r = 1: alpha/r = 2 at lr 1e-3 diverged on this backbone
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def __post_init__(self) -> None:
        def whole(value, low: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= low

        def number(value) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool) and value == value

        checks = {
            "flavour": self.flavour in ("full", "lora"), "block_size": whole(self.block_size, 1),
            "mask_token_id": self.mask_token_id is None or whole(self.mask_token_id, 0),
            "token_shift": isinstance(self.token_shift, bool),
            "modulation_order": self.modulation_order in ("norm_first", "released"),
            "time_freq_dim": whole(self.time_freq_dim, 2) and self.time_freq_dim % 2 == 0,
            "time_scale": number(self.time_scale) and self.time_scale > 0,
            "lora_rank": whole(self.lora_rank, 1), "lora_alpha": number(self.lora_alpha) and self.lora_alpha > 0,
            "lora_dropout": number(self.lora_dropout) and 0 <= self.lora_dropout < 1,
            "lora_targets": isinstance(self.lora_targets, list) and bool(self.lora_targets)
            and all(isinstance(t, str) and t for t in self.lora_targets),
        }
        bad = [f"{name}={getattr(self, name)!r}" for name, ok in checks.items() if not ok]
        if bad:
            raise UsageError(f"invalid denoiser settings: {', '.join(bad)}")


@dataclass
class VerifyDrafter:
    """A copy of the denoiser that drafts for verified decoding only (``drafting_to_verify``):
    its tower (merged for the lora flavour; quantized, cast, compiled as load_model chose) and its
    time conditioning in the tower's dtype."""

    tower: Backbone
    time: TimeConditioning
    note: str  # its numerics, in words


def _switch_adapters(layers: list, enabled: bool) -> None:
    # PEFT's enable_adapters() also flips requires_grad on every adapter, which here would
    # freeze the denoiser's trainable weights and costs ~7 ms per denoiser step on SmolLM2's
    # 120 LoRA layers; the flag it sets is all the LoRA forward reads.
    for layer in layers:
        layer._disable_adapters = not enabled


def _denoiser_layers(layers: tuple, x: torch.Tensor, ctx: ForwardContext, rope, states: tuple, mods: tuple,
                     modulate_before_norm: tuple) -> torch.Tensor:
    """A span of the denoiser's sub-layers, each with its time conditioning (model/compiled.py)."""
    for layer, state, mod, before in zip(layers, states, mods, modulate_before_norm):
        x = layer(x, ctx, rope, state, mod, before)
    return x


class TwoTower(nn.Module):
    def __init__(self, context: Backbone, config: DenoiserConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or DenoiserConfig()
        bcfg = context.config
        self.context = context.requires_grad_(False)
        # set (load_model's quantize_drafter) when the denoiser tower's weights are quantized
        # otherwise than the context's: a fused pass, which drafts on the context's, would not use them
        self.drafter_scheme: str | None = None
        # set (load_model's quantize_drafter="fast") when verified decoding drafts with a cheaper
        # copy of the denoiser (drafting_to_verify); not a submodule: never saved, never trained
        self.verify_drafter: VerifyDrafter | None = None
        if config.flavour == "full":
            self.denoiser_tower: Backbone | None = copy.deepcopy(context).requires_grad_(True)
            self._lora_layers: list = []
        else:
            self.denoiser_tower = None
            self._lora_layers = self._inject_lora(context, config)
        self.time = TimeConditioning(bcfg.hidden_size, bcfg.num_layers, config.time_freq_dim, config.time_scale)
        self.time.to(device=context.device, dtype=context.dtype)
        if config.mask_token_id is None:
            self.mask_token_id = bcfg.vocab_size
            # start from the mean token embedding: a neutral point inside the embedding cloud
            mean = context.embed_tokens.weight.detach().float().mean(0)
            self.mask_embedding: nn.Parameter | None = nn.Parameter(mean.to(context.dtype))
        else:
            if not 0 <= config.mask_token_id < bcfg.vocab_size:
                raise UsageError(f"mask_token_id {config.mask_token_id} outside the vocabulary [0, {bcfg.vocab_size})")
            self.mask_token_id = config.mask_token_id
            self.mask_embedding = None
        self._adapter_lock = threading.RLock()  # see adapters()
        self._adapters_enabled = False
        # decode() runs one call at a time per model: a call's caches and adapter state are its own
        self.decode_lock = threading.RLock()
        self.gradient_checkpointing = False  # recompute denoiser sub-layers in backward (training memory)
        released = config.modulation_order == "released"
        self._modulate_before_norm = [released and kind in ("mamba", "attention") for kind in bcfg.layer_types]

    @staticmethod
    def _inject_lora(model: Backbone, config: DenoiserConfig) -> list:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        targets = [t for t in config.lora_targets if t in present]
        if not targets:
            raise UsageError(f"none of the LoRA targets {config.lora_targets} exist in this backbone")
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=targets)
        inject_adapter_in_model(lora, model)
        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        if not all(hasattr(layer, "_disable_adapters") for layer in layers):
            raise RuntimeError("this PEFT version does not expose BaseTunerLayer._disable_adapters")
        for layer in layers:
            layer.register_forward_hook(lora_delta_on_rows)  # inert outside a fused pass (model/fused.py)
        _switch_adapters(layers, False)  # the backbone is the context tower unless told otherwise
        return layers

    # ---- towers -------------------------------------------------------------------------
    @property
    def denoiser(self) -> Backbone:
        return self.denoiser_tower if self.denoiser_tower is not None else self.context

    @property
    def merged(self) -> bool:
        return self.config.flavour == "lora" and self.denoiser_tower is not None

    @torch.no_grad()
    def merge_adapters(self) -> TwoTower:
        """Inference speed-up for the lora flavour: a second copy of the backbone with the LoRA
        deltas folded into its (packed) weights serves as the denoiser, so a denoiser step
        costs what a full-flavour step costs instead of paying for every adapter's extra small
        matmuls, at the price of one more copy of the weights. The adapters themselves stay in
        place (saving is unchanged); ``unmerge_adapters`` drops the copy again."""
        if self.config.flavour != "lora" or self.merged:
            return self
        self.denoiser_tower = self._merged_copy()
        return self

    def _merged_copy(self) -> Backbone:
        """A copy of the backbone with the LoRA deltas folded into its weights."""
        with self.adapters(True):
            copy_ = copy.deepcopy(self.context)
        for name, module in list(copy_.named_modules()):
            if module in self._lora_layers_of(copy_):
                module.merge()
                parent, _, child = name.rpartition(".")
                setattr(copy_.get_submodule(parent) if parent else copy_, child, module.get_base_layer())
        return copy_.requires_grad_(False)

    @torch.no_grad()
    def denoiser_copy(self) -> tuple[Backbone, TimeConditioning]:
        """A copy of the denoiser's own parts (its tower, merged for the lora flavour, and its time
        conditioning), to be made into a verification drafter (``VerifyDrafter``)."""
        tower = copy.deepcopy(self.denoiser_tower) if self.denoiser_tower is not None else self._merged_copy()
        return tower.requires_grad_(False), copy.deepcopy(self.time).requires_grad_(False)

    @contextmanager
    def drafting_to_verify(self):
        """Inside it the denoiser is ``verify_drafter``'s where one is set, else the model's own.
        Verified (unfused) decoding drafts in here: its output is the context tower's whatever the
        drafts, so a cheaper drafter buys speed and changes no token, while the dial, which
        commits the denoiser's own tokens, and fused passes, which draft on the context tower's
        weights, never see it. Holds ``decode_lock``: no other decode runs while the parts are
        swapped."""
        drafter = self.verify_drafter
        if drafter is None:
            yield
            return
        with self.decode_lock:
            own = self.denoiser_tower, self.time
            self.denoiser_tower, self.time = drafter.tower, drafter.time
            try:
                yield
            finally:
                self.denoiser_tower, self.time = own

    def unmerge_adapters(self) -> TwoTower:
        if self.merged:
            self.denoiser_tower = None
            self.drafter_scheme = None
        return self

    def place_towers(self, context_device: str | torch.device, denoiser_device: str | torch.device) -> TwoTower:
        """Context tower on one device, the denoiser (with time conditioning and mask embedding)
        on another: one tower per GPU, or a GPU drafting for a CPU. The denoiser reads the
        context's cache across devices (a copy of its keys and states each denoiser step);
        tokens and logits come back to the context device, where the decode loop lives. An
        unmerged lora model shares one set of weights between its towers, which must then share
        a device; fused passes (one forward of both towers) need one device too."""
        ctx_dev, den_dev = resolve_device(context_device), resolve_device(denoiser_device)
        if self.denoiser_tower is None:
            if ctx_dev != den_dev:
                raise UsageError(
                    "the lora flavour's two towers share one set of weights and cannot sit on different "
                    f"devices ({ctx_dev} and {den_dev}); merge the adapters (load_model's default) or use the "
                    "full flavour for one tower per device")
            self.to(ctx_dev)
        else:
            self.context.to(ctx_dev)
            self.denoiser_tower.to(den_dev)
            self.time.to(den_dev)
            if self.mask_embedding is not None:
                self.mask_embedding.data = self.mask_embedding.data.to(den_dev)
        if self.verify_drafter is not None:  # (not a submodule: moved here, with the denoiser)
            self.verify_drafter.tower.to(den_dev)
            self.verify_drafter.time.to(den_dev)
        return self

    @property
    def split(self) -> bool:
        """The towers sit on different devices (place_towers)."""
        return self.denoiser.device != self.context.device

    @staticmethod
    def _lora_layers_of(model: nn.Module) -> list:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @contextmanager
    def adapters(self, enabled: bool):
        """LoRA flavour: the shared backbone acts as the denoiser only inside ``adapters(True)``.

        Re-entrant: leaving restores the state found on entry. The adapter flags are shared by
        both towers, so switching them holds a lock: a context-tower forward in one thread never
        runs with the adapters another thread's denoiser step turned on. A no-op for the full
        flavour and when the adapters are merged (the denoiser is then a copy of its own)."""
        if not self._lora_layers or self.merged:
            yield
            return
        with self._adapter_lock:
            previous = self._adapters_enabled
            _switch_adapters(self._lora_layers, enabled)
            self._adapters_enabled = enabled
            try:
                yield
            finally:
                _switch_adapters(self._lora_layers, previous)
                self._adapters_enabled = previous

    def context_forward(self, input_ids: torch.Tensor, cache: ModelCache | None = None, **kwargs) -> torch.Tensor:
        """The frozen AR model (never with adapters, never with gradients)."""
        with torch.no_grad(), self.adapters(False):
            return self.context(input_ids, cache, **kwargs)

    # ---- the denoiser -------------------------------------------------------------------
    def embed_block(self, block_ids: torch.Tensor) -> torch.Tensor:
        den = self.denoiser
        if self.mask_embedding is None:
            return den.embed_tokens(block_ids)
        is_mask = block_ids == self.mask_token_id
        x = den.embed_tokens(block_ids.masked_fill(is_mask, 0))
        return torch.where(is_mask[..., None], self.mask_embedding.to(x.dtype), x)

    def denoise(
        self, block_ids: torch.Tensor, t: torch.Tensor, cache: ModelCache, ctx: ForwardContext, head: bool = True
    ) -> torch.Tensor:
        """Logits (R, T, V) for block inputs (R, T) at noise level t ((R,) or (R, blocks)),
        reading (never writing) the context tower's per-layer state in ``cache``; with
        ``head=False`` the final hidden states (R, T, H) instead."""
        den = self.denoiser
        x = self.embed_block(block_ids)
        cond = self.time(t)
        rope = den.rotary(ctx.positions, x.dtype) if den.rotary is not None else None
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        if self.merged and torch.is_grad_enabled() and self.training:
            raise UsageError("merged adapters are for inference: call unmerge_adapters() before training")
        with self.adapters(True):
            mods = [self.time.layer(cond, i, x.shape[1]) for i in range(len(den.layers))]
            if recompute:
                for i, layer in enumerate(den.layers):
                    args = (x, ctx, rope, cache.layers[i], mods[i], self._modulate_before_norm[i])
                    x = checkpoint(layer, *args, use_reentrant=False)
            else:
                for span in spans(len(den.layers)):
                    x = den.run(_denoiser_layers, x.shape[1], tuple(den.layers[span]), x, ctx, rope,
                                tuple(cache.layers[span]), tuple(mods[span]), tuple(self._modulate_before_norm[span]))
        x = den.norm(x)
        return den.lm_head(x) if head else x

    def block_context(self, cache: ModelCache, width: int, lengths: torch.Tensor | None = None) -> ForwardContext:
        """Where a block of ``width`` inputs sits after each row's cached tokens (or its first
        ``lengths[b]`` slots): positions continue the row, every input sees all of the row's
        context and the whole block."""
        device = self.denoiser.device  # the denoiser may sit on another device than the context cache
        lengths = (cache.lengths if lengths is None else lengths).to(device)
        starts = cache.starts.to(device)
        rows, prefix = lengths.shape[0], int(lengths.max())
        keys = torch.arange(prefix, device=lengths.device)
        seen = (keys >= starts[:, None]) & (keys < lengths[:, None])  # (R, prefix)
        mask = torch.cat(
            [seen[:, None, :].expand(rows, width, prefix), seen.new_ones(rows, width, width)], dim=-1
        )[:, None]
        torch._dynamo.mark_static(mask, 1)  # the heads axis: a broadcast, not a size (model/compiled.py)
        positions = (lengths - starts)[:, None] + torch.arange(width, device=lengths.device)
        return ForwardContext(positions=positions, attn_mask=mask, write=False, prefix_len=prefix,
                              key_layout=key_layout(mask))

    def denoise_block(self, block_ids: torch.Tensor, t: torch.Tensor, cache: ModelCache) -> torch.Tensor:
        """Inference: one block per row after the context in ``cache``."""
        if cache.max_len < int(cache.lengths.max()) + block_ids.shape[1]:
            raise UsageError("block runs past the end of the cache")
        device = self.denoiser.device
        logits = self.denoise(block_ids.to(device), t.to(device), cache, self.block_context(cache, block_ids.shape[1]))
        return logits.to(cache.lengths.device)  # back to the decode loop, which lives with the context

    # ---- training -----------------------------------------------------------------------
    def training_logits(self, input_ids: torch.Tensor, block_inputs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits (B, n, S, V) of every block input: see ``training_hidden``."""
        return self.denoiser.lm_head(self.training_hidden(input_ids, block_inputs, t)[0])

    def training_hidden(
        self, input_ids: torch.Tensor, block_inputs: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectorised denoiser pass over every block of a batch of clean sequences.

        ``input_ids`` (B, L) clean tokens; ``block_inputs`` (B, n, S) the noisy block inputs
        whose first input sits at position b*S; ``t`` (B, n). One causal context pass gives
        K/V for all positions and Mamba states at every block boundary (chunk size S); the
        denoiser then runs all blocks at once: block b attends to context keys < b*S and to its
        own block only, and its Mamba scans start from the context state at b*S.
        Returns the denoiser's final hidden states (B, n, S, H) and the context tower's (B, L, H),
        whose LM head gives the AR model's next-token distributions (the teacher of
        ``ar_distill``)."""
        b, n, s = block_inputs.shape
        length = input_ids.shape[1]
        if n * s > length:
            raise UsageError(f"{n} blocks of {s} need {n * s} tokens, the sequence has {length}")
        cache = self.context.new_cache(b, length)
        context_hidden = self.context_forward(input_ids, cache, boundary_every=s, head=False)
        device = input_ids.device
        view = ModelCache.__new__(ModelCache)
        view.layers = [self._block_seed(state, n, s) for state in cache.layers]
        keys = torch.arange(length, device=device)
        block_of = torch.arange(n * s, device=device) // s
        mask = torch.cat([keys[None] < (block_of * s)[:, None], block_of[:, None] == block_of[None]], dim=-1)
        ctx = ForwardContext(
            positions=torch.arange(n * s, device=device).expand(b, -1),
            attn_mask=mask[None, None],
            write=False,
            prefix_len=length,
            blocks=n,
        )
        hidden = self.denoise(block_inputs.reshape(b, n * s), t, view, ctx, head=False).view(b, n, s, -1)
        return hidden, context_hidden

    @staticmethod
    def _block_seed(state, n: int, s: int):
        if not isinstance(state, MambaState):
            return state  # KV cache: read as a prefix; None for MLP/MoE
        # conv seed of block b = the K-1 conv inputs before position b*S
        k = state.conv.shape[-1]
        conv = state.conv_window.unfold(2, k, s)[:, :, :n]  # (B, C, n, K-1)
        conv = conv.permute(0, 2, 1, 3).reshape(-1, conv.shape[1], k)
        ssm = state.boundary_ssm[:, :n].reshape(-1, *state.boundary_ssm.shape[2:])
        return MambaState.view(conv, ssm)

    def noisy_blocks(
        self, input_ids: torch.Tensor, masked: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block inputs, targets, loss mask and t for a (B, n, S) mask of hidden block inputs.

        With token shift, block b's inputs are x[bS .. bS+S-1] (input 0 never masked), its
        targets x[bS+1 .. bS+S]; the last target is never visible. t = unknown targets / S,
        exactly as at inference."""
        b, n, s = masked.shape
        shift = 1 if self.config.token_shift else 0
        if input_ids.shape[1] < n * s + shift:
            raise UsageError(f"{n} blocks of {s} need {n * s + shift} tokens (the targets are shifted by {shift}), "
                             f"the sequence has {input_ids.shape[1]}")
        inputs = input_ids[:, : n * s].reshape(b, n, s)
        targets = input_ids[:, shift : shift + n * s].reshape(b, n, s)
        if shift:
            masked = masked.clone()
            masked[..., 0] = False
            # target i is unknown when input i+1 is hidden; the last target always is
            unknown = torch.cat([masked[..., 1:], masked.new_ones(b, n, 1)], dim=-1)
        else:
            unknown = masked
        block_inputs = inputs.masked_fill(masked, self.mask_token_id)
        t = unknown.float().sum(-1) / s
        return block_inputs, targets, unknown, t

    def _counted(self, unknown: torch.Tensor, trained: torch.Tensor | None) -> torch.Tensor:
        """The unknown targets (B, n, S) that a token loss mask ``trained`` (B, L) keeps."""
        if trained is None:
            return unknown
        b, n, s = unknown.shape
        shift = 1 if self.config.token_shift else 0
        return unknown & trained[:, shift : shift + n * s].reshape(b, n, s).to(unknown.device)

    def loss_targets(
        self, input_ids: torch.Tensor, masked: torch.Tensor, trained: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, n, S) bool: the targets ``diffusion_loss`` averages over (a trainer counts them
        over its whole global batch to normalise)."""
        return self._counted(self.noisy_blocks(input_ids, masked)[2], trained)

    def ar_aligned(self, unknown: torch.Tensor) -> torch.Tensor:
        """(B, n, S) bool: each block's first unknown target. Everything before it in the block
        is visible, so the AR model's next-token distribution after the same tokens is its
        teacher; with suffix masks (nothing visible after it) that is exactly the distribution
        the denoiser should match, and it is the slot left-to-right decoding commits first."""
        aligned = unknown & (unknown.cumsum(-1) == 1)
        if not self.config.token_shift:
            aligned[:, 0, 0] = False  # the sequence's first token has no AR prediction
        return aligned

    @torch.no_grad()
    def ar_teacher_logits(self, context_hidden: torch.Tensor, aligned: torch.Tensor) -> torch.Tensor:
        """The AR model's logits (N, V) for the ``aligned`` targets (B, n, S), from the context
        tower's hidden states (B, L, H) of ``training_hidden``, in the row-major order in which
        boolean indexing lists the targets."""
        rows, blocks, slots = aligned.nonzero(as_tuple=True)
        shift = 1 if self.config.token_shift else 0
        return self.context.lm_head(context_hidden[rows, blocks * aligned.shape[-1] + slots + shift - 1])

    def diffusion_loss(
        self,
        input_ids: torch.Tensor,
        masked: torch.Tensor,
        weighting: str = "none",
        normalizer: float | None = None,
        trained: torch.Tensor | None = None,
        ar_distill: float = 0.0,
    ) -> torch.Tensor:
        """Masked-diffusion loss over all blocks of ``input_ids`` for the given (B, n, S) mask:
        cross-entropy on every target not visible in its block input; ``weighting`` "none"
        (mean over those targets, the released recipe) or "elbo" (each block's terms times 1/t).
        ``trained`` (B, L) bool limits the loss to the targets it marks (say, a chat's assistant
        turns); t still counts every unknown target, as inference sees them.
        ``normalizer`` replaces this batch's count of such targets as the divisor (a trainer
        splitting one global batch over micro-steps and processes divides by the global count).
        The LM head runs on the counted targets only: the others carry no loss.
        ``ar_distill`` > 0 adds that weight times KL(AR || denoiser) at each block's first
        unknown target (``ar_aligned``): the full distribution of the model the denoiser must
        agree with, where a sampled token gives one label."""
        if weighting not in ("none", "elbo"):
            raise UsageError(f"weighting must be 'none' or 'elbo', got {weighting!r}")
        if ar_distill < 0:
            raise UsageError(f"ar_distill must be >= 0, got {ar_distill}")
        block_inputs, targets, unknown, t = self.noisy_blocks(input_ids, masked)
        counted = self._counted(unknown, trained)
        hidden, context_hidden = self.training_hidden(input_ids, block_inputs, t)
        logits = self.denoiser.lm_head(hidden[counted])
        ce = F.cross_entropy(logits.float(), targets[counted], reduction="none")
        if weighting == "elbo":
            ce = ce / t.clamp_min(1.0 / masked.shape[-1])[..., None].expand_as(counted)[counted]
        total = ce.sum()
        if ar_distill:
            aligned = self.ar_aligned(unknown) & counted
            teacher = self.ar_teacher_logits(context_hidden, aligned).float().log_softmax(-1)
            student = logits[aligned[counted]].float().log_softmax(-1)
            total = total + ar_distill * F.kl_div(student, teacher, log_target=True, reduction="sum")
        divisor = normalizer if normalizer is not None else counted.sum().clamp_min(1)
        return total / divisor

    def forward(self, input_ids, masked, weighting: str = "none", normalizer=None, trained=None, ar_distill=0.0):
        """The training objective (so DDP/FSDP wrappers, which call forward, see the loss)."""
        return self.diffusion_loss(input_ids, masked, weighting, normalizer, trained, ar_distill)

