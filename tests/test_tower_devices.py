"""One tower per device: ``load_model(denoiser_device=...)``, ``TwoTower.place_towers`` and
``twotower serve --context-device/--denoiser-device``. The split itself needs a second device
(a GPU); on a CPU-only machine the refusals and the same-device path are checked."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from twotower import decode, load_model, resolve_settings
from twotower.errors import UsageError
from twotower.generate.decode import check_request
from twotower.model.twotower import TwoTower

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


def test_the_same_device_is_no_split(world):
    loaded = load_model(str(world.tt), denoiser_device="cpu")
    assert not loaded.two_tower.split and loaded.two_tower.merged


def test_fused_passes_are_refused_when_the_towers_are_split(world, monkeypatch):
    loaded = load_model(str(world.tt))
    monkeypatch.setattr(TwoTower, "split", property(lambda self: True))
    for strategy in ("fused", "fused_dial"):
        with pytest.raises(UsageError, match="one device"):
            check_request(loaded.model, [5, 6, 7], resolve_settings(strategy=strategy, max_new_tokens=4))
    check_request(loaded.model, [5, 6, 7], resolve_settings(strategy="verified", max_new_tokens=4))


def test_an_unmerged_lora_model_cannot_be_split(world):
    loaded = load_model(str(world.tt), merge_adapters=False)
    with pytest.raises(UsageError, match="share one set of weights"):
        loaded.two_tower.place_towers("cpu", "cuda" if torch.cuda.is_available() else "cpu:1")


@pytest.mark.parametrize("flag", ["--context-device", "--denoiser-device"])
def test_serve_refuses_a_missing_device_before_loading(world, flag):
    missing = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    out = subprocess.run([sys.executable, "-m", "twotower.cli", "serve", "--model", str(world.tt), flag, missing],
                         capture_output=True, text=True, timeout=120)
    said = out.stderr + out.stdout
    assert out.returncode != 0 and ("not available" in said or "does not exist" in said), said
    assert "Traceback" not in said


@needs_cuda
def test_a_denoiser_on_the_gpu_keeps_verified_decoding_lossless(world):
    split = load_model(str(world.tt), device="cpu", denoiser_device="cuda")
    assert split.two_tower.split and split.two_tower.denoiser.device.type == "cuda"
    prompts = ["The cat sat on the", "A dog"]
    verified = decode(split.model, prompts, resolve_settings(strategy="verified", max_new_tokens=16),
                      tokenizer=split.tokenizer)
    ar = decode(split.model, prompts, resolve_settings(strategy="ar", max_new_tokens=16), tokenizer=split.tokenizer)
    assert verified.tokens == ar.tokens
    dial = decode(split.model, prompts, resolve_settings(strategy="mask_diffusion", max_new_tokens=16),
                  tokenizer=split.tokenizer)
    assert all(len(t) <= 16 for t in dial.tokens)
    with pytest.raises(UsageError, match="one device"):
        decode(split.model, prompts, resolve_settings(strategy="fused", max_new_tokens=16))
