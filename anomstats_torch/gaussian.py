"""Per-patch multivariate Gaussian (PaDiM) as a torch module: a drop-in for anomalib's ``MultiVariateGaussian``.

Every scalar and shape rule comes from the NumPy core: the ridge, the covariance normalisation and its
degrees-of-freedom policy, Chan's pairwise merge (:mod:`anomstats._rules`), the validation vocabulary
(shapes, observations, finiteness, budgets, not fitted: :mod:`anomstats._validation`) and the low-rank
form's forms, width, singularity rule and messages (:mod:`anomstats._low_rank`). Covariance accumulation,
batched Cholesky, the low-rank bases and Mahalanobis scoring run as batched torch operations on the tensors'
device, chunked over patches under a memory budget (the low-rank kernels: :mod:`anomstats_torch._low_rank`).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from anomstats._low_rank import check_definite, check_form, low_rank_width, needs_ridge_message, no_advantage_message
from anomstats._packed import packed_length
from anomstats._rules import DEFAULT_RIDGE, chan_merge_weights, covariance_normalisation, degrees_of_freedom
from anomstats._validation import (
    DTypeError,
    NotFittedError,
    check_ddof,
    check_fit_shape,
    check_memory_budget,
    check_patch_score_shape,
    check_positive_int,
    check_ridge,
    describe_patch,
    require_finite,
    require_observations,
)
from anomstats._weights import as_analytic_weights

from ._policy import (
    DEFAULT_CHUNK_BYTES,
    TRACE_PLANNING_ROWS,
    as_float_tensor,
    is_tracing,
    result_dtype,
    rows_per_chunk,
    static_shapes_while_tracing,
    storage_dtype,
    working_dtype,
)
from .dynamic_buffer import DynamicBufferModule
from . import _compact
from . import _distributed
from . import _low_rank

__all__ = ["MultiVariateGaussian", "LowRankMultiVariateGaussian", "PackedMultiVariateGaussian"]


def _precision_into(covariance: Tensor, out: Tensor, first_patch: int, spatial: tuple[int, ...]) -> Tensor:
    """Write the symmetric inverses of a stack of SPD matrices into ``out``, through Cholesky factors.

    ``Σ = L Lᵀ`` (batched ``cholesky_ex``), then ``Σ⁻¹ = L⁻ᵀ L⁻¹`` with ``L⁻¹`` from a batched triangular
    solve: on CPU about twice as fast as ``torch.cholesky_inverse`` for PaDiM's sizes, equally accurate.
    The result is symmetrised (``(P + Pᵀ) / 2``) so that it is exactly symmetric.
    """
    factor, info = torch.linalg.cholesky_ex(covariance)
    bad = torch.nonzero(info).flatten()
    if bad.numel():
        where = describe_patch(int(bad[0]) + first_patch, spatial)
        raise ValueError(
            f"the regularised covariance at {where} is not positive definite ({bad.numel()} patch(es) in "
            "this chunk); check the embedding for degenerate values or increase ridge"
        )
    eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device).expand_as(factor)
    factor_inv = torch.linalg.solve_triangular(factor, eye, upper=False)
    # Half the product (scaling by 0.5 is exact), then P/2 + (P/2)ᵀ: symmetric bit for bit, one pass.
    half = torch.baddbmm(factor_inv, factor_inv.mT, factor_inv, beta=0.0, alpha=0.5)
    return torch.add(half, half.mT, out=out)


def _as_patches(x: Tensor) -> Tensor:
    """(B, C, *spatial) → (B, C, P) without copying when possible (no spatial axes: one patch)."""
    return x.unsqueeze(2) if x.ndim == 2 else x.flatten(2)


def _centred_patches(vectors: Tensor, mean: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, C, p) slice minus its (C, p) mean → a (p, B, C) view ready for batched products, in ``dtype``.

    The copy goes to a (B, p, C) buffer: each image's (C, p) block is transposed in cache, about 4x
    faster than gathering straight into patch-major order; BLAS reads the (p, B, C) view with strides.
    """
    batch, channels, patches = vectors.shape
    if torch.is_grad_enabled() and (vectors.requires_grad or mean.requires_grad):
        # out= is refused by autograd: same values, out of place, so gradients flow (e.g. to the scored input).
        return (vectors.transpose(1, 2).to(dtype) - mean.mT.to(dtype)).permute(1, 0, 2)
    out = torch.empty(batch, patches, channels, dtype=dtype, device=vectors.device)
    torch.sub(vectors.transpose(1, 2), mean.mT, out=out)
    return out.permute(1, 0, 2)


def _prod(sizes: tuple[int, ...]) -> int:
    result = 1
    for size in sizes:
        result *= size
    return result


def _entries(prefix: str) -> str:
    """How a message names the checkpoint entries of a module loaded under ``prefix``."""
    return f"the checkpoint's entries under {prefix!r}" if prefix else "the checkpoint's entries"


def _pack_chunks(dense: Tensor, dtype: torch.dtype, chunk_bytes: int) -> Tensor:
    """Packed upper triangles (P, C·(C+1)/2) in ``dtype`` of a dense stack (P, C, C), chunk by chunk."""
    patches, channels = dense.shape[0], dense.shape[-1]
    out = torch.empty(patches, packed_length(channels), dtype=dtype, device=dense.device)
    block = rows_per_chunk(channels * channels * 16, chunk_bytes, patches)  # two float64-wide triangles and more
    for p0 in range(0, patches, block):
        out[p0 : p0 + block] = _compact.pack(dense[p0 : p0 + block], dtype)
    return out


def _unpack_chunks(packed: Tensor, channels: int, dtype: torch.dtype, device: torch.device, chunk_bytes: int) -> Tensor:
    """The dense stack (P, C, C) in ``dtype`` on ``device`` of packed triangles (P, C·(C+1)/2), chunk by chunk."""
    patches = packed.shape[0]
    out = torch.empty(patches, channels, channels, dtype=dtype, device=device)
    index = _compact.unpack_index(channels, packed.device)
    block = rows_per_chunk(channels * channels * 8, chunk_bytes, patches)
    for p0 in range(0, patches, block):
        out[p0 : p0 + block] = _compact.unpack(packed[p0 : p0 + block], channels, index)
    return out


def _check_against_mean(key: str, channels: int, patches: int, mean: Any) -> None:
    """A precision entry for C features and P patches must match a checkpoint's (C, P) ``mean``, if any."""
    if isinstance(mean, Tensor) and mean.ndim == 2 and tuple(mean.shape) != (channels, patches):
        raise ValueError(
            f"{key} holds {patches} patch(es) of {channels} features but the checkpoint's mean has shape "
            f"{tuple(mean.shape)} (C, H*W)"
        )


def _check_mean_finite(mean: Tensor) -> None:
    # Any NaN/inf in the data makes its mean non-finite: one cheap check on (C, P) instead of a full pass.
    require_finite(
        bool(torch.isfinite(mean).all()), "embedding",
        remedy="remove or replace the NaN or infinite values before fitting (or rescale values so large that "
        "their mean overflows)",
    )


class MultiVariateGaussian(DynamicBufferModule):
    """A Gaussian per spatial patch, fitted batched: mean (C, P) and precision (P, C, C), as PaDiM uses.

    Buffers (anomalib's names, layout and meaning): ``mean`` (C, H·W) and ``inv_covariance`` (H·W, C, C),
    the inverse of ``cov + ridge·I`` with the unbiased per-patch covariance over the batch.

    Parameters
    ----------
    n_features, n_patches : int, optional
        anomalib 0.x's constructor: pre-size the buffers (``mean`` zeros (n_features, n_patches),
        ``inv_covariance`` identities) so 0.x checkpoints load; fitting another shape replaces them. Omit
        both (anomalib >= 1.0) to start with empty buffers that take their shape at fit or load time.
    ridge : float, default ``anomstats.gaussian.DEFAULT_RIDGE`` (0.01 + 1e-5, as anomalib 2.x)
        Added to the covariance diagonal before inversion.
    chunk_bytes : int, default 64 MiB
        Budget for the temporaries of one chunk of patches (fit, update, compute, mahalanobis).
    accumulate_dtype : torch.float64 or torch.float32, default torch.float64
        dtype of the streaming moments kept by :meth:`update` (float64: a (P, C, C) float64 stack).
    form : {"dense", "low_rank"}, keyword-only, default "dense"
        ``"low_rank"``: the exact low-rank form for fewer images than features (PaDiM with
        wide_resnet50, C = 550, and a few hundred images), with buffers ``mean`` (C, P), ``basis``
        (P, C, r), ``eigenvalues`` (P, r) and ``ridge`` (0-d), ``r = min(B - 1, C)``, instead of
        ``inv_covariance`` (P, C, C); the constructor then returns a :class:`LowRankMultiVariateGaussian`.
        Checked by the core's :func:`anomstats._low_rank.check_form`.
    storage : {"dense", "packed"}, keyword-only, default "dense"
        ``"packed"``: the precision buffer is ``inv_covariance_packed`` (H·W, C·(C+1)/2), the upper triangle of
        each symmetric precision row by row (half the bytes of ``inv_covariance``, in checkpoints and in
        exported graphs), unpacked chunk by chunk while scoring; the constructor then returns a
        :class:`PackedMultiVariateGaussian`. Dense form only.

    Notes
    -----
    Deliberate differences from anomalib 2.7 (its defects, fixed):

    - batched over patches (no Python loop over H·W), chunked under ``chunk_bytes``: temporaries stay
      bounded instead of several full (P, C, C) stacks;
    - precision from a Cholesky factor ``Σ = L Lᵀ`` (batched ``cholesky_ex``; ``Σ⁻¹ = L⁻ᵀ L⁻¹`` with ``L⁻¹``
      from a batched triangular solve, about 2x faster on CPU than ``cholesky_inverse``), exactly
      symmetric, instead of an explicit ``inv``; within float32 tolerance of anomalib's numbers;
    - B < 2 raises a clear error (anomalib silently gives NaN);
    - dtype policy (:mod:`anomstats_torch._policy`): computations run in float64 if the module or the input
      is float64, otherwise in float32 (float16/bfloat16 inputs and buffers of a module cast by
      ``module.half()`` / ``module.to(torch.bfloat16)`` are upcast to float32); fitted buffers are stored in
      that dtype on the embedding's device, except that a module cast to half precision keeps its dtype
      (computed in float32, rounded once when stored), as PaDiM's own anomaly map, which reads the buffers,
      needs under ``model.half()`` (anomalib silently turns float64 into float32 and fails on half input);
    - ``mahalanobis`` returns (B, H, W) (PaDiM's map without the singleton channel), in the dtype of a
      half-precision input (rounded once from float32), otherwise in the working dtype.
    - :meth:`compact_state_dict` stores the precision in half the bytes (packed upper triangles, or
      float16/bfloat16); this module loads those checkpoints with ``load_state_dict`` (see the method).
    - ``fit`` and ``update`` detach their input: the buffers are fitted statistics, never part of an
      autograd graph (anomalib's would hold the graph, which also makes ``copy.deepcopy`` of the module
      fail). ``mahalanobis`` is differentiable with respect to the scored embedding.

    Devices: ``fit``/``update`` compute on the embedding's device and store there (as anomalib assigns its
    buffers); ``mahalanobis`` computes on the buffers' device and returns the map there. With
    torch.distributed on NCCL, keep the streamed moments on the rank's CUDA device.

    Memory: a fit holds the embedding, the outputs (``mean`` and one (P, C, C) stack) and temporaries
    bounded by ``chunk_bytes``; streaming holds the moments (one (P, C, C) stack in ``accumulate_dtype``)
    and, in :meth:`compute` under torch.distributed, one more for the all-reduce.

    Examples
    --------
    >>> import torch
    >>> from anomstats_torch import MultiVariateGaussian
    >>> g = torch.Generator().manual_seed(0)
    >>> emb = torch.randn(50, 3, 2, 2, generator=g)
    >>> mvg = MultiVariateGaussian()
    >>> mean, inv_cov = mvg.fit(emb)
    >>> tuple(mean.shape), tuple(inv_cov.shape)
    ((3, 4), (4, 3, 3))
    >>> tuple(mvg.mahalanobis(emb[:5]).shape)
    (5, 2, 2)
    """

    mean: Tensor
    inv_covariance: Tensor

    def __init__(
        self,
        n_features: int | None = None,
        n_patches: int | None = None,
        *,
        ridge: float = DEFAULT_RIDGE,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        accumulate_dtype: torch.dtype = torch.float64,
        form: str = "dense",
        storage: str = "dense",
    ) -> None:
        super().__init__()
        if check_form(form) != "dense":  # only a subclass that is not LowRankMultiVariateGaussian gets here
            raise ValueError(f"{type(self).__name__} has form='dense', got form={form!r}")
        if _compact.check_storage(storage) != self._storage:  # likewise: a subclass of the other storage
            raise ValueError(f"{type(self).__name__} has storage={self._storage!r}, got storage={storage!r}")
        self._configure(n_features, n_patches, chunk_bytes, accumulate_dtype)
        self.form = form
        self.storage = storage
        self.ridge = check_ridge(ridge)
        if n_features is None:
            self.register_buffer("mean", torch.empty(0))
            self._register_precision(torch.empty(0))
        else:
            n_features = check_positive_int(n_features, "n_features")
            n_patches = check_positive_int(n_patches, "n_patches")
            self.register_buffer("mean", torch.zeros(n_features, n_patches))
            self._register_precision(torch.eye(n_features).repeat(n_patches, 1, 1))
        self.reset()

    #: How this class keeps its precision (``storage=``): anomalib's dense ``inv_covariance`` here.
    _storage = "dense"

    def __new__(cls, *args: Any, form: str = "dense", storage: str = "dense", **kwargs: Any) -> MultiVariateGaussian:
        # The low-rank form and the packed storage are classes of their own (as the low-rank form in the core);
        # choosing one is a constructor argument.
        if cls is MultiVariateGaussian:
            if check_form(form) == "low_rank":
                cls = LowRankMultiVariateGaussian
            elif _compact.check_storage(storage) == "packed":
                cls = PackedMultiVariateGaussian
        return super().__new__(cls)

    # ------------------------------------------------------------------ the precision's storage
    # Every access to the precision buffer goes through these, so that the packed storage
    # (PackedMultiVariateGaussian) overrides them and nothing else.
    def _register_precision(self, precision: Tensor) -> None:
        """Register the precision buffer, from a dense (P, C, C) stack (or an empty tensor)."""
        self.register_buffer("inv_covariance", precision)

    def _require_fitted(self) -> None:
        if self.mean.ndim != 2 or self.inv_covariance.ndim != 3:
            raise NotFittedError(
                "this MultiVariateGaussian is not fitted yet; call fit(embedding), update(batch) and compute(), "
                "or load a state dict first"
            )

    def _new_precision(self, patches: int, channels: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised precision store for ``patches`` patches of ``channels`` features."""
        return torch.empty(patches, channels, channels, dtype=dtype, device=device)

    def _store_bytes_per_patch(self, channels: int, work: torch.dtype, store: torch.dtype) -> int:
        """Temporaries of :meth:`_put_precision` per patch (beyond the covariance and its factor)."""
        return 0 if work == store else channels * channels * (torch.finfo(work).bits // 8)

    def _put_precision(self, store: Tensor, p0: int, p1: int, covariance: Tensor, spatial: tuple[int, ...]) -> None:
        """Write the precisions of the regularised covariances (p1 - p0, C, C) into patches p0:p1 of ``store``."""
        target = store[p0:p1]
        if covariance.dtype == target.dtype:
            _precision_into(covariance, target, p0, spatial)
        else:  # computed in the covariance's dtype, rounded once into the store's (float32 or a half module's)
            target.copy_(_precision_into(covariance, torch.empty_like(covariance), p0, spatial))

    def _set_fit(self, mean: Tensor, store: Tensor) -> list[Tensor]:
        self.mean = mean
        self.inv_covariance = store
        return [self.mean, self.inv_covariance]

    def _precision_reader(self, dtype: torch.dtype):
        """``read(p0, p1)``: the dense precisions of patches p0:p1 in ``dtype`` (for scoring)."""
        return lambda p0, p1: self.inv_covariance[p0:p1].to(dtype)

    def _dense_precision(self, dtype: torch.dtype | None) -> Tensor:
        """A dense (P, C, C) copy of the precision, in ``dtype`` (None: the buffer's)."""
        return self.inv_covariance.detach().to(self.inv_covariance.dtype if dtype is None else dtype, copy=True)

    def _packed_precision(self, dtype: torch.dtype | None) -> Tensor:
        """The packed (P, C·(C+1)/2) precision in ``dtype`` (None: the buffer's), chunk by chunk."""
        dense = self.inv_covariance.detach()
        return _pack_chunks(dense, dense.dtype if dtype is None else dtype, self.chunk_bytes)

    def _configure(
        self, n_features: int | None, n_patches: int | None, chunk_bytes: int, accumulate_dtype: torch.dtype
    ) -> None:
        """The checks and settings both forms share (the buffers are each form's own)."""
        if (n_features is None) != (n_patches is None):
            raise ValueError(
                "give both n_features and n_patches (anomalib 0.x form) or neither (anomalib >= 1.0 form), "
                f"got n_features={n_features!r}, n_patches={n_patches!r}"
            )
        if accumulate_dtype not in (torch.float32, torch.float64):  # the core's fault type and wording
            raise DTypeError(f"accumulate_dtype must be float64 or float32 (torch dtypes), got {accumulate_dtype!r}")
        self.chunk_bytes = check_memory_budget(chunk_bytes, "chunk_bytes")
        self.accumulate_dtype = accumulate_dtype

    # ------------------------------------------------------------------ checkpoints
    def _foreign_checkpoint(self, state_dict: dict[str, Any], prefix: str) -> str | None:
        """Why ``state_dict`` holds the other form's buffers (then it cannot load here), or None."""
        if prefix + "basis" in state_dict and prefix + "inv_covariance" not in state_dict:
            return (
                f"{_entries(prefix)} hold a low-rank Gaussian ({prefix}basis, {prefix}eigenvalues, {prefix}ridge), "
                "not a dense one (mean, inv_covariance): load it into MultiVariateGaussian(form='low_rank'), or "
                "convert it with that module's dense_state_dict() first"
            )
        return None

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        refusal = self._foreign_checkpoint(state_dict, prefix)
        if refusal is not None:
            # torch raises the collected messages whatever `strict` is: a half-loaded module is never left.
            error_msgs.append(refusal)
            return
        # The other storage's precision entry (a packed triangle for a dense module, a dense stack for a packed
        # one) is converted into this module's buffer, in the buffer's dtype and on its device.
        own, other = ("inv_covariance", _compact.PACKED_KEY)
        if self._storage == "packed":
            own, other = other, own
        converted = None
        if self.form == "dense" and prefix + other in state_dict:
            if prefix + own in state_dict:
                error_msgs.append(
                    f"{_entries(prefix)} hold both {prefix}{own} and {prefix}{other}: a checkpoint stores the "
                    "precision once; drop one of them"
                )
                return
            try:
                converted = self._convert_precision(state_dict[prefix + other], state_dict.get(prefix + "mean"), prefix + other)
            except (TypeError, ValueError) as exc:
                error_msgs.append(str(exc))
                return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if converted is not None:
            if prefix + own in missing_keys:
                missing_keys.remove(prefix + own)
            if prefix + other in unexpected_keys:
                unexpected_keys.remove(prefix + other)
            self._buffers[own] = converted

    def _convert_precision(self, incoming: Any, mean: Any, key: str) -> Tensor:
        """A packed checkpoint entry (P, C·(C+1)/2) unpacked into this module's buffer dtype and device."""
        if not isinstance(incoming, Tensor):
            raise TypeError(f"{key} must be a tensor, got {type(incoming).__name__}")
        channels = _compact.packed_features(incoming, key)
        _check_against_mean(key, channels, incoming.shape[0], mean)
        buffer = self.inv_covariance
        with torch.no_grad():
            return _unpack_chunks(incoming.detach(), channels, buffer.dtype, buffer.device, self.chunk_bytes)

    def compact_state_dict(self, format: str = "packed") -> dict[str, Tensor]:
        """This fit's checkpoint with the precision in about half the bytes (or a quarter): ``mean`` plus one entry.

        ``format``:

        - ``"packed"``: ``inv_covariance_packed`` (H·W, C·(C+1)/2), the upper triangle of each precision row by
          row (the core's packed layout), in the buffers' dtype: ``(C + 1)/(2C)`` of the dense bytes, restored
          bit for bit (the precision is exactly symmetric);
        - ``"float16"`` / ``"bfloat16"``: ``inv_covariance`` (H·W, C, C) rounded to that dtype: half the bytes
          of float32, restored with one rounding per entry (relative ``2**-11`` / ``2**-8``, and float16's
          subnormal spacing below 6.1e-5); float16 is refused (``ValueError``) where an entry would overflow
          (beyond 65504: only with a ridge below about 1.5e-5);
        - ``"packed_float16"`` / ``"packed_bfloat16"``: both, about a quarter of the float32 bytes.

        ``mean`` (C, H·W) is a copy in the buffers' dtype (a C-th of the precision's size). A module of this
        package loads every format with ``load_state_dict`` (``strict=True`` included): a packed entry is
        unpacked into ``inv_covariance`` (or kept packed by ``storage="packed"``), a half one is cast to the
        module's dtype by torch's copy. anomalib's own module loads the ``"float16"``/``"bfloat16"`` formats (same
        key, cast on load), not the packed ones: load those into this module and save its ``state_dict()``.
        The low-rank form is compact already and has no compact formats.

        Raises
        ------
        ValueError
            An unknown format name (the message lists the formats), or float16 overflow.
        """
        packed, dtype = _compact.check_compact_format(format)
        self._require_fitted()
        if packed:
            key, precision = _compact.PACKED_KEY, self._packed_precision(dtype)
        else:
            key, precision = "inv_covariance", self._dense_precision(dtype)
        if dtype == torch.float16 and not bool(torch.isfinite(precision).all()):
            raise ValueError(
                f"format={format!r}: the precision has entries beyond float16's range (|x| > 65504, ridge "
                f"{self.ridge}); use format='bfloat16' or 'packed_bfloat16' (float32's range) or 'packed' (exact)"
            )
        return {"mean": self.mean.detach().clone(), key: precision}

    # ------------------------------------------------------------------ numpy.cov
    @staticmethod
    def _cov(
        observations: Tensor,
        rowvar: bool = False,
        bias: bool = False,
        ddof: int | None = None,
        aweights: Tensor | None = None,
    ) -> Tensor:
        """Covariance with :func:`numpy.cov` semantics (``rowvar`` defaults to False), squeezed.

        Floating inputs keep their dtype (integers are computed in the default float dtype); with fewer
        degrees of freedom than 1 a ``RuntimeWarning`` is issued and the result is inf/NaN, as numpy's.
        As in numpy >= 2, a 2-D input with ``rowvar=False`` holds one observation per row even when it has
        a single row, and 1-D input is one variable for either ``rowvar`` (anomalib's gives NaN for 1-D
        input with ``rowvar=True``: a deliberate difference).

        Examples
        --------
        >>> import torch
        >>> from anomstats_torch import MultiVariateGaussian
        >>> obs = torch.tensor([[0.0, 2.0], [1.0, 1.0], [2.0, 0.0]])
        >>> MultiVariateGaussian._cov(obs)
        tensor([[ 1., -1.],
                [-1.,  1.]])
        """
        x = as_float_tensor(observations, "observations")
        if x.ndim > 2:
            raise ValueError(f"observations must be 1-D or 2-D, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            x = x.to(torch.get_default_dtype())
        # As numpy >= 2: a 2-D input is transposed for rowvar=False even with a single row (then it holds
        # one observation of several variables); only 1-D input is always one variable.
        if x.ndim < 2:
            x = x.reshape(1, -1)
        elif not rowvar:
            x = x.mT
        check_ddof(ddof, numpy_exact=True)
        if ddof is None:
            ddof = 0 if bias else 1
        n = x.shape[1]
        if aweights is None:
            mean = x.mean(dim=1, keepdim=True)
            dof = degrees_of_freedom(n, None, ddof)
            weighted = x - mean
        else:
            # numpy's checks, types and messages (anomstats._weights), on a host copy of the small vector.
            as_analytic_weights(as_float_tensor(aweights, "aweights").detach().cpu().double().numpy(), n)
            w = aweights.to(device=x.device, dtype=x.dtype)
            w_sum = w.sum()
            if float(w_sum) == 0.0:
                raise ZeroDivisionError("Weights sum to zero, can't be normalized")
            mean = (x * w).sum(dim=1, keepdim=True) / w_sum
            dof = degrees_of_freedom(float(w_sum), float((w * w).sum()), ddof)
            weighted = (x - mean) * w
        if dof <= 0:  # degrees_of_freedom warned, as numpy does; numpy's 1/0 gives inf/nan entries
            dof = 0.0
        return ((x - mean) @ weighted.mT / dof).squeeze()

    # ------------------------------------------------------------------ one-shot fit
    def fit(self, embedding: Tensor) -> list[Tensor]:
        """Fit mean and precision per patch of ``embedding`` (B, C, H, W); returns ``[mean, inv_covariance]``.

        Runs on the embedding's device, chunked over patches; the input is not modified. Computed in float32
        (float64 if the module or the input is), stored as the dtype policy says (see the class notes: a
        module cast to half precision keeps its dtype). Returns the buffers (with ``storage="packed"``:
        ``[mean, inv_covariance_packed]``).

        Raises
        ------
        ValueError
            For fewer than 2 embeddings, a wrong number of axes or non-finite values.
        """
        x = as_float_tensor(embedding, "embedding").detach()  # statistics, not a graph: see Notes
        # Clear errors for a bad rank and for B < 2 (anomalib silently returns NaN for one sample).
        batch, _, spatial = check_fit_shape(x.shape, name="embedding")
        dtype = working_dtype(self.mean.dtype, x.dtype)
        store = storage_dtype(self.mean.dtype, x.dtype)
        vectors = _as_patches(x)  # (B, C, P), a view for contiguous input
        _, channels, patches = vectors.shape
        mean = vectors.mean(dim=0, dtype=dtype)
        _check_mean_finite(mean)
        precision = self._new_precision(patches, channels, store, x.device)
        ridge = torch.eye(channels, dtype=dtype, device=x.device).mul_(self.ridge)
        itemsize = torch.finfo(dtype).bits // 8
        per_patch = (batch * channels + channels * channels * 5) * itemsize + self._store_bytes_per_patch(channels, dtype, store)
        block = rows_per_chunk(per_patch, self.chunk_bytes, patches)
        for p0 in range(0, patches, block):
            p1 = min(p0 + block, patches)
            centred = _centred_patches(vectors[:, :, p0:p1], mean[:, p0:p1], dtype)
            covariance = torch.baddbmm(ridge, centred.mT, centred, alpha=1.0 / covariance_normalisation(batch, None, 1))
            self._put_precision(precision, p0, p1, covariance, spatial)
        return self._set_fit(mean.to(store), precision)

    def forward(self, embedding: Tensor) -> list[Tensor]:
        """Same as :meth:`fit` (anomalib's ``forward`` fits)."""
        return self.fit(embedding)

    # ------------------------------------------------------------------ streaming fit
    def reset(self) -> None:
        """Forget the streaming moments accumulated by :meth:`update`."""
        self._count = 0
        self._running_mean: Tensor | None = None
        self._running_m2: Tensor | None = None
        self._input_dtype = torch.float32
        self._spatial: tuple[int, ...] = ()

    def update(self, embedding: Tensor) -> None:
        """Accumulate a batch (B, C, H, W) into the streaming moments (Chan et al.'s pairwise merge).

        Only the count, the per-patch mean (C, P) and the centred sum of products (P, C, C) are kept, in
        ``accumulate_dtype``; call :meth:`compute` to set the buffers. The input is not modified.
        """
        x = as_float_tensor(embedding, "embedding").detach()  # statistics, not a graph: see Notes
        batch, _, spatial = check_fit_shape(x.shape, min_observations=1, name="embedding")
        dtype = torch.float64 if x.dtype == torch.float64 else self.accumulate_dtype
        vectors = _as_patches(x)
        _, channels, patches = vectors.shape
        if self._running_mean is None:
            self._running_mean = torch.zeros(channels, patches, dtype=dtype, device=x.device)
            self._running_m2 = torch.zeros(patches, channels, channels, dtype=dtype, device=x.device)
        elif self._running_mean.shape != (channels, patches):
            raise ValueError(
                f"embedding has C={channels}, H*W={patches} but earlier updates had "
                f"C={self._running_mean.shape[0]}, H*W={self._running_mean.shape[1]}; call reset() first"
            )
        assert self._running_m2 is not None
        if not torch.is_inference_mode_enabled() and self._running_m2.is_inference():
            # Moments begun under torch.inference_mode cannot be updated in place outside it: copy them.
            self._running_mean = self._running_mean.clone()
            self._running_m2 = self._running_m2.clone()
        acc_dtype, device = self._running_mean.dtype, self._running_mean.device
        self._input_dtype = working_dtype(self._input_dtype, x.dtype)
        self._spatial = spatial
        vectors = vectors.to(device=device)
        batch_mean = vectors.mean(dim=0, dtype=acc_dtype)
        _check_mean_finite(batch_mean)
        delta = batch_mean - self._running_mean
        chan = chan_merge_weights(self._count, batch)
        per_patch = (batch * channels * 2 + channels * channels) * self._running_m2.element_size()
        block = rows_per_chunk(per_patch, self.chunk_bytes, patches)
        for p0 in range(0, patches, block):
            p1 = min(p0 + block, patches)
            centred = _centred_patches(vectors[:, :, p0:p1], batch_mean[:, p0:p1], acc_dtype)
            m2 = self._running_m2[p0:p1]
            m2.baddbmm_(centred.mT, centred)
            if chan.cross:
                step = delta[:, p0:p1].mT
                m2.baddbmm_(step.unsqueeze(2), step.unsqueeze(1), alpha=chan.cross)
        self._running_mean += delta * chan.mean_step
        self._count = int(chan.total)

    def compute(self) -> list[Tensor]:
        """Set the buffers from the streamed moments; returns ``[mean, inv_covariance]``.

        With :mod:`torch.distributed` initialised, the moments of every rank are all-reduced first (a
        collective: call it on every rank), so each rank gets the fit over all ranks' data. The local
        moments are left as they were, so more updates can follow.
        """
        count, mean, m2, wide_input = _distributed.global_moments(
            self._count, self._running_mean, self._running_m2, self._input_dtype == torch.float64
        )
        require_observations(count, name="compute: the stream", streamed=True, where="; call update() with more data")
        store = storage_dtype(self.mean.dtype, torch.float64 if wide_input else torch.float32)
        patches, channels = m2.shape[0], m2.shape[1]
        spatial = self._spatial if len(self._spatial) and _prod(self._spatial) == patches else (patches,)
        precision = self._new_precision(patches, channels, store, m2.device)
        per_patch = channels * channels * 3 * m2.element_size() + self._store_bytes_per_patch(channels, m2.dtype, store)
        block = rows_per_chunk(per_patch, self.chunk_bytes, patches)
        for p0 in range(0, patches, block):
            p1 = min(p0 + block, patches)
            covariance = m2[p0:p1] / covariance_normalisation(count, None, 1)
            covariance.diagonal(dim1=-2, dim2=-1).add_(self.ridge)
            self._put_precision(precision, p0, p1, covariance, spatial)
        # A copy: the running mean is updated in place by later update() calls, the buffer must not follow.
        return self._set_fit(mean.to(store, copy=True), precision)

    # ------------------------------------------------------------------ scoring
    def mahalanobis(self, embedding: Tensor) -> Tensor:
        """PaDiM's distance map ``sqrt(max(δᵀ Σ⁻¹ δ, 0))`` per patch → (B, H, W), batched on the module's device.

        Chunked over patches (an axis fixed by the buffers), so a ``torch.jit.trace`` at one batch size is
        correct at every batch size. Computed in float32 (float64 if the module or the input is), from
        buffers upcast chunk by chunk; returned in the dtype of a float16/bfloat16 input (one rounding), so
        that the layers after it (cast with the model by ``model.half()``) get what they expect, otherwise in
        the working dtype.

        Examples
        --------
        >>> import torch
        >>> from anomstats_torch import MultiVariateGaussian
        >>> mvg = MultiVariateGaussian(2, 1)  # identity precision, zero mean
        >>> mvg.mahalanobis(torch.tensor([[[[3.0]], [[4.0]]]]))
        tensor([[[5.]]])
        """
        with static_shapes_while_tracing():
            distances = self._mahalanobis(embedding)
        return distances.to(result_dtype(embedding.dtype, distances.dtype))

    def _mahalanobis(self, embedding: Tensor) -> Tensor:
        x = as_float_tensor(embedding, "embedding")
        self._require_fitted()
        channels, patches = self.mean.shape
        spatial = tuple(int(size) for size in x.shape[2:])
        check_patch_score_shape(tuple(x.shape), channels, patches)
        dtype = working_dtype(self.mean.dtype, x.dtype)
        vectors = _as_patches(x).to(device=self.mean.device)
        tracing = is_tracing()
        rows = TRACE_PLANNING_ROWS if tracing else max(1, x.shape[0])  # batch is symbolic when tracing
        per_patch = rows * channels * 3 * torch.empty((), dtype=dtype).element_size()
        block = rows_per_chunk(per_patch + channels * channels * 4, self.chunk_bytes, patches)
        precision = self._precision_reader(dtype)
        pieces = []
        for p0 in range(0, patches, block):
            p1 = min(p0 + block, patches)
            if tracing:  # shape-agnostic expression: the batch size stays symbolic in the graph
                delta = (vectors[:, :, p0:p1].to(dtype) - self.mean[:, p0:p1].to(dtype)).permute(2, 0, 1)
            else:
                delta = _centred_patches(vectors[:, :, p0:p1], self.mean[:, p0:p1].to(dtype), dtype)
            weighted = torch.matmul(delta, precision(p0, p1))
            pieces.append((weighted * delta).sum(dim=-1))  # (p, B)
        squared = torch.cat(pieces, dim=0)  # (P, B)
        if tracing:  # not a reshape of the transposed (B, P): its contiguity test would fix a batch of 1
            return squared.clamp(min=0).sqrt().reshape(spatial + (-1,)).movedim(-1, 0)
        return squared.mT.clamp(min=0).sqrt().reshape((-1,) + spatial)

    def extra_repr(self) -> str:
        if self.mean.ndim == 2:
            return f"n_features={self.mean.shape[0]}, n_patches={self.mean.shape[1]}, ridge={self.ridge}"
        return f"not fitted, ridge={self.ridge}"


def _refuse_distributed() -> None:
    """The low-rank form streams on one process: refuse where the dense form would all-reduce."""
    if _distributed._is_distributed():
        raise NotImplementedError(
            "form='low_rank' does not all-reduce streamed moments across torch.distributed ranks (the dense "
            "form's compute() does): gather the embeddings on one rank and call fit() there, stream them with "
            "the NumPy core's MultiVariateGaussian(form='low_rank').partial_fit, or use form='dense'"
        )


class LowRankMultiVariateGaussian(MultiVariateGaussian):
    """PaDiM's per-patch Gaussians in the exact low-rank form, for fewer images than features.

    Built by ``MultiVariateGaussian(form="low_rank", ...)``; the torch twin of the core's
    :class:`anomstats.gaussian.LowRankMultiVariateGaussian`. With B images of C features, ``r = min(B - 1, C)``
    (:func:`anomstats._low_rank.low_rank_width`), every patch's regularised covariance is exactly

        Σ = V diag(λ) Vᵀ + ρ (I − V Vᵀ),   λ_i = s_i² / (B − 1) + ρ,

    with ``V`` (C, r) the orthonormal basis of the patch's centred embeddings, ``s_i`` their singular values and
    ``ρ`` the ridge. The module keeps ``P·C·r`` numbers instead of anomalib's ``P·C²`` (C = 550, 64×64 patches,
    200 images: 1.8 GB in float32 instead of 5.0 GB), and no C×C matrix is formed while fitting or scoring.

    Buffers (persistent, in the module's working dtype): ``mean`` (C, H·W) (anomalib's layout), ``basis``
    (H·W, C, r) (orthonormal columns, by decreasing eigenvalue), ``eigenvalues`` (H·W, r) and ``ridge`` (0-d,
    the ρ of the fit). There is no ``inv_covariance`` buffer: :meth:`dense_state_dict` materialises anomalib's
    checkpoint for code that reads it (anomalib's PaDiM anomaly-map generator does).

    Parameters
    ----------
    n_features, n_patches : None
        anomalib 0.x's pre-sized buffers belong to the dense form (``r`` depends on the number of images);
        giving them raises ``ValueError``.
    ridge : float, default ``anomstats.gaussian.DEFAULT_RIDGE`` (0.01 + 1e-5, as anomalib 2.x)
        The ρ of :meth:`fit` and :meth:`compute` (the ``ridge`` buffer is the fitted or loaded state's ρ, which
        scoring uses). It must be positive when B <= C: the covariances are singular otherwise.
    chunk_bytes, accumulate_dtype
        As for :class:`MultiVariateGaussian`. The bases are computed in float64 whatever ``accumulate_dtype`` is.

    Notes
    -----
    - The basis comes from each patch's centred (C, B) embeddings in float64 on the embedding's device,
      chunked over patches under ``chunk_bytes``, by the core's algorithm: the B×B Gram's eigenpairs, with
      one Cholesky-QR pass where the first pass is not orthonormal to 256 eps (never a C×C covariance).
    - Distances: ``c = Vᵀδ``, ``d² = Σ c_i²/λ_i + |δ − V c|²/ρ``, the residual outside the basis formed as a
      vector (no ``|δ|² − |c|²`` cancellation); ``distance = sqrt(max(d², 0))`` as PaDiM. Traceable and
      exportable like the dense form (chunks run over the patches, an axis fixed by the buffers).
    - ``update``/``compute`` stream exactly: the state is a float64 (``accumulate_dtype``) scatter factor per
      patch, the centred batches as columns plus one Chan correction column per merge (reduced to ``V diag(s)``
      when it would pass C columns), so any split of the data gives the one-shot fit to rounding. Its size is
      about ``P·C·(B + number of batches)`` numbers. With torch.distributed initialised, ``update`` and
      ``compute`` raise ``NotImplementedError`` (the dense form all-reduces; this one does not).
    - dtype policy and devices: as :class:`MultiVariateGaussian` (buffers in float64 if the module or the input
      is float64, otherwise float32; fitted on the embedding's device, scored on the buffers').
    - ``ridge=0`` with B <= C raises the core's :class:`numpy.linalg.LinAlgError`; with ``B - 1 >= C`` the form
      has no advantage and a ``UserWarning`` says so (the results are still exact).

    Examples
    --------
    >>> import torch
    >>> from anomstats_torch import MultiVariateGaussian
    >>> g = torch.Generator().manual_seed(0)
    >>> emb = torch.randn(10, 30, 2, 2, generator=g)               # B = 10 < C = 30
    >>> low = MultiVariateGaussian(form="low_rank")
    >>> _ = low.fit(emb)
    >>> tuple(low.basis.shape), tuple(low.eigenvalues.shape)
    ((4, 30, 9), (4, 9))
    >>> dense = MultiVariateGaussian()
    >>> dense.load_state_dict(low.dense_state_dict())
    <All keys matched successfully>
    >>> bool(torch.allclose(low.mahalanobis(emb[:2]), dense.mahalanobis(emb[:2]), rtol=1e-4, atol=0))
    True
    """

    mean: Tensor
    basis: Tensor
    eigenvalues: Tensor
    ridge: Tensor  # type: ignore[assignment]  # the dense form's ridge is a float setting

    def __init__(
        self,
        n_features: int | None = None,
        n_patches: int | None = None,
        *,
        ridge: float = DEFAULT_RIDGE,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        accumulate_dtype: torch.dtype = torch.float64,
        form: str = "low_rank",
        storage: str = "dense",
    ) -> None:
        DynamicBufferModule.__init__(self)  # not the dense __init__: its buffers are not this form's
        if check_form(form) != "low_rank":
            raise ValueError(f"LowRankMultiVariateGaussian has form='low_rank', got form={form!r}")
        if _compact.check_storage(storage) != "dense":
            raise ValueError(
                "storage='packed' packs the dense form's precision (P, C, C); the low-rank form keeps no C×C "
                f"matrix (its basis and eigenvalues are compact already): use form='dense' with it, got storage={storage!r}"
            )
        if n_features is not None or n_patches is not None:
            raise ValueError(
                "n_features and n_patches (anomalib 0.x's pre-sized buffers) apply to form='dense' only: the "
                "low-rank buffers take their shapes at fit or load time (their rank depends on the number of "
                f"images); got n_features={n_features!r}, n_patches={n_patches!r}"
            )
        self._configure(None, None, chunk_bytes, accumulate_dtype)
        self.form = "low_rank"
        # The setting that fit()/compute() use, exact; the `ridge` buffer is the state's (cast to its dtype).
        self._fit_ridge = check_ridge(ridge)
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("basis", torch.empty(0))
        self.register_buffer("eigenvalues", torch.empty(0))
        self.register_buffer("ridge", torch.tensor(self._fit_ridge))
        self.reset()

    # ------------------------------------------------------------------ checkpoints
    def _foreign_checkpoint(self, state_dict: dict[str, Any], prefix: str) -> str | None:
        dense = prefix + "inv_covariance" in state_dict or prefix + _compact.PACKED_KEY in state_dict
        if dense and prefix + "basis" not in state_dict:
            return (
                f"{_entries(prefix)} hold a dense Gaussian ({prefix}mean, {prefix}inv_covariance), as anomalib "
                "saves it: the low-rank form (basis, eigenvalues) cannot be recovered from a precision matrix "
                "without refitting. Load it into MultiVariateGaussian() (form='dense'), or refit this module "
                "on the embeddings"
            )
        return None

    def dense_state_dict(self) -> dict[str, Tensor]:
        """anomalib's checkpoint of this fit: ``{"mean": (C, H·W), "inv_covariance": (H·W, C, C)}``.

        ``inv_covariance = V diag(1/λ − 1/ρ) Vᵀ + I/ρ`` is materialised in float64 chunk by chunk (under
        ``chunk_bytes``), exactly symmetric, and returned in the buffers' dtype (float32 by default, as
        anomalib) on their device; ``mean`` is a copy. A dense module (this package's or anomalib's) loads it
        with ``strict=True`` and scores the same distances within rounding. It holds ``P·C²`` numbers: the
        size the low-rank form avoids.
        """
        self._require_fitted()
        channels, patches = self.mean.shape
        width = self.basis.shape[2]
        ridge = float(self.ridge)  # the state's ρ, as scoring uses it
        precision = torch.empty(patches, channels, channels, dtype=self.basis.dtype, device=self.basis.device)
        per_patch = 8 * (3 * channels * channels + 2 * channels * width)
        block = rows_per_chunk(per_patch, self.chunk_bytes, patches)
        for p0 in range(0, patches, block):
            p1 = min(p0 + block, patches)
            precision[p0:p1] = _low_rank.precision_of(
                self.basis[p0:p1].to(_low_rank.FACTOR_DTYPE), self.eigenvalues[p0:p1].to(_low_rank.FACTOR_DTYPE), ridge
            )
        return {"mean": self.mean.detach().clone(), "inv_covariance": precision}

    def compact_state_dict(self, format: str = "packed") -> dict[str, Tensor]:
        """Not for the low-rank form: its state (``P·C·r`` numbers) is compact already; raises ``ValueError``."""
        raise ValueError(
            "compact_state_dict() stores the dense form's precision (P, C, C) in fewer bytes; the low-rank form is "
            "compact already (P*C*r numbers, no C×C matrix): save its state_dict() (or dense_state_dict() for anomalib)"
        )

    @property
    def log_det(self) -> Tensor:
        """``log det Σ = Σ log λ_i + (C − r) log ρ`` per patch, shape (H·W,), in the buffers' dtype."""
        self._require_fitted()
        return _low_rank.log_det_of(self.eigenvalues, self.ridge, self.mean.shape[0])

    def _require_fitted(self) -> None:
        if self.mean.ndim != 2 or self.basis.ndim != 3 or self.eigenvalues.ndim != 2:
            raise NotFittedError(
                "this MultiVariateGaussian(form='low_rank') is not fitted yet; call fit(embedding), update(batch) "
                "and compute(), or load a low-rank state dict first"
            )

    # ------------------------------------------------------------------ fitting
    def _width(self, n_observations: int, n_features: int) -> int:
        """``r`` for a fit of ``n_observations``, after the core's ridge rule and no-advantage warning."""
        if self._fit_ridge == 0 and n_observations <= n_features:
            raise np.linalg.LinAlgError(needs_ridge_message(n_observations, n_features))
        width = low_rank_width(n_observations, n_features)
        if width >= n_features:
            # stacklevel: _width <- _finish <- fit/compute <- the caller, whom the warning names
            warnings.warn(no_advantage_message(n_observations, n_features), UserWarning, stacklevel=4)
        return width

    def _finish(
        self, source, n_observations: int, mean: Tensor, n_columns: int, spatial: tuple[int, ...], dtype: torch.dtype
    ) -> list[Tensor]:
        """Set the buffers from ``mean`` (C, P) and the factors ``source(p0, p1)`` (p, C, k), chunk by chunk."""
        channels, patches = mean.shape
        width = self._width(n_observations, channels)
        device = mean.device
        basis = torch.empty(patches, channels, width, dtype=dtype, device=device)
        eigenvalues = torch.empty(patches, width, dtype=dtype, device=device)
        block = rows_per_chunk(_low_rank.basis_bytes_per_patch(channels, n_columns), self.chunk_bytes, patches)
        for p0 in range(0, patches, block):
            p1 = min(p0 + block, patches)
            chunk_basis, singular = _low_rank.basis_of_factor(source(p0, p1), width)
            chunk_eigenvalues = _low_rank.eigenvalues_of(singular, n_observations, self._fit_ridge)
            if self._fit_ridge == 0:  # the core's singularity rule, on this chunk's (small) eigenvalues
                check_definite(chunk_eigenvalues.cpu().numpy(), channels, 0.0, p0, spatial)
            basis[p0:p1] = chunk_basis
            eigenvalues[p0:p1] = chunk_eigenvalues
        # Copies (never the caller's or the stream's tensors), in the working dtype on the fit's device.
        self.mean = mean.to(dtype, copy=True)
        self.basis = basis
        self.eigenvalues = eigenvalues
        self.ridge = torch.tensor(self._fit_ridge, dtype=dtype, device=device)
        return [self.mean, self.basis, self.eigenvalues, self.ridge]

    def fit(self, embedding: Tensor) -> list[Tensor]:
        """Fit the low-rank Gaussians of ``embedding`` (B, C, H, W); returns ``[mean, basis, eigenvalues, ridge]``.

        Computed in float64 on the embedding's device, chunked over patches; the buffers are stored in the
        working dtype (a module cast to half precision keeps its dtype). The input is not modified.

        Raises
        ------
        ValueError
            Fewer than 2 embeddings, a wrong number of axes or non-finite values.
        numpy.linalg.LinAlgError
            ``ridge=0`` with B <= C (the core's message), or a numerically singular patch with ``ridge=0``.
        """
        x = as_float_tensor(embedding, "embedding").detach()  # statistics, not a graph
        batch, _, spatial = check_fit_shape(x.shape, name="embedding")
        dtype = storage_dtype(self.mean.dtype, x.dtype)  # computed in float64 (FACTOR_DTYPE), stored so
        vectors = _as_patches(x)
        mean = vectors.mean(dim=0, dtype=_low_rank.FACTOR_DTYPE)
        _check_mean_finite(mean)
        return self._finish(
            lambda p0, p1: _low_rank.centred_columns(vectors[:, :, p0:p1], mean[:, p0:p1]),
            batch, mean, batch, spatial, dtype,
        )

    # ------------------------------------------------------------------ streaming fit
    def reset(self) -> None:
        """Forget the streamed state accumulated by :meth:`update`."""
        self._moments: _low_rank.FactorMoments | None = None
        self._input_dtype = torch.float32
        self._spatial: tuple[int, ...] = ()

    def update(self, embedding: Tensor) -> None:
        """Fold a batch (B, C, H, W) into the streamed scatter factors; call :meth:`compute` to set the buffers.

        The state (count, means (C, P), factors (P, C, k)) is kept in ``accumulate_dtype`` (float64 for float64
        input) on the device of the first batch. The input is not modified.

        Raises
        ------
        NotImplementedError
            With torch.distributed initialised (see the class notes).
        """
        _refuse_distributed()
        x = as_float_tensor(embedding, "embedding").detach()
        batch, _, spatial = check_fit_shape(x.shape, min_observations=1, name="embedding")
        vectors = _as_patches(x)
        _, channels, patches = vectors.shape
        if self._moments is None:
            dtype = torch.float64 if x.dtype == torch.float64 else self.accumulate_dtype
            self._moments = _low_rank.FactorMoments(channels, patches, dtype, x.device, self.chunk_bytes)
        elif (self._moments.n_features, self._moments.n_patches) != (channels, patches):
            raise ValueError(
                f"embedding has C={channels}, H*W={patches} but earlier updates had "
                f"C={self._moments.n_features}, H*W={self._moments.n_patches}; call reset() first"
            )
        if not torch.is_inference_mode_enabled() and self._moments.factor.is_inference():
            # A state begun under torch.inference_mode cannot be updated in place outside it: copy it.
            self._moments = self._moments.clone()
        vectors = vectors.to(device=self._moments.mean.device)
        batch_mean = vectors.mean(dim=0, dtype=self._moments.mean.dtype)
        _check_mean_finite(batch_mean)  # before the state changes
        self._input_dtype = working_dtype(self._input_dtype, x.dtype)
        self._spatial = spatial
        self._moments.update(vectors, batch_mean)

    def compute(self) -> list[Tensor]:
        """Set the buffers from the streamed factors; returns ``[mean, basis, eigenvalues, ridge]``.

        The bases are computed in float64; the streamed state is left as it was, so more updates can follow.

        Raises
        ------
        NotImplementedError
            With torch.distributed initialised (see the class notes).
        """
        _refuse_distributed()
        moments = self._moments
        if moments is None:
            raise NotFittedError("no data: call update(embedding) before compute()")
        require_observations(
            moments.count, name="compute: the stream", streamed=True, where="; call update() with more data"
        )
        dtype = storage_dtype(self.mean.dtype, torch.float64 if self._input_dtype == torch.float64 else torch.float32)
        patches = moments.n_patches
        spatial = self._spatial if len(self._spatial) and _prod(self._spatial) == patches else (patches,)
        factor = moments.factor
        return self._finish(lambda p0, p1: factor[p0:p1], moments.count, moments.mean, factor.shape[2], spatial, dtype)

    # ------------------------------------------------------------------ scoring
    def _mahalanobis(self, embedding: Tensor) -> Tensor:
        x = as_float_tensor(embedding, "embedding")
        self._require_fitted()
        channels, patches = self.mean.shape
        width = self.basis.shape[2]
        spatial = tuple(int(size) for size in x.shape[2:])
        check_patch_score_shape(tuple(x.shape), channels, patches)
        dtype = working_dtype(self.mean.dtype, x.dtype)
        vectors = _as_patches(x).to(device=self.mean.device)
        tracing = is_tracing()
        rows = TRACE_PLANNING_ROWS if tracing else max(1, x.shape[0])  # batch is symbolic when tracing
        itemsize = torch.finfo(dtype).bits // 8
        per_patch = (rows * (3 * channels + 2 * width) + 2 * channels * width) * itemsize
        block = rows_per_chunk(per_patch, self.chunk_bytes, patches)
        ridge = self.ridge.to(dtype)
        pieces = []
        for p0 in range(0, patches, block):
            p1 = min(p0 + block, patches)
            mean = self.mean[:, p0:p1].to(dtype)
            if tracing:  # shape-agnostic expression: the batch size stays symbolic in the graph
                delta = (vectors[:, :, p0:p1].to(dtype) - mean).permute(2, 0, 1)
            else:
                delta = _centred_patches(vectors[:, :, p0:p1], mean, dtype)
            basis, eigenvalues = self.basis[p0:p1].to(dtype), self.eigenvalues[p0:p1].to(dtype)
            pieces.append(_low_rank.squared_distances(delta, basis, eigenvalues, ridge))  # (p, B)
        squared = torch.cat(pieces, dim=0)  # (P, B)
        if tracing:  # not a reshape of the transposed (B, P): its contiguity test would fix a batch of 1
            return squared.clamp(min=0).sqrt().reshape(spatial + (-1,)).movedim(-1, 0)
        return squared.mT.clamp(min=0).sqrt().reshape((-1,) + spatial)

    def extra_repr(self) -> str:
        if self.basis.ndim == 3:
            return (
                f"form='low_rank', n_features={self.mean.shape[0]}, n_patches={self.mean.shape[1]}, "
                f"rank={self.basis.shape[2]}, ridge={self._fit_ridge}"
            )
        return f"form='low_rank', not fitted, ridge={self._fit_ridge}"


class PackedMultiVariateGaussian(MultiVariateGaussian):
    """The dense per-patch Gaussians with the precision stored packed: ``MultiVariateGaussian(storage="packed")``.

    Buffers (persistent): ``mean`` (C, H·W), as anomalib's, and ``inv_covariance_packed`` (H·W, C·(C+1)/2), the
    upper triangle of each (exactly symmetric) precision row by row, the core's packed layout
    (:mod:`anomstats._packed`): ``(C + 1)/(2C)`` of the bytes of anomalib's ``inv_covariance`` in checkpoints and
    in exported graphs (C = 550, 64×64 patches: 2.48 GB instead of 4.96 GB in float32, under protobuf's 2 GiB
    limit per tensor after a further ``.to(torch.bfloat16)``, 1.24 GB). Fitting, streaming, the dtype policy and
    the numbers are the dense module's: the precision of each chunk of patches is computed as there and packed
    (so a fit never holds the dense stack), and :meth:`mahalanobis` unpacks chunk by chunk, by one ``Gather``
    with a constant index (traceable and exportable), then scores as the dense module does: the distances
    are the dense module's bit for bit.

    Checkpoints: ``state_dict()`` is ``compact_state_dict("packed")`` of a dense module, and loads into one; a
    dense checkpoint (this package's or anomalib's ``mean``/``inv_covariance``) loads into this module with
    ``strict=True`` and is packed on load (anomalib's explicit inverse is not exactly symmetric: its
    symmetric part is kept). For code that reads ``inv_covariance`` (anomalib's PaDiM anomaly map), the
    attribute unpacks the whole stack on each access (P·C² numbers, the dense size); assigning a (P, C, C)
    stack to it packs it. :meth:`dense_state_dict` gives anomalib's checkpoint.

    Examples
    --------
    >>> import torch
    >>> from anomstats_torch import MultiVariateGaussian
    >>> g = torch.Generator().manual_seed(0)
    >>> emb = torch.randn(50, 4, 3, 3, generator=g)
    >>> packed = MultiVariateGaussian(storage="packed")
    >>> _ = packed.fit(emb)
    >>> {name: tuple(t.shape) for name, t in packed.state_dict().items()}
    {'mean': (4, 9), 'inv_covariance_packed': (9, 10)}
    >>> dense = MultiVariateGaussian()
    >>> _ = dense.fit(emb)
    >>> torch.equal(packed.mahalanobis(emb[:2]), dense.mahalanobis(emb[:2]))
    True
    """

    mean: Tensor
    inv_covariance_packed: Tensor
    _storage = "packed"

    def __init__(
        self,
        n_features: int | None = None,
        n_patches: int | None = None,
        *,
        ridge: float = DEFAULT_RIDGE,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        accumulate_dtype: torch.dtype = torch.float64,
        form: str = "dense",
        storage: str = "packed",
    ) -> None:
        super().__init__(
            n_features, n_patches, ridge=ridge, chunk_bytes=chunk_bytes, accumulate_dtype=accumulate_dtype,
            form=form, storage=storage,
        )

    # ------------------------------------------------------------------ the precision's storage
    def _register_precision(self, precision: Tensor) -> None:
        packed = _compact.pack(precision) if precision.ndim == 3 else precision
        self.register_buffer(_compact.PACKED_KEY, packed)

    def _require_fitted(self) -> None:
        if self.mean.ndim != 2 or self.inv_covariance_packed.ndim != 2:
            raise NotFittedError(
                "this MultiVariateGaussian(storage='packed') is not fitted yet; call fit(embedding), update(batch) "
                "and compute(), or load a state dict first"
            )

    def _new_precision(self, patches: int, channels: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.empty(patches, packed_length(channels), dtype=dtype, device=device)

    def _store_bytes_per_patch(self, channels: int, work: torch.dtype, store: torch.dtype) -> int:
        # the chunk's dense precision, then its two gathered triangles (float32-wide at least)
        return channels * channels * (torch.finfo(work).bits // 8) + channels * (channels + 1) * 8

    def _put_precision(self, store: Tensor, p0: int, p1: int, covariance: Tensor, spatial: tuple[int, ...]) -> None:
        dense = _precision_into(covariance, torch.empty_like(covariance), p0, spatial)
        store[p0:p1] = _compact.pack(dense, store.dtype)  # exactly symmetric: its upper triangle, rounded once

    def _set_fit(self, mean: Tensor, store: Tensor) -> list[Tensor]:
        self.mean = mean
        self.inv_covariance_packed = store
        return [self.mean, self.inv_covariance_packed]

    def _precision_reader(self, dtype: torch.dtype):
        channels = self.mean.shape[0]
        index = _compact.unpack_index(channels, self.inv_covariance_packed.device)  # once per call
        return lambda p0, p1: _compact.unpack(self.inv_covariance_packed[p0:p1].to(dtype), channels, index)

    def _dense_precision(self, dtype: torch.dtype | None) -> Tensor:
        packed = self.inv_covariance_packed.detach()
        channels = _compact.packed_features(packed, _compact.PACKED_KEY)
        if dtype is None or dtype == packed.dtype:
            return _compact.unpack(packed, channels)
        return _unpack_chunks(packed, channels, dtype, packed.device, self.chunk_bytes)

    def _packed_precision(self, dtype: torch.dtype | None) -> Tensor:
        packed = self.inv_covariance_packed.detach()
        return packed.to(packed.dtype if dtype is None else dtype, copy=True)

    def _convert_precision(self, incoming: Any, mean: Any, key: str) -> Tensor:
        """A dense checkpoint entry (P, C, C) packed (its symmetric part) into this module's buffer dtype and device."""
        if not isinstance(incoming, Tensor):
            raise TypeError(f"{key} must be a tensor, got {type(incoming).__name__}")
        if incoming.ndim != 3 or incoming.shape[1] != incoming.shape[2]:
            raise ValueError(f"{key} must be a stack of square matrices (H*W, C, C), got shape {tuple(incoming.shape)}")
        _check_against_mean(key, incoming.shape[1], incoming.shape[0], mean)
        buffer = self.inv_covariance_packed
        with torch.no_grad():
            return _pack_chunks(incoming.detach(), buffer.dtype, self.chunk_bytes).to(buffer.device)

    # ------------------------------------------------------------------ anomalib's view
    @property
    def inv_covariance(self) -> Tensor:  # type: ignore[override]
        """The dense precision (H·W, C, C), unpacked on each access (P·C² numbers), for code that reads it.

        Before a fit: the empty buffer, as the dense module's ``inv_covariance`` (an error raised here would
        reach the caller as torch's "has no attribute").
        """
        packed = self.inv_covariance_packed
        if packed.ndim != 2 or self.mean.ndim != 2:
            return packed
        return _compact.unpack(packed, self.mean.shape[0])

    @inv_covariance.setter
    def inv_covariance(self, precision: Tensor) -> None:
        """Assigning a dense stack (P, C, C) packs its symmetric part into ``inv_covariance_packed``."""
        value = as_float_tensor(precision, "inv_covariance")
        if value.ndim != 3 or value.shape[1] != value.shape[2]:
            raise ValueError(f"inv_covariance must be a stack of square matrices (H*W, C, C), got shape {tuple(value.shape)}")
        self.inv_covariance_packed = _pack_chunks(value.detach(), value.dtype, self.chunk_bytes)

    def dense_state_dict(self) -> dict[str, Tensor]:
        """anomalib's checkpoint of this fit, ``{"mean", "inv_covariance"}``, in the buffers' dtype (copies)."""
        self._require_fitted()
        return {"mean": self.mean.detach().clone(), "inv_covariance": self._dense_precision(None)}

    def extra_repr(self) -> str:
        return super().extra_repr() + ", storage='packed'"
