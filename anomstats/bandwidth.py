"""Bandwidth rules shared by :class:`anomstats.GaussianKDE` and the torch adapter.

One home for:

* the rules of thumb :func:`scotts_factor` and :func:`silverman_factor` (as ``scipy.stats.gaussian_kde``
  defines them, with the effective sample size in place of ``n``);
* :func:`effective_sample_size` of a weight vector (Kish);
* :func:`resolve_bw_method` / :func:`bandwidth_factor`: what a ``bw_method`` argument (name, scalar or
  callable) means, with scipy's error for anything else;
* :func:`log_normalisation`: the log of the Gaussian kernel's normalising constant.

The kernel covariance of a Gaussian KDE is ``factor**2 * data_covariance``.

Examples
--------
>>> from anomstats import bandwidth
>>> print(f"{bandwidth.scotts_factor(100, 2):.6f}")
0.464159
>>> print(f"{bandwidth.bandwidth_factor('silverman', 100, 1):.6f}")
0.421685
>>> bandwidth.bandwidth_factor(0.25, 100, 2)
0.25
"""

from __future__ import annotations

from typing import Any, Callable, Union

import numpy as np

from ._rules import gaussian_log_normaliser
from ._weights import kde_weights

__all__ = [
    "BW_METHOD_ERROR",
    "scotts_factor",
    "silverman_factor",
    "effective_sample_size",
    "neff_of_normalised",
    "resolve_bw_method",
    "bandwidth_factor",
    "check_factor",
    "log_normalisation",
]

#: The message of the ``ValueError`` raised for an unusable ``bw_method`` (scipy's wording).
BW_METHOD_ERROR = "`bw_method` should be 'scott', 'silverman', a scalar or a callable."

BwMethod = Union[None, str, float, Callable[[Any], float]]


def scotts_factor(neff: float, d: int) -> float:
    """Scott's rule: ``neff ** (-1 / (d + 4))``.

    Parameters
    ----------
    neff : float
        Effective number of data points (``n`` when unweighted).
    d : int
        Number of dimensions.

    Returns
    -------
    float
        The bandwidth factor (evaluated exactly as scipy does, so results agree to the last bit).

    Examples
    --------
    >>> scotts_factor(16, 0)
    0.5
    """
    return float(np.power(neff, -1.0 / (d + 4)))


def silverman_factor(neff: float, d: int) -> float:
    """Silverman's rule: ``(neff * (d + 2) / 4) ** (-1 / (d + 4))``.

    Parameters
    ----------
    neff : float
        Effective number of data points (``n`` when unweighted).
    d : int
        Number of dimensions.

    Returns
    -------
    float
        The bandwidth factor.

    Examples
    --------
    >>> silverman_factor(32, 0)
    0.5
    """
    return float(np.power(neff * (d + 2.0) / 4.0, -1.0 / (d + 4)))


def effective_sample_size(weights) -> float:
    """Kish's effective sample size ``1 / sum(w**2)`` of weights normalised to sum to one.

    Parameters
    ----------
    weights : array_like, shape (n,)
        Non-negative weights with a positive, finite sum.

    Returns
    -------
    float
        Between 1 (one point carries all the weight) and ``n`` (equal weights).

    Raises
    ------
    ValueError
        If the weights are not one-dimensional, not finite, negative, or sum to zero.

    Examples
    --------
    >>> effective_sample_size([1, 1, 1, 1])
    4.0
    >>> effective_sample_size([3, 1])
    1.6
    """
    return float(neff_of_normalised(kde_weights(weights)))


def neff_of_normalised(weights: np.ndarray) -> np.float64:
    """:func:`effective_sample_size` of weights already validated and normalised to sum to one.

    Examples
    --------
    >>> float(neff_of_normalised(np.array([0.5, 0.5])))
    2.0
    """
    # np.vecdot, as scipy.stats.gaussian_kde uses, so that neff agrees to the last bit.
    return 1 / np.vecdot(weights, weights)


def resolve_bw_method(bw_method: BwMethod) -> BwMethod:
    """Validate a ``bw_method`` argument and return it in canonical form.

    Parameters
    ----------
    bw_method : None, str, scalar or callable
        ``None`` (keep the current rule; Scott's for a new estimator), ``'scott'``, ``'silverman'``,
        a scalar used directly as the factor, or a callable taking the estimator and returning the factor.

    Returns
    -------
    None, str, scalar or callable
        ``None``, ``'scott'``, ``'silverman'``, the scalar unchanged, or the callable.

    Raises
    ------
    ValueError
        For anything else (another string, an array, a 0-d array), with scipy's message.

    Examples
    --------
    >>> resolve_bw_method('scott')
    'scott'
    >>> resolve_bw_method(0.3)
    0.3
    >>> resolve_bw_method('gauss')
    Traceback (most recent call last):
    ...
    ValueError: `bw_method` should be 'scott', 'silverman', a scalar or a callable.
    """
    if bw_method is None:
        return None
    if isinstance(bw_method, str):
        if bw_method in ("scott", "silverman"):
            return bw_method
        raise ValueError(BW_METHOD_ERROR)
    if np.isscalar(bw_method):
        return bw_method
    if callable(bw_method):
        return bw_method
    raise ValueError(BW_METHOD_ERROR)


def bandwidth_factor(bw_method: BwMethod, neff: float, d: int, estimator: Any = None):
    """The bandwidth factor that ``bw_method`` gives for ``neff`` effective points in ``d`` dimensions.

    Parameters
    ----------
    bw_method : None, str, scalar or callable
        See :func:`resolve_bw_method`; ``None`` means Scott's rule.
    neff : float
        Effective number of data points.
    d : int
        Number of dimensions.
    estimator : object, optional
        Passed to a callable ``bw_method`` (scipy passes the KDE itself).

    Returns
    -------
    float or the scalar given
        The factor. A scalar ``bw_method`` is returned unchanged (as scipy stores it).

    Examples
    --------
    >>> print(f"{bandwidth_factor(None, 625, 0):.4f}")
    0.2000
    >>> bandwidth_factor(lambda kde: 0.5, 10, 1)
    0.5
    """
    rule = resolve_bw_method(bw_method)
    if rule is None or (isinstance(rule, str) and rule == "scott"):
        return scotts_factor(neff, d)
    if isinstance(rule, str) and rule == "silverman":
        return silverman_factor(neff, d)
    if callable(rule):
        return rule(estimator)
    return rule


def check_factor(factor: Any) -> None:
    """Raise ``ValueError`` unless ``factor`` is a positive, finite real number.

    Accepted: Python and NumPy real scalars (``True`` counts as 1) and real arrays holding one element
    (scipy uses such an array as the factor when a callable ``bw_method`` returns one).

    scipy accepts zero, negative and complex factors and then fails later (a singular-matrix error at
    evaluation) or returns negative "densities"; this library rejects them up front.

    Examples
    --------
    >>> check_factor(0.5)
    >>> check_factor(np.array(0.5))  # a 0-d (or one-element) real array, as a callable may return
    >>> check_factor(-1)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: The bandwidth factor must be a positive, finite real number; got -1. Pass a positive ...
    """
    ok = False
    if isinstance(factor, (int, float, np.integer, np.floating)) and not isinstance(factor, bool):
        ok = bool(np.isfinite(factor) and factor > 0)
    elif isinstance(factor, (bool, np.bool_)):
        ok = bool(factor)  # True acts as 1, as in scipy
    elif isinstance(factor, np.ndarray) and factor.size == 1 and factor.dtype.kind in "biuf":
        # A callable ``bw_method`` may return a 0-d (or one-element) array, e.g. from ``np.std``-style
        # helpers with ``keepdims``; scipy uses it as the factor, so it is accepted here too.
        value = factor.reshape(()).item()
        ok = bool(np.isfinite(value) and value > 0)
    if not ok:
        raise ValueError(
            f"The bandwidth factor must be a positive, finite real number; got {factor!r}. Pass a positive "
            "scalar, 'scott', 'silverman' or a callable returning a positive number as `bw_method`."
        )


def log_normalisation(log_det: float, d: int) -> float:
    """Log of the normalising constant ``(2 pi)^(-d/2) det(H)^(-1/2)`` of a Gaussian kernel.

    Parameters
    ----------
    log_det : float
        ``log det(H)`` of the kernel covariance ``H`` (without the ``2 pi`` factor; note that
        ``GaussianKDE.log_det`` follows scipy and *includes* it, so there the log-normalisation is simply
        ``-kde.log_det / 2``). For a Cholesky factor ``L`` of ``H`` this is ``2 * sum(log(diag(L)))``.
    d : int
        Number of dimensions.

    Returns
    -------
    float
        ``-(d * log(2 pi) + log_det) / 2``; adding it to ``-r2 / 2`` gives the kernel's log-density.

    Examples
    --------
    >>> print(f"{log_normalisation(0.0, 1):.6f}")
    -0.918939
    >>> import math
    >>> print(f"{math.exp(log_normalisation(0.0, 2)):.6f}")
    0.159155
    """
    return float(gaussian_log_normaliser(d, float(log_det)))
