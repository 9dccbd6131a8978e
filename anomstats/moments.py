"""Streaming, mergeable means and covariances: :class:`RunningMoments`.

The accumulator keeps, per batch item, the (weighted) mean and the *centred* sums of products
``M = Σ w (x − mean)(x − mean)ᴴ``, together with ``Σw`` and ``Σw²``. A new batch of observations
(or another accumulator) is folded in with the pairwise update of Chan, Golub & LeVeque (1979):
with totals ``Wa``, ``Wb``, means ``μa``, ``μb`` and sums ``Ma``, ``Mb``,

    W = Wa + Wb,   δ = μb − μa,   μ = μa + δ·Wb/W,   M = Ma + Mb + δδᴴ·Wa·Wb/W.

Only differences of means and centred quantities appear, never ``Σxxᴴ − n·μμᴴ``, so data far from
the origin loses no accuracy, and the order in which batches arrive or are merged changes the
result only by rounding.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from . import _dask
from ._axes import batch_view, check_axis_index, normalise_axis
from ._budget import DEFAULT_MEMORY_BUDGET, batch_chunks, items_per_chunk
from ._moment_kernels import centred_copy, gram, plan_moment_chunks
from ._parallel import resolve_workers, run_chunks
from ._rules import chan_merge_weights, degrees_of_freedom
from ._validation import (
    NotFittedError,
    accumulation_dtype,
    check_accumulation_dtype,
    check_ddof,
    check_memory_budget,
)
from ._weights import check_weights

__all__ = ["RunningMoments"]


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


class RunningMoments:
    """Mean and covariance matrices accumulated over batches of observations, mergeable.

    Batched exactly like :func:`anomstats.batched_cov`: every update holds observations along
    ``obs_axis``, variables along ``var_axis`` and batch axes elsewhere; the batch shape and the
    number of variables are fixed by the first update. Any split of the data into updates and
    merges gives the one-shot ``batched_cov`` result (to ~1e-13 relative in float64).

    Parameters
    ----------
    obs_axis : int, default 0
        Axis of the observations in every update (negative values count from the end).
    var_axis : int, default 1
        Axis of the variables in every update.
    dtype : dtype, optional
        Accumulation dtype. Default: ``result_type(x.dtype, float64)`` of the first update, so
        float32 data is accumulated in float64. Later updates are cast to it.
    memory_budget : int, default 64 MiB
        Bound in bytes on the temporaries of one update or merge (the state itself not counted).
    workers : int, optional
        Threads per update; default: the usable cores, at most 8 (see :func:`anomstats.batched_cov`).

    Attributes
    ----------
    count : int
        Number of observations seen (weighted or not).
    sum_weights, sum_squared_weights : float
        ``Σw`` and ``Σw²`` over all observations (unit weights when an update gives none).
    mean : ndarray, shape (*batch, C)
        Read-only view of the weighted mean.
    centred_sums : ndarray, shape (*batch, C, C)
        Read-only view of ``Σ w (x − mean)(x − mean)ᴴ``.
    batch_shape, n_vars, dtype
        Fixed by the first update (``None`` before it).

    Notes
    -----
    Weights follow numpy's ``aweights``: ``covariance(ddof)`` divides the centred sums by
    ``Σw − ddof·Σw²/Σw`` (``Σw`` when ``ddof == 0``), which is ``count − ddof`` for unit weights.
    An update whose weights sum to zero counts its observations but changes nothing else.

    ``mean`` and ``centred_sums`` are live views: later updates and merges change them in place
    (the state can be large, so it is not reallocated). Copy them, or call :meth:`state`, to keep a
    snapshot. An instance is not safe to update from several threads at once.

    Examples
    --------
    Fit over two batches of a PaDiM-like embedding ``(B, C, H, W)``:

    >>> import numpy as np
    >>> from anomstats import RunningMoments, batched_cov
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(10, 3, 2, 2)).astype(np.float32)
    >>> moments = RunningMoments().update(x[:6]).update(x[6:])
    >>> moments.count, moments.mean.shape, moments.covariance().shape
    (10, (2, 2, 3), (2, 2, 3, 3))
    >>> bool(np.allclose(moments.covariance(), batched_cov(x)))
    True

    Merge accumulators fitted apart (e.g. in two processes):

    >>> other = RunningMoments().update(x[6:])
    >>> merged = RunningMoments().update(x[:6]).merge(other)
    >>> bool(np.allclose(merged.covariance(ddof=0), batched_cov(x, ddof=0)))
    True
    """

    def __init__(
        self,
        obs_axis: int = 0,
        var_axis: int = 1,
        *,
        dtype: DTypeLike | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        workers: int | None = None,
    ) -> None:
        self.obs_axis = check_axis_index(obs_axis, "obs_axis")
        self.var_axis = check_axis_index(var_axis, "var_axis")
        if dtype is not None:
            dtype = check_accumulation_dtype(dtype)
        self._requested_dtype: np.dtype[Any] | None = dtype
        self.memory_budget = check_memory_budget(memory_budget)
        self.workers = resolve_workers(workers)
        self._count = 0
        self._sum_w = 0.0
        self._sum_w2 = 0.0
        self._mean: np.ndarray | None = None
        self._sums: np.ndarray | None = None

    # ------------------------------------------------------------------ inspection
    @property
    def count(self) -> int:
        """Number of observations seen so far."""
        return self._count

    @property
    def sum_weights(self) -> float:
        """``Σw`` over all observations seen (equals ``count`` without weights)."""
        return self._sum_w

    @property
    def sum_squared_weights(self) -> float:
        """``Σw²`` over all observations seen (equals ``count`` without weights)."""
        return self._sum_w2

    @property
    def batch_shape(self) -> tuple[int, ...] | None:
        """Shape of the batch axes, fixed by the first update (``None`` before it)."""
        return None if self._mean is None else self._mean.shape[:-1]

    @property
    def n_vars(self) -> int | None:
        """Number of variables ``C``, fixed by the first update (``None`` before it)."""
        return None if self._mean is None else self._mean.shape[-1]

    @property
    def dtype(self) -> np.dtype[Any] | None:
        """Accumulation dtype, fixed by the first update (``None`` before it)."""
        return None if self._mean is None else self._mean.dtype

    @property
    def mean(self) -> np.ndarray:
        """Weighted mean, shape ``(*batch, C)`` (read-only live view)."""
        return _read_only(self._require_data("mean")[0])

    @property
    def centred_sums(self) -> np.ndarray:
        """``Σ w (x − mean)(x − mean)ᴴ``, shape ``(*batch, C, C)`` (read-only live view)."""
        return _read_only(self._require_data("centred_sums")[1])

    def _require_data(self, what: str) -> tuple[np.ndarray, np.ndarray]:
        if self._mean is None or self._sums is None:
            raise NotFittedError(
                f"RunningMoments.{what} is undefined before any data: call update(x) first"
            )
        if self._sum_w == 0.0:
            raise NotFittedError(
                f"RunningMoments.{what} is undefined: the {self._count} observations seen so far "
                "have zero total weight; update with observations of positive weight first"
            )
        return self._mean, self._sums

    def covariance(self, ddof: int = 1) -> np.ndarray:
        """Covariance matrices of all observations seen, shape ``(*batch, C, C)`` (a new array).

        Parameters
        ----------
        ddof : int, default 1
            Delta degrees of freedom, as in :func:`numpy.cov` and :func:`anomstats.batched_cov`.

        Raises
        ------
        NotFittedError
            Before any update, or when all weights so far sum to zero (a ``RuntimeError``).
        ValueError
            When ``ddof`` leaves no degrees of freedom (e.g. ``ddof >= count`` without weights).
        """
        ddof = check_ddof(ddof)
        _, sums = self._require_data("covariance()")
        norm = degrees_of_freedom(self._sum_w, self._sum_w2, ddof, on_nonpositive="raise", count=self._count)
        return sums / norm

    def state(self) -> dict[str, Any]:
        """The raw state as a dict of copies: ``count``, ``sum_weights``, ``sum_squared_weights``,
        ``mean`` and ``centred_sums`` (the two arrays are ``None`` before any update).

        :meth:`from_state` rebuilds an equal accumulator from it.
        """
        return {
            "count": self._count,
            "sum_weights": self._sum_w,
            "sum_squared_weights": self._sum_w2,
            "mean": None if self._mean is None else self._mean.copy(),
            "centred_sums": None if self._sums is None else self._sums.copy(),
        }

    @classmethod
    def from_state(
        cls,
        state: dict[str, Any],
        obs_axis: int = 0,
        var_axis: int = 1,
        *,
        dtype: DTypeLike | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        workers: int | None = None,
    ) -> RunningMoments:
        """Build an accumulator from a :meth:`state` dict (the arrays are copied).

        Examples
        --------
        >>> import numpy as np
        >>> a = RunningMoments().update(np.arange(12.0).reshape(4, 3) ** 2)
        >>> b = RunningMoments.from_state(a.state())
        >>> b.count, bool(np.array_equal(a.covariance(), b.covariance()))
        (4, True)
        """
        moments = cls(obs_axis, var_axis, dtype=dtype, memory_budget=memory_budget, workers=workers)
        missing = {"count", "sum_weights", "sum_squared_weights", "mean", "centred_sums"} - set(state)
        if missing:
            raise KeyError(f"state is missing {sorted(missing)}; expected the dict of RunningMoments.state()")
        count = operator.index(state["count"])
        sum_w, sum_w2 = float(state["sum_weights"]), float(state["sum_squared_weights"])
        if count < 0 or not (np.isfinite(sum_w) and sum_w >= 0 and np.isfinite(sum_w2) and sum_w2 >= 0):
            raise ValueError(
                "state has a negative count or negative/non-finite weight sums: "
                f"count={count}, sum_weights={sum_w}, sum_squared_weights={sum_w2}"
            )
        mean, sums = state["mean"], state["centred_sums"]
        if mean is None or sums is None:
            if count or mean is not None or sums is not None:
                raise ValueError("state must give both mean and centred_sums, or neither (empty state)")
            return moments
        mean, sums = np.asarray(mean), np.asarray(sums)
        if mean.ndim < 1 or sums.shape != mean.shape + mean.shape[-1:]:
            raise ValueError(
                f"state arrays do not fit together: mean has shape {mean.shape}, centred_sums "
                f"{sums.shape}; expected (*batch, C) and (*batch, C, C)"
            )
        acc = accumulation_dtype(np.result_type(mean, sums), moments._requested_dtype)
        moments._mean = np.array(mean, dtype=acc)
        moments._sums = np.array(sums, dtype=acc)
        moments._count, moments._sum_w, moments._sum_w2 = count, sum_w, sum_w2
        return moments

    def copy(self) -> RunningMoments:
        """An independent accumulator with the same configuration and state."""
        return RunningMoments.from_state(
            self.state(),
            self.obs_axis,
            self.var_axis,
            dtype=self._requested_dtype,
            memory_budget=self.memory_budget,
            workers=self.workers,
        )

    def __repr__(self) -> str:
        if self._mean is None:
            return f"RunningMoments(obs_axis={self.obs_axis}, var_axis={self.var_axis}, empty)"
        return (
            f"RunningMoments(obs_axis={self.obs_axis}, var_axis={self.var_axis}, count={self._count}, "
            f"batch_shape={self.batch_shape}, n_vars={self.n_vars}, dtype={self.dtype})"
        )

    # ------------------------------------------------------------------ accumulation
    def _check_compatible(self, batch: tuple[int, ...], n_var: int, dtype: np.dtype[Any], what: str) -> None:
        assert self._mean is not None
        if batch != self.batch_shape or n_var != self.n_vars:
            raise ValueError(
                f"{what} has batch shape {batch} and {n_var} variables, but this RunningMoments "
                f"holds batch shape {self.batch_shape} and {self.n_vars} variables (fixed by the "
                "first update)"
            )
        if dtype.kind == "c" and self._mean.dtype.kind != "c":
            raise TypeError(
                f"{what} is complex but this RunningMoments accumulates in {self._mean.dtype}; "
                "create it with a complex dtype"
            )

    def _start(self, batch: tuple[int, ...], n_var: int, dtype: np.dtype[Any]) -> None:
        self._mean = np.zeros((*batch, n_var), dtype=dtype)
        self._sums = np.zeros((*batch, n_var, n_var), dtype=dtype)

    # ------------------------------------------------------------------ dask protocol (anomstats._dask)
    def empty_like(self) -> RunningMoments:
        """A new, empty accumulator with this one's configuration (axes, dtype, budget, workers).

        Examples
        --------
        >>> RunningMoments(obs_axis=1, var_axis=0).empty_like()
        RunningMoments(obs_axis=1, var_axis=0, empty)
        """
        return RunningMoments(
            self.obs_axis, self.var_axis, dtype=self._requested_dtype, memory_budget=self.memory_budget,
            workers=self.workers,
        )

    def accumulate_block(self, block: ArrayLike, weights: ArrayLike | None) -> RunningMoments:
        """:meth:`update` of one in-memory chunk (the dask protocol's name for it)."""
        return self.update(block, weights)

    def _update_dask(self, x: Any, weights: Any = None) -> RunningMoments:
        """:meth:`update` for a dask array: the chunks' moments are merged where they live, then here."""
        obs = normalise_axis(self.obs_axis, "obs_axis", x.ndim)
        normalise_axis(self.var_axis, "var_axis", x.ndim)
        w = None if weights is None else check_weights(np.asarray(weights), x.shape[obs], "weights")
        return self.merge(_dask.reduce_observations(self.empty_like(), x, obs, w).compute())

    @_dask.dispatch(_update_dask, arg="x")
    def update(self, x: ArrayLike, weights: ArrayLike | None = None) -> RunningMoments:
        """Fold a batch of observations into the moments; returns ``self``.

        Parameters
        ----------
        x : array_like
            Observations along ``obs_axis``, variables along ``var_axis``, the batch axes elsewhere
            (their shape, and ``C``, must match earlier updates). Never modified.
        weights : array_like, shape (N,), optional
            Analytic weights of these observations (numpy's ``aweights`` semantics), finite and
            non-negative; default: all 1.

        Raises
        ------
        ValueError
            Shape mismatch with earlier updates, bad axes, negative or non-finite weights.
        RuntimeError
            ``weights`` not 1-D or of the wrong length (numpy's exception type).
        """
        data = np.asarray(x)
        view = batch_view(data, self.obs_axis, self.var_axis)
        *batch_list, n_obs, n_var = view.shape
        batch = tuple(batch_list)
        if self._mean is None:
            acc = accumulation_dtype(data.dtype, self._requested_dtype)
        else:
            acc = self._mean.dtype
            self._check_compatible(batch, n_var, data.dtype, "x")
            accumulation_dtype(data.dtype, acc)  # rejects non-numeric data
        w = None if weights is None else check_weights(weights, n_obs, "weights")
        w_b = float(n_obs) if w is None else float(w.sum())
        w2_b = float(n_obs) if w is None else float(np.dot(w, w))
        if self._mean is None:
            self._start(batch, n_var, acc)
        if w_b > 0.0 and self._mean.size:
            self._fold_data(view, acc, w, w_b)
        self._count += n_obs
        self._sum_w += w_b
        self._sum_w2 += w2_b
        return self

    def _fold_data(self, view: np.ndarray, acc: np.dtype[Any], w: Any, w_b: float) -> None:
        """Fold new observations (``view`` laid out ``(*batch, N, C)``) into the state, chunk by chunk.

        The mean-shift term of the pairwise update is folded into the same product as the new
        centred sums: appending the row ``√(Wa·Wb/W)·δ`` to the centred observations adds exactly
        ``δδᴴ·Wa·Wb/W`` to their Gram matrix, which saves three passes over a ``(p, C, C)`` array.
        """
        n_obs, n_var = view.shape[-2:]
        w_a = self._sum_w
        chan = chan_merge_weights(w_a, w_b)
        shift_scale = np.sqrt(chan.cross)
        chunks = plan_moment_chunks(
            # Scratch per item: the appended row and the chunk's sums of products.
            view, acc, self.memory_budget, self.workers, extra_per_item=(n_var * n_var + n_var) * acc.itemsize
        )

        def task(chunk: tuple[tuple[Any, ...], int]) -> None:
            index, p = chunk
            assert self._mean is not None and self._sums is not None
            mean_a = self._mean[index].reshape(p, n_var)  # contiguous blocks: views, updated in place
            sums_a = self._sums[index].reshape(p, n_var, n_var)
            if w_a == 0.0:
                # Nothing to combine with yet: write the first moments straight into the state.
                gram(centred_copy(view[index], acc, w, mean_a), sums_a)
                return
            mean_b = np.empty((p, n_var), dtype=acc)
            rows = centred_copy(view[index], acc, w, mean_b, spare_rows=1)
            delta = mean_b - mean_a
            np.multiply(delta, shift_scale, out=rows[:, n_obs])
            sums_b = np.empty((p, n_var, n_var), dtype=acc)
            gram(rows, sums_b)
            sums_a += sums_b
            mean_a += delta * chan.mean_step

        # Many small products: hold BLAS to one thread (see anomstats.batched_cov, Notes).
        run_chunks(task, chunks, self.workers, single_blas=self._mean.size > n_var)

    def _fold_chunk(
        self, index: tuple[Any, ...], p: int, w_a: float, mean_b: np.ndarray, w_b: float, sums_b: np.ndarray
    ) -> None:
        """Chan's pairwise update of one contiguous block of batch items with another state, in place.

        ``sums_b`` is used as scratch.
        """
        assert self._mean is not None and self._sums is not None
        n_var = mean_b.shape[-1]
        mean_a = self._mean[index].reshape(p, n_var)
        sums_a = self._sums[index].reshape(p, n_var, n_var)
        chan = chan_merge_weights(w_a, w_b)
        delta = mean_b - mean_a
        if chan.cross:
            # Correction for the distance between the two means; zero when one side is empty.
            outer = delta[:, :, None] * (delta.conj() if delta.dtype.kind == "c" else delta)[:, None, :]
            outer *= chan.cross
            sums_b += outer
        sums_a += sums_b
        mean_a += delta * chan.mean_step

    def merge(self, other: RunningMoments) -> RunningMoments:
        """Fold another accumulator's moments into this one; returns ``self``. ``other`` is unchanged.

        Raises
        ------
        TypeError
            ``other`` is not a RunningMoments, or is complex while this one is real.
        ValueError
            Different batch shape or number of variables.
        """
        if not isinstance(other, RunningMoments):
            raise TypeError(f"merge() takes another RunningMoments, got {type(other).__name__}")
        if other._mean is None or other._sums is None:
            return self
        if other is self:
            other = self.copy()
        o_mean, o_sums = other._mean, other._sums
        assert o_mean is not None and o_sums is not None
        if self._mean is None:
            acc = accumulation_dtype(o_mean.dtype, self._requested_dtype)
            self._start(o_mean.shape[:-1], o_mean.shape[-1], acc)
        else:
            self._check_compatible(o_mean.shape[:-1], o_mean.shape[-1], o_mean.dtype, "other")
        assert self._mean is not None
        if other._sum_w > 0.0 and self._mean.size:
            acc = self._mean.dtype
            n_var = o_mean.shape[-1]
            w_a, w_b = self._sum_w, other._sum_w
            per_item = (3 * n_var * n_var + 2 * n_var) * acc.itemsize  # copies + outer product
            max_items = items_per_chunk(per_item, self.memory_budget)
            for index, p in batch_chunks(o_mean.shape[:-1], max_items):
                mean_b = np.array(o_mean[index], dtype=acc).reshape(p, n_var)
                sums_b = np.array(o_sums[index], dtype=acc).reshape(p, n_var, n_var)
                self._fold_chunk(index, p, w_a, mean_b, w_b, sums_b)
        self._count += other._count
        self._sum_w += other._sum_w
        self._sum_w2 += other._sum_w2
        return self
