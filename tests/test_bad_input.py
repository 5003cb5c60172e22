"""Bad input never crashes and nothing is lost (issue 16): every kind of bad input below, at
each entry point, ends in one of twotower's typed errors with a message that says what was wrong
(on the command line: one line, exit code 2, no traceback), or, where marked, in a correct
result; and the files it was given are unchanged. ``scripts/bad_input_table.py`` prints this
table with each case's actual outcome."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from twotower.errors import CheckpointError, DataError, TwoTowerError, UsageError


@dataclass
class Case:
    entry: str  # the entry point, as the table groups them
    what: str  # the bad input, in words
    run: Callable  # (world, tmp, fields) -> None; raises, or (CLI) returns the exit code and stderr
    error: type = UsageError  # the typed error expected
    match: str = ""  # a fragment the message must hold
    cli: bool = False
    setup: Callable | None = None  # (world, tmp) -> fields: makes the case's input files
    inputs: Callable | None = None  # (world, tmp) -> the paths that must not change


def cli(*argv: str) -> Callable:
    """A command line whose ``{name}`` fields are the world's paths, ``tmp`` and the setup's
    fields, run in this process."""

    def run(w, tmp: Path, made: dict):
        fields = {"backbone": w.backbone, "tt": w.tt, "data": w.data, "run": w.run, "tmp": tmp, **made}
        args = [a.format(**fields) for a in argv]
        from twotower.cli import main

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(args)
            except SystemExit as e:  # argparse's own errors
                code = e.code
        return code, err.getvalue()

    return run


def write(name: str, data: str | bytes) -> Callable:
    """A file made in the case's tmp directory, offered to the command line as {file}."""

    def make(w, tmp: Path) -> dict:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return {"file": path}

    return make


def damaged(name: str, damage: Callable[[Path], None]) -> Callable:
    """A copy of one of the world's directories with one of its files damaged, as {dir}."""

    def make(w, tmp: Path) -> dict:
        copy = w.copy(name, tmp)
        damage(copy)
        return {"dir": copy}

    return make


def truncate(relative: str, keep: float = 0.5) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        path = root / relative
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])

    return damage


def flip_bit(relative: str, at: float = 0.9) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        path = root / relative
        data = bytearray(path.read_bytes())
        data[int(len(data) * at)] ^= 0x10
        path.write_bytes(bytes(data))

    return damage


def edit_json(relative: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        path = root / relative
        value = json.loads(path.read_text())
        path.write_text(json.dumps(change(value)))

    return damage


def replace_text(relative: str, text: str) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        (root / relative).write_text(text)

    return damage


def without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def nested(d: dict, key: str, **changes) -> dict:
    return {**d, key: {**d[key], **changes}}


NOT_UTF8 = os.fsdecode(b"caf\xe9 au lait")  # how a command line's bytes that are not UTF-8 arrive
GEN = ("generate", "hi", "--model", "{tt}", "--max-new-tokens", "2", "--threads", "1")
TRAIN = ("train", "--data", "{data}", "--out-dir", "{tmp}/out", "--model", "{backbone}", "--seq-len", "32",
         "--block-size", "8", "--batch-size", "2", "--steps", "2", "--no-bf16", "--threads", "1")
SPEED = ("bench", "speed", "--model", "{tt}", "--prompts", "1", "--batch-sizes", "1", "--max-new-tokens", "2",
         "--repeats", "1", "--warmup", "0", "--modes", "mask_diffusion", "--threads", "1",
         "--output-dir", "{tmp}/speed")
QUALITY = ("eval", "quality", "--model", "{tt}", "--prompts", "1", "--max-new-tokens", "2", "--judge", "none",
           "--humaneval-problems", "0", "--nll-window", "32", "--threads", "1", "--output-dir", "{tmp}/quality")
PREPARE = ("data", "prepare", "--model", "{backbone}", "--threads", "1")
DISTILL = ("data", "distill", "--model", "{backbone}", "--max-new-tokens", "2", "--dtype", "float32", "--threads", "1")


def _cli_cases() -> list[Case]:
    c = []

    def add(entry, what, argv, match, error=UsageError, prepare=None, inputs=None):
        c.append(Case(entry, what, cli(*argv), error, match, True, prepare, inputs))

    g = "twotower generate"
    add(g, "a blank prompt", ("generate", "   "), "prompt is empty")
    add(g, "neither a prompt nor --messages", ("generate",), "give a prompt or --messages")
    add(g, "a prompt and --messages", ("generate", "hi", "--messages", "{file}"), "one of them",
        prepare=write("m.json", "[]"))
    add(g, "a prompt with bytes that are not UTF-8", ("generate", NOT_UTF8), "not valid UTF-8")
    add(g, "--max-new-tokens 0", (*GEN, "--max-new-tokens", "0"), "--max-new-tokens")
    add(g, "--max-new-tokens -5", (*GEN, "--max-new-tokens", "-5"), "--max-new-tokens")
    add(g, "--temperature -1", (*GEN, "--temperature", "-1"), "--temperature")
    add(g, "--temperature inf", (*GEN, "--temperature", "inf"), "--temperature")
    add(g, "--temperature nan", (*GEN, "--temperature", "nan"), "--temperature")
    add(g, "--top-k 0", (*GEN, "--top-k", "0"), "--top-k")
    add(g, "--top-p 0", (*GEN, "--top-p", "0"), "--top-p")
    add(g, "--top-p 1.5", (*GEN, "--top-p", "1.5"), "--top-p")
    add(g, "--seed -1", (*GEN, "--seed", "-1"), "--seed")
    add(g, "--block-size 0", (*GEN, "--block-size", "0"), "--block-size")
    add(g, "--steps-per-block 0", (*GEN, "--steps-per-block", "0"), "--steps-per-block")
    add(g, "--confidence-threshold 1.5", (*GEN, "--confidence-threshold", "1.5"), "--confidence-threshold")
    add(g, "--block-size with --mode ar", (*GEN, "--mode", "ar", "--block-size", "4"), "not used by --mode ar")
    add(g, "--verify with --mode mock_ar", (*GEN, "--mode", "mock_ar", "--verify"), "not used by --mode mock_ar")
    add(g, "--show-steps with --mode ar", (*GEN, "--mode", "ar", "--show-steps"), "--show-steps")
    add(g, "an empty --stop", (*GEN, "--stop", ""), "stop strings")
    add(g, "an unknown model name", ("generate", "hi", "--model", "no-such-model"), "unknown model", CheckpointError)
    add(g, "a missing .gguf path", ("generate", "hi", "--model", "/nonexistent/m.gguf"), "not found", CheckpointError)
    add(g, "a directory without config.json", ("generate", "hi", "--model", "{tmp}"), "no config.json",
        CheckpointError)
    add(g, "a text file as the model", ("generate", "hi", "--model", "{file}"), "expected a .gguf", CheckpointError,
        prepare=write("model.txt", "not a model"))
    add(g, "a .gguf of garbage after the magic bytes", ("generate", "hi", "--model", "{file}"),
        "not a readable GGUF", CheckpointError, prepare=write("bad.gguf", b"GGUF\x03\x00\x00\x00" + b"\x07" * 64),
        inputs=lambda w, tmp: [tmp / "bad.gguf"])
    add(g, "an empty .gguf", ("generate", "hi", "--model", "{file}"), "not a readable GGUF", CheckpointError,
        prepare=write("empty.gguf", b""))
    add(g, "--messages naming a missing file", ("generate", "--messages", "{tmp}/none.json"), "cannot read")
    add(g, "--messages that is not JSON", ("generate", "--messages", "{file}"), "cannot read a JSON",
        prepare=write("m.json", "{not json"))
    add(g, "--messages holding a JSON object", (*GEN[:1], "--model", "{tt}", "--messages", "{file}"), "a JSON list",
        prepare=write("m.json", '{"role": "user"}'))
    add(g, "--messages holding an empty list", ("generate", "--model", "{tt}", "--messages", "{file}"), "conversation",
        prepare=write("m.json", "[]"))
    add(g, "--messages with a message lacking content", ("generate", "--model", "{tt}", "--messages", "{file}"),
        'with "role" and "content"', prepare=write("m.json", '[{"role": "user"}]'))
    add(g, "--messages with an unknown role", ("generate", "--model", "{tt}", "--messages", "{file}"), "unknown role",
        prepare=write("m.json", '[{"role": "robot", "content": "hi"}]'))
    add(g, "--messages with non-text content", ("generate", "--model", "{tt}", "--messages", "{file}"),
        "content must be text", prepare=write("m.json", '[{"role": "user", "content": 3}]'))
    add(g, "--system with --messages", ("generate", "--messages", "{file}", "--system", "s"), "--system",
        prepare=write("m.json", '[{"role": "user", "content": "hi"}]'))
    add(g, "a prompt longer than the context", ("generate", "word " * 600, "--model", "{tt}", "--threads", "1"),
        "exceeds the model's context")
    add(g, "--untrained-denoiser with a trained directory", (*GEN, "--untrained-denoiser"), "drop the untrained")
    add(g, "--threads 0", (*GEN, "--threads", "0"), "--threads must be >= 1")
    add(g, "--dtype float16 (not offered)", (*GEN, "--dtype", "float16"), "invalid choice")
    add(g, "--mode fast (no such mode)", (*GEN, "--mode", "fast"), "invalid choice")
    add(g, "--max-new-tokens ten", (*GEN, "--max-new-tokens", "ten"), "invalid int value")

    b = "twotower bench"
    add(b, "bench speed --thresholds 1.5", (*SPEED, "--thresholds", "1.5"), "--thresholds")
    add(b, "bench speed --block-sizes 0", (*SPEED, "--block-sizes", "0"), "--block-sizes")
    add(b, "bench speed --batch-sizes 0", (*SPEED, "--batch-sizes", "0"), "--batch-sizes")
    add(b, "bench speed --repeats 0", (*SPEED, "--repeats", "0"), "--repeats")
    add(b, "bench speed --prompts 0", (*SPEED, "--prompts", "0"), "prompt count")
    add(b, "bench speed --prompts 99 (more than the set)", (*SPEED, "--prompts", "99"), "prompt count")
    add(b, "bench speed --steps-per-block 0", (*SPEED, "--steps-per-block", "0"), "--steps-per-block")
    add(b, "bench speed --output-dir naming a file", (*SPEED, "--output-dir", "{file}"), "a file is in the way",
        prepare=write("taken", "keep me"), inputs=lambda w, tmp: [tmp / "taken"])
    add(b, "bench speed --dtype float16", (*SPEED, "--dtype", "float16"), "invalid choice")
    add(b, "bench ar --output naming a directory", ("bench", "ar", "--output", "{tmp}"), "is a directory")
    add(b, "bench ar --repeats 0", ("bench", "ar", "--repeats", "0"), "--repeats")
    add(b, "bench step --context-tokens 1", ("bench", "step", "--context-tokens", "1"), "--context-tokens")
    add(b, "bench step --output under a file", ("bench", "step", "--output", "{file}/step.json"),
        "a file is in the way", prepare=write("taken", "keep me"), inputs=lambda w, tmp: [tmp / "taken"])

    q = "twotower eval quality"
    add(q, "a missing --prompts-file", (*QUALITY, "--prompts-file", "{tmp}/none.jsonl"), "no such prompt file",
        DataError)
    add(q, "a --prompts-file that is not UTF-8", (*QUALITY, "--prompts-file", "{file}"), "not UTF-8", DataError,
        prepare=write("p.jsonl", b'{"text": "caf\xe9"}\n'))
    add(q, "a --prompts-file line that is not JSON", (*QUALITY, "--prompts-file", "{file}"), ":2: invalid JSON",
        DataError, prepare=write("p.jsonl", '{"text": "a"}\n{"text": \n'))
    add(q, "a --prompts-file line without text", (*QUALITY, "--prompts-file", "{file}"), ':1: no "text"', DataError,
        prepare=write("p.jsonl", '{"kind": "prose"}\n'))
    add(q, "an empty --prompts-file", (*QUALITY, "--prompts-file", "{file}"), "the file is empty", DataError,
        prepare=write("p.jsonl", "\n\n"))
    add(q, "--batch-size 0", (*QUALITY, "--batch-size", "0"), "batch size")
    add(q, "--nll-window 0", (*QUALITY, "--nll-window", "0"), "NLL window")
    add(q, "--nll-t 0", (*QUALITY, "--nll-t", "0"), "NLL mask levels")
    add(q, "--humaneval-problems -1", (*QUALITY, "--humaneval-problems", "-1"), "HumanEval problems")
    add(q, "--output-dir naming a file", (*QUALITY, "--output-dir", "{file}"), "a file is in the way",
        prepare=write("taken", "keep me"), inputs=lambda w, tmp: [tmp / "taken"])
    add(q, "a missing --heldout file", (*QUALITY, "--heldout", "{tmp}/none.txt"), "cannot read it", DataError)
    add(q, "--thresholds -0.1", (*QUALITY, "--thresholds", "-0.1"), "--thresholds")

    d = "twotower data"
    add(d, "prepare without sources", (*PREPARE, "--out", "{tmp}/o"), "give files")
    add(d, "prepare --out naming an existing file", (*PREPARE, "{file}", "--out", "{file}"), "is a file",
        prepare=write("corpus.txt", "some text"), inputs=lambda w, tmp: [tmp / "corpus.txt"])
    add(d, "prepare --out naming a non-empty directory", (*PREPARE, "{file}", "--out", "{tmp}"), "not empty",
        prepare=write("corpus.txt", "some text"), inputs=lambda w, tmp: [tmp / "corpus.txt"])
    add(d, "prepare --val-fraction 1.5", (*PREPARE, "{file}", "--out", "{tmp}/o", "--val-fraction", "1.5"),
        "val_fraction", prepare=write("corpus.txt", "some text"))
    add(d, "prepare a missing source", (*PREPARE, "{tmp}/none.txt", "--out", "{tmp}/o"), "no such file", DataError)
    add(d, "prepare an empty text file", (*PREPARE, "{file}", "--out", "{tmp}/o"), "the file is empty", DataError,
        prepare=write("empty.txt", "  \n"))
    add(d, "prepare a file that is not UTF-8", (*PREPARE, "{file}", "--out", "{tmp}/o"), "not UTF-8", DataError,
        prepare=write("latin1.txt", b"caf\xe9"))
    add(d, "prepare a JSONL line that is not JSON", (*PREPARE, "{file}", "--out", "{tmp}/o"), ":2: invalid JSON",
        DataError, prepare=write("d.jsonl", '{"text": "a"}\n{oops\n'))
    add(d, "prepare a JSONL record without the field", (*PREPARE, "{file}", "--out", "{tmp}/o"), "no field 'text'",
        DataError, prepare=write("d.jsonl", '{"body": "a"}\n'))
    add(d, "prepare --field messages with malformed messages",
        (*PREPARE, "{file}", "--out", "{tmp}/o", "--field", "messages"), "must be a list", DataError,
        prepare=write("d.jsonl", '{"messages": "hello"}\n'))
    add(d, "prepare --loss-on assistant without chats", (*PREPARE, "{file}", "--out", "{tmp}/o", "--loss-on",
                                                         "assistant"), "needs chat messages", DataError,
        prepare=write("d.txt", "text"))
    add(d, "prepare a directory with no text files", (*PREPARE, "{tmp}/sub", "--out", "{tmp}/o"),
        "no text or JSONL files", DataError, prepare=write("sub/a.bin", b"\x00\x01"))
    add(d, "prepare a corpus too small for any validation document",
        (*PREPARE, "{file}", "--out", "{tmp}/o", "--val-fraction", "0.01"), "no document went to validation",
        DataError, prepare=write("one.txt", "a single short document"))
    add(d, "distill without --prompts or --instructions", (*DISTILL, "--out", "{tmp}/o.jsonl"), "give either")
    add(d, "distill --instructions without --chat", (*DISTILL, "--instructions", "2", "--out", "{tmp}/o.jsonl"),
        "add --chat")
    add(d, "distill --batch-size 0", (*DISTILL, "--instructions", "2", "--chat", "--batch-size", "0", "--out",
                                      "{tmp}/o.jsonl"), "batch_size")
    add(d, "distill --max-new-tokens 0", (*DISTILL, "--instructions", "2", "--chat", "--max-new-tokens", "0", "--out",
                                          "{tmp}/o.jsonl"), "max_new_tokens")
    add(d, "distill --out naming a file it did not write", (*DISTILL, "--instructions", "2", "--chat", "--out",
                                                             "{file}"), "refusing to append", DataError,
        prepare=write("notes.txt", "my notes\nmore notes"), inputs=lambda w, tmp: [tmp / "notes.txt"])
    add(d, "distill --out naming a directory", (*DISTILL, "--instructions", "2", "--chat", "--out", "{tmp}"),
        "not a file")
    add(d, "distill --instructions 0", (*DISTILL, "--instructions", "0", "--chat", "--out", "{tmp}/o.jsonl"),
        "positive integer")

    t = "twotower train"
    add(t, "no --data", ("train", "--out-dir", "{tmp}/o"), "--data is required")
    add(t, "--config naming a missing file", ("train", "--config", "{tmp}/none.json"), "no such file")
    add(t, "--config that is not JSON", ("train", "--config", "{file}"), "not valid JSON",
        prepare=write("c.json", "{data: x}"))
    add(t, "--config holding a JSON list", ("train", "--config", "{file}"), "must hold a JSON object",
        prepare=write("c.json", "[1, 2]"))
    add(t, "--config with an unknown key", ("train", "--config", "{file}"), "unknown training setting(s) stepz",
        prepare=write("c.json", '{"data": "d", "out_dir": "o", "stepz": 3}'))
    add(t, "--config with a string for an int", ("train", "--config", "{file}"), "steps must be int",
        prepare=write("c.json", '{"data": "d", "out_dir": "o", "steps": "ten"}'))
    add(t, "--seq-len 0", (*TRAIN, "--seq-len", "0"), "seq_len=0")
    add(t, "--log-every 0", (*TRAIN, "--log-every", "0"), "log_every=0")
    add(t, "--lr 0", (*TRAIN, "--lr", "0"), "lr=0")
    add(t, "--steps 0", (*TRAIN, "--steps", "0"), "steps=0")
    add(t, "--lora-rank 0 (not peft's message)", (*TRAIN, "--lora-rank", "0"), "lora_rank=0")
    add(t, "--seq-len not a multiple of the block", (*TRAIN, "--seq-len", "30"), "not a multiple of block size")
    add(t, "--curriculum ending out of order", (*TRAIN, "--curriculum", "4:10", "8:5"), "increasing")
    add(t, "--curriculum 4-10 (malformed)", (*TRAIN, "--curriculum", "4-10"), "SIZE:UNTIL_STEP")
    add(t, "--mask-pattern bogus", (*TRAIN, "--mask-pattern", "bogus"), "mask_pattern")
    add(t, "--flavour half", (*TRAIN, "--flavour", "half"), "flavour")
    add(t, "--complementary-masks with an odd batch", (*TRAIN, "--complementary-masks", "--batch-size", "3"),
        "must be even")
    add(t, "--stop-after 0", (*TRAIN, "--stop-after", "0"), "stop_after")
    add(t, "--fsdp without torchrun", (*TRAIN, "--fsdp"), "torchrun")
    add(t, "--init-from naming nothing", (*TRAIN, "--init-from", "nothing-here"), "neither a saved two-tower",
        CheckpointError)
    add(t, "--data naming a directory without a manifest", (*TRAIN[:1], "--data", "{tmp}", *TRAIN[3:]),
        "no manifest.json", DataError)
    add(t, "--data with a manifest that is not JSON", ("train", "--data", "{dir}", *TRAIN[3:]), "not valid JSON",
        DataError, prepare=damaged("data", replace_text("manifest.json", "{")))
    add(t, "--data with a manifest without splits", ("train", "--data", "{dir}", *TRAIN[3:]), "no 'splits'",
        DataError, prepare=damaged("data", edit_json("manifest.json", lambda m: without(m, "splits"))))
    add(t, "--data with an unknown token dtype", ("train", "--data", "{dir}", *TRAIN[3:]), "token dtype", DataError,
        prepare=damaged("data", edit_json("manifest.json", lambda m: {**m, "dtype": "float64"})))
    add(t, "--data with a shard file missing", ("train", "--data", "{dir}", *TRAIN[3:]), "missing (the manifest",
        DataError, prepare=damaged("data", lambda d: (d / "train-00000.bin").unlink()))
    add(t, "--data with a truncated shard", ("train", "--data", "{dir}", *TRAIN[3:]), "damaged", DataError,
        prepare=damaged("data", truncate("train-00000.bin")))
    add(t, "--data with a bit-flipped shard", ("train", "--data", "{dir}", *TRAIN[3:]), "damaged", DataError,
        prepare=damaged("data", flip_bit("train-00000.bin")))
    add(t, "--data with a truncated shard, no checksums (older manifest)", ("train", "--data", "{dir}", *TRAIN[3:]),
        "not a whole number", DataError,
        prepare=damaged("data", lambda d: (edit_json("manifest.json", lambda m: without(m, "sha256"))(d),
                                           truncate("train-00000.bin", 0.5003)(d))))
    add(t, "--data with a damaged offsets file, no checksums", ("train", "--data", "{dir}", *TRAIN[3:]),
        "not a readable .npy", DataError,
        prepare=damaged("data", lambda d: (edit_json("manifest.json", lambda m: without(m, "sha256"))(d),
                                           replace_text("train-00000.docs.npy", "garbage")(d))))
    add(t, "--out-dir naming a saved model directory", ("train", "--data", "{data}", "--out-dir", "{dir}",
                                                        *TRAIN[5:]), "did not write", prepare=damaged("tt", id),
        inputs=lambda w, tmp: sorted((tmp / "tt").rglob("*")))
    add(t, "--out-dir naming a file", ("train", "--data", "{data}", "--out-dir", "{file}", *TRAIN[5:]), "is a file",
        prepare=write("taken", "keep me"), inputs=lambda w, tmp: [tmp / "taken"])
    add(t, "resuming a run whose every checkpoint is damaged", ("train", "--data", "{data}", "--out-dir", "{dir}",
                                                                *TRAIN[5:], "--steps", "4"),
        "every checkpoint is damaged", CheckpointError,
        prepare=damaged("run", lambda r: [truncate(f"checkpoints/{p.name}/trainable.safetensors")(r)
                                          for p in (r / "checkpoints").iterdir()]))
    return c


def _python_cases() -> list[Case]:
    from twotower.generate import DecodingSettings, decode, resolve_settings
    from twotower.generate.ar import generate_ar
    from twotower.generate.diffusion import generate_mask_diffusion, generate_mock_ar

    c = []

    def add(entry, what, run, match, error=UsageError):
        c.append(Case(entry, what, lambda w, t, made: run(w, t), error, match))

    s = "python: DecodingSettings / resolve_settings"
    add(s, "an unknown mode", lambda w, t: resolve_settings(mode="fast"), "unknown mode")
    add(s, "an unknown option", lambda w, t: resolve_settings(beam_width=2), "unknown decoding option")
    add(s, "a string temperature", lambda w, t: DecodingSettings(temperature="0.7"), "temperature")
    add(s, "an infinite temperature", lambda w, t: DecodingSettings(temperature=float("inf")), "temperature")
    add(s, "a fractional max_new_tokens", lambda w, t: DecodingSettings(max_new_tokens=1.5), "max_new_tokens")
    add(s, "max_new_tokens=True", lambda w, t: DecodingSettings(max_new_tokens=True), "max_new_tokens")
    add(s, 'verify="yes"', lambda w, t: DecodingSettings(verify="yes"), "verify")
    add(s, "a string stop token id", lambda w, t: DecodingSettings(stop_token_ids=["x"]), "stop token ids")
    add(s, "a number as a stop string", lambda w, t: DecodingSettings(stop_strings=[3]), "stop strings")
    add(s, "top_p=0", lambda w, t: DecodingSettings(top_p=0), "top_p")
    add(s, "seed=True", lambda w, t: DecodingSettings(seed=True), "seed")
    add(s, "an unknown commit rule", lambda w, t: DecodingSettings(commit_rule="greedy"), "unknown commit rule")
    add(s, "a threshold of NaN", lambda w, t: DecodingSettings(confidence_threshold=float("nan")),
        "confidence_threshold")
    add(s, "steps_per_block with mode mock_ar", lambda w, t: resolve_settings(mode="mock_ar", steps_per_block=2),
        "not used by mode mock_ar")

    d = "python: decode"
    settings = DecodingSettings(max_new_tokens=3, stop_token_ids=())
    tt = _tt_model
    add(d, "prompts=None", lambda w, t: decode(tt(w), None, settings), "prompts must be")
    add(d, "prompts=42", lambda w, t: decode(tt(w), 42, settings), "prompts must be")
    add(d, "prompts={'a': 1}", lambda w, t: decode(tt(w), {"a": 1}, settings), "prompts must be")
    add(d, "an empty prompt [[]]", lambda w, t: decode(tt(w), [[]], settings), "prompt 0 is empty")
    add(d, "no prompts []", lambda w, t: decode(tt(w), [], settings), "is empty")
    add(d, "float token ids in a list", lambda w, t: decode(tt(w), [[1.5, 2]], settings), "token ids are integers")
    add(d, "bool token ids in a list", lambda w, t: decode(tt(w), [[True, 5]], settings), "got a bool")
    add(d, "a float tensor", lambda w, t: decode(tt(w), torch.tensor([[0.5, 1.0]]), settings), "integer token ids")
    add(d, "a bool tensor", lambda w, t: decode(tt(w), torch.tensor([[True, False]]), settings), "integer token ids")
    add(d, "a NumPy float array", lambda w, t: decode(tt(w), np.array([[1.0, 2.0]]), settings), "integer token ids")
    add(d, "a 3-D tensor", lambda w, t: decode(tt(w), torch.zeros(2, 2, 2, dtype=torch.long), settings), "1-D or 2-D")
    add(d, "an attention_mask of the wrong shape",
        lambda w, t: decode(tt(w), torch.tensor([[5, 9]]), settings, attention_mask=torch.ones(1, 3)), "must match")
    add(d, "an attention_mask that is not left padding",
        lambda w, t: decode(tt(w), torch.tensor([[5, 9, 3]]), settings, attention_mask=torch.tensor([[1, 0, 1]])),
        "padding at one end")
    add(d, "a token id past the vocabulary", lambda w, t: decode(tt(w), [[10**9]], settings), "must lie in")
    add(d, "a negative token id", lambda w, t: decode(tt(w), [[-1, 5]], settings), "must lie in")
    add(d, "a text prompt without a tokenizer", lambda w, t: decode(tt(w), "hello", settings), "tokenizer")
    add(d, "stop strings without a tokenizer",
        lambda w, t: decode(tt(w), [[5, 9]], settings.replace(stop_strings=("x",))), "need a tokenizer")
    add(d, "a stop token id past the vocabulary",
        lambda w, t: decode(tt(w), [[5, 9]], settings.replace(stop_token_ids=(10**9,))), "not a token id")
    add(d, "settings that are not DecodingSettings", lambda w, t: decode(tt(w), [[5]], {"mode": "ar"}),
        "must be a DecodingSettings")
    add(d, "a model that is not one", lambda w, t: decode("model", [[5]], settings), "model must be")
    add(d, "mask diffusion on a backbone alone", lambda w, t: decode(tt(w).context, [[5]], settings),
        "needs a two-tower model")
    add(d, "a prompt holding the mask token", lambda w, t: decode(tt(w), [[5, tt(w).mask_token_id]], settings),
        "must lie in")
    add(d, "an attention_mask with values other than 0 and 1",
        lambda w, t: decode(tt(w), torch.tensor([[5, 9]]), settings, attention_mask=torch.tensor([[2, 1]])), "0 or 1")

    p = "python: decoders"
    add(p, "generate_ar max_new_tokens=True", lambda w, t: generate_ar(tt(w).context, [[5]], max_new_tokens=True),
        "max_new_tokens")
    add(p, 'generate_ar temperature="0.7"', lambda w, t: generate_ar(tt(w).context, [[5]], temperature="0.7"),
        "temperature")
    add(p, 'generate_ar eos_token_id="x"', lambda w, t: generate_ar(tt(w).context, [[5]], eos_token_id="x"),
        "eos_token_id")
    add(p, "generate_ar top_k=0", lambda w, t: generate_ar(tt(w).context, [[5]], top_k=0), "top_k")
    add(p, "generate_ar a string as input_ids", lambda w, t: generate_ar(tt(w).context, "hello"), "input_ids")
    add(p, "generate_mask_diffusion block_size=0", lambda w, t: generate_mask_diffusion(tt(w), [[5]], block_size=0),
        "block_size")
    add(p, "generate_mask_diffusion threshold NaN",
        lambda w, t: generate_mask_diffusion(tt(w), [[5]], confidence_threshold=float("nan")), "confidence_threshold")
    add(p, "generate_mask_diffusion an unknown commit rule",
        lambda w, t: generate_mask_diffusion(tt(w), [[5]], commit_rule="greedy"), "unknown commit rule")
    add(p, "generate_mask_diffusion another mask_token_id",
        lambda w, t: generate_mask_diffusion(tt(w), [[5]], mask_token_id=3), "it is")
    add(p, "generate_mask_diffusion a block past the context",
        lambda w, t: generate_mask_diffusion(tt(w), [[5] * 500], max_new_tokens=10, block_size=16), "the last block")
    add(p, "generate_mock_ar block_size=4", lambda w, t: generate_mock_ar(tt(w), [[5]], block_size=4), "fixes")

    h = "python: transformers wrapper"
    add(h, "generate_mask_diffusion mask_token_id=3",
        lambda w, t: _wrapper(w).generate_mask_diffusion(torch.tensor([[5, 9]]), mask_token_id=3), "it is")
    add(h, "generate_ar with a 3-D tensor", lambda w, t: _wrapper(w).generate_ar(torch.zeros(1, 1, 2, dtype=torch.long)),
        "1-D or 2-D")
    add(h, "generate_mock_ar top_p=2", lambda w, t: _wrapper(w).generate_mock_ar(torch.tensor([[5]]), top_p=2),
        "top_p")
    add(h, "from_pretrained torch_dtype=float16",
        lambda w, t: __import__("twotower").TwoTowerForCausalLM.from_pretrained(w.tt, torch_dtype=torch.float16),
        "unknown dtype")
    add(h, "from_pretrained a missing directory",
        lambda w, t: __import__("twotower").TwoTowerForCausalLM.from_pretrained(t / "none"), "not found",
        CheckpointError)
    add(h, "place_towers_on_devices on a missing device",
        lambda w, t: _wrapper(w).place_towers_on_devices("cpu", "warp-drive"), "device")

    lo = "python: loaders"
    from twotower.checkpoints import load_backbone
    from twotower.checkpoints.two_tower import load_model

    add(lo, "load_backbone(None)", lambda w, t: load_backbone(None), "a model is")
    add(lo, 'load_backbone dtype="float16"', lambda w, t: load_backbone(str(w.backbone), dtype="float16"),
        "unknown dtype")
    add(lo, "load_backbone dtype=torch.int8", lambda w, t: load_backbone(str(w.backbone), dtype=torch.int8),
        "unknown dtype")
    add(lo, "load_backbone on a missing GPU", lambda w, t: load_backbone(str(w.backbone), device="cuda:3"),
        "not available" if not torch.cuda.is_available() else "does not exist")
    add(lo, "load_backbone on a nonsense device", lambda w, t: load_backbone(str(w.backbone), device="warp"),
        "invalid device")
    add(lo, 'load_model("")', lambda w, t: load_model(""), "a model is")
    add(lo, "load_model a trained directory untrained", lambda w, t: load_model(str(w.tt), untrained=True),
        "drop the untrained")
    add(lo, "load_model a training checkpoint untrained",
        lambda w, t: load_model(str(w.run / "checkpoints" / "step-00000004"), untrained=True), "drop the untrained")
    return c


def _file_cases() -> list[Case]:
    from twotower.checkpoints.load import _check_gguf
    from twotower.checkpoints.two_tower import load_model

    c = []

    def add(entry, what, name, damage, match, error=CheckpointError, load=None):
        def setup(w, tmp, name=name, damage=damage):
            damage(w.copy(name, tmp))
            return {}

        def run(w, tmp, made, name=name, load=load):
            (load or (lambda p: load_model(str(p))))(tmp / name)

        c.append(Case(entry, what, run, error, match, setup=setup,
                      inputs=lambda w, tmp, name=name: sorted((tmp / name).rglob("*"))))

    f = "files: a saved two-tower directory"
    add(f, "config.json that is not JSON", "tt", replace_text("config.json", "{"), "config.json")
    add(f, "config.json holding a list", "tt", replace_text("config.json", "[]"), "config.json")
    add(f, "config.json without denoiser_config", "tt", edit_json("config.json", lambda c: without(c, "denoiser_config")),
        "denoiser_config is missing")
    add(f, "config.json with lora_rank 0", "tt",
        edit_json("config.json", lambda c: nested(c, "denoiser_config", lora_rank=0)), "invalid model settings")
    add(f, "config.json with a string vocab_size", "tt",
        edit_json("config.json", lambda c: nested(c, "backbone_config", vocab_size="x")), "invalid model settings")
    add(f, "config.json with an unknown dtype", "tt", edit_json("config.json", lambda c: {**c, "dtype": "float7"}),
        "unknown dtype", load=lambda p: load_model(str(p), dtype=None))
    add(f, "config.json naming a missing backbone", "tt",
        edit_json("config.json", lambda c: {**c, "backbone": "/nonexistent/backbone"}), "not found")
    add(f, "model.safetensors truncated", "tt", truncate("model.safetensors"), "corrupt or truncated")
    add(f, "model.safetensors with a flipped bit in the tensors", "tt", flip_bit("model.safetensors"),
        "do not match the checksum")
    add(f, "model.safetensors with a flipped bit in the header's length", "tt", flip_bit("model.safetensors", 0.0),
        "corrupt")
    add(f, "model.safetensors missing", "tt", lambda d: (d / "model.safetensors").unlink(), "no .safetensors")
    add(f, "generation_config.json that is not JSON", "tt", replace_text("generation_config.json", "{"),
        "generation_config.json")
    add(f, "generation_config.json with block_size 0", "tt",
        edit_json("generation_config.json", lambda g: {**g, "block_size": 0}), "block_size")
    add(f, "generation_config.json recommending an unknown drafter", "tt",
        edit_json("generation_config.json", lambda g: {**g, "quantize_drafter": "int3"}),
        "quantize_drafter = 'int3' is not a drafter quantization", CheckpointError)
    f = "files: a backbone directory"
    add(f, "config.json of an unsupported architecture", "backbone",
        edit_json("config.json", lambda c: {**c, "model_type": "gpt2"}), "config.json")
    add(f, "model.safetensors truncated", "backbone", truncate("model.safetensors"), "corrupt or truncated")
    add(f, "weights of another shape", "backbone",
        edit_json("config.json", lambda c: {**c, "hidden_size": 64}), "does not match")
    f = "files: a training checkpoint"
    ckpt = "checkpoints/step-00000004"
    add(f, "state.json that is not JSON", "run", replace_text(f"{ckpt}/state.json", "{"), "state.json",
        load=lambda p: load_model(str(p / ckpt)))
    add(f, "trainable.safetensors truncated", "run", truncate(f"{ckpt}/trainable.safetensors"), "corrupt or truncated",
        load=lambda p: load_model(str(p / ckpt)))
    add(f, "trainable.safetensors with a flipped bit", "run", flip_bit(f"{ckpt}/trainable.safetensors"),
        "do not match the checksum", load=lambda p: load_model(str(p / ckpt)))

    def gguf_case(what, data, match, sha256=None):
        def setup(w, tmp, data=data):
            (tmp / "m.gguf").write_bytes(data)
            return {}

        c.append(Case("files: GGUF", what, lambda w, tmp, made, sha256=sha256: _check_gguf(tmp / "m.gguf", sha256),
                      CheckpointError, match, setup=setup, inputs=lambda w, tmp: [tmp / "m.gguf"]))

    gguf_case("the magic bytes alone", b"GGUF", "not a readable GGUF")
    gguf_case("a wrong magic", b"GGML" + b"\x00" * 64, "not a readable GGUF")
    gguf_case("a huge tensor count", b"GGUF\x03\x00\x00\x00" + (2**60).to_bytes(8, "little") + b"\x00" * 8,
              "not a readable GGUF")
    gguf_case("a registry file whose checksum differs", b"GGUF", "reinstall the package", sha256="0" * 64)
    return c


_MODELS: dict = {}


def _tt_model(w):
    if "tt" not in _MODELS:
        from twotower.checkpoints.two_tower import load_model

        _MODELS["tt"] = load_model(str(w.tt)).model
    return _MODELS["tt"]


def _wrapper(w):
    if "wrapper" not in _MODELS:
        from twotower import TwoTowerForCausalLM

        _MODELS["wrapper"] = TwoTowerForCausalLM.from_pretrained(w.tt)
    return _MODELS["wrapper"]


CASES = _cli_cases() + _python_cases() + _file_cases()


def _digests(paths) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir" for p in paths}


def run_case(case: Case, world, tmp: Path):
    """Set the case up, run it, and check that its input files did not change; returns what
    the run returned, re-raising what it raised."""
    made = case.setup(world, tmp) if case.setup is not None else {}
    before = _digests(case.inputs(world, tmp)) if case.inputs is not None else None
    try:
        return case.run(world, tmp, made)
    finally:
        if before is not None:
            assert _digests(case.inputs(world, tmp)) == before, "an input file changed"


def outcome(case: Case, world, tmp: Path) -> tuple[str, str]:
    """(how the case ended, the message): for the report."""
    try:
        result = run_case(case, world, tmp)
    except TwoTowerError as e:
        return type(e).__name__, str(e)
    except Exception as e:  # noqa: BLE001 - the report shows any other ending as what it is
        return f"CRASH {type(e).__name__}", str(e)
    if case.cli:
        code, err = result
        lines = [line for line in err.splitlines() if "error:" in line]
        if code == 2 and lines and "Traceback" not in err:
            return "exit 2", lines[-1]
        return f"CRASH exit {code}", err.strip()[-300:]
    return "ok", ""


@pytest.mark.parametrize("case", CASES, ids=[f"{c.entry}: {c.what}" for c in CASES])
def test_bad_input(case: Case, world, tmp_path):
    if case.cli:
        code, err = run_case(case, world, tmp_path)
        assert code == 2, err
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert errors and case.match in errors[-1], err
        return
    with pytest.raises(case.error) as raised:
        run_case(case, world, tmp_path)
    assert case.match in str(raised.value)


def test_there_are_at_least_120_kinds():
    assert len(CASES) >= 120
    assert len({(c.entry, c.what) for c in CASES}) == len(CASES)


# -- odd but valid input gives the correct result ------------------------------------------------


def test_odd_but_valid_prompts_give_the_same_tokens(world):
    from twotower.generate import DecodingSettings, decode

    model = _tt_model(world)
    settings = DecodingSettings(mode="ar", max_new_tokens=4, stop_token_ids=())
    reference = decode(model, [[5, 9, 17]], settings).tokens
    for same in (np.array([[5, 9, 17]]), np.array([5, 9, 17], dtype=np.int32), [torch.tensor(5), torch.tensor(9),
                 torch.tensor(17)], [np.int64(5), np.int64(9), np.int64(17)], torch.tensor([5, 9, 17]),
                 [torch.tensor([5, 9, 17])]):
        assert decode(model, same, settings).tokens == reference, same
    # a right-padded batch reads the same real tokens as a left-padded one
    right = decode(model, torch.tensor([[5, 9, 17], [7, 8, 0]]), settings, attention_mask=torch.tensor([[1, 1, 1],
                                                                                                        [1, 1, 0]]))
    left = decode(model, [[5, 9, 17], [7, 8]], settings)
    assert right.tokens == left.tokens


# -- nothing is lost ---------------------------------------------------------------------------------


def _run_config(world, out: Path, **overrides):
    from twotower.train import TrainConfig

    settings = dict(data=str(world.data), out_dir=str(out), model=str(world.backbone), seq_len=32, block_size=8,
                    batch_size=2, steps=4, lr=3e-3, warmup_steps=1, log_every=1, eval_every=4, save_every=2,
                    val_batches=1, val_prompts=1, bf16=False)
    return TrainConfig(**(settings | overrides))


def test_resume_skips_a_damaged_checkpoint_and_continues_exactly(world, tmp_path, caplog):
    """The newest checkpoint truncated (a kill while the disk filled, say): the run resumes from
    the one before it, says which it skipped, and ends with the weights of the unbroken run."""
    from twotower.checkpoints.tensors import read_tensors
    from twotower.train import train

    run = world.copy("run", tmp_path)
    shutil.rmtree(run / "final")
    truncate("checkpoints/step-00000004/trainable.safetensors")(run)
    (run / "checkpoints" / ".tmp-killed").mkdir()  # a save a kill interrupted
    with caplog.at_level("WARNING"):
        train(_run_config(world, run), progress=False)
    assert "step-00000004" in caplog.text and "skipping a damaged checkpoint" in caplog.text
    assert not (run / "checkpoints" / ".tmp-killed").exists()
    resumed, reference = read_tensors(run / "final" / "model.safetensors")[0], read_tensors(
        world.run / "final" / "model.safetensors")[0]
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in resumed)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [
        json.loads(line)["step"] for line in (world.run / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_into_a_foreign_directory_only_with_overwrite(world, tmp_path):
    from twotower.train import train

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="did not write"):
        train(_run_config(world, out, steps=2, save_every=2, eval_every=2), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    train(_run_config(world, out, steps=2, save_every=2, eval_every=2), progress=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me" and (out / "final" / "model.safetensors").is_file()


def _chat_record(i: int) -> str:
    return json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]})


def test_distill_drops_only_a_line_cut_by_a_kill(tmp_path):
    from twotower.data.distill import _resume_point

    out = tmp_path / "d.jsonl"
    out.write_text(_chat_record(0) + "\n" + _chat_record(1)[:10])
    assert _resume_point(out, chat=True) == 1
    assert out.read_text() == _chat_record(0) + "\n"
    with pytest.raises(DataError, match="refusing to append"):
        _resume_point(out, chat=False)  # chat records are not text records
    assert out.read_text() == _chat_record(0) + "\n"


def test_a_killed_prepare_leaves_nothing_the_next_keeps(world, tmp_path):
    from twotower.data.shards import TEMPORARY_PREFIX, prepare
    from twotower.data.sources import SourceSpec

    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat " * 20)
    leftover = tmp_path / f"{TEMPORARY_PREFIX}out.abc123"
    leftover.mkdir()  # what a kill -9 during a prepare of out/ leaves
    prepare([SourceSpec(str(corpus))], world.tokenizer, tmp_path / "out", val_fraction=0.0)
    assert not leftover.exists() and (tmp_path / "out" / "manifest.json").is_file()
