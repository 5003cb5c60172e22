"""Helpers for the server tests: a server on a free loopback port in a background thread, and a
"scripted" tiny model whose greedy continuation of any prompt is a text chosen by the test (so
that multi-byte characters split across tokens and stop strings across chunks are certain)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 in a thread; ``close()`` shuts it down as SIGTERM would."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def serve(loaded, name: str, *, max_batch: int = 8, max_queue: int = 64, **app_options) -> ServerThread:
    """A loaded model (``load_model``'s result) behind the app, as ``name``."""
    from twotower.serve import Engine, create_app

    engine = Engine(loaded.model, loaded.tokenizer, max_batch=max_batch, max_queue=max_queue)
    return ServerThread(create_app(engine, name, loaded.recommended, **app_options))


def scripted_llama(path: Path, tokenizer, continuation: list[int]) -> Path:
    """A Llama in transformers format (SmolLM2's tokenizer) whose greedy continuation of any
    prompt that ends in a token outside ``continuation`` is ``continuation`` then EOS: attention
    and MLP outputs are zero, so the logits read only the current token, whose embedding is a
    basis vector that the LM head maps to the next token of the script."""
    from transformers import LlamaConfig, LlamaForCausalLM

    chain = list(continuation) + [tokenizer.eos_token_id]
    if len(set(chain)) != len(chain):
        raise ValueError("the script must not repeat a token")
    hidden = 64
    if len(chain) >= hidden:
        raise ValueError(f"a script of at most {hidden - 1} tokens")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in (model.model.norm, model.model.layers[0].input_layernorm,
                     model.model.layers[0].post_attention_layernorm):
            norm.weight.fill_(1.0)
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.fill_(0.01)  # any other token: the first token of the script comes next
        emb[:, 0] = 1.0
        head[chain[0], 0] = 10.0
        for k, (tok, nxt) in enumerate(zip(chain[:-1], chain[1:]), start=1):
            emb[tok].zero_()
            emb[tok, k] = 1.0
            head[nxt, k] = 10.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
