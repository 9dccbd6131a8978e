"""Covariance and correlation matrices that agree with :func:`numpy.cov` / :func:`numpy.corrcoef`.

The two functions here are drop-in replacements: for every input numpy 2.x accepts they return the
same values, dtype and shape, emit the same warnings and raise the same exceptions.  The
deliberate differences are listed in the Notes of :func:`cov`; the main one is that inputs are
never written to.

The estimator is the two-pass one: the (weighted) mean of every variable is subtracted from a
private copy of the data first, and the centred data then goes through a single matrix product.
Doing the operations in the same order as numpy (including pairwise ``ndarray.sum`` reductions
and the same BLAS product) keeps results equal to numpy's to a few units in the last place, in
practice bit for bit, rather than merely within a loose tolerance.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import DTypeLike, NDArray

from ._rules import degrees_of_freedom
from ._validation import check_ddof
from ._weights import as_analytic_weights, as_frequency_weights, require_nonzero_weight_sum

__all__ = ["cov", "corrcoef"]


def _variables_by_rows(
    m: Any, y: Any, rowvar: Any, dtype: DTypeLike | None
) -> NDArray[Any] | None:
    """Stack ``m`` and ``y`` into one fresh 2-D array with one variable per row.

    Returns ``None`` when ``m`` holds no variables at all (numpy then returns an empty (0, 0)
    float64 matrix without looking at ``y`` any further).  The array returned never shares memory
    with the inputs, so the caller may centre it in place.
    """
    m = np.asarray(m)
    if m.ndim > 2:
        raise ValueError("m has more than 2 dimensions")
    if y is not None:
        y = np.asarray(y)
        if y.ndim > 2:
            raise ValueError("y has more than 2 dimensions")
    if dtype is None:
        # At least float64; longdouble, complex and object inputs keep their own type.
        dtype = np.result_type(m, np.float64) if y is None else np.result_type(m, y, np.float64)

    # With y present the concatenation below makes the copy, so converting m may share memory.
    variables = np.array(m, ndmin=2, dtype=dtype, copy=True if y is None else None)
    if not rowvar and m.ndim != 1:
        variables = variables.T
    if variables.shape[0] == 0:
        return None
    if y is None:
        return variables

    extra = np.array(y, ndmin=2, dtype=dtype, copy=None)
    # numpy's rule for y differs from the one for m: y is transposed unless it has a single row
    # after promotion to 2-D, so a (1, n) y with rowvar=False stays one variable of n observations.
    if not rowvar and extra.shape[0] != 1:
        extra = extra.T
    return np.concatenate((variables, extra), axis=0)


def _observation_weights(
    fweights: Any, aweights: Any, n_obs: int
) -> tuple[NDArray[np.float64] | None, NDArray[np.float64] | None]:
    """Validate the weights; return ``(combined, analytic)`` where combined = f * a.

    The product is a new array: numpy multiplies into its float64 ``fweights`` in place, which
    silently changes the caller's array; this function never does.
    """
    freq = None if fweights is None else as_frequency_weights(fweights, n_obs)
    analytic = None if aweights is None else as_analytic_weights(aweights, n_obs)
    if freq is None:
        return analytic, analytic
    if analytic is None:
        return freq, None
    return freq * analytic, analytic


def _row_means(variables: NDArray[Any], weights: NDArray[np.float64] | None) -> tuple[Any, Any]:
    """Return ``(mean of every row, total weight)``; the total is ``None`` without weights.

    Mirrors :func:`numpy.average` with ``returned=True``: the accumulation dtype, the zero-sum
    error and numpy's failure on unweighted object arrays.
    """
    if weights is None:
        means = variables.mean(axis=1)
        if means.dtype == object:
            # numpy.average(..., returned=True) cannot report the weight count for object arrays
            # and fails with this AttributeError, so numpy.cov rejects unweighted object input.
            # Kept for identical behaviour (numpy does accept object input *with* weights).
            raise AttributeError("'float' object has no attribute 'shape'")
        return means, None
    # The weights are float64, so this is at least float64 (numpy.average's extra "f8" for
    # integer data is implied); longdouble, complex and object data keep their own type.
    accumulate = np.result_type(variables.dtype, weights.dtype)
    total = weights.sum(dtype=accumulate)
    require_nonzero_weight_sum(total)
    means = np.multiply(variables, weights, dtype=accumulate).sum(axis=1) / total
    return means, total


def cov(
    m: Any,
    y: Any = None,
    rowvar: bool = True,
    bias: bool = False,
    ddof: int | None = None,
    fweights: Any = None,
    aweights: Any = None,
    *,
    dtype: DTypeLike | None = None,
) -> NDArray[Any]:
    """Estimate a covariance matrix, optionally weighted; a drop-in for :func:`numpy.cov`.

    Parameters
    ----------
    m : array_like
        1-D or 2-D data. With ``rowvar=True`` every row is a variable and every column an
        observation; a 1-D array is a single variable.
    y : array_like, optional
        More variables with the same observations, laid out like `m`; its variables follow
        those of `m` in the result.
    rowvar : bool, default True
        If false, columns are variables and rows are observations.
    bias : bool, default False
        Normalise by ``N`` instead of ``N - 1`` (ignored when `ddof` is given).
    ddof : int, optional
        Delta degrees of freedom; overrides `bias`. Must be integral (``2.0`` is accepted).
    fweights : array_like of int, optional
        Frequency weights: how many times each observation occurs (non-negative whole numbers,
        one per observation).
    aweights : array_like, optional
        Analytic (reliability) weights, non-negative, one per observation.
    dtype : data-type, optional
        dtype of the computation and of the result. By default at least float64 (longdouble,
        complex and object inputs keep their own type).

    Returns
    -------
    numpy.ndarray
        ``(k, k)`` covariance of the ``k`` variables; a 0-d array when ``k == 1``; an empty
        ``(0, 0)`` float64 array when `m` has no variables.

    Raises
    ------
    ValueError
        Non-integral `ddof`; more than two dimensions in `m` or `y`; `y` whose observation count
        differs from `m`'s; negative weights.
    TypeError
        Non-integral `fweights`.
    RuntimeError
        Weights that are not 1-D or whose length is not the number of observations.
    ZeroDivisionError
        Weights summing to zero.

    Warns
    -----
    RuntimeWarning
        ``"Degrees of freedom <= 0 for slice"`` when ``N - ddof <= 0`` (the effective ``N``
        with weights); the result is then ``inf``/``nan``, exactly as numpy gives it.

    See Also
    --------
    corrcoef : correlation coefficients from the same estimator.
    numpy.cov : the reference this function reproduces.

    Notes
    -----
    With ``w = fweights * aweights`` and ``v1 = sum(w)``, the estimate is
    ``(X - mean_w) @ diag(w) @ (X - mean_w).H * v1 / (v1**2 - ddof * sum(w * aweights))``,
    which reduces to dividing by ``sum(fweights) - ddof`` without `aweights` and by
    ``N - ddof`` without weights.

    Deliberate differences from numpy 2.4:

    * Inputs are never modified. ``numpy.cov`` multiplies `aweights` into a float64 ndarray
      `fweights` in place, so the caller's ``fweights`` comes back holding ``fweights *
      aweights``; here it is left untouched (the result is the same).
    * Passing the *same* float64 array as both `fweights` and `aweights` gives the correct
      estimate here. numpy's in-place product also overwrites its `aweights` in that case
      (both names refer to one array), so its ``ddof`` correction sums ``w * w`` instead of
      ``w * aweights`` and the result is wrong whenever ``ddof != 0``.
    * ``__array_function__`` overrides of the arguments are not dispatched to; inputs are
      converted with :func:`numpy.asarray` as numpy does once no override applies.

    Behaviour kept on purpose, although surprising: an unweighted object-dtype array raises
    ``AttributeError`` (as in numpy, whose ``average`` fails there); a scalar `fweights` or
    `aweights` raises ``IndexError``; an empty (0, 0) result is float64 whatever `dtype` says.
    Weights of extreme scale follow numpy too, although the estimate depends only on their ratios:
    ``aweights`` ×1e200 overflow ``sum(w * aweights)`` (a ``RuntimeWarning`` "Degrees of freedom <= 0
    for slice" and an ``inf``/``nan`` result), and ×1e-200 underflow it to 0, which silently drops the
    ``ddof`` correction (the result is the ``ddof=0`` one). The library's own weighted estimators
    (:func:`anomstats.batched_cov`, :class:`anomstats.RunningMoments`) scale the weights by a power of
    two first and give the same result for weights of any scale.

    Examples
    --------
    >>> import numpy as np
    >>> from anomstats import cov
    >>> x = np.array([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    >>> cov(x)
    array([[ 1., -1.],
           [-1.,  1.]])
    >>> cov([1.0, 2.0, 4.0])
    array(2.33333333)
    >>> cov([1.0, 2.0, 4.0], fweights=[1, 2, 1], bias=True)
    array(1.1875)
    """
    check_ddof(ddof, numpy_exact=True)
    variables = _variables_by_rows(m, y, rowvar, dtype)
    if variables is None:
        return np.array([]).reshape(0, 0)
    n_obs = variables.shape[1]

    if ddof is None:
        ddof = 1 if bias == 0 else 0

    weights, analytic = _observation_weights(fweights, aweights, n_obs)
    means, total = _row_means(variables, weights)

    # Normalisation: N - ddof, generalised to weights (see Notes), by the library's one rule.
    if weights is None:
        sum_w, sum_w2 = n_obs, None  # N - ddof
    elif analytic is None:
        sum_w, sum_w2 = total, None  # frequency weights only: sum(f) - ddof
    else:
        sum_w, sum_w2 = total, np.sum(weights * analytic)
    denominator = degrees_of_freedom(sum_w, sum_w2, ddof)  # numpy's warning when not positive
    if denominator <= 0:
        denominator = 0.0

    variables -= means[:, None]
    # Same product as numpy (for real data .conj() returns the array itself, so the unweighted
    # case is X @ X.T, which BLAS computes as a symmetric rank-k update).
    weighted_t = variables.T if weights is None else (variables * weights).T
    result = np.dot(variables, weighted_t.conj())
    result *= np.true_divide(1, denominator)
    return result.squeeze()


def corrcoef(
    x: Any, y: Any = None, rowvar: bool = True, *, dtype: DTypeLike | None = None
) -> Any:
    """Pearson correlation coefficients; a drop-in for :func:`numpy.corrcoef`.

    Parameters
    ----------
    x : array_like
        1-D or 2-D data; with ``rowvar=True`` every row is a variable.
    y : array_like, optional
        More variables laid out like `x`.
    rowvar : bool, default True
        If false, columns are variables and rows are observations.
    dtype : data-type, optional
        dtype of the computation and of the result (default: at least float64).

    Returns
    -------
    numpy.ndarray or numpy scalar
        ``(k, k)`` matrix ``R[i, j] = C[i, j] / sqrt(C[i, i] * C[j, j])`` of the covariance
        ``C = cov(x, y, rowvar, dtype=dtype)``, with real (and imaginary) parts clipped to
        ``[-1, 1]``. For a single variable numpy returns the *scalar* ``C / C`` (1.0, or nan
        for a constant variable), and so does this function.

    Warns
    -----
    RuntimeWarning
        ``"invalid value encountered in divide"`` for constant variables (their rows and
        columns are nan), plus whatever :func:`cov` warns.

    See Also
    --------
    cov : the covariance this is normalised from.
    numpy.corrcoef : the reference this function reproduces.

    Notes
    -----
    Shares the deliberate differences listed in :func:`cov` (inputs are never modified).
    Rounding can leave coefficients slightly outside [-1, 1] (or the diagonal slightly off 1);
    real and imaginary parts are clipped to [-1, 1], which for complex input still does not
    guarantee ``abs(R[i, j]) <= 1``, exactly as in numpy.

    Examples
    --------
    >>> import numpy as np
    >>> from anomstats import corrcoef
    >>> x = np.array([[1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.5], [4.0, 3.0, 2.0, 1.0]])
    >>> np.round(corrcoef(x), 4)
    array([[ 1.    ,  0.9984, -1.    ],
           [ 0.9984,  1.    , -0.9984],
           [-1.    , -0.9984,  1.    ]])
    >>> print(corrcoef([1.0, 2.0, 3.0]))
    1.0
    """
    c = cov(x, y, rowvar, dtype=dtype)
    if c.ndim == 0:
        # One variable: numpy returns c / c, i.e. a scalar 1.0, or nan for 0, inf or nan.
        return c / c
    stddev = np.sqrt(np.diagonal(c).real)
    c /= stddev[:, None]
    c /= stddev[None, :]
    # Rounding can push coefficients just past +-1; clip in place, as numpy does.
    np.clip(c.real, -1, 1, out=c.real)
    if np.iscomplexobj(c):
        np.clip(c.imag, -1, 1, out=c.imag)
    return c
