"""``twotower eval quality``: what mask diffusion costs in quality, against AR on the same model."""

from __future__ import annotations

import argparse

from .options import add_dial_options, add_model_options, flag_names


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    from ..eval.judge import DEFAULT_JUDGE
    from ..eval.quality import QualitySettings

    qd = QualitySettings()
    e = sub.add_parser("eval", help="quality evaluations that write JSON and Markdown")
    esub = e.add_subparsers(dest="eval", required=True)
    q = esub.add_parser("quality", parents=[common], help="mask diffusion vs AR: agreement, judge perplexity, "
                        "block NLL, HumanEval pass@1, retention")
    add_model_options(q, dtype_default=qd.dtype)
    q.add_argument("--device", default=qd.device, help="where the model runs, e.g. cuda (the judge stays on the CPU)")
    q.add_argument("--prompts-file", default=qd.prompts_file, help="JSONL with \"kind\" and \"text\" (default: bench prompts)")
    q.add_argument("--prompts", type=int, default=None, help="use the first N prompts (default: all)")
    q.add_argument("--no-chat", action="store_true", help="do not wrap prompts in the chat template")
    q.add_argument("--thresholds", type=float, nargs="+", default=None,
                   help="a sweep of the plain dial, e.g. 0.8 0.9 (default: the model's recommended preset)")
    q.add_argument("--block-sizes", type=int, nargs="+", default=None, help="default: the model's (or its preset's)")
    add_dial_options(q, sweep=True)
    q.add_argument("--max-new-tokens", type=int, default=qd.max_new_tokens)
    q.add_argument("--batch-size", type=int, default=qd.batch_size)
    q.add_argument("--judge", default=DEFAULT_JUDGE, help=f"judge model directory, .gguf or {DEFAULT_JUDGE}; 'none' skips it")
    q.add_argument("--nll-t", type=float, nargs="+", default=qd.nll_t, help="mask levels t for the block NLL")
    q.add_argument("--nll-window", type=int, default=qd.nll_window, help="held-out tokens per scored window")
    q.add_argument("--heldout", default=qd.heldout, help="held-out text file for the block NLL")
    q.add_argument("--humaneval-problems", type=int, default=None, help="first N problems (default all 164; 0 skips)")
    q.add_argument("--humaneval-max-new-tokens", type=int, default=qd.humaneval_max_new_tokens)
    q.add_argument("--output-dir", default=qd.output_dir)
    q.set_defaults(func=run_quality)


def run_quality(args: argparse.Namespace) -> None:
    from ..eval.quality import QualitySettings, run_quality

    with flag_names():
        run_quality(QualitySettings(
            model=args.model, dtype=args.dtype, device=args.device, untrained=args.untrained_denoiser, exact=args.exact,
            quantize=args.quantize, quantize_drafter=args.quantize_drafter, compile=args.compile,
            prompts_file=args.prompts_file, prompts=args.prompts, chat=not args.no_chat,
            thresholds=args.thresholds, block_sizes=args.block_sizes, steps_per_block=args.steps_per_block,
            commit_rule=args.commit_rule, verify=args.verify, fused=args.fused, tree_nodes=args.tree_nodes,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, judge=None if args.judge == "none" else args.judge, nll_t=args.nll_t,
            nll_window=args.nll_window, heldout=args.heldout, humaneval_problems=args.humaneval_problems,
            humaneval_max_new_tokens=args.humaneval_max_new_tokens, output_dir=args.output_dir,
        ))
