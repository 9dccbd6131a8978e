"""Bandwidth rules shared by :class:`anomstats.GaussianKDE` and the torch adapter.

One home for:

* the rules of thumb :func:`scotts_factor` and :func:`silverman_factor` (as ``scipy.stats.gaussian_kde``
  defines them, with the effective sample size in place of ``n``);
* :func:`effective_sample_size` of a weight vector (Kish);
* :func:`resolve_bw_method` / :func:`bandwidth_factor`: what a ``bw_method`` argument (name, scalar or
  callable) means, with scipy's error for anything else;
* :func:`log_normalisation`: the log of the Gaussian kernel's normalising constant;
* :func:`check_kernel_covariance`: what an explicit kernel covariance must be;
* data-driven selection by the leave-one-out likelihood: :func:`loo_log_likelihood` (the objective),
  :func:`cv_ml_factor` (the factor of scipy's model, ``bw_method='cv_ml'``) and
  :func:`cv_ml_bandwidths` (one bandwidth per dimension, statsmodels' ``bw='cv_ml'`` objective).

The kernel covariance of a Gaussian KDE is ``factor**2 * data_covariance`` (scipy's model), or an
explicit ``kernel_covariance``.

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
from scipy import linalg, optimize
from scipy.linalg import lapack

from ._budget import DEFAULT_MEMORY_BUDGET
from ._kernel_sums import WhitenedCentres, leave_one_out_sums, whiten
from ._rules import covariance_noise_variance, gaussian_log_normaliser
from ._validation import (
    NON_FINITE_DATA,
    check_kde_data_shape,
    check_memory_budget,
    check_workers,
    singular_data_message,
)
from ._weights import kde_weights
from .covariance import cov

__all__ = [
    "BW_METHOD_ERROR",
    "BW_METHOD_AND_KERNEL_COVARIANCE",
    "scotts_factor",
    "silverman_factor",
    "effective_sample_size",
    "neff_of_normalised",
    "resolve_bw_method",
    "bandwidth_factor",
    "check_factor",
    "log_normalisation",
    "check_kernel_covariance",
    "check_data_covariance",
    "data_eps",
    "loo_log_likelihood",
    "cv_ml_factor",
    "cv_ml_bandwidths",
]

#: The message of the ``ValueError`` raised for an unusable ``bw_method`` (scipy's wording, which does not
#: name this library's extra rule ``'cv_ml'``; the docstrings do).
BW_METHOD_ERROR = "`bw_method` should be 'scott', 'silverman', a scalar or a callable."

#: The message of the ``ValueError`` raised when a KDE is given both a ``bw_method`` and a
#: ``kernel_covariance`` (both packages' KDEs).
BW_METHOD_AND_KERNEL_COVARIANCE = (
    "Pass either `bw_method` or `kernel_covariance`, not both: an explicit kernel covariance "
    "replaces the bandwidth rule."
)

#: The names of the rules a ``bw_method`` string may give.
BW_RULES = ("scott", "silverman", "cv_ml")

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
        Non-negative, finite weights with a positive sum (of any scale: a sum that overflows float64 is
        normalised exactly, see :func:`anomstats._weights.normalised_kde_weights`).

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
        ``'cv_ml'`` (the factor maximising the leave-one-out likelihood, :func:`cv_ml_factor`), a scalar
        used directly as the factor, or a callable taking the estimator and returning the factor.

    Returns
    -------
    None, str, scalar or callable
        ``None``, one of the rule names, the scalar unchanged, or the callable.

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
        if bw_method in BW_RULES:
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
        Passed to a callable ``bw_method`` (scipy passes the KDE itself). For ``'cv_ml'`` it must have
        ``dataset`` (d, n) and ``weights`` (n,), whose :func:`cv_ml_factor` is returned.

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
    if isinstance(rule, str) and rule == "cv_ml":
        if not (hasattr(estimator, "dataset") and hasattr(estimator, "weights")):
            raise ValueError(
                "bw_method='cv_ml' selects the factor from the data: pass an estimator with `dataset` (d, n) "
                "and `weights`, or call anomstats.bandwidth.cv_ml_factor(dataset, weights) directly."
            )
        return cv_ml_factor(estimator.dataset, estimator.weights)
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


# ---------------------------------------------------------------------------- explicit kernel covariance


def check_kernel_covariance(kernel_covariance: Any, d: int) -> np.ndarray:
    """Validate an explicit kernel covariance ``H`` for data of ``d`` dimensions.

    Parameters
    ----------
    kernel_covariance : array_like, shape (d, d)
        Real, finite, symmetric and positive definite (a scalar is accepted for ``d == 1``).
    d : int
        The data's number of dimensions.

    Returns
    -------
    ndarray, shape (d, d)
        A new read-only float64 array, exactly symmetric (``(H + H.T) / 2``).

    Raises
    ------
    ValueError
        If ``H`` is not real, not of shape (d, d), not finite, not symmetric to rounding
        (``|H - H.T| <= 4 d eps max|H|``, the rounding of a product such as ``A @ A.T``), or not
        positive definite (smallest eigenvalue at most ``d eps`` times the largest, as
        ``numpy.linalg.matrix_rank`` counts a rank deficit).

    Examples
    --------
    >>> check_kernel_covariance([[1.0, 0.5], [0.5, 2.0]], 2)
    array([[1. , 0.5],
           [0.5, 2. ]])
    >>> check_kernel_covariance([[1.0, 2.0], [2.0, 1.0]], 2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: `kernel_covariance` must be positive definite; its smallest eigenvalue is -1 ...
    """
    raw = np.asarray(kernel_covariance)
    if raw.dtype.kind not in "biuf":
        raise ValueError(
            f"`kernel_covariance` must be an array of real numbers; got dtype {raw.dtype}. Pass a symmetric "
            "positive-definite (d, d) float array."
        )
    h = np.array(raw, dtype=np.float64)  # a copy: the caller's array is never touched
    if h.ndim == 0 and d == 1:
        h = h.reshape(1, 1)
    if h.shape != (d, d):
        raise ValueError(
            f"`kernel_covariance` must have shape ({d}, {d}), the data's number of dimensions; got shape "
            f"{h.shape}."
        )
    if not np.all(np.isfinite(h)):
        raise ValueError("`kernel_covariance` must contain only finite values; remove the NaN or infinite entries.")
    eps = np.finfo(np.float64).eps
    asymmetry = float(np.abs(h - h.T).max())
    if asymmetry > 4 * d * eps * float(np.abs(h).max()):
        raise ValueError(
            f"`kernel_covariance` must be symmetric; H - H.T has entries up to {asymmetry:.3g}. Pass "
            "(H + H.T) / 2 if the asymmetry is intended to be rounding."
        )
    h = (h + h.T) / 2
    eigenvalues = linalg.eigvalsh(h)
    if not eigenvalues[0] > d * eps * abs(eigenvalues[-1]):
        raise ValueError(
            f"`kernel_covariance` must be positive definite; its smallest eigenvalue is {eigenvalues[0]:.3g} "
            f"against a largest of {eigenvalues[-1]:.3g}. Add a multiple of the identity, or drop the "
            "redundant dimensions."
        )
    h.setflags(write=False)
    return h


# ---------------------------------------------------------------------------- the data covariance's rank


def data_eps(dtype: Any) -> float | None:
    """Machine epsilon of a floating data dtype (float16, float32, float64, long double), else ``None``.

    The ``eps`` of :func:`check_data_covariance`: integer and bool data carry no rounding of their own. (The
    torch adapter passes ``torch.finfo(dtype).eps``, which also covers bfloat16.)

    Examples
    --------
    >>> data_eps(np.float32) == float(np.finfo(np.float32).eps), data_eps(np.int64)
    (True, None)
    """
    dtype = np.dtype(dtype)
    return float(np.finfo(dtype).eps) if dtype.kind == "f" else None


def check_data_covariance(covariance: Any, means: Any, n_observations: int, eps: Any = None) -> None:
    """Refuse a KDE's data covariance that is singular to rounding: a rank test, not a Cholesky that may pass.

    The library's rank test of a data covariance (both packages' KDEs, and ``bw_method='cv_ml'``). Each
    feature ``k`` is measured in units of the variance that rounding alone can put there,
    ``ν_k²`` (:func:`anomstats._rules.covariance_noise_variance`: the data's own eps, the float64
    accumulation over the ``n`` points, the rounding of the mean, the absolute rounding of subnormal
    products), i.e. the test factors
    ``Ã = diag(1/ν) A diag(1/ν)``:

    * a feature with ``Ã_kk = σ_k²/ν_k² <= D`` has no variance beyond rounding: it is constant;
    * otherwise ``Ã`` is factored by a Cholesky decomposition with diagonal pivoting (LAPACK ``dpstrf``),
      each step taking the feature with the most variance left unexplained by the features already taken;
      a pivot ``L_kk² <= D`` means that the others explain feature ``k`` up to ``D`` times its rounding
      noise: it is, to rounding, a linear combination of them. This is
      :func:`anomstats._rules.numerically_singular_pivot`'s criterion (a pivot of ``D`` noise units), with
      the noise of each feature in place of ``eps·A_kk`` and with pivoting, which keeps the multipliers
      bounded: without it, a combination with coefficients 1e-3..1e3 left up to 1e11·eps of a dependent
      feature's variance in measurements, so no tolerance on unpivoted factors decides reliably.

    Each feature is first rescaled by a power of two (exact, and the test is invariant to it), so that means
    up to float64's range (where ``μ²`` overflows) and variances down to subnormal ones (where ``ν_k²``
    underflows) are measured as those of order one are: full-rank data pass at any scale where their
    covariance is finite and its spread above the absolute rounding of subnormal products.

    The feature named is the first, in index order, that is a combination of the features before it: the
    smallest ``k`` whose features ``0..k`` fail the test while ``0..k-1`` pass (found by bisection, at most
    ``log2(D)`` more factorisations, on the error path only). The pivot order cannot decide this: features of
    equal noise-scaled variance (a duplicate, or any features of negligible mean, whose scaled variances are
    all about ``1/acc``) are taken in an order that rounding decides, so two covariances of the same data
    rounded differently (NumPy's and torch's) would name different features of the same dependency.

    Data exactly in a subspace left pivots of at most 0.12·D noise units (float32, float16 data) and
    0.3·D (float64, NumPy n <= 3000; 0.06·D with torch at n = 1e6) in measured draws, so the verdict does
    not depend on rounding; data that are full rank beyond ``D`` noise units, however ill-conditioned,
    pass (scipy accepts them too).

    Parameters
    ----------
    covariance : array_like, shape (D, D)
        The (weighted) data covariance, finite.
    means : array_like, shape (D,)
        The (weighted) means of the features.
    n_observations : int
        Number of data points.
    eps : float, optional
        The machine epsilon of the data's dtype (:func:`data_eps`); ``None`` for integer or bool data.

    Raises
    ------
    numpy.linalg.LinAlgError
        With :func:`anomstats._validation.singular_data_message`, naming the first constant feature, or the
        first feature that is a combination of features of smaller index.

    Examples
    --------
    >>> x = np.array([[0.0, 1.0, 2.0, 4.0], [1.0, 3.0, 5.0, 9.0]])  # the second row is 2 x + 1
    >>> check_data_covariance(np.cov(x), x.mean(axis=1), 4, data_eps(x.dtype))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    numpy.linalg.LinAlgError: The data appears to lie in a lower-dimensional subspace ...: feature 1 (0-based, of 2) is, to rounding, a linear combination of the other features...
    >>> y = x[:, :3] ** 2
    >>> check_data_covariance(np.cov(y), y.mean(axis=1), 3, data_eps(y.dtype))  # full rank: passes
    """
    a = np.array(np.atleast_2d(covariance), dtype=np.float64)
    d = a.shape[0]
    # Each feature k is first rescaled by the power of two 2**-e_k with max(σ_k, |μ_k|) in [0.5, 1) (zero
    # features keep e_k = 0): the test is invariant to it, and it is exact, so the verdict and the scaled
    # matrix below keep their bits wherever the unscaled computation stays in range. Without it the noise
    # model squares the means (μ² overflows beyond |μ| ~ 1.3e154: every feature "constant") and the noise of
    # features of subnormal variance underflows (σ ~ 1e-155: "a linear combination"). Bound: after the
    # scaling |μ_k| < 1 and σ_k² < 1, so the relative terms of ν_k² sum to less than 8·eps_data² + acc + acc²
    # < 1 (no overflow), and to at least acc·σ_k² + acc²·μ_k² >= acc²/4 ~ 1e-29 (no underflow) unless
    # σ_k = μ_k = 0; the absolute term of subnormal products, n·2**(-1074 - 2·e_k), is scaled with them.
    variances = np.diagonal(a).copy()
    mean_values = np.asarray(means, dtype=np.float64).reshape(-1)
    with np.errstate(invalid="ignore"):
        spread = np.maximum(np.sqrt(variances), np.abs(mean_values))
    exponents = np.where(spread > 0, np.frexp(spread)[1], 0)
    a = np.ldexp(a, -(exponents[:, None] + exponents[None, :]))
    variances = np.diagonal(a).copy()
    mean_values = np.ldexp(mean_values, -exponents)
    noise = np.sqrt(covariance_noise_variance(variances, mean_values, n_observations, eps, exponents))
    with np.errstate(divide="ignore", invalid="ignore"):
        signal = variances / np.square(noise)
    constant = ~(signal > d)  # zero variance included (0/0 is NaN: a constant zero feature)
    if constant.any():
        raise linalg.LinAlgError(singular_data_message(int(np.argmax(constant)), d, constant=True))
    if d == 1:
        return
    scale = 1.0 / noise
    scaled = a * scale[:, None] * scale[None, :]
    # dpstrf stops at the first pivot <= tol: rank < d when some feature is, to rounding, a combination of
    # the others. Which one its pivot order leaves out can hinge on rounding (features of equal noise-scaled
    # variance, e.g. a duplicate), so the feature named is chosen by index instead (_first_dependent_feature).
    if _passes_rank_test(scaled, d):
        return
    raise linalg.LinAlgError(singular_data_message(_first_dependent_feature(scaled, d), d))


def _passes_rank_test(scaled: np.ndarray, tol: float) -> bool:
    """Whether the noise-scaled covariance ``scaled`` is full rank: every pivot of its pivoted Cholesky > ``tol``."""
    rank = lapack.dpstrf(scaled, tol=float(tol), lower=1)[2]
    return bool(rank == scaled.shape[0])


def _first_dependent_feature(scaled: np.ndarray, tol: float) -> int:
    """The feature that :func:`check_data_covariance` names: the smallest ``k`` whose features ``0..k`` fail the
    rank test while ``0..k-1`` pass (a bisection; the first feature passes, the whole set fails).

    Feature ``k`` is then, to rounding, a combination of features of smaller index: one of the dependency, and
    the same in both packages whatever the rounding of their covariances, unless a prefix's smallest pivot
    lies within rounding of the tolerance itself (data near the threshold, not in a subspace). A pivot order
    would instead name whichever feature of equal noise-scaled variance rounding puts last.
    """
    passing, failing = 0, scaled.shape[0] - 1  # the first feature passes: it is not constant
    while failing - passing > 1:
        middle = (passing + failing) // 2
        if _passes_rank_test(scaled[: middle + 1, : middle + 1], tol):
            passing = middle
        else:
            failing = middle
    return failing


# ---------------------------------------------------------------------------- leave-one-out likelihood


def _as_dataset(dataset: Any) -> np.ndarray:
    """Data (d, n) as given, checked to be real and 2-D (scipy's layout)."""
    data = np.atleast_2d(np.asarray(dataset))
    if data.ndim != 2:
        raise ValueError(
            f"`dataset` should be 1-D (n,) or 2-D (d, n) with points as columns; got shape {data.shape}."
        )
    if data.dtype.kind not in "biuf":
        raise ValueError(f"`dataset` must hold real numbers; got dtype {data.dtype}.")
    return data


def _selection_data(dataset: Any, weights: Any) -> tuple[np.ndarray, np.ndarray]:
    """Data (d, n) as float64 and normalised weights, checked as the KDE checks them (scipy's messages)."""
    data = _as_dataset(dataset)
    data = data.astype(np.float64)  # long double data are selected in float64
    if not np.all(np.isfinite(data)):
        raise ValueError(NON_FINITE_DATA)
    n = data.shape[1]
    w = np.full(n, 1.0 / n) if weights is None else kde_weights(weights, n)
    if w.min() == w.max():
        # Equal weights are no weights: take exactly 1/n (renormalising them rounds), so that a KDE's own
        # uniform weights and no weights select the same bandwidth to the last bit.
        w = np.full(n, 1.0 / n)
    if np.count_nonzero(w) < 2:
        raise ValueError(
            "The leave-one-out likelihood needs at least two points of positive weight; got "
            f"{np.count_nonzero(w)}."
        )
    return data, w


class _LeaveOneOut:
    """The weighted mean leave-one-out log-density of a Gaussian KDE, with its gradient, for one dataset.

    The points of positive weight are centred at the weighted mean and whitened once by ``base`` (lower
    triangular, ``B``); a kernel covariance is then ``H = B diag(s**2) B.T`` for per-coordinate scales
    ``s = exp(log_scales)``: ``s = 1`` for an explicit ``H = B B.T``, ``s = f`` for scipy's model
    (``B`` the data covariance's factor), ``s = h / sigma`` per dimension (``B = diag(sigma)``).

    With ``y = z / s`` (``z`` the whitened points), ``w`` the weights and ``S_i = sum_{j != i} w_j
    exp(-|y_i - y_j|**2 / 2)``, the objective is ``sum_i w_i log(S_i / (1 - w_i)) + log_norm(H)``, the
    mean log of each point's density with the point left out and the other weights renormalised. Its
    derivative in ``log s_k`` is ``sum_i w_i E_i[(y_ik - y_jk)**2] - 1``, ``E_i`` the average over ``j``
    with weights ``w_j exp(-|y_i - y_j|**2 / 2)``; the averages of ``y`` and ``y**2`` ride along with the
    kernel sums, and ``E_i[(y_ik - y_jk)**2] = y_ik**2 - 2 y_ik E_i[y_k] + E_i[y_k**2]`` (the data are
    centred, so the cancellation costs about ``eps * y_ik**2`` against a term of order one).
    """

    def __init__(self, data: np.ndarray, w: np.ndarray, base: np.ndarray, memory_budget: int,
                 workers: int | None) -> None:
        keep = w > 0
        self.w = w[keep]
        self.z = whiten(data[:, keep], data @ w, base)
        self.d = data.shape[0]
        self.log_det_base = 2.0 * float(np.log(np.diagonal(base)).sum())
        # The renormalisation of the weights left in: log(1 - w_i), exact for tiny w_i.
        self.renormalise = float(self.w @ np.log1p(-self.w)) if self.w.max() < 1 else -np.inf
        self.memory_budget = memory_budget
        self.workers = workers
        self.evaluations = 0

    def __call__(self, log_scales: np.ndarray, gradient: bool = True) -> tuple[float, np.ndarray | None]:
        log_scales = np.asarray(log_scales, dtype=np.float64)
        y = self.z / np.exp(log_scales)
        values = np.column_stack([y, y * y]) if gradient else None
        centres = WhitenedCentres(y, self.w, values=values)
        log_sums, averages = leave_one_out_sums(
            centres, y, memory_budget=self.memory_budget, workers=self.workers
        )
        self.evaluations += 1
        log_det = self.log_det_base + 2.0 * float(np.sum(np.broadcast_to(log_scales, (self.d,))))
        value = float(self.w @ log_sums) - self.renormalise + float(gaussian_log_normaliser(self.d, log_det))
        if averages is None:
            return value, None
        mean_y, mean_y2 = averages[:, : self.d], averages[:, self.d :]
        expected_r2 = y * y - 2.0 * y * mean_y + mean_y2
        return value, self.w @ expected_r2 - 1.0


def _budget_and_workers(memory_budget: Any, workers: Any) -> tuple[int, int | None]:
    return check_memory_budget(memory_budget), check_workers(workers)


def loo_log_likelihood(
    dataset: Any,
    kernel_covariance: Any,
    weights: Any = None,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    workers: int | None = None,
) -> float:
    """Mean leave-one-out log-density of a Gaussian KDE with kernel covariance ``H``.

    ``sum_i w_i log f_{-i}(x_i)`` with ``f_{-i}`` the KDE of the other points, their weights renormalised
    to sum to one: ``f_{-i}(x) = sum_{j != i} w_j N(x; x_j, H) / (1 - w_i)``. Unweighted, ``w_i = 1/n``.
    Zero-weight points neither count nor contribute.

    Parameters
    ----------
    dataset : array_like, shape (d, n) or (n,)
        The points as columns, as ``scipy.stats.gaussian_kde`` takes them (computed in float64).
    kernel_covariance : array_like, shape (d, d)
        Symmetric positive-definite kernel covariance (see :func:`check_kernel_covariance`); for
        ``scipy.stats.gaussian_kde`` it is ``kde.covariance``.
    weights : array_like, shape (n,), optional
        Non-negative weights (normalised to sum to one); at least two must be positive.
    memory_budget : int, keyword-only
        Bytes for the kernel blocks (default 64 MiB): nothing scales with ``n**2``.
    workers : int, keyword-only, optional
        Worker threads (default: the available CPUs).

    Returns
    -------
    float
        The mean leave-one-out log-density (``-inf`` if some point is beyond the reach of every other,
        which float64 cannot represent only for absurd bandwidths).

    Notes
    -----
    O(n**2 d) work through the KDE's kernel sums: each point's own term is removed from its sum (never
    subtracted, so nothing cancels), and sums that are tiny are recomputed as a log-sum-exp shifted by the
    nearest other point. Exact to about ``eps * max(|log f|, r2)`` per point against a brute-force sum.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([0.0, 1.0, 3.0])
    >>> h = 0.5
    >>> print(f"{loo_log_likelihood(x, h):.6f}")
    -3.246966
    >>> from scipy.stats import norm
    >>> brute = np.mean([np.log(np.mean([norm.pdf(x[i], x[j], np.sqrt(h)) for j in range(3) if j != i]))
    ...                  for i in range(3)])
    >>> print(f"{brute:.6f}")
    -3.246966
    """
    data, w = _selection_data(dataset, weights)
    h = check_kernel_covariance(kernel_covariance, data.shape[0])
    memory_budget, workers = _budget_and_workers(memory_budget, workers)
    objective = _LeaveOneOut(data, w, linalg.cholesky(h, lower=True), memory_budget, workers)
    return objective(np.zeros(data.shape[0]), gradient=False)[0]


#: Factors are searched within this ratio of Scott's (both ways) before the likelihood is declared unbounded.
_SEARCH_RANGE = 1e8
#: Relative tolerance of the selected factor and bandwidths (the optimum, not the objective).
_XTOL = 1e-10


def _unbounded_error(where: str) -> ValueError:
    return ValueError(
        f"The leave-one-out likelihood keeps growing as the bandwidth{where} shrinks towards zero: "
        "the data hold duplicated points (or coordinates), which make it unbounded. Remove or merge the "
        "duplicates (adding their weights), or choose the bandwidth by another rule."
    )


def cv_ml_factor(
    dataset: Any,
    weights: Any = None,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    workers: int | None = None,
) -> float:
    """Bandwidth factor of scipy's model that maximises the leave-one-out likelihood (``'cv_ml'``).

    The kernel covariance is ``factor**2 * cov(dataset, aweights=weights)`` as in
    ``scipy.stats.gaussian_kde``; the factor maximises :func:`loo_log_likelihood` over it.

    Parameters
    ----------
    dataset : array_like, shape (d, n) or (n,)
        Points as columns; more points than dimensions, and a non-singular covariance.
    weights : array_like, shape (n,), optional
        Non-negative weights.
    memory_budget, workers : keyword-only
        As for :func:`loo_log_likelihood`.

    Returns
    -------
    float
        The factor, to about 1e-10 relative.

    Raises
    ------
    ValueError
        For the data faults of ``GaussianKDE`` (non-finite values, ``d > n``), fewer than two points of
        positive weight, or a likelihood that grows without bound as the bandwidth shrinks (duplicated
        points). ``numpy.linalg.LinAlgError`` if the data covariance is singular to rounding
        (:func:`check_data_covariance`, the KDE's rank test and message).

    Notes
    -----
    The derivative of the likelihood in ``log(factor)`` is analytic (see ``_LeaveOneOut``); it is positive
    for small factors and tends to ``-d`` for large ones. Starting from Scott's factor, the search brackets
    the nearest sign change (doubling or halving the factor) and refines it with Brent's method: a local
    maximum of the likelihood, the global one whenever the likelihood is unimodal in the factor, as it
    usually is. About 10-20 evaluations of O(n**2 d) each.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((1, 400))
    >>> print(f"{cv_ml_factor(x):.4f}")
    0.3824
    """
    data, w = _selection_data(dataset, weights)
    d, n = data.shape
    check_kde_data_shape(d, n, False)
    memory_budget, workers = _budget_and_workers(memory_budget, workers)
    data_cov = np.atleast_2d(cov(data, rowvar=1, bias=False, aweights=w))
    # The KDE's rank test (with the eps of the data as given: float32 data are held to float32's), so that
    # the selection refuses exactly the data the KDE refuses, with its message.
    check_data_covariance(data_cov, data @ w, n, data_eps(_as_dataset(dataset).dtype))
    base = linalg.cholesky(data_cov, lower=True)
    objective = _LeaveOneOut(data, w, base, memory_budget, workers)

    def slope(t: float) -> float:
        return float(objective(np.full(d, t))[1].sum())

    start = np.log(scotts_factor(neff_of_normalised(w), d))
    lo, hi = _bracket(slope, start, np.log(2.0), np.log(_SEARCH_RANGE))
    t = optimize.brentq(slope, lo, hi, xtol=_XTOL, rtol=4 * np.finfo(float).eps)
    return float(np.exp(t))


def _bracket(slope: Callable[[float], float], start: float, step: float, reach: float) -> tuple[float, float]:
    """``(lo, hi)`` with ``slope(lo) > 0 > slope(hi)``, stepping from ``start`` (at most ``reach`` away)."""
    value = slope(start)
    if value > 0:
        lo = start
        hi = start + step
        while slope(hi) > 0:
            lo, hi = hi, hi + step
            if hi - start > reach:
                raise RuntimeError("the leave-one-out likelihood did not turn over as the bandwidth grew")
        return lo, hi
    hi, lo = start, start - step
    while not slope(lo) > 0:
        hi, lo = lo, lo - step
        if start - lo > reach:
            raise _unbounded_error("")
    return lo, hi


def cv_ml_bandwidths(
    dataset: Any,
    weights: Any = None,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    workers: int | None = None,
) -> np.ndarray:
    """Per-dimension bandwidths maximising the leave-one-out likelihood (statsmodels' ``bw='cv_ml'``).

    The kernel covariance is diagonal, ``H = diag(h**2)``; ``h`` maximises :func:`loo_log_likelihood`,
    the objective of ``statsmodels.nonparametric.KDEMultivariate(..., bw='cv_ml')`` for continuous data
    (whose ``bw`` are these standard deviations). Use the result as
    ``GaussianKDE(dataset, kernel_covariance=np.diag(h**2))``.

    Parameters
    ----------
    dataset : array_like, shape (d, n) or (n,)
        Points as columns (statsmodels takes them as rows); every dimension must vary.
    weights : array_like, shape (n,), optional
        Non-negative weights.
    memory_budget, workers : keyword-only
        As for :func:`loo_log_likelihood`.

    Returns
    -------
    ndarray, shape (d,)
        Kernel standard deviations, in the data's units.

    Raises
    ------
    ValueError
        For the data faults of :func:`loo_log_likelihood`, a dimension without spread, or a likelihood
        that grows without bound as a bandwidth shrinks (duplicated points or coordinates).

    Notes
    -----
    Quasi-Newton (L-BFGS-B) in ``log h`` with the analytic gradient, from Scott's rule per dimension
    (``sigma_k * neff**(-1/(d+4))``); statsmodels uses Nelder-Mead without gradients from
    ``1.06 sigma_k n**(-1/(d+4))``. Each evaluation is O(n**2 d); a few dozen are usual.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((2, 300)) * np.array([[1.0], [10.0]])
    >>> h = cv_ml_bandwidths(x)
    >>> h.shape, bool(5 < h[1] / h[0] < 20)
    ((2,), True)
    """
    data, w = _selection_data(dataset, weights)
    d = data.shape[0]
    memory_budget, workers = _budget_and_workers(memory_budget, workers)
    flat = np.flatnonzero(np.ptp(data[:, w > 0], axis=1) == 0)
    if flat.size:
        raise ValueError(
            f"Every dimension must vary for cv_ml_bandwidths; dimension(s) {flat.tolist()} are constant."
        )
    centred = data - (data @ w)[:, None]
    sigma = np.sqrt((centred * centred) @ w)  # weighted spread: only the starting point and the scale
    objective = _LeaveOneOut(data, w, np.diag(sigma), memory_budget, workers)

    def negative(theta: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = objective(theta)
        return -value, -grad

    start = np.full(d, np.log(scotts_factor(neff_of_normalised(w), d)))
    reach = np.log(_SEARCH_RANGE)
    bounds = [(s - reach, s + reach) for s in start]
    result = optimize.minimize(
        negative, start, jac=True, method="L-BFGS-B", bounds=bounds,
        options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 1000},
    )
    at_floor = np.flatnonzero(result.x <= start - reach + 1.0)
    if at_floor.size:
        raise _unbounded_error(f" of dimension(s) {at_floor.tolist()}")
    return sigma * np.exp(result.x)
