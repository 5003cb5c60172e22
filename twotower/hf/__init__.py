"""transformers integration: TwoTowerConfig / TwoTowerForCausalLM, registered with the Auto
classes on import so that ``AutoModelForCausalLM.from_pretrained(saved_dir)`` finds them."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_twotower import TwoTowerConfig
from .modeling_twotower import TwoTowerForCausalLM, TwoTowerGenerateOutput

AutoConfig.register(TwoTowerConfig.model_type, TwoTowerConfig, exist_ok=True)
AutoModelForCausalLM.register(TwoTowerConfig, TwoTowerForCausalLM, exist_ok=True)

__all__ = ["TwoTowerConfig", "TwoTowerForCausalLM", "TwoTowerGenerateOutput"]
