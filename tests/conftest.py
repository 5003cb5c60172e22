"""Shared fixtures: a small world of real files to feed bad input to (a tiny backbone with
SmolLM2's tokenizer, a saved two-tower model, prepared data, a training run with checkpoints)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# Hypothesis: the default suite runs a bounded number of examples per property; the long run is
# `pytest -m fuzz --hypothesis-profile long` (the fuzz-marked tests, many more examples each)
_COMMON = dict(deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("default", max_examples=25, **_COMMON)
settings.register_profile("long", max_examples=2000, **_COMMON)
settings.load_profile("default")


@dataclass
class World:
    root: Path
    tokenizer: object
    backbone: Path  # a tiny Llama in transformers format with the SmolLM2 tokenizer
    tt: Path  # a saved lora two-tower model over it, recommending a preset
    data: Path  # `data prepare` output
    run: Path  # a finished training run: checkpoints/step-00000002, step-00000004 and final/

    def copy(self, name: str, dest: Path) -> Path:
        """A copy of one of the world's directories, to damage."""
        target = dest / name
        shutil.copytree(getattr(self, name), target)
        return target


def make_world(root: Path) -> World:
    """Build the world under ``root`` (a tiny model, a saved two-tower model, data, a run)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from twotower.checkpoints import checkpoint_dir
    from twotower.data.shards import prepare
    from twotower.data.sources import SourceSpec
    from twotower.hf import TwoTowerForCausalLM
    from twotower.train import TrainConfig, train

    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir("smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, initializer_range=0.3)
    backbone = root / "backbone"
    LlamaForCausalLM(config).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    model = TwoTowerForCausalLM.from_backbone(str(backbone), flavour="lora", block_size=4, lora_rank=4)
    model.recommended = {"commit_rule": "left_prefix", "verify": True, "steps_per_block": 1, "block_size": 4}
    model.save_pretrained(root / "tt")
    text = root / "text"
    text.mkdir()
    for i in range(12):
        (text / f"{i}.txt").write_text(" ".join(["the cat sat on the mat", "and the dog ran"] * (6 + i)))
    prepare([SourceSpec(str(text), "CC0")], tokenizer, root / "data", val_fraction=0.2, seed=1)
    train(TrainConfig(data=str(root / "data"), out_dir=str(root / "run"), model=str(backbone), seq_len=32,
                      block_size=8, batch_size=2, steps=4, lr=3e-3, warmup_steps=1, log_every=1, eval_every=4,
                      save_every=2, val_batches=1, val_prompts=1, bf16=False), progress=False)
    return World(root, tokenizer, backbone, root / "tt", root / "data", root / "run")


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    from twotower.checkpoints import CheckpointError, checkpoint_dir

    try:
        checkpoint_dir("smollm2-135m")
    except CheckpointError as e:
        pytest.skip(f"needs the default model's tokenizer: {e}")
    return make_world(tmp_path_factory.mktemp("world"))
