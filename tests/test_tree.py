"""Verified tree drafts (issue 17): the context tower checks a tree of the drafter's likeliest
continuations in one pass. Each node's logits are bitwise those of its path run as a sequence,
in fp32 and bf16; exact attention gives every query what it gets over its own keys alone,
whatever masks share the pass; tree decoding is AR's output (greedy, and with sampling the
same draws as generate_ar), leaves an exact cache, and accepts past the chain where an
off-chain node holds."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from test_decoding import NO_EOS, PROMPTS, assert_cache_is_fresh
from test_twotower import PERTURB, two_tower

from twotower.errors import UsageError
from twotower.generate import generate_ar, generate_mask_diffusion, resolve_settings
from twotower.generate.tree import draft_tree, walk
from twotower.model import exact, exact_sdpa
from twotower.model.twotower import TwoTower

DTYPES = [torch.float32, torch.bfloat16]
KINDS = ("attention", "moe_attention")  # attention-only: Mamba-2 states do not branch
TREE = dict(verify=True, steps_per_block=1, **NO_EOS)


def model_of(kind: str, dtype=torch.float32, perturb: float = PERTURB) -> TwoTower:
    overrides = {"layer_types": ["attention", "moe"] * 2} if kind == "moe_attention" else None
    return two_tower("moe" if kind == "moe_attention" else "attention", "lora", perturb=perturb,
                     backbone_overrides=overrides).to(dtype)


def test_the_tree_is_the_likeliest_continuations_best_first():
    """Against brute force over every path of the top candidates: the chosen nodes are the
    top-N paths by summed log-probability, parents before children, the likeliest path first,
    siblings with distinct tokens."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=gen) * 2
    for nodes in (1, 4, 9):
        tree = draft_tree(logits, nodes)
        lp = logits.log_softmax(-1)
        for b in range(2):
            ranked = lp[b].sort(-1, descending=True)
            paths = [p for d in range(1, 4) for p in itertools.product(range(min(nodes, 7)), repeat=d)]
            score = {p: sum(float(ranked.values[i, r]) for i, r in enumerate(p)) for p in paths}
            best = sorted(score.values(), reverse=True)[nodes - 1]
            chosen = tree.ranks[b]
            assert len(chosen) == nodes and all(score[p] >= best - 1e-6 for p in chosen)
            chain = [p for p in chosen if not any(p)]
            assert chosen[: len(chain)] == chain  # the likeliest path first
            for i, p in enumerate(chosen):
                parent = int(tree.parents[b, i])
                assert (parent == 0) == (len(p) == 1)
                assert parent == 0 or chosen[parent - 1] == p[:-1]  # parents come first
                assert int(tree.tokens[b, i]) == int(ranked.indices[len(p) - 1, p[-1]])
                assert int(tree.depths[b, i]) == len(p)
            assert len(set(zip(tree.parents[b].tolist(), tree.tokens[b].tolist()))) == nodes


def test_the_walk_goes_down_while_the_pick_is_a_child():
    tree = draft_tree(torch.tensor([[[0.0, 5, 4, 0], [0, 0, 5, 4]]]), 4)  # nodes: 1, 2, 1>2, 1>3 (or so)
    children = tree.children(0)
    node_1 = children[(0, 1)]
    node_12 = children[(node_1, 2)]
    picks = {0: 1, node_1: 2, node_12: 3}
    tokens, rows = walk(tree, 0, picks.__getitem__)
    assert tokens == [1, 2, 3] and rows == [0, node_1, node_12]
    assert walk(tree, 0, lambda r: 3) == ([3], [0])  # the first pick is no child: AR's token alone


def exact_attention(kind: str, head_dim: int, group: int):
    """One of the two exact attentions: ``chunked`` (model/exact.py) or ``sdpa``
    (model/exact_sdpa.py, where this CPU passes its probe)."""
    if kind == "chunked":
        return exact.attention
    rows = exact_sdpa.row_multiple(torch.device("cpu"), head_dim, group)
    if not rows:
        pytest.skip(f"SDPA's CPU kernel failed exact_sdpa's probe here (head_dim {head_dim}, group {group})")
    return functools.partial(exact_sdpa.attention, rows=rows)


def _own_keys_alone(attention, q, k, v, mask, length):
    """Each query over exactly the keys it sees, in key order, alone (the reference)."""
    b, hq, t, d = q.shape
    out = torch.empty_like(q)
    for r in range(b):
        for i in range(t):
            seen = mask[min(r, mask.shape[0] - 1), 0, i, :length].nonzero()[:, 0]
            out[r, :, i : i + 1] = attention(q[r : r + 1, :, i : i + 1], k[r : r + 1, :, seen], v[r : r + 1, :, seen],
                                             None)
    return out


def _trees_after_prefixes(dtype, gen):
    """(q, k, v, mask, length) of trees after long and short prefixes, left padding, rows of
    different lengths; keys past ``length`` are padding."""
    for prefix, t, b in ((150, 6, 2), (10, 5, 1), (70, 9, 3), (200, 1, 2), (530, 4, 2)):
        length = prefix + t
        q, k, v = (torch.randn(b, n, m, 16, generator=gen).to(dtype) for n, m in ((4, t), (2, length + 7), (2, length + 7)))
        keys = torch.arange(length)
        starts = torch.randint(0, 20, (b,), generator=gen)
        mask = ((keys >= starts[:, None, None]) & (keys < prefix)).expand(b, t, length).clone()
        for r in range(b):
            parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, t)]
            for i in range(t):
                j = i
                while j >= 0:
                    mask[r, i, prefix + j] = True
                    j = parents[j]
        yield q, k, v, mask[:, None], length


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["chunked", "sdpa"])
def test_exact_attention_gives_each_query_its_keys_alone(kind, dtype):
    """Trees after long and short prefixes (one past a block of SDPA's key split), left padding,
    rows of different lengths: every query's output is bitwise what it gets over its own keys
    alone (in key order), whichever of them are read in place and whichever compacted."""
    attention = exact_attention(kind, 16, 2)
    for q, k, v, mask, length in _trees_after_prefixes(dtype, torch.Generator().manual_seed(1)):
        got = attention(q, k, v, mask, length=length)
        assert torch.equal(got, _own_keys_alone(attention, q, k, v, mask, length)), (q.shape, length)
        assert torch.equal(attention(q, k, v, mask, length=length, layout=exact.key_layout(mask)), got)


@pytest.mark.parametrize("kind", ["chunked", "sdpa"])
def test_exact_attention_is_attention(kind):
    """Both exact attentions compute softmax(q k^T / sqrt(d)) v over each query's keys (fp64
    reference), in order and out of order."""
    attention = exact_attention(kind, 16, 2)
    for q, k, v, mask, length in _trees_after_prefixes(torch.float32, torch.Generator().manual_seed(2)):
        scores = q.double() @ k[:, :, :length].double().repeat_interleave(2, 1).transpose(-1, -2) / 4.0
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        expected = weights @ v[:, :, :length].double().repeat_interleave(2, 1)
        torch.testing.assert_close(attention(q, k, v, mask, length=length).double(), expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_tree_pass_gives_each_node_its_paths_logits(kind, dtype):
    """Rows of different lengths (one past a whole chunk of keys), a tree per row: each node's
    logits are bitwise the context tower's over that node's path appended as a sequence."""
    context = model_of(kind, dtype).context
    prompts = [list(range(3, 73)), [5, 9, 17, 33]]
    tokens = torch.tensor([[11, 20, 21, 30, 31, 40], [12, 22, 23, 24, 25, 26]])
    parents = [[-1, 0, 0, 1, 2, 3], [-1, 0, 1, 2, 1, 0]]
    tree = torch.zeros(2, 6, 6, dtype=torch.bool)
    for r, row in enumerate(parents):
        for i in range(6):
            j = i
            while j >= 0:
                tree[r, i, j] = True
                j = row[j]
    width = max(map(len, prompts))
    ids = torch.zeros(2, width, dtype=torch.long)
    valid = torch.zeros(2, width, dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], valid[r, width - len(p):] = torch.tensor(p), True
    with torch.inference_mode():
        cache = context.new_cache(2, width + 8)
        context(ids, cache, attention_mask=valid)
        got = context(tokens, cache, tree=tree)
        for r, p in enumerate(prompts):
            for i in range(6):
                path = [j for j in range(6) if tree[r, i, j]]
                alone = context.new_cache(1, len(p) + 6)
                context(torch.tensor([p]), alone)
                want = context(tokens[r : r + 1, path], alone)[0, -1]
                assert torch.equal(got[r, i], want), (r, i)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("perturb", [0.0, PERTURB], ids=["untrained", "perturbed"])
def test_tree_decoding_is_ar_greedy(kind, dtype, perturb):
    model = model_of(kind, dtype, perturb)
    ar = generate_ar(model.context, PROMPTS, max_new_tokens=14, **NO_EOS).tokens
    for nodes in (1, 3, 7):
        out = generate_mask_diffusion(model, PROMPTS, max_new_tokens=14, tree_nodes=nodes, return_cache=True, **TREE)
        assert out.tokens == ar, nodes
        assert out.stats.nfe == out.stats.context_passes and all(d == [nodes] * len(d) for d in out.stats.drafted)
        assert_cache_is_fresh(model, PROMPTS, out)
        alone = [generate_mask_diffusion(model, p, max_new_tokens=14, tree_nodes=nodes, **TREE).tokens[0]
                 for p in PROMPTS]
        assert alone == ar  # batch invariant


@pytest.mark.parametrize("kind", KINDS)
def test_tree_sampling_draws_what_ar_draws(kind):
    """One draw per emitted token from the row's own stream, as generate_ar draws: the same
    seed gives the same tokens, alone and in a batch."""
    model = model_of(kind)
    sampling = dict(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7, **NO_EOS)
    ar = generate_ar(model.context, PROMPTS, **sampling).tokens
    out = generate_mask_diffusion(model, PROMPTS, tree_nodes=5, verify=True, steps_per_block=1, **sampling)
    assert out.tokens == ar
    assert len(set(map(tuple, ar))) > 1


def _oracle(model: TwoTower, sequences: list[list[int]], wrong: set[int]):
    """A drafter that knows AR's continuation: at a position in ``wrong`` its first choice is
    another token and the true one comes second."""
    vocab = model.context.config.vocab_size

    def denoise_block(block_ids, t, cache):
        logits = torch.zeros(*block_ids.shape, vocab)
        for r, seq in enumerate(sequences):
            anchor = int(cache.lengths[r] - cache.starts[r])  # the block's first input is seq[anchor]
            for i in range(block_ids.shape[1]):
                pos = anchor + 1 + i
                token = seq[pos] if pos < len(seq) else 0
                if pos in wrong:
                    logits[r, i, (token + 1) % vocab], logits[r, i, token] = 10.0, 9.0
                else:
                    logits[r, i, token] = 10.0
        return logits

    return denoise_block


@pytest.mark.parametrize("kind", KINDS)
def test_an_off_chain_node_is_accepted_where_the_chain_fails(kind, monkeypatch):
    """With the true token second at some positions, the chain stops there and the tree goes on
    through the second choice: fewer checks for the same (AR's) tokens, and an exact cache."""
    model = model_of(kind)
    n = 20
    ar = generate_ar(model.context, PROMPTS, max_new_tokens=n, **NO_EOS).tokens
    sequences = [p + a for p, a in zip(PROMPTS, ar)]
    wrong = {pos for pos in range(60) if pos % 5 == 2}
    monkeypatch.setattr(model, "denoise_block", _oracle(model, sequences, wrong))
    chain = generate_mask_diffusion(model, PROMPTS, max_new_tokens=n, block_size=4, **TREE)
    tree = generate_mask_diffusion(model, PROMPTS, max_new_tokens=n, block_size=4, tree_nodes=8, return_cache=True,
                                   **TREE)
    assert chain.tokens == tree.tokens == ar
    assert tree.stats.context_passes < chain.stats.context_passes
    assert any(a == 5 for row in tree.stats.accepted for a in row)  # a whole block through an off-chain node
    assert_cache_is_fresh(model, PROMPTS, tree)


def test_trees_need_verified_unfused_drafts_on_an_attention_only_model():
    with pytest.raises(UsageError, match="attention-only"):
        generate_mask_diffusion(two_tower("hybrid", "lora"), PROMPTS[:1], max_new_tokens=4, tree_nodes=3, **TREE)
    model = model_of("attention")
    with pytest.raises(UsageError, match="verify=True"):
        generate_mask_diffusion(model, PROMPTS[:1], max_new_tokens=4, tree_nodes=3)
    with pytest.raises(UsageError, match="fused=False"):
        generate_mask_diffusion(model, PROMPTS[:1], max_new_tokens=4, tree_nodes=3, fused=True, **TREE)
    with pytest.raises(UsageError, match="tree_nodes must be"):
        generate_mask_diffusion(model, PROMPTS[:1], max_new_tokens=4, tree_nodes=-1, **TREE)


def test_the_settings_rule_for_trees():
    """A tree given alone is verified whole-block drafts (or replaces a preset's tree); one
    that contradicts the dial given is an error."""
    preset = {"verify": True, "steps_per_block": 1, "block_size": 4, "commit_rule": "left_prefix"}
    assert resolve_settings(preset, tree_nodes=6).tree_nodes == 6
    assert resolve_settings({**preset, "tree_nodes": 5}).tree_nodes == 5
    assert resolve_settings({**preset, "tree_nodes": 5}, tree_nodes=0).tree_nodes == 0
    alone = resolve_settings({}, tree_nodes=4)
    assert (alone.verify, alone.steps_per_block, alone.strategy) == (True, 1, "verified")
    assert "tree" in alone.describe(16) and "tree=4" in alone.label(16)
    with pytest.raises(UsageError, match="whole-block"):
        resolve_settings({}, tree_nodes=4, steps_per_block=2)
    with pytest.raises(UsageError, match="whole-block"):
        resolve_settings({}, tree_nodes=4, verify=False)
    with pytest.raises(UsageError, match="not used by mode ar"):
        resolve_settings({}, mode="ar", tree_nodes=4)
    assert math.isclose(resolve_settings(preset).tree_nodes, 0)
