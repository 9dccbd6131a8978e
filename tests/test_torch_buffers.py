"""DynamicBufferModule: buffers take the checkpoint's shape, keep the module's dtype/device, survive inference mode."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from anomstats_torch import DynamicBufferMixin, DynamicBufferModule  # noqa: E402
from tests.anomalib_oracle import AnomalibDynamicBuffers  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


class Stats(DynamicBufferModule):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("scratch", torch.empty(0), persistent=False)
        self.weight = torch.nn.Parameter(torch.zeros(2))


class BufferOnly(DynamicBufferModule):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.empty(0))


class Parent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gaussian = Stats()


def test_alias_is_the_same_class():
    assert DynamicBufferMixin is DynamicBufferModule


def test_plain_module_refuses_but_dynamic_module_loads_the_checkpoint_shape():
    state = {"mean": torch.arange(6.0).reshape(2, 3), "weight": torch.ones(2)}
    plain = torch.nn.Module()
    plain.register_buffer("mean", torch.empty(0))
    plain.weight = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(RuntimeError, match="size mismatch"):
        plain.load_state_dict(state)
    module = Stats()
    module.load_state_dict(state)
    torch.testing.assert_close(module.mean, state["mean"], rtol=0, atol=0)  # a copy: exact (bound 0)
    assert module.scratch.shape == (0,)  # non-persistent buffers are not touched


@pytest.mark.parametrize("device", DEVICES)
def test_module_keeps_its_dtype_and_device_and_values_are_cast(device):
    module = Stats().to(device=device, dtype=torch.float64)
    incoming = torch.tensor([[1.5, 2.25]], dtype=torch.float32)
    module.load_state_dict({"mean": incoming, "weight": torch.ones(2)})
    assert module.mean.dtype == torch.float64 and module.mean.device.type == device
    assert module.mean.tolist() == [[1.5, 2.25]]
    assert incoming.tolist() == [[1.5, 2.25]] and incoming.dtype == torch.float32  # input untouched


def test_nested_prefix_and_missing_keys():
    parent = Parent()
    parent.load_state_dict({"gaussian.mean": torch.ones(4, 5), "gaussian.weight": torch.ones(2)})
    assert parent.gaussian.mean.shape == (4, 5)
    fresh = Parent()
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({"gaussian.weight": torch.ones(2)})
    fresh.load_state_dict({"gaussian.weight": torch.ones(2)}, strict=False)
    assert fresh.gaussian.mean.shape == (0,)  # missing entries are left alone


def test_parameters_are_never_resized():
    with pytest.raises(RuntimeError, match="size mismatch"):
        Stats().load_state_dict({"mean": torch.ones(3), "weight": torch.ones(5)})


def test_buffers_created_under_inference_mode_still_load():
    with torch.inference_mode():
        module = BufferOnly()
        module.mean = torch.ones(2, 2)
        reference = AnomalibDynamicBuffers()
        reference.register_buffer("mean", torch.empty(0))
    state = {"mean": torch.full((3, 3), 7.0)}
    # anomalib's in-place resize fails here ...
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        reference.load_state_dict({"mean": state["mean"]})
    # ... replacing the buffer works, for a new shape and for the same shape
    module.load_state_dict(state)
    assert module.mean.tolist() == [[7.0] * 3] * 3
    with torch.inference_mode():
        module.mean = torch.zeros(3, 3)
    module.load_state_dict(state)
    assert module.mean.tolist() == [[7.0] * 3] * 3


def test_get_tensor_attribute():
    module = Stats()
    assert module.get_tensor_attribute("mean") is module.mean
    module.label = "x"
    with pytest.raises(ValueError, match="'label'.*not a torch.Tensor"):
        module.get_tensor_attribute("label")
