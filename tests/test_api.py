"""The one decoding API (issue 15): every front end decodes through ``decode`` with settings built
by one rule, so the CLI, ``decode``, the transformers wrapper, ``bench speed``, ``eval quality``
and the lm-eval class give the same tokens for the same settings, and each applies the model's
recommended preset. Also: stop strings (across block boundaries), multi-turn chat prompts, the
settings rule, the offline guard, adapter switching and the CLI's error policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from tiny_models import attention_config, hf_model, tiny_backbone

from twotower.cli import main
from twotower.errors import TwoTowerError, UsageError
from twotower.generate import DecodeCallbacks, DecodingSettings, decode, resolve_settings
from twotower.generate.prompts import encode_messages
from twotower.generate.stopping import TextStream
from twotower.model.twotower import DenoiserConfig, TwoTower

ROOT = Path(__file__).parents[1]
PRESET = {"commit_rule": "left_prefix", "verify": True, "steps_per_block": 1, "block_size": 4}
QUESTION = "What is the capital of France?"
MAX_NEW = 8


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from twotower.checkpoints import CheckpointError, checkpoint_dir

    try:
        return AutoTokenizer.from_pretrained(checkpoint_dir("smollm2-135m"))
    except CheckpointError as e:
        pytest.skip(f"needs the default model's tokenizer: {e}")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """A tiny trained-looking two-tower directory (lora, its adapters moved off zero) over a tiny
    Llama with the SmolLM2 tokenizer, recommending the shipped denoiser's preset."""
    from twotower.hf import TwoTowerForCausalLM

    root = tmp_path_factory.mktemp("api")
    backbone = root / "backbone"
    hf_model("llama", vocab_size=49152, hidden_size=32, intermediate_size=64, head_dim=8,
             max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
             pad_token_id=2).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    model = TwoTowerForCausalLM.from_backbone(str(backbone), flavour="lora", block_size=4, lora_rank=4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.twotower.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    model.recommended = dict(PRESET)
    model.save_pretrained(root / "tt")
    return root / "tt"


# the same four settings as each front end spells them
STRATEGIES = {
    "ar": dict(cli=["--mode", "ar"], settings=dict(mode="ar"), lm=dict(mode="ar")),
    "mock_ar": dict(cli=["--mode", "mock_ar"], settings=dict(mode="mock_ar"), lm=dict(mode="mock_ar")),
    "mask_diffusion": dict(cli=["--block-size", "4", "--confidence-threshold", "0.5"],
                           settings=dict(block_size=4, confidence_threshold=0.5),
                           lm=dict(block_size=4, confidence_threshold=0.5)),
    "verified": dict(cli=[], settings={}, lm={}),  # nothing given: the recommended preset
}


def _wrapper_call(wrapper, name: str, ids: torch.Tensor):
    kwargs = dict(max_new_tokens=MAX_NEW, return_dict_in_generate=True)
    if name == "ar":
        return wrapper.generate_ar(ids, **kwargs)
    if name == "mock_ar":
        return wrapper.generate_mock_ar(ids, **kwargs)
    return wrapper.generate_mask_diffusion(ids, **STRATEGIES[name]["settings"], **kwargs)


def test_every_front_end_decodes_the_same_tokens(saved, tmp_path, capsys):
    from twotower.checkpoints.two_tower import load_model
    from twotower.eval.lm_eval_model import TwoTowerLM
    from twotower.hf import TwoTowerForCausalLM

    loaded = load_model(str(saved))
    assert loaded.recommended == PRESET
    ids = encode_messages(loaded.tokenizer, [{"role": "user", "content": QUESTION}])
    wrapper = TwoTowerForCausalLM.from_pretrained(saved)
    expected = {}
    for name, spelled in STRATEGIES.items():
        settings = resolve_settings(loaded.recommended, max_new_tokens=MAX_NEW, **spelled["settings"])
        assert settings.strategy == name
        out = decode(loaded.model, [ids], settings, tokenizer=loaded.tokenizer)
        expected[name] = out.tokens[0]
        # the transformers wrapper: prompt + new ids, the same settings chosen for it
        result = _wrapper_call(wrapper, name, torch.tensor([ids]))
        assert result.settings == settings
        assert result.sequences[0, len(ids):len(ids) + len(out.tokens[0])].tolist() == out.tokens[0], name
        # the command line prints the same text, and names the preset when it applies
        assert main(["generate", QUESTION, "--chat", "--model", str(saved), "--max-new-tokens", str(MAX_NEW),
                     "--no-stream", "--threads", "1", *spelled["cli"]]) == 0
        printed = capsys.readouterr()
        assert printed.out.rstrip("\n") == out.texts[0], name
        if name == "verified":
            assert "verified drafts of 4 tokens, rule left_prefix" in printed.err
        # lm-eval: the class's own prompt ids (a BOS prefix, no chat template) through decode
        lm = TwoTowerLM(pretrained=str(saved), max_gen_toks=MAX_NEW, **spelled["lm"])
        assert lm.settings == settings.replace(max_new_tokens=lm.settings.max_new_tokens)
        (text,) = lm.generate_until([_Request((QUESTION, {"until": [], "max_gen_toks": MAX_NEW}))])
        alone = decode(loaded.model, [lm.prompt_ids(QUESTION, MAX_NEW)], settings, tokenizer=loaded.tokenizer)
        assert text == alone.texts[0], name
    assert expected["verified"] == expected["ar"]  # verified decoding is AR's output

    # bench speed and eval quality on the first shipped prompt: the preset without dial options,
    # the plain dial with them, AR (and mock-AR) beside
    from twotower.generate.prompts import load_prompt_set

    first = load_prompt_set(count=1)[0]["text"]
    prompt = encode_messages(loaded.tokenizer, [{"role": "user", "content": first}])
    reference = {name: decode(loaded.model, [prompt], resolve_settings(PRESET, max_new_tokens=MAX_NEW, **s["settings"]),
                              tokenizer=loaded.tokenizer) for name, s in STRATEGIES.items()}
    for dial, names in (([], ("verified",)), (["--thresholds", "0.5", "--block-sizes", "4"], ("mask_diffusion",))):
        out_dir = tmp_path / f"speed{len(dial)}"
        assert main(["bench", "speed", "--model", str(saved), "--modes", "mask_diffusion", "mock_ar", "--prompts", "1",
                     "--batch-sizes", "1", "--max-new-tokens", str(MAX_NEW), "--repeats", "1", "--warmup", "0",
                     "--threads", "1", "--output-dir", str(out_dir), *dial]) == 0
        runs = {r["label"]: r for r in json.loads((out_dir / "speed.json").read_text())["runs"]}
        assert runs["ar"]["tokens"][0] == reference["ar"].tokens[0]
        assert runs["mock_ar"]["tokens"][0] == reference["mock_ar"].tokens[0]
        (diffusion,) = [r for r in runs.values() if r["mode"] == "mask_diffusion"]
        assert diffusion["tokens"][0] == reference[names[0]].tokens[0]
        assert diffusion["decoding"] == json.loads(json.dumps(reference[names[0]].settings.to_dict()))

        eval_dir = tmp_path / f"quality{len(dial)}"
        assert main(["eval", "quality", "--model", str(saved), "--prompts", "1", "--max-new-tokens", str(MAX_NEW),
                     "--judge", "none", "--humaneval-problems", "0", "--nll-window", "64", "--threads", "1",
                     "--output-dir", str(eval_dir), *dial]) == 0
        report = json.loads((eval_dir / "quality.json").read_text())
        assert report["ar"]["continuations"][0] == reference["ar"].texts[0]
        (row,) = report["diffusion"]
        assert row["continuations"][0] == reference[names[0]].texts[0]
        assert row["settings"] == json.loads(json.dumps(reference[names[0]].settings.to_dict()))
    capsys.readouterr()


class _Request:
    def __init__(self, args):
        self.args = args


def test_resolve_settings_one_rule():
    # nothing given: the recommendation, preset included
    s = resolve_settings(PRESET)
    assert (s.mode, s.verify, s.steps_per_block, s.block_size, s.commit_rule) == ("mask_diffusion", True, 1, 4,
                                                                                    "left_prefix")
    # a block size alone replaces only the preset's block size
    assert resolve_settings(PRESET, block_size=16).replace(block_size=4) == s
    # any dial option: the plain dial, the recommended commit rule kept
    for given in (dict(confidence_threshold=0.7), dict(verify=False), dict(verify=True), dict(steps_per_block=4)):
        plain = resolve_settings(PRESET, **given)
        assert plain.block_size is None and plain.commit_rule == "left_prefix", given
        assert plain.steps_per_block == given.get("steps_per_block"), given
    assert resolve_settings(PRESET, commit_rule="threshold").commit_rule == "threshold"
    assert resolve_settings({}).commit_rule == "threshold"  # the released rule without a recommendation
    assert resolve_settings(PRESET, mode="ar").strategy == "ar"
    # None means not given
    assert resolve_settings(PRESET, verify=None, confidence_threshold=None) == s
    for bad, message in ((dict(mode="fast"), "unknown mode"), (dict(block_size=0), "block_size"),
                         (dict(temperature=float("inf")), "temperature"), (dict(verify="yes"), "verify"),
                         (dict(commit_rule="greedy"), "commit rule"), (dict(mode="ar", block_size=4), "not used"),
                         (dict(stop_strings=[""]), "stop strings"), (dict(beam_width=2), "unknown decoding option")):
        with pytest.raises(UsageError, match=message):
            resolve_settings(PRESET, **bad)


@pytest.fixture(scope="module")
def tiny_tt(tokenizer):
    """A tiny two-tower model over the SmolLM2 vocabulary, so its tokens decode to text."""
    backbone = tiny_backbone(attention_config(vocab_size=49152, max_position_embeddings=512))
    model = TwoTower(backbone, DenoiserConfig(block_size=4)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("given", [dict(mode="ar"), dict(block_size=4, confidence_threshold=0.0),
                                   dict(block_size=4, verify=True)], ids=["ar", "diffusion", "verified"])
def test_stop_string_across_a_block_boundary(tiny_tt, tokenizer, given):
    """A stop string made of the end of the first block's last token and the start of the next
    block's first token ends the row at the token that completes it; the text never includes it."""
    prompt = [[5, 9, 17, 33]]
    base = resolve_settings(max_new_tokens=12, stop_token_ids=[], **given)
    free = decode(tiny_tt, prompt, base, tokenizer=tokenizer).tokens[0]
    pieces = [tokenizer.decode(free[: i + 1], skip_special_tokens=True) for i in range(len(free))]
    cut = len(pieces[3])  # the text of the first block of 4 tokens
    assert cut and pieces[4][cut:], "the boundary tokens decode to text"
    # the end of the first block's text and the next token's first character, long enough
    # that it does not occur earlier (at worst the whole text so far)
    stop = next(pieces[4][cut - k : cut + 1] for k in range(1, cut + 1)
                if pieces[4].find(pieces[4][cut - k : cut + 1]) == cut - k)
    streamed = []
    out = decode(tiny_tt, prompt, base.replace(stop_strings=(stop,)), tokenizer=tokenizer,
                 callbacks=DecodeCallbacks(on_token=lambda row, tok: streamed.append(tok)))
    assert out.finish_reasons == ["stop"]
    assert out.tokens[0] == free[:5]  # up to the token that completed the stop string, nothing after
    assert out.texts[0] == pieces[4][: pieces[4].find(stop)] and stop not in out.texts[0]
    assert streamed == out.tokens[0]
    stream = TextStream(tokenizer, [stop])
    assert "".join(stream.push(t) for t in streamed) + stream.finish() == out.texts[0]


def test_multi_turn_messages_use_the_chat_template(tiny_tt, tokenizer):
    conversation = [{"role": "system", "content": "You answer in one word."},
                    {"role": "user", "content": "Capital of France?"},
                    {"role": "assistant", "content": "Paris."},
                    {"role": "user", "content": "And of Italy?"}]
    rendered = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert "You answer in one word." in rendered and rendered.count("<|im_start|>user") == 2
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert encode_messages(tokenizer, conversation) == ids
    settings = resolve_settings(mode="ar", max_new_tokens=6, stop_token_ids=[])
    by_messages = decode(tiny_tt, [conversation, "a plain prompt"], settings, tokenizer=tokenizer)
    assert by_messages.prompt_ids[0] == ids
    assert by_messages.tokens[0] == decode(tiny_tt, [ids], settings).tokens[0]
    for bad in ([], [{"role": "user"}], [{"role": "robot", "content": "hi"}], [{"role": "user", "content": 3}]):
        with pytest.raises(UsageError):
            decode(tiny_tt, [bad], settings, tokenizer=tokenizer)
    with pytest.raises(UsageError, match="tokenizer"):
        decode(tiny_tt, [conversation], settings)


def test_wrapper_returns_the_released_tensor(saved):
    from twotower.hf import TwoTowerForCausalLM

    model = TwoTowerForCausalLM.from_pretrained(saved)
    pad = model.tokenizer.pad_token_id
    prompts = torch.tensor([[5, 9, 17, 33], [7, 8, 9, 10]])
    calls = []
    out = model.generate_mask_diffusion(prompts, max_new_tokens=6, block_size=4, steps_per_block=4,
                                        confidence_threshold=0.5, eos_token_id=[], step_callback=lambda *a, **k:
                                        calls.append((a, k)))
    assert out.dtype == torch.long and out.shape == (2, 4 + 6) and torch.equal(out[:, :4], prompts)
    assert model._last_nfe == model.last_stats.nfe > 0
    (step, total, xt), kwargs = calls[0]
    assert (step, total, xt.shape) == (0, 4, (2, 4)) and set(kwargs) == {"t", "logits", "block_idx"}
    assert (xt == model.mask_token_id).any()  # targets still unknown after the first step
    # a row that stops early is padded on the right with the pad id
    free = model.generate_ar(prompts, max_new_tokens=6, eos_token_id=[])
    stop = free[0, 5].item()  # row 0's second new token as the stop token
    short = model.generate_ar(prompts, max_new_tokens=6, eos_token_id=[stop])
    row = short[0, 4:].tolist()
    end = row.index(stop) + 1
    assert end < 6 and row[:end] == free[0, 4 : 4 + end].tolist() and all(tok == pad for tok in row[end:])
    with pytest.raises(UsageError, match=f"it is {model.mask_token_id}"):
        model.generate_mask_diffusion(prompts, mask_token_id=3)
    assert model.place_towers_on_devices("cpu", "cpu") is model


def test_public_names():
    import twotower

    code = "import sys, twotower; print('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    from twotower import DecodingSettings as D
    from twotower import TwoTowerConfig, TwoTowerForCausalLM, load_backbone
    from twotower import decode as d

    assert D is DecodingSettings and d is decode and callable(load_backbone)
    assert TwoTowerForCausalLM.config_class is TwoTowerConfig
    assert {"TwoTowerForCausalLM", "TwoTowerConfig", "load_backbone", "DecodingSettings", "decode"} <= set(twotower.__all__)


def test_offline_guard_is_set_before_huggingface_hub_is_imported():
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    code = ("from twotower.cli import build_parser; build_parser(); import sys, huggingface_hub.constants as c; "
            "print(c.HF_HUB_OFFLINE)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"


def _lora_model():
    return TwoTower(tiny_backbone(attention_config()), DenoiserConfig(block_size=4, lora_rank=4)).eval()


def _adapters_on(model: TwoTower) -> set[bool]:
    return {not layer._disable_adapters for layer in model._lora_layers}


def test_adapters_are_re_entrant_and_a_no_op_when_merged():
    model = _lora_model()
    assert _adapters_on(model) == {False}
    with model.adapters(True):
        with model.adapters(False):
            assert _adapters_on(model) == {False}
        assert _adapters_on(model) == {True}  # restored, not reset
        with model.adapters(True):
            pass
        assert _adapters_on(model) == {True}
    assert _adapters_on(model) == {False}
    model.merge_adapters()
    with model.adapters(True):  # the merged copy is the denoiser: the shared flags stay off
        assert _adapters_on(model) == {False}
    cache = model.context.new_cache(1, 16)
    model.context_forward(torch.tensor([[5, 9, 17]]), cache)
    seen = []
    model._lora_layers[0].register_forward_pre_hook(lambda m, a: seen.append(m._disable_adapters))
    model.denoise_block(torch.tensor([[17, model.mask_token_id, model.mask_token_id, model.mask_token_id]]),
                        torch.ones(1), cache)
    assert seen == []  # a merged denoiser step never runs (or switches) the shared layers


def test_context_forward_beside_a_denoiser_thread_never_sees_adapters():
    model = _lora_model()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen))  # adapters that change the output
    ids = torch.tensor([[5, 9, 17, 33, 4]])
    reference = model.context_forward(ids)
    stop = threading.Event()

    def denoise_forever():
        cache = model.context.new_cache(1, 16)
        model.context_forward(ids, cache)
        block = torch.tensor([[4, model.mask_token_id, model.mask_token_id, model.mask_token_id]])
        while not stop.is_set():
            model.denoise_block(block, torch.ones(1), cache)

    worker = threading.Thread(target=denoise_forever)
    worker.start()
    try:
        for _ in range(30):
            assert torch.equal(model.context_forward(ids), reference)
    finally:
        stop.set()
        worker.join()


def test_only_our_errors_become_one_line(monkeypatch, capsys):
    import twotower.generate

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(twotower.generate, "decode", broken)
    with pytest.raises(ValueError, match="an internal bug"):  # a bug keeps its traceback
        main(["generate", "hello", "--mode", "ar", "--max-new-tokens", "2", "--threads", "1"])

    def refused(*args, **kwargs):
        raise UsageError("a clear message")

    monkeypatch.setattr(twotower.generate, "decode", refused)
    assert main(["generate", "hello", "--mode", "ar", "--max-new-tokens", "2", "--threads", "1"]) == 2
    assert capsys.readouterr().err.strip().endswith("twotower: error: a clear message")
    assert issubclass(UsageError, TwoTowerError)


@pytest.mark.slow
def test_released_usage_snippet_runs_on_the_shipped_model():
    """docs/examples/released_usage.py is the released model's usage, verbatim but for the model
    path and ``mask_token_id=model.mask_token_id``; it prints what ``twotower generate`` prints
    with the same settings. The README shows the same code."""
    snippet = ROOT / "docs" / "examples" / "released_usage.py"
    code = snippet.read_text()
    assert code[code.index("import torch"):].strip() in (ROOT / "README.md").read_text()
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {"HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(snippet)], capture_output=True, text=True, cwd=ROOT, timeout=600,
                       stdin=subprocess.DEVNULL, env=env)
    assert r.returncode == 0, r.stderr
    assert "custom code" not in r.stdout + r.stderr  # no remote-code question for the tokenizer
    text, nfe = r.stdout.rsplit("\nNFE: ", 1)
    assert text.strip() and int(nfe) > 0
    cli = subprocess.run([sys.executable, "-m", "twotower.cli", "generate", "The capital of France is", "--dtype",
                          "bfloat16", "--block-size", "16", "--steps-per-block", "16", "--confidence-threshold",
                          "0.8", "--max-new-tokens", "32", "--no-stream"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.rstrip("\n") == text
