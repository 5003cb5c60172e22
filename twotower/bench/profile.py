"""``twotower bench step --profile``: where the time of one AR step and one denoiser step goes,
by layer kind and by op (torch.profiler), so that each speed change is chosen and checked by
numbers.

Every module of the towers is labelled for the profiler (a ``record_function`` around its
forward, entered and left by module hooks): projections (every Linear: q/k/v/o, MLP, Mamba's
in/out), the attention core (RoPE, scores, softmax, weighted values), Mamba's scan, norms, the
embedding, the LM head. Each op's own time goes to the innermost label around it; what a label
spends outside any op (Python, dispatch, allocation between ops) is its ``python`` share, and
the time of the step outside every op is reported as ``python`` too. Sampling (the greedy pick
over the vocabulary) is labelled in the step.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from ..model.backbone import Backbone
from ..model.layers import MLP, Attention, MoE, RMSNorm
from ..model.linear import Linear
from ..model.mamba2 import GatedRMSNorm, Mamba2
from ..model.quant import QuantLinear

STEP = "twotower.step"


def _kind(module: nn.Module, backbone: Backbone) -> str | None:
    if module is backbone.lm_head:
        return "lm_head"
    if module is backbone.embed_tokens:
        return "embedding"
    if isinstance(module, Linear | nn.Linear | QuantLinear):
        return "projections"
    if isinstance(module, Attention):
        return "attention_core"
    if isinstance(module, Mamba2):
        return "mamba_scan"
    if isinstance(module, MLP):
        return "mlp_activation"
    if isinstance(module, MoE):
        return "moe_routing"
    if isinstance(module, RMSNorm | GatedRMSNorm):
        return "norms"
    return None


class Labels:
    """Profiler labels on every module of the given backbones, while the ``with`` lasts."""

    def __init__(self, *backbones: Backbone) -> None:
        self.backbones = backbones
        self.handles: list = []

    def __enter__(self) -> Labels:
        for backbone in self.backbones:
            for module in backbone.modules():
                kind = _kind(module, backbone)
                if kind is None:
                    continue
                open_: list = []

                def enter(mod, args, kind=kind, open_=open_):
                    label = record_function(f"twotower.{kind}")
                    label.__enter__()
                    open_.append(label)

                def leave(mod, args, out, open_=open_):
                    open_.pop().__exit__(None, None, None)
                    return out

                self.handles.append(module.register_forward_pre_hook(enter))
                self.handles.append(module.register_forward_hook(leave))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _attribute(events) -> tuple[dict[str, float], dict[str, float], float, int]:
    """Per label: op time and python time (us, summed over the profile); per op name: self time;
    the total time of the STEP events and their count."""
    by_label: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    step_total, steps = 0.0, 0

    def walk(event, label: str) -> None:
        name = event.name
        if name.startswith("twotower."):
            if name == STEP:
                label = "python"  # a step's own time outside any labelled module or op
            else:
                label = name[len("twotower."):]
            by_label[f"{label}|python"] += event.self_cpu_time_total
        else:
            by_label[f"{label}|ops"] += event.self_cpu_time_total
            by_op[name] += event.self_cpu_time_total
        for child in event.cpu_children:
            walk(child, label)

    for event in events:
        if event.name == STEP and event.cpu_parent is None:
            step_total += event.cpu_time_total
            steps += 1
            walk(event, "python")
    return dict(by_label), dict(by_op), step_total, steps


def profile_step(step: Callable[[], None], backbones: list[Backbone], repeats: int, top_ops: int = 12) -> dict:
    """Profile ``repeats`` calls of ``step`` (after one warm-up call); ms per step by label (its
    ops, its python) and the ``top_ops`` ops by own time."""
    with torch.inference_mode():
        step()
        with Labels(*backbones), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                with record_function(STEP):
                    step()
    by_label, by_op, total, steps = _attribute(prof.events())
    per_step = 1e-3 / max(steps, 1)  # us summed over the steps -> ms per step
    labels: dict[str, dict[str, float]] = defaultdict(lambda: {"ops_ms": 0.0, "python_ms": 0.0})
    for key, us in by_label.items():
        label, part = key.split("|")
        labels[label]["ops_ms" if part == "ops" else "python_ms"] += us * per_step
    rows = sorted(labels.items(), key=lambda kv: -(kv[1]["ops_ms"] + kv[1]["python_ms"]))
    ops = sorted(by_op.items(), key=lambda kv: -kv[1])[:top_ops]
    return {"step_ms": total * per_step, "steps_profiled": steps,
            "by_label": {k: {n: round(v, 3) for n, v in d.items()} for k, d in rows},
            "top_ops_ms": {k: round(v * per_step, 3) for k, v in ops}}


def format_profile(name: str, result: dict) -> str:
    lines = [f"{name}: {result['step_ms']:.2f} ms per step (profiled, {result['steps_profiled']} steps)",
             f"  {'part':18s} {'ops ms':>8s} {'python ms':>10s} {'share':>6s}"]
    total = result["step_ms"] or 1.0
    for label, d in result["by_label"].items():
        share = (d["ops_ms"] + d["python_ms"]) / total
        lines.append(f"  {label:18s} {d['ops_ms']:8.2f} {d['python_ms']:10.2f} {share:6.1%}")
    lines.append("  top ops: " + ", ".join(f"{k} {v:.2f}" for k, v in result["top_ops_ms"].items()))
    return "\n".join(lines)
