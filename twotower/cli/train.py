"""``twotower train``: train the denoiser (one option per TrainConfig field; resumes from
``--out-dir``'s checkpoints)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..errors import UsageError


def _curriculum(text: str) -> list[int]:
    try:
        size, until = text.split(":")
        return [int(size), int(until)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SIZE:UNTIL_STEP, got {text!r}") from None


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    from ..train import TrainConfig

    tr = sub.add_parser("train", parents=[common], help="train the denoiser (resumes from --out-dir's checkpoints)")
    tr.add_argument("--config", help="JSON file of TrainConfig settings (flags override it)")
    tr.add_argument("--stop-after", type=int, default=None, help="end this run after N steps (checkpointed)")
    for f in dataclasses.fields(TrainConfig):  # defaults live in the dataclass, not here
        flag = "--" + f.name.replace("_", "-")
        if f.name == "curriculum":
            tr.add_argument(flag, type=_curriculum, nargs="+", help="block-size stages SIZE:UNTIL_STEP ...")
        elif f.type in ("bool", "bool | None"):
            tr.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float, "float | None": float}.get(str(f.type), str)
            tr.add_argument(flag, type=kind, default=None)
    tr.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..train import TrainConfig, train

    settings = json.loads(Path(args.config).read_text()) if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            settings[f.name] = value
    for required in ("data", "out_dir"):
        if required not in settings:
            raise UsageError(f"--{required.replace('_', '-')} is required (or give it in --config)")
    last = train(TrainConfig(**settings), stop_after=args.stop_after)
    print(json.dumps(last))
