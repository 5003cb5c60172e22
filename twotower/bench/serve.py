"""``twotower bench serve``: the server under load. One ``twotower serve`` process; at each
concurrency, clients stream chat completions of the shipped prompt set and the run records
throughput (generated tokens per second of wall time), time to first token and inter-token
latency (p50 / p90 over requests). Our AR (``strategy: ar``) and the model's recommended preset
go through the same server, alternated level by level (A B A B) so that both see the same
machine. Where llama-cpp-python's server is installed (``--llama-cpp-python`` names the
interpreter that has it), it serves the same GGUF as a reference. Writes JSON, a Markdown table
and a plot."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..files import save_figure, write_json
from ..generate.prompts import load_prompt_set
from .box import describe_box

log = logging.getLogger(__name__)

CONCURRENCY = (1, 4, 16, 32)
STARTUP_S = 300  # a server that is not healthy by then has failed


@dataclass
class Contender:
    """A server to load: its name, its command line, and the extra body fields of its requests."""

    name: str
    command: list[str]
    model: str
    extra: dict = field(default_factory=dict)
    usage_in_stream: bool = True


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(command: list[str], log_path: Path, ready_url: str) -> subprocess.Popen:
    """A server process, its output in ``log_path`` (a pipe nobody reads would fill and stall
    it), once ``ready_url`` answers 200."""
    import httpx

    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UsageError(f"the server exited with {proc.returncode} before it was ready: "
                             f"{log_path.read_text()[-2000:]}")
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise UsageError(f"the server at {ready_url} was not ready after {STARTUP_S} s (see {log_path})")


def one_request(url: str, body: dict) -> dict:
    """Stream one chat completion: time to first content, the arrival of every content chunk,
    the completion tokens (usage, else content chunks) and the text."""
    import httpx

    start = time.perf_counter()
    arrivals, text, usage = [], "", None
    with httpx.Client(timeout=600) as client, client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise UsageError(f"the server answered {r.status_code}: {r.read()[:500]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    arrivals.append(time.perf_counter() - start)
                    text += piece
    tokens = usage["completion_tokens"] if usage else len(arrivals)
    ttft = arrivals[0] if arrivals else None
    itl = (arrivals[-1] - arrivals[0]) / (tokens - 1) if arrivals and tokens > 1 else None
    return {"seconds": time.perf_counter() - start, "ttft": ttft, "itl": itl, "tokens": tokens, "text": text,
            "nfe": usage.get("nfe") if usage else None}


def _quantile(values: list[float], q: float) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))] if q < 1 else values[-1]


def load_level(url: str, bodies: list[dict], concurrency: int) -> dict:
    """Every body once, ``concurrency`` at a time; the level's throughput and latencies."""
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda b: one_request(url, b), bodies))
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    nfe = [r["nfe"] for r in results if r["nfe"]]
    return {
        "concurrency": concurrency, "requests": len(results), "tokens": tokens, "wall_s": wall,
        "tokens_per_s": tokens / wall, "ttft_p50": _quantile([r["ttft"] for r in results], 0.5),
        "ttft_p90": _quantile([r["ttft"] for r in results], 0.9), "itl_p50": _quantile([r["itl"] for r in results], 0.5),
        "itl_p90": _quantile([r["itl"] for r in results], 0.9),
        "tokens_per_nfe": tokens / sum(nfe) if len(nfe) == len(results) and sum(nfe) else None,
        "texts": [r["text"] for r in results],
    }


def _bodies(contender: Contender, prompts: list[str], count: int, max_tokens: int) -> list[dict]:
    return [{"model": contender.model, "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
             "max_tokens": max_tokens, "temperature": 0, "stream": True,
             **({"stream_options": {"include_usage": True}} if contender.usage_in_stream else {}),
             **contender.extra} for i in range(count)]


def llama_cpp_contender(python: str, model: str, threads: int, port: int, n_ctx: int) -> Contender | None:
    """llama-cpp-python's OpenAI server on the model's GGUF, when ``python`` has it."""
    from ..checkpoints.load import resolve

    gguf = resolve(model)
    if gguf.suffix != ".gguf":
        return None
    probe = subprocess.run([python, "-c", "import llama_cpp.server"], capture_output=True)
    if probe.returncode != 0:
        return None
    return Contender("llama.cpp", [python, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                                   "--host", "127.0.0.1", "--n_threads", str(threads), "--n_ctx", str(n_ctx),
                                   "--model_alias", "llama.cpp",
                                   # queue concurrent requests (its default lets a new one interrupt the running one)
                                   "--interrupt_requests", "False"], "llama.cpp", usage_in_stream=False)


def server_command(model: str, dtype: str, port: int, max_batch: int, threads: int, *, exact: bool = True,
                   quantize: str = "none", compile: bool = False, untrained_denoiser: bool = False,
                   quantize_drafter: str | None = None) -> list[str]:
    """The ``twotower serve`` command line of our contender, with the model options it was asked for."""
    command = [sys.executable, "-m", "twotower.cli", "serve", "--model", model, "--dtype", dtype, "--port", str(port),
               "--served-model-name", "twotower", "--max-batch", str(max_batch), "--max-queue", "1024",
               "--threads", str(threads), "--log-level", "warning", "--quantize", quantize]
    command += [] if quantize_drafter is None else ["--quantize-drafter", quantize_drafter]
    return command + ([] if exact else ["--no-exact"]) + (["--compile"] if compile else []) + \
        (["--untrained-denoiser"] if untrained_denoiser else [])


def run_serve_bench(*, model: str, dtype: str, concurrency: list[int], requests: int, max_tokens: int,
                    max_batch: int, threads: int | None, output_dir: str, prompts_file: str | None = None,
                    llama_cpp_python: str | None = None, exact: bool = True, quantize: str = "none",
                    compile: bool = False, untrained_denoiser: bool = False,
                    quantize_drafter: str | None = None) -> dict:
    """The model options (``model`` .. ``untrained_denoiser``) are the server's own, as
    ``twotower serve`` takes them; they are recorded with the results."""
    if any(c < 1 for c in concurrency) or requests < 1 or max_tokens < 1 or max_batch < 1:
        raise UsageError("concurrency levels, --requests, --max-tokens and --max-batch must be >= 1")
    import torch

    threads = threads or torch.get_num_threads()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = [row["text"] for row in (load_prompt_set(prompts_file) if prompts_file else load_prompt_set())]
    port = _free_port()
    command = server_command(model, dtype, port, max_batch, threads, exact=exact, quantize=quantize, compile=compile,
                             untrained_denoiser=untrained_denoiser, quantize_drafter=quantize_drafter)
    ours = [Contender("ar", command, "twotower", {"strategy": "ar"}), Contender("recommended", command, "twotower")]
    results = {"model": model, "dtype": dtype, "quantize": quantize, "quantize_drafter": quantize_drafter,
               "compile": compile, "exact": exact,
               "untrained_denoiser": untrained_denoiser, "max_batch": max_batch, "max_tokens": max_tokens,
               "box": describe_box() | {"threads": threads}, "levels": {}, "llama_cpp": None}
    base = f"http://127.0.0.1:{port}"
    proc = _start(command, out / "server.log", base + "/health")
    try:
        url = base + "/v1/chat/completions"
        one_request(url, _bodies(ours[1], prompts, 1, 8)[0])  # warm-up
        for c in concurrency:
            count = max(requests, c)
            for contender in ours:  # alternated at every level: both see the same machine
                level = load_level(url, _bodies(contender, prompts, count, max_tokens), c)
                results["levels"].setdefault(contender.name, []).append(level)
                log.warning("bench serve: %s at concurrency %d: %.1f tok/s", contender.name, c, level["tokens_per_s"])
        for ar, rec in zip(results["levels"]["ar"], results["levels"]["recommended"]):
            rec["same_text_as_ar"] = sum(a == b for a, b in zip(ar["texts"], rec["texts"])) / len(ar["texts"])
            rec["speedup_vs_ar"] = rec["tokens_per_s"] / ar["tokens_per_s"]
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    write_json(out / "serve.json", results)  # ours are kept whatever happens to the reference
    try:
        results["llama_cpp"] = _run_llama_cpp(llama_cpp_python, model, threads, prompts, concurrency, requests,
                                              max_tokens, results, out)
    except UsageError as e:
        results["llama_cpp"] = f"failed: {e}"
    write_json(out / "serve.json", results)
    (out / "serve.md").write_text(markdown(results))
    plot(results, out / "serve.png")
    return results


def _run_llama_cpp(python, model, threads, prompts, concurrency, requests, max_tokens, results, out: Path) -> str:
    import httpx

    python = python or sys.executable
    if importlib.util.find_spec("llama_cpp") is None and python == sys.executable:
        return "not run: llama-cpp-python[server] is not installed (give --llama-cpp-python PYTHON to use another)"
    port = _free_port()
    contender = llama_cpp_contender(python, model, threads, port, n_ctx=2048)
    if contender is None:
        return f"not run: {python} has no llama_cpp.server, or {model} is not a GGUF"
    proc = _start(contender.command, out / "llama_cpp_server.log", f"http://127.0.0.1:{port}/v1/models")
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        one_request(url, _bodies(contender, prompts, 1, 8)[0])
        for c in concurrency:
            try:
                level = load_level(url, _bodies(contender, prompts, max(requests, c), max_tokens), c)
            except (httpx.HTTPError, UsageError, ValueError) as e:  # a broken stream, an error status
                return f"failed at concurrency {c}: {type(e).__name__}: {e}"
            results["levels"].setdefault("llama.cpp", []).append(level)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    return "run after ours (not interleaved: one server at a time on this machine)"


def _cell(value, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def markdown(results: dict) -> str:
    box = results["box"]
    lines = [f"# bench serve: {results['model']}", "",
             f"- box: {box['cpu']} ({', '.join(box.get('cpu_flags', [])) or 'no flags read'}), {box['threads']} threads, "
             f"torch {box['torch']}, {results['dtype']}, quantize {results.get('quantize', 'none')}"
             f"{'' if results.get('quantize_drafter') is None else ', drafter ' + results['quantize_drafter']}"
             f"{', compiled' if results.get('compile') else ''}{'' if results.get('exact', True) else ', --no-exact'}; "
             f"server --max-batch {results['max_batch']}",
             f"- streamed chat completions of the shipped prompt set, up to {results['max_tokens']} tokens, greedy; "
             "AR and the recommended preset alternated at every level, through one server",
             f"- llama.cpp: {results['llama_cpp'] or 'not run'}", "",
             "| contender | concurrency | requests | tok/s | vs AR | TTFT p50 (s) | TTFT p90 (s) | ITL p50 (ms) "
             "| ITL p90 (ms) | tokens/NFE | same text as AR |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, levels in results["levels"].items():
        for lv in levels:
            itl50 = None if lv["itl_p50"] is None else lv["itl_p50"] * 1000
            itl90 = None if lv["itl_p90"] is None else lv["itl_p90"] * 1000
            lines.append(f"| {name} | {lv['concurrency']} | {lv['requests']} | {lv['tokens_per_s']:.1f} "
                         f"| {_cell(lv.get('speedup_vs_ar'))} | {_cell(lv['ttft_p50'])} | {_cell(lv['ttft_p90'])} "
                         f"| {_cell(itl50, '.1f')} | {_cell(itl90, '.1f')} | {_cell(lv.get('tokens_per_nfe'))} "
                         f"| {_cell(lv.get('same_text_as_ar'), '.0%')} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, levels in results["levels"].items():
        xs = [lv["concurrency"] for lv in levels]
        left.plot(xs, [lv["tokens_per_s"] for lv in levels], marker="o", label=name)
        right.plot(xs, [lv["ttft_p50"] for lv in levels], marker="o", label=name)
    for ax, label in ((left, "generated tokens/s"), (right, "time to first token p50 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"twotower serve: {results['model']}, {results['dtype']}, {results['box']['threads']} threads")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
