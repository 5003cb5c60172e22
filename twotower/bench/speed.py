"""``twotower bench speed``: generated tokens per second, NFE per token, latency and memory of
every decoding mode across the dial, each against our own AR decoding of the same requests.

Counting rules (the usual ways speed-ups get inflated are ruled out here):
- only generated tokens count: never prompt tokens, never anything after a row's first EOS
  (the EOS itself counts: the model had to produce it);
- NFE per token = forward passes / the longest row of each batch, summed over batches: one
  batched forward advances every row at once, so AR is exactly 1.0 at any batch size; for the
  diffusion modes a forward is one denoiser step (the context tower's block pass is extra
  work, and it is in the timings);
- every speed-up is a ratio of generated tokens per second, contender / our AR: the median over
  rounds of time(our AR) / time(contender) on the same requests, the two run in turn (A B A B)
  in the same process, warm-up rounds dropped, times generated(contender) / generated(our AR)
  (greedy outputs are the same every round). A plain time ratio would reward a mode for
  stopping early (an untrained denoiser often commits EOS in its first block); it is kept as
  ``wall_time_ratio_vs_ar``;
- agreement is greedy output against our AR output for the same requests at the same batch size.

On a GPU (``--device cuda``) every pass ends with a device synchronisation before the clock
stops, and memory is the peak of torch's CUDA allocator over the pass (the process RSS says
little there).

Requests: the shipped prompts (``prompts.jsonl``), chat-templated when the tokenizer has a
template, cycled to fill whole batches; a request's latency is the time of the batch call
that answered it.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoints import checkpoint_dir
from ..checkpoints.two_tower import load_model, warn_untrained
from ..errors import UsageError
from ..eval.metrics import exact_match, token_agreement
from ..files import atomic_write, prepare_output_dir
from ..generate.ar import eos_set, shape_rows
from ..generate.prompts import PROMPT_SET, encode_prompt, load_prompt_set
from ..generate.settings import resolve_settings, settings_grid
from ..model.devices import torch_dtype
from ..model.twotower import TwoTower
from .box import describe_box
from .cost import AR_STEP, FLAT_ROWS, flat, measure_forward_costs, predicted_speedup
from .decoders import Decoder, ForwardCounter, llama_cpp_decoder, ours, transformers_decoder
from .memory import PeakMemory
from .report import markdown, plot
from .timing import Timings, interleaved

BATCH_SIZES = (1, 4, 16)
# "fused": the twin of every mask-diffusion setting with (or without) shared forwards (lora flavour)
MODES = ("ar", "mock_ar", "mask_diffusion", "fused", "transformers", "prompt_lookup", "llama_cpp")


def encode_prompts(tokenizer, prompts: list[dict]) -> tuple[list[list[int]], bool]:
    """Token ids of each prompt, through the chat template when the tokenizer has one."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    return [encode_prompt(tokenizer, p["text"], chat) for p in prompts], chat


def batches_of(prompts: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Batches of exactly ``batch_size`` requests: the prompts are cycled to fill the last batch,
    so that no batch size is measured on a half-empty batch."""
    n = math.ceil(len(prompts) / batch_size) * batch_size
    requests = [prompts[i % len(prompts)] for i in range(n)]
    return [requests[i : i + batch_size] for i in range(0, n, batch_size)]


@dataclass
class Pass:
    """One timed pass of a contender over all its batches."""

    batch_seconds: list[float]
    tokens: list[list[int]]  # per request
    nfe: int | None
    longest_rows: int  # sum over batches of the longest row: the sequential positions decoded
    peak_mb: float
    over_start_mb: float
    gpu_peak_mb: float | None  # torch's CUDA allocator peak over the pass (None on the CPU)
    forward_shapes: dict[str, int] | None = None  # ours: forwards by shape (stats.forward_shapes), all batches


@dataclass
class Contender:
    """One decoding setting over the request set at one batch size. Each call is one pass,
    recorded so that latency and memory can be read after the warm-up passes are dropped."""

    name: str
    settings: dict
    decode: Decoder
    batches: list[list[list[int]]]
    kept: list[Pass] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # interleaved pass times, warm-up dropped
    _passes: list[Pass] = field(default_factory=list)

    def __call__(self) -> None:
        seconds, tokens, nfe, longest, peak, over = [], [], 0, 0, 0.0, 0.0
        shapes: dict[str, int] | None = {}
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for batch in self.batches:
            with PeakMemory() as mem:
                start = time.perf_counter()
                out = self.decode(batch)
                if cuda:
                    torch.cuda.synchronize()  # the work queued on the device is part of the time
                seconds.append(time.perf_counter() - start)
            tokens.extend(out.tokens)
            nfe = None if nfe is None or out.nfe is None else nfe + out.nfe
            if shapes is not None and out.forward_shapes is not None:
                for shape, n in out.forward_shapes.items():
                    shapes[shape] = shapes.get(shape, 0) + n
            else:
                shapes = None
            longest += max(len(row) for row in out.tokens)
            peak, over = max(peak, mem.peak_mb), max(over, mem.over_start_mb)
        gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        self._passes.append(Pass(seconds, tokens, nfe, longest, peak, over, gpu_peak, shapes))

    def keep(self, timings: Timings, warmup: int) -> None:
        self.kept.extend(self._passes[warmup:])
        self._passes.clear()
        self.seconds.extend(timings.seconds[self.name])


def summarise(c: Contender, time_ratio: float, reference: list[list[int]], ar_seconds: list[float] | None = None) -> dict:
    """``time_ratio``: median over interleaved rounds of time(our AR) / time(c);
    ``reference``: our AR's tokens for the same requests; ``ar_seconds``: our AR's pass times in
    the rounds interleaved with ``c`` (its own for our AR), so that a row says how fast our AR was
    beside it: a shared box's speed moves between the groups of one run."""
    last = c.kept[-1]
    generated = sum(len(row) for row in last.tokens)
    ar_generated = sum(len(row) for row in reference)
    ar_seconds = c.seconds if ar_seconds is None else ar_seconds
    shapes = last.forward_shapes
    forwards = sum(shapes.values()) if shapes else None
    latencies = [s for p in c.kept for s, batch in zip(p.batch_seconds, c.batches) for _ in batch]
    return {
        **c.settings,
        "requests": len(last.tokens),
        "generated_tokens": generated,
        "tokens_per_second": generated / statistics.median(c.seconds),
        "speedup_vs_ar": time_ratio * generated / ar_generated,
        "wall_time_ratio_vs_ar": time_ratio,
        "ar_tokens_per_second_beside": ar_generated / statistics.median(ar_seconds),
        "speedup_per_round": [a / t * generated / ar_generated for a, t in zip(ar_seconds, c.seconds)],
        "nfe_per_token": last.nfe / last.longest_rows if last.nfe is not None and last.longest_rows else None,
        # every forward of either tower (or both at once), per position decoded, and its width
        "forwards_per_token": forwards / last.longest_rows if forwards and last.longest_rows else None,
        "rows_per_forward": sum(shape_rows(s) * n for s, n in shapes.items()) / forwards if forwards else None,
        "forward_shapes": dict(sorted(shapes.items())) if shapes else None,
        "latency_s": {"median": float(np.median(latencies)), "p90": float(np.percentile(latencies, 90))},
        "peak_rss_mb": max(p.peak_mb for p in c.kept),
        "peak_rss_over_start_mb": max(p.over_start_mb for p in c.kept),
        "peak_gpu_mb": max(p.gpu_peak_mb for p in c.kept) if c.kept[-1].gpu_peak_mb is not None else None,
        "token_agreement": statistics.mean(token_agreement(a, b) for a, b in zip(last.tokens, reference)),
        "exact_match": statistics.mean(float(exact_match(a, b)) for a, b in zip(last.tokens, reference)),
        "tokens": last.tokens,  # per request, the last pass: what each setting generated
        "seconds": c.seconds,
    }


# -- model ------------------------------------------------------------------------------------


def gguf_of(backbone: str | None) -> Path | None:
    """The GGUF file a backbone came from (for llama.cpp on the same weights), if any."""
    from ..checkpoints.load import resolve

    if backbone is None:
        return None
    path = resolve(backbone)
    if path.suffix == ".gguf":
        return path
    source = path / "twotower_source.json"
    return Path(json.loads(source.read_text())["gguf"]) if source.is_file() else None


# -- the run ----------------------------------------------------------------------------------


def _check(thresholds, block_sizes, batch_sizes, max_new_tokens: int, repeats: int, warmup: int) -> None:
    if not all(0.0 <= t <= 1.0 for t in thresholds):
        raise UsageError(f"--thresholds must be in [0, 1], got {thresholds}")
    if min(block_sizes, default=1) < 1 or min(batch_sizes, default=0) < 1:
        raise UsageError("--block-sizes and --batch-sizes must be >= 1")
    if max_new_tokens < 1 or repeats < 1 or warmup < 0:
        raise UsageError("--max-new-tokens and --repeats must be >= 1, --warmup >= 0")


def _baselines(modes: Sequence[str], backbone: str | None, dtype: str, device: str, eos: set[int],
               max_new_tokens: int, n_ctx: int, skipped: list[str]):
    """The other engines on the same weights, where they can run: transformers ``generate()``
    (with its forward counter) and llama.cpp on the backbone's GGUF; what cannot run is noted in
    ``skipped``."""
    hf = forwards = llama = None
    if {"transformers", "prompt_lookup"} & set(modes):
        if backbone is None:
            skipped.append("transformers baselines: this model names no transformers-format backbone")
        else:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(checkpoint_dir(backbone), dtype=torch_dtype(dtype))
            hf = hf.to(device).eval()
            forwards = ForwardCounter(hf)
    if "llama_cpp" in modes and torch.device(device).type != "cpu":
        skipped.append(f"llama_cpp: runs on the CPU, not on {device}")
    elif "llama_cpp" in modes:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            skipped.append("llama_cpp: llama-cpp-python is not installed (optional)")
        else:
            gguf = gguf_of(backbone)
            if gguf is None:
                skipped.append("llama_cpp: this model has no GGUF file")
            else:
                llama = llama_cpp_decoder(gguf, eos, max_new_tokens, n_ctx)
    return hf, forwards, llama


def _cost_model(model, runs: list[dict], device: str) -> dict:
    """The cost of each forward shape our runs used, measured here (batch 1, after a 256-token
    context), and each batch-1 run's speed-up predicted from its forwards: with these costs, and
    on a device whose forward costs the same up to 64 rows (a GPU's regime)."""
    ours_ = [r for r in runs if r.get("forward_shapes") and r["batch_size"] == 1]
    if not ours_ or not isinstance(model, TwoTower):
        return {}
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else None
    costs = measure_forward_costs(model, {s for r in ours_ for s in r["forward_shapes"]}, synchronize=sync)
    for r in ours_:
        r["predicted_speedup"] = predicted_speedup(r["forward_shapes"], r["generated_tokens"], costs)
        r["predicted_speedup_flat64"] = predicted_speedup(r["forward_shapes"], r["generated_tokens"],
                                                          flat(r["forward_shapes"]))
    return {"context_tokens": 256, "batch": 1, "forward_ms": {s: 1000 * c for s, c in costs.items()},
            "relative_to_ar_step": {s: c / costs[AR_STEP] for s, c in costs.items()}, "flat_rows": FLAT_ROWS}


def run_speed_bench(
    model: str,
    dtype: str = "float32",
    modes: Sequence[str] = MODES,
    thresholds: Sequence[float] | None = None,
    block_sizes: Sequence[int] | None = None,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    prompts: int | None = None,
    max_new_tokens: int = 128,
    repeats: int = 3,
    warmup: int = 1,
    prompt_lookup_tokens: int = 10,
    output_dir: str | Path = "bench_results/speed",
    untrained: bool = False,
    device: str = "cpu",
    commit_rule: str | None = None,
    verify: bool | None = None,
    steps_per_block: int | None = None,
    exact: bool = True,
    quantize: str = "none",
    quantize_drafter: str | None = None,
    compile: bool = False,
    fused: bool | None = None,
    tree_nodes: list[int] | None = None,
    prompts_file: str | Path | None = None,
) -> dict:
    """Mask diffusion runs the model's recommended preset unless a dial option is given
    (``thresholds``, ``verify``, ``steps_per_block``): then the plain dial at every (block
    size, threshold). ``verify``: every denoiser forward drafts the confident run of targets
    from the left and the context tower checks it (output = AR greedy); with
    ``steps_per_block=1`` the drafts are whole blocks (self-speculative decoding)."""
    _check(thresholds or [], block_sizes or [], batch_sizes, max_new_tokens, repeats, warmup)
    out = prepare_output_dir(output_dir)
    loaded = load_model(model, dtype, device, untrained=untrained, exact=exact, quantize=quantize,
                        quantize_drafter=quantize_drafter, compile=compile, long_lived=True)
    asked_dtype, dtype = dtype, str(loaded.context.dtype).removeprefix("torch.")  # auto resolved
    if loaded.tokenizer is None:
        raise UsageError(f"{model} has no tokenizer: the benchmark prompts are text")
    warn_untrained(loaded)
    tt, context = loaded.model, loaded.context
    dials = settings_grid(loaded.recommended, thresholds, block_sizes, tree_nodes, verify=verify,
                          steps_per_block=steps_per_block,
                          commit_rule=commit_rule, fused=fused, max_new_tokens=max_new_tokens)
    prompt_set = Path(prompts_file) if prompts_file is not None else PROMPT_SET
    texts = load_prompt_set(prompt_set, count=prompts)
    encoded, chat = encode_prompts(loaded.tokenizer, texts)
    eos = eos_set(context, None)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    skipped: list[str] = []

    hf, forwards, llama = _baselines(modes, loaded.backbone, dtype, device, eos, max_new_tokens,
                                     max(map(len, encoded)) + max_new_tokens + 8, skipped)

    def contenders(batches) -> list[Contender]:
        batch_size = len(batches[0])
        out = []

        def add(name, mode, decode, **dial):
            out.append(Contender(name, {"batch_size": batch_size, "mode": mode, "label": name, **dial}, decode, batches))

        if "mock_ar" in modes:
            add("mock_ar", "mock_ar", ours(tt, mock_ar, eos), decoding=mock_ar.to_dict())
        twins = []
        if "fused" in modes and tt.config.flavour != "lora":
            skipped.append("fused: needs the lora flavour (both towers on one set of weights)")
        elif "fused" in modes:
            twins = [d.replace(fused=not d.fused) for d in dials if not d.tree_nodes]  # trees run unfused
        for settings in (dials if "mask_diffusion" in modes else []) + twins:
            size = settings.block_size or tt.block_size
            add(settings.label(tt.block_size), "mask_diffusion", ours(tt, settings, eos), block_size=size,
                threshold=settings.confidence_threshold, commit_rule=settings.commit_rule, verify=settings.verify,
                fused=settings.fused, steps_per_block=settings.steps_per_block or size, tree_nodes=settings.tree_nodes,
                decoding=settings.to_dict())
        if hf is not None and "transformers" in modes:
            add("transformers", "transformers", transformers_decoder(hf, forwards, eos, pad, max_new_tokens))
        if hf is not None and "prompt_lookup" in modes:
            if batch_size == 1:
                add("prompt_lookup", "prompt_lookup",
                    transformers_decoder(hf, forwards, eos, pad, max_new_tokens, prompt_lookup_tokens),
                    draft_tokens=prompt_lookup_tokens)
            else:
                skipped.append(f"prompt_lookup at batch {batch_size}: transformers runs it at batch 1 only")
        if llama is not None:
            if batch_size == 1:
                add("llama_cpp", "llama_cpp", llama)
            else:
                skipped.append(f"llama_cpp at batch {batch_size}: its Python API decodes one sequence at a time")
        return out

    ar_settings = resolve_settings(mode="ar", max_new_tokens=max_new_tokens)
    mock_ar = resolve_settings(loaded.recommended, mode="mock_ar", commit_rule=commit_rule, max_new_tokens=max_new_tokens)
    plan = [(b, contenders(batches_of(encoded, b))) for b in batch_sizes]
    rounds = sum(max(len(cs), 1) for _, cs in plan) * (warmup + repeats)
    bar = tqdm(total=rounds, desc="bench speed", unit="round")
    runs = []
    for batch_size, others in plan:
        batches = others[0].batches if others else batches_of(encoded, batch_size)
        ar = Contender("ar", {"batch_size": batch_size, "mode": "ar", "label": "ar"}, ours(context, ar_settings, eos),
                       batches)
        ratios, beside = {}, {}
        for c in others or [None]:
            pair = {"ar": ar} if c is None else {"ar": ar, c.name: c}
            bar.set_postfix_str(f"batch {batch_size} {c.name if c else 'ar'}")
            timings = interleaved(pair, repeats, warmup=warmup, on_round=lambda r: bar.update())
            ar.keep(timings, warmup)
            if c is not None:
                c.keep(timings, warmup)
                ratios[c.name] = timings.ratio("ar", c.name)
                beside[c.name] = timings.seconds["ar"]
        reference = ar.kept[-1].tokens
        runs.append(summarise(ar, 1.0, reference))
        runs.extend(summarise(c, ratios[c.name], reference, beside[c.name]) for c in others)
    bar.close()
    cost_model = _cost_model(tt, runs, device)

    box = describe_box() | {"dtype": dtype, "device": device}
    dial = dials[0]  # the commit rule, verification and steps are given once for every block size
    results = {
        "model": model,
        "denoiser": loaded.note or f"trained ({loaded.source})",
        "dtype": dtype,
        "dtype_asked": asked_dtype,
        "dtype_note": loaded.dtype_note,
        "quantize": quantize,
        "quantize_drafter": quantize_drafter,
        "numerics": loaded.describe_numerics(),
        "compile": loaded.context.compiler.describe() if loaded.context.compiler is not None else None,
        "max_new_tokens": max_new_tokens,
        "commit_rule": dial.commit_rule,
        "verify": dial.verify,
        "steps_per_block": dial.steps_per_block,
        "exact": exact,
        "recommended": loaded.recommended,  # each run's "decoding" holds the settings it ran
        "repeats": repeats,
        "warmup": warmup,
        "prompts": {"file": prompt_set.name, "count": len(texts), "kinds": [p["kind"] for p in texts],
                    "chat_template": chat},
        "memory_method": PeakMemory.method,
        "box": box,
        "cost_model": cost_model,
        "skipped": sorted(set(skipped)),
        "runs": runs,
    }
    atomic_write(out / "speed.json", json.dumps(results, indent=2))
    table = markdown(results)
    atomic_write(out / "speed.md", table)
    plot(runs, out / "speed.png", title=f"{model} ({dtype}, {box['threads']} threads)")
    print(table)
    print(f"wrote {out / 'speed.json'}, {out / 'speed.md'}, {out / 'speed.png'}")
    return results
