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


def make_embedding(seed: int, n: int, c: int, spatial: tuple[int, ...], offset: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, c, *spatial))
    if c > 1:
        x[:, 1] += 0.6 * x[:, 0]  # correlated channels, so off-diagonal terms matter
    return x + offset


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    b64 = np.asarray(b, dtype=np.float64)
    return float(np.abs(np.asarray(a, dtype=np.float64) - b64).max() / max(np.abs(b64).max(), 1e-300))


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
    assert rel_err(lean.precision, reference.precision) < 1e-9
    assert rel_err(lean.mean, reference.mean) < 1e-12
    np.testing.assert_allclose(lean.log_det, reference.log_det, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(lean.precision, lean.precision.transpose(0, 2, 1))
    np.testing.assert_array_equal(lean.shrinkage_, np.zeros(reference.n_patches))


@given(split_cases)
def test_any_split_matches_default_fit_float32(case):
    seed, n, c, spatial, offset, data = case
    x = make_embedding(seed, n, c, spatial, offset).astype(np.float32)
    cuts = sorted(data.draw(st.lists(st.integers(1, n - 1), max_size=3, unique=True)) if n > 1 else [])
    reference = MultiVariateGaussian().fit(x)  # float64 one-shot fit of the same float32 data
    lean = stream(MultiVariateGaussian(low_memory=True, dtype=np.float32), x, cuts)
    assert lean.precision.dtype == np.float32 and lean.mean.dtype == np.float32
    # float64 accumulation and factorisation, rounded once: float32 rounding of the result only
    assert rel_err(lean.precision, reference.precision) < 1e-5
    assert rel_err(lean.mean, reference.mean) < 1e-6
    np.testing.assert_allclose(lean.log_det, reference.log_det, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(lean.precision, lean.precision.transpose(0, 2, 1))


def test_fit_matches_default_fit_and_ridge_is_used():
    x = make_embedding(3, 70, 4, (3, 3), offset=5.0)
    for ridge in (0.0, 0.5):
        reference = MultiVariateGaussian(ridge=ridge).fit(x)
        lean = MultiVariateGaussian(ridge=ridge, low_memory=True).fit(x)
        assert lean.n_samples_seen_ == 70
        assert rel_err(lean.precision, reference.precision) < 1e-12
        np.testing.assert_allclose(lean.log_det, reference.log_det, rtol=1e-12, atol=1e-12)
    # fit discards streamed data, like the default path
    refit = MultiVariateGaussian(low_memory=True).partial_fit(x[:10]).fit(x[10:])
    assert refit.n_samples_seen_ == 60
    assert rel_err(refit.precision, MultiVariateGaussian().fit(x[10:]).precision) < 1e-12


def test_integer_and_non_contiguous_inputs():
    x = np.random.default_rng(4).integers(-5, 6, size=(30, 3, 4, 4)).astype(np.int16)
    reference = MultiVariateGaussian().fit(x)
    lean = stream(MultiVariateGaussian(low_memory=True), x, [7, 19])
    assert rel_err(lean.precision, reference.precision) < 1e-12
    y = make_embedding(5, 30, 3, (4, 6))[:, :, :, ::2]  # strided spatial axis
    assert rel_err(
        MultiVariateGaussian(low_memory=True).partial_fit(y).precision, MultiVariateGaussian().fit(y).precision
    ) < 1e-12


def test_small_memory_budget_gives_the_same_result():
    x = make_embedding(6, 40, 5, (4, 4), offset=3.0)
    reference = MultiVariateGaussian().fit(x)
    lean = stream(MultiVariateGaussian(low_memory=True, memory_budget=1024), x, [13, 29])
    assert rel_err(lean.precision, reference.precision) < 1e-12


# ---------------------------------------------------------------- scoring
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_mahalanobis_and_logpdf_equal_the_default_paths(dtype, tol):
    x = make_embedding(7, 60, 4, (3, 2), offset=2.0)
    q = make_embedding(8, 5, 4, (3, 2), offset=2.0)
    reference = MultiVariateGaussian(dtype=dtype).fit(x)
    lean = stream(MultiVariateGaussian(low_memory=True, dtype=dtype), x, [20, 41])
    for squared in (False, True):
        got = lean.mahalanobis(q, squared=squared)
        assert got.shape == (5, 3, 2) and got.dtype == dtype
        np.testing.assert_allclose(got, reference.mahalanobis(q, squared=squared), rtol=tol)
    got = lean.logpdf(q)
    assert got.shape == (5, 3, 2) and got.dtype == dtype
    np.testing.assert_allclose(got, reference.logpdf(q), rtol=tol)


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
    assert rel_err(merged.precision, reference.precision) < 1e-9
    assert rel_err(merged.mean, reference.mean) < 1e-12
    if n - cut >= 2:  # right still holds its own data, unchanged by the merge
        assert rel_err(right.precision, MultiVariateGaussian().fit(x[cut:]).precision) < 1e-9


def test_merge_into_empty_and_with_empty_models():
    x = make_embedding(9, 20, 3, (2, 2))
    reference = MultiVariateGaussian().fit(x)
    empty = MultiVariateGaussian(low_memory=True)
    assert empty.merge(MultiVariateGaussian(low_memory=True).partial_fit(x)) is empty
    assert rel_err(empty.precision, reference.precision) < 1e-12
    full = MultiVariateGaussian(low_memory=True).partial_fit(x).merge(MultiVariateGaussian(low_memory=True))
    assert rel_err(full.precision, reference.precision) < 1e-12


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
    assert rel_err(lean.precision, MultiVariateGaussian().fit(x).precision) < 1e-12  # lean unharmed


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
    assert rel_err(lean.precision, MultiVariateGaussian().fit(x).precision) < 1e-12
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
    assert rel_err(lean.precision, MultiVariateGaussian().fit(x).precision) < 1e-12
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
    assert rel_err(lean.precision, MultiVariateGaussian().fit(x[:10]).precision) < 1e-12
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
    assert rel_err(lean.precision, MultiVariateGaussian().fit(x).precision) < 1e-12


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
