"""anomstats_torch.GaussianKDE: scipy/core parity, anomalib checkpoint compatibility, dtypes, devices, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.linalg import LinAlgError
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

torch = pytest.importorskip("torch")

import anomstats  # noqa: E402
from anomstats_torch import GaussianKDE  # noqa: E402
from tests._tolerances import (  # noqa: E402
    ADAPTER32,
    ANOMALIB32,
    EXACT,
    SCIPY,
    KDEErrorModel,
    Route,
    adapter_loaded,
    adapter_route,
    assert_close_each,
    bandwidth_from_whitening,
    core_route,
    covariance_atol,
    kde_log_density_whitened,
)
from tests.anomalib_oracle import AnomalibGaussianKDE  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _data(n=300, d=3, offset=0.0, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) * 0.3 + np.eye(d)
    return (rng.normal(size=(n, d)) @ mixing + offset).astype(dtype)


# --------------------------------------------------------------------------- scipy / core parity
@given(n=st.integers(8, 120), d=st.integers(1, 4), offset=st.sampled_from([0.0, 3.0]), seed=st.integers(0, 2**16))
def test_float64_densities_equal_scipy(n, d, offset, seed):
    x = _data(n, d, offset, seed)
    queries = np.vstack([x[: min(n, 10)] + 0.3, x.mean(axis=0, keepdims=True)])
    ref = stats.gaussian_kde(x.T)
    kde = GaussianKDE(torch.from_numpy(x))
    got = kde(torch.from_numpy(queries)).numpy()
    want_log = ref.logpdf(queries.T)
    # Bound (tests/_tolerances.py, kde_route_error, summed over the two computations): each fits its own
    # bandwidth, kappa(H) delta_H (q + d) / 2 with q = 2 (log norm - log p) (few points in d = 4 are badly
    # conditioned: kappa ~ 1e2-1e5 for n = 8); exponent rounding eps (d + 2) (1.5 |y|^2 + q) for our
    # expanded square on centred queries, eps (2 d |y| sqrt(q) + (1.5 d + 1) q) for scipy's direct
    # differences of uncentred ones; and eps (sqrt(n) + 1 + |log p|) for the sums and logs.
    bound = KDEErrorModel.of(x, queries, ref.covariance, (adapter_route(d), SCIPY))
    assert_close_each(got, ref(queries.T), rtol=bound.rtol_each(want_log), atol=bound.atol())
    assert_close_each(
        kde.log_prob(torch.from_numpy(queries)).numpy(), want_log, atol=bound.log_atol_each(want_log)
    )


@given(
    n=st.integers(8, 120),
    d=st.integers(1, 4),
    offset=st.sampled_from([0.0, -250.0, 1e4]),  # scipy loses digits here (it does not centre); the core does not
    seed=st.integers(0, 2**16),
)
def test_float64_densities_equal_the_core_for_any_mean(n, d, offset, seed):
    x = _data(n, d, offset, seed)
    queries = np.vstack([x[: min(n, 10)] + 0.3, x.mean(axis=0, keepdims=True)])
    core = anomstats.GaussianKDE(x.T)
    kde = GaussianKDE(torch.from_numpy(x))
    want_log = core.logpdf(queries.T)
    # kde_route_error for both computations, both centred at the data mean (the differences with the mean
    # are exact, by Sterbenz), so the offset does not enter the bound: kappa(H) and the centred |y| do.
    bound = KDEErrorModel.of(x, queries, core.covariance, (adapter_route(d), core_route(d)))
    assert_close_each(
        kde(torch.from_numpy(queries)).numpy(), core.evaluate(queries.T), rtol=bound.rtol_each(want_log), atol=bound.atol()
    )
    assert_close_each(
        kde.log_prob(torch.from_numpy(queries)).numpy(), want_log, atol=bound.log_atol_each(want_log)
    )


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e6])
def test_parity_with_the_numpy_core_float64(offset):
    x = _data(500, 4, offset, seed=1)
    queries = _data(40, 4, offset, seed=2) * 1.5 - offset * 0.5
    core = anomstats.GaussianKDE(x.T)
    kde = GaussianKDE(torch.from_numpy(x))
    want_log = core.logpdf(queries.T)
    # kde_route_error for both, centred (the offset does not enter; scipy's uncentred |y| would be ~1e6).
    bound = KDEErrorModel.of(x, queries, core.covariance, (adapter_route(4), core_route(4)))
    assert_close_each(
        kde(torch.from_numpy(queries)).numpy(), core.evaluate(queries.T), rtol=bound.rtol_each(want_log), atol=bound.atol()
    )
    assert_close_each(
        kde.log_prob(torch.from_numpy(queries)).numpy(), want_log, atol=bound.log_atol_each(want_log)
    )


def test_parity_with_the_numpy_core_float32():
    x = _data(2000, 4, 1.0, seed=3, dtype=np.float32)
    queries = _data(64, 4, 1.0, seed=4, dtype=np.float32)
    core = anomstats.GaussianKDE(x.T.astype(np.float64))
    kde = GaussianKDE(torch.from_numpy(x))
    got = kde(torch.from_numpy(queries))
    assert got.dtype == torch.float32
    want_log = core.logpdf(queries.T.astype(np.float64))
    # kde_route_error: the float32 side dominates (its float64 fit rounded to float32 buffers, the float32
    # expanded square on centred queries, the float32 sum of 2000 kernels); the float64 core adds little.
    bound = KDEErrorModel.of(x, queries, core.covariance, (ADAPTER32, core_route(4)))
    assert_close_each(got.numpy(), core.evaluate(queries.T.astype(np.float64)), rtol=bound.rtol_each(want_log), atol=0)


def test_silverman_and_scalar_bandwidth_match_scipy():
    x = _data(200, 2, 5.0, seed=5)
    q = x[:7] + 0.1
    for method in ("silverman", 0.4):
        ref = stats.gaussian_kde(x.T, bw_method=method)
        got = GaussianKDE(torch.from_numpy(x), bw_method=method)(torch.from_numpy(q)).numpy()
        # kde_route_error for ours (centred) and scipy's direct differences (uncentred: |y| ~ 5 / bandwidth).
        bound = KDEErrorModel.of(x, q, ref.covariance, (adapter_route(2), SCIPY))
        assert_close_each(got, ref(q.T), rtol=bound.rtol_each(ref.logpdf(q.T)))


def test_far_queries_underflow_in_density_but_not_in_log_prob():
    x = _data(100, 2, 0.0, seed=6)
    far = np.array([[60.0, -40.0], [0.0, 0.0]])
    ref = stats.gaussian_kde(x.T)
    want_log = ref.logpdf(far.T)
    for dtype in (torch.float32, torch.float64):
        kde = GaussianKDE(torch.from_numpy(x).to(dtype))
        log_prob = kde.log_prob(torch.from_numpy(far).to(dtype))
        assert torch.isfinite(log_prob).all()
        # |d log p| <= kde_route_error: the far query has q ~ |y|^2 ~ 1e4, so the exponent's rounding
        # eps q dominates (~1e-2 absolute in float32 on log p ~ -5e3, ~1e-11 in float64).
        ours = ADAPTER32 if dtype == torch.float32 else adapter_route(2)
        bound = KDEErrorModel.of(x, far, ref.covariance, (ours, SCIPY))
        assert_close_each(log_prob.double().numpy(), want_log, atol=bound.log_atol_each(want_log))
        assert kde(torch.from_numpy(far).to(dtype))[0] == 0  # true density below the dtype's range


@pytest.mark.parametrize("chunk_bytes", [64, 1000, 2**20])
def test_chunking_does_not_change_the_result(chunk_bytes):
    x = torch.from_numpy(_data(257, 3, 2.0, seed=7))
    q = torch.from_numpy(_data(33, 3, 2.0, seed=8))
    expected = GaussianKDE(x)(q)
    kde = GaussianKDE(x, chunk_bytes=chunk_bytes)
    # The same fit (shared whitening: no bandwidth term); the blocks change only the order of the sums and
    # the blocking of the products: kde_route_error's rounding terms, for two expanded-square computations.
    want_log = GaussianKDE(x).log_prob(q).numpy()
    h = bandwidth_from_whitening(kde.bw_transform)
    bound = KDEErrorModel.of(x.numpy(), q.numpy(), h, (adapter_route(3), adapter_route(3)), shared_whitening=True)
    assert_close_each(kde(q), expected, rtol=bound.rtol_each(want_log), atol=0)
    assert_close_each(kde.log_prob(q), GaussianKDE(x).log_prob(q), atol=bound.log_atol_each(want_log))


def test_one_intra_op_thread_gives_the_same_densities():
    # One intra-op thread takes smaller CPU tiles (0.75 MiB: 384 training points per 256-row float64 tile, against
    # 1536 with more threads): 2000 training points span several tiles either way. Only the blocking of the
    # products and the order of the sums change: the same rounding terms as for chunk_bytes above.
    x = torch.from_numpy(_data(2000, 3, 2.0, seed=7))
    q = torch.from_numpy(_data(300, 3, 2.0, seed=8))
    kde = GaussianKDE(x)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected, expected_log = kde(q), kde.log_prob(q)
        torch.set_num_threads(1)
        one, one_log = kde(q), kde.log_prob(q)
    finally:
        torch.set_num_threads(threads)
    want_log = expected_log.numpy()
    h = bandwidth_from_whitening(kde.bw_transform)
    bound = KDEErrorModel.of(x.numpy(), q.numpy(), h, (adapter_route(3), adapter_route(3)), shared_whitening=True)
    assert_close_each(one, expected, rtol=bound.rtol_each(want_log), atol=0)
    assert_close_each(one_log, expected_log, atol=bound.log_atol_each(want_log))


def test_loaded_buffers_alone_give_the_same_densities():
    x = torch.from_numpy(_data(300, 3, 40.0, seed=16))
    q = x[:20] + 0.25
    fitted = GaussianKDE(x)
    loaded = GaussianKDE().double()
    loaded.load_state_dict(fitted.state_dict())
    assert loaded._centred.numel() == 0  # works from the anomalib buffers only
    # Shared whitening. The loaded module centres the stored X @ L, rounded to eps |X @ L| (|mean| is
    # ~1e2 bandwidths here), then squares the centred values: adapter_loaded (the rounding of the
    # uncentred coordinates enters like direct differences measured from the origin).
    want_log = fitted.log_prob(q).numpy()
    h = bandwidth_from_whitening(fitted.bw_transform)
    bound = KDEErrorModel.of(x.numpy(), q.numpy(), h, (adapter_route(3), *adapter_loaded(3)), shared_whitening=True)
    assert_close_each(loaded(q), fitted(q), rtol=bound.rtol_each(want_log), atol=0)
    assert_close_each(loaded.log_prob(q), fitted.log_prob(q), atol=bound.log_atol_each(want_log))


# --------------------------------------------------------------------------- anomalib compatibility
def _centred_float32(n=400, d=4, seed=9):
    x = torch.from_numpy(_data(n, d, 0.0, seed)).float()
    return x - x.mean(dim=0)  # what anomalib handles correctly (PCA output)


def _loaded_anomalib_bound(state, queries):
    """kde_route_error for anomalib's per-row loop against this module on anomalib's own buffers.

    Shared whitening (both use the stored ``bw_transform``, ``dataset``, ``norm``): no bandwidth term.
    Rounding, float32: anomalib's direct differences of uncentred whitened queries; ours, ``f @ L``
    uncentred then the expanded square after shifting by the stored centroid. ``q`` comes from a float64
    evaluation of the same buffers (anomalib's float32 densities underflow where the bound still needs it).
    """
    whitening = state["bw_transform"].double().numpy()
    stored = state["dataset"].double().numpy()
    log_norm = math.log(float(state["norm"]))
    q = queries.double().numpy()
    log_density = kde_log_density_whitened(stored, q @ whitening, log_norm)
    train = np.linalg.solve(whitening.T, stored.T).T  # the data coordinates of the stored points
    routes = (ANOMALIB32, *adapter_loaded(4, np.float32))
    bound = KDEErrorModel.of(train, q, bandwidth_from_whitening(whitening), routes, shared_whitening=True)
    return bound, log_density


def test_anomalib_checkpoint_loads_strict_and_gives_anomalib_numbers():
    x = _centred_float32()
    reference = AnomalibGaussianKDE()
    reference.fit(x.clone())
    state = reference.state_dict()
    assert set(state) == {"bw_transform", "dataset", "norm"} and state["norm"].shape == ()
    kde = GaussianKDE()
    kde.load_state_dict(state)  # strict by default
    queries = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    # Bound: _loaded_anomalib_bound (float32 rounding of both per-row computations on shared buffers).
    bound, log_density = _loaded_anomalib_bound(state, queries)
    assert_close_each(kde(queries), reference(queries), rtol=bound.rtol_each(log_density), atol=bound.atol())
    # an uncentred anomalib checkpoint: we reproduce anomalib's (wrong) numbers, as the checkpoint defines them
    shifted = AnomalibGaussianKDE()
    shifted.fit(x + 3.0)
    loaded = GaussianKDE()
    loaded.load_state_dict(shifted.state_dict())
    # The same bound; these queries sit 3 standard deviations (~7 bandwidths) from the stored centred
    # data, so q and |y|^2 are ~10x larger than above (densities ~1e-18: eps q ~ 1e-5 in float32).
    bound, log_density = _loaded_anomalib_bound(shifted.state_dict(), queries + 3.0)
    assert_close_each(
        loaded(queries + 3.0), shifted(queries + 3.0), rtol=bound.rtol_each(log_density), atol=bound.atol()
    )


def test_hand_built_dfkde_state_dict_loads_nested_and_follows_anomalib_formula():
    g = torch.Generator().manual_seed(3)
    d, n = 3, 50
    whitening = torch.tril(torch.rand(d, d, generator=g)) + torch.eye(d)  # lower triangular, positive diagonal
    stored = torch.randn(n, d, generator=g)
    norm = torch.prod(torch.diag(whitening)) * (2 * math.pi) ** (-d / 2)
    state = {
        "model.classifier.kde_model.bw_transform": whitening,
        "model.classifier.kde_model.dataset": stored,
        "model.classifier.kde_model.norm": norm,  # 0-d float32
    }
    assert all(v.dtype == torch.float32 for v in state.values()) and norm.shape == ()
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.classifier = torch.nn.Module()
    model.model.classifier.kde_model = GaussianKDE()
    model.load_state_dict(state)  # strict
    kde = model.model.classifier.kde_model
    queries = torch.randn(6, d, generator=g)
    y = queries.double() @ whitening.double()
    sq = ((y[:, None, :] - stored.double()[None, :, :]) ** 2).sum(-1)
    expected = norm.double() * torch.exp(-sq / 2).mean(dim=1)
    # kde_route_error: the same (float32) buffers on both sides, the float64 formula exact by comparison;
    # our float32 side works from loaded buffers (uncentred f @ L, then the shifted expanded square).
    train = np.linalg.solve(whitening.double().numpy().T, stored.double().numpy().T).T
    h = bandwidth_from_whitening(whitening)
    bound = KDEErrorModel.of(train, queries.numpy(), h, (EXACT, *adapter_loaded(3, np.float32)), shared_whitening=True)
    assert_close_each(kde(queries).double(), expected, rtol=bound.rtol_each(torch.log(expected).numpy()), atol=0)
    assert kde(queries).dtype == torch.float32


def test_our_fit_agrees_with_anomalib_on_centred_data_and_anomalib_loads_ours():
    x = _centred_float32(seed=10)
    queries = torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
    reference = AnomalibGaussianKDE()
    reference.fit(x.clone())
    ours = GaussianKDE(x)
    for name in ("bw_transform", "dataset", "norm"):
        assert getattr(ours, name).dtype == torch.float32
        assert getattr(ours, name).shape == getattr(reference, name).shape
    # kde_route_error, two fits: ours (float64 fit, float32 buffers, centred expanded square) and
    # anomalib's (float32 fit through an explicit inverse, direct differences of uncentred queries).
    x64 = x.double().numpy()
    h = np.cov(x64.T) * len(x64) ** (-2.0 / (4 + 4))
    bound = KDEErrorModel.of(x64, queries.numpy(), h, (ADAPTER32, ANOMALIB32))
    log_density = anomstats.GaussianKDE(x64.T).logpdf(queries.double().numpy().T)
    assert_close_each(ours(queries), reference(queries), rtol=bound.rtol_each(log_density), atol=bound.atol())
    # anomalib loading our checkpoint of *uncentred* data computes the right (scipy) densities
    far = x.double() + 50.0
    ours_far = GaussianKDE(far.float())
    anomalib_loading_ours = AnomalibGaussianKDE()
    anomalib_loading_ours.load_state_dict(ours_far.state_dict())
    far_data = far.float().double().numpy()
    scipy_far = stats.gaussian_kde(far_data.T)
    far_queries = (queries.double() + 50.0).numpy()
    expected = scipy_far(far_queries.T)
    # kde_route_error: anomalib's float32 direct differences of whitened coordinates ~50 / bandwidth from
    # the origin (our float64 fit in float32 buffers) against scipy's own fit, float64, uncentred too.
    anomalib_on_ours = Route("direct", None, np.float32, np.float64)
    bound = KDEErrorModel.of(far_data, far_queries, scipy_far.covariance, (anomalib_on_ours, SCIPY))
    assert_close_each(
        anomalib_loading_ours(queries + 50.0).numpy(), expected, rtol=bound.rtol_each(scipy_far.logpdf(far_queries.T))
    )


def test_nested_dfkde_keys_and_state_dict_round_trip():
    x = torch.from_numpy(_data(300, 3, 7.0, seed=11))
    parent = torch.nn.Module()
    parent.classifier = torch.nn.Module()
    parent.classifier.kde_model = GaussianKDE(x)
    state = parent.state_dict()
    assert set(state) == {f"classifier.kde_model.{k}" for k in ("bw_transform", "dataset", "norm")}
    fresh = torch.nn.Module()
    fresh.classifier = torch.nn.Module()
    fresh.classifier.kde_model = GaussianKDE().double()
    fresh.load_state_dict(state)
    q = x[:9] + 0.2
    # the loaded module works from the stored buffers alone: same densities (to rounding of the centring)
    fitted = parent.classifier.kde_model
    want_log = fitted.log_prob(q).numpy()
    h = bandwidth_from_whitening(fitted.bw_transform)
    # kde_route_error: shared whitening; the fit's centred expanded square against the loaded route.
    bound = KDEErrorModel.of(x.numpy(), q.numpy(), h, (adapter_route(3), *adapter_loaded(3)), shared_whitening=True)
    assert_close_each(fresh.classifier.kde_model(q), fitted(q), rtol=bound.rtol_each(want_log), atol=0)
    as_float32 = GaussianKDE()
    as_float32.load_state_dict(fitted.state_dict())
    assert as_float32.dataset.dtype == torch.float32  # the module keeps its dtype; values are cast
    # kde_route_error: the buffers cast to float32 (a float64 fit applied in float32: the bandwidth term
    # with delta_H = 2 d eps32), the loaded route in float32, against the float64 fit.
    loaded32 = tuple(Route(r.squares, r.centre, np.float32, np.float64) for r in adapter_loaded(3))
    bound = KDEErrorModel.of(x.numpy(), q.numpy(), h, (adapter_route(3), *loaded32))
    assert_close_each(as_float32(q.float()).double(), fitted(q), rtol=bound.rtol_each(want_log), atol=0)


def test_anomalib_fit_modifies_its_input_ours_never_does():
    x = torch.from_numpy(_data(100, 3, 4.0, seed=12)).float()
    before = x.clone()
    AnomalibGaussianKDE().fit(x.clone().requires_grad_(False))  # the reference would centre `x` itself
    kde = GaussianKDE(x)
    kde(x[:5])
    kde.log_prob(x[:5])
    GaussianKDE.cov(x.T)
    assert torch.equal(x, before)
    spoiled = before.clone()
    AnomalibGaussianKDE().fit(spoiled)
    assert not torch.equal(spoiled, before)


def test_static_cov_matches_numpy_and_keeps_dtype():
    x = torch.from_numpy(_data(50, 3, 2.0, seed=13)).T.contiguous()
    # Bound: tests/_tolerances.covariance_atol (sums of n products of centred data, both sides).
    assert_close_each(GaussianKDE.cov(x).numpy(), np.cov(x.numpy()), atol=covariance_atol(x.numpy().T))
    assert GaussianKDE.cov(x.float()).dtype == torch.float32
    assert GaussianKDE.cov(torch.tensor([[1, 2, 4]])).dtype == torch.float32


# --------------------------------------------------------------------------- dtype / device policy
def test_half_input_is_computed_in_float32_and_float64_module_in_float64():
    x = torch.from_numpy(_data(200, 2, 1.0, seed=14))
    kde = GaussianKDE(x.float())
    q = x[:6].half()
    # Computed in float32 (issue 13): bfloat16 in, bfloat16 out; float16 queries get float32 densities
    # (densities exceed float16's range in general) and float16 log-densities. See tests/test_torch_dtypes.py.
    assert kde(q).dtype == torch.float32 and kde(q.bfloat16()).dtype == torch.bfloat16
    assert kde.log_prob(q).dtype == torch.float16
    # Exact (bound 0): half values are exactly representable in float32, so the same float32 computation runs.
    torch.testing.assert_close(kde(q), kde(q.float()), rtol=0, atol=0)
    double = GaussianKDE(x).double()
    assert double.dataset.dtype == torch.float64 and double(q.float()).dtype == torch.float64
    assert double(q).dtype == torch.float64  # a float16 query of a float64 module: the working dtype
    assert double.log_prob(q).dtype == torch.float16  # log-densities are returned in the input's half dtype
    assert GaussianKDE(x[:, :].half()).dataset.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_device_and_dtype_moves(device):
    x = torch.from_numpy(_data(150, 3, 2.0, seed=15))
    q = x[:8] + 0.5
    kde = GaussianKDE(x)
    expected = kde(q)
    want_log = kde.log_prob(q).numpy()
    h = bandwidth_from_whitening(kde.bw_transform)
    moved = GaussianKDE(x).to(device)
    assert moved.dataset.device.type == device
    # kde_route_error: the same fit (shared whitening) evaluated on another device (other blocking and
    # summation orders; identical on the CPU).
    bound = KDEErrorModel.of(x.numpy(), q.numpy(), h, (adapter_route(3), adapter_route(3)), shared_whitening=True)
    assert_close_each(moved(q.to(device)).cpu(), expected, rtol=bound.rtol_each(want_log), atol=0)
    as_float = GaussianKDE(x).float()
    # kde_route_error: the float64 fit's buffers cast to float32 and evaluated in float32.
    bound = KDEErrorModel.of(x.numpy(), q.numpy(), h, (ADAPTER32, adapter_route(3)))
    assert_close_each(as_float(q.float()).double(), expected, rtol=bound.rtol_each(want_log), atol=0)
    on_device = GaussianKDE(x.to(device))  # fit runs on the data's device
    assert on_device.bw_transform.device.type == device


# --------------------------------------------------------------------------- errors
def test_clear_errors():
    with pytest.raises(ValueError, match="more points than dimensions"):
        GaussianKDE(torch.randn(2, 3))
    with pytest.raises(LinAlgError, match="lower-dimensional subspace"):  # N == D: the rank test, as the core and scipy
        GaussianKDE(torch.randn(3, 3))
    with pytest.raises(ValueError, match="2-D"):
        GaussianKDE(torch.randn(10))
    with pytest.raises(ValueError, match="NaN or infinite"):
        GaussianKDE(torch.tensor([[0.0, 1.0], [1.0, math.nan], [2.0, 0.0], [3.0, 1.0]]))
    with pytest.raises(ValueError, match="singular"):
        GaussianKDE(torch.tensor([[0.0, 0.0], [1.0, 2.0], [2.0, 4.0], [3.0, 6.0]]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        GaussianKDE(np.zeros((10, 2)))
    with pytest.raises(RuntimeError, match="not fitted"):
        GaussianKDE()(torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"\(M, 2\)"):
        GaussianKDE(torch.randn(10, 2))(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="bw_method"):
        GaussianKDE(bw_method="scot")
    with pytest.raises(ValueError, match="chunk_bytes"):
        GaussianKDE(chunk_bytes=0)


def test_empty_query_batch():
    kde = GaussianKDE(torch.randn(20, 2, dtype=torch.float64))
    assert kde(torch.zeros(0, 2)).shape == (0,)
