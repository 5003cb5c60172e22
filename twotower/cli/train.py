"""``twotower train``: train the denoiser (one option per TrainConfig field; resumes from
``--out-dir``'s checkpoints)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..errors import UsageError
from ..files import read_json


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
    tr.add_argument("--overwrite", action="store_true",
                    help="write into an --out-dir that holds files a training run did not write")
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

    settings = read_json(Path(args.config), UsageError) if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            settings[f.name] = value
    for required in ("data", "out_dir"):
        if required not in settings:
            raise UsageError(f"--{required.replace('_', '-')} is required (or give it in --config)")
    config = TrainConfig.from_dict(settings, args.config or "the command line")
    last = train(config, stop_after=args.stop_after, overwrite=args.overwrite)
    print(json.dumps(last))
