"""The command line: real text from the default model, and clear errors without tracebacks."""

import json
import subprocess
import sys

import pytest

from twotower.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twotower.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_prints_continuation_and_summary():
    r = run_cli("generate", "The capital of France is", "--max-new-tokens", "8", "--threads", "1", "--mode", "ar")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "[ar] 8 tokens" in r.stderr and "tokens/s" in r.stderr
    assert "Traceback" not in r.stderr


def test_generate_defaults_to_mask_diffusion_with_the_shipped_denoiser():
    r = run_cli("generate", "What is the capital of France?", "--chat", "--max-new-tokens", "16", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "[mask_diffusion] 8 tokens" in r.stderr and "tokens/NFE" in r.stderr  # AR's answer, EOS included
    # the shipped denoiser's recommendation: verified whole-block drafts with the left_prefix rule
    assert "verified drafts of 2 tokens, rule left_prefix" in r.stderr
    assert "untrained" not in r.stderr  # the shipped denoiser was loaded


def test_any_dial_option_replaces_the_recommended_preset():
    """Giving the threshold (or --verify / --no-verify, --steps-per-block) means the plain dial:
    unverified unless asked, every step of the block, the commit rule still the model's."""
    r = run_cli("generate", "What is the capital of France?", "--chat", "--max-new-tokens", "8", "--threads", "1",
                "--confidence-threshold", "0.9")
    assert r.returncode == 0, r.stderr
    assert "block 16, threshold 0.9, rule left_prefix)" in r.stderr and "verified" not in r.stderr
    r = run_cli("generate", "What is the capital of France?", "--chat", "--max-new-tokens", "8", "--threads", "1",
                "--verify")
    assert r.returncode == 0, r.stderr
    assert "block 16, threshold 0.9, rule left_prefix, verified, " in r.stderr and "-token drafts)" in r.stderr


def test_generate_chat_bfloat16_no_stream(capsys):
    code = main(["generate", "What is 2+2?", "--chat", "--max-new-tokens", "12", "--dtype", "bfloat16", "--no-stream"])
    out = capsys.readouterr()
    assert code == 0
    assert out.out.strip()
    assert "<|im_start|>" not in out.out


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "hello", "--model", "no-such-model"], "unknown model"),
        (["generate", "hello", "--model", "/nonexistent/model.gguf"], "checkpoint not found"),
        (["generate", "   "], "prompt is empty"),
        (["generate", "hello", "--max-new-tokens", "0"], "max-new-tokens"),
        (["generate", "hello", "--temperature", "-1"], "temperature"),
        (["generate", "word " * 9000], "context"),
    ],
)
def test_bad_input_exits_with_clear_message(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_corrupt_gguf_is_reported(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TWOTOWER_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    assert main(["generate", "hello", "--model", str(bad)]) == 2
    assert "not a readable GGUF file" in capsys.readouterr().err
    assert not list((tmp_path / "cache" / "converted").glob("broken*"))  # nothing half-written kept


def test_bench_ar_writes_json(tmp_path):
    out = tmp_path / "ar.json"
    code = main(["bench", "ar", "--threads", "1", "--dtypes", "float32", "--quantize", "none", "int4",
                 "--max-new-tokens", "4", "--repeats", "1", "--prompts", "2", "--no-llama-cpp", "--output", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    runs = {r["contender"]: r for r in data["runs"]}
    assert set(runs) == {"twotower float32", "twotower float32 int4", "transformers float32"}
    reference = runs["twotower float32"]
    assert reference["identical_to_reference"] == "2/2" and reference["speedup_vs_reference"] == 1.0
    assert "int4 weights" in runs["twotower float32 int4"]["note"]
    assert all(r["tokens_per_second"] > 0 for r in runs.values())
    assert len(data["seconds"]["twotower float32"]) == 1 and data["box"]["threads"] == 1 and data["prompts"] == 2


def test_damaged_conversion_cache_is_rebuilt(tmp_path, monkeypatch):
    import shutil

    from twotower.checkpoints import load
    from twotower.checkpoints.load import load_backbone

    gguf = load.resolve("smollm2-135m")
    # Seed the cache from the real one when it exists (saves a conversion), then damage it.
    real = load._converted_dir(gguf)
    monkeypatch.setenv("TWOTOWER_CACHE", str(tmp_path))
    target = load._converted_dir(gguf)
    target.parent.mkdir(parents=True)
    if real.is_dir():
        shutil.copytree(real, target)
    else:
        load.checkpoint_dir("smollm2-135m")
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 1 << 20])
    model, tokenizer = load_backbone("smollm2-135m")
    assert model.config.vocab_size == 49152
    assert weights.stat().st_size > 100 << 20



def _generate_text(*extra: str) -> str:
    r = run_cli("generate", "The capital of France is", "--max-new-tokens", "8", "--threads", "1", "--no-stream", *extra)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_modes_agree_with_ar():
    ar = _generate_text("--mode", "ar")
    # identity-initialised denoiser: mock-AR is the AR model
    assert _generate_text("--mode", "mock_ar", "--untrained-denoiser") == ar
    # verified decoding equals AR whatever the denoiser, the shipped one here
    assert _generate_text("--mode", "mask_diffusion", "--verify", "--block-size", "4", "--confidence-threshold", "0.5") == ar


def test_show_steps_renders_and_reports_nfe():
    r = run_cli("generate", "Hello", "--mode", "mask_diffusion", "--block-size", "4", "--max-new-tokens", "6",
                "--threads", "1", "--show-steps", "--verify")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "[mask_diffusion] 6 tokens" in r.stderr and "tokens/NFE" in r.stderr and "verified" in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mode", "mask_diffusion", "--block-size", "0"], "block-size"),
        (["--mode", "mask_diffusion", "--steps-per-block", "0"], "steps-per-block"),
        (["--mode", "mask_diffusion", "--confidence-threshold", "1.5"], "confidence-threshold"),
        (["--show-steps", "--mode", "ar"], "show-steps"),
    ],
)
def test_bad_dial_arguments(args, message, capsys):
    assert main(["generate", "hello", *args]) == 2
    assert message in capsys.readouterr().err


def test_generate_from_a_saved_two_tower_directory(tmp_path):
    from twotower.hf import TwoTowerForCausalLM

    TwoTowerForCausalLM.from_backbone("smollm2-135m", flavour="lora", block_size=4).save_pretrained(tmp_path / "tt")
    ar = _generate_text("--mode", "ar")
    assert _generate_text("--model", str(tmp_path / "tt"), "--mode", "ar") == ar
    assert _generate_text("--model", str(tmp_path / "tt"), "--mode", "mock_ar") == ar


def test_bench_step_writes_json(tmp_path):
    out = tmp_path / "step.json"
    code = main(["bench", "step", "--threads", "1", "--dtypes", "float32", "--repeats", "1", "--context-tokens", "8",
                 "--block-size", "4", "--output", str(out)])
    assert code == 0
    run = json.loads(out.read_text())["runs"][0]
    assert set(run["median_ms"]) == {"ar_step", "denoiser_step_lora", "denoiser_step_merged", "denoiser_step_full",
                                     "context_extend"}
    assert all(v > 0 for v in run["median_ms"].values())
    assert set(run["denoiser_step_over_ar_step"]) == {"lora", "merged", "full"}
