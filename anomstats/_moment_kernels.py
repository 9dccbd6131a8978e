"""The chunk kernels of centred moments, shared by :func:`anomstats.batched_cov` and
:class:`anomstats.RunningMoments`.

An input is viewed as ``(*batch, N, C)`` (see :mod:`anomstats._axes`). Work runs over chunks of batch
items: each chunk is copied once into a private ``(p, N, C)`` array of the accumulation dtype (this copy
is also the cast and the transposition: :func:`gather`, the library's one patch-major gather), centred at
its own mean (two-pass: the centred sums are never formed as ``Σxxᵀ − nμμᵀ``, which loses every digit for
data far from the origin) by :func:`centred_copy`, and reduced by one stacked matrix product ``Xcᵀ·Xc``
(:func:`gram`) that BLAS evaluates as a symmetric rank-k update. :func:`plan_moment_chunks` sizes the chunks under
a memory budget for a few threads.

Location-free accuracy: the copy subtracts a *shift* on the way in (one value per item and variable: the
item's first observation, :func:`first_observations`, or a running mean), in the same pass as the cast.
A shift near the data is subtracted exactly when it is within a factor 2 of the data (Sterbenz's lemma:
always, far from the origin), so every later sum works on numbers of the size of the data's spread ``s``
and rounds relative to ``s``, never to the offset ``o``: the shifted mean, the centred sums and the
differences of means that streaming merges need lose only ``eps·sqrt(n)``-order relative accuracy,
whatever ``o``. (An unshifted float64 mean along a strided axis is off by up to ``n·eps·|o|``, and a
difference of two such means by as much: the ``eps·|o|/s`` loss of plain streaming.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from ._budget import plan_chunks
from ._weights import scaled_weights

__all__ = [
    "plan_moment_chunks", "gather", "first_observations", "centred_copy", "gram", "centred_moments", "two_sum",
]

# Upper bound on one chunk's private copy, whatever the budget: large enough to amortise the
# per-chunk overheads, small enough that every worker gets several chunks. Measured on the PaDiM
# case (448 patches, one thread): 1 MiB 0.31 s, 2-8 MiB ~0.24 s, 16 MiB 0.19 s (a busy machine;
# differences under ~20% are noise). The memory budget can only make chunks smaller.
_CACHE_CHUNK_BYTES: int = 16 * 2**20
# Below this much work per chunk, a thread costs more than it saves.
_MIN_THREAD_CHUNK_BYTES: int = 2**18


def plan_moment_chunks(
    view: np.ndarray, dtype: np.dtype[Any], memory_budget: int, workers: int, extra_per_item: int = 0
) -> list[tuple[tuple[Any, ...], int]]:
    """:func:`anomstats._budget.plan_chunks` for the batch axes of ``view`` (laid out ``(*batch, N, C)``).

    Per batch item the kernel needs its private ``(N, C)`` copy plus a mean of ``C`` entries (and
    ``extra_per_item`` bytes for the caller's own scratch); chunks are also capped at a few MiB.
    """
    *batch, n_obs, n_var = view.shape
    per_item = (n_obs * n_var + 2 * n_var) * dtype.itemsize + extra_per_item
    return plan_chunks(
        tuple(batch), per_item, memory_budget, workers,
        max_chunk_bytes=_CACHE_CHUNK_BYTES, min_thread_bytes=_MIN_THREAD_CHUNK_BYTES,
    )


# Tiles of the cache-blocked transposition in ``gather``: TILE_ITEMS batch items by TILE_VALUES
# values of each item (with shifts: the whole observations that fit, where C <= TILE_VALUES); tens of
# KiB read and written per tile, which stay in the cache.
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


def gather(block: np.ndarray, work: np.ndarray, shift: np.ndarray | None = None) -> None:
    """Copy (and cast) a ``(*chunk_batch, N, C)`` view into ``work``, shape ``(p, N, C)``.

    ``work`` must have contiguous ``(N, C)`` items (the item stride may be larger). With ``shift``
    (shape ``(p, C)``, ``work``'s dtype) the copy holds ``block − shift`` (each item's shift subtracted
    from each of its observations), computed in ``result_type(block, shift)`` and rounded once into
    ``work``: the same single pass over the data as a plain copy.

    Layouts such as PaDiM's ``(B, C, H, W)`` keep the batch items next to each other in memory, so
    every value of one item is a long stride away from the next: a plain copy then touches a new
    cache line for every value it reads. When the chunk can be seen as a ``(p, N·C)`` matrix whose
    item axis is the one close in memory, it is transposed in small tiles instead, each read and
    written while it sits in the cache (measured: 4x faster than ``numpy.copyto`` for the PaDiM
    case). Other layouts are already read in order by a plain copy.
    """
    p, n_obs, n_var = work.shape
    values = n_obs * n_var
    source = _flat_view(block, p, values) if p > 1 else None
    target = _flat_view(work, p, values)
    if source is None or target is None or abs(source.strides[0]) >= abs(source.strides[1]):
        # Splitting the item axis of ``work`` back into the chunk's batch axes is always a view.
        out = work.reshape(block.shape)
        if shift is None:
            np.copyto(out, block, casting="unsafe")
        else:
            np.subtract(block, shift.reshape(block.shape[:-2] + (1, n_var)), out=out, casting="unsafe")
        return
    tile = _TILE_VALUES
    pattern = None
    if shift is not None:
        # Value v of an item belongs to variable v % C, so the tile starting at value v0 subtracts columns
        # v0 % C onwards of a pattern of the shifts repeated. Tiles of whole observations where C fits in one
        # (always from column 0); wider observations are cut into tiles of _TILE_VALUES all the same: a tile
        # of a whole C = 550 observation spans too many cache lines (measured, float32 data and float64
        # shifts, 64 patches x 20 x 550: 2.9 ms in 550-value tiles, 1.6 ms in 256-value tiles).
        if n_var <= _TILE_VALUES:
            tile = n_var * (_TILE_VALUES // n_var)
        pattern = np.tile(shift, (1, -(-(tile + n_var) // n_var)))
    for v0 in range(0, values, tile):
        width = min(tile, values - v0)
        first = v0 % n_var
        for i0 in range(0, p, _TILE_ITEMS):
            dst = target[i0 : i0 + _TILE_ITEMS, v0 : v0 + width]
            src = source[i0 : i0 + _TILE_ITEMS, v0 : v0 + width]
            if pattern is None:
                np.copyto(dst, src, casting="unsafe")
            else:
                np.subtract(src, pattern[i0 : i0 + _TILE_ITEMS, first : first + width], out=dst, casting="unsafe")


def first_observations(
    block: np.ndarray, dtype: np.dtype[Any], weights: NDArray[np.float64] | None = None
) -> np.ndarray:
    """Each item's first observation of positive weight, ``(p, C)`` in ``dtype``: a shift for :func:`centred_copy`.

    An observation lies within ``sqrt(n − 1)`` standard deviations of its item's mean (Samuelson's
    inequality), so the shifted data are ``O(sqrt(n)·s)`` at worst and ``O(s)`` in practice, wherever
    the data lie. A ``(p, C)`` read: negligible next to the copy.

    Examples
    --------
    >>> x = np.arange(12.0).reshape(2, 3, 2)          # 2 items, 3 observations, 2 variables
    >>> first_observations(x, np.dtype(np.float64), np.array([0.0, 1.0, 1.0]))
    array([[2., 3.],
           [8., 9.]])
    """
    n_var = block.shape[-1]
    first = 0 if weights is None or weights.size == 0 else int(np.argmax(weights > 0))
    shift = np.empty(block.shape[:-2] + (n_var,), dtype=dtype)
    np.copyto(shift, block[..., first, :], casting="unsafe")
    return shift.reshape(-1, n_var)


def two_sum(a: np.ndarray, b: np.ndarray, hi_out: np.ndarray, lo_out: np.ndarray) -> None:
    """``hi + lo == a + b`` exactly, with ``hi = fl(a + b)``: Knuth's TwoSum, elementwise (real or complex).

    :class:`anomstats.RunningMoments` keeps a streamed mean as such an unevaluated sum: ``hi`` is the
    rounded mean, ``lo`` what rounding it dropped. ``hi_out`` may be ``a`` (it is written last).

    Examples
    --------
    >>> hi, lo = np.empty(1), np.empty(1)
    >>> two_sum(np.array([1e8]), np.array([1e-9]), hi, lo)
    >>> float(hi[0]) == 1e8, float(lo[0]) == 1e-9
    (True, True)
    """
    s = a + b
    b_virtual = s - a
    lo_out[...] = (a - (s - b_virtual)) + (b - b_virtual)
    hi_out[...] = s


def centred_copy(
    block: np.ndarray,
    dtype: np.dtype[Any],
    weights: NDArray[np.float64] | None,
    mean_out: np.ndarray,
    spare_rows: int = 0,
    shift: np.ndarray | None = None,
) -> np.ndarray:
    """Private centred (and weighted) copy of one chunk of batch items: the first half of the kernel.

    Parameters
    ----------
    block : ndarray, shape (*chunk_batch, N, C)
        A view of the caller's data; read only.
    dtype : numpy.dtype
        Accumulation dtype.
    weights : ndarray, shape (N,), or None
        Validated analytic weights with a positive sum, or ``None`` for unit weights. Only their ratios
        matter for the mean (it uses them scaled by a power of two, exactly); the rows are scaled by
        ``√w`` itself.
    mean_out : ndarray, shape (p, C)
        Receives the (weighted) mean of each item *minus its shift*; ``p`` is the number of items.
    spare_rows : int, default 0
        Extra rows allocated after the ``N`` observations, left uninitialised for the caller
        (:class:`anomstats.RunningMoments` puts its mean-shift correction there).
    shift : ndarray, shape (p, C), optional
        Subtracted from every observation in the copy (see the module notes; :func:`first_observations`
        gives one). Default: none, ``mean_out`` is then the mean itself.

    Returns
    -------
    ndarray, shape (p, N + spare_rows, C)
        Rows ``√w_n (x_n − mean)``, so that :func:`gram` of it gives the centred sums.
    """
    n_obs, n_var = block.shape[-2:]
    p = mean_out.shape[0]
    # One private copy: cast, shift, transposition to (p, N, C) and protection of the input at once.
    buffer = np.empty((p, n_obs + spare_rows, n_var), dtype=dtype)
    work = buffer[:, :n_obs]
    gather(block, work, shift)
    if weights is None:
        np.sum(work, axis=1, out=mean_out)
        mean_out /= n_obs
    else:
        # Scaled by a power of two (exact): the products w·x cannot overflow for weights of any scale.
        w = scaled_weights(weights)[0].astype(dtype, copy=False)
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

    ``sums_out`` has shape ``(p, C, C)``; the other arguments are those of :func:`centred_copy`. The
    copy is shifted by each item's first observation (:func:`first_observations`), so the sums keep
    their digits far from the origin; ``mean_out`` receives the mean itself.
    """
    shift = first_observations(block, dtype, weights)
    gram(centred_copy(block, dtype, weights, mean_out, shift=shift), sums_out)
    mean_out += shift
