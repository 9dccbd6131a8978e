"""MultiVariateGaussian(low_memory=True): the packed streaming fit through the public partial_fit.

Every property is checked against the default path (``low_memory=False``), which is itself tested
against numpy/scipy in tests/test_gaussian.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from anomstats import MultiVariateGaussian
from anomstats.gaussian import DEFAULT_RIDGE
from tests._tolerances import assert_close_each, eps, mahalanobis_tolerances, mean_atol, patch_covariances
from tests.test_gaussian import fit_bounds, logpdf_atol


def make_embedding(seed: int, n: int, c: int, spatial: tuple[int, ...], offset: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, c, *spatial))
    if c > 1:
        x[:, 1] += 0.6 * x[:, 0]  # correlated channels, so off-diagonal terms matter
    return x + offset


def patches(x: np.ndarray) -> np.ndarray:
    """(N, C, *spatial) -> (P, N, C): per-patch data matrices."""
    n, c = x.shape[:2]
    return np.moveaxis(np.asarray(x, dtype=np.float64).reshape(n, c, -1), 2, 0)


def merges_of(n: int, batches: int) -> int:
    """Chan merges a streamed fit may do: one per batch, one per fold of ``fold_every`` = 64 buffered rows
    (``batches = n`` where the batching is not the test's: at most one merge per observation)."""
    return batches + n // 64 + 1


def assert_fit_close(actual, expected, x, names=("precision",), ridge=DEFAULT_RIDGE, merges=0, rounded=None):
    """Entrywise fit_bounds of tests/test_gaussian.py per patch (mean_atol, precision_atol, log_det_atol,
    plus streamed_covariance_atol for ``merges`` Chan merges, amplified by kappa(A)); ``rounded``: the
    actual outputs were rounded once to that dtype after a float64 fit, a relative ``eps / 2`` more
    (charged ``eps``) on the stored arrays (mean, precision; log_det stays float64)."""
    for k, data in enumerate(patches(x)):
        b = fit_bounds(data, ridge, merges=merges)
        for name in names:
            got, ref = getattr(actual, name), getattr(expected, name)
            got, ref = (got[:, k], ref[:, k]) if name == "mean" else (got[k], ref[k])
            rtol = eps(rounded) if rounded is not None and name != "log_det" else 0.0
            try:
                assert_close_each(got, ref, rtol=rtol, atol=b[name])
            except AssertionError as error:
                raise AssertionError(f"{name} of patch {k}: {error}") from None


def stream(model: MultiVariateGaussian, x: np.ndarray, cuts: list[int]) -> MultiVariateGaussian:
    for part in np.split(x, cuts):
        model.partial_fit(part)
    return model


split_cases = st.tuples(
    st.integers(0, 2**16),  # seed
    st.integers(2, 90),  # n (crosses the 64-observation fold)
    st.integers(1, 5),  # C
    st.sampled_from([(1,), (3,), (2, 2), (3, 2)]),
    st.sampled_from([0.0, 100.0]),  # data far from the origin too
    st.data(),
)


# ---------------------------------------------------------------- agreement with the default path
@given(split_cases)
def test_any_split_matches_default_fit_float64(case):
    seed, n, c, spatial, offset, data = case
    x = make_embedding(seed, n, c, spatial, offset)
    cuts = sorted(data.draw(st.lists(st.integers(1, n - 1), max_size=4, unique=True)) if n > 1 else [])
    reference = MultiVariateGaussian().fit(x)
    lean = stream(MultiVariateGaussian(low_memory=True), x, cuts)
    assert lean.n_samples_seen_ == n
    assert lean.precision.dtype == np.float64 and lean.mean.dtype == np.float64
    assert lean.precision.shape == reference.precision.shape and lean.mean.shape == reference.mean.shape
    # fit_bounds with the merges (mean_atol, precision_atol, log_det_atol, streamed_covariance_atol)
    assert_fit_close(lean, reference, x, ("precision", "mean", "log_det"), merges=merges_of(n, len(cuts) + 1))
    np.testing.assert_array_equal(lean.precision, lean.precision.transpose(0, 2, 1))  # bound 0: symmetrised
    np.testing.assert_array_equal(lean.shrinkage_, np.zeros(reference.n_patches))  # exact: no shrinkage


@given(split_cases)
def test_any_split_matches_default_fit_float32(case):
    seed, n, c, spatial, offset, data = case
    x = make_embedding(seed, n, c, spatial, offset).astype(np.float32)
    cuts = sorted(data.draw(st.lists(st.integers(1, n - 1), max_size=3, unique=True)) if n > 1 else [])
    reference = MultiVariateGaussian().fit(x)  # float64 one-shot fit of the same float32 data
    lean = stream(MultiVariateGaussian(low_memory=True, dtype=np.float32), x, cuts)
    assert lean.precision.dtype == np.float32 and lean.mean.dtype == np.float32
    # float64 accumulation and factorisation, rounded once: the float64 fit_bounds (float32 data are
    # exact in float64) plus eps(float32) relative for the one rounding of the stored outputs
    merges = merges_of(n, len(cuts) + 1)
    assert_fit_close(lean, reference, x, ("precision", "mean", "log_det"), merges=merges, rounded=np.float32)
    np.testing.assert_array_equal(lean.precision, lean.precision.transpose(0, 2, 1))  # bound 0: symmetrised


def test_fit_matches_default_fit_and_ridge_is_used():
    x = make_embedding(3, 70, 4, (3, 3), offset=5.0)
    for ridge in (0.0, 0.5):
        reference = MultiVariateGaussian(ridge=ridge).fit(x)
        lean = MultiVariateGaussian(ridge=ridge, low_memory=True).fit(x)
        assert lean.n_samples_seen_ == 70
        # fit_bounds: precision_atol, log_det_atol (a fit folds 64 rows at a time: merges)
        assert_fit_close(lean, reference, x, ("precision", "log_det"), ridge=ridge, merges=merges_of(70, 1))
    # fit discards streamed data, like the default path
    refit = MultiVariateGaussian(low_memory=True).partial_fit(x[:10]).fit(x[10:])
    assert refit.n_samples_seen_ == 60
    assert_fit_close(refit, MultiVariateGaussian().fit(x[10:]), x[10:], merges=merges_of(60, 1))  # precision_atol


def test_integer_and_non_contiguous_inputs():
    x = np.random.default_rng(4).integers(-5, 6, size=(30, 3, 4, 4)).astype(np.int16)
    reference = MultiVariateGaussian().fit(x)
    lean = stream(MultiVariateGaussian(low_memory=True), x, [7, 19])
    assert_fit_close(lean, reference, x, merges=merges_of(30, 3))  # precision_atol + streamed_covariance_atol
    y = make_embedding(5, 30, 3, (4, 6))[:, :, :, ::2]  # strided spatial axis
    lean_y = MultiVariateGaussian(low_memory=True).partial_fit(y)
    assert_fit_close(lean_y, MultiVariateGaussian().fit(y), y, merges=merges_of(30, 1))  # precision_atol


def test_small_memory_budget_gives_the_same_result():
    x = make_embedding(6, 40, 5, (4, 4), offset=3.0)
    reference = MultiVariateGaussian().fit(x)
    lean = stream(MultiVariateGaussian(low_memory=True, memory_budget=1024), x, [13, 29])
    assert_fit_close(lean, reference, x, merges=merges_of(40, 3))  # precision_atol + streamed_covariance_atol


# ---------------------------------------------------------------- scoring
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_mahalanobis_and_logpdf_equal_the_default_paths(dtype):
    x = make_embedding(7, 60, 4, (3, 2), offset=2.0)
    q = make_embedding(8, 5, 4, (3, 2), offset=2.0)
    reference = MultiVariateGaussian(dtype=dtype).fit(x)
    lean = stream(MultiVariateGaussian(low_memory=True, dtype=dtype), x, [20, 41])
    # mahalanobis_tolerances in the working dtype (two fits, evaluations, means' mean_atol); squared:
    # d(d^2) = 2 d dd. logpdf_atol (tests/test_gaussian.py): those plus log_det_atol and the sum's rounding.
    a = patch_covariances(x, DEFAULT_RIDGE)
    mean_error = mean_atol(np.abs(x).max(), 60, dtype)
    rtol, atol = mahalanobis_tolerances(a, 60, mean_error, dtype)
    d = reference.mahalanobis(q).astype(np.float64)
    for squared in (False, True):
        got = lean.mahalanobis(q, squared=squared)
        assert got.shape == (5, 3, 2) and got.dtype == dtype
        allowed = 2 * rtol * d**2 + 2 * d * atol + atol**2 if squared else rtol * d + atol
        assert_close_each(got, reference.mahalanobis(q, squared=squared), atol=allowed)
    got = lean.logpdf(q)
    assert got.shape == (5, 3, 2) and got.dtype == dtype
    d2 = (d**2).reshape(5, -1)
    allowed = np.stack([logpdf_atol(a[k], 60, d2[:, k], mean_error, dtype=dtype) for k in range(6)], 1)
    assert_close_each(got, reference.logpdf(q), atol=allowed.reshape(5, 3, 2))


# ---------------------------------------------------------------- merge
@given(split_cases)
def test_merge_of_parts_matches_default_fit(case):
    seed, n, c, spatial, offset, data = case
    x = make_embedding(seed, n, c, spatial, offset)
    cut = data.draw(st.integers(1, n - 1))
    left = MultiVariateGaussian(low_memory=True).partial_fit(x[:cut])
    right = MultiVariateGaussian(low_memory=True).partial_fit(x[cut:])
    merged = left.merge(right)
    assert merged is left and right.n_samples_seen_ == n - cut and merged.n_samples_seen_ == n
    reference = MultiVariateGaussian().fit(x)
    # fit_bounds with the merges: precision_atol, mean_atol, streamed_covariance_atol
    assert_fit_close(merged, reference, x, ("precision", "mean"), merges=merges_of(n, 2))
    if n - cut >= 2:  # right still holds its own data, unchanged by the merge
        right_ref = MultiVariateGaussian().fit(x[cut:])
        assert_fit_close(right, right_ref, x[cut:], merges=merges_of(n - cut, 1))


def test_merge_into_empty_and_with_empty_models():
    x = make_embedding(9, 20, 3, (2, 2))
    reference = MultiVariateGaussian().fit(x)
    empty = MultiVariateGaussian(low_memory=True)
    assert empty.merge(MultiVariateGaussian(low_memory=True).partial_fit(x)) is empty
    assert_fit_close(empty, reference, x, merges=merges_of(20, 2))  # precision_atol
    full = MultiVariateGaussian(low_memory=True).partial_fit(x).merge(MultiVariateGaussian(low_memory=True))
    assert_fit_close(full, reference, x, merges=merges_of(20, 2))  # precision_atol


def test_merge_errors():
    x = make_embedding(10, 20, 3, (2, 2))
    lean = MultiVariateGaussian(low_memory=True).partial_fit(x)
    with pytest.raises(ValueError, match="different low_memory"):
        lean.merge(MultiVariateGaussian().partial_fit(x))
    with pytest.raises(ValueError, match="different low_memory"):
        MultiVariateGaussian().partial_fit(x).merge(lean)
    with pytest.raises(ValueError, match="into itself"):
        lean.merge(lean)
    with pytest.raises(ValueError, match="different shapes"):
        lean.merge(MultiVariateGaussian(low_memory=True).partial_fit(x[:, :2]))
    spent = MultiVariateGaussian(low_memory=True).partial_fit(x)
    spent.precision  # finalises: the moments are spent
    with pytest.raises(ValueError, match=r"other was finalised with low_memory=True.*only partial_fit models merge"):
        lean.merge(spent)
    with pytest.raises(ValueError, match=r"self was finalised with low_memory=True"):
        spent.merge(MultiVariateGaussian(low_memory=True).partial_fit(x))
    assert_fit_close(lean, MultiVariateGaussian().fit(x), x, merges=merges_of(len(x), len(x)))  # lean unharmed (precision_atol, at most a merge per row)


# ---------------------------------------------------------------- errors and state
def test_shrinkage_is_rejected():
    for method in ("ledoit-wolf", "oas"):
        with pytest.raises(ValueError, match=rf"low_memory=True supports only .*shrinkage='{method}'"):
            MultiVariateGaussian(shrinkage=method, low_memory=True)


def test_covariance_and_cholesky_are_not_kept_and_asking_does_not_end_the_stream():
    x = make_embedding(11, 30, 3, (2, 2))
    lean = MultiVariateGaussian(low_memory=True)
    for name in ("covariance", "cholesky"):
        with pytest.raises(AttributeError, match=rf"{name} is not kept with low_memory=True"):
            getattr(lean, name)
    lean.partial_fit(x[:15])
    for name in ("covariance", "cholesky"):
        with pytest.raises(AttributeError, match=rf"{name} is not kept with low_memory=True"):
            getattr(lean, name)
        assert not hasattr(lean, name)
    lean.partial_fit(x[15:])  # still streaming: asking for covariance did not finalise
    assert_fit_close(lean, MultiVariateGaussian().fit(x), x, merges=merges_of(len(x), len(x)))
    with pytest.raises(AttributeError, match="covariance is not kept with low_memory=True"):
        lean.covariance


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_updates_after_finalisation_raise(dtype):
    x = make_embedding(12, 30, 3, (2, 2))
    lean = MultiVariateGaussian(low_memory=True, dtype=dtype).partial_fit(x)
    expected = lean.precision.copy()
    with pytest.raises(ValueError, match=r"finalised with low_memory=True.*use a new object"):
        lean.partial_fit(x[:3])
    np.testing.assert_array_equal(lean.precision, expected)  # the fit is intact after the refusal
    assert lean.n_samples_seen_ == 30
    # a new fit() is allowed and replaces everything
    lean.fit(x[:20])
    assert lean.n_samples_seen_ == 20


def test_fewer_than_two_observations_do_not_end_the_stream():
    x = make_embedding(13, 10, 3, (2, 2))
    lean = MultiVariateGaussian(low_memory=True).partial_fit(x[:1])
    with pytest.raises(ValueError, match=r"seen 1 observation\(s\).*at least 2"):
        lean.precision
    lean.partial_fit(x[1:])  # not spent by the refusal
    assert_fit_close(lean, MultiVariateGaussian().fit(x), x, merges=merges_of(len(x), len(x)))
    with pytest.raises(ValueError, match="at least 2 observations"):
        MultiVariateGaussian(low_memory=True).fit(x[:1])


def test_rejected_batch_leaves_the_model_unchanged():
    x = make_embedding(14, 20, 3, (2, 2))
    lean = MultiVariateGaussian(low_memory=True).partial_fit(x[:10])
    bad = x[10:].copy()
    bad[3, 1, 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"non-finite values .*position \(1, 0\)"):
        lean.partial_fit(bad)
    with pytest.raises(ValueError, match=r"must have shape|expected"):
        lean.partial_fit(x[:, :2])
    assert lean.n_samples_seen_ == 10
    assert_fit_close(lean, MultiVariateGaussian().fit(x[:10]), x[:10], merges=merges_of(len(x[:10]), len(x[:10])))
    fitted = MultiVariateGaussian(low_memory=True).fit(x)
    before = fitted.precision.copy()
    with pytest.raises(ValueError, match="non-finite values"):
        fitted.fit(bad)
    np.testing.assert_array_equal(fitted.precision, before)


def test_unfactorable_covariance_resets_the_model_with_a_clear_error():
    x = np.zeros((5, 2, 3))  # zero covariance everywhere: not positive definite without a ridge
    for dtype in (np.float64, np.float32):
        lean = MultiVariateGaussian(ridge=0.0, low_memory=True, dtype=dtype).partial_fit(x)
        with pytest.raises(np.linalg.LinAlgError, match=r"patch 0 .*not positive definite.*model is reset"):
            lean.precision
        with pytest.raises(ValueError, match="not fitted yet"):
            lean.precision


def test_inputs_never_modified():
    x = make_embedding(15, 30, 3, (2, 2), offset=5.0)
    q = make_embedding(16, 4, 3, (2, 2))
    x_copy, q_copy = x.copy(), q.copy()
    x.flags.writeable = False  # would raise if anything wrote into it
    q.flags.writeable = False
    for dtype in (np.float64, np.float32):
        lean = MultiVariateGaussian(low_memory=True, dtype=dtype).partial_fit(x[:12])
        lean.merge(MultiVariateGaussian(low_memory=True, dtype=dtype).partial_fit(x[12:]))
        lean.mahalanobis(q)
        lean.logpdf(q)
        MultiVariateGaussian(low_memory=True, dtype=dtype).fit(x).mahalanobis(q)
    np.testing.assert_array_equal(x, x_copy)
    np.testing.assert_array_equal(q, q_copy)


def test_repr_names_low_memory_only_when_set():
    assert "low_memory=True" in repr(MultiVariateGaussian(low_memory=True))
    assert "low_memory" not in repr(MultiVariateGaussian())


def test_dask_partial_fit_uses_the_low_memory_path():
    da = pytest.importorskip("dask.array")
    dask = pytest.importorskip("dask")
    x = make_embedding(17, 40, 3, (2, 2), offset=1.0)
    dx = da.from_array(x, chunks=(10, 3, 2, 2))
    with dask.config.set(scheduler="synchronous"):
        lean = MultiVariateGaussian(low_memory=True).fit(dx)
    assert lean.low_memory
    with pytest.raises(AttributeError, match="low_memory=True"):
        lean.covariance
    assert_fit_close(lean, MultiVariateGaussian().fit(x), x, merges=merges_of(len(x), len(x)))


def test_float32_finalisation_writes_the_precision_in_place():
    # With dtype=float32 the precision overwrites the packed float64 moments: finalising allocates
    # only bounded work buffers, not a new (P, C, C) stack (float64 needs a new stack).
    import tracemalloc

    x = make_embedding(18, 40, 20, (8, 8))
    peaks = {}
    for dtype in (np.float32, np.float64):
        lean = MultiVariateGaussian(low_memory=True, dtype=dtype, memory_budget=1 << 14).partial_fit(x)
        tracemalloc.start()
        precision = lean.precision
        peaks[dtype] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert precision.shape == (64, 20, 20)
    stack32 = 64 * 20 * 20 * 4
    assert peaks[np.float32] < 0.5 * stack32
    assert peaks[np.float64] >= 2 * stack32
