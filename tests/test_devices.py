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
