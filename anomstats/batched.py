"""Many independent covariance matrices in one call: :func:`batched_cov`.

An input holds observations along ``obs_axis``, variables along ``var_axis`` and batch axes
everywhere else (a PaDiM embedding ``(B, C, H, W)`` has one ``(B, C)`` dataset per patch). The work
runs over chunks of batch items: each chunk is copied once into a private ``(p, N, C)`` array of the
accumulation dtype (this copy is also the cast and the transposition), centred at its own mean
(two-pass: the centred sums are never formed as ``Σxxᵀ − nμμᵀ``, which loses every digit for data
far from the origin), and reduced by one stacked matrix product ``Xcᵀ·Xc`` that BLAS evaluates as a
symmetric rank-k update. Chunks are sized under a memory budget and spread over a few threads.

The chunk kernel (:func:`anomstats._moment_kernels.centred_copy` then :func:`~anomstats._moment_kernels.gram`)
is shared with :class:`anomstats.RunningMoments`. A dask input is handed to :mod:`anomstats._dask`, which
merges per-chunk :class:`~anomstats.RunningMoments` (the dispatch decorator below).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from . import _dask
from ._axes import batch_view, normalise_axes
from ._budget import DEFAULT_MEMORY_BUDGET
from ._moment_kernels import centred_moments, plan_moment_chunks
from ._parallel import resolve_workers, run_chunks
from ._rules import degrees_of_freedom
from ._validation import accumulation_dtype, check_ddof, check_memory_budget
from ._weights import check_weights, require_nonzero_weight_sum, scaled_weights
from .moments import RunningMoments

__all__ = ["batched_cov"]


def _checked_weights(
    aweights: ArrayLike | None, n_obs: int
) -> tuple[NDArray[np.float64] | None, float, float | None]:
    """``(weights, Σw, Σw²)`` of validated ``aweights`` (``Σw² = None`` for unit weights); a zero sum raises.

    The weights come back scaled by a power of two (:func:`anomstats._weights.scaled_weights`): the
    covariance is the same, bit for bit, and weights of any scale (×1e200, ×1e-200) give it.
    """
    if aweights is None:
        return None, float(n_obs), None  # unit weights: N - ddof
    weights = check_weights(np.asarray(aweights), n_obs, "aweights")  # dask weights are small: computed
    weights = scaled_weights(weights)[0]
    w_sum, w2_sum = float(weights.sum()), float(np.dot(weights, weights))
    require_nonzero_weight_sum(w_sum)
    return weights, w_sum, w2_sum


class _OneShotMoments(RunningMoments):
    """The partial states of :func:`batched_cov`'s dask twin: :class:`RunningMoments` with numpy's one-shot
    semantics, so dask and in-memory input give the same results. NaN and infinity pass through (numpy.cov
    returns NaN; the accumulator refuses them), and a normalisation ``<= 0`` gives ``inf``/``nan`` (the
    accumulator raises; the warning was given when the lazy result was built)."""

    def accumulate_block(self, block: ArrayLike, weights: ArrayLike | None) -> RunningMoments:
        return self._update(block, weights, check_finite=False)

    def covariance(self, ddof: int = 1) -> np.ndarray:
        return self._one_shot_covariance(check_ddof(ddof))


def _dask_batched_cov(
    x: Any,
    *,
    obs_axis: int = 0,
    var_axis: int = 1,
    ddof: int = 1,
    aweights: Any = None,
    dtype: DTypeLike | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    workers: int | None = None,
) -> Any:
    """:func:`batched_cov` of a dask array: per-chunk :class:`RunningMoments`, tree-merged, lazily.

    Validation is the in-memory path's, so the same faults raise the same errors.
    """
    obs, var = normalise_axes(x.ndim, obs_axis, var_axis)
    out_dtype = accumulation_dtype(np.dtype(x.dtype), dtype)
    ddof = check_ddof(ddof)
    weights, w_sum, w2_sum = _checked_weights(aweights, x.shape[obs])
    degrees_of_freedom(w_sum, w2_sum, ddof)  # warns now, as the in-memory path does
    template = _OneShotMoments(obs, var, dtype=dtype, memory_budget=memory_budget, workers=workers)
    return _dask.lazy_covariance(template, x, obs, var, weights, ddof, out_dtype)


@_dask.dispatch(_dask_batched_cov, arg="x")
def batched_cov(
    x: ArrayLike,
    *,
    obs_axis: int = 0,
    var_axis: int = 1,
    ddof: int = 1,
    aweights: ArrayLike | None = None,
    dtype: DTypeLike | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    workers: int | None = None,
) -> np.ndarray:
    """Covariance matrices of many independent datasets stacked in one array.

    Every axis of ``x`` other than ``obs_axis`` and ``var_axis`` is a batch axis; each batch item
    is one dataset of ``N`` observations of ``C`` variables, and its covariance matrix is what
    ``numpy.cov(item, rowvar=False, ddof=ddof, aweights=aweights)`` returns.

    Parameters
    ----------
    x : array_like, shape (..., N, ..., C, ...)
        Data with at least two dimensions; bool, integer, floating or complex. Never modified.
    obs_axis : int, default 0
        Axis holding the observations (negative values count from the end).
    var_axis : int, default 1
        Axis holding the variables; must differ from ``obs_axis``.
    ddof : int, default 1
        Delta degrees of freedom, as in :func:`numpy.cov` (1: unbiased estimate; 0: biased).
    aweights : array_like, shape (N,), optional
        Analytic (reliability) weights shared by all batch items, as numpy's ``aweights``: the
        normalisation is ``Σw − ddof·Σw²/Σw``. Must be finite and non-negative with a positive sum.
    dtype : dtype, optional
        Accumulation and result dtype. Default: ``result_type(x.dtype, float64)``, so float32 (and
        integer) data is accumulated in float64.
    memory_budget : int, default 64 MiB
        Bound in bytes on the temporaries (the per-chunk private copies); the result itself is not
        counted. Smaller budgets give the same values with more, smaller chunks.
    workers : int, optional
        Threads working on chunks; default: the usable cores, at most 8. BLAS is held to one
        thread per call meanwhile (see Notes).

    Returns
    -------
    ndarray, shape (*batch, C, C)
        One covariance matrix per batch item; the batch axes keep their order in ``x``.

    Raises
    ------
    ValueError
        ``x`` has fewer than 2 dimensions, the axes coincide, ``ddof`` is not integral, or a weight
        is negative or not finite.
    numpy.exceptions.AxisError
        An axis is out of range.
    RuntimeError
        ``aweights`` is not 1-D or its length is not ``N`` (numpy's exception type).
    ZeroDivisionError
        ``aweights`` sum to zero (numpy's exception type).
    TypeError
        ``x`` does not hold numbers, or ``dtype`` is not a floating/complex dtype (or is real for
        complex ``x``).

    Warns
    -----
    RuntimeWarning
        ``"Degrees of freedom <= 0 for slice"`` when the normalisation is not positive (e.g.
        ``ddof >= N``); then, as in numpy, entries become ``inf`` or ``nan``.

    See Also
    --------
    numpy.cov : one dataset at a time; same estimator.
    RunningMoments : the same result accumulated over several batches of observations.

    Notes
    -----
    Accuracy: with float64 accumulation the result agrees with a per-item loop of
    ``numpy.cov(item, rowvar=False)`` to ~1e-15 relative, also far from the origin, because every
    item is copied shifted by its first observation (exactly: the shifted values keep every digit)
    and centred at its own mean before the products are taken. The covariance depends only on the
    ratios of ``aweights``: weights of any scale give the same result (numpy's ``Σw²`` overflows
    for weights ×1e200, see :func:`anomstats.cov`).

    Deliberate differences from :func:`numpy.cov` (beyond batching):

    - The result always has shape ``(*batch, C, C)`` (numpy squeezes one variable to 0-d).
    - The result dtype is always the accumulation dtype (numpy returns float64 for
      ``dtype=float32`` with ``aweights``).
    - NaN or infinite ``aweights`` raise ``ValueError`` (numpy silently returns NaN).
    - ``aweights`` of extreme scale (×1e200, ×1e-200) give the covariance of the same weights at
      ordinary scale (numpy's ``Σw²`` overflows or underflows there, with a degrees-of-freedom
      warning and ``inf``/``nan``, or a silently dropped ``ddof`` correction).
    - ``fweights`` are not supported; repeat observations or use ``aweights`` with ``ddof=0``.
    - Entries are divided by the normalisation rather than multiplied by its reciprocal: results
      may differ from numpy's in the last bit.

    Threads: with more than one batch item, ``threadpoolctl`` (when installed) limits BLAS to one
    thread process-wide for the duration of the call, because small per-item products run several
    times faster that way than with BLAS's own threads (measured: 13-22 s against about 2 s for the
    PaDiM case on a busy 2-core machine); ``workers`` is then the total number of threads. Without
    ``threadpoolctl``, chunks run serially with BLAS's default threading. A single item (no batch
    axes) is left to BLAS's own threading.

    Examples
    --------
    Four patches (2 x 2) of 5 observations of 3 variables, laid out ``(N, C, H, W)``:

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(5, 3, 2, 2))
    >>> c = batched_cov(x)
    >>> c.shape
    (2, 2, 3, 3)
    >>> bool(np.allclose(c[1, 0], np.cov(x[:, :, 1, 0], rowvar=False)))
    True

    Variables first, observations last (``rowvar=True`` in numpy's terms):

    >>> batched_cov(np.array([[[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]]]), obs_axis=-1, var_axis=-2)
    array([[[ 1., -1.],
            [-1.,  1.]]])
    """
    data = np.asarray(x)
    ddof = check_ddof(ddof)
    budget = check_memory_budget(memory_budget)
    n_workers = resolve_workers(workers)
    view = batch_view(data, obs_axis, var_axis)
    acc = accumulation_dtype(data.dtype, dtype)
    *batch, n_obs, n_var = view.shape

    weights, w_sum, w2_sum = _checked_weights(aweights, n_obs)

    out = np.empty((*batch, n_var, n_var), dtype=acc)
    if out.size:
        if n_obs == 0:
            out[...] = 0  # an empty sum; the normalisation below decides inf/nan as numpy does
        else:
            chunks = plan_moment_chunks(view, acc, budget, n_workers)
            run_chunks(
                lambda chunk: _cov_chunk(view, acc, weights, out, chunk),
                chunks,
                n_workers,
                # One big product (a single item) may use BLAS's threads; many small ones may not.
                single_blas=out.size > n_var * n_var,
            )
    norm = degrees_of_freedom(w_sum, w2_sum, ddof)  # warns as numpy when not positive
    if norm <= 0:
        with np.errstate(divide="ignore", invalid="ignore"):
            out *= np.inf  # numpy's 1/0: ±inf where the sum is non-zero, nan where it is zero
        return out
    out /= norm
    return out


def _cov_chunk(
    view: np.ndarray,
    dtype: np.dtype[Any],
    weights: NDArray[np.float64] | None,
    out: np.ndarray,
    chunk: tuple[tuple[Any, ...], int],
) -> None:
    """Write the (unnormalised) centred sums of one chunk of batch items into ``out``."""
    index, p = chunk
    n_var = view.shape[-1]
    mean = np.empty((p, n_var), dtype=dtype)
    # ``out[index]`` is a contiguous block (see batch_chunks), so this reshape is a view.
    centred_moments(view[index], dtype, weights, mean, out[index].reshape(p, n_var, n_var))
