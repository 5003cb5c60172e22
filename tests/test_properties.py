"""Property-based tests (Hypothesis): generated bad arguments, odd Python inputs, malformed
JSON/JSONL and truncated or bit-flipped safetensors, GGUF and shard files. For each: a typed
error (TwoTowerError) or a correct result, never another exception, never a hang, never a
changed input file.

Each property runs twice: ``test_<name>`` with the default profile's bounded number of examples
(part of the default suite), and ``test_<name>_long``, marked ``fuzz`` and skipped by default,
with many more: ``pytest -m fuzz tests/test_properties.py``."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twotower.errors import TwoTowerError

LONG_EXAMPLES = 2000


def both(test_name: str, check, **strategies) -> None:
    """``test_<name>`` (bounded, default suite) and ``test_<name>_long`` (``fuzz`` marker)."""
    globals()[f"test_{test_name}"] = given(**strategies)(check)
    long = settings(max_examples=LONG_EXAMPLES)(given(**strategies)(check))
    globals()[f"test_{test_name}_long"] = pytest.mark.fuzz(long)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# anything a user might pass where a setting goes (JSON_ODD: what a JSON file can hold)
JSON_ODD = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8), st.lists(st.integers(-5, 70000), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
ODD = st.one_of(JSON_ODD, st.floats(allow_nan=True, allow_infinity=True), st.binary(max_size=4))


# -- decoding settings ---------------------------------------------------------------------


def check_settings(given_values: dict) -> None:
    from twotower.generate import resolve_settings

    recommended = {"commit_rule": "left_prefix", "verify": True, "steps_per_block": 1, "block_size": 4}
    try:
        s = resolve_settings(recommended, **given_values)
    except TwoTowerError:
        return
    # accepted: every field holds what decoding can use
    assert s.mode in ("ar", "mask_diffusion", "mock_ar")
    assert s.block_size is None or (type(s.block_size) is int and s.block_size >= 1)
    assert s.steps_per_block is None or (type(s.steps_per_block) is int and s.steps_per_block >= 1)
    assert 0 <= s.confidence_threshold <= 1 and math.isfinite(s.temperature) and s.temperature >= 0
    assert type(s.max_new_tokens) is int and s.max_new_tokens >= 1 and isinstance(s.verify, bool)
    assert all(isinstance(x, str) and x for x in s.stop_strings)


FIELDS = ("mode", "block_size", "steps_per_block", "confidence_threshold", "commit_rule", "verify", "temperature",
          "top_k", "top_p", "seed", "max_new_tokens", "stop_token_ids", "stop_strings", "beam_width")
both("settings_take_any_values", check_settings,
     given_values=st.dictionaries(st.sampled_from(FIELDS), st.one_of(ODD, st.sampled_from(
         ["ar", "mock_ar", "mask_diffusion", "threshold", "left_prefix"])), max_size=4))


def check_train_config(values: dict) -> None:
    from twotower.train import TrainConfig

    try:
        cfg = TrainConfig.from_dict({"data": "d", "out_dir": "o", **values}, "generated")
    except TwoTowerError:
        return
    assert cfg.steps >= 1 and cfg.seq_len >= 1 and cfg.seq_len % cfg.block_size == 0 and cfg.lr > 0


TRAIN_FIELDS = ("steps", "seq_len", "block_size", "batch_size", "lr", "log_every", "lora_rank", "curriculum",
                "mask_pattern", "t_eps", "bf16", "time_budget_s", "flavour", "bogus")
both("train_config_takes_any_values", check_train_config,
     values=st.dictionaries(st.sampled_from(TRAIN_FIELDS), ODD, max_size=4))


# -- decode with odd prompts --------------------------------------------------------------------

TOKEN = st.one_of(st.integers(-3, 49160), st.floats(allow_nan=True), st.booleans(), st.none(), st.text(max_size=3))
PROMPT = st.one_of(
    st.lists(st.integers(0, 49151), min_size=1, max_size=4),
    st.lists(TOKEN, max_size=3),
    st.text(max_size=6),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "robot"]), "content": st.text(max_size=5)}),
             max_size=2),
    st.builds(lambda x: torch.tensor(x), st.lists(st.integers(0, 49151), min_size=1, max_size=3)),
    st.builds(lambda x: np.array(x), st.lists(st.integers(0, 49151), min_size=1, max_size=3)),
    st.builds(lambda x: torch.tensor(x), st.lists(st.floats(-1, 1), min_size=1, max_size=2)),
    ODD,
)


def check_decode(world, prompts, use_tokenizer: bool, mode: str) -> None:
    from twotower.generate import DecodingSettings, decode

    model = _model(world)
    settings_ = DecodingSettings(mode=mode, max_new_tokens=2, stop_token_ids=(), block_size=2)
    try:
        out = decode(model, prompts, settings_, tokenizer=world.tokenizer if use_tokenizer else None)
    except TwoTowerError:
        return
    assert all(len(row) == 2 and all(0 <= t < 49152 for t in row) for row in out.tokens)
    # the same prompts as plain token ids give the same tokens (batch invariance, too)
    alone = [decode(model, [ids], settings_).tokens[0] for ids in out.prompt_ids]
    assert alone == out.tokens


both("decode_takes_any_prompts", check_decode,
     prompts=st.one_of(PROMPT, st.lists(PROMPT, min_size=1, max_size=3)), use_tokenizer=st.booleans(),
     mode=st.sampled_from(["ar", "mask_diffusion"]))

_MODELS: dict = {}


def _model(world):
    if "tt" not in _MODELS:
        from twotower.checkpoints.two_tower import load_model

        _MODELS["tt"] = load_model(str(world.tt)).model
    return _MODELS["tt"]


# -- malformed JSON and JSONL ----------------------------------------------------------------------

JSON_LINE = st.one_of(
    st.builds(json.dumps, st.fixed_dictionaries({"text": st.text(max_size=6)}, optional={"kind": st.text(max_size=4)})),
    st.builds(json.dumps, st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=4),
                                       lambda inner: st.lists(inner, max_size=2) | st.dictionaries(
                                           st.text(max_size=3), inner, max_size=2), max_leaves=4)),
    st.text(max_size=10),
)


def check_prompt_file(tmp_path_factory, lines, tail: bytes) -> None:
    from twotower.generate.prompts import load_prompt_set

    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + tail)
    before = digest(path)
    try:
        rows = load_prompt_set(path)
    except TwoTowerError:
        rows = None
    assert digest(path) == before
    if rows is not None:
        assert rows and all(isinstance(r["text"], str) and r["text"].strip() for r in rows)


both("prompt_files_take_any_lines", check_prompt_file, lines=st.lists(JSON_LINE, max_size=4),
     tail=st.sampled_from([b"", b"\n", b"\xff\xfe", b"{"]))


def check_json_config(world, tmp_path_factory, text: str) -> None:
    """A saved model directory whose config.json is any text: an error naming the file or (for
    the original) the model."""
    from twotower.checkpoints.two_tower import load_model

    copy = world.copy("tt", tmp_path_factory.mktemp("cfg"))
    (copy / "config.json").write_bytes(text.encode("utf-8", "surrogatepass"))
    before = digest(copy / "config.json")
    try:
        load_model(str(copy))
    except TwoTowerError as e:
        assert "config.json" in str(e) or "safetensors" in str(e), e
    assert digest(copy / "config.json") == before


both("config_json_takes_any_text", check_json_config,
     text=st.one_of(st.text(max_size=20), JSON_LINE, st.builds(lambda extra: json.dumps(
         {"model_type": "llama", "architectures": ["TwoTowerForCausalLM"], **extra}),
         st.dictionaries(st.sampled_from(["backbone_config", "denoiser_config", "backbone", "dtype"]), JSON_ODD,
                         max_size=3))))


# -- damaged binary files ------------------------------------------------------------------------


def _damage(data: bytes, cut: float, flips: list[tuple[float, int]]) -> bytes:
    out = bytearray(data[: max(0, int(len(data) * cut))])
    for where, bit in flips:
        if out:
            out[int(where * (len(out) - 1))] ^= 1 << bit
    return bytes(out)


DAMAGE = dict(cut=st.one_of(st.just(1.0), st.floats(0, 1)),
              flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), max_size=3))


def check_safetensors(world, tmp_path_factory, cut: float, flips) -> None:
    from twotower.checkpoints.tensors import read_tensors

    original = world.tt / "model.safetensors"
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    path.write_bytes(_damage(original.read_bytes(), cut, flips))
    before = digest(path)
    try:
        state, _ = read_tensors(path)
    except TwoTowerError:
        state = None
    assert digest(path) == before
    if state is not None:  # read without error: then it is the original, tensor for tensor
        reference, _ = read_tensors(original)
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)


both("safetensors_damage_is_caught", check_safetensors, **DAMAGE)


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> Path:
    """A small valid GGUF file written with the gguf library."""
    import gguf

    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(64, dtype=np.float32).reshape(8, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def check_gguf(small_gguf, tmp_path_factory, cut: float, flips) -> None:
    from twotower.checkpoints.load import _check_gguf

    path = tmp_path_factory.mktemp("g") / "m.gguf"
    path.write_bytes(_damage(small_gguf.read_bytes(), cut, flips))
    before = digest(path)
    try:
        _check_gguf(path, None)
    except TwoTowerError:
        pass
    assert digest(path) == before


both("gguf_damage_is_caught", check_gguf, **DAMAGE)


def check_shards(world, tmp_path_factory, name: str, cut: float, flips) -> None:
    from twotower.data.shards import TokenShards

    copy = world.copy("data", tmp_path_factory.mktemp("shards"))
    target = copy / name
    target.write_bytes(_damage(target.read_bytes(), cut, flips))
    before = {p.name: digest(p) for p in copy.iterdir()}
    try:
        split = TokenShards(copy, "train")
    except TwoTowerError:
        split = None
    assert {p.name: digest(p) for p in copy.iterdir()} == before
    if split is not None:  # read without error: the data is the original's
        reference = TokenShards(world.data, "train")
        assert [list(d) for d in split.documents()] == [list(d) for d in reference.documents()]


both("shard_damage_is_caught", check_shards,
     name=st.sampled_from(["manifest.json", "train-00000.bin", "train-00000.docs.npy"]), **DAMAGE)
