"""Fault injection for the core KDE (issue 11: points 1, 3, 10, 11): bad data, bad queries, far queries, reassignment.

Each test injects one fault a careful or a hostile user could bring and asserts what happens: the exception
type and message (naming the argument and the remedy), that inputs are untouched, that a refused operation
changes nothing, and that valid but extreme inputs give finite, correct numbers. The data strategies here
are shared with the torch adapter's fault tests (``tests/test_faults_torch_kde.py``).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.linalg import LinAlgError
from numpy.testing import assert_array_equal
from scipy import stats

from anomstats import GaussianKDE
from anomstats._validation import NON_FINITE_POINTS
from anomstats.bandwidth import check_data_covariance, data_eps
from tests._tolerances import KDEErrorModel, SCIPY, assert_close_each, core_route

#: The start of the singular-data message (scipy's words) and its named feature.
SUBSPACE = "The data appears to lie in a lower-dimensional subspace"
FEATURE = re.compile(r"feature (\d+) \(0-based, of (\d+)\)")


# --------------------------------------------------------------------------- degenerate and full-rank data
def degenerate_data(seed: int, d: int, dtype, kind: str) -> tuple[np.ndarray, set[int]]:
    """Points (n, d) of ``dtype`` whose features are exactly in a subspace, and the set of features involved.

    ``kind``: ``"combination"`` (one feature is a combination of the others with normal coefficients),
    ``"wide"`` (coefficients 1e-2..1e2, which unpivoted rank tests miss), ``"duplicate"`` (a scaled copy of
    one feature), ``"constant"`` (a constant feature). The combination is computed in float64 and rounded
    to ``dtype`` once, as data computed from others and stored arrive; features are shuffled, with offsets
    up to 100 standard deviations (10 in float16, whose rounding is coarse).
    """
    rng = np.random.default_rng(seed)
    n = int(rng.integers(d + 3, 400))
    offset = rng.choice([0.0, 1.0, 10.0] if np.dtype(dtype) == np.float16 else [0.0, 1.0, 10.0, 100.0])
    scale = 10.0 ** rng.uniform(-1, 1, size=d - 1)
    base = (rng.normal(size=(n, d - 1)) + offset) * scale
    if kind == "combination":
        coef = rng.normal(size=d - 1)
    elif kind == "wide":
        coef = 10.0 ** rng.uniform(-2, 2, size=d - 1) * rng.choice([-1.0, 1.0], size=d - 1)
    elif kind == "duplicate":
        coef = np.zeros(d - 1)
        coef[rng.integers(d - 1)] = rng.choice([1.0, -2.0, 0.1])
    else:
        coef = np.zeros(d - 1)
    base = base.astype(dtype)
    extra = base.astype(np.float64) @ coef if kind != "constant" else np.full(n, rng.choice([0.0, 0.1, 3.7]))
    x = np.column_stack([base, extra.astype(dtype)])
    involved = {d - 1} | ({int(j) for j in np.flatnonzero(coef)} if kind != "constant" else set())
    order = rng.permutation(d)  # column k of the result is column order[k] of x
    position = {int(old): new for new, old in enumerate(order)}
    return x[:, order], {position[j] for j in involved}


def full_rank_data(seed: int, d: int, dtype, residual: float) -> np.ndarray:
    """Points (n, d): well-mixed features plus one nearly dependent feature with relative residual ``residual``.

    The last feature is a combination of the others plus ``residual`` times its own spread of independent
    noise, so its unexplained share of variance is about ``residual**2``: ill-conditioned but full rank.
    """
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4 * d + 10, 400))
    mixing = rng.normal(size=(d - 1, d - 1)) * 0.5 + np.eye(d - 1)
    base = rng.normal(size=(n, d - 1)) @ mixing * 10.0 ** rng.uniform(-1, 1, size=d - 1)
    combination = base @ rng.normal(size=d - 1)
    spread = combination.std() if combination.std() > 0 else 1.0
    last = combination + residual * spread * rng.normal(size=n)
    return (np.column_stack([base, last]) + rng.choice([0.0, 10.0])).astype(dtype)


KINDS = st.sampled_from(["combination", "wide", "duplicate", "constant"])


# --------------------------------------------------------------------------- point 1: degenerate data
@given(seed=st.integers(0, 2**20), d=st.integers(2, 6), dtype=st.sampled_from([np.float64, np.float32]), kind=KINDS)
def test_data_in_a_subspace_is_refused_in_every_draw_naming_a_dependent_feature(seed, d, dtype, kind):
    x, involved = degenerate_data(seed, d, dtype, kind)
    before = x.copy()
    with pytest.raises(LinAlgError, match=SUBSPACE) as error:
        GaussianKDE(x.T)
    message = str(error.value)
    feature, of = map(int, FEATURE.search(message).groups())
    assert of == d and feature in involved  # the named feature is one of those in the dependency
    assert ("constant" in message) == (kind == "constant")
    assert "Drop or combine the dependent feature" in message and "kernel_covariance" in message
    assert isinstance(error.value, ValueError)  # LinAlgError is a ValueError, as scipy's
    assert_array_equal(x, before)
    # The weighted covariance is tested: positive weights do not rescue data in a subspace.
    with pytest.raises(LinAlgError, match=SUBSPACE):
        GaussianKDE(x.T, weights=np.random.default_rng(seed).random(len(x)) + 0.1)


@given(seed=st.integers(0, 2**20), d=st.integers(2, 4), kind=KINDS)
@settings(max_examples=15)
def test_float16_data_in_a_subspace_is_refused(seed, d, kind):
    x, _ = degenerate_data(seed, d, np.float16, kind)
    with pytest.raises(LinAlgError, match=SUBSPACE):
        GaussianKDE(x.T)


@given(
    seed=st.integers(0, 2**20),
    d=st.integers(2, 6),
    case=st.sampled_from([(np.float64, 1e-5), (np.float64, 1.0), (np.float32, 1e-3), (np.float32, 1.0)]),
)
def test_full_rank_data_is_never_refused_however_ill_conditioned(seed, d, case):
    # residual 1e-5 in float64 leaves 1e-10 of the last feature's variance unexplained (the rank test's
    # noise there is at most D (16 + sqrt(n)) eps64 < 1e-13); 1e-3 in float32 leaves 1e-6, against a float32
    # rounding noise of 4 eps32² (1 + mean²/var) < 1e-11 for these offsets. scipy accepts them too.
    dtype, residual = case
    x = full_rank_data(seed, d, dtype, residual)
    kde = GaussianKDE(x.T)
    ref = stats.gaussian_kde(x.T)
    assert np.isfinite(kde.logpdf(x[:3].T)).all()
    assert np.isfinite(ref.logpdf(x[:3].T)).all()


def test_the_rank_test_does_not_depend_on_a_cholesky_that_happens_to_finish():
    # A duplicated feature in float64: scipy accepts it in some draws (its Cholesky finishes on rounding
    # noise) and then returns huge densities; the rank test refuses every draw.
    accepted_by_scipy = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        base = rng.normal(size=(200, 3))
        x = np.column_stack([base, base[:, 0] * 0.7 + base[:, 1] * 1.3])
        try:
            stats.gaussian_kde(x.T)
            accepted_by_scipy += 1
        except LinAlgError:
            pass
        with pytest.raises(LinAlgError, match=SUBSPACE):
            GaussianKDE(x.T)
    assert accepted_by_scipy > 0  # the difference from scipy that the class notes document


def test_check_data_covariance_directly():
    x = np.array([[0.0, 1.0, 2.0, 4.0, 5.0], [1.0, 3.0, 5.0, 9.0, 11.0], [0.3, -1.0, 2.0, 0.5, 0.1]])
    # Feature 1 is 2·feature 0 + 1: the first feature that is a combination of features before it.
    with pytest.raises(LinAlgError, match=r"feature 1 \(0-based, of 3\) is, to rounding, a linear"):
        check_data_covariance(np.cov(x), x.mean(axis=1), 5, data_eps(x.dtype))
    constant = np.vstack([x[[0, 2]], np.full(5, 0.1)])
    with pytest.raises(LinAlgError, match=r"feature 2 \(0-based, of 3\) is constant"):
        check_data_covariance(np.cov(constant), constant.mean(axis=1), 5, data_eps(constant.dtype))
    check_data_covariance(np.cov(x[[0, 2]]), x[[0, 2]].mean(axis=1), 5, None)  # full rank: no error


@given(seed=st.integers(0, 2**20), d=st.integers(2, 6), ulps=st.lists(st.integers(-4, 4), min_size=6, max_size=6))
@settings(max_examples=40)
def test_the_named_feature_does_not_depend_on_rounding_of_the_covariance(seed, d, ulps):
    # A duplicated feature (equal noise-scaled variances: the pivot order between the copies is decided by
    # rounding) and a covariance nudged by a few ulps per diagonal entry, as another summation order rounds
    # it: the name is the later copy every time (the first feature that is a combination of earlier ones).
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(d - 1, 50)) * 10.0 ** rng.uniform(-1, 1, size=(d - 1, 1))
    copy_of = int(rng.integers(d - 1))
    at = int(rng.integers(copy_of + 1, d))  # the copy goes after its original
    x = np.insert(x, at, x[copy_of], axis=0)
    covariance = np.cov(x)
    nudged = covariance.copy()
    nudged[np.diag_indices(d)] *= 1.0 + np.array(ulps[:d]) * np.finfo(np.float64).eps
    for matrix in (covariance, nudged):
        with pytest.raises(LinAlgError, match=rf"feature {at} \(0-based, of {d}\) is, to rounding, a linear"):
            check_data_covariance(matrix, x.mean(axis=1), 50, data_eps(x.dtype))


# --------------------------------------------------------------------------- point 3: non-finite and far queries
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("method", ["pdf", "logpdf", "evaluate", "__call__"])
def test_non_finite_points_raise_naming_them_in_every_scoring_method(bad, method):
    kde = GaussianKDE(np.random.default_rng(0).normal(size=(2, 30)))
    points = np.array([[0.0, bad], [0.0, 1.0]])
    before = points.copy()
    with pytest.raises(ValueError, match=re.escape(NON_FINITE_POINTS)):
        getattr(kde, method)(points)
    assert_array_equal(points, before)


def test_integrals_refuse_nan_and_keep_infinite_bounds():
    rng = np.random.default_rng(1)
    one = GaussianKDE(rng.normal(size=40))
    two = GaussianKDE(rng.normal(size=(2, 40)))
    with pytest.raises(ValueError, match="low must not contain NaN"):
        one.integrate_box_1d(np.nan, 1.0)
    with pytest.raises(ValueError, match="high must not contain NaN"):
        one.integrate_box_1d(0.0, np.nan)
    with pytest.raises(ValueError, match="low_bounds must not contain NaN"):
        two.integrate_box([np.nan, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="high_bounds must not contain NaN"):
        two.integrate_box([0.0, 0.0], [1.0, np.nan])
    with pytest.raises(ValueError, match="finite"):
        two.integrate_gaussian([np.nan, 0.0], np.eye(2))
    # Infinite bounds are open sides: the whole line / plane has mass 1. Bound: a sum of 40 weighted
    # normal CDFs (each 1 exactly at infinity) is 1 to sqrt(n) eps; Genz' integration of the full plane is
    # exact (every kernel's box is the whole plane).
    assert one.integrate_box_1d(-np.inf, np.inf) == pytest.approx(1.0, rel=0, abs=np.sqrt(40) * 2.3e-16)
    assert two.integrate_box([-np.inf, -np.inf], [np.inf, np.inf]) == pytest.approx(1.0, rel=0, abs=1e-12)


@given(
    seed=st.integers(0, 2**16),
    d=st.integers(1, 5),
    exponent=st.integers(0, 308),
    mantissa=st.floats(1.0, 1.79),
    signs=st.integers(0, 31),
    query_dtype=st.sampled_from([np.float64, np.float32]),
)
def test_finite_queries_at_any_distance_give_zero_or_a_log_never_nan(seed, d, exponent, mantissa, signs, query_dtype):
    rng = np.random.default_rng(seed)
    kde = GaussianKDE(rng.normal(size=(d, 30)) * 10.0 ** rng.uniform(-3, 3))
    sign = np.array([1.0 if (signs >> k) & 1 else -1.0 for k in range(d)])[:, None]
    with np.errstate(over="ignore"):
        q = (sign * mantissa * 10.0 ** exponent).astype(query_dtype)
    if not np.all(np.isfinite(q)):
        q = np.where(np.isfinite(q), q, sign * np.finfo(query_dtype).max)
    with np.errstate(over="raise", invalid="raise"):  # no overflow or invalid operation escapes (underflow is fine)
        pdf = kde.pdf(q)
        logpdf = kde.logpdf(q)
    assert not np.isnan(pdf).any() and not np.isnan(logpdf).any()
    assert pdf[0] >= 0 and logpdf[0] < np.inf
    near = kde.logpdf(np.zeros((d, 1)) + kde.dataset.mean(axis=1, keepdims=True))
    assert logpdf[0] <= near[0] + 1e-9 * abs(near[0]) or exponent < 3  # far is never denser than the centre
    # Whitened squared distances beyond float64's range (|q| >= 1e160 against bandwidths below 1e3): below
    # every density. (A float32 query of 1e160 is clipped to float32's max above, a finite log-density.)
    if np.abs(q).max() >= 1e160:
        assert pdf[0] == 0.0 and logpdf[0] == -np.inf


def test_far_queries_in_the_integrals_give_zero_not_nan():
    kde = GaussianKDE(np.random.default_rng(2).normal(size=(3, 30)))
    with np.errstate(over="raise", invalid="raise"):
        assert kde.integrate_gaussian(np.full(3, 1e300), np.eye(3)) == 0.0
        assert kde.integrate_gaussian(np.array([1.7e308, -1.7e308, 1e308]), np.eye(3)) == 0.0


# --------------------------------------------------------------------------- point 10: argument parity
def test_boolean_points_count_as_zero_and_one():
    rng = np.random.default_rng(3)
    data = rng.random((2, 60)) > 0.4
    kde = GaussianKDE(data)  # boolean data, as scipy accepts
    points = np.array([[True, False, True], [False, False, True]])
    # Exact (bound 0): the same float64 computation runs on 0.0 / 1.0.
    assert_array_equal(kde.pdf(points), kde.pdf(points.astype(np.float64)))
    assert_array_equal(kde.logpdf(points), kde.logpdf(points.astype(np.float64)))
    with pytest.raises(TypeError):  # scipy's behaviour for boolean points, changed here (documented)
        stats.gaussian_kde(data).pdf(points)


@pytest.mark.parametrize("bw_method", [np.inf, -np.inf, 0, 0.0, -1, -0.5, np.nan, np.float32(np.nan)])
def test_unusable_bandwidth_factors_are_refused(bw_method):
    x = np.random.default_rng(4).normal(size=(2, 30))
    with pytest.raises(ValueError, match="The bandwidth factor must be a positive, finite real number"):
        GaussianKDE(x, bw_method=bw_method)


def test_numpy_integers_are_accepted_where_python_ints_are():
    x = np.random.default_rng(5).normal(size=(2, 30))
    a = GaussianKDE(x, bw_method=np.int64(1), memory_budget=np.int64(2**20), workers=np.int32(1))
    b = GaussianKDE(x, bw_method=1, memory_budget=2**20, workers=1)
    assert_array_equal(a.pdf(x[:, :4]), b.pdf(x[:, :4]))  # exact: the same computation
    assert a.marginal(np.int64(0)).d == 1


# --------------------------------------------------------------------------- point 11: reassigning dataset
def _same_fit(kde, fresh, points):
    """Exact (bound 0): the refit runs the constructor's computation on the same array."""
    assert (kde.d, kde.n) == (fresh.d, fresh.n)
    assert kde.factor == fresh.factor and kde.neff == fresh.neff
    for name in ("covariance", "cho_cov", "weights"):
        assert_array_equal(getattr(kde, name), getattr(fresh, name))
    assert kde.log_det == fresh.log_det
    assert_array_equal(kde.pdf(points), fresh.pdf(points))


@given(seed=st.integers(0, 2**16), d_new=st.integers(1, 4), n_new=st.integers(12, 60), rule=st.sampled_from(["scott", "silverman", 0.4]))
@settings(max_examples=20)
def test_reassigning_dataset_refits_every_derived_quantity(seed, d_new, n_new, rule):
    rng = np.random.default_rng(seed)
    kde = GaussianKDE(rng.normal(size=(2, 30)), bw_method=rule)
    kde.pdf(np.zeros((2, 1)))  # fills the caches
    new = rng.normal(size=(d_new, n_new)) * 3.0 + 1.0
    kde.dataset = new
    _same_fit(kde, GaussianKDE(new, bw_method=rule), rng.normal(size=(d_new, 5)))
    assert not kde.dataset.flags.writeable and kde.dataset is not new


def test_reassigning_keeps_weights_of_the_same_length_and_refuses_them_for_another():
    rng = np.random.default_rng(6)
    x, weights = rng.normal(size=(2, 40)), rng.random(40) + 0.1
    kde = GaussianKDE(x, weights=weights)
    same_length = rng.normal(size=(2, 40))
    kde.dataset = same_length  # the weights go on weighing the points in their positions, as in scipy
    _same_fit(kde, GaussianKDE(same_length, weights=weights), x[:, :5])
    before = (kde.dataset, kde.covariance.copy(), kde.pdf(x[:, :5]))
    with pytest.raises(ValueError, match=r"n=30 points but the KDE's weights were given for 40"):
        kde.dataset = rng.normal(size=(2, 30))
    assert kde.dataset is before[0] and kde.n == 40
    assert_array_equal(kde.covariance, before[1])
    assert_array_equal(kde.pdf(x[:, :5]), before[2])
    uniform = GaussianKDE(x)  # no weights: data of another length start anew with uniform weights
    uniform.dataset = rng.normal(size=(3, 25))
    assert_array_equal(uniform.weights, np.full(25, 1 / 25))
    _same_fit(uniform, GaussianKDE(uniform.dataset), rng.normal(size=(3, 4)))


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (np.ones((2, 3, 4)), ValueError, "1-D"),
        (np.array([1.0]), ValueError, "multiple elements"),
        (np.random.default_rng(7).normal(size=(5, 3)), ValueError, "Number of dimensions is greater"),
        (np.array([[0.0, 1.0, np.nan, 3.0], [1.0, 0.0, 2.0, 1.0]]), ValueError, "finite values"),
        (np.vstack([np.arange(10.0), 2 * np.arange(10.0)]), LinAlgError, SUBSPACE),
    ],
)
def test_a_refused_dataset_leaves_the_kde_unchanged(bad, error, match):
    rng = np.random.default_rng(8)
    x = rng.normal(size=(2, 30))
    kde = GaussianKDE(x)
    points = rng.normal(size=(2, 4))
    before = dict(kde.__dict__), kde.pdf(points)
    with pytest.raises(error, match=match):
        kde.dataset = bad
    assert kde.dataset is before[0]["_dataset"] and (kde.d, kde.n) == (2, 30)
    assert kde.factor == before[0]["factor"] and kde.covariance is before[0]["covariance"]
    assert_array_equal(kde.pdf(points), before[1])


def test_an_explicit_kernel_covariance_must_fit_the_new_dimension():
    rng = np.random.default_rng(9)
    kde = GaussianKDE(rng.normal(size=(2, 30)), kernel_covariance=np.diag([0.5, 0.2]))
    new = rng.normal(size=(2, 50))
    kde.dataset = new
    _same_fit(kde, GaussianKDE(new, kernel_covariance=np.diag([0.5, 0.2])), rng.normal(size=(2, 3)))
    with pytest.raises(ValueError, match=r"must have shape \(3, 3\)"):
        kde.dataset = rng.normal(size=(3, 50))
    assert kde.d == 2


def test_reassigned_kde_agrees_with_scipy_built_on_the_new_data():
    rng = np.random.default_rng(10)
    kde = GaussianKDE(rng.normal(size=(3, 40)))
    new = rng.normal(size=(3, 80)) + 2.0
    kde.dataset = new
    ref = stats.gaussian_kde(new)
    points = new[:, :6] + 0.2
    want_log = ref.logpdf(points)
    # kde_route_error, both routes: this KDE (centred, d = 3: expanded square) against scipy's direct
    # differences, each with its own fitted bandwidth.
    bound = KDEErrorModel.of(new.T, points.T, ref.covariance, (core_route(3), SCIPY))
    assert_close_each(kde.pdf(points), ref.pdf(points), rtol=bound.rtol_each(want_log), atol=bound.atol())
    assert kde.n == ref.n and kde.d == ref.d
