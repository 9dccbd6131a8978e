"""Regression tests for defects found in the pre-release review of anomstats_torch (issue 5).

Each test pins one fixed bug: numpy.cov's single-row semantics in ``MultiVariateGaussian._cov``, autograd
through the KDE's forward and the Mahalanobis map, fitting from inputs that require grad, streaming begun
under ``torch.inference_mode``, and the KDE on the meta device.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from anomstats.gaussian import DEFAULT_RIDGE  # noqa: E402
from anomstats_torch import GaussianKDE, MultiVariateGaussian  # noqa: E402
from tests._tolerances import (  # noqa: E402
    ANOMALIB32,
    KDEErrorModel,
    adapter_loaded,
    adapter_route,
    assert_close_each,
    bandwidth_from_whitening,
    covariance_atol,
    kde_exponent,
    kde_log_density_whitened,
    mahalanobis_tolerances,
    mean_atol,
    patch_covariances,
    precision_atol,
)
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
    # Bound: covariance_atol of the observations (here: finite entries only where there are 5 of them).
    observations = obs if not rowvar else obs.T
    atol = np.squeeze(covariance_atol(observations)) if np.isfinite(expected).all() else 0.0
    assert_close_each(got.numpy(), expected, atol=atol, equal_nan=True)


def test_cov_single_row_warns_for_no_degrees_of_freedom():
    with pytest.warns(RuntimeWarning, match="Degrees of freedom"):
        MultiVariateGaussian._cov(torch.ones(1, 4, dtype=torch.float64), rowvar=False)


def test_cov_one_dimensional_input_is_one_variable():
    obs = np.array([1.0, 2.0, 4.0, 7.0])
    for rowvar in (False, True):
        got = MultiVariateGaussian._cov(torch.from_numpy(obs), rowvar=rowvar)
        assert got.shape == ()
        # Bound: covariance_atol (a variance of 4 values, both sides).
        assert_close_each(got.item(), np.cov(obs, rowvar=rowvar), atol=covariance_atol(obs[:, None])[0, 0])


def _centred_anomalib_kde(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 3, generator=g)
    reference = AnomalibGaussianKDE()
    reference.fit(x - x.mean(dim=0))
    ours = GaussianKDE()
    ours.load_state_dict(reference.state_dict())
    return reference, ours, torch.randn(6, 3, generator=g)


def _shared_buffer_bound(module, queries, routes):
    """kde_route_error on shared (loaded) buffers, with q from a float64 evaluation of those buffers."""
    whitening = module.bw_transform.double().numpy()
    stored = module.dataset.double().numpy()
    log_norm = math.log(float(module.norm))
    q = queries.double().numpy()
    train = np.linalg.solve(whitening.T, stored.T).T
    bound = KDEErrorModel.of(train, q, bandwidth_from_whitening(whitening), routes, shared_whitening=True)
    return bound, kde_log_density_whitened(stored, q @ whitening, log_norm), np.linalg.norm(whitening, 2)


def test_kde_forward_is_differentiable_like_anomalib():
    reference, ours, queries = _centred_anomalib_kde()
    q_ours = queries.clone().requires_grad_()
    q_ref = queries.clone().requires_grad_()
    density = ours(q_ours)
    assert density.requires_grad
    (grad_ours,) = torch.autograd.grad(density.sum(), q_ours)
    (grad_ref,) = torch.autograd.grad(reference(q_ref).sum(), q_ref)
    # Bounds: kde_route_error (float32, shared buffers: anomalib's direct loop, our loaded route), rtol_p per
    # query. The gradient sum_i a_i L (t_i - y) of contributions a_i >= 0 carries the same relative error on
    # each a_i and its difference vector, so |d grad p| <= rtol_p |L| p sqrt(q) (E_c |y - t_i| <= sqrt(q)):
    # an absolute bound, since the terms cancel near a mode. d log p = d p / p doubles it for the log.
    bound, log_density, l_norm = _shared_buffer_bound(ours, queries, (ANOMALIB32, *adapter_loaded(3, np.float32)))
    rtol_p = bound.rtol_each(log_density)
    p = np.exp(log_density)
    grad_atol = (rtol_p * l_norm * p * np.sqrt(kde_exponent(log_density, bound.log_norm)))[:, None]
    assert_close_each(grad_ours, grad_ref, rtol=rtol_p[:, None], atol=grad_atol)
    assert_close_each(density.detach(), reference(queries), rtol=rtol_p, atol=bound.atol())
    (grad_log,) = torch.autograd.grad(ours.log_prob(q_ours).sum(), q_ours)
    # d log p = d p / p
    assert_close_each(grad_log, grad_ref / reference(queries)[:, None], rtol=2 * rtol_p[:, None], atol=2 * grad_atol / p[:, None])
    assert torch.equal(queries, q_ours.detach())


def test_kde_requires_grad_input_under_no_grad_uses_the_fast_path_values():
    reference, ours, queries = _centred_anomalib_kde(1)
    with torch.no_grad():
        density = ours(queries.clone().requires_grad_())
    assert not density.requires_grad
    # Bound: kde_route_error, the same module's two float32 routes (shared buffers); here both are the
    # fast path, so this is a bound on rounding-order differences (0 in practice).
    bound, log_density, _ = _shared_buffer_bound(ours, queries, adapter_loaded(3, np.float32) * 2)
    assert_close_each(density, ours(queries), rtol=bound.rtol_each(log_density), atol=0)


def test_kde_fit_from_a_tensor_that_requires_grad():
    x = torch.randn(100, 2, dtype=torch.float64).requires_grad_()
    kde = GaussianKDE(x)
    assert not any(buffer.requires_grad for buffer in kde.state_dict().values())
    clone = copy.deepcopy(kde)  # fails on buffers that carry a graph
    expected = GaussianKDE(x.detach())
    q = torch.randn(4, 2, dtype=torch.float64)
    # Bound: kde_route_error for two float64 fits of the same detached data (the same algorithm: 0 in
    # practice, since both run the same operations on the same values).
    h = bandwidth_from_whitening(expected.bw_transform)
    bound = KDEErrorModel.of(x.detach().numpy(), q.numpy(), h, (adapter_route(2), adapter_route(2)))
    assert_close_each(clone(q), expected(q), rtol=bound.rtol_each(expected.log_prob(q).numpy()), atol=0)
    assert x.grad is None


def test_mvg_fit_and_update_from_a_tensor_that_requires_grad():
    emb = torch.randn(12, 4, 2, 3).requires_grad_()
    mvg = MultiVariateGaussian()
    mean, inv_cov = mvg.fit(emb)
    assert not mean.requires_grad and not inv_cov.requires_grad
    copy.deepcopy(mvg)
    expected = AnomalibMultiVariateGaussian().fit(emb.detach())
    # Bounds (float32 fits of 12 samples): mean_atol, and precision_atol = kappa(A) delta_A |A^-1| for the
    # inverses of the regularised covariances A (ours by Cholesky, anomalib's by an explicit inverse).
    data = emb.detach().double().numpy()
    covariances = patch_covariances(data, DEFAULT_RIDGE)
    torch.testing.assert_close(mean, expected[0], rtol=0, atol=mean_atol(np.abs(data).max(), 12, np.float32))
    torch.testing.assert_close(inv_cov, expected[1], rtol=0, atol=precision_atol(covariances, 12, np.float32))
    streamed = MultiVariateGaussian()
    streamed.update(emb[:5])
    streamed.update(emb[5:])
    s_mean, s_inv = streamed.compute()
    assert not s_mean.requires_grad and not s_inv.requires_grad
    # The streamed fit accumulates in float64 and rounds to float32: within the float32 fit's bound.
    torch.testing.assert_close(s_inv, inv_cov, rtol=0, atol=precision_atol(covariances, 12, np.float32))


def test_mahalanobis_is_differentiable_like_padim_scoring():
    g = torch.Generator().manual_seed(3)
    mvg = MultiVariateGaussian()
    train = torch.randn(30, 4, 2, 3, generator=g)
    mvg.fit(train)
    test = torch.randn(5, 4, 2, 3, generator=g)
    x_ours = test.clone().requires_grad_()
    x_ref = test.clone().requires_grad_()
    distance = mvg.mahalanobis(x_ours)
    assert distance.requires_grad
    reference = anomalib_padim_distance(x_ref, mvg.mean, mvg.inv_covariance)[:, 0]
    # Bound: mahalanobis_tolerances with shared buffers (both score with mvg's mean and precision):
    # float32 evaluation rounding, kappa(A) (c + 2) c eps / 2 relative, doubled.
    covariances = patch_covariances(train.double().numpy(), DEFAULT_RIDGE)
    rtol, _ = mahalanobis_tolerances(covariances, 30, dtype=np.float32, shared_fit=True)
    torch.testing.assert_close(distance.detach(), reference.detach(), rtol=rtol, atol=0)
    (grad_ours,) = torch.autograd.grad(distance.sum(), x_ours)
    (grad_ref,) = torch.autograd.grad(reference.sum(), x_ref)
    # grad d = P delta / d: the product P delta is the one inside d^2 and 1/d carries d's relative error,
    # so |d grad| <= 2 rtol |grad d| (2-norm over channels, which bounds each entry).
    grad_norm = grad_ref.norm(dim=1, keepdim=True)
    assert_close_each(grad_ours, grad_ref, atol=(2 * rtol * grad_norm).expand_as(grad_ref))
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
    # Bounds: mean_atol and precision_atol for the float32 fit of 13 samples (the streamed side accumulates
    # in float64 and rounds to float32, within the same bound).
    data = torch.cat([first, second]).double().numpy()
    torch.testing.assert_close(mean, expected[0], rtol=0, atol=mean_atol(np.abs(data).max(), 13, np.float32))
    atol = precision_atol(patch_covariances(data, DEFAULT_RIDGE), 13, np.float32)
    torch.testing.assert_close(inv_cov, expected[1], rtol=0, atol=atol)


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
