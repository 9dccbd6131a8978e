"""anomstats.cov / anomstats.corrcoef against numpy.cov / numpy.corrcoef.

Every comparison runs both libraries on independent deep copies of the same arguments and checks
the whole observable outcome: the result's Python type, dtype, shape and values, or else the
exception's type and message; and the list of warnings (category and text, in order).
"""

from __future__ import annotations

import copy
import warnings
from fractions import Fraction
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import anomstats
from anomstats._weights import as_analytic_weights, as_frequency_weights
from tests._tolerances import assert_close_each, covariance_atol

PAIRS = {"cov": (np.cov, anomstats.cov), "corrcoef": (np.corrcoef, anomstats.corrcoef)}


# ----------------------------------------------------------------------------- comparison helpers
def outcome(func: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[Any, Any, list]:
    """Run ``func``; return (result or None, (exc type, message) or None, [(category, text)])."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result, error = func(*args, **kwargs), None
        except Exception as exc:  # noqa: BLE001 - we compare whatever numpy raises
            result, error = None, (type(exc), str(exc))
    return result, error, [(w.category, str(w.message)) for w in caught]


def assert_same_outcome(name: str, *args: Any, **kwargs: Any) -> Any:
    """Assert that numpy and anomstats behave identically on ``args``/``kwargs``; return result."""
    reference, ours = PAIRS[name]
    expected, expected_error, expected_warnings = outcome(
        reference, copy.deepcopy(args), copy.deepcopy(kwargs)
    )
    actual, actual_error, actual_warnings = outcome(ours, copy.deepcopy(args), copy.deepcopy(kwargs))
    assert actual_error == expected_error
    assert actual_warnings == expected_warnings
    if expected_error is not None:
        return None
    assert type(actual) is type(expected)
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    if expected.dtype == object:
        expected, actual = expected.astype(complex), actual.astype(complex)
    # Bound 0: anomstats.cov / corrcoef run numpy's algorithm operation for operation (the same
    # np.average, the same np.dot of the same arrays, the same normaliser and divisions), so on any machine
    # both sides round identically; equal NaN / inf patterns included.
    np.testing.assert_array_equal(actual, expected)
    return actual


# ----------------------------------------------------------------------------- hypothesis strategies
REAL_DTYPES = [np.float64, np.float32, np.float16, np.longdouble, np.int64, np.int8, np.uint16, np.bool_]
COMPLEX_DTYPES = [np.complex128, np.complex64]
RESULT_DTYPES = [None, None, None, np.float64, np.float32, np.longdouble, np.complex128, "f8"]


@st.composite
def data_arrays(draw: st.DrawFn, shape: tuple[int, ...]) -> np.ndarray:
    """An array of ``shape`` in a drawn dtype; values far from the origin now and then."""
    dtype = draw(st.sampled_from(REAL_DTYPES + COMPLEX_DTYPES))
    if dtype is np.bool_:
        return draw(hnp.arrays(np.bool_, shape))
    if np.issubdtype(dtype, np.integer):
        return draw(hnp.arrays(dtype, shape, elements=st.integers(0, 100)))
    finite = st.floats(-1e3, 1e3, width=16 if dtype is np.float16 else 32)
    values = draw(hnp.arrays(np.float64, shape, elements=finite))
    values = values + draw(st.sampled_from([0.0, 0.0, 100.0, -1e4]))
    if np.issubdtype(dtype, np.complexfloating):
        values = values + 1j * draw(hnp.arrays(np.float64, shape, elements=finite))
    return values.astype(dtype)


@st.composite
def cov_arguments(draw: st.DrawFn, weights: bool = True) -> tuple[tuple, dict]:
    n_vars = draw(st.integers(1, 4))
    n_obs = draw(st.integers(1, 7))
    rowvar = draw(st.booleans())
    one_d = draw(st.integers(0, 4)) == 0
    shape = (n_obs,) if one_d else ((n_vars, n_obs) if rowvar else (n_obs, n_vars))
    m = draw(data_arrays(shape))
    kwargs: dict[str, Any] = {"rowvar": rowvar}
    y = None
    if draw(st.booleans()):
        y = draw(data_arrays((n_obs,) if draw(st.booleans()) else ((2, n_obs) if rowvar else (n_obs, 2))))
    dtype = draw(st.sampled_from(RESULT_DTYPES))
    if dtype is not None and not (np.iscomplexobj(m) or np.iscomplexobj(y)):
        kwargs["dtype"] = dtype
    if not weights:
        return (m, y), kwargs
    if draw(st.booleans()):
        kwargs["bias"] = draw(st.booleans())
    if draw(st.booleans()):
        kwargs["ddof"] = draw(st.sampled_from([0, 1, 2, 3, -1, 2.0, np.int64(1)]))
    if draw(st.booleans()):
        fweights = draw(hnp.arrays(np.int64, n_obs, elements=st.integers(0, 4)))
        kwargs["fweights"] = fweights.astype(draw(st.sampled_from([np.int64, np.float64])))
    if draw(st.booleans()):
        kwargs["aweights"] = draw(hnp.arrays(np.float64, n_obs, elements=st.floats(0, 10)))
    return (m, y), kwargs


@given(cov_arguments())
def test_cov_matches_numpy(arguments: tuple[tuple, dict]) -> None:
    args, kwargs = arguments
    assert_same_outcome("cov", *args, **kwargs)


@given(cov_arguments(weights=False))
def test_corrcoef_matches_numpy(arguments: tuple[tuple, dict]) -> None:
    args, kwargs = arguments
    assert_same_outcome("corrcoef", *args, **kwargs)


@given(
    hnp.arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(2, 12)), elements=st.floats(-1e6, 1e6)),
    st.data(),
)
def test_float64_cov_agrees_to_1e13(x: np.ndarray, data: st.DataObject) -> None:
    """Plain float64 data and weights, within the covariance error bound (independent of the exact check)."""
    aweights = data.draw(hnp.arrays(np.float64, x.shape[1], elements=st.floats(0.5, 2.0)))
    for kwargs in ({}, {"aweights": aweights}, {"bias": True}):
        expected = np.cov(x, **kwargs)
        actual = anomstats.cov(x, **kwargs)
        assert actual.dtype == np.float64
        # Bound: tests/_tolerances.covariance_atol (entrywise, both sides; numpy's ddof = 1 normaliser,
        # which only loosens it for bias=True by n / (n - 1)).
        atol = covariance_atol(x.T, weights=kwargs.get("aweights"))
        assert_close_each(np.atleast_2d(actual), np.atleast_2d(expected), atol=atol)


@given(
    hnp.arrays(np.float64, st.tuples(st.just(3), st.integers(1, 6)), elements=st.floats(-50, 50)),
    st.data(),
)
def test_fweights_equal_repeating_observations(x: np.ndarray, data: st.DataObject) -> None:
    """Integer frequency weights are the same as repeating columns (an independent check)."""
    counts = data.draw(hnp.arrays(np.int64, x.shape[1], elements=st.integers(0, 3)))
    if counts.sum() < 2:
        counts[0] += 2
    repeated = np.repeat(x, counts, axis=1)
    expected = np.cov(repeated)
    actual = anomstats.cov(x, fweights=counts)
    # Bound: tests/_tolerances.covariance_atol of the repeated observations (entrywise, both sides; its
    # second-order mean term covers constant data, whose covariance is 0 up to rounding of the mean).
    np.testing.assert_allclose(actual, expected, rtol=0, atol=covariance_atol(repeated.T).max())


# ----------------------------------------------------------------------------- explicit edge cases
RNG = np.random.default_rng(20261128)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", PendingDeprecationWarning)  # numpy discourages np.matrix
    MATRIX = np.matrix([[1.0, 2, 3], [3, 1, 2]])
X23 = RNG.normal(size=(2, 3))
X35 = RNG.normal(size=(3, 5))
W5 = RNG.random(5)

COV_CASES: list[tuple[str, tuple, dict]] = [
    # shapes: scalars, 1-D, empty inputs, single observation
    ("scalar", (3.0,), {}),
    ("scalar rowvar False", (5,), {"rowvar": False}),
    ("two scalars", (5, 3), {}),
    ("1-D list", ([1.0, 2.0, 4.0],), {}),
    ("1-D rowvar False", ([1.0, 2.0, 4.0], [2, 3, 1]), {"rowvar": False}),
    ("empty 1-D", ([],), {}),
    ("(0, k)", (np.zeros((0, 3)),), {}),
    ("(0, k) dtype float32", (np.zeros((0, 3)),), {"dtype": np.float32}),
    ("(0, k) complex", (np.zeros((0, 3), complex),), {}),
    ("(k, 0)", (np.zeros((2, 0)),), {}),
    ("(k, 0) rowvar False", (np.zeros((2, 0)),), {"rowvar": False}),
    ("(0, k) with bad y skipped", (np.zeros((0, 3)), np.zeros((2, 2))), {}),
    ("(0, k) with 3-D y", (np.zeros((0, 3)), np.zeros((2, 2, 2))), {}),
    ("one observation", ([[1.0], [2.0]],), {}),
    ("one observation bias", ([[1.0], [2.0]],), {"bias": True}),
    ("nested lists", ([[1, 2, 3], [3, 1, 2]],), {}),
    # dtypes
    ("bool", ([True, False, True],), {}),
    ("int8", (np.array([[1, 2, 3], [3, 1, 7]], np.int8),), {}),
    ("float16", (np.array([1, 2, 4], np.float16),), {}),
    ("float16 dtype=float16", (np.array([1, 2, 4], np.float16),), {"dtype": np.float16}),
    ("float32", (X35.astype(np.float32),), {}),
    ("float32 dtype=float32", (X35.astype(np.float32),), {"dtype": np.float32}),
    ("float64 dtype='f4'", (X35,), {"dtype": "f4"}),
    ("float32 dtype=float32 weighted", (X35.astype(np.float32),), {"dtype": np.float32, "aweights": W5}),
    ("longdouble", (X35.astype(np.longdouble),), {}),
    ("longdouble weighted", (X35.astype(np.longdouble),), {"aweights": W5, "fweights": [1, 2, 1, 0, 3]}),
    ("dtype=longdouble", (X35,), {"dtype": np.longdouble}),
    ("complex", ([1 + 1j, 2, 3j],), {}),
    ("complex64", (np.array([[1, 2, 4j], [1j, 0, 1]], np.complex64),), {}),
    ("complex weighted", (X35 + 1j * X35[::-1],), {"aweights": W5, "ddof": 0}),
    ("complex to float dtype", ([1, 2, 4j],), {"dtype": float}),
    ("dtype=int rejected", (X23,), {"dtype": int}),
    ("dtype=bool rejected", (X23,), {"dtype": bool}),
    ("unknown dtype", (X23,), {"dtype": "foo"}),
    ("y of another dtype", (X23.astype(np.float32), [[1, 2, 3]]), {}),
    ("y complex", (X23, [1j, 2, 3]), {}),
    ("y longdouble", (X23, np.ones(3, np.longdouble)), {}),
    ("object unweighted", (np.array([[1, 2, 3], [3, 1, 2]], dtype=object),), {}),
    ("object weighted", (np.array([[1, 2, 3], [3, 1, 2]], dtype=object),), {"aweights": [1, 2, 1]}),
    ("object Fraction", (np.array([[Fraction(1), 2, 3], [3, 1, 2]], dtype=object),), {"fweights": [1, 2, 1]}),
    ("object to float", (np.array([[1, 2, 3], [3, 1, 2]], dtype=object),), {"dtype": float}),
    ("None", (None,), {}),
    ("strings", (["a", "b"],), {}),
    ("timedelta", (np.array([1, 2], dtype="m8[s]"),), {}),
    ("matrix", (MATRIX,), {}),
    # dimensions
    ("3-D m", (np.zeros((2, 2, 2)),), {}),
    ("3-D y", ([1, 2], np.zeros((1, 1, 2))), {}),
    ("ragged", ([[1, 2], [1]],), {}),
    ("y wrong length", ([1.0, 2.0], [1, 2, 3]), {}),
    ("y wrong shape rowvar False", (np.ones((3, 2)), np.ones((4, 2))), {"rowvar": False}),
    ("y (1, n) rowvar False kept as a row", (RNG.normal(size=(3, 2)), [[1, 2, 3]]), {"rowvar": False}),
    ("y (n, 1) rowvar False", (RNG.normal(size=(3, 2)), [[1], [2], [3]]), {"rowvar": False}),
    ("rowvar False", (X35,), {"rowvar": False}),
    ("rowvar 0", (X35,), {"rowvar": 0}),
    # ddof and bias
    ("ddof 1.5", ([1.0, 2.0],), {"ddof": 1.5}),
    ("ddof 2.0", ([1.0, 2.0, 4.0],), {"ddof": 2.0}),
    ("ddof nan", ([1.0, 2.0],), {"ddof": np.nan}),
    ("ddof inf", ([1.0, 2.0],), {"ddof": np.inf}),
    ("ddof complex", ([1.0, 2.0],), {"ddof": 1j}),
    ("ddof string", ([1.0, 2.0],), {"ddof": "1"}),
    ("ddof array", ([1.0, 2.0],), {"ddof": np.array([1, 2])}),
    ("ddof numpy int", (X35,), {"ddof": np.int64(2)}),
    ("ddof True", (X35,), {"ddof": True}),
    ("ddof negative", (X35,), {"ddof": -1}),
    ("ddof == N", (X35,), {"ddof": 5}),
    ("ddof > N", ([1.0, 2.0, 4.0],), {"ddof": 5}),
    ("ddof overrides bias", (X35,), {"ddof": 1, "bias": True}),
    ("ddof 0 with bias False", (X35,), {"ddof": 0, "bias": False}),
    ("bias", (X35,), {"bias": True}),
    ("bias truthy string", ([1.0, 2.0, 4.0],), {"bias": "x"}),
    # fweights
    ("fweights", (X35,), {"fweights": [1, 2, 0, 3, 1]}),
    ("fweights float integral", (X35,), {"fweights": np.array([1.0, 2, 0, 3, 1])}),
    ("fweights non-integral", ([1.0, 2.0],), {"fweights": [1, 1.5]}),
    ("fweights nan", ([1.0, 2.0],), {"fweights": [np.nan, 1]}),
    ("fweights inf", ([1.0, 2.0],), {"fweights": [np.inf, 1]}),
    ("fweights negative", ([1.0, 2.0],), {"fweights": [1, -1]}),
    ("fweights 2-D", ([1.0, 2.0],), {"fweights": [[1, 1]]}),
    ("fweights 2-D non-integral", ([1.0, 2.0],), {"fweights": [[1, 1.5]]}),
    ("fweights scalar", (X35,), {"fweights": 3}),
    ("fweights too long", ([1.0, 2.0],), {"fweights": [1, 1, 1]}),
    ("fweights strings", ([1.0, 2.0],), {"fweights": ["a", "b"]}),
    ("fweights bool", (X35,), {"fweights": [True, False, True, True, True]}),
    ("fweights zero sum", ([1.0, 2.0],), {"fweights": [0, 0]}),
    ("fweights sum 1", ([1.0, 2.0, 3.0],), {"fweights": [0, 1, 0]}),
    ("fweights on empty observations", (np.zeros((2, 0)),), {"fweights": []}),
    # aweights
    ("aweights", (X35,), {"aweights": W5}),
    ("aweights ddof 0", (X35,), {"aweights": W5, "ddof": 0}),
    ("aweights ddof 3", (X35,), {"aweights": W5, "ddof": 3}),
    ("aweights negative", ([1.0, 2.0],), {"aweights": [1, -1]}),
    ("aweights nan", ([1.0, 2.0],), {"aweights": [np.nan, 1]}),
    ("aweights 2-D", ([1.0, 2.0],), {"aweights": [[1, 1]]}),
    ("aweights scalar", (X35,), {"aweights": 2.0}),
    ("aweights wrong length", ([1.0, 2.0],), {"aweights": [1, 1, 1]}),
    ("aweights zero sum", ([1.0, 2.0],), {"aweights": [0, 0.0]}),
    ("aweights one non-zero", ([1.0, 2.0, 4.0],), {"aweights": [0, 1, 0]}),
    # both
    ("both weights", ([1.0, 2, 4],), {"fweights": [1, 2, 1], "aweights": [0.5, 1, 2]}),
    ("both weights ddof 3", ([1.0, 2, 4],), {"fweights": [1, 2, 1], "aweights": [0.5, 1, 2], "ddof": 3}),
    ("both weights dof <= 0", ([1.0, 2, 4],), {"fweights": [0, 1, 0], "aweights": [1, 1, 1]}),
    ("both weights with y", (X35, X35[:1] ** 2), {"fweights": [1, 2, 0, 3, 1], "aweights": W5}),
    ("both weights rowvar False", (X35.T,), {"rowvar": False, "fweights": [1, 2, 0, 3, 1], "aweights": W5}),
    ("fweights float64 array with aweights", (X35,), {"fweights": np.array([1.0, 2, 0, 3, 1]), "aweights": W5}),
    # non-finite data
    ("nan in data", ([[1.0, np.nan, 3.0], [1.0, 2.0, 3.0]],), {}),
    ("inf in data", ([1.0, np.inf, 3.0],), {}),
    ("constant rows", ([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]],), {}),
    ("far from origin", (X35 + 1e8,), {}),
]

CORRCOEF_CASES: list[tuple[str, tuple, dict]] = [
    ("1-D (numpy returns a scalar)", ([1, 2, 3],), {}),
    ("constant 1-D", ([1, 1, 1],), {}),
    ("constant row", ([[1, 1, 1], [1, 2, 3]],), {}),
    ("constant complex row", ([[1j, 1j, 1j], [1, 2, 3]],), {}),
    ("complex", ([[1 + 1j, 2, 3j], [1, 2j, 0]],), {}),
    ("inf in data", ([1, np.inf, 3],), {}),
    ("nan in data", ([[1.0, np.nan, 3.0], [1.0, 2.0, 3.0]],), {}),
    ("(k, 0)", (np.zeros((2, 0)),), {}),
    ("(0, k)", (np.zeros((0, 2)),), {}),
    ("(0, k) dtype float32", (np.zeros((0, 2)),), {"dtype": np.float32}),
    ("empty 1-D", ([],), {}),
    ("one observation", ([[1.0], [2.0]],), {}),
    ("scalar", (4.0,), {}),
    ("longdouble", (X35.astype(np.longdouble),), {}),
    ("float32 dtype=float32", (X35.astype(np.float32),), {"dtype": np.float32}),
    ("dtype=float32 from float64", (X35,), {"dtype": np.float32}),
    ("float16 dtype=float16", (X35.astype(np.float16),), {"dtype": np.float16}),
    ("int", ([[1, 2, 3], [3, 1, 7]],), {}),
    ("matrix", (MATRIX.T,), {"rowvar": False}),
    ("object", (np.array([[1, 2, 3], [3, 1, 2]], dtype=object),), {}),
    ("y", (X35, X35[::-1] * 2), {}),
    ("y rowvar False", (X35.T, X35[:2].T), {"rowvar": False}),
    ("y wrong length", ([1.0, 2.0], [1, 2, 3]), {}),
    ("3-D", (np.zeros((2, 2, 2)),), {}),
    ("perfectly correlated rounds past 1", (np.array([[0.1, 0.2, 0.3], [0.3, 0.6, 0.9]]) * 1e-3,), {}),
    ("far from origin", (X35 + 1e8,), {}),
]


@pytest.mark.parametrize(("label", "args", "kwargs"), COV_CASES, ids=[c[0] for c in COV_CASES])
def test_cov_edge_case_matches_numpy(label: str, args: tuple, kwargs: dict) -> None:
    assert_same_outcome("cov", *args, **kwargs)


@pytest.mark.parametrize(("label", "args", "kwargs"), CORRCOEF_CASES, ids=[c[0] for c in CORRCOEF_CASES])
def test_corrcoef_edge_case_matches_numpy(label: str, args: tuple, kwargs: dict) -> None:
    assert_same_outcome("corrcoef", *args, **kwargs)


# ----------------------------------------------------------------------------- specific facts
def test_single_variable_gives_0d_array_and_corrcoef_scalar() -> None:
    c = anomstats.cov([1.0, 2.0, 4.0])
    assert isinstance(c, np.ndarray) and c.shape == () and c.dtype == np.float64
    r = anomstats.corrcoef([1.0, 2.0, 4.0])
    assert not isinstance(r, np.ndarray) and isinstance(r, np.float64) and r == 1.0


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_degrees_of_freedom_warning_and_values() -> None:
    with pytest.warns(RuntimeWarning, match=r"^Degrees of freedom <= 0 for slice$"):
        c = anomstats.cov([1.0, 2.0, 4.0], ddof=5)
    assert c == np.inf
    with pytest.warns(RuntimeWarning, match="Degrees of freedom"):
        c = anomstats.cov([[1.0], [2.0]])
    assert np.isnan(c).all()


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_degrees_of_freedom_warning_points_at_the_caller() -> None:
    with pytest.warns(RuntimeWarning, match="Degrees of freedom") as record:
        anomstats.cov([1.0])
    assert [w.filename for w in record if "Degrees" in str(w.message)] == [__file__]


def test_corrcoef_constant_row_is_nan_with_divide_warning() -> None:
    with pytest.warns(RuntimeWarning, match="invalid value encountered in divide"):
        r = anomstats.corrcoef([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]])
    assert np.isnan(r[0]).all() and np.isnan(r[:, 0]).all() and r[1, 1] == 1.0


def test_corrcoef_is_clipped_to_unit_interval() -> None:
    x = RNG.normal(size=(4, 9))
    x[1] = 3 * x[0] + 1e-3  # exactly correlated up to rounding
    r = anomstats.corrcoef(x)
    assert np.all(np.abs(r) <= 1.0)
    z = anomstats.corrcoef(x + 1j * x[::-1])
    assert np.all(np.abs(z.real) <= 1.0) and np.all(np.abs(z.imag) <= 1.0)


def test_bad_arguments_raise_numpy_errors() -> None:
    with pytest.raises(ValueError, match="^ddof must be integer$"):
        anomstats.cov([1.0, 2.0], ddof=0.5)
    with pytest.raises(TypeError, match="^fweights must be integer$"):
        anomstats.cov([1.0, 2.0], fweights=[1.0, 0.5])
    with pytest.raises(ValueError, match="^aweights cannot be negative$"):
        anomstats.cov([1.0, 2.0], aweights=[1.0, -0.5])
    with pytest.raises(RuntimeError, match="^incompatible numbers of samples and fweights$"):
        anomstats.cov([1.0, 2.0], fweights=[1])
    with pytest.raises(ZeroDivisionError, match="^Weights sum to zero, can't be normalized$"):
        anomstats.cov([1.0, 2.0], aweights=[0.0, 0.0])
    with pytest.raises(ValueError, match="^m has more than 2 dimensions$"):
        anomstats.corrcoef(np.zeros((1, 2, 3)))


# ----------------------------------------------------------------------------- inputs untouched
def _snapshot(*arrays: np.ndarray) -> list[np.ndarray]:
    return [a.copy() for a in arrays]


@pytest.mark.parametrize("rowvar", [True, False])
def test_inputs_not_modified(rowvar: bool) -> None:
    m = RNG.normal(size=(3, 5)) if rowvar else RNG.normal(size=(5, 3))
    y = RNG.normal(size=(2, 5)) if rowvar else RNG.normal(size=(5, 2))
    fweights = np.array([1.0, 2.0, 0.0, 3.0, 1.0])
    aweights = RNG.random(5)
    before = _snapshot(m, y, fweights, aweights)
    anomstats.cov(m, y, rowvar=rowvar, fweights=fweights, aweights=aweights)
    anomstats.cov(m, y, rowvar=rowvar, dtype=np.float64)
    anomstats.corrcoef(m, y, rowvar=rowvar)
    for original, now in zip(before, (m, y, fweights, aweights)):
        np.testing.assert_array_equal(now, original)


def test_float64_fweights_not_mutated_unlike_numpy() -> None:
    """numpy.cov writes fweights * aweights into a float64 fweights array; anomstats does not."""
    x = RNG.normal(size=(2, 4))
    aweights = np.array([0.5, 1.0, 2.0, 0.25])
    ours_f = np.array([1.0, 2.0, 3.0, 1.0])
    numpy_f = ours_f.copy()
    ours = anomstats.cov(x, fweights=ours_f, aweights=aweights)
    reference = np.cov(x, fweights=numpy_f, aweights=aweights)
    # Bound: covariance_atol with the combined weights f * a (its normaliser v1 - sum(w^2) / v1 is below
    # numpy's v1 - sum(w a) / v1 for f >= 1, so the bound is looser, never tighter).
    assert_close_each(ours, reference, atol=covariance_atol(x.T, weights=aweights * ours_f))
    np.testing.assert_array_equal(ours_f, [1.0, 2.0, 3.0, 1.0])
    assert not np.array_equal(numpy_f, ours_f)  # the documented difference still exists upstream


def test_same_array_as_both_weights_is_correct() -> None:
    """numpy also overwrites aweights when it is the fweights array; anomstats uses the true values."""
    x = np.array([1.0, 2.0, 4.0, 7.0])
    shared = np.array([1.0, 2.0, 3.0, 1.0])
    ours = anomstats.cov(x, fweights=shared, aweights=shared)
    independent = np.cov(x, fweights=shared.copy(), aweights=shared.copy())
    # Bound: covariance_atol with the combined weights f * a (as above: looser than numpy's normaliser).
    assert_close_each(np.atleast_2d(ours), np.atleast_2d(independent), atol=covariance_atol(x[:, None], weights=shared * shared))
    np.testing.assert_array_equal(shared, [1.0, 2.0, 3.0, 1.0])


def test_list_and_int_inputs_not_modified() -> None:
    m = [[1, 2, 3], [3, 1, 2]]
    fweights = [1, 2, 1]
    anomstats.cov(m, fweights=fweights, aweights=[0.5, 1.0, 2.0])
    assert m == [[1, 2, 3], [3, 1, 2]] and fweights == [1, 2, 1]


# ----------------------------------------------------------------------------- weight helpers
def test_weight_helpers_return_float64_vectors_without_copying_float64() -> None:
    w = np.array([1.0, 2.0])
    assert as_frequency_weights(w, 2) is w
    assert as_analytic_weights([1, 2], 2).dtype == np.float64
    with pytest.raises(RuntimeError, match="^cannot handle multidimensional aweights$"):
        as_analytic_weights(np.ones((2, 2)), 2)
    with pytest.raises(IndexError):
        as_frequency_weights(3, 2)
