"""Weight-only quantization (model/quant.py): row invariance of the quantized products (what exact
inference rests on), logits of the default model against the unquantized ones, verified and
fused decoding on a quantized model == AR on that same model, the fallbacks, ``--dtype auto``."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from twotower import decode, load_model, resolve_settings
from twotower.errors import UsageError
from twotower.model import devices, quant
from twotower.model.linear import Linear
from twotower.model.quant import (
    DynamicInt8Head,
    QuantLinear,
    QuantReport,
    dynamic_int8_head_unavailable,
    quantize_backbone,
)

SCHEMES = ["int8", "int4"]


def _layer(scheme: str, n: int = 96, k: int = 128, seed: int = 0) -> tuple[Linear, QuantLinear]:
    torch.manual_seed(seed)
    linear = Linear(k, n, bias=True).requires_grad_(False)
    return linear, QuantLinear(linear, scheme, QuantReport(scheme))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_rows_product_ignores_its_batch_mates(scheme):
    _, q = _layer(scheme)
    x = torch.randn(64, 128)
    with torch.inference_mode():
        solo = torch.cat([q(x[i : i + 1]) for i in range(64)])
        for rows in (2, 3, 7, 16, 33, 64):
            assert torch.equal(q(x[:rows]), solo[:rows]), rows
        assert torch.equal(q(x.view(8, 8, 128)).view(64, -1), solo)  # (B, T, K) inputs too


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_kernel_multiplies_by_the_quantized_weights(scheme, monkeypatch):
    """The packed kernel's product == the product with the dequantized weights (the fallback's),
    up to the bf16 rounding of the activations; and those weights are near the originals."""
    linear, q = _layer(scheme)
    monkeypatch.setattr(quant, "_kernel_works", lambda scheme, device_type: False)
    report = QuantReport(scheme)
    reference = QuantLinear(linear, scheme, report)
    x = torch.randn(5, 128)
    with torch.inference_mode():
        got, want = q(x), reference(x)
    assert got.dtype == x.dtype
    assert torch.allclose(got, want, rtol=0.02, atol=0.02 * float(want.abs().max()))
    assert report.mean_rel_error < (0.01 if scheme == "int8" else 0.15)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_module_cast_keeps_the_kernels_scales(scheme):
    """``.to(dtype)`` (the fast verify drafter's cast) casts the bias but not the scales, which the kernels take
    in their compute dtype only: an fp32 cast (the fast drafter on a CPU without bf16 kernels)
    made every product fail before."""
    _, q = _layer(scheme)
    x = torch.randn(3, 128)
    with torch.inference_mode():
        want = q(x)
        q.to(torch.float32)
        assert q.scales.dtype == quant.COMPUTE_DTYPE and torch.equal(q(x), want)
        q.to(torch.bfloat16)
        assert q.scales.dtype == quant.COMPUTE_DTYPE and q.bias.dtype == torch.bfloat16
        assert torch.allclose(q(x.bfloat16()).float(), want, rtol=0.02, atol=0.02 * float(want.abs().max()))


def test_int4_recovers_a_q4_1_grid_exactly():
    """Weights that are Q4_1 blocks dequantized (code * step + minimum, codes 0..15 with both
    ends used, as llama.cpp's quantizer makes them) come back as the same codes."""
    torch.manual_seed(1)
    codes = torch.randint(0, 16, (64, 4, 32))
    codes[..., 0], codes[..., 1] = 0, 15
    step, low = torch.rand(64, 4, 1) * 0.01 + 1e-3, torch.randn(64, 4, 1) * 0.05
    weight = (codes.float() * step + low).reshape(64, 128)
    got, steps, lows = quant.quantize_int4(weight)
    assert torch.equal(got, codes.reshape(64, 128).int())
    assert torch.allclose(steps, step[..., 0], rtol=1e-6) and torch.equal(lows, low[..., 0])


def test_bad_schemes_and_shapes_are_clear_errors():
    linear = Linear(40, 16, bias=False).requires_grad_(False)
    with pytest.raises(UsageError, match="divisible by 32"):
        QuantLinear(linear, "int4", QuantReport("int4"))
    with pytest.raises(UsageError, match="unknown quantization"):
        QuantLinear(linear, "int3", QuantReport("int3"))
    with pytest.raises(UsageError, match="unknown quantization"):
        load_model("smollm2-135m", quantize="fp8")


def test_a_missing_kernel_falls_back_to_the_dequantized_weights(monkeypatch, caplog):
    linear, q = _layer("int4")
    monkeypatch.setattr(quant, "_kernel_works", lambda scheme, device_type: False)
    report = QuantReport("int4")
    fallback = QuantLinear(linear, "int4", report)
    assert "dequantized weights" in report.kernel
    x = torch.randn(3, 128)
    with torch.inference_mode():
        assert torch.allclose(fallback(x), q(x), rtol=0.02, atol=0.02)


def test_a_kernel_that_raises_is_reported_once(monkeypatch, caplog):
    quant._kernel_works.cache_clear()

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel here")

    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", broken, raising=False)
    with caplog.at_level(logging.WARNING, logger="twotower.model.quant"):
        assert quant._kernel_works("int8", "cpu") is False
    assert "no int8 kernel on cpu" in caplog.text
    monkeypatch.undo()
    quant._kernel_works.cache_clear()
    assert quant._kernel_works("int8", "cpu") is True


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("strategy", ["verified", "fused"])
def test_lossless_decoding_on_a_quantized_model_is_ar_on_it(world, scheme, strategy):
    loaded = load_model(str(world.tt), quantize=scheme)
    assert loaded.quantization.layers > 0
    assert any(isinstance(m, QuantLinear) for m in loaded.model.context.modules())
    prompts = ["the cat sat on the mat and the", "A dog ran", "and the dog ran and the cat"]
    ar = decode(loaded.model, prompts, resolve_settings(strategy="ar", max_new_tokens=20), tokenizer=loaded.tokenizer)
    out = decode(loaded.model, prompts, resolve_settings(loaded.recommended, strategy=strategy, max_new_tokens=20),
                 tokenizer=loaded.tokenizer)
    assert out.tokens == ar.tokens
    if strategy == "verified":  # some steps kept several drafted tokens: the check of a run, not of one token
        assert max(n for row in out.stats.accepted for n in row) > 1


def test_quantized_layers_are_in_both_towers_and_peft_keeps_its_adapters(world):
    loaded = load_model(str(world.tt), quantize="int4")
    tt = loaded.two_tower
    context = [m for m in tt.context.modules() if isinstance(m, QuantLinear)]
    denoiser = [m for m in tt.denoiser.modules() if isinstance(m, QuantLinear)]
    assert context and denoiser and not set(map(id, context)) & set(map(id, denoiser))
    assert tt._lora_layers and all(isinstance(layer.base_layer, QuantLinear) for layer in tt._lora_layers)
    assert not isinstance(tt.context.lm_head, QuantLinear)  # the head keeps the model's dtype


@pytest.mark.slow
@pytest.mark.parametrize("scheme,min_agreement,max_kl", [("int4", 0.98, 4e-4), ("int8", 0.95, 5e-3)])
def test_quantized_logits_of_the_default_model(scheme, min_agreement, max_kl):
    """On the held-out text: top-1 agreement with the unquantized model and mean KL(fp32 || q).
    Measured (2-core AVX2 EPYC, torch 2.13, 659 tokens): int4 98.5% / 2.3e-4, int8 96.5% /
    2.9e-3; the unquantized bf16 model gets 95.8% / 1.0e-3 on the same text. (The GGUF's
    4-bit codes come back exactly; what differs is the bf16 rounding of activations and group
    scales that the kernels' fast path takes.)"""
    from pathlib import Path

    ref_model = load_model(untrained=True, context_only=True)
    text = (Path(__file__).parents[1] / "twotower" / "eval" / "heldout.txt").read_text()
    ids = torch.tensor([ref_model.tokenizer(text)["input_ids"][:1024]])
    with torch.inference_mode():
        ref = ref_model.model(ids).float()
    quantized = load_model(untrained=True, context_only=True, quantize=scheme)
    with torch.inference_mode():
        out = quantized.model(ids).float()
    agreement = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean().item()
    assert agreement >= min_agreement and kl <= max_kl, (agreement, kl)
    assert quantized.quantization.weight_bytes_after < quantized.quantization.weight_bytes_before / 3


@pytest.mark.slow
def test_the_shipped_preset_on_int4_is_ar_on_int4():
    loaded = load_model(quantize="int4")
    prompts = [[{"role": "user", "content": "Name three rivers in Europe."}],
               [{"role": "user", "content": "Write a haiku about rain."}]]
    ar = decode(loaded.model, prompts, resolve_settings(strategy="ar", max_new_tokens=32), tokenizer=loaded.tokenizer)
    out = decode(loaded.model, prompts, resolve_settings(loaded.recommended, max_new_tokens=32),
                 tokenizer=loaded.tokenizer)
    assert out.tokens == ar.tokens and out.stats.tokens_per_nfe > 1


def test_auto_dtype_says_what_it_picked(monkeypatch):
    dtype, note = devices.auto_dtype("cpu")
    expected = torch.bfloat16 if devices.packing_available(torch.bfloat16) else torch.float32
    assert dtype == expected and note.startswith("auto:")
    monkeypatch.setattr(devices, "packing_available", lambda dt=torch.float32: True)
    assert devices.auto_dtype("cpu")[0] == torch.bfloat16
    monkeypatch.setattr(devices, "packing_available", lambda dt=torch.float32: dt == torch.float32)
    dtype, note = devices.auto_dtype("cpu")
    assert dtype == torch.float32 and "no bf16 kernels" in note


def test_auto_dtype_through_the_loader_and_the_summary_line(world):
    loaded = load_model(str(world.tt), dtype="auto", quantize="int8")
    assert loaded.dtype_note.startswith("auto:")
    assert loaded.describe_numerics().startswith(str(loaded.context.dtype).removeprefix("torch.") + " (auto:")
    assert loaded.describe_numerics().endswith("int8 weights")


def test_quantize_backbone_none_changes_nothing(world):
    loaded = load_model(str(world.tt))
    before = {n: p.data_ptr() for n, p in loaded.model.context.named_parameters()}
    report = quantize_backbone(loaded.model.context, "none")
    assert report.layers == 0 and before == {n: p.data_ptr() for n, p in loaded.model.context.named_parameters()}


def test_the_command_line_takes_quantize_and_dtype_auto(world, capsys):
    from twotower.cli import main

    code = main(["generate", "the cat", "--model", str(world.tt), "--max-new-tokens", "4", "--threads", "1",
                 "--quantize", "int4", "--dtype", "auto", "--no-stream"])
    assert code == 0
    err = capsys.readouterr().err
    assert "(auto: " in err and "int4 weights" in err
    with pytest.raises(SystemExit) as bad:
        main(["generate", "the cat", "--model", str(world.tt), "--quantize", "int3"])
    assert bad.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err


def _verified_is_ar(full, loaded) -> None:
    """Verified decoding with ``loaded``'s drafter gives ``full``'s AR tokens, with several
    drafted tokens kept in some step and rejections in others."""
    prompts = ["the cat sat on the mat and the", "A dog ran", "and the dog ran and the cat"]
    ar = decode(full.model, prompts, resolve_settings(strategy="ar", max_new_tokens=20), tokenizer=full.tokenizer)
    out = decode(loaded.model, prompts, resolve_settings(loaded.recommended, strategy="verified", max_new_tokens=20),
                 tokenizer=loaded.tokenizer)
    assert out.tokens == ar.tokens
    assert max(n for row in out.stats.accepted for n in row) > 1
    assert any(n < d + 1 for acc, dr in zip(out.stats.accepted, out.stats.drafted) for n, d in zip(acc, dr))


@pytest.mark.parametrize("drafter", ["int8", "int4"])
def test_a_quantized_drafter_checked_by_the_full_precision_ar_model_is_that_ar_model(world, drafter):
    """--quantize-drafter: the denoiser tower alone is quantized; verified decoding is then the
    unquantized AR model's output, bitwise, and only the drafts change."""
    full = load_model(str(world.tt))
    loaded = load_model(str(world.tt), quantize_drafter=drafter)
    tt = loaded.two_tower
    assert not any(isinstance(m, QuantLinear) for m in tt.context.modules())
    assert tt.merged and any(isinstance(m, QuantLinear) for m in tt.denoiser.modules())
    assert loaded.drafter_quantization.scheme == drafter and loaded.drafter_quantization.layers > 0
    assert f"{drafter} drafter" in loaded.describe_numerics() and "weights" not in loaded.describe_numerics()
    _verified_is_ar(full, loaded)
    with torch.inference_mode():  # the drafts come from other weights than the unquantized drafter's
        ids = torch.tensor([[3, 5, 7, 9, 11, 13]])
        assert not torch.equal(tt.denoiser(ids), full.model.denoiser(ids))
    with pytest.raises(UsageError, match="fused pass drafts on the context tower's weights"):
        decode(tt, ["A dog ran"], resolve_settings(loaded.recommended, strategy="fused", max_new_tokens=4),
               tokenizer=loaded.tokenizer)


def test_the_drafter_takes_the_context_scheme_unless_told_otherwise(world, capsys):
    same = load_model(str(world.tt), quantize="int4")
    assert same.drafter_quantization is None and same.model.drafter_scheme is None
    assert any(isinstance(m, QuantLinear) for m in same.model.denoiser.modules())
    own = load_model(str(world.tt), quantize="int4", quantize_drafter="none")  # a full-precision drafter
    assert not any(isinstance(m, QuantLinear) for m in own.model.denoiser.modules())
    assert own.model.drafter_scheme == "none" and "int4 weights, unquantized drafter" in own.describe_numerics()
    with pytest.raises(UsageError, match="unknown drafter quantization 'int3'"):
        load_model(str(world.tt), quantize_drafter="int3")
    from twotower.cli import main

    code = main(["generate", "the cat", "--model", str(world.tt), "--max-new-tokens", "4", "--threads", "1",
                 "--quantize-drafter", "int4", "--verify", "--no-stream"])
    assert code == 0 and "int4 drafter" in capsys.readouterr().err


def test_a_long_lived_load_compiles_the_fast_drafter_alone(world):
    """A front end that decodes many prompts with one load (serve, bench, eval) pays the fast
    drafter's compilation once; the model's own towers stay eager (they compile with compile=True
    only), so its outputs are those of a one-shot load. Nothing is compiled until the first draft."""
    from twotower.model.compiled import compile_unavailable

    reason = compile_unavailable(torch.device("cpu"))
    if reason:
        pytest.skip(f"torch.compile cannot run here: {reason}")
    loaded = load_model(str(world.tt), quantize_drafter="fast", long_lived=True)
    tt = loaded.two_tower
    assert tt.verify_drafter.tower.compiler is not None
    assert tt.context.compiler is None and tt.denoiser.compiler is None
    assert "fused kernels, compiled passes" in loaded.describe_numerics()
    assert load_model(str(world.tt), quantize_drafter="fast").two_tower.verify_drafter.tower.compiler is None


def test_a_fast_drafter_drafts_for_verified_decoding_alone(world):
    """--quantize-drafter fast: a copy of the denoiser, int4 in auto's dtype on fused kernels,
    drafts for verified decoding, whose output stays the fp32 exact AR model's; the dial and the
    fused strategy keep the model's own denoiser, so their tokens do not change either."""
    from twotower.model.devices import auto_dtype
    from twotower.model.layers import Attention

    full = load_model(str(world.tt))
    loaded = load_model(str(world.tt), quantize_drafter="fast")
    tt = loaded.two_tower
    drafter = tt.verify_drafter
    dtype = auto_dtype("cpu")[0]
    assert drafter.tower.dtype == dtype and drafter.time.t_block[1].weight.dtype == dtype
    assert any(isinstance(m, QuantLinear) for m in drafter.tower.modules())
    assert not any(m.exact for m in drafter.tower.modules() if isinstance(m, Attention))
    assert drafter.tower.compiler is None  # compiled only with compile=True (test_compiled.py)
    for tower in (tt.context, tt.denoiser):  # the model's own towers, as loaded without it
        assert tower.dtype == torch.float32 and not any(isinstance(m, QuantLinear) for m in tower.modules())
        assert all(m.exact for m in tower.modules() if isinstance(m, Attention))
    assert tt.drafter_scheme is None and loaded.drafter_quantization is None
    numerics = loaded.describe_numerics()
    head = "int8 head, " if dynamic_int8_head_unavailable() is None else ""
    assert isinstance(drafter.tower.lm_head, DynamicInt8Head) == bool(head)
    assert f"fast verify drafter: int4, {str(dtype).removeprefix('torch.')}, {head}fused kernels, eager" \
        in numerics, numerics
    with tt.drafting_to_verify():
        assert tt.denoiser is drafter.tower and tt.time is drafter.time
    assert tt.denoiser is not drafter.tower and tt.time is not drafter.time
    forwards = []
    drafter.tower.norm.register_forward_hook(lambda *_: forwards.append(1))
    _verified_is_ar(full, loaded)
    assert forwards, "verified decoding did not draft with the fast copy"
    drafted = len(forwards)
    prompts = ["the cat sat on the mat and the", "A dog ran"]
    for strategy in ("mask_diffusion", "fused", "fused_dial"):
        settings = resolve_settings(loaded.recommended, strategy=strategy, max_new_tokens=12)
        ours = decode(tt, prompts, settings, tokenizer=loaded.tokenizer).tokens
        assert ours == decode(full.model, prompts, settings, tokenizer=full.tokenizer).tokens, strategy
    assert len(forwards) == drafted, "the dial or a fused pass drafted with the verification drafter"


def test_a_model_may_recommend_its_drafter_and_an_explicit_choice_wins(world, tmp_path):
    """generation_config.json's quantize_drafter applies when load_model is given none."""
    import json
    import shutil

    directory = tmp_path / "tt"
    shutil.copytree(world.tt, directory)
    config = directory / "generation_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "quantize_drafter": "fast"}))
    assert load_model(str(directory)).model.verify_drafter is not None
    assert load_model(str(directory), quantize_drafter="none").model.verify_drafter is None
    assert load_model(str(directory), quantize_drafter="int8").model.drafter_scheme == "int8"
    assert load_model(str(world.tt)).model.verify_drafter is None


def test_a_bf16_drafter_reads_an_fp32_mamba_context(world):
    """A verify drafter (a hybrid Mamba-2 + attention denoiser copy) in bf16 over an fp32 context
    tower reads its conv and SSM states converted; verified decoding is still the fp32 AR model's."""
    from test_twotower import PERTURB, two_tower

    from twotower.generate import generate_ar, generate_mask_diffusion
    from twotower.model.twotower import VerifyDrafter

    model = two_tower("hybrid", "lora", perturb=PERTURB)
    tower, time_cond = model.denoiser_copy()
    model.verify_drafter = VerifyDrafter(tower.to(torch.bfloat16), time_cond.to(torch.bfloat16), "bf16 (test)")
    with model.drafting_to_verify():
        assert model.denoiser.dtype == torch.bfloat16 and model.context.dtype == torch.float32
    prompts = [[3, 5, 7, 9, 11], [4, 6, 8]]
    ar = generate_ar(model.context, prompts, max_new_tokens=12, eos_token_id=[]).tokens
    out = generate_mask_diffusion(model, prompts, max_new_tokens=12, verify=True, steps_per_block=1,
                                  eos_token_id=[])
    assert out.tokens == ar


@pytest.mark.skipif(dynamic_int8_head_unavailable() is not None, reason=f"{dynamic_int8_head_unavailable()}")
def test_the_drafters_int8_head_ranks_like_the_full_one():
    """DynamicInt8Head (the fast drafter's LM head on a CPU): logits within the int8 error of the
    full product, the same top token on nearly every row, in the input's dtype and shape."""
    torch.manual_seed(0)
    weight = torch.randn(512, 64) * torch.rand(512, 1)  # rows of different norms: per-row scales matter
    head = DynamicInt8Head(weight)
    x = torch.randn(2, 100, 64)
    full = x @ weight.T
    ours = head(x)
    assert ours.shape == full.shape and ours.dtype == torch.float32
    assert (ours - full).abs().max() < 0.05 * full.abs().max()
    assert (ours.argmax(-1) == full.argmax(-1)).float().mean() > 0.9
    assert head(x.bfloat16()).dtype == torch.bfloat16
    # it holds quantize_int8's codes (int8, one scale per row), packed for the engine
    packed = torch.ops.quantized.linear_unpack(head._packed)[0]
    assert torch.equal(packed.int_repr(), quant.quantize_int8(weight)[0])


def test_a_fast_drafter_keeps_its_head_where_the_quantized_engine_is_missing(world, monkeypatch, caplog):
    import twotower.checkpoints.two_tower as two_tower

    monkeypatch.setattr(two_tower, "dynamic_int8_head_unavailable", lambda: "no quantized engine (test)")
    with caplog.at_level("INFO"):
        loaded = load_model(str(world.tt), quantize_drafter="fast")
    assert not isinstance(loaded.two_tower.verify_drafter.tower.lm_head, DynamicInt8Head)
    assert "int8 head" not in loaded.describe_numerics()
    assert "keeps its" in caplog.text and "no quantized engine (test)" in caplog.text
    _verified_is_ar(load_model(str(world.tt)), loaded)


def test_a_fast_drafter_over_a_bf16_context_is_that_bf16_ar_model(world):
    """Verified decoding's exactness holds in bf16 too: a bf16 context tower checking the fast
    drafter (int4, its int8 head where the CPU has the engine) gives the bf16 AR model's tokens.
    On a CPU without bf16 kernels (AVX2 only) bf16 takes the plain, slower path; it still runs."""
    full = load_model(str(world.tt), dtype="bfloat16")
    loaded = load_model(str(world.tt), dtype="bfloat16", quantize_drafter="fast")
    assert loaded.two_tower.context.dtype == torch.bfloat16
    _verified_is_ar(full, loaded)
