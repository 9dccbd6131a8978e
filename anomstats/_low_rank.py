"""Exact low-rank per-patch Gaussians: the state, its streaming merge and its kernels.

With ``N`` observations of ``C`` features and ``N <= C``, a patch's sample covariance has rank at most
``r = N - 1``, and with the ridge ``ρ`` the regularised covariance is exactly

    Σ = V diag(λ) Vᵀ + ρ (I − V Vᵀ),   λ_i = s_i² / (N − 1) + ρ,

with ``V`` (C, r) an orthonormal basis of the centred observations and ``s_i`` their singular values.
Storing ``V`` and ``λ`` takes ``C·r`` numbers instead of ``C²``; the fit needs no ``C×C`` matrix at all.

* The basis comes from the centred ``N×N`` Gram matrix (its eigenpairs, batched BLAS-3: several times
  faster than a thin SVD here), never from the ``C×C`` covariance. The Gram squares the condition
  number, which costs the first pass's columns their orthonormality by about ``eps·e_max/e`` where the
  spread is wide: past :data:`ORTHONORMAL_ENOUGH` one Cholesky-QR pass and the eigenpairs of the scatter
  projected on its result restore it to rounding, and directions whose variance is below the Gram's
  rounding (:func:`variance_floor`) are set to exactly the ridge (:func:`basis_of_factor`).
* Streaming keeps a *scatter factor* ``F`` (C, k) per patch with ``Σ (x − μ)(x − μ)ᵀ = F Fᵀ``: a batch
  contributes its own centred observations as columns, and a merge adds one column ``δ·sqrt(cross)``
  (Chan's pairwise update, :func:`anomstats._rules.chan_merge_weights`). Nothing cancels, any split of
  the data gives the one-shot fit to rounding, and the factor is reduced to its basis when it grows past
  ``C`` columns (and when the fit is finalised).
* Mahalanobis distances are the projection term plus the orthogonal residual, computed directly:
  ``p = Vᵀδ``, ``d² = Σ p_i²/λ_i + |δ − V p|²/ρ`` (never ``|δ|² − |p|²``, which cancels).
* ``log det Σ = Σ log λ_i + (C − r) log ρ``.

The PyTorch adapter imports the rules here (:func:`low_rank_width`, the messages) and re-implements the
kernels on tensors.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ._patch_kernels import ThreadScratch, _limits, fault_scale, precision_fault, unrepresentable_error
from ._rules import chan_merge_weights, covariance_normalisation
from ._validation import describe_patch

__all__ = [
    "FORMS",
    "check_form",
    "low_rank_width",
    "needs_ridge_message",
    "no_advantage_message",
    "LowRankMoments",
    "ORTHONORMAL_ENOUGH",
    "variance_floor",
    "basis_of_factor",
    "eigenvalues_of",
    "factor_chunk",
    "check_definite",
    "precision_diagonal",
    "outside_floor",
    "check_representable",
    "OUTSIDE_FRACTION",
    "squared_distances",
    "dense_from_low_rank",
]

#: The forms of a per-patch Gaussian.
FORMS = ("dense", "low_rank")


def check_form(form: Any) -> str:
    """Validate ``form``: ``"dense"`` or ``"low_rank"``.

    Examples
    --------
    >>> check_form("low_rank")
    'low_rank'
    >>> check_form("sparse")
    Traceback (most recent call last):
    ...
    ValueError: form must be 'dense' or 'low_rank', got 'sparse'
    """
    if not isinstance(form, str) or form not in FORMS:
        raise ValueError(f"form must be 'dense' or 'low_rank', got {form!r}")
    return form


def low_rank_width(n_observations: int, n_features: int) -> int:
    """``r = min(N − 1, C)``: the rank of a sample covariance of ``N`` observations of ``C`` features.

    Examples
    --------
    >>> low_rank_width(100, 550), low_rank_width(600, 550)
    (99, 550)
    """
    return max(0, min(int(n_observations) - 1, int(n_features)))


def needs_ridge_message(n_observations: int, n_features: int) -> str:
    """The message for ``ridge=0`` with too few observations (both packages raise it)."""
    return (
        f"form='low_rank' with ridge=0 and N = {n_observations} observations of C = {n_features} features: "
        f"every covariance has rank at most N - 1 = {n_observations - 1} < C and is singular. Use a positive "
        "ridge (the default is anomalib's 0.01001)."
    )


def no_advantage_message(n_observations: int, n_features: int) -> str:
    """The warning when the observations reach the number of features (both packages warn it)."""
    return (
        f"form='low_rank' with N = {n_observations} observations of C = {n_features} features: the rank "
        f"reaches C, so the low-rank form stores C x C numbers per patch like the dense one, with no "
        "advantage; use form='dense' (the results are the same)."
    )


def factor_chunk(flat: NDArray, start: int, stop: int,
                 scratch: ThreadScratch | None = None, shift: NDArray | None = None) -> tuple[NDArray, NDArray]:
    """Means (p, C) and centred observations (p, C, n), float64, of patches ``start:stop`` of ``flat`` (n, C, P).

    With ``scratch`` the centred block lives in this thread's reused buffer (valid until the next chunk).
    With ``shift`` ((p, C), float64) the copy is ``x − shift`` (in the same pass) and the means returned are
    ``mean − shift``: numbers of the data's spread, exact far from the origin (see
    :mod:`anomstats._moment_kernels`).
    """
    n, c, _ = flat.shape
    shape = (stop - start, c, n)
    block = np.empty(shape) if scratch is None else scratch.array(shape, np.dtype(np.float64), "factor")
    source = flat[:, :, start:stop].transpose(2, 1, 0)
    if shift is None:
        np.copyto(block, source)
    else:
        np.subtract(source, shift[:, :, None], out=block)
    mean = block.mean(axis=2)
    block -= mean[:, :, None]
    return mean, block


#: Largest departure from orthonormality (max |VᵀV − I|) of the first pass that is kept as it is: 256 eps
#: moves a Mahalanobis distance by about 256·eps·sqrt(λ_max/ρ) relative (6e-12 at λ_max/ρ = 1e4).
ORTHONORMAL_ENOUGH = 256 * np.finfo(np.float64).eps


def variance_floor(n_columns: int) -> float:
    """Eigenvalues of a ``k``-column Gram below this fraction of the largest are rounding: ``64·k·eps``.

    The Gram's own rounding is about ``k·eps·e_max``; the margin keeps the first pass's columns for the
    kept directions orthonormal to better than ``1/64`` (so that one Cholesky-QR pass makes them exact).

    Examples
    --------
    >>> print(f"{variance_floor(100):.2e}")
    1.42e-12
    """
    return 64 * n_columns * float(np.finfo(np.float64).eps)


def basis_of_factor(factor: NDArray, width: int,
                    scratch: ThreadScratch | None = None) -> tuple[NDArray, NDArray]:
    """Orthonormal basis ``V`` (p, C, width) and singular values ``s`` (p, width) of factors (p, C, k).

    Two passes through ``k×k`` and ``width×width`` eigenproblems (fast, batched BLAS-3), accurate to
    rounding:

    1. ``G = FᵀF`` (``k×k``) and its eigenpairs ``(e, W)``; the leading ``width`` directions
       ``V₁ = F W e^{-1/2}`` span the factor's range. Directions with ``e <= 64 k eps · e_max`` carry no
       variance above the rounding of ``G`` itself: their columns are set to zero and their singular value
       to 0, so the covariance is exactly the ridge along them, whichever unit vector completes the basis
       (a zero column is harmless in :func:`squared_distances`, and the precision and ``log det`` count it
       as a ridge direction).
    2. ``V₁`` is orthonormal only to about ``eps · e_max / e`` per column. Where that is within
       256 eps for every patch of the chunk, ``V₁`` is the basis; otherwise one Cholesky-QR pass
       (``V₁ᵀV₁ = LLᵀ``, ``V₂ = V₁L⁻ᵀ``: orthonormal to ``eps`` since ``cond(V₁) ≈ 1``) and the eigenpairs
       of the factor projected on it (``B = V₂ᵀF``, ``BBᵀ = W₃ diag(s²) W₃ᵀ``) give ``V = V₂W₃``, whose
       columns are orthonormal and diagonalise the scatter to rounding.

    Examples
    --------
    >>> f = np.array([[[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])   # one patch, C = 3, k = 2
    >>> v, s = basis_of_factor(f, 2)
    >>> s.round(12).tolist(), np.abs(v[0]).round(12).tolist()
    ([[3.0, 1.0]], [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    >>> v, s = basis_of_factor(np.array([[[1.0, -1.0], [2.0, -2.0]]]), 1)   # rank one
    >>> s.round(12).tolist()
    [[3.162277660168]]
    """
    if width == 0:
        return np.zeros(factor.shape[:2] + (0,)), np.zeros(factor.shape[:1] + (0,))
    p, c, k = factor.shape
    f64 = np.dtype(np.float64)

    def buffer(name: str, shape: tuple[int, ...]) -> NDArray:
        # Per-thread buffers reused across chunks: fresh ones would be page-faulted in every time (the
        # dominant cost of the products here, measured).
        return np.empty(shape) if scratch is None else scratch.array(shape, f64, name)

    gram = np.matmul(factor.transpose(0, 2, 1), factor, out=buffer("gram", (p, k, k)))
    values, vectors = np.linalg.eigh(gram)  # ascending
    # Descending, contiguous (a reversed view would send the products below off BLAS).
    values = np.ascontiguousarray(values[:, ::-1][:, :width])
    vectors = np.ascontiguousarray(vectors[:, :, ::-1][:, :, :width])
    floor = variance_floor(k) * values[:, :1]
    kept = values > floor
    scale = np.where(kept, 1.0 / np.sqrt(np.where(kept, values, 1.0)), 0.0)
    vectors *= scale[:, None, :]
    first = np.matmul(factor, vectors, out=buffer("first", (p, c, width)))
    del gram, vectors
    # Cholesky-QR on the kept columns (the dropped ones are zero: their block of the Gram is set to I).
    overlap = np.matmul(first.transpose(0, 2, 1), first, out=buffer("overlap", (p, width, width)))
    index = np.arange(width)
    overlap[:, index, index] = np.where(kept, overlap[:, index, index], 1.0)
    singular = np.sqrt(np.where(kept, values, 0.0))
    overlap[:, index, index] -= 1.0
    if np.abs(overlap).max() <= ORTHONORMAL_ENOUGH:
        # Pass 1 is orthonormal to a few hundred eps already (the common case: its defect is about
        # eps·e_max/e_min): the second pass would change nothing that matters.
        return first, singular
    overlap[:, index, index] += 1.0
    # V₁ L⁻ᵀ through the explicit inverse of L: L is within rounding of the identity, so its inverse is
    # perfectly conditioned, and one product is much faster than a batched solve.
    inverse = np.linalg.inv(np.linalg.cholesky(overlap)).transpose(0, 2, 1)
    second = np.matmul(first, inverse, out=buffer("second", (p, c, width)))
    projected = np.matmul(second.transpose(0, 2, 1), factor, out=buffer("projected", (p, width, k)))
    scatter = np.matmul(projected, projected.transpose(0, 2, 1), out=buffer("overlap", (p, width, width)))
    values, vectors = np.linalg.eigh(scatter)
    values = np.ascontiguousarray(values[:, ::-1])
    # Written over V₁, no longer needed: the temporaries stay at three (C, k)-sized blocks per patch.
    basis = np.matmul(second, np.ascontiguousarray(vectors[:, :, ::-1]), out=first)
    singular = np.sqrt(np.maximum(values, 0.0))
    # The dropped directions sort last (their projected variance is exactly zero): zero variance there.
    dropped_count = (~kept).sum(axis=1)
    singular[np.arange(width)[None, :] >= (width - dropped_count)[:, None]] = 0.0
    return basis, singular


def eigenvalues_of(singular_values: NDArray, n_observations: int, ridge: float) -> NDArray:
    """``λ = s² / (N − 1) + ρ``: the regularised covariance's eigenvalues along the basis.

    The normalisation is :func:`anomstats._rules.covariance_normalisation` (unit weights, ``ddof = 1``).

    Examples
    --------
    >>> eigenvalues_of(np.array([3.0, 1.0]), 10, 0.5).tolist()
    [1.5, 0.6111111111111112]
    """
    return singular_values**2 / covariance_normalisation(n_observations, None, 1) + ridge


def check_definite(eigenvalues: NDArray, n_features: int, ridge: float, first_patch: int,
                   spatial: tuple[int, ...]) -> None:
    """Without a ridge, refuse a numerically singular patch (``λ_min <= C·eps·λ_max``), naming it.

    The dense fit's rule (a pivot below ``C·eps`` times the diagonal counts as zero), here on the
    eigenvalues themselves. With a positive ridge every ``λ >= ρ`` and nothing is checked.
    """
    if ridge > 0 or eigenvalues.size == 0:
        return
    eps = np.finfo(np.float64).eps
    bad = ~(eigenvalues.min(axis=1) > n_features * eps * eigenvalues.max(axis=1))
    if bad.any():
        patch = first_patch + int(np.argmax(bad))
        raise np.linalg.LinAlgError(
            f"the covariance at {describe_patch(patch, spatial)} is singular (ridge=0): its smallest "
            "eigenvalue is below C·eps times its largest. Use a positive ridge."
        )


def precision_diagonal(basis: NDArray, eigenvalues: NDArray, ridge: float) -> NDArray:
    """Diagonal (p, C) of the precisions ``Σ⁻¹ = V diag(1/λ) Vᵀ + (I − V Vᵀ)/ρ`` of patches, no ``C×C`` matrix formed.

    ``Σ⁻¹_kk = Σ_i V_ki²/λ_i + (1 − Σ_i V_ki²)/ρ`` from bases (p, C, r) and eigenvalues (p, r) (float64; the
    second term only with a positive ridge, and only where ``1 − |V_k|²`` exceeds its rounding,
    :func:`outside_floor`). Zero columns of the basis (directions left at the ridge) count in the second term.
    The diagonal of the precision the dense form would store, for :func:`check_representable`.

    Examples
    --------
    >>> v = np.array([[[1.0], [0.0]]])                     # C = 2, r = 1: feature 0 spans the basis
    >>> precision_diagonal(v, np.array([[4.0]]), 0.5).tolist()
    [[0.25, 2.0]]
    """
    with np.errstate(divide="ignore"):  # λ = 0 only for ridge=0 patches that check_definite refuses first
        inside = np.einsum("pcr,pcr,pr->pc", basis, basis, 1.0 / eigenvalues)
    if ridge == 0:
        return inside
    outside = 1.0 - np.einsum("pcr,pcr->pc", basis, basis)
    outside[outside <= outside_floor(basis.shape[2])] = 0.0  # rounding of |V_k|² (at full rank, all of it)
    return inside + outside / ridge


def outside_floor(width: int) -> float:
    """A feature's share outside a basis of ``width`` columns, ``1 − |V_k|²``, at or below this is rounding.

    The columns are orthonormal to :data:`ORTHONORMAL_ENOUGH`, so a row's squared norm is 1 to within about
    ``width`` times that: at full rank every row is, and ``1 − |V_k|²`` holds nothing but rounding, which
    divided by the ridge would swamp a precision of ``1/λ`` for features of large scale.

    Examples
    --------
    >>> print(f"{outside_floor(100):.2e}")
    5.68e-12
    """
    return max(int(width), 1) * float(ORTHONORMAL_ENOUGH)


def check_representable(eigenvalues: NDArray, stored_precision_diagonal: NDArray, ridge: float, n_features: int,
                        dtype: Any, first_patch: int, spatial: tuple[int, ...], remedy: str) -> None:
    """Refuse a low-rank fit whose state ``dtype`` cannot represent, naming the first bad patch and the scale.

    The dense form's representability rule (:func:`anomstats._patch_kernels.precision_fault`,
    :func:`anomstats._patch_kernels.unrepresentable_error`), for the low-rank state that is stored in ``dtype``
    (a NumPy dtype, or an ``finfo`` object for dtypes NumPy lacks): its eigenvalues ``λ`` (p, r), computed in
    float64, must not overflow ``dtype`` (a covariance that overflows: ``features of scale sqrt(λ_max)``), and
    the precision it stands for must fit ``dtype`` as the dense form's must: ``stored_precision_diagonal``
    (p, C) is :func:`precision_diagonal` rounded to ``dtype`` (a zero or subnormal entry: the precision
    underflows; an infinite one: it overflows; the scale named is :func:`anomstats._patch_kernels.fault_scale`'s
    of the eigenvalues, with the ridge for the directions outside the basis). ``remedy`` is each package's.
    Both packages call it, the torch adapter on the error path of its own tensor check.

    Examples
    --------
    >>> check_representable(np.array([[1e39]]), np.array([[1e-39, 100.0]]), 0.01, 2, np.float32, 0, (1,), "rescale")
    Traceback (most recent call last):
    ...
    ValueError: features of scale 3.2e+19 overflow float32: the covariance of patch 0 overflowed (its sums of squares, about (3.2e+19)² per observation, exceed float32's largest number 3.4e+38); rescale
    """
    _, largest, tiny = _limits(dtype)
    values = np.asarray(eigenvalues, dtype=np.float64)
    diagonal = np.asarray(stored_precision_diagonal)
    over = ~(values <= largest).all(axis=1) if values.shape[1] else np.zeros(values.shape[0], dtype=bool)
    # precision_fault's verdict for every patch at once (NaN fails both comparisons)
    bad = over | ~((diagonal >= tiny) & np.isfinite(diagonal)).all(axis=1)
    if not bad.any():
        return
    k = int(np.argmax(bad))
    where = describe_patch(first_patch + k, spatial)
    if over[k]:
        scale = math.sqrt(float(np.nan_to_num(values[k], nan=np.inf).max()))
        raise unrepresentable_error(where, dtype, "covariance", scale, remedy)
    fault = precision_fault(diagonal[k], dtype)
    variances = values[k] if values.shape[1] >= n_features or ridge <= 0 else np.append(values[k], ridge)
    raise unrepresentable_error(where, dtype, fault, fault_scale(fault, variances), remedy)


class LowRankMoments:
    """Streamed state of low-rank per-patch Gaussians: count, means and scatter factors (float64).

    ``mean`` is (P, C); the scatter factor of each patch, with ``Σ_obs (x − μ)(x − μ)ᵀ = F Fᵀ``, is kept as
    a list of column blocks (P, C, k_i): a batch adds its own centred observations as one block, a merge
    adds the other side's blocks and one correction column. Blocks are never modified once stored (a
    merge shares them), and nothing is re-concatenated per batch: the columns are joined patch chunk by
    patch chunk when the fit is finalised, or when they would pass ``C`` (then each patch's factor is
    reduced to ``V diag(s)``, the same scatter in at most ``C`` columns).

    Location-free: the means are kept as ``shift + offset_mean`` around a fixed ``shift`` per patch (the
    first observation streamed in), and batches are copied shifted by it, so the means and their
    differences (the correction columns) round relative to the data's spread, not to their distance from
    the origin (see :mod:`anomstats._moment_kernels`). States with different shifts merge exactly:
    ``δ = (shift_b − shift_a) + (offset_b − offset_a)``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(6, 4, 2))                     # (n, C, P)
    >>> a = LowRankMoments(4, 2).update(x[:2]).update(x[2:])
    >>> _, factor = a.centred_factor(0, 2)
    >>> scatter = np.einsum("pck,pdk->pcd", factor, factor)
    >>> centred = x - x.mean(axis=0)
    >>> bool(np.allclose(scatter, np.einsum("ncp,ndp->pcd", centred, centred), rtol=1e-13, atol=1e-13))
    True
    """

    def __init__(self, n_features: int, n_patches: int, memory_budget: int = 64 * 2**20) -> None:
        self.n_features = n_features
        self.n_patches = n_patches
        self.memory_budget = memory_budget
        self.count = 0
        self.shift = np.zeros((n_patches, n_features))
        self.offset_mean = np.zeros((n_patches, n_features))  # mean − shift
        self.blocks: list[NDArray] = []

    @property
    def mean(self) -> NDArray:
        """The running means (P, C) (a new array)."""
        return self.shift + self.offset_mean

    @property
    def n_columns(self) -> int:
        """Columns of every patch's scatter factor (the blocks' widths added up)."""
        return sum(block.shape[2] for block in self.blocks)

    def update(self, flat: NDArray) -> LowRankMoments:
        """Fold a validated batch ``(n, C, P)`` (n >= 1) into the state; returns ``self``."""
        if not self.count:
            self.shift = np.array(flat[0].T, dtype=np.float64)
        offset, centred = factor_chunk(flat, 0, flat.shape[2], shift=self.shift)
        self._fold(flat.shape[0], offset, [centred])
        return self

    def merge(self, other: LowRankMoments) -> LowRankMoments:
        """Fold ``other``'s state into this one (``other`` is not modified; its blocks are shared)."""
        if other.count:
            if not self.count:
                self.shift = other.shift.copy()
            # Exact when the shifts are close (Sterbenz); the offsets are numbers of the data's spread.
            offset = (other.shift - self.shift) + other.offset_mean
            self._fold(other.count, offset, list(other.blocks))
        return self

    def _fold(self, count: int, offset_mean: NDArray, blocks: list[NDArray]) -> None:
        """Fold ``count`` observations whose mean is ``self.shift + offset_mean`` and scatter factor ``blocks``."""
        chan = chan_merge_weights(self.count, count)
        delta = offset_mean - self.offset_mean
        joined = self.blocks + blocks
        if self.count and chan.cross:
            joined.append((delta * math.sqrt(chan.cross))[:, :, None])
        for block in joined:
            block.setflags(write=False)  # shared between merged states: never written again
        self.offset_mean = self.offset_mean + delta * chan.mean_step
        self.count = int(chan.total)
        self.blocks = joined
        if self.n_columns > self.n_features:
            self._reduce()

    def _reduce(self) -> None:
        """Replace the blocks by one ``V diag(s)`` block (at most C columns), patch chunk by patch chunk."""
        width = low_rank_width(self.count, self.n_features)
        reduced = np.empty((self.n_patches, self.n_features, width))
        per_patch = 4 * self.n_columns * self.n_features * 8
        step = max(1, self.memory_budget // per_patch)
        for start in range(0, self.n_patches, step):
            stop = min(start + step, self.n_patches)
            basis, singular = basis_of_factor(self.centred_factor(start, stop)[1], width)
            reduced[start:stop] = basis * singular[:, None, :]
        self.blocks = [reduced]

    def centred_factor(self, start: int, stop: int) -> tuple[NDArray, NDArray]:
        """Means (p, C) and the joined scatter factors (p, C, k) of patches ``start:stop`` (new arrays)."""
        mean = self.shift[start:stop] + self.offset_mean[start:stop]
        return mean, np.concatenate([block[start:stop] for block in self.blocks], axis=2)


#: The outside term ``|δ|² − |p|²`` is used where at least this fraction of ``|δ|²`` lies outside the basis:
#: then the difference loses at most one bit (``|δ|² − |p|² >= |δ|²/2``), and the residual vector (a second
#: product as large as the first) is formed only for the queries that lie mostly inside the basis.
OUTSIDE_FRACTION = 0.5


def squared_distances(delta: NDArray, basis: NDArray, eigenvalues: NDArray, ridge: float,
                      scratch: ThreadScratch | None = None) -> NDArray:
    """``d²`` (p, m) of centred queries ``delta = x − μ`` (p, m, C) for patches with ``basis`` (p, C, r).

    ``p = δ V``; ``d² = Σ p_i²/λ_i + |δ − V p|²/ρ``: the projection term plus the residual outside the
    basis. Where at least half of ``|δ|²`` lies outside the basis the residual's norm is ``|δ|² − |p|²``,
    whose cancellation costs at most a factor 2 of relative error (one bit); elsewhere (queries close to the
    span, where the difference would cancel) the residual is formed as a vector, ``δ − V p``.
    """
    p, m, c = delta.shape
    width = basis.shape[2]

    def buffer(name: str, shape: tuple[int, ...]) -> NDArray:
        return np.empty(shape, dtype=delta.dtype) if scratch is None else scratch.array(shape, delta.dtype, name)

    coords = np.matmul(delta, basis, out=buffer("coords", (p, m, width)))
    inside = np.einsum("pmr,pmr,pr->pm", coords, coords, 1.0 / eigenvalues)
    if ridge == 0:
        return inside  # ridge 0 is only allowed at full rank, where the residual is rounding
    total = np.einsum("pmc,pmc->pm", delta, delta)
    projected = np.einsum("pmr,pmr->pm", coords, coords)
    outside = total - projected
    close = ~(outside >= OUTSIDE_FRACTION * total)
    if close.any():
        patches = np.flatnonzero(close.any(axis=1))
        # V p for those patches' queries as (p, C, m): the basis stays the left operand, contiguous (a
        # transposed basis on the right is three times slower); then minus δ (the sign does not matter).
        residual = np.matmul(basis[patches], coords[patches].transpose(0, 2, 1))
        residual -= delta[patches].transpose(0, 2, 1)
        exact = np.einsum("pcm,pcm->pm", residual, residual)
        outside[patches] = np.where(close[patches], exact, outside[patches])
    return inside + outside / ridge


def dense_from_low_rank(basis: NDArray, eigenvalues: NDArray, ridge: float, *, inverse: bool,
                        out: NDArray) -> NDArray:
    """Materialise ``Σ`` (or ``Σ⁻¹`` with ``inverse``) of patches into ``out`` (p, C, C), exactly symmetric.

    ``Σ = V diag(λ − ρ) Vᵀ + ρ I`` and ``Σ⁻¹ = V diag(1/λ − 1/ρ) Vᵀ + I/ρ``.
    """
    if inverse:
        scale, diagonal = (1.0 / eigenvalues - (1.0 / ridge if ridge > 0 else 0.0)), (1.0 / ridge if ridge > 0 else 0.0)
    else:
        scale, diagonal = eigenvalues - ridge, ridge
    np.matmul(basis * scale[:, None, :], basis.transpose(0, 2, 1), out=out)
    # Symmetrise exactly (the product's two triangles round differently), then the diagonal term.
    out += out.transpose(0, 2, 1).copy()
    out *= 0.5
    index = np.arange(out.shape[1])
    out[:, index, index] += diagonal
    return out
