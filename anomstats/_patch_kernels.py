"""Chunked, threaded kernels behind :class:`anomstats.MultiVariateGaussian`.

The fit works patch chunk by patch chunk so that its only temporaries are, per worker thread, one chunk of
the embedding converted to the working dtype (bounded by the memory budget, reused across chunks) and one
``(C, C)`` scratch matrix. For each patch it goes covariance -> (shrinkage) -> ridge -> Cholesky factor ->
precision inside that scratch matrix, writing each output stack once, so no second full-size stack ever
exists.

Layout trick used throughout: LAPACK/BLAS are column-major; a C-ordered ``(C, C)`` block viewed with
``.T`` is the same memory in column-major order. Asking LAPACK for the *upper* triangle of that view
therefore reads and writes the *lower* triangle of the C-ordered block, with no copies.

The scratch matrix ``t`` of a :class:`PatchFinisher` keeps a zero strict upper triangle at all times, so a
full symmetric matrix is obtained exactly as ``t + t.T`` with the doubled diagonal halved (both steps are
exact in floating point): stored covariances and precisions are exactly symmetric. LAPACK ``potrf`` and
``potri`` only touch the lower triangle (see :mod:`anomstats._lapack`), so the invariant survives them.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ._budget import plan_chunks
from ._rules import numerically_singular_pivot
from ._validation import describe_patch, require_finite
from ._lapack import ScratchKernels
from ._moment_kernels import gather
from ._rules import covariance_normalisation
from ._shrinkage import ledoit_wolf_coefficient, oas_coefficient, shrink_in_place

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

    def __init__(self) -> None:
        self._local = threading.local()

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
            finisher = self._local.finisher = PatchFinisher(outputs, settings, n_features, dtype)
        return finisher


class PatchFinisher:
    """Per-thread scratch space turning one patch's empirical covariance into the fitted quantities.

    The caller writes the lower triangle of the patch's (unregularised) covariance into :attr:`t` and
    calls :meth:`finish`.
    """

    def __init__(self, outputs: PatchOutputs, settings: PatchFitSettings, n_features: int, dtype: np.dtype) -> None:
        c = n_features
        self.outputs = outputs
        self.settings = settings
        self.c = c
        self.t = np.zeros((c, c), dtype=dtype)  # strict upper triangle stays zero (see module notes)
        self.kernels = ScratchKernels(self.t)  # potrf/potri/syrk on t, GIL released during each call

    def finish(self, patch: int, sum_fourth_powers: float | None = None) -> None:
        """Regularise, factor and invert patch ``patch`` whose covariance's lower triangle is in ``t``.

        Everything happens in ``t`` (cache-resident); each output stack is written exactly once.
        """
        est, out, c, t = self.settings, self.outputs, self.c, self.t
        diagonal = t.reshape(-1)[:: c + 1]
        if not np.isfinite(diagonal).all():
            raise ValueError(
                f"the covariance of {describe_patch(patch, est.spatial)} overflowed to a non-finite value; "
                "rescale the embedding (or fit with dtype=float64)"
            )
        if est.shrinkage is not None:
            trace = float(diagonal.sum())
            # sum of the squares of the full symmetric matrix, from its lower triangle
            frobenius_sq = 2.0 * float(np.vdot(t, t)) - float(np.vdot(diagonal, diagonal))
            if est.shrinkage == "oas":
                coef = float(oas_coefficient(trace, frobenius_sq, est.n_samples, c))
            else:
                coef = float(ledoit_wolf_coefficient(trace, frobenius_sq, sum_fourth_powers, est.n_samples, c))
            shrink_in_place(t, coef)  # scaling keeps the upper triangle at zero
            out.shrinkage[patch] = coef
        diagonal += est.ridge
        if out.covariance is not None:
            cov = out.covariance[patch]
            np.add(t, t.T, out=cov)
            cov.reshape(-1)[:: c + 1] *= 0.5

        # potrf reads and writes the lower triangle only: t's strict upper triangle stays zero.
        # An exactly singular covariance (e.g. a duplicated feature) often factors "successfully" with
        # a rounding-sized pivot, giving a precision of ~1/eps garbage: refuse a pivot below C·eps of
        # its feature's variance (the share of that variance not explained by the earlier features).
        # Only without regularisation: a ridge or a shrinkage target keeps every pivot away from zero
        # in exact arithmetic, and rank-deficient patches (N <= C, as PaDiM often has) are then valid.
        unregularised = est.ridge == 0 and est.shrinkage is None
        variances = diagonal.copy() if unregularised else None
        info = self.kernels.potrf()
        if info != 0:
            self._raise_not_positive_definite(patch, info)
        if variances is not None:
            order = numerically_singular_pivot(diagonal, variances)
            if order:
                self._raise_not_positive_definite(patch, order, numerically=True)
        if out.cholesky is not None:
            np.copyto(out.cholesky[patch], t)
        out.log_det[patch] = 2.0 * float(np.log(diagonal.astype(np.float64)).sum())

        info = self.kernels.potri()
        if info != 0:  # pragma: no cover - potrf succeeded, so L has a nonzero diagonal
            self._raise_not_positive_definite(patch, info)
        precision = out.precision[patch]
        np.add(t, t.T, out=precision)
        precision.reshape(-1)[:: c + 1] *= 0.5

    def _raise_not_positive_definite(self, patch: int, info: int, numerically: bool = False) -> None:
        est = self.settings
        hint = (
            "increase ridge (a larger ridge makes every patch definite), or use shrinkage='ledoit-wolf' or 'oas'"
            if est.shrinkage is None
            else "increase ridge (e.g. ridge=1e-3 times the typical feature variance)"
        )
        raise np.linalg.LinAlgError(
            f"the regularised covariance of {describe_patch(patch, est.spatial)} is not positive definite "
            f"({'numerically singular: pivot' if numerically else 'leading minor'} of order {info} is "
            f"{'below C·eps of its variance' if numerically else 'not positive'}) with ridge={est.ridge!r}"
            f"{'' if est.shrinkage is None else f' and shrinkage={est.shrinkage!r}'}; {hint}"
        )


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
    """One-shot fit of patches ``start:stop`` of an ``(N, C, P)`` embedding into the output stacks."""
    n, c = flat_embedding.shape[0], flat_embedding.shape[1]
    # The one work buffer: this chunk's patches as (patch, observation, feature) in the working dtype.
    work = scratch.array((stop - start, n, c), dtype)
    gather(flat_embedding.transpose(2, 0, 1)[start:stop], work)  # (patches, N, C): the library's one gather
    chunk_mean = work.mean(axis=1)
    # Any NaN or infinity in a patch's data makes that patch's mean non-finite: a cheap full check.
    if not np.isfinite(chunk_mean).all():
        k = _first_bad_patch(chunk_mean)
        where = describe_patch(start + k, settings.spatial)
        if not np.isfinite(work[k]).all():
            obs, feature = (int(i) for i in np.argwhere(~np.isfinite(work[k]))[0])
            require_finite(False, "embedding", where=f" in {where}, first at observation {obs}, feature {feature}")
        raise ValueError(f"the mean of {where} overflowed; rescale the embedding before fitting")
    mean_out[:, start:stop] = chunk_mean.T
    work -= chunk_mean[:, None, :]
    sum_fourth_powers = None
    if settings.shrinkage == "ledoit-wolf":
        row_sq = np.einsum("pnc,pnc->pn", work, work)
        sum_fourth_powers = np.einsum("pn,pn->p", row_sq, row_sq, dtype=np.float64)

    finisher = scratch.finisher(outputs, settings, c, dtype)
    alpha = 1.0 / covariance_normalisation(n, None, settings.ddof)
    for k in range(stop - start):
        finisher.kernels.syrk(alpha, work[k])  # the GIL is released inside, so worker threads overlap
        finisher.finish(start + k, None if sum_fourth_powers is None else float(sum_fourth_powers[k]))


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
        np.multiply(centred_sums[p, offset:, offset:], scale, out=finisher.t, where=lower, casting="unsafe")
        finisher.finish(p, None if sum_fourth_powers is None else float(sum_fourth_powers[p]))


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
    gather(flat_embedding.transpose(2, 0, 1)[start:stop], delta)
    delta -= mean[:, start:stop].T[:, None, :]
    # The precision is symmetric, so delta @ precision holds (precision @ delta_m) in each row m.
    projected = np.matmul(delta, precision[start:stop])
    out[:, start:stop] = np.einsum("pmc,pmc->pm", projected, delta).T
