"""``twotower bench ar``: our KV-cached AR decoding in each dtype and quantization asked for,
against transformers ``generate()`` on the same weights and, where llama-cpp-python is installed,
llama.cpp on the backbone's own GGUF: greedy, batch 1, a fixed number of new tokens per prompt
(EOS disabled everywhere), all contenders interleaved in one run so that their ratios are
measured side by side. Tokens are compared with our unquantized fp32 AR (the reference), and
each contender's memory is recorded: for ours and transformers the bytes of the weights and
buffers the model holds (in one process the resident set of a model loaded after others is not
its own: freed pages stay with the allocator), for llama.cpp the resident memory it added
(its mmapped GGUF pages and buffers) once warmed up."""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
from tqdm import tqdm

from ..checkpoints import checkpoint_dir
from ..checkpoints.two_tower import load_model
from ..errors import UsageError
from ..files import atomic_write, prepare_output_file
from ..generate import DecodingSettings, decode
from ..generate.prompts import PROMPT_SET, encode_prompt, load_prompt_set
from ..model.devices import DTYPE_CHOICES, torch_dtype
from ..model.linear import packed_bytes
from ..model.quant import SCHEMES
from .box import describe_box
from .decoders import llama_cpp_decoder
from .memory import resident_mb
from .speed import gguf_of
from .timing import interleaved

REFERENCE = "twotower float32"


def _ours(model: str, dtype: str, quantize: str, compile: bool, max_new_tokens: int):
    # the AR model alone
    loaded = load_model(model, dtype, untrained=True, context_only=True, quantize=quantize, compile=compile)
    name = f"twotower {str(loaded.context.dtype).removeprefix('torch.')}"
    if dtype == "auto":
        name += " (auto)"
    if quantize != "none":
        name += f" {quantize}"
    if compile:
        name += " compiled"
    settings = DecodingSettings(mode="ar", max_new_tokens=max_new_tokens, stop_token_ids=())

    def run(prompts: list[list[int]]) -> list[list[int]]:
        return [decode(loaded.model, [p], settings).tokens[0] for p in prompts]
    return name, run, loaded


def _transformers(model: str, dtype: str, max_new_tokens: int, pad: int):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(checkpoint_dir(model), dtype=torch_dtype(dtype)).eval()
    hf.generation_config.eos_token_id = None  # exactly max_new_tokens, like the others
    hf.generation_config.pad_token_id = pad

    def run(prompts: list[list[int]]) -> list[list[int]]:
        out = []
        with torch.inference_mode():
            for p in prompts:
                g = hf.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False)
                out.append(g[0, len(p):].tolist())
        return out
    return f"transformers {dtype}", run, hf


def held_mb(module: torch.nn.Module) -> float:
    """The bytes of a model's parameters and buffers, each storage once (tied weights share),
    plus the oneDNN-packed copies our fp32 Linears make (model/linear.py: a second copy)."""
    storages = {}
    for t in list(module.parameters()) + list(module.buffers()):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return (sum(storages.values()) + packed_bytes(module)) / 2**20


def run_ar_bench(
    model: str, dtypes: list[str], max_new_tokens: int = 128, repeats: int = 5, output: str | None = None,
    quantize: list[str] | None = None, prompts: int = 5, transformers: bool = True, llama_cpp: bool = True,
    compile: bool = False,
) -> dict:
    """Every (dtype, quantization) of ours, transformers in each explicit dtype, llama.cpp on the
    GGUF: one interleaved run over the first ``prompts`` prompts of the shipped set."""
    quantize = list(quantize or ["none"])
    if repeats < 1 or max_new_tokens < 1 or prompts < 1:
        raise UsageError("--repeats, --max-new-tokens and --prompts must be >= 1")
    bad = [d for d in dtypes if d not in DTYPE_CHOICES] + [q for q in quantize if q not in SCHEMES]
    if bad:
        raise UsageError(f"unknown dtype or quantization: {', '.join(bad)}")
    output = prepare_output_file(output) if output else None
    texts = [row["text"] for row in load_prompt_set(PROMPT_SET, prompts)]
    contenders: dict[str, Callable[[], None]] = {}
    memory: dict[str, float] = {}
    outputs: dict[str, list[list[int]]] = {}
    notes: dict[str, str] = {}
    skipped: list[str] = []
    tokenizer = ids = None

    def add(name: str, run, before_mb: float, module: torch.nn.Module | None = None) -> None:
        def timed():
            outputs[name] = run(ids)
        timed()  # warm-up: one-time costs, and pages of mmapped weights touched
        memory[name] = round(held_mb(module) if module is not None else resident_mb() - before_mb, 1)
        contenders[name] = timed

    ours = [("float32", "none", False)]  # the reference, first
    ours += [(d, q, c) for c in ([False, True] if compile else [False]) for d in dtypes for q in quantize
             if (d, q, c) not in ours]
    for dtype, scheme, compiled in ours:
        before = resident_mb()
        name, run, loaded = _ours(model, dtype, scheme, compiled, max_new_tokens)
        if tokenizer is None:
            tokenizer = loaded.tokenizer
            ids = [encode_prompt(tokenizer, t, chat=True) for t in texts]
        notes[name] = "; ".join(n for n in (loaded.dtype_note, loaded.quantization.describe()
                                            if loaded.quantization.scheme != "none" else None,
                                            loaded.context.compiler.describe() if loaded.context.compiler else None)
                               if n) or None
        add(name, run, before, loaded.model)
    if transformers:
        for dtype in [d for d in dtypes if d != "auto"]:
            before = resident_mb()
            name, run, hf = _transformers(model, dtype, max_new_tokens, tokenizer.pad_token_id or 0)
            add(name, run, before, hf)
    if llama_cpp:
        gguf = gguf_of(model)
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            skipped.append("llama.cpp: llama-cpp-python is not installed (optional: pip install llama-cpp-python)")
            gguf = None
        if gguf is None and not skipped:
            skipped.append(f"llama.cpp: {model} came from no GGUF file")
        if gguf is not None:
            before = resident_mb()
            n_ctx = max(len(p) for p in ids) + max_new_tokens + 8
            decode_llama = llama_cpp_decoder(gguf, set(), max_new_tokens, n_ctx)
            add(f"llama.cpp {gguf.name}", lambda prompts: decode_llama(prompts).tokens, before)

    bar = tqdm(total=repeats + 1, desc="bench ar", leave=False)
    timings = interleaved(contenders, repeats, warmup=1, on_round=lambda r: bar.update())
    bar.close()
    tokens = max_new_tokens * len(ids)
    reference = outputs[REFERENCE]
    runs = []
    for name in contenders:
        same = [a == b for a, b in zip(outputs[name], reference)]
        agree = [sum(x == y for x, y in zip(a, b)) / len(b) for a, b in zip(outputs[name], reference)]
        runs.append({
            "contender": name,
            "tokens_per_second": tokens / timings.median(name),
            "speedup_vs_reference": timings.ratio(REFERENCE, name),
            "identical_to_reference": f"{sum(same)}/{len(same)}",
            "token_agreement_with_reference": sum(agree) / len(agree),
            "memory_mb": memory[name],
            "note": notes.get(name),
        })
    results = {"model": model, "max_new_tokens": max_new_tokens, "batch": 1, "repeats": repeats,
               "prompts": len(ids), "reference": REFERENCE, "box": describe_box(), "skipped": skipped,
               "runs": runs, "seconds": timings.seconds}
    print(format_ar_table(results))
    for line in skipped:
        print(f"skipped: {line}")
    if output:
        atomic_write(output, json.dumps(results, indent=2))
        print(f"wrote {output}")
    return results


def format_ar_table(results: dict) -> str:
    lines = ["| contender | tok/s | vs our fp32 AR | identical to it | token agreement | memory MB |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results["runs"]:
        lines.append(f"| {r['contender']} | {r['tokens_per_second']:.1f} | {r['speedup_vs_reference']:.2f}x | "
                     f"{r['identical_to_reference']} | {r['token_agreement_with_reference']:.1%} | "
                     f"{r['memory_mb']:.0f} |")
    return "\n".join(lines)
