"""Accuracy contract of GaussianKDE.pdf / logpdf (float64).

Every tolerance is the first-order error bound of ``tests/_tolerances.py`` (``kde_route_error``, summed
over the two computations compared), computed from the problem: the exponent ``q = 2 (log norm - log p)``
of each density, the condition number of the kernel covariance (few points in many dimensions are badly
conditioned: n = d + 2 in d = 24 gives kappa up to ~1e6), and the queries' squared norms in whitened units
from each computation's centre.

* Against scipy near the origin, weighted or not, for every kind of bw_method.
* Data and queries offset by 1e3: scipy itself loses about eps * |x| / bandwidth there (it whitens
  uncentred data), so the offset results are checked against scipy's value for the *translated-back*
  problem (the same density, computed where scipy is accurate), against a long-double reference, and,
  loosely, against scipy's untranslated problem (the bound then holds the rounding of data ~1e3 from
  the origin).
* Against exact normal mixtures in 1-D and 2-D.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from anomstats import GaussianKDE
from tests._tolerances import EXACT, SCIPY, KDEErrorModel, Route, assert_close_each, core_route

BW_KINDS = ["default", "scott", "silverman", "scalar", "callable"]


def _bw(kind, rng):
    if kind == "default":
        return None
    if kind in ("scott", "silverman"):
        return kind
    if kind == "scalar":
        return float(rng.uniform(0.2, 1.5))
    return lambda kde: 0.9 * kde.silverman_factor()


def _problem(seed, n, m, d, weighted, bw_kind):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) * 0.3 + np.eye(d)
    x = mix @ rng.standard_normal((d, n))
    # Queries around the data, some a few kernel widths out.
    p = mix @ (rng.standard_normal((d, m)) * rng.uniform(0.5, 2.0))
    w = rng.random(n) + 0.05 if weighted else None
    return x, p, w, _bw(bw_kind, rng)


def _longdouble_logpdf(kde, points):
    """Direct long-double evaluation of scipy's formula (reference for accuracy)."""
    ld = np.longdouble
    chol = kde.cho_cov.astype(ld)
    d = chol.shape[0]
    centre = kde.dataset.astype(ld).mean(axis=1, keepdims=True)

    def whiten(a):
        a = a.astype(ld) - centre
        z = np.empty_like(a)
        for k in range(d):
            z[k] = (a[k] - chol[k, :k] @ z[:k]) / chol[k, k]
        return z

    zx, zp = whiten(kde.dataset), whiten(points)
    r2 = ((zp.T[:, None, :] - zx.T[None, :, :]) ** 2).sum(axis=-1)
    expo = -r2 / 2 + np.log(kde.weights.astype(ld))
    top = expo.max(axis=1)
    log_norm = -np.log(np.diagonal(chol)).sum() - ld(d) / 2 * np.log(2 * np.pi, dtype=ld)
    return top + np.log(np.exp(expo - top[:, None]).sum(axis=1)) + log_norm


sizes = dict(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(2, 60),
    m=st.integers(1, 25),
    d=st.integers(1, 24),
    weighted=st.booleans(),
    bw_kind=st.sampled_from(BW_KINDS),
)


@given(**sizes)
def test_pdf_and_logpdf_match_scipy_near_origin(seed, n, m, d, weighted, bw_kind):
    n = max(n, d + 2)
    x, p, w, bw = _problem(seed, n, m, d, weighted, bw_kind)
    ours, ref = GaussianKDE(x, bw_method=bw, weights=w), stats.gaussian_kde(x, bw_method=bw, weights=w)
    want_log = ref.logpdf(p)
    # kde_route_error: our route (direct differences up to d = 2, the expanded square above, centred at
    # the weighted mean) and scipy's direct differences from the origin, each with its own fit (kappa).
    bound = KDEErrorModel.of(x.T, p.T, ours.covariance, (core_route(d), SCIPY), weights=ours.weights)
    assert_close_each(ours.logpdf(p), want_log, atol=bound.log_atol_each(want_log))
    pdf, want = ours.pdf(p), ref.pdf(p)
    # The same bound, relative; plus the subnormal spacing where scipy's pdf is subnormal (bound.atol).
    assert np.all(np.abs(pdf - want) <= bound.rtol_each(want_log) * want + bound.atol())


@given(**sizes)
def test_offset_by_1e3_matches_scipy_translated_and_long_double(seed, n, m, d, weighted, bw_kind):
    n = max(n, d + 2)
    x, p, w, bw = _problem(seed, n, m, d, weighted, bw_kind)
    offset = 1e3
    ours = GaussianKDE(x + offset, bw_method=bw, weights=w)
    ref = stats.gaussian_kde(x, bw_method=bw, weights=w)
    got_log = ours.logpdf(p + offset)
    # The translated problem is the same density up to rounding of the data (x + 1e3 - 1e3 != x) and of
    # the data covariance (computed from offset data); give scipy our data covariance to isolate evaluation.
    translated = stats.gaussian_kde((x + offset) - offset, bw_method=bw, weights=w)
    translated._data_covariance = ours._data_covariance
    translated._data_cho_cov = ours._data_cho_cov
    translated._compute_covariance()
    back_x, back_p = ((x + offset) - offset), ((p + offset) - offset)  # exact subtractions (Sterbenz)
    want_log = translated.logpdf(back_p)
    # kde_route_error: our centred route against scipy's on the translated (near-origin) problem. The
    # covariance is shared but each side still solves with its factor: the kappa term stays.
    bound = KDEErrorModel.of(back_x.T, back_p.T, ours.covariance, (core_route(d), SCIPY), weights=ours.weights)
    assert_close_each(got_log, want_log, atol=bound.log_atol_each(want_log))
    want = translated.pdf(back_p)
    assert np.all(np.abs(ours.pdf(p + offset) - want) <= bound.rtol_each(want_log) * want + bound.atol())
    # Direct comparison with scipy: only as good as the rounding of data ~1e3 from the origin (x + 1e3 moves
    # each point by ~eps * 1e3 / bandwidth in whitened units, the direct-difference term measured from the
    # origin of the offset problem): a loose sanity check.
    # x + 1e3 also moves the fitted covariance (input_rounding: half an ulp of 1e3 + |x| per coordinate).
    rounding = np.finfo(float).eps / 2 * (offset + np.abs(x).max())
    direct = KDEErrorModel.of(
        (x + offset).T, (p + offset).T, ours.covariance, (core_route(d), SCIPY), weights=ours.weights, input_rounding=rounding
    )
    assert_close_each(got_log, ref.logpdf(p), atol=direct.log_atol_each(ref.logpdf(p)))
    ld = _longdouble_logpdf(ours, p + offset).astype(np.float64)
    # kde_route_error of our route alone (the long-double reference is exact by comparison). The reference
    # uses our cho_cov, but our float64 triangular solve with it has the kappa term's backward error.
    alone = KDEErrorModel.of((x + offset).T, (p + offset).T, ours.covariance, (core_route(d), EXACT), weights=ours.weights)
    assert_close_each(got_log, ld, atol=alone.log_atol_each(ld))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n", [500, 3000])  # blocks of queries / one query at a time
def test_exact_normal_mixture_1d(n, weighted):
    rng = np.random.default_rng(8765678)
    xn = rng.normal(0, 1, n)
    w = rng.random(n) if weighted else None
    kde = GaussianKDE(xn, weights=w)
    xx = np.array([0.1, 0.5, 0.9, -2.5, 3.0])
    mix = stats.norm.pdf(xx[:, None], loc=kde.dataset, scale=np.sqrt(kde.covariance))
    want = (mix * kde.weights).sum(axis=-1)
    # kde_route_error: ours against scipy.stats.norm's direct (x - loc) / scale, summed in float64.
    bound = KDEErrorModel.of(xn[:, None], xx[:, None], kde.covariance, (core_route(1), Route("direct", None)), weights=kde.weights)
    assert_close_each(kde(xx), want, rtol=bound.rtol_each(np.log(want)))
    assert_close_each(kde.logpdf(xx), np.log(want), atol=bound.log_atol_each(np.log(want)))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n", [20, 500, 3000])
def test_exact_normal_mixture_2d(n, weighted):
    rng = np.random.default_rng(8765678)
    xn = rng.multivariate_normal([1.0, 3.0], [[1.0, 2.0], [2.0, 6.0]], size=n).T
    w = rng.random(n) if weighted else None
    kde = GaussianKDE(xn, weights=w)
    xx = np.array([[1, 2], [3, 4], [5, 6], [-1, 0]], dtype=float)
    arg = xx[:, None, :] - kde.dataset.T
    mix = stats.multivariate_normal.pdf(arg, cov=kde.covariance)
    want = (mix * kde.weights).sum(axis=-1)
    # kde_route_error: ours against scipy's multivariate normal (its own factorisation of the same
    # covariance, by eigenvalues: the kappa term; differences formed first, then whitened).
    bound = KDEErrorModel.of(xn.T, xx, kde.covariance, (core_route(2), Route("direct", None)), weights=kde.weights)
    assert_close_each(kde(xx.T), want, rtol=bound.rtol_each(np.log(want)))


@pytest.mark.parametrize("d", [4, 16, 64])
def test_product_route_accuracy_against_long_double(d):
    rng = np.random.default_rng(d)
    x = rng.standard_normal((d, 80)) + 5.0
    p = rng.standard_normal((d, 30)) * 1.5 + 5.0
    kde = GaussianKDE(x, weights=rng.random(80))
    ref = _longdouble_logpdf(kde, p).astype(np.float64)
    # kde_route_error of the product route alone (long double is exact by comparison; kappa term for the
    # float64 triangular solve with cho_cov); the pdf's relative error is the log-density's absolute one.
    bound = KDEErrorModel.of(x.T, p.T, kde.covariance, (core_route(d), EXACT), weights=kde.weights)
    assert_close_each(kde.logpdf(p), ref, atol=bound.log_atol_each(ref))
    assert_close_each(kde.pdf(p), np.exp(ref), rtol=bound.rtol_each(ref))

