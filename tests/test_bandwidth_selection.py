"""Bandwidth selection: the leave-one-out likelihood, ``cv_ml`` factors and per-dimension bandwidths, and
``GaussianKDE(kernel_covariance=H)``.

References: a brute-force leave-one-out log-density (every pair, ``scipy.special.logsumexp``),
statsmodels' own ``KDEMultivariate.loo_likelihood`` (an independent implementation of the same objective)
and its ``bw='cv_ml'`` selection, and the explicit Gaussian mixture ``sum_i w_i N(x; x_i, H)``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import linalg, optimize, special, stats

from anomstats import GaussianKDE, cov
from anomstats.bandwidth import (
    check_kernel_covariance,
    cv_ml_bandwidths,
    cv_ml_factor,
    loo_log_likelihood,
)
from anomstats._validation import NON_FINITE_DATA
from tests._tolerances import TWO_SIDES, eps, sum_error

EPS = eps(np.float64)


def brute_loo(x: np.ndarray, h: np.ndarray, w: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Brute-force mean leave-one-out log-density (every pair) and each point's term magnitude bound."""
    x = np.atleast_2d(x)
    d, n = x.shape
    w = np.full(n, 1.0 / n) if w is None else np.asarray(w, float) / np.sum(w)
    chol = np.linalg.cholesky(np.atleast_2d(h))
    z = linalg.solve_triangular(chol, x, lower=True)
    r2 = ((z[:, :, None] - z[:, None, :]) ** 2).sum(axis=0)
    with np.errstate(divide="ignore"):
        log_terms = -r2 / 2 + np.log(w)[None, :]
    np.fill_diagonal(log_terms, -np.inf)
    keep = w > 0
    log_sums = special.logsumexp(log_terms[np.ix_(keep, keep)], axis=1)
    log_norm = -0.5 * (d * np.log(2 * np.pi) + 2 * np.log(np.diag(chol)).sum())
    per_point = log_sums - np.log1p(-w[keep]) + log_norm
    # The exponents that matter are those near each point's nearest neighbour: r2 there is what rounding
    # is relative to, amplified by the condition number of the whitening factor (a triangular solve's
    # forward error is relative to cond(L) = sqrt(cond(H))).
    nearest = np.where(np.eye(n, dtype=bool), np.inf, r2)[np.ix_(keep, keep)].min(axis=1)
    # Data far from the origin are rounded to eps * |x| in either computation's differences: in whitened
    # units that is eps * offset_reach, which moves r2 by 2 sqrt(r2) times it.
    kappa = np.sqrt(np.linalg.cond(np.atleast_2d(h)))
    offset_reach = np.abs(x).max() / np.sqrt(np.linalg.eigvalsh(np.atleast_2d(h)).min())
    spread = kappa * (nearest + d) + 2 * offset_reach * np.sqrt(nearest + d)
    return float(w[keep] @ per_point), np.abs(per_point) + spread


def loo_rtol(x, magnitudes, w=None) -> float:
    """Error bound of the mean leave-one-out log-density, relative to its own size.

    Each point's term is off by about ``eps * (|term| + kappa (r2_nearest + d) + 2 reach sqrt(r2_nearest
    + d))`` in each computation (``reach = max|x| / sqrt(lambda_min(H))``, the offset in bandwidths)
    (``kappa = cond(L)``: whitening and the squared distances are relative to the whitened norms, kept
    O(r2 + d) by the centring; the
    log-sum-exp is relative to the log; the product route is charged ``d`` more for its expanded square),
    times a small constant for the few roundings per step (8), and the weighted mean adds ``sqrt(n) eps``.
    Both computations carry it (TWO_SIDES). For the tests' problems it is 1e-13 - 1e-12, well inside the
    issue's 1e-10, and a wrong normaliser (n vs n - 1) is ~1/n.
    """
    n = np.atleast_2d(x).shape[1]
    w = np.full(n, 1.0 / n) if w is None else np.asarray(w, float) / np.sum(w)
    bound = 8 * EPS * float(w[w > 0] @ magnitudes) + sum_error(n) * float(w[w > 0] @ magnitudes)
    return TWO_SIDES * bound


def _data(seed: int, d: int, n: int, offset: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 3.0, (d, 1))
    x = rng.standard_normal((d, n)) * scale
    x[:, : n // 3] += 3.0  # two clusters: a likelihood with a real maximum
    return x + offset


# ---------------------------------------------------------------------------- the objective


@given(
    seed=st.integers(0, 2**31),
    d=st.sampled_from([1, 2, 3, 5, 12]),  # 12 > DIRECT_MAX_D: the matrix-product route
    n=st.integers(3, 120),
    factor=st.floats(0.02, 3.0),
    weighted=st.booleans(),
    offset=st.sampled_from([0.0, 1e3]),
)
def test_loo_log_likelihood_matches_brute_force(seed, d, n, factor, weighted, offset):
    x = _data(seed, d, n, offset)
    h = np.atleast_2d(np.cov(x)) * factor**2 + 1e-3 * np.eye(d)
    w = np.random.default_rng(seed + 1).uniform(0.0, 1.0, n) if weighted else None
    if w is not None:
        w[0] = 0.0  # a zero weight neither counts nor contributes
    expected, magnitudes = brute_loo(x, h, w)
    got = loo_log_likelihood(x, h, w)
    # Bound: loo_rtol (about 1e-13 here); the issue asks for 1e-10.
    assert abs(got - expected) <= loo_rtol(x, magnitudes, w) * max(1.0, abs(expected))
    assert abs(got - expected) <= 1e-10 * max(1.0, abs(expected))


def test_loo_log_likelihood_far_apart_points_use_the_shifted_route():
    # Bandwidth 1e-3 of the spread: every other point is thousands of bandwidths away, so the plain sums
    # underflow to 0 and the log-sum-exp route gives the (finite) answer.
    x = _data(3, 2, 80)
    h = np.eye(2) * 1e-6
    expected, magnitudes = brute_loo(x, h)
    got = loo_log_likelihood(x, h)
    assert np.isfinite(got) and got < -1e3
    assert abs(got - expected) <= loo_rtol(x, magnitudes) * abs(expected)


def test_loo_log_likelihood_agrees_with_statsmodels_objective():
    # statsmodels sums log(sum_{j != i} K_h(x_i - x_j)) without the 1/(n - 1): ours is that / n - log(n - 1).
    smkd = pytest.importorskip("statsmodels.nonparametric.kernel_density")
    x = _data(5, 3, 150)
    bw = np.array([0.4, 0.9, 0.6])
    model = smkd.KDEMultivariate(x.T, var_type="ccc", bw=bw)
    theirs = -model.loo_likelihood(bw, np.log) / x.shape[1] - np.log(x.shape[1] - 1)
    ours = loo_log_likelihood(x, np.diag(bw**2))
    expected, magnitudes = brute_loo(x, np.diag(bw**2))
    # Bound: both against the brute force's loo_rtol (statsmodels sums kernel products directly).
    assert abs(ours - theirs) <= 2 * loo_rtol(x, magnitudes) * abs(expected)


def test_loo_log_likelihood_blocks_and_workers_do_not_change_it():
    x = _data(7, 12, 300)  # product route
    h = np.atleast_2d(np.cov(x)) * 0.3
    reference = loo_log_likelihood(x, h, workers=1)
    expected, magnitudes = brute_loo(x, h)
    for budget, workers in [(4096, 1), (1 << 16, 2), (1 << 30, 2)]:
        got = loo_log_likelihood(x, h, memory_budget=budget, workers=workers)
        # Bound: other blocks only reorder the sums (loo_rtol covers any order).
        assert abs(got - reference) <= loo_rtol(x, magnitudes) * abs(expected)


def test_loo_log_likelihood_inputs_untouched_and_errors():
    x = _data(1, 2, 40)
    h = np.array([[1.0, 0.2], [0.2, 0.5]])
    w = np.linspace(1.0, 2.0, 40)
    copies = (x.copy(), h.copy(), w.copy())
    loo_log_likelihood(x, h, w)
    for before, after in zip(copies, (x, h, w)):
        np.testing.assert_array_equal(before, after)
    bad = x.copy()
    bad[0, 3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        loo_log_likelihood(bad, h)
    assert str(pytest.raises(ValueError, loo_log_likelihood, bad, h).value) == NON_FINITE_DATA
    with pytest.raises(ValueError, match="at least two points of positive weight"):
        loo_log_likelihood(x, h, np.r_[1.0, np.zeros(39)])
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        loo_log_likelihood(x, np.eye(3))
    with pytest.raises(ValueError, match="`weights` must be non-negative"):
        loo_log_likelihood(x, h, -w)


# ---------------------------------------------------------------------------- scipy's model: cv_ml factor


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("d", [1, 2, 4])
def test_cv_ml_factor_maximises_the_brute_force_likelihood(d, weighted):
    x = _data(11 + d, d, 150)
    w = np.random.default_rng(d).uniform(0.2, 1.0, 150) if weighted else None
    data_cov = np.atleast_2d(cov(x, aweights=w))
    factor = cv_ml_factor(x, w)

    def negative(log_f):
        return -brute_loo(x, np.exp(2 * log_f) * data_cov, w)[0]

    best = optimize.minimize_scalar(negative, bracket=(np.log(factor) - 0.3, np.log(factor) + 0.3),
                                    tol=1e-12)
    # A golden-section/Brent search on the objective itself locates the maximum to about
    # sqrt(eps * |l| / l'') ~ 1e-8 relative (the objective is flat there); the issue asks for 1e-6.
    assert abs(np.exp(best.x) / factor - 1) <= 1e-6
    # And the factor is a maximum: moving it either way by 1e-3 lowers the likelihood.
    at = brute_loo(x, factor**2 * data_cov, w)[0]
    for step in (0.999, 1.001):
        assert brute_loo(x, (factor * step) ** 2 * data_cov, w)[0] < at


def test_gaussian_kde_cv_ml_rule():
    x = _data(2, 2, 200)
    factor = cv_ml_factor(x)
    kde = GaussianKDE(x, bw_method="cv_ml")
    assert kde.factor == factor and kde.covariance_factor() == factor
    # Bound 0: the KDE's uniform weights are no weights to the selection (equal weights select exactly as
    # none), so the KDE, the function and the torch adapter agree to the last bit.
    fixed = GaussianKDE(x, bw_method=factor)
    q = _data(9, 2, 30)
    np.testing.assert_array_equal(kde.pdf(q), fixed.pdf(q))  # the same factor: the same arithmetic
    # set_bandwidth moves between the rules and back
    kde.set_bandwidth("scott")
    assert kde.factor == kde.scotts_factor()
    kde.set_bandwidth("cv_ml")
    assert kde.factor == factor
    # Weighted: the factor of the weighted objective.
    w = np.linspace(0.5, 2.0, 200)
    assert GaussianKDE(x, "cv_ml", w).factor == cv_ml_factor(x, w)


def test_gaussian_kde_cv_ml_is_cached_until_the_data_change():
    x = _data(4, 1, 100)
    kde = GaussianKDE(x, bw_method="cv_ml")
    first = kde.cv_ml_factor()
    assert kde.cv_ml_factor() is first  # cached: not recomputed on every covariance refresh
    kde.dataset = _data(5, 1, 100)
    assert kde.cv_ml_factor() == cv_ml_factor(kde.dataset, kde.weights)


def test_cv_ml_unbounded_with_duplicates():
    x = _data(6, 2, 60)
    twins = np.concatenate([x, x], axis=1)  # every point has a twin: the likelihood grows as h -> 0
    with pytest.raises(ValueError, match="duplicated points"):
        cv_ml_factor(twins)
    with pytest.raises(ValueError, match="duplicated points"):
        cv_ml_bandwidths(twins)
    with pytest.raises(ValueError, match="duplicated points"):
        GaussianKDE(twins, bw_method="cv_ml")


def test_cv_ml_errors_are_the_kdes():
    with pytest.raises(ValueError, match="Number of dimensions is greater"):
        cv_ml_factor(np.random.default_rng(0).standard_normal((5, 3)))
    with pytest.raises(np.linalg.LinAlgError, match="lower-dimensional subspace"):
        cv_ml_factor(np.vstack([np.arange(10.0), 2 * np.arange(10.0)]))
    with pytest.raises(ValueError, match="`bw_method` should be"):
        GaussianKDE(_data(0, 1, 20), bw_method="cv_ls")


# ---------------------------------------------------------------------------- per-dimension bandwidths


@pytest.mark.parametrize("d, n", [(2, 300), (4, 250)])
def test_cv_ml_bandwidths_match_statsmodels(d, n):
    smkd = pytest.importorskip("statsmodels.nonparametric.kernel_density")
    x = _data(20 + d, d, n)
    ours = cv_ml_bandwidths(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels' own deprecation notices
        theirs = smkd.KDEMultivariate(x.T, var_type="c" * d, bw="cv_ml").bw
    # The bounds: within 2% of statsmodels (which stops at xtol = 1e-3), and an optimum at least as
    # good: our likelihood not lower than at statsmodels' bandwidths, up to both evaluations' rounding.
    np.testing.assert_allclose(ours, theirs, rtol=0.02)
    at_ours = loo_log_likelihood(x, np.diag(ours**2))
    at_theirs = loo_log_likelihood(x, np.diag(theirs**2))
    _, magnitudes = brute_loo(x, np.diag(ours**2))
    assert at_ours >= at_theirs - loo_rtol(x, magnitudes) * abs(at_ours)


def test_cv_ml_bandwidths_are_a_stationary_maximum():
    x = _data(8, 3, 200)
    w = np.random.default_rng(8).uniform(0.1, 1.0, 200)
    h = cv_ml_bandwidths(x, w)
    at = loo_log_likelihood(x, np.diag(h**2), w)
    for k in range(3):
        for step in (0.999, 1.001):
            moved = h.copy()
            moved[k] *= step
            assert loo_log_likelihood(x, np.diag(moved**2), w) < at


def test_cv_ml_bandwidths_scale_with_the_data():
    # Scaling one dimension by s scales its bandwidth by s (the objective only shifts by -log s).
    x = _data(9, 2, 200)
    h = cv_ml_bandwidths(x)
    scaled = x * np.array([[1.0], [1e3]])
    h2 = cv_ml_bandwidths(scaled)
    # The optimiser stops at gradient 1e-10 of an objective with curvature O(1): ~1e-9 in log h.
    np.testing.assert_allclose(h2, h * [1.0, 1e3], rtol=1e-7)


def test_cv_ml_bandwidths_refuse_a_constant_dimension():
    x = _data(1, 2, 50)
    x[1] = 4.0
    with pytest.raises(ValueError, match=r"dimension\(s\) \[1\] are constant"):
        cv_ml_bandwidths(x)


# ---------------------------------------------------------------------------- explicit kernel covariance


def mixture_pdf(x, points, h, w=None) -> np.ndarray:
    """``sum_i w_i N(point; x_i, H)`` term by term (scipy's multivariate_normal)."""
    n = x.shape[1]
    w = np.full(n, 1.0 / n) if w is None else np.asarray(w, float) / np.sum(w)
    return sum(w[i] * stats.multivariate_normal(x[:, i], h).pdf(points.T) for i in range(n))


def test_kernel_covariance_densities_are_the_mixture():
    x = _data(12, 2, 60)
    h = np.array([[0.3, 0.1], [0.1, 0.8]])
    w = np.linspace(1.0, 3.0, 60)
    kde = GaussianKDE(x, weights=w, kernel_covariance=h)
    q = _data(13, 2, 25)
    expected = mixture_pdf(x, q, h, w)
    # Bound: each kernel's exponent q_ij = r2/2 is off by ~8 eps (q_ij + 1) in either computation, which is
    # the relative error of its value; sums of 60 add sum_error(60).
    rtol = TWO_SIDES * (8 * EPS * (1 + 2 * kde_exponent_max(x, q, h)) + sum_error(60))
    np.testing.assert_allclose(kde.pdf(q), expected, rtol=rtol)
    np.testing.assert_allclose(kde.logpdf(q), np.log(expected), rtol=0, atol=rtol)
    assert kde.factor is None
    np.testing.assert_array_equal(kde.covariance, h)
    np.testing.assert_allclose(kde.cho_cov @ kde.cho_cov.T, h, rtol=0, atol=4 * EPS)
    np.testing.assert_allclose(kde.inv_cov, np.linalg.inv(h), rtol=1e-14)
    assert kde.log_det == pytest.approx(np.log(np.linalg.det(2 * np.pi * h)), rel=1e-14)
    assert "kernel_covariance=explicit" in repr(kde)


def kde_exponent_max(x, q, h) -> float:
    z = linalg.solve_triangular(np.linalg.cholesky(h), np.hstack([x, q]), lower=True)
    return float((z**2).sum(axis=0).max())


def test_kernel_covariance_equal_to_the_factor_model():
    # H = f^2 cov(x) is scipy's model with factor f: every method agrees to rounding.
    x = _data(14, 2, 80)
    f = 0.4
    ref = GaussianKDE(x, bw_method=f)
    kde = GaussianKDE(x, kernel_covariance=ref.covariance)
    q = _data(15, 2, 20)
    # Bound: the two Cholesky factors differ by the rounding of chol(f^2 S) vs f chol(S), ~4 eps relative,
    # which moves each exponent q by ~8 eps q (q <= kde_exponent_max / 2).
    rtol = 16 * EPS * (1 + kde_exponent_max(x, q, ref.covariance)) + TWO_SIDES * sum_error(80)
    np.testing.assert_allclose(kde.pdf(q), ref.pdf(q), rtol=rtol)
    assert kde.integrate_gaussian([0.5, 0.5], np.eye(2)) == pytest.approx(
        ref.integrate_gaussian([0.5, 0.5], np.eye(2)), rel=rtol)
    assert kde.integrate_kde(ref) == pytest.approx(ref.integrate_kde(ref), rel=rtol)
    np.testing.assert_array_equal(kde.resample(5, seed=3), ref.resample(5, seed=3))
    marginal = kde.marginal(1)
    assert marginal.covariance.shape == (1, 1) and marginal.covariance[0, 0] == ref.covariance[1, 1]
    one_d = GaussianKDE(x[0], kernel_covariance=0.25)
    assert one_d.integrate_box_1d(-np.inf, np.inf) == pytest.approx(1.0, rel=sum_error(80))


def test_kernel_covariance_mode_and_set_bandwidth():
    x = _data(16, 2, 40)
    h = np.diag([0.2, 0.5])
    kde = GaussianKDE(x, kernel_covariance=h)
    kde.set_bandwidth()  # None keeps the explicit covariance
    np.testing.assert_array_equal(kde.covariance, h)
    kde.set_bandwidth("silverman")  # a rule returns to scipy's model
    assert kde.factor == kde.silverman_factor()
    np.testing.assert_allclose(kde.covariance, np.cov(x) * kde.factor**2, rtol=1e-14)


def test_kernel_covariance_allows_more_dimensions_than_points():
    x = _data(17, 5, 3)
    kde = GaussianKDE(x, kernel_covariance=np.eye(5))
    assert np.all(np.isfinite(kde.logpdf(x)))


def test_kernel_covariance_validation():
    x = _data(18, 2, 30)
    h = np.array([[1.0, 0.3], [0.3, 2.0]])
    before = h.copy()
    GaussianKDE(x, kernel_covariance=h)
    np.testing.assert_array_equal(h, before)
    with pytest.raises(ValueError, match="not both"):
        GaussianKDE(x, bw_method="scott", kernel_covariance=h)
    with pytest.raises(ValueError, match=r"shape \(2, 2\).*got shape \(3, 3\)"):
        GaussianKDE(x, kernel_covariance=np.eye(3))
    with pytest.raises(ValueError, match="finite"):
        GaussianKDE(x, kernel_covariance=[[1.0, np.nan], [np.nan, 1.0]])
    with pytest.raises(ValueError, match="symmetric"):
        GaussianKDE(x, kernel_covariance=[[1.0, 0.5], [0.4, 1.0]])
    with pytest.raises(ValueError, match="positive definite"):
        GaussianKDE(x, kernel_covariance=[[1.0, 1.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match="positive definite"):
        GaussianKDE(x, kernel_covariance=-np.eye(2))
    with pytest.raises(ValueError, match="real numbers"):
        GaussianKDE(x, kernel_covariance=np.eye(2) * 1j)
    # Rounding-level asymmetry (a product A @ A.T) is accepted and symmetrised.
    a = np.random.default_rng(0).standard_normal((2, 2))
    product = a @ a.T
    product[0, 1] *= 1 + 2 * EPS
    checked = check_kernel_covariance(product, 2)
    assert checked[0, 1] == checked[1, 0] and not checked.flags.writeable


def test_integrate_gaussian_refuses_non_finite_means():
    # Issue 11, point 11: a NaN mean gave a NaN integral (scipy raises).
    kde = GaussianKDE(_data(19, 2, 30))
    for mean, cov_ in (([np.nan, 0.0], np.eye(2)), ([0.0, 0.0], [[np.inf, 0.0], [0.0, 1.0]])):
        with pytest.raises(ValueError, match="finite"):
            kde.integrate_gaussian(mean, cov_)
