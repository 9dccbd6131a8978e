"""Dask arrays in the NumPy core: the one module that knows about dask.

dask is imported only when a dask array is actually given: :func:`is_dask_array` looks in
``sys.modules`` first, so ``import anomstats`` and every NumPy input keep working without dask installed
(it is the optional extra ``anomstats[dask]``). This module imports nothing else of the library: the
estimators come to it, through the :func:`dispatch` decorator on their public methods and a small
explicit protocol.

**The protocol.** A streamable estimator (:class:`~anomstats.RunningMoments`,
:class:`~anomstats.MultiVariateGaussian`) implements

* ``empty_like()``: a new, empty estimator with the same configuration (picklable: it travels to the
  workers as the template of every partial state);
* ``accumulate_block(block, weights)``: fold one in-memory chunk of observations in, return ``self``;
* ``merge(other)``: fold another partial state in, return ``self``;
* ``adopt(other)``: take over another estimator's fitted state (for ``fit``, which replaces the state).

**Two patterns.**

* *Fitting* (:func:`reduce_observations`): the input is chunked along its observation axis; one task per
  chunk builds a partial state where the chunk lives, and a tree of ``merge`` tasks, ``split_every`` at a
  time, combines them (Chan et al.'s pairwise update, so the result equals the in-memory one to
  rounding). Only moments travel, never the data. The other axes are rechunked to one chunk each first (a
  covariance couples all variables; a chunk then is a slab of observations).
* *Scoring* (:func:`map_queries`): the query points stay a dask array; the fitted model is put in the graph
  once (a ``dask.delayed`` object, shipped once per worker) and each query chunk is scored by
  ``map_blocks``. The result is a lazy dask array.

**Parity with in-memory input.** A dask twin runs the in-memory checks that need only the shape and dtype
before anything is computed, with the in-memory messages. Faults found in the data (NaN or infinity) are
found by a chunk, which knows only its own piece: on that failure path :func:`first_non_finite` and
:func:`first_non_finite_patch` locate the first bad value in the whole array (two small reductions), so the
error names what the in-memory error names. Lazy scores report a query's position in the whole array too
(the model's optional ``_dask_block_error(error, block, offset)`` hook), but they fail when the result is
computed, and with several bad queries the one named is the first of the block that failed first, which
depends on the scheduler's order (in memory: the first of all).

Deliberate differences from the in-memory path: :func:`anomstats.batched_cov` returns a *lazy* dask array
(dask in, dask out; call ``.compute()``); a :class:`~anomstats.MultiVariateGaussian` fitted from a dask
array keeps its running moments (it was built by ``partial_fit`` and ``merge``), so unlike after an
in-memory ``fit`` it can go on streaming with ``partial_fit``.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "DEFAULT_SPLIT_EVERY",
    "compute_or_name_non_finite",
    "dispatch",
    "first_non_finite",
    "first_non_finite_patch",
    "is_dask_array",
    "lazy_covariance",
    "map_queries",
    "reduce_observations",
]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
L = TypeVar("L")

#: How many partial states one merge task combines (the fan-in of the reduction tree).
DEFAULT_SPLIT_EVERY: int = 8


def is_dask_array(x: Any) -> bool:
    """True when ``x`` is a ``dask.array.Array``; never imports dask itself.

    If dask has not been imported by anyone, ``x`` cannot be a dask array, so the check costs a
    dictionary look-up and NumPy users never pay for (or need) dask.

    Examples
    --------
    >>> import numpy as np
    >>> is_dask_array(np.ones(3))
    False
    """
    module = sys.modules.get("dask.array")
    if module is None:
        return False
    return isinstance(x, module.Array)


def dispatch(dask_version: Callable[..., Any], *, arg: str) -> Callable[[F], F]:
    """Decorator: a call whose argument ``arg`` is a dask array goes to ``dask_version`` instead.

    ``dask_version`` takes the same arguments as the decorated function. The check is one dictionary
    look-up for NumPy input (see :func:`is_dask_array`).

    Examples
    --------
    >>> def lazy_total(x):
    ...     return "lazy"
    >>> @dispatch(lazy_total, arg="x")
    ... def total(x):
    ...     return sum(x)
    >>> total([1, 2])
    3
    """

    def decorate(func: F) -> F:
        position = list(inspect.signature(func).parameters).index(arg)

        @functools.wraps(func)
        def routed(*args: Any, **kwargs: Any) -> Any:
            data = args[position] if len(args) > position else kwargs.get(arg)
            if is_dask_array(data):
                if _unknown_sizes(data):
                    # Boolean indexing and the like leave NaN chunk sizes, which the shape checks and the
                    # chunk-by-chunk reduction cannot use: compute them first (one extra pass over the graph).
                    data = data.compute_chunk_sizes()
                    if len(args) > position:
                        args = args[:position] + (data,) + args[position + 1 :]
                    else:
                        kwargs = {**kwargs, arg: data}
                return dask_version(*args, **kwargs)
            return func(*args, **kwargs)

        routed.__dask_dispatch__ = dask_version  # type: ignore[attr-defined]
        return routed  # type: ignore[return-value]

    return decorate


def _unknown_sizes(x: Any) -> bool:
    """Whether a dask array has chunks of unknown (NaN) size along some axis."""
    return any(math.isnan(size) for sizes in x.chunks for size in sizes)


def _dask_modules() -> tuple[Any, Any]:
    try:
        import dask
        import dask.array as da
    except ImportError as exc:  # pragma: no cover - only reachable with a dask-like object
        raise ImportError("dask is needed for dask inputs: pip install 'anomstats[dask]'") from exc
    return dask, da


def _check_split_every(split_every: Any) -> int:
    if isinstance(split_every, bool) or not isinstance(split_every, (int, np.integer)) or split_every < 2:
        raise ValueError(f"split_every must be an integer >= 2, got {split_every!r}")
    return int(split_every)


# ---------------------------------------------------------------------------------------------
# Tasks (module-level functions, so distributed workers can unpickle them by reference)


def _block_state(template: Any, block: np.ndarray, weights: np.ndarray | None) -> Any:
    return template.empty_like().accumulate_block(block, weights)


def _merge_all(first: Any, *rest: Any) -> Any:
    # Each partial state is the output of exactly one task and is consumed by exactly one merge
    # task, so folding into ``first`` in place is safe and saves a copy of a (P, C, C) stack.
    for other in rest:
        first.merge(other)
    return first


def _covariance_of(moments: Any, ddof: int, dtype: np.dtype) -> np.ndarray:
    return np.asarray(moments.covariance(ddof=ddof)).astype(dtype, copy=False)


def _score_block(
    block: np.ndarray, model: Any, method: str, kwargs: dict[str, Any], query_axis: int = 0, block_info: Any = None
) -> np.ndarray:
    try:
        return getattr(model, method)(block, **kwargs)
    except ValueError as error:
        hook = getattr(model, "_dask_block_error", None)
        if hook is None or block_info is None:
            raise
        offset = int(block_info[0]["array-location"][query_axis][0])
        replacement = hook(error, block, offset)
        if replacement is None:
            raise
    raise replacement  # outside the except clause: the in-memory error has no context either


# ---------------------------------------------------------------------------------------------
# Fitting: per-chunk states, tree-merged


def _tree_reduce(parts: Sequence[Any], split_every: int) -> Any:
    dask, _ = _dask_modules()
    parts = list(parts)
    while len(parts) > 1:
        parts = [
            dask.delayed(_merge_all, pure=False)(*parts[i : i + split_every])
            for i in range(0, len(parts), split_every)
        ]
    return parts[0]


def _weight_blocks(weights: Any, chunks: tuple[int, ...]) -> list[Any]:
    """One block of weights per observation chunk (dask or in-memory weights alike)."""
    _, da = _dask_modules()
    if not is_dask_array(weights):
        bounds = np.cumsum((0,) + chunks)
        return [weights[start:stop] for start, stop in zip(bounds[:-1], bounds[1:])]
    return list(da.asarray(weights).rechunk((chunks,)).to_delayed().reshape(-1))


def reduce_observations(
    template: Any,
    x: Any,
    obs_axis: int,
    weights: Any = None,
    *,
    split_every: int | None = None,
) -> Any:
    """A ``dask.delayed`` estimator holding every observation of ``x``, tree-merged over its chunks.

    Parameters
    ----------
    template : estimator implementing the protocol (see the module notes)
        Empty; each chunk's partial state is ``template.empty_like().accumulate_block(block, weights)``.
    x : dask.array.Array
        Observations along ``obs_axis`` (non-negative; the chunking that matters).
    weights : ndarray or dask.array.Array, optional
        One weight per observation, already validated for shape by the caller.
    split_every : int, optional
        Fan-in of the merge tree; default :data:`DEFAULT_SPLIT_EVERY` (read at call time).

    Examples
    --------
    >>> import numpy as np, dask.array as da
    >>> from anomstats import RunningMoments
    >>> x = da.from_array(np.arange(24.0).reshape(6, 2, 2) ** 1.5, chunks=(2, 2, 2))
    >>> reduce_observations(RunningMoments(), x, 0).compute(scheduler="sync").count
    6
    """
    dask, _ = _dask_modules()
    if not is_dask_array(x):
        raise TypeError(f"x must be a dask array, got {type(x).__name__}")
    split_every = _check_split_every(DEFAULT_SPLIT_EVERY if split_every is None else split_every)
    x = x.rechunk({axis: -1 for axis in range(x.ndim) if axis != obs_axis})
    blocks = list(x.to_delayed().reshape(-1))  # one block per observation chunk, in order
    sizes = x.chunks[obs_axis]
    weight_blocks = [None] * len(blocks) if weights is None else _weight_blocks(weights, sizes)
    keep = [i for i, size in enumerate(sizes) if size > 0] or [0]
    parts = [dask.delayed(_block_state, pure=False)(template, blocks[i], weight_blocks[i]) for i in keep]
    return _tree_reduce(parts, split_every)


def lazy_covariance(
    template: Any, x: Any, obs_axis: int, var_axis: int, weights: Any, ddof: int, dtype: np.dtype
) -> Any:
    """``template``'s covariance over all of ``x`` as a lazy, one-chunk dask array ``(*batch, C, C)``."""
    dask, da = _dask_modules()
    total = reduce_observations(template, x, obs_axis, weights)
    cov = dask.delayed(_covariance_of, pure=True)(total, ddof, dtype)
    batch_shape = tuple(s for axis, s in enumerate(x.shape) if axis not in (obs_axis, var_axis))
    c = x.shape[var_axis]
    return da.from_delayed(cov, shape=(*batch_shape, c, c), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Scoring: lazy, chunk by chunk along the query axis


def map_queries(model: Any, method: str, x: Any, query_axis: int, probe: np.ndarray, **kwargs: Any) -> Any:
    """``getattr(model, method)`` of a dask array of queries chunked along ``query_axis``, lazily.

    Every other axis is rechunked to one chunk. ``probe`` is the in-memory result of scoring one
    query (the caller computes it, so a wrong shape fails now, with the in-memory message); it fixes
    the output dtype. The result drops every axis of ``x`` but ``query_axis`` and the axes after the
    first ``probe.ndim``.

    Examples
    --------
    >>> import numpy as np, dask.array as da
    >>> from anomstats import GaussianKDE
    >>> rng = np.random.default_rng(4)
    >>> kde = GaussianKDE(rng.normal(size=(2, 50)))
    >>> q = rng.normal(size=(2, 7))
    >>> p = kde.pdf(da.from_array(q, chunks=(2, 3)))
    >>> p.shape, p.numblocks
    ((7,), (3,))
    >>> bool(np.allclose(p.compute(scheduler="sync"), kde.pdf(q), rtol=1e-12))
    True
    """
    dask, da = _dask_modules()
    x = x.rechunk({axis: -1 for axis in range(x.ndim) if axis != query_axis})
    out_dtype = np.asarray(probe).dtype
    return da.map_blocks(
        _score_block,
        x,
        dask.delayed(model, pure=True),
        method,
        kwargs,
        query_axis,
        # (M, C, *spatial) scores lose C; (d, m) points lose d.
        drop_axis=1 if query_axis == 0 else 0,
        dtype=out_dtype,
        meta=np.empty((0,) * (x.ndim - 1), dtype=out_dtype),
    )


# ---------------------------------------------------------------------------------------------
# Locating bad values in a whole dask array (only on failure paths: the chunks found them first)


def compute_or_name_non_finite(
    compute: Callable[[], T], locate: Callable[[], L | None], refuse: Callable[[L], Any]
) -> T:
    """``compute()``; if a chunk refused NaN or infinity (a ``ValueError``), the in-memory error instead.

    The failure path of every dask twin that reduces data: a chunk knows only its own piece, so on a
    ``ValueError`` ``locate()`` finds the first non-finite value of the whole array (:func:`first_non_finite`,
    :func:`first_non_finite_patch`) and ``refuse(found)`` raises the error the in-memory method raises for it
    (outside the ``except`` block: no chained chunk error). When ``locate()`` finds none, the chunk's error
    was another fault and is re-raised as it is.

    Examples
    --------
    >>> import numpy as np, dask.array as da
    >>> x = da.from_array(np.array([0.0, np.nan, 1.0]), chunks=1)
    >>> def compute():
    ...     raise ValueError("a chunk's own message")
    >>> def refuse(found):
    ...     raise ValueError(f"x is not finite at {found}")
    >>> compute_or_name_non_finite(compute, lambda: first_non_finite(x), refuse)
    Traceback (most recent call last):
    ...
    ValueError: x is not finite at (1,)
    >>> compute_or_name_non_finite(lambda: 42, lambda: first_non_finite(x), refuse)
    42
    """
    try:
        return compute()
    except ValueError:
        found = locate()
        if found is None:
            raise
    refuse(found)
    raise AssertionError("refuse() must raise")  # pragma: no cover


def first_non_finite(x: Any) -> tuple[int, ...] | None:
    """Index (C order) of the first NaN or infinity of dask array ``x``, or ``None`` when it has none.

    What ``numpy.unravel_index(argmax(~isfinite(x)))`` gives in memory, from a reduction to axis 0 and one
    computed slab ``x[i]``.

    Examples
    --------
    >>> import numpy as np, dask.array as da
    >>> x = np.zeros((4, 3)); x[2, 1] = np.nan; x[3, 0] = np.inf
    >>> first_non_finite(da.from_array(x, chunks=(1, 3)))
    (2, 1)
    """
    _, da = _dask_modules()
    if np.dtype(x.dtype).kind not in "fc" or x.size == 0:
        return None
    bad = ~da.isfinite(x)
    rows = np.asarray((bad.any(axis=tuple(range(1, x.ndim))) if x.ndim > 1 else bad).compute())
    if not rows.any():
        return None
    i = int(np.argmax(rows))
    slab = np.asarray(x[i].compute())
    rest = np.unravel_index(int(np.argmax(~np.isfinite(slab))), slab.shape) if slab.ndim else ()
    return (i, *(int(j) for j in rest))


def first_non_finite_patch(x: Any) -> tuple[int, int, int] | None:
    """``(patch, observation, feature)`` of the first NaN or infinity of an embedding ``(N, C, *spatial)``.

    The patch is the first (flat index over ``spatial``) holding one, and then the first bad value of that
    patch's ``(N, C)`` data in C order, as the in-memory fit reports them. ``None`` when all is finite.

    Examples
    --------
    >>> import numpy as np, dask.array as da
    >>> x = np.zeros((5, 2, 2, 2)); x[3, 1, 1, 0] = np.nan
    >>> first_non_finite_patch(da.from_array(x, chunks=(2, 2, 2, 2)))
    (2, 3, 1)
    """
    _, da = _dask_modules()
    if np.dtype(x.dtype).kind not in "fc" or x.size == 0:
        return None
    n, c = x.shape[0], x.shape[1]
    spatial = tuple(x.shape[2:])
    patch_bad = np.asarray((~da.isfinite(x)).any(axis=(0, 1)).compute()).reshape(-1)
    if not patch_bad.any():
        return None
    patch = int(np.argmax(patch_bad))
    position = np.unravel_index(patch, spatial) if spatial else ()
    data = np.asarray(x[(slice(None), slice(None), *position)].compute()).reshape(n, c)
    obs, feature = (int(i) for i in np.argwhere(~np.isfinite(data))[0])
    return patch, obs, feature
