"""One forward for both towers of the lora flavour: the context tower's rows and the
denoiser's rows in a single pass over the shared frozen weights (issue 17).

A decoding step of verified drafting needs the context tower over [anchor, draft] (to check the
draft and extend its cache) and the denoiser over the next block (to draft again). In the lora
flavour both towers are the same base weights, so one pass serves both: per sub-layer the rows
of the two towers go through every projection together (the weights are read once; the LoRA
delta is added on the denoiser's rows only, ``lora_rows``), and they part only where they must:

- attention: the context rows are causal and stored in the cache; the denoiser's block reads
  each row's cached keys and the first ``den_sees[b]`` context rows of this same pass, of the
  same sub-layer, then its own block, bidirectionally (DESIGN.md §1);
- Mamba-2: the context rows continue the cached state (recorded, so that the cache can roll
  back); the block is seeded with the state after the first ``den_sees[b]`` of them;
- time conditioning and the mask embedding touch the denoiser's rows only.

Every row's numbers are those of the two separate forwards (tests/test_fused.py checks the bits):
the products are row-invariant (``linear.WeightPacks``) and attention is exact per query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UsageError
from .backbone import SubLayer
from .cache import ForwardContext, MambaState, ModelCache
from .compiled import spans
from .lora_rows import lora_rows_from
from .twotower import TwoTower


@dataclass
class FusedOutput:
    ar_logits: torch.Tensor  # (R, W, V): the context tower's next-token logits after each context row
    den_logits: torch.Tensor  # (R, S, V): the denoiser's logits for its block's targets


def check_fusable(model: TwoTower) -> None:
    if model.config.flavour != "lora":
        raise UsageError("a fused pass needs the lora flavour (both towers on one set of base weights); "
                         "this denoiser is a full copy")
    if not model.config.token_shift:
        raise UsageError("a fused pass needs the token-shift block layout")
    if model.drafter_scheme is not None:
        raise UsageError(f"a fused pass drafts on the context tower's weights, and this model's drafter has its own "
                         f"({model.drafter_scheme}); load it without a separate drafter quantization to fuse")
    if model.split:
        raise UsageError(f"a fused pass runs both towers in one forward on one device; the context tower is on "
                         f"{model.context.device} and the denoiser on {model.denoiser.device}")


def _mix(layer: SubLayer, hc: torch.Tensor, hd: torch.Tensor, ctx_c: ForwardContext, ctx_d: ForwardContext,
         rope, state, den_sees: torch.Tensor) -> torch.Tensor:
    """The sub-layer's mixer over [context rows | denoiser rows] (R, W + S, H)."""
    width, block = hc.shape[1], hd.shape[1]
    h = torch.cat([hc, hd], dim=1)
    mixer = layer.mixer
    # narrow, not slices: a compiled pass then knows each part's length (model/compiled.py)
    if layer.kind == "attention":
        q, k, v = mixer.project(h, rope)
        yc = mixer.attend_projected(*(x.narrow(2, 0, width) for x in (q, k, v)), ctx_c, state)
        yd = mixer.attend_projected(*(x.narrow(2, width, block) for x in (q, k, v)), ctx_d, state)
        return mixer.o_proj(torch.cat([yc, yd], dim=1))
    if layer.kind == "mamba":
        projected = mixer.in_proj(h)
        yc = mixer.scan_projected(projected.narrow(1, 0, width), ctx_c, state)  # recorded: the seeds come from it
        seed: MambaState = state.after(den_sees)
        yd = mixer.scan_projected(projected.narrow(1, width, block), ctx_d, seed)
        return mixer.out_proj(torch.cat([yc, yd], dim=1))
    return mixer(h)  # MLP / MoE: per token


def _layers(layers: tuple, xc: torch.Tensor, xd: torch.Tensor, mods: tuple, modulate_before_norm: tuple,
            ctx_c: ForwardContext, ctx_d: ForwardContext, rope, states: tuple, den_sees: torch.Tensor):
    """A span of sub-layers over the context rows xc and the denoiser rows xd (each layer's time
    conditioning on the latter): both residual streams after it (model/compiled.py)."""
    width, block = xc.shape[1], xd.shape[1]
    for layer, (shift, scale, gate), before, state in zip(layers, mods, modulate_before_norm, states):
        hc = layer.norm(xc)
        if before:
            hd = layer.norm(xd * (1 + scale) + shift)
        else:
            hd = layer.norm(xd) * (1 + scale) + shift
        y = _mix(layer, hc, hd, ctx_c, ctx_d, rope, state, den_sees)
        xc, xd = xc + y.narrow(1, 0, width), xd + gate * y.narrow(1, width, block)
    return xc, xd


@torch.no_grad()
def fused_forward(
    model: TwoTower, ctx_ids: torch.Tensor, den_ids: torch.Tensor, t: torch.Tensor, den_sees: torch.Tensor,
    cache: ModelCache,
) -> FusedOutput:
    """The context tower over ``ctx_ids`` (R, W), appended to every row of ``cache`` (recorded:
    roll back to keep fewer), and the denoiser over the block inputs ``den_ids`` (R, S) at noise
    level ``t`` (R,), placed after each row's cached tokens and its first ``den_sees[b]``
    context rows of this pass, which is all of the context it sees. Returns both logits."""
    check_fusable(model)
    backbone = model.context
    rows, width = ctx_ids.shape
    if den_ids.shape[0] != rows or t.shape != (rows,) or den_sees.shape != (rows,):
        raise UsageError(f"a fused pass needs one block, one t and one den_sees per row ({rows} rows)")
    if bool((den_sees < 0).any()) or bool((den_sees > width).any()):
        raise UsageError(f"den_sees must lie in [0, {width}] (the context rows of the pass)")
    block = den_ids.shape[1]
    if int(cache.lengths.max()) + width + block > cache.max_len:
        raise UsageError("the fused pass runs past the end of the cache")
    backbone.check_token_ids(ctx_ids)
    device = backbone.device
    ctx_ids, den_ids, t, den_sees = ctx_ids.to(device), den_ids.to(device), t.to(device), den_sees.to(device)
    before = cache.lengths.clone()
    ctx_c = cache.context(width, record=True)
    ctx_d = model.block_context(cache, block, lengths=before + den_sees)
    xc = backbone.embed_tokens(ctx_ids)
    xd = model.embed_block(den_ids)
    cond = model.time(t)
    rope = backbone.rotary(torch.cat([ctx_c.positions, ctx_d.positions], dim=1), xc.dtype) \
        if backbone.rotary is not None else None
    with model.adapters(False), lora_rows_from(width):
        mods = [model.time.layer(cond, i, block) for i in range(len(backbone.layers))]
        for span in spans(len(backbone.layers)):
            xc, xd = backbone.run(_layers, width + block, tuple(backbone.layers[span]), xc, xd, tuple(mods[span]),
                                  tuple(model._modulate_before_norm[span]), ctx_c, ctx_d, rope,
                                  tuple(cache.layers[span]), den_sees)
        cache.advance(width)
        hidden = torch.cat([backbone.norm(xc), backbone.norm(xd)], dim=1)
        logits = backbone.lm_head(hidden)  # one product for both towers: the head is shared too
    return FusedOutput(logits[:, :width], logits[:, width:])
