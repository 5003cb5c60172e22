"""A transformers ``PreTrainedModel`` around a TwoTower.

``forward`` is the context tower (the AR model), so perplexity scripts and transformers'
``generate()`` keep working; the two-tower decoders are explicit methods. Saved directories
hold safetensors only and open with ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` through two small shims that import this installed package.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from ..checkpoints.load import REGISTRY, CheckpointError, _read_safetensors, backbone_from_state_dict, load_backbone
from ..checkpoints.released import load_released
from ..generate import ar as ar_generate
from ..generate import diffusion
from ..model.backbone import Backbone
from ..model.devices import resolve_device, warn_if_slow
from ..model.twotower import DenoiserConfig, TwoTower
from .configuration_twotower import TwoTowerConfig

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
AUTO_MAP = {
    "AutoConfig": "configuration_twotower.TwoTowerConfig",
    "AutoModelForCausalLM": "modeling_twotower.TwoTowerForCausalLM",
}
# Written next to the weights: transformers' remote-code loader imports these files, which
# only re-export the classes of the installed package (no model code travels with weights).
SHIMS = {
    "configuration_twotower.py": "from twotower.hf.configuration_twotower import TwoTowerConfig  # noqa: F401\n",
    "modeling_twotower.py": "from twotower.hf.modeling_twotower import TwoTowerForCausalLM  # noqa: F401\n",
}
# Arguments transformers' Auto classes pass along that mean nothing for a local directory.
_HUB_KWARGS = {
    "cache_dir", "force_download", "local_files_only", "proxies", "revision", "token", "subfolder",
    "_commit_hash", "_from_auto", "_from_pipeline", "trust_remote_code", "adapter_kwargs", "code_revision",
    "use_safetensors", "resume_download", "user_agent",
}


def saved_state(model: TwoTower) -> dict[str, torch.Tensor]:
    """What a saved directory holds. Full flavour: every weight (a tied LM head once, as the
    embedding). LoRA flavour: only what training changed — adapters, time conditioning, mask
    embedding — since the base weights are the unchanged AR model, loaded by reference."""
    state = model.state_dict()
    if model.config.flavour == "lora":
        trained = ("time.", "mask_embedding")
        return {k: v for k, v in state.items() if "lora_" in k or k.startswith(trained)}
    for prefix, tower in (("context.", model.context), ("denoiser_tower.", model.denoiser_tower)):
        if tower.config.tie_embeddings:
            del state[f"{prefix}lm_head.weight"]  # safetensors refuses shared storage
    return state


def load_saved_state(model: TwoTower, weights: dict[str, torch.Tensor], directory: Path) -> None:
    """Load what ``saved_state`` wrote (read from ``directory``) into ``model``: exactly those
    names and shapes, else a clear error."""
    expected = set(saved_state(model))
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{directory / WEIGHTS_NAME} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    try:
        model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # same names, other shapes (e.g. another LoRA rank)
        raise CheckpointError(f"{directory / WEIGHTS_NAME} does not match the model: {e}") from e


def load_denoiser(model: TwoTower, name_or_path: str) -> None:
    """Start ``model``'s denoiser from a saved one: a two-tower directory, or the denoiser
    shipped for a registry model. Both must be the same kind of denoiser (flavour, LoRA rank
    and scaling, block layout, mask token) over the same backbone architecture."""
    from ..checkpoints.two_tower import denoiser_dir

    directory = denoiser_dir(name_or_path)
    if directory is None:
        raise CheckpointError(
            f"{name_or_path!r} is neither a saved two-tower directory nor a registry model with a shipped denoiser"
        )
    config = TwoTowerConfig.from_pretrained(directory)
    saved, ours = config.denoiser_settings, model.config
    fields = ("flavour", "lora_rank", "lora_alpha", "lora_targets", "token_shift", "modulation_order", "mask_token_id",
              "time_freq_dim")
    differ = [f"{f} {getattr(saved, f)!r} (ours {getattr(ours, f)!r})" for f in fields
              if getattr(saved, f) != getattr(ours, f)]
    if differ:
        raise CheckpointError(f"the denoiser in {directory} differs from this run's: {', '.join(differ)}")
    if _architecture(model.context.config.to_dict()) != _architecture(config.backbone_config):
        raise CheckpointError(f"the denoiser in {directory} was trained on another backbone architecture")
    with torch.no_grad():
        load_saved_state(model, _read_safetensors(directory), directory)


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _right_padded_or_full(mask: torch.Tensor) -> bool:
    """True when every row is ones then zeros: with causal attention no real token can see the
    padding after it, so the mask changes nothing at the real positions."""
    m = mask.bool()
    return not bool((m[:, 1:] & ~m[:, :-1]).any())


class TwoTowerForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TwoTowerConfig
    base_model_prefix = "twotower"
    main_input_name = "input_ids"

    def __init__(self, config: TwoTowerConfig, twotower: TwoTower | None = None) -> None:
        super().__init__(config)
        if twotower is None:  # from_config: a random backbone of the given shape
            twotower = TwoTower(Backbone(config.backbone_settings), config.denoiser_settings)
        self.twotower = twotower
        self.tokenizer = None  # set by from_backbone / from_pretrained when one is available
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Our modules initialise themselves (identity time conditioning, mean mask embedding);
        # transformers' generic initialisation would undo that.
        pass

    def get_input_embeddings(self) -> nn.Module:
        return self.twotower.context.embed_tokens

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_twotower(
        cls, model: TwoTower, backbone_ref: str | None = None, tokenizer=None
    ) -> TwoTowerForCausalLM:
        """Wrap an existing TwoTower. The lora flavour needs ``backbone_ref`` (a registry name
        or a path) to be saved, since its base weights are not written."""
        config = TwoTowerConfig.from_parts(model.context.config, model.config, backbone_ref)
        config.dtype = model.context.dtype
        wrapped = cls(config, model)
        wrapped.tokenizer = tokenizer
        return wrapped

    @classmethod
    def from_backbone(
        cls,
        name_or_path: str,
        flavour: str = "lora",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        **denoiser_kwargs,
    ) -> TwoTowerForCausalLM:
        """An untrained two-tower model (identity denoiser) on top of a backbone."""
        backbone, tokenizer = load_backbone(name_or_path, dtype, device)
        denoiser = DenoiserConfig(flavour=flavour, **denoiser_kwargs)
        ref = name_or_path if name_or_path in REGISTRY else str(Path(name_or_path).expanduser().resolve())
        return cls.from_twotower(TwoTower(backbone, denoiser), ref, tokenizer)

    @classmethod
    def from_released(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> TwoTowerForCausalLM:
        """A checkpoint in NVIDIA's released layout (see twotower.checkpoints.released)."""
        model, tokenizer = load_released(path, dtype, device)
        return cls.from_twotower(model, tokenizer=tokenizer)

    # ---- transformers API ---------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutput:
        """The context tower (the AR model) over the whole sequence, without a cache.
        ``attention_mask`` may describe left padding (or right padding, which changes nothing
        for a causal model). With ``labels`` the loss is the usual next-token cross-entropy
        (labels shifted inside, -100 ignored)."""
        if attention_mask is not None and _right_padded_or_full(attention_mask):
            attention_mask = None
        logits = self.twotower.context_forward(input_ids, attention_mask=attention_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask=None, **kwargs) -> dict:
        # No cache: every step is a full pass over the sequence so far.
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # ---- two-tower decoding -------------------------------------------------------------
    def generate_mask_diffusion(self, input_ids, **kwargs) -> diffusion.DiffusionOutput:
        """Block diffusion with both towers; see twotower.generate.diffusion.generate_mask_diffusion."""
        return diffusion.generate_mask_diffusion(self.twotower, input_ids, **kwargs)

    def generate_mock_ar(self, input_ids, **kwargs) -> diffusion.DiffusionOutput:
        """Both towers, one token per step (S = 1)."""
        return diffusion.generate_mock_ar(self.twotower, input_ids, **kwargs)

    def generate_ar(self, input_ids, **kwargs) -> ar_generate.GenerationOutput:
        """The context tower alone, KV-cached."""
        return ar_generate.generate_ar(self.twotower.context, input_ids, **kwargs)

    def place_towers_on_devices(self, ctx_device: str | torch.device, den_device: str | torch.device) -> TwoTowerForCausalLM:
        """Context tower on one device, denoiser (with time conditioning and mask embedding) on
        another. The denoiser reads the context's cache across devices; tokens and logits come
        back to the context device."""
        ctx_dev, den_dev = resolve_device(ctx_device), resolve_device(den_device)
        model = self.twotower
        if model.denoiser_tower is None:
            if ctx_dev != den_dev:
                raise ValueError(
                    "the lora flavour's two towers share one set of weights and cannot sit on different "
                    f"devices ({ctx_dev} and {den_dev}); use the full flavour for one tower per device"
                )
            self.to(ctx_dev)
            return self
        model.context.to(ctx_dev)
        model.denoiser_tower.to(den_dev)
        model.time.to(den_dev)
        if model.mask_embedding is not None:
            model.mask_embedding.data = model.mask_embedding.data.to(den_dev)
        return self

    # ---- saving and loading -------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """Safetensors weights (see ``saved_state``), config.json, the remote-code shims and
        the tokenizer when there is one. Other transformers options are ignored."""
        model = self.twotower
        if model.config.flavour == "lora" and not self.config.backbone:
            raise ValueError(
                "a lora model is saved without its base weights and needs a backbone reference: build it "
                "with from_backbone(...) or from_twotower(model, backbone_ref=...)"
            )
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in saved_state(model).items()}
        save_file(state, out / WEIGHTS_NAME, metadata={"format": "pt", "flavour": model.config.flavour})
        self.config.auto_map = dict(AUTO_MAP)
        self.config.architectures = [type(self).__name__]
        self.config.dtype = model.context.dtype
        self.config.save_pretrained(out)
        for name, text in SHIMS.items():
            (out / name).write_text(text)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *model_args,
        config: TwoTowerConfig | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device = "cpu",
        **kwargs,
    ) -> TwoTowerForCausalLM:
        """Load a directory written by ``save_pretrained`` (local only), by default in the dtype
        it was saved in. The lora flavour loads its backbone by the saved reference, then the
        adapters on top."""
        dtype = kwargs.pop("torch_dtype", None) or dtype
        unknown = sorted(k for k, v in kwargs.items() if k not in _HUB_KWARGS and v is not None)
        if model_args or unknown:
            raise TypeError(f"unsupported arguments for TwoTowerForCausalLM.from_pretrained: {unknown or model_args}")
        directory = Path(pretrained_model_name_or_path).expanduser()
        if not (directory / "config.json").is_file():
            raise CheckpointError(f"{directory} is not a saved two-tower directory (no config.json)")
        if config is None:
            config = TwoTowerConfig.from_pretrained(directory)
        dtype = dtype or config.dtype or torch.float32  # default: the dtype it was saved in
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        device = resolve_device(device)
        warn_if_slow(dtype, device.type)  # the full flavour loads no backbone, which would say it
        weights = _read_safetensors(directory)
        denoiser = config.denoiser_settings
        tokenizer = None
        if denoiser.flavour == "lora":
            if not config.backbone:
                raise CheckpointError(f"{directory}: a lora model needs a backbone reference in config.json")
            backbone, tokenizer = load_backbone(config.backbone, dtype, device)
            if _architecture(backbone.config.to_dict()) != _architecture(config.backbone_config):
                raise CheckpointError(
                    f"the backbone {config.backbone!r} does not match the one this model was trained on"
                )
        else:
            bcfg = config.backbone_settings
            context_state = _strip(weights, "context.")
            if bcfg.tie_embeddings and "embed_tokens.weight" in context_state:
                context_state["lm_head.weight"] = context_state["embed_tokens.weight"]  # saved once
            backbone = backbone_from_state_dict(bcfg, context_state)
        model = TwoTower(backbone, denoiser)
        load_saved_state(model, weights, directory)
        model.to(device=device, dtype=dtype).eval()
        if tokenizer is None:
            tokenizer = _load_tokenizer(directory)
        wrapped = cls(config, model)
        wrapped.tokenizer = tokenizer
        return wrapped.eval()


def _architecture(backbone_config: dict) -> dict:
    """The settings that fix the weights' meaning; special-token ids are tokenizer settings
    (a GGUF read by another transformers version may list one more EOS id)."""
    return {k: v for k, v in backbone_config.items() if k not in ("eos_token_ids", "bos_token_id")}


def _load_tokenizer(directory: Path):
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as e:  # a model is still usable with token ids alone
        log.warning("could not load the tokenizer in %s: %s", directory, e)
        return None
