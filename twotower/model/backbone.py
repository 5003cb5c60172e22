"""The backbone: embeddings -> residual sub-layers (pre-norm, mixer, add) -> norm -> LM head."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UsageError
from . import exact_sdpa
from .argmax_head import MIN_HEAD_PARAMS, certifier_for
from .cache import ForwardContext, ModelCache, append_context, left_padding
from .compiled import MAX_TOKENS, LayerCompiler, compiler_for, spans
from .config import BackboneConfig
from .layers import MLP, Attention, MoE, RMSNorm, RotaryTable
from .linear import Linear
from .mamba2 import Mamba2


class SubLayer(nn.Module):
    def __init__(self, cfg: BackboneConfig, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        if kind == "attention":
            self.mixer = Attention(cfg)
        elif kind == "mamba":
            self.mixer = Mamba2(cfg)
        elif kind == "mlp":
            self.mixer = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_activation, cfg.mlp_bias)
        else:
            self.mixer = MoE(cfg.hidden_size, cfg.moe)

    def mix(self, h: torch.Tensor, ctx: ForwardContext, rope, state) -> torch.Tensor:
        if self.kind == "attention":
            return self.mixer(h, ctx, rope, state)
        if self.kind == "mamba":
            return self.mixer(h, ctx, state)
        return self.mixer(h)

    def forward(
        self,
        x: torch.Tensor,
        ctx: ForwardContext,
        rope,
        state,
        mod: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        modulate_before_norm: bool = False,
    ) -> torch.Tensor:
        """``mod`` = (shift, scale, gate) of adaLN time conditioning (denoiser only):
        ``x + gate * mixer(modulate(norm(x)))``, or ``norm(modulate(x))`` in the released
        model's order for its Mamba and attention layers."""
        if mod is None:
            return x + self.mix(self.norm(x), ctx, rope, state)
        shift, scale, gate = mod
        if modulate_before_norm:
            h = self.norm(x * (1 + scale) + shift)
        else:
            h = self.norm(x) * (1 + scale) + shift
        return x + gate * self.mix(h, ctx, rope, state)


def run_layers(layers: tuple[SubLayer, ...], x: torch.Tensor, ctx: ForwardContext, rope, states: tuple) -> torch.Tensor:
    """Sub-layers in turn over x, each with its cache state: a span of a pass (model/compiled.py)."""
    for layer, state in zip(layers, states):
        x = layer(x, ctx, rope, state)
    return x


class Backbone(nn.Module):
    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(SubLayer(config, kind) for kind in config.layer_types)
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = (
            RotaryTable(config.rope, config.head_dim, config.max_position_embeddings)
            if config.rope is not None and "attention" in config.layer_types
            else None
        )
        self.compiler: LayerCompiler | None = None  # compile_passes
        # argmax_tokens proves greedy picks from an int8 product (model/argmax_head.py): None where
        # the head is large enough for that to pay, True always, False never (the full head)
        self.certify_argmax: bool | None = None

    def compile_passes(self, max_tokens: int = MAX_TOKENS) -> Backbone:
        """Run the sub-layers of passes with at most ``max_tokens`` tokens per row compiled
        (model/compiled.py); where torch.compile cannot run, say so once and stay eager."""
        self.compiler = compiler_for(self.device, max_tokens)
        cfg = self.config
        if "attention" in cfg.layer_types:  # the graphs read the probe's verdict: probed here, eagerly
            exact_sdpa.row_multiple(self.device, cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads)
        return self

    def run(self, fn, tokens: int, *args):
        """``fn(*args)``, a span of sub-layers over ``tokens`` tokens per row, compiled where
        ``compile_passes`` asked for it."""
        return self.compiler(fn, tokens, *args) if self.compiler is not None else fn(*args)

    def set_exact(self, exact: bool) -> Backbone:
        """Exact inference (model/exact.py: batch- and shape-invariant attention and Mamba, the
        default, and a lone row's packed products paired, linear._packed_product) or PyTorch's fused
        kernels (faster where their shapes vary, not invariant)."""
        for module in self.modules():
            if isinstance(module, Attention | Mamba2 | Linear):
                module.exact = exact
        return self

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def new_cache(self, batch: int, max_len: int) -> ModelCache:
        if max_len > self.config.max_position_embeddings:
            raise UsageError(
                f"{max_len} tokens exceed the model's context of {self.config.max_position_embeddings}"
            )
        return ModelCache(self.config, batch, max_len, dtype=self.dtype, device=self.device)

    def check_token_ids(self, input_ids: torch.Tensor) -> None:
        if torch.compiler.is_compiling():
            return  # compiled training checks its data once, when loaded; reading ids here would split the graph
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise UsageError(
                f"token ids must lie in [0, {self.config.vocab_size}); got {int(input_ids.min())}..{int(input_ids.max())}"
            )

    def hidden_states(self, input_ids: torch.Tensor, ctx: ForwardContext, cache: ModelCache | None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary(ctx.positions, x.dtype) if self.rotary is not None else None
        states = cache.layers if cache is not None else [None] * len(self.layers)
        for span in spans(len(self.layers)):
            x = self.run(run_layers, x.shape[1], tuple(self.layers[span]), x, ctx, rope, tuple(states[span]))
        return self.norm(x)

    def argmax_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """``self.lm_head(hidden).argmax(-1)`` for final hidden states (..., H), the same tokens:
        where it can, the pick is proved from an int8 product without the full head
        (model/argmax_head.py), which then runs only for the rows left unproved."""
        head = self.lm_head
        certifier = None
        if (self.certify_argmax is not False and type(head) is Linear and head.bias is None
                and hidden.dtype == torch.float32
                and (self.certify_argmax or head.weight.numel() >= MIN_HEAD_PARAMS)):
            certifier = certifier_for(head.weight)
        if certifier is None:
            return head(hidden).argmax(-1)
        return certifier(hidden.reshape(-1, hidden.shape[-1]), head).reshape(hidden.shape[:-1])

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: ModelCache | None = None,
        attention_mask: torch.Tensor | None = None,
        last_only: bool = False,
        record: bool = False,
        boundary_every: int | None = None,
        head: bool = True,
        tree: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for ``input_ids`` (B, T); with ``head=False`` the final hidden states instead.

        Without a cache: one causal pass; ``attention_mask`` (B, T) marks real tokens of
        left-padded rows. With a cache: the tokens are appended to every row (a prompt's left
        padding is given by ``attention_mask`` on the first call) and the cache advances.
        ``record`` keeps per-token Mamba states so the cache can roll back into this call;
        ``boundary_every`` keeps them every that many tokens (the denoiser's training view).
        ``tree`` (B, T, T) bool, with a cache: the tokens are a token tree, each seeing its
        ancestors (``cache.append_context``); attention-only models.
        """
        self.check_token_ids(input_ids)
        b, t = input_ids.shape
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise UsageError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {(b, t)}")
        valid = attention_mask.bool() if attention_mask is not None else None
        if tree is not None and (tree.shape != (b, t, t) or tree.dtype != torch.bool):
            raise UsageError(f"tree must be a (B, T, T) = {(b, t, t)} bool tensor, got {tuple(tree.shape)} {tree.dtype}")
        if cache is not None:
            if cache.batch_size != b:
                raise UsageError(f"a cache for {cache.batch_size} rows cannot take a batch of {b}")
            if valid is not None:
                cache.set_left_padding(valid, allow_empty_rows=True)  # more tokens may follow
            ctx = cache.context(t, valid, record, tree)
            ctx.boundary_every = boundary_every
        elif tree is not None:
            raise UsageError("a token tree extends a cache: pass one")
        elif valid is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
            ctx = ForwardContext(positions=positions, attn_mask=None, is_causal=True)
        else:
            zeros = torch.zeros(b, dtype=torch.long, device=input_ids.device)
            ctx = append_context(zeros, left_padding(valid), t, valid)
            ctx.slots = None  # nothing to write
        h = self.hidden_states(input_ids, ctx, cache)
        if cache is not None:
            cache.advance(t)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h) if head else h
