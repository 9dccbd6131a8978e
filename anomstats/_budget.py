"""Cutting work into chunks whose temporaries fit a memory budget.

Private helper. Functions that would otherwise allocate temporaries proportional to the whole
input (``n * m`` pairs, ``patches * batch`` values, ...) process it in chunks of items; each item
has a known temporary cost in bytes and a chunk holds as many items as the budget allows (always
at least one, so a tiny budget slows the work down but never stops it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "items_per_chunk",
    "chunk_slices",
    "batch_chunks",
    "plan_chunks",
]

#: Default bound, in bytes, on the temporaries of one call (64 MiB).
DEFAULT_MEMORY_BUDGET: int = 64 * 2**20


def items_per_chunk(bytes_per_item: int, memory_budget: int) -> int:
    """How many items of ``bytes_per_item`` fit in ``memory_budget`` (at least 1).

    Examples
    --------
    >>> items_per_chunk(1000, 4096), items_per_chunk(10**9, 4096), items_per_chunk(0, 10)
    (4, 1, 1)
    """
    if bytes_per_item <= 0:
        return 1
    return max(1, memory_budget // bytes_per_item)


def chunk_slices(n_items: int, bytes_per_item: int, memory_budget: int) -> Iterator[slice]:
    """Yield consecutive slices covering ``range(n_items)``, each within ``memory_budget``.

    Examples
    --------
    >>> [(s.start, s.stop) for s in chunk_slices(10, 100, 400)]
    [(0, 4), (4, 8), (8, 10)]
    """
    step = items_per_chunk(bytes_per_item, memory_budget)
    for start in range(0, n_items, step):
        yield slice(start, min(start + step, n_items))


def plan_chunks(
    batch_shape: tuple[int, ...],
    bytes_per_item: int,
    memory_budget: int,
    workers: int,
    *,
    max_items: int | None = None,
    max_chunk_bytes: int | None = None,
    min_thread_bytes: int = 0,
    chunks_per_worker: int = 1,
) -> list[tuple[tuple[Any, ...], int]]:
    """The library's one chunk planner: cover a batch with chunks for ``workers`` threads.

    The memory budget is shared by the chunks in flight (one per worker), so a chunk holds at most
    ``memory_budget // workers`` bytes of temporaries (``bytes_per_item`` per item; always at least one
    item). It is also capped at ``max_items`` items and ``max_chunk_bytes`` bytes, and with several
    workers split finely enough that each gets about ``chunks_per_worker`` chunks, unless such shares
    would hold less than ``min_thread_bytes`` (then a thread costs more than it saves).

    Returns
    -------
    list of (index, n_items)
        As :func:`batch_chunks`: index tuples selecting contiguous runs of the flattened batch.

    Examples
    --------
    >>> [n for _, n in plan_chunks((10,), 100, 400, 1)]
    [4, 4, 2]
    >>> [n for _, n in plan_chunks((10,), 1, 10**6, 2, chunks_per_worker=4)]
    [2, 2, 2, 2, 2]
    """
    n_items = math.prod(batch_shape)
    in_flight = max(1, min(workers, n_items))
    size = items_per_chunk(bytes_per_item, memory_budget // in_flight)
    if max_chunk_bytes is not None:
        size = min(size, items_per_chunk(bytes_per_item, max_chunk_bytes))
    if max_items is not None:
        size = min(size, max_items)
    if in_flight > 1:
        share = -(-n_items // (chunks_per_worker * in_flight))
        floor = items_per_chunk(bytes_per_item, min_thread_bytes) if min_thread_bytes else 1
        size = min(size, max(share, floor))
    return list(batch_chunks(tuple(batch_shape), max(1, size)))


def batch_chunks(batch_shape: tuple[int, ...], max_items: int) -> Iterator[tuple[tuple[Any, ...], int]]:
    """Cover a multi-dimensional batch with blocks of at most ``max_items`` items.

    Each block is an index tuple that selects a *contiguous* run of the flattened batch: a few
    leading integer indices, one slice, and full trailing axes. Indexing a C-contiguous array of
    shape ``(*batch_shape, ...)`` with it gives a contiguous view, so results can be written in
    place, and the input is never reshaped (reshaping a strided view would copy all of it).

    Yields
    ------
    (index, n_items)
        The index tuple and the number of batch items it selects.

    Examples
    --------
    >>> for index, n in batch_chunks((2, 3), 4):
    ...     print(index, n)
    (slice(0, 1, None),) 3
    (slice(1, 2, None),) 3
    >>> [n for _, n in batch_chunks((2, 3), 2)]
    [2, 1, 2, 1]
    >>> list(batch_chunks((), 5))
    [((), 1)]
    """
    if max_items < 1:
        raise ValueError(f"max_items must be at least 1, got {max_items}")
    if any(size == 0 for size in batch_shape):
        return
    if not batch_shape:
        yield (), 1
        return
    # Slice along the outermost axis whose trailing block (one index of it) still fits.
    axis = 0
    while math.prod(batch_shape[axis + 1 :]) > max_items:
        axis += 1
    inner = math.prod(batch_shape[axis + 1 :])
    step = max(1, max_items // inner)
    leading = batch_shape[:axis]
    size = batch_shape[axis]
    for lead in _ndindex(leading):
        for start in range(0, size, step):
            stop = min(start + step, size)
            yield (*lead, slice(start, stop)), (stop - start) * inner


def _ndindex(shape: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    """All index tuples of ``shape`` in C order (``()`` once for an empty shape)."""
    if not shape:
        yield ()
        return
    for head in range(shape[0]):
        for tail in _ndindex(shape[1:]):
            yield (head, *tail)
