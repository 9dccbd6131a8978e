"""The GIL-free LAPACK/BLAS calls agree with numpy and with scipy's wrappers they stand in for."""

import numpy as np
import pytest

from anomstats import _lapack
from tests._tolerances import assert_close_each, gram_atol, recursive_inverse_atol, spd_factor_atol


def _spd(c, dtype, seed=0):
    x = np.random.default_rng(seed).standard_normal((3 * c, c))
    return (x.T @ x / (3 * c) + 0.1 * np.eye(c)).astype(dtype), x.astype(dtype)


# Orders on both sides of the unblocked/blocked Cholesky switch (xPOTF2 up to it, xPOTRF beyond).
_ORDERS = [7, _lapack.UNBLOCKED_CHOLESKY_MAX_ORDER, _lapack.UNBLOCKED_CHOLESKY_MAX_ORDER + 9]


@pytest.mark.parametrize("c", _ORDERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("use_ctypes", [True, False])
def test_factor_invert_and_gram_match_numpy(c, dtype, use_ctypes, monkeypatch):
    if not use_ctypes:
        monkeypatch.setattr(_lapack, "_ROUTINES", {})  # force scipy's wrappers
    a, rows = _spd(c, dtype)
    # Bound: spd_factor_atol (Cholesky / inverse of the same matrix: kappa * 2c eps |R|, kappa * 3c eps |P|,
    # eps of dtype, both sides).
    chol_atol, inv_atol = spd_factor_atol(a, dtype)
    t = np.tril(a)
    assert _lapack.potrf_lower(t) == 0
    assert_close_each(t, np.linalg.cholesky(a.astype(np.float64)), atol=chol_atol)
    assert np.all(np.triu(t, 1) == 0)  # the strict upper triangle is never written
    assert _lapack.potri_lower(t) == 0
    full = t + np.tril(t, -1).T
    assert_close_each(full, np.linalg.inv(a.astype(np.float64)), atol=inv_atol)

    g = np.zeros((c, c), dtype=dtype)
    _lapack.syrk_lower(0.5, rows, g)
    # Bound: gram_atol (entries are sums of 3c products, eps of dtype, both sides), per entry.
    assert_close_each(np.tril(g), np.tril(0.5 * rows.T @ rows), atol=np.tril(gram_atol(rows, 0.5, dtype)))
    assert np.all(np.triu(g, 1) == 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_small_orders_take_the_unblocked_cholesky(dtype):
    prefix = "s" if dtype == np.float32 else "d"
    limit = _lapack.UNBLOCKED_CHOLESKY_MAX_ORDER
    assert _lapack._cholesky_routine(limit, dtype) is _lapack._ROUTINES[prefix + "potf2"]
    assert _lapack._cholesky_routine(limit + 1, dtype) is _lapack._ROUTINES[prefix + "potrf"]
    t = np.zeros((limit, limit), dtype=dtype)
    assert _lapack.ScratchKernels(t)._potrf is _lapack._ROUTINES[prefix + "potf2"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("use_ctypes", [True, False])
def test_bound_scratch_kernels_match_the_functions(dtype, use_ctypes, monkeypatch):
    if not use_ctypes:
        monkeypatch.setattr(_lapack, "_ROUTINES", {})
    a, rows = _spd(6, dtype, seed=3)
    expected = np.zeros((6, 6), dtype=dtype)
    _lapack.syrk_lower(0.25, rows, expected)
    assert _lapack.potrf_lower(expected) == 0 and _lapack.potri_lower(expected) == 0

    t = np.zeros((6, 6), dtype=dtype)
    kernels = _lapack.ScratchKernels(t)
    for _ in range(2):  # the prepared arguments are reusable
        kernels.syrk(0.25, rows)
        assert kernels.potrf() == 0 and kernels.potri() == 0
        np.testing.assert_array_equal(t, expected)  # bound 0: the same LAPACK calls on the same inputs
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.syrk(1.0, np.ones((4, 5), dtype=dtype))


# Orders on both sides of the recursive inverse's switch; 300 recurses twice (150, then 75).
_INVERSE_ORDERS = [7, _lapack.RECURSIVE_INVERSE_MIN_ORDER - 1, _lapack.RECURSIVE_INVERSE_MIN_ORDER, 300]


@pytest.mark.parametrize("c", _INVERSE_ORDERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("use_ctypes", [True, False])
def test_invert_matches_numpy(c, dtype, use_ctypes, monkeypatch):
    if not use_ctypes:
        monkeypatch.setattr(_lapack, "_ROUTINES", {})  # scipy's wrappers: potrf + potri, never the recursion
    a, _ = _spd(c, dtype, seed=5)
    t = np.tril(a)
    kernels = _lapack.ScratchKernels(t)
    assert (kernels._recursive is not None) == (use_ctypes and c >= _lapack.RECURSIVE_INVERSE_MIN_ORDER)
    factor_diagonal = np.full(c, np.nan, dtype=dtype)
    assert kernels.invert(factor_diagonal) == 0
    assert np.all(np.triu(t, 1) == 0)  # the strict upper triangle is never written
    # Bound: recursive_inverse_atol (spd_factor_atol times kappa(A)^1/2 for the explicit block inverses).
    chol_atol, inv_atol = recursive_inverse_atol(a, dtype)
    reference = a.astype(np.float64)
    assert_close_each(factor_diagonal, np.diagonal(np.linalg.cholesky(reference)), atol=chol_atol)
    assert_close_each(t + np.tril(t, -1).T, np.linalg.inv(reference), atol=inv_atol)


@pytest.mark.parametrize("minor", [5, 149, 150, 151, 299])
def test_invert_reports_the_failing_minor_through_the_recursion(minor):
    # Order 300 halves into 150 + 150, and each half into 75 + 75: the minors straddle both splits. The Schur
    # complement of the leading block at ``minor - 1`` is set to -1 (the other entries' scale is ~1), so the
    # leading minor of order ``minor`` is the first that is not positive definite, whatever the rounding.
    a, _ = _spd(300, np.float64, seed=9)
    k = minor - 1
    if k:
        a[k, k] = a[k, :k] @ np.linalg.solve(a[:k, :k], a[:k, k]) - 1.0
    else:
        a[0, 0] = -1.0
    t = np.tril(a)
    kernels = _lapack.ScratchKernels(t)
    assert kernels._recursive is not None
    assert kernels.invert(np.empty(300)) == minor
    assert _lapack.potrf_lower(np.tril(a)) == minor  # LAPACK's own verdict, the same


@pytest.mark.parametrize("c", _ORDERS)
def test_not_positive_definite_reports_the_failing_minor(c):
    diagonal = np.ones(c)
    diagonal[c // 2] = -1.0
    t = np.diag(diagonal)
    assert _lapack.potrf_lower(t) == c // 2 + 1
    t = np.diag(diagonal)
    assert _lapack.ScratchKernels(t).potrf() == c // 2 + 1


def test_ctypes_routines_are_available_here():
    # Without them the fit still works, but its threads would be serialised by the GIL.
    assert all(_lapack._ROUTINES.get(p + r) for p in "sd" for r in ("potrf", "potf2", "potri", "syrk"))


def test_bad_layouts_are_rejected():
    with pytest.raises(ValueError, match="C-contiguous square"):
        _lapack.potrf_lower(np.eye(3)[:, :2])
    with pytest.raises(ValueError, match="C-contiguous"):
        _lapack.syrk_lower(1.0, np.ones((4, 3)).T, np.zeros((4, 4)))


@pytest.mark.parametrize("switch", [0, 1, 2, 3])
def test_a_tiny_recursion_switch_still_halves_to_leaves(switch, monkeypatch):
    # Blocks of one row cannot be halved: a switch below 2 must not recurse forever (found in review).
    monkeypatch.setattr(_lapack, "RECURSIVE_INVERSE_MIN_ORDER", switch)
    a, _ = _spd(9, np.float64, seed=2)
    t = np.tril(a)
    kernels = _lapack.ScratchKernels(t)
    assert kernels._recursive is not None
    assert kernels.invert() == 0
    _, inv_atol = recursive_inverse_atol(a)  # as in test_invert_matches_numpy
    assert_close_each(t + np.tril(t, -1).T, np.linalg.inv(a), atol=inv_atol)
