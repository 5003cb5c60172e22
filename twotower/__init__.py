"""twotower: a pretrained AR model as the frozen context tower of a two-tower block-diffusion
model, with a trained denoiser tower that fills blocks of tokens in parallel.

    from twotower import TwoTowerForCausalLM, DecodingSettings, decode, load_model

Names are imported on first use, so ``import twotower`` stays cheap (and the command line can
set its offline guard before transformers is imported).
"""

from importlib import import_module

_EXPORTS = {
    "TwoTowerForCausalLM": "twotower.hf",
    "TwoTowerConfig": "twotower.hf",
    "load_backbone": "twotower.checkpoints",
    "load_model": "twotower.checkpoints.two_tower",
    "DecodingSettings": "twotower.generate",
    "DecodeCallbacks": "twotower.generate",
    "DecodeOutput": "twotower.generate",
    "decode": "twotower.generate",
    "resolve_settings": "twotower.generate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'twotower' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
