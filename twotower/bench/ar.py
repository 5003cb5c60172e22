"""``twotower bench ar``: our KV-cached AR decoding vs transformers ``generate()`` on the same
weights, greedy, batch 1, a fixed number of new tokens (EOS disabled on both sides)."""

from __future__ import annotations

import json

import torch
from tqdm import tqdm

from ..checkpoints import checkpoint_dir, load_backbone
from ..errors import UsageError
from ..files import atomic_write, prepare_output_file
from ..generate import DecodingSettings, decode
from ..model.devices import torch_dtype
from .box import describe_box
from .timing import interleaved

PROMPT = "The history of the printing press begins"


def run_ar_bench(
    model: str, dtypes: list[str], max_new_tokens: int = 128, repeats: int = 5, output: str | None = None
) -> dict:
    from transformers import AutoModelForCausalLM

    if repeats < 1 or max_new_tokens < 1:
        raise UsageError("--repeats and --max-new-tokens must be >= 1")
    output = prepare_output_file(output) if output else None
    results = {"model": model, "max_new_tokens": max_new_tokens, "batch": 1, "repeats": repeats,
               "prompt": PROMPT, "box": describe_box(), "runs": []}
    for name in dtypes:
        dtype = torch_dtype(name)
        ours, tokenizer = load_backbone(model, dtype=dtype)
        hf = AutoModelForCausalLM.from_pretrained(checkpoint_dir(model), dtype=dtype).eval()
        hf.generation_config.eos_token_id = None  # both sides generate exactly max_new_tokens
        hf.generation_config.pad_token_id = tokenizer.pad_token_id or 0
        ids = tokenizer(PROMPT, return_tensors="pt").input_ids
        outputs = {}
        settings = DecodingSettings(mode="ar", max_new_tokens=max_new_tokens, stop_token_ids=())

        def run_ours():
            outputs["twotower"] = decode(ours, ids[0], settings).tokens[0]

        def run_hf():
            with torch.inference_mode():
                g = hf.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
            outputs["transformers"] = g[0, ids.shape[1]:].tolist()

        bar = tqdm(total=repeats + 1, desc=f"bench ar {name}", leave=False)
        t = interleaved({"twotower": run_ours, "transformers": run_hf}, repeats, on_round=lambda r: bar.update())
        bar.close()
        run = {
            "dtype": name,
            "tokens_per_second": {k: max_new_tokens / t.median(k) for k in t.seconds},
            "seconds": t.seconds,
            "speedup_vs_transformers": t.ratio("transformers", "twotower"),
            "identical_tokens": outputs["twotower"] == outputs["transformers"],
        }
        results["runs"].append(run)
        print(
            f"{name:9s} twotower {run['tokens_per_second']['twotower']:6.1f} tok/s | transformers "
            f"{run['tokens_per_second']['transformers']:6.1f} tok/s | speed-up x{run['speedup_vs_transformers']:.2f}"
            f" | identical tokens: {run['identical_tokens']}"
        )
        del ours, hf
    if output:
        atomic_write(output, json.dumps(results, indent=2))
        print(f"wrote {output}")
    return results
