"""The trainer on a tiny random backbone: it learns, it resumes exactly, and two gloo
processes follow the same trajectory as one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from twotower.checkpoints import checkpoint_dir
from twotower.data.shards import prepare
from twotower.data.sources import SourceSpec
from twotower.train import TrainConfig, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama with SmolLM2's tokenizer and a small prepared corpus."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("train")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir("smollm2-135m"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                      initializer_range=0.3)  # logits with a real range: a frozen head must be able to fit
    model_dir = root / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    text = root / "text"
    text.mkdir()
    for i in range(12):
        (text / f"{i}.txt").write_text(" ".join(["the cat sat on the mat", "and the dog ran"] * (6 + i)))
    prepare([SourceSpec(str(text), "CC0")], tokenizer, root / "data", val_fraction=0.2, seed=1)
    return root, model_dir


def config(setup, out: str, **overrides) -> TrainConfig:
    root, model_dir = setup
    settings = dict(data=str(root / "data"), out_dir=str(root / out), model=str(model_dir), seq_len=32,
                    block_size=8, batch_size=2, steps=6, lr=3e-3, warmup_steps=1, log_every=1, eval_every=3,
                    save_every=3, val_batches=1, val_prompts=1, bf16=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def metrics(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rows]


def final_weights(out) -> dict:
    return load_file(out / "final" / "model.safetensors")


@pytest.mark.parametrize("flavour", ["lora", "full"])
def test_training_lowers_the_loss(setup, flavour):
    cfg = config(setup, f"learn-{flavour}", flavour=flavour, steps=16, eval_every=16, save_every=16, lr=2e-2,
                 curriculum=[[4, 4]])
    train(cfg, progress=False)
    rows = [r for r in metrics(setup[0] / f"learn-{flavour}") if "loss" in r]
    assert rows[0]["block_size"] == 4 and rows[-1]["block_size"] == 8  # the curriculum ran
    assert min(r["loss"] for r in rows[-3:]) < 0.8 * rows[0]["loss"]
    val = metrics(setup[0] / f"learn-{flavour}")[-1]
    assert len(val["slot_accuracy"]) == 8 and val["tokens_per_nfe"] > 0
    assert (setup[0] / f"learn-{flavour}" / "loss.png").stat().st_size > 1000


def test_ar_distill_is_part_of_the_trained_loss(setup):
    """The KL to the AR model at each block's first unknown target adds to the first step's loss
    (same batch, same weights), and validation reports the first slot's agreement with AR."""
    first = {}
    for weight in (0.0, 1.0):
        out = f"ar-distill-{weight}"
        train(config(setup, out, steps=3, mask_pattern="suffix", ar_distill=weight), progress=False)
        rows = metrics(setup[0] / out)
        first[weight] = rows[0]["loss"]
        assert 0 <= rows[-1]["slot1_ar_agreement"] <= 1
    assert first[1.0] > first[0.0]
    with pytest.raises(ValueError, match="ar_distill"):
        config(setup, "bad", ar_distill=-0.1)


def test_resume_is_exact(setup):
    train(config(setup, "straight"), progress=False)
    train(config(setup, "pieces"), progress=False, stop_after=3)  # ends as a kill after step 3 would
    assert not (setup[0] / "pieces" / "final").exists()
    train(config(setup, "pieces"), progress=False)
    a, b = final_weights(setup[0] / "straight"), final_weights(setup[0] / "pieces")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(setup[0] / "straight") == metrics(setup[0] / "pieces")


def test_a_checkpoint_loads_as_the_model_it_holds(setup):
    """``OUT/checkpoints/step-N`` is a model to evaluate (eval quality --model ...) before the run
    ends: at the last step it decodes exactly as ``OUT/final`` does."""
    from twotower.checkpoints.two_tower import load_model
    from twotower.generate.diffusion import generate_mask_diffusion

    out = setup[0] / "straight"
    if not (out / "final").is_dir():
        train(config(setup, "straight"), progress=False)
    last = out / "checkpoints" / "step-00000006"
    from_checkpoint, from_final = load_model(str(last)), load_model(str(out / "final"))
    assert from_checkpoint.note is None and from_checkpoint.backbone == str(setup[1])
    a, b = from_checkpoint.model.state_dict(), from_final.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    prompt = [[1, 2, 3, 4, 5]]
    assert (generate_mask_diffusion(from_checkpoint.model, prompt, max_new_tokens=8, block_size=8).tokens
            == generate_mask_diffusion(from_final.model, prompt, max_new_tokens=8, block_size=8).tokens)
    with pytest.raises(ValueError, match="untrained"):
        load_model(str(last), untrained=True)
    from twotower.cli import main

    for mode in ("ar", "mask_diffusion"):
        assert main(["generate", "the cat", "--model", str(last), "--mode", mode, "--max-new-tokens", "4",
                     "--no-stream", "--threads", "1"]) == 0


def test_resume_after_kill_9(setup):
    """A real SIGKILL in the middle of the run, then a resume from the last checkpoint."""
    root, _ = setup
    ref = config(setup, "ref-kill", steps=9)
    train(ref, progress=False)
    cfg = config(setup, "killed", steps=9)
    (root / "killed").mkdir()
    (root / "killed.json").write_text(json.dumps(cfg.to_dict()))
    cmd = [sys.executable, "-m", "twotower.cli", "train", "--config", str(root / "killed.json"), "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = root / "killed" / "checkpoints"
    while proc.poll() is None and not any(ckpt.glob("step-*")):
        pass
    proc.kill()
    proc.wait()
    if (root / "killed" / "final").exists():
        pytest.skip("the run finished before it could be killed")
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    a, b = final_weights(root / "ref-kill"), final_weights(root / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_context_tower_stays_frozen(setup):
    from twotower.checkpoints import load_backbone

    _, model_dir = setup
    train(config(setup, "frozen-lora", steps=2, eval_every=2, save_every=2), progress=False)
    saved = final_weights(setup[0] / "frozen-lora")
    # lora: only adapters, time conditioning and the mask embedding are saved
    assert all("lora_" in k for k in saved if k.startswith("context.")) and any("lora_" in k for k in saved)
    # full: the saved context tower is bit-identical to the backbone it started from
    train(config(setup, "frozen-full", flavour="full", steps=2, eval_every=2, save_every=2), progress=False)
    saved = final_weights(setup[0] / "frozen-full")
    backbone, _ = load_backbone(str(model_dir))
    original = backbone.state_dict()
    context = {k[len("context."):]: v for k, v in saved.items() if k.startswith("context.")}
    assert context and all(torch.equal(original[k], v) for k, v in context.items())
    denoiser = {k[len("denoiser_tower."):]: v for k, v in saved.items() if k.startswith("denoiser_tower.")}
    assert any(not torch.equal(original[k], v) for k, v in denoiser.items())  # while the denoiser learned


def torchrun_train(cfg: TrainConfig, port: int, *extra: str) -> None:
    path = Path(cfg.out_dir + ".json")
    path.write_text(json.dumps(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "twotower.cli", "train", "--config", str(path), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]


def assert_same_run(one: Path, two: Path) -> None:
    losses_one = [r["loss"] for r in metrics(one) if "loss" in r]
    losses_two = [r["loss"] for r in metrics(two) if "loss" in r]
    assert len(losses_one) == 4 and losses_one == pytest.approx(losses_two, rel=1e-4)
    val_one = [r["val_loss"] for r in metrics(one) if "val_loss" in r]
    assert val_one == pytest.approx([r["val_loss"] for r in metrics(two) if "val_loss" in r], rel=1e-4)
    a, b = final_weights(one), final_weights(two)
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_two_gloo_processes_match_one(setup):
    root, _ = setup
    train(config(setup, "one", batch_size=4, steps=4, eval_every=4, save_every=4), progress=False)
    torchrun_train(config(setup, "two", batch_size=2, steps=4, eval_every=4, save_every=4), 29517)
    assert_same_run(root / "one", root / "two")


@pytest.mark.parametrize("flavour", ["lora", "full"])
def test_fsdp_matches_one_process_across_a_resume(setup, flavour):
    """FSDP2 over two gloo processes: killed after 2 of 4 steps and resumed from its sharded
    checkpoint, it follows the single-process run with the same global batch."""
    root, _ = setup
    train(config(setup, f"one-{flavour}", flavour=flavour, batch_size=4, steps=4, eval_every=2, save_every=4),
          progress=False)
    sharded = config(setup, f"fsdp-{flavour}", flavour=flavour, batch_size=2, steps=4, eval_every=2, save_every=4,
                     fsdp=True)
    port = 29518 if flavour == "lora" else 29519
    torchrun_train(sharded, port, "--stop-after", "2")
    assert not (root / f"fsdp-{flavour}" / "final").exists()
    torchrun_train(sharded, port)
    assert_same_run(root / f"one-{flavour}", root / f"fsdp-{flavour}")


def test_fsdp_needs_torchrun(setup):
    with pytest.raises(ValueError, match="torchrun"):
        train(config(setup, "fsdp-alone", fsdp=True), progress=False)


def test_time_budget_shortens_but_never_lengthens_the_run(tmp_path):
    from twotower.train import TrainConfig
    from twotower.train.loop import _fit_time_budget, wsd_schedule

    cfg = TrainConfig(data=str(tmp_path), out_dir=str(tmp_path), steps=1000, time_budget_s=10.0, warmup_steps=0)
    factor = wsd_schedule(cfg)
    # 25 steps took 5 s, steps 5..25 took 2 s (0.1 s a step): 90% of 10 s leaves 4 s = 40 steps
    _fit_time_budget(cfg, 25, 5.0, 2.0, torch.device("cpu"))
    assert cfg.steps == 65
    assert factor(64) < 1.0 and factor(40) == 1.0  # the decay follows the fitted length
    cfg.steps = 30
    _fit_time_budget(cfg, 25, 5.0, 2.0, torch.device("cpu"))
    assert cfg.steps == 30


def test_suffix_masks_hide_a_suffix_of_stratified_length():
    from twotower.train.batches import sample_masks

    masks = sample_masks(0, 3, range(8), 8, 4, 16, 1e-3, False, pattern="suffix")
    hidden = masks.sum(-1)
    # a suffix: hidden inputs are exactly the last `hidden` positions
    assert torch.equal(masks, torch.arange(16) >= 16 - hidden[..., None])
    # t stratified over the 32 blocks: floor(16 t) takes every value 0..15 exactly twice
    assert sorted(hidden.flatten().tolist()) == sorted(list(range(16)) * 2)
    with pytest.raises(ValueError, match="mask pattern"):
        sample_masks(0, 3, range(8), 8, 4, 16, 1e-3, False, pattern="prefix")
    with pytest.raises(ValueError, match="complementary"):
        TrainConfig(data="d", out_dir="o", mask_pattern="suffix", complementary_masks=True)


def test_init_from_a_saved_denoiser(setup):
    """A run can start from a saved denoiser (say, the shipped one): its weights are the
    starting point, it trains on from there, and a mismatched denoiser is a clear error."""
    from twotower.checkpoints.load import CheckpointError
    from twotower.train.checkpoint import trainable_state
    from twotower.train.loop import build_model

    root, _ = setup
    train(config(setup, "init-source", steps=3, mask_pattern="suffix"), progress=False)
    source = root / "init-source" / "final"
    cfg = config(setup, "init-target", steps=2, init_from=str(source))
    model, _ = build_model(cfg, torch.device("cpu"))
    saved = final_weights(root / "init-source")
    state = trainable_state(model)
    assert saved.keys() <= state.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    fresh = trainable_state(build_model(config(setup, "init-none"), torch.device("cpu"))[0])
    assert any(not torch.equal(fresh[k], saved[k]) for k in saved)  # training had changed them
    train(cfg, progress=False)
    assert (root / "init-target" / "final").is_dir()
    with pytest.raises(CheckpointError, match="lora_rank"):
        build_model(config(setup, "init-bad", lora_rank=4, init_from=str(source)), torch.device("cpu"))
    with pytest.raises(CheckpointError, match="neither"):
        build_model(config(setup, "init-bad", init_from=str(root / "nowhere")), torch.device("cpu"))


def test_compiled_training_follows_eager_training(setup):
    """--compile changes how the step runs, not what it computes."""
    train(config(setup, "eager", steps=3, eval_every=3), progress=False)
    train(config(setup, "compiled", steps=3, eval_every=3, compile=True), progress=False)
    eager, compiled = metrics(setup[0] / "eager"), metrics(setup[0] / "compiled")
    for a, b in zip(eager, compiled):
        for key in ("loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4)
    a, b = final_weights(setup[0] / "eager"), final_weights(setup[0] / "compiled")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_training_on_assistant_turns_only(setup):
    """Chat shards with a loss mask: the trainer takes the loss on the answers alone, which
    changes the loss it reports against the same chats trained on every token."""
    from transformers import AutoTokenizer

    root, model_dir = setup
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chats = root / "chats.jsonl"
    with open(chats, "w") as f:
        for i in range(16):
            turns = [{"role": "user", "content": f"Count to {i + 3}, please."},
                     {"role": "assistant", "content": " ".join(str(k) for k in range(1, i + 4))}]
            f.write(json.dumps({"messages": turns}) + "\n")
    losses = {}
    for loss_on in ("assistant", "all"):
        prepare([SourceSpec(str(chats), field="messages", loss_on=loss_on)], tokenizer, root / f"chats-{loss_on}",
                val_fraction=0.2, seed=1)
        cfg = config(setup, f"chat-{loss_on}", data=str(root / f"chats-{loss_on}"), steps=2, eval_every=2,
                     save_every=2)
        last = train(cfg, progress=False)
        losses[loss_on] = [r["loss"] for r in metrics(root / f"chat-{loss_on}") if "loss" in r]
        assert len(last["slot_accuracy"]) == 8 and (root / f"chat-{loss_on}" / "final").is_dir()
    assert all(a != pytest.approx(b, rel=1e-3) for a, b in zip(losses["assistant"], losses["all"]))


def test_the_gpu_recipe_runs_shrunk_on_a_tiny_model(setup, tmp_path):
    """scripts/train_default_gpu.sh end to end (distill, prepare, train to a time budget, eval)
    on the CPU with a tiny random backbone: the shipped default's recipe, in seconds."""
    _, model_dir = setup
    script = Path(__file__).parents[1] / "scripts" / "train_default_gpu.sh"
    env = {**os.environ, "MODEL": str(model_dir), "TWOTOWER": f"{sys.executable} -m twotower.cli", "DEVICE": "cpu",
           "DISTILL_BATCH": "256", "ANSWER_TOKENS": "32", "SEQ_LEN": "64", "BATCH": "4", "EVAL_TOKENS": "16",
           "MASK_PATTERN": "suffix", "AR_DISTILL": "0.5", "TRAIN_ARGS": "--lr 5e-4 --threads 1"}
    r = subprocess.run(["bash", str(script), str(tmp_path / "run"), "1", "8"], capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    train_split = manifest["splits"]["train"]
    assert manifest["loss_mask"] and 0 < train_split["trained_tokens"] < train_split["tokens"]
    # the time budget cut the 100,000-step ceiling down after calibrating on steps 5-25
    (last_ckpt,) = sorted((tmp_path / "run" / "train" / "checkpoints").glob("step-*"))[-1:]
    saved = json.loads((last_ckpt / "state.json").read_text())["config"]
    assert (saved["mask_pattern"], saved["ar_distill"]) == ("suffix", 0.5)
    assert saved["lr"] == 5e-4 and saved["curriculum"] == [[8, 100]]  # TRAIN_ARGS override; no INIT_FROM
    fitted = saved["steps"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert 25 < fitted < 100_000 and rows[-1]["step"] == fitted
    final = tmp_path / "run" / "train" / "final"
    assert (final / "model.safetensors").is_file()
    report = json.loads((tmp_path / "run" / "eval" / "quality.json").read_text())
    assert [d["threshold"] for d in report["diffusion"]] == [0.5, 0.7, 0.8, 0.9, 0.95]

    # shipping it: bf16 weights and the config written beside what the shipped folder already holds
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "generation_config.json").write_text('{"commit_rule": "left_prefix"}')
    r = subprocess.run([sys.executable, str(script.parent / "export_denoiser.py"), str(final), str(shipped)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    trained, exported = load_file(final / "model.safetensors"), load_file(shipped / "model.safetensors")
    assert trained.keys() == exported.keys()
    assert all(torch.equal(exported[k], v.to(torch.bfloat16)) for k, v in trained.items())
    from twotower.checkpoints.two_tower import load_model

    loaded = load_model(str(shipped), merge_adapters=False)
    assert loaded.recommended == {"commit_rule": "left_prefix"}
    lora = {k: v for k, v in loaded.model.state_dict().items() if k in exported}
    assert lora.keys() == exported.keys() and all(v.dtype == torch.float32 for v in lora.values())
    assert all(torch.equal(v, exported[k].float()) for k, v in lora.items())
