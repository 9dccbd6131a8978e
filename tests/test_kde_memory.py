"""Evaluation is chunked under a memory budget, threads do not change results, and every route agrees."""

import tracemalloc

import numpy as np
import pytest
from scipy import stats

from anomstats import GaussianKDE
from anomstats import _kernel_sums
from tests._tolerances import SCIPY, KDEErrorModel, Route, assert_close_each, core_route


def _same_fit_bound(kde, points):
    """kde_route_error for two evaluations of one fit (shared whitening: only rounding orders differ)."""
    route = core_route(kde.d)
    return KDEErrorModel.of(kde.dataset.T, points.T, kde.covariance, (route, route), shared_whitening=True, weights=kde.weights)


@pytest.mark.parametrize("d", [1, 2, 5, 12])
def test_results_do_not_depend_on_budget_or_threads(d):
    rng = np.random.default_rng(d)
    x = rng.standard_normal((d, 3000))
    p = np.hstack([rng.standard_normal((d, 300)), rng.standard_normal((d, 20)) * 40])  # near and far
    w = rng.random(3000)
    base = GaussianKDE(x, weights=w)
    want_pdf, want_log = base.pdf(p), base.logpdf(p)
    # Budgets and threads change only the blocking (shared fit): _same_fit_bound, per point.
    same = _same_fit_bound(base, p)
    for memory_budget, workers in [(4096, 1), (4096, 2), (1 << 16, 3), (1 << 30, 2)]:
        kde = GaussianKDE(x, weights=w, memory_budget=memory_budget, workers=workers)
        assert_close_each(kde.pdf(p), want_pdf, rtol=same.rtol_each(want_log), atol=same.atol())
        assert_close_each(kde.logpdf(p), want_log, atol=same.log_atol_each(want_log))
    ref = stats.gaussian_kde(x, weights=w)
    # kde_route_error against scipy (each side its own fit).
    bound = KDEErrorModel.of(x.T, p.T, ref.covariance, (core_route(d), SCIPY), weights=ref.weights)
    assert_close_each(want_log, ref.logpdf(p), atol=bound.log_atol_each(ref.logpdf(p)))
    near = slice(0, 300)
    assert_close_each(want_pdf[near], ref.pdf(p[:, near]), rtol=bound.rtol_each(ref.logpdf(p))[near])


@pytest.mark.parametrize("d", [2, 8])
def test_peak_memory_is_bounded_by_the_budget(d):
    rng = np.random.default_rng(0)
    n = m = 4000  # an unchunked n x m float64 matrix would take 128 MB
    x = rng.standard_normal((d, n))
    p = rng.standard_normal((d, m))
    budget = 1 << 20
    kde = GaussianKDE(x, memory_budget=budget, workers=2)
    kde.pdf(p[:, :5])  # build the cached whitened data outside the measurement
    tracemalloc.start()
    try:
        kde.pdf(p)
        kde.logpdf(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    inputs = (n + m) * d * 8 * 4  # whitened copies of the queries and a few O(m) vectors
    assert peak < budget + inputs + (1 << 18), peak


def test_budget_and_thread_arguments_are_validated():
    x = np.arange(5.0)
    # One message per fault across the library (issue 10): the KDE uses the core's budget/worker checks.
    with pytest.raises(ValueError, match="memory_budget must be a positive number of bytes"):
        GaussianKDE(x, memory_budget=0)
    with pytest.raises(ValueError, match="workers must be a positive integer or None"):
        GaussianKDE(x, workers=0)
    with pytest.raises(ValueError, match="memory_budget must be a positive number of bytes"):
        centres = _kernel_sums.WhitenedCentres(np.zeros((2, 1)), np.ones(2))
        _kernel_sums.kernel_sums(centres, np.zeros((1, 1)), memory_budget=-1)


@pytest.mark.parametrize("d", [1, 3, 4, 30])
def test_shifted_route_streams_over_many_centre_blocks(d):
    # n larger than a column block, queries so far that only the shifted log-sum-exp can represent them.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((d, 5000))
    p = rng.standard_normal((d, 7)) * 3 + 200.0
    kde = GaussianKDE(x, weights=rng.random(5000))
    ref = stats.gaussian_kde(x, weights=kde.weights)
    got = kde.logpdf(p)
    assert np.isfinite(got).all()
    # kde_route_error against scipy: q ~ (200 / bandwidth)^2 d, so eps q dominates (absolute on log p).
    want = ref.logpdf(p)
    bound = KDEErrorModel.of(x.T, p.T, ref.covariance, (core_route(d), SCIPY), weights=ref.weights)
    assert_close_each(got, want, atol=bound.log_atol_each(want))


def test_few_shifted_rows_take_wider_blocks_and_still_stream(monkeypatch):
    # 5 far queries among 2000 near ones: the far row block takes as many centres per block as the worker's
    # buffer holds for 5 rows (_Buffers.cols_for), here two blocks over 30000 centres, so the running shift
    # is still rescaled across blocks. Against scipy (kde_route_error), and against thin blocks (same fit).
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 30000))
    p = np.hstack([rng.standard_normal((3, 2000)), rng.standard_normal((3, 5)) * 3 + 60.0])
    kde = GaussianKDE(x, workers=2)
    seen = []
    shifted = _kernel_sums._shifted_log_sums

    def spy(centres, points, cols, buffers, own):
        seen.append((points.shape[0], buffers.cols_for(points.shape[0], cols, centres.n)))
        return shifted(centres, points, cols, buffers, own)

    monkeypatch.setattr(_kernel_sums, "_shifted_log_sums", spy)
    got = kde.logpdf(p)
    far_blocks = [cols for rows, cols in seen if rows == 5]
    assert len(far_blocks) == 1 and 15000 <= far_blocks[0] < 30000  # two blocks, each far wider than 128
    ref = stats.gaussian_kde(x)
    want = ref.logpdf(p)
    bound = KDEErrorModel.of(x.T, p.T, ref.covariance, (core_route(3), SCIPY))
    assert_close_each(got, want, atol=bound.log_atol_each(want))
    thin = GaussianKDE(x, workers=1, memory_budget=1 << 14).logpdf(p)  # 5-row blocks of a few hundred centres
    assert_close_each(got, thin, atol=_same_fit_bound(kde, p).log_atol_each(got))


@pytest.mark.parametrize("d", [1, 2])
def test_kernel_sums_direct_and_product_routes_agree(monkeypatch, d):
    rng = np.random.default_rng(2)
    z = rng.standard_normal((500, d))
    q = np.vstack([rng.standard_normal((40, d)) * 2, rng.standard_normal((3, d)) + 60.0])
    w = rng.random(500)
    monkeypatch.setattr(_kernel_sums, "DIRECT_MAX_D", 2)  # both routes exist for d <= 2; compare them
    centres = _kernel_sums.WhitenedCentres(z, w)
    assert not centres.use_products
    direct = _kernel_sums.kernel_sums(centres, q)
    monkeypatch.setattr(_kernel_sums, "DIRECT_MAX_D", 0)
    centres_p = _kernel_sums.WhitenedCentres(z, w)
    assert centres_p.use_products
    product = _kernel_sums.kernel_sums(centres_p, q)
    # Already whitened (identity bandwidth, no fit): kde_route_error's rounding terms for the expanded
    # square against direct differences, both from the origin of these coordinates. The sums are of
    # unnormalised weights: log S = log p - log norm + log(sum w).
    r2 = ((q[:, None, :] - z[None]) ** 2).sum(-1)
    exact = np.log(np.exp(-r2 / 2 - (-r2 / 2).max(axis=1, keepdims=True)) @ w) + (-r2 / 2).max(axis=1)
    routes = (Route("expanded", None), Route("direct", None))
    bound = KDEErrorModel.of(z, q, np.eye(d), routes, shared_whitening=True, weights=w)
    log_density = exact + bound.log_norm - np.log(w.sum())
    assert_close_each(product[0], direct[0], atol=bound.log_atol_each(log_density))
    assert_close_each(product[1], direct[1], rtol=bound.rtol_each(log_density), equal_nan=True)
    assert np.isnan(direct[1][-3:]).all()  # far rows took the shifted route
    # Both direct differences (the reference in float64 with the same formula): two direct routes.
    twice_direct = KDEErrorModel.of(z, q, np.eye(d), (routes[1], routes[1]), shared_whitening=True, weights=w)
    assert_close_each(direct[0], exact, atol=twice_direct.log_atol_each(log_density))


def _whitening_error(cho, centred, eps):
    """Bound on the difference of two whitenings of ``centred`` (d, k) by the factor ``cho``, per coordinate (k, d).

    Forward errors (Higham, Accuracy and Stability, 8.1 and 14.2): the solve's |dz| <= d eps |L^-1| |L| |z|
    and the product's |dz| <= d eps |L^-1| |c| + |dW| |c| with |dW| <= d eps |L^-1| |L| |L^-1|; both are
    covered, with the rounding of c, by 4 d eps |L^-1| |L| |L^-1| |c|.
    """
    cho = np.asarray(cho, dtype=np.float64)
    w = np.abs(np.linalg.inv(cho))
    return 4 * cho.shape[0] * eps * (w @ np.abs(cho) @ w @ np.abs(centred)).T


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [2, 16, 100])
def test_whitening_by_the_inverse_factor_agrees_with_the_triangular_solve(monkeypatch, d, dtype):
    rng = np.random.default_rng(d)
    a = rng.standard_normal((d, d))
    cho = np.linalg.cholesky(a @ a.T + 0.1 * np.eye(d)).astype(dtype)
    x = (3.0 * rng.standard_normal((d, 8 * d))).astype(dtype)  # 8 points per dimension: the product
    mean = rng.standard_normal(d).astype(dtype)
    x_before = x.copy()
    product = _kernel_sums.whiten(x, mean, cho)
    monkeypatch.setattr(_kernel_sums, "_WHITEN_PRODUCT_MIN_RATIO", 10**9)  # every call solves
    solve = _kernel_sums.whiten(x, mean, cho)
    assert product.shape == solve.shape == (8 * d, d)
    assert product.dtype == solve.dtype == dtype and product.flags.c_contiguous
    np.testing.assert_array_equal(x, x_before)
    # Both routes' forward errors with the rounding of c = x - mean: see _whitening_error.
    c = x.astype(np.float64) - mean.astype(np.float64)[:, None]
    assert_close_each(product, solve, atol=_whitening_error(cho, c, np.finfo(dtype).eps))
    # Only the lower triangle of the factor is read, on both routes (cho_factor leaves junk above it).
    junk = cho + np.triu(np.full((d, d), 5.0, dtype=dtype), 1)
    monkeypatch.setattr(_kernel_sums, "_WHITEN_PRODUCT_MIN_RATIO", 4)
    np.testing.assert_array_equal(_kernel_sums.whiten(x, mean, junk), product)


def test_a_cho_cov_with_junk_above_the_diagonal_scores_as_scipy_does():
    # scipy reads only the lower triangle of cho_cov; a factor from scipy.linalg.cho_factor has junk above it.
    rng = np.random.default_rng(4)
    x, p = rng.standard_normal((3, 200)), rng.standard_normal((3, 50))  # >= 4 points per dimension: products
    kde = GaussianKDE(x)
    before = kde.logpdf(p)
    junk = kde.cho_cov.copy()
    junk[np.triu_indices(3, 1)] = 5.0
    kde.cho_cov = junk
    np.testing.assert_array_equal(kde.logpdf(p), before)


def test_whitening_by_the_inverse_factor_runs_in_the_wider_dtype():
    # float32 points with a float64 factor: the solve ran in float64 and rounded once to float32; so does
    # the product (inverse in float32 would be off by about cond(L) eps32 ~ 1e-5 here).
    rng = np.random.default_rng(3)
    d = 8
    a = rng.standard_normal((d, d))
    cho = np.linalg.cholesky(a @ a.T + 1e-3 * np.eye(d))
    x = rng.standard_normal((d, 64)).astype(np.float32)
    mean = np.zeros(d, dtype=np.float32)
    got = _kernel_sums.whiten(x, mean, cho)
    want = np.linalg.solve(cho, x.astype(np.float64)).T
    assert got.dtype == np.float32
    # One float32 rounding of the float64 result (eps32 / 2 relative), plus both float64 routes' forward errors.
    error = _whitening_error(cho, x.astype(np.float64), np.finfo(np.float64).eps)
    assert_close_each(got, want, rtol=np.finfo(np.float32).eps / 2, atol=error)


def test_empty_queries():
    kde = GaussianKDE(np.random.default_rng(0).standard_normal((2, 10)))
    assert kde.pdf(np.empty((2, 0))).shape == (0,)
    assert kde.logpdf(np.empty((2, 0))).shape == (0,)


def test_concurrent_calls_agree_and_restore_blas_threads():
    from concurrent.futures import ThreadPoolExecutor

    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = [info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]
    rng = np.random.default_rng(4)
    kde = GaussianKDE(rng.standard_normal((6, 400)))
    queries = [rng.standard_normal((6, 50)) for _ in range(8)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(kde.logpdf, queries))
    for q, got in zip(queries, results, strict=True):
        want = kde.logpdf(q)
        assert_close_each(got, want, atol=_same_fit_bound(kde, q).log_atol_each(want))  # shared fit
    after = [info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]
    assert after == before


def _pdf_in_child(args):
    kde, q = args
    return kde.pdf(q)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_evaluation_works_in_a_forked_child_after_threads_ran_in_the_parent():
    import multiprocessing

    rng = np.random.default_rng(5)
    kde = GaussianKDE(rng.standard_normal((3, 2000)), workers=2)
    q = rng.standard_normal((3, 400))
    want = kde.pdf(q)  # starts the worker pool in this process
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.map(_pdf_in_child, [(kde, q)])[0]
    assert_close_each(got, want, rtol=_same_fit_bound(kde, q).rtol_each(kde.logpdf(q)))  # shared fit


def test_clamped_exp_checks_only_the_tail_it_is_given():
    floor = _kernel_sums.exp_floor(np.dtype(np.float64))
    block = np.array([[-1.0, -2.0], [-1e4, -3.0], [-1e4, 0.0]])
    head = np.exp(block[:1])
    _kernel_sums._clamped_exp(block, 1)
    # Row 0 is the caller's promise (no exponent below the floor): plain exp. Rows 1: are clamped, so the
    # far exponent gives exp(floor) (a normal number, no subnormal slow path) and the rest plain exp.
    np.testing.assert_array_equal(block[0], head[0])
    np.testing.assert_array_equal(block[1:, 0], np.exp(floor))
    np.testing.assert_array_equal(block[1:, 1], np.exp([-3.0, 0.0]))


@pytest.mark.parametrize("d", [2, 8])
def test_query_order_does_not_change_the_densities(d):
    # Queries that may need the clamp before exp are blocked last, so that only the last blocks pay it;
    # a mix of near rows, rows whose farthest kernels underflow (they need the clamp) and far rows (shifted
    # route), in scattered order, must give every row its own density whatever its neighbours.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((d, 3000))
    near = rng.standard_normal((d, 400))
    outer = rng.standard_normal((d, 60)) * 4.0
    far = rng.standard_normal((d, 8)) * 10.0 + 25.0
    p = np.concatenate([near, outer, far], axis=1)[:, rng.permutation(468)]
    kde = GaussianKDE(x, memory_budget=64 * 1024)  # small row blocks: many blocks, few outer ones
    ref = stats.gaussian_kde(x)
    got = kde.logpdf(p)
    # kde_route_error against scipy, as above (absolute on log p; eps q grows with the query's distance).
    want = ref.logpdf(p)
    bound = KDEErrorModel.of(x.T, p.T, ref.covariance, (core_route(d), SCIPY))
    assert_close_each(got, want, atol=bound.log_atol_each(want))
    # The same queries in reverse order: the same computation per row, its block neighbours changed (BLAS
    # may accumulate a row differently in another block position: the core route's bound, twice).
    twice = KDEErrorModel.of(x.T, p.T, ref.covariance, (core_route(d), core_route(d)))
    assert_close_each(kde.logpdf(p[:, ::-1])[::-1], got, atol=twice.log_atol_each(want))
