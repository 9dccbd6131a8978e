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
the ``C·C·4`` bytes of that patch's full float32 precision. So ``finalise(in_place=True)`` writes the
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

from ._budget import DEFAULT_MEMORY_BUDGET, items_per_chunk
from ._lapack import ScratchKernels
from ._moment_kernels import gather
from ._patch_kernels import PatchFinisher, PatchFitSettings, PatchOutputs
from ._rules import DEFAULT_RIDGE, chan_merge_weights, covariance_normalisation
from ._validation import check_dtype, check_memory_budget, check_positive_int, check_ridge, require_finite, require_observations

__all__ = ["PackedGaussianAccumulator", "packed_state_bytes", "packed_length", "features_of_packed_length"]


def packed_length(n_features: int) -> int:
    """Numbers in one packed upper triangle of a ``C×C`` symmetric matrix: ``C·(C+1)/2``.

    The packed layout (here and in the torch adapter's packed precision) is the upper triangle row by row,
    the order of ``numpy.triu_indices(C)``.

    Examples
    --------
    >>> packed_length(100), packed_length(550)
    (5050, 151525)
    """
    return n_features * (n_features + 1) // 2


def features_of_packed_length(length: int, name: str = "packed triangle") -> int:
    """``C`` such that ``C·(C+1)/2 == length``; ``ValueError`` if ``length`` is not such a number.

    Examples
    --------
    >>> features_of_packed_length(5050)
    100
    >>> features_of_packed_length(5051)
    Traceback (most recent call last):
    ...
    ValueError: a packed triangle holds C*(C+1)/2 numbers for some C >= 1, got 5051
    """
    length = int(length)
    n_features = (math.isqrt(8 * length + 1) - 1) // 2 if length > 0 else 0
    if n_features < 1 or packed_length(n_features) != length:
        raise ValueError(f"a {name} holds C*(C+1)/2 numbers for some C >= 1, got {length}")
    return n_features


def packed_state_bytes(n_features: int, n_patches: int, dtype: DTypeLike = np.float64) -> int:
    """Bytes held by an accumulator's state: the packed triangles plus the running mean.

    Examples
    --------
    >>> print(f"{packed_state_bytes(550, 4096) / 1e9:.2f} GB")
    4.98 GB
    """
    itemsize = np.dtype(dtype).itemsize
    n_tri = packed_length(n_features)
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
        accurate and, with ``finalise(in_place=True)``, leaner for a float32 result).
    fold_every : int, default 64
        Batches are buffered (copied) until this many observations are waiting, then folded in
        together: one matrix product per patch per fold instead of per batch, which matters
        because a (C×B)·(B×C) product with B ≈ 20 is dominated by per-call BLAS overhead. The
        buffer holds at most ``fold_every + B − 1`` embeddings (0.75 GB at C = 550, 64×64, B = 20
        in float32); ``fold_every=1`` folds every batch at once.
    memory_budget : int, default 64 MiB
        Bound, in bytes, on the work buffers of one fold, ``merge`` or ``finalise`` chunk.

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
    >>> mean, precision = acc.finalise()
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
        self.n_features = check_positive_int(n_features, "n_features")
        self.n_patches = check_positive_int(n_patches, "n_patches")
        acc = check_dtype(dtype)
        self.dtype = acc
        self.memory_budget = check_memory_budget(memory_budget)
        self.fold_every = check_positive_int(fold_every, "fold_every")
        self._pending: list[NDArray[Any]] = []
        self._pending_n = 0
        self._count = 0
        # The running mean is kept as shift + offset: a fixed shift per patch (the first observation folded
        # in) and the mean's offset from it, so that means and their differences round relative to the
        # data's spread, not to their distance from the origin (see anomstats._moment_kernels).
        self._shift: NDArray[Any] = np.zeros((self.n_patches, self.n_features), dtype=acc)
        self._mean: NDArray[Any] = np.zeros((self.n_patches, self.n_features), dtype=acc)  # mean − shift
        self._m2: NDArray[Any] | None = np.zeros((self.n_patches, self.n_tri), dtype=acc)
        # Row and column of every packed entry: the upper triangle, row by row.
        self._upper_rows, self._upper_cols = np.triu_indices(self.n_features)
        # Flat positions, in a C-ordered (C, C) block, of the mirror image of each packed entry in the
        # lower triangle (the triangle LAPACK and BLAS work on, see anomstats._lapack).
        self._lower_flat = self._upper_cols * self.n_features + self._upper_rows

    # ------------------------------------------------------------------ state
    @property
    def n_tri(self) -> int:
        """Numbers stored per patch for the second moments: ``C·(C+1)/2``."""
        return packed_length(self.n_features)

    @property
    def count(self) -> int:
        """Observations accumulated so far (folded or still buffered)."""
        return self._count + self._pending_n

    #: Finalisation (in place for a float32 result) consumes the moments: see :meth:`finalise`.
    spent_by_finalise = True

    @property
    def mean(self) -> NDArray[Any]:
        """Running mean ``(P, C)``, as :attr:`anomstats.RunningMoments.mean` (a copy, accumulation dtype)."""
        self._check_alive()
        self._fold()
        return self._shift + self._mean

    @property
    def nbytes(self) -> int:
        """Bytes of the stored state (packed triangles plus the mean)."""
        return packed_state_bytes(self.n_features, self.n_patches, self.dtype)

    def _check_alive(self) -> None:
        if self._m2 is None:
            raise RuntimeError(
                "this accumulator was finalised with in_place=True, which reused its memory for the "
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
        flat_embedding = x.reshape(n_b, c, p)
        finite = np.isfinite(flat_embedding).all(axis=(0, 1))
        require_finite(bool(finite.all()), "batch", where=f" (first at patch {int(np.argmin(finite))})")
        # Private copies (the caller may reuse its buffer), in the input's own float dtype, a fold's
        # worth at a time: the buffer never holds more than fold_every + one slice of observations.
        for start in range(0, n_b, self.fold_every):
            piece = flat_embedding[start : start + self.fold_every]
            self._pending.append(np.array(piece, dtype=np.result_type(flat_embedding.dtype, np.float32)))
            self._pending_n += len(piece)
            if self._pending_n >= self.fold_every:
                self._fold()
        return self

    def _fold(self) -> None:
        """Fold the buffered batches into the moments as one block of observations."""
        n_b = self._pending_n
        if n_b == 0:
            return
        c, p = self.n_features, self.n_patches
        n_a = self._count
        if not n_a:
            self._shift[...] = self._pending[0][0].T  # the first observation of every patch
        chan = chan_merge_weights(n_a, n_b)
        # The δδᵀ·cross term of Chan's update rides along as one extra row of the centred block, so a
        # single symmetric product gives M2_b plus the correction, and a single gather packs it.
        extra = 1 if n_a else 0
        step = self._patch_chunk(self.dtype.itemsize * ((n_b + 1) * c + self.n_tri + 2 * c))  # rows, packed, means
        rows_buffer = np.empty((min(step, p), n_b + extra, c), dtype=self.dtype)  # reused chunk to chunk
        scratch = np.zeros((c, c), dtype=self.dtype)
        kernels = ScratchKernels(scratch)  # BLAS syrk through C pointers: the GIL is released
        for start in range(0, p, step):
            stop = min(start + step, p)
            rows = rows_buffer[: stop - start]
            offset = 0
            shift = self._shift[start:stop]
            for piece in self._pending:  # (B_i, C, P) → (patches, B_i, C), shifted: the library's patch-major gather
                gather(piece.transpose(2, 0, 1)[start:stop], rows[:, offset : offset + len(piece)], shift)
                offset += len(piece)
            mean_b = rows[:, :n_b].mean(axis=1)
            rows[:, :n_b] -= mean_b[:, None, :]
            if n_a:
                delta = mean_b - self._mean[start:stop]
                rows[:, n_b] = math.sqrt(chan.cross) * delta
            packed = np.empty((stop - start, self.n_tri), dtype=self.dtype)
            for k in range(stop - start):
                kernels.syrk(1.0, rows[k])  # lower triangle of the C-ordered scratch: rowsᵀ·rows
                packed[k] = scratch.reshape(-1)[self._lower_flat]
            if n_a:
                self._m2[start:stop] += packed
                self._mean[start:stop] += delta * chan.mean_step
            else:
                self._m2[start:stop] = packed
                self._mean[start:stop] = mean_b
        self._count = n_a + n_b
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
            self._shift[...] = other._shift
            self._mean[...] = other._mean
            self._count = n_b
            return self
        upper_rows, upper_cols = self._upper_rows, self._upper_cols
        chan = chan_merge_weights(n_a, n_b)
        step = self._patch_chunk(self.dtype.itemsize * (3 * self.n_tri + 2 * self.n_features))
        for start in range(0, self.n_patches, step):
            stop = min(start + step, self.n_patches)
            # Exact when the shifts are close (Sterbenz); the offsets are numbers of the data's spread.
            delta = (other._shift[start:stop] - self._shift[start:stop]) + other._mean[start:stop]
            delta -= self._mean[start:stop]
            outer = np.multiply(delta[:, upper_rows], delta[:, upper_cols])
            outer *= chan.cross
            outer += other._m2[start:stop]
            self._m2[start:stop] += outer
            self._mean[start:stop] += delta * chan.mean_step
        self._count = n_a + n_b
        return self

    # ------------------------------------------------------------------ result
    def finalise(
        self,
        ridge: float = DEFAULT_RIDGE,
        out_dtype: DTypeLike = np.float32,
        *,
        in_place: bool = False,
        return_log_det: bool = False,
        spatial: tuple[int, ...] | None = None,
    ) -> tuple[NDArray[Any], ...]:
        """Return ``(mean (C, P), precision (P, C, C))`` of the regularised per-patch Gaussians.

        The covariance of each patch is ``M2 / (n − 1) + ridge·I``; its precision comes from the
        Cholesky factor (LAPACK ``potrf`` then ``potri`` in the accumulation dtype, through the library's
        one factor/log-det/invert routine, :class:`anomstats._patch_kernels.PatchFinisher`), symmetrised,
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
            Cholesky factor's diagonal (``2·Σ log Lᵢᵢ``) before it is inverted: then the result is
            ``(mean, precision, log_det)``.
        spatial : tuple of int, optional
            The spatial grid of the patches, for error messages (default: one flat axis).

        Raises
        ------
        ValueError
            Fewer than two observations, a bad ridge, or ``in_place`` with other dtypes.
        numpy.linalg.LinAlgError
            A regularised covariance is not positive definite (names the patch).
        """
        self._check_alive()
        out = check_dtype(out_dtype, "out_dtype")
        ridge = check_ridge(ridge)
        self._fold()
        require_observations(
            self._count, name="this accumulator", where="; update with more embeddings before finalise"
        )
        c, p = self.n_features, self.n_patches
        if in_place and not (self.dtype == np.float64 and out == np.float32):
            raise ValueError(
                "in_place=True needs float64 accumulation and out_dtype=float32 (only then does the "
                f"precision fit in the moments' memory); got dtype={self.dtype}, out_dtype={out}"
            )
        mean = (self._shift + self._mean).T.astype(out)
        if in_place:
            # The float32 (C, C) block of patch i ends at byte (i+1)·C²·4 ≤ (i+1)·C(C+1)/2·8, where
            # patch i's packed moments end: writing a chunk only overwrites moments already read.
            precision = self._m2.reshape(-1).view(np.float32)[: p * c * c].reshape(p, c, c)
        else:
            precision = np.empty((p, c, c), dtype=out)
        outputs = PatchOutputs(
            precision=precision, log_det=np.empty(p, dtype=np.float64), shrinkage=np.zeros(p, dtype=np.float64)
        )
        settings = PatchFitSettings(ridge, None, self._count, spatial if spatial is not None else (p,))
        try:
            self._finalise_patches(outputs, settings, 1.0 / covariance_normalisation(self._count, None, 1))
        except (ValueError, np.linalg.LinAlgError) as error:
            if not in_place:
                raise
            self._m2 = None  # part of the moments is already overwritten: refuse further use
            raise type(error)(f"{error} (in_place=True: this accumulator's moments are partly overwritten)") from error
        if in_place:
            self._m2 = None
            self._mean = self._shift = np.empty((0, 0), dtype=self.dtype)
        if return_log_det:
            return mean, precision, outputs.log_det
        return mean, precision

    def finalise_patches(
        self, settings: PatchFitSettings, dtype: np.dtype, memory_budget: int, workers: int
    ) -> tuple[NDArray[Any], PatchOutputs]:
        """:meth:`finalise` for :class:`anomstats.MultiVariateGaussian` (the streaming interface).

        A float32 result is written in place over the moments (the leanest peak), which spends them;
        a float64 result is a new stack. ``memory_budget`` and ``workers`` are the accumulator's own
        (finalisation runs in one thread). Returns ``(mean (C, P), outputs)``.
        """
        mean, precision, log_det = self.finalise(
            settings.ridge, out_dtype=dtype, in_place=dtype == np.float32, return_log_det=True,
            spatial=settings.spatial,
        )
        p = self.n_patches
        return mean, PatchOutputs(precision=precision, log_det=log_det, shrinkage=np.zeros(p, dtype=np.float64))

    def _finalise_patches(self, outputs: PatchOutputs, settings: PatchFitSettings, scale: float) -> None:
        """Scale, regularise, factor and invert every patch's moments into ``outputs``, chunk by chunk."""
        c, p = self.n_features, self.n_patches
        finisher = PatchFinisher(outputs, settings, c, self.dtype)
        lower = finisher.t.reshape(-1)
        step = self._patch_chunk(self.dtype.itemsize * self.n_tri)
        for start in range(0, p, step):
            stop = min(start + step, p)
            packed = np.array(self._m2[start:stop])  # private copy: the output may overwrite it
            packed *= scale
            for k in range(stop - start):
                lower[self._lower_flat] = packed[k]  # the lower triangle; the strict upper one stays zero
                finisher.finish(start + k)
