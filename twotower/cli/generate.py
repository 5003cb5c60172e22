"""``twotower generate``: decode one prompt (a text, a chat turn or a whole conversation),
streaming the answer to stdout and one summary line to stderr."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UsageError
from ..generate.prompts import check_messages, check_text
from .options import add_decoding_options, add_model_options


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    g = sub.add_parser("generate", parents=[common], help="generate a continuation of a prompt")
    g.add_argument("prompt", nargs="?", help="the prompt (or give --messages)")
    add_model_options(g)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--system", default=None, help="a system prompt before the prompt (implies --chat)")
    g.add_argument("--messages", type=Path, default=None,
                   help="a JSON file holding a conversation [{\"role\", \"content\"}, ...] to answer, instead of PROMPT")
    add_decoding_options(g)
    g.add_argument("--no-stream", action="store_true", help="print the text at the end instead of streaming")
    g.add_argument("--show-steps", action="store_true", help="render the denoising, coloured by commit step")
    g.add_argument("--no-merge-adapters", action="store_true",
                   help="LoRA models: run the adapters as they are instead of a merged copy (less memory, slower)")
    g.set_defaults(func=run)


def _prompt(args: argparse.Namespace):
    """What to answer: the prompt text, or a conversation (--messages, --system)."""
    if (args.prompt is None) == (args.messages is None):
        raise UsageError("give a prompt or --messages FILE (one of them)")
    if args.messages is not None:
        if args.system is not None:
            raise UsageError("--system goes inside the --messages conversation")
        try:
            conversation = json.loads(args.messages.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"--messages {args.messages}: cannot read a JSON conversation ({e})") from None
        if not isinstance(conversation, list):
            raise UsageError(f"--messages {args.messages} must hold a JSON list of {{\"role\", \"content\"}} messages")
        return check_messages(conversation)
    if not args.prompt.strip():
        raise UsageError("the prompt is empty")
    check_text(args.prompt, "the prompt")  # before the model loads
    if args.system is not None:
        return [{"role": "system", "content": args.system}, {"role": "user", "content": args.prompt}]
    return args.prompt


class _Printer:
    """Streams row 0's final text (stop strings held back and never printed), or renders the
    denoising with --show-steps."""

    def __init__(self, args: argparse.Namespace, tokenizer, stop_strings) -> None:
        from ..generate.stopping import TextStream

        self.display = None
        self.stream = None if args.no_stream or args.show_steps else TextStream(tokenizer, stop_strings)
        if args.show_steps:
            from .display import StepDisplay

            self.display = StepDisplay(tokenizer)

    def on_token(self, row: int, token: int) -> None:
        if self.display is not None:
            self.display.on_token(row, token)
        elif self.stream is not None and row == 0:
            print(self.stream.push(token), end="", flush=True)

    def finish(self, text: str) -> None:
        if self.stream is not None:
            print(self.stream.finish(), flush=True)
        elif self.display is None:
            print(text)


def run(args: argparse.Namespace) -> None:
    import torch

    from ..checkpoints.two_tower import load_model, warn_untrained
    from ..generate import DecodeCallbacks, decode
    from .options import settings_from_args

    prompt = _prompt(args)
    if args.show_steps and args.mode == "ar":
        raise UsageError("--show-steps needs --mode mask_diffusion or mock_ar")
    loaded = load_model(args.model, args.dtype, untrained=args.untrained_denoiser, block_size=args.block_size or 16,
                        context_only=args.mode == "ar", merge_adapters=not args.no_merge_adapters, exact=args.exact,
                        quantize=args.quantize, quantize_drafter=args.quantize_drafter, compile=args.compile)
    warn_untrained(loaded)
    settings = settings_from_args(args, loaded.recommended)
    chat = args.chat or args.system is not None
    printer = _Printer(args, loaded.tokenizer, settings.stop_strings)
    callbacks = DecodeCallbacks(printer.on_token, printer.display.on_step if printer.display else None)
    if printer.display is not None:
        printer.display.__enter__()
    try:
        out = decode(loaded.model, [prompt], settings, callbacks, tokenizer=loaded.tokenizer, chat=chat)
    finally:
        if printer.display is not None:
            printer.display.__exit__(None, None, None)
    printer.finish(out.texts[0] if out.texts else " ".join(map(str, out.tokens[0])))
    s = out.stats
    dial = ""
    if settings.mode == "mask_diffusion":
        dial = ", " + settings.describe(loaded.model.block_size)
        if settings.verify and settings.steps_per_block != 1:  # the threshold sets how long the drafts are
            drafts = [d for row in s.drafted for d in row]
            dial += f", {sum(drafts) / max(len(drafts), 1):.1f}-token drafts"
    print(
        f"[{settings.mode}] {s.total_new_tokens} tokens in {s.seconds:.2f} s ({s.tokens_per_second:.1f} tokens/s, "
        f"{s.tokens_per_nfe:.2f} tokens/NFE, {s.nfe} NFE{dial}), prompt {len(out.prompt_ids[0])} tokens, "
        f"{loaded.describe_numerics()}, {torch.get_num_threads()} threads",
        file=sys.stderr,
    )
