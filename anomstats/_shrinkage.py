"""Ledoit-Wolf and OAS shrinkage coefficients from sufficient statistics.

Both estimators shrink the *biased* (maximum-likelihood, divide by n) empirical covariance S of
centred data towards ``mu * I`` with ``mu = trace(S) / C``::

    shrunk = (1 - s) * S + s * mu * I

and differ only in the coefficient ``s``. Written here in terms of a few per-patch scalars so that a
batched fit never forms the squared data matrix that a direct implementation would:

* ``trace = trace(S)`` and ``frobenius_sq = sum(S**2)``;
* for Ledoit-Wolf only, ``fourth = sum_n ||x_n - mean||**4`` (the sum over observations of the squared
  squared-norms of the centred rows; it equals the sum of the entries of ``(X**2).T @ (X**2)``).

The formulas give scikit-learn's ``LedoitWolf`` / ``OAS`` (1.x) coefficients, including their
conventions: one feature means no shrinkage, OAS uses the simplified coefficient of scikit-learn >= 1.3
(clipped at 1), and Ledoit-Wolf clips ``beta`` at ``delta``. One documented difference: where scikit-learn
would divide 0 by 0 (Ledoit-Wolf with ``S`` exactly a multiple of the identity and rounding-negative
``beta``), the coefficient here is 0.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["ledoit_wolf_coefficient", "oas_coefficient", "shrink_in_place"]


def ledoit_wolf_coefficient(
    trace: ArrayLike, frobenius_sq: ArrayLike, fourth: ArrayLike, n_samples: int, n_features: int
) -> NDArray[np.float64]:
    """Ledoit-Wolf shrinkage coefficient(s) in [0, 1].

    Parameters
    ----------
    trace, frobenius_sq : array_like
        ``trace(S)`` and ``sum(S**2)`` of the biased empirical covariance(s) S.
    fourth : array_like
        ``sum_n ||x_n - mean||**4`` over the observations.
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
        ``trace(S)`` and ``sum(S**2)`` of the biased empirical covariance(s) S.
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
