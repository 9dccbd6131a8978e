"""Gaussian kernel density estimation as a torch module: a drop-in for anomalib's ``GaussianKDE``.

Every scalar rule comes from the NumPy core: the bandwidth rule and its validation, the leave-one-out selection
``bw_method='cv_ml'`` and the explicit kernel covariance's validation (:mod:`anomstats.bandwidth`, run on the
dataset as float64 NumPy), the Gaussian log-normaliser, the exponent floor and the trusted-sum floor of the
log-sum-exp fallback, the dimension up to which squared distances are direct differences
(:mod:`anomstats._rules`), the data faults' messages (:mod:`anomstats._validation`, scipy's words, as the
core's KDE). The kernel sums run as a few matrix products and element-wise passes per chunk on the module's
device (in float64 up to ``DIRECT_MAX_D`` dimensions the squared distances are direct differences, as in the
NumPy core, which is more accurate there).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from scipy.linalg import LinAlgError

from anomstats._patch_kernels import fault_scale, precision_fault, unrepresentable_error
from anomstats._rules import (
    DIRECT_MAX_D,
    exp_floor,
    gaussian_log_normaliser,
    product_route_is_accurate,
    trusted_sum_floor,
)
from anomstats._validation import (
    NON_FINITE_DATA,
    SINGULAR_DATA,
    TOO_FEW_ELEMENTS,
    NotFittedError,
    check_kde_data_shape,
    check_memory_budget,
    inconsistent_state_error,
    require_finite_points,
)
from anomstats.bandwidth import (
    BW_METHOD_AND_KERNEL_COVARIANCE,
    BwMethod,
    bandwidth_factor,
    check_data_covariance,
    check_factor,
    check_kernel_covariance,
    cv_ml_factor,
    resolve_bw_method,
)

from ._policy import (
    DEFAULT_CHUNK_BYTES,
    TRACE_PLANNING_ROWS,
    as_float_tensor,
    is_tracing,
    numpy_dtype as _numpy_dtype,
    result_dtype,
    rows_per_chunk,
    static_shapes_while_tracing,
    working_dtype,
)
from ._covariance import numpy_cov
from . import _checkpoints
from .dynamic_buffer import DynamicBufferModule

__all__ = ["GaussianKDE"]


#: CPU tiling of the (queries x training points) kernel matrix: tiles of a few MiB stay in cache (about 3x
#: faster than budget-sized blocks) while keeping the number of separate parallel ops small (each op on a
#: tile is one fork/join of the intra-op threads). 3 MiB (all tiles of one block together) was 9-11% faster
#: than 4 MiB on 2 threads for float32 D = 16 (256 x 1024 tiles), float64 D = 16 and float64 D = 2 alike;
#: 2 MiB and below lose again to the per-op overhead (Xeon SkylakeX, torch 2.13, interleaved best of 50).
_CPU_TILE_ROWS = 256
_CPU_TILE_BYTES = 3 * 2**20
#: With one intra-op thread there is no fork/join to amortise, and the tile is kept within one core's L2
#: (1 MiB on SkylakeX, 2 MiB on the newer Xeons): 0.75 MiB beat 3 MiB by 14 % (float32 D = 16), 21 % (float64
#: D = 16) and 38 % (float64 D = 2), and beat 0.375-1.5 MiB, over 40 interleaved rounds (N = 40000, M = 256).
_CPU_TILE_BYTES_ONE_THREAD = 3 * 2**18


#: dtype, then (buffer, its placement) for each buffer the training side is built from.
_TrainingKey = tuple[torch.dtype, tuple[tuple[Tensor, tuple[Any, ...]], ...]]


def _placement(buffer: Tensor) -> tuple[Any, ...]:
    """A buffer's version counter and the memory its values are read from (storage, offset, shape, strides)."""
    return buffer._version, buffer.data_ptr(), buffer.storage_offset(), tuple(buffer.shape), buffer.stride()


def _same_key(kept: _TrainingKey, key: _TrainingKey) -> bool:
    return kept[0] == key[0] and all(
        a is b and pa == pb for (a, pa), (b, pb) in zip(kept[1], key[1], strict=True)
    )


class _TrainingSide(NamedTuple):
    """The training points' side of one evaluation (see :meth:`GaussianKDE._training_side`)."""

    own_fit: bool  # centred in data space by the fit's mean (else by the stored points' centroid)
    centre: Tensor  # subtracted from the raw queries (own fit) or from the whitened ones
    direct: bool  # squared distances by direct differences (else one augmented product)
    wide: bool  # a float64 product for float32 data (the CPU's fast path)
    operand: Tensor  # (N, D) centred points, or (N, D + 2) augmented ones


def _direct_exponent(
    queries: Tensor, train: Tensor, out: Tensor | None = None, scratch: Tensor | None = None
) -> Tensor:
    """``-||y - t||^2 / 2`` for every (query, training point) pair by direct differences (small D).

    As the NumPy core does up to ``DIRECT_MAX_D`` dimensions: the rounding is relative to the distance
    itself, not to ``||y||^2 + ||t||^2`` as in the expanded square. With ``out`` (and ``scratch`` for
    D > 1, same shape) the block is written in place; without, out of place (autograd, tracing).
    """
    if out is None:
        diff = queries[:, :1] - train[:, 0]
        exponent = diff * diff
        for k in range(1, queries.shape[1]):
            diff = queries[:, k : k + 1] - train[:, k]
            exponent = exponent + diff * diff
        return exponent * -0.5
    torch.sub(queries[:, :1], train[:, 0], out=out).square_()
    for k in range(1, queries.shape[1]):
        assert scratch is not None
        torch.sub(queries[:, k : k + 1], train[:, k], out=scratch)
        out.addcmul_(scratch, scratch)
    return out.mul_(-0.5)


def _as_numpy(kernel_covariance: Any) -> np.ndarray:
    """A NumPy copy of an explicit kernel covariance, for the core's check (which runs in float64).

    Real tensors are taken to the CPU in float64 (bfloat16 has no NumPy dtype); complex ones keep their
    dtype, so that the core names it in its message. A copy either way: the caller's H is never shared.
    """
    if isinstance(kernel_covariance, Tensor):
        t = kernel_covariance.detach().cpu().resolve_conj().resolve_neg()
        if not t.is_complex():
            t = t.to(torch.float64)
        return np.array(t.numpy())
    return np.array(kernel_covariance)


def _scale_remedy(dtype: torch.dtype) -> str:
    """What to do about a kernel whose scale ``dtype`` cannot represent (the remedy of
    :func:`anomstats._patch_kernels.unrepresentable_error`, in this module's terms)."""
    return "rescale the dataset (e.g. divide it by its typical scale s, and an explicit kernel_covariance by s²)" + (
        "" if dtype == torch.float64 else ", or compute and store in float64: module.double() or a float64 dataset"
    )


def _check_whitening_fits(whitening: Tensor, variances: Tensor, dtype: torch.dtype) -> None:
    """Refuse a whitening ``L`` (float64) that the buffers' ``dtype`` cannot hold, naming the kernel's scale.

    Stored in ``dtype``, ``bw_transform`` must be finite with a normal, positive diagonal: a kernel of bandwidth
    above about ``1 / tiny`` (8.5e37 in float32, e.g. ``kernel_covariance = 1e100 I``) would store a zero or
    subnormal diagonal (every distance ~0, ``log_prob`` ``-inf`` at the training points, a checkpoint the
    module refuses to load), one below ``1 / max`` an infinite one. The core's rule and message for a
    precision that does not fit its dtype (:func:`anomstats._patch_kernels.precision_fault`,
    :func:`~anomstats._patch_kernels.unrepresentable_error`): the kernel's precision ``L Lᵀ`` has diagonal
    entries about ``1/h²`` for its bandwidths ``h`` (the square roots of ``variances``, the diagonal of ``H``).
    """
    stored = whitening.to(dtype)
    if bool(torch.isfinite(stored).all()):
        fault = precision_fault(stored.diagonal().double().cpu().numpy(), torch.finfo(dtype))
    else:
        fault = "precision_overflow"
    if fault is None:
        return
    scale = fault_scale(fault, variances.double().cpu().numpy())
    where = "the kernel (bw_transform is its Cholesky factor)"
    raise unrepresentable_error(where, torch.finfo(dtype), fault, scale, _scale_remedy(dtype))


#: Exponents above this (kernel values above e^-12 ≈ 6e-6) are recomputed from direct differences after
#: the expanded-square product (see :func:`_refine_near_pairs`).
_REFINE_ABOVE = -12.0


def _refine_near_pairs(block: Tensor, queries: Tensor, train: Tensor) -> None:
    """Recompute in float64, by direct differences, the exponents of the pairs that carry the sum.

    The product route's exponent ``y·t − |y|²/2 − |t|²/2`` is off by about ``eps·(|y|² + |t|²)`` in
    absolute terms, which is the relative error of that pair's kernel value: in float32 about 1.5e-5 for
    points three standard deviations out, whatever the distance between them. Where the sum is carried by
    a few pairs (a query at a training point, where the own pair is 1) that error does not average out.
    Recomputing the pairs above ``exp(-12)`` as ``-|y − t|²/2`` in float64 leaves them exact to rounding of
    the stored coordinates, and the remaining pairs' error is at most ``n·e^-12·eps·(|y|² + |t|²)`` of a sum
    that holds at least one pair of value 1 at a training point (4e-6 for n = 40000 in float32). Only the
    float32 route needs it (float64's eps makes the product route exact enough); data-dependent, so the
    traced/exported graph (:meth:`GaussianKDE._logsumexp_rows`) does without.
    """
    if block.dtype != torch.float32:
        return
    # Find the rows holding such pairs first, from each row's maximum (one cheap reduction): a comparison
    # and nonzero over the whole tile cost 1.4 ns per pair on one thread, three times the product itself,
    # and most rows of a typical query batch have no pair that close.
    near_rows = torch.nonzero(block.amax(dim=1) > _REFINE_ABOVE).flatten()
    if near_rows.numel() == 0:
        return
    sub_rows, cols = torch.nonzero(block[near_rows] > _REFINE_ABOVE, as_tuple=True)
    rows = near_rows[sub_rows]
    d = queries.shape[1] - 2  # the augmented operands carry two extra columns
    diff = queries[rows, :d].double() - train[cols, :d].double()
    block[rows, cols] = (-0.5 * diff.square().sum(dim=1)).to(block.dtype)


def _whitening_factor(covariance: Tensor, factor: float = 1.0) -> Tensor:
    """Lower-triangular ``L`` with ``L @ L.T == inv(factor**2 * covariance)`` (float64).

    The one path for both forms of the kernel covariance ``H``: scipy's ``factor**2 * cov(dataset)``
    (``covariance`` the data's) and an explicit ``kernel_covariance`` (``factor=1``, exact). The factor
    scales the triangular result, as the core scales its Cholesky factor, rather than ``H`` itself.

    This is the lower Cholesky factor of the inverse bandwidth matrix, as anomalib stores it, but obtained
    without forming an explicit inverse: with ``J`` the exchange matrix and ``J C J = R R^T`` (lower ``R``),
    ``L = J R^{-T} J``. Only a triangular solve is needed, which is accurate and stable.
    """
    d = covariance.shape[0]
    reversed_factor, info = torch.linalg.cholesky_ex(covariance.flip(0, 1))
    if int(info) != 0:
        raise LinAlgError(SINGULAR_DATA)  # a ValueError, as before; the core KDE's message
    eye = torch.eye(d, dtype=covariance.dtype, device=covariance.device)
    inverse = torch.linalg.solve_triangular(reversed_factor, eye, upper=False)
    return inverse.mT.flip(0, 1) / factor


class GaussianKDE(DynamicBufferModule):
    """Gaussian kernel density estimate with anomalib's buffers, correct for data of any mean.

    Buffers (anomalib's names and meaning, so checkpoints load both ways with ``strict=True``):

    - ``bw_transform`` (D, D): lower-triangular ``L`` with ``L @ L.T`` the inverse of the bandwidth
      matrix ``H = factor**2 * cov(dataset)`` (Scott's ``factor = N ** (-1 / (D + 4))`` by default), or
      of the explicit ``kernel_covariance``;
    - ``dataset`` (N, D): the training points in whitened coordinates, ``dataset @ L``;
    - ``norm`` (0-d): ``prod(diag(L)) * (2*pi) ** (-D / 2)``, i.e. ``1 / sqrt(det(2*pi*H))``. Stored as
      anomalib stores it, so it is ``inf`` (or 0) where the normaliser is beyond the buffer dtype's range
      (tightly clustered data in float32: std 1e-3 in D = 16 gives ~1e41); the densities never use it there
      (see the notes on normalisation).

    The density of a query ``x`` is ``norm * mean_i exp(-||x @ L - dataset_i||**2 / 2)``, exactly
    anomalib's formula, and the same as :class:`scipy.stats.gaussian_kde` with the same bandwidth.

    Parameters
    ----------
    dataset : torch.Tensor, optional
        Training points (N, D); when given, the module is fitted at construction.
    bw_method : {"scott", "silverman", "cv_ml"}, float or callable, optional
        Bandwidth factor rule (``None``, the default, is Scott's, as anomalib uses), the factor itself, or a
        callable taking this module and returning the factor: the rules, their validation and messages are
        :func:`anomstats.bandwidth.bandwidth_factor`'s (unweighted: ``neff = N``). ``"cv_ml"`` selects, at
        fit time, the factor maximising the leave-one-out likelihood
        (:func:`anomstats.bandwidth.cv_ml_factor` on the dataset as float64 NumPy: the same factor as
        ``anomstats.GaussianKDE(dataset.T, bw_method="cv_ml")``; O(N**2 D) per step, on the CPU).
    kernel_covariance : torch.Tensor or array_like (D, D), optional
        An explicit kernel covariance ``H`` used instead of ``factor**2 * cov(dataset)`` (e.g.
        ``numpy.diag(h**2)`` for the per-dimension bandwidths ``h`` of
        :func:`anomstats.bandwidth.cv_ml_bandwidths`). Real, finite, symmetric, positive definite:
        validated by :func:`anomstats.bandwidth.check_kernel_covariance` (its ``ValueError`` and message),
        its shape against ``D`` at fit. Exclusive with ``bw_method``. Configuration, not fitted state: it
        is not in the state dict (the buffers hold everything the densities need). As for the core, the
        dataset then needs no more points than dimensions (its covariance is not used).
    chunk_bytes : int, default 64 MiB
        Upper bound on the temporaries of one block of the (queries x training points) kernel matrix.
        On CPU blocks are further limited to cache-sized tiles (256 query rows; 3 MiB, or 0.75 MiB with one
        intra-op thread); on GPU the whole budget is used. While tracing/exporting, the batch axis is not split (the graph must
        hold for every batch size): training points are blocked for a nominal 64-row batch, so peak
        temporaries grow with the batch size there.

    Attributes
    ----------
    bw_method : str, float or callable or None
        The rule as given (``"scott"`` when left at the default); ``None`` with a ``kernel_covariance``.
    kernel_covariance : numpy.ndarray or None
        The explicit kernel covariance as float64 NumPy (after a fit, the core's validated, read-only
        copy), or ``None``.
    factor : float or None
        The bandwidth factor of the last :meth:`fit`; ``None`` before one, with a ``kernel_covariance``,
        and after ``load_state_dict`` (a checkpoint holds only the buffers).

    Notes
    -----
    Deliberate differences from anomalib 2.7's ``GaussianKDE`` (its defects, fixed):

    - **Centring.** anomalib stores the whitened *centred* data but does not centre the queries, so its
      densities are wrong unless the training mean is ~0. This module stores the whitened *uncentred* data
      ``X @ L`` (the same buffer, same meaning for the forward pass): its densities are right for any mean,
      anomalib loading this module's checkpoint computes the right densities too, and this module loading
      an anomalib checkpoint reproduces anomalib's numbers (right whenever anomalib's are, i.e. for
      centred training data such as PCA output).
    - The constructor with a dataset works (anomalib's raises ``KeyError``); inputs are never modified
      (anomalib's ``cov`` centres its argument in place).
    - No Python loop over query rows: the kernel sums are chunked matrix products, so ``torch.jit.trace``
      at one batch size is correct at every batch size (anomalib's trace scores only the first row).
    - :meth:`log_prob` gives log-densities by log-sum-exp, finite where the density underflows; the
      density itself is computed as anomalib does and, where the plain sum underflows, as
      ``exp(log_prob)`` (so it is 0 only where the true density is below the dtype's range).
    - dtype: computations run in float64 if the module or the input is float64, else in float32
      (float16/bfloat16 inputs, and the buffers of a module cast by ``module.half()``, are computed in
      float32); the result has that dtype, except that a bfloat16 input gets bfloat16 back from both methods
      and a float16 input gets float16 back from :meth:`log_prob` (one rounding), so the layers after the
      module get what they expect under ``model.half()``. :meth:`forward` returns float16 input's densities in
      the working dtype (float32, or float64 for a float64 module): densities exceed float16's range
      routinely (DFKDE's are ~1e9; float16 ends at 65504), so rounding them would give inf. ``fit`` stores
      its buffers in the same promoted dtype on the dataset's device (as anomalib assigns them).
    - Clear errors for N <= D, non-finite and singular data (anomalib: a bare Cholesky error, or, for a
      feature that is a linear combination of others, often none: densities of 1e5-1e6). Singular data are
      found by the core's rank test (:func:`anomstats.bandwidth.check_data_covariance`, with the eps of the
      data's dtype), so exactly collinear, duplicated or constant features are refused in every draw, float32
      and float64 alike, with the core KDE's ``numpy.linalg.LinAlgError`` and message (naming the feature).
    - **Normalisation in the log domain.** Densities use the log-normaliser, ``log norm`` from the buffer
      where it is a normal finite number and otherwise ``-(D log 2π)/2 + Σ log diag(L)`` from
      ``bw_transform`` (:meth:`_log_norm`), never the product of the diagonal: ``log_prob`` is finite
      wherever the exact log-density is (94.7 for std-1e-3 data in D = 16, float32, where anomalib's and
      the former ``norm``-based path gave ``inf``), and ``forward`` overflows only where the true density
      exceeds the dtype's range.
    - **Bad and far queries.** In eager mode NaN or infinite features raise the core KDE's ``ValueError``
      (``features must contain only finite values ...``; anomalib returns NaN). Finite features at any
      distance score 0 / ``-inf`` where their whitened squared distance overflows the dtype (beyond about
      1.8e19 bandwidths in float32, where the exact log-density is below ``-max/2``), never NaN (anomalib,
      and this module before, gave NaN at ``|x|`` ≈ 1e19 in float32); gradients stay finite there (0) and
      at the training points. Traced and exported graphs (``torch.jit.trace``, ``torch.export``, ONNX)
      cannot raise on values: they skip the check, a query holding NaN or infinity scores NaN there (never
      a plausible number), and far finite queries score 0 / ``-inf`` as in eager mode.
    - **Checkpoints are checked before they load**: ``bw_transform`` (D, D) finite with a positive diagonal,
      ``dataset`` (N, D) finite, ``norm`` 0-d (:meth:`_check_state_consistency`); a mismatch raises
      ``RuntimeError`` and leaves the module unchanged (anomalib accepts them and fails later with raw
      torch errors).
    - ``fit`` detaches its input: the buffers are fitted statistics, never part of an autograd graph
      (anomalib's would hold the graph, which makes ``copy.deepcopy`` of the module fail). ``forward``
      and ``log_prob`` are differentiable with respect to the queries.
    - Device: ``fit`` computes on the dataset's device and stores the buffers there; ``forward`` and
      ``log_prob`` compute on the buffers' device (queries are moved there) and return results there.
    - ``cov`` takes numpy.cov's ``rowvar``, ``bias``, ``ddof`` and ``aweights`` (keyword-only) with numpy's
      values and exceptions; it always returns (D, D), also for one variable (numpy: 0-d).
    - Boolean datasets and features are taken as 0 and 1, as the core KDE takes boolean data and points.

    Accuracy at the training points (float32): the expanded square ``y·t − |y|²/2 − |t|²/2`` is off by
    about ``eps·(|y|² + |t|²)``, which does not average out where one pair carries the sum (a query at a
    training point); eager evaluation recomputes the pairs whose kernel value exceeds ``e^-12`` from direct
    differences in float64, so float32 densities stay within 1e-5 of float64 scipy there (3e-7 measured on
    DFKDE-like features, against 1e-5 before). Traced and exported graphs keep the plain product.

    Accuracy: while the module holds its own fit (buffers set by :meth:`fit`, not assigned by hand), it also keeps (outside the state dict, as non-persistent
    buffers) the data mean and the centred whitened data, and evaluates with exact centring: float64
    results agree with :class:`anomstats.GaussianKDE` to ~1e-12 relative for any mean. After
    ``load_state_dict`` only the stored ``X @ L`` is available; queries and data are then shifted by its
    centroid, which is exact up to rounding of the stored values: a relative error of about
    ``eps * |mean| / bandwidth`` times the whitened distance (in float32 that is ~1e-5 for a mean of
    100 standard deviations; centre such data, or use float64, if that matters).

    Speed and memory: eager calls without gradients keep the training side of the sums (the centred,
    augmented training points: ``N·(D + 2)`` values, float64 for a float32 module on the CPU, where the
    product runs in float64) and reuse it while the buffers are the same tensors, unmodified (version
    counters; buffers made under ``torch.inference_mode`` have none and are never kept). Building it costs
    ``O(N·D)`` per call, a third of a one-thread forward of 256 queries against 40000 points. ``fit``,
    loads, moves and casts drop it; copies and pickles leave it behind. Writes that bypass the version
    counter are not seen: change buffers through the module (``fit``, ``load_state_dict``, assignment, or
    in-place ops on the buffers themselves), not through ``buffer.data``'s in-place ops, ``.numpy()`` views or
    another process's shared memory.

    Examples
    --------
    >>> import torch
    >>> from anomstats_torch import GaussianKDE
    >>> g = torch.Generator().manual_seed(0)
    >>> train = torch.randn(500, 2, generator=g, dtype=torch.float64) + 100.0
    >>> kde = GaussianKDE(train)
    >>> kde.dataset.shape, kde.bw_transform.shape, kde.norm.shape
    (torch.Size([500, 2]), torch.Size([2, 2]), torch.Size([]))
    >>> queries = torch.tensor([[100.0, 100.0], [110.0, 100.0]], dtype=torch.float64)
    >>> [f"{v:.4f}" for v in kde(queries).tolist()]
    ['0.1523', '0.0000']
    >>> [f"{v:.2f}" for v in kde.log_prob(queries).tolist()]  # finite where the density underflows
    ['-1.88', '-238.44']
    """

    bw_transform: Tensor
    dataset: Tensor
    norm: Tensor
    # Class-level default: modules pickled before the operand was kept have no such attribute.
    _kept_training: tuple[_TrainingKey, _TrainingSide] | None = None

    def __init__(
        self,
        dataset: Tensor | None = None,
        *,
        bw_method: BwMethod = None,
        kernel_covariance: Tensor | Any | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        super().__init__()
        # None is the default (Scott's) so that an explicit rule next to an explicit H is detected, as the
        # core KDE detects it, and in the core's order: this check before the rule's.
        if kernel_covariance is not None and bw_method is not None:
            raise ValueError(BW_METHOD_AND_KERNEL_COVARIANCE)
        rule = resolve_bw_method(bw_method)  # the core's rules and message
        if rule is not None and not (isinstance(rule, str) or callable(rule)):
            check_factor(rule)
        self.bw_method: BwMethod = "scott" if rule is None and kernel_covariance is None else bw_method
        self.chunk_bytes = check_memory_budget(chunk_bytes, "chunk_bytes")
        self.kernel_covariance: np.ndarray | None = None
        if kernel_covariance is not None:
            self.kernel_covariance = _as_numpy(kernel_covariance)
            if dataset is None and self.kernel_covariance.ndim == 2:
                # D is not known before the fit: check all but the size now (squareness, values) so that a
                # bad H fails here. With a dataset, the fit below checks it against the data's D at once.
                self.kernel_covariance = check_kernel_covariance(
                    self.kernel_covariance, self.kernel_covariance.shape[0]
                )
        self.factor: float | None = None
        self.register_buffer("bw_transform", torch.empty(0))
        self.register_buffer("dataset", torch.empty(0))
        self.register_buffer("norm", torch.empty(0))
        # Not in the state dict (anomalib's keys only): the fit's data mean and centred whitened data, used
        # while they belong to the current buffers; they make far-from-zero data exact (see Notes).
        self.register_buffer("_centre", torch.empty(0), persistent=False)
        self.register_buffer("_centred", torch.empty(0), persistent=False)
        self._kept_training = None  # see _training_side
        if dataset is not None:
            self.fit(dataset)

    # ------------------------------------------------------------------ fitting
    def _factor(self, x64: Tensor) -> float:
        n, d = x64.shape
        if isinstance(self.bw_method, str) and self.bw_method == "cv_ml":
            # The core's selection on the same float64 values in the core's (d, n) layout, unweighted, with
            # the same memory budget: the factor the core KDE selects (bandwidth_factor refuses 'cv_ml'
            # without the data).
            factor = cv_ml_factor(x64.cpu().numpy().T, memory_budget=self.chunk_bytes)
        else:
            factor = bandwidth_factor(self.bw_method, n, d, self)  # the core's rule resolution
        check_factor(factor)
        return float(factor)

    def fit(self, dataset: Tensor) -> None:
        """Fit the estimate to ``dataset`` (N, D); the input is not modified.

        The covariance, Cholesky factor and whitening are computed in float64 on the dataset's device,
        then stored in the working dtype (see the class notes).

        With ``bw_method="cv_ml"`` the factor is selected here, on the CPU (the dataset is copied there
        once); with a ``kernel_covariance``, that ``H`` is checked against the dataset's ``D`` and used.

        Parameters
        ----------
        dataset : torch.Tensor
            Training points, one per row, with more rows than columns (at least one row with an explicit
            ``kernel_covariance``).

        Raises
        ------
        ValueError
            If ``dataset`` is not 2-D, is empty, holds a single number, has more columns than rows (without
            ``kernel_covariance``; :func:`anomstats._validation.check_kde_data_shape`, scipy's condition and
            message) or holds NaN/inf; if
            ``kernel_covariance`` does not fit it (the core's messages); for ``"cv_ml"``, the selection's faults
            (e.g. duplicated points, which make the likelihood unbounded); if the kernel's scale is beyond the
            stored dtype's range (float32: a bandwidth above about 8.5e37, whose ``bw_transform`` would hold a
            zero or subnormal diagonal, or below about 2.9e-39), naming the scale and the remedy (rescale the
            data, or fit in float64): the core's message (:func:`anomstats._patch_kernels.unrepresentable_error`).
        numpy.linalg.LinAlgError
            (a ``ValueError``) If the data lie in a subspace to rounding: a feature that is constant, or a linear
            combination of the others (collinear, duplicated), in the data's own dtype; as many rows as
            columns always do (N points span at most N - 1 dimensions). The core KDE's rank test
            and message (:func:`anomstats.bandwidth.check_data_covariance`), naming the feature; the buffers
            are left as they were.
        """
        x = as_float_tensor(dataset, "dataset").detach()  # fitted statistics, not a graph: see Notes
        if x.ndim != 2:
            raise ValueError(f"dataset must be 2-D (N points, D dimensions), got shape {tuple(x.shape)}")
        n, d = x.shape
        explicit = self.kernel_covariance is not None
        if n == 0 or d == 0:
            raise ValueError(
                f"dataset must hold at least one point of at least one dimension, got shape {tuple(x.shape)}"
            )
        # The core's rules and messages: more dimensions than points is scipy's ValueError (unless an explicit
        # H makes the data covariance unnecessary); as many points as dimensions reach the rank test below,
        # which refuses them (LinAlgError), as in the core and scipy; a single number is too few.
        check_kde_data_shape(d, n, explicit)
        if n * d == 1:
            raise ValueError(TOO_FEW_ELEMENTS)
        if not is_tracing() and not bool(torch.isfinite(x).all()):
            raise ValueError(NON_FINITE_DATA)  # the core KDE's message
        store_dtype = working_dtype(self.bw_transform.dtype, x.dtype)
        x64 = x.to(torch.float64)
        centre = x64.mean(dim=0)
        factor: float | None
        if explicit:
            kernel = check_kernel_covariance(self.kernel_covariance, d)  # the core's check, now with D
            self.kernel_covariance = kernel
            factor = None
            # np.array: a writable copy (the core's array is read-only, which torch.from_numpy warns about).
            kernel64 = torch.from_numpy(np.array(kernel)).to(x64.device)
            whitening = _whitening_factor(kernel64)
            variances = kernel64.diagonal()
        else:
            covariance = self.cov(x64.mT)
            # The core KDE's rank test (on the D x D covariance and the D means, as float64 NumPy) with the eps
            # of the data's own dtype, before the bandwidth rule: data in a subspace (a feature that is a
            # combination of others, duplicated or constant) is refused for every rounding, with the core's
            # exception and message.
            check_data_covariance(
                covariance.cpu().numpy(),
                centre.cpu().numpy(),
                n,
                torch.finfo(x.dtype).eps if x.is_floating_point() else None,
            )
            factor = self._factor(x64)
            whitening = _whitening_factor(covariance, factor)
            variances = covariance.diagonal() * factor**2
        if not is_tracing():
            _check_whitening_fits(whitening, variances, store_dtype)  # before any buffer changes
        # L Lᵀ = H⁻¹, so log det H = −2 Σ log diag(L) (never the log of a product, which overflows).
        log_norm = gaussian_log_normaliser(d, -2.0 * torch.log(whitening.diagonal()).sum())
        self.bw_transform = whitening.to(store_dtype)
        self.dataset = (x64 @ whitening).to(store_dtype)
        self.norm = torch.exp(log_norm).to(store_dtype)
        self._centre = centre.to(store_dtype)
        self._centred = ((x64 - centre) @ whitening).to(store_dtype)
        self.factor = factor
        self._forget_training_side()

    #: What a consistent fitted state holds, for the message of :meth:`_check_state_consistency`.
    _STATE_LAYOUT = (
        "bw_transform (D, D) lower-triangular with a positive diagonal, dataset (N, D) with N >= 1, and a 0-d norm"
    )

    def _check_state_consistency(self, incoming: dict[str, Tensor]) -> None:
        """Refuse a checkpoint whose buffers do not fit together, before anything is loaded.

        Called by :class:`DynamicBufferModule`'s ``_load_from_state_dict`` with this module's incoming
        tensors (keys without the prefix; keys missing from the checkpoint are absent), before any buffer is
        resized. The state after the load (incoming tensors, and the module's own buffers for keys the
        checkpoint lacks, e.g. with ``strict=False``) must be either unfitted (all three empty) or a fit:
        ``bw_transform`` (D, D), finite, lower-triangular with a positive diagonal (a Cholesky factor: its
        log-diagonal is the log-normaliser); ``dataset`` (N, D), N >= 1, finite; ``norm`` 0-d (any value: an
        overflowed float32 ``norm`` is ``inf``, and the module then derives the normaliser from
        ``bw_transform``).

        The rules shared with the Gaussians' hooks are :mod:`anomstats_torch._checkpoints`'s: entries of a
        complex or boolean dtype are refused, naming the entry (:func:`~anomstats_torch._checkpoints.check_real`);
        sparse and quantized ones are checked by their dense values
        (:func:`~anomstats_torch._checkpoints.readable`); and the values are checked both as stored and in the
        dtype this module's buffers will give them (:func:`~anomstats_torch._checkpoints.target_dtype`): a
        float64 checkpoint whose ``dataset`` or ``bw_transform`` would load as ``inf`` into a float32 or float16
        module, or whose ``bw_transform`` diagonal would load as 0, is refused, saying to cast the module
        (e.g. ``.double()``) first.

        Raises
        ------
        RuntimeError
            :func:`anomstats._validation.inconsistent_state_error`: ``Error(s) in loading state_dict for
            GaussianKDE: inconsistent buffers: <what>; a fitted GaussianKDE holds <layout>. ...``, as torch's
            own ``load_state_dict`` raises ``RuntimeError`` for a size mismatch.
        """
        names = ("bw_transform", "dataset", "norm")
        if not any(name in incoming for name in names):
            return
        module, layout = type(self).__name__, self._STATE_LAYOUT

        def refuse(detail: str) -> None:
            raise inconsistent_state_error(module, detail, layout)

        current = {name: getattr(self, name) for name in names}
        for name, tensor in {**current, **incoming}.items():
            if name in names and not isinstance(tensor, Tensor):
                refuse(f"{name} is a {type(tensor).__name__}, not a tensor")
        _checkpoints.check_real(module, incoming, names, layout)
        # Sparse and quantized entries by their dense values (the load stages them into the buffers' dtype).
        state = {
            name: _checkpoints.readable(module, name, incoming[name], layout) if name in incoming else current[name]
            for name in names
        }
        bw, data, norm = state["bw_transform"], state["dataset"], state["norm"]
        if all(t.numel() == 0 and t.ndim == 1 for t in (bw, data, norm)):
            return  # an unfitted state (anomalib's empty buffers)
        shapes = ", ".join(f"{name} {tuple(state[name].shape)}" for name in names)
        if bw.ndim != 2 or bw.shape[0] != bw.shape[1] or bw.shape[0] == 0:
            refuse(f"bw_transform must be a non-empty square (D, D) matrix; got {shapes}")
        if data.ndim != 2 or data.shape[1] != bw.shape[0] or data.shape[0] == 0:
            refuse(f"dataset must be (N, {bw.shape[0]}) with N >= 1 to match bw_transform; got {shapes}")
        if norm.ndim != 0:
            refuse(f"norm must be 0-d (a scalar); got {shapes}")
        if "meta" in (bw.device.type, data.device.type):
            return  # shapes only: meta tensors hold no values
        if not bool(torch.isfinite(bw).all()) or not bool((bw.diagonal() > 0).all()):
            refuse("bw_transform must be finite with a positive diagonal (a Cholesky factor)")
        if bool((bw.triu(1) != 0).any()):
            # The normaliser is read from the diagonal: that is log det only for a triangular factor.
            refuse("bw_transform must be lower-triangular (a Cholesky factor: zeros above the diagonal)")
        if not _checkpoints.all_finite(data):
            refuse("dataset must be finite")
        # In the dtype the buffers will hold (torch's copy casts): a float64 1e300 is inf in float32, 1e-300 is 0.
        # The norm is not checked: it may be inf (or 0) in any dtype, and the densities then derive it from bw.
        target = _checkpoints.target_dtype(bw, current["bw_transform"]) if "bw_transform" in incoming else None
        if target is not None:
            stored = bw.to(target)
            if not bool(torch.isfinite(stored).all()) or not bool((stored.diagonal() > 0).all()):
                refuse(
                    f"bw_transform must be finite with a positive diagonal (a Cholesky factor) in this module's "
                    f"{target} buffers, but the checkpoint's {bw.dtype} values overflow it (largest "
                    f"{torch.finfo(target).max:.3g}) or underflow to 0 there; {_checkpoints.CAST_FIRST}"
                )
        target = _checkpoints.target_dtype(data, current["dataset"]) if "dataset" in incoming else None
        if target is not None and not _checkpoints.all_finite(data, target):
            refuse(_checkpoints.beyond_dtype("dataset", target))

    def _finish_state_load(self, incoming: dict[str, Tensor]) -> None:
        """After a successful load (:class:`DynamicBufferModule`'s hook): the loaded buffers define the model."""
        if not any(name in incoming for name in ("bw_transform", "dataset", "norm")):
            return  # nothing of this module was loaded (e.g. a partial parent checkpoint): keep the fit
        # Forget the centred copy and the factor of an earlier fit (they belong to other buffers now).
        self._forget_training_side()
        self._centre = torch.empty(0, dtype=self.dataset.dtype, device=self.dataset.device)
        self._centred = torch.empty(0, dtype=self.dataset.dtype, device=self.dataset.device)
        self.factor = None

    @staticmethod
    def cov(
        tensor: Tensor,
        *,
        rowvar: bool = True,
        bias: bool = False,
        ddof: int | None = None,
        aweights: Tensor | None = None,
    ) -> Tensor:
        """Covariance with :func:`numpy.cov` semantics: by default the unbiased covariance of the rows, as anomalib's.

        ``GaussianKDE.cov(x)`` is anomalib's call (``x`` (D, N): D variables, N observations); the
        keyword-only arguments are numpy's and mean what they mean there. The one kernel is the adapter's
        ``anomstats_torch._covariance.numpy_cov``, as for ``MultiVariateGaussian._cov`` (numpy's checks,
        exception types and messages for ``ddof`` and ``aweights``, from :mod:`anomstats._validation` and
        :mod:`anomstats._weights`): a non-integer ``ddof`` is a ``ValueError`` ("ddof must be integer"), a
        wrong number of weights a ``RuntimeError``, negative weights a ``ValueError``, weights summing to
        zero a ``ZeroDivisionError``, no degrees of freedom a ``RuntimeWarning`` and inf/NaN entries. Unlike
        anomalib's, the input is not centred in place.

        Parameters
        ----------
        tensor : torch.Tensor
            1-D (one variable) or 2-D observations; integer and bool input is computed in the default float
            dtype (float32).
        rowvar : bool, keyword-only, default True
            Each row is a variable (numpy's default and anomalib's layout); False: each column.
        bias, ddof : keyword-only
            Normalisation by N (``bias=True``) or ``N - ddof`` (default ``ddof = 1``), as numpy.
        aweights : torch.Tensor, keyword-only, optional
            Analytic weights, one per observation.

        Returns
        -------
        torch.Tensor
            (D, D) covariance, in the input's floating dtype. Always 2-D (anomalib's shape, which ``fit``
            relies on): numpy returns a 0-d array for a single variable, the same value.

        Examples
        --------
        >>> import torch
        >>> from anomstats_torch import GaussianKDE
        >>> x = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
        >>> GaussianKDE.cov(x)
        tensor([[ 1., -1.],
                [-1.,  1.]])
        >>> GaussianKDE.cov(x, aweights=torch.tensor([1.0, 1.0, 2.0]), bias=True)
        tensor([[ 0.6875, -0.6875],
                [-0.6875,  0.6875]])
        """
        result = numpy_cov(tensor, rowvar=rowvar, bias=bias, ddof=ddof, aweights=aweights)
        d = math.isqrt(result.numel())
        return result.reshape(d, d)

    # ------------------------------------------------------------------ evaluation
    def forward(self, features: Tensor) -> Tensor:
        """Densities of ``features`` (M, D) → (M,), on the module's device.

        Computed in float32 (float64 if the module or the input is), from buffers upcast for the computation
        (also those of a module cast by ``module.half()``); returned in the dtype of a bfloat16 input (one
        rounding), otherwise in the working dtype. A float16 input gets its densities in the working dtype
        (float32, or float64 for a float64 module), not float16: densities exceed float16's range routinely
        (DFKDE's are ~1e9, float16 ends at 65504), so rounding would give inf; :meth:`log_prob` returns
        float16 for it.

        Examples
        --------
        >>> import torch
        >>> from anomstats_torch import GaussianKDE
        >>> kde = GaussianKDE(torch.tensor([[0.0], [1.0], [2.0], [4.0]], dtype=torch.float64))
        >>> print(f"{kde(torch.tensor([[1.5]], dtype=torch.float64)).item():.4f}")
        0.1943
        """
        with static_shapes_while_tracing():
            densities = self._evaluate(features, log=False)
        if features.dtype == torch.float16:
            # Densities routinely exceed float16's range (DFKDE's are ~1e9): rounding to float16 would give inf.
            return densities
        return densities.to(result_dtype(features.dtype, densities.dtype))

    def log_prob(self, features: Tensor) -> Tensor:
        """Log-densities of ``features`` (M, D) → (M,), by log-sum-exp (finite far from the data).

        dtypes as :meth:`forward`, except that a float16 input gets float16 log-densities (``-inf`` below
        -65504).

        Examples
        --------
        >>> import torch
        >>> from anomstats_torch import GaussianKDE
        >>> kde = GaussianKDE(torch.tensor([[0.0], [1.0], [2.0], [4.0]]))
        >>> print(f"{kde.log_prob(torch.tensor([[500.0]])).item():.1f}")
        -73432.1
        """
        with static_shapes_while_tracing():
            log_densities = self._evaluate(features, log=True)
        return log_densities.to(result_dtype(features.dtype, log_densities.dtype))

    def _log_norm(self) -> Tensor:
        """log of the kernel normaliser ``norm`` (float64, 0-d): finite wherever ``bw_transform`` is.

        From the ``norm`` buffer where it holds a normal, finite number (one rounding of the fit's float64
        value); where it does not, because the normaliser is beyond the buffer dtype's range (``inf`` for
        tightly clustered data in float32, e.g. std 1e-3 in D = 16, or for DFKDE's ~1e9 in float16; 0 or
        subnormal for widely spread data in many dimensions), it is derived from ``bw_transform`` as
        anomalib defines ``norm``, ``prod(diag(L)) (2π)^(-D/2)``, in the log domain
        (:func:`anomstats._rules.gaussian_log_normaliser` of ``-2 Σ log diag(L)``, never the log of the
        product, which overflows). The two agree to rounding for every consistent checkpoint (anomalib's
        included): the derived value carries the rounding of D stored diagonal entries, the stored one a
        single rounding, hence the preference.
        """
        stored = torch.log(self.norm.to(torch.float64))
        diagonal = self.bw_transform.to(torch.float64).diagonal()
        derived = gaussian_log_normaliser(diagonal.shape[0], -2.0 * torch.log(diagonal).sum())
        usable = torch.isfinite(stored) & (self.norm.abs() >= torch.finfo(self.norm.dtype).tiny)
        # A tensor select, not a Python branch on the value: traced graphs keep both and choose at run time.
        return torch.where(usable, stored, derived)

    def _check_query(self, features: Tensor) -> Tensor:
        if self.dataset.ndim != 2 or self.dataset.shape[0] == 0:
            raise NotFittedError("GaussianKDE is not fitted yet; call fit(dataset) or load a state dict first")
        f = as_float_tensor(features, "features")
        d = self.dataset.shape[1]
        if f.ndim != 2 or f.shape[1] != d:
            raise ValueError(f"features must have shape (M, {d}) to match the fitted dataset, got {tuple(f.shape)}")
        # Eager only: a traced/exported graph cannot raise on values (and the meta device holds none), so
        # there NaN or infinite features give NaN (see the class notes).
        if not is_tracing() and f.device.type != "meta":
            require_finite_points(bool(torch.isfinite(f).all()), "features")  # the core KDE's message
        return f

    def _evaluate(self, features: Tensor, *, log: bool) -> Tensor:
        f = self._check_query(features)
        dtype = working_dtype(self.dataset.dtype, f.dtype)
        n_train = self.dataset.shape[0]
        whitening = self.bw_transform.to(dtype)
        f = f.to(device=whitening.device, dtype=dtype)
        # The fast path writes into a reused tile (out=...), which autograd refuses: when a gradient is
        # needed (queries or buffers that require grad) use the out-of-place streaming log-sum-exp. The meta
        # device (shape propagation) cannot run the fast path's data-dependent row selection.
        buffers = (self.bw_transform, self.dataset, self._centre, self._centred)
        needs_grad = torch.is_grad_enabled() and (f.requires_grad or any(b.requires_grad for b in buffers))
        fast = not (is_tracing() or needs_grad or f.device.type == "meta")
        train = self._training_side(dtype, fast=fast)
        # Both sides must be centred near the data so that the expanded squared distance
        # ||y||² + ||t||² - 2 y·t does not cancel catastrophically for data far from the origin.
        queries = (f - train.centre) @ whitening if train.own_fit else f @ whitening - train.centre
        # A query whose whitened squared norm overflows (or whose whitening overflowed to inf or NaN: a finite
        # query of |x| ~ 1e19 in float32) is beyond every kernel's reach: its log-density is below -max/2, so
        # it is -inf and the density 0. Such rows are scored as the origin and then overwritten, by tensor
        # selects (no Python branch, so traced graphs do the same), which also keeps their gradient 0.
        # The masks are formed without autograd: a gradient through inf * 0 would be NaN even where unselected.
        with torch.no_grad():
            lost = ~torch.isfinite((queries * queries).sum(1, keepdim=True))
            # All true in eager mode (checked); in traced graphs a NaN or infinite query scores NaN.
            given = torch.isfinite(f).all(dim=1)
        queries = torch.where(lost, torch.zeros_like(queries), queries)
        if train.wide:
            queries = queries.double()
        direct = train.direct
        if direct:
            lhs, rhs = queries, train.operand
        else:
            # Augmented operands: one product gives the kernel exponent -||y - t||² / 2 directly.
            squared = (queries * queries).sum(1, keepdim=True)
            lhs = torch.cat([queries, -0.5 * squared, torch.ones_like(queries[:, :1])], dim=1)
            rhs = train.operand
        # The log-normaliser, never the norm itself: finite wherever bw_transform is (see _log_norm).
        log_scale64 = self._log_norm() - math.log(n_train)
        log_scale = log_scale64.to(dtype)
        if not fast:
            lse = self._logsumexp_rows(lhs, rhs, direct=direct)
            result = lse + log_scale if log else torch.exp(lse + log_scale)
        else:
            result = self._evaluate_chunked(
                lhs, rhs, log_scale, log_scale64, log=log, direct=direct, out_dtype=dtype
            )
        beyond = torch.full_like(result, -math.inf if log else 0.0)
        result = torch.where(lost[:, 0], beyond, result)
        return torch.where(given, result, torch.full_like(result, math.nan))

    def _training_side(self, dtype: torch.dtype, *, fast: bool) -> _TrainingSide:
        """The training points' side of the kernel sums in ``dtype``: centre, route and product operand.

        It depends on the buffers alone, and costs O(N·D) per call (conversions, norms, the augmented
        operand: a third of a single-threaded forward of 256 queries against 40000 points). On the fast path
        it is kept, and reused while the buffers are the same tensors with the same version counters, so an
        in-place change, a reassignment, a load or a move is seen (inference tensors have no counter: never
        kept). Traced graphs and gradients build it afresh, in the graph.
        """
        key = self._training_key(dtype) if fast else None
        if key is not None:  # only the fast path reads or writes the kept operand (compiled graphs never do)
            kept = self._kept_training
            if kept is not None and _same_key(kept[0], key):
                return kept[1]
            self._kept_training = None  # the old operand goes before the new one is built
        if self._centred.shape == self.dataset.shape:
            # Own fit: exact centring in data space (as precise as the NumPy core).
            train = self._centred.to(dtype)
            own_fit, centre = True, self._centre.to(dtype)
        else:
            # Loaded buffers: shift by the centroid of the stored whitened data.
            train = self.dataset.to(dtype)
            own_fit, centre = False, train.mean(dim=0)
            train = train - centre
        # float64 at small D: direct differences, as the NumPy core (see _direct_exponent); so too, in eager mode,
        # data spread too wide for the expanded square's rounding (the core's rule, product_route_is_accurate;
        # a traced graph cannot branch on values and keeps the product).
        direct = train.shape[1] <= DIRECT_MAX_D and dtype == torch.float64
        if not direct and not is_tracing() and train.device.type != "meta" and train.shape[0]:
            direct = not product_route_is_accurate(float((train * train).sum(1).max()))
        # float32 on the CPU's fast path: the exponents come from float64 operands and a float64 product, exact
        # to eps64·(|y|² + |t|²), so no pair needs refining, and are rounded once into the float32 tile that
        # exp works on. On one thread that costs 1.2 ns per pair (the float64 product and the rounding copy)
        # against 1.9 ns for a float32 product followed by the search for near pairs to refine.
        wide = fast and not direct and dtype == torch.float32 and train.device.type == "cpu"
        if wide:
            train = train.double()
        if not direct:
            # Augmented: with the queries' [y, -|y|²/2, 1], one product gives the exponent -||y - t||² / 2.
            ones = torch.ones_like(train[:, :1])
            train = torch.cat([train, ones, -0.5 * (train * train).sum(1, keepdim=True)], dim=1)
        side = _TrainingSide(own_fit, centre, direct, wide, train)
        if key is not None:
            self._kept_training = (key, side)
        return side

    def _training_key(self, dtype: torch.dtype) -> _TrainingKey | None:
        """What identifies the buffers the training side was built from (None: do not keep it)."""
        buffers = (self.dataset, self._centre, self._centred)
        if any(buffer.is_inference() for buffer in buffers):
            return None
        # The objects themselves (not their ids, which a new tensor may reuse), their in-place versions, and
        # where their values live: ``buffer.data = other`` swaps the storage but keeps the version counter.
        return dtype, tuple((buffer, _placement(buffer)) for buffer in buffers)

    def _forget_training_side(self) -> None:
        self._kept_training = None

    def _apply(self, fn: Any, recurse: bool = True) -> GaussianKDE:
        # .to(), .cuda(), .double(): the kept operand belongs to the old tensors; let them go now.
        self._forget_training_side()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        # Pickled and deep-copied modules leave the kept operand behind (it is rebuilt on first use).
        state = dict(super().__getstate__())
        state["_kept_training"] = None
        return state

    def _train_chunk(self, rows: int, itemsize: int) -> int:
        """Training points per block, so that a (rows x block) kernel matrix fits the budget."""
        if is_tracing():
            rows = TRACE_PLANNING_ROWS  # the batch size is symbolic: plan for a nominal one
        return rows_per_chunk(rows * itemsize, self.chunk_bytes, self.dataset.shape[0])

    def _logsumexp_rows(self, lhs: Tensor, rhs: Tensor, *, direct: bool = False) -> Tensor:
        """log(sum_j exp(lhs_i · rhs_j)) for every row i, streaming over blocks of training points.

        With ``direct``, ``lhs`` and ``rhs`` are the queries and training points themselves and the
        exponent is ``-||lhs_i - rhs_j||² / 2`` (:func:`_direct_exponent`). Only the training axis (fixed by
        the buffers) is split, so this is safe to trace.
        """
        itemsize = lhs.element_size() * (2 if direct else 1)  # direct: a difference besides each block
        block = self._train_chunk(1 if is_tracing() else lhs.shape[0], itemsize)
        floor = exp_floor(_numpy_dtype(lhs.dtype))
        best = torch.full_like(lhs[:, 0], -math.inf)  # the largest exponent so far (-inf: none finite yet)
        running_sum = torch.zeros_like(lhs[:, 0])
        zero = torch.zeros_like(running_sum)
        for start in range(0, rhs.shape[0], block):
            chunk = rhs[start : start + block]
            exponent = _direct_exponent(lhs, chunk) if direct else lhs @ chunk.mT
            new_best = torch.maximum(best, exponent.amax(dim=1))
            found = torch.isfinite(new_best)
            # Rows whose exponents are all -inf so far (squared distances that overflowed) shift by 0 and
            # add nothing: -inf minus -inf would be NaN, and their clamped terms are no kernel's value.
            shift = torch.where(found, new_best, zero)
            terms = torch.exp((exponent - shift[:, None]).clamp_(min=floor)).sum(dim=1)
            rescale = torch.where(torch.isfinite(best), torch.exp(best - shift), zero)
            running_sum = running_sum * rescale + torch.where(found, terms, zero)
            best = new_best
        found = torch.isfinite(best)
        # The largest term is exp(0) = 1 where any exponent was finite; elsewhere every kernel underflows:
        # -inf (through a select, and a log of 1 in the unselected branch, so that gradients stay finite).
        lse = torch.where(found, best, zero) + torch.log(torch.where(found, running_sum, torch.ones_like(running_sum)))
        return torch.where(found, lse, torch.full_like(lse, -math.inf))

    def _evaluate_chunked(
        self,
        lhs: Tensor,
        rhs: Tensor,
        log_scale: Tensor,
        log_scale64: Tensor,
        *,
        log: bool,
        direct: bool = False,
        out_dtype: torch.dtype | None = None,
    ) -> Tensor:
        n_queries, n_train = lhs.shape[0], rhs.shape[0]
        out_dtype = lhs.dtype if out_dtype is None else out_dtype
        itemsize = torch.finfo(out_dtype).bits // 8
        out = torch.empty(n_queries, dtype=out_dtype, device=lhs.device)
        if n_queries == 0:
            return out
        # Below this, a plain sum of exponentials may have lost terms to underflow: redo those rows with
        # the max-shifted log-sum-exp (rare: queries far from every training point).
        trusted = float(trusted_sum_floor(_numpy_dtype(out_dtype), n_train))  # n_train unit weights
        # The density's scale norm / n, formed in float64 and rounded once: exp(log_scale) would carry the
        # rounding of log_scale, eps·|log norm| relative (1.4e-6 in float32 when the normaliser is 1e10).
        scale = torch.exp(log_scale64).to(out_dtype)
        # Where norm / n is beyond the dtype's range (inf, or 0 / subnormal), the plain sums are scaled in the
        # log domain, in float64, and rounded once: the density overflows only where it exceeds the range.
        info = torch.finfo(out_dtype)
        scale_in_logs = not (info.tiny <= float(scale) < math.inf)
        floor = exp_floor(_numpy_dtype(out_dtype))
        if lhs.device.type == "cpu":
            # Cache-sized tiles, reused: ~3x faster than budget-sized blocks that spill out of cache.
            query_block = min(n_queries, _CPU_TILE_ROWS)
            one_thread = torch.get_num_threads() == 1
            tile_bytes = min(self.chunk_bytes, _CPU_TILE_BYTES_ONE_THREAD if one_thread else _CPU_TILE_BYTES)
        else:
            query_block = rows_per_chunk(n_train * itemsize, self.chunk_bytes, n_queries)
            tile_bytes = self.chunk_bytes
        # Wide exponents (float32 on the CPU, see _evaluate): float64 operands, a float64 product tile, and
        # the float32 tile that exp works on.
        wide_exponents = lhs.dtype != out_dtype
        # direct: a second tile holds the coordinate differences (D > 1), within the same budget; wide
        # exponents: a float64 tile besides the float32 one.
        tiles = 2 if direct and lhs.shape[1] > 1 else 3 if wide_exponents else 1
        train_block = rows_per_chunk(query_block * itemsize * tiles, tile_bytes, n_train)
        tile = torch.empty(query_block, train_block, dtype=out.dtype, device=lhs.device)
        scratch = torch.empty_like(tile) if tiles == 2 else None
        wide = torch.empty(query_block, train_block, dtype=torch.float64) if wide_exponents else None
        for q0 in range(0, n_queries, query_block):
            q_lhs = lhs[q0 : q0 + query_block]
            sums = torch.zeros_like(q_lhs[:, 0])
            for t0 in range(0, n_train, train_block):
                t_rhs = rhs[t0 : t0 + train_block]
                block = tile[: q_lhs.shape[0], : t_rhs.shape[0]]
                if direct:
                    spare = None if scratch is None else scratch[: q_lhs.shape[0], : t_rhs.shape[0]]
                    _direct_exponent(q_lhs, t_rhs, out=block, scratch=spare)
                elif wide is not None:
                    exponents = wide[: q_lhs.shape[0], : t_rhs.shape[0]]
                    torch.mm(q_lhs, t_rhs.mT, out=exponents)
                    block.copy_(exponents)
                else:
                    torch.mm(q_lhs, t_rhs.mT, out=block)
                    _refine_near_pairs(block, q_lhs, t_rhs)
                sums += block.clamp_(min=floor).exp_().sum(dim=1)
            if log:
                block_out = torch.log(sums) + log_scale
            elif scale_in_logs:
                block_out = torch.exp(torch.log(sums).double() + log_scale64).to(lhs.dtype)
            else:
                block_out = sums * scale
            redo = torch.nonzero(~(sums > trusted)).flatten()
            if redo.numel():
                lse = self._logsumexp_rows(q_lhs[redo], rhs, direct=direct)
                block_out[redo] = lse + log_scale if log else torch.exp(lse.double() + log_scale64).to(lhs.dtype)
            out[q0 : q0 + query_block] = block_out
        return out

    def extra_repr(self) -> str:
        if self.dataset.ndim == 2:
            return f"n_points={self.dataset.shape[0]}, n_features={self.dataset.shape[1]}"
        return "not fitted"
