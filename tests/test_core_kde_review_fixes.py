"""Regression tests around the fixes of tests/test_faults_review_kde.py and tests/test_faults_review_streams.py
(core KDE, the rank test, the KDE weights rule, RunningMoments with weights whose sum overflows).

Tolerances follow tests/_tolerances.py's conventions: a bound is derived next to each assertion; "bound 0" marks
results that must agree bit for bit (powers of two are exact).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from numpy.linalg import LinAlgError
from scipy import stats

from anomstats import GaussianKDE, RunningMoments
from anomstats._validation import NON_FINITE_DATA
from anomstats._weights import kde_weights
from anomstats.bandwidth import check_data_covariance, cv_ml_factor, data_eps, effective_sample_size


# --------------------------------------------------------------------------- set_bandwidth: a failure changes nothing
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt, OverflowError])
def test_a_rule_that_raises_anything_changes_nothing(error):
    x = np.random.default_rng(0).normal(size=(2, 30))
    kde = GaussianKDE(x, bw_method=0.4)
    before = {k: kde.__dict__[k] for k in ("factor", "covariance", "cho_cov", "log_det", "covariance_factor")}

    def rule(_):
        raise error("boom")

    with pytest.raises(error):
        kde.set_bandwidth(rule)
    for key, value in before.items():
        assert kde.__dict__[key] is value  # bound 0: the very same objects
    assert kde.covariance_factor() == 0.4


# --------------------------------------------------------------------------- weights whose sum overflows
def test_kde_weights_of_any_scale_normalise_bit_for_bit():
    w = np.random.default_rng(1).uniform(0.1, 1.0, 50)
    # Bound 0: a power-of-two rescaling is exact, and so is the library's scaling before the sum.
    for k in (1020, 500, -1000):
        np.testing.assert_array_equal(kde_weights(np.ldexp(w, k)), kde_weights(w))
    # Ordinary weights keep the bits of the plain division.
    np.testing.assert_array_equal(kde_weights(w), w / w.sum())


def test_effective_sample_size_and_cv_ml_accept_weights_whose_sum_overflows():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 40))
    w = rng.uniform(0.5, 2.0, 40)
    huge = np.ldexp(w, 1020)  # every weight finite, their sum is not
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert not np.isfinite(huge.sum())
    # Bound 0: the normalised weights are bit-identical (power of two), so is everything computed from them.
    assert effective_sample_size(huge) == effective_sample_size(w)
    assert cv_ml_factor(x, huge) == cv_ml_factor(x, w)
    np.testing.assert_array_equal(GaussianKDE(x, weights=huge).logpdf(x), GaussianKDE(x, weights=w).logpdf(x))


def test_weights_summing_to_zero_are_still_refused():
    with pytest.raises(ValueError, match="positive, finite sum"):
        kde_weights([0.0, 0.0])


# --------------------------------------------------------------------------- integrate_gaussian reads the upper triangle
def test_integrate_gaussian_reads_only_the_upper_triangle():
    x = np.random.default_rng(3).normal(size=(3, 25))
    kde = GaussianKDE(x)
    cov = np.array([[1.0, 0.3, -0.2], [5.0, 2.0, 0.1], [-7.0, 9.0, 1.5]])
    mirrored = np.triu(cov) + np.triu(cov, 1).T
    # Bound 0: the same upper triangle, hence the same factor.
    assert kde.integrate_gaussian([0.1, 0.0, -0.1], cov) == kde.integrate_gaussian([0.1, 0.0, -0.1], mirrored)
    # Bound: both sides sum the same 25 Gaussians, (n + d) eps relative each; 1e-13 is far above.
    want = stats.gaussian_kde(x).integrate_gaussian([0.1, 0.0, -0.1], cov)
    assert kde.integrate_gaussian([0.1, 0.0, -0.1], cov) == pytest.approx(want, rel=1e-13)


# --------------------------------------------------------------------------- complex data with NaN or infinity
@pytest.mark.parametrize("bad", [complex(np.nan, 0.0), complex(1.0, np.inf), complex(np.inf, 0.0)])
def test_non_finite_complex_data_are_reported_as_non_finite(bad):
    data = np.array([1.0, 2.0, 4.0, 7.0], dtype=complex)
    data[1] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError) as error:
            GaussianKDE(data)
    assert str(error.value) == NON_FINITE_DATA


# --------------------------------------------------------------------------- rank test at any scale
@pytest.mark.parametrize("k", [-528, -515, 0, 300, 505])
def test_the_rank_test_is_invariant_to_powers_of_two(k):
    rng = np.random.default_rng(4)
    base = rng.normal(size=(3, 40))
    dependent = np.vstack([base[:2], base[0] - 2 * base[1]])  # exactly in a plane
    for data, refused in ((base, False), (dependent, True)):
        y = np.ldexp(data, k)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # subnormal products in np.cov at k = -1000
            covariance = np.cov(y)
        call = lambda: check_data_covariance(covariance, y.mean(axis=1), 40, data_eps(y.dtype))  # noqa: E731
        if refused:
            with pytest.raises(LinAlgError, match="feature 2"):
                call()
        else:
            call()


@pytest.mark.parametrize("offset", [1e160, -1e163])
def test_degenerate_data_with_a_huge_mean_are_still_refused(offset):
    rng = np.random.default_rng(5)
    base = rng.normal(size=(2, 30)) * abs(offset) * 1e-10 + offset
    duplicated = np.vstack([base, base[0]])
    with pytest.raises(LinAlgError, match="feature 2"):
        GaussianKDE(duplicated)
    spread_below_rounding = np.vstack([base[0], np.full(30, offset) + base[1] * 1e-30])
    with pytest.raises(LinAlgError, match="feature 1 .* is constant"):
        GaussianKDE(spread_below_rounding)


# --------------------------------------------------------------------------- RunningMoments: sums that overflow
def _overflowing_weights(seed: int = 6, n: int = 50) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)), rng.uniform(0.5, 2.0, n)


def test_a_state_of_weights_whose_sum_overflows_round_trips():
    x, w = _overflowing_weights()
    moments = RunningMoments().update(x, np.ldexp(w, 1020))
    assert moments.sum_weights == np.inf  # documented: inf out of float range
    state = moments.state()
    assert state["weights_exponent"] > 0 and np.isfinite(state["sum_weights"])
    rebuilt = RunningMoments.from_state(state)
    assert rebuilt.state().keys() == state.keys()
    # Bound 0: a copy of the same numbers.
    np.testing.assert_array_equal(rebuilt.covariance(), moments.covariance())
    np.testing.assert_array_equal(moments.copy().covariance(), moments.covariance())
    plain = RunningMoments().update(x, w)
    assert "weights_exponent" not in plain.state()  # ordinary weights: the state is what it always was
    np.testing.assert_array_equal(moments.covariance(ddof=0), plain.covariance(ddof=0))


def test_merging_with_itself_and_mixing_scales():
    x, w = _overflowing_weights(7)
    huge = np.ldexp(w, 1020)
    doubled = RunningMoments().update(x, huge)
    doubled.merge(doubled)
    reference = RunningMoments().update(x, w)
    reference.merge(reference)
    np.testing.assert_array_equal(doubled.covariance(), reference.covariance())  # bound 0: powers of two
    # Unit weights first, then weights whose sum overflows: the first batch is negligible (weight 1 against
    # 1e308), so the covariance is that of the second batch. Bound: two streamed float64 computations of the
    # same 40 observations, (sqrt(40) + 3) eps relative each side: 1e-13 is far above.
    mixed = RunningMoments().update(x[:10]).update(x[10:], huge[10:])
    alone = RunningMoments().update(x[10:], w[10:])
    np.testing.assert_allclose(mixed.covariance(), alone.covariance(), rtol=1e-13, atol=0)


def test_finite_totals_that_overflow_when_added():
    x, _ = _overflowing_weights(8)
    moments = RunningMoments().update(x[:25], np.full(25, 1e307)).update(x[25:], np.full(25, 1e307))
    reference = RunningMoments().update(x[:25]).update(x[25:])
    # Bound: equal weights of another scale; the scaled weights are not powers of two of 1, so the sums round
    # differently: (sqrt(50) + 3) eps relative on each side, 1e-13 far above.
    np.testing.assert_allclose(moments.covariance(), reference.covariance(), rtol=1e-13, atol=0)


@pytest.mark.parametrize(
    "change",
    [{"weights_exponent": 3}, {"weights_exponent": 10**30}, {"weights_exponent": "2"},
     {"sum_squared_weights_exponent": -(10**30)}],
)
def test_from_state_refuses_impossible_exponents_naming_the_field(change):
    good = RunningMoments().update(np.random.default_rng(9).normal(size=(4, 3))).state()
    (field,) = change
    with pytest.raises(ValueError, match=field):
        RunningMoments.from_state({**good, **change})
