"""``twotower bench step``: what one forward of each kind costs on this machine, interleaved.

- ar_step: one cached AR token (the context tower alone);
- denoiser_step_lora / denoiser_step_merged / denoiser_step_full: one denoiser forward over a
  block of S inputs (1 NFE of mask diffusion): LoRA adapters as they are, LoRA merged into a
  copy (``merge_adapters``), and the full flavour;
- context_extend: the context tower's pass over a committed block of S tokens.
A block of mask diffusion costs k denoiser steps + 1 extension and yields S tokens, so these
ratios say how many tokens per step the denoiser must commit to beat AR."""

from __future__ import annotations

import json

import torch
from torch.profiler import record_function
from tqdm import tqdm

from ..checkpoints import load_backbone
from ..errors import UsageError
from ..files import atomic_write, prepare_output_file
from ..model.devices import torch_dtype
from ..model.quant import quantize_backbone
from ..model.twotower import DenoiserConfig, TwoTower
from .box import describe_box
from .profile import format_profile, profile_step
from .timing import interleaved


def run_step_bench(
    model: str, dtypes: list[str], context_tokens: int = 256, block_size: int = 16, repeats: int = 30,
    output: str | None = None, profile_steps: int = 0, quantize: str = "none",
) -> dict:
    """``profile_steps`` > 0: also profile that many AR steps (with the greedy pick) and merged
    denoiser steps, by layer kind and op (bench/profile.py)."""
    if context_tokens < 2 or block_size < 1 or repeats < 1 or profile_steps < 0:
        raise UsageError("--context-tokens must be >= 2, --block-size and --repeats >= 1, --profile-steps >= 0")
    output = prepare_output_file(output) if output else None
    results = {"model": model, "quantize": quantize, "context_tokens": context_tokens, "block_size": block_size,
               "repeats": repeats,
               "box": describe_box(), "runs": []}
    for name in dtypes:
        # one backbone each: LoRA is injected into the backbone it wraps
        towers = {flavour: TwoTower(load_backbone(model, dtype=torch_dtype(name))[0],
                                    DenoiserConfig(flavour="full" if flavour == "full" else "lora", block_size=block_size))
                  for flavour in ("lora", "merged", "full")}
        towers["merged"].merge_adapters()
        tt, merged, full = towers["lora"], towers["merged"], towers["full"]
        for tower in towers.values():  # both towers of each, as load_model(quantize=...) does
            tower.requires_grad_(False)  # (an inference benchmark: the full flavour's copy is trainable)
            quantize_backbone(tower.context, quantize)
            if tower.denoiser_tower is not None:
                quantize_backbone(tower.denoiser_tower, quantize)
        backbone = tt.context
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, backbone.config.vocab_size, (1, context_tokens), generator=gen)
        cache = backbone.new_cache(1, context_tokens + 2 * block_size)
        tt.context_forward(prompt, cache)
        one = prompt[:, :1]
        block = torch.full((1, block_size), tt.mask_token_id)
        block[0, 0] = int(prompt[0, -1])
        t = torch.ones(1)
        base = cache.lengths.clone()

        def ar_step():  # as a greedy step decodes: the hidden state, then the pick
            tt.context.argmax_tokens(tt.context_forward(one, cache, last_only=True, head=False))
            cache.rollback(base)

        def denoiser_step_lora():
            with torch.inference_mode():
                tt.denoise_block(block, t, cache)

        def denoiser_step_merged():
            with torch.inference_mode():
                merged.denoise_block(block, t, cache)

        def denoiser_step_full():
            with torch.inference_mode():
                full.denoise_block(block, t, cache)

        def context_extend():
            tt.context_forward(prompt[:, :block_size], cache)
            cache.rollback(base)

        bar = tqdm(total=repeats + 3, desc=f"bench step {name}", leave=False)
        contenders = {"ar_step": ar_step, "denoiser_step_lora": denoiser_step_lora,
                      "denoiser_step_merged": denoiser_step_merged, "denoiser_step_full": denoiser_step_full,
                      "context_extend": context_extend}
        timings = interleaved(contenders, repeats, warmup=3, on_round=lambda r: bar.update())
        bar.close()
        run = {
            "dtype": name,
            "median_ms": {k: 1000 * timings.median(k) for k in timings.seconds},
            "denoiser_step_over_ar_step": {
                flavour: timings.ratio(f"denoiser_step_{flavour}", "ar_step") for flavour in ("lora", "merged", "full")
            },
            "context_extend_over_ar_step": timings.ratio("context_extend", "ar_step"),
        }
        if profile_steps:
            run["profile"] = _profile(tt, merged, one, block, t, cache, base, profile_steps)
        results["runs"].append(run)
        print(f"{name:9s} " + " | ".join(f"{k} {v:.1f} ms" for k, v in run["median_ms"].items())
              + "".join(f" | {k} denoiser/AR x{v:.2f}" for k, v in run["denoiser_step_over_ar_step"].items())
              + f" | extend/AR x{run['context_extend_over_ar_step']:.2f}")
        for kind, result in run.get("profile", {}).items():
            print(format_profile(f"{name} {kind}", result))
    if output:
        atomic_write(output, json.dumps(results, indent=2))
        print(f"wrote {output}")
    return results


def _profile(tt: TwoTower, merged: TwoTower, one, block, t, cache, base, steps: int) -> dict:
    """One AR step (the cached token, the greedy pick) and one merged denoiser step, profiled."""

    def ar_step():
        hidden = tt.context_forward(one, cache, last_only=True, head=False)
        with record_function("twotower.greedy_pick"):  # Backbone.argmax_tokens: the LM head's part
            tt.context.argmax_tokens(hidden[:, -1]).tolist()
        cache.rollback(base)

    def denoiser_step():
        logits = merged.denoise_block(block, t, cache)
        with record_function("twotower.sampling"):
            logits.float().softmax(-1).max(-1)
    return {"ar_step": profile_step(ar_step, [tt.context], steps),
            "denoiser_step": profile_step(denoiser_step, [merged.denoiser], steps)}
