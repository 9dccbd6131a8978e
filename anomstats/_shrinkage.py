"""Ledoit-Wolf and OAS shrinkage coefficients from sufficient statistics.

Both estimators shrink the *biased* (maximum-likelihood, divide by n) empirical covariance S of
centred data towards ``mu * I`` with ``mu = trace(S) / C``::

    shrunk = (1 - s) * S + s * mu * I

and differ only in the coefficient ``s``. Written here in terms of a few per-patch scalars so that a
batched fit never forms the squared data matrix that a direct implementation would:

* ``trace = trace(S)`` and ``frobenius_sq = sum(S**2)``;
* for Ledoit-Wolf only, ``fourth = sum_n ||x_n - mean||**4`` (the sum over observations of the squared
  squared-norms of the centred rows; it equals the sum of the entries of ``(X**2).T @ (X**2)``).

Both coefficients are homogeneous of degree 0 in ``S``: ``trace``, ``frobenius_sq`` and ``fourth`` divided by
``s``, ``s²`` and ``s²`` give the same coefficient, and for a power of two ``s`` that division is exact (the
coefficient is the same bit for bit). The squares of features of scale beyond about 1e77 (``sum(S**2)`` and the
fourth moments, ~scale⁴) overflow float64 while ``S`` and its inverse do not, and those of tiny features underflow:
the fits form these sums of ``S / s`` and of ``||x - mean||² / s`` with ``s`` from :func:`power_of_two_scale`
(1.0, no work at all, for every covariance of ordinary scale), see :func:`scaled_trace_and_frobenius`.

The formulas give scikit-learn's ``LedoitWolf`` / ``OAS`` (1.x) coefficients, including their
conventions: one feature means no shrinkage, OAS uses the simplified coefficient of scikit-learn >= 1.3
(clipped at 1), and Ledoit-Wolf clips ``beta`` at ``delta``. One documented difference: where scikit-learn
would divide 0 by 0 (Ledoit-Wolf with ``S`` exactly a multiple of the identity and rounding-negative
``beta``), the coefficient here is 0.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

__all__ = [
    "ledoit_wolf_coefficient",
    "oas_coefficient",
    "power_of_two_scale",
    "scaled_trace_and_frobenius",
    "shrink_in_place",
]


def power_of_two_scale(size: float, dtype: DTypeLike = np.float64) -> float:
    """The power of two ``s`` the shrinkage sums of a covariance with trace ``size`` are divided by.

    ``1.0`` while ``size`` lies within ``2**±(maxexp // 3)`` of ``dtype`` (float64: ``2**±341``; float32:
    ``2**±42``): there the squares (at most ``size²``, times ``C²`` or ``N²``) neither overflow nor leave the
    normal range. Outside, ``s = 2**e`` with ``size / s`` in [0.5, 1) (:func:`math.frexp`), so the divided sums are
    of order 1 (``C`` and ``N`` at most). ``1.0`` for a zero, negative or non-finite ``size`` too (nothing to
    scale, or a fault that is named elsewhere). The division by ``s`` is exact (a power of two), and the
    coefficients do not depend on it (see the module notes).

    Examples
    --------
    >>> power_of_two_scale(3.0), power_of_two_scale(2.0**532) == 2.0**533, power_of_two_scale(1e20, np.float32) == 2.0**67
    (1.0, True, True)
    """
    size = float(size)
    if not (math.isfinite(size) and size > 0):
        return 1.0
    limit = int(np.finfo(dtype).maxexp) // 3
    _, exponent = math.frexp(size)
    if -limit <= exponent <= limit:
        return 1.0
    return math.ldexp(1.0, exponent)


def scaled_trace_and_frobenius(lower: NDArray[np.floating], scale: float = 1.0) -> tuple[float, float]:
    """``(trace(S) / s, sum(S**2) / s²)`` of a symmetric ``S`` given by its lower triangle ``lower`` (C, C).

    The strict upper triangle of ``lower`` must be zero (the scratch matrix of the fits,
    :mod:`anomstats._patch_kernels`). ``scale`` (``s``) is a power of two (:func:`power_of_two_scale`): with
    ``1.0`` the sums are formed from ``lower`` itself, otherwise from an exactly rescaled copy, in ``lower``'s
    dtype either way.

    Examples
    --------
    >>> s = np.array([[2.0, 0.0], [1.0, 4.0]])           # [[2, 1], [1, 4]]: trace 6, sum of squares 22
    >>> scaled_trace_and_frobenius(s), scaled_trace_and_frobenius(s * 2.0**600, 2.0**601)
    ((6.0, 22.0), (3.0, 5.5))
    """
    if scale != 1.0:
        lower = np.ldexp(lower, -math.frexp(scale)[1] + 1)  # / scale, exactly (a power of two)
    c = lower.shape[-1]
    diagonal = lower.reshape(-1)[:: c + 1]
    trace = float(diagonal.sum())
    # the sum of the squares of the full symmetric matrix, from its lower triangle
    frobenius_sq = 2.0 * float(np.vdot(lower, lower)) - float(np.vdot(diagonal, diagonal))
    return trace, frobenius_sq


def ledoit_wolf_coefficient(
    trace: ArrayLike, frobenius_sq: ArrayLike, fourth: ArrayLike, n_samples: int, n_features: int
) -> NDArray[np.float64]:
    """Ledoit-Wolf shrinkage coefficient(s) in [0, 1].

    Parameters
    ----------
    trace, frobenius_sq : array_like
        ``trace(S)`` and ``sum(S**2)`` of the biased empirical covariance(s) S, or both divided by the same
        power of two (``s`` and ``s²``; see the module notes).
    fourth : array_like
        ``sum_n ||x_n - mean||**4`` over the observations (divided by ``s²`` when the others are divided).
    n_samples, n_features : int
        n and C.

    Returns
    -------
    ndarray
        The coefficient(s), broadcast over the inputs.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(30, 5)) @ rng.normal(size=(5, 5))
    >>> xc = x - x.mean(axis=0)
    >>> s = xc.T @ xc / 30
    >>> coef = ledoit_wolf_coefficient(np.trace(s), (s**2).sum(), ((xc**2).sum(1)**2).sum(), 30, 5)
    >>> print(f"{float(coef):.6f}")     # sklearn.covariance.ledoit_wolf_shrinkage(x) gives the same
    0.100376
    """
    trace = np.asarray(trace, dtype=np.float64)
    frobenius_sq = np.asarray(frobenius_sq, dtype=np.float64)
    fourth = np.asarray(fourth, dtype=np.float64)
    if n_features == 1:
        return np.zeros(np.broadcast(trace, frobenius_sq, fourth).shape)
    # beta: estimated variance of the sample covariance entries; delta: distance of S from mu*I.
    beta = (fourth / n_samples - frobenius_sq) / (n_features * n_samples)
    mu = trace / n_features
    delta = (frobenius_sq - 2.0 * mu * trace + n_features * mu**2) / n_features
    beta = np.minimum(beta, delta)
    with np.errstate(divide="ignore", invalid="ignore"):
        coef = np.where((beta == 0) | (delta == 0), 0.0, beta / delta)
    return np.asarray(coef, dtype=np.float64)


def oas_coefficient(trace: ArrayLike, frobenius_sq: ArrayLike, n_samples: int, n_features: int) -> NDArray[np.float64]:
    """Oracle Approximating Shrinkage coefficient(s) in [0, 1] (scikit-learn >= 1.3 formula).

    Parameters
    ----------
    trace, frobenius_sq : array_like
        ``trace(S)`` and ``sum(S**2)`` of the biased empirical covariance(s) S, or both divided by the same
        power of two (``s`` and ``s²``; see the module notes).
    n_samples, n_features : int
        n and C.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(30, 5)) @ rng.normal(size=(5, 5))
    >>> xc = x - x.mean(axis=0)
    >>> s = xc.T @ xc / 30
    >>> print(f"{float(oas_coefficient(np.trace(s), (s**2).sum(), 30, 5)):.6f}")  # as sklearn's OAS
    0.144325
    """
    trace = np.asarray(trace, dtype=np.float64)
    frobenius_sq = np.asarray(frobenius_sq, dtype=np.float64)
    if n_features == 1:
        return np.zeros(np.broadcast(trace, frobenius_sq).shape)
    alpha = frobenius_sq / n_features**2
    mu = trace / n_features
    num = alpha + mu**2
    den = (n_samples + 1) * (alpha - mu**2 / n_features)
    with np.errstate(divide="ignore", invalid="ignore"):
        coef = np.where(den == 0, 1.0, np.minimum(num / den, 1.0))
    return np.asarray(coef, dtype=np.float64)


def shrink_in_place(cov: NDArray[np.floating], coefficient: float) -> None:
    """Replace a symmetric ``(C, C)`` matrix S by ``(1 - s) * S + s * trace(S) / C * I``, in place.

    Examples
    --------
    >>> s = np.array([[2.0, 1.0], [1.0, 4.0]])
    >>> shrink_in_place(s, 0.5)
    >>> s
    array([[2.5, 0.5],
           [0.5, 3.5]])
    """
    c = cov.shape[-1]
    diagonal = np.einsum("ii->i", cov)  # a writable view, whatever the memory layout
    mu = float(diagonal.sum()) / c
    cov *= 1.0 - coefficient
    diagonal += coefficient * mu
