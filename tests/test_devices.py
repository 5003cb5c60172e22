import pytest
import torch

from twotower.model.devices import resolve_device


def test_cpu_is_always_there():
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_missing_gpu_is_a_clear_error(name):
    with pytest.raises(ValueError, match="not available"):
        resolve_device(name)


def test_nonsense_device_is_a_clear_error():
    with pytest.raises(ValueError, match="invalid device"):
        resolve_device("warp-drive")


@pytest.mark.parametrize("kernels", [True, False])
def test_bf16_on_a_cpu_without_bf16_kernels_is_flagged_once(monkeypatch, caplog, kernels):
    import twotower.model.devices as devices

    monkeypatch.setattr(devices, "packing_available", lambda dtype=torch.float32: kernels or dtype == torch.float32)
    devices.warn_if_slow.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="twotower.model.devices"):
            for _ in range(2):
                devices.warn_if_slow(torch.bfloat16, "cpu")
                devices.warn_if_slow(torch.float32, "cpu")
                devices.warn_if_slow(torch.bfloat16, "cuda")
    finally:
        devices.warn_if_slow.cache_clear()
    flagged = [r for r in caplog.records if "no oneDNN bf16 kernels" in r.getMessage()]
    assert len(flagged) == (0 if kernels else 1)
