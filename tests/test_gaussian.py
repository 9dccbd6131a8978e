"""anomstats.MultiVariateGaussian against numpy/scipy/scikit-learn, patch by patch.

References: numpy.cov + ridge + numpy.linalg.inv (anomalib's algorithm), scikit-learn's LedoitWolf / OAS,
scipy.spatial.distance.mahalanobis and scipy.stats.multivariate_normal. Plus streaming/merging against the
one-shot fit, exact symmetry, untouched inputs and the error messages.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from scipy.stats import multivariate_normal

from anomstats import MultiVariateGaussian
from anomstats._validation import check_fit_shape, check_score_shape, describe_patch
from anomstats.gaussian import DEFAULT_RIDGE, NotFittedError
from tests._tolerances import (
    TWO_SIDES,
    cholesky_atol,
    cholesky_perturbation_atol,
    cholesky_residual_atol,
    covariance_atol,
    eps,
    inverse_perturbation_atol,
    log_det_atol,
    log_det_perturbation_atol,
    mahalanobis_tolerances,
    assert_close_each,
    covariance_backward_error,
    mean_atol,
    patch_covariances,
    precision_atol,
    shrinkage_tolerances,
    streamed_covariance_atol,
    streamed_fourth_power_error,
)

SPATIAL_SHAPES = [(), (3,), (2, 3)]


def make_embedding(seed: int, n: int, c: int, spatial: tuple[int, ...], offset: float = 0.0, dtype=np.float64):
    """Correlated Gaussian data with a different covariance per patch, shape (n, c, *spatial)."""
    rng = np.random.default_rng(seed)
    p = math.prod(spatial)
    mixing = rng.normal(size=(p, c, c))
    z = rng.normal(size=(p, n, c))
    data = np.einsum("pnc,pdc->ndp", z, mixing) + offset + rng.normal(size=(1, c, p))
    return data.reshape((n, c) + spatial).astype(dtype)


def patches(x: np.ndarray) -> np.ndarray:
    """(N, C, *spatial) -> (P, N, C): per-patch data matrices."""
    n, c = x.shape[:2]
    return np.moveaxis(x.reshape(n, c, -1), 2, 0)


def fit_bounds(data, ridge=DEFAULT_RIDGE, shrinkage=None, streamed=False, merges=0):
    """Entrywise tolerances between two float64 fits of one patch's data (n, c), from tests/_tolerances.py.

    mean_atol (sums of n values); covariance_atol (n-term sums of products); the regularised
    covariance ``A`` then carries precision_atol / cholesky_atol / log_det_atol (kappa(A) times the
    backward error of accumulation and factorisation, both sides). With shrinkage, the coefficient's
    own error (shrinkage_tolerances; a ``streamed`` (partial_fit) Ledoit-Wolf fit adds streamed_fourth_power_error, the
    eps ||m||^2 / trace(S) loss of the class notes) moves ``A`` by ``extra``, which the inverse,
    factor and log det amplify by kappa(A) (the *_perturbation_atol bounds). A fit merged from
    ``merges + 1`` parts adds streamed_covariance_atol (the merges' mean-difference corrections) to ``extra``.
    """
    x = np.atleast_2d(np.asarray(data, dtype=np.float64))
    n, c = x.shape
    cov = np.atleast_2d(np.cov(x, rowvar=False))
    coef_atol, extra = 0.0, np.zeros((c, c))
    if shrinkage is not None:
        fourth = streamed_fourth_power_error(x, merges) if streamed and shrinkage == "ledoit-wolf" else 0.0
        coef_atol, extra = shrinkage_tolerances(x, shrinkage, fourth)
        from sklearn.covariance import OAS, LedoitWolf

        cov = (LedoitWolf() if shrinkage == "ledoit-wolf" else OAS()).fit(x).covariance_
    if merges:
        extra = extra + streamed_covariance_atol(x, merges)
    a = cov + ridge * np.eye(c)
    ridge_rounding = TWO_SIDES * eps(np.float64) * np.abs(a)  # adding the ridge: one rounding per side
    return {
        "mean": mean_atol(np.abs(x).max(), n),
        "covariance": covariance_atol(x) + extra + ridge_rounding,
        "precision": precision_atol(a, n) + inverse_perturbation_atol(a, extra + ridge_rounding),
        "cholesky": cholesky_atol(a, n) + cholesky_perturbation_atol(a, extra + ridge_rounding),
        "log_det": log_det_atol(a, n) + log_det_perturbation_atol(a, extra + ridge_rounding),
        "shrinkage": coef_atol,
        "A": a,
    }


def logpdf_atol(covariance, n, d2, mean_error=0.0, *, shared_fit=False, dtype=np.float64):
    """Absolute tolerance of ``log p = -(c log 2 pi + log det A + d^2) / 2`` between two computations.

    ``d^2`` by ``2 rtol d^2 + 2 d atol + atol^2`` (mahalanobis_tolerances for d), ``log det`` by
    log_det_atol (with ``shared_fit``, the same stored ``A`` factored twice: only the factorisations'
    ``2 c eps`` backward error, times c kappa(A), doubled), the final sum by ``2 eps`` of its terms' sizes.
    """
    a = np.atleast_2d(np.asarray(covariance, dtype=np.float64))
    c = a.shape[-1]
    rtol, atol = mahalanobis_tolerances(a, n, mean_error, dtype, shared_fit=shared_fit)
    d2 = np.asarray(d2, dtype=np.float64)
    d = np.sqrt(d2)
    det = (TWO_SIDES * c * np.linalg.cond(a) * 2 * c * eps(np.float64)) if shared_fit else log_det_atol(a, n)
    terms = c * math.log(2 * math.pi) + abs(np.linalg.slogdet(a)[1]) + d2
    return 0.5 * (2 * rtol * d2 + 2 * d * atol + atol**2 + det) + TWO_SIDES * eps(dtype) * terms


def fits_close(actual, expected, bounds, names):
    """Per patch k: ``|actual.name[k] - expected.name[k]| <= bounds[k][name]`` (entrywise, rtol 0)."""
    for k, b in enumerate(bounds):
        for name in names:
            got, ref = getattr(actual, name), getattr(expected, name)
            got, ref = (got[:, k], ref[:, k]) if name == "mean" else (got[k], ref[k])
            try:
                assert_close_each(got, ref, rtol=0, atol=b[name])
            except AssertionError as error:
                raise AssertionError(f"{name} of patch {k}: {error}") from None


fit_cases = st.tuples(
    st.integers(0, 2**31 - 1),  # seed
    st.integers(2, 12),  # n
    st.integers(1, 5),  # c
    st.sampled_from(SPATIAL_SHAPES),
    st.sampled_from([0.0, 100.0]),  # offset
    st.sampled_from([np.float64, np.float32]),  # input dtype
)


# ---------------------------------------------------------------- one-shot fit vs numpy
@given(fit_cases)
def test_fit_matches_numpy_cov_and_inverse_per_patch(case):
    seed, n, c, spatial, offset, in_dtype = case
    x = make_embedding(seed, n, c, spatial, offset, in_dtype)
    mvg = MultiVariateGaussian(store_covariance=True).fit(x)
    p = math.prod(spatial)
    assert mvg.mean.shape == (c, p) and mvg.mean.dtype == np.float64
    assert mvg.covariance.shape == mvg.precision.shape == mvg.cholesky.shape == (p, c, c)
    assert mvg.log_det.shape == (p,)
    assert mvg.n_samples_seen_ == n
    assert mvg.inv_covariance is mvg.precision
    for k, data in enumerate(patches(x)):
        cov = np.atleast_2d(np.cov(data, rowvar=False)) + DEFAULT_RIDGE * np.eye(c)
        inv = np.linalg.inv(cov)
        # float32 inputs are exact in float64: float64 bounds (fit_bounds: mean_atol, covariance_atol,
        # precision_atol = kappa(A) delta |P|, log_det_atol = c kappa(A) delta, both sides).
        b = fit_bounds(data)
        assert_close_each(mvg.mean[:, k], data.astype(np.float64).mean(axis=0), rtol=0, atol=b["mean"])
        assert_close_each(mvg.covariance[k], cov, rtol=0, atol=b["covariance"])
        assert_close_each(mvg.precision[k], inv, rtol=0, atol=b["precision"])
        chol = mvg.cholesky[k]
        assert np.all(np.triu(chol, 1) == 0)  # bound 0: the upper triangle is never written
        # R R^T against numpy's covariance: covariance_atol, plus cholesky_residual_atol (Higham 10.3,
        # (c + 1) eps sqrt(a_ii a_jj)) twice: the factorisation's residual and this product's rounding.
        assert_close_each(
            chol @ chol.T, cov, rtol=0, atol=b["covariance"] + TWO_SIDES * cholesky_residual_atol(cov)
        )
        sign, logdet = np.linalg.slogdet(cov)
        assert sign == 1 and abs(mvg.log_det[k] - logdet) <= b["log_det"]  # log_det_atol


@pytest.mark.parametrize("store_covariance", [False, True])
def test_wide_patches_match_numpy_through_the_recursive_inverse(store_covariance):
    # C = 160 >= RECURSIVE_INVERSE_MIN_ORDER: without a kept factor each patch is factored and inverted by
    # anomstats._lapack._RecursiveInverse (halves of 80), with one (store_covariance) by potrf + potri.
    from anomstats._lapack import RECURSIVE_INVERSE_MIN_ORDER

    n, c = 400, 160
    assert c >= RECURSIVE_INVERSE_MIN_ORDER
    x = make_embedding(3, n, c, (2, 2), 0.0, np.float64)
    mvg = MultiVariateGaussian(store_covariance=store_covariance).fit(x)
    for k, data in enumerate(patches(x)):
        b = fit_bounds(data)
        cov = b["A"]
        # fit_bounds (precision_atol, log_det_atol: kappa(A) times the backward error), times kappa(A)^1/2 for the
        # recursion's explicit block inverses (as tests._tolerances.recursive_inverse_atol explains).
        extra = math.sqrt(np.linalg.cond(cov))
        assert_close_each(mvg.precision[k], np.linalg.inv(cov), rtol=0, atol=b["precision"] * extra)
        assert abs(mvg.log_det[k] - np.linalg.slogdet(cov)[1]) <= b["log_det"] * extra
        assert np.array_equal(mvg.precision[k], mvg.precision[k].T)  # bound 0: stored exactly symmetric


@given(fit_cases)
def test_covariance_and_precision_exactly_symmetric(case):
    seed, n, c, spatial, offset, in_dtype = case
    mvg = MultiVariateGaussian(store_covariance=True).fit(make_embedding(seed, n, c, spatial, offset, in_dtype))
    assert np.array_equal(mvg.precision, mvg.precision.transpose(0, 2, 1))
    assert np.array_equal(mvg.covariance, mvg.covariance.transpose(0, 2, 1))


def test_default_ridge_is_anomalib_effective_ridge():
    assert DEFAULT_RIDGE == 0.01 + 1e-5
    x = make_embedding(0, 4, 6, (2,))  # n <= c: the covariance is singular without the ridge
    mvg = MultiVariateGaussian(store_covariance=True).fit(x)
    for k, data in enumerate(patches(x)):
        expected = np.cov(data, rowvar=False) + 0.01 * np.eye(6) + 1e-5 * np.eye(6)
        # covariance_atol (+ the ridge's roundings, in fit_bounds) + one more eps |A| for adding two ridges
        atol = fit_bounds(data)["covariance"] + eps(np.float64) * np.abs(expected)
        assert_close_each(mvg.covariance[k], expected, rtol=0, atol=atol)


def test_ridge_zero_and_custom_ridge():
    x = make_embedding(1, 20, 3, (2, 2))
    for ridge in (0.0, 0.5):
        mvg = MultiVariateGaussian(store_covariance=True, ridge=ridge).fit(x)
        for k, data in enumerate(patches(x)):
            # covariance_atol plus the ridge's rounding (fit_bounds)
            atol = fit_bounds(data, ridge)["covariance"]
            assert_close_each(mvg.covariance[k], np.cov(data, rowvar=False) + ridge * np.eye(3), rtol=0, atol=atol)


def test_float32_input_accumulates_in_float64_by_default():
    x64 = make_embedding(2, 30, 4, (3,), offset=100.0)
    x32 = x64.astype(np.float32)
    mvg = MultiVariateGaussian(store_covariance=True).fit(x32)
    assert mvg.precision.dtype == np.float64 and mvg.mean.dtype == np.float64
    # Same result as fitting the float32 values converted exactly to float64.
    ref = MultiVariateGaussian(store_covariance=True).fit(x32.astype(np.float64))
    # precision_atol of the regularised patch covariances (two float64 fits of the same values)
    atol = precision_atol(patch_covariances(x32, DEFAULT_RIDGE), 30)
    assert_close_each(mvg.precision, ref.precision, rtol=0, atol=atol)


def test_float32_working_dtype():
    x = make_embedding(3, 40, 4, (2, 2))
    mvg32 = MultiVariateGaussian(store_covariance=True, dtype=np.float32).fit(x)
    mvg64 = MultiVariateGaussian(store_covariance=True).fit(x)
    # float32 fit against float64 (whose error is negligible): the float32 backward error
    # delta32 = covariance_backward_error(n, c, float32) of A = cov + ridge, entrywise <= delta32 ||A||_2;
    # mean_atol, precision_atol (kappa delta |P|), cholesky: kappa delta ||A||^1/2 (as cholesky_atol), in float32.
    a = patch_covariances(x, DEFAULT_RIDGE)
    delta32 = covariance_backward_error(40, 4, np.float32)
    norms = np.linalg.norm(a, 2, axis=(1, 2))
    kappa = np.linalg.cond(a)
    atols = {
        "mean": mean_atol(np.abs(x).max(), 40, np.float32),
        "covariance": TWO_SIDES * delta32 * norms.max(),
        "cholesky": TWO_SIDES * float(np.max(kappa * delta32 * np.sqrt(norms))),
        "precision": precision_atol(a, 40, np.float32),
    }
    for name in ("mean", "covariance", "cholesky", "precision"):
        assert getattr(mvg32, name).dtype == np.float32
        assert_close_each(getattr(mvg32, name), getattr(mvg64, name), rtol=0, atol=atols[name])
    assert np.array_equal(mvg32.precision, mvg32.precision.transpose(0, 2, 1))  # bound 0: exact symmetry
    assert mvg32.mahalanobis(x[:3]).dtype == np.float32


def test_the_default_keeps_only_what_scoring_needs():
    # Issue 12: the covariance and its factor are opt-in; scoring reads only mean, precision, log_det.
    x = make_embedding(30, 8, 3, (2, 2))
    lean = MultiVariateGaussian().fit(x)
    assert lean.store_covariance is False and lean._outputs.covariance is None and lean._outputs.cholesky is None
    full = MultiVariateGaussian(store_covariance=True).fit(x)
    np.testing.assert_array_equal(lean.precision, full.precision)  # same kernel, same rounding: bound 0
    np.testing.assert_array_equal(lean.log_det, full.log_det)
    with pytest.raises(AttributeError, match="store_covariance=True"):
        lean.covariance


def test_store_covariance_false_keeps_only_scoring_state():
    x = make_embedding(4, 15, 3, (2, 2))
    full = MultiVariateGaussian(store_covariance=True).fit(x)
    lean = MultiVariateGaussian(store_covariance=False).fit(x)
    assert np.array_equal(lean.precision, full.precision)
    assert np.array_equal(lean.log_det, full.log_det)
    for name in ("covariance", "cholesky"):
        with pytest.raises(AttributeError, match="store_covariance=True"):
            getattr(lean, name)


@pytest.mark.parametrize("budget, workers", [(1, 1), (1, 2), (10_000, 2), (2**26, 1)])
def test_chunking_and_threads_do_not_change_results(budget, workers):
    x = make_embedding(5, 25, 4, (5, 7))
    ref = MultiVariateGaussian(store_covariance=True).fit(x)
    mvg = MultiVariateGaussian(store_covariance=True, memory_budget=budget, workers=workers).fit(x)
    # Chunks and threads change the blocking of the sums: fit_bounds per patch (mean_atol, covariance_atol,
    # precision_atol, cholesky_atol, log_det_atol), mahalanobis_tolerances for the scores.
    fits_close(mvg, ref, [fit_bounds(p) for p in patches(x)], ("mean", "covariance", "cholesky", "precision", "log_det"))
    rtol, atol = mahalanobis_tolerances(patch_covariances(x, DEFAULT_RIDGE), 25, mean_atol(np.abs(x).max(), 25))
    assert_close_each(mvg.mahalanobis(x[:4]), ref.mahalanobis(x[:4]), rtol=rtol, atol=atol)


def test_non_contiguous_and_integer_inputs():
    x = make_embedding(6, 12, 3, (4, 5))
    transposed = np.ascontiguousarray(np.swapaxes(x, 2, 3)).swapaxes(2, 3)  # same values, F-like strides
    assert not transposed.flags.c_contiguous
    np.testing.assert_array_equal(MultiVariateGaussian(store_covariance=True).fit(transposed).precision, MultiVariateGaussian(store_covariance=True).fit(x).precision)
    ints = np.round(x * 10).astype(np.int32)
    mvg = MultiVariateGaussian(store_covariance=True).fit(ints)
    expected = np.cov(patches(ints)[0], rowvar=False) + DEFAULT_RIDGE * np.eye(3)
    assert_close_each(mvg.covariance[0], expected, rtol=0, atol=fit_bounds(patches(ints)[0])["covariance"])  # covariance_atol


# ---------------------------------------------------------------- shrinkage vs scikit-learn
@given(
    st.integers(0, 2**31 - 1),
    st.integers(2, 15),
    st.integers(1, 6),
    st.sampled_from(["ledoit-wolf", "oas"]),
    st.sampled_from([0.0, 100.0]),
)
def test_shrinkage_matches_sklearn_per_patch(seed, n, c, method, offset):
    from sklearn.covariance import OAS, LedoitWolf

    x = make_embedding(seed, n, c, (2,), offset)
    # sklearn's estimate can be singular for tiny n (zero shrinkage): add a ridge there, exactly on top.
    ridge = 0.0 if n > c + 2 else 0.1
    mvg = MultiVariateGaussian(store_covariance=True, ridge=ridge, shrinkage=method).fit(x)
    for k, data in enumerate(patches(x)):
        ref = (LedoitWolf() if method == "ledoit-wolf" else OAS()).fit(data)
        # shrinkage_tolerances: the coefficient's inputs' rounding over its cancellations (delta, den);
        # the shrunk covariance: covariance_atol + ds |mu I - S|; mean_atol.
        b = fit_bounds(data, ridge, method)
        assert abs(mvg.shrinkage_[k] - ref.shrinkage_) <= b["shrinkage"]
        assert_close_each(mvg.covariance[k], ref.covariance_ + ridge * np.eye(c), rtol=0, atol=b["covariance"])
        assert_close_each(mvg.mean[:, k], ref.location_, rtol=0, atol=b["mean"])


def test_ridge_is_added_on_top_of_shrinkage():
    from sklearn.covariance import LedoitWolf

    x = make_embedding(7, 10, 4, (3,))
    mvg = MultiVariateGaussian(store_covariance=True, shrinkage="ledoit-wolf").fit(x)
    for k, data in enumerate(patches(x)):
        expected = LedoitWolf().fit(data).covariance_ + DEFAULT_RIDGE * np.eye(4)
        # fit_bounds with Ledoit-Wolf: covariance_atol + the coefficient's, and its kappa(A)-amplified inverse
        b = fit_bounds(data, DEFAULT_RIDGE, "ledoit-wolf")
        assert_close_each(mvg.covariance[k], expected, rtol=0, atol=b["covariance"])
        assert_close_each(mvg.precision[k], np.linalg.inv(expected), rtol=0, atol=b["precision"])


@pytest.mark.parametrize("low_memory", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_exactly_singular_patch_is_refused_not_rounded(seed, low_memory):
    """A duplicated feature (or a linear combination) makes the covariance exactly singular; rounding
    often leaves a tiny positive pivot, so potrf "succeeds" with a precision of ~1e15 garbage. The
    fit must raise and name the patch instead."""
    x = make_embedding(seed, 10, 4, (3,))
    x[:, 3, 1] = x[:, 0, 1] + (seed % 2) * 2.0 * x[:, 1, 1]
    with pytest.raises(np.linalg.LinAlgError, match=r"patch 1\b.*(numerically singular|not positive)"):
        MultiVariateGaussian(store_covariance=True, ridge=0.0, low_memory=low_memory).fit(x)
    # with the default ridge the same data fits and matches numpy
    mvg = MultiVariateGaussian(store_covariance=True).fit(x)
    expected = np.linalg.inv(np.cov(x[:, :, 1], rowvar=False) + DEFAULT_RIDGE * np.eye(4))
    assert_close_each(mvg.precision[1], expected, rtol=0, atol=fit_bounds(x[:, :, 1])["precision"])  # precision_atol


def test_shape_in_messages_is_python_tuple_text():
    with pytest.raises(ValueError, match=re.escape("got shape (10,)")):
        MultiVariateGaussian(store_covariance=True).fit(np.ones(10))


def test_shrinkage_makes_singular_patches_factorable():
    x = make_embedding(8, 3, 6, (2,))  # n < c: singular empirical covariance
    with pytest.raises(np.linalg.LinAlgError):
        MultiVariateGaussian(store_covariance=True, ridge=0.0).fit(x)
    mvg = MultiVariateGaussian(store_covariance=True, ridge=0.0, shrinkage="oas").fit(x)
    assert np.all(np.isfinite(mvg.precision))


# ---------------------------------------------------------------- streaming and merging
split_cases = st.tuples(
    st.integers(0, 2**31 - 1),
    st.integers(2, 14),
    st.integers(1, 4),
    st.sampled_from(SPATIAL_SHAPES),
    st.sampled_from([None, "ledoit-wolf", "oas"]),
    st.sampled_from([0.0, 100.0]),
    st.data(),
)


@given(split_cases)
def test_any_split_matches_one_shot(case):
    seed, n, c, spatial, shrinkage, offset, data = case
    x = make_embedding(seed, n, c, spatial, offset)
    cuts = sorted(data.draw(st.lists(st.integers(1, n - 1), max_size=4, unique=True)) if n > 1 else [])
    one_shot = MultiVariateGaussian(store_covariance=True, shrinkage=shrinkage).fit(x)
    streamed = MultiVariateGaussian(store_covariance=True, shrinkage=shrinkage)
    for part in np.split(x, cuts):
        streamed.partial_fit(part)
    assert streamed.n_samples_seen_ == n
    # fit_bounds(streamed=True, merges=len(cuts)): the one-shot bounds, the merges' mean corrections
    # (streamed_covariance_atol), and for Ledoit-Wolf the streamed coefficient's loss
    # (streamed_fourth_power_error, eps ||m||^2 / trace(S) relative, over the cancellation in delta),
    # amplified by kappa(A) in the precision, factor and log det.
    bounds = [fit_bounds(p, shrinkage=shrinkage, streamed=True, merges=len(cuts)) for p in patches(x)]
    fits_close(streamed, one_shot, bounds, ("mean", "covariance", "cholesky", "precision", "log_det"))
    # coefficients live in [0, 1]: compare absolutely (shrinkage_tolerances' coef_atol)
    assert_close_each(streamed.shrinkage_, one_shot.shrinkage_, rtol=0, atol=[b["shrinkage"] for b in bounds])


@given(split_cases)
def test_merge_of_parts_matches_one_shot(case):
    seed, n, c, spatial, shrinkage, offset, data = case
    x = make_embedding(seed, n, c, spatial, offset)
    cut = data.draw(st.integers(1, n - 1))
    left = MultiVariateGaussian(store_covariance=True, shrinkage=shrinkage).partial_fit(x[:cut])
    right = MultiVariateGaussian(store_covariance=True, shrinkage=shrinkage).partial_fit(x[cut:])
    right_count = right.n_samples_seen_
    merged = left.merge(right)
    assert merged is left and right.n_samples_seen_ == right_count
    one_shot = MultiVariateGaussian(store_covariance=True, shrinkage=shrinkage).fit(x)
    # as test_any_split_matches_one_shot: fit_bounds(merges=...), shrinkage_tolerances' coef_atol
    bounds = [fit_bounds(p, shrinkage=shrinkage, streamed=True, merges=1) for p in patches(x)]
    fits_close(merged, one_shot, bounds, ("mean", "covariance", "precision", "log_det"))
    assert_close_each(merged.shrinkage_, one_shot.shrinkage_, rtol=0, atol=[b["shrinkage"] for b in bounds])


def test_partial_fit_refits_lazily_after_each_update():
    x = make_embedding(9, 30, 3, (2, 2))
    streamed = MultiVariateGaussian(store_covariance=True).partial_fit(x[:10])
    first = streamed.precision.copy()
    # precision_atol (fit_bounds per patch): streamed and one-shot sums differ in order only
    fits_close(streamed, MultiVariateGaussian(store_covariance=True).fit(x[:10]), [fit_bounds(p) for p in patches(x[:10])], ("precision",))
    streamed.partial_fit(x[10:])
    assert not np.allclose(streamed.precision, first)
    fits_close(streamed, MultiVariateGaussian(store_covariance=True).fit(x), [fit_bounds(p, merges=1) for p in patches(x)], ("precision",))  # precision_atol


def test_merge_into_empty_model_and_with_empty_model():
    x = make_embedding(10, 12, 3, (2,))
    empty = MultiVariateGaussian(store_covariance=True).merge(MultiVariateGaussian(store_covariance=True).partial_fit(x))
    fits_close(empty, MultiVariateGaussian(store_covariance=True).fit(x), [fit_bounds(p, merges=1) for p in patches(x)], ("precision",))  # precision_atol
    model = MultiVariateGaussian(store_covariance=True).partial_fit(x).merge(MultiVariateGaussian(store_covariance=True))
    assert model.n_samples_seen_ == 12


# ---------------------------------------------------------------- scoring
@given(fit_cases, st.integers(1, 4))
def test_mahalanobis_matches_scipy(case, m):
    seed, n, c, spatial, offset, in_dtype = case
    x = make_embedding(seed, n, c, spatial, offset, in_dtype)
    queries = make_embedding(seed + 1, m, c, spatial, offset, in_dtype)
    mvg = MultiVariateGaussian(store_covariance=True).fit(x)
    dist = mvg.mahalanobis(queries)
    sq = mvg.mahalanobis(queries, squared=True)
    assert dist.shape == sq.shape == (m,) + spatial and dist.dtype == np.float64
    flat_d, flat_sq = dist.reshape(m, -1), sq.reshape(m, -1)
    q = queries.reshape(m, c, -1).astype(np.float64)
    for k in range(math.prod(spatial)):
        vi = np.linalg.inv(np.atleast_2d(np.cov(patches(x)[k], rowvar=False)) + DEFAULT_RIDGE * np.eye(c))
        mu = patches(x)[k].astype(np.float64).mean(axis=0)
        # mahalanobis_tolerances (two fits: Cholesky vs numpy.inv; evaluation; the means' mean_atol);
        # squared: d(d^2) = 2 d dd, so 2 rtol d^2 + 2 d atol + atol^2.
        rtol, atol = mahalanobis_tolerances(np.linalg.inv(vi), n, mean_atol(np.abs(patches(x)[k]).max(), n))
        for i in range(m):
            expected = scipy_mahalanobis(q[i, :, k], mu, vi)
            assert abs(flat_d[i, k] - expected) <= atol + rtol * expected
            assert abs(flat_sq[i, k] - expected**2) <= 2 * rtol * expected**2 + 2 * expected * atol + atol**2
    assert np.all(sq >= 0)


def test_mahalanobis_of_the_mean_is_zero_and_never_negative():
    x = make_embedding(11, 20, 5, (3, 3), offset=1e3)
    mvg = MultiVariateGaussian(store_covariance=True).fit(x)
    at_mean = mvg.mean.reshape((1, 5, 3, 3))
    sq = mvg.mahalanobis(at_mean, squared=True)
    # bound 0: the query is the stored mean itself, so every difference x - mean is exactly 0
    assert np.all(sq == 0)


@given(fit_cases, st.integers(1, 3))
def test_logpdf_matches_scipy_multivariate_normal(case, m):
    seed, n, c, spatial, offset, in_dtype = case
    x = make_embedding(seed, n, c, spatial, offset, in_dtype)
    queries = make_embedding(seed + 2, m, c, spatial, offset)
    mvg = MultiVariateGaussian(store_covariance=True).fit(x)
    logpdf = mvg.logpdf(queries)
    assert logpdf.shape == (m,) + spatial
    q = queries.reshape(m, c, -1)
    for k in range(math.prod(spatial)):
        ref = multivariate_normal(mvg.mean[:, k], mvg.covariance[k]).logpdf(q[:, :, k])
        d2 = mvg.mahalanobis(queries, squared=True).reshape(m, -1)[:, k]
        atol = logpdf_atol(mvg.covariance[k], n, d2, shared_fit=True)  # see logpdf_atol
        assert_close_each(logpdf.reshape(m, -1)[:, k], np.atleast_1d(ref), atol=atol)


def test_scoring_in_tiny_chunks_matches():
    x = make_embedding(12, 20, 4, (4, 4))
    q = make_embedding(13, 7, 4, (4, 4))
    ref = MultiVariateGaussian(store_covariance=True).fit(x)
    tiny = MultiVariateGaussian(store_covariance=True, memory_budget=1, workers=2).fit(x)
    # two fits in other chunks: mahalanobis_tolerances, logpdf_atol (per patch)
    a = patch_covariances(x, DEFAULT_RIDGE)
    rtol, atol = mahalanobis_tolerances(a, 20, mean_atol(np.abs(x).max(), 20))
    assert_close_each(tiny.mahalanobis(q), ref.mahalanobis(q), rtol=rtol, atol=atol)
    d2 = ref.mahalanobis(q, squared=True).reshape(7, -1)
    atols = np.stack([logpdf_atol(a[k], 20, d2[:, k], mean_error=mean_atol(np.abs(x).max(), 20)) for k in range(16)], 1)
    assert_close_each(tiny.logpdf(q), ref.logpdf(q), atol=atols.reshape(7, 4, 4))


# ---------------------------------------------------------------- inputs never modified
def test_inputs_never_modified():
    x = make_embedding(14, 10, 3, (2, 2), offset=5.0)
    q = make_embedding(15, 4, 3, (2, 2))
    x_copy, q_copy = x.copy(), q.copy()
    x.flags.writeable = False  # would raise if anything wrote into it
    q.flags.writeable = False
    for shrinkage in (None, "ledoit-wolf", "oas"):
        mvg = MultiVariateGaussian(store_covariance=True, shrinkage=shrinkage).fit(x)
        mvg.mahalanobis(q)
        mvg.logpdf(q)
        streamed = MultiVariateGaussian(store_covariance=True, shrinkage=shrinkage).partial_fit(x[:5])
        other = MultiVariateGaussian(store_covariance=True, shrinkage=shrinkage).partial_fit(x[5:])
        other_precision = other.precision.copy()
        streamed.merge(other).mahalanobis(q)
        np.testing.assert_array_equal(other.precision, other_precision)
    np.testing.assert_array_equal(x, x_copy)
    np.testing.assert_array_equal(q, q_copy)


def test_returned_scores_do_not_alias_the_model():
    x = make_embedding(16, 10, 2, (2,))
    mvg = MultiVariateGaussian(store_covariance=True).fit(x)
    d = mvg.mahalanobis(x)
    d[...] = -1
    assert np.all(mvg.mahalanobis(x) >= 0)


# ---------------------------------------------------------------- errors
def test_fewer_than_two_observations():
    with pytest.raises(ValueError, match=r"embedding has 1 observation .*at least 2 observations"):
        MultiVariateGaussian(store_covariance=True).fit(np.zeros((1, 3, 2, 2)))
    streamed = MultiVariateGaussian(store_covariance=True).partial_fit(np.zeros((1, 3, 2, 2)))
    with pytest.raises(ValueError, match=r"partial_fit has seen 1 observation\(s\); .*at least 2"):
        streamed.precision


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_name_the_first_bad_patch(bad):
    x = make_embedding(17, 6, 3, (4, 5))
    x[2, 1, 1, 3] = bad  # patch 1*5 + 3 = 8
    x[4, 0, 3, 4] = bad  # a later patch: not the one reported
    msg = re.escape("non-finite values (NaN or infinity) in patch 8 (position (1, 3) of the 4x5 grid), first at observation 2, feature 1")
    with pytest.raises(ValueError, match=msg):
        MultiVariateGaussian(store_covariance=True, memory_budget=1, workers=2).fit(x)
    with pytest.raises(ValueError, match=re.escape("batch contains non-finite values (NaN or infinity) in patch 8")):
        MultiVariateGaussian(store_covariance=True).partial_fit(x)


def test_unfactorable_covariance_names_patch_and_suggests_fixes():
    x = make_embedding(18, 8, 3, (2, 4))
    x[:, :, 1, 1] = 7.0  # patch 5 is constant: zero covariance
    with pytest.raises(np.linalg.LinAlgError) as info:
        MultiVariateGaussian(store_covariance=True, ridge=0.0).fit(x)
    message = str(info.value)
    assert "patch 5 (position (1, 1) of the 2x4 grid)" in message
    assert "ridge=0.0" in message and "shrinkage" in message and "increase ridge" in message
    assert np.all(np.isfinite(MultiVariateGaussian(store_covariance=True).fit(x).precision))  # the default ridge copes


def test_overflowing_covariance_is_an_error_not_nan():
    x = make_embedding(19, 5, 2, (3,)) * 1e160
    with pytest.raises(ValueError, match="covariance of patch 0 .*overflowed"):
        MultiVariateGaussian(store_covariance=True).fit(x)


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((4, 3, 2), "x must have shape (M, 3, 2, 2)"),
        ((4, 2, 2, 2), "x must have shape (M, 3, 2, 2)"),
        ((4, 3, 2, 3), "got shape (4, 3, 2, 3)"),
        ((4, 3, 2, 2, 1), "got shape (4, 3, 2, 2, 1)"),
    ],
)
def test_wrong_scoring_shape_says_what_was_expected(shape, expected):
    mvg = MultiVariateGaussian(store_covariance=True).fit(make_embedding(20, 6, 3, (2, 2)))
    for method in (mvg.mahalanobis, mvg.logpdf):
        with pytest.raises(ValueError, match=re.escape(expected)):
            method(np.zeros(shape))


def test_non_finite_query_is_an_error():
    mvg = MultiVariateGaussian(store_covariance=True).fit(make_embedding(21, 6, 3, (2, 2)))
    q = np.zeros((3, 3, 2, 2))
    q[2, 0, 1, 0] = np.nan
    with pytest.raises(ValueError, match=re.escape("at sample 2, patch 2 (position (1, 0) of the 2x2 grid)")):
        mvg.mahalanobis(q)


def test_argument_validation():
    with pytest.raises(ValueError, match="ridge must be a finite number >= 0"):
        MultiVariateGaussian(store_covariance=True, ridge=-0.1)
    with pytest.raises(ValueError, match="shrinkage must be None, 'ledoit-wolf' or 'oas'"):
        MultiVariateGaussian(store_covariance=True, shrinkage="lw")
    with pytest.raises(ValueError, match="dtype must be float64 or float32"):
        MultiVariateGaussian(store_covariance=True, dtype=np.float16)
    with pytest.raises(ValueError, match="memory_budget must be a positive"):
        MultiVariateGaussian(store_covariance=True, memory_budget=0)
    with pytest.raises(ValueError, match="workers must be a positive integer or None"):
        MultiVariateGaussian(workers=0)
    with pytest.raises(TypeError, match="embedding must hold real numbers"):
        MultiVariateGaussian(store_covariance=True).fit(np.zeros((3, 2, 2), dtype=complex))
    with pytest.raises(ValueError, match=r"at least 2 axes"):
        MultiVariateGaussian(store_covariance=True).fit(np.zeros(5))


def test_not_fitted_and_state_misuse():
    mvg = MultiVariateGaussian(store_covariance=True)
    with pytest.raises(NotFittedError, match="not fitted yet"):
        mvg.precision
    with pytest.raises(NotFittedError):
        mvg.mahalanobis(np.zeros((1, 2)))
    x = make_embedding(22, 6, 2, (2,))
    fitted = MultiVariateGaussian(store_covariance=True).fit(x)
    with pytest.raises(ValueError, match="fitted with fit\\(\\), which keeps no running moments"):
        fitted.partial_fit(x)
    streamed = MultiVariateGaussian(store_covariance=True).partial_fit(x)
    with pytest.raises(ValueError, match=re.escape("batch must have shape (M, 2, 2)")):
        streamed.partial_fit(np.zeros((3, 2, 3)))
    with pytest.raises(ValueError, match="different shrinkage"):
        streamed.merge(MultiVariateGaussian(store_covariance=True, shrinkage="oas").partial_fit(x))
    with pytest.raises(ValueError, match="fitted with fit"):
        streamed.merge(fitted)


def test_shape_helpers_raise_the_messages_the_class_uses():
    with pytest.raises(ValueError) as helper:
        check_fit_shape((1, 3, 2, 2))
    with pytest.raises(ValueError) as core:
        MultiVariateGaussian(store_covariance=True).fit(np.zeros((1, 3, 2, 2)))
    assert str(helper.value) == str(core.value)
    mvg = MultiVariateGaussian(store_covariance=True).fit(make_embedding(23, 5, 3, (2, 2)))
    with pytest.raises(ValueError) as helper:
        check_score_shape((4, 3, 2), 3, (2, 2))
    with pytest.raises(ValueError) as core:
        mvg.mahalanobis(np.zeros((4, 3, 2)))
    assert str(helper.value) == str(core.value)
    assert check_fit_shape((7, 5, 3, 4)) == (7, 5, (3, 4))
    assert check_score_shape((2, 5, 3, 4), 5, (3, 4)) == 2
    assert describe_patch(11, (3, 4)) == "patch 11 (position (2, 3) of the 3x4 grid)"


def test_single_patch_without_spatial_axes():
    x = np.random.default_rng(24).normal(size=(30, 4))
    mvg = MultiVariateGaussian(store_covariance=True).fit(x)
    assert mvg.mean.shape == (4, 1) and mvg.precision.shape == (1, 4, 4)
    assert mvg.mahalanobis(x[:3]).shape == (3,)
    expected = np.cov(x, rowvar=False) + DEFAULT_RIDGE * np.eye(4)
    assert_close_each(mvg.covariance[0], expected, rtol=0, atol=fit_bounds(x)["covariance"])  # covariance_atol


# ---------------------------------------------------------------- benchmark smoke test
def test_benchmark_quick_mode_writes_rows(tmp_path, monkeypatch):
    import json

    from benchmarks import bench_gaussian

    monkeypatch.setattr(bench_gaussian, "RESULTS_PATH", tmp_path / "gaussian.json")
    summary = bench_gaussian.main(quick=True)
    rows = json.loads((tmp_path / "gaussian.json").read_text())
    assert rows == summary["rows"]
    # Timed rows only: the machine's floor row and the peak-memory row carry other fields.
    timed = [row for row in rows if "x_floor" in row]
    assert timed
    for row in timed:
        assert {"suite", "case", "library", "seconds", "ratio"} <= row.keys()
        # Bound: both sides invert the same regularised float64 covariance, each to about κ·C·eps relative
        # (Higham thm. 14.1); at the quick sizes κ <= 2.7e3 (measured on the benchmark's data, C <= 30), so
        # the two sides differ by at most 2·κ·C·eps ~ 4e-11 < 1e-10.
        assert row.get("max_rel_diff", 0.0) < 1e-10
    fits = [r for r in rows if r["library"] == "anomstats MultiVariateGaussian"]
    assert len(fits) == 2 and all(r["precision_symmetric"] for r in fits)


@pytest.mark.parametrize("low_memory", [False, True])
def test_rank_deficient_patches_fit_with_the_default_ridge_in_float32(low_memory):
    # PaDiM often has fewer images than channels (N <= C): the covariance is singular and only the
    # ridge makes it definite. With large feature variances the ridge is below C·eps(float32) of the
    # variance, which must not be mistaken for an exactly singular (unregularised) covariance.
    x = (np.random.default_rng(5).standard_normal((30, 64, 2, 2)) * 100).astype(np.float32)
    model = MultiVariateGaussian(store_covariance=True, dtype=np.float32, low_memory=low_memory)
    model.fit(x)  # must not raise "numerically singular"
    assert np.isfinite(model.precision).all()
    distances = model.mahalanobis(x[:2])
    assert np.isfinite(distances).all() and (distances > 0).all()
