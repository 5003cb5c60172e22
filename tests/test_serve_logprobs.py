"""Logprobs from the server: the AR model's log-probabilities of each token, the same under ar,
verified and fused decoding, equal to a full forward over prompt + answer, streamed == whole,
in both OpenAI formats, with exact bytes for tokens that hold part of a character."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import torch  # noqa: E402
from serve_support import scripted_llama, serve  # noqa: E402

from twotower import load_model  # noqa: E402
from twotower.generate.prompts import encode_messages  # noqa: E402

MESSAGES = [{"role": "user", "content": "Tell me about the cat."}]
SCRIPT = " café 😀 ok"  # "😀" is two byte-level tokens, neither of them UTF-8 alone




@pytest.fixture(scope="module")
def tiny(world):
    loaded = load_model(str(world.tt))
    server = serve(loaded, "tiny")
    yield loaded, server
    server.close()


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def _reference(loaded, prompt_ids: list[int], answer_ids: list[int]) -> list[list[float]]:
    """The AR model's log-probabilities at every answer position, from one uncached forward over
    prompt + answer (exact inference: the same bits as the decode's cached passes)."""
    ids = torch.tensor([prompt_ids + answer_ids])
    logits = loaded.model.context_forward(ids)[0, len(prompt_ids) - 1 : -1]
    return logits.float().log_softmax(-1).tolist()


@pytest.mark.parametrize("strategy", ["ar", "verified", "fused"])
def test_chat_logprobs_are_the_ar_models(tiny, strategy):
    loaded, server = tiny
    c = _client(server)
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=16, logprobs=True, top_logprobs=3,
              extra_body={"strategy": strategy})
    whole = c.chat.completions.create(**kw)
    content = whole.choices[0].logprobs.content
    assert content and "".join(e.token for e in content) == whole.choices[0].message.content
    prompt_ids = encode_messages(loaded.tokenizer, MESSAGES)
    ref = _reference(loaded, prompt_ids, [_token_id(loaded.tokenizer, e.bytes) for e in content])
    for entry, row in zip(content, ref):
        token_id = _token_id(loaded.tokenizer, entry.bytes)
        assert entry.logprob == row[token_id]  # bitwise: exact inference
        tops = entry.top_logprobs
        assert len(tops) == 3 and [t.logprob for t in tops] == sorted(row, reverse=True)[:3]
        assert tops[0].logprob == entry.logprob  # greedy: the token is the likeliest
        assert all(t.logprob <= 0 for t in tops)
    # streamed: the same entries, spread over the chunks
    streamed = []
    for chunk in c.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                streamed += choice.logprobs.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, extra_body={"strategy": strategy})
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == whole.choices[0].message.content


def _token_id(tokenizer, raw: list[int]) -> int:
    """The one token whose bytes are ``raw`` (the test's inverse of TokenText.bytes)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = bytes_to_unicode()
    return tokenizer.convert_tokens_to_ids("".join(chars[b] for b in raw))


def test_every_lossless_strategy_gives_the_same_logprobs(tiny):
    loaded, server = tiny
    c = _client(server)
    got = {}
    for strategy in ("ar", "verified", "fused"):
        out = c.completions.create(model="tiny", prompt="The cat sat on the", max_tokens=12, logprobs=2,
                                   extra_body={"strategy": strategy})
        got[strategy] = out.choices[0].logprobs.model_dump()
        text = out.choices[0].text
    assert got["ar"] == got["verified"] == got["fused"]
    lp = got["ar"]
    assert "".join(lp["tokens"]) == text and len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
    offsets = [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert lp["text_offset"] == offsets
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert 1 <= len(top) <= 2 and max(top.values()) == chosen and math.isfinite(chosen)


def test_tokens_inside_a_character_get_exact_bytes(world, tmp_path):
    tokenizer = world.tokenizer
    path = scripted_llama(tmp_path / "m", tokenizer, tokenizer(SCRIPT)["input_ids"])
    loaded = load_model(str(path))
    server = serve(loaded, "scripted")
    try:
        c = _client(server)
        out = c.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Hi"}],
                                        max_tokens=20, logprobs=True, extra_body={"strategy": "ar"})
        content = out.choices[0].logprobs.content
        assert bytes(b for e in content for b in e.bytes).decode("utf-8") == SCRIPT == out.choices[0].message.content
        partial = [e.token for e in content if e.token.startswith("bytes:")]
        assert len(partial) == 2 and all("\\x" in p for p in partial)  # the two halves of the emoji
        assert all(e.top_logprobs == [] for e in content)
    finally:
        server.close()


def test_runs_of_several_accepted_tokens_are_scored_one_by_one(tiny):
    """Verified decoding emits an accepted draft run at once: each of its tokens still gets the
    logprob of its own position (the runs are asserted to happen)."""
    loaded, server = tiny
    c = _client(server)
    out = c.completions.create(model="tiny", prompt="the cat sat on the mat and the dog", max_tokens=16, logprobs=0,
                               extra_body={"strategy": "verified"})
    assert out.usage.model_extra["nfe"] < out.usage.completion_tokens  # several tokens per draft
    ar = c.completions.create(model="tiny", prompt="the cat sat on the mat and the dog", max_tokens=16, logprobs=0,
                              extra_body={"strategy": "ar"})
    assert out.choices[0].logprobs.token_logprobs == ar.choices[0].logprobs.token_logprobs
    assert out.choices[0].logprobs.top_logprobs == [{}] * len(ar.choices[0].logprobs.tokens)


def test_logprobs_do_not_depend_on_batch_mates(tiny):
    """Requests with and without logprobs, of different lengths, sent at once (so that rows share
    batches and join them): every answer and every logprob is what the request gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    loaded, server = tiny
    c = _client(server)
    prompts = ["The cat", "A dog ran", "the mat and the dog ran to the", "On the", "cat cat", "Why"]

    def ask(i: int):
        out = c.completions.create(model="tiny", prompt=prompts[i % len(prompts)], max_tokens=6 + 3 * (i % 4),
                                   logprobs=1 if i % 2 == 0 else None, extra_body={"strategy": "verified"})
        lp = out.choices[0].logprobs
        return out.choices[0].text, None if lp is None else lp.model_dump()

    solo = [ask(i) for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(ask, range(12)))
    assert together == solo
    assert all((lp is None) == (i % 2 == 1) for i, (_, lp) in enumerate(solo))


def test_decode_refuses_logits_callbacks_for_unscored_strategies(tiny):
    from twotower import decode, resolve_settings
    from twotower.errors import UsageError
    from twotower.generate.decode import DecodeCallbacks

    loaded, _ = tiny
    seen = []
    callbacks = DecodeCallbacks(on_logits=lambda row, tokens, logits: seen.append((row, tokens, logits.shape)))
    out = decode(loaded.model, ["The cat"], resolve_settings(loaded.recommended, max_new_tokens=5), callbacks,
                 tokenizer=loaded.tokenizer)
    assert [t for _, tokens, _ in seen for t in tokens] == out.tokens[0]
    assert all(shape == (len(tokens), loaded.model.context.config.vocab_size) for _, tokens, shape in seen)
    for strategy in ("mask_diffusion", "fused_dial", "mock_ar"):
        with pytest.raises(UsageError, match="logprobs"):
            decode(loaded.model, ["The cat"], resolve_settings(strategy=strategy, max_new_tokens=5), callbacks,
                   tokenizer=loaded.tokenizer)
