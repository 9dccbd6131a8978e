"""MultiVariateGaussian's memory modes through the public API: the packed streaming state of the default
(``shrinkage=None`` and ``"oas"``), reads that keep the stream going, ``finalise(end_stream=True)`` and
``low_memory=True`` that spend it (the float32 precision written over the moments), and merges across modes.

Every property is checked against the one-shot fit, which is itself tested against numpy/scipy in
tests/test_gaussian.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from anomstats import MultiVariateGaussian, NotFittedError
from anomstats._packed import PackedGaussianAccumulator
from anomstats._patch_moments import DensePatchMoments
from anomstats.gaussian import DEFAULT_RIDGE
from tests._tolerances import (
    assert_close_each,
    eps,
    low_rank_mahalanobis_tolerances,
    mahalanobis_tolerances,
    mean_atol,
    patch_covariances,
    streamed_covariance_atol,
)
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
    with pytest.raises(ValueError, match="different shapes"):
        lean.merge(MultiVariateGaussian(low_memory=True).partial_fit(x[:, :2]))
    with pytest.raises(ValueError, match="different dtype"):
        lean.merge(MultiVariateGaussian(low_memory=True, dtype=np.float32).partial_fit(x))
    spent = MultiVariateGaussian(low_memory=True).partial_fit(x)
    spent.precision  # finalises: the moments are spent
    with pytest.raises(ValueError, match=r"other was finalised with low_memory=True, which spends its streamed "
                                         r"moments at the first use.*only partial_fit models merge"):
        lean.merge(spent)
    with pytest.raises(ValueError, match=r"self was finalised with low_memory=True"):
        spent.merge(MultiVariateGaussian(low_memory=True).partial_fit(x))
    assert_fit_close(lean, MultiVariateGaussian().fit(x), x, merges=merges_of(len(x), len(x)))  # lean unharmed (precision_atol, at most a merge per row)


# ---------------------------------------------------------------- errors and state
def test_ledoit_wolf_is_rejected():
    # Its coefficient needs fourth moments, which the packed triangles do not hold.
    with pytest.raises(ValueError, match=r"low_memory=True supports shrinkage=None and 'oas' .*got "
                                         r"shrinkage='ledoit-wolf'; use low_memory=False"):
        MultiVariateGaussian(shrinkage="ledoit-wolf", low_memory=True)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_oas_streams_through_the_packed_moments(dtype):
    x = make_embedding(31, 45, 4, (3, 2), offset=10.0)
    reference = MultiVariateGaussian(shrinkage="oas", store_covariance=True).fit(x)
    for low_memory in (False, True):
        streamed = stream(MultiVariateGaussian(shrinkage="oas", low_memory=low_memory, dtype=dtype), x, [11, 30])
        for k, data in enumerate(patches(x)):
            # fit_bounds with OAS (shrinkage_tolerances' coefficient error, amplified by kappa(A)) and the
            # merges; a float32 result is the float64 one rounded once (eps(float32) relative).
            b = fit_bounds(data, shrinkage="oas", merges=merges_of(45, 3))
            rtol = eps(dtype) if dtype == np.float32 else 0.0
            assert_close_each(streamed.precision[k], reference.precision[k], rtol=rtol, atol=b["precision"])
            assert abs(streamed.shrinkage_[k] - reference.shrinkage_[k]) <= b["shrinkage"]


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
    with pytest.raises(ValueError, match=r"was finalised with low_memory=True.*use a new object"):
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


def test_unfactorable_covariance_resets_a_float32_model_and_keeps_a_float64_stream():
    x = np.zeros((5, 2, 3))  # zero covariance everywhere: not positive definite without a ridge
    more = make_embedding(32, 20, 2, (3,))
    # float32: the precision was being written over the moments, which are partly overwritten: reset.
    lean = MultiVariateGaussian(ridge=0.0, low_memory=True, dtype=np.float32).partial_fit(x)
    with pytest.raises(np.linalg.LinAlgError, match=r"patch 0 .*not positive definite.*model is reset"):
        lean.precision
    with pytest.raises(ValueError, match="not fitted yet"):
        lean.precision
    # float64: the precision is a new stack, so the moments are intact and the stream goes on.
    lean = MultiVariateGaussian(ridge=0.0, low_memory=True).partial_fit(x)
    with pytest.raises(np.linalg.LinAlgError, match=r"patch 0 .*not positive definite") as info:
        lean.precision
    assert "reset" not in str(info.value)
    lean.partial_fit(more)
    both = np.concatenate([x, more])
    # fit_bounds with ridge 0 and the merges (precision_atol + streamed_covariance_atol)
    assert_fit_close(lean, MultiVariateGaussian(ridge=0.0).fit(both), both, ridge=0.0, merges=merges_of(25, 2))


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

    # 256 patches: the float32 stack (410 kB) is large against what finalising allocates besides it (the
    # means, log-determinants and per-thread buffers under the 16 kB budget, about 100 kB).
    x = make_embedding(18, 40, 20, (16, 16))
    peaks = {}
    for dtype in (np.float32, np.float64):
        lean = MultiVariateGaussian(low_memory=True, dtype=dtype, memory_budget=1 << 14).partial_fit(x)
        tracemalloc.start()
        precision = lean.precision
        peaks[dtype] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert precision.shape == (256, 20, 20)
    stack32 = 256 * 20 * 20 * 4
    assert peaks[np.float32] < 0.5 * stack32
    assert peaks[np.float64] >= 2 * stack32


# ---------------------------------------------------------------- memory modes (issue 12)
@pytest.mark.parametrize("shrinkage, kind", [(None, PackedGaussianAccumulator), ("oas", PackedGaussianAccumulator),
                                             ("ledoit-wolf", DensePatchMoments)])
def test_the_default_streams_into_packed_moments_and_reading_keeps_them(shrinkage, kind):
    x = make_embedding(40, 50, 4, (3, 2), offset=7.0)
    model = MultiVariateGaussian(shrinkage=shrinkage).partial_fit(x[:30])
    assert isinstance(model._moments, kind)  # Ledoit-Wolf's fourth moments need the dense sums
    first, first_mean = model.precision, model.mean
    kept = first.copy()
    model.partial_fit(x[30:])  # the read did not end the stream
    assert model.n_samples_seen_ == 50
    np.testing.assert_array_equal(first, kept)  # bound 0: a refit makes new arrays, the old ones are untouched
    assert model.precision is not first and model.mean is not first_mean
    one_shot = MultiVariateGaussian(shrinkage=shrinkage).fit(x)
    for k, data in enumerate(patches(x)):
        # fit_bounds: precision_atol (+ the shrinkage coefficient's error and a streamed Ledoit-Wolf's
        # fourth-moment loss, amplified by kappa(A)) + the merges' streamed_covariance_atol
        b = fit_bounds(data, shrinkage=shrinkage, streamed=True, merges=merges_of(50, 2))
        assert_close_each(model.precision[k], one_shot.precision[k], atol=b["precision"])
        assert_close_each(model.log_det[k], one_shot.log_det[k], atol=b["log_det"])


@pytest.mark.parametrize("store_covariance", [False, True])
def test_finalise_end_stream_equals_a_read_and_then_refuses_more_data(store_covariance):
    x = make_embedding(41, 30, 3, (2, 2))
    for dtype in (np.float64, np.float32):
        read = MultiVariateGaussian(dtype=dtype, store_covariance=store_covariance).partial_fit(x)
        ended = MultiVariateGaussian(dtype=dtype, store_covariance=store_covariance).partial_fit(x)
        assert ended.finalise(end_stream=True) is ended and ended._moments is None
        # bound 0: the same moments, factored by the same kernels (in place or not, one rounding to dtype)
        for name in ("mean", "precision", "log_det") + (("covariance", "cholesky") if store_covariance else ()):
            np.testing.assert_array_equal(getattr(ended, name), getattr(read, name))
        assert ended.precision.dtype == dtype and ended.n_samples_seen_ == 30
        with pytest.raises(ValueError, match=r"was finalised with finalise\(end_stream=True\), which spent its "
                                             r"streamed moments; use a new object"):
            ended.partial_fit(x)
        with pytest.raises(ValueError, match=r"other was finalised with finalise\(end_stream=True\)"):
            read.merge(ended)
        # ending the stream of a model already read only drops the moments
        read.finalise(end_stream=True)
        assert read._moments is None
        np.testing.assert_array_equal(read.precision, ended.precision)


def test_finalise_without_a_stream_and_its_argument():
    x = make_embedding(42, 12, 2, (2,))
    with pytest.raises(NotFittedError, match="not fitted yet"):
        MultiVariateGaussian().finalise()
    fitted = MultiVariateGaussian().fit(x)
    before = fitted.precision
    assert fitted.finalise(end_stream=True) is fitted and fitted.precision is before  # nothing to do
    with pytest.raises(TypeError, match="end_stream must be True or False, got 'yes'"):
        MultiVariateGaussian().partial_fit(x).finalise(end_stream="yes")
    streamed = MultiVariateGaussian().partial_fit(x[:1])
    with pytest.raises(ValueError, match=r"seen 1 observation\(s\).*at least 2"):
        streamed.finalise(end_stream=True)
    streamed.partial_fit(x[1:]).finalise()  # the refusal spent nothing; finalise() keeps the stream
    assert streamed._moments is not None and not streamed._stale
    # low_memory=True always ends the stream when fitted
    lean = MultiVariateGaussian(low_memory=True).partial_fit(x).finalise()
    assert lean._moments is None
    with pytest.raises(ValueError, match=r"was finalised with low_memory=True"):
        lean.partial_fit(x)


def test_merges_across_memory_modes_and_storage_options():
    x = make_embedding(43, 40, 3, (2, 3), offset=50.0)
    reference = MultiVariateGaussian().fit(x)
    options = [dict(), dict(low_memory=True), dict(store_covariance=True)]
    for left in options:
        for right in options:
            merged = MultiVariateGaussian(**left).partial_fit(x[:17]).merge(MultiVariateGaussian(**right).partial_fit(x[17:]))
            assert merged.n_samples_seen_ == 40
            # fit_bounds with the merges: precision_atol, mean_atol, streamed_covariance_atol
            assert_fit_close(merged, reference, x, ("precision", "mean", "log_det"), merges=merges_of(40, 2))


def test_merging_a_model_into_itself_counts_its_data_twice():
    x = make_embedding(44, 25, 3, (2, 2), offset=3.0)
    twice = np.concatenate([x, x])
    for options in (dict(), dict(low_memory=True), dict(shrinkage="ledoit-wolf")):
        model = MultiVariateGaussian(**options).partial_fit(x)
        assert model.merge(model) is model and model.n_samples_seen_ == 50
        reference = MultiVariateGaussian(**options).fit(twice)
        for k, data in enumerate(patches(twice)):
            # fit_bounds of the doubled data (Ledoit-Wolf: streamed, its fourth-moment loss) with the merges
            b = fit_bounds(data, shrinkage=options.get("shrinkage"), streamed=True, merges=merges_of(50, 2))
            assert_close_each(model.precision[k], reference.precision[k], atol=b["precision"])


def test_a_refit_frees_the_previous_fit_before_allocating_the_next():
    # Reading, streaming more and reading again holds one precision stack at a time (when the caller keeps no
    # reference to the old one): the previous fit is dropped before the new stacks are allocated.
    import tracemalloc

    x = make_embedding(45, 60, 20, (16, 16))
    model = MultiVariateGaussian(memory_budget=1 << 14).partial_fit(x[:30])
    model.precision
    model.partial_fit(x[30:])
    model._moments._fold()  # the buffered batches: folded outside the measurement
    tracemalloc.start()
    model.precision
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    stack = 256 * 20 * 20 * 8
    # one new stack plus the means, log-determinants and the per-thread buffers (about 100 kB), not two stacks
    assert stack <= peak < 1.5 * stack


def test_reading_a_float32_stream_needs_no_second_copy_of_the_moments():
    # The default float32 stream keeps its packed float64 moments and writes a new float32 precision: the read
    # allocates that stack (and bounded buffers), never a copy of the moments.
    import tracemalloc

    x = make_embedding(46, 40, 20, (16, 16))
    model = MultiVariateGaussian(dtype=np.float32, memory_budget=1 << 14).partial_fit(x)
    model._moments._fold()
    moments = model._moments.nbytes
    tracemalloc.start()
    model.precision
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    stack32 = 256 * 20 * 20 * 4
    assert stack32 <= peak < stack32 + 0.5 * moments
    assert model._moments is not None  # still streaming


def test_a_float32_stream_names_the_scale_float32_cannot_hold():
    # Worked in float64, a float32 result is checked against float32's range: a kept covariance beyond it is
    # refused before anything is stored (its float32 copy would be infinite), a precision below it likewise.
    x = make_embedding(47, 20, 3, (2, 2)) * 1e22  # variances ~1e44: beyond float32, precision ~1e-44 below it
    kept = MultiVariateGaussian(dtype=np.float32, store_covariance=True).partial_fit(x)
    with pytest.raises(ValueError, match=r"features of scale \d\.\de\+22 overflow float32: the covariance of patch 0 "
                                         r".*dtype=np\.float64"):
        kept.precision
    lean = MultiVariateGaussian(dtype=np.float32).partial_fit(x)
    with pytest.raises(ValueError, match=r"features of scale \d\.\de\+22 overflow float32 .*underflow a float32 "
                                         r"precision.*dtype=np\.float64"):
        lean.precision
    assert lean._moments is not None  # the stream is intact: nothing was written in place


def test_the_low_rank_form_ends_its_stream_too():
    x = make_embedding(48, 12, 30, (2,))  # N < C: the low-rank form's case
    model = MultiVariateGaussian(form="low_rank").partial_fit(x[:6]).partial_fit(x[6:])
    reference = MultiVariateGaussian(form="low_rank").fit(x)
    before = model.mahalanobis(x[:2])
    assert model.finalise(end_stream=True) is model and model._moments is None
    np.testing.assert_array_equal(model.mahalanobis(x[:2]), before)  # bound 0: the same fit, only the factor dropped
    # low_rank_mahalanobis_tolerances (the basis route's backward error, amplified by kappa, both sides; the
    # means' mean_atol), with the one merge's streamed_covariance_atol relative to |A|_2 as extra error
    a = patch_covariances(x, DEFAULT_RIDGE)
    merge = max(streamed_covariance_atol(data, 1).max() / np.linalg.norm(a[k], 2) for k, data in enumerate(patches(x)))
    rtol, atol = low_rank_mahalanobis_tolerances(a, 12, mean_atol(np.abs(x).max(), 12), extra_error=merge)
    assert_close_each(before, reference.mahalanobis(x[:2]), rtol=rtol, atol=atol)
    with pytest.raises(ValueError, match=r"was finalised with finalise\(end_stream=True\)"):
        model.partial_fit(x)
