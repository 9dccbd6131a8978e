"""Per-patch multivariate Gaussians as PaDiM uses them: batched, streaming, memory-bounded and stable.

:class:`MultiVariateGaussian` fits one C-dimensional Gaussian per spatial position ("patch") of an
embedding ``(N, C, *spatial)`` and scores new embeddings by Mahalanobis distance or log-density.
The shape checks it uses live in :mod:`anomstats._validation` and work on plain shapes, so the PyTorch
adapter raises the very same messages.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from . import _dask
from ._budget import DEFAULT_MEMORY_BUDGET
from ._packed import PackedGaussianAccumulator
from ._parallel import resolve_workers, run_chunks
from ._patch_kernels import (
    FIT_CHUNK_PATCHES,
    PatchFitSettings,
    PatchOutputs,
    ThreadScratch,
    check_query_results,
    dense_quadratic,
    far_distances,
    fit_chunk,
    non_finite_fit_error,
    plan_patch_chunks,
    scale_remedy,
    score_chunk,
    stack_patches,
)
from ._rules import DEFAULT_RIDGE, gaussian_log_normaliser
from ._validation import (
    SHRINKAGE_METHODS,
    check_bool,
    DTypeError,
    NotFittedError,
    check_dtype,
    check_fit_shape,
    check_memory_budget,
    check_ridge,
    check_score_shape,
    check_shrinkage,
    describe_patch,
    require_finite,
    require_observations,
    warn_at_caller,
)
from ._patch_moments import DensePatchMoments, PatchMoments
from ._moment_kernels import gather
from ._low_rank import (
    LowRankMoments,
    basis_of_factor,
    check_definite,
    check_form,
    check_representable,
    dense_from_low_rank,
    eigenvalues_of,
    factor_chunk,
    low_rank_width,
    needs_ridge_message,
    no_advantage_message,
    precision_diagonal,
    squared_distances,
)

__all__ = ["DEFAULT_RIDGE", "DEFAULT_MEMORY_BUDGET", "SHRINKAGE_METHODS", "MultiVariateGaussian", "NotFittedError"]


def _check_real_dtype(dtype: np.dtype, name: str) -> None:
    """The dtype check of every method taking embeddings (also run on a dask array's dtype, before computing)."""
    if np.dtype(dtype).kind not in "biuf":
        raise DTypeError(f"{name} must hold real numbers (bool, integer or floating), got dtype {np.dtype(dtype)}")


def _as_real_array(data: ArrayLike, name: str) -> NDArray:
    array = np.asarray(data)
    _check_real_dtype(array.dtype, name)
    return array


class MultiVariateGaussian:
    """One multivariate Gaussian per patch of an embedding ``(N, C, *spatial)``, as PaDiM fits them.

    Parameters
    ----------
    ridge : float, default ``DEFAULT_RIDGE`` (= 0.01 + 1e-5)
        Added to every covariance diagonal, after the estimator (and after shrinkage, when there is
        one). The default is anomalib 2.x's effective regularisation (0.01·I, then 1e-5·I more). It is
        added on top of the shrinkage estimators too: pass ``ridge=0`` to get exactly scikit-learn's
        ``LedoitWolf`` / ``OAS`` covariances.
    shrinkage : {None, "ledoit-wolf", "oas"}, default None
        ``None``: the unbiased sample covariance (divide by N - 1), anomalib's estimator.
        ``"ledoit-wolf"`` / ``"oas"``: scikit-learn's shrinkage estimators, patch by patch. Like
        scikit-learn, these start from the *biased* maximum-likelihood covariance (divide by N) and shrink
        it towards ``trace / C · I``; the fitted coefficients are in :attr:`shrinkage_`.
    dtype : {float64, float32}, default float64
        Working and storage dtype of the fitted quantities. float32 input is accumulated in float64 by
        default; float32 halves the memory of the fitted stacks (about 1e-6 relative accuracy).
    store_covariance : bool, default False
        Also keep the regularised covariance and its Cholesky factor (two more ``(P, C, C)`` stacks, three
        times the memory of the default). By default only what scoring needs is kept: the mean, the
        precision and the log-determinants.
    memory_budget : int, default 64 MiB
        Bound, in bytes, on the work buffers of a fit or a scoring call, all threads together (at least
        one patch's worth: N·C values for a fit, 2·M·C for scoring).
    workers : int or None, default None
        Worker threads for fitting and scoring (None: the usable cores, at most 8). BLAS is held to one
        thread meanwhile (process-wide, through threadpoolctl; without it the work runs serially).
    form : {"dense", "low_rank"}, keyword-only, default "dense"
        ``"low_rank"``: the exact low-rank form for fewer observations than features (PaDiM with
        wide_resnet50, C = 550, and a few hundred images), stored as a basis ``(P, C, r)`` and eigenvalues
        ``(P, r)``, ``r = min(N - 1, C)``, instead of ``(P, C, C)`` stacks; see
        :class:`LowRankMultiVariateGaussian`. The constructor then returns that subclass.
    low_memory : bool, default False
        End the stream when the fit is first used (or :meth:`finalise` is called): as
        ``finalise(end_stream=True)``, that spends the streamed moments (no :meth:`partial_fit` or
        :meth:`merge` after it), and with ``dtype=float32`` writes the precision over them in place, the
        leanest streamed fit (see *Streaming* below). The fit keeps only the mean, precision and
        log-determinants (``store_covariance`` is ignored: :attr:`covariance` and :attr:`cholesky` are not
        available). Not with ``shrinkage="ledoit-wolf"``, whose moments are not packed. The default
        streams into the same packed moments: ``low_memory`` only decides when they are spent.

    Attributes
    ----------
    mean : ndarray, shape (C, P)
        Per-patch means, in anomalib's layout (P = prod(spatial)).
    covariance : ndarray, shape (P, C, C)
        Regularised covariances, exactly symmetric (only with ``store_covariance=True`` and
        ``low_memory=False``).
    cholesky : ndarray, shape (P, C, C)
        Lower Cholesky factors L of :attr:`covariance` (L Lᵀ = covariance), zero above the diagonal
        (only with ``store_covariance=True`` and ``low_memory=False``).
    precision : ndarray, shape (P, C, C)
        Inverse covariances, computed from the Cholesky factor (LAPACK ``potri``), exactly symmetric.
        This is anomalib's ``inv_covariance`` (also available under that name).
    log_det : ndarray, shape (P,)
        ``log det(covariance)`` per patch, from the factor's diagonal.
    shrinkage_ : ndarray, shape (P,)
        Fitted shrinkage coefficients (zeros without shrinkage).
    n_samples_seen_ : int
        Observations seen (N of a fit, or the total over :meth:`partial_fit` calls and merges).

    Notes
    -----
    **Algorithm.** A fit works through chunks of patches: each chunk of the embedding is copied once into
    the working dtype (patch-major), centred, and for each patch the covariance is formed with a
    symmetric rank-k update (BLAS ``syrk``), regularised, factored (LAPACK ``potrf``) and inverted from
    the factor (``potri``), straight into the output stacks. Chunks run in a small thread pool. The
    precision is never an explicit inverse of an unfactored matrix, and is exactly symmetric.

    **Memory.** A fit holds the caller's embedding (a non-contiguous embedding whose spatial axes cannot
    be flattened without a copy is copied once), the fitted state, and work buffers bounded by
    ``memory_budget``. Fitted state in float64 (one ``(P, C, C)`` stack is ``8·P·C²`` bytes; the
    default keeps one, the precision; ``store_covariance=True`` three; float32 halves every figure):

    ==========  ======  ============================  =======================
    C           grid    default (one stack)           store_covariance=True
    ==========  ======  ============================  =======================
    100         56×56   0.23 GiB                      0.70 GiB
    100         64×64   0.31 GiB                      0.92 GiB
    550         56×56   7.07 GiB                      21.2 GiB
    550         64×64   9.23 GiB                      27.7 GiB
    ==========  ======  ============================  =======================

    so the peak of a fit is the embedding + the column above + ``memory_budget`` (64 MiB) + a few
    ``C×C`` scratch matrices per thread. anomalib's float32 fit holds about three float32 stacks.
    (Earlier releases kept all three stacks by default; the covariance and its factor are now opt-in,
    since scoring never reads them and their fresh memory made the first fit in a process slow.)

    **Streaming** (:meth:`partial_fit`, :meth:`merge`). The running moments are kept in float64 whatever
    ``dtype``: for ``shrinkage=None`` and ``"oas"`` one packed triangle per patch, ``P·C·(C+1)/2·8`` bytes,
    half a float64 stack (:class:`anomstats._packed.PackedGaussianAccumulator`); for Ledoit-Wolf the full
    ``(P, C+1, C+1)`` sums (its coefficient needs fourth moments). Batches are buffered (private copies, at
    most ``64 + B - 1`` observations) and folded in with Chan et al.'s pairwise update, chunks of patches
    on the worker threads. The fit is computed at the first use of a fitted quantity after an update (or
    by :meth:`finalise`), chunk by chunk in float64 (unpack, shrink, add the ridge, ``dpotrf``,
    log-determinant, ``dpotri``, symmetrise), and a float32 result is rounded once, so a float32 stream is
    *more* accurate than a one-shot float32 fit. Reading keeps the moments: streaming may go on, and the
    next read refits (the previous fit's stacks are dropped first, so they are not held twice). Ending the
    stream frees them: ``finalise(end_stream=True)`` when done, or ``low_memory=True`` to end it at the
    first read. Ending it with ``dtype=float32`` writes the precision *in place* over the packed float64
    moments already read (it fits in the same bytes). Held at PaDiM's largest fit, C = 550, 64×64 patches
    (any number of images; plus at most 0.75 GB of buffered batches of 20 while streaming):

    ===============================  ======================  ==================  ==============
    mode                             dtype=float64           dtype=float32       stream goes on
    ===============================  ======================  ==================  ==============
    default (moments + fit)          4.98 + 9.9 GB           4.98 + 4.96 GB      yes
    ``store_covariance=True``        4.98 + 29.7 GB          4.98 + 14.9 GB      yes
    ended (``end_stream=True``)      4.98 + 9.9, then 9.9    4.98 GB, in place   no
    ``shrinkage="ledoit-wolf"``      9.95 + 9.9 GB           9.95 + 4.96 GB      yes
    ===============================  ======================  ==================  ==============

    ("ended" is ``finalise(end_stream=True)`` or ``low_memory=True``; anomalib: 35-50 GB reported.) The
    dense streaming state of earlier releases was a full float64 stack, 9.9 GB at that size, plus the
    output stacks.

    **Streaming Ledoit-Wolf.** Its coefficient needs ``sum ||x - mean||⁴``; streaming gets it from the
    moments of the augmented vector ``(||x - s||², x - s)`` about the stream's fixed shift ``s`` (the first
    batch's mean), which costs relative accuracy in the coefficient of about ``eps·||mean - s||²/trace(S)``:
    the square of how far the later batches' mean moves from the first batch's, in units of the spread, and
    not the data's distance from the origin (at an offset of 1e8 σ the stream still meets the one-shot fit to
    1e-12 relative, see :doc:`/guarantees`). The one-shot fit has no such term.

    **Differences from anomalib's MultiVariateGaussian** (deliberate): float64 by default (anomalib:
    float32, and float64 input silently becomes float32); one observation raises instead of giving NaN;
    the precision comes from the Cholesky factor and is exactly symmetric (anomalib: ``torch.linalg.inv``,
    not symmetric); non-finite input raises; a covariance that is singular in exact arithmetic (e.g. a
    duplicated feature with ``ridge=0``) raises even when rounding lets its Cholesky factorisation finish:
    without a ridge or shrinkage, a rank test refuses every patch in which a feature is, to within
    ``C·eps`` of its variance, a linear combination of the others (anomalib and ``numpy.linalg.inv`` return
    a precision of ~1/eps noise there, and positive log-densities): the pivot each feature would get if
    factored last, ``1/(Σ⁻¹)_kk``, must exceed ``C·eps·Σ_kk``
    (:func:`anomstats._patch_kernels.singular_feature`, the library's rule
    :func:`anomstats._rules.numerically_singular_pivot`). ``eps`` is the data's own (float32 data are held to
    float32's eps even when accumulated in float64) and at least 16 eps of the working dtype
    (:func:`anomstats._patch_kernels.patch_rank_eps`). With ``λ`` the smallest eigenvalue of the patch's
    correlation matrix, every patch with ``λ <= eps`` is refused (for example a float64 patch of condition
    number 1e16 with up to 35 features) and every patch with ``λ > C·eps`` is accepted; the refusal is a
    :class:`numpy.linalg.LinAlgError` with one message whether the test or the factorisation refused, so the
    verdict does not depend on rounding. With a ridge (the default) or shrinkage the regularised covariance is
    definite by construction and this check is not applied, so rank-deficient patches (fewer images than
    channels, as in PaDiM) fit as in anomalib. Features whose scale the working dtype cannot represent (a
    covariance that overflows, a precision whose diagonal falls below the smallest normal number and would
    read as zeros) raise a ``ValueError`` that names the scale. Mahalanobis distances are anomalib's formula
    (square root of the squared distance clamped at 0); a finite query far enough for ``d²`` to overflow part
    way is rescored in float64 with an exact power-of-two scaling (:func:`anomstats._patch_kernels.score_chunk`),
    so its ``d²`` is finite or ``+inf``, never the NaN of ``inf − inf``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> embedding = rng.normal(size=(50, 3, 4, 4))        # (N, C, H, W)
    >>> mvg = MultiVariateGaussian().fit(embedding)
    >>> mvg.mean.shape, mvg.precision.shape
    ((3, 16), (16, 3, 3))
    >>> bool(np.array_equal(mvg.precision, mvg.precision.transpose(0, 2, 1)))
    True
    >>> mvg.mahalanobis(embedding[:2]).shape
    (2, 4, 4)

    Streaming gives the one-shot fit:

    >>> parts = MultiVariateGaussian()
    >>> for batch in np.array_split(embedding, 3):
    ...     _ = parts.partial_fit(batch)
    >>> bool(np.allclose(parts.precision, mvg.precision, rtol=1e-12, atol=0))
    True

    The same stream with the memory-lean accumulator (PaDiM's largest sizes; float32 precision written
    in place over the moments):

    >>> lean = MultiVariateGaussian(low_memory=True, dtype=np.float32)
    >>> for batch in np.array_split(embedding, 3):
    ...     _ = lean.partial_fit(batch)
    >>> lean.precision.dtype, lean.precision.shape
    (dtype('float32'), (16, 3, 3))
    >>> bool(np.allclose(lean.precision, mvg.precision, rtol=1e-5, atol=1e-6))
    True
    """

    def __init__(
        self,
        ridge: float = DEFAULT_RIDGE,
        shrinkage: str | None = None,
        dtype: DTypeLike = np.float64,
        *,
        store_covariance: bool = False,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        workers: int | None = None,
        low_memory: bool = False,
        form: str = "dense",
    ) -> None:
        self.form = check_form(form)
        self.ridge = check_ridge(ridge)
        self.shrinkage = check_shrinkage(shrinkage)
        self.dtype = check_dtype(dtype)
        self.store_covariance = check_bool(store_covariance, "store_covariance")
        self.low_memory = check_bool(low_memory, "low_memory")
        if self.low_memory and self.shrinkage == "ledoit-wolf":
            raise ValueError(
                "low_memory=True supports shrinkage=None and 'oas' (its packed moments hold no fourth moments), "
                f"got shrinkage={self.shrinkage!r}; use low_memory=False for Ledoit-Wolf"
            )
        self.memory_budget = check_memory_budget(memory_budget)
        self.workers = resolve_workers(workers)
        self._reset()

    def __new__(cls, *args: Any, form: str = "dense", **kwargs: Any) -> MultiVariateGaussian:
        # The low-rank form is a subclass of its own; choosing it is a constructor argument.
        if cls is MultiVariateGaussian and check_form(form) == "low_rank":
            cls = LowRankMultiVariateGaussian
        return super().__new__(cls)

    # ------------------------------------------------------------------ state
    def _reset(self) -> None:
        self.n_features: int | None = None
        self.spatial_shape: tuple[int, ...] | None = None
        self._moments: PatchMoments | None = None
        self._consumed = ""  # how the stream ended, spending its moments ("" while it has not)
        self._stale = False  # True when partial_fit/merge brought data not yet folded into the outputs
        self._mean: NDArray | None = None
        self._outputs: PatchOutputs | None = None
        self._n_seen = 0
        self._data_dtype: np.dtype | None = None  # widest streamed input dtype, for the rank test's eps

    @property
    def n_patches(self) -> int:
        """P, the number of patches (product of the spatial shape)."""
        self._require_shape()
        return math.prod(self.spatial_shape)

    def _require_shape(self) -> None:
        if self.spatial_shape is None:
            raise NotFittedError(
                "this MultiVariateGaussian is not fitted yet; call fit(embedding) or partial_fit(batch) first"
            )

    def _fitted_outputs(self) -> PatchOutputs:
        self._require_shape()
        if self._stale:
            self._finalise()
        assert self._outputs is not None
        return self._outputs

    @property
    def mean(self) -> NDArray[np.floating]:
        """Per-patch means, shape (C, P) (anomalib's layout)."""
        self._fitted_outputs()
        return self._mean

    @property
    def precision(self) -> NDArray[np.floating]:
        """Inverse regularised covariances, shape (P, C, C), exactly symmetric."""
        return self._fitted_outputs().precision

    @property
    def inv_covariance(self) -> NDArray[np.floating]:
        """Alias of :attr:`precision` under anomalib's name."""
        return self.precision

    @property
    def log_det(self) -> NDArray[np.float64]:
        """log det of each regularised covariance, shape (P,)."""
        return self._fitted_outputs().log_det

    @property
    def shrinkage_(self) -> NDArray[np.float64]:
        """Fitted shrinkage coefficient of each patch, shape (P,) (zeros without shrinkage)."""
        return self._fitted_outputs().shrinkage

    def _check_kept(self, name: str) -> None:
        # Before any finalisation: asking for what low_memory never keeps must not consume the stream.
        if self.low_memory:
            raise AttributeError(
                f"{name} is not kept with low_memory=True (only mean, precision and log_det are); "
                f"construct with low_memory=False to keep it"
            )

    @property
    def covariance(self) -> NDArray[np.floating]:
        """Regularised covariances, shape (P, C, C), exactly symmetric."""
        return self._kept_output("covariance")

    @property
    def cholesky(self) -> NDArray[np.floating]:
        """Lower Cholesky factors of :attr:`covariance`, shape (P, C, C)."""
        return self._kept_output("cholesky")

    def _kept_output(self, name: str) -> NDArray[np.floating]:
        """A fitted stack kept only with ``store_covariance=True`` (and ``low_memory=False``)."""
        self._check_kept(name)
        value = getattr(self._fitted_outputs(), name)
        if value is None:
            raise AttributeError(f"{name} was not kept: construct with store_covariance=True to keep it")
        return value

    @property
    def n_samples_seen_(self) -> int:
        """Number of observations the fit is based on."""
        self._require_shape()
        return self._moments.count if self._moments is not None else self._n_seen

    def __repr__(self) -> str:
        return (
            f"MultiVariateGaussian(ridge={self.ridge!r}, shrinkage={self.shrinkage!r}, dtype={self.dtype.name}, "
            f"store_covariance={self.store_covariance}{', low_memory=True' if self.low_memory else ''})"
        )

    # ------------------------------------------------------------------ dask protocol (anomstats._dask)
    def empty_like(self) -> MultiVariateGaussian:
        """A new, unfitted model with this one's configuration.

        Examples
        --------
        >>> MultiVariateGaussian(ridge=0.5, dtype=np.float32).empty_like()
        MultiVariateGaussian(ridge=0.5, shrinkage=None, dtype=float32, store_covariance=False)
        """
        return MultiVariateGaussian(
            self.ridge, self.shrinkage, self.dtype, store_covariance=self.store_covariance,
            memory_budget=self.memory_budget, workers=self.workers, low_memory=self.low_memory,
        )

    def accumulate_block(self, block: ArrayLike, weights: None = None) -> MultiVariateGaussian:
        """:meth:`partial_fit` of one in-memory chunk (the dask protocol's name for it; no weights)."""
        return self.partial_fit(block)

    #: The fitted state, everything :meth:`adopt` takes over (the configuration is not part of it).
    _STATE = (
        "n_features", "spatial_shape", "_moments", "_consumed", "_stale", "_mean", "_outputs", "_n_seen", "_data_dtype"
    )

    def adopt(self, other: MultiVariateGaussian) -> MultiVariateGaussian:
        """Take over ``other``'s fitted state (``other`` must not be used afterwards); returns ``self``."""
        for name in self._STATE:
            setattr(self, name, getattr(other, name))
        return self

    def _streamed_dask(self, embedding: Any) -> MultiVariateGaussian:
        if embedding.ndim < 2:
            check_fit_shape(embedding.shape)
        return _dask.reduce_observations(self.empty_like(), embedding, 0).compute()

    def _fit_dask(self, embedding: Any) -> MultiVariateGaussian:
        """:meth:`fit` of a dask embedding chunked along N: partial fits merged, finalised now.

        The in-memory fit's checks and messages: the dtype and the shape before anything is computed, NaN or
        infinity located in the whole embedding (not in the chunk that found it).
        """
        _check_real_dtype(embedding.dtype, "embedding")
        n, c, spatial = check_fit_shape(embedding.shape)

        def refuse(found: tuple[int, int, int]) -> None:
            patch, obs, feature = found
            where = f" in {describe_patch(patch, spatial)}"
            if not (self.low_memory or self.form == "low_rank"):
                where += f", first at observation {obs}, feature {feature}"  # the dense fit's message (fit_chunk)
            require_finite(False, "embedding", where=where)

        # A chunk that finds NaN or infinity: name the first of the whole embedding, as the in-memory fit does.
        total = _dask.compute_or_name_non_finite(
            lambda: self._streamed_dask(embedding), lambda: _dask.first_non_finite_patch(embedding), refuse
        )
        return self._adopt_dask_fit(total, embedding)

    def _adopt_dask_fit(self, total: MultiVariateGaussian, embedding: Any) -> MultiVariateGaussian:
        """Finalise a dask fit's merged partial fits now and take them over."""
        # Finalise now, as an in-memory fit does, so that too few observations, a singular patch and the
        # like raise from fit() rather than at first use (and name fit, not partial_fit).
        require_observations(
            total.n_samples_seen_, detail=f" (shape {tuple(embedding.shape)})", where=" along axis 0"
        )
        # End the stream, as an in-memory fit keeps no running moments (and float32 fits are written in place):
        # a later partial_fit is refused with fit()'s message, not continued from the dask data.
        total.finalise(end_stream=True)
        total._consumed = ""
        return self.adopt(total)

    def _partial_fit_dask(self, batch: Any) -> MultiVariateGaussian:
        """:meth:`partial_fit` of a dask batch: the in-memory checks first, then the chunks streamed and merged."""
        _check_real_dtype(batch.dtype, "batch")
        self._check_stream(tuple(int(s) for s in batch.shape))
        streamed = _dask.compute_or_name_non_finite(
            lambda: self._streamed_dask(batch),
            lambda: _dask.first_non_finite_patch(batch),
            lambda found: require_finite(False, "batch", where=f" in {describe_patch(found[0], tuple(batch.shape[2:]))}"),
        )
        return self.merge(streamed)

    def _dask_block_error(self, error: ValueError, block: np.ndarray, offset: int) -> ValueError | None:
        """The dask protocol's hook for a scoring error in a block of queries starting at ``offset``: the error
        of the first bad query scored alone, renumbered to its position in the whole array (as in memory)."""
        flat = np.asarray(block).reshape(block.shape[0], -1)
        bad = np.flatnonzero(~np.isfinite(flat).all(axis=1)) if flat.dtype.kind in "fc" else ()
        if len(bad) == 0:
            return None
        try:
            self._squared_distances(block[bad[0] : bad[0] + 1])
        except ValueError as single:
            text, count = re.subn(r"\bsample 0\b", f"sample {offset + int(bad[0])}", str(single))
            return type(single)(text) if count == 1 else None
        return None

    def _score_dask(self, method: str, x: Any, **kwargs: Any) -> Any:
        """:meth:`mahalanobis` / :meth:`logpdf` of dask embeddings ``(M, C, *spatial)``, lazily."""
        try:
            probe = getattr(self, method)(np.zeros((1, *x.shape[1:]), dtype=x.dtype), **kwargs)
        except ValueError:
            # The probe holds one sample: name x's own shape, not the probe's, when the shape is wrong.
            check_score_shape(tuple(x.shape), self.n_features, self.spatial_shape)
            raise
        return _dask.map_queries(self, method, x, 0, probe, **kwargs)

    def _mahalanobis_dask(self, x: Any, squared: bool = False) -> Any:
        return self._score_dask("mahalanobis", x, squared=squared)

    def _logpdf_dask(self, x: Any) -> Any:
        return self._score_dask("logpdf", x)

    # ------------------------------------------------------------------ fitting
    @_dask.dispatch(_fit_dask, arg="embedding")
    def fit(self, embedding: ArrayLike) -> MultiVariateGaussian:
        """Fit one Gaussian per patch of ``embedding`` ``(N, C, *spatial)``; returns ``self``.

        Discards any earlier fit or streamed data. The input is never modified.

        Raises
        ------
        ValueError
            Fewer than 2 observations, a bad shape, or non-finite values (naming the first bad patch).
        numpy.linalg.LinAlgError
            A regularised covariance that cannot be factored (naming the patch).
        """
        x = _as_real_array(embedding, "embedding")
        n, c, spatial = check_fit_shape(x.shape)
        n_patches = math.prod(spatial)
        if self.low_memory:
            return self._fit_low_memory(x.reshape(n, c, n_patches), spatial)
        flat_embedding = x.reshape(n, c, n_patches)
        settings = self._settings(n, spatial)
        mean = np.empty((c, n_patches), dtype=self.dtype)
        outputs = PatchOutputs.allocate(n_patches, c, self.dtype, keep_covariance=settings.keep_covariance)
        bytes_per_patch = n * c * self.dtype.itemsize
        chunks = plan_patch_chunks(n_patches, bytes_per_patch, self.memory_budget, self.workers, FIT_CHUNK_PATCHES)
        scratch = ThreadScratch(stack_patches(c, self.dtype.itemsize, self.memory_budget // self.workers))
        run_chunks(
            lambda ch: fit_chunk(flat_embedding, *ch, mean, outputs, settings, self.dtype, scratch),
            chunks,
            self.workers,
        )
        self._reset()
        self.n_features, self.spatial_shape = c, spatial
        self._mean, self._outputs, self._n_seen = mean, outputs, n
        return self

    @_dask.dispatch(_partial_fit_dask, arg="batch")
    def partial_fit(self, batch: ArrayLike) -> MultiVariateGaussian:
        """Accumulate a batch ``(n, C, *spatial)`` (n >= 1); returns ``self``.

        Moments are accumulated in float64 around a shift, with Chan et al.'s pairwise update (packed
        triangles; Ledoit-Wolf: full sums, see the class notes, *Streaming*); the Gaussians are fitted
        lazily, at the first use after an update, or by :meth:`finalise`. Reading keeps the moments, so
        streaming may go on. Any split of the data into batches gives the one-shot :meth:`fit` to rounding.
        The batch is validated (shape, finiteness) before anything is accumulated, so a rejected batch
        leaves the object unchanged. Raises a ``ValueError`` once the stream has ended
        (``low_memory=True`` after the first use, or ``finalise(end_stream=True)``).
        """
        x = _as_real_array(batch, "batch")
        n, c, spatial = self._check_stream(x.shape)
        flat_embedding = _finite_patches(x, n, c, spatial, "batch")
        if self._moments is None:
            self._moments = self._new_moments(c, flat_embedding.shape[2])
            self.n_features, self.spatial_shape = c, spatial
        self._moments.update(flat_embedding)
        if x.dtype.kind == "f":
            self._data_dtype = x.dtype if self._data_dtype is None else np.promote_types(self._data_dtype, x.dtype)
        self._stale = True
        return self

    def _check_stream(self, shape: tuple[int, ...]) -> tuple[int, int, tuple[int, ...]]:
        """:meth:`partial_fit`'s checks of a batch's shape against the stream so far; returns ``(n, C, spatial)``."""
        n, c, spatial = check_fit_shape(shape, min_observations=1, name="batch")
        if self.spatial_shape is not None:
            if self._moments is None:
                raise ValueError(
                    f"this MultiVariateGaussian {self._why_no_moments()}; "
                    "use a new object (or call fit on all the data) to stream batches"
                )
            if c != self.n_features or spatial != self.spatial_shape:
                check_score_shape(shape, self.n_features, self.spatial_shape, name="batch")
        return n, c, spatial

    def merge(self, other: MultiVariateGaussian) -> MultiVariateGaussian:
        """Fold the data streamed into ``other`` into ``self`` (both built with :meth:`partial_fit`).

        ``other`` is not modified (merging a model into itself counts its data twice). Returns ``self``;
        the Gaussians are refitted lazily. The models must agree on ``form``, ``ridge``, ``shrinkage`` and
        ``dtype``; ``low_memory`` and ``store_covariance`` may differ (they decide what ``self`` keeps).
        Neither stream may have ended.
        """
        if not isinstance(other, MultiVariateGaussian):
            raise TypeError(f"other must be a MultiVariateGaussian, got {type(other).__name__}")
        # The moments do not depend on low_memory or store_covariance (they say what to keep): those may differ.
        settings = ("form", "ridge", "shrinkage", "dtype")
        for name in settings:
            if getattr(self, name) != getattr(other, name):
                raise ValueError(
                    f"cannot merge models with different {name}: {getattr(self, name)!r} and {getattr(other, name)!r}"
                )
        if other._moments is None:
            if other.spatial_shape is None:
                return self  # nothing streamed into other
            raise ValueError(f"other {other._why_no_moments()}; only partial_fit models merge")
        if self.spatial_shape is not None and self._moments is None:
            raise ValueError(f"self {self._why_no_moments()}; only partial_fit models merge")
        if self._moments is None:
            self.n_features, self.spatial_shape = other.n_features, other.spatial_shape
            self._moments = self._new_moments(other.n_features, math.prod(other.spatial_shape))
        elif (self.n_features, self.spatial_shape) != (other.n_features, other.spatial_shape):
            raise ValueError(
                f"cannot merge models of different shapes: C={self.n_features}, spatial={self.spatial_shape} and "
                f"C={other.n_features}, spatial={other.spatial_shape}"
            )
        self._moments.merge(other._moments)
        if other._data_dtype is not None:
            mine = self._data_dtype
            self._data_dtype = other._data_dtype if mine is None else np.promote_types(mine, other._data_dtype)
        self._stale = True
        return self

    def _why_no_moments(self) -> str:
        if self._consumed:
            return f"was finalised with {self._consumed}"
        return "was fitted with fit(), which keeps no running moments"

    def _new_moments(self, n_features: int, n_patches: int) -> PatchMoments:
        if self.shrinkage == "ledoit-wolf":  # its coefficient needs fourth moments: the augmented dense sums
            return DensePatchMoments(augmented=True, memory_budget=self.memory_budget, workers=self.workers)
        return PackedGaussianAccumulator(
            n_features, n_patches, np.float64, memory_budget=self.memory_budget, workers=self.workers
        )

    def _settings(self, n_samples: int, spatial: tuple[int, ...]) -> PatchFitSettings:
        keep = self.store_covariance and not self.low_memory
        # A stream's rank test uses the eps of the widest input it saw (a fit's uses its embedding's).
        return PatchFitSettings(
            self.ridge, self.shrinkage, n_samples, spatial, keep_covariance=keep, data_dtype=self._data_dtype
        )

    def _fit_low_memory(self, flat_embedding: NDArray, spatial: tuple[int, ...]) -> MultiVariateGaussian:
        """:meth:`fit` with ``low_memory=True``: ``flat_embedding`` ``(N, C, P)`` through the packed accumulator."""
        n, c, _ = flat_embedding.shape
        # Checked first, so that a rejected fit changes nothing.
        flat_embedding = _finite_patches(flat_embedding, n, c, spatial, "embedding")
        moments = self._new_moments(c, math.prod(spatial)).update(flat_embedding)
        settings = self._settings(n, spatial)
        mean, outputs = moments.finalise_patches(settings, self.dtype, self.memory_budget, self.workers, spend=True)
        self._reset()
        self.n_features, self.spatial_shape = c, spatial
        self._mean, self._outputs, self._n_seen = mean, outputs, n
        return self

    def finalise(self, *, end_stream: bool = False) -> MultiVariateGaussian:
        """Fit the Gaussians of the data streamed so far now, rather than at their first use; returns ``self``.

        Streamed data (:meth:`partial_fit`, :meth:`merge`) is fitted lazily, at the first use of a fitted
        quantity; reading one keeps the running moments, so streaming may go on and a later read refits.
        This method fits now, and can end the stream to free the moments. It does nothing for a model
        fitted with :meth:`fit` or whose stream has ended.

        Parameters
        ----------
        end_stream : bool, default False
            Also end the stream: the running moments are spent and freed (a later :meth:`partial_fit` or
            :meth:`merge` raises). With ``dtype=float32`` the precision is written over the packed float64
            moments in place, so fitting takes no memory beyond them (see the class notes, *Memory*).
            A ``low_memory=True`` model always ends its stream when it is fitted.

        Raises
        ------
        NotFittedError
            Nothing was fitted or streamed.
        ValueError, numpy.linalg.LinAlgError
            As for a first use: fewer than 2 observations (the stream is not spent), a patch that cannot be
            factored (naming it). When the precision was being written in place, the model is reset to
            unfitted (the moments are partly overwritten), and the message says so.

        Examples
        --------
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(30, 3, 2, 2))
        >>> model = MultiVariateGaussian(dtype=np.float32).partial_fit(x[:20])
        >>> model.precision.shape                      # fitted on first use; the stream goes on
        (4, 3, 3)
        >>> _ = model.partial_fit(x[20:]).finalise(end_stream=True)
        >>> model.n_samples_seen_
        30
        """
        end_stream = check_bool(end_stream, "end_stream") or self.low_memory
        self._require_shape()
        if self._moments is None:
            return self
        if self._stale:
            self._finalise(end_stream=end_stream)
        if end_stream and self._moments is not None:  # already fitted: only the moments are left to drop
            self._moments, self._n_seen, self._consumed = None, self._moments.count, self._ending()
        return self

    def _ending(self) -> str:
        """How this model's stream ended, for the message of a later partial_fit or merge."""
        if self.low_memory:
            return ("low_memory=True, which spends its streamed moments at the first use of a fitted quantity "
                    "(mean, precision, log_det, scoring) or at finalise()")
        return "finalise(end_stream=True), which spent its streamed moments"

    def _finalise(self, end_stream: bool | None = None) -> None:
        """Turn the running moments into the fitted Gaussians (chunked like :meth:`fit`).

        ``end_stream`` (default: ``low_memory``) spends the moments; otherwise they are only read, and the
        previous fit is dropped first, so that its stacks are freed before the new ones are allocated.
        """
        end_stream = self.low_memory if end_stream is None else end_stream
        moments = self._moments
        n = int(moments.count)
        require_observations(n, name="partial_fit", streamed=True)  # nothing spent yet: streaming may go on
        settings = self._settings(n, self.spatial_shape)
        self._mean = self._outputs = None
        try:
            self._mean, self._outputs = moments.finalise_patches(
                settings, self.dtype, self.memory_budget, self.workers, spend=end_stream
            )
        except (ValueError, np.linalg.LinAlgError) as error:
            if not moments.spent:
                raise  # the moments are intact: the model still streams
            self._reset()
            raise type(error)(
                f"{error}. The stream was ending and the precision was being written over the streamed moments: "
                "they are spent and the model is reset to unfitted; stream the data again"
            ) from error
        if end_stream:
            self._moments, self._n_seen, self._consumed = None, n, self._ending()
        self._stale = False

    # ------------------------------------------------------------------ scoring
    def _squared_distances(self, x: ArrayLike) -> tuple[NDArray, int]:
        outputs = self._fitted_outputs()
        array = _as_real_array(x, "x")
        m = check_score_shape(array.shape, self.n_features, self.spatial_shape)
        n_patches = math.prod(self.spatial_shape)
        flat_embedding = array.reshape(m, self.n_features, n_patches)
        out = np.empty((m, n_patches), dtype=self.dtype)
        bytes_per_patch = 2 * m * self.n_features * self.dtype.itemsize
        chunks = plan_patch_chunks(n_patches, bytes_per_patch, self.memory_budget, self.workers)
        mean, scratch = self._mean, ThreadScratch()
        run_chunks(
            lambda ch: score_chunk(flat_embedding, *ch, mean, outputs.precision, out, self.dtype, scratch),
            chunks,
            self.workers,
        )
        check_query_results(flat_embedding, out, self.spatial_shape)
        return out, m

    def _patch_form(self, patch: int) -> tuple[NDArray, Callable[[NDArray], NDArray]]:
        """Patch ``patch``'s mean and ``d²`` of centred float64 rows (:func:`far_distances`' rescoring)."""
        return self._mean[:, patch], dense_quadratic(self._fitted_outputs().precision[patch])

    @_dask.dispatch(_mahalanobis_dask, arg="x")
    def mahalanobis(self, x: ArrayLike, squared: bool = False) -> NDArray[np.floating]:
        """Per-patch Mahalanobis distances of ``x`` ``(M, C, *spatial)`` → ``(M, *spatial)``.

        PaDiM's distance: ``sqrt(max(d², 0))`` with ``d² = (x - mean)ᵀ precision (x - mean)`` per patch
        (the clamp only removes rounding below zero). ``squared=True`` returns the clamped ``d²``.
        Computed in chunks of patches under ``memory_budget``. Far finite queries give a finite ``d`` wherever
        it is representable, also when ``d²`` is not (float32 beyond ``d ≈ 1.8e19``), as the torch adapter;
        ``inf`` beyond; never NaN.

        Examples
        --------
        >>> import numpy as np
        >>> train = np.random.default_rng(1).normal(size=(40, 2, 3, 3))
        >>> mvg = MultiVariateGaussian(ridge=0.0).fit(train)
        >>> d = mvg.mahalanobis(mvg.mean.reshape(1, 2, 3, 3))   # the mean is at distance 0
        >>> d.shape, float(np.abs(d).max())
        ((1, 3, 3), 0.0)
        """
        squared = check_bool(squared, "squared")
        squared_distances, m = self._squared_distances(x)
        np.maximum(squared_distances, 0.0, out=squared_distances)
        if not squared:
            np.sqrt(squared_distances, out=squared_distances)
            if np.isinf(squared_distances).any():  # d² beyond the dtype (float32: d > 1.8e19), d perhaps not
                far_distances(_as_real_array(x, "x").reshape(m, self.n_features, -1), squared_distances,
                              self._patch_form)
        return squared_distances.reshape((m,) + self.spatial_shape)

    @_dask.dispatch(_logpdf_dask, arg="x")
    def logpdf(self, x: ArrayLike) -> NDArray[np.floating]:
        """Per-patch Gaussian log-density of ``x`` ``(M, C, *spatial)`` → ``(M, *spatial)``.

        ``-(C log 2π + log det Σ + d²) / 2`` with the regularised covariance Σ of each patch.

        Examples
        --------
        >>> import numpy as np
        >>> train = np.random.default_rng(2).normal(size=(30, 2, 1))
        >>> mvg = MultiVariateGaussian(ridge=0.0, store_covariance=True).fit(train)
        >>> from scipy.stats import multivariate_normal
        >>> ref = multivariate_normal(mvg.mean[:, 0], mvg.covariance[0]).logpdf(train[:3, :, 0])
        >>> bool(np.allclose(mvg.logpdf(train[:3])[:, 0], ref, rtol=1e-12))
        True
        """
        squared_distances, m = self._squared_distances(x)
        np.maximum(squared_distances, 0.0, out=squared_distances)
        log_det = self._fitted_outputs().log_det.astype(self.dtype)
        result = gaussian_log_normaliser(self.n_features, log_det)[None, :] - 0.5 * squared_distances
        return result.reshape((m,) + self.spatial_shape)


def _finite_patches(x: NDArray, n: int, c: int, spatial: tuple[int, ...], name: str) -> NDArray:
    """``x`` as ``(n, C, P)``, after checking that it holds only finite values (naming the first bad patch)."""
    flat_embedding = x.reshape(n, c, math.prod(spatial))
    finite = bool(np.isfinite(flat_embedding).all())
    where = "" if finite else f" in {describe_patch(int(np.argmax(~np.isfinite(flat_embedding).all(axis=(0, 1)))), spatial)}"
    require_finite(finite, name, where=where)
    return flat_embedding


class _LowRankFit:
    """Fitted low-rank state: mean (C, P), basis (P, C, r), eigenvalues (P, r), log_det (P,)."""

    def __init__(self, n_features: int, n_patches: int, width: int, dtype: np.dtype) -> None:
        self.mean = np.empty((n_features, n_patches), dtype=dtype)
        self.basis = np.empty((n_patches, n_features, width), dtype=dtype)
        self.eigenvalues = np.empty((n_patches, width), dtype=dtype)
        self.log_det = np.empty(n_patches, dtype=np.float64)


class LowRankMultiVariateGaussian(MultiVariateGaussian):
    """Per-patch Gaussians in the exact low-rank form, for fewer observations than features.

    Built by ``MultiVariateGaussian(form="low_rank", ...)``. With ``N`` observations of ``C`` features
    every patch's regularised covariance is exactly ``Σ = V diag(λ) Vᵀ + ρ (I − V Vᵀ)``, ``V`` the
    ``(C, r)`` orthonormal basis of the centred observations (``r = min(N − 1, C)``), ``λ_i = s_i²/(N − 1)
    + ρ`` with ``s_i`` their singular values and ``ρ`` the ridge. Only the means, the basis and the
    eigenvalues are kept: ``P·C·r`` numbers instead of ``P·C²`` (C = 550, 64×64 patches, 100 images:
    1.8 GB in float64 against 9.9 GB for one dense stack).

    Parameters
    ----------
    ridge, dtype, memory_budget, workers
        As for :class:`MultiVariateGaussian`. ``ridge`` must be positive when ``N <= C`` (the covariances
        are singular otherwise). ``shrinkage`` and ``low_memory`` are not supported (the form is already
        lean: it is the streaming state too); ``store_covariance`` has no effect.

    Attributes
    ----------
    basis : ndarray, shape (P, C, r)
        Orthonormal columns, ordered by decreasing eigenvalue.
    eigenvalues : ndarray, shape (P, r)
        The regularised covariance's eigenvalues along :attr:`basis` (every other one is the ridge).
    precision, covariance : ndarray, shape (P, C, C)
        Materialised on each access, patch chunk by patch chunk (not kept): the dense equivalents, for
        code that needs them (anomalib's ``inv_covariance``).

    The means ``(C, P)``, ``log_det`` ``(P,)``, ``n_samples_seen_``, scoring and streaming are those of
    :class:`MultiVariateGaussian`.

    Notes
    -----
    The basis comes from each patch's centred ``N×N`` Gram matrix (its eigenpairs, with one Cholesky-QR
    pass where the first pass is not orthonormal to 256 eps; see :func:`anomstats._low_rank.basis_of_factor`),
    accumulated in float64 whatever the input dtype; no ``C×C`` matrix is formed. Directions whose
    variance is below the Gram's rounding are zero columns of :attr:`basis` with eigenvalue exactly the
    ridge. :meth:`partial_fit` keeps a float64 scatter
    factor per patch (the centred batches as columns, one more column per merge, Chan's update), reduced
    to its basis at the first use of the fit, so any split of the data equals the one-shot fit to rounding.
    Mahalanobis distances are ``Σ p_i²/λ_i + |δ − V p|²/ρ`` with ``p = Vᵀδ``: the residual outside the
    basis is formed as a vector, so nothing cancels. When ``N − 1 >= C`` the form has no advantage: a
    ``UserWarning`` says so, and the results are still exact.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(10, 30, 2, 2))     # N = 10 < C = 30
    >>> low = MultiVariateGaussian(form="low_rank").fit(x)
    >>> low.basis.shape, low.eigenvalues.shape
    ((4, 30, 9), (4, 9))
    >>> dense = MultiVariateGaussian().fit(x)
    >>> bool(np.allclose(low.mahalanobis(x[:2]), dense.mahalanobis(x[:2]), rtol=1e-10, atol=0))
    True
    """

    def __init__(
        self,
        ridge: float = DEFAULT_RIDGE,
        shrinkage: str | None = None,
        dtype: DTypeLike = np.float64,
        *,
        store_covariance: bool = False,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        workers: int | None = None,
        low_memory: bool = False,
        form: str = "low_rank",
    ) -> None:
        if check_form(form) != "low_rank":
            raise ValueError(f"LowRankMultiVariateGaussian has form='low_rank', got form={form!r}")
        if shrinkage is not None or check_bool(low_memory, "low_memory"):
            raise ValueError(
                "form='low_rank' supports neither shrinkage nor low_memory=True (it is already the lean form: "
                f"its fitted and streamed state are P·C·r numbers); got shrinkage={shrinkage!r}, "
                f"low_memory={low_memory!r}"
            )
        super().__init__(
            ridge, None, dtype, store_covariance=store_covariance, memory_budget=memory_budget,
            workers=workers, form="low_rank",
        )

    def __repr__(self) -> str:
        return f"MultiVariateGaussian(ridge={self.ridge!r}, dtype={self.dtype.name}, form='low_rank')"

    def empty_like(self) -> LowRankMultiVariateGaussian:
        """A new, unfitted model with this one's configuration."""
        return MultiVariateGaussian(
            self.ridge, dtype=self.dtype, memory_budget=self.memory_budget, workers=self.workers, form="low_rank"
        )

    # ------------------------------------------------------------------ fitted state
    # The fitted state is a _LowRankFit in the base class's slots (_outputs, and _mean for mean): the base
    # class's finalisation on first use, mean and log_det serve both forms.
    @property
    def basis(self) -> NDArray[np.floating]:
        """Orthonormal bases ``V`` of the centred observations, shape (P, C, r)."""
        return self._fitted_outputs().basis

    @property
    def eigenvalues(self) -> NDArray[np.floating]:
        """Regularised eigenvalues ``s²/(N − 1) + ρ`` along :attr:`basis`, shape (P, r)."""
        return self._fitted_outputs().eigenvalues

    @property
    def shrinkage_(self) -> NDArray[np.float64]:
        """Zeros: the low-rank form has no shrinkage."""
        return np.zeros(self.n_patches)

    @property
    def precision(self) -> NDArray[np.floating]:
        """Dense inverse covariances (P, C, C), materialised chunk by chunk on each access (not kept)."""
        return self._materialise(inverse=True)

    @property
    def covariance(self) -> NDArray[np.floating]:
        """Dense regularised covariances (P, C, C), materialised chunk by chunk on each access (not kept)."""
        return self._materialise(inverse=False)

    @property
    def cholesky(self) -> NDArray[np.floating]:
        raise AttributeError("the low-rank form keeps no Cholesky factors; use form='dense' for them")

    def _materialise(self, *, inverse: bool) -> NDArray[np.floating]:
        fit = self._fitted_outputs()
        c, n_patches = fit.mean.shape
        out = np.empty((n_patches, c, c), dtype=self.dtype)
        chunks = plan_patch_chunks(n_patches, 2 * c * c * 8, self.memory_budget, self.workers)

        def fill(chunk: tuple[int, int]) -> None:
            start, stop = chunk
            dense = np.empty((stop - start, c, c))
            basis = fit.basis[start:stop].astype(np.float64)
            dense_from_low_rank(basis, fit.eigenvalues[start:stop].astype(np.float64), self.ridge,
                                inverse=inverse, out=dense)
            out[start:stop] = dense

        run_chunks(fill, chunks, self.workers)
        return out

    # ------------------------------------------------------------------ fitting
    @_dask.dispatch(MultiVariateGaussian._fit_dask, arg="embedding")
    def fit(self, embedding: ArrayLike) -> LowRankMultiVariateGaussian:
        """Fit the low-rank Gaussians of ``embedding`` ``(N, C, *spatial)``; returns ``self``.

        Raises
        ------
        ValueError
            Fewer than 2 observations, a bad shape, or non-finite values (naming the first bad patch); a state
            :attr:`dtype` cannot represent, naming the patch and the features' scale (the dense form's messages):
            eigenvalues beyond its largest number (float32 features of scale 1e19: ``s²/(N − 1)`` beyond 3.4e38)
            or a precision whose diagonal underflows or overflows it. Fit with ``dtype=np.float64`` instead.
        numpy.linalg.LinAlgError
            ``ridge=0`` with ``N <= C`` (singular by construction), or a numerically singular patch.
        """
        x = _as_real_array(embedding, "embedding")
        n, c, spatial = check_fit_shape(x.shape)
        flat_embedding = _finite_patches(x, n, c, spatial, "embedding")
        scratch = ThreadScratch()
        fit = self._fit_from(
            n, c, spatial, lambda start, stop: factor_chunk(flat_embedding, start, stop, scratch),
            bytes_per_patch=4 * n * c * 8, scratch=scratch,
        )
        self._reset()
        self.n_features, self.spatial_shape = c, spatial
        self._mean, self._outputs, self._n_seen = fit.mean, fit, n
        return self

    def _new_moments(self, n_features: int, n_patches: int) -> LowRankMoments:  # type: ignore[override]
        return LowRankMoments(n_features, n_patches, self.memory_budget)

    def _finalise(self, end_stream: bool | None = None) -> None:
        # The scatter factor is only read; finalise(end_stream=True) drops it afterwards.
        moments = self._moments
        n = int(moments.count)
        require_observations(n, name="partial_fit", streamed=True)
        k = moments.n_columns
        fit = self._fit_from(n, self.n_features, self.spatial_shape, moments.centred_factor,
                             bytes_per_patch=4 * k * self.n_features * 8, scratch=ThreadScratch())
        self._mean, self._outputs, self._stale = fit.mean, fit, False

    def _fit_from(self, n: int, c: int, spatial: tuple[int, ...], source, bytes_per_patch: int,
                  scratch: ThreadScratch | None = None) -> _LowRankFit:
        """Bases and eigenvalues of every patch, chunk by chunk, from ``source(start, stop)`` → (means, factors)."""
        width = low_rank_width(n, c)
        if self.ridge == 0 and n <= c:
            raise np.linalg.LinAlgError(needs_ridge_message(n, c))
        if width >= c:
            warn_at_caller(no_advantage_message(n, c), UserWarning)
        n_patches = math.prod(spatial)
        fit = _LowRankFit(c, n_patches, width, self.dtype)
        chunks = plan_patch_chunks(n_patches, bytes_per_patch, self.memory_budget, self.workers, FIT_CHUNK_PATCHES)

        def run(chunk: tuple[int, int]) -> None:
            start, stop = chunk
            mean, factor = source(start, stop)
            basis, singular = basis_of_factor(factor, width, scratch)
            eigenvalues = eigenvalues_of(singular, n, self.ridge)
            check_definite(eigenvalues, c, self.ridge, start, spatial)
            # The state is stored in self.dtype: refused, naming the scale, where it cannot hold it (float32
            # features of scale 1e19: eigenvalues beyond 3.4e38), as the dense form refuses its precision.
            with np.errstate(over="ignore"):
                stored_mean = mean.astype(self.dtype)
                diagonal = precision_diagonal(basis, eigenvalues, self.ridge).astype(self.dtype)
            if not np.isfinite(stored_mean).all():
                bad = int(np.argmax(~np.isfinite(stored_mean).all(axis=1)))
                raise non_finite_fit_error(describe_patch(start + bad, spatial), None)
            check_representable(eigenvalues, diagonal, self.ridge, c, self.dtype, start, spatial, scale_remedy(self.dtype))
            fit.mean[:, start:stop] = stored_mean.T
            fit.basis[start:stop] = basis
            fit.eigenvalues[start:stop] = eigenvalues
            # c > width only with a positive ridge (ridge 0 below full rank is refused above).
            log_ridge = (c - width) * math.log(self.ridge) if c > width else 0.0
            fit.log_det[start:stop] = np.log(eigenvalues).sum(axis=1) + log_ridge

        run_chunks(run, chunks, self.workers)
        return fit

    # ------------------------------------------------------------------ scoring
    def _squared_distances(self, x: ArrayLike) -> tuple[NDArray, int]:
        fit = self._fitted_outputs()
        array = _as_real_array(x, "x")
        m = check_score_shape(array.shape, self.n_features, self.spatial_shape)
        n_patches = math.prod(self.spatial_shape)
        flat_embedding = array.reshape(m, self.n_features, n_patches)
        out = np.empty((m, n_patches), dtype=self.dtype)
        width = fit.basis.shape[2]
        bytes_per_patch = (3 * m * self.n_features + m * width) * self.dtype.itemsize
        chunks = plan_patch_chunks(n_patches, bytes_per_patch, self.memory_budget, self.workers)

        scratch = ThreadScratch()

        def run(chunk: tuple[int, int]) -> None:
            start, stop = chunk
            delta = scratch.array((stop - start, m, self.n_features), self.dtype)
            # Far queries overflow here (inf, or inf − inf): check_query_results sets a finite query's NaN to
            # +inf, and mahalanobis rescores the distances that are still representable (far_distances).
            with np.errstate(over="ignore", invalid="ignore"):
                gather(flat_embedding.transpose(2, 0, 1)[start:stop], delta)  # cache-blocked transposition
                delta -= fit.mean[:, start:stop].T[:, None, :]
                out[:, start:stop] = squared_distances(
                    delta, fit.basis[start:stop], fit.eigenvalues[start:stop], self.ridge, scratch
                ).T

        run_chunks(run, chunks, self.workers)
        check_query_results(flat_embedding, out, self.spatial_shape)
        return out, m

    def _patch_form(self, patch: int) -> tuple[NDArray, Callable[[NDArray], NDArray]]:
        """Patch ``patch``'s mean and the low-rank ``d²`` of centred float64 rows (for :func:`far_distances`)."""
        fit = self._fitted_outputs()
        basis = fit.basis[patch : patch + 1].astype(np.float64)
        eigenvalues = fit.eigenvalues[patch : patch + 1].astype(np.float64)
        return fit.mean[:, patch], lambda delta: squared_distances(delta[None], basis, eigenvalues, self.ridge)[0]
