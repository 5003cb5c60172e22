"""The prepacked CPU Linear: same numbers as F.linear, never stale, never in autograd's way."""

import pytest
import torch
import torch.nn.functional as F

from twotower.model.linear import Linear, packed_bytes, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="oneDNN packing not available in this torch build")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(1, 1, 48), (2, 16, 48), (5, 48)])
def test_packed_matches_plain(dtype, tol, shape):
    if not packing_available(dtype):
        pytest.skip(f"this CPU has no oneDNN {dtype} kernels")
    torch.manual_seed(0)
    lin = Linear(48, 40, bias=True).to(dtype)
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        got = lin(x)
    assert packed_bytes(lin)  # the packed path ran
    ref = F.linear(x, lin.weight, lin.bias)
    assert got.shape == ref.shape
    assert torch.allclose(got.float(), ref.float(), atol=tol, rtol=tol)


def test_repacks_after_in_place_change_and_cast():
    torch.manual_seed(0)
    lin = Linear(16, 8, bias=False)
    x = torch.randn(1, 16)
    with torch.no_grad():
        first = lin(x)
        lin.weight.mul_(2)
        assert torch.allclose(lin(x), 2 * first, atol=1e-5)
        lin.load_state_dict({"weight": torch.zeros(8, 16)})
        assert torch.equal(lin(x), torch.zeros(1, 8))
        lin.to(torch.bfloat16)
        assert lin(x.bfloat16()).dtype == torch.bfloat16


def test_bf16_without_cpu_support_takes_the_plain_path(monkeypatch):
    # CPUs without avx512bw/vl/dq or avx_ne_convert: oneDNN's bf16 reorder raises there, so bf16
    # must fall back to F.linear (which runs everywhere) while fp32 keeps its packed path
    import twotower.model.linear as linear

    monkeypatch.setattr(linear, "packing_available", lambda dtype=torch.float32: dtype == torch.float32)
    reorder = torch.ops.mkldnn._reorder_linear_weight

    def reorder_like_an_avx2_cpu(w, hint):
        if w.dtype == torch.bfloat16:
            raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx512bw")
        return reorder(w, hint)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", reorder_like_an_avx2_cpu)
    torch.manual_seed(0)
    lin = Linear(16, 8).bfloat16()
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    assert not packed_bytes(lin)


def test_autograd_uses_the_plain_path():
    torch.manual_seed(0)
    lin = Linear(16, 8)
    x = torch.randn(3, 16, requires_grad=True)
    lin(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
    lin.requires_grad_(False)
    x.grad = None
    lin(x).square().sum().backward()  # frozen weight, input needing grad (LoRA base layers)
    assert x.grad is not None


def test_copy_after_packing():
    import copy

    lin = Linear(16, 8)
    with torch.no_grad():
        ref = lin(torch.ones(1, 16))
    twin = copy.deepcopy(lin)  # the oneDNN copy cannot be deep-copied: it must be dropped
    with torch.no_grad():
        assert torch.equal(twin(torch.ones(1, 16)), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inner, outer", [(576, 1536), (1536, 576)])
def test_a_row_does_not_depend_on_its_batch_mates(dtype, inner, outer):
    """What exact decoding rests on: a row's product is bitwise the same alone, among 1 to 63
    other rows, and wherever it sits, for an inner dim below and above the width at which
    oneDNN's one-row kernel differed on AVX512 (the packed fp32 path; bf16 takes whichever path
    this CPU has)."""
    torch.manual_seed(0)
    lin = Linear(inner, outer, bias=False).to(dtype)
    x = torch.randn(64, inner).to(dtype)
    with torch.no_grad():
        # every row alone == the same row among 64 (on AVX512, oneDNN's one-row kernel for a
        # 1536-wide input differed in the last bits from its several-row one, fp32 and bf16)
        batch = lin(x)
        assert all(torch.equal(lin(x[i:i + 1])[0], batch[i]) for i in range(64))
        alone = lin(x[:1])
        for rows in (2, 3, 5, 8, 16, 17, 64):
            assert torch.equal(lin(x[:rows])[:1], alone), rows
        for at in (1, 4, 7):
            assert torch.equal(lin(torch.cat([x[1:1 + at], x[:1]]))[at:at + 1], alone), at


@pytest.mark.parametrize("lone_row_kernel_differs", [False, True])
def test_a_lone_row_is_paired_only_where_its_kernel_differs(monkeypatch, lone_row_kernel_differs):
    """Exact inference pairs a lone row with a zero row only where the probe finds that oneDNN's
    one-row kernel gives other bits than its several-row one (AVX512 CPUs): the pairing costs a
    pad and a two-row kernel per product. The probe runs once per shape; --no-exact
    (set_exact(False)) never pairs."""
    from tiny_models import attention_config, tiny_backbone

    import twotower.model.linear as linear

    monkeypatch.setattr(linear, "_LONE_ROW_EXACT", {})
    seen = []
    real = torch.ops.mkldnn._linear_pointwise

    def kernel(x, *a):  # like an AVX512 CPU where asked: one row rounds otherwise than several
        seen.append(x.shape[0])
        y = real(x, *a)
        return y * (1 + 2**-20) if lone_row_kernel_differs and x.shape[0] == 1 else y

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", kernel)
    model = tiny_backbone(attention_config())
    x = torch.randn(8, model.config.hidden_size)
    with torch.no_grad():
        for exact in (True, False):
            model.set_exact(exact)
            assert all(m.exact is exact for m in model.modules() if isinstance(m, Linear))
            model.lm_head(x[:1])  # the probe, where exact
            seen.clear()
            alone = model.lm_head(x[:1])
            assert seen == [2 if exact and lone_row_kernel_differs else 1]
            if exact:
                assert torch.equal(alone, model.lm_head(x)[:1])  # exact either way
        assert len(linear._LONE_ROW_EXACT) == 1  # one probe for the one shape
        assert list(linear._LONE_ROW_EXACT.values()) == [not lone_row_kernel_differs]
