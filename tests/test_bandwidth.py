"""anomstats.bandwidth: the rules agree with scipy to the last bit; bw_method resolution and its errors."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from anomstats import bandwidth
from tests._tolerances import TWO_SIDES, eps, sum_error


@given(n=st.integers(2, 10_000), d=st.integers(1, 50))
def test_rules_match_scipy_bit_for_bit(n, d):
    data = np.random.default_rng(n + 7 * d).standard_normal((d, max(n, d + 1)))
    ref = stats.gaussian_kde(data)
    assert bandwidth.scotts_factor(ref.neff, d) == ref.scotts_factor()
    assert bandwidth.silverman_factor(ref.neff, d) == ref.silverman_factor()


@given(seed=st.integers(0, 2**31), n=st.integers(2, 200))
def test_effective_sample_size_matches_scipy_neff(seed, n):
    rng = np.random.default_rng(seed)
    w = rng.random(n) * rng.choice([1.0, 1e-3, 1e3], size=n)
    ref = stats.gaussian_kde(rng.standard_normal(n), weights=w)
    assert bandwidth.effective_sample_size(w) == ref.neff
    assert 1.0 <= bandwidth.effective_sample_size(w) <= n + 1e-9


def test_effective_sample_size_extremes_and_input_untouched():
    w = np.array([2.0, 2.0, 2.0])
    # Bound: w / sum(w) (1 rounding), its squares (1), their sum of 3 (sum_error(3)) and the reciprocal (1).
    assert bandwidth.effective_sample_size(w) == pytest.approx(3.0, rel=sum_error(3) + 3 * eps(np.float64), abs=0)
    np.testing.assert_array_equal(w, [2.0, 2.0, 2.0])
    assert bandwidth.effective_sample_size([0.0, 5.0, 0.0]) == 1.0


@pytest.mark.parametrize(
    "bad, match",
    [
        ([[1.0, 2.0]], "one-dimensional"),
        ([1.0, np.nan], "finite"),
        ([1.0, -1.0], "non-negative"),
        ([0.0, 0.0], "positive sum"),
    ],
)
def test_effective_sample_size_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        bandwidth.effective_sample_size(bad)


def test_resolve_bw_method_canonical_forms():
    assert bandwidth.resolve_bw_method(None) is None
    assert bandwidth.resolve_bw_method("scott") == "scott"
    assert bandwidth.resolve_bw_method("silverman") == "silverman"
    assert bandwidth.resolve_bw_method(0.3) == 0.3
    assert bandwidth.resolve_bw_method(np.float32(0.3)) == np.float32(0.3)
    f = lambda kde: 0.5  # noqa: E731
    assert bandwidth.resolve_bw_method(f) is f


@pytest.mark.parametrize("bad", ["wrongstring", "Scott", [1, 2], np.array(0.3), np.array([0.3]), (0.1,)])
def test_resolve_bw_method_rejects_like_scipy(bad):
    with pytest.raises(ValueError, match=r"`bw_method` should be 'scott', 'silverman', a scalar or a callable\."):
        bandwidth.resolve_bw_method(bad)
    with pytest.raises(ValueError):
        stats.gaussian_kde(np.arange(5.0), bw_method=bad)


def test_bandwidth_factor_each_kind():
    assert bandwidth.bandwidth_factor(None, 100, 2) == bandwidth.scotts_factor(100, 2)
    assert bandwidth.bandwidth_factor("scott", 100, 2) == bandwidth.scotts_factor(100, 2)
    assert bandwidth.bandwidth_factor("silverman", 50, 3) == bandwidth.silverman_factor(50, 3)
    assert bandwidth.bandwidth_factor(0.25, 100, 2) == 0.25
    seen = []
    assert bandwidth.bandwidth_factor(lambda obj: seen.append(obj) or 0.7, 10, 1, estimator="me") == 0.7
    assert seen == ["me"]


@pytest.mark.parametrize(
    "bad", [0, -1.0, np.nan, np.inf, 1 + 1j, "0.5", None, False, np.array(-0.5), np.array([0.1, 0.2]), np.array(1j)]
)
def test_check_factor_rejects_non_positive_or_non_real(bad):
    with pytest.raises(ValueError, match="positive, finite real number"):
        bandwidth.check_factor(bad)


@pytest.mark.parametrize("good", [1e-3, 2, np.float32(0.5), np.int64(3), True, np.array(0.3), np.array([0.3])])
def test_check_factor_accepts_positive_reals(good):
    bandwidth.check_factor(good)


@given(d=st.integers(1, 30), seed=st.integers(0, 1000))
def test_log_normalisation_matches_scipy_log_det(d, seed):
    data = np.random.default_rng(seed).standard_normal((d, 3 * d + 5))
    ref = stats.gaussian_kde(data)
    log_det_h = 2.0 * np.log(np.diag(ref.cho_cov)).sum()
    # Bound: both sides add d logs of cho_cov's diagonal (scipy's scaled by sqrt(2 pi)) and d log(2 pi):
    # (sum_error(d) + 1 rounding each) of the sum of magnitudes 2 sum|log L_ii| + d log(2 pi), halved; doubled.
    magnitudes = 2.0 * np.abs(np.log(np.diag(ref.cho_cov))).sum() + d * math.log(2 * math.pi)
    atol = TWO_SIDES * (sum_error(2 * d) + 2 * eps(np.float64)) * magnitudes / 2
    assert bandwidth.log_normalisation(log_det_h, d) == pytest.approx(-ref.log_det / 2, rel=0, abs=atol)


def test_log_normalisation_standard_normal():
    # Bound: log, product and halving on both sides: 2 roundings each of |log(2 pi) / 2|, doubled.
    rtol = TWO_SIDES * 2 * eps(np.float64)
    assert bandwidth.log_normalisation(0.0, 1) == pytest.approx(-0.5 * math.log(2 * math.pi), rel=rtol, abs=0)
