"""Gaussian kernel density estimation: a fast, memory-bounded drop-in for ``scipy.stats.gaussian_kde``.

:class:`GaussianKDE` has the public API and the semantics of ``scipy.stats.gaussian_kde`` (scipy 1.17):
the same attributes, methods, hooks, point-shape rules, output dtypes, exceptions and random streams.
Densities are computed differently (see the class notes): data and queries are centred at the data's
weighted mean and whitened once; kernel sums run in memory-bounded blocks over a small thread pool; the
log-density is a log-sum-exp that stays finite wherever the exact density is positive.
"""

from __future__ import annotations

import numbers

import numpy as np
from scipy import linalg, special
from scipy.stats import multivariate_normal

from . import _dask
from . import bandwidth as _bw
from ._rules import gaussian_log_normaliser
from ._budget import DEFAULT_MEMORY_BUDGET
from ._kernel_sums import WhitenedCentres, kernel_sums, whiten
from .covariance import cov
from ._validation import (
    NON_FINITE_DATA,
    SINGULAR_DATA,
    TOO_FEW_ELEMENTS,
    check_kde_data_shape,
    check_memory_budget,
    check_workers,
    reassigned_dataset_weights_message,
    require_finite_points,
    require_no_nan,
)
from ._weights import kde_weights_of_valid_shape, normalised_kde_weights

__all__ = ["GaussianKDE", "DEFAULT_MEMORY_BUDGET"]

class _EvaluationState:
    """What evaluation needs, derived from (dataset, weights, cho_cov) in one working dtype."""

    def __init__(self, dataset: np.ndarray, weights: np.ndarray, cho_cov: np.ndarray, dtype) -> None:
        data = np.asarray(dataset, dtype=dtype)
        w = np.asarray(weights, dtype=dtype)
        self.cho = np.asarray(cho_cov, dtype=dtype)
        # Centre at the weighted mean: keeps whitened norms small, which the product form needs.
        self.mean = data @ w if dtype in (np.float32, np.float64) else np.einsum("ij,j->i", data, w)
        keep = w > 0  # zero-weight points contribute nothing; dropping them avoids log(0) entirely
        self.centres = WhitenedCentres(whiten(data[:, keep], self.mean, self.cho), w[keep])
        d = data.shape[0]
        with np.errstate(divide="ignore"):
            log_det = 2 * np.log(np.diagonal(self.cho)).sum()  # of the kernel covariance, from its factor
        self.log_norm = dtype.type(gaussian_log_normaliser(d, log_det))
        with np.errstate(over="ignore", under="ignore"):
            norm = np.exp(self.log_norm)
        # The plain sums are scaled by the norm only where that cannot overflow or lose precision.
        self.norm = norm if np.isfinite(norm) and norm >= np.finfo(dtype).tiny else None

    def densities(self, log_sums: np.ndarray, sums: np.ndarray) -> np.ndarray:
        """Densities from :func:`kernel_sums`' pair: the plain sum times the norm where both are safe, else
        ``exp(log_sum + log_norm)`` (0 for ``log_sum = -inf``; inf only where the density exceeds the dtype)."""
        if self.norm is None:
            return np.exp(log_sums + self.log_norm)
        plain = ~np.isnan(sums)
        if plain.all():
            return sums * self.norm
        out = np.exp(log_sums + self.log_norm)
        out[plain] = sums[plain] * self.norm
        return out


def _as_data(dataset) -> np.ndarray:
    """``dataset`` as a 2-D (d, n) array, with scipy's messages for too few elements and a bad rank."""
    data = np.atleast_2d(np.asarray(dataset))
    if not data.size > 1:
        raise ValueError(TOO_FEW_ELEMENTS)
    if data.ndim != 2:
        raise ValueError(
            f"`dataset` should be 1-D (n,) or 2-D (d, n) with points as columns; got shape {data.shape}."
        )
    return data


def _check_finite_data(data: np.ndarray) -> None:
    """Refuse NaN or infinity in numeric data, complex included (a complex value is finite when both of its
    parts are, as scipy requires: its covariance of such data is NaN and its Cholesky refuses it)."""
    if np.issubdtype(data.dtype, np.number):
        if not np.all(np.isfinite(data)):
            raise ValueError(NON_FINITE_DATA)


def _check_random_state(seed):
    """scipy's rule for ``seed``: None/np.random -> global RandomState; int -> new RandomState; RNG -> itself."""
    if seed is None or seed is np.random:
        return np.random.mtrand._rand
    if isinstance(seed, (numbers.Integral, np.integer)):
        return np.random.RandomState(seed)
    if isinstance(seed, (np.random.RandomState, np.random.Generator)):
        return seed
    raise ValueError(f"'{seed}' cannot be used to seed a numpy.random.RandomState instance")


class GaussianKDE:
    """Kernel density estimate with Gaussian kernels; drop-in for ``scipy.stats.gaussian_kde``.

    Parameters
    ----------
    dataset : array_like
        Data points: shape (d, n) (each *column* is a point), or (n,) for one dimension.
    bw_method : str, scalar or callable, optional
        ``'scott'`` (default), ``'silverman'``, ``'cv_ml'`` (the factor that maximises the leave-one-out
        likelihood, :func:`anomstats.bandwidth.cv_ml_factor`; not in scipy), a scalar used directly as the
        bandwidth ``factor``, or a callable taking the estimator and returning the factor.
    weights : array_like, optional
        Non-negative weights of the data points, shape (n,); normalised to sum to one.
    kernel_covariance : array_like, shape (d, d), keyword-only, optional
        An explicit symmetric positive-definite kernel covariance ``H`` instead of ``factor**2`` times the
        data covariance (not in scipy), e.g. ``np.diag(h**2)`` for the per-dimension bandwidths of
        :func:`anomstats.bandwidth.cv_ml_bandwidths`. Exclusive with ``bw_method``; ``factor`` is then
        ``None``, the data covariance is never computed (so ``d > n`` is allowed), and a later
        ``set_bandwidth(rule)`` returns to scipy's model.
    memory_budget : int, keyword-only
        Budget in bytes for the evaluation temporaries that would otherwise scale with ``n * m``
        (default 64 MiB). The whitened data and query copies (``O((n + m) d)``) are not included.
    workers : int, keyword-only, optional
        Worker threads for evaluation; default: the available CPUs (one without ``threadpoolctl``).

    Attributes
    ----------
    dataset : ndarray, shape (d, n)
        A read-only copy of the data. Assigning new data to a fitted KDE validates them as the constructor
        does and recomputes ``d``, ``n``, the factor, ``covariance``, ``cho_cov``, ``log_det`` and every cache
        (see the differences below); a failed assignment leaves the KDE unchanged.
    d, n : int
        Dimensions and number of data points.
    weights : ndarray, shape (n,)
        Normalised weights (computed lazily: ``1/n`` each when none were given).
    neff : float
        Effective number of points, ``1 / sum(weights**2)`` (lazy).
    factor : float or None
        The bandwidth factor from :meth:`covariance_factor` (``None`` with an explicit ``kernel_covariance``).
    covariance : ndarray, shape (d, d)
        Kernel covariance: the weighted data covariance times ``factor**2``, or ``kernel_covariance``.
    inv_cov : ndarray, shape (d, d)
        Its inverse (recomputed on access, as in scipy).
    cho_cov : ndarray, shape (d, d)
        Lower Cholesky factor of ``covariance`` (float64).
    log_det : float
        ``log det(2 pi covariance)`` (scipy's convention); the kernel's log-normalisation is ``-log_det/2``.

    Notes
    -----
    Evaluation (``pdf``/``evaluate``/``__call__``/``logpdf``) centres data and queries at the data's
    weighted mean and whitens them once with ``cho_cov`` (the whitened data are cached until ``dataset``,
    ``weights`` or ``cho_cov`` change). Squared distances are formed by direct differences for ``d <= 2``
    (rounding relative to the distance itself) and by one matrix product for larger ``d`` (rounding
    relative to the squared whitened norms, kept small by the centring), in blocks whose temporaries stay
    within ``memory_budget`` bytes, spread over ``workers`` threads. Weighted sums are matrix-vector
    products. Queries whose plain sum is tiny (or that are provably far from every data point) are
    computed as a log-sum-exp with a per-query shift, so ``logpdf`` is finite wherever the density is
    positive (hundreds of bandwidths away, thousands of dimensions).

    Dtypes follow scipy: results are ``np.common_type(covariance, points)``, i.e. float64 for float16/32,
    integer and float64 inputs (so float32 data and queries are evaluated in float64 and their log-density
    never underflows where the float64 one is normal), long double when data or points are long double.

    Accuracy (float64): ``pdf`` and ``logpdf`` agree with scipy to about 1e-13 relative near the data. As
    with any float64 method, the relative accuracy of an astronomically small ``pdf`` is limited by the
    absolute rounding of its exponent, about ``eps * |log p|``. Far from the origin this implementation
    is *more* accurate than scipy, which whitens uncentred coordinates (data offset by 1e3 from the origin:
    scipy's pdf is off by up to ~1e-11 relative; this one stays at ~1e-14 against a long-double reference).

    Deliberate differences from ``scipy.stats.gaussian_kde`` (values agree to rounding otherwise):

    * ``logpdf`` is finite wherever the exact density is positive (scipy also is, up to its own rounding),
      and zero-weight data points are ignored: scipy returns NaN when leading data points have zero weight.
    * ``pdf`` of queries where every kernel underflows is computed through the log-domain, so it is the
      correctly rounded small value instead of 0 whenever that value is representable.
    * Bad ``weights`` (NaN, infinite, negative, zero sum) raise ``ValueError`` up front with a message
      naming ``weights`` (scipy raises ``ValueError`` from deep inside; its phrases are kept in the messages).
    * A bandwidth factor that is not a positive finite real number raises ``ValueError`` (scipy accepts
      zero or negative factors and fails at evaluation or returns negative densities).
    * ``dataset`` is copied and made read-only. Assigning a new ``dataset`` to a fitted KDE refits it: the
      new data are checked as the constructor checks them (same exceptions), then ``d``, ``n``, the factor
      (the same rule, on the new data), ``covariance``, ``cho_cov``, ``log_det`` and the caches are
      recomputed. The weights are kept when the length is unchanged (scipy reads ``weights`` at evaluation,
      so it uses them with new data of the same length too); for data of another length, uniform weights
      (none given, or all equal) start anew as uniform, while non-uniform weights raise ``ValueError``
      (they belong to the old points: build a new KDE). An explicit ``kernel_covariance`` must fit the new
      ``d``. A failed assignment (bad shape, non-finite or singular data) leaves the KDE unchanged. scipy
      stores the array and keeps ``d``, ``n``, the factor and the covariance of the old data until
      ``_compute_covariance`` is called, and then fails for another length. A KDE that was never fitted
      (a scipy-style subclass that skips ``__init__``) stores the array as scipy does.
    * Singular data are refused by a rank test (:func:`anomstats.bandwidth.check_data_covariance`), not by
      whether a Cholesky factorisation happens to finish: a feature that is constant, or a linear
      combination of the others, to the rounding of the data's dtype raises ``numpy.linalg.LinAlgError``
      naming it, in float64 and float32, for every draw. scipy refuses such data only when its Cholesky
      fails, and otherwise (in about half the draws of a duplicated or combined feature) accepts them and
      returns densities of 1e5-1e16. Data that are full rank beyond a few times the rounding noise, however
      ill-conditioned, are accepted as by scipy.
    * Query points that are finite but so far away that their squared whitened distance overflows get
      ``pdf`` 0 and ``logpdf`` -inf (the exact log-density is below the dtype's range there); scipy may
      return NaN. Boolean query points count as 0 and 1, as integer ones (scipy raises ``TypeError``).
    * ``integrate_box_1d`` and ``integrate_box`` refuse NaN bounds with a ``ValueError`` naming them
      (scipy returns NaN); infinite bounds are open sides, as in scipy.
    * Non-finite data raise ``ValueError`` naming ``dataset``; 3-D inputs raise ``ValueError`` naming the
      shape (scipy: an unpacking error, also ``ValueError``).
    * ``integrate_kde`` is vectorised and memory-bounded; ``integrate_box_1d`` works for long double data
      (scipy raises ``TypeError``).

    Additions (not in scipy): ``bw_method='cv_ml'`` (the factor maximising the leave-one-out likelihood,
    see :mod:`anomstats.bandwidth`) and ``kernel_covariance=H`` (an explicit kernel covariance, e.g. the
    per-dimension bandwidths of :func:`anomstats.bandwidth.cv_ml_bandwidths` as ``np.diag(h**2)``).

    Examples
    --------
    >>> import numpy as np
    >>> from anomstats import GaussianKDE
    >>> kde = GaussianKDE(np.array([-1.0, 0.0, 0.5, 2.0]))
    >>> print(f"{kde.factor:.4f}")
    0.7579
    >>> np.round(kde.pdf([0.0, 1.0]), 4)
    array([0.2685, 0.2235])
    >>> np.round(kde.logpdf([0.0, 50.0]), 2)
    array([   -1.31, -1285.93])
    """

    #: Defaults for instances built without ``__init__`` (scipy-style subclasses).
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    workers: int | None = None

    def __init__(
        self,
        dataset,
        bw_method=None,
        weights=None,
        *,
        kernel_covariance=None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        workers: int | None = None,
    ) -> None:
        self.memory_budget = check_memory_budget(memory_budget)
        self.workers = check_workers(workers)

        data = _as_data(dataset)
        self.dataset = data  # not fitted yet: stored as it is (the setter refits only a fitted KDE)
        self.d, self.n = data.shape

        # Checks run in scipy's order, so that input with several faults reports the same one: weight
        # shapes, then d > n, then the bandwidth rule, then the values (which scipy only meets while
        # computing the covariance).
        if weights is not None:
            weights = kde_weights_of_valid_shape(weights, self.n)
        if kernel_covariance is not None and bw_method is not None:
            raise ValueError(_bw.BW_METHOD_AND_KERNEL_COVARIANCE)
        check_kde_data_shape(self.d, self.n, kernel_covariance is not None)
        _bw.resolve_bw_method(bw_method)
        if weights is not None:
            self._weights = normalised_kde_weights(weights)
            self._neff = _bw.neff_of_normalised(self._weights)
        _check_finite_data(data)

        if kernel_covariance is not None:
            self._kernel_covariance = _bw.check_kernel_covariance(kernel_covariance, self.d)
        # Singular data raise numpy.linalg.LinAlgError from the rank test of the data covariance (naming the
        # dependent feature) or, should the Cholesky fail after it, with scipy's message (_data_moments).
        self.set_bandwidth(bw_method=bw_method)

    # ------------------------------------------------------------------ data, weights and caches

    @property
    def dataset(self) -> np.ndarray:
        return self._dataset

    @dataset.setter
    def dataset(self, value) -> None:
        if "covariance" not in self.__dict__:
            # Not fitted yet (inside __init__, or a scipy-style subclass that skips it and sets d, n and
            # calls _compute_covariance itself): store the data, drop what was derived from earlier data.
            self._store_dataset(value)
            return
        self._refit(value)

    def _store_dataset(self, value) -> None:
        data = np.array(value, copy=True)
        data.setflags(write=False)
        self._dataset = data
        # Everything derived from the data is now stale.
        for name in ("_data_covariance", "_data_cho_cov", "_eval_state"):
            self.__dict__.pop(name, None)

    def _refit(self, value) -> None:
        """Assign new data to a fitted KDE: validate as ``__init__`` does, then recompute everything derived.

        ``d``, ``n``, the factor (the same rule on the new data), the covariance, its factor, ``log_det`` and
        the caches follow the new data. The weights are kept when the length is unchanged (scipy reads
        ``weights`` at evaluation, so it uses them with new data of the same length too); for another
        length, uniform weights (no weights given, or all equal) start anew as uniform, and non-uniform ones
        raise ``ValueError``: they belong to the old points. Any failure leaves the KDE as it was.
        """
        data = _as_data(value)
        d, n = data.shape
        explicit = self.__dict__.get("_kernel_covariance")
        check_kde_data_shape(d, n, explicit is not None)
        if explicit is not None:
            _bw.check_kernel_covariance(explicit, d)
        _check_finite_data(data)
        weights = self.__dict__.get("_weights")
        reset_weights = weights is not None and len(weights) != n
        if reset_weights and not np.all(weights == weights[0]):
            raise ValueError(reassigned_dataset_weights_message(n, len(weights)))
        saved = dict(self.__dict__)
        try:
            self._store_dataset(data)
            self.d, self.n = d, n
            if reset_weights:
                self.__dict__.pop("_weights", None)
                self.__dict__.pop("_neff", None)
            self._compute_covariance()
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise

    @property
    def weights(self) -> np.ndarray:
        try:
            return self._weights
        except AttributeError:
            self._weights = np.ones(self.n) / self.n
            return self._weights

    @property
    def neff(self):
        try:
            return self._neff
        except AttributeError:
            self._neff = _bw.neff_of_normalised(self.weights)
            return self._neff

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_eval_state", None)  # derived, possibly large: rebuilt on first use
        return state

    # ------------------------------------------------------------------ bandwidth

    def scotts_factor(self):
        """Scott's factor, ``neff ** (-1 / (d + 4))``.

        Returns
        -------
        numpy.float64

        Examples
        --------
        >>> import numpy as np
        >>> print(f"{GaussianKDE(np.arange(16.0)).scotts_factor():.4f}")
        0.5743
        """
        return np.float64(_bw.scotts_factor(self.neff, self.d))

    def silverman_factor(self):
        """Silverman's factor, ``(neff * (d + 2) / 4) ** (-1 / (d + 4))``.

        Returns
        -------
        numpy.float64

        Examples
        --------
        >>> import numpy as np
        >>> print(f"{GaussianKDE(np.arange(16.0)).silverman_factor():.4f}")
        0.6084
        """
        return np.float64(_bw.silverman_factor(self.neff, self.d))

    def cv_ml_factor(self):
        """The factor that maximises the leave-one-out likelihood (``bw_method='cv_ml'``; not in scipy).

        Computed by :func:`anomstats.bandwidth.cv_ml_factor` (O(n**2 d) per step, memory-bounded) and
        cached until ``dataset`` or ``weights`` is reassigned.

        Returns
        -------
        numpy.float64

        Examples
        --------
        >>> import numpy as np
        >>> x = np.random.default_rng(0).standard_normal(400)
        >>> print(f"{GaussianKDE(x, bw_method='cv_ml').factor:.4f}")
        0.3824
        """
        cached = self.__dict__.get("_cv_ml")
        if cached is None or cached[0] is not self.dataset or cached[1] is not self.weights:
            factor = _bw.cv_ml_factor(
                self.dataset, self.weights, memory_budget=self.memory_budget, workers=self.workers
            )
            self._cv_ml = (self.dataset, self.weights, np.float64(factor))
        return self._cv_ml[2]

    # Default rule; a subclass may override it, or set_bandwidth/assignment may replace it per instance.
    covariance_factor = scotts_factor

    def set_bandwidth(self, bw_method=None) -> None:
        """Choose the bandwidth rule and recompute the kernel covariance.

        A failed call (any exception) changes nothing: the rule, ``factor``, ``covariance``, ``cho_cov`` and
        ``log_det`` stay as they were.

        Parameters
        ----------
        bw_method : str, scalar or callable, optional
            ``'scott'``, ``'silverman'``, ``'cv_ml'``, a scalar used as ``factor``, or a callable taking
            this estimator and returning the factor. ``None`` keeps the current ``covariance_factor`` (or
            the explicit ``kernel_covariance``); any other value replaces an explicit kernel covariance.

        Raises
        ------
        ValueError
            For any other ``bw_method`` (scipy's message), or if the resulting factor is not a positive,
            finite real number.
        OverflowError
            If the square of a Python float factor overflows (e.g. ``1e300``), as in scipy.

        Examples
        --------
        >>> import numpy as np
        >>> kde = GaussianKDE(np.array([-7.0, -5.0, 1.0, 4.0, 5.0]))
        >>> kde.set_bandwidth(bw_method=0.5)
        >>> print(kde.factor)
        0.5
        >>> kde.set_bandwidth('silverman')
        >>> print(f"{kde.factor:.4f}")
        0.7677
        """
        rule = _bw.resolve_bw_method(bw_method)
        # Restored if the new rule fails in any way (an unusable factor, singular data, a factor whose square
        # overflows), so a failed call changes nothing: _compute_covariance assigns the derived attributes
        # only once all of them are computed, and the rule's own attributes are put back here.
        kept = ("covariance_factor", "_bw_method", "_kernel_covariance")
        saved = {k: self.__dict__[k] for k in kept if k in self.__dict__}
        try:
            if rule is not None:
                self.__dict__.pop("_kernel_covariance", None)  # a rule replaces an explicit covariance
            self._apply_bw_rule(rule)
        except BaseException:
            for key in kept:
                self.__dict__.pop(key, None)
            self.__dict__.update(saved)
            raise

    def _apply_bw_rule(self, rule) -> None:
        if rule is None:
            pass
        elif isinstance(rule, str) and rule == "scott":
            self.covariance_factor = self.scotts_factor
        elif isinstance(rule, str) and rule == "silverman":
            self.covariance_factor = self.silverman_factor
        elif isinstance(rule, str) and rule == "cv_ml":
            self.covariance_factor = self.cv_ml_factor
        elif callable(rule):
            self._bw_method = rule
            self.covariance_factor = lambda: self._bw_method(self)
        else:
            self._bw_method = "use constant"
            self.covariance_factor = lambda: rule
        self._compute_covariance()

    def _data_moments(self) -> None:
        """Weighted data covariance and its Cholesky factor (cached; LinAlgError when singular)."""
        if "_data_cho_cov" not in self.__dict__:
            data_cov = np.atleast_2d(cov(self.dataset, rowvar=1, bias=False, aweights=self.weights))
            # A rank test, not whether the Cholesky happens to finish: data in a subspace (a feature that is
            # a combination of others, duplicated or constant) is refused for every rounding, naming it.
            data = self.dataset
            _bw.check_data_covariance(data_cov, data @ self.weights, self.n, _bw.data_eps(data.dtype))
            try:
                self._data_cho_cov = linalg.cholesky(data_cov, lower=True)
            except linalg.LinAlgError as exc:
                raise linalg.LinAlgError(SINGULAR_DATA) from exc
            self._data_covariance = data_cov

    def _compute_covariance(self) -> None:
        """Recompute ``factor``, ``covariance``, ``cho_cov`` and ``log_det`` from ``covariance_factor()``

        (or from the explicit kernel covariance, when one was given).
        """
        explicit = self.__dict__.get("_kernel_covariance")
        # Computed into locals and assigned together at the end: a failure on the way (a singular data
        # covariance, a factor whose square overflows) leaves factor, covariance, cho_cov and log_det as
        # they were (only the caches of the data's own moments may have been filled).
        if explicit is not None:
            factor = None
            covariance = np.array(explicit)  # writable, as scipy's attribute
            cho_cov = linalg.cholesky(explicit, lower=True)
        else:
            factor = self.covariance_factor()
            _bw.check_factor(factor)
            self._data_moments()
            covariance = self._data_covariance * factor**2
            cho_cov = (self._data_cho_cov * factor).astype(np.float64)
        log_det = 2 * np.log(np.diag(cho_cov * np.sqrt(2 * np.pi))).sum()
        self.factor, self.covariance, self.cho_cov, self.log_det = factor, covariance, cho_cov, log_det

    @property
    def inv_cov(self) -> np.ndarray:
        """Inverse of the kernel covariance (refreshes ``factor`` from ``covariance_factor()``, as scipy)."""
        explicit = self.__dict__.get("_kernel_covariance")
        if explicit is not None:
            return linalg.inv(explicit)
        self.factor = self.covariance_factor()
        self._data_moments()
        return linalg.inv(self._data_covariance) / self.factor**2

    # ------------------------------------------------------------------ evaluation

    def _query_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """scipy's interpretation of query shapes: (d, m) columns, or a single (d,) point when d > 1."""
        shape = (1,) * max(0, 2 - len(shape)) + tuple(shape)  # np.atleast_2d's rule
        if len(shape) != 2:
            raise ValueError(
                f"points should be 1-D or 2-D of shape (d, m) with d = {self.d}; got shape {shape}."
            )
        d, m = shape
        if d != self.d:
            if d == 1 and m == self.d:
                return self.d, 1  # a single point given as a row
            raise ValueError(f"points have dimension {d}, dataset has dimension {self.d}")
        return d, m

    def _points_matrix(self, points) -> np.ndarray:
        points = np.atleast_2d(np.asarray(points))
        if points.dtype.kind == "b":
            points = points.astype(np.float64)  # 0 and 1, as integer points (scipy: TypeError)
        return np.reshape(points, self._query_shape(points.shape))

    def _score_dask(self, method: str, points):
        """:meth:`evaluate` / :meth:`logpdf` of dask query points, lazily, chunk by chunk (see anomstats._dask)."""
        points = points.reshape(self._query_shape(points.shape))
        probe = getattr(self, method)(np.zeros((self.d, 1), dtype=points.dtype))
        return _dask.map_queries(self, method, points, 1, probe)

    def _evaluate_dask(self, points):
        return self._score_dask("evaluate", points)

    def _logpdf_dask(self, x):
        return self._score_dask("logpdf", x)

    def _output_dtype(self, points: np.ndarray) -> np.dtype:
        dtype = np.dtype(np.common_type(self.covariance, points))
        if dtype.kind == "c":
            raise ValueError(f"complex points are not supported; got dtype {points.dtype}.")
        if dtype.itemsize not in (4, 8, 12, 16):
            raise ValueError(f"{dtype} has unexpected item size: {dtype.itemsize}")
        return dtype

    def _evaluation_state(self, dtype: np.dtype) -> _EvaluationState:
        # Keyed on the identity of what scipy reads at evaluation time, so reassigning any of them
        # (or calling _compute_covariance) is picked up.
        key = (self.dataset, self.weights, self.cho_cov, dtype)
        cached = self.__dict__.get("_eval_state")
        if cached is not None:
            old_key, state = cached
            if all(a is b for a, b in zip(old_key[:3], key[:3], strict=True)) and old_key[3] == dtype:
                return state
        state = _EvaluationState(self.dataset, self.weights, self.cho_cov, dtype)
        self._eval_state = (key, state)
        return state

    def _log_sums(self, points) -> tuple[np.ndarray, np.ndarray, _EvaluationState]:
        points = self._points_matrix(points)
        dtype = self._output_dtype(points)
        require_finite_points(bool(np.all(np.isfinite(points))), "points")
        state = self._evaluation_state(dtype)
        with np.errstate(over="ignore", invalid="ignore"):  # far queries: inf or NaN rows score 0 in kernel_sums
            z = whiten(np.asarray(points, dtype=dtype), state.mean, state.cho)
        log_sums, sums = kernel_sums(state.centres, z, memory_budget=self.memory_budget, workers=self.workers)
        return log_sums, sums, state

    @_dask.dispatch(_evaluate_dask, arg="points")
    def evaluate(self, points) -> np.ndarray:
        """Evaluate the estimated density at points.

        Parameters
        ----------
        points : array_like
            Shape (d, m): each column a point. A (d,) vector is one point when ``d > 1``; for ``d == 1`` a
            (m,) vector is m points.

        Returns
        -------
        ndarray, shape (m,)
            Densities; dtype ``np.common_type(covariance, points)`` (float64, or long double).

        Raises
        ------
        ValueError
            If the points' dimension differs from the dataset's, or points are not finite.

        Examples
        --------
        >>> import numpy as np
        >>> kde = GaussianKDE(np.array([[0.0, 1.0, 2.0, 0.5], [0.0, 1.0, 0.0, 2.0]]))
        >>> np.round(kde.evaluate([[0.5, 1.0], [0.5, 1.0]]), 4)
        array([0.0998, 0.1333])
        >>> np.round(kde([0.5, 0.5]), 4)
        array([0.0998])
        """
        log_sums, sums, state = self._log_sums(points)
        return state.densities(log_sums, sums)

    __call__ = evaluate

    def pdf(self, x) -> np.ndarray:
        """Evaluate the estimated density at points; an alias of :meth:`evaluate`.

        Examples
        --------
        >>> import numpy as np
        >>> kde = GaussianKDE(np.array([0.0, 1.0, 3.0]))
        >>> np.round(kde.pdf([1.0]), 4)
        array([0.2149])
        """
        return self.evaluate(x)

    @_dask.dispatch(_logpdf_dask, arg="x")
    def logpdf(self, x) -> np.ndarray:
        """Evaluate the log of the estimated density at points.

        Computed as a log-sum-exp with a per-query shift: finite wherever the density is positive, even
        hundreds of bandwidths away from the data or in thousands of dimensions.

        Parameters
        ----------
        x : array_like
            Points, interpreted as in :meth:`evaluate`.

        Returns
        -------
        ndarray, shape (m,)

        Examples
        --------
        >>> import numpy as np
        >>> kde = GaussianKDE(np.array([0.0, 1.0, 3.0]))
        >>> print(np.round(kde.logpdf([1.0, 1000.0]), 3).tolist())
        [-1.538, -330548.322]
        """
        log_sums, _, state = self._log_sums(x)
        return log_sums + state.log_norm

    # ------------------------------------------------------------------ integrals

    def integrate_gaussian(self, mean, cov):
        """Integral of the density times a Gaussian ``N(mean, cov)`` over the whole space.

        Parameters
        ----------
        mean : array_like, shape (d,)
        cov : array_like, shape (d, d)

        Returns
        -------
        numpy.float64

        Raises
        ------
        ValueError
            If ``mean`` or ``cov`` does not have dimension ``d``, or holds NaN or infinity.
        numpy.linalg.LinAlgError
            If ``covariance + cov`` is not positive definite.

        Notes
        -----
        Only the upper triangle of ``covariance + cov`` is read (its lower triangle is taken as the mirror
        image), as scipy's ``cho_factor`` reads it: a non-symmetric ``cov`` gives scipy's value.

        Examples
        --------
        >>> import numpy as np
        >>> kde = GaussianKDE(np.array([-1.0, 0.0, 1.0]))
        >>> print(f"{kde.integrate_gaussian(0.0, 1.0):.4f}")
        0.2567
        """
        mean = np.atleast_1d(np.squeeze(mean))
        cov_ = np.atleast_2d(cov)
        if mean.shape != (self.d,):
            raise ValueError(f"mean does not have dimension {self.d}")
        if cov_.shape != (self.d, self.d):
            raise ValueError(f"covariance does not have dimension {self.d}")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(cov_))):
            # scipy raises here too (from its Cholesky); a NaN mean would otherwise give a NaN integral.
            raise ValueError("mean and cov must contain only finite values (no NaN or infinity).")
        sum_cov = self.covariance + cov_
        # Gaussian convolution: each kernel times N(mean, cov) integrates to N(x_i; mean, covariance + cov).
        return self._gaussian_overlap(sum_cov, self.dataset, self.weights, mean[:, None], None)

    def _gaussian_overlap(self, sum_cov, data, weights, queries, query_weights):
        """``sum_j qw_j sum_i w_i N(q_j; x_i, sum_cov)`` (``qw = 1`` for a single query)."""
        sum_cov = np.asarray(sum_cov)
        wide = any(np.asarray(a).dtype == np.longdouble for a in (sum_cov, data, queries))
        dtype = np.dtype(np.longdouble if wide else np.float64)
        # scipy factors sum_cov with cho_factor (lower=False), which reads the upper triangle only: mirror it
        # (for a symmetric matrix this is the matrix itself, bit for bit). LinAlgError if not positive
        # definite (LAPACK works in float64).
        upper = np.triu(sum_cov.astype(np.float64))
        cho = linalg.cholesky(upper + np.triu(upper, 1).T, lower=True)
        state = _EvaluationState(data, weights, cho, dtype)
        with np.errstate(over="ignore", invalid="ignore"):  # far queries: inf or NaN rows score 0 in kernel_sums
            z = whiten(np.asarray(queries, dtype=dtype), state.mean, state.cho)
        log_sums, sums = kernel_sums(state.centres, z, memory_budget=self.memory_budget, workers=self.workers)
        values = state.densities(log_sums, sums)
        if query_weights is None:
            return values[0]
        return np.vecdot(values, np.asarray(query_weights, dtype=dtype))

    def integrate_box_1d(self, low, high):
        """Integral of a one-dimensional density between two bounds.

        Parameters
        ----------
        low, high : float
            Bounds (may be infinite).

        Returns
        -------
        numpy.float64

        Raises
        ------
        ValueError
            If the KDE has more than one dimension.

        Examples
        --------
        >>> import numpy as np
        >>> kde = GaussianKDE(np.array([-1.0, 0.0, 1.0]))
        >>> print(f"{kde.integrate_box_1d(-np.inf, 0.0):.4f}")
        0.5000
        """
        if self.d != 1:
            raise ValueError("integrate_box_1d() only handles 1D pdfs")
        require_no_nan(not np.any(np.isnan(low)), "low")
        require_no_nan(not np.any(np.isnan(high)), "high")
        stdev = np.ravel(np.sqrt(np.asarray(self.covariance, dtype=np.float64)))[0]
        # The differences are formed with numpy's own promotion, as scipy does (a float32 dataset minus a
        # Python float stays float32), so the result agrees with scipy's to rounding for every input dtype.
        normalized_high = np.ravel((high - self.dataset) / stdev)
        normalized_low = np.ravel((low - self.dataset) / stdev)
        if normalized_high.dtype == np.longdouble or normalized_low.dtype == np.longdouble:
            # special.ndtr has no long double loop (scipy raises TypeError here).
            normalized_high = normalized_high.astype(np.float64)
            normalized_low = normalized_low.astype(np.float64)
        delta = special.ndtr(normalized_high) - special.ndtr(normalized_low)
        return np.vecdot(self.weights, delta)

    def integrate_box(self, low_bounds, high_bounds, maxpts=None, *, rng=None):
        """Integral of the density over a rectangular box (Genz' algorithm, as scipy).

        Parameters
        ----------
        low_bounds, high_bounds : array_like, shape (d,)
            Box corners.
        maxpts : int, optional
            Maximum number of integration points.
        rng : numpy.random.Generator or seed, optional
            Randomness of the quasi-Monte Carlo integration.

        Returns
        -------
        numpy.float64

        Examples
        --------
        >>> import numpy as np
        >>> kde = GaussianKDE(np.array([-1.0, 0.0, 1.0]))
        >>> print(f"{kde.integrate_box(-np.inf, 0.0):.4f}")
        0.5000
        """
        require_no_nan(not np.any(np.isnan(low_bounds)), "low_bounds")
        require_no_nan(not np.any(np.isnan(high_bounds)), "high_bounds")
        data_t = self.dataset.T
        low = np.asarray(low_bounds) - data_t
        high = np.asarray(high_bounds) - data_t
        values = multivariate_normal.cdf(
            high, lower_limit=low, cov=self.covariance, maxpts=maxpts, rng=rng
        )
        return np.vecdot(values, self.weights, axis=-1)

    def integrate_kde(self, other):
        """Integral of the product of this density and another Gaussian KDE.

        Parameters
        ----------
        other : GaussianKDE or scipy.stats.gaussian_kde
            Of the same dimension.

        Returns
        -------
        numpy.float64

        Raises
        ------
        ValueError
            If the dimensions differ.

        Examples
        --------
        >>> import numpy as np
        >>> kde = GaussianKDE(np.array([-1.0, 0.0, 1.0]))
        >>> print(f"{kde.integrate_kde(kde):.4f}")
        0.2396
        """
        if other.d != self.d:
            raise ValueError("KDEs are not the same dimensionality")
        # Each pair of kernels integrates to N(x_i; y_j, H_self + H_other); sum over the smaller set
        # as queries against the larger set as centres.
        small, large = (other, self) if other.n < self.n else (self, other)
        sum_cov = small.covariance + large.covariance
        return self._gaussian_overlap(sum_cov, large.dataset, large.weights, small.dataset, small.weights)

    # ------------------------------------------------------------------ sampling and marginals

    def resample(self, size=None, seed=None) -> np.ndarray:
        """Draw a sample from the estimated density (the same numbers as scipy for the same seed).

        Parameters
        ----------
        size : int, optional
            Number of points; default ``int(neff)``.
        seed : None, int, numpy.random.Generator or numpy.random.RandomState, optional
            None (or ``np.random``) uses NumPy's global RandomState; an int seeds a new RandomState.

        Returns
        -------
        ndarray, shape (d, size)

        Examples
        --------
        >>> import numpy as np
        >>> kde = GaussianKDE(np.array([0.0, 1.0, 2.0]))
        >>> kde.resample(4, seed=0).shape
        (1, 4)
        """
        if size is None:
            size = int(self.neff)
        random_state = _check_random_state(seed)
        # Kernel noise first, then the kernel indices: the order of draws matters for reproducibility.
        noise = random_state.multivariate_normal(np.zeros((self.d,), float), self.covariance, size=size)
        indices = random_state.choice(self.n, size=size, p=self.weights)
        return self.dataset[:, indices] + np.transpose(noise)

    def marginal(self, dimensions) -> "GaussianKDE":
        """The marginal KDE over the retained ``dimensions`` (same bandwidth factor and weights).

        Parameters
        ----------
        dimensions : int or 1-D array_like of int
            Indices of the dimensions kept (negative indices count from the end).

        Returns
        -------
        GaussianKDE

        Raises
        ------
        ValueError
            For non-integer, repeated or out-of-range indices.

        Examples
        --------
        >>> import numpy as np
        >>> kde = GaussianKDE(np.array([[0.0, 1.0, 2.0, 0.5], [0.0, 1.0, 0.0, 2.0]]))
        >>> kde.marginal(-1).d
        1
        """
        dims = np.atleast_1d(dimensions)
        if not np.issubdtype(dims.dtype, np.integer):
            raise ValueError(
                "Elements of `dimensions` must be integers - the indices of the marginal variables "
                "being retained."
            )
        n_dims = len(self.dataset)
        original = dims.copy()
        dims = np.where(dims < 0, dims + n_dims, dims)
        if len(np.unique(dims)) != len(dims):
            raise ValueError("All elements of `dimensions` must be unique.")
        invalid = (dims < 0) | (dims >= n_dims)
        if np.any(invalid):
            raise ValueError(f"Dimensions {original[invalid]} are invalid for a distribution in {n_dims} dimensions.")
        explicit = self.__dict__.get("_kernel_covariance")
        if explicit is not None:  # the marginal of N(0, H) over `dims` is N(0, H[dims, dims])
            return GaussianKDE(
                self.dataset[dims],
                weights=self.weights,
                kernel_covariance=explicit[np.ix_(dims, dims)],
                memory_budget=self.memory_budget,
                workers=self.workers,
            )
        return GaussianKDE(
            self.dataset[dims],
            bw_method=self.covariance_factor(),
            weights=self.weights,
            memory_budget=self.memory_budget,
            workers=self.workers,
        )

    def __repr__(self) -> str:
        if self.__dict__.get("_kernel_covariance") is not None:
            return f"{type(self).__name__}(d={self.d}, n={self.n}, kernel_covariance=explicit)"
        factor = getattr(self, "factor", None)
        factor_text = "unset" if factor is None else f"{float(factor):.6g}"
        return f"{type(self).__name__}(d={self.d}, n={self.n}, factor={factor_text})"
