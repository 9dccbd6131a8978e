"""Fault injection for the NumPy core (issue 11, points 5, 11, 12): location-free streaming, state hygiene,
weights of any scale and dask parity.

Error bounds come from tests/_tolerances.py or are derived next to each assertion. The recurring argument:
the covariance does not depend on the data's location, and ``x - x[0]`` is computed exactly far from the
origin (both operands within a factor 2: Sterbenz's lemma), so a reference computed from the shifted data
by an independent route (``numpy.cov`` item by item) carries only the rounding of numbers of the size of
the data's spread ``s``. A location-free accumulator does the same, so the two agree to
``tests._tolerances.streaming_covariance_atol`` *evaluated on the shifted data*: ``eps·sqrt(n)``-order
relative to the covariance, whatever the offset. (The plain pairwise update's means carry
``eps·|offset|`` each, which does not cancel in their differences: ``eps·|offset|/s`` relative, 2.6e-9 at
an offset of 1e8 s, which these tests reject.)
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import anomstats
from anomstats import GaussianKDE, MultiVariateGaussian, RunningMoments, batched_cov
from anomstats._validation import check_positive_int
from tests._tolerances import TWO_SIDES, assert_close_each, eps, streaming_covariance_atol

EPS64 = float(np.finfo(np.float64).eps)

#: The issue's promise: any split into updates and merges equals the one-shot result to 1e-12 relative (float64)
#: at offsets up to 1e8 standard deviations.
PROMISED_RTOL = 1e-12


def _per_item_reference(x: np.ndarray, weights=None, ddof: int = 1) -> np.ndarray:
    """Covariances of ``x`` laid out ``(*batch, n, c)`` by ``numpy.cov`` item by item, from the data shifted
    by their first observation (exact far from the origin; the covariance is shift invariant)."""
    shifted = x - x[..., :1, :]
    flat = shifted.reshape(-1, *x.shape[-2:])
    out = [np.cov(item, rowvar=False, ddof=ddof, aweights=weights) for item in flat]
    return np.stack(out).reshape(*x.shape[:-2], x.shape[-1], x.shape[-1]), shifted


def _split_stream(x, bounds, groups, merge_seed, make, feed):
    """Feed ``x`` (observations on axis 0) in pieces to accumulators picked by ``groups``, then merge them in a
    random tree; returns the merged accumulator."""
    accumulators = {}
    for (start, stop), group in zip(bounds, groups):
        if stop > start:
            feed(accumulators.setdefault(group, make()), x[start:stop], start, stop)
    pool = list(accumulators.values())
    order = np.random.default_rng(merge_seed)
    while len(pool) > 1:
        i, j = sorted(order.choice(len(pool), size=2, replace=False))
        right = pool.pop(j)
        pool[i].merge(right)
    return pool[0]


@st.composite
def far_streams(draw, min_obs: int = 4, max_obs: int = 40):
    """Data at an offset up to 1e8 standard deviations, a split into updates and a grouping into accumulators."""
    n = draw(st.integers(min_obs, max_obs))
    c = draw(st.integers(1, 4))
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = 10.0 ** draw(st.integers(-3, 3))
    offset = draw(st.sampled_from([0.0, 1e3, 1e6, 1e8])) * scale * draw(st.sampled_from([1.0, -1.0]))
    z = rng.normal(size=(n, c, *batch))
    z[:, -1] += 0.5 * z[:, 0]  # correlated variables
    x = z * scale + offset
    cuts = sorted(draw(st.lists(st.integers(1, n - 1), max_size=6)))
    bounds = list(zip([0, *cuts], [*cuts, n]))
    groups = draw(st.lists(st.integers(0, 3), min_size=len(bounds), max_size=len(bounds)))
    weights = rng.uniform(0.2, 3.0, size=n) if draw(st.booleans()) else None
    return x, bounds, groups, draw(st.integers(0, 2**16)), weights


# ------------------------------------------------------------------------------------------------- point 5


@settings(max_examples=40)
@given(far_streams(), st.sampled_from([0, 1]))
def test_running_moments_any_split_far_from_origin_equals_the_one_shot_result(problem, ddof):
    x, bounds, groups, merge_seed, weights = problem

    def feed(acc, piece, start, stop):
        acc.update(piece, None if weights is None else weights[start:stop])

    merged = _split_stream(x, bounds, groups, merge_seed, lambda: RunningMoments(memory_budget=600), feed)
    view = np.moveaxis(x, (0, 1), (-2, -1))
    ref, shifted = _per_item_reference(view, weights, ddof)
    got = merged.covariance(ddof)
    # Bound: streaming_covariance_atol of the *shifted* data (location-free: the means and their
    # differences round relative to max|x - x0| <= 2 max|x - mean|, not to |offset|); it covers both
    # sides (TWO_SIDES) and the streamed means' rounding.
    assert_close_each(got, ref, atol=streaming_covariance_atol(shifted, weights, ddof=ddof))
    # The promise, normwise: (sqrt(40) + 3) eps times a few stays below 1e-12 of the largest entry.
    assert np.abs(got - ref).max() <= PROMISED_RTOL * np.abs(ref).max()
    one_shot = batched_cov(x, ddof=ddof, aweights=weights)
    assert np.abs(got - one_shot).max() <= PROMISED_RTOL * np.abs(ref).max()
    # The mean (hi + lo) is the weighted mean to the rounding of the shifted data's mean: (sqrt(n) + 2) eps
    # of max|x - x0| (both sides), plus the rounding of the reference's final addition of x0 (eps |mean|).
    mean = merged.mean + merged.mean_residual
    ref_mean = np.average(shifted, axis=-2, weights=weights) + view[..., 0, :]
    atol = TWO_SIDES * (np.sqrt(x.shape[0]) + 2) * EPS64 * np.abs(shifted).max(axis=-2) + EPS64 * np.abs(ref_mean)
    assert_close_each(mean, ref_mean, atol=atol)


def test_far_offsets_lose_nothing_against_the_reported_case():
    """The issue's case: data offset by 1e8 standard deviations fed in 10 updates (was 2.6e-9 relative)."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(200, 6, 5)) + 1e8
    moments = RunningMoments()
    for piece in np.array_split(x, 10):
        moments.update(piece)
    ref, shifted = _per_item_reference(np.moveaxis(x, (0, 1), (-2, -1)))
    # Bound: as above (location-free streaming against numpy.cov of the exactly shifted data).
    assert_close_each(moments.covariance(), ref, atol=streaming_covariance_atol(shifted))
    assert np.abs(moments.covariance() - ref).max() <= PROMISED_RTOL * np.abs(ref).max()


def test_merging_accumulators_with_different_shifts_is_exact():
    """Each accumulator shifts by its own first observation; merging must not depend on a common shift."""
    rng = np.random.default_rng(12)
    x = rng.normal(size=(60, 3, 2)) * 1e-3 + 1e5  # offset 1e8 standard deviations
    parts = [RunningMoments().update(piece) for piece in np.array_split(x, 6)]
    shifts = {tuple(np.round(p.mean[0], 9)) for p in parts}
    assert len(shifts) == 6  # the parts really have different means (and shifts)
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(part)
    ref, shifted = _per_item_reference(np.moveaxis(x, (0, 1), (-2, -1)))
    # Bound: streaming_covariance_atol of the shifted data (see the module notes).
    assert_close_each(merged.covariance(), ref, atol=streaming_covariance_atol(shifted))


def test_restart_from_state_mid_stream_is_bit_exact_far_from_origin():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(40, 3, 2)) + 1e8
    straight = RunningMoments(workers=1).update(x[:15]).update(x[15:30])
    resumed = RunningMoments.from_state(straight.state(), workers=1)
    straight.update(x[30:])
    resumed.update(x[30:])
    # Bound 0: the state holds the exact mean as mean + mean_residual, so the resumed accumulator runs the
    # same operations on the same numbers.
    np.testing.assert_array_equal(resumed.covariance(), straight.covariance())
    np.testing.assert_array_equal(resumed.mean, straight.mean)
    np.testing.assert_array_equal(resumed.mean_residual, straight.mean_residual)


def test_old_states_without_the_new_keys_still_load():
    x = np.random.default_rng(14).normal(size=(8, 3))
    state = RunningMoments().update(x).state()
    old = {k: state[k] for k in ("count", "sum_weights", "sum_squared_weights", "mean", "centred_sums")}
    rebuilt = RunningMoments.from_state(old)
    # Bound: dropping mean_residual moves the mean by at most half an ulp of it, which enters the covariance
    # only when more data come; the covariance itself is the stored sums over the same normalisation.
    np.testing.assert_array_equal(rebuilt.covariance(), RunningMoments.from_state(state).covariance())
    np.testing.assert_array_equal(rebuilt.mean_residual, np.zeros(3))


@st.composite
def far_embeddings(draw):
    n = draw(st.integers(12, 40))
    c = draw(st.integers(1, 3))
    p = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = 10.0 ** draw(st.integers(-2, 2))
    offset = draw(st.sampled_from([0.0, 1e4, 1e8])) * scale
    x = rng.normal(size=(n, c, p)) * scale + offset
    cuts = sorted(draw(st.lists(st.integers(1, n - 1), max_size=5)))
    bounds = list(zip([0, *cuts], [*cuts, n]))
    groups = draw(st.lists(st.integers(0, 2), min_size=len(bounds), max_size=len(bounds)))
    return x, bounds, groups, draw(st.integers(0, 2**16))


def _streamed_model(x, bounds, groups, merge_seed, **kwargs):
    def feed(model, piece, start, stop):
        model.partial_fit(piece)

    return _split_stream(x, bounds, groups, merge_seed, lambda: MultiVariateGaussian(**kwargs), feed)


@settings(max_examples=25)
@given(far_embeddings())
def test_partial_fit_dense_any_split_far_from_origin(problem):
    x, bounds, groups, merge_seed = problem
    model = _streamed_model(x, bounds, groups, merge_seed, ridge=0.0, store_covariance=True)
    ref, shifted = _per_item_reference(np.moveaxis(x, (0, 1), (-2, -1)))
    # Bound: the streamed covariance against numpy.cov of the exactly shifted data, streaming_covariance_atol
    # of the shifted data (ridge 0: the stored covariance is the scaled sums, one more rounding, within it).
    assert_close_each(model.covariance, ref, atol=streaming_covariance_atol(shifted))
    assert np.abs(model.covariance - ref).max() <= PROMISED_RTOL * np.abs(ref).max()


@settings(max_examples=25)
@given(far_embeddings())
def test_partial_fit_ledoit_wolf_any_split_far_from_origin(problem):
    """The augmented moments (||x - K||^2, x - K) around a fixed centre K keep the fourth moments too."""
    x, bounds, groups, merge_seed = problem
    model = _streamed_model(x, bounds, groups, merge_seed, ridge=0.0, shrinkage="ledoit-wolf", store_covariance=True)
    reference = MultiVariateGaussian(ridge=0.0, shrinkage="ledoit-wolf", store_covariance=True).fit(x - x[:1])
    # Bound: the moments are location-free to ~(sqrt(n) + 3) eps relative (as above); the shrinkage
    # coefficient is a ratio of sums of them: beta = (sum ||x - mu||^4 / n - ||S||_F^2) / (C n) loses at most a
    # factor 4 (for Gaussian data the fourth moment is (C + 2) times ||S||_F^2 / C, no cancellation), and
    # delta = ||S - m I||_F^2 cancels by about ||S||_F^2 / delta ~ n / C <= 40. So the shrunk covariance is
    # within 4 * 40 * (sqrt(40) + 3) eps ~ 3e-13 of the reference, normwise: the promised 1e-12 covers it.
    # (The plain augmented vector (||x||^2, x) was off by 380% at offset 1e8.)
    assert np.abs(model.covariance - reference.covariance).max() <= PROMISED_RTOL * np.abs(reference.covariance).max()
    np.testing.assert_allclose(model.shrinkage_, reference.shrinkage_, rtol=PROMISED_RTOL, atol=PROMISED_RTOL)


@settings(max_examples=20)
@given(far_embeddings())
def test_partial_fit_low_rank_any_split_far_from_origin(problem):
    x, bounds, groups, merge_seed = problem
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "no advantage" when N > C: irrelevant here
        model = _streamed_model(x, bounds, groups, merge_seed, ridge=1.0, form="low_rank")
        reference = MultiVariateGaussian(ridge=1.0, form="low_rank").fit(x - x[:1])
        got, expected = model.covariance, reference.covariance
    # Bound: the scatter factor's columns (centred observations, correction columns) are location-free to
    # (sqrt(n) + 3) eps relative; the basis and eigenvalues add low_rank_backward_error's max(2 max(n, C),
    # 256) eps of the covariance's norm: 256 eps + 80 eps ~ 7.5e-14, within the promised 1e-12.
    assert np.abs(got - expected).max() <= PROMISED_RTOL * np.abs(expected).max()
    # The mean: shift + offset, both sides within (sqrt(n) + 2) eps of max|x - x0| (+ one rounding of x0).
    ref_mean = (x - x[:1]).mean(axis=0) + x[0]
    atol = TWO_SIDES * (np.sqrt(x.shape[0]) + 2) * EPS64 * np.abs(x - x[:1]).max(axis=0) + EPS64 * np.abs(ref_mean)
    assert_close_each(model.mean, ref_mean, atol=atol)


def test_partial_fit_low_memory_far_from_origin():
    x = np.random.default_rng(15).normal(size=(200, 6, 5)) + 1e8
    model = MultiVariateGaussian(ridge=0.0, low_memory=True, dtype=np.float64)
    for piece in np.array_split(x, 10):
        model.partial_fit(piece)
    reference = MultiVariateGaussian(ridge=0.0).fit(x - x[:1])
    # Bound: as for the dense accumulator; the precision adds the covariance's condition number (< 10 for
    # these draws, n / C > 30: Marchenko-Pastur), still far below 1e-12.
    assert np.abs(model.precision - reference.precision).max() <= PROMISED_RTOL * np.abs(reference.precision).max()


# ------------------------------------------------------------------------------------------------ point 11

_GOOD = {"count": 4, "sum_weights": 4.0, "sum_squared_weights": 4.0, "mean": np.zeros((2, 3)),
         "centred_sums": np.tile(np.eye(3), (2, 1, 1))}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"count": -1}, "count"),
        ({"count": 2.5}, "count"),
        ({"count": True}, "count"),
        ({"count": "4"}, "count"),
        ({"sum_weights": -1.0}, "sum_weights"),
        ({"sum_weights": np.nan}, "sum_weights"),
        ({"sum_weights": np.inf}, "sum_weights"),
        ({"sum_squared_weights": -2.0}, "sum_squared_weights"),
        ({"sum_squared_weights": 17.0}, "sum_squared_weights"),  # > (sum w)^2 = 16
        ({"sum_squared_weights": 3.0}, "sum_squared_weights"),  # < (sum w)^2 / count = 4
        ({"sum_squared_weights": 0.0}, "sum_squared_weights"),  # squares sum to 0 but weights do not
        ({"sum_squared_weights_exponent": 3}, "sum_squared_weights_exponent"),
        ({"mean": np.full((2, 3), np.nan)}, "mean"),
        ({"centred_sums": np.full((2, 3, 3), np.inf)}, "centred_sums"),
        ({"centred_sums": -np.tile(np.eye(3), (2, 1, 1))}, "centred_sums"),
        ({"mean_residual": np.zeros((2, 2))}, "mean_residual"),
        ({"mean_residual": np.full((2, 3), np.nan)}, "mean_residual"),
        ({"centred_sums": np.zeros((2, 3, 2))}, "centred_sums"),
        ({"mean": None, "centred_sums": None}, "mean"),
        ({"count": 0, "sum_weights": 0.0, "sum_squared_weights": 0.0}, "count=0"),
        ({"count": 0}, "count=0"),
    ],
)
def test_from_state_refuses_impossible_states_naming_the_field(change, field):
    state = {**_GOOD, **change}
    with pytest.raises(ValueError, match=re.escape(field)):
        RunningMoments.from_state(state)
    RunningMoments.from_state(_GOOD)  # the unchanged state is fine


@pytest.mark.parametrize("value", [True, np.True_, 2.5, 4.0, "4", -1, np.int64(-3)])
def test_a_state_count_gets_the_integer_rule_of_every_count(value):
    # One integer rule (anomstats._validation.check_integer): not bool, any integer type, a lower bound. A
    # saved state's count raises ValueError for every fault (a bad state); an argument's count TypeError for
    # the wrong type (fold_every, memory_budget, workers), with the same wording.
    bad_type = isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer))
    shown = repr(value) if bad_type else str(int(value))
    with pytest.raises(ValueError) as state_error:
        RunningMoments.from_state({**_GOOD, "count": value})
    assert str(state_error.value) == f"state['count'] must be a non-negative integer, got {shown}"
    with pytest.raises(TypeError if bad_type else ValueError) as error:
        check_positive_int(value, "fold_every")
    assert str(error.value) == f"fold_every must be a positive integer, got {shown}"
    assert RunningMoments.from_state({**_GOOD, "count": np.int64(4)}).count == 4


def test_from_state_accepts_every_state_it_produces():
    rng = np.random.default_rng(16)
    x = rng.normal(size=(9, 2, 3)) + 1e8
    for moments in (
        RunningMoments().update(x),
        RunningMoments().update(x, weights=rng.uniform(0, 1e-200, size=9)),
        RunningMoments().update(x, weights=rng.uniform(0, 1e200, size=9)).update(x[:1]),
        RunningMoments().update(x[:3], weights=np.zeros(3)),
        RunningMoments().update(x[:0]),
        RunningMoments(),
    ):
        state = moments.state()
        rebuilt = RunningMoments.from_state(state)
        assert rebuilt.state().keys() == state.keys()
        for key, value in state.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(rebuilt.state()[key], value)  # bound 0: a copy
            else:
                assert rebuilt.state()[key] == value


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.complex128])
def test_update_refuses_non_finite_batches_and_keeps_its_state(bad, dtype):
    rng = np.random.default_rng(17)
    x = rng.normal(size=(6, 3, 2)).astype(dtype)
    moments = RunningMoments(dtype=np.complex128 if dtype == np.complex128 else None).update(x)
    before = moments.state()
    batch = x.copy()
    batch[4, 2, 1] = bad
    batch[5, 0, 0] = bad
    expected = ("x contains non-finite values (NaN or infinity) (first at index (4, 2, 1)); remove or "
                "replace the NaN or infinite values before updating")
    with pytest.raises(ValueError, match=re.escape(expected)):
        moments.update(batch)
    with pytest.raises(ValueError, match=re.escape(expected)):
        RunningMoments().update(batch)  # also as the first update
    after = moments.state()
    for key in before:  # bound 0: a refused batch changes nothing
        np.testing.assert_array_equal(after[key], before[key])
    assert moments.count == 6


def test_update_accepts_finite_data_whose_sum_overflows():
    """The cheap finiteness check (a sum) overflows for float32 data near its largest value: not refused."""
    x = np.full((4, 2), 3e38, dtype=np.float32)
    x[::2] *= -1
    moments = RunningMoments().update(x)  # accumulated in float64: the covariance is representable
    assert np.isfinite(moments.covariance()).all()


def _weighted_problem():
    rng = np.random.default_rng(18)
    return rng.normal(size=(12, 3, 2)) + 5.0, rng.uniform(0.5, 2.0, size=12)


@pytest.mark.parametrize("scale", [2.0**664, 2.0**-664, 2.0**1000, 2.0**-1000])
def test_weighted_results_are_invariant_to_power_of_two_rescaling(scale):
    """Scaling by a power of two is exact; the library evaluates every weight formula on weights rescaled by a
    power of two into range, so the results are the same bit for bit, even where sum(w^2) would overflow
    (2**664 ~ 1e200) or underflow (2**-664)."""
    x, w = _weighted_problem()
    ref_bc = batched_cov(x, aweights=w)
    np.testing.assert_array_equal(batched_cov(x, aweights=w * scale), ref_bc)
    ref = RunningMoments().update(x[:5], w[:5]).update(x[5:], w[5:])
    got = RunningMoments().update(x[:5], w[:5] * scale).update(x[5:], w[5:] * scale)
    merged = RunningMoments().update(x[:5], w[:5] * scale).merge(RunningMoments().update(x[5:], w[5:] * scale))
    for ddof in (0, 1, 2):
        np.testing.assert_array_equal(got.covariance(ddof), ref.covariance(ddof))
        np.testing.assert_array_equal(merged.covariance(ddof), RunningMoments().update(x[:5], w[:5]).merge(
            RunningMoments().update(x[5:], w[5:])).covariance(ddof))
    np.testing.assert_array_equal(got.mean, ref.mean)


@pytest.mark.parametrize("scale", [1e200, 1e-200])
def test_weighted_results_are_invariant_to_extreme_rescaling(scale):
    """×1e200 used to raise "no degrees of freedom" (sum(w^2) overflowed); ×1e-200 silently dropped ddof."""
    x, w = _weighted_problem()
    view = np.moveaxis(x, (0, 1), (-2, -1))
    ref = batched_cov(x, aweights=w)
    # Bound: w * scale rounds each weight (relative eps); the covariance is homogeneous of degree 0 in the
    # weights, so it moves by at most 2 eps (numerator and normalisation) of the weighted magnitudes, which
    # streaming_covariance_atol's first-order term (sqrt(n) + 3) eps already exceeds; both sides: its bound.
    atol = streaming_covariance_atol(view, w)
    assert_close_each(batched_cov(x, aweights=w * scale), ref, atol=atol)
    moments = RunningMoments().update(x[:5], w[:5] * scale).update(x[5:], w[5:] * scale)
    assert_close_each(moments.covariance(), ref, atol=atol)
    assert moments.sum_weights == pytest.approx(w.sum() * scale, rel=4 * np.sqrt(12) * EPS64)


def test_dof_error_with_extreme_weights_reports_the_true_normalisation():
    moments = RunningMoments().update(np.ones((1, 2)), weights=[1e200])
    with pytest.raises(ValueError, match=r"ddof=2 leaves no degrees of freedom: .* is -1e\+200 with count=1"):
        moments.covariance(ddof=2)


def test_numpy_exact_cov_keeps_numpys_behaviour_for_extreme_weights():
    """Documented in anomstats.cov: the numpy drop-in follows numpy, overflow and all."""
    x, w = _weighted_problem()
    data = x[:, :, 0].T
    for scale in (1e200, 1e-200):
        with warnings.catch_warnings(record=True) as ours:
            warnings.simplefilter("always")
            got = anomstats.cov(data, aweights=w * scale)
        with warnings.catch_warnings(record=True) as theirs:
            warnings.simplefilter("always")
            expected = np.cov(data, aweights=w * scale)
        np.testing.assert_array_equal(got, expected)  # bound 0: numpy's operations in numpy's order
        assert [(a.category, str(a.message)) for a in ours] == [(b.category, str(b.message)) for b in theirs]


# ------------------------------------------------------------------------------------------------ point 12

try:
    import dask
    import dask.array as da
except ImportError:  # pragma: no cover - dask is the optional extra anomstats[dask]
    dask = da = None

needs_dask = pytest.mark.skipif(dask is None, reason="dask is not installed (anomstats[dask])")


def _outcome(call, arg):
    """What a call does: ("raises", type, message) or ("returns", value), with the warnings it gives."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = call(arg)
            if hasattr(value, "compute"):
                value = value.compute()
            result = ("returns", value)
        except Exception as error:  # noqa: BLE001 - the fault's exception is what is compared
            result = ("raises", type(error), str(error))
    seen = sorted({(w.category.__name__, str(w.message)) for w in caught})
    return result, seen


def _summary(value):
    if isinstance(value, RunningMoments):
        return value.covariance() if value.count else np.array(value.count)
    if isinstance(value, MultiVariateGaussian):
        return value.mean if value.n_samples_seen_ >= 2 else np.array(value.n_samples_seen_)
    return np.asarray(value)


_RNG = np.random.default_rng(19)
_X = _RNG.normal(size=(10, 3, 2))
_NAN = _X.copy()
_NAN[7, 2, 1] = np.nan
_INF = _X.copy()
_INF[3, 0, 0] = -np.inf
_MODEL = MultiVariateGaussian().fit(_X)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # "no advantage": N > C here
    _LOW_RANK = MultiVariateGaussian(form="low_rank", ridge=1.0).fit(_X)
_KDE = GaussianKDE(_RNG.normal(size=(2, 30)))
_Q = _RNG.normal(size=(2, 9))
_QNAN = _Q.copy()
_QNAN[1, 6] = np.nan

# (name, call, in-memory input, dask chunks)
PARITY_CASES = [
    ("batched_cov ddof > N warns", lambda v: batched_cov(v, ddof=20), _X, (4, 3, 2)),
    ("batched_cov one observation warns", lambda v: batched_cov(v), _X[:1], (1, 3, 2)),
    ("batched_cov empty input warns", lambda v: batched_cov(v), _X[:0], (1, 3, 2)),
    ("batched_cov empty input ddof=0", lambda v: batched_cov(v, ddof=0), _X[:0], (1, 3, 2)),
    ("batched_cov negative ddof", lambda v: batched_cov(v, ddof=-1), _X, (4, 3, 2)),
    ("batched_cov NaN passes like numpy", lambda v: batched_cov(v), _NAN, (4, 3, 2)),
    ("batched_cov zero-sum weights", lambda v: batched_cov(v, aweights=np.zeros(10)), _X, (4, 3, 2)),
    ("batched_cov negative weights", lambda v: batched_cov(v, aweights=-np.ones(10)), _X, (4, 3, 2)),
    ("batched_cov NaN weights", lambda v: batched_cov(v, aweights=np.full(10, np.nan)), _X, (4, 3, 2)),
    ("batched_cov wrong number of weights", lambda v: batched_cov(v, aweights=np.ones(9)), _X, (4, 3, 2)),
    ("batched_cov weights x1e200", lambda v: batched_cov(v, aweights=np.linspace(1, 2, 10) * 1e200), _X, (4, 3, 2)),
    ("batched_cov ddof 1.5", lambda v: batched_cov(v, ddof=1.5), _X, (4, 3, 2)),
    ("batched_cov 1-d input", lambda v: batched_cov(v), _X[:, 0, 0], (4,)),
    ("batched_cov same axes", lambda v: batched_cov(v, obs_axis=1, var_axis=1), _X, (4, 3, 2)),
    ("batched_cov integer dtype", lambda v: batched_cov(v, dtype=np.int64), _X, (4, 3, 2)),
    ("RunningMoments NaN refused", lambda v: RunningMoments().update(v), _NAN, (3, 3, 2)),
    ("RunningMoments -inf refused", lambda v: RunningMoments().update(v), _INF, (3, 3, 2)),
    ("RunningMoments one observation", lambda v: RunningMoments().update(v).covariance(), _X[:1], (1, 3, 2)),
    ("RunningMoments empty", lambda v: RunningMoments().update(v), _X[:0], (1, 3, 2)),
    ("RunningMoments ddof > N raises", lambda v: RunningMoments().update(v).covariance(ddof=20), _X, (4, 3, 2)),
    ("RunningMoments zero weights", lambda v: RunningMoments().update(v, np.zeros(10)).covariance(), _X, (4, 3, 2)),
    ("RunningMoments negative weights", lambda v: RunningMoments().update(v, -np.ones(10)), _X, (4, 3, 2)),
    ("RunningMoments weights x1e-200", lambda v: RunningMoments().update(v, np.linspace(1, 2, 10) * 1e-200),
     _X, (4, 3, 2)),
    ("RunningMoments 1-d input", lambda v: RunningMoments().update(v), _X[:, 0, 0], (4,)),
    ("RunningMoments bad axis", lambda v: RunningMoments(0, 5).update(v), _X, (4, 3, 2)),
    ("RunningMoments batch mismatch", lambda v: RunningMoments().update(_X[:3]).update(v), _X[:, :2], (4, 2, 2)),
    ("RunningMoments complex into real", lambda v: RunningMoments().update(_X[:3]).update(v), _X + 1j, (4, 3, 2)),
    ("RunningMoments text", lambda v: RunningMoments().update(v), np.array([["a", "b"], ["c", "d"]]), (1, 2)),
    ("fit NaN", lambda v: MultiVariateGaussian().fit(v), _NAN, (3, 3, 2)),
    ("fit low_memory NaN", lambda v: MultiVariateGaussian(low_memory=True).fit(v), _NAN, (3, 3, 2)),
    ("fit low_rank inf", lambda v: MultiVariateGaussian(form="low_rank", ridge=1.0).fit(v), _INF, (3, 3, 2)),
    ("fit one observation", lambda v: MultiVariateGaussian().fit(v), _X[:1], (1, 3, 2)),
    ("fit empty", lambda v: MultiVariateGaussian().fit(v), _X[:0], (1, 3, 2)),
    ("fit complex", lambda v: MultiVariateGaussian().fit(v), _X + 1j, (4, 3, 2)),
    ("fit 1-d", lambda v: MultiVariateGaussian().fit(v), _X[:, 0, 0], (4,)),
    ("partial_fit NaN", lambda v: MultiVariateGaussian().partial_fit(v), _NAN, (3, 3, 2)),
    ("partial_fit empty", lambda v: MultiVariateGaussian().partial_fit(v), _X[:0], (1, 3, 2)),
    ("partial_fit one observation", lambda v: MultiVariateGaussian().partial_fit(v), _X[:1], (1, 3, 2)),
    ("partial_fit after fit", lambda v: MultiVariateGaussian().fit(_X).partial_fit(v), _X, (4, 3, 2)),
    ("partial_fit shape mismatch", lambda v: MultiVariateGaussian().partial_fit(_X[:3]).partial_fit(v),
     _X[:, :2], (4, 2, 2)),
    ("partial_fit low_rank NaN", lambda v: MultiVariateGaussian(form="low_rank", ridge=1.0).partial_fit(v),
     _NAN, (3, 3, 2)),
    ("partial_fit low_memory inf", lambda v: MultiVariateGaussian(low_memory=True).partial_fit(v), _INF, (3, 3, 2)),
    ("fit ledoit-wolf NaN", lambda v: MultiVariateGaussian(shrinkage="ledoit-wolf").fit(v), _NAN, (3, 3, 2)),
    ("low_rank mahalanobis NaN query", lambda v: _LOW_RANK.mahalanobis(v), _NAN, (3, 3, 2)),
    ("mahalanobis NaN query", lambda v: _MODEL.mahalanobis(v), _NAN, (3, 3, 2)),
    ("logpdf inf query", lambda v: _MODEL.logpdf(v), _INF, (3, 3, 2)),
    ("mahalanobis wrong shape", lambda v: _MODEL.mahalanobis(v), _X[:, :2], (4, 2, 2)),
    ("mahalanobis empty", lambda v: _MODEL.mahalanobis(v), _X[:0], (1, 3, 2)),
    ("kde NaN point", lambda v: _KDE.pdf(v), _QNAN, (2, 4)),
    ("kde logpdf NaN point", lambda v: _KDE.logpdf(v), _QNAN, (2, 4)),
    ("kde wrong dimension", lambda v: _KDE.pdf(v), np.ones((3, 4)), (3, 2)),
    ("kde no points", lambda v: _KDE.pdf(v), _Q[:, :0], (2, 1)),
]


@needs_dask
@pytest.mark.parametrize("name, call, data, chunks", PARITY_CASES, ids=[case[0] for case in PARITY_CASES])
def test_dask_input_gives_the_in_memory_outcome(name, call, data, chunks):
    """One bad value at most per array (several bad queries: lazy scoring names the first of the block that
    fails first, see anomstats._dask)."""
    with dask.config.set(scheduler="synchronous"):
        expected, expected_warnings = _outcome(call, data)
        got, got_warnings = _outcome(call, da.from_array(data, chunks=chunks))
    assert got_warnings == expected_warnings
    assert got[0] == expected[0], (got, expected)
    if expected[0] == "raises":
        assert got[1:] == expected[1:]
        return
    value, reference = _summary(got[1]), _summary(expected[1])
    assert value.shape == reference.shape and value.dtype == reference.dtype
    # The same non-finite pattern (inf/nan of a degenerate normalisation, NaN data): bound 0.
    np.testing.assert_array_equal(np.isnan(value), np.isnan(reference))
    np.testing.assert_array_equal(np.isposinf(value), np.isposinf(reference))
    finite = np.isfinite(reference)
    # Finite values: two location-free computations of moments of O(1) data with n <= 10 (dask merges
    # chunks): each within (sqrt(10) + 3) eps of the largest magnitude, times a few (normalisation,
    # merges): 1e-13 of the largest finite entry covers both sides with room; a wrong chunk merge is O(1).
    scale = np.abs(reference[finite]).max() if finite.any() else 0.0
    assert np.abs(value[finite] - reference[finite]).max(initial=0.0) <= 1e-13 * scale


@needs_dask
def test_dask_update_refusal_leaves_the_state_alone():
    moments = RunningMoments().update(_X[:4])
    before = moments.state()
    with dask.config.set(scheduler="synchronous"), pytest.raises(ValueError, match=r"first at index \(7, 2, 1\)"):
        moments.update(da.from_array(_NAN, chunks=(3, 3, 2)))
    for key in before:  # bound 0
        np.testing.assert_array_equal(moments.state()[key], before[key])


@needs_dask
def test_dask_scores_name_the_query_by_its_position_in_the_whole_array():
    queries = _X.copy()
    queries[8, 1, 1] = np.nan
    with pytest.raises(ValueError) as in_memory:
        _MODEL.mahalanobis(queries)
    lazy = _MODEL.mahalanobis(da.from_array(queries, chunks=(3, 3, 2)))
    with dask.config.set(scheduler="synchronous"), pytest.raises(ValueError) as from_dask:
        lazy.compute()
    assert str(from_dask.value) == str(in_memory.value)
    assert "8" in str(in_memory.value)  # the block-relative index would be 2
