"""The released-checkpoint loader on a tiny random checkpoint written in NVIDIA's key layout."""

import json

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import HIDDEN, backbone_from_hf, hf_model, nemotron_h_config

from twotower.checkpoints.load import CheckpointError
from twotower.checkpoints.released import load_released
from twotower.hf import TwoTowerForCausalLM

NUM_LAYERS = 6  # tiny_models.nemotron_h_config


def _backbone_keys(hf, per_expert: bool) -> dict[str, torch.Tensor]:
    """transformers NemotronH keys without the model prefix; optionally the original
    per-expert layout (``experts.{e}.up_proj.weight``) instead of the fused one."""
    out = {}
    for key, value in hf.state_dict().items():
        if key == "lm_head.weight":
            continue
        key = key.removeprefix("model.")
        if per_expert and key.endswith(("experts.up_proj", "experts.down_proj")):
            stem, proj = key.rsplit(".", 1)
            for e, w in enumerate(value):
                out[f"{stem}.{e}.{proj}.weight"] = w.clone()
            continue
        out[key] = value.clone()
    return out


def write_released(directory, extra_tensors=None, drop=()):
    """A tiny checkpoint in the released layout. Returns the source pieces for comparison."""
    ctx_hf, den_hf = hf_model("nemotron_h", seed=1), hf_model("nemotron_h", seed=2)
    gen = torch.Generator().manual_seed(3)
    time = {
        "t_embedder.mlp.0.weight": torch.randn(HIDDEN, 256, generator=gen) * 0.05,
        "t_embedder.mlp.0.bias": torch.randn(HIDDEN, generator=gen) * 0.05,
        "t_embedder.mlp.2.weight": torch.randn(HIDDEN, HIDDEN, generator=gen) * 0.1,
        "t_embedder.mlp.2.bias": torch.randn(HIDDEN, generator=gen) * 0.05,
        "t_block.1.weight": torch.randn(3 * HIDDEN, HIDDEN, generator=gen) * 0.05,
        "t_block.1.bias": torch.randn(3 * HIDDEN, generator=gen) * 0.05,
    }
    tables = [torch.randn(3, HIDDEN, generator=gen) * 0.1 for _ in range(NUM_LAYERS)]
    tensors = {f"context_tower.{k}": v for k, v in _backbone_keys(ctx_hf, per_expert=False).items()}
    tensors |= {f"denoiser_tower.{k}": v for k, v in _backbone_keys(den_hf, per_expert=True).items()}
    tensors["context_lm_head.weight"] = ctx_hf.lm_head.weight.detach().clone()
    tensors["lm_head.weight"] = den_hf.lm_head.weight.detach().clone()
    tensors |= time
    tensors |= {f"scale_shift_tables.{i}": t for i, t in enumerate(tables)}
    tensors |= extra_tensors or {}
    for key in drop:
        del tensors[key]
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors")
    config = nemotron_h_config().to_dict() | {"mask_token_id": 3, "block_size": 16}
    (directory / "config.json").write_text(json.dumps(config))
    return ctx_hf, den_hf, time, tables


def test_every_tensor_lands_in_place(tmp_path):
    ctx_hf, den_hf, time, tables = write_released(tmp_path)
    model, tokenizer = load_released(tmp_path)
    assert tokenizer is None
    cfg = model.config
    assert (cfg.flavour, cfg.mask_token_id, cfg.token_shift, cfg.modulation_order) == ("full", 3, False, "released")
    assert model.mask_embedding is None and model.mask_token_id == 3
    for ours, hf in ((model.context, ctx_hf), (model.denoiser_tower, den_hf)):
        expected = backbone_from_hf(hf).state_dict()
        got = ours.state_dict()
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    assert model.denoiser_tower is not model.context
    time_sd = model.time.state_dict()
    for key, value in time.items():
        torch.testing.assert_close(time_sd[key], value, rtol=0, atol=0)
    torch.testing.assert_close(time_sd["scale_shift_tables"], torch.stack(tables), rtol=0, atol=0)
    # the context tower is the released context model
    ids = torch.tensor([[5, 9, 17, 33, 65, 129, 200]])
    with torch.no_grad():
        torch.testing.assert_close(model.context_forward(ids), ctx_hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_no_shift_mask_diffusion_runs(tmp_path):
    write_released(tmp_path)
    model = TwoTowerForCausalLM.from_released(tmp_path)
    out = model.generate_mask_diffusion([[5, 9, 17, 33, 65]], max_new_tokens=20, eos_token_id=[],
                                        return_dict_in_generate=True)
    new = out.sequences[0, 5:].tolist()
    assert len(new) == 20 and model._last_nfe == out.stats.nfe
    assert all(0 <= tok < model.config.vocab_size for tok in new)
    assert len(out.stats.block_steps[0]) == 2  # two blocks of 16 targets
    assert 0 not in out.stats.block_steps[0] and max(out.stats.block_steps[0]) <= 16


def test_released_model_saves_and_reloads(tmp_path):
    write_released(tmp_path / "released")
    model = TwoTowerForCausalLM.from_released(tmp_path / "released")
    model.save_pretrained(tmp_path / "saved")
    again = TwoTowerForCausalLM.from_pretrained(tmp_path / "saved")
    assert again.twotower.config == model.twotower.config
    prompt = [[5, 9, 17, 33, 65]]
    kwargs = dict(max_new_tokens=20, eos_token_id=[])
    assert again.generate_mask_diffusion(prompt, **kwargs).tolist() == model.generate_mask_diffusion(prompt, **kwargs).tolist()


def test_unexpected_tensor_is_an_error(tmp_path):
    write_released(tmp_path, extra_tensors={"something_else.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        load_released(tmp_path)


def test_missing_modulation_table_is_an_error(tmp_path):
    write_released(tmp_path, drop=["scale_shift_tables.4"])
    with pytest.raises(CheckpointError, match="scale_shift_tables"):
        load_released(tmp_path)


def test_missing_denoiser_head_is_an_error(tmp_path):
    write_released(tmp_path, drop=["lm_head.weight"])
    with pytest.raises(CheckpointError, match="lm_head"):
        load_released(tmp_path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_released(tmp_path)
