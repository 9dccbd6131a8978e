"""anomstats.batched_cov against a per-batch-item loop of numpy.cov, plus its chunking helpers."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.exceptions import AxisError

from anomstats import batched_cov
from anomstats._budget import batch_chunks, chunk_slices
from anomstats import _moment_kernels as moment_kernels
from anomstats._moment_kernels import gather

from tests._tolerances import assert_close_each, streaming_covariance_atol


def loop_of_numpy_cov(x, obs_axis=0, var_axis=1, **kwargs):
    """The reference: numpy.cov on every batch item, stacked as (*batch, C, C)."""
    view = np.moveaxis(np.asarray(x), (obs_axis, var_axis), (-2, -1))
    *batch, _, n_var = view.shape
    dtype = kwargs.get("dtype") or np.result_type(view.dtype, np.float64)
    out = np.empty((*batch, n_var, n_var), dtype=dtype)
    for index in np.ndindex(*batch):
        out[index] = np.cov(view[index], rowvar=False, **kwargs)
    return out


def assert_close(got, ref, x, obs_axis=0, var_axis=1, weights=None, ddof=1, dtype=np.float64):
    """Within tests/_tolerances.streaming_covariance_atol(streamed=False): two one-pass centred covariances
    of the observations ``x`` (the one-shot mean's error cancels to first order), per entry, both sides."""
    view = np.moveaxis(np.asarray(x), (obs_axis, var_axis), (-2, -1))
    atol = streaming_covariance_atol(view, weights, dtype, 1 if ddof is None else ddof, streamed=False)
    got, ref = np.asarray(got), np.asarray(ref)
    for part in (np.real, np.imag):  # complex: |Re d|, |Im d| <= |d| <= atol (assert_close_each is real)
        # equal_nan: a degenerate normalisation (zero weights) gives NaN on both sides, as numpy does.
        assert_close_each(part(got), part(ref), atol=atol, equal_nan=True)


@st.composite
def batched_problems(draw):
    """A small array with two named axes (any sign convention) and estimator options."""
    ndim = draw(st.integers(2, 4))
    obs, var = draw(st.permutations(range(ndim)))[:2]
    shape = [draw(st.integers(1, 4)) for _ in range(ndim)]
    ddof = draw(st.sampled_from([0, 1, 2]))
    shape[obs] = draw(st.integers(ddof + 2, 9))  # enough observations for a positive normalisation
    kind = draw(st.sampled_from(["float64", "float32", "int64"]))
    offset = draw(st.sampled_from([0.0, 100.0, 1e4]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "int64":
        x = rng.integers(-50, 50, size=shape) + int(offset)
    else:
        x = (rng.normal(size=shape) * rng.uniform(0.1, 10) + offset).astype(kind)
    # Memory layouts: the kernel picks its copy strategy from the strides.
    layout = draw(st.sampled_from(["C", "F", "reversed"]))
    if layout == "F":
        x = np.asfortranarray(x)
    elif layout == "reversed":
        x = np.flip(x, axis=draw(st.integers(0, ndim - 1)))
    weights = None
    if draw(st.booleans()):
        weights = rng.uniform(0.1, 3.0, size=shape[obs])
        weights[rng.random(shape[obs]) < 0.2] = 0.0  # a few zero weights, as numpy allows
        weights[0] = 1.0  # and a positive sum
    # Name each axis by a positive or negative index at random.
    obs_name = obs - ndim if draw(st.booleans()) else obs
    var_name = var - ndim if draw(st.booleans()) else var
    return x, obs, var, obs_name, var_name, ddof, weights


@given(batched_problems(), st.sampled_from([None, 1, 5000]))
def test_matches_loop_of_numpy_cov(problem, budget):
    x, obs, var, obs_name, var_name, ddof, weights = problem
    x_before = x.copy()
    w_before = None if weights is None else weights.copy()
    kwargs = {} if budget is None else {"memory_budget": budget}
    got = batched_cov(x, obs_axis=obs_name, var_axis=var_name, ddof=ddof, aweights=weights, **kwargs)
    ref = loop_of_numpy_cov(x, obs, var, ddof=ddof, aweights=weights)
    assert got.dtype == np.float64
    assert got.shape == ref.shape
    assert_close(got, ref, x, obs, var, weights, ddof)
    np.testing.assert_array_equal(x, x_before)
    if weights is not None:
        np.testing.assert_array_equal(weights, w_before)


@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_tiny_budgets_and_thread_counts_give_the_same_result(n_patches, n_var, seed):
    x = np.random.default_rng(seed).normal(size=(7, n_var, n_patches, 3)) + 100
    reference = batched_cov(x, workers=1)
    for budget, workers in [(1, 1), (1, 3), (200, 2), (10**9, 2)]:
        got = batched_cov(x, memory_budget=budget, workers=workers)
        assert_close(got, reference, x)


def test_padim_layout_gives_patch_grid_first():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3, 2, 4)).astype(np.float32)  # (B, C, H, W)
    c = batched_cov(x)
    assert c.shape == (2, 4, 3, 3)
    assert c.dtype == np.float64
    for h in range(2):
        for w in range(4):
            assert_close(c[h, w], np.cov(x[:, :, h, w], rowvar=False), x[:, :, h, w])


@pytest.mark.parametrize("order", ["C", "F"])
def test_gather_matches_a_plain_copy_for_many_layouts(order):
    rng = np.random.default_rng(9)
    x = np.asarray(rng.normal(size=(5, 4, 6, 7)), order=order)
    for obs, var in [(0, 1), (2, 3), (3, 0), (1, 2)]:
        view = np.moveaxis(x, (obs, var), (-2, -1))
        block = view[1:3]
        p = int(np.prod(block.shape[:-2]))
        work = np.full((p, *block.shape[-2:]), np.nan)
        gather(block, work)
        np.testing.assert_array_equal(work, block.reshape(p, *block.shape[-2:]))
        spare = np.full((p, block.shape[-2] + 1, block.shape[-1]), np.nan)
        gather(block, spare[:, :-1])
        np.testing.assert_array_equal(spare[:, :-1], block.reshape(p, *block.shape[-2:]))
        assert np.isnan(spare[:, -1]).all()


@pytest.mark.parametrize("n_var", [5, 11])  # C within one tile (whole observations), and wider than a tile
@pytest.mark.parametrize("data_dtype, work_dtype", [(np.float32, np.float64), (np.float64, np.float32)])
def test_gather_with_shift_over_many_tiles(monkeypatch, n_var, data_dtype, work_dtype):
    # Tiny tiles, so that the chunk spans several tiles of items and of values, and C = 11 values cut across
    # tile boundaries (each tile must take its shifts from the right variable, v % C).
    monkeypatch.setattr(moment_kernels, "_TILE_VALUES", 8)
    monkeypatch.setattr(moment_kernels, "_TILE_ITEMS", 3)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4, n_var, 9)).astype(data_dtype)  # (N, C, P): the patch axis next in memory
    block = x.transpose(2, 0, 1)[1:8]  # 7 patches
    shift = rng.normal(size=(7, n_var)).astype(work_dtype)
    work = np.full((7, 4, n_var), np.nan, dtype=work_dtype)
    gather(block, work, shift=shift)
    # One rounding, of the difference computed in the wider dtype.
    wide = np.result_type(data_dtype, work_dtype)
    want = (block.astype(wide) - shift[:, None, :].astype(wide)).astype(work_dtype)
    np.testing.assert_array_equal(work, want)


def test_far_from_origin_float64_keeps_its_digits():
    # Raw sums of products would lose ~16 digits here; centring first keeps them.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 4, 3)) + 1e8
    assert_close(batched_cov(x), loop_of_numpy_cov(x), x)
    y = rng.normal(size=(50, 4, 3)) + 1e3
    assert_close(batched_cov(y), loop_of_numpy_cov(y), y)


def test_no_batch_axes_and_single_variable_shapes():
    x = np.random.default_rng(2).normal(size=(5, 3))
    assert_close(batched_cov(x), np.cov(x, rowvar=False), x)
    single = batched_cov(x[:, :1])
    assert single.shape == (1, 1)  # numpy would squeeze this to 0-d
    assert_close(single, np.atleast_2d(np.cov(x[:, 0])), x[:, :1])


def test_empty_batch_and_empty_variables():
    assert batched_cov(np.zeros((4, 3, 0))).shape == (0, 3, 3)
    assert batched_cov(np.zeros((4, 0, 2))).shape == (2, 0, 0)


def test_non_contiguous_and_fortran_inputs():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(12, 8, 6))
    strided = base[::2, ::2, 1:]
    fortran = np.asfortranarray(base)
    assert_close(batched_cov(strided, obs_axis=1, var_axis=2), loop_of_numpy_cov(strided, 1, 2), strided, 1, 2)
    assert_close(batched_cov(fortran, var_axis=-1), loop_of_numpy_cov(fortran, 0, 2), fortran, 0, 2)


def test_float64_input_no_batch_is_not_modified():
    # The no-copy trap: a contiguous float64 (N, C) input could be centred in place.
    x = np.random.default_rng(4).normal(size=(6, 3)) + 5
    before = x.copy()
    batched_cov(x)
    np.testing.assert_array_equal(x, before)


def test_dtype_keyword_and_result_dtypes():
    rng = np.random.default_rng(5)
    x32 = rng.normal(size=(20, 3, 2)).astype(np.float32)
    c32 = batched_cov(x32, dtype=np.float32)
    assert c32.dtype == np.float32
    # Bound: the same, with float32's eps (the reference works in float64).
    assert_close(c32, loop_of_numpy_cov(x32), x32, dtype=np.float32)
    assert batched_cov(np.arange(12).reshape(4, 3)).dtype == np.float64
    assert batched_cov(np.ones((4, 3), dtype=bool)).dtype == np.float64
    assert batched_cov(x32, dtype=np.longdouble).dtype == np.longdouble


def test_complex_input_matches_numpy():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(7, 3, 2)) + 1j * rng.normal(size=(7, 3, 2))
    got = batched_cov(x, aweights=rng.uniform(0.5, 1.5, size=7))
    assert got.dtype == np.complex128
    w = rng.uniform(0.5, 1.5, size=7)
    assert_close(batched_cov(x, aweights=w), loop_of_numpy_cov(x, aweights=w), x, weights=w)


def test_degrees_of_freedom_warning_and_values_follow_numpy():
    x = np.random.default_rng(7).normal(size=(2, 3, 2))
    with pytest.warns(RuntimeWarning, match=r"Degrees of freedom <= 0 for slice"):
        got = batched_cov(x, ddof=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = loop_of_numpy_cov(x, ddof=2)
    np.testing.assert_array_equal(got, ref)  # bound 0: the same inf / -inf / nan pattern


def test_negative_ddof_is_allowed_like_numpy():
    x = np.random.default_rng(8).normal(size=(5, 2, 3))
    assert_close(batched_cov(x, ddof=-1), loop_of_numpy_cov(x, ddof=-1), x, ddof=-1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"obs_axis": 0, "var_axis": -3}, ValueError, r"obs_axis=0 and var_axis=-3 both refer to axis 0"),
        ({"obs_axis": 3}, AxisError, r"obs_axis=3 is out of range for an input with 3 dimensions"),
        ({"var_axis": -4}, AxisError, r"var_axis=-4 is out of range"),
        ({"obs_axis": 0.5}, TypeError, r"obs_axis must be an integer"),
        ({"ddof": 1.5}, ValueError, r"ddof must be integer"),
        ({"aweights": np.ones(3)}, RuntimeError, r"incompatible numbers of samples and aweights: 3 weights for 4"),
        ({"aweights": np.ones((4, 1))}, RuntimeError, r"cannot handle multidimensional aweights"),
        ({"aweights": 1.0}, ValueError, r"aweights must be a 1-D array"),
        ({"aweights": [1, -1, 1, 1]}, ValueError, r"aweights cannot be negative"),
        ({"aweights": [1, np.nan, 1, 1]}, ValueError, r"aweights must be finite"),
        ({"aweights": np.zeros(4)}, ZeroDivisionError, r"Weights sum to zero"),
        ({"dtype": np.int32}, TypeError, r"dtype must be a floating or complex dtype"),
        ({"memory_budget": 0}, ValueError, r"memory_budget must be a positive number of bytes"),
        ({"memory_budget": 1.5}, TypeError, r"memory_budget must be an integer"),
        ({"workers": 0}, ValueError, r"workers must be a positive integer"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    x = np.zeros((4, 3, 2))
    with pytest.raises(error, match=match):
        batched_cov(x, **kwargs)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"x must have at least 2 dimensions"):
        batched_cov(np.zeros(5))
    with pytest.raises(TypeError, match=r"x must hold numbers"):
        batched_cov(np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(TypeError, match=r"imaginary part"):
        batched_cov(np.ones((3, 2), dtype=complex), dtype=np.float64)


def test_axis_error_is_also_a_value_error():
    with pytest.raises(ValueError):
        batched_cov(np.zeros((3, 2)), var_axis=2)


@given(st.lists(st.integers(0, 4), min_size=0, max_size=4), st.integers(1, 30))
def test_batch_chunks_cover_every_item_once_in_contiguous_blocks(shape, max_items):
    shape = tuple(shape)
    flat = np.arange(math.prod(shape)).reshape(shape + (1,))
    seen = []
    for index, n in batch_chunks(shape, max_items):
        block = flat[index]
        assert block.size == n
        assert 1 <= n <= max_items
        assert block.flags.c_contiguous
        seen.extend(block.ravel().tolist())
    expected = list(range(math.prod(shape))) if all(shape) or not shape else []
    assert seen == expected


def test_chunk_slices_respect_the_budget():
    slices = list(chunk_slices(10, 100, 350))
    assert [(s.start, s.stop) for s in slices] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert [(s.start, s.stop) for s in chunk_slices(3, 10**6, 1)] == [(0, 1), (1, 2), (2, 3)]


def test_blas_thread_count_is_restored_after_overlapping_calls():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import threading

    def blas_threads():
        return [info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]

    before = blas_threads()
    x = np.random.default_rng(10).normal(size=(12, 4, 30))
    errors = []

    def hammer():
        try:
            for _ in range(10):
                batched_cov(x, memory_budget=500, workers=2)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert blas_threads() == before


@pytest.mark.parametrize("workers", [1, 2])
def test_temporaries_stay_within_the_memory_budget(workers):
    import tracemalloc

    x = np.random.default_rng(11).normal(size=(200, 32, 16, 16)).astype(np.float32)
    full_copy = x.size * 8  # one float64 transposed copy of all of x: 13 MB
    result_bytes = 16 * 16 * 32 * 32 * 8
    budget = 2**20
    batched_cov(x[:, :, :1, :2], workers=workers)  # one-time set-up (BLAS thread control) untraced
    tracemalloc.start()
    try:
        batched_cov(x, memory_budget=budget, workers=workers)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The chunks in flight share the budget; on top of it each worker thread has small fixed
    # bookkeeping (numpy's ufunc/iterator buffers, executor state): 128 KiB a worker. Far below a
    # full copy either way.
    assert peak - result_bytes < budget + workers * 2**17
    assert peak - result_bytes < full_copy / 8
