"""The one loader: every front end (CLI, bench, eval, lm-eval, the transformers wrapper, the
server) turns "a model" into a model, its tokenizer and its recommended decoding settings here.

What a name or path can be, in the order it is recognised:
- a training checkpoint (``OUT/checkpoints/step-N``): the run's two towers with its weights;
- a saved two-tower directory (``save_pretrained``, ``twotower train``'s ``final/``);
- a registry name with a denoiser shipped inside this package (``twotower/weights/<name>``);
- any other backbone (registry name, ``.gguf`` file, transformers safetensors directory): with
  an untrained lora denoiser (a copy of the AR model, for the untrained baseline), or alone
  when only the AR model is wanted.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import torch

from ..errors import UsageError
from ..model.backbone import Backbone
from ..model.devices import auto_dtype, resolve_device, torch_dtype
from ..model.quant import (
    DRAFTER_SCHEMES,
    FAST_DRAFTER,
    DynamicInt8Head,
    QuantReport,
    dynamic_int8_head_unavailable,
    quantize_backbone,
)
from ..model.quant import SCHEMES as QUANT_SCHEMES
from ..model.twotower import DenoiserConfig, TwoTower, VerifyDrafter
from .build import SHIPPED_DIR, build_two_tower, denoiser_dir, shipped_denoiser
from .load import DEFAULT_MODEL, load_backbone
from .saved import is_two_tower_dir, load_two_tower_dir, recommended_decoding
from .training import is_training_checkpoint, model_from_checkpoint

__all__ = ["SHIPPED_DIR", "LoadedModel", "load_model", "shipped_denoiser", "denoiser_dir", "warn_untrained"]

log = logging.getLogger(__name__)

# ``quantize_drafter="fast"``: verified decoding drafts with a copy of the denoiser in the fastest
# numerics of this machine (TwoTower.verify_drafter), which it may take because its output is the
# context tower's whatever the drafts: int4 weights, bf16 where the device has native bf16 kernels
# (auto_dtype), on a CPU an int8 LM head with activations quantized per call (DynamicInt8Head),
# PyTorch's fused kernels instead of exact inference, compiled passes with
# ``compile`` or ``long_lived`` (a front end that decodes many prompts with one load). The dial
# keeps the model's own denoiser, whose tokens it commits. Measured on a 2-core AVX512-BF16 EPYC
# (fp32 context, the shipped preset, 5 prompts x 64 tokens, one interleaved run): int4 alone 1.18x
# our fp32 AR, + bf16 1.20x, + fused kernels 1.28x, + compiled 1.40x; on a 2-core AVX2-only EPYC
# the int8 head took the compiled drafter from 1.23x to 1.33x (drafts of 2, 5 prompts, one
# interleaved script run). The shipped denoiser recommends it (its generation_config.json).
FAST_DRAFTER_SCHEME = "int4"

UNTRAINED_NOTE = (
    "untrained denoiser: a lora denoiser initialised as a copy of the AR model (identity time "
    "conditioning), so expect about one committed token per step"
)


@dataclass
class LoadedModel:
    model: TwoTower | Backbone  # a Backbone only when the AR model alone was asked for
    tokenizer: object | None
    backbone: str | None  # the backbone's name or path (for baselines that load it themselves)
    source: str  # what the name resolved to, in words
    note: str | None = None  # set when the denoiser is untrained
    # decoding settings the model recommends (its generation_config.json), for resolve_settings
    recommended: dict = field(default_factory=dict)
    dtype_note: str | None = None  # with dtype="auto": which dtype was picked and why
    quantization: QuantReport | None = None
    drafter_quantization: QuantReport | None = None  # the denoiser tower's, when it differs from the context's
    drafter_note: str | None = None  # the fast verify drafter's numerics, in words

    def describe_numerics(self) -> str:
        """The dtype (and why, with auto) and the quantization, for summary lines."""
        text = str(self.context.dtype).removeprefix("torch.")
        if self.dtype_note:
            text += f" ({self.dtype_note})"
        if self.quantization is not None and self.quantization.scheme != "none":
            text += f", {self.quantization.scheme} weights"
        if self.drafter_quantization is not None:
            scheme = self.drafter_quantization.scheme
            text += f", {'unquantized' if scheme == 'none' else scheme} drafter"
        if self.drafter_note:
            text += f", {self.drafter_note}"
        compiler = self.context.compiler
        if compiler is not None:
            text += f", {compiler.describe()}"
        return text

    @property
    def two_tower(self) -> TwoTower | None:
        return self.model if isinstance(self.model, TwoTower) else None

    @property
    def context(self) -> Backbone:
        return self.model.context if isinstance(self.model, TwoTower) else self.model


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    *,
    untrained: bool = False,
    block_size: int = 16,
    context_only: bool = False,
    merge_adapters: bool = True,
    exact: bool = True,
    denoiser_device: str | torch.device | None = None,
    quantize: str = "none",
    quantize_drafter: str | None = None,
    compile: bool = False,
    long_lived: bool = False,
) -> LoadedModel:
    """Load ``name_or_path`` (see the module docstring) for inference, in ``dtype`` (None: the
    dtype a saved directory was saved in, else float32).

    ``untrained``: a registry model without its shipped denoiser (an untrained one of
    ``block_size`` instead). ``context_only``: a backbone is returned alone, without a
    denoiser (two-tower sources still load both towers). ``merge_adapters``: a trained lora
    denoiser gets a merged copy of the weights (faster steps, one more copy in memory); the
    same choice for every front end keeps their outputs identical. ``exact``: batch- and
    shape-invariant inference (model/exact.py), so that a prompt's output depends neither on its
    batch mates nor, under verification, on rounding; False takes PyTorch's fused kernels
    (faster, not invariant). ``denoiser_device``: the denoiser on another device than the
    context tower (``TwoTower.place_towers``; a lora denoiser then gets its merged copy, as it
    cannot share the context's weights across devices). ``quantize``: ``int8`` or ``int4``
    weight-only projections of both towers (model/quant.py), the AR model included, so that
    verified decoding is exact against the same quantized model. ``quantize_drafter``: the
    denoiser tower's own scheme (none, int8, int4), or ``"fast"`` (FAST_DRAFTER: a copy of the
    denoiser that drafts for verified decoding alone, in int4 and the device's fastest dtype and
    kernels; the dial keeps the denoiser as ``quantize`` left it); None: what the model
    recommends (its generation_config.json's ``quantize_drafter``), else ``quantize``'s.
    Verified decoding stays the context tower's AR, whatever drafts it checks, so a cheaper
    drafter buys speed, not errors; the dial commits the drafter's tokens, so a scheme of the
    denoiser tower's own changes its output. A lora denoiser then gets its merged copy to
    quantize, and fused passes (which draft on the context's weights) are refused.
    ``compile``: decoding passes
    (not prompts) through torch.compile'd spans of sub-layers in both towers (model/compiled.py):
    faster steps, the same tokens, exact among themselves though not bitwise eager; where
    compilation cannot run, a one-line note and eager. ``long_lived``: the caller decodes many
    prompts with this load (a server, a benchmark, an evaluation), so one-off costs that make
    every later decode faster are paid: the fast verify drafter is compiled (inductor's 8-24 s
    once on a 2-core CPU, at the first verified decode or a server's warm-up; its drafts then
    cost ~25% less), which a one-shot ``generate`` would never earn back. ``dtype="auto"``: bf16
    where the device has native bf16 kernels, else fp32 (``LoadedModel.dtype_note`` says which and why)."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise UsageError(f"a model is a registry name or a path, got {name_or_path!r}")
    if quantize not in QUANT_SCHEMES:
        raise UsageError(f"unknown quantization {quantize!r} (choose from {', '.join(QUANT_SCHEMES)})")
    if quantize_drafter is not None and quantize_drafter not in DRAFTER_SCHEMES:
        raise UsageError(f"unknown drafter quantization {quantize_drafter!r} (choose from {', '.join(DRAFTER_SCHEMES)})")
    saved_dtype = dtype is None
    dtype_note = None
    if isinstance(dtype, str) and dtype == "auto":
        dtype, dtype_note = auto_dtype(device)
    dtype = torch.float32 if dtype is None else torch_dtype(dtype)
    if untrained and (is_training_checkpoint(name_or_path) or is_two_tower_dir(name_or_path)):
        raise UsageError(f"{name_or_path} is a trained two-tower directory: drop the untrained option")
    if is_training_checkpoint(name_or_path):
        model, tokenizer, backbone = model_from_checkpoint(name_or_path, dtype, device)
        loaded = LoadedModel(model, tokenizer, backbone, "training checkpoint")
    elif not untrained and (directory := denoiser_dir(name_or_path)) is not None:
        model, tokenizer, config = load_two_tower_dir(directory, None if saved_dtype else dtype, device)
        source = "shipped denoiser" if directory == shipped_denoiser(name_or_path) else "saved two-tower directory"
        loaded = LoadedModel(model, tokenizer, config.get("backbone"), source, recommended=recommended_decoding(directory))
    elif context_only:
        backbone, tokenizer = load_backbone(name_or_path, dtype=dtype, device=device)
        report = quantize_backbone(backbone, quantize)
        if compile:
            backbone.compile_passes()
        return LoadedModel(backbone.set_exact(exact), tokenizer, name_or_path, "backbone", dtype_note=dtype_note,
                           quantization=report)
    else:
        model, tokenizer = build_two_tower(name_or_path, DenoiserConfig(flavour="lora", block_size=block_size),
                                           dtype, device)
        loaded = LoadedModel(model.eval(), tokenizer, name_or_path, "backbone with an untrained denoiser",
                             UNTRAINED_NOTE)
        merge_adapters = False  # merging untrained (zero) adapters would only cost memory
    if quantize_drafter is None and "quantize_drafter" in loaded.recommended:
        quantize_drafter = loaded.recommended["quantize_drafter"]  # (checked where it was read)
    fast_drafter = quantize_drafter == FAST_DRAFTER
    drafter = quantize if quantize_drafter is None or fast_drafter else quantize_drafter
    split = denoiser_device is not None and resolve_device(denoiser_device) != resolve_device(device)
    own_drafter = drafter != quantize  # the denoiser tower needs weights of its own
    if merge_adapters or split or own_drafter:
        loaded.model.merge_adapters()  # a no-op for the full flavour
    if split:
        loaded.model.place_towers(device, denoiser_device)
    if fast_drafter:  # from the weights as loaded: before quantization, before compilation
        loaded.model.verify_drafter = fast_verify_drafter(loaded.model, compile or long_lived)
        loaded.drafter_note = loaded.model.verify_drafter.note
    loaded.dtype_note = dtype_note
    if quantize != "none" or drafter != "none":
        loaded.model.requires_grad_(False)  # (a training checkpoint's full denoiser comes trainable)
    loaded.quantization = quantize_backbone(loaded.model.context, quantize)
    if loaded.model.denoiser_tower is not None:  # a full denoiser or the merged copy
        report = quantize_backbone(loaded.model.denoiser_tower, drafter)
        if own_drafter:
            loaded.drafter_quantization = report
            loaded.model.drafter_scheme = drafter
    for tower in {id(t): t for t in (loaded.model.context, loaded.model.denoiser)}.values():
        tower.set_exact(exact)
        if compile:
            tower.compile_passes()
    return loaded


def fast_verify_drafter(model: TwoTower, compile: bool = False) -> VerifyDrafter:
    """FAST_DRAFTER: a copy of the denoiser (merged, for the lora flavour) in int4, in the
    fastest dtype of the device the denoiser sits on (which ``denoiser_device`` may have made
    another than the context's), with fused kernels, on a CPU an int8 LM head where the quantized
    engine runs, compiled with ``compile``."""
    tower, time_cond = model.denoiser_copy()
    quantize_backbone(tower, FAST_DRAFTER_SCHEME)
    dtype, _ = auto_dtype(tower.device)
    tower.to(dtype).set_exact(False)
    head = ""
    if tower.device.type == "cpu":  # CUDA's bf16 head is cheap already; the engine is CPU-only
        why_not = dynamic_int8_head_unavailable()
        if why_not is None:
            tower.lm_head = DynamicInt8Head(tower.lm_head.weight)  # the embedding keeps its own copy
            head = "int8 head, "
        else:
            log.info("twotower: the fast verify drafter keeps its %s LM head: %s", dtype, why_not)
    if compile and tower.compiler is None:
        tower.compile_passes()
    passes = tower.compiler.describe() if tower.compiler is not None else "eager"
    note = f"fast verify drafter: {FAST_DRAFTER_SCHEME}, {str(dtype).removeprefix('torch.')}, " \
           f"{head}fused kernels, {passes}"
    return VerifyDrafter(tower, time_cond.to(dtype), note)


def warn_untrained(loaded: LoadedModel) -> None:
    if loaded.note:
        print(f"twotower: note: {loaded.note}", file=sys.stderr)
