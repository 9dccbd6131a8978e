"""anomstats_torch.GaussianKDE's bandwidth options, ``bw_method='cv_ml'`` and ``kernel_covariance=H``, against the core.

The adapter takes both rules from :mod:`anomstats.bandwidth` (the selection and the check run on the dataset as
float64 NumPy) and only whitens and sums in torch; so the factor is the core's, the densities are the core KDE's
to the rounding of two routes (tests/_tolerances.py), faults raise the core's exceptions and messages, and the
checkpoint keeps anomalib's three buffers.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import anomstats  # noqa: E402
from anomstats.bandwidth import cv_ml_bandwidths, cv_ml_factor  # noqa: E402
from anomstats_torch import GaussianKDE  # noqa: E402
from tests._tolerances import (  # noqa: E402
    ADAPTER32,
    KDEErrorModel,
    Route,
    adapter_loaded,
    adapter_route,
    assert_close_each,
    bandwidth_from_whitening,
    core_route,
    kde_exponent,
)
from tests.anomalib_oracle import AnomalibGaussianKDE  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
KEYS = {"bw_transform", "dataset", "norm"}



def _data(n=300, d=3, offset=0.0, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) * 0.3 + np.eye(d)
    return (rng.normal(size=(n, d)) @ mixing + offset).astype(dtype)


def _spd(d, seed, scale=0.3):
    """A well-conditioned symmetric positive-definite kernel covariance (exactly symmetric)."""
    a = np.random.default_rng(seed).normal(size=(d, d)) * 0.4 + np.eye(d)
    h = scale**2 * (a @ a.T)
    return (h + h.T) / 2


def _queries(x, offset=0.3):
    return np.vstack([x[:10] + offset, x.mean(axis=0, keepdims=True), x[:3] * 1.5])


def _factor_term(ours, core, log_density, log_norm, d):
    """Relative density change from factors that differ by ``delta`` (relative): ``delta * (q + d)``.

    ``H`` moves by ``2 delta`` relative, every whitened squared distance by ``2 delta q_i`` (the exponent by
    half of it, bounded by the same expression in ``q``, :func:`kde_exponent`) and ``log norm`` by
    ``d delta``. First order; the factors are asserted equal elsewhere, so ``delta`` is 0 unless that fails.
    """
    delta = abs(ours / core - 1.0)
    return delta * (kde_exponent(log_density, log_norm) + d)


# --------------------------------------------------------------------------- bw_method='cv_ml'
@pytest.mark.parametrize(("n", "d", "offset"), [(150, 1, 0.0), (257, 2, 40.0), (300, 3, 0.0), (400, 4, -7.0)])
def test_cv_ml_factor_equals_the_core(n, d, offset):
    x = _data(n, d, offset, seed=n)
    kde = GaussianKDE(torch.from_numpy(x), bw_method="cv_ml")
    core = anomstats.GaussianKDE(x.T, bw_method="cv_ml")
    # Bound 0: the adapter calls the core's selection on the same float64 values, unweighted.
    assert kde.factor == cv_ml_factor(x.T)
    # Bound 0: the core KDE's uniform weights are no weights to the selection (exactly 1/n, as here).
    assert kde.factor == core.factor
    assert kde.bw_method == "cv_ml"
    # a refit selects again, for the new data
    y = _data(n // 2 + d + 5, d, offset, seed=n + 1)
    kde.fit(torch.from_numpy(y))
    core_y = anomstats.GaussianKDE(y.T, bw_method="cv_ml")
    assert kde.factor == core_y.factor  # bound 0, as above


def test_cv_ml_factor_float32_data_equals_the_core_on_the_same_values():
    x32 = _data(500, 3, 2.0, seed=3, dtype=np.float32)
    kde = GaussianKDE(torch.from_numpy(x32), bw_method="cv_ml")
    assert kde.dataset.dtype == torch.float32  # buffers stay in the data's dtype; the fit runs in float64
    x64 = x32.astype(np.float64)  # exact: the same values the adapter selects from
    assert kde.factor == cv_ml_factor(x64.T)  # bound 0: the same selection on the same values
    core = anomstats.GaussianKDE(x64.T, bw_method="cv_ml")
    assert kde.factor == core.factor  # bound 0, as above


@pytest.mark.parametrize(("n", "d", "offset"), [(120, 1, 0.0), (200, 2, 1e3), (300, 3, 0.0), (250, 4, -30.0)])
def test_cv_ml_densities_equal_the_core_float64(n, d, offset):
    x = _data(n, d, offset, seed=10 + d)
    queries = _queries(x)
    core = anomstats.GaussianKDE(x.T, bw_method="cv_ml")
    kde = GaussianKDE(torch.from_numpy(x), bw_method="cv_ml")
    want_log = core.logpdf(queries.T)
    # Bound (tests/_tolerances.py, kde_route_error for both computations, each fitting its own data
    # covariance and centring at the data mean, so the offset does not enter), plus the effect of the two
    # factors' difference (_factor_term, ~1e-15 relative): ~1e-13 relative on these problems.
    bound = KDEErrorModel.of(x, queries, core.covariance, (adapter_route(d), core_route(d)))
    extra = _factor_term(kde.factor, core.factor, want_log, bound.log_norm, d)
    assert_close_each(
        kde(torch.from_numpy(queries)).numpy(),
        core.pdf(queries.T),
        rtol=bound.rtol_each(want_log) + extra,
        atol=bound.atol(),
    )
    assert_close_each(
        kde.log_prob(torch.from_numpy(queries)).numpy(), want_log, atol=bound.log_atol_each(want_log) + extra
    )


def test_cv_ml_densities_equal_the_core_float32():
    x32 = _data(1000, 4, 1.0, seed=4, dtype=np.float32)
    q32 = _data(50, 4, 1.0, seed=5, dtype=np.float32)
    core = anomstats.GaussianKDE(x32.T.astype(np.float64), bw_method="cv_ml")
    kde = GaussianKDE(torch.from_numpy(x32), bw_method="cv_ml")
    got = kde(torch.from_numpy(q32))
    assert got.dtype == torch.float32
    q64 = q32.astype(np.float64)
    want_log = core.logpdf(q64.T)
    # kde_route_error: the float32 side dominates (its float64 fit in float32 buffers, the float32 expanded
    # square of centred queries, the float32 sum); the factors' difference (_factor_term) is negligible.
    bound = KDEErrorModel.of(x32, q32, core.covariance, (ADAPTER32, core_route(4)))
    extra = _factor_term(kde.factor, core.factor, want_log, bound.log_norm, 4)
    assert_close_each(got.numpy(), core.pdf(q64.T), rtol=bound.rtol_each(want_log) + extra, atol=0)
    assert_close_each(
        kde.log_prob(torch.from_numpy(q32)).double().numpy(), want_log, atol=bound.log_atol_each(want_log) + extra
    )


def test_cv_ml_faults_raise_the_cores_exception_and_message():
    rng = np.random.default_rng(6)
    duplicated = np.repeat(rng.normal(size=(40, 2)), 2, axis=0)  # the likelihood grows without bound
    singular = np.column_stack([np.arange(20.0), 2 * np.arange(20.0)])  # a singular data covariance
    for x in (duplicated, singular):
        with pytest.raises(Exception) as core_error:
            anomstats.GaussianKDE(x.T, bw_method="cv_ml")
        with pytest.raises(Exception) as ours:
            GaussianKDE(torch.from_numpy(x), bw_method="cv_ml")
        assert type(ours.value) is type(core_error.value)
        assert str(ours.value) == str(core_error.value)
    assert isinstance(ours.value, ValueError)  # a LinAlgError, a ValueError, as before


# --------------------------------------------------------------------------- kernel_covariance=H
@pytest.mark.parametrize(("n", "d", "offset"), [(100, 1, 0.0), (200, 2, 50.0), (150, 3, 0.0), (300, 4, -5.0)])
@pytest.mark.parametrize("as_tensor", [True, False])
def test_kernel_covariance_densities_equal_the_core(n, d, offset, as_tensor):
    x = _data(n, d, offset, seed=20 + d)
    queries = _queries(x)
    h = _spd(d, seed=d)
    given = torch.from_numpy(h) if as_tensor else h.tolist()
    kde = GaussianKDE(torch.from_numpy(x), kernel_covariance=given)
    core = anomstats.GaussianKDE(x.T, kernel_covariance=h)
    assert kde.factor is None and kde.bw_method is None
    np.testing.assert_array_equal(kde.kernel_covariance, core.covariance)  # the core's checked H (bound 0)
    want_log = core.logpdf(queries.T)
    # kde_route_error for both computations, with the given H (no data covariance is fitted: the bandwidth
    # term's delta_H, a covariance fit's, over-covers the two factorisations of H).
    bound = KDEErrorModel.of(x, queries, h, (adapter_route(d), core_route(d)))
    assert_close_each(
        kde(torch.from_numpy(queries)).numpy(), core.pdf(queries.T), rtol=bound.rtol_each(want_log), atol=bound.atol()
    )
    assert_close_each(kde.log_prob(torch.from_numpy(queries)).numpy(), want_log, atol=bound.log_atol_each(want_log))


def test_kernel_covariance_from_cv_ml_bandwidths_and_float32():
    x32 = _data(400, 3, 3.0, seed=7, dtype=np.float32)
    x64 = x32.astype(np.float64)
    h = np.diag(cv_ml_bandwidths(x64.T) ** 2)  # the documented use: per-dimension bandwidths
    q32 = _data(30, 3, 3.0, seed=8, dtype=np.float32)
    kde = GaussianKDE(torch.from_numpy(x32), kernel_covariance=torch.from_numpy(h).float())
    core = anomstats.GaussianKDE(x64.T, kernel_covariance=h.astype(np.float32))  # the same float32 values
    got = kde(torch.from_numpy(q32))
    assert got.dtype == torch.float32
    want_log = core.logpdf(q32.astype(np.float64).T)
    # kde_route_error: the float32 route (a float64 factorisation of H in float32 buffers) against the core.
    bound = KDEErrorModel.of(x64, q32, core.covariance, (ADAPTER32, core_route(3)))
    assert_close_each(got.numpy(), core.pdf(q32.astype(np.float64).T), rtol=bound.rtol_each(want_log), atol=0)


def test_kernel_covariance_allows_fewer_points_than_dimensions_as_the_core():
    x = _data(3, 4, 1.0, seed=9)
    h = _spd(4, seed=9, scale=1.0)
    queries = x + 0.5
    kde = GaussianKDE(torch.from_numpy(x), kernel_covariance=h)
    core = anomstats.GaussianKDE(x.T, kernel_covariance=h)
    want_log = core.logpdf(queries.T)
    # kde_route_error for both, as above (no data covariance: N <= D is fine with an explicit H).
    bound = KDEErrorModel.of(x, queries, h, (adapter_route(4), core_route(4)))
    assert_close_each(kde(torch.from_numpy(queries)).numpy(), core.pdf(queries.T), rtol=bound.rtol_each(want_log))
    with pytest.raises(ValueError, match="more points than dimensions"):
        GaussianKDE(torch.from_numpy(x))  # without H the data covariance is singular, as before
    with pytest.raises(ValueError, match="at least one point"):
        GaussianKDE(torch.zeros(0, 4, dtype=torch.float64), kernel_covariance=h)


def _bad_kernel_covariances():
    """(H, data dimension) pairs that the core refuses, one per fault of check_kernel_covariance."""
    return [
        ("not square", np.ones((2, 3)), 2),
        ("another D", np.eye(3), 2),
        ("1-D", np.ones(2), 2),
        ("scalar, D > 1", 0.5, 2),
        ("non-finite", np.array([[1.0, np.nan], [np.nan, 1.0]]), 2),
        ("asymmetric", np.array([[1.0, 0.5], [0.2, 1.0]]), 2),
        ("indefinite", np.array([[1.0, 2.0], [2.0, 1.0]]), 2),
        ("singular", np.array([[1.0, 1.0], [1.0, 1.0]]), 2),
        ("complex", np.eye(2) * (1 + 0j), 2),
        ("strings", [["a", "b"], ["c", "d"]], 2),
    ]


@pytest.mark.parametrize(
    ("fault", "h", "d"), _bad_kernel_covariances(), ids=lambda v: v if isinstance(v, str) else None
)
def test_kernel_covariance_faults_raise_the_cores_exception_and_message(fault, h, d):
    x = _data(30, d, 0.0, seed=11)
    with pytest.raises(Exception) as core_error:
        anomstats.GaussianKDE(x.T, kernel_covariance=h)
    forms = [h]
    if fault != "strings":
        forms.append(torch.as_tensor(np.asarray(h)))  # the tensor form of the same values
        if np.asarray(h).dtype.kind == "f":
            forms.append(torch.as_tensor(np.asarray(h), dtype=torch.float32))  # exact in float32 too
    for given in forms:
        # fitted at construction
        with pytest.raises(Exception) as ours:
            GaussianKDE(torch.from_numpy(x), kernel_covariance=given)
        assert type(ours.value) is type(core_error.value), (fault, given)
        assert str(ours.value) == str(core_error.value), (fault, given)
        # constructed, then fitted: a 2-D H is checked at construction (but for its size: D is unknown), any
        # other at fit; with the same words either way
        if np.ndim(h) == 2 and fault != "another D":
            with pytest.raises(Exception) as ours:
                GaussianKDE(kernel_covariance=given)
        else:
            kde = GaussianKDE(kernel_covariance=given)
            with pytest.raises(Exception) as ours:
                kde.fit(torch.from_numpy(x))
        assert type(ours.value) is type(core_error.value), (fault, given)
        assert str(ours.value) == str(core_error.value), (fault, given)


def test_bw_method_and_kernel_covariance_together_raise_the_cores_error():
    x = _data(30, 2, 0.0, seed=12)
    for bw_method in ("scott", "cv_ml", 0.5, "not a rule"):  # checked before the rule, as in the core
        with pytest.raises(ValueError) as core_error:
            anomstats.GaussianKDE(x.T, bw_method=bw_method, kernel_covariance=np.eye(2))
        with pytest.raises(ValueError) as ours:
            GaussianKDE(torch.from_numpy(x), bw_method=bw_method, kernel_covariance=np.eye(2))
        assert str(ours.value) == str(core_error.value)
        with pytest.raises(ValueError) as ours:
            GaussianKDE(bw_method=bw_method, kernel_covariance=torch.eye(2))
        assert str(ours.value) == str(core_error.value)


def test_default_bw_method_is_scott():
    x = torch.from_numpy(_data(200, 3, 1.0, seed=13))
    q = x[:7] + 0.2
    default, scott, none = GaussianKDE(x), GaussianKDE(x, bw_method="scott"), GaussianKDE(x, bw_method=None)
    assert default.bw_method == scott.bw_method == none.bw_method == "scott"
    for other in (scott, none):
        # Exact (bound 0): the same rule, the same computation.
        torch.testing.assert_close(other(q), default(q), rtol=0, atol=0)
        torch.testing.assert_close(other.bw_transform, default.bw_transform, rtol=0, atol=0)
    assert default.factor == anomstats.GaussianKDE(x.numpy().T).factor  # Scott's rule, the core's formula


# --------------------------------------------------------------------------- checkpoints, inputs, devices
def _fitted(option, x):
    if option == "cv_ml":
        return GaussianKDE(x, bw_method="cv_ml")
    return GaussianKDE(x, kernel_covariance=torch.from_numpy(_spd(x.shape[1], seed=14)).to(x.dtype))


@pytest.mark.parametrize("option", ["cv_ml", "kernel_covariance"])
def test_state_dict_is_anomalibs_and_loads_strict_into_a_default_module(option):
    x = torch.from_numpy(_data(300, 3, 25.0, seed=15))
    q = x[:20] + 0.25
    fitted = _fitted(option, x)
    state = fitted.state_dict()
    assert set(state) == KEYS
    loaded = GaussianKDE().double()
    loaded.load_state_dict(state)  # strict=True: no key of the bandwidth options in the checkpoint
    assert loaded.bw_method == "scott" and loaded.kernel_covariance is None and loaded.factor is None
    # Shared whitening; the loaded module works from the stored X @ L alone (adapter_loaded), against the
    # fitted module's centred route: as tests/test_torch_kde.py::test_loaded_buffers_alone_give_the_same_densities.
    want_log = fitted.log_prob(q).numpy()
    h = bandwidth_from_whitening(fitted.bw_transform)
    bound = KDEErrorModel.of(x.numpy(), q.numpy(), h, (adapter_route(3), *adapter_loaded(3)), shared_whitening=True)
    assert_close_each(loaded(q), fitted(q), rtol=bound.rtol_each(want_log), atol=0)
    assert_close_each(loaded.log_prob(q), fitted.log_prob(q), atol=bound.log_atol_each(want_log))
    # a module configured with the option loads a checkpoint too, and then forgets the factor of its fit
    configured = _fitted(option, x)
    configured.load_state_dict(GaussianKDE(x).state_dict())
    assert configured.factor is None
    assert_close_each(configured(q), GaussianKDE(x)(q), rtol=_loaded_rtol(x, q), atol=0)  # see _loaded_rtol


def _loaded_rtol(x, q):
    """kde_route_error of the default (Scott) fit against a module that loaded its buffers (shared whitening)."""
    reference = GaussianKDE(x)
    h = bandwidth_from_whitening(reference.bw_transform)
    bound = KDEErrorModel.of(x.numpy(), q.numpy(), h, (adapter_route(3), *adapter_loaded(3)), shared_whitening=True)
    return bound.rtol_each(reference.log_prob(q).numpy())


@pytest.mark.parametrize("option", ["cv_ml", "kernel_covariance"])
def test_anomalib_loads_the_checkpoint_strict_and_computes_the_same_densities(option):
    x = torch.from_numpy(_data(400, 4, 0.0, seed=16)).float()
    x = x - x.mean(dim=0)  # anomalib scores right only for centred data (PCA output)
    q = torch.randn(40, 4, generator=torch.Generator().manual_seed(2))
    ours = _fitted(option, x)
    reference = AnomalibGaussianKDE()
    reference.load_state_dict(ours.state_dict())  # strict
    # kde_route_error with shared whitening, float32: anomalib's direct differences of uncentred whitened
    # queries (the data are centred, so the origin is the mean to rounding) against our centred expanded
    # square; q from a float64 evaluation of the same buffers.
    h = bandwidth_from_whitening(ours.bw_transform)
    log_density = copy.deepcopy(ours).double().log_prob(q.double()).numpy()
    routes = (Route("direct", None, np.float32), adapter_route(4, np.float32))
    bound = KDEErrorModel.of(x.double().numpy(), q.numpy(), h, routes, shared_whitening=True)
    assert_close_each(ours(q), reference(q), rtol=bound.rtol_each(log_density), atol=bound.atol())
    # and the other way: a module with the option loads anomalib's own checkpoint
    anomalib_fit = AnomalibGaussianKDE()
    anomalib_fit.fit(x.clone())
    configured = _fitted(option, x)
    configured.load_state_dict(anomalib_fit.state_dict())  # strict
    assert set(configured.state_dict()) == KEYS


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("option", ["cv_ml", "kernel_covariance"])
def test_inputs_are_not_modified(option, dtype):
    x = torch.from_numpy(_data(120, 2, 5.0, seed=17)).to(dtype)
    h_tensor = torch.from_numpy(_spd(2, seed=18)).to(dtype)
    h_array = _spd(2, seed=18)
    x_before, h_tensor_before, h_array_before = x.clone(), h_tensor.clone(), h_array.copy()
    if option == "cv_ml":
        kdes = [GaussianKDE(x, bw_method="cv_ml")]
    else:
        kdes = [GaussianKDE(x, kernel_covariance=h_tensor), GaussianKDE(kernel_covariance=h_array)]
    for kde in kdes:
        kde.fit(x)
        kde(x[:5])
        kde.log_prob(x[:5])
    assert torch.equal(x, x_before)
    assert torch.equal(h_tensor, h_tensor_before) and np.array_equal(h_array, h_array_before)


@pytest.mark.parametrize("as_tensor", [True, False])
def test_kernel_covariance_is_copied_not_shared(as_tensor):
    x = torch.from_numpy(_data(120, 2, 5.0, seed=17))
    h = torch.from_numpy(_spd(2, seed=18)) if as_tensor else _spd(2, seed=18)
    kde = GaussianKDE(x, kernel_covariance=h)
    before = kde.bw_transform.clone()
    h *= 4.0  # the caller changes its H afterwards (in place)
    kde.fit(x)
    torch.testing.assert_close(kde.bw_transform, before, rtol=0, atol=0)  # the same H refitted: exact (bound 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("option", ["cv_ml", "kernel_covariance"])
def test_fit_on_the_datasets_device(option, device):
    x = torch.from_numpy(_data(200, 3, 2.0, seed=19))
    q = x[:8] + 0.5
    on_cpu = _fitted(option, x)
    on_device = _fitted(option, x.to(device))
    assert on_device.bw_transform.device.type == device and on_device.dataset.device.type == device
    if option == "cv_ml":
        assert on_device.factor == on_cpu.factor  # bound 0: the selection runs on the CPU in both cases
    # kde_route_error, two fits of the same H on two devices (their own Cholesky and products).
    want_log = on_cpu.log_prob(q).numpy()
    h = bandwidth_from_whitening(on_cpu.bw_transform)
    bound = KDEErrorModel.of(x.numpy(), q.numpy(), h, (adapter_route(3), adapter_route(3)))
    assert_close_each(on_device(q.to(device)).cpu(), on_cpu(q), rtol=bound.rtol_each(want_log), atol=0)
