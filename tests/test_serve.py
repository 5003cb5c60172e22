"""The OpenAI-compatible server, through the official ``openai`` client and plain HTTP: equality
with ``decode`` and ``twotower generate``, streaming (multi-byte characters, stop strings),
batching of concurrent requests without changing any answer, cancellation, the queue limit,
bad requests, SIGTERM, and the live page in a real headless browser."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_support import ServerThread, free_port, scripted_llama, serve  # noqa: E402

from twotower import decode, load_model, resolve_settings  # noqa: E402

SCRIPT = " café 😀 naïve déjà ok"  # multi-byte characters split across tokens of SmolLM2's tokenizer
ARTIFACTS = Path(os.environ.get("TWOTOWER_TEST_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts"))


@pytest.fixture(scope="module")
def tiny(world):
    """The world's saved two-tower model (recommends verified drafts of 4) behind a server."""
    loaded = load_model(str(world.tt))
    server = serve(loaded, "tiny")
    yield loaded, server
    server.close()


@pytest.fixture(scope="module")
def scripted(world, tmp_path_factory):
    """A model whose greedy answer to anything is SCRIPT (then EOS), behind a server."""
    path = scripted_llama(tmp_path_factory.mktemp("scripted") / "m", world.tokenizer,
                          world.tokenizer(SCRIPT)["input_ids"])
    loaded = load_model(str(path))
    server = serve(loaded, "scripted")
    yield loaded, server
    server.close()


def client(server: ServerThread, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def streamed(stream) -> tuple[list[str], str | None, object]:
    """A stream's content deltas, finish reason and usage."""
    pieces, reason, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            if piece:
                pieces.append(piece)
            reason = choice.finish_reason or reason
    return pieces, reason, usage


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}]


def test_chat_and_completions_match_decode_and_generate(tiny, world):
    loaded, server = tiny
    c = client(server)
    whole = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20)
    pieces, reason, usage = streamed(c.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    text = whole.choices[0].message.content
    assert "".join(pieces) == text and reason == whole.choices[0].finish_reason
    settings = resolve_settings(loaded.recommended, max_new_tokens=20)
    assert settings.strategy == "verified"
    ref = decode(loaded.model, [MESSAGES], settings, tokenizer=loaded.tokenizer)
    assert text == ref.texts[0] and whole.choices[0].finish_reason == ref.finish_reasons[0]
    for u in (whole.usage, usage):
        assert u.completion_tokens == len(ref.tokens[0]) and u.prompt_tokens == len(ref.prompt_ids[0])
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens
        assert u.model_extra["nfe"] == sum(ref.stats.block_steps[0]) > 0
        assert u.model_extra["tokens_per_nfe"] == pytest.approx(u.completion_tokens / u.model_extra["nfe"], abs=1e-3)
    # the command line, the same model and settings (a user turn alone, as --chat sends it)
    one = [{"role": "user", "content": "Name a colour."}]
    cli = subprocess.run([sys.executable, "-m", "twotower.cli", "generate", "Name a colour.", "--model", str(world.tt),
                          "--chat", "--max-new-tokens", "20", "--no-stream"], capture_output=True, text=True,
                         timeout=300, check=True)
    served = c.chat.completions.create(model="tiny", messages=one, max_tokens=20).choices[0].message.content
    assert cli.stdout == served + "\n"

    prompt = "The cat sat on the"
    whole = c.completions.create(model="tiny", prompt=prompt, max_tokens=12)
    pieces, reason, _ = streamed(c.completions.create(model="tiny", prompt=prompt, max_tokens=12, stream=True))
    ref = decode(loaded.model, [prompt], resolve_settings(loaded.recommended, max_new_tokens=12),
                 tokenizer=loaded.tokenizer)
    assert whole.choices[0].text == "".join(pieces) == ref.texts[0]
    ids = world.tokenizer(prompt)["input_ids"]
    by_ids = c.completions.create(model="tiny", prompt=ids, max_tokens=12)
    assert by_ids.choices[0].text == ref.texts[0] and by_ids.usage.prompt_tokens == len(ids)
    assert [m.id for m in c.models.list().data] == ["tiny"]


def test_multibyte_characters_arrive_whole(scripted):
    loaded, server = scripted
    c = client(server)
    for strategy in ("ar", "verified", "fused"):
        pieces, reason, _ = streamed(c.chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "Hello"}], max_tokens=40, stream=True,
            extra_body={"strategy": strategy}))
        assert "".join(pieces) == SCRIPT and reason == "stop", strategy
        assert not any("\ufffd" in p for p in pieces) and any("😀" in p for p in pieces)
        assert len(pieces) > 3  # streamed, not sent at the end
        whole = c.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=40, extra_body={"strategy": strategy})
        assert whole.choices[0].message.content == SCRIPT
        if strategy == "ar":  # one forward a token, the end token included
            assert whole.usage.model_extra["nfe"] == whole.usage.completion_tokens == 10


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("strategy", ["ar", "verified"])
def test_stop_strings_across_tokens_and_chunks(scripted, stream, strategy):
    loaded, server = scripted
    c = client(server)
    # "aïv" spans the tokens " na" and "ïve"; "😀" is two tokens; "zzz" never occurs
    for stop, expected, reason in ((["aïv"], " café 😀 n", "stop"), (["zzz", "😀"], " café ", "stop"),
                                   ("zzz", SCRIPT, "stop")):
        kw = dict(model="scripted", prompt="Hi", max_tokens=40, stop=stop, extra_body={"strategy": strategy})
        if stream:
            pieces, got_reason, _ = streamed(c.completions.create(stream=True, **kw))
            text = "".join(pieces)
        else:
            out = c.completions.create(**kw)
            text, got_reason = out.choices[0].text, out.choices[0].finish_reason
        assert (text, got_reason) == (expected, reason), stop
    out = c.completions.create(model="scripted", prompt="Hi", max_tokens=3, extra_body={"strategy": strategy})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3


def _events(url: str, body: dict) -> list[tuple[str, dict]]:
    """A stream's events in order: ("chunk", data) or (the event's name, data)."""
    out = []
    with httpx.Client(timeout=120) as h, h.stream("POST", url + "/v1/chat/completions", json=body) as r:
        name = "chunk"
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and line != "data: [DONE]":
                out.append((name, json.loads(line[6:])))
                name = "chunk"
    return out


def test_the_dial_streams_a_blocks_committed_prefix_before_the_block_ends(tiny):
    loaded, server = tiny
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Count with me."}], "max_tokens": 16,
            "strategy": "mask_diffusion", "stream": True, "show_steps": True}
    events = _events(server.url, body)
    early = False
    for i, (name, data) in enumerate(events):
        if name == "chunk" and data["choices"] and data["choices"][0]["delta"].get("content"):
            last = [d for n, d in events[:i] if n == "twotower.step"][-1]
            later = [d for n, d in events[i:] if n == "twotower.step"]
            early |= bool(later) and later[0]["block"] == last["block"] and later[0]["step"] > last["step"]
    assert early, "no content arrived while its block was still being denoised"
    text = "".join(d["choices"][0]["delta"].get("content") or "" for n, d in events if n == "chunk" and d["choices"])
    settings = resolve_settings(loaded.recommended, strategy="mask_diffusion", max_new_tokens=16)
    ref = decode(loaded.model, [body["messages"]], settings, tokenizer=loaded.tokenizer)
    assert text == ref.texts[0]
    commits = [d for n, d in events if n == "twotower.commit"]
    assert [c["token"] for c in commits] == ref.tokens[0]
    steps = [d for n, d in events if n == "twotower.step"]
    assert len(steps) == sum(ref.stats.block_steps[0]) and all(len(d["pieces"]) == 4 for d in steps)


def _request(i: int) -> dict:
    """The i-th of the concurrent requests: mixed kinds, lengths, strategies, sampling, stops."""
    strategies = [None, "ar", "mask_diffusion", "verified", "fused", "fused_dial"]
    body = {"model": "tiny", "max_tokens": 4 + (i * 7) % 21, "stream": i % 2 == 0}
    if i % 3 == 0:
        body["prompt"] = ["The dog", "A cat sat", "Once upon a time", "the mat and"][i % 4] + " " * (i % 2)
    else:
        body["messages"] = [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}]
    if strategies[i % 6] is not None:
        body["strategy"] = strategies[i % 6]
    if i % 5 == 1:
        body |= {"temperature": 0.9, "seed": 1000 + i}
    if i % 7 == 2:
        body["stop"] = ["the", "\n"]
    return body


def _reference(loaded, body: dict) -> tuple[str, str]:
    settings = resolve_settings(loaded.recommended, strategy=body.get("strategy"), max_new_tokens=body["max_tokens"],
                                temperature=body.get("temperature"), seed=body.get("seed"),
                                stop_strings=tuple(body.get("stop", ())))
    prompt = body.get("prompt") or body["messages"]
    out = decode(loaded.model, [prompt], settings, tokenizer=loaded.tokenizer)
    return out.texts[0], out.finish_reasons[0]


def _post(url: str, body: dict) -> tuple[str, str]:
    """A request by plain HTTP (streamed or not): its text and finish reason."""
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    with httpx.Client(timeout=300) as h:
        if not body["stream"]:
            r = h.post(url + path, json=body)
            r.raise_for_status()
            choice = r.json()["choices"][0]
            return choice.get("text", (choice.get("message") or {}).get("content")), choice["finish_reason"]
        text, reason = "", None
        with h.stream("POST", url + path, json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[6:])["choices"]:
                    text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                    reason = choice["finish_reason"] or reason
        return text, reason


def _metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_32_concurrent_clients_get_their_solo_answers(tiny):
    """Whatever batches their arrival makes (its order is the threads'), every answer is the
    request's own solo answer."""
    loaded, server = tiny
    bodies = [_request(i) for i in range(32)]
    references = [_reference(loaded, b) for b in bodies]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda b: _post(server.url, b), bodies))
    for i, (got, want) in enumerate(zip(answers, references)):
        assert got == want, (i, bodies[i])


def test_requests_of_one_kind_waiting_together_run_as_one_batch(tiny):
    """Four requests of one kind (greedy AR, chat) queued while the engine is held are taken
    as one batch of four, and still get their solo answers. Holding the engine makes this
    certain: left to the threads' timing, mixed kinds arriving one by one may all run alone."""
    loaded, server = tiny
    engine = server.app.state.engine
    bodies = [_request(i) for i in (7, 13, 19, 25)]
    assert len({b.get("strategy") for b in bodies}) == 1 and not any("temperature" in b for b in bodies)
    references = [_reference(loaded, b) for b in bodies]
    gate, take = threading.Event(), engine._take

    def held(key, room, wait):
        if wait:  # the engine's wait for a new batch, not a join at a step boundary
            gate.wait(60)
        return take(key, room, wait)

    engine._take = held
    try:
        # the engine may be inside a wait that began before the hold: one request passes it
        _post(server.url, {"model": "tiny", "prompt": "The dog", "max_tokens": 2, "stream": False})
        steps = _metric(server.url, "twotower_batch_size_count")
        solo_steps = _metric(server.url, 'twotower_batch_size_bucket{le="1.0"}')
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(_post, server.url, b) for b in bodies]
            deadline = time.monotonic() + 60
            while engine.queue_depth < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert engine.queue_depth == 4
            gate.set()
            answers = [f.result() for f in futures]
    finally:
        engine._take = take
        gate.set()
    assert answers == references
    # steps that ran several rows at once (the four are one kind: greedy AR, 11 tokens each)
    assert _metric(server.url, "twotower_batch_size_count") - steps > \
        _metric(server.url, 'twotower_batch_size_bucket{le="1.0"}') - solo_steps


@pytest.mark.parametrize("strategy", ["ar", "verified", "mask_diffusion"])
def test_requests_join_a_running_batch_and_keep_their_solo_answers(tiny, strategy):
    loaded, server = tiny
    joined = _metric(server.url, "twotower_rows_joined_total")
    long = {"model": "tiny", "prompt": "A long tale:", "max_tokens": 120, "strategy": strategy, "stream": True,
            "stop": ["never-appears"]}
    late = [{"model": "tiny", "prompt": f"Item {i}:", "max_tokens": 6 + 3 * i, "strategy": strategy,
             "stream": i % 2 == 1} for i in range(3)]
    references = [_reference(loaded, b) for b in [long, *late]]
    text, reason, started = "", None, threading.Event()
    with ThreadPoolExecutor(3) as pool:
        futures = []
        with httpx.Client(timeout=120) as h, h.stream("POST", server.url + "/v1/completions", json=long) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["text"]
                    reason = choice["finish_reason"] or reason
                if not started.is_set():  # the long row is decoding: the others come now
                    started.set()
                    futures = [pool.submit(_post, server.url, b) for b in late]
        answers = [f.result(timeout=120) for f in futures]
    assert [(text, reason), *answers] == references
    assert _metric(server.url, "twotower_rows_joined_total") - joined >= 1


def test_a_client_that_leaves_frees_its_row(tiny):
    loaded, server = tiny
    cancelled = _metric(server.url, 'twotower_rows_ended_total{reason="cancelled"}')
    others = [{"model": "tiny", "prompt": f"Story {i}:", "max_tokens": 30, "strategy": "ar", "stream": i % 2 == 0}
              for i in range(3)]
    references = [_reference(loaded, b) for b in others]
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(_post, server.url, b) for b in others]
        with httpx.Client(timeout=60) as h, h.stream("POST", server.url + "/v1/completions", json={
                "model": "tiny", "prompt": "A long tale:", "max_tokens": 400, "strategy": "ar", "stream": True,
                "stop": ["never-appears"]}) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n >= 4:
                    break  # leave mid-stream
        assert [f.result(timeout=120) for f in futures] == references
    deadline = time.monotonic() + 30
    while _metric(server.url, 'twotower_rows_ended_total{reason="cancelled"}') <= cancelled:
        assert time.monotonic() < deadline, "the abandoned row was never cancelled"
        time.sleep(0.05)
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok"


def test_the_queue_limit_answers_429_and_nothing_hangs(world):
    loaded = load_model(str(world.tt))
    server = serve(loaded, "tiny", max_batch=1, max_queue=2)
    try:
        body = {"model": "tiny", "prompt": "Go:", "max_tokens": 120, "strategy": "ar",
                "stop": ["never-appears"]}
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda _: httpx.post(server.url + "/v1/completions", json=body, timeout=120),
                                      range(8)))
        statuses = sorted(r.status_code for r in responses)
        assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
        for r in responses:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
        assert httpx.get(server.url + "/health").json() == {"status": "ok", "model": "tiny", "ready": True,
                                                            "queued": 0, "running": 0}
    finally:
        server.close()


BAD = [  # (what, path, body (bytes: sent as is), status, expected in the message)
    ("malformed JSON", "chat", b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
    ("not an object", "chat", b"[1, 2]", 400, "JSON object"),
    ("no model", "chat", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("unknown model", "chat", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "gpt-9"),
    ("no messages", "chat", {"model": "tiny"}, 400, "messages"),
    ("empty messages", "chat", {"model": "tiny", "messages": []}, 400, "messages"),
    ("unknown role", "chat", {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("content not text", "chat", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("blank conversation", "chat", {"model": "tiny", "messages": [{"role": "user", "content": "  "}]}, 400, "empty"),
    ("max_tokens 0", "chat", {"max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens text", "chat", {"max_tokens": "ten"}, 400, "max_tokens"),
    ("negative temperature", "chat", {"temperature": -1}, 400, "temperature"),
    ("NaN temperature", "chat", b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
                                b'"temperature": NaN}', 400, "temperature"),
    ("top_p 0", "chat", {"top_p": 0}, 400, "top_p"),
    ("n 2", "chat", {"n": 2}, 400, "n"),
    ("unknown field", "chat", {"frobnicate": True}, 400, "frobnicate"),
    ("unknown strategy", "chat", {"strategy": "magic"}, 400, "strategy"),
    ("unknown mode", "chat", {"mode": "beam"}, 400, "mode"),
    ("dial option for ar", "chat", {"mode": "ar", "block_size": 4}, 400, "block_size"),
    ("threshold 1.5", "chat", {"confidence_threshold": 1.5}, 400, "confidence_threshold"),
    ("unknown commit rule", "chat", {"commit_rule": "vibes"}, 400, "commit rule"),
    ("strategy against verify", "chat", {"strategy": "verified", "verify": False}, 400, "contradicts"),
    ("logprobs from the dial", "chat", {"logprobs": True, "strategy": "mask_diffusion"}, 400, "logprobs"),
    ("top_logprobs without logprobs", "chat", {"top_logprobs": 2}, 400, "logprobs"),
    ("top_logprobs 21", "chat", {"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("completion logprobs 6", "completions", {"prompt": "hi", "logprobs": 6}, 400, "logprobs"),
    ("five stop strings", "chat", {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("tools", "chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("over-long prompt", "completions", {"prompt": [100] * 600}, 400, "context"),
    ("max_tokens past the context", "completions", {"prompt": "hi", "max_tokens": 5000}, 400, "context"),
    ("token id outside the vocabulary", "completions", {"prompt": [10**7]}, 400, "token ids"),
    ("negative token id", "completions", {"prompt": [-1, 5]}, 400, "token ids"),
    ("empty prompt", "completions", {"prompt": ""}, 400, "empty"),
    ("empty token list", "completions", {"prompt": []}, 400, "empty"),
    ("several prompts", "completions", {"prompt": ["a", "b"]}, 400, "one prompt"),
    ("echo", "completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    ("oversized body", "completions", {"prompt": "x" * (2 << 20)}, 413, "larger than"),
]


def _bad_body(body, path: str) -> bytes:
    """The body as sent: bytes as they are; an object over a valid request of its kind, unless
    it names the model itself (then it is the whole body)."""
    if isinstance(body, bytes):
        return body
    if "model" in body or "messages" in body:
        return json.dumps(body).encode()
    base = {"model": "tiny"} | ({"messages": [{"role": "user", "content": "hi"}]} if path == "chat" else {"prompt": "hi"})
    return json.dumps(base | body).encode()


@pytest.mark.parametrize("what,path,body,status,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(tiny, what, path, body, status, needle):
    loaded, server = tiny
    data = _bad_body(body, path)
    url = server.url + ("/v1/chat/completions" if path == "chat" else "/v1/completions")
    r = httpx.post(url, content=data, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle.lower() in error["message"].lower() and error["type"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_routes_methods_and_the_api_key(world):
    loaded = load_model(str(world.tt))
    server = serve(loaded, "tiny", api_key="s3cret")
    try:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(server.url + "/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(server.url + "/v1/models").status_code == 401
        c = client(server, api_key="s3cret")
        assert c.completions.create(**body).usage.completion_tokens >= 1
        r = httpx.get(server.url + "/v1/nope")
        assert r.status_code == 404 and r.json()["error"]["message"]
        r = httpx.get(server.url + "/v1/chat/completions")
        assert r.status_code == 405 and r.json()["error"]["message"]
        metrics = httpx.get(server.url + "/metrics").text
        for name in ("twotower_requests_total", "twotower_queue_depth", "twotower_batch_size",
                     "twotower_generated_tokens_total", "twotower_nfe_total", "twotower_tokens_per_nfe",
                     "twotower_time_to_first_token_seconds", "twotower_inter_token_latency_seconds"):
            assert name in metrics, name
        assert 'twotower_requests_total{endpoint="/v1/completions",status="401"} 3.0' in metrics
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        server.close()


def test_sigterm_lets_the_stream_finish_then_exits_0(world):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "twotower.cli", "serve", "--model", str(world.tt),
                             "--port", str(port), "--served-model-name", "tiny", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.2)
        text, reason, done = "", None, False
        body = {"model": "tiny", "prompt": "Once", "max_tokens": 300, "strategy": "ar", "stream": True,
                "stop": ["never-appears"]}
        with httpx.Client(timeout=120) as h, h.stream("POST", url + "/v1/completions", json=body) as r:
            for n, line in enumerate(r.iter_lines()):
                if n == 2:
                    proc.send_signal(signal.SIGTERM)
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    for choice in json.loads(line[6:])["choices"]:
                        text += choice["text"]
                        reason = choice["finish_reason"] or reason
        assert done and reason in ("length", "stop") and text
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("needs Debian's chromium and chromium-driver (scripts/setup.sh installs them where apt works)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,800"):
        options.add_argument(arg)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)


def test_the_page_streams_and_colours_the_steps(tiny):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    loaded, server = tiny
    browser = _browser()
    try:
        browser.get(server.url + "/")
        assert "tiny" in browser.title
        browser.find_element(By.ID, "prompt").send_keys("Tell me about the cat and the mat.")
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("24")
        seen_block = threading.Event()

        def block_drawn(b):
            if b.find_elements(By.CSS_SELECTOR, "#block .slot"):
                seen_block.set()
            return b.find_elements(By.CSS_SELECTOR, ".assistant[data-done='1']")

        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 120, poll_frequency=0.01).until(block_drawn)
        answer = browser.find_element(By.CSS_SELECTOR, ".assistant")
        spans = answer.find_elements(By.CSS_SELECTOR, ".coloured .slot")
        assert spans, "no coloured tokens"
        styles = {s.get_attribute("style") for s in spans if "ar" not in s.get_attribute("class").split()}
        assert any("background" in s for s in styles)  # coloured by the step that committed them
        ref = decode(loaded.model, [[{"role": "user", "content": "Tell me about the cat and the mat."}]],
                     resolve_settings(loaded.recommended, max_new_tokens=24), tokenizer=loaded.tokenizer)
        assert answer.get_attribute("data-text") == ref.texts[0]
        assert "tokens/NFE" in answer.find_element(By.CSS_SELECTOR, ".meta").text
        assert browser.find_element(By.ID, "error").text == ""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "serve_page.png"))
    finally:
        browser.quit()


def test_a_request_past_its_timeout_gets_504_and_a_stream_an_error_event(world):
    loaded = load_model(str(world.tt))
    server = serve(loaded, "tiny", timeout_s=0.3)
    try:
        body = {"model": "tiny", "prompt": "Go:", "max_tokens": 480, "strategy": "ar", "stop": ["never-appears"]}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        events = []
        with httpx.Client(timeout=60) as h, h.stream("POST", server.url + "/v1/completions",
                                                    json=body | {"stream": True}) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and "timed out" in events[-2]
        assert _metric(server.url, 'twotower_rows_ended_total{reason="timeout"}') == 2
        assert httpx.get(server.url + "/health").json()["status"] == "ok"
    finally:
        server.close()
