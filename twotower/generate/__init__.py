from .ar import GenerationOutput, GenerationStats, generate_ar, prepare_prompts
from .sampling import Sampler

__all__ = ["GenerationOutput", "GenerationStats", "Sampler", "generate_ar", "prepare_prompts"]
