"""Saved two-tower directories: what they hold and how they are written and read.

A directory holds ``model.safetensors`` (see ``saved_state``), a transformers-style
``config.json`` (our backbone and denoiser configs as dicts, the backbone reference of the lora
flavour), ``generation_config.json`` with the decoding settings the model recommends, the
tokenizer files, and a remote-code shim that re-exports the installed package's model class, so
that ``AutoTokenizer.from_pretrained(dir)`` and ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` work offline. No model code travels with the weights.

As in the released checkpoint (whose config.json is a NemotronH config), ``model_type`` names a
backbone architecture transformers knows: its Auto classes then read the config without asking
whether to run remote code (``AutoTokenizer`` reads it first), and only ``AutoModelForCausalLM``
with ``trust_remote_code=True`` reaches our class through ``auto_map``.

Everything here reads and writes plain files; the transformers classes in ``twotower.hf`` sit on
top of it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..files import read_json, write_json
from ..model.backbone import Backbone
from ..model.config import BackboneConfig
from ..model.devices import resolve_device, warn_if_slow
from ..model.quant import DRAFTER_SCHEMES
from ..model.twotower import DenoiserConfig, TwoTower
from .load import _read_safetensors, backbone_from_state_dict, load_backbone
from .tensors import save_tensors

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
GENERATION_CONFIG = "generation_config.json"
AUTO_MAP = {"AutoModelForCausalLM": "modeling_twotower.TwoTowerForCausalLM"}
# transformers' remote-code loader imports this file, which only re-exports the installed class
SHIMS = {"modeling_twotower.py": "from twotower.hf.modeling_twotower import TwoTowerForCausalLM  # noqa: F401\n"}
# generation_config.json keys that twotower reads: the commit rule, and a preset for the dial
# the decoding preset, and the drafter load_model makes for verified decoding (quantize_drafter)
RECOMMENDED_KEYS = ("commit_rule", "verify", "fused", "steps_per_block", "block_size", "tree_nodes",
                    "quantize_drafter")


def read_json_object(path: Path) -> dict:
    """A JSON file whose top level is an object, or a CheckpointError naming the file."""
    return read_json(path, CheckpointError)


def is_two_tower_config(config: dict) -> bool:
    """A config.json that means to be a two-tower model (a damaged one included: it is then
    refused with the reason, not read as a plain backbone's)."""
    architectures = config.get("architectures")
    return "backbone_config" in config or "denoiser_config" in config or (
        isinstance(architectures, list) and "TwoTowerForCausalLM" in architectures)


def is_two_tower_dir(name_or_path: str | Path) -> bool:
    config = Path(name_or_path).expanduser() / "config.json"
    try:
        return config.is_file() and is_two_tower_config(json.loads(config.read_text()))
    except (OSError, ValueError, AttributeError):
        return False


# -- config.json -------------------------------------------------------------------------------


def mirrored_fields(backbone: BackboneConfig) -> dict:
    """Backbone facts that transformers tooling reads at the top level of config.json."""
    eos = backbone.eos_token_ids
    return {
        "vocab_size": backbone.vocab_size,
        "hidden_size": backbone.hidden_size,
        "num_hidden_layers": backbone.num_layers,
        "bos_token_id": backbone.bos_token_id,
        "pad_token_id": backbone.pad_token_id,
        "eos_token_id": (eos[0] if len(eos) == 1 else list(eos)) if eos else None,
    }


def transformers_model_type(backbone: BackboneConfig) -> str:
    """A transformers config type for config.json: NemotronH for hybrid backbones, else Llama,
    the architecture our attention backbones share (see module docstring)."""
    return "nemotron_h" if {"mamba", "moe"} & set(backbone.layer_types) else "llama"


def config_dict(model: TwoTower, backbone_ref: str | None) -> dict:
    """config.json of a saved model (what ``TwoTowerConfig`` reads too)."""
    import transformers

    return {
        "model_type": transformers_model_type(model.context.config),
        "architectures": ["TwoTowerForCausalLM"],
        "auto_map": dict(AUTO_MAP),
        "backbone": backbone_ref,
        "backbone_config": model.context.config.to_dict(),
        "denoiser_config": dataclasses.asdict(model.config),
        "dtype": str(model.context.dtype).removeprefix("torch."),
        **mirrored_fields(model.context.config),
        "use_cache": False,
        "tie_word_embeddings": False,
        "transformers_version": transformers.__version__,
    }


def model_settings(config: dict, directory: Path) -> tuple[BackboneConfig, DenoiserConfig]:
    try:
        backbone = BackboneConfig.from_dict(config["backbone_config"])
        denoiser = DenoiserConfig(**config["denoiser_config"])
    except KeyError as e:
        raise CheckpointError(f"{directory / 'config.json'} lacks {e.args[0]!r}: not a two-tower config") from e
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / 'config.json'} has invalid model settings: {e}") from e
    return backbone, denoiser


def architecture(backbone_config: dict) -> dict:
    """The settings that fix the weights' meaning; special-token ids are tokenizer settings
    (a GGUF read by another transformers version may list one more EOS id)."""
    return {k: v for k, v in backbone_config.items() if k not in ("eos_token_ids", "bos_token_id")}


# -- weights ----------------------------------------------------------------------------------


def saved_state(model: TwoTower) -> dict[str, torch.Tensor]:
    """What a saved directory holds. Full flavour: every weight (a tied LM head once, as the
    embedding). LoRA flavour: only what training changed (adapters, time conditioning, mask
    embedding), since the base weights are the unchanged AR model, loaded by reference."""
    state = model.state_dict()
    if model.config.flavour == "lora":
        trained = ("time.", "mask_embedding")
        return {k: v for k, v in state.items() if "lora_" in k or k.startswith(trained)}
    for prefix, tower in (("context.", model.context), ("denoiser_tower.", model.denoiser_tower)):
        if tower.config.tie_embeddings:
            del state[f"{prefix}lm_head.weight"]  # safetensors refuses shared storage
    return state


def load_saved_state(model: TwoTower, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Load what ``saved_state`` wrote (read from ``source``) into ``model``: exactly those
    names and shapes, else a clear error."""
    expected = set(saved_state(model))
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    try:
        model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # same names, other shapes (e.g. another LoRA rank)
        raise CheckpointError(f"{source} does not match the model: {e}") from e


# -- writing ------------------------------------------------------------------------------------


def write_weights(state: dict[str, torch.Tensor], path: Path, flavour: str) -> None:
    """A stopped save leaves the old weights, not half of new ones (see checkpoints.tensors)."""
    save_tensors(state, path, {"flavour": flavour})


def write_support_files(directory: Path, tokenizer=None, recommended: dict | None = None) -> None:
    """The files that make a directory loadable by transformers' Auto classes, offline: the
    remote-code shims, the tokenizer, and the recommended decoding settings."""
    for name, text in SHIMS.items():
        (directory / name).write_text(text)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if recommended:
        import transformers

        write_json(directory / GENERATION_CONFIG, {**recommended, "transformers_version": transformers.__version__})


def save_two_tower(model: TwoTower, directory: str | Path, backbone_ref: str | None, tokenizer=None,
                   recommended: dict | None = None) -> Path:
    """Write a saved two-tower directory. The lora flavour needs ``backbone_ref`` (a registry
    name or a path), since its base weights are not written."""
    if model.config.flavour == "lora" and not backbone_ref:
        raise CheckpointError(
            "a lora model is saved without its base weights and needs a backbone reference (a registry name or a path)"
        )
    out = Path(directory).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    write_weights(saved_state(model), out / WEIGHTS_NAME, model.config.flavour)
    write_json(out / "config.json", config_dict(model, backbone_ref))
    write_support_files(out, tokenizer, recommended)
    return out


# -- reading ------------------------------------------------------------------------------------


def recommended_decoding(directory: str | Path) -> dict:
    """The decoding settings a saved directory recommends, kept where transformers models keep
    their generation defaults (generation_config.json): ``commit_rule``, a preset of
    ``verify``, ``fused``, ``steps_per_block``, ``block_size`` and ``tree_nodes``, and the
    ``quantize_drafter`` that load_model applies when none is given."""
    path = Path(directory).expanduser() / GENERATION_CONFIG
    if not path.is_file():
        return {}
    config = read_json_object(path)
    recommended = {k: config[k] for k in RECOMMENDED_KEYS if k in config}
    kinds = {"commit_rule": str, "verify": bool, "fused": bool, "steps_per_block": int, "block_size": int,
             "tree_nodes": int, "quantize_drafter": str}
    drafter = recommended.get("quantize_drafter")
    if drafter is not None and drafter not in DRAFTER_SCHEMES:
        raise CheckpointError(f"{path}: quantize_drafter = {drafter!r} is not a drafter quantization "
                              f"({', '.join(DRAFTER_SCHEMES)})")
    for key, value in recommended.items():
        least = 0 if key == "tree_nodes" else 1
        if not isinstance(value, kinds[key]) or (kinds[key] is int and (isinstance(value, bool) or value < least)):
            raise CheckpointError(f"{path}: {key} = {value!r} is not a valid {kinds[key].__name__}")
    return recommended


def load_tokenizer(directory: Path):
    """The tokenizer saved in ``directory``, or None when there is none (a model is still usable
    with token ids alone)."""
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        # never run remote code for a tokenizer: config.json names a backbone type transformers knows
        return AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # tokenizers raise many kinds of errors on a damaged file
        log.warning("could not load the tokenizer in %s: %s", directory, e)
        return None


def load_two_tower_dir(
    directory: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[TwoTower, object | None, dict]:
    """A directory written by ``save_two_tower``, by default in the dtype it was saved in.
    The lora flavour loads its backbone by the saved reference, then the adapters on top.
    Returns the model (eval mode), its tokenizer (or None) and the parsed config.json."""
    directory = Path(directory).expanduser()
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} is not a saved two-tower directory (no config.json)")
    config = read_json_object(directory / "config.json")
    if not is_two_tower_config(config):
        raise CheckpointError(f"{directory / 'config.json'} is not a two-tower config (no backbone_config and "
                              f"denoiser_config)")
    for key in ("backbone_config", "denoiser_config"):
        if not isinstance(config.get(key), dict):
            raise CheckpointError(f"{directory / 'config.json'}: {key} is missing or not an object")
    bcfg, denoiser = model_settings(config, directory)
    if dtype is None:
        dtype = getattr(torch, str(config.get("dtype") or "float32"), None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{directory / 'config.json'}: unknown dtype {config.get('dtype')!r}")
    device = resolve_device(device)
    warn_if_slow(dtype, device.type)  # the full flavour loads no backbone, which would say it
    weights = _read_safetensors(directory)
    tokenizer = None
    if denoiser.flavour == "lora":
        if not config.get("backbone"):
            raise CheckpointError(f"{directory / 'config.json'}: a lora model needs a backbone reference (\"backbone\")")
        backbone, tokenizer = load_backbone(config["backbone"], dtype, device)
        if architecture(backbone.config.to_dict()) != architecture(config["backbone_config"]):
            raise CheckpointError(f"the backbone {config['backbone']!r} does not match the one {directory} was trained on")
    else:
        context_state = {k[len("context."):]: v for k, v in weights.items() if k.startswith("context.")}
        if bcfg.tie_embeddings and "embed_tokens.weight" in context_state:
            context_state["lm_head.weight"] = context_state["embed_tokens.weight"]  # saved once
        backbone: Backbone = backbone_from_state_dict(bcfg, context_state)
    model = TwoTower(backbone, denoiser)
    load_saved_state(model, weights, directory / WEIGHTS_NAME)
    model.to(device=device, dtype=dtype).eval()
    return model, load_tokenizer(directory) or tokenizer, config
