"""Streaming, mergeable means and covariances: :class:`RunningMoments`.

The accumulator keeps, per batch item, the (weighted) mean and the *centred* sums of products
``M = Σ w (x − mean)(x − mean)ᴴ``, together with ``Σw`` and ``Σw²``. A new batch of observations
(or another accumulator) is folded in with the pairwise update of Chan, Golub & LeVeque (1979):
with totals ``Wa``, ``Wb``, means ``μa``, ``μb`` and sums ``Ma``, ``Mb``,

    W = Wa + Wb,   δ = μb − μa,   μ = μa + δ·Wb/W,   M = Ma + Mb + δδᴴ·Wa·Wb/W.

Only differences of means and centred quantities appear, never ``Σxxᴴ − n·μμᴴ``, and the order in
which batches arrive or are merged changes the result only by rounding.

Location-free accuracy. A rounded mean far from the origin (offset ``o``, spread ``s``) is off by up
to ``eps·|o|``, and so is every difference ``δ`` of such means: the plain update above loses
``eps·|o|/s`` relative accuracy (2.6e-9 at ``o = 1e8·s`` in 10 updates). So the state keeps each mean
as an unevaluated sum ``mean + mean_residual`` (Knuth's TwoSum: ``mean`` is the rounded value,
``mean_residual`` what rounding dropped), and every batch is copied *shifted by the current mean*
(:mod:`anomstats._moment_kernels`, in the same pass as the cast; the first batch by its first
observation). A shift within a factor 2 of the data is subtracted exactly, so the batch's mean
relative to the shift, ``δ`` and the centred sums are all formed from numbers of size ``s`` and round
relative to ``s``: any split of the data into updates and merges gives the one-shot
:func:`~anomstats.batched_cov` to ``eps·sqrt(n)``-order relative accuracy, whatever the offset. Merging
states with different means needs no common shift: ``δ = (mean_b − mean_a) + (residual_b −
residual_a)``, and ``mean_b − mean_a`` is exact when the means are close (Sterbenz's lemma).

Weights of any scale. The covariance depends only on the ratios of the weights, but ``Σw²`` of weights
×1e200 overflows (and ×1e-200 underflows to 0, which silently drops the ``ddof`` correction). The
accumulator evaluates every weight formula on weights scaled by a power of two (exact:
:func:`anomstats._weights.scaled_weights`) and keeps ``Σw²`` as a mantissa and a power-of-two exponent,
so weighted results are invariant to rescaling the weights (bit for bit by powers of two). Finite weights
whose *sum* overflows (each near float64's maximum) are folded in scaled by a power of two ``2⁻ˢ`` (an even
``s``, chosen when a total would overflow and kept from then on): ``Σw`` and the centred sums, both of degree
1 in the weights, are then held at that scale (``s`` is the state's ``weights_exponent``), so they stay
finite and the covariance is that of the unscaled weights (bit for bit where the latter's sums are finite).
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from . import _dask
from ._axes import batch_view, check_axis_index, normalise_axes, normalise_axis
from ._budget import DEFAULT_MEMORY_BUDGET, batch_chunks, items_per_chunk
from ._moment_kernels import centred_copy, first_observations, gram, plan_moment_chunks, two_sum
from ._parallel import resolve_workers, run_chunks
from ._rules import ChanWeights, chan_merge_weights, covariance_normalisation, degrees_of_freedom
from ._validation import (
    NotFittedError,
    accumulation_dtype,
    check_accumulation_dtype,
    check_ddof,
    check_integer,
    check_memory_budget,
    require_finite,
)
from ._weights import check_weights, scaled_weights

__all__ = ["RunningMoments"]


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


#: What ``RunningMoments.update`` says about NaN or infinity in ``x`` (``where`` locates the first one).
_NON_FINITE_REMEDY = "remove or replace the NaN or infinite values before updating"


def refuse_non_finite(index: tuple[int, ...] | None, name: str = "x") -> None:
    """Raise the ``ValueError`` of :meth:`RunningMoments.update` for non-finite data, ``index`` being the
    first NaN or infinity of ``name`` in C order (its dask twin computes the same index)."""
    where = "" if index is None else f" (first at index {tuple(int(i) for i in index)})"
    require_finite(False, name, where=where, remedy=_NON_FINITE_REMEDY)


def _check_finite(data: np.ndarray, name: str = "x") -> None:
    """Refuse NaN or infinity in ``data`` (the library's message; one read, no temporaries when finite).

    A sum propagates every NaN and infinity, so a finite sum proves finite data; only a non-finite sum
    (bad data, or finite data whose sum overflows) pays for a full mask, to locate the first bad value.
    """
    if data.dtype.kind not in "fc" or data.size == 0:
        return
    with np.errstate(all="ignore"):
        total = np.sum(data, dtype=np.result_type(data.dtype, np.float32))
    if np.isfinite(total):
        return
    bad = ~np.isfinite(data)
    if bad.any():
        refuse_non_finite(np.unravel_index(int(np.argmax(bad)), data.shape), name)


#: Bound on the magnitude of a state's power-of-two exponents. Every state this class writes is far inside
#: it (``Σw²`` of float64 weights lies within ``2**±2200`` times the count, and the weights' scale exponent
#: within ``1100``); beyond it ``2**exponent`` times any float is 0 or inf, and NumPy's ``ldexp`` would raise
#: ``OverflowError`` for exponents beyond a C int.
_MAX_STATE_EXPONENT = 1 << 13


def _ldexp(mantissa: float, exponent: int) -> float:
    """``mantissa·2**exponent`` as a float, ``±inf`` or 0 where it is out of range (no exception)."""
    # Clamped: beyond ±2**14 every finite float times 2**exponent is already 0 or inf.
    exponent = max(-(1 << 14), min(1 << 14, int(exponent)))
    with np.errstate(over="ignore", under="ignore"):
        return float(np.ldexp(np.float64(mantissa), exponent))


def _scale_in_place(array: np.ndarray, exponent: int) -> None:
    """``array *= 2**exponent`` exactly (real or complex, any float dtype; 0 or inf where out of range)."""
    if exponent == 0 or array.size == 0:
        return
    real = array.view(array.real.dtype) if array.dtype.kind == "c" else array
    with np.errstate(over="ignore", under="ignore"):
        np.ldexp(real, exponent, out=real)


def _weight_scale(current: int, *totals: tuple[float, int]) -> int:
    """The scale exponent ``s`` (even) at which a state of scale ``current`` holds the sum of ``totals``.

    Each total is ``mantissa·2**exponent`` (mantissa finite, >= 0). ``current`` is kept while the sum of the
    totals scaled by ``2**-current`` is finite; otherwise ``s`` is the smallest even number ``>= t + 1``, ``2**t``
    bounding the larger total, which puts that total in ``[2**-3, 2**-1)`` (so the sum of the two is below 1,
    far from overflowing). It only grows: the sum overflowing at ``current`` means ``t >= current + 1024``.
    """
    if math.isfinite(sum(_ldexp(mantissa, exponent - current) for mantissa, exponent in totals)):
        return current
    top = max(math.frexp(mantissa)[1] + exponent for mantissa, exponent in totals if mantissa > 0)
    scale = top + 1
    return scale + scale % 2


def _scaled_chan(w_a: float, w_b: float) -> ChanWeights:
    """:func:`anomstats._rules.chan_merge_weights` of any two totals, also where ``w_a·w_b`` would overflow or
    underflow: the coefficients are homogeneous (``mean_step`` of degree 0, ``cross`` and ``total`` of
    degree 1), so they are computed for the totals scaled by a power of two and scaled back, exactly."""
    largest = max(w_a, w_b)
    if largest == 0.0:
        return chan_merge_weights(w_a, w_b)
    k = int(np.frexp(largest)[1])
    chan = chan_merge_weights(math.ldexp(w_a, -k), math.ldexp(w_b, -k))
    return ChanWeights(_ldexp(chan.total, k), chan.mean_step, _ldexp(chan.cross, k))


def _state_weight_sum(state: dict[str, Any], name: str) -> float:
    value = state[name]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise ValueError(f"state['{name}'] must be a real number >= 0, got {value!r}")
    number = float(value)
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"state['{name}'] must be a finite number >= 0, got {value!r}")
    return number


def _state_exponent(value: Any, name: str = "sum_squared_weights_exponent") -> int:
    try:
        exponent = operator.index(value)
    except TypeError:
        raise ValueError(f"state['{name}'] must be an even integer, got {value!r}") from None
    if exponent % 2 or isinstance(value, (bool, np.bool_)):
        raise ValueError(f"state['{name}'] must be an even integer, got {value!r}")
    if abs(exponent) > _MAX_STATE_EXPONENT:
        raise ValueError(
            f"state['{name}'] must be an even integer of magnitude at most {_MAX_STATE_EXPONENT} (every "
            f"state of float64 weights is far inside this), got {value!r}"
        )
    return exponent


def _check_state_arrays(count: int, mean: np.ndarray, sums: np.ndarray, residual: np.ndarray) -> None:
    """The values a state of finite data must have: finite arrays, non-negative diagonal sums of squares, and
    zeros without observations."""
    for name, array in (("mean", mean), ("centred_sums", sums), ("mean_residual", residual)):
        if not np.isfinite(array).all():
            raise ValueError(f"state['{name}'] contains NaN or infinity; a state of finite data has finite arrays")
    diagonal = np.diagonal(sums, axis1=-2, axis2=-1).real
    if (diagonal < 0).any():
        raise ValueError(
            "state['centred_sums'] has a negative diagonal entry (a sum of squares); "
            f"minimum {float(diagonal.min())!r}"
        )
    if count == 0 and (sums.any() or mean.any() or residual.any()):
        raise ValueError("state has count=0 but non-zero mean or centred_sums; an empty batch adds nothing")


def _check_weight_sums(count: int, sum_w: float, sum_w2: float, w2_exp: int, w_exp: int = 0) -> None:
    """``(Σw)²/count <= Σw² <= (Σw)²`` for weights >= 0 (Cauchy-Schwarz and the cross terms), to rounding.

    ``Σw = sum_w·2**w_exp`` and ``Σw² = sum_w2·2**w2_exp``.
    """
    if count == 0:
        if sum_w or sum_w2:
            raise ValueError(
                f"state has count=0 but sum_weights={sum_w!r}, sum_squared_weights={sum_w2!r}; without "
                "observations both are 0"
            )
        return
    if (sum_w == 0) != (sum_w2 == 0):
        raise ValueError(
            f"state['sum_squared_weights']={sum_w2!r} is inconsistent with sum_weights={sum_w!r}: weights >= 0 "
            "sum to zero exactly when their squares do"
        )
    if sum_w == 0:
        return
    scaled = _ldexp(sum_w, w_exp - w2_exp // 2)  # Σw in the scale of the mantissa of Σw²
    square = scaled * scaled
    # Both sums were accumulated over at most count terms (and as many merges): relative rounding of
    # at most about count·eps each; 4x that is allowed.
    slack = 4.0 * (count + 2) * float(np.finfo(np.float64).eps)
    if sum_w2 > square * (1.0 + slack):
        raise ValueError(
            f"state['sum_squared_weights'] exceeds sum_weights**2 ({sum_w2!r} > {square!r}, at scale "
            f"2**{w2_exp}): impossible for weights >= 0"
        )
    if sum_w2 < square / count * (1.0 - slack):
        raise ValueError(
            f"state['sum_squared_weights'] is below sum_weights**2 / count ({sum_w2!r} < {square / count!r}, "
            f"count={count}): impossible for {count} weights (Cauchy-Schwarz)"
        )


class RunningMoments:
    """Mean and covariance matrices accumulated over batches of observations, mergeable.

    Batched exactly like :func:`anomstats.batched_cov`: every update holds observations along
    ``obs_axis``, variables along ``var_axis`` and batch axes elsewhere; the batch shape and the
    number of variables are fixed by the first update. Any split of the data into updates and
    merges gives the one-shot ``batched_cov`` result to ``eps·sqrt(n)``-order relative accuracy
    (~1e-14 in float64) at any distance of the data from the origin (see the module notes).

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
        ``sum_squared_weights`` is ``inf`` (or 0) for weights so large (small) that ``Σw²`` is out of
        float range, and ``sum_weights`` is ``inf`` for finite weights whose sum overflows; the accumulator
        itself keeps them scaled and is not affected.
    mean : ndarray, shape (*batch, C)
        Read-only view of the weighted mean (rounded; ``mean_residual`` is what rounding dropped).
    mean_residual : ndarray, shape (*batch, C)
        Read-only view of ``exact mean − mean`` (at most half a unit in the last place of ``mean``):
        the part of the mean that keeps streaming exact far from the origin.
    centred_sums : ndarray, shape (*batch, C, C)
        Read-only view of ``Σ w (x − mean)(x − mean)ᴴ`` (times ``2**-weights_exponent`` for weights whose
        sum overflows, see :meth:`state`).
    batch_shape, n_vars, dtype
        Fixed by the first update (``None`` before it).

    Notes
    -----
    Weights follow numpy's ``aweights``: ``covariance(ddof)`` divides the centred sums by
    ``Σw − ddof·Σw²/Σw`` (``Σw`` when ``ddof == 0``), which is ``count − ddof`` for unit weights.
    An update whose weights sum to zero counts its observations but changes nothing else.

    Weighted results depend only on the ratios of the weights (weights ×1e200 or ×1e-200 give the
    same covariance; see the module notes). NaN or infinite data are refused (``ValueError``), and a
    refused update leaves the state as it was.

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
        # The scale of the weights folded in: Σw = _sum_w · 2**_w_exp and the centred sums are _sums · 2**_w_exp.
        # 0 (the weights as given) unless a total would overflow; then even, and it only grows.
        self._w_exp = 0
        # Σw² = _sum_w2 · 2**_w2_exp: _w2_exp is 0 (a plain float, as numpy sums it) unless Σw² is out of
        # float range (weights of extreme scale); then it is even and the mantissa is in range.
        self._sum_w2 = 0.0
        self._w2_exp = 0
        self._mean: np.ndarray | None = None
        self._residual: np.ndarray | None = None
        self._sums: np.ndarray | None = None

    # ------------------------------------------------------------------ inspection
    @property
    def count(self) -> int:
        """Number of observations seen so far."""
        return self._count

    @property
    def sum_weights(self) -> float:
        """``Σw`` over all observations seen (equals ``count`` without weights; ``inf`` out of float range)."""
        return _ldexp(self._sum_w, self._w_exp)

    @property
    def sum_squared_weights(self) -> float:
        """``Σw²`` over all observations seen (equals ``count`` without weights; ``inf``/0 out of float range)."""
        return _ldexp(self._sum_w2, self._w2_exp)

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
    def mean_residual(self) -> np.ndarray:
        """``exact mean − mean``, shape ``(*batch, C)`` (read-only live view; see the module notes)."""
        self._require_data("mean_residual")
        assert self._residual is not None
        return _read_only(self._residual)

    @property
    def centred_sums(self) -> np.ndarray:
        """``Σ w (x − mean)(x − mean)ᴴ``, shape ``(*batch, C, C)`` (read-only live view; times
        ``2**-weights_exponent`` for weights whose sum overflows, see :meth:`state`)."""
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
        return sums / self._normalisation(ddof)

    def _scaled_weight_sums(self) -> tuple[float, float, int]:
        """``(Σw·2⁻ʲ, Σw²·2⁻²ʲ, j)``: weight sums scaled into float range (``j = 0`` for ordinary weights)."""
        j = self._w2_exp // 2
        return _ldexp(self._sum_w, self._w_exp - j), self._sum_w2, j

    def _normalisation(self, ddof: int) -> float:
        """:func:`anomstats._rules.degrees_of_freedom` (``"raise"``) of the weights seen, for weights of any scale,
        in the scale of the stored centred sums (``2**-weights_exponent``).

        The rule is homogeneous of degree 1 in the weights: it is evaluated on the scaled sums and scaled back.
        """
        sum_w, sum_w2, j = self._scaled_weight_sums()
        try:
            norm = degrees_of_freedom(sum_w, sum_w2, ddof, on_nonpositive="raise", count=self._count)
        except ValueError as error:
            if j == 0:
                raise
            scaled = covariance_normalisation(sum_w, sum_w2, ddof)  # report the normalisation of the weights given
            raise ValueError(str(error).replace(f" is {scaled:g} ", f" is {_ldexp(scaled, j):g} ")) from None
        return _ldexp(norm, j - self._w_exp)

    def _one_shot_covariance(self, ddof: int) -> np.ndarray:
        """The covariance with numpy's semantics, for the dask twin of :func:`anomstats.batched_cov`: an empty
        state is an empty sum (0), and a normalisation ``<= 0`` gives ``inf``/``nan`` as numpy's ``1/0`` does (the
        warning was given when the lazy result was built)."""
        assert self._sums is not None
        sum_w, sum_w2, j = self._scaled_weight_sums()
        norm = _ldexp(covariance_normalisation(sum_w, sum_w2, ddof), j - self._w_exp)
        if norm <= 0:
            with np.errstate(divide="ignore", invalid="ignore"):
                return self._sums * np.inf
        return self._sums / norm

    def state(self) -> dict[str, Any]:
        """The raw state as a dict of copies: ``count``, ``sum_weights``, ``sum_squared_weights``, ``mean``,
        ``centred_sums`` (the two arrays are ``None`` before any update), ``mean_residual`` and
        ``sum_squared_weights_exponent``.

        The first five mean what they always did (``sum_squared_weights`` is ``Σw²``, except for weights so
        large or small that ``Σw²`` is out of float range: then it is the mantissa, and
        ``Σw² = sum_squared_weights · 2**sum_squared_weights_exponent``). The last two were added with the
        location-free streaming (:meth:`from_state` takes states without them, as zeros): they make a restart
        exact. ``mean_residual`` is ``exact mean − mean``; ``sum_squared_weights_exponent`` is 0 for
        ordinary weights. :meth:`from_state` rebuilds an equal accumulator from it.

        Only for finite weights whose sum overflows float64 (each near its maximum), which the accumulator
        holds scaled, one more key, ``weights_exponent`` (even, positive): then ``Σw =
        sum_weights · 2**weights_exponent`` and the centred sums are ``centred_sums · 2**weights_exponent``.
        """
        extra = {} if self._w_exp == 0 else {"weights_exponent": self._w_exp}
        return {
            "count": self._count,
            "sum_weights": self._sum_w,
            "sum_squared_weights": self._sum_w2,
            "mean": None if self._mean is None else self._mean.copy(),
            "centred_sums": None if self._sums is None else self._sums.copy(),
            "mean_residual": None if self._residual is None else self._residual.copy(),
            "sum_squared_weights_exponent": self._w2_exp,
            **extra,
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
        """Build an accumulator from a :meth:`state` dict (the arrays are copied), after checking it.

        Raises
        ------
        KeyError
            A key of the five original ones is missing.
        ValueError
            An impossible state, naming the field: a count that is not a non-negative integer; weight sums
            that are negative, not finite, or inconsistent (``Σw² > (Σw)²``, ``Σw² < (Σw)²/count``, non-zero
            sums without observations); non-finite or wrongly shaped arrays (``mean`` ``(*batch, C)``,
            ``centred_sums`` ``(*batch, C, C)``, ``mean_residual`` like ``mean``); a negative diagonal of
            ``centred_sums``; observations without arrays; a ``sum_squared_weights_exponent`` or
            ``weights_exponent`` that is not an even integer of magnitude at most ``2**13``.

        Examples
        --------
        >>> import numpy as np
        >>> a = RunningMoments().update(np.arange(12.0).reshape(4, 3) ** 2)
        >>> b = RunningMoments.from_state(a.state())
        >>> b.count, bool(np.array_equal(a.covariance(), b.covariance()))
        (4, True)
        >>> RunningMoments.from_state({**a.state(), "count": -1})
        Traceback (most recent call last):
        ...
        ValueError: state['count'] must be a non-negative integer, got -1
        """
        moments = cls(obs_axis, var_axis, dtype=dtype, memory_budget=memory_budget, workers=workers)
        return moments._load(state, check_values=True)

    def _load(self, state: dict[str, Any], *, check_values: bool) -> RunningMoments:
        """Take over a state dict (:meth:`from_state`). ``check_values=False`` keeps the checks of the keys,
        types and shapes but trusts the numbers: for states this library computed itself (:meth:`copy`, a
        change of centre), where rounding may leave e.g. a diagonal of ``-1e-300`` that a user's state
        could not plausibly have."""
        moments = self
        missing = {"count", "sum_weights", "sum_squared_weights", "mean", "centred_sums"} - set(state)
        if missing:
            raise KeyError(f"state is missing {sorted(missing)}; expected the dict of RunningMoments.state()")
        # A bad count is a bad state: ValueError for the wrong type too (from_state's one exception type).
        count = check_integer(
            state["count"], "state['count']", "a non-negative integer", minimum=0, type_error=ValueError
        )
        sum_w = _state_weight_sum(state, "sum_weights")
        sum_w2 = _state_weight_sum(state, "sum_squared_weights")
        w2_exp = _state_exponent(state.get("sum_squared_weights_exponent", 0))
        w_exp = _state_exponent(state.get("weights_exponent", 0), "weights_exponent")
        if check_values:
            _check_weight_sums(count, sum_w, sum_w2, w2_exp, w_exp)
        mean, sums, residual = state["mean"], state["centred_sums"], state.get("mean_residual")
        if mean is None or sums is None:
            if count or mean is not None or sums is not None or residual is not None:
                raise ValueError(
                    "state must give both mean and centred_sums, or neither (an empty state); got "
                    f"count={count}, mean {'None' if mean is None else 'given'}, centred_sums "
                    f"{'None' if sums is None else 'given'}"
                )
            return moments
        mean, sums = np.asarray(mean), np.asarray(sums)
        if mean.ndim < 1 or sums.shape != mean.shape + mean.shape[-1:]:
            raise ValueError(
                f"state arrays do not fit together: mean has shape {mean.shape}, centred_sums "
                f"{sums.shape}; expected (*batch, C) and (*batch, C, C)"
            )
        residual = np.zeros_like(mean) if residual is None else np.asarray(residual)
        if residual.shape != mean.shape:
            raise ValueError(
                f"state['mean_residual'] has shape {residual.shape}, but mean has {mean.shape}; they must match"
            )
        acc = accumulation_dtype(np.result_type(mean, sums, residual), moments._requested_dtype)
        if check_values:
            _check_state_arrays(count, mean, sums, residual)
        moments._start(mean.shape[:-1], mean.shape[-1], acc)
        assert moments._mean is not None and moments._residual is not None and moments._sums is not None
        np.copyto(moments._sums, sums, casting="unsafe")
        # The exact mean is mean + residual; re-split it in the accumulation dtype.
        two_sum(mean.astype(acc), residual.astype(acc), moments._mean, moments._residual)
        moments._count, moments._sum_w, moments._sum_w2, moments._w2_exp = count, sum_w, sum_w2, w2_exp
        moments._w_exp = w_exp
        return moments

    def copy(self) -> RunningMoments:
        """An independent accumulator with the same configuration and state."""
        twin = RunningMoments(
            self.obs_axis, self.var_axis, dtype=self._requested_dtype, memory_budget=self.memory_budget,
            workers=self.workers,
        )
        return twin._load(self.state(), check_values=False)

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
        self._residual = np.zeros((*batch, n_var), dtype=dtype)
        self._sums = np.zeros((*batch, n_var, n_var), dtype=dtype)

    def _add_squared_weights(self, mantissa: float, exponent: int) -> None:
        """``Σw² += mantissa·2**exponent`` (``exponent`` even), keeping the sum as a plain float when it is one."""
        if exponent == 0 and self._w2_exp == 0:
            self._sum_w2 += mantissa  # ordinary weights: exactly the float sum it always was
            return
        # Add in the scale of the larger term (both exponents are even, and so is the result's).
        ours = -math.inf if self._sum_w2 == 0.0 else math.frexp(self._sum_w2)[1] + self._w2_exp
        theirs = -math.inf if mantissa == 0.0 else math.frexp(mantissa)[1] + exponent
        common = self._w2_exp if ours >= theirs else exponent
        total = _ldexp(self._sum_w2, self._w2_exp - common) + _ldexp(mantissa, exponent - common)
        plain = _ldexp(total, common)
        if math.isfinite(plain) and (total == 0.0 or abs(plain) >= np.finfo(np.float64).tiny):
            self._sum_w2, self._w2_exp = plain, 0
        else:
            self._sum_w2, self._w2_exp = total, common

    # ------------------------------------------------------------------ dask protocol (anomstats._dask)
    def empty_like(self) -> RunningMoments:
        """A new, empty accumulator with this one's configuration (axes, dtype, budget, workers).

        Examples
        --------
        >>> RunningMoments(obs_axis=1, var_axis=0).empty_like()
        RunningMoments(obs_axis=1, var_axis=0, empty)
        """
        return type(self)(
            self.obs_axis, self.var_axis, dtype=self._requested_dtype, memory_budget=self.memory_budget,
            workers=self.workers,
        )

    def accumulate_block(self, block: ArrayLike, weights: ArrayLike | None) -> RunningMoments:
        """:meth:`update` of one in-memory chunk (the dask protocol's name for it)."""
        return self.update(block, weights)

    def _check_batch(self, shape: tuple[int, ...], x_dtype: np.dtype[Any]) -> tuple[tuple[int, ...], int, int, np.dtype[Any]]:
        """The checks of :meth:`update` that need only the shape and dtype of ``x`` (its dask twin runs them too).

        Returns ``(batch shape, N, C, accumulation dtype)``.
        """
        obs, var = normalise_axes(len(shape), self.obs_axis, self.var_axis)
        batch = tuple(size for axis, size in enumerate(shape) if axis not in (obs, var))
        n_obs, n_var = shape[obs], shape[var]
        if self._mean is None:
            acc = accumulation_dtype(x_dtype, self._requested_dtype)
        else:
            acc = self._mean.dtype
            self._check_compatible(batch, n_var, x_dtype, "x")
            accumulation_dtype(x_dtype, acc)  # rejects non-numeric data
        return batch, n_obs, n_var, acc

    def _update_dask(self, x: Any, weights: Any = None) -> RunningMoments:
        """:meth:`update` for a dask array: the chunks' moments are merged where they live, then here.

        The checks are the in-memory ones, in the same order, before anything is computed; non-finite
        data are located in the whole array (not in the chunk that found them), so the error is the
        in-memory one too. The state changes only once everything is computed.
        """
        self._check_batch(tuple(x.shape), np.dtype(x.dtype))
        obs = normalise_axis(self.obs_axis, "obs_axis", x.ndim)
        w = None if weights is None else check_weights(np.asarray(weights), x.shape[obs], "weights")
        # A chunk that finds NaN or infinity: name the first one of the whole array, as update(x) does.
        total = _dask.compute_or_name_non_finite(
            lambda: _dask.reduce_observations(self.empty_like(), x, obs, w).compute(),
            lambda: _dask.first_non_finite(x),
            refuse_non_finite,
        )
        return self.merge(total)

    @_dask.dispatch(_update_dask, arg="x")
    def update(self, x: ArrayLike, weights: ArrayLike | None = None) -> RunningMoments:
        """Fold a batch of observations into the moments; returns ``self``.

        Parameters
        ----------
        x : array_like
            Observations along ``obs_axis``, variables along ``var_axis``, the batch axes elsewhere
            (their shape, and ``C``, must match earlier updates). Finite. Never modified.
        weights : array_like, shape (N,), optional
            Analytic weights of these observations (numpy's ``aweights`` semantics), finite and
            non-negative; default: all 1. Only their ratios matter (any scale works).

        Raises
        ------
        ValueError
            Shape mismatch with earlier updates, bad axes, negative or non-finite weights, or NaN or
            infinity in ``x`` (naming the index of the first one). Nothing is accumulated then: the
            state stays as it was.
        RuntimeError
            ``weights`` not 1-D or of the wrong length (numpy's exception type).
        """
        return self._update(x, weights, check_finite=True)

    def _update(self, x: ArrayLike, weights: ArrayLike | None, *, check_finite: bool) -> RunningMoments:
        """:meth:`update`; ``check_finite=False`` for callers that validated ``x`` already (or, for the dask twin
        of :func:`anomstats.batched_cov`, that follow numpy and let NaN through)."""
        data = np.asarray(x)
        batch, n_obs, n_var, acc = self._check_batch(data.shape, data.dtype)
        view = batch_view(data, self.obs_axis, self.var_axis)
        w = None if weights is None else check_weights(weights, n_obs, "weights")
        if check_finite:
            _check_finite(data)
        if w is None:
            w_b, w2_b, w2_exp = float(n_obs), float(n_obs), 0
            batch_total = (w_b, 0)
        else:
            scaled, k = scaled_weights(w)
            with np.errstate(over="ignore"):
                w_b = float(w.sum())  # inf for finite weights whose sum overflows: then folded in scaled
            w2_b, w2_exp = float(np.dot(scaled, scaled)), 2 * k
            if 2 * k and math.isfinite(_ldexp(w2_b, 2 * k)) and _ldexp(w2_b, 2 * k) >= np.finfo(np.float64).tiny:
                w2_b, w2_exp = _ldexp(w2_b, 2 * k), 0  # in range: the plain Σw² (bit for bit np.dot(w, w))
            batch_total = (float(scaled.sum()), k)  # Σw = Σ(w·2⁻ᵏ)·2ᵏ, exactly; the first factor is <= n
        # The scale of the weights (see the module notes): the state's unless Σw would overflow there.
        w_exp = _weight_scale(self._w_exp, (self._sum_w, self._w_exp), batch_total)
        if w_exp:
            # Folded in as w·2⁻ˢ: exact, short of weights below 2**(s-1022), which round (or vanish) but weigh
            # less than 2⁻¹⁰¹⁹ of the total (>= 2**(s-3) once s is set). s is even, so √w scales exactly too.
            with np.errstate(under="ignore"):
                w = np.ldexp(np.ones(n_obs) if w is None else w, -w_exp)
            w_b = float(w.sum())  # of the weights folded in (exactly Σw·2⁻ˢ unless some were negligible)
        # Validated: from here on nothing raises, so a refused batch leaves the state alone.
        if self._mean is None:
            self._start(batch, n_var, acc)
        assert self._mean is not None and self._sums is not None
        self._rescale(w_exp)
        if w_b > 0.0 and self._mean.size:
            self._fold_data(view, acc, w, w_b)
        self._count += n_obs
        self._sum_w += w_b
        self._add_squared_weights(w2_b, w2_exp)
        return self

    def _rescale(self, w_exp: int) -> None:
        """Hold ``Σw`` and the centred sums at the weights' scale ``2**-w_exp`` (``w_exp >= self._w_exp``)."""
        if w_exp == self._w_exp:
            return
        assert self._sums is not None
        self._sum_w = _ldexp(self._sum_w, self._w_exp - w_exp)
        _scale_in_place(self._sums, self._w_exp - w_exp)
        self._w_exp = w_exp

    def _fold_data(self, view: np.ndarray, acc: np.dtype[Any], w: Any, w_b: float) -> None:
        """Fold new observations (``view`` laid out ``(*batch, N, C)``) into the state, chunk by chunk.

        Each chunk is copied shifted by the current (rounded) mean ``m`` of its items, so the batch's mean
        relative to ``m`` and ``δ = μ_b − μ_a = (μ_b − m) − residual`` are formed from small numbers (see
        the module notes); the first batch is shifted by its first observations instead. The mean-shift
        term of the pairwise update is folded into the same product as the new centred sums: appending the
        row ``√(Wa·Wb/W)·δ`` to the centred observations adds exactly ``δδᴴ·Wa·Wb/W`` to their Gram matrix,
        which saves three passes over a ``(p, C, C)`` array.
        """
        n_obs, n_var = view.shape[-2:]
        w_a = self._sum_w
        chan = _scaled_chan(w_a, w_b)
        shift_scale = np.sqrt(chan.cross)
        chunks = plan_moment_chunks(
            # Scratch per item: the appended row, the chunk's sums of products, means and residual updates.
            view, acc, self.memory_budget, self.workers, extra_per_item=(n_var * n_var + 5 * n_var) * acc.itemsize
        )

        def task(chunk: tuple[tuple[Any, ...], int]) -> None:
            index, p = chunk
            assert self._mean is not None and self._residual is not None and self._sums is not None
            mean_a = self._mean[index].reshape(p, n_var)  # contiguous blocks: views, updated in place
            residual_a = self._residual[index].reshape(p, n_var)
            sums_a = self._sums[index].reshape(p, n_var, n_var)
            mean_b = np.empty((p, n_var), dtype=acc)  # the batch's mean minus the shift
            if w_a == 0.0:
                # Nothing to combine with yet: write the first moments straight into the state.
                shift = first_observations(view[index], acc, w)
                gram(centred_copy(view[index], acc, w, mean_b, shift=shift), sums_a)
                two_sum(shift, mean_b, mean_a, residual_a)
                return
            rows = centred_copy(view[index], acc, w, mean_b, spare_rows=1, shift=mean_a)
            delta = mean_b - residual_a  # μ_b − μ_a: both relative to the rounded mean
            np.multiply(delta, shift_scale, out=rows[:, n_obs])
            sums_b = np.empty((p, n_var, n_var), dtype=acc)
            gram(rows, sums_b)
            sums_a += sums_b
            delta *= chan.mean_step
            delta += residual_a  # μ_new − m, small: rounded relative to the data's spread
            two_sum(mean_a, delta, mean_a, residual_a)

        # Many small products: hold BLAS to one thread (see anomstats.batched_cov, Notes).
        run_chunks(task, chunks, self.workers, single_blas=self._mean.size > n_var)

    def _fold_chunk(
        self,
        index: tuple[Any, ...],
        p: int,
        chan: ChanWeights,
        mean_b: np.ndarray,
        residual_b: np.ndarray,
        sums_b: np.ndarray,
    ) -> None:
        """Chan's pairwise update of one contiguous block of batch items with another state, in place.

        ``sums_b`` is used as scratch.
        """
        assert self._mean is not None and self._residual is not None and self._sums is not None
        n_var = mean_b.shape[-1]
        mean_a = self._mean[index].reshape(p, n_var)
        residual_a = self._residual[index].reshape(p, n_var)
        sums_a = self._sums[index].reshape(p, n_var, n_var)
        if chan.cross == 0.0 and chan.mean_step == 1.0:
            # This side has zero weight (its arrays are zeros): take the other state as it is.
            mean_a[...], residual_a[...], sums_a[...] = mean_b, residual_b, sums_b
            return
        # Exact when the means are close (Sterbenz): far from the origin nothing is lost.
        delta = mean_b - mean_a
        delta += residual_b - residual_a
        if chan.cross:
            # Correction for the distance between the two means; zero when one side is empty.
            outer = delta[:, :, None] * (delta.conj() if delta.dtype.kind == "c" else delta)[:, None, :]
            outer *= chan.cross
            sums_b += outer
        sums_a += sums_b
        delta *= chan.mean_step
        delta += residual_a
        two_sum(mean_a, delta, mean_a, residual_a)

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
        o_mean, o_residual, o_sums = other._mean, other._residual, other._sums
        assert o_mean is not None and o_residual is not None and o_sums is not None
        if self._mean is None:
            acc = accumulation_dtype(o_mean.dtype, self._requested_dtype)
            self._start(o_mean.shape[:-1], o_mean.shape[-1], acc)
        else:
            self._check_compatible(o_mean.shape[:-1], o_mean.shape[-1], o_mean.dtype, "other")
        assert self._mean is not None
        # Both sides at one scale of the weights (see the module notes): exact powers of two.
        other_total = (other._sum_w, other._w_exp)
        w_exp = self._w_exp if other._sum_w == 0.0 else _weight_scale(
            max(self._w_exp, other._w_exp), (self._sum_w, self._w_exp), other_total
        )
        w_b = _ldexp(other._sum_w, other._w_exp - w_exp)
        self._rescale(w_exp)
        if w_b > 0.0 and self._mean.size:
            acc = self._mean.dtype
            n_var = o_mean.shape[-1]
            chan = _scaled_chan(self._sum_w, w_b)
            per_item = (3 * n_var * n_var + 4 * n_var) * acc.itemsize  # copies + outer product
            max_items = items_per_chunk(per_item, self.memory_budget)
            for index, p in batch_chunks(o_mean.shape[:-1], max_items):
                mean_b = np.array(o_mean[index], dtype=acc).reshape(p, n_var)
                residual_b = np.array(o_residual[index], dtype=acc).reshape(p, n_var)
                sums_b = np.array(o_sums[index], dtype=acc).reshape(p, n_var, n_var)
                _scale_in_place(sums_b, other._w_exp - w_exp)
                self._fold_chunk(index, p, chan, mean_b, residual_b, sums_b)
        self._count += other._count
        self._sum_w += w_b
        self._add_squared_weights(other._sum_w2, other._w2_exp)
        return self
