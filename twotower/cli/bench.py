"""``twotower bench ar | step | speed | serve``: benchmarks that write JSON (and, for speed and
serve, a table and a plot)."""

from __future__ import annotations

import argparse

from ..checkpoints.load import DEFAULT_MODEL
from ..model.devices import DTYPE_CHOICES, DTYPES
from ..model.quant import SCHEMES as QUANT_SCHEMES
from .options import add_dial_options, add_model_options, flag_names


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    from ..bench import speed

    b = sub.add_parser("bench", help="benchmarks that write JSON")
    bsub = b.add_subparsers(dest="bench", required=True)
    ar = bsub.add_parser("ar", parents=[common],
                         help="our AR decoding (each dtype and quantization) vs transformers generate() and llama.cpp, "
                              "interleaved")
    ar.add_argument("--model", default=DEFAULT_MODEL)
    ar.add_argument("--dtypes", nargs="+", choices=list(DTYPE_CHOICES), default=["float32", "auto"],
                    help="our dtypes (transformers runs in each explicit one); our float32 is always the reference")
    ar.add_argument("--quantize", nargs="+", choices=list(QUANT_SCHEMES), default=["none", "int4"],
                    help="our weight quantizations, each in every dtype")
    ar.add_argument("--prompts", type=int, default=5, help="the first N prompts of the shipped set")
    ar.add_argument("--compile", action="store_true",
                    help="each of ours also with its decoding steps compiled (model/compiled.py)")
    ar.add_argument("--no-transformers", action="store_true", help="leave transformers generate() out")
    ar.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out (it runs when installed)")
    ar.add_argument("--max-new-tokens", type=int, default=128)
    ar.add_argument("--repeats", type=int, default=5)
    ar.add_argument("--output", default="bench_results/ar.json")
    ar.set_defaults(func=run_ar)

    st = bsub.add_parser("step", parents=[common], help="cost of one denoiser block step vs one AR step")
    st.add_argument("--model", default=DEFAULT_MODEL)
    st.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    st.add_argument("--context-tokens", type=int, default=256)
    st.add_argument("--block-size", type=int, default=16)
    st.add_argument("--repeats", type=int, default=30)
    st.add_argument("--output", default="bench_results/step.json")
    st.add_argument("--profile", action="store_true",
                    help="also break one AR step and one denoiser step down by layer kind and op (torch.profiler)")
    st.add_argument("--profile-steps", type=int, default=10, help="steps profiled per kind (with --profile)")
    st.add_argument("--quantize", choices=list(QUANT_SCHEMES), default="none", help="weight-only quantization")
    st.set_defaults(func=run_step)

    sp = bsub.add_parser("speed", parents=[common], help="tokens/s, NFE, latency, memory and agreement across the dial")
    add_model_options(sp)
    sp.add_argument("--device", default="cpu", help="where every contender runs, e.g. cuda (llama.cpp: CPU only)")
    add_dial_options(sp, sweep=True)
    sp.add_argument("--modes", nargs="+", choices=speed.MODES, default=list(speed.MODES),
                    help="what to run besides our AR, which always runs as the reference (default: all)")
    sp.add_argument("--thresholds", type=float, nargs="+", default=None,
                    help="a sweep of the plain dial, e.g. 0.5 0.7 0.9 (default: the model's recommended preset)")
    sp.add_argument("--block-sizes", type=int, nargs="+", default=None, help="default: the model's (or its preset's)")
    sp.add_argument("--batch-sizes", type=int, nargs="+", default=list(speed.BATCH_SIZES))
    sp.add_argument("--prompts", type=int, default=None, help="the first N prompts (default: all)")
    sp.add_argument("--prompts-file", default=None,
                    help="JSONL with \"kind\" and \"text\" (default: the shipped bench prompts; "
                         "twotower/bench/prompts_confirm.jsonl is a second set, kept out of tuning)")
    sp.add_argument("--max-new-tokens", type=int, default=128)
    sp.add_argument("--repeats", type=int, default=3, help="timed rounds per pair, after the warm-up")
    sp.add_argument("--warmup", type=int, default=1, help="untimed rounds per pair")
    sp.add_argument("--prompt-lookup-tokens", type=int, default=10, help="draft length of prompt-lookup decoding")
    sp.add_argument("--output-dir", default="bench_results/speed")
    sp.set_defaults(func=run_speed)

    sv = bsub.add_parser("serve", parents=[common], help="throughput and latency of twotower serve under concurrent "
                         "clients: our AR vs the recommended preset (and llama.cpp's server where installed)")
    add_model_options(sv)
    sv.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    sv.add_argument("--requests", type=int, default=8, help="requests per level (at least the concurrency)")
    sv.add_argument("--max-tokens", type=int, default=64)
    sv.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    sv.add_argument("--prompts-file", default=None, help="JSONL with \"text\" (default: the shipped bench prompts)")
    sv.add_argument("--llama-cpp-python", default=None,
                    help="a Python interpreter with llama-cpp-python[server] (default: this one, if it has it)")
    sv.add_argument("--output-dir", default="bench_results/serve")
    sv.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> None:
    from ..bench.serve import run_serve_bench

    run_serve_bench(model=args.model, dtype=args.dtype, concurrency=args.concurrency, requests=args.requests,
                    max_tokens=args.max_tokens, max_batch=args.max_batch, threads=args.threads,
                    output_dir=args.output_dir, prompts_file=args.prompts_file,
                    llama_cpp_python=args.llama_cpp_python, exact=args.exact, quantize=args.quantize,
                    compile=args.compile, untrained_denoiser=args.untrained_denoiser,
                    quantize_drafter=args.quantize_drafter)


def run_ar(args: argparse.Namespace) -> None:
    from ..bench.ar import run_ar_bench

    run_ar_bench(model=args.model, dtypes=args.dtypes, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                 output=args.output, quantize=args.quantize, prompts=args.prompts, compile=args.compile,
                 transformers=not args.no_transformers, llama_cpp=not args.no_llama_cpp)


def run_step(args: argparse.Namespace) -> None:
    from ..bench.step import run_step_bench

    run_step_bench(model=args.model, dtypes=args.dtypes, context_tokens=args.context_tokens,
                   block_size=args.block_size, repeats=args.repeats, output=args.output,
                   profile_steps=args.profile_steps if args.profile else 0, quantize=args.quantize)


def run_speed(args: argparse.Namespace) -> None:
    from ..bench.speed import run_speed_bench

    with flag_names():
        run_speed_bench(
            model=args.model, dtype=args.dtype, modes=args.modes, thresholds=args.thresholds,
            block_sizes=args.block_sizes, batch_sizes=args.batch_sizes, prompts=args.prompts,
            max_new_tokens=args.max_new_tokens, repeats=args.repeats, warmup=args.warmup,
            prompt_lookup_tokens=args.prompt_lookup_tokens, output_dir=args.output_dir, untrained=args.untrained_denoiser,
            device=args.device, commit_rule=args.commit_rule, verify=args.verify, steps_per_block=args.steps_per_block,
            fused=args.fused, tree_nodes=args.tree_nodes, exact=args.exact, prompts_file=args.prompts_file,
            quantize=args.quantize,
            quantize_drafter=args.quantize_drafter, compile=args.compile,
        )
