"""``twotower serve``: the OpenAI-compatible server on one model (see twotower/serve)."""

from __future__ import annotations

import argparse
import signal
import sys

from ..errors import UsageError
from .options import add_model_options


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("serve", parents=[common], help="serve a model over an OpenAI-compatible HTTP API")
    add_model_options(s)
    s.add_argument("--served-model-name", default=None, help="the model's name in the API (default: --model)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--context-device", default="cpu", help="where the context (AR) tower runs, e.g. cuda:0")
    s.add_argument("--denoiser-device", default=None,
                   help="where the denoiser runs (default: with the context tower), e.g. cuda:1: one tower per "
                        "device (a lora denoiser then gets its own merged copy of the weights; no fused strategies)")
    s.add_argument("--max-batch", type=int, default=8, help="rows decoded together at most")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more get 429")
    s.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take, queue included")
    s.add_argument("--max-tokens-default", type=int, default=256,
                   help="max_tokens of a request that gives none")
    s.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1 endpoints")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import torch
    import uvicorn

    from ..checkpoints.two_tower import load_model, warn_untrained
    from ..generate.settings import resolve_settings
    from ..model.devices import resolve_device
    from ..serve import Engine, create_app

    for name in ("max_batch", "max_queue", "max_tokens_default"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.port < 65536:
        raise UsageError("--port must be in 1..65535")
    if args.timeout <= 0:
        raise UsageError("--timeout must be > 0")
    if args.api_key is not None and not args.api_key:
        raise UsageError("--api-key is empty")
    for device in (args.context_device, args.denoiser_device or args.context_device):
        resolve_device(device)  # a typo or a missing GPU: one clear error before the weights load
    loaded = load_model(args.model, args.dtype, args.context_device, untrained=args.untrained_denoiser,
                        exact=args.exact, denoiser_device=args.denoiser_device,
                        quantize=args.quantize, quantize_drafter=args.quantize_drafter, compile=args.compile,
                        long_lived=True)
    warn_untrained(loaded)
    if loaded.tokenizer is None:
        raise UsageError(f"{args.model} has no tokenizer: the server takes text")
    name = args.served_model_name or args.model
    warm_up = [resolve_settings(loaded.recommended, strategy="ar")]
    if loaded.two_tower is not None:  # the recommended preset and the plain dial
        warm_up += [resolve_settings(loaded.recommended), resolve_settings(loaded.recommended, strategy="mask_diffusion")]
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                    warm_up=warm_up)
    app = create_app(engine, name, loaded.recommended, api_key=args.api_key, timeout_s=args.timeout,
                     default_max_tokens=args.max_tokens_default, description=loaded.source)
    where = str(loaded.context.device)
    if loaded.two_tower is not None and loaded.two_tower.split:
        where = f"context on {where}, denoiser on {loaded.two_tower.denoiser.device}"
    print(f"twotower serve: {name} ({loaded.source}, {loaded.describe_numerics()}, {where}, {torch.get_num_threads()} threads) on "
          f"http://{args.host}:{args.port}  (max batch {args.max_batch}, queue {args.max_queue})",
          file=sys.stderr, flush=True)
    # uvicorn drains the open requests on SIGTERM or Ctrl-C, then raises the signal again for
    # the handler it found: a graceful stop, so that handler only lets the command return (exit 0)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("twotower serve: stopped after the open requests finished", file=sys.stderr)
