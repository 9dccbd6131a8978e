"""Many independent covariance matrices in one call: :func:`batched_cov`.

An input holds observations along ``obs_axis``, variables along ``var_axis`` and batch axes
everywhere else (a PaDiM embedding ``(B, C, H, W)`` has one ``(B, C)`` dataset per patch). The work
runs over chunks of batch items: each chunk is copied once into a private ``(p, N, C)`` array of the
accumulation dtype (this copy is also the cast and the transposition), centred at its own mean
(two-pass: the centred sums are never formed as ``Σxxᵀ − nμμᵀ``, which loses every digit for data
far from the origin), and reduced by one stacked matrix product ``Xcᵀ·Xc`` that BLAS evaluates as a
symmetric rank-k update. Chunks are sized under a memory budget and spread over a few threads.

The chunk kernel (:func:`centred_copy` then :func:`gram`) is shared with :class:`anomstats.RunningMoments`.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from . import _dask
from ._axes import batch_view
from ._budget import DEFAULT_MEMORY_BUDGET, batch_chunks, check_memory_budget, items_per_chunk
from ._parallel import resolve_workers, run_chunks

__all__ = [
    "batched_cov",
    "centred_copy",
    "gram",
    "centred_moments",
    "check_weights",
    "accumulation_dtype",
    "plan_chunks",
]

# Upper bound on one chunk's private copy, whatever the budget: large enough to amortise the
# per-chunk overheads, small enough that every worker gets several chunks. Measured on the PaDiM
# case (448 patches, one thread): 1 MiB 0.31 s, 2-8 MiB ~0.24 s, 16 MiB 0.19 s (a busy machine;
# differences under ~20% are noise). The memory budget can only make chunks smaller.
_CACHE_CHUNK_BYTES: int = 16 * 2**20
# Below this much work per chunk, a thread costs more than it saves.
_MIN_THREAD_CHUNK_BYTES: int = 2**18


def accumulation_dtype(x_dtype: np.dtype[Any], dtype: DTypeLike | None) -> np.dtype[Any]:
    """The dtype in which moments of data of ``x_dtype`` are accumulated and returned.

    ``None`` follows :func:`numpy.cov`: ``result_type(x_dtype, float64)`` (float64 for bool,
    integer, float16/32 and float64; longdouble and complex128 where those come in). An explicit
    ``dtype`` must be a floating or complex dtype, and complex data needs a complex one.

    Examples
    --------
    >>> import numpy as np
    >>> accumulation_dtype(np.dtype(np.float32), None)
    dtype('float64')
    >>> accumulation_dtype(np.dtype(np.int64), np.float32)
    dtype('float32')
    """
    if x_dtype.kind not in "biufc":
        raise TypeError(f"x must hold numbers (bool, integer, floating or complex), got dtype {x_dtype}")
    if dtype is None:
        return np.result_type(x_dtype, np.float64)
    result = np.dtype(dtype)
    if result.kind not in "fc":
        raise TypeError(f"dtype must be a floating or complex dtype, got {result}")
    if x_dtype.kind == "c" and result.kind != "c":
        raise TypeError(
            f"dtype={result} would discard the imaginary part of complex x ({x_dtype}); "
            "pass a complex dtype or leave dtype=None"
        )
    return result


def check_ddof(ddof: Any) -> int:
    """Return an integer-valued ``ddof`` as ``int`` (``2.0`` is fine, ``1.5`` is not), as numpy does."""
    try:
        value = int(ddof)
    except (TypeError, ValueError):
        raise TypeError(f"ddof must be an integer, got {ddof!r}") from None
    if ddof != value:
        raise ValueError(f"ddof must be integer, got {ddof!r}")
    return value


def check_weights(weights: Any, n_obs: int, name: str = "aweights") -> NDArray[np.float64]:
    """Validate analytic (reliability) weights: a 1-D float64 array, one finite weight >= 0 per observation.

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
    if w.ndim > 1:
        raise RuntimeError(
            f"cannot handle multidimensional {name}: expected one weight per observation (1-D), "
            f"got shape {w.shape}"
        )
    if w.ndim == 0:
        raise ValueError(f"{name} must be a 1-D array with one weight per observation, got a scalar")
    if w.shape[0] != n_obs:
        raise RuntimeError(
            f"incompatible numbers of samples and {name}: {w.shape[0]} weights for "
            f"{n_obs} observations along obs_axis"
        )
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{name} must be finite; found NaN or infinity")
    if np.any(w < 0):
        raise ValueError(f"{name} cannot be negative; found minimum {w.min()!r}")
    return w


def plan_chunks(
    view: np.ndarray, dtype: np.dtype[Any], memory_budget: int, workers: int, extra_per_item: int = 0
) -> list[tuple[tuple[Any, ...], int]]:
    """Split the batch axes of ``view`` (laid out ``(*batch, N, C)``) into chunks for the kernel.

    Per batch item the kernel needs its private ``(N, C)`` copy plus a mean of ``C`` entries (and
    ``extra_per_item`` bytes for the caller's own scratch). The budget is shared by the ``workers``
    chunks in flight; chunks are also capped at a few MiB and split finely enough that every
    worker gets some.
    """
    *batch, n_obs, n_var = view.shape
    n_items = int(np.prod(batch, dtype=np.int64))
    per_item = (n_obs * n_var + 2 * n_var) * dtype.itemsize + extra_per_item
    in_flight = max(1, min(workers, n_items))
    max_items = min(
        items_per_chunk(per_item, memory_budget // in_flight),
        items_per_chunk(per_item, _CACHE_CHUNK_BYTES),
        max(
            -(-n_items // in_flight),  # every worker gets a share...
            items_per_chunk(per_item, _MIN_THREAD_CHUNK_BYTES),  # ...unless shares would be tiny
        ),
    )
    return list(batch_chunks(tuple(batch), max_items))


# Tiles of the cache-blocked transposition in ``gather``: TILE_ITEMS batch items by TILE_VALUES
# values of each item; about 64 KiB read and 128 KiB written per tile, which stay in the L2 cache.
_TILE_ITEMS: int = 64
_TILE_VALUES: int = 256


def _flat_view(block: np.ndarray, p: int, values: int) -> np.ndarray | None:
    """``block`` as a ``(p, values)`` view, or ``None`` when its strides do not allow one."""
    try:
        return block.reshape(p, values, copy=False)
    except ValueError:  # would need a copy
        return None
    except TypeError:  # numpy < 2.1 has no ``copy`` keyword: assigning the shape never copies
        flat = block.view()
        try:
            flat.shape = (p, values)
        except AttributeError:
            return None
        return flat


def gather(block: np.ndarray, work: np.ndarray) -> None:
    """Copy (and cast) a ``(*chunk_batch, N, C)`` view into ``work``, shape ``(p, N, C)``.

    ``work`` must have contiguous ``(N, C)`` items (the item stride may be larger).

    Layouts such as PaDiM's ``(B, C, H, W)`` keep the batch items next to each other in memory, so
    every value of one item is a long stride away from the next: a plain copy then touches a new
    cache line for every value it reads. When the chunk can be seen as a ``(p, N·C)`` matrix whose
    item axis is the one close in memory, it is transposed in small tiles instead, each read and
    written while it sits in the cache (measured: 4x faster than ``numpy.copyto`` for the PaDiM
    case). Other layouts are already read in order by a plain copy.
    """
    p = work.shape[0]
    values = work.shape[1] * work.shape[2]
    source = _flat_view(block, p, values) if p > 1 else None
    target = _flat_view(work, p, values)
    if source is None or target is None or abs(source.strides[0]) >= abs(source.strides[1]):
        # Splitting the item axis of ``work`` back into the chunk's batch axes is always a view.
        np.copyto(work.reshape(block.shape), block, casting="unsafe")
        return
    for v0 in range(0, values, _TILE_VALUES):
        for i0 in range(0, p, _TILE_ITEMS):
            np.copyto(
                target[i0 : i0 + _TILE_ITEMS, v0 : v0 + _TILE_VALUES],
                source[i0 : i0 + _TILE_ITEMS, v0 : v0 + _TILE_VALUES],
                casting="unsafe",
            )


def centred_copy(
    block: np.ndarray,
    dtype: np.dtype[Any],
    weights: NDArray[np.float64] | None,
    mean_out: np.ndarray,
    spare_rows: int = 0,
) -> np.ndarray:
    """Private centred (and weighted) copy of one chunk of batch items: the first half of the kernel.

    Parameters
    ----------
    block : ndarray, shape (*chunk_batch, N, C)
        A view of the caller's data; read only.
    dtype : numpy.dtype
        Accumulation dtype.
    weights : ndarray, shape (N,), or None
        Validated analytic weights with a positive sum, or ``None`` for unit weights.
    mean_out : ndarray, shape (p, C)
        Receives the (weighted) mean of each item; ``p`` is the number of items in ``block``.
    spare_rows : int, default 0
        Extra rows allocated after the ``N`` observations, left uninitialised for the caller
        (:class:`anomstats.RunningMoments` puts its mean-shift correction there).

    Returns
    -------
    ndarray, shape (p, N + spare_rows, C)
        Rows ``√w_n (x_n − mean)``, so that :func:`gram` of it gives the centred sums.
    """
    n_obs, n_var = block.shape[-2:]
    p = mean_out.shape[0]
    # One private copy: cast, transposition to (p, N, C) and protection of the input at once.
    buffer = np.empty((p, n_obs + spare_rows, n_var), dtype=dtype)
    work = buffer[:, :n_obs]
    gather(block, work)
    if weights is None:
        np.sum(work, axis=1, out=mean_out)
        mean_out /= n_obs
    else:
        w = weights.astype(dtype, copy=False)
        np.matmul(w, work, out=mean_out)
        mean_out /= w.sum()
    work -= mean_out[:, None, :]
    if weights is not None:
        # Σ w (x−μ)(x−μ)ᴴ = Σ (√w (x−μ))(√w (x−μ))ᴴ keeps the product symmetric (one BLAS syrk).
        work *= np.sqrt(weights).astype(dtype, copy=False)[:, None]
    return buffer


def gram(rows: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = rows[i]ᵀ · conj(rows[i])`` for a stack of ``(M, C)`` matrices: the second half of the kernel."""
    rows_t = rows.transpose(0, 2, 1)
    if rows.dtype.kind == "c":
        np.matmul(rows_t, rows.conj(), out=out)
    else:
        # Both operands are views of one buffer: numpy hands this to BLAS syrk.
        np.matmul(rows_t, rows, out=out)


def centred_moments(
    block: np.ndarray,
    dtype: np.dtype[Any],
    weights: NDArray[np.float64] | None,
    mean_out: np.ndarray,
    sums_out: np.ndarray,
) -> None:
    """Mean and centred sums ``Σ_n w_n (x_n − mean)(x_n − mean)ᴴ`` (not normalised) of one chunk.

    ``sums_out`` has shape ``(p, C, C)``; the other arguments are those of :func:`centred_copy`.
    """
    gram(centred_copy(block, dtype, weights, mean_out), sums_out)


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
    item is centred at its own mean before the products are taken.

    Deliberate differences from :func:`numpy.cov` (beyond batching):

    - The result always has shape ``(*batch, C, C)`` (numpy squeezes one variable to 0-d).
    - The result dtype is always the accumulation dtype (numpy returns float64 for
      ``dtype=float32`` with ``aweights``).
    - NaN or infinite ``aweights`` raise ``ValueError`` (numpy silently returns NaN).
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
    if _dask.is_dask_array(x):
        return _dask.batched_cov(
            x, obs_axis=obs_axis, var_axis=var_axis, ddof=ddof, aweights=aweights, dtype=dtype,
            memory_budget=memory_budget, workers=workers,
        )
    data = np.asarray(x)
    ddof = check_ddof(ddof)
    budget = check_memory_budget(memory_budget)
    n_workers = resolve_workers(workers)
    view = batch_view(data, obs_axis, var_axis)
    acc = accumulation_dtype(data.dtype, dtype)
    *batch, n_obs, n_var = view.shape

    weights = None
    if aweights is None:
        norm = float(n_obs - ddof)
    else:
        weights = check_weights(aweights, n_obs, "aweights")
        w_sum = float(weights.sum())
        if w_sum == 0.0:
            raise ZeroDivisionError("Weights sum to zero, can't be normalized")
        norm = w_sum - ddof * float(np.dot(weights, weights)) / w_sum if ddof else w_sum

    out = np.empty((*batch, n_var, n_var), dtype=acc)
    if out.size:
        if n_obs == 0:
            out[...] = 0  # an empty sum; the normalisation below decides inf/nan as numpy does
        else:
            chunks = plan_chunks(view, acc, budget, n_workers)
            run_chunks(
                lambda chunk: _cov_chunk(view, acc, weights, out, chunk),
                chunks,
                n_workers,
                # One big product (a single item) may use BLAS's threads; many small ones may not.
                single_blas=out.size > n_var * n_var,
            )
    if norm <= 0:
        warnings.warn("Degrees of freedom <= 0 for slice", RuntimeWarning, stacklevel=2)
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
