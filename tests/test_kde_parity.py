"""GaussianKDE behaves like scipy.stats.gaussian_kde: attributes, shapes, dtypes, errors, hooks, streams."""

import pickle

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy import linalg, stats

from anomstats import GaussianKDE

RTOL = 1e-12


def _data(d=2, n=40, seed=0, offset=0.0):
    return np.random.default_rng(seed).standard_normal((d, n)) + offset


# ----------------------------------------------------------------------------- attributes


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("d", [1, 3])
def test_attributes_match_scipy(d, weighted):
    rng = np.random.default_rng(d)
    x = rng.standard_normal((d, 30))
    w = rng.random(30) if weighted else None
    ours, ref = GaussianKDE(x, weights=w), stats.gaussian_kde(x, weights=w)
    assert (ours.d, ours.n) == (ref.d, ref.n)
    assert_array_equal(ours.dataset, ref.dataset)
    assert_array_equal(ours.weights, ref.weights)
    assert ours.neff == ref.neff
    assert ours.factor == ref.factor
    assert_allclose(ours.covariance, ref.covariance, rtol=1e-14)
    assert_allclose(ours.cho_cov, ref.cho_cov, rtol=1e-14)
    assert_allclose(ours.inv_cov, ref.inv_cov, rtol=1e-12)
    assert ours.log_det == pytest.approx(ref.log_det, rel=1e-13)
    assert ours.cho_cov.dtype == np.float64


def test_lazy_weights_and_neff():
    bare = GaussianKDE.__new__(GaussianKDE)  # as scipy-style subclasses that skip __init__ see it
    bare.dataset = _data()
    bare.d, bare.n = bare.dataset.shape
    assert "_weights" not in bare.__dict__ and "_neff" not in bare.__dict__
    assert_array_equal(bare.weights, np.full(40, 1 / 40))
    assert bare.neff == pytest.approx(40.0, rel=1e-14)
    assert "_weights" in bare.__dict__ and "_neff" in bare.__dict__
    bare._compute_covariance()
    assert_allclose(bare.pdf([0.1, 0.2]), stats.gaussian_kde(bare.dataset).pdf([0.1, 0.2]), rtol=RTOL)


def test_inputs_are_never_modified():
    x = _data(2, 25)
    w = np.random.default_rng(3).random(25) * 10
    p = _data(2, 7, seed=4)
    x0, w0, p0 = x.copy(), w.copy(), p.copy()
    kde = GaussianKDE(x, weights=w)
    kde.pdf(p)
    kde.logpdf(p)
    kde.integrate_gaussian(p[:, 0], np.eye(2))
    kde.integrate_kde(kde)
    kde.resample(5, seed=1)
    kde.marginal(0)
    assert_array_equal(x, x0)
    assert_array_equal(w, w0)
    assert_array_equal(p, p0)
    assert not np.shares_memory(kde.dataset, x)
    with pytest.raises(ValueError):
        kde.dataset[0, 0] = 1.0  # read-only copy


# ----------------------------------------------------------------------------- point shapes and dtypes


def test_point_shape_rules_match_scipy():
    x = _data(3, 30)
    ours, ref = GaussianKDE(x), stats.gaussian_kde(x)
    for pts in ([0.1, 0.2, 0.3], [[0.1, 0.2, 0.3]], np.ones((3, 4)), np.ones((3, 1)), np.ones((3, 0))):
        got, want = ours(pts), ref(pts)
        assert got.shape == want.shape
        assert_allclose(got, want, rtol=RTOL)
    x1 = np.arange(6.0) ** 1.5
    ours1, ref1 = GaussianKDE(x1), stats.gaussian_kde(x1)
    for pts in (1.5, [1.5], [1.0, 2.0, 3.0], [[1.0, 2.0]], []):
        assert_allclose(ours1(pts), ref1(pts), rtol=RTOL)
        assert ours1.logpdf(pts).shape == ref1.logpdf(pts).shape


_TYPES = ["float16", "float32", "float64", "longdouble", "int32", "int64"]


@pytest.mark.parametrize("bw", ["scott", "silverman", np.float32(3), np.int64(3), np.longdouble(3)])
@pytest.mark.parametrize("dtype", _TYPES)
def test_output_dtype_rule(dtype, bw):
    dtype = np.dtype(dtype)
    data = np.arange(5, dtype=dtype)
    weights = np.arange(5, dtype=dtype)
    ours = GaussianKDE(data, bw_method=bw, weights=weights)
    ref = stats.gaussian_kde(data, bw_method=bw, weights=weights)
    points = np.arange(5, dtype=dtype)
    got, want = ours(points), ref(points)
    assert got.dtype == want.dtype
    assert ours.logpdf(points).dtype == ref.logpdf(points).dtype
    assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=1e-12)


def test_float32_inputs_give_float64_without_underflow():
    x = np.random.default_rng(0).standard_normal((2, 50)).astype(np.float32)
    kde = GaussianKDE(x)
    far = np.array([[60.0], [60.0]], dtype=np.float32)
    log_density = kde.logpdf(far)
    assert log_density.dtype == np.float64
    assert np.isfinite(log_density).all()
    ref = stats.gaussian_kde(x.astype(np.float64)).logpdf(far.astype(np.float64))
    assert_allclose(log_density, ref, rtol=1e-12)


def test_longdouble_evaluation_is_accurate():
    x = np.random.default_rng(1).standard_normal((2, 20))
    kde_ld = GaussianKDE(x.astype(np.longdouble))
    pts = np.random.default_rng(2).standard_normal((2, 5))
    got = kde_ld(pts)
    assert got.dtype == np.longdouble
    assert_allclose(got.astype(np.float64), stats.gaussian_kde(x)(pts), rtol=1e-13)


# ----------------------------------------------------------------------------- errors


def _raises_like_scipy(call, exc, match):
    with pytest.raises(exc, match=match):
        call(GaussianKDE)
    with pytest.raises(exc, match=match):
        call(stats.gaussian_kde)


def test_error_dimensions_greater_than_samples():
    x = np.random.default_rng(0).standard_normal((5, 3))
    _raises_like_scipy(lambda cls: cls(x), ValueError, "Number of dimensions is greater than number of samples")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # scipy's, on NaN weights
def test_errors_for_several_faults_come_in_scipys_order():
    # Regression: value checks on the data and weights used to run before scipy's shape, d > n and
    # bw_method checks, so input with two faults reported a different one than scipy.
    wide = np.random.default_rng(0).standard_normal((5, 3))
    nan_data = np.array([1.0, np.nan, 2.0, 4.0])
    _raises_like_scipy(lambda cls: cls(wide, weights=[1, np.nan, -1]), ValueError, "Number of dimensions is greater")
    _raises_like_scipy(lambda cls: cls(wide.T, weights=[np.nan, 1]), ValueError, "should be of length n")
    _raises_like_scipy(lambda cls: cls(wide.T[:, :2], weights=[[1, 1], [1, 1]]), ValueError, "one-dimensional")
    _raises_like_scipy(lambda cls: cls(nan_data, bw_method="gauss"), ValueError, "`bw_method` should be")
    _raises_like_scipy(lambda cls: cls(nan_data, weights=[1, 1, -1, 1]), ValueError, "aweights cannot be negative")
    _raises_like_scipy(lambda cls: cls(nan_data, weights=[1, np.inf, 1, 1]), ValueError, "must not contain infs or NaNs")


def test_error_singular_data():
    x = np.vstack([np.arange(10.0), 2 * np.arange(10.0)])
    _raises_like_scipy(lambda cls: cls(x), linalg.LinAlgError, "lower-dimensional subspace")


def test_error_too_few_elements():
    _raises_like_scipy(lambda cls: cls([1.0]), ValueError, "`dataset` input should have multiple elements.")


def test_error_wrong_point_dimension():
    x = _data(2, 10)
    for method in ("pdf", "logpdf", "evaluate"):
        _raises_like_scipy(
            lambda cls, method=method: getattr(cls(x), method)(np.ones((3, 4))),
            ValueError,
            "points have dimension 3, dataset has dimension 2",
        )


def test_error_bad_bw_method():
    _raises_like_scipy(lambda cls: cls(np.arange(5.0), bw_method="wrongstring"), ValueError, "`bw_method` should be")
    kde = GaussianKDE(np.arange(5.0))
    with pytest.raises(ValueError, match="`bw_method` should be"):
        kde.set_bandwidth([0.1, 0.2])


@pytest.mark.parametrize("bad", [0, -1.0, np.nan])
def test_error_non_positive_factor_is_up_front(bad):
    with pytest.raises(ValueError, match="positive, finite real number"):
        GaussianKDE(np.arange(5.0), bw_method=bad)
    kde = GaussianKDE(np.arange(5.0), bw_method="silverman")
    before = (kde.factor, kde.covariance.copy(), kde.pdf([1.0]))
    with pytest.raises(ValueError, match="positive, finite real number"):
        kde.set_bandwidth(bad)
    assert kde.factor == before[0]  # a failed call leaves the estimator as it was
    assert_array_equal(kde.covariance, before[1])
    assert_array_equal(kde.pdf([1.0]), before[2])
    kde._compute_covariance()
    assert kde.factor == before[0]


def test_error_bad_weights():
    x = np.arange(5.0)
    _raises_like_scipy(lambda cls: cls(x, weights=[1, 2]), ValueError, "`weights` input should be of length n")
    _raises_like_scipy(lambda cls: cls(x, weights=[[1] * 5]), ValueError, "`weights` input should be one-dimensional.")
    _raises_like_scipy(lambda cls: cls(x, weights=[-1, 1, 1, 1, 1]), ValueError, "aweights cannot be negative")
    _raises_like_scipy(lambda cls: cls(x, weights=[np.nan, 1, 1, 1, 1]), ValueError, "must not contain infs or NaNs")
    with pytest.raises(ValueError, match="positive, finite sum"):
        GaussianKDE(x, weights=np.zeros(5))


def test_error_non_finite_points_and_data():
    kde = GaussianKDE(np.arange(5.0))
    _raises_like_scipy(lambda cls: cls(np.arange(5.0)).pdf([np.inf]), ValueError, "must not contain infs or NaNs")
    with pytest.raises(ValueError, match="points must contain only finite values"):
        kde.logpdf([np.nan])
    with pytest.raises(ValueError, match="`dataset` must contain only finite values"):
        GaussianKDE([1.0, np.nan, 2.0])


def test_error_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match="`dataset` should be 1-D"):
        GaussianKDE(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="points should be 1-D or 2-D"):
        GaussianKDE(_data(2, 10)).pdf(np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="complex points"):
        GaussianKDE(np.arange(5.0)).pdf([1j])


def test_error_marginal_like_scipy():
    x = _data(4, 30)
    _raises_like_scipy(lambda cls: cls(x).marginal([1, 2.5]), ValueError, "Elements of `dimensions` must be integers")
    _raises_like_scipy(
        lambda cls: cls(x).marginal([1, 2, 2]), ValueError, "All elements of `dimensions` must be unique."
    )
    _raises_like_scipy(
        lambda cls: cls(x).marginal([1, -5, 6]),
        ValueError,
        r"Dimensions \[-5  6\] are invalid for a distribution in 4 dimensions.",
    )


def test_error_integrals_like_scipy():
    x = _data(2, 10)
    _raises_like_scipy(lambda cls: cls(x).integrate_box_1d(0, 1), ValueError, "only handles 1D pdfs")
    _raises_like_scipy(
        lambda cls: cls(x).integrate_gaussian([0, 0, 0], np.eye(2)), ValueError, "mean does not have dimension 2"
    )
    _raises_like_scipy(
        lambda cls: cls(x).integrate_gaussian([0, 0], np.eye(3)), ValueError, "covariance does not have dimension 2"
    )
    _raises_like_scipy(lambda cls: cls(x).integrate_gaussian([0, 0], -10 * np.eye(2)), linalg.LinAlgError, None)
    _raises_like_scipy(
        lambda cls: cls(x).integrate_kde(cls(np.arange(5.0))), ValueError, "KDEs are not the same dimensionality"
    )
    _raises_like_scipy(lambda cls: cls(x).resample(seed="a"), ValueError, "cannot be used to seed")


# ----------------------------------------------------------------------------- hooks


class _Subclass1(GaussianKDE):
    def __init__(self, dataset):
        self.dataset = np.atleast_2d(dataset)
        self.d, self.n = self.dataset.shape
        self.covariance_factor = self.scotts_factor
        self._compute_covariance()


class _Subclass2(GaussianKDE):
    def __init__(self, dataset):
        self.covariance_factor = self.scotts_factor
        super().__init__(dataset)


class _Subclass4(GaussianKDE):
    def covariance_factor(self):
        return 0.5 * self.silverman_factor()


class _RefSubclass4(stats.gaussian_kde):
    def covariance_factor(self):
        return 0.5 * self.silverman_factor()


def test_subclass_hooks():
    x1 = np.array([-7, -5, 1, 4, 5], dtype=float)
    xs = np.linspace(-10, 10, num=50)
    ys = stats.gaussian_kde(x1)(xs)
    assert_allclose(_Subclass1(x1)(xs), ys, rtol=RTOL)
    assert_allclose(_Subclass2(x1)(xs), ys, rtol=RTOL)
    assert_allclose(_Subclass4(x1)(xs), _RefSubclass4(x1)(xs), rtol=RTOL)
    assert _Subclass4(x1).factor == _RefSubclass4(x1).factor


def test_assigning_covariance_factor_then_compute_covariance():
    x1 = np.array([-7, -5, 1, 4, 5], dtype=float)
    xs = np.linspace(-10, 10, num=50)
    kde = GaussianKDE(x1)
    before = kde(xs)
    kde.covariance_factor = kde.silverman_factor
    kde._compute_covariance()
    assert_allclose(kde(xs), stats.gaussian_kde(x1, bw_method="silverman")(xs), rtol=RTOL)
    assert not np.allclose(kde(xs), before)
    kde.covariance_factor = lambda: 0.3
    kde._compute_covariance()
    assert kde.factor == 0.3
    assert_allclose(kde(xs), stats.gaussian_kde(x1, bw_method=0.3)(xs), rtol=RTOL)


def test_set_bandwidth_sequence_and_callable():
    x1 = np.array([-7, -5, 1, 4, 5], dtype=float)
    xs = np.linspace(-10, 10, num=5)
    kde, ref = GaussianKDE(x1), stats.gaussian_kde(x1)
    for bw in (0.5, "scott", "silverman", lambda k: 0.8 * k.scotts_factor(), None):
        kde.set_bandwidth(bw)
        ref.set_bandwidth(bw)
        assert kde.factor == ref.factor
        assert_allclose(kde(xs), ref(xs), rtol=RTOL)


@pytest.mark.parametrize("make", [np.array, lambda v: np.array([v])])
def test_callable_bw_method_may_return_a_one_element_array(make):
    # Regression: scipy uses a 0-d or one-element array returned by a callable as the factor; this
    # estimator used to reject it as "not a positive, finite real number".
    x = _data(2, 30, seed=4)
    points = _data(2, 5, seed=6)
    kde, ref = GaussianKDE(x, bw_method=lambda k: make(0.4)), stats.gaussian_kde(x, bw_method=lambda k: make(0.4))
    assert_array_equal(kde.factor, ref.factor)
    assert_allclose(kde.covariance, ref.covariance, rtol=1e-15)
    assert_allclose(kde(points), ref(points), rtol=RTOL)
    assert_allclose(kde.logpdf(points), ref.logpdf(points), rtol=RTOL)
    with pytest.raises(ValueError, match="positive, finite real number"):
        GaussianKDE(x, bw_method=lambda k: make(-0.4))


def test_reassigning_dataset_resets_caches():
    kde = GaussianKDE(_data(2, 30, seed=1))
    pts = _data(2, 4, seed=2)
    kde.pdf(pts)
    new = _data(2, 30, seed=3)
    kde.dataset = new
    kde._compute_covariance()
    assert_allclose(kde.pdf(pts), stats.gaussian_kde(new)(pts), rtol=RTOL)


def test_pickle_round_trip():
    kde = GaussianKDE(_data(3, 30), bw_method="silverman")
    pts = _data(3, 5, seed=9)
    kde.pdf(pts)
    clone = pickle.loads(pickle.dumps(kde))
    assert_array_equal(clone.pdf(pts), kde.pdf(pts))


# ----------------------------------------------------------------------------- methods


@pytest.mark.parametrize("weighted", [False, True])
def test_integrals_match_scipy(weighted):
    rng = np.random.default_rng(5)
    x1 = rng.standard_normal(40)
    w = rng.random(40) if weighted else None
    ours, ref = GaussianKDE(x1, weights=w), stats.gaussian_kde(x1, weights=w)
    assert ours.integrate_box_1d(-0.5, 1.0) == pytest.approx(ref.integrate_box_1d(-0.5, 1.0), rel=1e-14)
    assert ours.integrate_gaussian(0.3, 2.0) == pytest.approx(ref.integrate_gaussian(0.3, 2.0), rel=1e-12)
    other = stats.gaussian_kde(rng.standard_normal(25) + 0.5)
    assert ours.integrate_kde(other) == pytest.approx(ref.integrate_kde(other), rel=1e-12)
    assert ours.integrate_kde(GaussianKDE(other.dataset)) == pytest.approx(ref.integrate_kde(other), rel=1e-12)
    x2 = rng.standard_normal((2, 30))
    w2 = w[:30] if weighted else None
    ours2, ref2 = GaussianKDE(x2, weights=w2), stats.gaussian_kde(x2, weights=w2)
    assert ours2.integrate_gaussian([0.1, -0.2], [[1.0, 0.3], [0.3, 2.0]]) == pytest.approx(
        ref2.integrate_gaussian([0.1, -0.2], [[1.0, 0.3], [0.3, 2.0]]), rel=1e-12
    )
    assert ours2.integrate_kde(ours2) == pytest.approx(ref2.integrate_kde(ref2), rel=1e-12)
    got = ours2.integrate_box([-1, -2], [0, 0], rng=np.random.default_rng(3))
    want = ref2.integrate_box([-1, -2], [0, 0], rng=np.random.default_rng(3))
    assert got == pytest.approx(want, rel=1e-12)
    for value in (ours.integrate_box_1d(0, 1), ours.integrate_gaussian(0, 1), ours.integrate_kde(ours)):
        assert isinstance(value, np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64, np.float64])
def test_integrate_box_1d_follows_scipys_promotion(dtype):
    # Regression: the differences used to be formed in float64 for every dataset dtype; scipy forms
    # ``low - dataset`` with numpy's promotion (float32 stays float32), which moved the result by ~1e-10.
    x = (np.random.default_rng(11).standard_normal(30) * 3).astype(dtype)
    ours, ref = GaussianKDE(x), stats.gaussian_kde(x)
    for low, high in [(-0.5, 1.0), (np.float32(0.25), 3), (-np.inf, 0.0)]:
        got, want = ours.integrate_box_1d(low, high), ref.integrate_box_1d(low, high)
        assert got == pytest.approx(want, rel=1e-14)
        assert isinstance(got, np.float64)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("d", [1, 2])
def test_resample_draws_scipys_numbers(d, weighted):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((d, 50))
    w = rng.random(50) if weighted else None
    ours, ref = GaussianKDE(x, weights=w), stats.gaussian_kde(x, weights=w)
    assert_array_equal(ours.resample(20, seed=831), ref.resample(20, seed=831))
    assert_array_equal(
        ours.resample(20, seed=np.random.RandomState(138)), ref.resample(20, seed=np.random.RandomState(138))
    )
    assert_array_equal(
        ours.resample(20, seed=np.random.default_rng(1234)), ref.resample(20, seed=np.random.default_rng(1234))
    )
    assert ours.resample(seed=1).shape == (d, int(ref.neff))
    np.random.seed(7)
    a = ours.resample(5)
    np.random.seed(7)
    assert_array_equal(a, ref.resample(5))


def test_marginal_matches_scipy():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 40))
    w = rng.random(40)
    ours, ref = GaussianKDE(x, weights=w), stats.gaussian_kde(x, weights=w)
    pts = rng.standard_normal((4, 6))
    for dims in ([1, 3], [-1, 1], 2, np.array([0, 1, 2])):
        m_ours, m_ref = ours.marginal(dims), ref.marginal(dims)
        assert isinstance(m_ours, GaussianKDE)
        assert m_ours.factor == m_ref.factor
        sel = np.atleast_1d(dims)
        assert_allclose(m_ours.pdf(pts[sel]), m_ref.pdf(pts[sel]), rtol=RTOL)


# ----------------------------------------------------------------------------- documented differences


def test_zero_weight_points_give_finite_logpdf_where_scipy_gives_nan():
    x = np.arange(5.0)
    w = np.array([0.0, 1.0, 1.0, 1.0, 1.0])
    ours, ref = GaussianKDE(x, weights=w), stats.gaussian_kde(x, weights=w)
    pts = [0.5, 2.0]
    assert np.isnan(ref.logpdf(pts)).all()  # scipy's behaviour, documented
    assert_allclose(ours.logpdf(pts), np.log(ref.pdf(pts)), rtol=1e-13)
    assert_allclose(ours.pdf(pts), ref.pdf(pts), rtol=1e-13)


def test_logpdf_finite_far_away_and_in_high_dimension():
    x = _data(2, 30)
    kde = GaussianKDE(x)
    far = np.array([[300.0, -1e4], [0.0, 5e3]])
    ref = stats.gaussian_kde(x).logpdf(far)
    got = kde.logpdf(far)
    assert np.isfinite(got).all()
    assert_allclose(got, ref, rtol=1e-12)
    assert kde.pdf(far)[1] == 0.0  # exp of about -1e9 underflows, as it must
    rng = np.random.default_rng(1)
    d = 1000
    big = rng.standard_normal((d, 1200)) + np.arange(d)[:, None]
    kde_big = GaussianKDE(big)
    value = kde_big.logpdf(np.arange(d, dtype=float))
    assert np.isfinite(value).all()


def test_pdf_recovers_values_below_plain_underflow():
    # 20-D with a narrow bandwidth: the normalising constant is ~1e32, so the density at 39 bandwidths
    # from the nearest point (~1e-298) is a normal number although exp(-r2 / 2) itself underflows.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 60))
    kde = GaussianKDE(x, bw_method=0.01)
    v = np.zeros(20)
    v[0] = np.sqrt(1520.0)  # r2 / 2 = 760 from point 0; every other point is much farther
    p = x[:, :1] + kde.cho_cov @ v[:, None]
    expected = -np.log(60.0) - 760.0 - kde.log_det / 2
    assert kde.logpdf(p)[0] == pytest.approx(expected, rel=1e-12)
    assert kde.pdf(p)[0] == pytest.approx(np.exp(expected), rel=1e-9)
    assert np.exp(expected) > np.finfo(float).tiny
    assert stats.gaussian_kde(x, bw_method=0.01).pdf(p)[0] == 0.0  # scipy underflows (documented)


def test_repr_mentions_shape():
    assert "d=2, n=40" in repr(GaussianKDE(_data()))
