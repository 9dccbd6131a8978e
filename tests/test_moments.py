"""anomstats.RunningMoments: streaming updates and merge trees against one-shot batched_cov."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from anomstats import RunningMoments, batched_cov
from tests._tolerances import TWO_SIDES, assert_close_each, eps, mean_atol, streaming_covariance_atol, sum_error


def assert_close(got, ref, observations, weights=None, dtype=np.float64, ddof=1):
    """Covariances within tests/_tolerances.streaming_covariance_atol of ``observations`` (..., n, c): the
    one-pass bound plus the streamed means' ``sqrt(n) eps |offset| / s`` relative loss far from the origin."""
    atol = streaming_covariance_atol(observations, weights, dtype, ddof)
    got, ref = np.asarray(got), np.asarray(ref)
    for part in (np.real, np.imag):  # complex: |Re d|, |Im d| <= |d| <= atol (assert_close_each is real)
        # equal_nan: a degenerate normalisation (zero weights) gives NaN on both sides, as numpy does.
        assert_close_each(part(got), part(ref), atol=atol, equal_nan=True)


def weight_sum_rtol(n):
    """Two sums of n weights (or squared weights) in other orders: sum_error(n) + 1 rounding, both sides."""
    return TWO_SIDES * (sum_error(n) + eps(np.float64))


def take(x, axis, start, stop):
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, stop)
    return x[tuple(index)]


@st.composite
def streaming_problems(draw):
    """Data with named axes, optional weights, split points and a merge order."""
    ndim = draw(st.integers(2, 4))
    obs, var = draw(st.permutations(range(ndim)))[:2]
    shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
    n_obs = draw(st.integers(3, 16))
    shape[obs] = n_obs
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["float64", "float32"]))
    offset = draw(st.sampled_from([0.0, 100.0, 1e4]))
    x = (rng.normal(size=shape) * rng.uniform(0.1, 5) + offset).astype(kind)
    weights = rng.uniform(0.1, 2.0, size=n_obs) if draw(st.booleans()) else None
    # Split points (empty pieces allowed) and which pieces go into which accumulator.
    cuts = sorted(draw(st.lists(st.integers(0, n_obs), max_size=5)))
    bounds = list(zip([0, *cuts], [*cuts, n_obs]))
    groups = draw(st.lists(st.integers(0, 3), min_size=len(bounds), max_size=len(bounds)))
    merge_seed = draw(st.integers(0, 2**16))
    return x, obs, var, weights, bounds, groups, merge_seed


@given(streaming_problems(), st.sampled_from([0, 1, 2]))
def test_any_split_and_merge_tree_gives_the_one_shot_result(problem, ddof):
    x, obs, var, weights, bounds, groups, merge_seed = problem
    x_before = x.copy()
    accumulators = {}
    for (start, stop), group in zip(bounds, groups):
        piece = take(x, obs, start, stop)
        w = None if weights is None else weights[start:stop]
        acc = accumulators.setdefault(group, RunningMoments(obs, var - x.ndim, memory_budget=700))
        acc.update(piece, weights=w)
    # Merge the accumulators pairwise in a random tree.
    pool = list(accumulators.values())
    order = np.random.default_rng(merge_seed)
    while len(pool) > 1:
        i, j = sorted(order.choice(len(pool), size=2, replace=False))
        right = pool.pop(j)
        right_state = right.state()
        pool[i].merge(right)
        assert right.state()["count"] == right_state["count"]  # merge leaves its argument alone
    result = pool[0]

    assert result.count == x.shape[obs]
    expected_sum = float(x.shape[obs]) if weights is None else float(weights.sum())
    assert result.sum_weights == pytest.approx(expected_sum, rel=weight_sum_rtol(x.shape[obs]), abs=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # degenerate ddof: checked below
        ref_cov = batched_cov(x, obs_axis=obs, var_axis=var, ddof=ddof, aweights=weights)
    ref_mean = np.average(np.moveaxis(x, (obs, var), (-2, -1)).astype(np.float64), axis=-2, weights=weights)
    assert result.mean.dtype == np.float64
    # Bound: mean_atol of the data's magnitude (n terms, a division; both sides), in float64.
    assert_close_each(result.mean, ref_mean, atol=mean_atol(np.abs(x).max(), x.shape[obs]))
    w = np.ones(x.shape[obs]) if weights is None else weights
    norm = w.sum() - ddof * (w @ w) / w.sum()
    if norm > 1e-3 * w.sum():  # well away from the degenerate normalisation
        moved = np.moveaxis(x, (obs, var), (-2, -1))
        work = np.float32 if ref_cov.dtype == np.float32 else np.float64  # the reference's own rounding
        assert_close(result.covariance(ddof), ref_cov, moved, weights, work, ddof)
    elif norm < 0:
        with pytest.raises(ValueError, match="leaves no degrees of freedom"):
            result.covariance(ddof)
    np.testing.assert_array_equal(x, x_before)


@given(st.integers(2, 12), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_one_observation_at_a_time_far_from_origin(n_obs, n_var, seed):
    x = np.random.default_rng(seed).normal(size=(n_obs, n_var, 2)) + 1e4
    moments = RunningMoments()
    for i in range(n_obs):
        moments.update(x[i : i + 1])
    assert_close(moments.covariance(0), batched_cov(x, ddof=0), np.moveaxis(x, (0, 1), (-2, -1)), ddof=0)


def test_counts_and_weight_sums():
    x = np.random.default_rng(0).normal(size=(5, 2))
    m = RunningMoments().update(x[:2]).update(x[2:], weights=[0.5, 2.0, 1.0])
    assert m.count == 5
    assert m.sum_weights == pytest.approx(2 + 3.5, rel=weight_sum_rtol(5), abs=0)
    assert m.sum_squared_weights == pytest.approx(2 + 0.25 + 4 + 1, rel=weight_sum_rtol(5), abs=0)
    # Unit weights for the first two: the same as aweights [1, 1, 0.5, 2, 1] in one go.
    ref = batched_cov(x, aweights=[1, 1, 0.5, 2, 1], ddof=1)
    assert_close(m.covariance(), ref, x, [1, 1, 0.5, 2, 1])


def test_zero_weight_update_counts_but_changes_nothing():
    x = np.random.default_rng(1).normal(size=(6, 3))
    m = RunningMoments().update(x[:4])
    before = m.state()
    m.update(x[4:], weights=[0.0, 0.0])
    assert m.count == 6
    assert m.sum_weights == before["sum_weights"]
    np.testing.assert_array_equal(m.mean, before["mean"])
    np.testing.assert_array_equal(m.centred_sums, before["centred_sums"])


def test_weights_and_input_are_not_modified():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 3))
    w = rng.uniform(size=5)
    x0, w0 = x.copy(), w.copy()
    RunningMoments().update(x, weights=w).update(x)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(w, w0)


def test_dtypes():
    x32 = np.random.default_rng(3).normal(size=(8, 3)).astype(np.float32)
    assert RunningMoments().update(x32).covariance().dtype == np.float64
    m32 = RunningMoments(dtype=np.float32).update(x32)
    assert m32.dtype == np.float32 and m32.covariance().dtype == np.float32
    # Bound: streaming_covariance_atol with float32's eps (the reference, np.cov, works in float64).
    assert_close(m32.covariance(), np.cov(x32, rowvar=False), x32, dtype=np.float32)
    assert RunningMoments().update(np.arange(12).reshape(4, 3)).dtype == np.float64
    xc = x32 + 1j * x32[::-1]
    assert_close(RunningMoments().update(xc[:3]).update(xc[3:]).covariance(), np.cov(xc, rowvar=False), xc)
    zc = np.random.default_rng(4).normal(size=(9, 3, 4)) * (1 + 2j) + 3j
    m = RunningMoments().update(zc[:4]).update(zc[4:], weights=np.linspace(0.5, 2, 5))
    merged = RunningMoments().update(zc[:2]).merge(RunningMoments().update(zc[2:4])).update(zc[4:], np.linspace(0.5, 2, 5))
    w = np.r_[np.ones(4), np.linspace(0.5, 2, 5)]
    assert_close(m.covariance(), batched_cov(zc, aweights=w), np.moveaxis(zc, (0, 1), (-2, -1)), w)
    assert_close(merged.covariance(), batched_cov(zc, aweights=w), np.moveaxis(zc, (0, 1), (-2, -1)), w)


def test_memory_budget_does_not_change_the_result():
    x = np.random.default_rng(4).normal(size=(9, 3, 4, 5)) + 50
    big = RunningMoments().update(x[:4]).update(x[4:])
    tiny = RunningMoments(memory_budget=1, workers=2).update(x[:4]).update(x[4:])
    tiny.merge(RunningMoments(memory_budget=1).update(x[:2]))
    big.merge(RunningMoments().update(x[:2]))
    # Bound: both stream the same 11 observations (offset 50) in other blocks: streaming_covariance_atol.
    assert_close(tiny.covariance(), big.covariance(), np.moveaxis(np.concatenate([x, x[:2]]), (0, 1), (-2, -1)))


def test_state_round_trip_and_views_are_read_only():
    x = np.random.default_rng(5).normal(size=(6, 2, 3))
    m = RunningMoments().update(x)
    state = m.state()
    assert set(state) == {"count", "sum_weights", "sum_squared_weights", "mean", "centred_sums", "mean_residual", "sum_squared_weights_exponent"}
    assert state["mean"].shape == (3, 2) and state["centred_sums"].shape == (3, 2, 2)
    rebuilt = RunningMoments.from_state(state)
    np.testing.assert_array_equal(rebuilt.covariance(), m.covariance())
    state["mean"][...] = 0  # a copy: the accumulator is unaffected
    np.testing.assert_array_equal(m.mean, rebuilt.mean)
    with pytest.raises(ValueError):
        m.mean[0, 0] = 1.0
    with pytest.raises(ValueError):
        m.centred_sums[0, 0, 0] = 1.0
    empty = RunningMoments.from_state(RunningMoments().state())
    assert empty.count == 0 and empty.batch_shape is None
    copied = m.copy().update(x)
    assert copied.count == 12 and m.count == 6
    as32 = RunningMoments.from_state(state, dtype=np.float32)
    assert as32.dtype == np.float32 and as32.copy().dtype == np.float32
    assert RunningMoments.from_state(RunningMoments(dtype=np.float32).update(x).state()).dtype == np.float64


def test_merge_with_empty_and_with_itself():
    x = np.random.default_rng(6).normal(size=(7, 3))
    m = RunningMoments().update(x)
    # Bound 0: merging with an empty accumulator copies the state.
    np.testing.assert_array_equal(RunningMoments().merge(m).covariance(), m.covariance())
    np.testing.assert_array_equal(m.copy().merge(RunningMoments()).covariance(), m.covariance())
    doubled = m.copy().merge(m.copy())
    twice = m.copy()
    twice.merge(twice)
    assert twice.count == 14
    x2 = np.concatenate([x, x])
    assert_close(twice.covariance(0), doubled.covariance(0), x2, ddof=0)
    assert_close(twice.covariance(0), batched_cov(x, ddof=0), x2, ddof=0)


def test_clear_errors():
    x = np.zeros((4, 3, 2))
    with pytest.raises(RuntimeError, match=r"before any data: call update\(x\) first"):
        RunningMoments().covariance()
    with pytest.raises(RuntimeError, match=r"mean is undefined before any data"):
        RunningMoments().mean
    with pytest.raises(ValueError, match=r"ddof=4 leaves no degrees of freedom.*count=4.*smaller ddof"):
        RunningMoments().update(x).covariance(ddof=4)
    with pytest.raises(RuntimeError, match=r"zero total weight"):
        RunningMoments().update(x, weights=np.zeros(4)).covariance()
    m = RunningMoments().update(x)
    with pytest.raises(ValueError, match=r"x has batch shape \(3,\) and 3 variables.*holds batch shape \(2,\)"):
        m.update(np.zeros((4, 3, 3)))
    with pytest.raises(ValueError, match=r"2 variables"):
        m.update(np.zeros((4, 2, 2)))
    with pytest.raises(ValueError, match=r"other has batch shape"):
        m.merge(RunningMoments().update(np.zeros((4, 3, 5))))
    with pytest.raises(TypeError, match=r"merge\(\) takes another RunningMoments"):
        m.merge(x)
    with pytest.raises(TypeError, match=r"is complex but this RunningMoments accumulates in float64"):
        m.update(np.zeros((4, 3, 2), dtype=complex))
    with pytest.raises(RuntimeError, match=r"incompatible numbers of samples and weights"):
        m.update(x, weights=np.ones(3))
    with pytest.raises(ValueError, match=r"weights cannot be negative"):
        m.update(x, weights=-np.ones(4))
    with pytest.raises(ValueError, match=r"obs_axis=0 and var_axis=-3 both refer to axis 0"):
        RunningMoments(0, -3).update(x)
    with pytest.raises(TypeError, match=r"var_axis must be an integer"):
        RunningMoments(0, "1")
    with pytest.raises(TypeError, match=r"dtype must be a floating or complex dtype"):
        RunningMoments(dtype=np.int64)
    with pytest.raises(ValueError, match=r"do not fit together"):
        RunningMoments.from_state(
            {"count": 1, "sum_weights": 1.0, "sum_squared_weights": 1.0, "mean": np.zeros(3), "centred_sums": np.zeros((2, 2))}
        )
    with pytest.raises(KeyError, match=r"missing"):
        RunningMoments.from_state({"count": 1})
    assert m.count == 4  # failed updates left the state alone


def test_update_temporaries_stay_within_the_memory_budget():
    import tracemalloc

    x = np.random.default_rng(12).normal(size=(100, 16, 8, 16)).astype(np.float32)
    moments = RunningMoments(memory_budget=2**19, workers=1).update(x[:10])  # state allocated here
    tracemalloc.start()
    try:
        moments.update(x[10:])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**19 + 2**17
