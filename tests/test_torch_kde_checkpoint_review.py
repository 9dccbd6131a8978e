"""The KDE's checkpoint checks in the buffers' dtype, its non-plain entries, and float32 fits beyond range.

Complements tests/test_faults_review_kde.py (sections 9-11) with the messages: the refusals name the entry or
the scale and say what to do.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from anomstats_torch import GaussianKDE  # noqa: E402


def _float64_state():
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return {k: v.clone() for k, v in GaussianKDE(x).state_dict().items()}


@pytest.mark.parametrize("key, factor", [("dataset", 1e300), ("bw_transform", 1e300), ("bw_transform", 1e-300)])
def test_a_float64_checkpoint_beyond_float32_is_refused_naming_the_entry_and_the_cast(key, factor):
    state = _float64_state()
    state[key] = state[key] * factor
    module = GaussianKDE()
    with pytest.raises(RuntimeError, match="inconsistent buffers") as error:
        module.load_state_dict(state)
    assert key in str(error.value) and ".double()" in str(error.value)
    assert module.bw_transform.numel() == 0  # nothing loaded
    module.double().load_state_dict(state)  # the remedy: a float64 module holds them
    assert module.bw_transform.dtype == torch.float64


def test_an_overflowed_norm_still_loads_and_the_densities_derive_it():
    state = _float64_state()
    reference = GaussianKDE().double()
    reference.load_state_dict(state)
    state["norm"] = torch.tensor(1e300, dtype=torch.float64)  # inf in float32: allowed, derived from bw_transform
    module = GaussianKDE()
    module.load_state_dict(state)
    assert math.isinf(float(module.norm))
    q = torch.zeros(2, 3, dtype=torch.float64)
    # Bound: float32 storage and evaluation, a few eps32 relative on log-densities of order 1.
    torch.testing.assert_close(module.log_prob(q.float()).double(), reference.log_prob(q), rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.complex128, torch.bool])
@pytest.mark.parametrize("key", ["bw_transform", "dataset", "norm"])
def test_non_real_entries_are_refused_naming_the_entry(key, dtype):
    state = _float64_state()
    state[key] = state[key].to(dtype)
    with pytest.raises(RuntimeError, match=f"{key} has dtype {dtype}, not a real number type"):
        GaussianKDE().double().load_state_dict(state)


def test_a_sparse_entry_with_bad_values_is_refused_by_the_consistency_check():
    state = _float64_state()
    state["bw_transform"] = (-state["bw_transform"]).to_sparse()
    with pytest.raises(RuntimeError, match="inconsistent buffers: bw_transform must be finite with a positive diagonal"):
        GaussianKDE().double().load_state_dict(state)


@pytest.mark.parametrize("h, fault", [(1e100, "underflow a float32 precision"), (1e-80, "overflow a float32 precision")])
def test_a_float32_fit_beyond_range_is_refused_naming_the_scale_and_the_remedy(h, fault):
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    module = GaussianKDE(kernel_covariance=np.eye(2) * h)
    with pytest.raises(ValueError, match="features of scale") as error:
        module.fit(x)
    text = str(error.value)
    assert fault in text and f"{math.sqrt(h):.1e}" in text and "module.double()" in text
    assert module.bw_transform.numel() == 0  # the buffers are left as they were
    # The remedy: in float64 the same fit is representable and scores.
    kde = GaussianKDE(x.double(), kernel_covariance=np.eye(2) * h)
    assert bool(torch.isfinite(kde.log_prob(x[:3].double())).all())


def test_a_float32_fit_near_but_inside_the_range_still_scores():
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    kde = GaussianKDE(x, kernel_covariance=np.eye(2) * 1e70)  # L = 1e-35: a normal float32
    assert bool(torch.isfinite(kde.log_prob(x[:3])).all())
    GaussianKDE().load_state_dict(kde.state_dict())
