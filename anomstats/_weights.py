"""Validation of observation weights for the :func:`anomstats.cov` family.

Each check raises the exception type and message that :func:`numpy.cov` raises for the same bad
weights, in the same order, so that callers can switch between the two without changing their
error handling.  The arrays returned are never written to by anything in this package.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["as_frequency_weights", "as_analytic_weights"]


def _as_weight_vector(weights: Any, kind: str, n_obs: int) -> NDArray[np.float64]:
    """Shared shape and sign checks for a 1-D float64 weight vector of length ``n_obs``.

    ``weights`` is already a float64 array here; ``kind`` is ``"fweights"`` or ``"aweights"``
    and appears in the messages.
    """
    if weights.ndim > 1:
        raise RuntimeError(f"cannot handle multidimensional {kind}")
    if weights.ndim == 0:
        # numpy indexes ``shape[0]`` without checking for a scalar first; keep its IndexError
        # (type and text) so that error handling written against numpy keeps working.
        raise IndexError("tuple index out of range")
    if weights.shape[0] != n_obs:
        raise RuntimeError(f"incompatible numbers of samples and {kind}")
    if np.any(weights < 0):
        raise ValueError(f"{kind} cannot be negative")
    return weights


def as_frequency_weights(fweights: Any, n_obs: int) -> NDArray[np.float64]:
    """Return ``fweights`` as a validated 1-D float64 array of length ``n_obs``.

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
    """Return ``aweights`` as a validated 1-D float64 array of length ``n_obs``.

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
