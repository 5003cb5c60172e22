"""Command line: ``twotower generate`` and ``twotower bench``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

DTYPES = ("float32", "bfloat16")


class UsageError(ValueError):
    """A bad command-line request, reported without a traceback."""


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    if tokenizer is None:
        raise UsageError("this checkpoint has no tokenizer: text prompts need one")
    if chat:
        if not tokenizer.chat_template:
            raise UsageError("--chat: this model's tokenizer has no chat template")
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def cmd_generate(args: argparse.Namespace) -> None:
    import torch
    from transformers import TextStreamer

    from .checkpoints import load_backbone
    from .generate import generate_ar

    if args.max_new_tokens <= 0:
        raise UsageError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if not args.prompt.strip():
        raise UsageError("the prompt is empty")
    model, tokenizer = load_backbone(args.model, dtype=_torch_dtype(args.dtype))
    ids = _encode_prompt(tokenizer, args.prompt, args.chat)

    streamer = None
    if not args.no_stream:
        streamer = TextStreamer(tokenizer, skip_special_tokens=True)

    def on_token(row: int, token: int) -> None:
        streamer.put(torch.tensor([token]))

    out = generate_ar(
        model,
        ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        callback=on_token if streamer else None,
    )
    if streamer:
        streamer.end()
    else:
        print(tokenizer.decode(out.tokens[0], skip_special_tokens=True))
    s = out.stats
    print(
        f"[ar] {s.total_new_tokens} tokens in {s.seconds:.2f} s ({s.tokens_per_second:.1f} tokens/s, "
        f"{s.tokens_per_nfe:.2f} tokens/NFE), prompt {len(ids)} tokens, {args.dtype}, {torch.get_num_threads()} threads",
        file=sys.stderr,
    )


def cmd_bench_ar(args: argparse.Namespace) -> None:
    from .bench.ar import run_ar_bench

    run_ar_bench(
        model=args.model,
        dtypes=args.dtypes,
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        output=args.output,
    )


def build_parser() -> argparse.ArgumentParser:
    from .checkpoints import DEFAULT_MODEL

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    common.add_argument("-v", "--verbose", action="store_true", help="log progress")

    p = argparse.ArgumentParser(prog="twotower", description="Two-tower block-diffusion language models.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", parents=[common], help="generate a continuation of a prompt")
    g.add_argument("prompt")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"registry name, .gguf file or checkpoint dir (default {DEFAULT_MODEL})")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dtype", choices=DTYPES, default="float32")
    g.add_argument("--no-stream", action="store_true", help="print the text at the end instead of streaming")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="benchmarks that write JSON")
    bsub = b.add_subparsers(dest="bench", required=True)
    ar = bsub.add_parser("ar", parents=[common], help="our AR decoding vs transformers generate(), interleaved")
    ar.add_argument("--model", default=DEFAULT_MODEL)
    ar.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    ar.add_argument("--max-new-tokens", type=int, default=128)
    ar.add_argument("--repeats", type=int, default=5)
    ar.add_argument("--output", default="bench_results/ar.json")
    ar.set_defaults(func=cmd_bench_ar)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
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
    except ValueError as e:  # CheckpointError and UsageError are ValueErrors too
        print(f"twotower: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
