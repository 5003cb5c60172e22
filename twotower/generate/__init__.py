"""Decoding: the settings object, the registered strategies and the one entry point ``decode``,
over the decoders themselves (AR, mask diffusion, mock-AR, verified drafting)."""

from .ar import GenerationOutput, GenerationStats, generate_ar, prepare_prompts
from .decode import DecodeCallbacks, DecodeOutput, decode
from .diffusion import DiffusionOutput, DiffusionStats, StepEvent, generate_mask_diffusion, generate_mock_ar
from .sampling import Sampler
from .settings import DecodingSettings, resolve_settings
from .strategies import STRATEGIES, Strategy, modes, register

__all__ = [
    "STRATEGIES", "DecodeCallbacks", "DecodeOutput", "DecodingSettings", "DiffusionOutput", "DiffusionStats",
    "GenerationOutput", "GenerationStats", "Sampler", "StepEvent", "Strategy", "decode", "generate_ar",
    "generate_mask_diffusion", "generate_mock_ar", "modes", "prepare_prompts", "register", "resolve_settings",
]
