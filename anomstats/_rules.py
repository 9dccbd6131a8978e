"""The library's formulas, each written once: both packages (NumPy core and torch adapter) call these.

Everything here works on Python scalars and NumPy dtypes, never on arrays of data, so the torch adapter
imports it as it is and re-implements only the tensor kernels that apply the numbers.

* :data:`DEFAULT_RIDGE` and :func:`regularised_scale`: anomalib 2.x's regularisation of a per-patch
  covariance.
* :func:`covariance_normalisation` and :func:`degrees_of_freedom`: what a sum of centred products is
  divided by (numpy's ``aweights`` rule), and what happens when nothing is left to divide by.
* :func:`chan_merge_weights`: the scalar coefficients of Chan, Golub & LeVeque's pairwise update of
  means and centred sums.
* :func:`gaussian_log_normaliser`: ``log`` of a Gaussian's normalising constant.
* :func:`exp_floor` and :func:`trusted_sum_floor`: the log-sum-exp fallback policy of kernel sums.
* :func:`numerically_singular_pivot`: the rank test of a Cholesky factor (which pivots are rounding noise).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "DEFAULT_RIDGE",
    "DIRECT_MAX_D",
    "LOG_2PI",
    "DOF_WARNING",
    "ChanWeights",
    "chan_merge_weights",
    "covariance_normalisation",
    "degrees_of_freedom",
    "exp_floor",
    "gaussian_log_normaliser",
    "numerically_singular_pivot",
    "trusted_sum_floor",
]

#: anomalib 2.x's regularisation: 0.01·I added to the covariance, then 1e-5·I more.
DEFAULT_RIDGE: float = 0.01 + 1e-5

#: ``log(2π)``.
LOG_2PI: float = math.log(2.0 * math.pi)

#: Up to this dimension a Gaussian kernel's squared distances are formed by direct differences (rounding
#: relative to the distance itself); above it by one matrix product of augmented operands (rounding
#: relative to the squared norms of the centred, whitened points). Both packages' KDEs follow it. It was 2
#: until issue 12: in 2-D the direct route needs six element-wise passes per pair besides the exponential
#: (3.9x the machine's floor, measured), the product route one BLAS pass (1.9x); its rounding, about
#: ``eps·(|y|² + |x|²)`` in the exponent instead of ``eps·|y − x|²``, stays within the tested error model
#: (1e-13 relative for data of 10⁴ points). In 1-D the direct route costs about what the product does.
DIRECT_MAX_D: int = 1

#: Above ``DIRECT_MAX_D``, the product route is taken only while the whitened data lie within this many
#: bandwidths of their centre (:func:`product_route_is_accurate`).
PRODUCT_MAX_RADIUS: float = 500.0


def product_route_is_accurate(squared_radius: float) -> bool:
    """Whether a KDE's kernel exponents may come from the expanded square (one matrix product).

    ``squared_radius`` is the largest squared norm of the whitened, centred kernel centres (in bandwidths).
    The product route's exponent ``y·t − |y|²/2 − |t|²/2`` is off by about ``eps·(|y|² + |t|²)`` in absolute
    terms, the relative error of that pair's kernel value; for the pairs that carry a density (a query near a
    centre, both within the radius ``R``) that is ``2·eps·R²``. Data spread far wider than the bandwidth (a
    narrow explicit ``kernel_covariance``, a tiny factor, distant clusters) would be scored hundreds of nats
    off; beyond ``R = PRODUCT_MAX_RADIUS`` (an error of at most ``5e5·eps``: 1.1e-10 in float64) both
    packages form the squared distances by direct differences, whose rounding is relative to the distance.

    Examples
    --------
    >>> product_route_is_accurate(30.0**2), product_route_is_accurate(1e18)
    (True, False)
    """
    return bool(squared_radius <= PRODUCT_MAX_RADIUS**2)

#: numpy.cov's warning text when the normalisation is not positive.
DOF_WARNING: str = "Degrees of freedom <= 0 for slice"


def covariance_normalisation(sum_weights: Any, sum_squared_weights: Any, ddof: int) -> Any:
    """What the centred sums of products are divided by: ``Σw − ddof·Σw²/Σw`` (``Σw`` when ddof is 0).

    This is numpy's rule for ``aweights``. ``sum_squared_weights=None`` means unit or frequency weights
    (``Σw²/Σw = 1`` per observation): then it is ``Σw − ddof``, e.g. ``N − ddof``, computed as such.

    Examples
    --------
    >>> covariance_normalisation(10, None, 1)
    9
    >>> covariance_normalisation(10.0, 10.0, 1)
    9.0
    >>> covariance_normalisation(3.0, 5.0, 0)
    3.0
    """
    if ddof == 0:
        return sum_weights
    if sum_squared_weights is None:
        return sum_weights - ddof
    if sum_weights == 0:
        return -math.inf if ddof > 0 else math.inf
    # numpy's order of operations (ddof·Σw² first) and the operands' own types (a long double or
    # complex total stays one), so results agree with numpy.cov to the last bit.
    return sum_weights - ddof * sum_squared_weights / sum_weights


def degrees_of_freedom(
    sum_weights: Any, sum_squared_weights: Any, ddof: int, *, on_nonpositive: str = "warn", count: int | None = None
) -> Any:
    """:func:`covariance_normalisation` with the library's policy for a normalisation ``<= 0``.

    Parameters
    ----------
    sum_weights, sum_squared_weights : float
        ``Σw`` and ``Σw²`` of the observations (both ``N`` without weights).
    ddof : int
        Delta degrees of freedom.
    on_nonpositive : {"warn", "raise"}
        ``"warn"``: numpy's behaviour for a one-shot estimate (:func:`anomstats.cov`,
        :func:`anomstats.batched_cov`): a ``RuntimeWarning`` :data:`DOF_WARNING`, and the normalisation
        is returned as it is (the caller turns it into inf/nan as numpy does). ``"raise"``: an
        accumulated state (:class:`anomstats.RunningMoments`) raises ``ValueError`` naming ddof.
    count : int, optional
        Observations seen, for the ``"raise"`` message.

    Examples
    --------
    >>> degrees_of_freedom(5.0, 5.0, 1)
    4.0
    >>> degrees_of_freedom(1.0, 1.0, 1, on_nonpositive="raise", count=1)
    Traceback (most recent call last):
    ...
    ValueError: ddof=1 leaves no degrees of freedom: the normalisation sum_weights - ddof*sum_squared_weights/sum_weights is 0 with count=1 observations; use a smaller ddof or update with more observations
    """
    norm = covariance_normalisation(sum_weights, sum_squared_weights, ddof)
    if not norm <= 0:  # NaN (from NaN weights) passes, as in numpy
        return norm
    if on_nonpositive == "raise":
        raise ValueError(
            f"ddof={ddof} leaves no degrees of freedom: the normalisation "
            f"sum_weights - ddof*sum_squared_weights/sum_weights is {norm:g} with "
            f"count={count} observations; use a smaller ddof or update with more observations"
        )
    warnings.warn(DOF_WARNING, RuntimeWarning, stacklevel=3)
    return norm


class ChanWeights(NamedTuple):
    """Scalar coefficients of one pairwise merge of states with total weights ``w_a`` and ``w_b``."""

    total: float
    """``W = w_a + w_b``."""
    mean_step: float
    """``w_b / W``: the merged mean is ``μ_a + δ·mean_step`` with ``δ = μ_b − μ_a``."""
    cross: float
    """``w_a·w_b / W``: the merged centred sums are ``M_a + M_b + δδᴴ·cross``."""


def chan_merge_weights(w_a: float, w_b: float) -> ChanWeights:
    """Chan, Golub & LeVeque's (1979) pairwise update, its scalar part.

    With totals ``w_a``, ``w_b``, means ``μ_a``, ``μ_b`` and centred sums ``M_a``, ``M_b``::

        W = w_a + w_b,   δ = μ_b − μ_a,   μ = μ_a + δ·w_b/W,   M = M_a + M_b + δδᴴ·w_a·w_b/W.

    Only differences of means and centred quantities appear, never ``Σxxᴴ − n·μμᴴ``, so data far from
    the origin keeps its digits. An empty side (weight 0) gives ``cross = 0``.

    Examples
    --------
    >>> chan_merge_weights(3.0, 1.0)
    ChanWeights(total=4.0, mean_step=0.25, cross=0.75)
    >>> chan_merge_weights(0.0, 2.0)
    ChanWeights(total=2.0, mean_step=1.0, cross=0.0)
    """
    total = float(w_a) + float(w_b)
    if total == 0:
        return ChanWeights(0.0, 0.0, 0.0)
    return ChanWeights(total, float(w_b) / total, float(w_a) * float(w_b) / total)


def gaussian_log_normaliser(n_dims: int, log_det: Any) -> Any:
    """``log`` of ``(2π)^(−d/2)·det(Σ)^(−1/2)``: ``−(d·log 2π + log det Σ) / 2``.

    ``log_det`` may be a float or an array (one per patch); for a Cholesky factor ``L`` of ``Σ`` it is
    ``2·Σ log diag(L)``, never the log of a product of the diagonal (which overflows).

    Examples
    --------
    >>> print(f"{gaussian_log_normaliser(1, 0.0):.6f}")
    -0.918939
    """
    return -0.5 * (n_dims * LOG_2PI + log_det)


def exp_floor(dtype: Any) -> float:
    """Smallest exponent a kernel sum keeps: ``exp`` of anything lower would be subnormal.

    Subnormal results make ``exp`` 10-80x slower on x86 CPUs. Raising such exponents to this floor adds
    at most ``e·tiny`` per unit of weight, negligible against :func:`trusted_sum_floor`.

    Examples
    --------
    >>> print(f"{exp_floor(np.float64):.2f}")
    -707.40
    """
    return float(np.log(np.finfo(dtype).tiny)) + 1.0  # np.log: a long double tiny is 0 as a float


def trusted_sum_floor(dtype: Any, total_weight: float = 1.0) -> Any:
    """A plain sum of clamped exponentials at or above this is accurate to ``eps/16`` relative.

    Each clamped term is off by at most ``e·tiny`` per unit of weight (:func:`exp_floor`), so a sum of
    total weight ``W`` carries an absolute error of at most ``e·tiny·W``: sums above ``16·e·tiny·W/eps``
    are trusted; smaller ones are recomputed by a log-sum-exp shifted by the row's largest exponent.

    Examples
    --------
    >>> bool(trusted_sum_floor(np.float64) < 1e-290)
    True
    """
    info = np.finfo(dtype)
    # In the dtype itself: a long double tiny is 0 as a Python float.
    return info.tiny * info.dtype.type(16.0 * math.e * float(total_weight)) / info.eps


def numerically_singular_pivot(factor_diagonal: Any, variances: Any, eps_dtype: Any = None, *, eps: float | None = None) -> int:
    """1-based order of the first Cholesky pivot that is rounding noise, or 0 when there is none.

    The library's rank test for a covariance ``A = L Lᵀ`` that must be definite (a KDE's data
    covariance, an unregularised patch covariance). Pivot ``k`` counts as zero when
    ``L_kk² <= n·eps·A_kk``: ``L_kk²`` is the share of feature ``k``'s variance not explained by the
    earlier features, and a feature that is an exact linear combination of others leaves only rounding
    there (a few ``eps·A_kk``). Like :func:`numpy.linalg.matrix_rank`'s ``S.max()·max(M, N)·eps``, the
    tolerance comes from eps, the size and the data's own scale, so the verdict does not depend on
    whether rounding happens to let the factorisation finish.

    Parameters
    ----------
    factor_diagonal, variances : array_like, shape (n,)
        ``L``'s diagonal and ``A``'s diagonal (NumPy arrays; the torch adapter passes ``.cpu().numpy()``
        of these n numbers).
    eps_dtype : dtype, optional
        Whose eps: the dtype the *data* came in (float32 data rounded a combination of features to
        float32, so its noise is float32's even when the covariance is accumulated in float64).
        Defaults to ``variances``' dtype.
    eps : float, optional
        The eps itself, overriding ``eps_dtype`` (a rank test whose eps is derived from several dtypes).

    Examples
    --------
    >>> import numpy as np
    >>> numerically_singular_pivot(np.array([1.0, 1e-9]), np.array([1.0, 1.0]))
    2
    >>> numerically_singular_pivot(np.array([1.0, 1e-3]), np.array([1.0, 1.0]))
    0
    """
    diag = np.asarray(factor_diagonal, dtype=np.float64)
    var = np.asarray(variances)
    n = var.shape[0]
    if eps is None:
        eps = float(np.finfo(var.dtype if eps_dtype is None else eps_dtype).eps)
    # n·eps < 1 scales the variances down: no overflow for any finite variance.
    bad = np.square(diag) <= (n * float(eps)) * var.astype(np.float64)
    return int(np.argmax(bad)) + 1 if bad.any() else 0



def covariance_noise_variance(
    variances: Any, means: Any, n_observations: int, data_eps: Any = None, exponents: Any = None
) -> np.ndarray:
    """Per feature, the variance that rounding alone can put into a computed covariance's diagonal direction.

    The noise scale of the library's rank test of a data covariance
    (:func:`anomstats.bandwidth.check_data_covariance`): a feature whose variance, or whose share left
    unexplained by the other features, is within a few of these is constant, or a linear combination of the
    others, to rounding. Four sources, per feature with variance ``σ²`` and mean ``μ``::

        ν² = 4·eps_data²·(σ² + μ²)  +  acc·σ²  +  acc²·μ²  +  n·2⁻¹⁰⁷⁴,    acc = (16 + √n)·eps64

    * the data's own rounding: a feature computed from others and stored in the data's dtype (float32 data
      were rounded to float32 even when the covariance is accumulated in float64) carries noise of
      ``eps_data·|x|`` per value, a variance of at most ``eps_data²·(σ² + μ²)`` (measured over collinear
      float32 and float16 draws, offsets up to 1e3 σ: at most 0.12·D times ``eps_data²·(1 + μ²/σ²)``);
    * the accumulation of the ``n`` centred products in float64, ``acc·σ²`` relative to the entries (the
      typical ``√n`` growth of a BLAS sum, plus a few eps of the factorisation: measured up to 4.6·D·eps64
      with NumPy for n <= 3000 and 63·D·eps64 with torch for n = 1e6);
    * the rounding of the mean, which shifts every centred value by up to ``acc·|μ|``;
    * the absolute rounding of subnormal products (features of variance below about ``1e-290``): each of the
      ``n`` products rounds to half a unit of ``2⁻¹⁰⁷⁴`` (sums of subnormals are exact), at most
      ``n·2⁻¹⁰⁷⁵`` per entry, doubled here.

    ``data_eps`` is the machine epsilon of the data's dtype (``None`` or 0 for integer and bool data, which are
    exact). ``exponents`` (integers ``e_k``, default 0) says that the features were rescaled by powers of two
    ``2^-e_k`` before the call (``variances`` by ``2^-2e_k``, ``means`` by ``2^-e_k``): the result is then in
    those units too (the fourth term, absolute, is scaled by ``2^-2e_k``; the others scale by themselves).
    :func:`anomstats.bandwidth.check_data_covariance` scales each feature so that ``max(σ, |μ|)`` is of order
    one: the squares of the means cannot overflow, nor the noise underflow, at any representable scale.
    Works on arrays of D numbers (float64 NumPy; the torch adapter passes ``.cpu().numpy()``).

    Examples
    --------
    >>> nu2 = covariance_noise_variance(np.array([1.0]), np.array([0.0]), 100, np.finfo(np.float32).eps)
    >>> bool(5e-14 < nu2[0] < 1e-13)  # 4·eps32² (float32 rounding) dominates 26·eps64 (accumulation)
    True
    """
    var = np.asarray(variances, dtype=np.float64)
    # Bound: μ² overflows beyond |μ| ~ 1.3e154 and the noise underflows for σ² below ~1e-300; callers that may
    # meet such features pass them scaled to max(σ, |μ|) ~ 1 (check_data_covariance), where every term below
    # is within [acc²/4, 1) or is 0.
    mean_sq = np.square(np.asarray(means, dtype=np.float64))
    eps64 = float(np.finfo(np.float64).eps)
    n = max(int(n_observations), 1)
    acc = (16.0 + math.sqrt(n)) * eps64
    own = 0.0 if data_eps is None else float(data_eps)
    scale = np.zeros(var.shape, dtype=int) if exponents is None else np.asarray(exponents, dtype=int)
    # n·2⁻¹⁰⁷⁴ is exact (a subnormal) for n < 2⁵²; scaled by 2^-2e_k it is exact too, or 0 where negligible.
    with np.errstate(under="ignore", over="ignore"):  # inf only for data of subnormal values: then "constant"
        subnormal = np.ldexp(np.full(var.shape, n * 2.0**-1074), -2 * scale)
    return 4.0 * own * own * (var + mean_sq) + acc * var + acc * acc * mean_sq + subnormal


#: The first-order rank test (:func:`numerically_singular_pivot` with :func:`rank_test_eps`) uses at least
#: this many eps of the dtype the covariance is formed in: data exactly in a subspace leave relative Schur
#: complements of a few ``D·eps`` (up to 4.6·D·eps64 measured over 1600 collinear float64 draws, pivoted).
RANK_TEST_MIN_ULPS: float = 16.0


def rank_test_eps(data_eps: Any = None) -> float:
    """The eps of :func:`numerically_singular_pivot` for a covariance of data whose dtype has eps ``data_eps``.

    ``max(data_eps, RANK_TEST_MIN_ULPS·eps64)``: float32 (float16, bfloat16) data rounded every linear
    combination of features to their own precision; float64, integer and bool data (``None``) are limited by
    the float64 accumulation (:data:`RANK_TEST_MIN_ULPS`). (The KDE's test scales the noise per feature
    instead, :func:`covariance_noise_variance`.)

    Examples
    --------
    >>> rank_test_eps(np.finfo(np.float32).eps) == float(np.finfo(np.float32).eps)
    True
    >>> rank_test_eps(None) == 16 * float(np.finfo(np.float64).eps)
    True
    """
    floor = RANK_TEST_MIN_ULPS * float(np.finfo(np.float64).eps)
    return floor if data_eps is None else max(float(data_eps), floor)
