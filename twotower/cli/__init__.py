"""Command line: ``twotower generate | serve | bench | eval | train | data``.

The offline guard comes first: huggingface_hub reads HF_HUB_OFFLINE once, when it is imported,
so it is set before anything can import it."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

from ..errors import TwoTowerError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from . import bench, data, evaluate, generate, serve, train

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    common.add_argument("-v", "--verbose", action="store_true", help="log progress")
    parser = argparse.ArgumentParser(prog="twotower", description="Two-tower block-diffusion language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (generate, serve, bench, evaluate, train, data):
        command.add_parser(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = any(a in ("-v", "--verbose") for a in argv)
    if not verbose:  # read when transformers and huggingface_hub are imported, so before the parser is built
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    import torch

    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except TwoTowerError as e:  # our own errors: one line; anything else is a bug and keeps its traceback
        print(f"twotower: error: {e}", file=sys.stderr)
        return 2
    return 0
