"""Command line: ``twotower generate``, ``twotower bench`` and ``twotower eval``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16")  # twotower.model.devices.DTYPES, named here without importing torch


class UsageError(ValueError):
    """A bad command-line request, reported without a traceback."""


MODES = ("ar", "mask_diffusion", "mock_ar")


def _load_for_mode(args: argparse.Namespace):
    """The context tower alone for ``ar`` on a backbone; otherwise a two-tower model: a saved
    directory, the registry model with its shipped denoiser, or an untrained denoiser."""
    from .checkpoints import load_backbone
    from .checkpoints.two_tower import is_two_tower_dir, load_two_tower, warn_untrained
    from .model.devices import torch_dtype
    from .train.checkpoint import is_training_checkpoint

    dtype = torch_dtype(args.dtype)
    if args.mode == "ar" and not (is_two_tower_dir(args.model) or is_training_checkpoint(args.model)):
        return load_backbone(args.model, dtype=dtype)
    loaded = load_two_tower(args.model, dtype, untrained=args.untrained_denoiser, block_size=args.block_size or 16)
    warn_untrained(loaded)
    args.commit_rule = loaded.commit_rule(args.commit_rule)
    dial_given = any(getattr(args, k) is not None for k in ("verify", "steps_per_block", "confidence_threshold"))
    preset = {} if dial_given else loaded.preset()
    args.verify = bool(args.verify) if args.verify is not None else preset.get("verify", False)
    args.steps_per_block = args.steps_per_block or preset.get("steps_per_block")
    args.block_size = args.block_size or preset.get("block_size")
    model = loaded.model
    if args.mode == "ar":
        return model.context, loaded.tokenizer
    # merging untrained (zero) adapters would only cost memory
    return (model if args.no_merge_adapters or loaded.note else model.merge_adapters()), loaded.tokenizer


def _check_generate_args(args: argparse.Namespace) -> None:
    if not args.prompt.strip():
        raise UsageError("the prompt is empty")
    if args.max_new_tokens <= 0:
        raise UsageError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if args.block_size is not None and args.block_size < 1:
        raise UsageError(f"--block-size must be >= 1, got {args.block_size}")
    if args.steps_per_block is not None and args.steps_per_block < 1:
        raise UsageError(f"--steps-per-block must be >= 1, got {args.steps_per_block}")
    if args.confidence_threshold is not None and not 0.0 <= args.confidence_threshold <= 1.0:
        raise UsageError(f"--confidence-threshold must be in [0, 1], got {args.confidence_threshold}")
    if args.show_steps and args.mode == "ar":
        raise UsageError("--show-steps needs --mode mask_diffusion or mock_ar")


def cmd_generate(args: argparse.Namespace) -> None:
    import torch
    from transformers import TextStreamer

    from .generate import generate_ar
    from .generate.diffusion import DEFAULT_CONFIDENCE_THRESHOLD, generate_mask_diffusion, generate_mock_ar
    from .generate.prompts import encode_prompt

    _check_generate_args(args)
    model, tokenizer = _load_for_mode(args)
    ids = encode_prompt(tokenizer, args.prompt, args.chat)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed)

    display = streamer = None
    if args.show_steps:
        from .display import StepDisplay

        display = StepDisplay(tokenizer)
    elif not args.no_stream:
        streamer = TextStreamer(tokenizer, skip_special_tokens=True)

    def on_token(row: int, token: int) -> None:
        if display is not None:
            display.on_token(row, token)
        elif streamer is not None:
            streamer.put(torch.tensor([token]))

    callback = on_token if (display or streamer) else None
    threshold = DEFAULT_CONFIDENCE_THRESHOLD if args.confidence_threshold is None else args.confidence_threshold
    if display is not None:
        display.__enter__()
    try:
        if args.mode == "ar":
            out = generate_ar(model, ids, callback=callback, **sampling)
        elif args.mode == "mock_ar":
            out = generate_mock_ar(model, ids, callback=callback, commit_rule=args.commit_rule,
                                   step_callback=display.on_step if display else None, **sampling)
        else:
            out = generate_mask_diffusion(
                model, ids, block_size=args.block_size, steps_per_block=args.steps_per_block,
                confidence_threshold=threshold, commit_rule=args.commit_rule, verify=args.verify,
                callback=callback, step_callback=display.on_step if display else None, **sampling,
            )
    finally:
        if display is not None:
            display.__exit__(None, None, None)
    if streamer is not None:
        streamer.end()
    elif display is None:
        print(tokenizer.decode(out.tokens[0], skip_special_tokens=True))
    s = out.stats
    dial = ""
    if args.mode == "mask_diffusion":
        block = args.block_size or model.block_size
        if args.verify and args.steps_per_block == 1:  # one draft per block: the threshold plays no part
            dial = f", verified drafts of {block} tokens, rule {args.commit_rule}"
        else:
            dial = f", block {block}, threshold {threshold}, rule {args.commit_rule}"
            if args.verify:  # the threshold sets how long the drafts are
                drafts = [d for row in s.drafted for d in row]
                dial += f", verified, {sum(drafts) / max(len(drafts), 1):.1f}-token drafts"
    print(
        f"[{args.mode}] {s.total_new_tokens} tokens in {s.seconds:.2f} s ({s.tokens_per_second:.1f} tokens/s, "
        f"{s.tokens_per_nfe:.2f} tokens/NFE, {s.nfe} NFE{dial}), prompt {len(ids)} tokens, {args.dtype}, "
        f"{torch.get_num_threads()} threads",
        file=sys.stderr,
    )


def cmd_bench_step(args: argparse.Namespace) -> None:
    from .bench.step import run_step_bench

    run_step_bench(model=args.model, dtypes=args.dtypes, context_tokens=args.context_tokens,
                   block_size=args.block_size, repeats=args.repeats, output=args.output)


def cmd_bench_ar(args: argparse.Namespace) -> None:
    from .bench.ar import run_ar_bench

    run_ar_bench(
        model=args.model,
        dtypes=args.dtypes,
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        output=args.output,
    )


def cmd_bench_speed(args: argparse.Namespace) -> None:
    from .bench.speed import run_speed_bench

    run_speed_bench(
        model=args.model, dtype=args.dtype, modes=args.modes, thresholds=args.thresholds,
        block_sizes=args.block_sizes, batch_sizes=args.batch_sizes, prompts=args.prompts,
        max_new_tokens=args.max_new_tokens, repeats=args.repeats, warmup=args.warmup,
        prompt_lookup_tokens=args.prompt_lookup_tokens, output_dir=args.output_dir, untrained=args.untrained_denoiser,
        device=args.device, commit_rule=args.commit_rule, verify=args.verify, steps_per_block=args.steps_per_block,
    )


def cmd_eval_quality(args: argparse.Namespace) -> None:
    from .eval.quality import QualitySettings, run_quality

    run_quality(QualitySettings(
        model=args.model, dtype=args.dtype, device=args.device, untrained=args.untrained_denoiser,
        prompts_file=args.prompts_file, prompts=args.prompts, chat=not args.no_chat,
        thresholds=args.thresholds, block_sizes=args.block_sizes, steps_per_block=args.steps_per_block,
        commit_rule=args.commit_rule, verify=args.verify, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, judge=None if args.judge == "none" else args.judge, nll_t=args.nll_t,
        nll_window=args.nll_window, heldout=args.heldout, humaneval_problems=args.humaneval_problems,
        humaneval_max_new_tokens=args.humaneval_max_new_tokens, output_dir=args.output_dir,
    ))


def _tokenizer(model: str):
    from transformers import AutoTokenizer

    from .checkpoints import checkpoint_dir

    return AutoTokenizer.from_pretrained(checkpoint_dir(model))


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from .data.recipe import offline_sources
    from .data.shards import prepare
    from .data.sources import SourceSpec

    sources = [SourceSpec(path, args.licence, args.field, loss_on=args.loss_on) for path in args.sources]
    if args.recipe == "offline":
        sources += offline_sources()
    if not sources:
        raise UsageError("give files or directories to prepare, or --recipe offline")
    manifest = prepare(sources, _tokenizer(args.model), args.out, args.val_fraction, args.seed)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['tokens']} tokens in {info['documents']} documents")
    print(f"wrote {args.out}")


def cmd_data_distill(args: argparse.Namespace) -> None:
    import torch

    from .checkpoints import load_backbone
    from .data.distill import distill
    from .data.instructions import chat_instructions
    from .data.sources import SourceSpec, read_documents
    from .model.devices import torch_dtype

    if (args.prompts is None) == (args.instructions is None):
        raise UsageError("give either --prompts FILE or --instructions N")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone, tokenizer = load_backbone(args.model, dtype=torch_dtype(args.dtype), device=device)
    if args.instructions is not None:
        if not args.chat:
            raise UsageError("--instructions are chat requests: add --chat")
        prompts = [text for _, text in chat_instructions(args.instructions, seed=args.seed)]
    else:
        prompts = []
        for doc in read_documents(SourceSpec(args.prompts, field=args.field), tokenizer):
            text = doc.text
            if args.prefix_tokens:  # continue the start of each document
                text = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][: args.prefix_tokens])
            prompts.append(text)
            if args.limit and len(prompts) >= args.limit:
                break
    n = distill(backbone, tokenizer, prompts, args.out, chat=args.chat, max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size, temperature=args.temperature, seed=args.seed,
                time_budget_s=args.time_budget)
    print(f"distilled {n} new records into {args.out}")


def cmd_train(args: argparse.Namespace) -> None:
    import dataclasses

    from .train import TrainConfig, train

    if args.config:
        settings = json.loads(Path(args.config).read_text())
    else:
        settings = {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            settings[f.name] = value
    for required in ("data", "out_dir"):
        if required not in settings:
            raise UsageError(f"--{required.replace('_', '-')} is required (or give it in --config)")
    cfg = TrainConfig(**settings)
    last = train(cfg, stop_after=args.stop_after)
    print(json.dumps(last))


def _curriculum(text: str) -> list[int]:
    try:
        size, until = text.split(":")
        return [int(size), int(until)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SIZE:UNTIL_STEP, got {text!r}") from None


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field (defaults live in the dataclass, not here)."""
    import dataclasses

    from .train import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "curriculum":
            parser.add_argument(flag, type=_curriculum, nargs="+", help="block-size stages SIZE:UNTIL_STEP ...")
        elif f.type in ("bool", "bool | None"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float, "float | None": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=None)


def build_parser() -> argparse.ArgumentParser:
    from .checkpoints import DEFAULT_MODEL
    from .data.sources import LOSS_ON
    from .generate.diffusion import DEFAULT_CONFIDENCE_THRESHOLD

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
    g.add_argument("--mode", choices=MODES, default="mask_diffusion", help="decoding mode (default: mask_diffusion)")
    g.add_argument("--untrained-denoiser", action="store_true",
                   help="use an untrained denoiser (a copy of the AR model) instead of the one shipped for the model")
    g.add_argument("--block-size", type=int, default=None, help="targets per block (default: the model's, 16)")
    g.add_argument("--steps-per-block", type=int, default=None, help="denoiser steps per block (default: block size)")
    g.add_argument("--confidence-threshold", type=float, default=None,
                   help=f"commit targets above this confidence (default {DEFAULT_CONFIDENCE_THRESHOLD})")
    g.add_argument("--commit-rule", choices=("threshold", "left_prefix"), default=None,
                   help="default: the model's recommendation (the shipped denoiser: left_prefix), else threshold")
    g.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                   help="every denoiser forward drafts the confident run from the left and the AR model checks "
                        "it (output == ar; the threshold sets the draft length). With none of --verify, "
                        "--steps-per-block and --confidence-threshold given, the model's recommended preset "
                        "applies (the shipped denoiser: verified whole-block drafts of 4 tokens)")
    g.add_argument("--show-steps", action="store_true", help="render the denoising, coloured by commit step")
    g.add_argument("--no-merge-adapters", action="store_true",
                   help="LoRA models: run the adapters as they are instead of a merged copy (less memory, slower)")
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
    st = bsub.add_parser("step", parents=[common], help="cost of one denoiser block step vs one AR step")
    st.add_argument("--model", default=DEFAULT_MODEL)
    st.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    st.add_argument("--context-tokens", type=int, default=256)
    st.add_argument("--block-size", type=int, default=16)
    st.add_argument("--repeats", type=int, default=30)
    st.add_argument("--output", default="bench_results/step.json")
    st.set_defaults(func=cmd_bench_step)
    from .bench import speed

    sp = bsub.add_parser("speed", parents=[common], help="tokens/s, NFE, latency, memory and agreement across the dial")
    sp.add_argument("--model", default=DEFAULT_MODEL, help="registry name, .gguf file, checkpoint dir or saved two-tower dir")
    sp.add_argument("--dtype", choices=DTYPES, default="float32")
    sp.add_argument("--device", default="cpu", help="where every contender runs, e.g. cuda (llama.cpp: CPU only)")
    sp.add_argument("--commit-rule", choices=("threshold", "left_prefix"), default=None,
                    help="which confident targets mask diffusion commits (default: as generate)")
    sp.add_argument("--verify", action="store_true",
                    help="mask diffusion verified by the context tower (output = AR greedy)")
    sp.add_argument("--steps-per-block", type=int, default=None,
                    help="denoiser steps per block (default: the block size); 1 with --verify drafts whole blocks")
    sp.add_argument("--modes", nargs="+", choices=speed.MODES, default=list(speed.MODES),
                    help="what to run besides our AR, which always runs as the reference (default: all)")
    sp.add_argument("--thresholds", type=float, nargs="+", default=list(speed.THRESHOLDS))
    sp.add_argument("--block-sizes", type=int, nargs="+", default=list(speed.BLOCK_SIZES))
    sp.add_argument("--batch-sizes", type=int, nargs="+", default=list(speed.BATCH_SIZES))
    sp.add_argument("--prompts", type=int, default=None, help="the first N shipped prompts (default: all)")
    sp.add_argument("--max-new-tokens", type=int, default=128)
    sp.add_argument("--repeats", type=int, default=3, help="timed rounds per pair, after the warm-up")
    sp.add_argument("--warmup", type=int, default=1, help="untimed rounds per pair")
    sp.add_argument("--prompt-lookup-tokens", type=int, default=10, help="draft length of prompt-lookup decoding")
    sp.add_argument("--output-dir", default="bench_results/speed")
    sp.add_argument("--untrained-denoiser", action="store_true", help="an untrained denoiser instead of the shipped one")
    sp.set_defaults(func=cmd_bench_speed)
    from .eval.judge import DEFAULT_JUDGE
    from .eval.quality import QualitySettings

    qd = QualitySettings()
    e = sub.add_parser("eval", help="quality evaluations that write JSON and Markdown")
    esub = e.add_subparsers(dest="eval", required=True)
    q = esub.add_parser("quality", parents=[common], help="mask diffusion vs AR: agreement, judge perplexity, "
                        "block NLL, HumanEval pass@1, retention")
    q.add_argument("--model", default=DEFAULT_MODEL, help="registry name, .gguf, backbone or two-tower directory")
    q.add_argument("--dtype", choices=DTYPES, default=qd.dtype)
    q.add_argument("--device", default=qd.device, help="where the model runs, e.g. cuda (the judge stays on the CPU)")
    q.add_argument("--prompts-file", default=qd.prompts_file, help="JSONL with \"kind\" and \"text\" (default: bench prompts)")
    q.add_argument("--prompts", type=int, default=None, help="use the first N prompts (default: all)")
    q.add_argument("--no-chat", action="store_true", help="do not wrap prompts in the chat template")
    q.add_argument("--thresholds", type=float, nargs="+", default=qd.thresholds)
    q.add_argument("--block-sizes", type=int, nargs="+", default=None, help="default: the model's block size")
    q.add_argument("--steps-per-block", type=int, default=None)
    q.add_argument("--commit-rule", choices=("threshold", "left_prefix"), default=qd.commit_rule,
                   help="default: as generate")
    q.add_argument("--verify", action="store_true", help="verified drafts (output = AR greedy)")
    q.add_argument("--max-new-tokens", type=int, default=qd.max_new_tokens)
    q.add_argument("--batch-size", type=int, default=qd.batch_size)
    q.add_argument("--judge", default=DEFAULT_JUDGE, help=f"judge model directory, .gguf or {DEFAULT_JUDGE}; 'none' skips it")
    q.add_argument("--nll-t", type=float, nargs="+", default=qd.nll_t, help="mask levels t for the block NLL")
    q.add_argument("--nll-window", type=int, default=qd.nll_window, help="held-out tokens per scored window")
    q.add_argument("--heldout", default=qd.heldout, help="held-out text file for the block NLL")
    q.add_argument("--humaneval-problems", type=int, default=None, help="first N problems (default all 164; 0 skips)")
    q.add_argument("--humaneval-max-new-tokens", type=int, default=qd.humaneval_max_new_tokens)
    q.add_argument("--output-dir", default=qd.output_dir)
    q.add_argument("--untrained-denoiser", action="store_true", help="an untrained denoiser instead of the shipped one")
    q.set_defaults(func=cmd_eval_quality)
    tr = sub.add_parser("train", parents=[common], help="train the denoiser (resumes from --out-dir's checkpoints)")
    tr.add_argument("--config", help="JSON file of TrainConfig settings (flags override it)")
    tr.add_argument("--stop-after", type=int, default=None, help="end this run after N steps (checkpointed)")
    _add_train_args(tr)
    tr.set_defaults(func=cmd_train)

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
    dp.set_defaults(func=cmd_data_prepare)
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
    dd.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    dd.add_argument("--time-budget", type=float, default=None, help="start no new batch after this many seconds")
    dd.set_defaults(func=cmd_data_distill)
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
