"""Copy a saved two-tower directory (say a training run's ``final/``) with its weights cast to
another dtype, as the shipped denoiser is kept (bf16: half the size, under the 16 MiB a file may
weigh in git or coming back from a lent GPU machine).

    python scripts/export_denoiser.py runs/gpu/train/final twotower/weights/smollm2-135m

Writes DEST/model.safetensors, DEST/config.json and what transformers' Auto classes need to load
DEST offline (the remote-code shim and the tokenizer), and leaves any other file in DEST alone:
the shipped directory's generation_config.json and README.md stay. The config's ``dtype`` stays
what training saved, so the model still loads in float32 unless asked otherwise; only the stored
weights are rounded.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from twotower.checkpoints.saved import (
    WEIGHTS_NAME,
    is_two_tower_dir,
    load_tokenizer,
    write_support_files,
    write_weights,
)


def export(source: Path, dest: Path, dtype: torch.dtype) -> int:
    if not is_two_tower_dir(source):
        raise SystemExit(f"export_denoiser: {source} is not a saved two-tower directory")
    with safe_open(source / WEIGHTS_NAME, framework="pt") as f:
        flavour = (f.metadata() or {}).get("flavour", "lora")
        state = {k: f.get_tensor(k) for k in f.keys()}
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    dest.mkdir(parents=True, exist_ok=True)
    write_weights(state, dest / WEIGHTS_NAME, flavour)
    shutil.copyfile(source / "config.json", dest / "config.json")
    write_support_files(dest, load_tokenizer(source))
    return (dest / WEIGHTS_NAME).stat().st_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="a saved two-tower directory")
    p.add_argument("dest", type=Path, help="where to write it (created; other files there are kept)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    args = p.parse_args(argv)
    size = export(args.source, args.dest, getattr(torch, args.dtype))
    print(f"{args.dest / WEIGHTS_NAME}: {size / 1e6:.1f} MB ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
