"""Command-line options shared by several commands, with their choices taken from the
registries (modes from the registered strategies, commit rules, dtypes), and the translation of
decoding options into ``DecodingSettings`` by the one rule of ``resolve_settings``."""

from __future__ import annotations

import argparse
import re
from contextlib import contextmanager

from ..checkpoints.load import DEFAULT_MODEL
from ..checkpoints.two_tower import DRAFTER_SCHEMES
from ..errors import UsageError
from ..generate.commit import COMMIT_RULES
from ..generate.settings import DEFAULT_CONFIDENCE_THRESHOLD, FIELDS, DecodingSettings, resolve_settings
from ..generate.strategies import modes
from ..model.devices import DTYPE_CHOICES
from ..model.quant import SCHEMES as QUANT_SCHEMES

# decoding options whose flag is not the field's name
FLAGS = {"stop_strings": "--stop", "stop_token_ids": "--stop-token-id"}


def flag(field: str) -> str:
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def add_model_options(parser: argparse.ArgumentParser, dtype_default: str = "float32") -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"registry name, .gguf file, backbone or two-tower directory, or a training "
                             f"checkpoint (default {DEFAULT_MODEL})")
    parser.add_argument("--dtype", choices=list(DTYPE_CHOICES), default=dtype_default,
                        help=f"auto: bf16 where the CPU or GPU has native bf16 kernels, else fp32 (default {dtype_default})")
    parser.add_argument("--quantize", choices=list(QUANT_SCHEMES), default="none",
                        help="weight-only quantization of both towers' projections (the AR model too): int8 per "
                             "channel or int4 in groups of 32 (a GGUF's Q4_1 blocks), through PyTorch's packed kernels")
    parser.add_argument("--quantize-drafter", choices=list(DRAFTER_SCHEMES), default=None,
                        help="the denoiser tower's own quantization (none, int8, int4: the dial commits the "
                             "drafter's tokens, so there it changes them; fused passes are refused), or fast: a copy "
                             "of the denoiser that drafts for verified decoding alone, int4, bf16 where the CPU or GPU "
                             "has native bf16 kernels, PyTorch's fused kernels, compiled with --compile. Verified "
                             "decoding stays the AR model's output whatever drafts it checks, so a cheaper drafter "
                             "is speed without errors. Default: what the model recommends (the shipped denoiser: "
                             "fast), else --quantize's")
    parser.add_argument("--compile", action="store_true",
                        help="decoding passes through torch.compile (both towers; prompts stay eager): faster steps "
                             "after a one-off compilation (minutes on 2 cores, then cached on disk); the same tokens")
    parser.add_argument("--untrained-denoiser", action="store_true",
                        help="an untrained denoiser (a copy of the AR model) instead of the one shipped for the model")
    parser.add_argument("--exact", action=argparse.BooleanOptionalAction, default=True,
                        help="batch- and shape-invariant inference, so that outputs do not depend on batch mates and "
                             "verified decoding is AR's in every dtype (default); --no-exact takes PyTorch's fused "
                             "kernels: faster, not invariant")


def add_dial_options(parser: argparse.ArgumentParser, sweep: bool = False) -> None:
    """The options that select a recommended preset or the plain dial (see resolve_settings);
    ``sweep``: a list of trees to sweep (``bench speed``, ``eval quality``)."""
    parser.add_argument("--commit-rule", choices=list(COMMIT_RULES), default=None,
                        help="which confident targets a step commits (default: the model's recommendation "
                             "(the shipped denoiser: left_prefix), else threshold)")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                        help="every denoiser forward drafts the confident run from the left and the AR model "
                             "checks it (output == ar; the threshold sets the draft length). With none of "
                             "--verify, --steps-per-block and --confidence-threshold given, the model's "
                             "recommended preset applies (the shipped denoiser: verified whole-block drafts "
                             "of 4 tokens)")
    parser.add_argument("--steps-per-block", type=int, default=None,
                        help="denoiser steps per block (default: the block size); 1 with --verify drafts whole blocks")
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                        help="the towers share forwards (lora flavour): with --verify one forward per step, "
                             "the check of one draft and the next draft in the same pass; without, a block's "
                             "context pass and the next block's first step in one. The output is the same "
                             "(default: the model's recommendation)")
    parser.add_argument("--tree-nodes", type=int, default=None, nargs="+" if sweep else None,
                        help="verified whole-block drafts checked as a tree of the drafter's N likeliest "
                             "continuations, in one context pass (attention-only models; output == ar); 0: one "
                             "chain (default: the model's recommendation)" + ("; a sweep, e.g. 0 4 6" if sweep else ""))


def add_decoding_options(parser: argparse.ArgumentParser) -> None:
    """Every decoding option of one call: mode, dial, sampling and when a row ends."""
    parser.add_argument("--mode", choices=modes(), default="mask_diffusion", help="decoding mode (default: mask_diffusion)")
    parser.add_argument("--block-size", type=int, default=None, help="targets per block (default: the model's, 16)")
    parser.add_argument("--confidence-threshold", type=float, default=None,
                        help=f"commit targets above this confidence (default {DEFAULT_CONFIDENCE_THRESHOLD})")
    add_dial_options(parser)
    parser.add_argument("--max-new-tokens", type=int, default=DecodingSettings.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=None, help="0 (default): greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", dest="stop_strings", action="append", default=None, metavar="TEXT",
                        help="end the answer where this text appears (not included); repeatable")


def _flagged(message: str) -> str:
    """A settings error in the command line's words: field names become their flags."""
    return re.sub(r"\b(" + "|".join(FIELDS) + r")\b", lambda m: flag(m.group(1)), message)


@contextmanager
def flag_names():
    """Settings errors raised inside a command (a sweep builds its settings itself) in the
    command line's words."""
    try:
        yield
    except UsageError as e:
        raise UsageError(_flagged(str(e))) from None


def settings_from_args(args: argparse.Namespace, recommended: dict, **fixed) -> DecodingSettings:
    """``DecodingSettings`` from the decoding options on ``args`` (those it has) and the
    model's recommendation; ``fixed`` overrides both (say, a sweep's current value)."""
    given = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    given.update(fixed)
    try:
        return resolve_settings(recommended, **given)
    except UsageError as e:
        raise UsageError(_flagged(str(e))) from None
