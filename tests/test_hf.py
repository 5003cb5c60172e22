"""transformers integration: save/load round trips (our from_pretrained and AutoModelForCausalLM
with remote code), forward() as the AR tower, HF generate(), device placement, bad files."""

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import hf_model

from twotower.checkpoints.load import CheckpointError
from twotower.checkpoints.saved import saved_state
from twotower.hf import TwoTowerConfig, TwoTowerForCausalLM

PROMPT = [[5, 9, 17, 33, 65, 129]]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Tiny transformers checkpoints on disk, loadable by reference (no hub)."""
    root = tmp_path_factory.mktemp("bases")
    for name in ("llama", "nemotron_h", "qwen2", "qwen3"):
        hf_model(name, seed=1).save_pretrained(root / name)
    return root


def trained(model: TwoTowerForCausalLM, seed: int = 0) -> TwoTowerForCausalLM:
    """Move every trainable weight (adapters, denoiser copy, time conditioning, mask embedding)
    away from its initial value, so a round trip that drops one of them shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.twotower.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def build(bases, flavour: str, base: str = "llama", **kwargs) -> TwoTowerForCausalLM:
    kwargs.setdefault("block_size", 4)
    if flavour == "lora":
        kwargs.setdefault("lora_rank", 4)
    return trained(TwoTowerForCausalLM.from_backbone(str(bases / base), flavour=flavour, **kwargs))


def outputs(model: TwoTowerForCausalLM) -> dict:
    return {
        "diffusion": model.generate_mask_diffusion(PROMPT, max_new_tokens=12, eos_token_id=[]).tolist(),
        "mock_ar": model.generate_mock_ar(PROMPT, max_new_tokens=6, eos_token_id=[]).tolist(),
        "ar": model.generate_ar(PROMPT, max_new_tokens=8, eos_token_id=[]).tolist(),
    }


def load_auto(directory, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, **kwargs)


@pytest.mark.parametrize("flavour", ["lora", "full"])
@pytest.mark.parametrize("loader", [TwoTowerForCausalLM.from_pretrained, load_auto], ids=["ours", "auto"])
def test_round_trip_identical_outputs(bases, tmp_path, flavour, loader):
    model = build(bases, flavour)
    model.save_pretrained(tmp_path)
    again = loader(tmp_path, merge_adapters=False)  # like with like: model is unmerged
    assert isinstance(again, TwoTowerForCausalLM)
    assert again.twotower.config == model.twotower.config
    saved, loaded = saved_state(model.twotower), saved_state(again.twotower)
    assert saved.keys() == loaded.keys()
    for key in saved:
        torch.testing.assert_close(loaded[key], saved[key], rtol=0, atol=0, msg=key)
    assert outputs(again) == outputs(model)


@pytest.mark.parametrize("flavour", ["lora", "full"])
def test_round_trip_tied_embeddings_and_bf16(bases, tmp_path, flavour):
    model = build(bases, flavour, "qwen2", dtype=torch.bfloat16)  # qwen2 ties its LM head
    model.save_pretrained(tmp_path)
    # like with like: merging the adapters into bf16 weights rounds them (model is unmerged)
    again = TwoTowerForCausalLM.from_pretrained(tmp_path, merge_adapters=False)
    assert again.twotower.context.dtype == torch.bfloat16
    context = again.twotower.context
    assert context.lm_head.weight is context.embed_tokens.weight
    assert outputs(again) == outputs(model)


def test_saved_directory_is_safetensors_and_shims(bases, tmp_path):
    build(bases, "full").save_pretrained(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in names and "config.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    config = json.loads((tmp_path / "config.json").read_text())
    # as the released checkpoint does, config.json names a backbone type transformers knows (so
    # AutoTokenizer/AutoConfig read it without asking about remote code); only
    # AutoModelForCausalLM goes to our class, with trust_remote_code=True
    assert config["model_type"] == "llama" and config["architectures"] == ["TwoTowerForCausalLM"]
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_twotower.TwoTowerForCausalLM"}
    shim = (tmp_path / "modeling_twotower.py").read_text()
    assert "from twotower.hf.modeling_twotower import TwoTowerForCausalLM" in shim


def test_lora_directory_holds_no_base_weights(bases, tmp_path):
    build(bases, "lora").save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k or k.startswith(("time.", "mask_embedding")) for k in keys)
    assert not [k for k in keys if "base_layer" in k or "embed_tokens" in k or "lm_head" in k]
    base_size = (bases / "llama" / "model.safetensors").stat().st_size
    # the time conditioning (~33k parameters) dominates at this tiny size
    assert (tmp_path / "model.safetensors").stat().st_size < base_size / 2
    assert json.loads((tmp_path / "config.json").read_text())["backbone"] == str(bases / "llama")


def test_lora_against_a_different_backbone_is_an_error(bases, tmp_path):
    build(bases, "lora").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["backbone"] = str(bases / "qwen3")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match"):
        TwoTowerForCausalLM.from_pretrained(tmp_path)


def test_forward_is_the_context_tower(bases):
    model = build(bases, "lora")
    ids = torch.tensor([[5, 9, 17, 33], [7, 8, 9, 10]])
    out = model(ids, labels=ids)
    expected = model.twotower.context_forward(ids)
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)
    manual = torch.nn.functional.cross_entropy(expected[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, manual)
    # right padding changes nothing for a causal model; left padding is honoured
    right = model(ids, attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])).logits
    torch.testing.assert_close(right, expected, rtol=0, atol=0)
    left = model(ids, attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])).logits
    torch.testing.assert_close(left[1, 2:], model.twotower.context_forward(ids[1:, 2:])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("base", ["llama", "nemotron_h"])
def test_hf_generate_equals_generate_ar(bases, base):
    model = build(bases, "lora", base)
    ids = torch.tensor(PROMPT)
    hf = model.generate(ids, max_new_tokens=10, do_sample=False)
    ours = model.generate_ar(ids, max_new_tokens=10)
    assert hf.tolist() == ours.tolist()


def test_from_config_builds_a_random_model(bases):
    config = build(bases, "full").config
    model = TwoTowerForCausalLM(TwoTowerConfig.from_dict(config.to_dict()))
    assert model.twotower.denoiser_tower is not None
    assert model(torch.tensor(PROMPT)).logits.shape == (1, 6, config.vocab_size)


def test_place_towers_on_cpu(bases):
    model = build(bases, "full", "nemotron_h")
    before = outputs(model)
    assert model.place_towers_on_devices("cpu", "cpu") is model
    assert outputs(model) == before
    lora = build(bases, "lora")
    lora.place_towers_on_devices("cpu", "cpu")


@pytest.mark.parametrize("flavour", ["lora", "full"])
def test_unavailable_device_is_a_clear_error(bases, flavour):
    model = build(bases, flavour)
    missing = "cuda:7" if torch.cuda.device_count() < 8 else "warp-drive"
    with pytest.raises(ValueError, match="device"):
        model.place_towers_on_devices("cpu", missing)
    with pytest.raises(ValueError, match="device"):
        model.place_towers_on_devices(missing, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_towers_on_two_devices(bases):
    model = build(bases, "full", "nemotron_h")
    ids = torch.tensor(PROMPT)
    cache = model.twotower.context.new_cache(1, 32)
    model.twotower.context_forward(ids, cache)
    block = torch.tensor([[65, 3, 3, 3]])
    t = torch.tensor([0.75])
    reference = model.twotower.denoise_block(block, t, cache)
    model.place_towers_on_devices("cpu", "cuda")
    split = model.twotower.denoise_block(block, t, cache)
    assert split.device.type == "cpu"
    torch.testing.assert_close(split, reference, rtol=1e-3, atol=1e-3)
    out = model.generate_mask_diffusion(PROMPT, max_new_tokens=8, eos_token_id=[])
    assert out.shape == (1, len(PROMPT[0]) + 8)
    with pytest.raises(ValueError, match="lora"):
        build(bases, "lora").place_towers_on_devices("cpu", "cuda")


def test_corrupt_weights_are_a_clear_error(bases, tmp_path):
    build(bases, "full").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        TwoTowerForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_auto(tmp_path)


def test_weights_of_another_model_are_a_clear_error(bases, tmp_path):
    build(bases, "lora").save_pretrained(tmp_path / "lora")
    build(bases, "lora", lora_rank=8).save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "model.safetensors").replace(tmp_path / "lora" / "model.safetensors")
    with pytest.raises(CheckpointError, match="does not match"):
        TwoTowerForCausalLM.from_pretrained(tmp_path / "lora")


def test_not_a_saved_directory(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        TwoTowerForCausalLM.from_pretrained(tmp_path)


@pytest.mark.slow
def test_default_model_lora_saves_small_and_reloads_by_name(tmp_path):
    model = trained(TwoTowerForCausalLM.from_backbone("smollm2-135m", flavour="lora"))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["backbone"] == "smollm2-135m"
    assert (tmp_path / "model.safetensors").stat().st_size < 60e6  # ~39 MB; the base weights are ~540 MB in fp32
    again = load_auto(tmp_path)
    assert again.tokenizer is not None
    ids = again.tokenizer("The capital of France is")["input_ids"]
    kwargs = dict(max_new_tokens=8, eos_token_id=[])
    assert again.generate_mask_diffusion(ids, **kwargs).tolist() == model.generate_mask_diffusion(ids, **kwargs).tolist()
