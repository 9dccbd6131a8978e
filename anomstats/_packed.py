"""A memory-lean streaming fit of PaDiM's per-patch Gaussians: :class:`PackedGaussianAccumulator`.

PaDiM at its largest (wide_resnet50_2 at 256 px: C = 550 channels, 64×64 = 4096 patches) needs one
C×C covariance per patch. anomalib keeps every training embedding and about three ``(P, C, C)``
float32 stacks alive at once (35–50 GB reported). This accumulator keeps only what the estimator
needs, and nothing twice:

* the running mean, ``(P, C)``;
* the *upper triangle* of each patch's centred second moments ``Σ (x − μ)(x − μ)ᵀ``, packed row by
  row into ``C·(C+1)/2`` numbers per patch, ``(P, C·(C+1)/2)``.

Batches are merged in with Chan et al.'s pairwise update (mean difference times the count
product over the total), chunk by chunk over patches under a memory budget, so data far from the
origin keeps its digits and the work buffers stay bounded.

Why float64 accumulation (the default), deliberately
----------------------------------------------------
Accumulating in float64 is both the more accurate and, for a float32 result, the *leaner* choice:
a packed float64 triangle takes ``C·(C+1)/2·8 = C·(C+1)·4`` bytes per patch, which is just more than
the ``C·C·4`` bytes of that patch's full float32 precision. So ``finalize(in_place=True)`` writes the
float32 precision over the packed moments, patch chunk by patch chunk (each chunk is copied out,
unpacked, regularised, factored with LAPACK ``dpotrf``, inverted from its factor with ``dpotri``,
symmetrised and written back as float32 into memory whose moments were already consumed). The
peak of the whole fit is then one packed float64 stack plus buffers: 4.98 GB at
C = 550, P = 4096 (anomalib: ≈ 2.7 GB of embeddings plus ≈ 3 × 4.96 GB stacks). float32
accumulation would need 2.5 GB of moments *plus* a separate 4.96 GB output, and is over a
thousand times less accurate (below).

Batches are buffered (as private copies) until ``fold_every`` observations wait, then folded in
together: the per-patch symmetric rank-K updates (BLAS ``syrk``, one triangle only) then have
K ≈ 64 rather than ≈ 20, so far fewer BLAS calls, each less dominated by its fixed cost.

Memory, float64 accumulation, C = 550 (measured peak RSS with ``benchmarks.bench_padim_memory``,
300 images in batches of 20): 32×32 patches, 1.67 GB (anomalib's algorithm: 4.51 GB). At 64×64 the
stored state is 4.98 GB (packed moments and mean) plus at most ~0.7 GB of buffered batches, about
6 GB in all, against 16 GB allowed.

Accuracy (measured, C = 550, 2×2 patches, 300 images, against a float64 one-shot ``numpy.cov`` +
ridge + ``numpy.linalg.inv`` per patch; relative max error of the float32 precision): float64
accumulation 3.3e-8, i.e. the correctly rounded float64 result (float64 output: 8e-15 at C = 64); float32
accumulation 9.1e-5; anomalib's float32 algorithm 9.6e-5, with an asymmetry of 7.4e-5 (ours is
exactly symmetric).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray
from scipy.linalg import blas

from ._budget import DEFAULT_MEMORY_BUDGET, items_per_chunk
from ._lapack import potri_lower, potrf_lower
from ._patch_kernels import numerically_singular_pivot
from ._rules import DEFAULT_RIDGE
from ._validation import check_memory_budget

__all__ = ["PackedGaussianAccumulator", "packed_state_bytes"]


def packed_state_bytes(n_features: int, n_patches: int, dtype: DTypeLike = np.float64) -> int:
    """Bytes held by an accumulator's state: the packed triangles plus the running mean.

    Examples
    --------
    >>> print(f"{packed_state_bytes(550, 4096) / 1e9:.2f} GB")
    4.98 GB
    """
    itemsize = np.dtype(dtype).itemsize
    n_tri = n_features * (n_features + 1) // 2
    return n_patches * (n_tri + n_features) * itemsize


class PackedGaussianAccumulator:
    """Stream batches of embeddings into per-patch Gaussians, storing one packed triangle per patch.

    Parameters
    ----------
    n_features : int
        Channels C of the embeddings.
    n_patches : int
        Patches P = prod(spatial) of the embeddings (PaDiM: H·W).
    dtype : {numpy.float64, numpy.float32}, default numpy.float64
        Accumulation dtype (see the module notes for why float64 is the default: it is both more
        accurate and, with ``finalize(in_place=True)``, leaner for a float32 result).
    fold_every : int, default 64
        Batches are buffered (copied) until this many observations are waiting, then folded in
        together: one matrix product per patch per fold instead of per batch, which matters
        because a (C×B)·(B×C) product with B ≈ 20 is dominated by per-call BLAS overhead. The
        buffer holds at most ``fold_every + B − 1`` embeddings (0.75 GB at C = 550, 64×64, B = 20
        in float32); ``fold_every=1`` folds every batch at once.
    memory_budget : int, default 64 MiB
        Bound, in bytes, on the work buffers of one fold, ``merge`` or ``finalize`` chunk.

    Notes
    -----
    The estimator is anomalib 2.x's: the unbiased covariance (ddof = 1) plus ``ridge·I``
    (``DEFAULT_RIDGE`` = 0.01 + 1e-5), inverted per patch. Deliberate differences from anomalib:
    the precision comes from a Cholesky factor (``potrf`` + ``potri``) in the accumulation dtype
    and is exactly symmetric; fewer than two observations, non-finite values and covariances
    that cannot be factored raise errors instead of giving NaN.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> emb = rng.normal(size=(30, 4, 3, 3)).astype(np.float32)  # (B, C, H, W)
    >>> acc = PackedGaussianAccumulator(n_features=4, n_patches=9)
    >>> for batch in np.split(emb, 3):
    ...     _ = acc.update(batch)
    >>> mean, precision = acc.finalize()
    >>> mean.shape, precision.shape, precision.dtype
    ((4, 9), (9, 4, 4), dtype('float32'))
    >>> x = emb[:, :, 0, 0].astype(np.float64)
    >>> reference = np.linalg.inv(np.cov(x, rowvar=False) + 0.01001 * np.eye(4))
    >>> bool(np.allclose(precision[0], reference, rtol=1e-6, atol=1e-6))
    True
    """

    def __init__(
        self,
        n_features: int,
        n_patches: int,
        dtype: DTypeLike = np.float64,
        *,
        fold_every: int = 64,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        self.n_features = _positive_int(n_features, "n_features")
        self.n_patches = _positive_int(n_patches, "n_patches")
        acc = np.dtype(dtype)
        if acc not in (np.dtype(np.float64), np.dtype(np.float32)):
            raise TypeError(f"dtype must be numpy.float64 or numpy.float32, got {acc}")
        self.dtype = acc
        self.memory_budget = check_memory_budget(memory_budget)
        self.fold_every = _positive_int(fold_every, "fold_every")
        self._pending: list[NDArray[Any]] = []
        self._pending_n = 0
        self._count = 0
        self._mean: NDArray[Any] = np.zeros((self.n_patches, self.n_features), dtype=acc)
        self._m2: NDArray[Any] | None = np.zeros((self.n_patches, self.n_tri), dtype=acc)
        self._iu = np.triu_indices(self.n_features)
        # Flat positions, in a C-ordered (C, C) block, of the upper triangle (row by row) and of
        # its mirror image in the lower triangle (same order).
        self._upper_flat = self._iu[0] * self.n_features + self._iu[1]
        self._lower_flat = self._iu[1] * self.n_features + self._iu[0]

    # ------------------------------------------------------------------ state
    @property
    def n_tri(self) -> int:
        """Numbers stored per patch for the second moments: ``C·(C+1)/2``."""
        return self.n_features * (self.n_features + 1) // 2

    @property
    def count(self) -> int:
        """Observations accumulated so far (folded or still buffered)."""
        return self._count + self._pending_n

    @property
    def mean(self) -> NDArray[Any]:
        """Running mean in anomalib's layout ``(C, P)`` (a copy, accumulation dtype)."""
        self._check_alive()
        self._fold()
        return self._mean.T.copy()

    @property
    def nbytes(self) -> int:
        """Bytes of the stored state (packed triangles plus the mean)."""
        return packed_state_bytes(self.n_features, self.n_patches, self.dtype)

    def _check_alive(self) -> None:
        if self._m2 is None:
            raise RuntimeError(
                "this accumulator was finalized with in_place=True, which reused its memory for the "
                "precision; create a new PackedGaussianAccumulator to fit again"
            )

    def _patch_chunk(self, bytes_per_patch: int) -> int:
        return items_per_chunk(bytes_per_patch, self.memory_budget)

    # ------------------------------------------------------------------ accumulation
    def update(self, batch: ArrayLike) -> PackedGaussianAccumulator:
        """Add a batch of embeddings of shape ``(B, C, *spatial)`` with ``prod(spatial) == n_patches``.

        The batch is validated as a whole first (shape, finite values), so a rejected batch leaves
        the state untouched. The batch is never modified. Returns ``self``.
        """
        self._check_alive()
        x = np.asarray(batch)
        c, p = self.n_features, self.n_patches
        if x.ndim < 2 or x.shape[1] != c or math.prod(x.shape[2:]) != p:
            raise ValueError(
                f"batch must have shape (B, {c}, *spatial) with prod(spatial) == {p} patches, "
                f"got shape {x.shape}"
            )
        if x.dtype.kind not in "biuf":
            raise TypeError(f"batch must hold real numbers, got dtype {x.dtype}")
        n_b = x.shape[0]
        if n_b == 0:
            return self
        x3 = x.reshape(n_b, c, p)
        finite = np.isfinite(x3).all(axis=(0, 1))
        if not finite.all():
            raise ValueError(
                f"batch holds non-finite values (first at patch {int(np.argmin(finite))}); "
                "remove or replace them before fitting"
            )
        # A private copy (the caller may reuse its buffer), in the input's own float dtype.
        self._pending.append(np.array(x3, dtype=np.result_type(x3.dtype, np.float32)))
        self._pending_n += n_b
        if self._pending_n >= self.fold_every:
            self._fold()
        return self

    def _fold(self) -> None:
        """Fold the buffered batches into the moments as one block of observations."""
        n_b = self._pending_n
        if n_b == 0:
            return
        c, p = self.n_features, self.n_patches
        pieces = self._pending
        n_a = self._count
        n = n_a + n_b
        # Chan et al.: M2 = M2_a + M2_b + δδᵀ·n_a·n_b/n and μ = μ_a + δ·n_b/n, with δ = μ_b − μ_a.
        # The δδᵀ term rides along as one extra column of the centred block, so a single matrix
        # product gives M2_b plus the correction, and a single gather packs it.
        extra = 1 if n_a else 0
        root = math.sqrt(n_a * n_b / n) if n_a else 0.0
        item = self.dtype.itemsize
        step = self._patch_chunk(item * ((n_b + 1) * c + self.n_tri + 2 * c))  # xt, packed, means
        syrk = blas.dsyrk if self.dtype == np.float64 else blas.ssyrk
        square = np.zeros((c, c), dtype=self.dtype, order="F")  # syrk's output, reused per patch
        for start in range(0, p, step):
            stop = min(start + step, p)
            # (p, C, B[+1]) private copy in the accumulation dtype (also the cast and transposition).
            xt = np.empty((stop - start, c, n_b + extra), dtype=self.dtype)
            offset = 0
            for piece in pieces:
                xt[:, :, offset : offset + len(piece)] = piece[:, :, start:stop].transpose(2, 1, 0)
                offset += len(piece)
            mean_b = xt[:, :, :n_b].mean(axis=2)
            xt[:, :, :n_b] -= mean_b[:, :, None]
            if n_a:
                delta = mean_b - self._mean[start:stop]
                xt[:, :, n_b] = root * delta
            # One symmetric rank-K update per patch (BLAS syrk: half the flops of a full product).
            # syrk returns a Fortran-ordered (C, C) block whose upper triangle is valid; read as a
            # C-ordered array that is the lower triangle, in the same order as our packed rows.
            packed = np.empty((stop - start, self.n_tri), dtype=self.dtype)
            for k in range(stop - start):
                block = syrk(1.0, xt[k].T, beta=0.0, c=square, trans=1, lower=0, overwrite_c=1)
                packed[k] = block.T.reshape(-1)[self._lower_flat]
            del xt
            if n_a:
                self._m2[start:stop] += packed
                self._mean[start:stop] += delta * (n_b / n)
            else:
                self._m2[start:stop] = packed
                self._mean[start:stop] = mean_b
        self._count = n
        self._pending, self._pending_n = [], 0

    def merge(self, other: PackedGaussianAccumulator) -> PackedGaussianAccumulator:
        """Fold another accumulator (same sizes and dtype) into this one; ``other`` is unchanged."""
        self._check_alive()
        if not isinstance(other, PackedGaussianAccumulator):
            raise TypeError(f"other must be a PackedGaussianAccumulator, got {type(other).__name__}")
        other._check_alive()
        if other is self:
            raise ValueError("cannot merge an accumulator into itself")
        if (other.n_features, other.n_patches, other.dtype) != (self.n_features, self.n_patches, self.dtype):
            raise ValueError(
                "other must have the same n_features, n_patches and dtype: "
                f"got ({other.n_features}, {other.n_patches}, {other.dtype}), "
                f"expected ({self.n_features}, {self.n_patches}, {self.dtype})"
            )
        self._fold()
        other._fold()  # changes how other holds its data, not what it holds
        n_a, n_b = self._count, other._count
        if n_b == 0:
            return self
        if n_a == 0:
            self._m2[...] = other._m2
            self._mean[...] = other._mean
            self._count = n_b
            return self
        n = n_a + n_b
        iu0, iu1 = self._iu
        step = self._patch_chunk(self.dtype.itemsize * (3 * self.n_tri + 2 * self.n_features))
        for start in range(0, self.n_patches, step):
            stop = min(start + step, self.n_patches)
            delta = other._mean[start:stop] - self._mean[start:stop]
            outer = np.multiply(delta[:, iu0], delta[:, iu1])
            outer *= n_a * n_b / n
            outer += other._m2[start:stop]
            self._m2[start:stop] += outer
            self._mean[start:stop] += delta * (n_b / n)
        self._count = n
        return self

    # ------------------------------------------------------------------ result
    def finalize(
        self,
        ridge: float = DEFAULT_RIDGE,
        out_dtype: DTypeLike = np.float32,
        *,
        in_place: bool = False,
        return_log_det: bool = False,
    ) -> tuple[NDArray[Any], ...]:
        """Return ``(mean (C, P), precision (P, C, C))`` of the regularised per-patch Gaussians.

        The covariance of each patch is ``M2 / (n − 1) + ridge·I``; its precision comes from the
        Cholesky factor (LAPACK ``potrf`` then ``potri`` in the accumulation dtype), symmetrised,
        and is cast to ``out_dtype`` (float32 by default, as anomalib stores it).

        Parameters
        ----------
        ridge : float, default DEFAULT_RIDGE (0.01 + 1e-5)
            Added to the diagonal of every covariance; must be finite and >= 0.
        out_dtype : {numpy.float32, numpy.float64}, default numpy.float32
        in_place : bool, default False
            Write the precision over the packed moments (possible only for float64 accumulation
            and a float32 result, which fits in the same bytes). Saves one ``(P, C, C)`` output
            stack; the accumulator cannot be used afterwards.
        return_log_det : bool, default False
            Also return ``log det`` of each regularised covariance, float64 ``(P,)``, read off the
            Cholesky factor's diagonal (``2·Σ log Uᵢᵢ``) before it is inverted: then the result is
            ``(mean, precision, log_det)``.

        Raises
        ------
        ValueError
            Fewer than two observations, a bad ridge, or ``in_place`` with other dtypes.
        numpy.linalg.LinAlgError
            A regularised covariance is not positive definite (names the patch).
        """
        self._check_alive()
        out = np.dtype(out_dtype)
        if out not in (np.dtype(np.float64), np.dtype(np.float32)):
            raise TypeError(f"out_dtype must be numpy.float32 or numpy.float64, got {out}")
        ridge = float(ridge)
        if not math.isfinite(ridge) or ridge < 0:
            raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
        self._fold()
        if self._count < 2:
            raise ValueError(
                f"need at least 2 observations to estimate a covariance, got {self._count}; "
                "update with more embeddings before finalize"
            )
        c, p = self.n_features, self.n_patches
        if in_place and not (self.dtype == np.float64 and out == np.float32):
            raise ValueError(
                "in_place=True needs float64 accumulation and out_dtype=float32 (only then does the "
                f"precision fit in the moments' memory); got dtype={self.dtype}, out_dtype={out}"
            )
        mean = self._mean.T.astype(out)
        if in_place:
            # The float32 (C, C) block of patch i ends at byte (i+1)·C²·4 ≤ (i+1)·C(C+1)/2·8, where
            # patch i's packed moments end: writing a chunk only overwrites moments already read.
            precision = self._m2.reshape(-1).view(np.float32)[: p * c * c].reshape(p, c, c)
        else:
            precision = np.empty((p, c, c), dtype=out)
        log_det = np.empty(p, dtype=np.float64) if return_log_det else None
        iu0, iu1 = self._iu
        scale = 1.0 / (self._count - 1)
        diag_packed = np.flatnonzero(iu0 == iu1)
        step = self._patch_chunk(self.dtype.itemsize * (2 * c * c + self.n_tri))
        work_buffer = np.empty((min(step, p), c, c), dtype=self.dtype)
        for start in range(0, p, step):
            stop = min(start + step, p)
            packed = np.array(self._m2[start:stop])  # private copy: the output may overwrite it
            packed *= scale
            packed[:, diag_packed] += ridge
            # LAPACK reads and writes one triangle only: fill just that one (the C-order lower).
            # The work buffer is reused from chunk to chunk (no fresh pages to fault in each time).
            work = work_buffer[: stop - start]
            work.reshape(stop - start, c * c)[:, self._lower_flat] = packed
            del packed
            for k in range(stop - start):
                t = work[k]  # factored and inverted in place, lower triangle only (anomstats._lapack)
                # Rounding-sized pivots are refused only without a ridge (see _patch_kernels.finish).
                variances = np.diagonal(t).copy() if ridge == 0 else None
                info = potrf_lower(t)
                if info == 0 and variances is not None and numerically_singular_pivot(np.diagonal(t), variances):
                    info = -1  # a rounding-sized pivot: exactly singular in exact arithmetic
                if info != 0:
                    spent = ""
                    if in_place:  # part of the moments is already overwritten: refuse further use
                        self._m2 = None
                        spent = " (in_place=True: this accumulator's moments are partly overwritten)"
                    raise np.linalg.LinAlgError(
                        f"the covariance of patch {start + k} plus ridge={ridge:g}·I is not positive "
                        f"definite{' (numerically singular)' if info < 0 else ''}; use a larger ridge{spent}"
                    )
                if log_det is not None:  # the factor's diagonal, before potri overwrites it
                    log_det[start + k] = 2.0 * np.log(np.diagonal(t)).sum(dtype=np.float64)
                if potri_lower(t) != 0:  # pragma: no cover - potrf succeeded, so the factor is invertible
                    raise np.linalg.LinAlgError(f"inverting the factor of patch {start + k} failed")
            flat = work.reshape(stop - start, c * c)
            flat[:, self._upper_flat] = flat[:, self._lower_flat]  # mirror the computed triangle
            precision[start:stop] = work
        if in_place:
            self._m2 = None
            self._mean = np.empty((0, 0), dtype=self.dtype)
        if log_det is not None:
            return mean, precision, log_det
        return mean, precision


def _positive_int(value: Any, name: str) -> int:
    try:
        result = int(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a positive integer, got {value!r}") from None
    if result != value or result <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return result
