"""Rows of different requests in one decoding call (what the server batches): each row's own
length limit, seed and stop strings, and ``should_stop``, with every row's output equal to the
same request decoded alone, for every strategy and in fp32 and bf16."""

from __future__ import annotations

import pytest

from twotower import DecodeCallbacks, decode, load_model, resolve_settings
from twotower.errors import UsageError
from twotower.generate.rows import NewRow
from twotower.generate.stopping import CANCELLED

STRATEGIES = ["ar", "verified", "fused", "mask_diffusion", "fused_dial", "mock_ar"]
PROMPTS = ["The cat sat on the", "Once upon a time there was", "and the dog ran to", "A"]


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def loaded(world, request):
    return load_model(str(world.tt), request.param)


def _row_settings(loaded, strategy: str, sampled: bool) -> list:
    rows = []
    for i in range(len(PROMPTS)):
        kw = dict(strategy=strategy, max_new_tokens=[9, 17, 5, 12][i])
        if sampled:
            kw |= {"temperature": 0.9, "seed": 100 + 7 * i}
        rows.append(resolve_settings(loaded.recommended, **kw))
    # a stop string that occurs in a row's solo text (so that it does cut the row)
    solo = decode(loaded.model, [PROMPTS[1]], rows[1], tokenizer=loaded.tokenizer).texts[0]
    rows[1] = rows[1].replace(stop_strings=(solo[4:7] or "x",))
    return rows


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_row_is_what_it_is_alone(loaded, strategy, sampled):
    rows = _row_settings(loaded, strategy, sampled)
    batched = decode(loaded.model, PROMPTS, rows, tokenizer=loaded.tokenizer)
    assert batched.finish_reasons[1] == "stop"  # the stop string cut it
    for i, (prompt, settings) in enumerate(zip(PROMPTS, rows)):
        alone = decode(loaded.model, [prompt], settings, tokenizer=loaded.tokenizer)
        assert batched.tokens[i] == alone.tokens[0], (strategy, i)
        assert batched.texts[i] == alone.texts[0] and batched.finish_reasons[i] == alone.finish_reasons[0]
        assert len(batched.tokens[i]) <= settings.max_new_tokens


@pytest.mark.parametrize("strategy", ["ar", "verified", "mask_diffusion"])
def test_should_stop_ends_one_row_and_leaves_the_others(loaded, strategy):
    settings = resolve_settings(loaded.recommended, strategy=strategy, max_new_tokens=20, stop_token_ids=[])
    seen = [0, 0]

    def on_token(row, token):
        seen[row] += 1

    def should_stop(row):
        return CANCELLED if row == 1 and seen[1] >= 3 else None

    out = decode(loaded.model, PROMPTS[:2], settings, DecodeCallbacks(on_token=on_token, should_stop=should_stop),
                 tokenizer=loaded.tokenizer)
    assert out.finish_reasons == ["length", CANCELLED]
    assert 3 <= len(out.tokens[1]) < 20
    assert out.tokens[0] == decode(loaded.model, PROMPTS[:1], settings, tokenizer=loaded.tokenizer).tokens[0]


def test_rows_must_share_all_but_their_limits(loaded):
    a = resolve_settings(loaded.recommended, max_new_tokens=4)
    with pytest.raises(UsageError, match="may differ only in"):
        decode(loaded.model, PROMPTS[:2], [a, a.replace(temperature=0.5)], tokenizer=loaded.tokenizer)
    with pytest.raises(UsageError, match="2 settings for 3 prompts"):
        decode(loaded.model, PROMPTS[:3], [a, a], tokenizer=loaded.tokenizer)


def test_a_row_that_does_not_fit_is_named(loaded):
    a = resolve_settings(loaded.recommended, strategy="ar", max_new_tokens=4)
    long = a.replace(max_new_tokens=loaded.context.config.max_position_embeddings)
    with pytest.raises(UsageError, match="prompt 1"):
        decode(loaded.model, PROMPTS[:2], [a, long], tokenizer=loaded.tokenizer)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rows_that_join_and_leave_get_their_solo_answers(loaded, strategy, sampled):
    """Rows 2 and 3 join at the 2nd and 3rd boundary, and a fifth row once the batch has emptied;
    finished rows leave; every row's tokens are its solo tokens."""
    rows = _row_settings(loaded, strategy, sampled)
    rows.append(rows[0].replace(max_new_tokens=6, seed=None if rows[0].seed is None else 999))
    prompts = PROMPTS + ["The end"]
    ids = [loaded.tokenizer(p)["input_ids"] for p in prompts]
    calls: list[list[int]] = []

    lengths: list[dict[int, list[int]]] = []  # each row's tokens at each boundary

    def on_boundary(going_on: list[int]) -> list[NewRow]:
        calls.append(list(going_on))
        lengths.append({r: list(streamed.get(r, [])) for r in going_on})
        join = {2: [2], 3: [3]}.get(len(calls), [])
        if not going_on and 4 not in [r for c in calls for r in c] and len(calls) > 3:
            join = [4]
        return [NewRow(ids[i], rows[i].max_new_tokens, rows[i].seed, rows[i].stop_strings) for i in join]

    streamed: dict[int, list[int]] = {}
    callbacks = DecodeCallbacks(on_token=lambda row, tok: streamed.setdefault(row, []).append(tok),
                                on_boundary=on_boundary)
    out = decode(loaded.model, prompts[:2], rows[:2], callbacks, tokenizer=loaded.tokenizer)
    assert sorted(streamed) == [0, 1, 2, 3, 4]
    for i, (prompt, settings) in enumerate(zip(prompts, rows)):
        alone = decode(loaded.model, [prompt], settings, tokenizer=loaded.tokenizer)
        assert streamed[i] == out.tokens[i] == alone.tokens[0], (strategy, i)
        assert out.finish_reasons[i] == alone.finish_reasons[0]
    # finished rows left: none at its limit was among the rows going on, and at the end none is
    assert all(len(lengths[n][r]) < rows[r].max_new_tokens for n, c in enumerate(calls) for r in c)
    assert calls[-1] == [] and [] in calls[:-1]  # the batch emptied once, and the fifth row joined it then
