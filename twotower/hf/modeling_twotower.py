"""A transformers ``PreTrainedModel`` around a TwoTower, a drop-in for the released model's
remote-code class (DESIGN.md §1, §3).

``forward`` is the context tower (the AR model), so perplexity scripts and transformers'
``generate()`` keep working. The two-tower decoders are the released methods
``generate_mask_diffusion``, ``generate_mock_ar`` and ``generate_ar``: they take the released
arguments, apply the model's recommended decoding settings by the same rule as every other
front end (``twotower.generate.settings``), and return a LongTensor (B, prompt + new) padded on
the right with the pad (or EOS) id; ``return_dict_in_generate=True`` returns an output object
with the statistics, and the last call's NFE stays on the model as ``_last_nfe``.

Saved directories open with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
through two small shims that import this installed package (``twotower.checkpoints.saved``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput
from transformers.utils import ModelOutput

from ..checkpoints.build import build_two_tower
from ..checkpoints.load import REGISTRY
from ..checkpoints.released import load_released
from ..checkpoints.saved import save_two_tower
from ..checkpoints.two_tower import load_model
from ..errors import UsageError
from ..generate import DecodeCallbacks, DecodingSettings, StepEvent, decode, prepare_prompts, resolve_settings
from ..model.backbone import Backbone
from ..model.twotower import DenoiserConfig, TwoTower
from .configuration_twotower import TwoTowerConfig

log = logging.getLogger(__name__)

# Arguments transformers' Auto classes pass along that mean nothing for a local directory.
_HUB_KWARGS = {
    "cache_dir", "force_download", "local_files_only", "proxies", "revision", "token", "subfolder",
    "_commit_hash", "_from_auto", "_from_pipeline", "trust_remote_code", "adapter_kwargs", "code_revision",
    "use_safetensors", "resume_download", "user_agent", "low_cpu_mem_usage", "attn_implementation",
}


@dataclass
class TwoTowerGenerateOutput(ModelOutput):
    """What ``generate_*(..., return_dict_in_generate=True)`` returns."""

    sequences: torch.LongTensor | None = None  # (B, prompt + new), right-padded
    finish_reasons: list[str] | None = None  # per row: "stop" or "length"
    stats: object | None = None  # NFE, tokens per NFE, per-block steps, drafts and acceptance
    settings: DecodingSettings | None = None  # what was run, the recommendation applied


def _right_padded_or_full(mask: torch.Tensor) -> bool:
    """True when every row is ones then zeros: with causal attention no real token can see the
    padding after it, so the mask changes nothing at the real positions."""
    m = mask.bool()
    return not bool((m[:, 1:] & ~m[:, :-1]).any())


def _released_step_callback(fn, mask_id: int, steps: int):
    """Our StepEvent to the released callback signature
    ``fn(step_idx, total_steps, xt, t=..., logits=..., block_idx=...)``, called after each
    denoiser step with the block's targets so far (the mask id where still unknown)."""

    def on_step(event: StepEvent) -> None:
        xt = torch.where(event.tokens >= 0, event.tokens, mask_id)
        t = None if event.t is None else float(event.t.float().mean())
        fn(event.step, steps, xt, t=t, logits=event.logits, block_idx=event.block)

    return on_step


class TwoTowerForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TwoTowerConfig
    base_model_prefix = "twotower"
    main_input_name = "input_ids"

    def __init__(self, config: TwoTowerConfig, twotower: TwoTower | None = None) -> None:
        super().__init__(config)
        if twotower is None:  # from_config: a random backbone of the given shape
            twotower = TwoTower(Backbone(config.backbone_settings), config.denoiser_settings)
        self.twotower = twotower
        self.tokenizer = None  # set by the constructors below when one is available
        self.recommended: dict = {}  # decoding settings the saved model recommends
        self._last_nfe: int | None = None  # the last generate_* call's NFE, as the release keeps it
        self.last_stats = None  # and its statistics
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Our modules initialise themselves (identity time conditioning, mean mask embedding);
        # transformers' generic initialisation would undo that.
        pass

    def get_input_embeddings(self) -> nn.Module:
        return self.twotower.context.embed_tokens

    @property
    def mask_token_id(self) -> int:
        return self.twotower.mask_token_id

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_twotower(
        cls, model: TwoTower, backbone_ref: str | None = None, tokenizer=None, recommended: dict | None = None
    ) -> TwoTowerForCausalLM:
        """Wrap an existing TwoTower. The lora flavour needs ``backbone_ref`` (a registry name
        or a path) to be saved, since its base weights are not written."""
        config = TwoTowerConfig.from_parts(model.context.config, model.config, backbone_ref)
        config.dtype = model.context.dtype
        wrapped = cls(config, model)
        wrapped.tokenizer = tokenizer
        wrapped.recommended = dict(recommended or {})
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
        model, tokenizer = build_two_tower(name_or_path, DenoiserConfig(flavour=flavour, **denoiser_kwargs), dtype,
                                           device)
        ref = name_or_path if name_or_path in REGISTRY else str(Path(name_or_path).expanduser().resolve())
        return cls.from_twotower(model, ref, tokenizer)

    @classmethod
    def from_released(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> TwoTowerForCausalLM:
        """A checkpoint in NVIDIA's released layout (see twotower.checkpoints.released)."""
        model, tokenizer = load_released(path, dtype, device)
        return cls.from_twotower(model, tokenizer=tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *model_args,
        config: TwoTowerConfig | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device = "cpu",
        merge_adapters: bool = True,
        exact: bool = True,
        quantize: str = "none",
        quantize_drafter: str | None = None,
        compile: bool = False,
        **kwargs,
    ) -> TwoTowerForCausalLM:
        """Load for inference through twotower's one loader: a saved two-tower directory (by
        default in the dtype it was saved in), a training checkpoint, or a registry name with its
        shipped denoiser. Local files only. ``config`` (which the Auto classes pass) is not
        used: the directory's own config.json is read. A trained lora denoiser gets merged
        weights for speed (``merge_adapters=False`` keeps the adapters alone, as for training)."""
        dtype = kwargs.pop("torch_dtype", None) or dtype
        device = kwargs.pop("device_map", None) or device
        unknown = sorted(k for k, v in kwargs.items() if k not in _HUB_KWARGS and v is not None)
        if model_args or unknown:
            raise TypeError(f"unsupported arguments for TwoTowerForCausalLM.from_pretrained: {unknown or model_args}")
        dtype = None if dtype == "auto" else dtype
        loaded = load_model(str(pretrained_model_name_or_path), dtype, device, merge_adapters=merge_adapters,
                            exact=exact, quantize=quantize, quantize_drafter=quantize_drafter, compile=compile)
        if loaded.note:
            log.warning("twotower: %s", loaded.note)
        return cls.from_twotower(loaded.model, loaded.backbone, loaded.tokenizer, loaded.recommended).eval()

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """Safetensors weights, config.json, the remote-code shims, the tokenizer and the
        recommended decoding settings (see twotower.checkpoints.saved). Other transformers
        options are ignored."""
        save_two_tower(self.twotower, save_directory, self.config.backbone, self.tokenizer, self.recommended)

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

    # ---- two-tower decoding (the released methods) --------------------------------------
    def generate_mask_diffusion(
        self, input_ids, max_new_tokens: int = 128, block_size: int | None = None, steps_per_block: int | None = None,
        mask_token_id: int | None = None, temperature: float = 0.0, top_k: int | None = None,
        confidence_threshold: float | None = None, eos_token_id=None, step_callback=None, *,
        top_p: float | None = None, seed: int | None = None, commit_rule: str | None = None,
        verify: bool | None = None, attention_mask: torch.Tensor | None = None, stop_strings=None,
        return_dict_in_generate: bool = False, callback=None, fused: bool | None = None,
        tree_nodes: int | None = None,
    ):
        """Block diffusion with both towers. Options left out follow the model's recommendation
        (the shipped denoiser: verified whole-block drafts of 4 tokens, rule left_prefix); giving
        ``verify``, ``steps_per_block`` or ``confidence_threshold`` selects the plain dial;
        ``fused=True`` with verification runs one forward of both towers per step;
        ``tree_nodes=N`` checks a tree of the drafter's N likeliest continuations per step.
        ``step_callback`` has the released signature ``(step_idx, total_steps, xt, t=, logits=,
        block_idx=)``; ``callback(row, token)`` sees every token as it becomes final."""
        if mask_token_id is not None and mask_token_id != self.mask_token_id:
            raise UsageError(f"mask_token_id={mask_token_id!r} is not this model's mask token: it is "
                             f"{self.mask_token_id} (pass mask_token_id=model.mask_token_id, or leave it out)")
        settings = self._settings("mask_diffusion", max_new_tokens, temperature, top_k, top_p, seed, eos_token_id,
                                  stop_strings, block_size=block_size, steps_per_block=steps_per_block,
                                  confidence_threshold=confidence_threshold, commit_rule=commit_rule, verify=verify,
                                  fused=fused, tree_nodes=tree_nodes)
        on_step = None
        if step_callback is not None:
            steps = settings.steps_per_block or settings.block_size or self.twotower.block_size
            on_step = _released_step_callback(step_callback, self.mask_token_id, steps)
        return self._generate(input_ids, attention_mask, settings, DecodeCallbacks(callback, on_step),
                              return_dict_in_generate)

    def generate_mock_ar(
        self, input_ids, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
        top_p: float | None = None, eos_token_id=None, *, seed: int | None = None, commit_rule: str | None = None,
        attention_mask: torch.Tensor | None = None, stop_strings=None, return_dict_in_generate: bool = False,
        callback=None,
    ):
        """Both towers, one token per denoiser forward (S = 1)."""
        settings = self._settings("mock_ar", max_new_tokens, temperature, top_k, top_p, seed, eos_token_id,
                                  stop_strings, commit_rule=commit_rule)
        return self._generate(input_ids, attention_mask, settings, DecodeCallbacks(callback), return_dict_in_generate)

    def generate_ar(
        self, input_ids, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
        top_p: float | None = None, eos_token_id=None, *, seed: int | None = None,
        attention_mask: torch.Tensor | None = None, stop_strings=None, return_dict_in_generate: bool = False,
        callback=None,
    ):
        """The context tower alone, KV-cached."""
        settings = self._settings("ar", max_new_tokens, temperature, top_k, top_p, seed, eos_token_id, stop_strings)
        return self._generate(input_ids, attention_mask, settings, DecodeCallbacks(callback), return_dict_in_generate)

    def _settings(self, mode, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id, stop_strings,
                  **dial) -> DecodingSettings:
        if isinstance(eos_token_id, torch.Tensor):
            eos_token_id = eos_token_id.tolist()
        return resolve_settings(self.recommended, mode=mode, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, seed=seed, stop_token_ids=eos_token_id,
                                stop_strings=stop_strings, **dial)

    def _pad_id(self) -> int:
        for candidate in (getattr(self.tokenizer, "pad_token_id", None), self.twotower.context.config.pad_token_id):
            if candidate is not None:
                return candidate
        return self.twotower.context.config.eos_token_ids[0]

    def _generate(self, input_ids, attention_mask, settings: DecodingSettings, callbacks: DecodeCallbacks,
                  return_dict: bool):
        out = decode(self.twotower, input_ids, settings, callbacks, tokenizer=self.tokenizer,
                     attention_mask=attention_mask)
        self._last_nfe, self.last_stats = out.stats.nfe, out.stats
        pad = self._pad_id()
        if isinstance(input_ids, torch.Tensor):
            prompt = input_ids if input_ids.dim() == 2 else input_ids[None]
        else:  # lists of any lengths: left-padded, as decoding saw them
            prompt = prepare_prompts(out.prompt_ids, pad_token_id=pad).input_ids
        width = max(len(row) for row in out.tokens)
        new = torch.full((len(out.tokens), width), pad, dtype=torch.long)
        for i, row in enumerate(out.tokens):
            new[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        sequences = torch.cat([prompt.long(), new.to(prompt.device)], dim=1)
        if not return_dict:
            return sequences
        return TwoTowerGenerateOutput(sequences=sequences, finish_reasons=out.finish_reasons, stats=out.stats,
                                      settings=settings)

    def place_towers_on_devices(self, ctx_device: str | torch.device, den_device: str | torch.device) -> TwoTowerForCausalLM:
        """Context tower on one device, denoiser on another (``TwoTower.place_towers``)."""
        self.twotower.place_towers(ctx_device, den_device)
        return self
