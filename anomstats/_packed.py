"""The packed streaming accumulator of PaDiM's per-patch Gaussians: :class:`PackedGaussianAccumulator`.

PaDiM at its largest (wide_resnet50_2 at 256 px: C = 550 channels, 64×64 = 4096 patches) needs one
C×C covariance per patch. anomalib keeps every training embedding and about three ``(P, C, C)``
float32 stacks alive at once (35–50 GB reported). This accumulator, the streaming state of
:class:`anomstats.MultiVariateGaussian` for ``shrinkage=None`` and ``"oas"``, keeps only what the
estimator needs, and nothing twice:

* the running mean, ``(P, C)``, as a fixed shift per patch plus the mean's offset from it;
* one *triangle* of each patch's centred second moments ``Σ (x − μ)(x − μ)ᵀ``, in ``C·(C+1)/2``
  numbers per patch, ``(P, C·(C+1)/2)``: half of a full ``(P, C, C)`` stack (4.98 GB at C = 550,
  P = 4096, against 9.9 GB).

Batches are merged in with Chan et al.'s pairwise update (mean difference times the count
product over the total), so data far from the origin keeps its digits.

Storage: LAPACK's rectangular full packed format
------------------------------------------------
Each patch's triangle is kept in LAPACK's *rectangular full packed* (RFP) format (``TRANSR='N'``,
``UPLO='U'``): the triangle cut in two blocks laid side by side as one ``C·(C+1)/2``-number rectangle,
on which the level-3 routines work directly. A fold is one ``xSFRK`` (symmetric rank-K update in RFP,
two ``syrk`` and one ``gemm`` inside) per patch, straight into the stored moments: no C×C scratch, no
packing pass. Finalisation unpacks a patch with ``xTFTTR`` (a copy) into the C×C matrix of
:class:`anomstats._patch_kernels.PatchFinisher`. The routines are called through the C pointers scipy
exports, which releases the GIL (:class:`RfpKernels`). This private storage is unrelated to the packed
layout of the torch adapter's precision (:func:`packed_length`: the upper triangle row by row).

Batches are buffered (as private copies) until ``fold_every`` observations wait, then folded in
together: the rank-K updates then have K ≈ 64 rather than ≈ 20, so fewer passes over the stored
moments and fewer BLAS calls, each less dominated by its fixed cost. Folds, merges and finalisation run
over chunks of patches on the library's thread pool (:func:`anomstats._parallel.run_chunks`, BLAS held
to one thread per call, every LAPACK call without the GIL), with work buffers under ``memory_budget``.

Why float64 accumulation (the default), deliberately
----------------------------------------------------
Accumulating in float64 is both the more accurate and, for a float32 result, the *leaner* choice:
a packed float64 triangle takes ``C·(C+1)/2·8 = C·(C+1)·4`` bytes per patch, which is just more than
the ``C·C·4`` bytes of that patch's full float32 precision. So ``finalise(in_place=True)`` writes the
float32 precision over the packed moments, patch chunk by patch chunk (each chunk is copied out,
unpacked, regularised, factored with LAPACK ``dpotrf``, inverted from its factor with ``dpotri``,
symmetrised and written back as float32 into memory whose moments were already consumed; a chunk
waits until the chunks before it have copied their moments out). The peak of the whole fit is then one
packed float64 stack plus buffers: 4.98 GB at C = 550, P = 4096 (anomalib: ≈ 2.7 GB of embeddings plus
≈ 3 × 4.96 GB stacks). float32 accumulation would need 2.5 GB of moments *plus* a separate 4.96 GB
output, and is over a thousand times less accurate (below). Without ``in_place`` the moments are only
read, so streaming can go on after the result has been looked at.

Accuracy (measured, C = 550, 2×2 patches, 300 images, against a float64 one-shot ``numpy.cov`` +
ridge + ``numpy.linalg.inv`` per patch; relative max error of the float32 precision): float64
accumulation 3.3e-8, i.e. the correctly rounded float64 result (float64 output: 8e-15 at C = 64); float32
accumulation 9.1e-5; anomalib's float32 algorithm 9.6e-5, with an asymmetry of 7.4e-5 (ours is
exactly symmetric).
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from ._budget import DEFAULT_MEMORY_BUDGET
from ._lapack import RfpKernels
from ._moment_kernels import gather
from ._parallel import resolve_workers, run_chunks
from ._patch_kernels import (
    FIT_CHUNK_PATCHES,
    PatchFinisher,
    PatchFitSettings,
    PatchOutputs,
    plan_patch_chunks,
    unrepresentable_error,
)
from ._rules import DEFAULT_RIDGE, chan_merge_weights, covariance_normalisation
from ._validation import (
    check_dtype,
    check_memory_budget,
    check_positive_int,
    check_ridge,
    describe_patch,
    require_finite,
    require_observations,
)

__all__ = [
    "PackedGaussianAccumulator",
    "RfpKernels",
    "in_place_dependencies",
    "packed_state_bytes",
    "packed_length",
    "features_of_packed_length",
]


def packed_length(n_features: int) -> int:
    """Numbers in one packed triangle of a ``C×C`` symmetric matrix: ``C·(C+1)/2``.

    The packed layout of the torch adapter's precision and compact checkpoints is the upper triangle row
    by row, the order of ``numpy.triu_indices(C)``. (:class:`PackedGaussianAccumulator` keeps the same
    number of values per patch, in LAPACK's RFP order.)

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


# ---------------------------------------------------------------------------- RFP kernels
class _WideFinisher(PatchFinisher):
    """A :class:`PatchFinisher` working in the accumulation dtype (float64) for outputs of a narrower dtype.

    It names the outputs' dtype in its remedies, and refuses a kept covariance that dtype cannot hold
    (the float64 work would round it to infinity silently).
    """

    def __init__(self, outputs: PatchOutputs, settings: PatchFitSettings, n_features: int, work: np.dtype) -> None:
        super().__init__(outputs, settings, n_features, work)
        narrower = outputs.covariance is not None and outputs.covariance.dtype.itemsize < np.dtype(work).itemsize
        self._covariance_limit = float(np.finfo(outputs.covariance.dtype).max) if narrower else None

    def finish(self, patch: int, sum_fourth_powers: float | None = None, **kwargs: Any) -> None:
        """:meth:`PatchFinisher.finish`, after checking that a kept covariance fits its dtype.

        A covariance's entries are at most its largest diagonal entry (it is positive semi-definite), and
        shrinkage and the ridge cannot raise that beyond the largest variance plus the ridge.
        """
        if self._covariance_limit is not None:
            largest = float(np.diagonal(self.t).max()) + self.settings.ridge
            if math.isfinite(largest) and largest > self._covariance_limit:
                where = describe_patch(patch, self.settings.spatial)
                assert self.outputs.covariance is not None
                raise unrepresentable_error(where, self.outputs.covariance.dtype, "covariance", math.sqrt(largest),
                                            self._remedy())
        super().finish(patch, sum_fourth_powers, **kwargs)


def in_place_dependencies(chunks: list[tuple[int, int]], n_features: int, itemsize: int = 8) -> list[int]:
    """For each chunk of patches, the first chunk whose packed moments its in-place float32 precision overwrites.

    Patch ``i``'s packed moments take bytes ``[i·T·s, (i+1)·T·s)`` (``T = C·(C+1)/2`` numbers of ``itemsize``
    ``s``), its float32 precision ``[i·C²·4, (i+1)·C²·4)``, which starts no later: the precision of a chunk
    overwrites moments of its own patches and of patches before it, from the one holding its first byte on.
    Those chunks must have copied their moments out before it writes. ``chunks`` are ``(start, stop)`` ranges
    in order.

    Examples
    --------
    >>> in_place_dependencies([(0, 2), (2, 4), (4, 6)], n_features=3)   # 36 bytes out, 48 in, per patch
    [0, 0, 1]
    """
    starts = [start for start, _ in chunks]
    n_tri = packed_length(n_features)
    first_patch = [start * n_features**2 * 4 // (n_tri * itemsize) for start in starts]
    return [bisect.bisect_right(starts, patch) - 1 for patch in first_patch]


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
        together: one rank-K update per patch per fold instead of per batch, which matters because a
        (C×B)·(B×C) product with B ≈ 20 is dominated by per-call BLAS overhead, and every fold reads
        and writes all the stored moments. The buffer holds at most ``fold_every + B − 1`` embeddings
        (0.75 GB at C = 550, 64×64, B = 20 in float32); ``fold_every=1`` folds every batch at once.
    memory_budget : int, default 64 MiB
        Bound on the work buffers of a fold, merge or finalisation, all threads together (at least
        one patch's worth).
    workers : int or None, default None
        Worker threads (None: the usable cores, at most 8), as :class:`anomstats.MultiVariateGaussian`.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> acc = PackedGaussianAccumulator(n_features=3, n_patches=4)
    >>> for _ in range(5):
    ...     _ = acc.update(rng.normal(size=(8, 3, 2, 2)).astype(np.float32))
    >>> mean, precision = acc.finalise()
    >>> mean.shape, precision.shape, precision.dtype
    ((3, 4), (4, 3, 3), dtype('float32'))
    >>> bool(np.array_equal(precision, precision.transpose(0, 2, 1)))
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
        workers: int | None = None,
    ) -> None:
        self.n_features = check_positive_int(n_features, "n_features")
        self.n_patches = check_positive_int(n_patches, "n_patches")
        acc = check_dtype(dtype)
        self.dtype = acc
        self.memory_budget = check_memory_budget(memory_budget)
        self.fold_every = check_positive_int(fold_every, "fold_every")
        self.workers = resolve_workers(workers)
        self._pending: list[NDArray[Any]] = []
        self._pending_n = 0
        self._count = 0
        # The running mean is kept as shift + offset: a fixed shift per patch (the first observation folded
        # in) and the mean's offset from it, so that means and their differences round relative to the
        # data's spread, not to their distance from the origin (see anomstats._moment_kernels).
        self._shift: NDArray[Any] = np.zeros((self.n_patches, self.n_features), dtype=acc)
        self._mean: NDArray[Any] = np.zeros((self.n_patches, self.n_features), dtype=acc)  # mean − shift
        # Zeros from the allocator are mapped lazily: the memory becomes resident as the first fold writes it.
        self._m2: NDArray[Any] | None = np.zeros((self.n_patches, self.n_tri), dtype=acc)  # RFP triangles

    # ------------------------------------------------------------------ state
    @property
    def n_tri(self) -> int:
        """Numbers stored per patch for the second moments: ``C·(C+1)/2``."""
        return packed_length(self.n_features)

    @property
    def count(self) -> int:
        """Observations accumulated so far (folded or still buffered)."""
        return self._count + self._pending_n

    @property
    def spent(self) -> bool:
        """True once a finalisation spent the moments (``in_place=True``, or ``spend=True``)."""
        return self._m2 is None

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

    def _chunks(
        self, bytes_per_patch: int, memory_budget: int | None = None, workers: int | None = None
    ) -> list[tuple[int, int]]:
        """Chunks of patches for the work of one fold, merge or finalisation (:func:`plan_patch_chunks`)."""
        budget = self.memory_budget if memory_budget is None else memory_budget
        return plan_patch_chunks(self.n_patches, bytes_per_patch, budget, workers or self.workers, FIT_CHUNK_PATCHES)

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
        """Fold the buffered batches into the moments as one block of observations, chunks of patches in parallel."""
        n_b = self._pending_n
        if n_b == 0:
            return
        n_a = self._count
        if not n_a:
            self._shift[...] = self._pending[0][0].T  # the first observation of every patch
        rows = n_b + (1 if n_a else 0)
        local = threading.local()
        run_chunks(
            lambda chunk: self._fold_chunk(*chunk, n_a, n_b, local),
            self._chunks(self.dtype.itemsize * rows * self.n_features),
            self.workers,
        )
        self._count = n_a + n_b
        self._pending, self._pending_n = [], 0

    def _fold_chunk(self, start: int, stop: int, n_a: int, n_b: int, local: threading.local) -> None:
        """Fold the buffered observations of patches ``start:stop`` (one worker's share of :meth:`_fold`)."""
        c = self.n_features
        extra = 1 if n_a else 0
        size = (stop - start) * (n_b + extra) * c
        buffer = getattr(local, "rows", None)
        if buffer is None or buffer.size < size:  # one buffer per thread, reused chunk to chunk
            buffer = local.rows = np.empty(size, dtype=self.dtype)
        rows = buffer[:size].reshape(stop - start, n_b + extra, c)
        shift = self._shift[start:stop]
        offset = 0
        for piece in self._pending:  # (B_i, C, P) → (patches, B_i, C), shifted: the library's patch-major gather
            gather(piece.transpose(2, 0, 1)[start:stop], rows[:, offset : offset + len(piece)], shift)
            offset += len(piece)
        mean_b = rows[:, :n_b].mean(axis=1)
        rows[:, :n_b] -= mean_b[:, None, :]
        if n_a:
            # The δδᵀ·cross term of Chan's update rides along as one extra row of the centred block, so a
            # single rank-K update per patch adds M2_b plus the correction.
            chan = chan_merge_weights(n_a, n_b)
            delta = mean_b - self._mean[start:stop]
            rows[:, n_b] = math.sqrt(chan.cross) * delta
            self._mean[start:stop] += delta * chan.mean_step
        else:
            self._mean[start:stop] = mean_b
        kernels = RfpKernels(c, self.dtype)
        beta = 1.0 if n_a else 0.0
        for k in range(stop - start):
            kernels.rank_update(rows[k], self._m2[start + k], 1.0, beta)  # the GIL is released inside

    def merge(self, other: PackedGaussianAccumulator) -> PackedGaussianAccumulator:
        """Fold another accumulator (same sizes and dtype) into this one; ``other`` is unchanged.

        Merging an accumulator into itself counts its observations twice.
        """
        self._check_alive()
        if not isinstance(other, PackedGaussianAccumulator):
            raise TypeError(f"other must be a PackedGaussianAccumulator, got {type(other).__name__}")
        other._check_alive()
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
        chan = chan_merge_weights(n_a, n_b)

        def run(chunk: tuple[int, int]) -> None:
            start, stop = chunk
            # Exact when the shifts are close (Sterbenz); the offsets are numbers of the data's spread.
            delta = (other._shift[start:stop] - self._shift[start:stop]) + other._mean[start:stop]
            delta -= self._mean[start:stop]
            np.add(self._m2[start:stop], other._m2[start:stop], out=self._m2[start:stop])
            kernels = RfpKernels(self.n_features, self.dtype)
            for k in range(stop - start):
                kernels.rank_update(delta[k : k + 1], self._m2[start + k], chan.cross, 1.0)
            self._mean[start:stop] += delta * chan.mean_step

        run_chunks(run, self._chunks(self.dtype.itemsize * 2 * self.n_features), self.workers)
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
        and is cast to ``out_dtype`` (float32 by default, as anomalib stores it). The moments are only
        read (the accumulator can go on streaming), unless ``in_place``.

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
        if in_place and not (self.dtype == np.float64 and out == np.float32):
            raise ValueError(
                "in_place=True needs float64 accumulation and out_dtype=float32 (only then does the "
                f"precision fit in the moments' memory); got dtype={self.dtype}, out_dtype={out}"
            )
        self._fold()
        require_observations(
            self._count, name="this accumulator", where="; update with more embeddings before finalise"
        )
        settings = PatchFitSettings(ridge, None, self._count, spatial if spatial is not None else (self.n_patches,))
        mean, outputs = self.finalise_patches(settings, out, self.memory_budget, self.workers, spend=in_place)
        if return_log_det:
            return mean, outputs.precision, outputs.log_det
        return mean, outputs.precision

    def finalise_patches(
        self, settings: PatchFitSettings, dtype: np.dtype, memory_budget: int, workers: int, *, spend: bool = False
    ) -> tuple[NDArray[Any], PatchOutputs]:
        """The fitted ``(mean (C, P), outputs)`` in ``dtype`` (the streaming interface of the model).

        ``settings`` carry the ridge, the estimator (``None`` or ``"oas"``: the packed moments hold no
        fourth moments), whether to keep the covariance and its factor, and the names of the patches.
        ``spend=True`` ends the stream: a float32 precision from float64 moments is written over them in
        place (the leanest peak), and the moments are freed either way, also when a patch fails after
        part of them was overwritten (``in_place``); otherwise they are only read.
        """
        self._check_alive()
        if settings.shrinkage not in (None, "oas"):
            raise ValueError(f"the packed moments hold no fourth moments: shrinkage={settings.shrinkage!r} needs "
                             "the dense accumulator")
        self._fold()
        require_observations(self._count, name="this accumulator", where="; update with more embeddings first")
        c, p = self.n_features, self.n_patches
        in_place = spend and self.dtype == np.float64 and np.dtype(dtype) == np.float32
        mean = (self._shift + self._mean).T.astype(dtype)
        if in_place:
            # The float32 (C, C) block of patch i ends at byte (i+1)·C²·4 ≤ (i+1)·C(C+1)/2·8, where
            # patch i's packed moments end: writing a patch only overwrites moments already copied out.
            precision = self._m2.reshape(-1).view(np.float32)[: p * c * c].reshape(p, c, c)
            keep = settings.keep_covariance
            outputs = PatchOutputs(
                precision=precision, log_det=np.empty(p, dtype=np.float64), shrinkage=np.zeros(p, dtype=np.float64),
                covariance=np.empty((p, c, c), dtype=dtype) if keep else None,
                cholesky=np.empty((p, c, c), dtype=dtype) if keep else None,
            )
        else:
            outputs = PatchOutputs.allocate(p, c, np.dtype(dtype), keep_covariance=settings.keep_covariance)
        try:
            self._finish_all(outputs, settings, memory_budget, workers, in_place)
        except (ValueError, np.linalg.LinAlgError) as error:
            if not in_place:
                raise
            self._release()  # part of the moments is already overwritten: refuse further use
            raise type(error)(f"{error} (in_place=True: this accumulator's moments are partly overwritten)") from error
        if spend:
            self._release()
        return mean, outputs

    def _release(self) -> None:
        """Forget the moments (spent): the accumulator refuses further use."""
        self._m2 = None
        self._mean = self._shift = np.empty((0, 0), dtype=self.dtype)

    def _finish_all(
        self, outputs: PatchOutputs, settings: PatchFitSettings, memory_budget: int, workers: int, in_place: bool
    ) -> None:
        """Scale, regularise, factor and invert every patch's moments into ``outputs``, chunks of patches in parallel.

        In place, each chunk first copies its moments out (under ``memory_budget``); a chunk's precision
        overwrites only moments of patches up to its own (the last ``start/(C+1)`` patches before it), so it
        waits until the chunks holding those have copied their moments out (chunks start in order, and a
        copy waits for nothing: no deadlock).
        """
        scale = 1.0 / covariance_normalisation(self._count, None, settings.ddof)
        chunks = self._chunks(self.dtype.itemsize * self.n_tri, memory_budget, workers)
        order = {chunk: i for i, chunk in enumerate(chunks)}
        first_overwritten = in_place_dependencies(chunks, self.n_features, self.dtype.itemsize) if in_place else []
        copied, progress = [False] * len(chunks), threading.Condition()
        local = threading.local()

        def copy_out(chunk: tuple[int, int]) -> NDArray[Any]:
            """In place: copy this chunk's moments out, then wait for the earlier chunks whose moments its
            precision overwrites (those holding the patches from the one at its first output byte on)."""
            start, stop = chunk
            try:
                size = (stop - start) * self.n_tri
                buffer = getattr(local, "moments", None)
                if buffer is None or buffer.size < size:
                    buffer = local.moments = np.empty(size, dtype=self.dtype)
                source = buffer[:size].reshape(stop - start, self.n_tri)
                np.copyto(source, self._m2[start:stop])
            finally:
                with progress:
                    copied[order[chunk]] = True
                    progress.notify_all()
            first = first_overwritten[order[chunk]]
            with progress:
                progress.wait_for(lambda: all(copied[first : order[chunk]]))
            return source

        def run(chunk: tuple[int, int]) -> None:
            start, stop = chunk
            source = copy_out(chunk) if in_place else self._m2[start:stop]
            finisher = getattr(local, "finisher", None)
            if finisher is None:
                finisher = local.finisher = _WideFinisher(outputs, settings, self.n_features, self.dtype)
                local.kernels = RfpKernels(self.n_features, self.dtype)
            for k in range(stop - start):
                local.kernels.unpack(source[k], finisher.t)  # the lower triangle; the strict upper one stays zero
                finisher.t *= scale
                finisher.finish(start + k)

        run_chunks(run, chunks, workers)
