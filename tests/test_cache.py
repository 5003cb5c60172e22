"""Caches are exact: cached decoding, left padding and per-row rollback all reproduce a fresh
full forward pass; bad input is refused with ValueError."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, attention_config, hybrid_config, tiny_backbone

from twotower.model.cache import append_context

TOL = dict(rtol=1e-4, atol=1e-4)
CONFIGS = {"attention": attention_config, "hybrid": hybrid_config}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return tiny_backbone(CONFIGS[request.param](), seed=11)


def random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def decode_in_pieces(model, ids: torch.Tensor, prompt_len: int, pieces: list[int], cache=None) -> torch.Tensor:
    """Prefill ``prompt_len`` tokens, then feed the rest in pieces of the given sizes."""
    cache = cache or model.new_cache(ids.shape[0], ids.shape[1])
    out = [model(ids[:, :prompt_len], cache)]
    pos = prompt_len
    for size in pieces:
        out.append(model(ids[:, pos : pos + size], cache))
        pos += size
    assert pos == ids.shape[1] and int(cache.lengths.max()) == pos
    return torch.cat(out, dim=1)


# 13-token prompt: with the hybrid's chunk of 8, no later piece starts on a chunk boundary.
SCHEDULES = {"one-by-one": [1] * 16, "chunks": [1, 3, 5, 7], "mixed": [7, 1, 5, 3]}


@torch.no_grad()
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_cached_decoding_equals_full_recompute(model, schedule):
    ids = random_ids(2, 13 + sum(SCHEDULES[schedule]), seed=1)
    full = model(ids)
    cached = decode_in_pieces(model, ids, 13, SCHEDULES[schedule])
    torch.testing.assert_close(cached, full, **TOL)
    assert torch.equal(cached.argmax(-1), full.argmax(-1))


@torch.no_grad()
def test_last_only(model):
    ids = random_ids(2, 9, seed=2)
    full = model(ids)
    last = model(ids, model.new_cache(2, 16), last_only=True)
    assert last.shape == (2, 1, VOCAB)
    torch.testing.assert_close(last[:, 0], full[:, -1], **TOL)


@torch.no_grad()
def test_left_padded_batch_matches_rows_alone(model):
    pads = [0, 5, 2]
    prompt_len, pieces = 11, [1, 3, 1, 5]
    ids = random_ids(3, prompt_len + sum(pieces), seed=3)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    cache = model.new_cache(3, ids.shape[1])
    out = [model(ids[:, :prompt_len], cache, attention_mask=mask[:, :prompt_len])]
    pos = prompt_len
    for size in pieces:
        out.append(model(ids[:, pos : pos + size], cache))
        pos += size
    batched = torch.cat(out, dim=1)
    assert torch.isfinite(batched).all()  # padding positions too: no NaN to leak anywhere
    for row, pad in enumerate(pads):
        alone = model(ids[row : row + 1, pad:])
        torch.testing.assert_close(batched[row, pad:], alone[0], **TOL)
    # the same padded batch without a cache
    uncached = model(ids, attention_mask=mask)
    for row, pad in enumerate(pads):
        torch.testing.assert_close(uncached[row, pad:], batched[row, pad:], **TOL)


def test_padding_queries_always_see_a_key():
    # An all-False row in a boolean SDPA mask gives NaN on some kernels.
    lengths = torch.tensor([0, 0])
    starts = torch.tensor([0, 3])
    ctx = append_context(lengths, starts, 5)
    assert ctx.attn_mask.any(-1).all()
    # ... while real queries still never see padding keys
    assert not ctx.attn_mask[1, 0, 3:, :3].any()


@torch.no_grad()
def test_rollback_per_row_then_continue(model):
    prompt_len, ext_len = 9, 11
    ids = random_ids(3, prompt_len + ext_len, seed=4)
    cache = model.new_cache(3, 40)
    model(ids[:, :prompt_len], cache)
    model(ids[:, prompt_len:], cache, record=True)
    keep = torch.tensor([0, 4, ext_len])  # both ends of the recorded extension and a middle point
    cache.rollback(prompt_len + keep)
    assert cache.lengths.tolist() == (prompt_len + keep).tolist()

    # rows now have different lengths: continue with fresh tokens, one then several at a time
    new = random_ids(3, 6, seed=5)
    cont = torch.cat([model(new[:, :1], cache), model(new[:, 1:], cache)], dim=1)
    for row in range(3):
        kept = ids[row : row + 1, : prompt_len + int(keep[row])]
        fresh = model(torch.cat([kept, new[row : row + 1]], dim=1))[0, -6:]
        torch.testing.assert_close(cont[row], fresh, **TOL)


@torch.no_grad()
def test_rollback_twice_and_with_left_padding(model):
    pads = [3, 0]
    ids = random_ids(2, 20, seed=6)
    mask = torch.ones(2, 8, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    cache = model.new_cache(2, 32)
    model(ids[:, :8], cache, attention_mask=mask)
    model(ids[:, 8:14], cache, record=True)
    cache.rollback(torch.tensor([10, 13]))
    # second round: extend the (now unequal) rows, record, roll back again
    model(ids[:, 14:18], cache, record=True)  # row 0 gets these at slots 10..13, row 1 at 13..16
    cache.rollback(torch.tensor([12, 13]))
    last = model(ids[:, 18:20], cache)
    kept = [
        torch.cat([ids[0, 3:10], ids[0, 14:16], ids[0, 18:20]]),
        torch.cat([ids[1, :13], ids[1, 18:20]]),
    ]
    for row in range(2):
        fresh = model(kept[row][None])[0, -2:]
        torch.testing.assert_close(last[row], fresh, **TOL)


@torch.no_grad()
def test_rollback_outside_recorded_range_raises(model):
    ids = random_ids(2, 12, seed=7)
    cache = model.new_cache(2, 16)
    model(ids[:, :6], cache)
    model(ids[:, 6:], cache, record=True)
    with pytest.raises(ValueError):
        cache.rollback(torch.tensor([12, 13]))  # beyond what is cached
    with pytest.raises(ValueError):
        cache.rollback(torch.tensor([-1, 12]))
    if "mamba" in model.config.layer_types:
        with pytest.raises(ValueError):
            cache.rollback(torch.tensor([5, 12]))  # before the recorded extension
    assert cache.lengths.tolist() == [12, 12]  # a refused rollback changes nothing


@torch.no_grad()
def test_rollback_without_record():
    # Attention-only caches crop without a record; Mamba states cannot.
    ids = random_ids(1, 10, seed=8)
    attn = tiny_backbone(attention_config())
    cache = attn.new_cache(1, 16)
    attn(ids, cache)
    cache.rollback(torch.tensor([4]))
    torch.testing.assert_close(attn(ids[:, 4:6], cache), attn(ids[:, :6])[:, 4:], **TOL)

    hybrid = tiny_backbone(hybrid_config())
    cache = hybrid.new_cache(1, 16)
    hybrid(ids, cache)
    with pytest.raises(ValueError, match="recorded"):
        cache.rollback(torch.tensor([4]))


@torch.no_grad()
def test_out_of_range_token_ids_raise(model):
    for bad in (-1, VOCAB):
        ids = torch.tensor([[1, 2, bad]])
        with pytest.raises(ValueError, match="token ids"):
            model(ids)
        cache = model.new_cache(1, 8)
        with pytest.raises(ValueError, match="token ids"):
            model(ids, cache)
        assert cache.lengths.tolist() == [0]


@torch.no_grad()
def test_cache_overflow_raises(model):
    cache = model.new_cache(1, 8)
    model(random_ids(1, 6, seed=9), cache)
    with pytest.raises(ValueError, match="overflow"):
        model(random_ids(1, 3, seed=10), cache)
    assert cache.lengths.tolist() == [6]
    model(random_ids(1, 2, seed=10), cache)  # exactly full is fine
    with pytest.raises(ValueError, match="exceed"):
        model.new_cache(1, model.config.max_position_embeddings + 1)


@torch.no_grad()
def test_bad_attention_masks_raise(model):
    ids = random_ids(2, 4, seed=11)
    for mask in ([[1, 1, 1, 0], [1, 1, 1, 1]], [[0, 1, 0, 1], [1, 1, 1, 1]], [[0, 0, 0, 0], [1, 1, 1, 1]]):
        mask = torch.tensor(mask)
        with pytest.raises(ValueError):
            model(ids, attention_mask=mask)
        if mask[0].any():  # an empty row is fine on a cache: its tokens may come in a later call
            with pytest.raises(ValueError):
                model(ids, model.new_cache(2, 8), attention_mask=mask)
    empty_first = model.new_cache(2, 8)
    model(ids, empty_first, attention_mask=torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))
    assert empty_first.starts.tolist() == [4, 0]
    with pytest.raises(ValueError, match="does not match"):
        model(ids, attention_mask=torch.ones(2, 3))
    cache = model.new_cache(2, 8)
    model(ids, cache)
    with pytest.raises(ValueError, match="first call"):
        model(ids, cache, attention_mask=torch.ones_like(ids))
    with pytest.raises(ValueError, match="rows"):
        model(ids[:1], cache)
