"""GaussianKDE behaves like scipy.stats.gaussian_kde: attributes, shapes, dtypes, errors, hooks, streams."""

import pickle

import numpy as np
import pytest
from numpy.testing import assert_array_equal
from scipy import linalg, stats

from anomstats import GaussianKDE
from tests._tolerances import (
    EXACT,
    SCIPY,
    KDEErrorModel,
    assert_close_each,
    cholesky_atol,
    core_route,
    covariance_atol,
    kde_log_density,
    log_det_atol,
    precision_atol,
    weighted_sum_rtol,
)


def _as_scipy_points(kde, points):
    """``points`` as scipy's ``evaluate`` reads them: (d, m)."""
    pts = np.atleast_2d(np.asarray(points, dtype=np.float64))
    if pts.shape[0] != kde.d and pts.shape[0] == 1 and pts.shape[1] == kde.d:
        pts = pts.reshape(kde.d, 1)
    return pts


def _bound(ref, points, routes=None, log_density=None):
    """kde_route_error (tests/_tolerances.py) for two computations of ``ref``'s density at ``points``.

    Default routes: the core (direct differences up to d = 2, centred) and scipy (direct, uncentred),
    each with its own fit. Returns the model and the reference log-densities its bounds need.
    """
    pts = _as_scipy_points(ref, points)
    routes = (core_route(ref.d), SCIPY) if routes is None else routes
    model = KDEErrorModel.of(ref.dataset.T, pts.T, ref.covariance, routes, weights=ref.weights)
    return model, (ref.logpdf(pts) if log_density is None else log_density)


def _assert_pdf_matches(got, want, ref, points, **kwargs):
    """``got`` densities against ``want`` within :func:`_bound`'s per-point relative bound."""
    model, log_density = _bound(ref, points, **kwargs)
    assert_close_each(got, want, rtol=model.rtol_each(log_density).reshape(np.shape(want)), atol=model.atol())


def _assert_logpdf_matches(got, want, ref, points, **kwargs):
    """``got`` log-densities against ``want`` within :func:`_bound`'s per-point absolute bound."""
    model, log_density = _bound(ref, points, **kwargs)
    assert_close_each(got, want, atol=model.log_atol_each(log_density).reshape(np.shape(want)))


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
    # Bounds (tests/_tolerances.py): covariance_atol (sums of 30 weighted products, times factor^2),
    # cholesky_atol and precision_atol (kappa delta perturbation of the factor and the inverse),
    # log_det_atol (d kappa delta).
    f2 = ours.factor**2
    assert_close_each(ours.covariance, ref.covariance, atol=covariance_atol(x.T, ref.weights) * f2)
    assert_close_each(ours.cho_cov, ref.cho_cov, atol=cholesky_atol(ref.covariance, 30))
    assert_close_each(ours.inv_cov, ref.inv_cov, atol=precision_atol(ref.covariance, 30))
    assert ours.log_det == pytest.approx(ref.log_det, rel=0, abs=log_det_atol(ref.covariance, 30))
    assert ours.cho_cov.dtype == np.float64


def test_lazy_weights_and_neff():
    bare = GaussianKDE.__new__(GaussianKDE)  # as scipy-style subclasses that skip __init__ see it
    bare.dataset = _data()
    bare.d, bare.n = bare.dataset.shape
    assert "_weights" not in bare.__dict__ and "_neff" not in bare.__dict__
    assert_array_equal(bare.weights, np.full(40, 1 / 40))
    # neff = 1 / sum(w^2): a sum of 40 equal squares, within weighted_sum_rtol.
    assert bare.neff == pytest.approx(40.0, rel=weighted_sum_rtol(40))
    assert "_weights" in bare.__dict__ and "_neff" in bare.__dict__
    bare._compute_covariance()
    ref = stats.gaussian_kde(bare.dataset)
    _assert_pdf_matches(bare.pdf([0.1, 0.2]), ref.pdf([0.1, 0.2]), ref, [0.1, 0.2])  # kde_route_error


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
        _assert_pdf_matches(got, want, ref, pts)  # kde_route_error, per point
    x1 = np.arange(6.0) ** 1.5
    ours1, ref1 = GaussianKDE(x1), stats.gaussian_kde(x1)
    for pts in (1.5, [1.5], [1.0, 2.0, 3.0], [[1.0, 2.0]], []):
        _assert_pdf_matches(ours1(pts), ref1(pts), ref1, pts)
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
    # kde_route_error in float64 (the widest of the two computations' errors; long double ones are smaller);
    # scipy's logpdf is NaN with a zero weight, so q comes from its pdf.
    log_want = np.log(want.astype(np.float64))
    _assert_pdf_matches(got.astype(np.float64), want.astype(np.float64), ref, points, log_density=log_want)


def test_float32_inputs_give_float64_without_underflow():
    x = np.random.default_rng(0).standard_normal((2, 50)).astype(np.float32)
    kde = GaussianKDE(x)
    far = np.array([[60.0], [60.0]], dtype=np.float32)
    log_density = kde.logpdf(far)
    assert log_density.dtype == np.float64
    assert np.isfinite(log_density).all()
    ref_kde = stats.gaussian_kde(x.astype(np.float64))
    ref = ref_kde.logpdf(far.astype(np.float64))
    _assert_logpdf_matches(log_density, ref, ref_kde, far)  # kde_route_error (q ~ 1e4: eps q absolute)


def test_longdouble_evaluation_is_accurate():
    x = np.random.default_rng(1).standard_normal((2, 20))
    kde_ld = GaussianKDE(x.astype(np.longdouble))
    pts = np.random.default_rng(2).standard_normal((2, 5))
    got = kde_ld(pts)
    assert got.dtype == np.longdouble
    ref = stats.gaussian_kde(x)
    # kde_route_error of scipy's float64 computation alone: the long-double one is exact by comparison.
    _assert_pdf_matches(got.astype(np.float64), ref(pts), ref, pts, routes=(EXACT, SCIPY))


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
    ref = stats.gaussian_kde(x1)
    ys = ref(xs)
    # kde_route_error, per point (queries up to ~4 bandwidths out).
    _assert_pdf_matches(_Subclass1(x1)(xs), ys, ref, xs)
    _assert_pdf_matches(_Subclass2(x1)(xs), ys, ref, xs)
    ref4 = _RefSubclass4(x1)
    _assert_pdf_matches(_Subclass4(x1)(xs), ref4(xs), ref4, xs)
    assert _Subclass4(x1).factor == _RefSubclass4(x1).factor


def test_assigning_covariance_factor_then_compute_covariance():
    x1 = np.array([-7, -5, 1, 4, 5], dtype=float)
    xs = np.linspace(-10, 10, num=50)
    kde = GaussianKDE(x1)
    before = kde(xs)
    kde.covariance_factor = kde.silverman_factor
    kde._compute_covariance()
    ref = stats.gaussian_kde(x1, bw_method="silverman")
    _assert_pdf_matches(kde(xs), ref(xs), ref, xs)  # kde_route_error
    assert not np.allclose(kde(xs), before)
    kde.covariance_factor = lambda: 0.3
    kde._compute_covariance()
    assert kde.factor == 0.3
    ref = stats.gaussian_kde(x1, bw_method=0.3)
    _assert_pdf_matches(kde(xs), ref(xs), ref, xs)


def test_set_bandwidth_sequence_and_callable():
    x1 = np.array([-7, -5, 1, 4, 5], dtype=float)
    xs = np.linspace(-10, 10, num=5)
    kde, ref = GaussianKDE(x1), stats.gaussian_kde(x1)
    for bw in (0.5, "scott", "silverman", lambda k: 0.8 * k.scotts_factor(), None):
        kde.set_bandwidth(bw)
        ref.set_bandwidth(bw)
        assert kde.factor == ref.factor
        _assert_pdf_matches(kde(xs), ref(xs), ref, xs)  # kde_route_error


@pytest.mark.parametrize("make", [np.array, lambda v: np.array([v])])
def test_callable_bw_method_may_return_a_one_element_array(make):
    # Regression: scipy uses a 0-d or one-element array returned by a callable as the factor; this
    # estimator used to reject it as "not a positive, finite real number".
    x = _data(2, 30, seed=4)
    points = _data(2, 5, seed=6)
    kde, ref = GaussianKDE(x, bw_method=lambda k: make(0.4)), stats.gaussian_kde(x, bw_method=lambda k: make(0.4))
    assert_array_equal(kde.factor, ref.factor)
    assert_close_each(kde.covariance, ref.covariance, atol=covariance_atol(x.T) * 0.4**2)  # covariance_atol
    _assert_pdf_matches(kde(points), ref(points), ref, points)  # kde_route_error
    _assert_logpdf_matches(kde.logpdf(points), ref.logpdf(points), ref, points)
    with pytest.raises(ValueError, match="positive, finite real number"):
        GaussianKDE(x, bw_method=lambda k: make(-0.4))


def test_reassigning_dataset_resets_caches():
    kde = GaussianKDE(_data(2, 30, seed=1))
    pts = _data(2, 4, seed=2)
    kde.pdf(pts)
    new = _data(2, 30, seed=3)
    kde.dataset = new
    kde._compute_covariance()
    ref = stats.gaussian_kde(new)
    _assert_pdf_matches(kde.pdf(pts), ref.pdf(pts), ref, pts)  # kde_route_error


def test_pickle_round_trip():
    kde = GaussianKDE(_data(3, 30), bw_method="silverman")
    pts = _data(3, 5, seed=9)
    kde.pdf(pts)
    clone = pickle.loads(pickle.dumps(kde))
    assert_array_equal(clone.pdf(pts), kde.pdf(pts))


# ----------------------------------------------------------------------------- methods


def _overlap_rtol(sum_cov, data, weights, queries, query_weights=None):
    """Bound for a sum of Gaussian overlaps ``sum_j qw_j sum_i w_i N(q_j; x_i, sum_cov)``.

    Each inner sum is a KDE density with bandwidth ``sum_cov`` (kde_route_error, the core's route against
    scipy's); the outer sum of non-negative values adds weighted_sum_rtol.
    """
    data, queries = np.atleast_2d(data), np.atleast_2d(queries)
    w = np.ones(data.shape[1]) if weights is None else weights
    model = KDEErrorModel.of(data.T, queries.T, sum_cov, (core_route(data.shape[0]), SCIPY), weights=w)
    inner = model.rtol(kde_log_density(data.T, queries.T, sum_cov, w))
    return inner + (0.0 if query_weights is None else weighted_sum_rtol(queries.shape[1]))


@pytest.mark.parametrize("weighted", [False, True])
def test_integrals_match_scipy(weighted):
    rng = np.random.default_rng(5)
    x1 = rng.standard_normal(40)
    w = rng.random(40) if weighted else None
    ours, ref = GaussianKDE(x1, weights=w), stats.gaussian_kde(x1, weights=w)
    # integrate_box_1d: both sides evaluate the same ndtr differences; only the sums differ.
    assert ours.integrate_box_1d(-0.5, 1.0) == pytest.approx(ref.integrate_box_1d(-0.5, 1.0), rel=weighted_sum_rtol(40))
    # integrate_gaussian / integrate_kde: _overlap_rtol (KDE bounds with the summed bandwidths).
    rtol = _overlap_rtol(ref.covariance + 2.0, x1, ref.weights, 0.3)
    assert ours.integrate_gaussian(0.3, 2.0) == pytest.approx(ref.integrate_gaussian(0.3, 2.0), rel=rtol)
    other = stats.gaussian_kde(rng.standard_normal(25) + 0.5)
    rtol = _overlap_rtol(ref.covariance + other.covariance, x1, ref.weights, other.dataset, other.weights)
    assert ours.integrate_kde(other) == pytest.approx(ref.integrate_kde(other), rel=rtol)
    assert ours.integrate_kde(GaussianKDE(other.dataset)) == pytest.approx(ref.integrate_kde(other), rel=rtol)
    x2 = rng.standard_normal((2, 30))
    w2 = w[:30] if weighted else None
    ours2, ref2 = GaussianKDE(x2, weights=w2), stats.gaussian_kde(x2, weights=w2)
    cov = np.array([[1.0, 0.3], [0.3, 2.0]])
    rtol = _overlap_rtol(ref2.covariance + cov, x2, ref2.weights, np.array([[0.1], [-0.2]]))
    assert ours2.integrate_gaussian([0.1, -0.2], [[1.0, 0.3], [0.3, 2.0]]) == pytest.approx(
        ref2.integrate_gaussian([0.1, -0.2], [[1.0, 0.3], [0.3, 2.0]]), rel=rtol
    )
    rtol = _overlap_rtol(2 * ref2.covariance, x2, ref2.weights, x2, ref2.weights)
    assert ours2.integrate_kde(ours2) == pytest.approx(ref2.integrate_kde(ref2), rel=rtol)
    got = ours2.integrate_box([-1, -2], [0, 0], rng=np.random.default_rng(3))
    want = ref2.integrate_box([-1, -2], [0, 0], rng=np.random.default_rng(3))
    # The same scipy multivariate-normal CDFs with the same random stream; only the weighted sums differ.
    assert got == pytest.approx(want, rel=weighted_sum_rtol(30))
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
        # The same differences and ndtr values on both sides; only the weighted sums differ (float64).
        assert got == pytest.approx(want, rel=weighted_sum_rtol(30))
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
        _assert_pdf_matches(m_ours.pdf(pts[sel]), m_ref.pdf(pts[sel]), m_ref, pts[sel])  # kde_route_error


# ----------------------------------------------------------------------------- documented differences


def test_zero_weight_points_give_finite_logpdf_where_scipy_gives_nan():
    x = np.arange(5.0)
    w = np.array([0.0, 1.0, 1.0, 1.0, 1.0])
    ours, ref = GaussianKDE(x, weights=w), stats.gaussian_kde(x, weights=w)
    pts = [0.5, 2.0]
    assert np.isnan(ref.logpdf(pts)).all()  # scipy's behaviour, documented
    want_log = np.log(ref.pdf(pts))
    # kde_route_error (q from scipy's pdf, its logpdf being NaN here).
    _assert_logpdf_matches(ours.logpdf(pts), want_log, ref, pts, log_density=want_log)
    _assert_pdf_matches(ours.pdf(pts), ref.pdf(pts), ref, pts, log_density=want_log)


def test_logpdf_finite_far_away_and_in_high_dimension():
    x = _data(2, 30)
    kde = GaussianKDE(x)
    far = np.array([[300.0, -1e4], [0.0, 5e3]])
    ref_kde = stats.gaussian_kde(x)
    ref = ref_kde.logpdf(far)
    got = kde.logpdf(far)
    assert np.isfinite(got).all()
    _assert_logpdf_matches(got, ref, ref_kde, far)  # kde_route_error: q ~ 1e9, so eps q ~ 1e-7 absolute
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
    # kde_route_error of our route against the formula (exact by comparison; the construction of p rounds
    # its coordinates like direct differences from the origin, and our triangular solve brings kappa).
    model = KDEErrorModel.of(x.T, p.T, kde.covariance, (core_route(20), SCIPY))
    bound = model.log_atol(np.array([expected]))
    assert kde.logpdf(p)[0] == pytest.approx(expected, rel=0, abs=bound)
    assert kde.pdf(p)[0] == pytest.approx(np.exp(expected), rel=bound)  # |dp / p| = |d log p|
    assert np.exp(expected) > np.finfo(float).tiny
    assert stats.gaussian_kde(x, bw_method=0.01).pdf(p)[0] == 0.0  # scipy underflows (documented)


def test_repr_mentions_shape():
    assert "d=2, n=40" in repr(GaussianKDE(_data()))
