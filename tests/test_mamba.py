"""Mamba-2: the SSD chunked scan, the all-states scan and the recurrent step agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import VOCAB, hybrid_config, tiny_backbone

from twotower.model import MambaConfig
from twotower.model.mamba2 import segsum, ssd_all_states, ssd_chunk_scan, ssm_step

HEADS, HEAD_DIM, STATE = 3, 4, 5


def random_ssm_inputs(batch: int, length: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, HEADS, HEAD_DIM, generator=gen)
    # log decays between about -3 and 0: some heads forget fast, some barely
    a = -F.softplus(torch.randn(batch, length, HEADS, generator=gen)) * 2
    B = torch.randn(batch, length, HEADS, STATE, generator=gen)
    C = torch.randn(batch, length, HEADS, STATE, generator=gen)
    h0 = torch.randn(batch, HEADS, HEAD_DIM, STATE, generator=gen)
    return x, a, B, C, h0


def sequential(x, a, B, C, h0):
    """The recurrence token by token: outputs (b, l, h, p) and the state after every token."""
    state, ys, states = h0, [], []
    for t in range(x.shape[1]):
        y, state = ssm_step(state, x[:, t], a[:, t], B[:, t], C[:, t])
        ys.append(y)
        states.append(state)
    return torch.stack(ys, 1), torch.stack(states, 1)


def test_ssm_step_is_the_recurrence():
    # One explicit step, written out per element, so the reference itself is checked.
    x, a, B, C, h0 = random_ssm_inputs(1, 1)
    y, state = ssm_step(h0, x[:, 0], a[:, 0], B[:, 0], C[:, 0])
    h, p, n = 1, 2, 3
    expected = torch.exp(a[0, 0, h]) * h0[0, h, p, n] + x[0, 0, h, p] * B[0, 0, h, n]
    assert torch.allclose(state[0, h, p, n], expected)
    assert torch.allclose(y[0, h, p], (state[0, h, p] * C[0, 0, h]).sum())


def test_segsum_matches_naive_sums():
    x = torch.randn(2, 6)
    out = segsum(x)
    for i in range(6):
        for j in range(6):
            if j <= i:
                assert torch.allclose(out[:, i, j], x[:, j + 1 : i + 1].sum(-1), atol=1e-6)
            else:
                assert torch.isinf(out[:, i, j]).all() and (out[:, i, j] < 0).all()


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 8, 16, 64])
@pytest.mark.parametrize("length", [1, 7, 13, 24])
def test_chunk_scan_with_initial_state_matches_step_loop(chunk_size, length):
    x, a, B, C, h0 = random_ssm_inputs(2, length, seed=length)
    y_ref, states_ref = sequential(x, a, B, C, h0)
    y, final = ssd_chunk_scan(x, a, B, C, chunk_size, initial_state=h0)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, states_ref[:, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk_size", [3, 8])
def test_chunk_scan_without_initial_state_starts_from_zero(chunk_size):
    x, a, B, C, h0 = random_ssm_inputs(2, 11)
    y_ref, states_ref = sequential(x, a, B, C, torch.zeros_like(h0))
    y, final = ssd_chunk_scan(x, a, B, C, chunk_size)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, states_ref[:, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("length", [1, 5, 12])
def test_all_states_match_step_loop(length):
    x, a, B, C, h0 = random_ssm_inputs(2, length, seed=100 + length)
    _, states_ref = sequential(x, a, B, C, h0)
    states = ssd_all_states(x, a, B, h0)
    assert states.shape == (2, length, HEADS, HEAD_DIM, STATE)
    torch.testing.assert_close(states, states_ref, rtol=1e-4, atol=1e-4)


def test_initial_state_matters():
    # Guards the tests above against an ignored initial state (it must change the outputs).
    x, a, B, C, h0 = random_ssm_inputs(1, 9)
    y_with, _ = ssd_chunk_scan(x, a, B, C, 4, initial_state=h0)
    y_without, _ = ssd_chunk_scan(x, a, B, C, 4)
    assert (y_with - y_without).abs().max() > 1e-2


@torch.no_grad()
def test_backbone_logits_do_not_depend_on_chunk_size():
    ids = torch.randint(0, VOCAB, (2, 29), generator=torch.Generator().manual_seed(0))
    logits = []
    for chunk in (4, 8, 64):
        cfg = hybrid_config(
            mamba=MambaConfig(num_heads=4, head_dim=16, state_size=16, n_groups=2, chunk_size=chunk, dt_min=0.001)
        )
        logits.append(tiny_backbone(cfg, seed=3)(ids))
    for other in logits[1:]:
        torch.testing.assert_close(other, logits[0], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_recorded_extension_gives_the_same_logits():
    # record=True computes every per-token state instead of the chunked scan: same outputs.
    model = tiny_backbone(hybrid_config(), seed=4)
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(1))
    plain, recorded = model.new_cache(2, 32), model.new_cache(2, 32)
    model(ids[:, :6], plain)
    model(ids[:, :6], recorded)
    a = model(ids[:, 6:], plain)
    b = model(ids[:, 6:], recorded, record=True)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    for p, r in zip(plain.layers, recorded.layers):
        if hasattr(p, "ssm"):
            torch.testing.assert_close(r.ssm, p.ssm, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(r.conv, p.conv)


@torch.no_grad()
def test_left_padding_does_not_leak_into_mamba_state_with_projection_bias():
    # With a bias on in_proj, zeroing the hidden states at padding is not enough: the conv
    # inputs there must be zero too, or the first real tokens of a padded row see the bias.
    cfg = hybrid_config(
        mamba=MambaConfig(
            num_heads=4, head_dim=16, state_size=16, n_groups=2, chunk_size=8, use_bias=True, dt_min=0.001
        )
    )
    model = tiny_backbone(cfg, seed=5)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    padded = model(ids, attention_mask=mask)
    alone = model(ids[:1, 5:])
    torch.testing.assert_close(padded[0, 5:], alone[0], rtol=1e-4, atol=1e-4)
