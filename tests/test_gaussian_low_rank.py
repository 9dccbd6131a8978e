"""MultiVariateGaussian(form="low_rank"): the exact low-rank form equals the dense fit; its own guarantees.

Reference: the dense fit (``form="dense"``, float64), which forms, factors and inverts each ``C×C``
covariance. Both are exact in exact arithmetic, so they are compared to rounding, with bounds from
``tests/_tolerances.py``-style reasoning stated next to each assertion.
"""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from anomstats import MultiVariateGaussian, NotFittedError
from anomstats.gaussian import LowRankMultiVariateGaussian
from tests._tolerances import eps

EPS = eps(np.float64)


def _embedding(n, c, spatial=(3, 2), seed=0, offset=0.0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(c, c)) * 0.2 + np.eye(c)
    x = np.einsum("ncp,cd->ndp", rng.normal(size=(n, c, int(np.prod(spatial)))), mixing)
    return (x.reshape((n, c) + spatial) + offset).astype(dtype)


def _rtol(dense: MultiVariateGaussian, n: int, c: int) -> float:
    """Relative agreement of two float64 routes to the same Gaussian (dense Cholesky/inverse vs thin SVD).

    Both are backward stable: each is the exact answer for a covariance perturbed by ~c·eps·|Σ|, which
    moves d² and log det by at most ~cond(Σ)·c·eps relative (cond(Σ) <= λ_max/ρ with the ridge). The
    sums over n observations add sqrt(n)·eps. Twice that for the two routes. For the tests' data
    (cond ~ 1e3) this is ~1e-11, inside the issue's 1e-10.
    """
    cond = float(np.max(np.linalg.cond(dense.covariance)))
    return 2 * (cond * c + np.sqrt(n)) * 8 * EPS


def _assert_equal_to_dense(low, dense, x, n, c):
    rtol = _rtol(dense, n, c)
    np.testing.assert_allclose(low.mean, dense.mean, rtol=0, atol=8 * np.sqrt(n) * EPS * np.abs(x).max())
    np.testing.assert_allclose(low.log_det, dense.log_det, rtol=rtol, atol=rtol * c)
    np.testing.assert_allclose(low.mahalanobis(x[:4]), dense.mahalanobis(x[:4]), rtol=rtol)
    np.testing.assert_allclose(low.logpdf(x[:4]), dense.logpdf(x[:4]), rtol=rtol)
    scale = np.abs(dense.precision).max()
    np.testing.assert_allclose(low.precision, dense.precision, rtol=0, atol=rtol * scale)
    np.testing.assert_allclose(low.covariance, dense.covariance, rtol=0, atol=rtol * np.abs(dense.covariance).max())


@pytest.mark.parametrize("n, c", [(5, 12), (20, 40), (2, 3)])
def test_fit_equals_the_dense_fit(n, c):
    x = _embedding(n, c, seed=n)
    low = MultiVariateGaussian(form="low_rank").fit(x)
    dense = MultiVariateGaussian(store_covariance=True).fit(x)
    assert isinstance(low, MultiVariateGaussian) and type(low) is LowRankMultiVariateGaussian
    assert low.basis.shape == (6, c, n - 1) and low.eigenvalues.shape == (6, n - 1)
    _assert_equal_to_dense(low, dense, x, n, c)
    # The basis is orthonormal to rounding (Householder/SVD: ~c·eps) and the eigenvalues decrease to >= ρ.
    gram = np.einsum("pcr,pcs->prs", low.basis, low.basis)
    np.testing.assert_allclose(gram, np.broadcast_to(np.eye(n - 1), gram.shape), rtol=0, atol=8 * c * EPS)
    assert np.all(np.diff(low.eigenvalues, axis=1) <= 0) and np.all(low.eigenvalues >= low.ridge)


@given(
    seed=st.integers(0, 2**31),
    n=st.integers(2, 14),
    c=st.integers(14, 24),
    splits=st.lists(st.integers(1, 13), min_size=1, max_size=4),
    offset=st.sampled_from([0.0, 1e3]),
)
def test_streaming_and_merging_equal_the_dense_fit(seed, n, c, splits, offset):
    x = _embedding(n, c, spatial=(2,), seed=seed, offset=offset)
    cuts = sorted({min(s, n - 1) for s in splits if 0 < s < n})
    parts = np.split(x, cuts)
    streamed = MultiVariateGaussian(form="low_rank")
    for part in parts[: len(parts) // 2 + 1]:
        streamed.partial_fit(part)
    other = MultiVariateGaussian(form="low_rank")
    for part in parts[len(parts) // 2 + 1 :]:
        other.partial_fit(part)
    streamed.merge(other)
    assert streamed.n_samples_seen_ == n
    dense = MultiVariateGaussian(store_covariance=True).fit(x)
    # The offset is removed by each batch's own mean (float64): the centred columns carry the rounding
    # of x, eps·|offset|, which is ~eps·offset/sigma relative to the spread (2e-13 at 1e3) on both routes.
    _assert_equal_to_dense(streamed, dense, x, n, c)


def test_streaming_past_c_columns_reduces_the_factor():
    # 3 batches of 10 with C = 12: the factor is reduced to its basis when it would pass C columns.
    x = _embedding(30, 12, seed=4)
    streamed = MultiVariateGaussian(form="low_rank")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # N - 1 >= C: no advantage (tested below)
        for part in np.split(x, 3):
            streamed.partial_fit(part)
        assert streamed._moments.n_columns <= 12 + 10 + 1
        dense = MultiVariateGaussian(store_covariance=True).fit(x)
        _assert_equal_to_dense(streamed, dense, x, 30, 12)


def test_float32_input_is_accumulated_in_float64():
    x32 = _embedding(8, 20, seed=5, dtype=np.float32)
    a = MultiVariateGaussian(form="low_rank").fit(x32)
    b = MultiVariateGaussian(form="low_rank").fit(x32.astype(np.float64))
    # Bound 0: the same float64 values enter the same float64 computation.
    np.testing.assert_array_equal(a.eigenvalues, b.eigenvalues)
    np.testing.assert_array_equal(a.mahalanobis(x32[:2]), b.mahalanobis(x32[:2].astype(np.float64)))


def test_float32_storage_halves_the_state():
    x = _embedding(8, 20, seed=6)
    low = MultiVariateGaussian(form="low_rank", dtype=np.float32).fit(x)
    ref = MultiVariateGaussian(form="low_rank").fit(x)
    assert low.basis.dtype == low.eigenvalues.dtype == low.mean.dtype == np.float32
    # Rounding the state to float32 moves d² by ~cond·eps32 relative (cond = λ_max/ρ here ~ 1e2-1e3).
    cond = float((ref.eigenvalues.max(axis=1) / ref.ridge).max())
    np.testing.assert_allclose(low.mahalanobis(x[:3]), ref.mahalanobis(x[:3]), rtol=8 * cond * eps(np.float32))


def test_mahalanobis_has_no_cancellation_outside_the_basis():
    # One patch, C = 3, N = 2: the basis is the single direction of the difference of the two points.
    x = np.zeros((2, 3, 1))
    x[0, 0, 0], x[1, 0, 0] = -1e6, 1e6  # variance 2e12 along e0: λ1 = 2e12 + ρ
    low = MultiVariateGaussian(form="low_rank", ridge=0.01).fit(x)
    query = np.zeros((1, 3, 1))
    query[0, 0, 0], query[0, 1, 0] = 1e6, 1e-3  # far along the basis, a little outside it
    lam = 2e12 + 0.01
    exact = 1e12 / lam + 1e-6 / 0.01
    got = low.mahalanobis(query, squared=True)[0, 0]
    # |δ|² − |p|² would lose 1e12·eps ~ 2e-4 of an outside term of 1e-6 (then / ρ): ~200% error. The
    # residual formed as a vector is off by ~eps·1e6 per component: relative error ~1e-12 here.
    assert abs(got - exact) <= 1e-10 * exact


def test_ridge_zero_needs_more_observations_than_features():
    x = _embedding(6, 10, seed=7)
    with pytest.raises(np.linalg.LinAlgError, match="ridge=0 and N = 6 observations of C = 10"):
        MultiVariateGaussian(form="low_rank", ridge=0.0).fit(x)
    many = _embedding(30, 5, seed=8)
    with pytest.warns(UserWarning, match="no advantage"):
        low = MultiVariateGaussian(form="low_rank", ridge=0.0).fit(many)
    dense = MultiVariateGaussian(store_covariance=True, ridge=0.0).fit(many)
    _assert_equal_to_dense(low, dense, many, 30, 5)
    singular = many.copy()
    singular[:, 4] = singular[:, 3]  # a duplicated feature: singular without a ridge
    with pytest.warns(UserWarning), pytest.raises(np.linalg.LinAlgError, match="singular"):
        MultiVariateGaussian(form="low_rank", ridge=0.0).fit(singular)


def test_configuration_errors_and_repr():
    with pytest.raises(ValueError, match="form must be 'dense' or 'low_rank'"):
        MultiVariateGaussian(form="diagonal")
    with pytest.raises(ValueError, match="neither shrinkage nor low_memory"):
        MultiVariateGaussian(form="low_rank", shrinkage="oas")
    with pytest.raises(ValueError, match="neither shrinkage nor low_memory"):
        MultiVariateGaussian(form="low_rank", low_memory=True)
    low = MultiVariateGaussian(0.5, form="low_rank")
    assert repr(low) == "MultiVariateGaussian(ridge=0.5, dtype=float64, form='low_rank')"
    assert type(low.empty_like()) is LowRankMultiVariateGaussian
    with pytest.raises(NotFittedError):
        low.basis
    dense = MultiVariateGaussian().partial_fit(_embedding(3, 4))
    with pytest.raises(ValueError, match="cannot merge models with different"):
        MultiVariateGaussian(form="low_rank").partial_fit(_embedding(3, 4)).merge(dense)


def test_inputs_untouched_pickle_and_cholesky():
    x = _embedding(5, 9, seed=9)
    before = x.copy()
    low = MultiVariateGaussian(form="low_rank").fit(x)
    low.mahalanobis(x)
    np.testing.assert_array_equal(x, before)
    again = pickle.loads(pickle.dumps(low))
    np.testing.assert_array_equal(again.mahalanobis(x), low.mahalanobis(x))
    with pytest.raises(AttributeError, match="no Cholesky"):
        low.cholesky
    assert low.shrinkage_.shape == (6,) and not low.shrinkage_.any()


@pytest.mark.parametrize("spread", [0.0, 4.0, 7.0])
def test_ill_conditioned_observations_equal_the_dense_fit(spread):
    # Feature scales over `spread` decades: the Gram route's first pass departs from orthonormality by
    # about eps·e_max/e_min, and past 256 eps the Cholesky-QR pass re-orthonormalises (7 decades: the
    # smallest directions' variance is below the rounding of the Gram and is dropped to the ridge).
    rng = np.random.default_rng(int(spread))
    n, c = 40, 90
    x = rng.normal(size=(n, c, 4)) * np.logspace(0, -spread, c)[None, :, None] * 10
    low = MultiVariateGaussian(form="low_rank", ridge=1e-3).fit(x)
    dense = MultiVariateGaussian(store_covariance=True, ridge=1e-3).fit(x)
    gram = np.einsum("pcr,pcs->prs", low.basis, low.basis)
    kept = low.eigenvalues > low.ridge
    # Orthonormal to rounding wherever a direction carries variance (a dropped one is a zero column).
    np.testing.assert_allclose(gram, np.eye(n - 1) * kept[:, None, :], rtol=0, atol=8 * c * EPS)
    _assert_equal_to_dense(low, dense, x, n, c)


def test_outside_term_shortcut_agrees_with_the_residual_vector(monkeypatch):
    # Queries far outside the span take |δ|² − |p|² (at least half of |δ|² outside: one bit at most is lost
    # to the difference); forcing every query through the residual vector gives the same distances to the
    # sums' rounding, sqrt(C)·eps relative per term (twice: two routes).
    import anomstats._low_rank as low_rank

    x = _embedding(8, 60, seed=11)
    queries = _embedding(5, 60, seed=12) * 3.0
    model = MultiVariateGaussian(form="low_rank").fit(x)
    fast = model.mahalanobis(queries, squared=True)
    monkeypatch.setattr(low_rank, "OUTSIDE_FRACTION", 2.0)  # nothing qualifies: the vector everywhere
    exact = model.mahalanobis(queries, squared=True)
    np.testing.assert_allclose(fast, exact, rtol=2 * 8 * np.sqrt(60) * EPS)


def test_no_advantage_warning_points_at_the_callers_line():
    many = _embedding(30, 5, seed=13)
    with pytest.warns(UserWarning, match="no advantage") as caught:
        MultiVariateGaussian(form="low_rank").fit(many)
    assert caught[0].filename == __file__
    streamed = MultiVariateGaussian(form="low_rank").partial_fit(many)
    with pytest.warns(UserWarning, match="no advantage") as caught:
        streamed.mahalanobis(many[:1])  # finalised at first use: still attributed to this line
    assert caught[0].filename == __file__


@pytest.mark.parametrize("form", ["dense", "low_rank"])
def test_boolean_options_refuse_truthy_non_bools(form):
    # Issue 11, point 10: store_covariance="no" used to be taken as True.
    with pytest.raises(TypeError, match="store_covariance must be True or False, got 'no'"):
        MultiVariateGaussian(store_covariance="no", form=form)
    with pytest.raises(TypeError, match="low_memory must be True or False, got 1"):
        MultiVariateGaussian(low_memory=1, form=form)
    assert MultiVariateGaussian(store_covariance=np.False_).store_covariance is False
