"""Regression tests for defects found in the pre-release review of anomstats_torch (issue 5).

Each test pins one fixed bug: numpy.cov's single-row semantics in ``MultiVariateGaussian._cov``, autograd
through the KDE's forward and the Mahalanobis map, fitting from inputs that require grad, streaming begun
under ``torch.inference_mode``, and the KDE on the meta device.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from anomstats_torch import GaussianKDE, MultiVariateGaussian  # noqa: E402
from tests.anomalib_oracle import (  # noqa: E402
    AnomalibGaussianKDE,
    AnomalibMultiVariateGaussian,
    anomalib_padim_distance,
)


def _numpy_cov_quiet(obs: np.ndarray, **kwargs) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.squeeze(np.cov(obs, **kwargs))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rowvar", [False, True])
def test_cov_single_row_follows_numpy(rowvar, bias):
    # A (1, 5) input with rowvar=False is ONE observation of 5 variables in numpy (and in anomalib):
    # a (5, 5) result (non-finite, with a warning, for too few degrees of freedom), not a scalar variance.
    obs = np.array([[0.5, -1.0, 2.0, 0.0, 3.0]])
    expected = _numpy_cov_quiet(obs, rowvar=rowvar, bias=bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = MultiVariateGaussian._cov(torch.from_numpy(obs), rowvar=rowvar, bias=bias)
    assert tuple(got.shape) == expected.shape
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, equal_nan=True)


def test_cov_single_row_warns_for_no_degrees_of_freedom():
    with pytest.warns(RuntimeWarning, match="Degrees of freedom"):
        MultiVariateGaussian._cov(torch.ones(1, 4, dtype=torch.float64), rowvar=False)


def test_cov_one_dimensional_input_is_one_variable():
    obs = np.array([1.0, 2.0, 4.0, 7.0])
    for rowvar in (False, True):
        got = MultiVariateGaussian._cov(torch.from_numpy(obs), rowvar=rowvar)
        assert got.shape == ()
        np.testing.assert_allclose(got.item(), np.cov(obs, rowvar=rowvar), rtol=1e-12)


def _centred_anomalib_kde(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 3, generator=g)
    reference = AnomalibGaussianKDE()
    reference.fit(x - x.mean(dim=0))
    ours = GaussianKDE()
    ours.load_state_dict(reference.state_dict())
    return reference, ours, torch.randn(6, 3, generator=g)


def test_kde_forward_is_differentiable_like_anomalib():
    reference, ours, queries = _centred_anomalib_kde()
    q_ours = queries.clone().requires_grad_()
    q_ref = queries.clone().requires_grad_()
    density = ours(q_ours)
    assert density.requires_grad
    (grad_ours,) = torch.autograd.grad(density.sum(), q_ours)
    (grad_ref,) = torch.autograd.grad(reference(q_ref).sum(), q_ref)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(density.detach(), reference(queries), rtol=1e-5, atol=1e-9)
    (grad_log,) = torch.autograd.grad(ours.log_prob(q_ours).sum(), q_ours)
    # d log p = d p / p
    torch.testing.assert_close(grad_log, grad_ref / reference(queries)[:, None], rtol=1e-4, atol=1e-6)
    assert torch.equal(queries, q_ours.detach())


def test_kde_requires_grad_input_under_no_grad_uses_the_fast_path_values():
    reference, ours, queries = _centred_anomalib_kde(1)
    with torch.no_grad():
        density = ours(queries.clone().requires_grad_())
    assert not density.requires_grad
    torch.testing.assert_close(density, ours(queries), rtol=1e-6, atol=0)


def test_kde_fit_from_a_tensor_that_requires_grad():
    x = torch.randn(100, 2, dtype=torch.float64).requires_grad_()
    kde = GaussianKDE(x)
    assert not any(buffer.requires_grad for buffer in kde.state_dict().values())
    clone = copy.deepcopy(kde)  # fails on buffers that carry a graph
    expected = GaussianKDE(x.detach())
    q = torch.randn(4, 2, dtype=torch.float64)
    torch.testing.assert_close(clone(q), expected(q), rtol=1e-12, atol=0)
    assert x.grad is None


def test_mvg_fit_and_update_from_a_tensor_that_requires_grad():
    emb = torch.randn(12, 4, 2, 3).requires_grad_()
    mvg = MultiVariateGaussian()
    mean, inv_cov = mvg.fit(emb)
    assert not mean.requires_grad and not inv_cov.requires_grad
    copy.deepcopy(mvg)
    expected = AnomalibMultiVariateGaussian().fit(emb.detach())
    torch.testing.assert_close(mean, expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inv_cov, expected[1], rtol=1e-4, atol=1e-5)
    streamed = MultiVariateGaussian()
    streamed.update(emb[:5])
    streamed.update(emb[5:])
    s_mean, s_inv = streamed.compute()
    assert not s_mean.requires_grad and not s_inv.requires_grad
    torch.testing.assert_close(s_inv, inv_cov, rtol=1e-4, atol=1e-5)


def test_mahalanobis_is_differentiable_like_padim_scoring():
    g = torch.Generator().manual_seed(3)
    mvg = MultiVariateGaussian()
    mvg.fit(torch.randn(30, 4, 2, 3, generator=g))
    test = torch.randn(5, 4, 2, 3, generator=g)
    x_ours = test.clone().requires_grad_()
    x_ref = test.clone().requires_grad_()
    distance = mvg.mahalanobis(x_ours)
    assert distance.requires_grad
    reference = anomalib_padim_distance(x_ref, mvg.mean, mvg.inv_covariance)[:, 0]
    torch.testing.assert_close(distance.detach(), reference.detach(), rtol=1e-5, atol=1e-6)
    (grad_ours,) = torch.autograd.grad(distance.sum(), x_ours)
    (grad_ref,) = torch.autograd.grad(reference.sum(), x_ref)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(test, x_ours.detach())


def test_streaming_begun_under_inference_mode_continues_outside_it():
    g = torch.Generator().manual_seed(4)
    first, second = torch.randn(6, 3, 2, 2, generator=g), torch.randn(7, 3, 2, 2, generator=g)
    mvg = MultiVariateGaussian()
    with torch.inference_mode():
        mvg.update(first)
    mvg.update(second)
    mean, inv_cov = mvg.compute()
    expected = MultiVariateGaussian().fit(torch.cat([first, second]))
    torch.testing.assert_close(mean, expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inv_cov, expected[1], rtol=1e-4, atol=1e-5)


def test_kde_forward_on_the_meta_device_gives_shapes():
    kde = GaussianKDE(torch.randn(50, 3)).to("meta")
    out = kde(torch.empty(7, 3, device="meta"))
    assert out.device.type == "meta" and tuple(out.shape) == (7,)
    assert tuple(kde.log_prob(torch.empty(2, 3, device="meta")).shape) == (2,)


def test_kde_keeps_its_exact_fit_when_a_partial_checkpoint_does_not_touch_it():
    g = torch.Generator().manual_seed(5)
    train = torch.randn(400, 3, generator=g) + 300.0  # far from zero: exact centring matters in float32
    queries = train[:6] + 0.1
    parent = torch.nn.Module()
    parent.kde = GaussianKDE(train)
    before = parent.kde.log_prob(queries)
    result = parent.load_state_dict({}, strict=False)
    assert sorted(result.missing_keys) == ["kde.bw_transform", "kde.dataset", "kde.norm"]
    assert torch.equal(parent.kde.log_prob(queries), before)
    assert parent.kde._centred.shape == parent.kde.dataset.shape
