"""anomstats_torch.GaussianKDE keeps the training side of its kernel sums between calls (issue 12).

The centred, augmented training operand costs O(N·D) per call to build; the module keeps it and reuses it
only while the buffers are the same tensors with the same version counters. Each test changes the buffers in
one of the ways a user can (in place, reassignment, load, move, pickling) and checks that the next call gives
what a module built afresh from the changed buffers gives, bit for bit: both run the same kernels on the same
operands (no tolerance is involved, so a stale operand cannot hide behind one).
"""

from __future__ import annotations

import copy
import pickle

import pytest

torch = pytest.importorskip("torch")

from anomstats_torch import GaussianKDE  # noqa: E402


def _module(seed: int, dtype=torch.float32, n: int = 400, d: int = 5) -> GaussianKDE:
    g = torch.Generator().manual_seed(seed)
    return GaussianKDE(torch.randn(n, d, generator=g, dtype=dtype))


def _queries(dtype=torch.float32, d: int = 5) -> torch.Tensor:
    return torch.randn(37, d, generator=torch.Generator().manual_seed(99), dtype=dtype) * 1.3


def _loaded(state: dict[str, torch.Tensor]) -> GaussianKDE:
    fresh = GaussianKDE()
    fresh.load_state_dict({k: v.clone() for k, v in state.items()})
    return fresh


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_repeated_calls_reuse_the_operand_and_agree(dtype):
    module = _module(0, dtype)
    q = _queries(dtype)
    first = module(q)
    kept = module._kept_training
    assert kept is not None
    torch.testing.assert_close(module(q), first, rtol=0, atol=0)
    assert module._kept_training is kept  # the same object: reused, not rebuilt


def test_in_place_change_of_a_buffer_is_seen():
    module = _loaded(_module(1).state_dict())  # loaded: the operand comes from the dataset buffer
    q = _queries()
    before = module(q)
    with torch.no_grad():
        module.dataset.mul_(1.25)  # bumps the version counter
    changed = _loaded(module.state_dict())
    after = module(q)
    torch.testing.assert_close(after, changed(q), rtol=0, atol=0)
    assert not torch.equal(after, before)


def test_reassigned_and_loaded_buffers_are_seen():
    module = _module(2)
    other = _module(3)
    q = _queries()
    module(q)
    module.load_state_dict(other.state_dict())
    torch.testing.assert_close(module(q), _loaded(other.state_dict())(q), rtol=0, atol=0)
    # A new tensor under the same name (not through load_state_dict): the identity check sees it.
    third = _module(4)
    module.dataset = third.dataset.clone()
    module.bw_transform = third.bw_transform.clone()
    module.norm = third.norm.clone()
    torch.testing.assert_close(module(q), _loaded(third.state_dict())(q), rtol=0, atol=0)


def test_refit_and_dtype_move_are_seen():
    module = _module(5)
    q = _queries()
    module(q)
    g = torch.Generator().manual_seed(6)
    data = torch.randn(300, 5, generator=g)
    module.fit(data)
    assert module._kept_training is None  # dropped with the old buffers
    torch.testing.assert_close(module(q), GaussianKDE(data)(q), rtol=0, atol=0)
    module.double()
    assert module._kept_training is None
    q64 = q.double()
    reference = GaussianKDE(data).double()
    torch.testing.assert_close(module(q64), reference(q64), rtol=0, atol=0)


def test_copies_and_pickles_leave_the_operand_behind():
    module = _module(7)
    q = _queries()
    expected = module(q)
    assert module._kept_training is not None
    twin = copy.deepcopy(module)
    assert twin._kept_training is None
    torch.testing.assert_close(twin(q), expected, rtol=0, atol=0)
    restored = pickle.loads(pickle.dumps(module))
    assert restored._kept_training is None
    torch.testing.assert_close(restored(q), expected, rtol=0, atol=0)
    assert module._kept_training is not None  # pickling did not change the original


def test_inference_mode_buffers_are_never_kept():
    g = torch.Generator().manual_seed(8)
    with torch.inference_mode():
        module = GaussianKDE(torch.randn(300, 5, generator=g))  # inference tensors: no version counter
        q = _queries()
        first = module(q)
        assert module._kept_training is None
        torch.testing.assert_close(module(q), first, rtol=0, atol=0)


def test_gradient_calls_build_in_the_graph_and_keep_nothing():
    module = _module(9, torch.float64)
    q = _queries(torch.float64).requires_grad_(True)
    module.log_prob(q).sum().backward()
    assert module._kept_training is None
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_data_assignment_is_seen_though_it_keeps_the_version_counter():
    module = _loaded(_module(10).state_dict())
    q = _queries()
    module(q)
    other = _module(11, n=250)  # another N too: a stale operand would also have the wrong size
    module.dataset.data = other.dataset.clone()  # swaps the storage, keeps the tensor and its version
    module.bw_transform.data = other.bw_transform.clone()
    module.norm.data = other.norm.clone()
    torch.testing.assert_close(module(q), _loaded(other.state_dict())(q), rtol=0, atol=0)


def test_modules_pickled_before_the_operand_was_kept_still_run():
    module = _module(12)
    q = _queries()
    expected = module(q)
    state = module.__getstate__()
    del state["_kept_training"]  # what an older version's pickle holds
    old = GaussianKDE.__new__(GaussianKDE)
    old.__setstate__(state)
    torch.testing.assert_close(old(q), expected, rtol=0, atol=0)
