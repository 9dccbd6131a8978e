"""Tensor kernels of the exact low-rank per-patch Gaussians (the torch twin of :mod:`anomstats._low_rank`).

The rules (the width ``r = min(N − 1, C)``, the normalisation, Chan's merge weights, the messages) come
from the core; only the tensor work is here: the basis of each patch's centred observations, the
streamed scatter factor, the Mahalanobis kernel (projection plus orthogonal residual) and the dense
materialisation of the precision. The basis follows the core's algorithm (the ``N×N`` Gram's eigenpairs,
with a Cholesky-QR pass where needed), so both packages give the same fit to rounding. Everything runs batched over patches on the tensors' device.

With ``V`` (C, r) the orthonormal basis of a patch's centred observations and ``s`` their singular values,
the regularised covariance is exactly ``Σ = V diag(λ) Vᵀ + ρ (I − V Vᵀ)``, ``λ = s²/(N − 1) + ρ``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from anomstats._low_rank import ORTHONORMAL_ENOUGH, eigenvalues_of, low_rank_width, outside_floor, variance_floor
from anomstats._rules import chan_merge_weights

from ._policy import rows_per_chunk

__all__ = [
    "basis_bytes_per_patch",
    "centred_columns",
    "basis_of_factor",
    "eigenvalues_of",
    "log_det_of",
    "squared_distances",
    "precision_of",
    "precision_diagonal",
    "FactorMoments",
]

#: The dtype every basis is computed in, whatever the input's or the module's (the core accumulates in
#: float64 too).
FACTOR_DTYPE = torch.float64


def basis_bytes_per_patch(n_features: int, n_columns: int) -> int:
    """Bytes of the temporaries of one patch's basis of a (C, k) float64 factor, for chunk planning.

    The centred float64 copy (``C·k``), the first and second passes' columns (``2·C·m``), the result
    (``C·m``), the projected factor (``m·k``) and the small Gram and eigenvector matrices (a few ``k²``),
    ``m = min(C, k)``.
    """
    m = min(n_features, n_columns)
    return 8 * (n_features * n_columns + 3 * n_features * m + m * n_columns + 4 * n_columns * n_columns)


def centred_columns(vectors: Tensor, mean: Tensor) -> Tensor:
    """Observations ``vectors`` (n, C, p) minus ``mean`` (C, p) as float64 columns, shape (p, C, n).

    The input is read, never modified: the difference is a new tensor.
    """
    return (vectors.to(FACTOR_DTYPE) - mean.to(FACTOR_DTYPE)).permute(2, 1, 0)


def basis_of_factor(factor: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Orthonormal bases (p, C, width) and singular values (p, width) of factors (p, C, k), k >= width.

    The core's algorithm (:func:`anomstats._low_rank.basis_of_factor`) on tensors, in float64: the
    eigenpairs of the ``k×k`` Gram ``FᵀF`` give ``V₁ = F W e^{-1/2}``; directions whose variance is below
    the Gram's rounding (:func:`anomstats._low_rank.variance_floor`) become zero columns with zero singular
    value (exactly the ridge); where ``V₁`` departs from orthonormality by more than
    :data:`anomstats._low_rank.ORTHONORMAL_ENOUGH`, one Cholesky-QR pass and the eigenpairs of the scatter
    projected on its result make it orthonormal to rounding. Batched products and small eigenproblems:
    much faster than a batched SVD, on the CPU and on CUDA.
    """
    f = factor.to(FACTOR_DTYPE)
    p, c, k = f.shape
    if width == 0:
        return f.new_zeros((p, c, 0)), f.new_zeros((p, 0))
    values, vectors = torch.linalg.eigh(torch.matmul(f.mT, f))  # ascending
    values = values.flip(-1)[:, :width]
    vectors = vectors.flip(-1)[:, :, :width]
    kept = values > variance_floor(k) * values[:, :1]
    scale = torch.where(kept, values.clamp_min(torch.finfo(FACTOR_DTYPE).tiny).rsqrt(), torch.zeros_like(values))
    first = torch.matmul(f, vectors * scale.unsqueeze(1))
    overlap = torch.matmul(first.mT, first)
    diagonal = overlap.diagonal(dim1=-2, dim2=-1)
    diagonal.copy_(torch.where(kept, diagonal, torch.ones_like(diagonal)))
    eye = torch.eye(width, dtype=FACTOR_DTYPE, device=f.device)
    if float((overlap - eye).abs().amax()) <= ORTHONORMAL_ENOUGH:
        return first, torch.where(kept, values, torch.zeros_like(values)).sqrt()
    lower = torch.linalg.cholesky(overlap)
    second = torch.linalg.solve_triangular(lower, first.mT, upper=False).mT  # V₁ L⁻ᵀ
    projected = torch.matmul(second.mT, f)
    values, vectors = torch.linalg.eigh(torch.matmul(projected, projected.mT))
    basis = torch.matmul(second, vectors.flip(-1))
    singular = values.flip(-1).clamp_min(0).sqrt()
    # The dropped directions sort last (their projected variance is exactly zero): zero variance there.
    dropped = (~kept).sum(dim=1, keepdim=True)
    positions = torch.arange(width, device=f.device).unsqueeze(0)
    return basis, torch.where(positions >= width - dropped, torch.zeros_like(singular), singular)


def log_det_of(eigenvalues: Tensor, ridge: Tensor, n_features: int) -> Tensor:
    """``log det Σ = Σ log λ_i + (C − r) log ρ`` per patch, from eigenvalues (P, r) and the 0-d ridge."""
    width = eigenvalues.shape[-1]
    log_det = torch.log(eigenvalues).sum(dim=-1)
    if n_features > width:  # at full rank there is no ridge term (and log 0 would give 0·(−inf) = NaN)
        log_det = log_det + (n_features - width) * torch.log(ridge.to(eigenvalues.dtype))
    return log_det


def squared_distances(delta: Tensor, basis: Tensor, eigenvalues: Tensor, ridge: Tensor) -> Tensor:
    """``d²`` (p, B) of deviations ``delta`` (p, B, C) for bases (p, C, r), eigenvalues (p, r), 0-d ``ridge``.

    ``c = δ V``; ``d² = Σ c_i²/λ_i + |δ − c Vᵀ|²/ρ``: the projection term plus the residual outside the
    basis, the residual formed as a vector (never ``|δ|² − |c|²``, which cancels for queries near the
    span). ``ρ = 0`` is allowed only at full rank, where the residual is rounding and is dropped; that is a
    tensor ``where`` rather than a Python branch on the buffer's value, so traced and exported graphs keep it.
    """
    coords = torch.matmul(delta, basis)  # (p, B, r)
    inside = (coords.square() / eigenvalues.unsqueeze(1)).sum(dim=-1)
    # The residual in (p, C, B) layout, V c as V @ cᵀ: the basis enters both products as it is stored, so
    # an exported graph holds it once (with basis.mT an exporter folds a transposed copy into a second constant).
    residual = delta.mT - torch.bmm(basis, coords.mT)  # bmm: matmul's batch folding tests the batch for 1
    outside = residual.square().sum(dim=-2)
    positive = ridge > 0
    # 1 where the ridge is 0: the division is then harmless (and differentiable) and its result unused.
    safe_ridge = torch.where(positive, ridge, torch.ones_like(ridge))
    return inside + torch.where(positive, outside / safe_ridge, torch.zeros_like(outside))


def precision_of(basis: Tensor, eigenvalues: Tensor, ridge: float) -> Tensor:
    """Dense ``Σ⁻¹ = V diag(1/λ − 1/ρ) Vᵀ + I/ρ`` (p, C, C) from float64 ``V`` and ``λ``, exactly symmetric.

    With ``ρ = 0`` (full rank only) it is ``V diag(1/λ) Vᵀ``.
    """
    inverse_ridge = 1.0 / ridge if ridge > 0 else 0.0
    scale = eigenvalues.reciprocal() - inverse_ridge
    # Half the product (scaling by 0.5 is exact), then H + Hᵀ: symmetric bit for bit, whatever BLAS rounds.
    half = torch.matmul(basis * (0.5 * scale).unsqueeze(1), basis.mT)
    precision = half + half.mT
    precision.diagonal(dim1=-2, dim2=-1).add_(inverse_ridge)
    return precision


def precision_diagonal(basis: Tensor, eigenvalues: Tensor, ridge: float) -> Tensor:
    """Diagonal (p, C) of ``Σ⁻¹ = V diag(1/λ) Vᵀ + (I − V Vᵀ)/ρ`` from bases (p, C, r) and eigenvalues (p, r).

    The core's :func:`anomstats._low_rank.precision_diagonal` on tensors (no ``C×C`` matrix formed): the diagonal
    of the precision the dense form would store, for the representability check of a fit.
    """
    squares = basis.square()
    inside = torch.matmul(squares, eigenvalues.reciprocal().unsqueeze(-1)).squeeze(-1)
    if ridge == 0:
        return inside
    outside = 1.0 - squares.sum(dim=-1)
    # The rounding of |V_k|² (at full rank, all of it) is no share outside the basis (core's outside_floor).
    outside = torch.where(outside > outside_floor(basis.shape[-1]), outside, torch.zeros_like(outside))
    return inside + outside / ridge


class FactorMoments:
    """Streamed state of low-rank per-patch Gaussians: count, means (C, P) and scatter factors (P, C, k).

    ``Σ_obs (x − μ)(x − μ)ᵀ = F Fᵀ`` per patch: a batch contributes its own centred observations as
    columns, and each merge one column ``δ·sqrt(n_a n_b / n)`` (Chan's pairwise update; the weights are
    :func:`anomstats._rules.chan_merge_weights`), so nothing cancels and any split of the data gives the
    one-shot fit to rounding. When the factor would have more than ``C`` columns it is replaced by
    ``V diag(s)`` (the same scatter, ``min(N − 1, C)`` columns), as the core's
    :class:`anomstats._low_rank.LowRankMoments` does.

    Parameters
    ----------
    n_features, n_patches : int
    dtype : torch.dtype
        Accumulation dtype of the means and factors.
    device : torch.device
    chunk_bytes : int
        Budget of the temporaries of one chunk of patches.
    """

    def __init__(self, n_features: int, n_patches: int, dtype: torch.dtype, device: torch.device,
                 chunk_bytes: int) -> None:
        self.n_features = n_features
        self.n_patches = n_patches
        self.chunk_bytes = chunk_bytes
        self.count = 0
        self.mean = torch.zeros(n_features, n_patches, dtype=dtype, device=device)
        self.factor = torch.zeros(n_patches, n_features, 0, dtype=dtype, device=device)

    def clone(self) -> FactorMoments:
        """A copy whose tensors are ordinary (not inference) tensors."""
        copy = FactorMoments.__new__(FactorMoments)
        copy.__dict__.update(self.__dict__)
        copy.mean, copy.factor = self.mean.clone(), self.factor.clone()
        return copy

    def update(self, vectors: Tensor, batch_mean: Tensor) -> None:
        """Fold a validated batch ``vectors`` (n, C, P) (n >= 1, on the state's device) into the state.

        ``batch_mean`` (C, P) is its mean in the state's dtype (the caller checked it is finite).
        """
        batch = vectors.shape[0]
        dtype, device = self.mean.dtype, self.mean.device
        chan = chan_merge_weights(self.count, batch)
        delta = batch_mean - self.mean
        # One observation's centred column is exactly zero: only the merge column carries its information.
        own = batch if batch > 1 else 0
        merge = 1 if self.count and chan.cross else 0
        k = self.factor.shape[2]
        grown = torch.empty(self.n_patches, self.n_features, k + own + merge, dtype=dtype, device=device)
        grown[:, :, :k] = self.factor
        if merge:
            grown[:, :, k + own] = delta.mT * math.sqrt(chan.cross)
        if own:
            per_patch = 3 * batch * self.n_features * max(vectors.element_size(), grown.element_size())
            block = rows_per_chunk(per_patch, self.chunk_bytes, self.n_patches)
            for p0 in range(0, self.n_patches, block):
                p1 = min(p0 + block, self.n_patches)
                grown[p0:p1, :, k:k + own] = (vectors[:, :, p0:p1].to(dtype) - batch_mean[:, p0:p1]).permute(2, 1, 0)
        self.mean += delta * chan.mean_step
        self.count = int(chan.total)
        self.factor = grown
        if grown.shape[2] > self.n_features:
            self.factor = self._reduced(grown)

    def _reduced(self, factor: Tensor) -> Tensor:
        """``V diag(s)`` of every patch's factor: the same scatter in ``min(N − 1, C)`` columns."""
        width = low_rank_width(self.count, self.n_features)
        out = torch.empty(self.n_patches, self.n_features, width, dtype=factor.dtype, device=factor.device)
        block = rows_per_chunk(basis_bytes_per_patch(self.n_features, factor.shape[2]), self.chunk_bytes, self.n_patches)
        for p0 in range(0, self.n_patches, block):
            p1 = min(p0 + block, self.n_patches)
            basis, singular = basis_of_factor(factor[p0:p1], width)
            out[p0:p1] = basis * singular.unsqueeze(1)
        return out
