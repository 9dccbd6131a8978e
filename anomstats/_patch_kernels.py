"""Chunked, threaded kernels behind :class:`anomstats.MultiVariateGaussian`.

The fit works patch chunk by patch chunk so that its only temporaries are, per worker thread, one chunk of
the embedding converted to the working dtype (bounded by the memory budget, reused across chunks) and a
small stack of ``(C, C)`` scratch matrices (:class:`PatchFinisher`, :data:`FINISH_STACK_BYTES`). For each
patch it goes covariance -> (shrinkage) -> ridge -> Cholesky factor -> precision inside its scratch matrix,
writing each output stack once, so no second full-size stack ever exists.

Layout trick used throughout: LAPACK/BLAS are column-major; a C-ordered ``(C, C)`` block viewed with
``.T`` is the same memory in column-major order. Asking LAPACK for the *upper* triangle of that view
therefore reads and writes the *lower* triangle of the C-ordered block, with no copies.

The scratch matrices of a :class:`PatchFinisher` keep a zero strict upper triangle at all times, so a
full symmetric matrix is obtained exactly as ``t + t.T`` with the doubled diagonal halved (both steps are
exact in floating point): stored covariances and precisions are exactly symmetric. LAPACK ``potrf`` and
``potri`` only touch the lower triangle (see :mod:`anomstats._lapack`), so the invariant survives them.

The patch-naming faults of a fit live here too, as functions both packages call (the torch adapter
re-implements only the tensor kernels): the rank test of an unregularised patch (:func:`patch_rank_eps`,
:func:`singular_feature`) and its message (:func:`singular_patch_error`), the not-definite message of a
regularised one (:func:`not_definite_error`), the representability faults that name the features' scale
(:func:`unrepresentable_error`, :func:`feature_scale`), and the non-finite query message
(:func:`raise_non_finite_query`).
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
from numpy.typing import NDArray

from ._budget import plan_chunks
from ._rules import RANK_TEST_MIN_ULPS, covariance_normalisation, numerically_singular_pivot, rank_test_eps
from ._validation import describe_patch, require_finite
from ._lapack import ScratchKernels
from ._moment_kernels import first_observations, gather
from ._shrinkage import (
    ledoit_wolf_coefficient,
    oas_coefficient,
    power_of_two_scale,
    scaled_trace_and_frobenius,
    shrink_in_place,
)


# ---------------------------------------------------------------------------- faults of a patch, both packages
def patch_rank_eps(data_eps: float | None, working_dtype: Any) -> float:
    """The eps of the rank test of an unregularised patch covariance (:func:`singular_feature`).

    :func:`anomstats._rules.rank_test_eps` of the data's own eps (float32 data rounded every combination of
    features to float32, even when accumulated in float64; ``None`` for integer or bool data), and at least
    :data:`anomstats._rules.RANK_TEST_MIN_ULPS` eps of ``working_dtype``, the dtype the covariance is formed,
    factored and inverted in: a feature that is an exact combination of others keeps a Schur complement of
    up to about ``5·C·eps`` of that dtype (measured over thousands of random combinations, C = 2..7, float32
    and float64), so the tolerance is ``16·C·eps``. For float64 work this is ``rank_test_eps`` itself, the
    KDE's rule.

    Examples
    --------
    >>> patch_rank_eps(float(np.finfo(np.float32).eps), np.float64) == float(np.finfo(np.float32).eps)
    True
    >>> patch_rank_eps(None, np.float32) == 16 * float(np.finfo(np.float32).eps)
    True
    """
    return max(rank_test_eps(data_eps), RANK_TEST_MIN_ULPS * float(np.finfo(working_dtype).eps))


def data_eps_of(dtype: Any) -> float | None:
    """eps of a floating NumPy dtype (the data's), ``None`` for integer and bool data (exact)."""
    dtype = np.dtype(dtype)
    return float(np.finfo(dtype).eps) if dtype.kind == "f" else None


def singular_feature(precision_diagonal: Any, variances: Any, eps: float) -> int:
    """The rank test of an unregularised patch covariance ``A``: 1-based order of a dependent feature, or 0.

    :func:`anomstats._rules.numerically_singular_pivot` (``L_kk² <= C·eps·A_kk``) applied to the pivots each
    feature gets when it is factored *last*: ``1/(A⁻¹)_kk``, the Schur complement of the other features,
    i.e. the share of feature ``k``'s variance that the others leave unexplained (``A_kk·(A⁻¹)_kk`` is its
    variance inflation factor). Computed from the precision's diagonal, it costs nothing beyond the fit.

    The bound, with ``R`` the correlation matrix (``A`` scaled to unit diagonal, ``(R⁻¹)_kk = A_kk·(A⁻¹)_kk``)
    and ``λ`` its smallest eigenvalue: ``max_k (R⁻¹)_kk >= trace(R⁻¹)/C >= 1/(C·λ)`` and ``(R⁻¹)_kk <= 1/λ``,
    so a patch is refused whenever ``λ <= eps`` (``cond(R) >= C/eps``) and accepted whenever ``λ > C·eps``
    (in between, it depends on how the dependency spreads over the features). The in-order pivots of a
    Cholesky factor bound ``λ`` only from one side (a factor can be ill-conditioned with benign diagonal),
    so they are not used. ``eps`` is :func:`patch_rank_eps`'s. A non-positive or non-finite precision
    diagonal counts as no pivot left.

    Examples
    --------
    >>> singular_feature(np.array([1.0, 1.0]), np.array([1.0, 1.0]), 2.2e-16)
    0
    >>> singular_feature(np.array([1e16, 1e16]), np.array([1.0, 1.0]), 2.2e-16)
    1
    """
    diagonal = np.asarray(precision_diagonal, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # A subnormal diagonal overflows to inf here: a huge unexplained variance, far from singular.
        last = np.sqrt(1.0 / diagonal)
    last[~(diagonal > 0)] = 0.0  # zero, negative or NaN: no pivot left (+inf gives 0 by itself)
    return numerically_singular_pivot(last, np.asarray(variances, dtype=np.float64), eps=float(eps))


#: The remedy of a numerically singular patch in the core (the torch adapter, without shrinkage, names its own).
SINGULAR_HINT = (
    "remove or combine the dependent features, increase ridge (a larger ridge makes every patch definite), "
    "or use shrinkage='ledoit-wolf' or 'oas'"
)


def singular_patch_error(where: str, n_features: int, eps: float, hint: str = SINGULAR_HINT) -> np.linalg.LinAlgError:
    """The ``LinAlgError`` of an unregularised patch covariance that is singular to rounding (both packages).

    One message whether the rank test (:func:`singular_feature`) or the factorisation itself refused, so the
    verdict and its text do not depend on rounding.

    Examples
    --------
    >>> print(singular_patch_error("patch 3", 4, 3.6e-15))  # doctest: +ELLIPSIS
    the regularised covariance of patch 3 is not positive definite (numerically singular: one of its features is, to within C·eps of its variance, a linear combination of the others; C=4, eps=3.6e-15) with ridge=0.0; remove or combine ...
    """
    return np.linalg.LinAlgError(
        f"the regularised covariance of {where} is not positive definite (numerically singular: one of its "
        "features is, to within C·eps of its variance, a linear combination of the others; "
        f"C={int(n_features)}, eps={float(eps):.2g}) with ridge=0.0; {hint}"
    )


def ridge_rounding(n_features: int, dtype: Any, largest_variance: float) -> float:
    """How large a ridge a covariance's scale needs: ``C·eps·max variance``, the rounding of its Cholesky pivots.

    A ridge below this (in ``dtype``, a NumPy dtype or an ``finfo`` object) is lost in the rounding of the
    covariance it is added to, so it cannot make a rank-deficient patch definite. The one rule behind both
    packages' not-definite messages (:func:`not_definite_error`).

    Examples
    --------
    >>> print(f"{ridge_rounding(10, np.float32, 1e8):.2e}")   # 10 features of scale 1e4, in float32
    1.19e+02
    """
    return int(n_features) * float(_finfo(dtype).eps) * float(largest_variance)


def not_definite_error(
    where: str,
    order: int,
    ridge: float,
    shrinkage: str | None = None,
    hint: str | None = None,
    *,
    n_features: int | None = None,
    largest_variance: float | None = None,
    dtype: Any = None,
    alternatives: str | None = None,
) -> np.linalg.LinAlgError:
    """The ``LinAlgError`` of a regularised patch covariance whose Cholesky factorisation failed (both packages).

    The remedy is to increase the ridge; given the patch's ``n_features``, its largest regularised variance
    (``largest_variance``, its covariance's largest diagonal entry) and the ``dtype`` it was factored in, the
    message also says how large a ridge that scale needs (:func:`ridge_rounding`). ``alternatives`` ends the
    remedy with each package's other options (the core's shrinkage, the adapter's float64; ``""``: none);
    ``None``: the core's ``shrinkage='ledoit-wolf' or 'oas'`` when no shrinkage is used. ``hint`` replaces
    the whole remedy.

    Examples
    --------
    >>> print(not_definite_error("patch 0", 2, 1e-6))  # doctest: +ELLIPSIS
    the regularised covariance of patch 0 is not positive definite (leading minor of order 2 is not positive) with ridge=1e-06; increase ridge ...
    >>> print(not_definite_error("patch 0", 2, 1e-6, n_features=2, largest_variance=1e8, dtype=np.float32,
    ...                          alternatives="or rescale"))
    the regularised covariance of patch 0 is not positive definite (leading minor of order 2 is not positive) with ridge=1e-06; increase ridge (a larger ridge makes every patch definite; with variances up to 1.0e+08 it must be well above 2.4e+01, the float32 rounding of the covariance), or rescale
    """
    if hint is None:
        clause = "a larger ridge makes every patch definite"
        if n_features is not None and largest_variance is not None and dtype is not None:
            largest = float(largest_variance)
            rounding = ridge_rounding(n_features, dtype, largest)
            clause += (
                f"; with variances up to {largest:.1e} it must be well above {rounding:.1e}, the "
                f"{_limits(dtype)[0]} rounding of the covariance"
            )
        elif shrinkage is not None:
            clause = "e.g. ridge=1e-3 times the typical feature variance"
        if alternatives is None and shrinkage is None:
            alternatives = "or use shrinkage='ledoit-wolf' or 'oas'"
        hint = f"increase ridge ({clause})" + (f", {alternatives}" if alternatives else "")
    return np.linalg.LinAlgError(
        f"the regularised covariance of {where} is not positive definite (leading minor of order {int(order)} is "
        f"not positive) with ridge={ridge!r}{'' if shrinkage is None else f' and shrinkage={shrinkage!r}'}; {hint}"
    )


def feature_scale(centred: Any) -> float:
    """The largest standard deviation of the features of centred observations ``(N, C)``, without overflow.

    Computed in float64 as ``a·sqrt(Σ(x/a)²/(N − 1))`` with ``a`` each feature's largest magnitude, so that
    it is finite wherever the standard deviation is (for the messages of :func:`unrepresentable_error`).

    Examples
    --------
    >>> print(f"{feature_scale(np.array([[1e200, 0.0], [-1e200, 0.0]])):.6e}")  # sqrt(2)·1e200, no overflow
    1.414214e+200
    """
    x = np.asarray(centred, dtype=np.float64)
    x = x.reshape(x.shape[0], -1)
    largest = np.abs(x).max(axis=0)
    unit = np.where(largest > 0, largest, 1.0)
    std = largest * np.sqrt(np.square(x / unit).sum(axis=0) / max(x.shape[0] - 1, 1))
    return float(std.max()) if std.size else 0.0


def _finfo(dtype: Any) -> Any:
    """``finfo`` of a NumPy dtype, or an ``finfo`` object itself (NumPy's or torch's, for dtypes NumPy lacks,
    such as bfloat16)."""
    return dtype if hasattr(dtype, "tiny") and hasattr(dtype, "max") else np.finfo(dtype)


def _limits(dtype: Any) -> tuple[str, float, float]:
    """``(name, largest, smallest normal)`` of a NumPy dtype, or of an ``finfo`` object (see :func:`_finfo`)."""
    info = _finfo(dtype)
    name = info.dtype if isinstance(info.dtype, str) else np.dtype(info.dtype).name
    return name, float(info.max), float(info.tiny)


def unrepresentable_error(where: str, dtype: Any, kind: str, scale: float | None, remedy: str) -> ValueError:
    """The ``ValueError`` of a patch whose covariance or precision does not fit ``dtype``, naming the scale.

    ``kind``: ``"covariance"`` (it overflowed), ``"precision_underflow"`` (its diagonal is below the smallest
    normal number: stored, it would read as zeros and every distance along those features as 0) or
    ``"precision_overflow"``. ``scale`` is the features' standard deviation (:func:`feature_scale`), or
    ``None`` where it is not known (a streamed sum that overflowed). ``dtype`` is a NumPy dtype or an
    ``finfo`` object (the torch adapter passes ``torch.finfo``, which also covers bfloat16). Both packages
    raise it, each with its own ``remedy``.

    Examples
    --------
    >>> print(unrepresentable_error("patch 0", np.float32, "precision_underflow", 1e25, "rescale"))  # doctest: +ELLIPSIS
    features of scale 1.0e+25 overflow float32 (variances beyond its largest number 3.4e+38) and underflow a float32 precision: the precision of patch 0 has diagonal entries of about 1/(1.0e+25)², below float32's smallest normal number 1.2e-38 ...; rescale
    """
    name, largest, tiny = _limits(dtype)
    if kind == "covariance":
        if scale is None:
            text = (
                f"the covariance of {where} overflowed {name} (variances or sums of squares beyond its largest "
                f"number {largest:.1e}: features of scale above about {math.sqrt(largest):.1e})"
            )
        else:
            text = (
                f"features of scale {scale:.1e} overflow {name}: the covariance of {where} overflowed (its sums of "
                f"squares, about ({scale:.1e})² per observation, exceed {name}'s largest number {largest:.1e})"
            )
    elif kind == "precision_underflow":
        beyond = scale is not None and scale > math.sqrt(largest)
        text = (
            f"features of scale {scale:.1e} "
            + (f"overflow {name} (variances beyond its largest number {largest:.1e}) and " if beyond else "")
            + f"underflow a {name} precision: the precision of {where} has diagonal "
            f"entries of about 1/({scale:.1e})², below {name}'s smallest normal number {tiny:.1e} "
            "(stored, it would read as zeros: every distance along those features 0)"
        )
    elif kind == "precision_overflow":
        text = (
            f"features of scale {scale:.1e} overflow a {name} precision: the precision of {where} has entries of "
            f"about 1/({scale:.1e})², beyond {name}'s largest number {largest:.1e}"
        )
    else:  # pragma: no cover - a programming error
        raise ValueError(f"unknown kind {kind!r}")
    return ValueError(f"{text}; {remedy}")


def scale_remedy(dtype: Any) -> str:
    """What the core tells a fit in ``dtype`` whose features' scale the dtype cannot represent.

    Examples
    --------
    >>> scale_remedy(np.float32)
    'rescale the embedding (e.g. divide it by its typical scale), or fit with dtype=np.float64'
    """
    wider = "" if np.dtype(dtype) == np.float64 else ", or fit with dtype=np.float64"
    return f"rescale the embedding (e.g. divide it by its typical scale){wider}"


def precision_fault(precision_diagonal: Any, dtype: Any) -> str | None:
    """``"precision_underflow"``/``"precision_overflow"`` when a precision's diagonal does not fit ``dtype``.

    The diagonal of a positive definite precision is positive: a zero or subnormal entry is an underflow (the
    precision would read as zeros), an infinite or NaN one an overflow. ``None`` when it fits.
    """
    d = np.asarray(precision_diagonal)
    if not d.size:
        return None
    # Two reductions and a cached limit: this runs once per patch of every fit (it cost 20 µs a patch with a
    # full isfinite pass and a fresh finfo lookup, 10 % of a PaDiM fit's single-threaded time). NaN or an
    # infinity anywhere makes the minimum or the maximum non-finite.
    smallest, largest = float(d.min()), float(d.max())
    if not (math.isfinite(smallest) and math.isfinite(largest)):
        return "precision_overflow"
    if smallest < _smallest_normal(dtype):
        return "precision_underflow"
    return None


@functools.lru_cache(maxsize=64)
def _cached_smallest_normal(dtype: Any) -> float:
    return _limits(dtype)[2]


def _smallest_normal(dtype: Any) -> float:
    """The smallest normal number of ``dtype`` (a NumPy dtype or an ``finfo`` object), cached where hashable."""
    try:
        return _cached_smallest_normal(dtype)
    except TypeError:  # an unhashable finfo-like object
        return _limits(dtype)[2]


def fault_scale(fault: str, variances: Any) -> float:
    """The features' scale that the message of a precision ``fault`` (:func:`precision_fault`) names.

    An underflowing precision comes from features too large for the dtype: the square root of the largest of
    ``variances`` (a patch's regularised variances: its covariance's diagonal, or its eigenvalues); an
    overflowing one from features too small: that of the smallest. Both packages' messages use it.

    Examples
    --------
    >>> fault_scale("precision_underflow", [4.0, 1e40]), fault_scale("precision_overflow", [0.25, 4.0])
    (1e+20, 0.5)
    """
    values = np.asarray(variances, dtype=np.float64)
    variance = float(values.max() if fault == "precision_underflow" else values.min()) if values.size else 0.0
    return math.sqrt(max(variance, 0.0))


def non_finite_fit_error(where: str, first: tuple[int, int] | None, name: str = "embedding") -> ValueError:
    """The ``ValueError`` of a fit whose patch's mean came out non-finite (both packages' one-shot dense fits).

    ``first`` is ``(observation, feature)`` of the patch's first NaN or infinity (in C order of its ``(N, C)``
    data), or ``None`` when its data are finite but overflowed the working dtype (their mean, their differences,
    or float64 values beyond a float32 fit's range).

    Examples
    --------
    >>> print(non_finite_fit_error("patch 2", (4, 1)))
    embedding contains non-finite values (NaN or infinity) in patch 2, first at observation 4, feature 1; remove or replace the NaN or infinite values before fitting
    >>> print(non_finite_fit_error("patch 2", None))
    the values of patch 2 overflowed the fit's dtype (their mean or differences, or the values themselves, exceed its largest number); rescale the embedding before fitting
    """
    if first is None:
        return ValueError(
            f"the values of {where} overflowed the fit's dtype (their mean or differences, or the values themselves, "
            "exceed its largest number); rescale the embedding before fitting"
        )
    try:
        require_finite(False, name, where=f" in {where}, first at observation {int(first[0])}, feature {int(first[1])}")
    except ValueError as error:
        return error
    raise AssertionError("unreachable")  # pragma: no cover


#: What a query holding NaN or infinity is told (both packages' scoring).
SCORE_REMEDY = "remove or replace the NaN or infinite values before scoring"


def raise_non_finite_query(name: str, sample: int, patch: int, spatial: Sequence[int]) -> NoReturn:
    """Raise the ``ValueError`` of a query holding NaN or infinity, naming the argument and where (both packages).

    Examples
    --------
    >>> raise_non_finite_query("x", 1, 5, (2, 4))
    Traceback (most recent call last):
    ...
    ValueError: x contains non-finite values (NaN or infinity) at sample 1, patch 5 (position (1, 1) of the 2x4 grid); remove or replace the NaN or infinite values before scoring
    """
    require_finite(False, name, where=f" at sample {int(sample)}, {describe_patch(patch, spatial)}", remedy=SCORE_REMEDY)
    raise AssertionError("unreachable")  # pragma: no cover


def check_query_results(flat_embedding: NDArray, squared: NDArray, spatial: Sequence[int], name: str = "x") -> None:
    """After scoring ``(M, C, P)`` queries into ``squared`` ``(M, P)``: refuse queries holding NaN or infinity.

    Only non-finite results are examined (the common case costs one pass over ``squared``), and only those
    whose query holds NaN or infinity raise (:func:`raise_non_finite_query`, the first in sample-then-patch
    order). Finite queries keep finite or ``+inf`` results: :func:`score_chunk` rescores the dense form's far
    queries exactly; a NaN left for a finite query by another kernel can only come from an overflow (``inf −
    inf`` or ``0·inf`` needs an infinity, and a finite query and precision give one only by overflowing), so
    it is set to ``+inf`` in place.
    """
    bad = ~np.isfinite(squared)
    if not bad.any():
        return
    queries = ~np.isfinite(flat_embedding).all(axis=1)  # (M, P): one pass, on the error path only
    culprits = np.argwhere(bad & queries)
    if culprits.size:
        raise_non_finite_query(name, int(culprits[0][0]), int(culprits[0][1]), spatial)
    squared[np.isnan(squared)] = np.inf


@dataclass
class PatchOutputs:
    """Preallocated output stacks of a fit, indexed by flat patch number."""

    precision: NDArray[np.floating]
    log_det: NDArray[np.float64]
    shrinkage: NDArray[np.float64]
    covariance: NDArray[np.floating] | None = None
    cholesky: NDArray[np.floating] | None = None

    @classmethod
    def allocate(cls, n_patches: int, n_features: int, dtype: np.dtype, *, keep_covariance: bool) -> PatchOutputs:
        """Uninitialised stacks for ``n_patches`` patches (covariance and factor only when kept).

        Left untouched: the worker threads fault the pages in as they write their own patches (measured:
        faster than a sequential fill first, now that the LAPACK calls of the threads overlap; see
        :mod:`anomstats._lapack`).
        """
        stack = (n_patches, n_features, n_features)
        return cls(
            precision=np.empty(stack, dtype=dtype),
            log_det=np.empty(n_patches, dtype=np.float64),
            shrinkage=np.zeros(n_patches, dtype=np.float64),
            covariance=np.empty(stack, dtype=dtype) if keep_covariance else None,
            cholesky=np.empty(stack, dtype=dtype) if keep_covariance else None,
        )


@dataclass(frozen=True)
class PatchFitSettings:
    """A fit's configuration as the per-patch kernels need it: what to do with a patch's empirical
    covariance before factoring it, and how to name a patch in messages."""

    ridge: float
    shrinkage: str | None
    n_samples: int
    spatial: tuple[int, ...]
    keep_covariance: bool = False  # also store the regularised covariance and its Cholesky factor
    #: The dtype the data came in (its eps sets the rank test of an unregularised patch, :func:`patch_rank_eps`);
    #: ``None``: the working dtype's (streams that do not record it).
    data_dtype: Any = None

    @property
    def ddof(self) -> int:
        # Shrinkage estimators start from the biased (maximum-likelihood) covariance, as scikit-learn does.
        return 0 if self.shrinkage is not None else 1


def plan_patch_chunks(
    n_patches: int, bytes_per_patch: int, memory_budget: int, workers: int, max_patches: int | None = None
) -> list[tuple[int, int]]:
    """:func:`anomstats._budget.plan_chunks` for a flat axis of patches, as ``(start, stop)`` ranges.

    At least about four chunks per worker, so that the threads stay balanced.

    Examples
    --------
    >>> plan_patch_chunks(10, 100, 400, 1)
    [(0, 4), (4, 8), (8, 10)]
    >>> plan_patch_chunks(10, 1, 10**6, 2)
    [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    """
    plan = plan_chunks(
        (n_patches,), bytes_per_patch, memory_budget, workers, max_items=max_patches, chunks_per_worker=4
    )
    return [(index[0].start, index[0].stop) for index, _ in plan]


class ThreadScratch:
    """Work buffers that each worker thread reuses across the chunks of one call.

    A fresh large buffer per chunk would be page-faulted in again every time (measured: about a third
    of the fit's CPU time for PaDiM's sizes); one buffer per thread is faulted in once.
    """

    def __init__(self, finisher_slots: int = 1) -> None:
        self._local = threading.local()
        self.finisher_slots = finisher_slots  # of each thread's PatchFinisher (stack_patches)

    def array(self, shape: tuple[int, ...], dtype: np.dtype, name: str = "buffer") -> NDArray:
        """An uninitialised array of ``shape``, backed by this thread's buffer ``name`` (grown when needed).

        Arrays of different names are independent; asking for the same name again reuses (and overwrites)
        that buffer.
        """
        size = math.prod(shape)
        buffer = getattr(self._local, name, None)
        if buffer is None or buffer.size < size or buffer.dtype != dtype:
            buffer = np.empty(size, dtype=dtype)
            setattr(self._local, name, buffer)
        return buffer[:size].reshape(shape)

    def finisher(
        self, outputs: PatchOutputs, settings: PatchFitSettings, n_features: int, dtype: np.dtype
    ) -> PatchFinisher:
        """This thread's :class:`PatchFinisher` (created on first use)."""
        finisher = getattr(self._local, "finisher", None)
        if finisher is None:
            finisher = self._local.finisher = PatchFinisher(outputs, settings, n_features, dtype, self.finisher_slots)
        return finisher


#: A finisher's stack holds this many bytes of scratch matrices (at most 64 of them, at least one): the
#: patches of one stack are regularised, checked, symmetrised and stored by one NumPy call per step, so
#: the Python work per patch (which holds the GIL that the worker threads share) is the three LAPACK/BLAS
#: calls alone. Measured on 2 threads, default fit of float32 (B, C, 28, 28) / (200, 100, 56, 56): one
#: patch at a time 49.5 / 98 / 581 ms at C = 32 / 64 / 100; 512 KiB stacks 25 / 58 / 531 ms; 2 MiB
#: 25 / 52 / 491 ms; 4 MiB no better. (PaDiM's C = 550 gets one slot: the stack is never larger than
#: one matrix beyond this budget.)
FINISH_STACK_BYTES = 2 * 2**20
_FINISH_STACK_MAX = 64


def stack_patches(n_features: int, itemsize: int, memory_budget: int | None = None) -> int:
    """How many ``(C, C)`` scratch matrices a one-shot fit's :class:`PatchFinisher` stacks.

    :data:`FINISH_STACK_BYTES` of them, or ``memory_budget`` (one thread's share of the fit's) where that is
    smaller; at least one, at most 64.

    Examples
    --------
    >>> stack_patches(100, 8), stack_patches(32, 8), stack_patches(550, 8), stack_patches(32, 8, 2**14)
    (26, 64, 1, 2)
    """
    budget = FINISH_STACK_BYTES if memory_budget is None else min(FINISH_STACK_BYTES, memory_budget)
    return max(1, min(_FINISH_STACK_MAX, budget // (n_features * n_features * itemsize)))


class PatchFinisher:
    """Per-thread scratch space turning patch covariances into the fitted quantities, a stack at a time.

    The caller writes the lower triangles of up to :attr:`slots` consecutive patches' (unregularised)
    covariances into ``stack[:count]`` (the one-shot fit runs ``slot_kernels[i].syrk`` into slot ``i``)
    and calls :meth:`finish_stack`; or, one patch at a time, writes :attr:`t` (slot 0) and calls
    :meth:`finish`. Both are the same steps.
    """

    def __init__(
        self, outputs: PatchOutputs, settings: PatchFitSettings, n_features: int, dtype: np.dtype, slots: int = 1
    ) -> None:
        c = n_features
        self.outputs = outputs
        self.settings = settings
        self.c = c
        self.slots = slots
        # Strict upper triangles stay zero (see module notes).
        self.stack = np.zeros((self.slots, c, c), dtype=dtype)
        # potrf/potri/syrk on each slot, GIL released during each call.
        self.slot_kernels = [ScratchKernels(self.stack[i]) for i in range(self.slots)]
        self.t = self.stack[0]
        self.kernels = self.slot_kernels[0]
        # The factors' diagonals (the log-determinants' terms), where the factors themselves are not kept.
        self.factor_diagonals = np.empty((self.slots, c), dtype=dtype)
        data = settings.data_dtype
        self.rank_eps = patch_rank_eps(None if data is None else data_eps_of(data), dtype)

    def finish(
        self,
        patch: int,
        sum_fourth_powers: float | None = None,
        *,
        rank_eps: float | None = None,
        scale_of: Callable[[], float] | None = None,
        shrinkage_scale: float | None = None,
    ) -> None:
        """:meth:`finish_stack` of one patch, whose covariance's lower triangle is in :attr:`t`."""
        self.finish_stack(
            patch, 1, None if sum_fourth_powers is None else [sum_fourth_powers], rank_eps=rank_eps,
            scale_of=None if scale_of is None else lambda _: scale_of(),
            shrinkage_scales=None if shrinkage_scale is None else [shrinkage_scale],
        )

    def finish_stack(
        self,
        first: int,
        count: int,
        sum_fourth_powers: Sequence[float] | NDArray[np.float64] | None = None,
        *,
        rank_eps: float | None = None,
        scale_of: Callable[[int], float] | None = None,
        shrinkage_scales: Sequence[float] | NDArray[np.float64] | None = None,
    ) -> None:
        """Regularise, factor and invert patches ``first .. first + count - 1``, held in ``stack[:count]``.

        Everything happens in the stack (cache-resident); each output stack is written exactly once. Faults
        are found step by step over the whole stack, but reported as a patch-by-patch run would: the first
        faulty patch's error, raised after every earlier patch has been finished and stored.
        ``rank_eps`` overrides the rank test's eps (:func:`patch_rank_eps`; a one-shot fit knows its data's
        dtype); ``scale_of(i)`` gives slot ``i``'s features' scale for the message of a covariance that
        overflowed. ``shrinkage_scales[i]``: the power of two ``s`` that ``sum_fourth_powers[i]`` was divided
        by (by ``s²``), which the trace and the sum of squares of the covariance are then divided by too;
        ``None``: ``sum_fourth_powers`` is not divided, and ``s`` is
        :func:`anomstats._shrinkage.power_of_two_scale` of the trace (``1.0`` at ordinary scales; otherwise
        ``sum_fourth_powers[i]`` is divided by ``s²`` here).
        """
        est, out, c = self.settings, self.outputs, self.c
        kept = _Kept(self.stack, count, c)
        finite = np.isfinite(kept.diagonals).all(axis=1)
        if not finite.all():
            i = int(np.argmin(finite))
            # The work dtype overflowed (float64 work for a float32 result too): a wider result cannot help.
            kept.fail(i, unrepresentable_error(
                describe_patch(first + i, est.spatial), self.stack.dtype, "covariance",
                None if scale_of is None else scale_of(i), scale_remedy(self.stack.dtype)))
        if est.shrinkage is not None:
            for i in range(kept.count):
                self._shrink(first + i, kept.stack[i], kept.diagonals[i],
                             None if sum_fourth_powers is None else float(sum_fourth_powers[i]),
                             None if shrinkage_scales is None else float(shrinkage_scales[i]))
        kept.diagonals += est.ridge
        stop = first + kept.count
        if out.covariance is not None:
            _store_symmetric(kept.stack, out.covariance[first:stop])

        # Without regularisation an exactly singular covariance (e.g. a duplicated feature) often factors
        # "successfully" with a rounding-sized pivot, giving a precision of ~1/eps garbage: the rank test
        # (singular_feature) refuses it, and a failed factorisation gets the same message, so the verdict
        # does not depend on rounding. A ridge or a shrinkage target keeps the covariance definite in exact
        # arithmetic, and rank-deficient patches (N <= C, as PaDiM often has) are then valid.
        unregularised = est.ridge == 0 and est.shrinkage is None
        variances = kept.diagonals.astype(np.float64) if unregularised else None
        # Before the factorisation overwrites the diagonals.
        smallest, largest = kept.diagonals.min(axis=1), kept.diagonals.max(axis=1)
        # Without a kept factor, each patch is factored and inverted by one call (ScratchKernels.invert: faster
        # at large C), which hands back the factor's diagonal; with it, the factor is copied out in between.
        keep_factor = out.cholesky is not None
        factor_diagonals = kept.diagonals if keep_factor else self.factor_diagonals[: kept.count]
        for i in range(kept.count):
            kernels = self.slot_kernels[i]
            info = kernels.potrf() if keep_factor else kernels.invert(factor_diagonals[i])
            if info != 0:
                kept.fail(i, self._not_positive_definite(first + i, info, numerically=unregularised,
                                                         rank_eps=rank_eps, largest=float(largest[i])))
                factor_diagonals = factor_diagonals[: kept.count]
                break
        stop = first + kept.count
        out.log_det[first:stop] = 2.0 * np.log(factor_diagonals.astype(np.float64)).sum(axis=1)
        if keep_factor:
            np.copyto(out.cholesky[first:stop], kept.stack)
            for i in range(kept.count):
                info = self.slot_kernels[i].potri()
                if info != 0:  # pragma: no cover - potrf succeeded, so L has a nonzero diagonal
                    kept.fail(i, self._not_positive_definite(first + i, info))
                    break
        stop = first + kept.count
        precision = out.precision[first:stop]
        precision_diagonals = _store_symmetric(kept.stack, precision)
        # e.g. float32 features of scale 1e19: a precision of ~1e-38 reads as zeros.
        i = _first_precision_fault(precision_diagonals, precision.dtype)
        if i is not None:
            fault = precision_fault(precision_diagonals[i], precision.dtype)
            assert fault is not None
            kept.fail(i, unrepresentable_error(describe_patch(first + i, est.spatial), precision.dtype, fault,
                                               fault_scale(fault, (smallest[i], largest[i])), self._remedy()))
        if variances is not None:
            eps = rank_eps or self.rank_eps
            for i in range(kept.count):
                if singular_feature(precision_diagonals[i], variances[i], eps):
                    kept.fail(i, self._not_positive_definite(first + i, 0, numerically=True, rank_eps=rank_eps))
                    break
        if kept.error is not None:
            raise kept.error

    def _shrink(
        self, patch: int, t: NDArray[np.floating], diagonal: NDArray[np.floating],
        sum_fourth_powers: float | None, shrinkage_scale: float | None,
    ) -> None:
        """Shrink one patch's covariance (lower triangle ``t``, ``diagonal`` its view) towards its scaled identity."""
        est, c = self.settings, self.c
        # Scaled by a power of two where the squares would overflow or underflow (exact; the coefficients
        # do not depend on it): features of scale 1e80 have a representable covariance and precision.
        if shrinkage_scale is None:
            shrinkage_scale = power_of_two_scale(float(diagonal.sum(dtype=np.float64)), t.dtype)
            if sum_fourth_powers is not None and shrinkage_scale != 1.0:  # given unscaled: divided by s² here
                sum_fourth_powers = math.ldexp(sum_fourth_powers, 2 - 2 * math.frexp(shrinkage_scale)[1])
        trace, frobenius_sq = scaled_trace_and_frobenius(t, shrinkage_scale)
        if est.shrinkage == "oas":
            coef = float(oas_coefficient(trace, frobenius_sq, est.n_samples, c))
        else:
            coef = float(ledoit_wolf_coefficient(trace, frobenius_sq, sum_fourth_powers, est.n_samples, c))
        shrink_in_place(t, coef)  # scaling keeps the upper triangle at zero
        self.outputs.shrinkage[patch] = coef

    def _remedy(self) -> str:
        return scale_remedy(self.outputs.precision.dtype)  # the result's dtype (a float64 work may serve float32)

    def _not_positive_definite(
        self, patch: int, info: int, numerically: bool = False, rank_eps: float | None = None,
        largest: float | None = None,
    ) -> np.linalg.LinAlgError | ValueError:
        est = self.settings
        where = describe_patch(patch, est.spatial)
        if numerically:
            return singular_patch_error(where, self.c, rank_eps or self.rank_eps)
        options = [] if est.shrinkage is not None else ["or use shrinkage='ledoit-wolf' or 'oas'"]
        if self.t.dtype != np.float64:
            options.append("or fit with dtype=np.float64")
        return not_definite_error(
            where, info, est.ridge, est.shrinkage, n_features=self.c, largest_variance=largest, dtype=self.t.dtype,
            alternatives=", ".join(options) if options else None,
        )


class _Kept:
    """The leading slots of a finisher's stack still being finished, and the error that cut the rest off.

    A fault found at slot ``i`` keeps slots ``0 .. i - 1`` (which a patch-by-patch run would have finished
    first, and whose own faults come first) and records the error, raised once they are done.
    """

    def __init__(self, stack: NDArray[np.floating], count: int, c: int) -> None:
        self._all = stack
        self.c = c
        self.error: Exception | None = None
        self._keep(count)

    def _keep(self, count: int) -> None:
        self.count = count
        self.stack = self._all[:count]
        # A writable (count, C) view of the diagonals.
        self.diagonals = self.stack.reshape(count, self.c * self.c)[:, :: self.c + 1]

    def fail(self, i: int, error: Exception) -> None:
        self.error = error
        self._keep(i)


def _store_symmetric(lower: NDArray[np.floating], out: NDArray[np.floating]) -> NDArray[np.floating]:
    """Write the symmetric matrices whose lower triangles are ``lower`` (zero strict upper) into ``out``.

    ``lower + lowerᵀ`` with the doubled diagonal halved: both steps are exact, so ``out`` is exactly
    symmetric. Returns a view of ``out``'s diagonals, ``(count, C)``.
    """
    count, c = lower.shape[0], lower.shape[-1]
    np.add(lower, lower.transpose(0, 2, 1), out=out)
    diagonals = out.reshape(count, c * c)[:, :: c + 1]
    diagonals *= 0.5
    return diagonals


def _first_precision_fault(diagonals: NDArray[np.floating], dtype: Any) -> int | None:
    """The first row of precision ``diagonals`` that :func:`precision_fault` refuses (``None``: none).

    Two reductions over the whole stack instead of two per patch; :func:`precision_fault` itself then
    names the fault of that row.
    """
    if not diagonals.size:
        return None
    smallest, largest = diagonals.min(axis=1), diagonals.max(axis=1)
    with np.errstate(invalid="ignore"):
        bad = ~(np.isfinite(smallest) & np.isfinite(largest)) | (smallest < _smallest_normal(dtype))
    return int(np.argmax(bad)) if bad.any() else None


#: A fit's chunks hold at most this many patches, so that a patch gathered is still in cache when it is used.
FIT_CHUNK_PATCHES = 64


def _first_bad_patch(values: NDArray[np.floating]) -> int:
    """Index along axis 0 of the first row holding a non-finite value."""
    bad = ~np.isfinite(values.reshape(values.shape[0], -1)).all(axis=1)
    return int(np.argmax(bad))


def fit_chunk(
    flat_embedding: NDArray,
    start: int,
    stop: int,
    mean_out: NDArray[np.floating],
    outputs: PatchOutputs,
    settings: PatchFitSettings,
    dtype: np.dtype,
    scratch: ThreadScratch,
) -> None:
    """One-shot fit of patches ``start:stop`` of an ``(N, C, P)`` embedding into the output stacks.

    Location-free: each patch is gathered shifted by its first observation (:func:`anomstats._moment_kernels.gather`
    with ``shift=``, in the same pass as the cast and the transposition), so that its mean, centred values and
    fourth moments (Ledoit-Wolf's) round relative to the data's spread, not to their distance from the origin;
    the stored mean is the shifted mean plus the shift (one rounding relative to ``|mean|``).
    """
    n, c = flat_embedding.shape[0], flat_embedding.shape[1]
    block = flat_embedding.transpose(2, 0, 1)[start:stop]  # (patches, N, C), a view
    # The one work buffer: this chunk's patches as (patch, observation, feature) in the working dtype.
    work = scratch.array((stop - start, n, c), dtype)
    # x − shift, computed in result_type(data, dtype) and rounded once: the library's one gather. Finite data may
    # overflow the working dtype here (float64 values beyond a float32 fit, or their differences): refused below.
    with np.errstate(over="ignore", invalid="ignore"):
        shift = first_observations(block, dtype)  # (patches, C): each patch's first observation
        gather(block, work, shift=shift)
    chunk_mean = work.mean(axis=1)
    # Any NaN or infinity in a patch's data makes that patch's mean non-finite: a cheap full check.
    if not np.isfinite(chunk_mean).all():
        k = _first_bad_patch(chunk_mean)
        # On the error path only: the first non-finite value of the patch's own data; none: finite data whose
        # values, differences or mean overflowed the working dtype.
        bad = np.argwhere(~np.isfinite(block[k]))
        first = (int(bad[0][0]), int(bad[0][1])) if bad.size else None
        raise non_finite_fit_error(describe_patch(start + k, settings.spatial), first)
    with np.errstate(over="ignore"):  # a mean beyond the working dtype's range is refused below
        np.add(chunk_mean, shift, out=mean_out[:, start:stop].T)
    if not np.isfinite(mean_out[:, start:stop]).all():  # pragma: no cover - needs data at the edge of the range
        k = _first_bad_patch(mean_out[:, start:stop].T)
        raise non_finite_fit_error(describe_patch(start + k, settings.spatial), None)
    work -= chunk_mean[:, None, :]
    sum_fourth_powers = shrinkage_scales = None
    if settings.shrinkage == "ledoit-wolf":
        row_sq = np.einsum("pnc,pnc->pn", work, work)
        # Σ‖x − μ‖⁴ (~scale⁴) overflows float64 for features of scale beyond ~1e77 whose covariance and precision
        # are representable: divided by s² for s a power of two of the trace's size (exact; 1.0 at ordinary scales).
        traces = row_sq.sum(axis=1, dtype=np.float64) / n
        shrinkage_scales = np.array([power_of_two_scale(trace, dtype) for trace in traces])
        if (shrinkage_scales != 1.0).any():
            row_sq = row_sq / shrinkage_scales[:, None]
        sum_fourth_powers = np.einsum("pn,pn->p", row_sq, row_sq, dtype=np.float64)

    finisher = scratch.finisher(outputs, settings, c, dtype)
    alpha = 1.0 / covariance_normalisation(n, None, settings.ddof)
    data = settings.data_dtype if settings.data_dtype is not None else flat_embedding.dtype
    rank_eps = patch_rank_eps(data_eps_of(data), dtype)
    for k0 in range(0, stop - start, finisher.slots):
        k1 = min(k0 + finisher.slots, stop - start)
        for k in range(k0, k1):  # the GIL is released inside, so worker threads overlap
            finisher.slot_kernels[k - k0].syrk(alpha, work[k])
        finisher.finish_stack(
            start + k0, k1 - k0, None if sum_fourth_powers is None else sum_fourth_powers[k0:k1],
            rank_eps=rank_eps, scale_of=lambda i, k0=k0: feature_scale(work[k0 + i]),
            shrinkage_scales=None if shrinkage_scales is None else shrinkage_scales[k0:k1],
        )


def finish_chunk(
    centred_sums: NDArray[np.floating],
    scale: float,
    offset: int,
    start: int,
    stop: int,
    sum_fourth_powers: NDArray[np.float64] | None,
    outputs: PatchOutputs,
    settings: PatchFitSettings,
    dtype: np.dtype,
    scratch: ThreadScratch,
) -> None:
    """Regularise, factor and invert patches ``start:stop`` from streamed ``(P, C', C')`` centred sums.

    The covariance of patch p is ``scale * centred_sums[p, offset:, offset:]`` (``offset`` skips the
    leading row/column of the augmented moments of streaming Ledoit-Wolf). Only lower triangles are read.
    """
    c = outputs.precision.shape[-1]
    finisher = scratch.finisher(outputs, settings, c, dtype)
    lower = np.tril(np.ones((c, c), dtype=bool))
    for p in range(start, stop):
        with np.errstate(over="ignore"):  # a float64 sum beyond float32 becomes inf: finish names the scale
            np.multiply(centred_sums[p, offset:, offset:], scale, out=finisher.t, where=lower, casting="unsafe")
        finisher.finish(
            p, None if sum_fourth_powers is None else float(sum_fourth_powers[p]),
            scale_of=lambda p=p: math.sqrt(max(float(np.diagonal(centred_sums[p, offset:, offset:]).max()) * scale, 0.0)),
        )


def score_chunk(
    flat_embedding: NDArray,
    start: int,
    stop: int,
    mean: NDArray[np.floating],
    precision: NDArray[np.floating],
    out: NDArray[np.floating],
    dtype: np.dtype,
    scratch: ThreadScratch,
) -> None:
    """Squared Mahalanobis distances of ``(M, C, P)`` embeddings for patches ``start:stop`` into ``out``."""
    m, c = flat_embedding.shape[0], flat_embedding.shape[1]
    delta = scratch.array((stop - start, m, c), dtype)
    # Far queries overflow here (float64 beyond float32 when gathered, or δᵀPδ part way): their results are
    # rescored below, so numpy's overflow and invalid-value warnings would only be noise.
    with np.errstate(over="ignore", invalid="ignore"):
        gather(flat_embedding.transpose(2, 0, 1)[start:stop], delta)
        delta -= mean[:, start:stop].T[:, None, :]
        # The precision is symmetric, so delta @ precision holds (precision @ delta_m) in each row m.
        projected = np.matmul(delta, precision[start:stop])
        block = out[:, start:stop]
        block[...] = np.einsum("pmc,pmc->pm", projected, delta).T
    if not np.isfinite(block).all():
        _rescore_far_queries(flat_embedding, start, mean, precision, block)


def _rescore_far_queries(
    flat_embedding: NDArray, start: int, mean: NDArray, precision: NDArray, block: NDArray
) -> None:
    """Rescore the finite queries of ``block`` (M, p) whose squared distance came out non-finite.

    A query far from the mean overflows ``δᵀPδ`` part way (``inf − inf`` is NaN; float64 input beyond
    float32's range becomes inf when gathered into a float32 model). Here ``δ`` is formed in float64 and
    scaled (:func:`_scaled_quadratic`), and the result ``(q·s)·s`` is finite or ``+inf``, never NaN.
    Queries holding NaN or infinity keep their non-finite result (the caller refuses them:
    :func:`check_query_results`).
    """
    samples, offsets = np.nonzero(~np.isfinite(block))
    for offset in np.unique(offsets):
        rows = samples[offsets == offset]
        patch = start + int(offset)
        x = flat_embedding[rows, :, patch].astype(np.float64)
        finite = np.isfinite(x).all(axis=1)
        if not finite.any():
            continue
        q, scale = _scaled_quadratic(x[finite], mean[:, patch], dense_quadratic(precision[patch]))
        with np.errstate(over="ignore"):
            block[rows[finite], offset] = (q * scale) * scale


def dense_quadratic(precision: NDArray) -> Callable[[NDArray], NDArray]:
    """``δ ↦ δᵀPδ`` row by row in float64, for one patch's dense precision ``P``."""
    wide = precision.astype(np.float64)
    return lambda delta: np.einsum("mc,cd,md->m", delta, wide, delta)


def _scaled_quadratic(
    x: NDArray[np.float64], mean: NDArray, quadratic: Callable[[NDArray], NDArray]
) -> tuple[NDArray, NDArray]:
    """``(q, s)`` with ``d² = q·s²`` for the finite rows ``x`` (k, C) of one patch, never overflowing.

    ``δ = x − mean`` in float64, divided by a power of two ``s > max|δ|/2`` (exact; ``s <= 2^1023`` even for
    ``|δ|`` near float64's largest number, where ``2^1024`` would overflow); ``quadratic`` (the form's ``d²`` of
    centred rows, homogeneous of degree 2) of ``δ/s`` (``|δ/s| < 2``) cannot overflow for a finite precision
    with entries below ``max/(4C²)``.
    """
    delta = x - mean.astype(np.float64)
    _, exponent = np.frexp(np.abs(delta).max(axis=1))
    scale = np.ldexp(1.0, exponent - 1)  # a power of two > max|δ|/2: the division is exact
    delta /= scale[:, None]
    return quadratic(delta), scale


def far_distances(
    flat_embedding: NDArray, distances: NDArray, patch_form: Callable[[int], tuple[NDArray, Callable[[NDArray], NDArray]]]
) -> None:
    """Replace the infinite distances of finite queries in ``distances`` (M, P) by ``sqrt(q)·s``, in place.

    A narrow model's squared distance overflows its dtype long before the distance does (float32: beyond
    ``d ≈ 1.8e19``); from :func:`_scaled_quadratic`'s ``q`` and ``s`` the distance is formed without the
    square, so it is finite wherever it is representable. ``patch_form(p)`` gives patch ``p``'s mean and its
    ``d²`` of centred rows. Queries holding NaN or infinity were refused before.
    """
    samples, patches = np.nonzero(np.isinf(distances))
    for patch in np.unique(patches):
        rows = samples[patches == patch]
        mean, quadratic = patch_form(int(patch))
        q, scale = _scaled_quadratic(flat_embedding[rows, :, patch].astype(np.float64), mean, quadratic)
        with np.errstate(over="ignore"):
            distances[rows, patch] = np.sqrt(np.maximum(q, 0.0)) * scale
