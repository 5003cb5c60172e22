"""``bench speed``'s report: the Markdown table and the speed-up vs agreement plot with its
Pareto frontier."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..files import save_figure


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (higher is better), by x."""
    keep = [
        i for i, (x, y) in enumerate(points)
        if not any(x2 >= x and y2 >= y and (x2 > x or y2 > y) for x2, y2 in points)
    ]
    return sorted(keep, key=lambda i: points[i])


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _rounds(row: dict) -> str:
    """Each interleaved round's speed-up, where there were several (not for our AR itself)."""
    rounds = row.get("speedup_per_round") or []
    return f" ({', '.join(f'{x:.2f}' for x in rounds)})" if row["mode"] != "ar" and len(rounds) > 1 else ""


def _threshold_cell(row: dict) -> str:
    """The threshold where it plays a part: not for baselines, nor with one step per block
    (the whole block is committed, or drafted, at once)."""
    return "–" if row.get("steps_per_block") == 1 else str(row.get("threshold", ""))


def markdown(results: dict) -> str:
    box = results["box"]
    on_gpu = box.get("device", "cpu") != "cpu"
    memory = ("peak of torch's CUDA allocator over a pass" if on_gpu
              else f"peak RSS over the RSS at the call's start ({results['memory_method']})")
    lines = [
        f"# bench speed: {results['model']}",
        "",
        f"- denoiser: {results['denoiser']}",
        *([f"- numerics: {results['numerics']}"] if results.get("numerics") else []),
        f"- box: {box['cpu']}, {box['threads']} threads, torch {box['torch']}, transformers {box['transformers']}, "
        f"{box['dtype']}, device {box.get('device', 'cpu')}" + (f" ({box['cuda']})" if on_gpu and box["cuda"] else ""),
        f"- {results['prompts']['count']} prompts ({'chat template' if results['prompts']['chat_template'] else 'plain'}), "
        f"up to {results['max_new_tokens']} new tokens, greedy; median of {results['repeats']} interleaved repeats "
        f"after {results['warmup']} warm-up; mask diffusion commit rule: {results.get('commit_rule', 'threshold')}"
        + (", verified against the context tower" if results.get("verify") else "")
        + (f", {results['steps_per_block']} denoiser step(s) per block" if results.get("steps_per_block") else ""),
        "- speed-up: generated tokens/s of the mode / of our AR, timed A B A B in one run: the median over "
        "rounds, each round's in brackets; our AR's tok/s is given for the rounds beside each mode, since the "
        "box's speed may move between them; agreement: greedy tokens vs our AR",
        f"- memory: {memory}",
        "",
        "| batch | mode | block | threshold | tok/s | our AR beside it (tok/s) | speed-up vs AR (per round) "
        "| predicted (here / flat to 64 rows) "
        "| NFE/token | forwards/token | rows/forward | latency median (s) "
        f"| latency p90 (s) | {'peak GPU mem' if on_gpu else 'peak mem over start'} (MB) | token agreement "
        "| exact match |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        mode = r["mode"] + (" fused" if r.get("fused") else " verified" if r.get("verify") else "")
        mode += f" tree of {r['tree_nodes']}" if r.get("tree_nodes") else ""
        predicted = (f"{_fmt(r.get('predicted_speedup'), '.2f')} / {_fmt(r.get('predicted_speedup_flat64'), '.2f')}"
                     if r.get("predicted_speedup") is not None else "–")
        lines.append(
            f"| {r['batch_size']} | {mode} | {r.get('block_size', '')} | {_threshold_cell(r)} "
            f"| {r['tokens_per_second']:.1f} | {_fmt(r.get('ar_tokens_per_second_beside'), '.1f')} "
            f"| {r['speedup_vs_ar']:.2f}{_rounds(r)} | {predicted} "
            f"| {_fmt(r['nfe_per_token'], '.2f')} | {_fmt(r.get('forwards_per_token'), '.2f')} "
            f"| {_fmt(r.get('rows_per_forward'), '.1f')} "
            f"| {r['latency_s']['median']:.2f} | {r['latency_s']['p90']:.2f} "
            f"| {r['peak_gpu_mb'] if on_gpu else r['peak_rss_over_start_mb']:.0f} "
            f"| {100 * r['token_agreement']:.1f}% | {100 * r['exact_match']:.0f}% |"
        )
    cost = results.get("cost_model")
    if cost:
        lines += ["", "Cost model: one forward of each shape after a 256-token context, batch 1, relative to an AR "
                  f"step ({cost['forward_ms']['context 1']:.1f} ms): "
                  + ", ".join(f"{s} {v:.2f}x" for s, v in cost["relative_to_ar_step"].items()) + "."]
    lines += [f"- skipped: {s}" for s in results["skipped"]]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path, title: str) -> None:
    """Speed-up vs agreement with AR, one colour per batch size, its Pareto frontier drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a benchmark box
    import matplotlib.pyplot as plt

    markers = {"ar": "*", "mock_ar": "s", "mask_diffusion": "o", "transformers": "^", "prompt_lookup": "v",
               "llama_cpp": "D"}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, batch_size in enumerate(sorted({r["batch_size"] for r in runs})):
        rows = [r for r in runs if r["batch_size"] == batch_size]
        colour = f"C{i}"
        points = [(100 * r["token_agreement"], r["speedup_vs_ar"]) for r in rows]
        for r, (x, y) in zip(rows, points):
            ax.scatter(x, y, marker=markers[r["mode"]], color=colour, s=50, alpha=0.8)
            short = f"S{r['block_size']} t{r['threshold']}" if r["mode"] == "mask_diffusion" else r["mode"]
            short += f" tree{r['tree_nodes']}" if r.get("tree_nodes") else ""
            ax.annotate(short, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        front = [points[j] for j in pareto_frontier(points)]
        ax.plot([x for x, _ in front], [y for _, y in front], color=colour, linestyle="--", marker="o",
                markersize=13, markerfacecolor="none", label=f"batch {batch_size}: Pareto frontier (ringed)")
    for mode, marker in markers.items():
        if any(r["mode"] == mode for r in runs):
            ax.scatter([], [], marker=marker, color="grey", label=mode)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlim(right=101)  # agreement tops out at 100%
    ax.set_xlabel("greedy token agreement with our AR (%)")
    ax.set_ylabel("speed-up vs our AR (x, interleaved)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
