from twotower.hf.modeling_twotower import TwoTowerForCausalLM  # noqa: F401
