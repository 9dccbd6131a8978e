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

from anomstats._low_rank import (
    check_definite,
    check_form,
    check_representable,
    low_rank_width,
    needs_ridge_message,
    no_advantage_message,
)
from anomstats._packed import packed_length
from anomstats._patch_kernels import (
    fault_scale,
    feature_scale,
    non_finite_fit_error,
    not_definite_error,
    patch_rank_eps,
    precision_fault,
    raise_non_finite_query,
    singular_feature,
    singular_patch_error,
    unrepresentable_error,
)
from anomstats._rules import DEFAULT_RIDGE, covariance_normalisation
from anomstats._validation import (
    DTypeError,
    NotFittedError,
    check_bool,
    check_fit_shape,
    check_memory_budget,
    check_patch_score_shape,
    check_positive_int,
    check_ridge,
    describe_patch,
    require_finite,
    require_observations,
)

from ._policy import (
    DEFAULT_CHUNK_BYTES,
    TRACE_PLANNING_ROWS,
    as_float_tensor,
    is_tracing,
    numpy_dtype,
    result_dtype,
    rows_per_chunk,
    static_shapes_while_tracing,
    storage_dtype,
    working_dtype,
)
from .dynamic_buffer import ADOPT_KEY, DynamicBufferModule
from . import _checkpoints
from . import _compact
from . import _covariance
from . import _distributed
from . import _low_rank
from . import _streaming

__all__ = ["MultiVariateGaussian", "LowRankMultiVariateGaussian", "PackedMultiVariateGaussian"]


#: How the adapter's faults of a fit tell the user what to do (it has no shrinkage, and computes in float64 when
#: asked by ``module.double()`` or float64 embeddings).
_SINGULAR_HINT = (
    "remove or combine the dependent features, or increase ridge (a larger ridge makes every patch definite)"
)
_WIDER_REMEDY = (
    "or compute and store in float64: module.double() or float64 embeddings (and, for update(), "
    "accumulate_dtype=torch.float64)"
)


def _rank_eps(data_dtype: torch.dtype, working: torch.dtype) -> float:
    """The core's eps of an unregularised patch's rank test (:func:`anomstats._patch_kernels.patch_rank_eps`)."""
    data_eps = torch.finfo(data_dtype).eps if data_dtype.is_floating_point else None
    return patch_rank_eps(data_eps, numpy_dtype(working))


def _scale_remedy(dtype: torch.dtype) -> str:
    """What to do about features whose scale ``dtype`` cannot represent."""
    return "rescale the embedding (e.g. divide it by its typical scale)" + (
        "" if dtype == torch.float64 else ", " + _WIDER_REMEDY
    )


def _first_lost_variance(
    m2: Tensor, channels: int, scale: float, ridge: float, centre: tuple[Tensor, Tensor], count: int,
    spatial: tuple[int, ...],
) -> tuple[int, ValueError | None]:
    """``(p, error)``: the first patch of narrow sums ``m2`` holding a variance the sums lost, and its error.

    ``(P, None)`` where there is none (or the ridge alone keeps every variance representable). The rule of
    :meth:`MultiVariateGaussian._finish_stream` (see there): a regularised variance whose inverse overflows
    the sums' dtype, of a feature that evidently varied (its spread, or the distance of the stream's mean from
    its shift, beyond ``1024·eps`` of the sums' dtype times the mean's magnitude). The error is
    :meth:`MultiVariateGaussian.fit`'s ``ValueError`` naming the scale; a variance that rounded to zero is named
    by the largest scale its zero sums allow.
    """
    patches = m2.shape[0]
    work = torch.finfo(m2.dtype)
    if ridge >= 1.0 / work.max:
        return patches, None
    variances = m2.index_select(1, _streaming.diagonal_positions(channels, m2.device)).double() * scale + ridge
    moved = centre[1].mT.double().abs()  # (P, C): how far the stream's mean is from its shift
    rounding = 1024 * work.eps * (centre[0].mT.double() + centre[1].mT.double()).abs()
    varied = (variances.clamp(min=0.0).sqrt() > rounding) | (moved > rounding)
    lost = (variances < 1.0 / work.max) & varied
    if not bool(lost.any()):
        return patches, None
    bound = count * work.tiny * work.eps * scale  # zero sums: every product below half the smallest subnormal
    spread = torch.where(variances > 0, variances, torch.full_like(variances, bound))
    first = int(torch.nonzero(lost.any(dim=1))[0, 0])
    named = fault_scale("precision_overflow", spread[first][lost[first]].cpu().numpy())
    error = unrepresentable_error(describe_patch(first, spatial), work, "precision_overflow", named, _scale_remedy(m2.dtype))
    return first, error


def _precision_into(
    covariance: Tensor,
    out: Tensor,
    first_patch: int,
    spatial: tuple[int, ...],
    *,
    ridge: float,
    store_dtype: torch.dtype | None = None,
    data_dtype: torch.dtype | None = None,
    rank_dtype: torch.dtype | None = None,
) -> Tensor:
    """Write the symmetric inverses of a stack of regularised covariances into ``out``, through Cholesky factors.

    ``Σ = L Lᵀ`` (batched ``cholesky_ex``), then ``Σ⁻¹ = L⁻ᵀ L⁻¹`` with ``L⁻¹`` from a batched triangular
    solve: on CPU about twice as fast as ``torch.cholesky_inverse`` for PaDiM's sizes, equally accurate.
    The result is symmetrised (``(P + Pᵀ) / 2``) so that it is exactly symmetric.

    The faults are the core's (:mod:`anomstats._patch_kernels`), with its messages: a covariance that is not
    finite (``ValueError`` naming the scale); a failed factorisation (``numpy.linalg.LinAlgError``); with
    ``ridge=0`` the core's rank test on the precision's diagonal (:func:`anomstats._patch_kernels.singular_feature`,
    eps from ``data_dtype``: float32 data are held to float32's eps even when computed in float64), with one
    message whether the test or the factorisation refused; a precision whose diagonal does not fit
    ``store_dtype`` (``ValueError`` naming the scale: stored, it would read as zeros). The first patch in patch
    order with any of these faults is named (:func:`_check_chunk`). ``rank_dtype``: the fit's nominal working
    dtype, whose eps the rank test uses (default: the covariance's; a float32 fit whose chunk was computed in
    float64 for its scale keeps float32's, so a patch's verdict does not depend on its neighbours).
    """
    store_dtype = out.dtype if store_dtype is None else store_dtype
    factor, info = torch.linalg.cholesky_ex(covariance)
    eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device).expand_as(factor)
    # Patches whose factorisation failed (or whose covariance is not finite) get garbage here, refused below: the
    # chunk is inverted whole, so that the first fault in patch order, whatever its kind, is the one named.
    factor_inv = torch.linalg.solve_triangular(factor, eye, upper=False)
    # Half the product (scaling by 0.5 is exact), then P/2 + (P/2)ᵀ: symmetric bit for bit, one pass.
    half = torch.baddbmm(factor_inv, factor_inv.mT, factor_inv, beta=0.0, alpha=0.5)
    precision = torch.add(half, half.mT, out=out)
    _check_chunk(
        covariance.diagonal(dim1=-2, dim2=-1), info, precision.diagonal(dim1=-2, dim2=-1), first_patch, spatial,
        ridge=ridge, store_dtype=store_dtype, data_dtype=data_dtype, rank_dtype=rank_dtype,
    )
    return precision


def _check_chunk(
    variances: Tensor,
    info: Tensor | np.ndarray,
    precision_diagonal: Tensor,
    first_patch: int,
    spatial: tuple[int, ...],
    *,
    ridge: float,
    store_dtype: torch.dtype,
    data_dtype: torch.dtype | None = None,
    rank_dtype: torch.dtype | None = None,
) -> None:
    """Refuse the faults of a chunk of finished patches, naming the first patch in patch order that has one.

    ``variances`` (p, C) are the regularised covariances' diagonals (in the dtype they were factored in),
    ``info`` (p,) the factorisations' verdicts (0: factored; ``k``: the leading minor of order ``k`` is not
    positive), ``precision_diagonal`` (p, C) the precisions' diagonals (meaningless where ``info`` is not 0).
    Each patch is judged as the core's :meth:`anomstats._patch_kernels.PatchFinisher.finish` judges it, with its
    messages, in its order: a covariance that is not finite (``ValueError`` naming the dtype); a failed
    factorisation (``numpy.linalg.LinAlgError``: with ``ridge=0`` the singular-patch message, otherwise the
    not-definite one with the ridge the scale needs); a precision whose diagonal does not fit ``store_dtype``
    (``ValueError`` naming the scale: stored, it would read as zeros); with ``ridge=0`` the core's rank test
    (:func:`anomstats._patch_kernels.singular_feature`, eps from ``data_dtype``: float32 data are held to
    float32's eps even when computed in float64, and at least that of ``rank_dtype``, the fit's nominal working
    dtype, default ``variances``'s). So with ``ridge=0`` a patch refused by the rank test is named
    before a later one whose factorisation failed, as the core names it, whatever the chunking.

    One reduction on the device per chunk (and, with ``ridge=0``, the two diagonals on the host for the rank
    test); the error path locates the patch.
    """
    working = variances.dtype
    rank_dtype = working if rank_dtype is None else rank_dtype
    info = torch.as_tensor(info, device=variances.device)
    finite = torch.isfinite(variances).all(dim=-1)
    factored = info == 0
    stored = precision_diagonal.to(store_dtype)
    fits = (torch.isfinite(stored) & (stored >= torch.finfo(store_dtype).tiny)).all(dim=-1)
    refused = ~(finite & factored & fits)
    singular = None
    if ridge == 0:
        eps = _rank_eps(working if data_dtype is None else data_dtype, rank_dtype)
        host_precision = precision_diagonal.double().cpu().numpy()
        host_variances = variances.double().cpu().numpy()
        singular = np.array(
            [bool(singular_feature(host_precision[k], host_variances[k], eps)) for k in range(host_variances.shape[0])],
            dtype=bool,
        )
    if not bool(refused.any()) and (singular is None or not singular.any()):
        return
    verdicts = refused.cpu().numpy() | (False if singular is None else singular)
    patch = int(np.argmax(verdicts))
    where = describe_patch(patch + first_patch, spatial)
    if not bool(finite[patch]):
        raise unrepresentable_error(where, torch.finfo(working), "covariance", None, _scale_remedy(working))
    if not bool(factored[patch]):
        raise _factor_error(
            variances[patch], int(info[patch]), patch + first_patch, spatial, ridge, data_dtype, rank_dtype=rank_dtype
        )
    if not bool(fits[patch]):
        limits = torch.finfo(store_dtype)
        fault = precision_fault(stored[patch].double().cpu().numpy(), limits)
        scale = fault_scale(fault, variances[patch].double().cpu().numpy())
        raise unrepresentable_error(where, limits, fault, scale, _scale_remedy(store_dtype))
    raise singular_patch_error(where, variances.shape[-1], eps, _SINGULAR_HINT)


def _factor_error(
    diagonal: Tensor,
    order: int,
    patch: int,
    spatial: tuple[int, ...],
    ridge: float,
    data_dtype: torch.dtype | None,
    *,
    rank_dtype: torch.dtype | None = None,
) -> np.linalg.LinAlgError:
    """The error of a regularised covariance (its diagonal (C,)) whose Cholesky factorisation stopped at ``order``.

    With ``ridge=0`` the core's singular-patch message (one message whether the rank test or the factorisation
    refused); otherwise the core's not-definite message, with the variances' scale and the rounding a ridge
    must exceed.
    """
    where = describe_patch(patch, spatial)
    dtype, channels = diagonal.dtype, diagonal.shape[-1]
    if ridge == 0:
        data = dtype if data_dtype is None else data_dtype
        return singular_patch_error(where, channels, _rank_eps(data, dtype if rank_dtype is None else rank_dtype), _SINGULAR_HINT)
    # The core's message, with the ridge the variances' scale needs (anomstats._patch_kernels.ridge_rounding).
    return not_definite_error(
        where, order, ridge, n_features=channels, largest_variance=float(diagonal.max()), dtype=torch.finfo(dtype),
        alternatives="" if dtype == torch.float64 else _WIDER_REMEDY,
    )


def _data_dtype_of_store(store: torch.dtype) -> torch.dtype:
    """The data dtype a fit into a ``store`` buffer most likely came in, when the caller does not say."""
    return store if store in (torch.float32, torch.float64) else torch.float32


def _fits(values: Tensor) -> bool:
    """Whether every value is finite and at least the dtype's smallest normal number (one reduction)."""
    return bool((torch.isfinite(values) & (values >= torch.finfo(values.dtype).tiny)).all())


def _wide_covariance(vectors: Tensor, ridge: float, alpha: float, first_patch: int, spatial: tuple[int, ...]) -> Tensor:
    """The regularised covariances of a chunk (B, C, p) in float64, for a float32 fit whose variances float32
    cannot represent.

    float32 sums of squares overflow for features of scale above about ``sqrt(3.4e38 / B)``, and variances
    below 1.2e-38 (features of scale 1e-19, without a ridge) are subnormal or zero; in float64 neither
    happens, and the precision, computed there, is rounded into the float32 store if it fits (else the
    store's check names the scale). A covariance that overflows float64 too raises the core's message,
    naming the scale. A patch that is constant (variance 0) comes here too and is refused as singular.
    """
    wide = torch.float64
    centred = _centred_patches(vectors, vectors.mean(dim=0, dtype=wide), wide)
    eye = torch.eye(centred.shape[-1], dtype=wide, device=centred.device).mul_(ridge)
    covariance = torch.baddbmm(eye, centred.mT, centred, alpha=alpha)
    finite = torch.isfinite(covariance.diagonal(dim1=-2, dim2=-1)).all(dim=-1)
    if not bool(finite.all()):
        patch = int(torch.nonzero(~finite)[0, 0])
        raise unrepresentable_error(
            describe_patch(patch + first_patch, spatial), np.float64, "covariance",
            feature_scale(centred[patch].cpu().numpy()), _scale_remedy(wide),
        )
    return covariance


def _as_patches(x: Tensor) -> Tensor:
    """(B, C, *spatial) → (B, C, P) without copying when possible (no spatial axes: one patch)."""
    return x.unsqueeze(2) if x.ndim == 2 else x.flatten(2)


def _centred_patches(vectors: Tensor, mean: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, C, p) slice minus its (C, p) mean → a (p, B, C) view ready for batched products, in ``dtype``.

    The copy goes to a (B, p, C) buffer: each image's (C, p) block is transposed in cache, about 4x
    faster than gathering straight into patch-major order; BLAS reads the (p, B, C) view with strides.
    Bool embeddings (accepted as the core accepts them: 0 and 1) are converted first (torch has no bool
    subtraction).
    """
    batch, channels, patches = vectors.shape
    if vectors.dtype == torch.bool:
        vectors = vectors.to(dtype)
    if torch.is_grad_enabled() and (vectors.requires_grad or mean.requires_grad):
        # out= is refused by autograd: same values, out of place, so gradients flow (e.g. to the scored input).
        return (vectors.transpose(1, 2).to(dtype) - mean.mT.to(dtype)).permute(1, 0, 2)
    out = torch.empty(batch, patches, channels, dtype=dtype, device=vectors.device)
    torch.sub(vectors.transpose(1, 2), mean.mT, out=out)
    return out.permute(1, 0, 2)


def _check_queries(x: Tensor, spatial: tuple[int, ...]) -> None:
    """Eager scoring: refuse an embedding holding NaN or infinity, with the core's message (sample and patch).

    Skipped while tracing or exporting (a data-dependent branch cannot be recorded): there a NaN query gives a
    NaN distance at its patch, an infinite one NaN or inf.
    """
    if not x.is_floating_point() or bool(torch.isfinite(x).all()):
        return
    bad = ~torch.isfinite(_as_patches(x)).all(dim=1)  # (B, P)
    sample, patch = (int(i) for i in torch.nonzero(bad)[0])
    raise_non_finite_query("embedding", sample, patch, spatial if len(spatial) else (1,))


def _safe_sqrt(squared: Tensor) -> Tensor:
    """``sqrt(max(squared, 0))`` (PaDiM's formula, the same values) whose gradient is 0, not NaN, at and below 0.

    ``torch.where`` sends the gradient of the branch not taken to 0, and the square root's argument is replaced
    by 1 there, so no ``inf·0`` appears; NaN stays NaN (``squared <= 0`` is false for it), infinity stays
    infinity. Traceable and exportable (no custom autograd function).
    """
    empty = squared <= 0
    return torch.where(empty, torch.zeros_like(squared), torch.where(empty, torch.ones_like(squared), squared).sqrt())


def _distances(delta: Tensor, quadratic, precision_bound: Tensor) -> Tensor:
    """PaDiM's ``sqrt(max(q(δ), 0))`` per row of ``delta`` (p, B, C), for a quadratic form ``q`` of ``precision``.

    ``precision_bound`` (p,) bounds the magnitude of the precision's entries (for a positive definite one, its
    largest diagonal entry). ``q(δ)`` cannot overflow while ``8·C²·max|δ|²·bound <= max`` (every product and
    partial sum is below that); beyond it, ``δ`` is divided by ``s = max|δ|`` and the distance is
    ``s·sqrt(q(δ/s))``: finite where the distance is, ``+inf`` beyond the dtype's range, never the NaN of
    ``inf − inf``. Below the threshold ``s`` is exactly 1, so ordinary queries get anomalib's numbers bit for
    bit. ``s`` is a constant for autograd (``q`` is homogeneous of degree 2, so the gradient is exact), and
    the square root is :func:`_safe_sqrt` (a zero gradient at the mean). Traceable: no data-dependent branch.
    """
    channels = delta.shape[-1]
    size = delta.detach().abs().amax(dim=-1, keepdim=True)  # (p, B, 1)
    limit = (torch.finfo(delta.dtype).max / (8.0 * channels * channels) / precision_bound.detach()).sqrt()
    scale = torch.where(size > limit.reshape(-1, 1, 1), size, torch.ones_like(size))
    if delta.requires_grad or is_tracing():
        scaled = delta / scale
    else:
        scaled = delta.div_(scale)  # the chunk's own buffer: no second copy
    return scale.squeeze(-1) * _safe_sqrt(quadratic(scaled))


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


def _is_dense_stack(value: Any) -> bool:
    """Whether a checkpoint entry is a floating stack of square matrices (P, C, C) with values (not meta)."""
    return (
        isinstance(value, Tensor) and value.ndim == 3 and value.shape[1] == value.shape[2]
        and value.is_floating_point() and not value.is_meta
    )


def _check_fit_mean(mean: Tensor, vectors: Tensor, spatial: tuple[int, ...], *, name_value: bool = True) -> None:
    """Refuse a one-shot fit whose mean (C, P) of ``vectors`` (B, C, P) is not finite, with the core's message.

    Any NaN or infinity in the data makes its patch's mean non-finite: one cheap check on (C, P). Only on the
    error path is the fault located: the first patch whose mean is not finite, and in its (B, C) data the first
    NaN or infinity in C order (observation, feature), as the core's dense fit names them
    (:func:`anomstats._patch_kernels.non_finite_fit_error`); with ``name_value=False`` the patch only, as the
    core's low-rank fit names it. Finite data whose mean overflowed get the core's overflow message.
    """
    finite = torch.isfinite(mean).all(dim=0)  # (P,)
    if bool(finite.all()):
        return
    patch = int(torch.nonzero(~finite)[0, 0])
    where = describe_patch(patch, spatial)
    bad = torch.nonzero(~torch.isfinite(vectors[:, :, patch]))  # (B, C) of that patch, on the error path only
    if not bad.shape[0]:
        raise non_finite_fit_error(where, None)
    if name_value:
        raise non_finite_fit_error(where, (int(bad[0, 0]), int(bad[0, 1])))
    require_finite(False, "embedding", where=f" in {where}")


def _stored_mean(mean: Tensor, dtype: torch.dtype, spatial: tuple[int, ...]) -> Tensor:
    """A fit's finite mean (C, P) as a new tensor in the store's ``dtype``, refused where that dtype cannot hold it.

    A half-precision module stores float16: finite data whose mean is beyond 65504 would be stored as inf (every
    distance inf); refused with the core's overflow message (:func:`anomstats._patch_kernels.non_finite_fit_error`).
    """
    stored = mean.to(dtype, copy=True)
    finite = torch.isfinite(stored).all(dim=0)
    if not bool(finite.all()):
        raise non_finite_fit_error(describe_patch(int(torch.nonzero(~finite)[0, 0]), spatial), None)
    return stored


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
        dtype of the streaming moments kept by :meth:`update` (packed centred sums, P·C·(C+1)/2 numbers: with
        float64, just the bytes of the float32 ``inv_covariance`` that :meth:`compute` writes over them).
        float64 input is always accumulated in float64: a float32 stream is widened (exactly) by its first
        float64 batch.
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

    Streaming state (:mod:`anomstats_torch._streaming`): ``update`` keeps its moments as buffers
    (``stream_count``, ``stream_info``, ``stream_shift``, ``stream_mean``, ``stream_m2``: the centred sums
    packed, (H·W, C·(C+1)/2), the core's layout; and ``stream_pending``, a batch of fewer than 64 images that
    waits to be folded in with the next one), accumulated about a fixed shift (the first batch's mean), so any
    split of the data gives the one-shot fit to a few eps of the data's spread at any distance from the origin.
    They are in ``state_dict()`` from ``update`` until ``compute``: a checkpoint taken mid-stream loads
    (``strict=True``) into a fresh module, which resumes exactly (anomalib's module refuses such a checkpoint:
    unexpected keys; a checkpoint of the former layout, ``stream_m2`` (H·W, C, C), is packed on load).
    ``compute()`` ends the stream by default (see the method: its sums become the precision, in place), and
    ``update``/``compute`` then raise until ``reset()``; ``compute(keep_stream=True)`` keeps it out of the state
    dict (kept in memory: more updates can follow and bring it back). Either way a finished fit saves exactly
    anomalib's keys. A checkpoint without stream entries closes the stream of the module it is loaded into.
    ``.to(device)``/``.cuda()``/``.cpu()`` move them; dtype casts of the module (``.double()``, ``.half()``,
    ``.to(dtype)``) do not cast them: the moments keep the precision they were accumulated in
    (``accumulate_dtype``), and a loaded stream keeps the checkpoint's. ``reset()`` removes them.
    ``load_state_dict`` checks the entries against each other (``mean`` (C, H·W) with the precision, the
    stream's entries with each other) and refuses inconsistent ones with
    :func:`anomstats._validation.inconsistent_state_error` before anything changes; a load that fails leaves
    the module as it was (:class:`~anomstats_torch.DynamicBufferModule`).

    Devices: ``fit``/``update`` compute on the embedding's device and store there (as anomalib assigns its
    buffers); ``mahalanobis`` computes on the buffers' device and returns the map there. With
    torch.distributed on NCCL, keep the streamed moments on the rank's CUDA device.

    Memory: a fit holds the embedding, the outputs (``mean`` and one (P, C, C) stack) and temporaries
    bounded by ``chunk_bytes``. Streaming holds the packed sums (P·C·(C+1)/2 numbers in ``accumulate_dtype``:
    4.96 GB in float64 for PaDiM's largest fit, C = 550 and 64×64 patches), the waiting batch and temporaries
    bounded by ``chunk_bytes``. By default :meth:`compute` then writes the float32 precision (P·C²·4 bytes,
    just under the sums' P·C·(C+1)·4) over the sums chunk by chunk, each chunk's sums read before its precision
    is written, so the whole fit peaks at the stream's memory, and ``inv_covariance`` is a view of that storage
    (which keeps P·C·4 more bytes, ``1/C`` of it, that ``torch.save`` writes too). Where the precision does not
    fit in the sums' bytes (``accumulate_dtype=torch.float32``, a float64 or half-precision fit,
    ``storage="packed"``) or ``compute(keep_stream=True)`` keeps them, it is allocated next to the sums. Under
    torch.distributed a spending :meth:`compute` all-reduces the sums in place; ``keep_stream=True`` all-reduces
    a copy. Measured for PaDiM's largest fit (300 random float32 images in batches of 20, generated on the fly,
    CPU, 2 threads): 5.9 GB peak resident memory (before: 15.1 GB).

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

    def _put_precision(
        self,
        store: Tensor,
        p0: int,
        p1: int,
        covariance: Tensor,
        spatial: tuple[int, ...],
        data_dtype: torch.dtype | None = None,
        rank_dtype: torch.dtype | None = None,
    ) -> None:
        """Write the precisions of the regularised covariances (p1 - p0, C, C) into patches p0:p1 of ``store``.

        The finishing kernel of :meth:`fit` and :meth:`compute` (:func:`_precision_into`: the core's faults and
        messages). ``data_dtype``: the dtype the data came in, whose eps the rank test of ``ridge=0`` uses
        (None: the store's, float32 for a half-precision store); ``rank_dtype``: the fit's nominal working dtype
        (None: the covariance's).
        """
        target = store[p0:p1]
        data = data_dtype if data_dtype is not None else _data_dtype_of_store(store.dtype)
        options = dict(ridge=self.ridge, data_dtype=data, rank_dtype=rank_dtype)
        if covariance.dtype == target.dtype:
            _precision_into(covariance, target, p0, spatial, **options)
        else:  # computed in the covariance's dtype, rounded once into the store's (float32 or a half module's)
            dense = torch.empty_like(covariance)
            _precision_into(covariance, dense, p0, spatial, store_dtype=target.dtype, **options)
            target.copy_(dense)

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
        scatter = state_dict.get(prefix + _streaming.SCATTER)
        if self._stream_kind == "dense" and _is_dense_stack(scatter):
            # A mid-stream checkpoint of the former layout (stream_m2 as a (P, C, C) stack): its upper triangles,
            # exactly, in the packed layout (in a copy of this call's dict); then checked as any other.
            state_dict = {**state_dict, prefix + _streaming.SCATTER: _streaming.pack_upper(scatter.detach(), self.chunk_bytes)}
        # The other storage's precision entry (a packed triangle for a dense module, a dense stack for a packed
        # one) is converted into this module's buffer, in the buffer's dtype and on its device.
        own, other = ("inv_covariance", _compact.PACKED_KEY)
        if self._storage == "packed":
            own, other = other, own
        if self.form == "dense" and prefix + other in state_dict:
            if prefix + own in state_dict:
                error_msgs.append(
                    f"{_entries(prefix)} hold both {prefix}{own} and {prefix}{other}: a checkpoint stores the "
                    "precision once; drop one of them"
                )
                return
            try:
                incoming = state_dict[prefix + other]
                if isinstance(incoming, Tensor) and (incoming.is_complex() or incoming.dtype == torch.bool):
                    raise TypeError(f"{prefix}{other} has dtype {incoming.dtype}, not a real number type")
                if isinstance(incoming, Tensor) and incoming.numel() == 0:
                    # Not fitted yet (e.g. a mid-stream checkpoint before the first compute): empty in either storage.
                    converted = self._buffers[own].new_empty(0)
                else:
                    converted = self._convert_precision(incoming, state_dict.get(prefix + "mean"), prefix + other)
            except (TypeError, ValueError) as exc:  # entries that do not fit: refused as the consistency check does
                raise _checkpoints.refusal(type(self).__name__, str(exc), self._storage == "packed") from None
            # The converted entry stands for the other one (in a copy of this call's dict); it is the module's own
            # tensor, in the buffer's dtype and on its device, so it becomes the buffer without a second copy.
            state_dict = {key: value for key, value in state_dict.items() if key != prefix + other}
            state_dict[prefix + own] = converted
            local_metadata = {**local_metadata, ADOPT_KEY: (own,)}
        # Checked (_check_state_consistency) and loaded all or nothing by DynamicBufferModule.
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    #: Which stream this form keeps (:mod:`anomstats_torch._streaming`).
    _stream_kind = "dense"

    def _check_state_consistency(self, incoming: dict[str, Tensor]) -> None:
        """Refuse entries that do not fit together, before anything is loaded (:mod:`anomstats_torch._checkpoints`).

        ``mean`` (C, H·W) with ``inv_covariance`` (H·W, C, C) (``inv_covariance_packed`` (H·W, C·(C+1)/2) for the
        packed storage), and a stream's entries with each other; raises
        :func:`anomstats._validation.inconsistent_state_error` (a ``RuntimeError``).
        """
        packed = self._storage == "packed"
        key = _compact.PACKED_KEY if packed else "inv_covariance"
        current = {"mean": self._buffers["mean"], key: self._buffers[key]}
        _checkpoints.check_dense(type(self).__name__, incoming, current, packed)
        layout = _checkpoints.PACKED_LAYOUT if packed else _checkpoints.DENSE_LAYOUT
        _checkpoints.check_stream(type(self).__name__, incoming, self._stream_kind, layout)

    def _prepare_state_load(self, incoming: dict[str, Tensor]) -> None:
        """A checkpoint's stream entries open the stream (it resumes exactly); a checkpoint without them closes it."""
        _streaming.prepare_load(self, self._stream_kind, incoming, self._buffers["mean"].device)

    def _apply(self, fn: Any, recurse: bool = True) -> MultiVariateGaussian:
        """torch's moves and casts, except that the streamed moments are moved but never cast (see the class notes)."""
        return _streaming.apply_keeping_dtype(self, fn, lambda: super(MultiVariateGaussian, self)._apply(fn, recurse))

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

        :func:`anomstats_torch._covariance.numpy_cov`: numpy's values (to rounding) and numpy's exceptions for
        every argument, in numpy's order: ``ddof`` must be integral (``ValueError: ddof must be integer`` for
        1.5), ``aweights`` (a tensor or array-like) must be one non-negative weight per observation
        (``RuntimeError`` for 2-D weights or a wrong count, ``IndexError`` for a scalar, ``ValueError`` for
        negative ones) that do not sum to zero (``ZeroDivisionError``); ``rowvar`` and ``bias`` are taken by
        truth value, as numpy takes them. Floating inputs keep their dtype (integers and bools are computed in
        the default float dtype); with fewer degrees of freedom than 1 a ``RuntimeWarning`` is issued and the
        result is inf/NaN, as numpy's. As in numpy >= 2, a 2-D input with ``rowvar=False`` holds one observation
        per row even when it has a single row, and 1-D input is one variable for either ``rowvar`` (anomalib's
        gives NaN for 1-D input with ``rowvar=True``: a deliberate difference).

        Examples
        --------
        >>> import torch
        >>> from anomstats_torch import MultiVariateGaussian
        >>> obs = torch.tensor([[0.0, 2.0], [1.0, 1.0], [2.0, 0.0]])
        >>> MultiVariateGaussian._cov(obs)
        tensor([[ 1., -1.],
                [-1.,  1.]])
        >>> MultiVariateGaussian._cov(obs, ddof=1.5)
        Traceback (most recent call last):
        ...
        ValueError: ddof must be integer
        """
        return _covariance.numpy_cov(observations, rowvar=rowvar, bias=bias, ddof=ddof, aweights=aweights)

    # ------------------------------------------------------------------ one-shot fit
    def fit(self, embedding: Tensor) -> list[Tensor]:
        """Fit mean and precision per patch of ``embedding`` (B, C, H, W); returns ``[mean, inv_covariance]``.

        Runs on the embedding's device, chunked over patches; the input is not modified. Computed in float32
        (float64 if the module or the input is), stored as the dtype policy says (see the class notes: a
        module cast to half precision keeps its dtype). Returns the buffers (with ``storage="packed"``:
        ``[mean, inv_covariance_packed]``).

        Bool and integer embeddings are accepted, as the core accepts them (computed in float32).

        Raises
        ------
        ValueError
            For fewer than 2 embeddings, a wrong number of axes or non-finite values (naming the first patch
            holding one, and its first bad observation and feature: the core's message); for features whose scale
            the stored dtype cannot represent (float32: a covariance beyond 3.4e38 or a precision below 1.2e-38,
            which would be stored as zeros), naming the scale (the core's message).
        numpy.linalg.LinAlgError
            A regularised covariance that is not positive definite (the core's message, with the ridge the
            variances' scale needs); with ``ridge=0``, a patch that is singular to rounding (the core's rank test
            and message). The first patch in patch order with a fault is named, whichever test refused it.
        """
        x = as_float_tensor(embedding, "embedding").detach()  # statistics, not a graph: see Notes
        if x.dtype == torch.bool:  # 0/1, as fit and the core take them (exact in float32)
            x = x.to(torch.float32)
        # Clear errors for a bad rank and for B < 2 (anomalib silently returns NaN for one sample).
        batch, _, spatial = check_fit_shape(x.shape, name="embedding")
        dtype = working_dtype(self.mean.dtype, x.dtype)
        store = storage_dtype(self.mean.dtype, x.dtype)
        vectors = _as_patches(x)  # (B, C, P), a view for contiguous input
        _, channels, patches = vectors.shape
        mean = vectors.mean(dim=0, dtype=dtype)
        _check_fit_mean(mean, vectors, spatial)
        stored_mean = _stored_mean(mean, store, spatial)
        precision = self._new_precision(patches, channels, store, x.device)
        ridge = torch.eye(channels, dtype=dtype, device=x.device).mul_(self.ridge)
        itemsize = torch.finfo(dtype).bits // 8
        per_patch = (batch * channels + channels * channels * 5) * itemsize + self._store_bytes_per_patch(channels, dtype, store)
        block = rows_per_chunk(per_patch, self.chunk_bytes, patches)
        alpha = 1.0 / covariance_normalisation(batch, None, 1)
        for p0 in range(0, patches, block):
            p1 = min(p0 + block, patches)
            centred = _centred_patches(vectors[:, :, p0:p1], mean[:, p0:p1], dtype)
            covariance = torch.baddbmm(ridge, centred.mT, centred, alpha=alpha)
            if dtype != torch.float64 and not _fits(covariance.diagonal(dim1=-2, dim2=-1)):
                covariance = _wide_covariance(vectors[:, :, p0:p1], self.ridge, alpha, p0, spatial)
            # The rank test's eps is the working dtype's even where the chunk was computed in float64 for its scale.
            self._put_precision(precision, p0, p1, covariance, spatial, x.dtype, rank_dtype=dtype)
        return self._set_fit(stored_mean, precision)

    def forward(self, embedding: Tensor) -> list[Tensor]:
        """Same as :meth:`fit` (anomalib's ``forward`` fits)."""
        return self.fit(embedding)

    # ------------------------------------------------------------------ streaming fit
    def reset(self) -> None:
        """Forget the streamed moments accumulated by :meth:`update` (they leave the state dict too).

        Also after a :meth:`compute` that spent the stream: the next :meth:`update` starts a new one.
        """
        _streaming.close(self)

    def _stream_for(self, vectors: Tensor, input_dtype: torch.dtype) -> _streaming.Stream:
        """The open stream, checked against a batch (B, C, P) and writable, or a new one shifted by its mean.

        A new dense stream's packed sums (P, C·(C+1)/2) start as zeros (a first batch that waits to be folded in
        may be checkpointed with them).
        """
        _, channels, patches = vectors.shape
        if _streaming.is_spent(self):
            raise _streaming.spent_error("update()", self._stream_kind)
        stream = _streaming.read(self, self._stream_kind)
        if stream is None:
            dtype = torch.float64 if input_dtype == torch.float64 else self.accumulate_dtype
            shift = vectors.mean(dim=0, dtype=dtype)  # the stream's fixed origin: the first batch's mean
            _check_mean_finite(shift)
            if self._stream_kind == "dense":
                spread = torch.zeros(patches, packed_length(channels), dtype=dtype, device=shift.device)
            else:
                spread = torch.zeros(patches, channels, 0, dtype=dtype, device=shift.device)
            return _streaming.Stream(0, False, (), shift, torch.zeros_like(shift), spread)
        if (stream.n_features, stream.n_patches) != (channels, patches):
            raise ValueError(
                f"embedding has C={channels}, H*W={patches} but earlier updates had "
                f"C={stream.n_features}, H*W={stream.n_patches}; call reset() first"
            )
        if input_dtype == torch.float64 and stream.shift.dtype != torch.float64:
            # float64 input is accumulated in float64 whatever accumulate_dtype (as a stream it opens is): the
            # float32 sums so far are widened, exactly, so the order of the batches does not matter.
            return stream.widened()
        return stream.writable()

    def update(self, embedding: Tensor) -> None:
        """Accumulate a batch (B, C, H, W) into the streamed moments (Chan et al.'s pairwise merge).

        Kept per patch: the count, a fixed shift (the first batch's mean), the mean about it and the centred
        sums of products, packed (P, C·(C+1)/2: the upper triangles, the core's layout), in ``accumulate_dtype``
        (float64 for float64 input), as buffers on the first batch's device (see the class notes: in
        ``state_dict()`` until :meth:`compute`, moved by ``.to(device)``, never cast, cleared by :meth:`reset`).
        A batch of fewer than 64 images waits (a private copy, ``stream_pending``) and is folded in with the
        next one: each fold passes over the whole sums once. Every batch enters as ``x − shift``, so the result
        does not depend on the data's distance from the origin. Call :meth:`compute` to set the buffers. The
        input is not modified; a refused batch (non-finite values, another shape) leaves the state as it was.

        Raises
        ------
        RuntimeError
            After a :meth:`compute` that spent the stream (the default): call :meth:`reset` first, or compute
            with ``keep_stream=True`` to keep streaming.
        """
        x = as_float_tensor(embedding, "embedding").detach()  # statistics, not a graph: see Notes
        if x.dtype == torch.bool:  # 0/1, as fit and the core take them (exact in float32)
            x = x.to(torch.float32)
        _, _, spatial = check_fit_shape(x.shape, min_observations=1, name="embedding")
        vectors = _as_patches(x)
        stream = self._stream_for(vectors, x.dtype)
        vectors = vectors.to(device=stream.shift.device)
        batch_mean = _streaming.shifted_mean(vectors, stream.shift, stream.shift.dtype, self.chunk_bytes)
        _check_mean_finite(batch_mean)  # before the state changes
        _streaming.add_batch(stream, vectors, batch_mean, self.chunk_bytes)
        stream.wide = stream.wide or x.dtype == torch.float64
        stream.spatial = spatial
        _streaming.write(self, self._stream_kind, stream)

    def compute(self, keep_stream: bool = False) -> list[Tensor]:
        """Set the buffers from the streamed moments; returns ``[mean, inv_covariance]``.

        By default this **ends the stream**: with float64 accumulation and a float32 fit (the defaults, for
        float32 embeddings) the precision of each chunk of patches is written over the packed sums it was
        computed from, so the fit needs no memory beyond the stream's (``inv_covariance`` is a view of that
        storage), and the stream is spent: :meth:`update` and :meth:`compute` then raise until :meth:`reset`.
        Where the precision does not fit in the sums' bytes (``accumulate_dtype=torch.float32``, a float64 or
        half-precision fit, ``storage="packed"``) it is a new tensor and the sums are freed after it.

        ``keep_stream=True`` keeps the stream, as a torchmetrics metric keeps its state: more updates can follow
        (the precision is then always a new tensor: the sums plus a (P, C, C) stack). Until they do, the
        stream is not in ``state_dict()`` (a checkpoint taken now holds the fit, with anomalib's keys).

        With :mod:`torch.distributed` initialised, the moments of every rank are merged first (collectives:
        call it on every rank, with or without data; ranks that disagree on shapes, dtypes or device types
        all raise the same ``ValueError``, and a rank whose stream was spent makes every rank raise the
        ``RuntimeError`` below, see :mod:`anomstats_torch._distributed`), so each rank gets the fit over all
        ranks' data. Spending, the local sums are all-reduced in place; with ``keep_stream=True``, in a copy.

        Raises
        ------
        RuntimeError
            The stream was spent by an earlier ``compute()``.
        ValueError, numpy.linalg.LinAlgError
            The faults of :meth:`fit` (a covariance or precision the dtype cannot represent, a patch that is
            not definite), naming the patch. If the precision had already overwritten part of the sums (or,
            under torch.distributed, the local sums were all-reduced in place), the stream is spent and the
            message says so; otherwise it is left as it was.
        """
        keep_stream = check_bool(keep_stream, "keep_stream")
        stream = _streaming.settle(self, self._stream_kind, self.chunk_bytes)  # a waiting batch joins the sums
        moments = _distributed.global_moments(stream, spent=_streaming.is_spent(self), consume=not keep_stream)
        data_dtype = torch.float64 if moments.wide else torch.float32  # what the streamed data came in (its eps)
        store = storage_dtype(self.mean.dtype, data_dtype)
        m2 = moments.m2
        patches = m2.shape[0]
        channels = moments.shift.shape[0]
        known = stream.spatial if stream is not None else ()
        spatial = known if len(known) and _prod(known) == patches else (patches,)
        in_place = moments.owned and self._storage == "dense" and _streaming.fits_in_place(m2, store)
        if in_place:
            precision = _streaming.precision_view(m2, channels)
        else:
            precision = self._new_precision(patches, channels, store, m2.device)
        # The mean about the origin: one rounding relative to |mean| (the one-shot fit's mean has it too).
        mean = (moments.shift + moments.mean).to(store)
        # Once the stream's own sums are overwritten (or, distributed, all-reduced in place) it is spent, whatever
        # follows: a failure from then on closes it, and says so.
        progress = _streaming.Progress(spent=moments.consumed)
        try:
            # Sums accumulated under torch.inference_mode are inference tensors: written in place in that mode.
            with _streaming.inference_mode_for(m2):
                self._finish_stream(
                    m2, moments.count, precision, spatial, data_dtype, in_place=in_place,
                    progress=progress if in_place and moments.local else None,
                    centre=(moments.shift, moments.mean),
                )
        except BaseException as error:
            if not progress.spent:
                raise  # nothing of the stream changed: it stays open
            _streaming.spend(self)
            if isinstance(error, (ValueError, np.linalg.LinAlgError)):
                raise type(error)(f"{error}; {_streaming.SPENT_BY_FAILURE}") from error
            raise
        fitted = self._set_fit(mean, precision)
        if keep_stream:
            _streaming.set_persistent(self, False)  # a finished fit's checkpoint: anomalib's keys
        else:
            _streaming.spend(self)
        return fitted

    def _finish_stream(
        self,
        m2: Tensor,
        count: int,
        precision: Tensor,
        spatial: tuple[int, ...],
        data_dtype: torch.dtype,
        *,
        in_place: bool,
        progress: _streaming.Progress | None,
        centre: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """Write the precisions of packed sums ``m2`` (P, C·(C+1)/2) over ``count`` observations into ``precision``.

        Chunk by chunk over patches. ``in_place``: ``precision`` is a view of ``m2``'s storage
        (:func:`anomstats_torch._streaming.precision_view`, whose notes show that a chunk's precision overwrites
        only sums of that chunk and earlier ones): the chunk's sums are copied out before anything is written,
        and put back if the first chunk fails, so that a failure before any chunk is done leaves the sums as
        they were. ``progress`` (given when ``m2`` is the stream's own) records the first chunk done. The
        faults are :meth:`fit`'s, with its messages, raised before the chunk that holds them is done.

        On the CPU every patch goes through the core's factor-and-invert (:meth:`anomstats._lapack.ScratchKernels.invert`:
        ``potrf`` + ``potri``, recursive from C = 129) on a worker thread
        (:func:`anomstats_torch._streaming.lapack_precisions`), writing a dense float32/float64/float16 store
        directly; elsewhere (and into the packed or a bfloat16 store) through a float64 chunk, as :meth:`fit` does.

        Sums narrower than float64 (``accumulate_dtype=torch.float32``) cannot be widened as :meth:`fit` widens a
        chunk whose variances its dtype cannot represent: products of features of scale below about 1e-19 are
        float32 subnormals or zeros. ``centre`` (the stream's shift and its mean about it, both (C, P)) tells such
        features from constant ones: a regularised variance whose inverse overflows the sums' dtype (zero
        included) is refused as :meth:`fit` refuses it, with the ``ValueError`` naming the scale, where the data
        evidently varied: the variance's square root, or the distance of the stream's mean from its shift (the
        first batch's mean), exceeds ``1024·eps`` of the sums' dtype times the mean's magnitude (the rounding a
        constant feature leaves in either). Otherwise, as for a constant feature, the factorisation or the rank
        test decides (a feature whose sums are zero and whose batches all had one mean, e.g. a single batch, is
        refused as singular). A variance that rounded to zero is named by the largest scale its zero sums allow,
        ``sqrt(count·s/(count − 1))`` with ``s`` the dtype's smallest subnormal. The patches before the first
        such one are finished first, so the first fault in patch order is named.
        """
        patches, length = m2.shape
        channels = precision.shape[-1] if precision.ndim == 3 else _compact.packed_features(precision, _compact.PACKED_KEY)
        scale = 1.0 / covariance_normalisation(count, None, 1)
        store = precision.dtype
        item = m2.element_size()
        lapack = _streaming.uses_lapack(m2.device)
        direct = lapack and precision.ndim == 3 and store in (torch.float32, torch.float64, torch.float16)
        if lapack:  # the chunk's sums (in place), its variances and precision diagonals, and a finished chunk
            per_patch = (length * in_place + 2 * channels) * item
            if not direct:
                per_patch += channels * channels * item + self._store_bytes_per_patch(channels, m2.dtype, store)
        else:  # the scaled sums, the covariance, its factor and inverse
            per_patch = (length + channels * channels * 4) * item + self._store_bytes_per_patch(channels, m2.dtype, store)
        block = rows_per_chunk(per_patch, self.chunk_bytes, patches)
        if lapack:
            copies = torch.empty(block, length, dtype=m2.dtype) if in_place else None
            finished = None if direct else torch.empty(block, channels, channels, dtype=m2.dtype)
            variances = torch.empty(block, channels, dtype=m2.dtype)
            diagonals = torch.empty(block, channels, dtype=m2.dtype)
            status = np.zeros(block, dtype=np.int64)
        else:
            index = _compact.unpack_index(channels, m2.device)
        # float32 sums only (never in place: fits_in_place needs float64 sums); the patches before the first
        # feature whose variance the sums lost are finished as usual, then its error is raised.
        limit, unresolved = patches, None
        if centre is not None and m2.dtype != torch.float64:
            limit, unresolved = _first_lost_variance(m2, channels, scale, self.ridge, centre, count, spatial)
        for p0 in range(0, limit, block):
            p1 = min(p0 + block, limit)
            n = p1 - p0
            sums = copies[:n].copy_(m2[p0:p1]) if lapack and in_place else m2[p0:p1]
            try:
                if lapack:
                    out = precision[p0:p1] if direct else finished[:n]
                    status[:n] = 0
                    _streaming.lapack_precisions(
                        sums.numpy(), scale, self.ridge, out.numpy(), variances[:n].numpy(), diagonals[:n].numpy(),
                        status[:n],
                    )
                    self._check_finished(diagonals[:n], variances[:n], status[:n], p0, spatial, store, data_dtype)
                    if not direct:
                        self._store_precision(precision, p0, p1, finished[:n])
                else:
                    covariance = _compact.unpack(sums * scale, channels, index)
                    covariance.diagonal(dim1=-2, dim2=-1).add_(self.ridge)
                    self._put_precision(precision, p0, p1, covariance, spatial, data_dtype=data_dtype)
            except BaseException:
                if lapack and in_place and p0 == 0:
                    m2[p0:p1].copy_(sums)  # nothing was done before this chunk: the sums as they were
                raise
            if progress is not None:
                progress.spent = True
        if unresolved is not None:
            raise unresolved

    def _check_finished(
        self,
        diagonals: Tensor,
        variances: Tensor,
        status: np.ndarray,
        first_patch: int,
        spatial: tuple[int, ...],
        store: torch.dtype,
        data_dtype: torch.dtype,
    ) -> None:
        """The faults of a chunk finished by the core's routines: :func:`_check_chunk`, as for :meth:`fit`.

        ``diagonals`` and ``variances`` (p, C) are the precisions' and the regularised covariances' diagonals,
        ``status`` the routines' verdicts (:func:`anomstats_torch._streaming.lapack_precisions`: -1 for a
        covariance that is not finite, which :func:`_check_chunk` names as such, the failed order otherwise).
        """
        _check_chunk(
            variances, status, diagonals, first_patch, spatial, ridge=self.ridge, store_dtype=store,
            data_dtype=data_dtype,
        )

    def _store_precision(self, store: Tensor, p0: int, p1: int, precision: Tensor) -> None:
        """Write finished, exactly symmetric precisions (p1 - p0, C, C) into patches p0:p1 of ``store`` (one rounding)."""
        store[p0:p1].copy_(precision)

    # ------------------------------------------------------------------ scoring
    def mahalanobis(self, embedding: Tensor) -> Tensor:
        """PaDiM's distance map ``sqrt(max(δᵀ Σ⁻¹ δ, 0))`` per patch → (B, H, W), batched on the module's device.

        Chunked over patches (an axis fixed by the buffers), so a ``torch.jit.trace`` at one batch size is
        correct at every batch size. Computed in float32 (float64 if the module or the input is), from
        buffers upcast chunk by chunk; returned in the dtype of a float16/bfloat16 input (one rounding), so
        that the layers after it (cast with the model by ``model.half()``) get what they expect, otherwise in
        the working dtype. Bool and integer embeddings are scored as the core scores them (0/1, exact values).
        The same method serves the low-rank form and the packed storage, with the same guarantees:

        - **Shapes**: the embedding must be ``(B, C, *spatial)`` with the fit's C and ``prod(spatial)`` patches; any
          other shape (1-D, another C or number of patches) raises the core's ``ValueError``
          (:func:`anomstats._validation.check_patch_score_shape`), which names the expected shape.
        - **Non-finite queries**: in eager mode a NaN or infinite value raises ``ValueError`` naming the
          embedding, the first sample and patch holding one (the core's message,
          :func:`anomstats._patch_kernels.raise_non_finite_query`). While tracing or exporting
          (``torch.jit.trace``, ``torch.export``, ``torch.compile``, ONNX export) the check is skipped, since a
          recorded graph cannot branch on data: there a NaN query gives NaN at its patch and an infinite one NaN
          or inf, as anomalib's.
        - **Far queries**: finite queries at any distance give finite distances, or ``+inf`` where the distance
          itself exceeds the dtype's range, never NaN, eager and exported alike: past
          ``max|δ| > sqrt(max / (8 C² max_k P_kk))`` (about 1e16 for unit-variance float32 features) ``δ`` is
          divided by its largest magnitude ``s`` and the distance is ``s·sqrt(q(δ/s))``; below it the numbers are
          anomalib's formula bit for bit.
        - **Gradients** with respect to the embedding are finite everywhere: the square root's gradient at a
          zero distance (the patch mean) is 0 instead of NaN (the distance is not differentiable there; 0 is a
          subgradient), and the far-query scaling is a constant for autograd, so the gradient is exact.

        Examples
        --------
        >>> import torch
        >>> from anomstats_torch import MultiVariateGaussian
        >>> mvg = MultiVariateGaussian(2, 1)  # identity precision, zero mean
        >>> mvg.mahalanobis(torch.tensor([[[[3.0]], [[4.0]]]]))
        tensor([[[5.]]])
        >>> mvg.mahalanobis(torch.tensor([[[[3e30]], [[4e30]]]]))  # δᵀδ overflows float32; the distance does not
        tensor([[[5.0000e+30]]])
        >>> mvg.mahalanobis(torch.tensor([[[[float("nan")]], [[4.0]]]]))
        Traceback (most recent call last):
        ...
        ValueError: embedding contains non-finite values (NaN or infinity) at sample 0, patch 0 (position (0, 0) of the 1x1 grid); remove or replace the NaN or infinite values before scoring
        """
        with static_shapes_while_tracing():
            distances = self._mahalanobis(embedding)
        return distances.to(result_dtype(embedding.dtype, distances.dtype))

    def _mahalanobis(self, embedding: Tensor) -> Tensor:
        x = as_float_tensor(embedding, "embedding")
        self._require_fitted()
        channels, patches = self.mean.shape
        check_patch_score_shape(tuple(x.shape), channels, patches)
        spatial = tuple(int(size) for size in x.shape[2:])
        tracing = is_tracing()
        if not tracing:  # eager: NaN/inf queries are refused (the core's message); a graph cannot branch on them
            _check_queries(x, spatial)
        dtype = working_dtype(self.mean.dtype, x.dtype)
        vectors = _as_patches(x).to(device=self.mean.device)
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
            chunk = precision(p0, p1)
            bound = chunk.diagonal(dim1=-2, dim2=-1).amax(dim=-1)  # |P_ij| <= max_k P_kk for a definite P
            pieces.append(_distances(delta, lambda d: (torch.matmul(d, chunk) * d).sum(dim=-1), bound))  # (p, B)
        distances = torch.cat(pieces, dim=0)  # (P, B)
        if tracing:  # not a reshape of the transposed (B, P): its contiguity test would fix a batch of 1
            return distances.reshape(spatial + (-1,)).movedim(-1, 0)
        return distances.mT.reshape((-1,) + spatial)

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

    _stream_kind = "low_rank"

    def _check_state_consistency(self, incoming: dict[str, Tensor]) -> None:
        """``mean`` (C, H·W), ``basis`` (H·W, C, r), ``eigenvalues`` (H·W, r), ``ridge`` (0-d), and a stream's entries."""
        current = {name: self._buffers[name] for name in ("mean", "basis", "eigenvalues", "ridge")}
        _checkpoints.check_low_rank(type(self).__name__, incoming, current)
        _checkpoints.check_stream(type(self).__name__, incoming, self._stream_kind, _checkpoints.LOW_RANK_LAYOUT)

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
        """Set the buffers from ``mean`` (C, P) and the factors ``source(p0, p1)`` (p, C, k), chunk by chunk.

        The bases and eigenvalues are computed in float64 and stored in ``dtype``; a state ``dtype`` cannot hold
        is refused, naming the patch and the scale, with the dense form's messages (:meth:`_check_representable`):
        a mean beyond its range, eigenvalues that overflow it (float32 features of scale 1e19), a precision that
        underflows or overflows it.
        """
        channels, patches = mean.shape
        width = self._width(n_observations, channels)
        device = mean.device
        stored_mean = _stored_mean(mean, dtype, spatial)  # a copy (never the caller's or the stream's tensor)
        basis = torch.empty(patches, channels, width, dtype=dtype, device=device)
        eigenvalues = torch.empty(patches, width, dtype=dtype, device=device)
        block = rows_per_chunk(_low_rank.basis_bytes_per_patch(channels, n_columns), self.chunk_bytes, patches)
        for p0 in range(0, patches, block):
            p1 = min(p0 + block, patches)
            chunk_basis, singular = _low_rank.basis_of_factor(source(p0, p1), width)
            chunk_eigenvalues = _low_rank.eigenvalues_of(singular, n_observations, self._fit_ridge)
            if self._fit_ridge == 0:  # the core's singularity rule, on this chunk's (small) eigenvalues
                check_definite(chunk_eigenvalues.cpu().numpy(), channels, 0.0, p0, spatial)
            self._check_representable(chunk_basis, chunk_eigenvalues, dtype, p0, spatial)
            basis[p0:p1] = chunk_basis
            eigenvalues[p0:p1] = chunk_eigenvalues
        # Copies (never the caller's or the stream's tensors), in the working dtype on the fit's device.
        self.mean = stored_mean
        self.basis = basis
        self.eigenvalues = eigenvalues
        self.ridge = torch.tensor(self._fit_ridge, dtype=dtype, device=device)
        return [self.mean, self.basis, self.eigenvalues, self.ridge]

    def _check_representable(
        self, basis: Tensor, eigenvalues: Tensor, dtype: torch.dtype, first_patch: int, spatial: tuple[int, ...]
    ) -> None:
        """Refuse a chunk's float64 bases (p, C, r) and eigenvalues (p, r) that a ``dtype`` store cannot hold.

        The core's rule (:func:`anomstats._low_rank.check_representable`): eigenvalues beyond ``dtype``'s largest
        number, or a precision whose diagonal (:func:`anomstats_torch._low_rank.precision_diagonal`, rounded to
        ``dtype``) is zero, subnormal or infinite there. One reduction on the device per chunk; on the error path
        the core names the patch and the scale, with its messages.
        """
        info = torch.finfo(dtype)
        diagonal = _low_rank.precision_diagonal(basis, eigenvalues, self._fit_ridge).to(dtype)
        fits = (torch.isfinite(diagonal) & (diagonal >= info.tiny)).all(dim=-1)
        if eigenvalues.shape[-1]:
            fits &= eigenvalues.amax(dim=-1) <= info.max
        if bool(fits.all()):
            return
        check_representable(
            eigenvalues.cpu().numpy(), diagonal.double().cpu().numpy(), self._fit_ridge, basis.shape[1], info,
            first_patch, spatial, _scale_remedy(dtype),
        )
        raise AssertionError("unreachable: the core refuses what the device check refused")  # pragma: no cover

    def fit(self, embedding: Tensor) -> list[Tensor]:
        """Fit the low-rank Gaussians of ``embedding`` (B, C, H, W); returns ``[mean, basis, eigenvalues, ridge]``.

        Computed in float64 on the embedding's device, chunked over patches; the buffers are stored in the
        working dtype (a module cast to half precision keeps its dtype). The input is not modified.

        Raises
        ------
        ValueError
            Fewer than 2 embeddings, a wrong number of axes or non-finite values (naming the first patch holding
            one, the core's low-rank message); a state the stored dtype cannot represent, naming the patch and the
            features' scale (the dense form's messages): eigenvalues beyond its largest number (float32 features
            of scale 1e19: ``s²/(B − 1)`` beyond 3.4e38), or a precision whose diagonal underflows or overflows it.
        numpy.linalg.LinAlgError
            ``ridge=0`` with B <= C (the core's message), or a numerically singular patch with ``ridge=0``.
        """
        x = as_float_tensor(embedding, "embedding").detach()  # statistics, not a graph
        batch, _, spatial = check_fit_shape(x.shape, name="embedding")
        dtype = storage_dtype(self.mean.dtype, x.dtype)  # computed in float64 (FACTOR_DTYPE), stored so
        vectors = _as_patches(x)
        mean = vectors.mean(dim=0, dtype=_low_rank.FACTOR_DTYPE)
        _check_fit_mean(mean, vectors, spatial, name_value=False)  # the core's low-rank fit names the patch
        return self._finish(
            lambda p0, p1: _low_rank.centred_columns(vectors[:, :, p0:p1], mean[:, p0:p1]),
            batch, mean, batch, spatial, dtype,
        )

    # ------------------------------------------------------------------ streaming fit
    def reset(self) -> None:
        """Forget the streamed state accumulated by :meth:`update` (it leaves the state dict too)."""
        _streaming.close(self)

    @property
    def _moments(self) -> _low_rank.FactorMoments | None:
        """The streamed state as the kernels' ``FactorMoments`` (its mean is about ``stream_shift``), or None."""
        stream = _streaming.read(self, self._stream_kind)
        return None if stream is None else self._factor_moments(stream)

    def _factor_moments(self, stream: _streaming.Stream) -> _low_rank.FactorMoments:
        """The kernels' view of a stream: the same tensors (updated in place, or replaced, by its ``update``)."""
        moments = _low_rank.FactorMoments.__new__(_low_rank.FactorMoments)
        moments.n_features, moments.n_patches, moments.chunk_bytes = stream.n_features, stream.n_patches, self.chunk_bytes
        moments.count, moments.mean, moments.factor = stream.count, stream.mean, stream.spread
        return moments

    def update(self, embedding: Tensor) -> None:
        """Fold a batch (B, C, H, W) into the streamed scatter factors; call :meth:`compute` to set the buffers.

        The state (count, a fixed shift: the first batch's mean, the mean about it (C, P) and the factors
        (P, C, k)) is kept in ``accumulate_dtype`` (float64 for float64 input) as buffers on the device of the
        first batch (``stream_*``: in ``state_dict()`` until :meth:`compute`, moved by ``.to(device)``, never
        cast, cleared by :meth:`reset`, as the dense form's). Every batch enters as ``x − shift``. The input is
        not modified; a refused batch leaves the state as it was.

        Raises
        ------
        NotImplementedError
            With torch.distributed initialised (see the class notes).
        """
        _refuse_distributed()
        x = as_float_tensor(embedding, "embedding").detach()
        if x.dtype == torch.bool:  # 0/1, as fit and the core take them (exact in float32)
            x = x.to(torch.float32)
        _, _, spatial = check_fit_shape(x.shape, min_observations=1, name="embedding")
        vectors = _as_patches(x)
        stream = self._stream_for(vectors, x.dtype)
        moments = self._factor_moments(stream)
        dtype = stream.shift.dtype
        shifted = torch.sub(vectors.to(device=stream.shift.device), stream.shift).to(dtype)  # x − shift, rounded once
        batch_mean = shifted.mean(dim=0)
        _check_mean_finite(batch_mean)  # before the state changes
        moments.update(shifted, batch_mean)
        stream.count, stream.mean, stream.spread = moments.count, moments.mean, moments.factor
        stream.wide = stream.wide or x.dtype == torch.float64
        stream.spatial = spatial
        _streaming.write(self, self._stream_kind, stream)

    def compute(self, keep_stream: bool = False) -> list[Tensor]:
        """Set the buffers from the streamed factors; returns ``[mean, basis, eigenvalues, ridge]``.

        The bases are computed in float64. As the dense form's :meth:`MultiVariateGaussian.compute`, this ends
        the stream by default: the factors (P, C, k), which would otherwise sit next to the fitted basis, are
        freed, and :meth:`update`/:meth:`compute` raise until :meth:`reset`. ``keep_stream=True`` keeps them,
        so more updates can follow (until then the stream is not in ``state_dict()``: a checkpoint taken now
        holds the fit). A failed compute leaves the stream as it was (the factors are only read).

        Raises
        ------
        NotImplementedError
            With torch.distributed initialised (see the class notes).
        RuntimeError
            The stream was spent by an earlier ``compute()``.
        """
        keep_stream = check_bool(keep_stream, "keep_stream")
        _refuse_distributed()
        if _streaming.is_spent(self):
            raise _streaming.spent_error("compute()", self._stream_kind)
        stream = _streaming.read(self, self._stream_kind)
        if stream is None:
            raise NotFittedError("no data: call update(embedding) before compute()")
        require_observations(
            stream.count, name="compute: the stream", streamed=True, where="; call update() with more data"
        )
        dtype = storage_dtype(self.mean.dtype, torch.float64 if stream.wide else torch.float32)
        patches = stream.n_patches
        spatial = stream.spatial if len(stream.spatial) and _prod(stream.spatial) == patches else (patches,)
        factor = stream.spread
        mean = stream.shift + stream.mean  # one rounding relative to |mean|, as the one-shot fit's
        fitted = self._finish(lambda p0, p1: factor[p0:p1], stream.count, mean, factor.shape[2], spatial, dtype)
        if keep_stream:
            _streaming.set_persistent(self, False)  # a finished fit's checkpoint: the buffers only
        else:
            del factor, stream
            _streaming.spend(self)
        return fitted

    # ------------------------------------------------------------------ scoring
    def _mahalanobis(self, embedding: Tensor) -> Tensor:
        x = as_float_tensor(embedding, "embedding")
        self._require_fitted()
        channels, patches = self.mean.shape
        width = self.basis.shape[2]
        check_patch_score_shape(tuple(x.shape), channels, patches)
        spatial = tuple(int(size) for size in x.shape[2:])
        tracing = is_tracing()
        if not tracing:  # eager: NaN/inf queries are refused (the core's message); a graph cannot branch on them
            _check_queries(x, spatial)
        dtype = working_dtype(self.mean.dtype, x.dtype)
        vectors = _as_patches(x).to(device=self.mean.device)
        rows = TRACE_PLANNING_ROWS if tracing else max(1, x.shape[0])  # batch is symbolic when tracing
        itemsize = torch.finfo(dtype).bits // 8
        per_patch = (rows * (3 * channels + 2 * width) + 2 * channels * width) * itemsize
        block = rows_per_chunk(per_patch, self.chunk_bytes, patches)
        ridge = self.ridge.to(dtype)
        # The effective precision's largest eigenvalue, 1/min(λ, ρ) (ρ only where it is positive): its entries'
        # bound for the overflow-safe distances.
        ridge_floor = torch.where(ridge > 0, ridge, torch.full_like(ridge, float("inf")))
        pieces = []
        for p0 in range(0, patches, block):
            p1 = min(p0 + block, patches)
            mean = self.mean[:, p0:p1].to(dtype)
            if tracing:  # shape-agnostic expression: the batch size stays symbolic in the graph
                delta = (vectors[:, :, p0:p1].to(dtype) - mean).permute(2, 0, 1)
            else:
                delta = _centred_patches(vectors[:, :, p0:p1], mean, dtype)
            basis, eigenvalues = self.basis[p0:p1].to(dtype), self.eigenvalues[p0:p1].to(dtype)
            bound = torch.minimum(eigenvalues.amin(dim=-1), ridge_floor).reciprocal()  # (p,)
            pieces.append(  # (p, B)
                _distances(delta, lambda d: _low_rank.squared_distances(d, basis, eigenvalues, ridge), bound)
            )
        distances = torch.cat(pieces, dim=0)  # (P, B)
        if tracing:  # not a reshape of the transposed (B, P): its contiguity test would fix a batch of 1
            return distances.reshape(spatial + (-1,)).movedim(-1, 0)
        return distances.mT.reshape((-1,) + spatial)

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

    def _put_precision(
        self,
        store: Tensor,
        p0: int,
        p1: int,
        covariance: Tensor,
        spatial: tuple[int, ...],
        data_dtype: torch.dtype | None = None,
        rank_dtype: torch.dtype | None = None,
    ) -> None:
        data = data_dtype if data_dtype is not None else _data_dtype_of_store(store.dtype)
        dense = _precision_into(
            covariance, torch.empty_like(covariance), p0, spatial, ridge=self.ridge, store_dtype=store.dtype,
            data_dtype=data, rank_dtype=rank_dtype,
        )
        store[p0:p1] = _compact.pack(dense, store.dtype)  # exactly symmetric: its upper triangle, rounded once

    def _store_precision(self, store: Tensor, p0: int, p1: int, precision: Tensor) -> None:
        store[p0:p1] = _compact.pack(precision, store.dtype)  # exactly symmetric: its upper triangle, rounded once

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
