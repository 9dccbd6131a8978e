"""Dask arrays in the NumPy core: fits reduced where the chunks live, scores computed chunk by chunk.

Everything dask-specific lives here, and dask is imported only when a dask array is actually given:
:func:`is_dask_array` looks in ``sys.modules`` first, so ``import anomstats`` and every NumPy input
keep working without dask installed (it is the optional extra ``anomstats[dask]``).

Two kinds of work, two patterns:

* **Fitting** (:func:`batched_cov`, :func:`running_moments_update`, :func:`gaussian_fit`,
  :func:`gaussian_partial_fit`): the input is chunked along the observation axis. One task per
  chunk builds a :class:`~anomstats.RunningMoments` (or a partially fitted
  :class:`~anomstats.MultiVariateGaussian`) from that chunk where the chunk lives; the per-chunk
  states are then combined by a tree of ``merge`` tasks, ``split_every`` at a time (Chan et al.'s
  pairwise update, so the result equals the in-memory one to rounding). Only moments travel, never
  the data. The other axes are rechunked to one chunk each first (a covariance couples all
  variables; a chunk then is a slab of observations).
* **Scoring** (:func:`kde_score`, :func:`gaussian_score`): the query points stay a dask array; the
  fitted model is put in the graph once (as a ``dask.delayed`` object, shipped once per worker) and
  each query chunk is scored by ``map_blocks``. The result is a lazy dask array.

The public classes dispatch here with one line each, e.g.
``if _dask.is_dask_array(x): return _dask.batched_cov(x, ...)``.

Deliberate differences from the in-memory path: :func:`batched_cov` returns a *lazy* dask array (dask
in, dask out; call ``.compute()``); a :class:`~anomstats.MultiVariateGaussian` fitted from a dask
array keeps its running moments (it was built by ``partial_fit`` and ``merge``), so unlike after an
in-memory ``fit`` it can go on streaming with ``partial_fit``.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from ._gaussian_checks import check_score_shape

__all__ = [
    "is_dask_array",
    "batched_cov",
    "running_moments",
    "running_moments_update",
    "gaussian_fit",
    "gaussian_partial_fit",
    "gaussian_score",
    "kde_score",
]

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


def _dask_modules() -> tuple[Any, Any]:
    try:
        import dask
        import dask.array as da
    except ImportError as exc:  # pragma: no cover - only reachable with a dask-like object
        raise ImportError(
            "dask is needed for dask inputs: pip install 'anomstats[dask]'"
        ) from exc
    return dask, da


def _check_split_every(split_every: Any) -> int:
    if isinstance(split_every, bool) or not isinstance(split_every, (int, np.integer)) or split_every < 2:
        raise ValueError(f"split_every must be an integer >= 2, got {split_every!r}")
    return int(split_every)


def _normalise_axis(axis: Any, ndim: int, name: str) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of bounds for an array with {ndim} dimensions")
    return int(axis) % ndim


class Factory:
    """How to build an empty, configured state (a class and its keyword arguments), picklable.

    A plain object rather than a ``(cls, kwargs)`` tuple: dask reads a tuple that starts with a
    callable as a task and would call it.
    """

    __slots__ = ("cls", "params")

    def __init__(self, cls: type, params: dict[str, Any]) -> None:
        self.cls, self.params = cls, dict(params)

    def __call__(self) -> Any:
        return self.cls(**self.params)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Factory, (self.cls, self.params))


def _constructor_params(obj: Any) -> dict[str, Any]:
    """``obj``'s constructor arguments, read back from same-named attributes (scikit-learn style).

    A parameter without such an attribute keeps its default.
    """
    params = {}
    for name, param in inspect.signature(type(obj).__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name in vars(obj):
            params[name] = vars(obj)[name]
    return params


def _moments_factory(moments: Any) -> Factory:
    """How to build an empty accumulator configured like ``moments``."""
    params = _constructor_params(moments)
    # RunningMoments keeps its dtype request privately (its ``dtype`` property is the data's).
    if "_requested_dtype" in vars(moments):
        params["dtype"] = vars(moments)["_requested_dtype"]
    return Factory(type(moments), params)


# ---------------------------------------------------------------------------------------------
# Tasks (module-level functions, so distributed workers can unpickle them by reference)


def _block_moments(factory: Factory, block: np.ndarray, weights: np.ndarray | None) -> Any:
    moments = factory()
    if weights is None:
        moments.update(block)
    else:
        moments.update(block, weights=weights)
    return moments


def _block_gaussian(factory: Factory, block: np.ndarray) -> Any:
    return factory().partial_fit(block)


def _merge_all(first: Any, *rest: Any) -> Any:
    # Each partial state is the output of exactly one task and is consumed by exactly one merge
    # task, so folding into ``first`` in place is safe and saves a copy of a (P, C, C) stack.
    for other in rest:
        first.merge(other)
    return first


def _covariance_of(moments: Any, ddof: int, dtype: np.dtype) -> np.ndarray:
    return np.asarray(moments.covariance(ddof=ddof)).astype(dtype, copy=False)


def _score_block(block: np.ndarray, model: Any, method: str, kwargs: dict[str, Any]) -> np.ndarray:
    return getattr(model, method)(block, **kwargs)


def _kde_block(block: np.ndarray, model: Any, method: str) -> np.ndarray:
    return getattr(model, method)(block)


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


def _observation_blocks(x: Any, obs_axis: int) -> tuple[Any, list[Any]]:
    """Rechunk every non-observation axis to one chunk; return the array and its delayed blocks."""
    x = x.rechunk({axis: -1 for axis in range(x.ndim) if axis != obs_axis})
    blocks = x.to_delayed().reshape(-1)  # one block per observation chunk, in order
    return x, list(blocks)


def _weight_blocks(weights: Any, x: Any, obs_axis: int) -> list[Any] | None:
    if weights is None:
        return None
    _, da = _dask_modules()
    w = weights if is_dask_array(weights) else np.asarray(weights)
    n_obs = x.shape[obs_axis]
    if w.ndim != 1 or w.shape[0] != n_obs:
        raise ValueError(
            f"weights must be 1-D with one weight per observation ({n_obs} along obs_axis={obs_axis}), "
            f"got shape {tuple(w.shape)}"
        )
    w = da.asarray(w).rechunk((x.chunks[obs_axis],))
    return list(w.to_delayed().reshape(-1))


def _moments_graph(factory: Factory, x: Any, obs_axis: int, weights: Any, split_every: int) -> Any:
    dask, _ = _dask_modules()
    x, blocks = _observation_blocks(x, obs_axis)
    wblocks = _weight_blocks(weights, x, obs_axis)
    sizes = x.chunks[obs_axis]
    keep = [i for i, size in enumerate(sizes) if size > 0] or [0]
    parts = [
        dask.delayed(_block_moments, pure=False)(factory, blocks[i], None if wblocks is None else wblocks[i])
        for i in keep
    ]
    return _tree_reduce(parts, split_every)


def running_moments(
    x: Any,
    *,
    obs_axis: int = 0,
    var_axis: int = 1,
    weights: Any = None,
    split_every: int = DEFAULT_SPLIT_EVERY,
) -> Any:
    """A ``dask.delayed`` :class:`~anomstats.RunningMoments` of a dask array, tree-merged over chunks.

    Parameters
    ----------
    x : dask.array.Array
        Observations along ``obs_axis`` (the chunking that matters), variables along ``var_axis``.
    obs_axis, var_axis : int
        As for :class:`~anomstats.RunningMoments`.
    weights : array_like or dask.array.Array, optional
        One weight per observation (rechunked to match ``x``'s observation chunks).
    split_every : int, default 8
        Fan-in of the merge tree.

    Returns
    -------
    dask.delayed.Delayed
        Computes to a RunningMoments holding every observation of ``x``.

    Examples
    --------
    >>> import numpy as np, dask.array as da
    >>> x = da.from_array(np.arange(24.0).reshape(6, 2, 2) ** 1.5, chunks=(2, 2, 2))
    >>> moments = running_moments(x).compute(scheduler="sync")
    >>> moments.count
    6
    """
    from .moments import RunningMoments

    if not is_dask_array(x):
        raise TypeError(f"x must be a dask array, got {type(x).__name__}")
    obs = _normalise_axis(obs_axis, x.ndim, "obs_axis")
    _normalise_axis(var_axis, x.ndim, "var_axis")
    factory = Factory(RunningMoments, {"obs_axis": obs_axis, "var_axis": var_axis})
    return _moments_graph(factory, x, obs, weights, _check_split_every(split_every))


def running_moments_update(moments: Any, x: Any, weights: Any = None, *, split_every: int = DEFAULT_SPLIT_EVERY) -> Any:
    """``RunningMoments.update`` for a dask array: compute the chunks' merged moments, fold them in.

    Only the merged moments come back to the caller's process. Returns ``moments``.

    Examples
    --------
    >>> import numpy as np, dask, dask.array as da
    >>> from anomstats import RunningMoments
    >>> x = np.random.default_rng(0).normal(size=(40, 3))
    >>> with dask.config.set(scheduler="sync"):
    ...     m = running_moments_update(RunningMoments(), da.from_array(x, chunks=(10, 3)))
    >>> bool(np.allclose(m.covariance(), np.cov(x, rowvar=False), rtol=1e-12))
    True
    """
    if not is_dask_array(x):
        raise TypeError(f"x must be a dask array, got {type(x).__name__}")
    obs = _normalise_axis(moments.obs_axis, x.ndim, "obs_axis")
    _normalise_axis(moments.var_axis, x.ndim, "var_axis")
    factory = _moments_factory(moments)
    total = _moments_graph(factory, x, obs, weights, _check_split_every(split_every)).compute()
    moments.merge(total)
    return moments


def batched_cov(
    x: Any,
    *,
    obs_axis: int = 0,
    var_axis: int = 1,
    ddof: int = 1,
    aweights: Any = None,
    dtype: DTypeLike | None = None,
    split_every: int = DEFAULT_SPLIT_EVERY,
    memory_budget: int | None = None,
    workers: int | None = None,
) -> Any:
    """:func:`anomstats.batched_cov` of a dask array chunked along ``obs_axis``, as a lazy dask array.

    Per-chunk moments are computed where the chunks live and tree-merged; the result, shape
    ``(*batch, C, C)``, is one chunk, with the in-memory path's dtype rule (float64 for real input
    by default; ``dtype`` chooses the accumulation and result dtype). ``memory_budget`` and
    ``workers`` tune the per-chunk :class:`~anomstats.RunningMoments` (defaults: theirs).

    Examples
    --------
    >>> import numpy as np, dask.array as da
    >>> x = np.random.default_rng(1).normal(size=(50, 3, 2))
    >>> c = batched_cov(da.from_array(x, chunks=(7, 3, 2)))
    >>> c.shape
    (2, 3, 3)
    >>> expected = np.cov(x[:, :, 1], rowvar=False)
    >>> bool(np.allclose(c.compute(scheduler="sync")[1], expected, rtol=1e-12))
    True
    """
    _, da = _dask_modules()
    from .batched import accumulation_dtype
    from .moments import RunningMoments

    if not is_dask_array(x):
        raise TypeError(f"x must be a dask array, got {type(x).__name__}")
    obs = _normalise_axis(obs_axis, x.ndim, "obs_axis")
    var = _normalise_axis(var_axis, x.ndim, "var_axis")
    if obs == var:
        raise ValueError(f"obs_axis and var_axis must differ, both are {obs}")
    out_dtype = accumulation_dtype(np.dtype(x.dtype), dtype)  # validates dtype as the in-memory path
    params: dict[str, Any] = {"obs_axis": obs_axis, "var_axis": var_axis, "dtype": dtype}
    if memory_budget is not None:
        params["memory_budget"] = memory_budget
    if workers is not None:
        params["workers"] = workers
    RunningMoments(**params)  # validates the settings now rather than inside every task
    factory = Factory(RunningMoments, params)
    total = _moments_graph(factory, x, obs, aweights, _check_split_every(split_every))
    dask, _ = _dask_modules()
    cov = dask.delayed(_covariance_of, pure=True)(total, ddof, out_dtype)
    batch_shape = tuple(s for axis, s in enumerate(x.shape) if axis not in (obs, var))
    c = x.shape[var]
    return da.from_delayed(cov, shape=(*batch_shape, c, c), dtype=out_dtype)


def _gaussian_total(model: Any, embedding: Any, split_every: int) -> Any:
    dask, _ = _dask_modules()
    if not is_dask_array(embedding):
        raise TypeError(f"embedding must be a dask array, got {type(embedding).__name__}")
    if embedding.ndim < 2:
        raise ValueError(f"embedding must have shape (N, C, *spatial), got shape {embedding.shape}")
    x, blocks = _observation_blocks(embedding, 0)
    keep = [i for i, size in enumerate(x.chunks[0]) if size > 0] or [0]
    factory = Factory(type(model), _constructor_params(model))
    parts = [dask.delayed(_block_gaussian, pure=False)(factory, blocks[i]) for i in keep]
    return _tree_reduce(parts, _check_split_every(split_every)).compute()


def gaussian_partial_fit(model: Any, embedding: Any, *, split_every: int = DEFAULT_SPLIT_EVERY) -> Any:
    """``MultiVariateGaussian.partial_fit`` for a dask embedding ``(N, C, *spatial)`` chunked along N.

    Each chunk is partially fitted where it lives (a fresh model with ``model``'s parameters), the
    partial fits are tree-merged, and the result is merged into ``model``. Returns ``model``.
    """
    model.merge(_gaussian_total(model, embedding, split_every))
    return model


def gaussian_fit(model: Any, embedding: Any, *, split_every: int = DEFAULT_SPLIT_EVERY) -> Any:
    """``MultiVariateGaussian.fit`` for a dask embedding ``(N, C, *spatial)`` chunked along N.

    Like :func:`gaussian_partial_fit`, but the previous state of ``model`` is discarded: it takes
    the state of the tree-merged fit (a fresh instance with the same constructor arguments, read
    back from the model's same-named attributes). Returns ``model``.

    Examples
    --------
    >>> import numpy as np, dask, dask.array as da
    >>> from anomstats import MultiVariateGaussian
    >>> emb = np.random.default_rng(2).normal(size=(40, 3, 2, 2))
    >>> with dask.config.set(scheduler="sync"):
    ...     model = gaussian_fit(MultiVariateGaussian(), da.from_array(emb, chunks=(10, 3, 2, 2)))
    >>> model.mean.shape
    (3, 4)
    """
    total = _gaussian_total(model, embedding, split_every)
    # Finalise now, as an in-memory fit does, so that too few observations, a singular patch and the
    # like raise from fit() rather than at first use (and name fit, not partial_fit).
    n = total.n_samples_seen_
    if n < 2:
        raise ValueError(
            f"embedding has {n} observation{'' if n == 1 else 's'} (shape {tuple(embedding.shape)}); "
            "a Gaussian fit needs at least 2 observations along axis 0"
        )
    total._fitted_outputs()
    state = vars(model)
    state.clear()
    state.update(vars(total))
    return model


# ---------------------------------------------------------------------------------------------
# Scoring: lazy, chunk by chunk along the query axis


def gaussian_score(model: Any, method: str, x: Any, **kwargs: Any) -> Any:
    """``MultiVariateGaussian.mahalanobis`` / ``logpdf`` of a dask array ``(M, C, *spatial)``, lazily.

    Returns a dask array ``(M, *spatial)`` chunked like ``x`` along M. The shape is checked now
    (by scoring one zero sample), so a wrong shape fails here rather than at compute time.

    Examples
    --------
    >>> import numpy as np, dask.array as da
    >>> from anomstats import MultiVariateGaussian
    >>> rng = np.random.default_rng(3)
    >>> model = MultiVariateGaussian().fit(rng.normal(size=(30, 3, 2, 2)))
    >>> q = rng.normal(size=(9, 3, 2, 2))
    >>> d = gaussian_score(model, "mahalanobis", da.from_array(q, chunks=(4, 3, 2, 2)))
    >>> d.shape, d.numblocks
    ((9, 2, 2), (3, 1, 1))
    >>> bool(np.allclose(d.compute(scheduler="sync"), model.mahalanobis(q)))
    True
    """
    dask, da = _dask_modules()
    if method not in ("mahalanobis", "logpdf"):
        raise ValueError(f"method must be 'mahalanobis' or 'logpdf', got {method!r}")
    if not is_dask_array(x):
        raise TypeError(f"x must be a dask array, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (M, C, *spatial), got shape {x.shape}")
    x = x.rechunk({axis: -1 for axis in range(1, x.ndim)})
    try:
        probe = getattr(model, method)(np.zeros((1, *x.shape[1:]), dtype=x.dtype), **kwargs)
    except ValueError:
        # The probe holds one sample: name x's own shape, not the probe's, when the shape is wrong.
        check_score_shape(tuple(x.shape), model.n_features, model.spatial_shape)
        raise
    out_dtype = np.asarray(probe).dtype
    model_d = dask.delayed(model, pure=True)
    return da.map_blocks(
        _score_block,
        x,
        model_d,
        method,
        kwargs,
        drop_axis=1,
        dtype=out_dtype,
        meta=np.empty((0,) * (x.ndim - 1), dtype=out_dtype),
    )


def kde_score(kde: Any, method: str, points: Any) -> Any:
    """``GaussianKDE.pdf`` / ``logpdf`` / ``evaluate`` of dask query points ``(d, m)``, lazily.

    Points follow scipy's shapes: ``(d, m)`` columns; for ``d == 1`` a 1-D ``(m,)`` array; a 1-D
    ``(d,)`` array is one point. Returns a dask array ``(m,)`` chunked like the points' columns.

    Examples
    --------
    >>> import numpy as np, dask.array as da
    >>> from anomstats import GaussianKDE
    >>> rng = np.random.default_rng(4)
    >>> kde = GaussianKDE(rng.normal(size=(2, 50)))
    >>> q = rng.normal(size=(2, 7))
    >>> p = kde_score(kde, "pdf", da.from_array(q, chunks=(2, 3)))
    >>> p.shape, p.numblocks
    ((7,), (3,))
    >>> bool(np.allclose(p.compute(scheduler="sync"), kde.pdf(q), rtol=1e-12))
    True
    """
    dask, da = _dask_modules()
    if method not in ("pdf", "logpdf", "evaluate"):
        raise ValueError(f"method must be 'pdf', 'logpdf' or 'evaluate', got {method!r}")
    if not is_dask_array(points):
        raise TypeError(f"points must be a dask array, got {type(points).__name__}")
    d = kde.d
    if points.ndim == 1:
        points = points.reshape(1, -1) if d == 1 else points.reshape(d, 1) if points.shape[0] == d else points
    if points.ndim != 2 or points.shape[0] != d:
        raise ValueError(
            f"points must have shape (d, m) with d = {d} (or (m,) when d == 1), got shape {points.shape}"
        )
    points = points.rechunk({0: -1})
    probe = getattr(kde, method)(np.zeros((d, 1), dtype=points.dtype))
    out_dtype = np.asarray(probe).dtype
    kde_d = dask.delayed(kde, pure=True)
    return da.map_blocks(
        _kde_block,
        points,
        kde_d,
        method,
        drop_axis=0,
        dtype=out_dtype,
        meta=np.empty((0,), dtype=out_dtype),
    )
