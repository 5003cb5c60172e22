"""Compiled decoding passes (model/compiled.py): the same greedy tokens as eager for AR, the
dial, verified, fused and tree decoding; lossless decoding gives compiled AR's tokens, on fp32 and
int4 weights; a row's tokens do not depend on the pass length or its batch mates; long prompts
stay eager; a missing toolchain or a failing compilation falls back to eager with one line."""

from __future__ import annotations

import logging

import pytest
import torch
from test_decoding import NO_EOS, PROMPTS
from test_twotower import PERTURB, two_tower

from twotower.generate import generate_ar, generate_mask_diffusion
from twotower.model import compiled
from twotower.model.compiled import LayerCompiler, compile_unavailable
from twotower.model.quant import quantize_backbone

REASON = compile_unavailable(torch.device("cpu"))
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"torch.compile cannot run here: {REASON}")

# compiling every pass shape of every strategy costs 10-20 minutes on 2 cores with a cold inductor
# cache: those tests are marked ``compile`` and run with ``make test-compile`` (pytest -m compile);
# the default suite keeps compiled AR == eager AR and the fallbacks
SLOW = pytest.mark.compile

STRATEGIES = {
    "ar": None,
    "dial": dict(confidence_threshold=0.5),
    "verified": dict(verify=True, steps_per_block=1),
    "fused": dict(verify=True, steps_per_block=1, fused=True),
    "fused_dial": dict(confidence_threshold=0.5, fused=True),
    "tree": dict(verify=True, steps_per_block=1, tree_nodes=4),
}


def _decode(model, strategy: str) -> list[list[int]]:
    if STRATEGIES[strategy] is None:
        return generate_ar(model.context, PROMPTS, max_new_tokens=12, **NO_EOS).tokens
    return generate_mask_diffusion(model, PROMPTS, max_new_tokens=12, **STRATEGIES[strategy], **NO_EOS).tokens


def _lora(compile: bool):
    """A perturbed lora model (drafts are rejected as well as accepted), the same for each call."""
    model = two_tower("attention", "lora", perturb=PERTURB)
    if compile:
        model.context.compile_passes()
    return model


@pytest.fixture(scope="module")
def models():
    """An eager model and its compiled twin, compiled once for the module's tests."""
    return _lora(False), _lora(True)


@pytest.mark.parametrize("strategy", [pytest.param(s, marks=SLOW) if s != "ar" else s for s in STRATEGIES])
def test_compiled_decoding_gives_eager_tokens(models, strategy):
    eager, fast = models
    assert fast.context.compiler is not None and not fast.context.compiler.failed
    assert _decode(fast, strategy) == _decode(eager, strategy)
    assert not fast.context.compiler.failed


@SLOW
def test_lossless_strategies_are_compiled_ar(models):
    _, fast = models
    ar = _decode(fast, "ar")
    assert _decode(fast, "verified") == ar == _decode(fast, "fused") == _decode(fast, "tree")
    assert not fast.context.compiler.failed  # (a failure mid-decode would compare eager with eager)


@SLOW
def test_a_compiled_rows_tokens_ignore_pass_length_and_batch_mates(models):
    """k one-token compiled steps and one k-token compiled pass over the same positions: the
    same greedy tokens and logits within 1e-5 (not bitwise: the compiler fuses a 1-token step's
    attention, which has no mask, otherwise than a masked k-token pass); a row decoded in a
    batch of mixed lengths gives the tokens it gives alone."""
    _, fast = models
    backbone = fast.context
    prompt, steps = [5, 9, 33, 12, 40, 7], [3, 44, 17, 90, 21]
    with torch.inference_mode():
        cache = backbone.new_cache(1, 32)
        backbone(torch.tensor([prompt]), cache)
        one = torch.cat([backbone(torch.tensor([[tok]]), cache) for tok in steps], dim=1)
        cache.rollback(cache.lengths - len(steps))
        many = backbone(torch.tensor([steps]), cache)
    assert torch.equal(one.argmax(-1), many.argmax(-1))
    assert torch.allclose(one, many, atol=1e-5, rtol=0)
    solo = [generate_ar(backbone, [p], max_new_tokens=10, **NO_EOS).tokens[0] for p in PROMPTS]
    assert generate_ar(backbone, PROMPTS, max_new_tokens=10, **NO_EOS).tokens == solo


@SLOW
def test_prompts_run_eager_and_decoding_steps_compiled(models, monkeypatch):
    _, fast = models
    compiler = fast.context.compiler
    calls = []
    real = compiler.__call__.__func__

    def spy(self, fn, tokens, *args):
        calls.append((tokens, tokens <= self.max_tokens and not torch.is_grad_enabled()))
        return real(self, fn, tokens, *args)

    monkeypatch.setattr(LayerCompiler, "__call__", spy)
    long_prompt = list(range(3, 3 + compiler.max_tokens + 5))
    generate_ar(fast.context, [long_prompt], max_new_tokens=3, **NO_EOS)
    assert calls[0] == (len(long_prompt), False)  # the prompt pass: eager
    assert all(c == (1, True) for c in calls[1:]) and len(calls) > 1


@SLOW
def test_compiled_int4_lossless_decoding_is_compiled_int4_ar():
    model = two_tower("attention", "lora", perturb=PERTURB)
    model.requires_grad_(False)
    quantize_backbone(model.context, "int4")
    model.context.compile_passes()
    ar = _decode(model, "ar")
    assert _decode(model, "verified") == ar == _decode(model, "fused")
    assert not model.context.compiler.failed


def test_a_missing_toolchain_means_eager_with_one_line(monkeypatch, caplog):
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    compiled._note_unavailable.cache_clear()
    model = two_tower("attention", "lora")
    with caplog.at_level(logging.WARNING, logger="twotower.model.compiled"):
        model.context.compile_passes()
        model.context.compile_passes()
    assert model.context.compiler is None
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "no C++ compiler" in notes[0] and "eager" in notes[0]
    compiled._note_unavailable.cache_clear()


def test_a_failing_compilation_falls_back_to_eager_once(monkeypatch, caplog):
    eager, broken = _lora(False), _lora(True)

    def no_compiler(fn, **kwargs):
        def fails(*args):
            raise RuntimeError("inductor: C++ compile error\ndetails")
        return fails

    monkeypatch.setattr(torch, "compile", no_compiler)
    with caplog.at_level(logging.WARNING, logger="twotower.model.compiled"):
        tokens = _decode(broken, "verified")
    assert tokens == _decode(eager, "verified")
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "RuntimeError: inductor: C++ compile error" in notes[0]
    assert broken.context.compiler.describe().startswith("compile failed, eager")


def test_load_model_compiles_both_towers_and_says_so(world):
    from twotower import load_model

    loaded = load_model(str(world.tt), compile=True)
    assert loaded.context.compiler is not None and loaded.model.denoiser.compiler is not None
    assert "compiled passes of <= 64 tokens" in loaded.describe_numerics()
    assert load_model(str(world.tt)).context.compiler is None


@SLOW
def test_a_fast_drafter_compiles_with_compile_and_verified_is_compiled_ar(world):
    """--quantize-drafter fast --compile: the verification drafter's passes compiled too, and
    verified decoding is the compiled fp32 AR model's output."""
    from test_quant import _verified_is_ar

    from twotower import load_model

    loaded = load_model(str(world.tt), quantize_drafter="fast", compile=True)
    drafter = loaded.model.verify_drafter.tower
    assert drafter.compiler is not None and "compiled passes" in loaded.describe_numerics()
    _verified_is_ar(load_model(str(world.tt), compile=True), loaded)
    assert not drafter.compiler.failed and not loaded.context.compiler.failed
