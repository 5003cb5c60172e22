"""``twotower data prepare | distill``: training data from offline text, and self-distillation
by the AR backbone."""

from __future__ import annotations

import argparse

from ..checkpoints.load import DEFAULT_MODEL
from ..errors import UsageError
from ..model.devices import DTYPES


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    from ..data.sources import LOSS_ON

    d = sub.add_parser("data", help="prepare training data")
    dsub = d.add_subparsers(dest="data", required=True)
    dp = dsub.add_parser("prepare", parents=[common], help="text/JSONL -> tokenized shards with a manifest")
    dp.add_argument("sources", nargs="*", help="text files, directories or JSONL files")
    dp.add_argument("--out", required=True)
    dp.add_argument("--model", default=DEFAULT_MODEL, help="whose tokenizer to use")
    dp.add_argument("--field", default="text", help="JSONL field: a text field, or 'messages' for chats")
    dp.add_argument("--loss-on", choices=LOSS_ON, default="all",
                    help="chats: train on every token, or on the assistant's turns only")
    dp.add_argument("--licence", default="unspecified", help="licence recorded for the given sources")
    dp.add_argument("--recipe", choices=("offline",), default=None, help="add the built-in offline corpus")
    dp.add_argument("--val-fraction", type=float, default=0.05)
    dp.add_argument("--seed", type=int, default=0)
    dp.set_defaults(func=run_prepare)

    dd = dsub.add_parser("distill", parents=[common], help="continuations/answers by the AR backbone (resumable)")
    dd.add_argument("--prompts", help="text file, directory or JSONL of prompts")
    dd.add_argument("--instructions", type=int, default=None,
                    help="instead of --prompts: N built-in chat requests (twotower/data/instructions.py; needs --chat)")
    dd.add_argument("--device", default=None, help="where the backbone runs (default: cuda when available, else cpu)")
    dd.add_argument("--out", required=True, help="JSONL file to append to")
    dd.add_argument("--model", default=DEFAULT_MODEL)
    dd.add_argument("--field", default="text")
    dd.add_argument("--chat", action="store_true", help="prompts are user turns; write chat records")
    dd.add_argument("--prefix-tokens", type=int, default=0, help="use each document's first N tokens as the prompt")
    dd.add_argument("--limit", type=int, default=0, help="at most this many prompts")
    dd.add_argument("--max-new-tokens", type=int, default=128)
    dd.add_argument("--batch-size", type=int, default=8)
    dd.add_argument("--temperature", type=float, default=0.0)
    dd.add_argument("--seed", type=int, default=0)
    dd.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    dd.add_argument("--time-budget", type=float, default=None, help="start no new batch after this many seconds")
    dd.set_defaults(func=run_distill)


def run_prepare(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from ..checkpoints import checkpoint_dir
    from ..data.recipe import offline_sources
    from ..data.shards import prepare
    from ..data.sources import SourceSpec

    sources = [SourceSpec(path, args.licence, args.field, loss_on=args.loss_on) for path in args.sources]
    if args.recipe == "offline":
        sources += offline_sources()
    if not sources:
        raise UsageError("give files or directories to prepare, or --recipe offline")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir(args.model))
    manifest = prepare(sources, tokenizer, args.out, args.val_fraction, args.seed)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['tokens']} tokens in {info['documents']} documents")
    print(f"wrote {args.out}")


def _distill_prompts(args: argparse.Namespace, tokenizer) -> list[str]:
    from ..data.instructions import chat_instructions
    from ..data.sources import SourceSpec, read_documents

    if args.instructions is not None:
        if not args.chat:
            raise UsageError("--instructions are chat requests: add --chat")
        return [text for _, text in chat_instructions(args.instructions, seed=args.seed)]
    prompts = []
    for doc in read_documents(SourceSpec(args.prompts, field=args.field), tokenizer):
        text = doc.text
        if args.prefix_tokens:  # continue the start of each document
            text = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][: args.prefix_tokens])
        prompts.append(text)
        if args.limit and len(prompts) >= args.limit:
            break
    return prompts


def run_distill(args: argparse.Namespace) -> None:
    import torch

    from ..checkpoints import load_backbone
    from ..data.distill import distill

    if (args.prompts is None) == (args.instructions is None):
        raise UsageError("give either --prompts FILE or --instructions N")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone, tokenizer = load_backbone(args.model, dtype=args.dtype, device=device)
    n = distill(backbone, tokenizer, _distill_prompts(args, tokenizer), args.out, chat=args.chat,
                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, temperature=args.temperature,
                seed=args.seed, time_budget_s=args.time_budget)
    print(f"distilled {n} new records into {args.out}")
