"""Validation of observation weights: the one home of every weight check in the library.

Three vocabularies, one implementation of each fault:

* :func:`as_frequency_weights` / :func:`as_analytic_weights` raise exactly what :func:`numpy.cov` raises
  for the same bad weights, in the same order (type and text), for the numpy drop-ins
  :func:`anomstats.cov` and :func:`anomstats.corrcoef`.
* :func:`check_weights` is the library's own vocabulary (:func:`anomstats.batched_cov`,
  :class:`anomstats.RunningMoments`, the dask paths, the torch adapter): numpy's exception *types*, whose
  messages start with numpy's text and then say what was received; NaN and infinite weights are
  rejected (numpy returns a NaN matrix).
* :func:`kde_weights` is scipy's vocabulary for :class:`anomstats.GaussianKDE` and
  :func:`anomstats.bandwidth.effective_sample_size` (``ValueError`` throughout, scipy's phrases).

The arrays returned by the first three are never written to by anything in this package.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "WEIGHTS_SUM_TO_ZERO",
    "as_frequency_weights",
    "as_analytic_weights",
    "check_weights",
    "kde_weights",
    "require_nonzero_weight_sum",
    "scaled_weights",
]

#: numpy's message (``numpy.average``, hence ``numpy.cov``) for weights that sum to zero.
WEIGHTS_SUM_TO_ZERO = "Weights sum to zero, can't be normalized"


def _as_weight_vector(weights: Any, kind: str, n_obs: int, *, detailed: bool = False) -> NDArray[np.float64]:
    """Shared shape and sign checks for a 1-D float64 weight vector of length ``n_obs``.

    ``weights`` is already a float64 array here; ``kind`` is ``"fweights"``, ``"aweights"`` (or the
    caller's argument name) and appears in the messages. ``detailed`` appends what was received to
    numpy's messages (the library's vocabulary).
    """
    if weights.ndim > 1:
        suffix = f": expected one weight per observation (1-D), got shape {weights.shape}" if detailed else ""
        raise RuntimeError(f"cannot handle multidimensional {kind}{suffix}")
    if weights.ndim == 0:
        if detailed:
            raise ValueError(f"{kind} must be a 1-D array with one weight per observation, got a scalar")
        # numpy indexes ``shape[0]`` without checking for a scalar first; keep its IndexError
        # (type and text) so that error handling written against numpy keeps working.
        raise IndexError("tuple index out of range")
    if weights.shape[0] != n_obs:
        suffix = f": {weights.shape[0]} weights for {n_obs} observations along obs_axis" if detailed else ""
        raise RuntimeError(f"incompatible numbers of samples and {kind}{suffix}")
    if detailed and not np.all(np.isfinite(weights)):
        raise ValueError(f"{kind} must be finite; found NaN or infinity")
    if np.any(weights < 0):
        suffix = f"; found minimum {weights.min()!r}" if detailed else ""
        raise ValueError(f"{kind} cannot be negative{suffix}")
    return weights


def as_frequency_weights(fweights: Any, n_obs: int) -> NDArray[np.float64]:
    """Return ``fweights`` as a validated 1-D float64 array of length ``n_obs`` (numpy's vocabulary).

    Frequency weights must hold whole numbers (``2.0`` is accepted, ``2.5`` and NaN are not),
    be one-dimensional, have one entry per observation and be non-negative.  The result may be
    ``fweights`` itself (no copy for float64 arrays): callers must not modify it.

    Examples
    --------
    >>> as_frequency_weights([1, 2, 0], 3)
    array([1., 2., 0.])
    >>> as_frequency_weights([1, 2.5, 0], 3)
    Traceback (most recent call last):
    ...
    TypeError: fweights must be integer
    """
    weights = np.asarray(fweights, dtype=float)
    # Checked before the shape, as numpy does: a non-integral 2-D array reports "integer".
    if not np.all(weights == np.around(weights)):
        raise TypeError("fweights must be integer")
    return _as_weight_vector(weights, "fweights", n_obs)


def as_analytic_weights(aweights: Any, n_obs: int) -> NDArray[np.float64]:
    """Return ``aweights`` as a validated 1-D float64 array of length ``n_obs`` (numpy's vocabulary).

    Analytic (reliability) weights may be any non-negative reals.  The result may be
    ``aweights`` itself (no copy for float64 arrays): callers must not modify it.

    Examples
    --------
    >>> as_analytic_weights([0.5, 2], 2)
    array([0.5, 2. ])
    >>> as_analytic_weights([0.5, -2], 2)
    Traceback (most recent call last):
    ...
    ValueError: aweights cannot be negative
    """
    return _as_weight_vector(np.asarray(aweights, dtype=float), "aweights", n_obs)


def check_weights(weights: Any, n_obs: int, name: str = "aweights") -> NDArray[np.float64]:
    """Validate analytic weights in the library's vocabulary: 1-D float64, one finite weight >= 0 each.

    Exception types follow :func:`numpy.cov` (``RuntimeError`` for the shape, ``ValueError`` for
    negative values), with messages that start like numpy's and say what was received. Unlike
    numpy, NaN and infinite weights are rejected (numpy returns a NaN matrix). The returned array
    may be the caller's: never write to it. A zero sum is checked by the caller.

    Examples
    --------
    >>> check_weights([1, 2, 0.5], 3)
    array([1. , 2. , 0.5])
    >>> check_weights([1, 2], 3)
    Traceback (most recent call last):
    ...
    RuntimeError: incompatible numbers of samples and aweights: 2 weights for 3 observations along obs_axis
    """
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be an array of real numbers ({exc})") from None
    return _as_weight_vector(w, name, n_obs, detailed=True)


def require_nonzero_weight_sum(total: Any) -> None:
    """Raise numpy's ``ZeroDivisionError`` when the weights' sum ``total`` is zero (any entry, for an array).

    The one check of a zero weight sum, in numpy's type and words, for :func:`anomstats.cov`,
    :func:`anomstats.batched_cov` and the torch adapter's ``numpy.cov`` kernel.

    Examples
    --------
    >>> require_nonzero_weight_sum(2.5)
    >>> require_nonzero_weight_sum(np.float64(0.0))
    Traceback (most recent call last):
    ...
    ZeroDivisionError: Weights sum to zero, can't be normalized
    """
    if np.any(total == 0.0):
        raise ZeroDivisionError(WEIGHTS_SUM_TO_ZERO)


def scaled_weights(weights: NDArray[np.float64]) -> tuple[NDArray[np.float64], int]:
    """``(weights·2⁻ᵏ, k)``, ``k`` even, the largest scaled weight in ``[0.25, 1)``: the library's weight normalisation.

    Every weighted statistic of the library (a weighted mean, a covariance with numpy's ``aweights``
    normalisation ``Σw − ddof·Σw²/Σw``) is homogeneous in the weights: of degree 0 (the mean, the
    covariance) or 1 (the normalisation). Scaling by a power of two is exact (no rounding, short of
    subnormal weights below ``2⁻¹⁰²²`` of the largest), so formulas evaluated on the scaled weights give,
    bit for bit, the result of the original weights wherever that one is representable, and stay
    representable where ``Σw²`` of the original weights would overflow (weights ×1e200) or underflow
    (×1e-200). ``k`` is even, so that ``√w`` scales exactly too (by ``2^(−k/2)``); it is 0 for weights
    that are all zero. A new array; the caller's is never written.

    Examples
    --------
    >>> scaled_weights(np.array([1e200, 3e200]))[1]
    666
    >>> w, k = scaled_weights(np.array([0.5, 2.0, 3.0]))
    >>> w.tolist(), k
    ([0.125, 0.5, 0.75], 2)
    """
    w = np.asarray(weights, dtype=np.float64)
    largest = float(w.max()) if w.size else 0.0
    exponent = int(np.frexp(largest)[1]) if largest > 0 else 0
    exponent += exponent % 2  # even: √(w·2⁻ᵏ) = √w·2^(−k/2) exactly
    return np.ldexp(w, -exponent), exponent


def kde_weights(weights: Any, n: int | None = None) -> NDArray[np.float64]:
    """Weights of a Gaussian KDE's points, validated in scipy's vocabulary and normalised to sum to one.

    A new float64 array (the caller's is never touched). ``n`` (the number of points) is checked when
    given. Shape faults are reported before value faults, as scipy does.

    Examples
    --------
    >>> kde_weights([3, 1])
    array([0.75, 0.25])
    >>> kde_weights([1, -1], 2)
    Traceback (most recent call last):
    ...
    ValueError: `weights` must be non-negative (aweights cannot be negative).
    """
    return normalised_kde_weights(kde_weights_of_valid_shape(weights, n))


def kde_weights_of_valid_shape(weights: Any, n: int | None) -> NDArray[np.float64]:
    """``weights`` as a new float64 array, checked to be 1-D (of length ``n`` when given); scipy's messages."""
    w = np.atleast_1d(weights).astype(float)  # a copy: the caller's array is never touched
    if w.ndim != 1:
        raise ValueError("`weights` input should be one-dimensional.")
    if n is not None and len(w) != n:
        raise ValueError("`weights` input should be of length n")
    return w


def normalised_kde_weights(w: NDArray[np.float64]) -> NDArray[np.float64]:
    """Check the values of a float64 weight vector that the caller owns and normalise it in place.

    Finite weights of any scale are accepted, also those whose sum overflows float64 (each weight near
    ``1e308``): they are first scaled by the power of two that brings the largest into ``[0.5, 1)`` (exact,
    short of weights below ``2⁻¹⁰²²`` of the largest), so the sum is at most ``n`` and the normalised weights
    are, bit for bit, those of the unscaled division wherever that one does not overflow.

    Examples
    --------
    >>> normalised_kde_weights(np.array([1e308, 1e308, 1e308, 1e308]))  # Σw = 4e308 overflows
    array([0.25, 0.25, 0.25, 0.25])
    """
    if np.any(w < 0):
        raise ValueError("`weights` must be non-negative (aweights cannot be negative).")
    if not np.all(np.isfinite(w)):
        raise ValueError(
            "`weights` must be finite (array must not contain infs or NaNs); remove or replace them."
        )
    largest = float(w.max()) if w.size else 0.0
    if largest > 0:
        # w·2⁻ᵏ with the largest in [0.5, 1): every term < 1, so the sum (<= n) cannot overflow; a power of
        # two scales each weight and each partial sum exactly, so w / Σw keeps its bits.
        np.ldexp(w, -int(np.frexp(largest)[1]), out=w)
    total = w.sum()
    if not total > 0:
        raise ValueError(
            "`weights` must have a positive, finite sum; at least one weight must be positive "
            "(normalising needs a positive sum)."
        )
    w /= total
    return w
