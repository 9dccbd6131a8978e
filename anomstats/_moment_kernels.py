"""The chunk kernels of centred moments, shared by :func:`anomstats.batched_cov` and
:class:`anomstats.RunningMoments`.

An input is viewed as ``(*batch, N, C)`` (see :mod:`anomstats._axes`). Work runs over chunks of batch
items: each chunk is copied once into a private ``(p, N, C)`` array of the accumulation dtype (this copy
is also the cast and the transposition: :func:`gather`, the library's one patch-major gather), centred at
its own mean (two-pass: the centred sums are never formed as ``Σxxᵀ − nμμᵀ``, which loses every digit for
data far from the origin) by :func:`centred_copy`, and reduced by one stacked matrix product ``Xcᵀ·Xc``
(:func:`gram`) that BLAS evaluates as a symmetric rank-k update. :func:`plan_moment_chunks` sizes the chunks under
a memory budget for a few threads.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from ._budget import plan_chunks

__all__ = ["plan_moment_chunks", "gather", "centred_copy", "gram", "centred_moments"]

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
