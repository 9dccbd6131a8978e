"""The streaming accumulators of :class:`anomstats.MultiVariateGaussian`, behind one interface.

Two accumulators keep a per-patch Gaussian's sufficient statistics over a stream of batches, always in
float64:

* :class:`anomstats._packed.PackedGaussianAccumulator` (``shrinkage=None`` and ``"oas"``, whatever
  ``low_memory``): one packed triangle per patch, ``P·C·(C+1)/2`` numbers, half of a full stack;
* :class:`DensePatchMoments` (``shrinkage="ledoit-wolf"``, whose coefficient needs fourth moments): a
  :class:`~anomstats.RunningMoments` of full ``(P, C+1, C+1)`` centred sums of the augmented vector
  ``(‖x − K‖², x − K)``.

Both implement :class:`PatchMoments`: the model streams into either without knowing which. Finalising
reads the moments (streaming may go on) unless the model ends its stream (``spend=True``).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from ._parallel import run_chunks
from ._patch_kernels import PatchFitSettings, PatchOutputs, ThreadScratch, finish_chunk, plan_patch_chunks
from ._rules import covariance_normalisation
from .moments import RunningMoments

__all__ = ["PatchMoments", "DensePatchMoments"]


class PatchMoments(Protocol):
    """What :class:`anomstats.MultiVariateGaussian` needs of a streaming accumulator."""

    @property
    def count(self) -> int:
        """Observations accumulated so far."""

    @property
    def spent(self) -> bool:
        """True once a finalisation with ``spend=True`` used the moments up (no streaming after it)."""

    @property
    def mean(self) -> NDArray[np.float64]:
        """Running per-patch means, ``(P, C)`` (the layout of :attr:`anomstats.RunningMoments.mean`)."""

    def update(self, batch: NDArray) -> PatchMoments:
        """Fold a validated, finite batch ``(n, C, P)`` in."""

    def merge(self, other: PatchMoments) -> PatchMoments:
        """Fold another accumulator of the same kind and shape in."""

    def finalise_patches(
        self, settings: PatchFitSettings, dtype: np.dtype, memory_budget: int, workers: int, *, spend: bool = False
    ) -> tuple[NDArray, PatchOutputs]:
        """The fitted ``(mean (C, P), outputs)`` in ``dtype``.

        ``spend=True``: the stream ends here, so the accumulator may use its moments up (the packed one
        writes a float32 precision over them); the caller drops it afterwards.
        """


class DensePatchMoments:
    """Per-patch running moments in a :class:`~anomstats.RunningMoments` (full float64 ``(P, C, C)`` sums).

    With ``augmented=True`` (Ledoit-Wolf) each observation ``x`` is stored as ``(‖x − K‖², x − K)`` around a
    fixed centre ``K`` per patch (the first batch's mean, exactly as rounded): the moments of the augmented
    vector give the ``Σ‖x − μ‖⁴`` that the Ledoit-Wolf coefficient needs, and merge like any moments. The
    centre keeps ``‖x − K‖²`` of the size of the data's spread wherever the data lie (``‖x‖²`` itself at an
    offset ``o`` is ``~o²`` and leaves nothing of the fourth moment after the cancellation below); merging
    accumulators with other centres moves the other side's moments to this centre (a linear map of the
    augmented vector). Without ``augmented`` the accumulator holds ``x`` itself (location-free on its own).

    Examples
    --------
    >>> acc = DensePatchMoments(augmented=False, memory_budget=2**20, workers=1)
    >>> _ = acc.update(np.arange(24.0).reshape(4, 3, 2) ** 1.5)
    >>> acc.count, acc.mean.shape
    (4, (2, 3))
    """

    #: Finalisation only reads the moments (the model drops them when its stream ends).
    spent = False

    def __init__(self, *, augmented: bool, memory_budget: int, workers: int) -> None:
        self.augmented = augmented
        # float64 accumulation whatever the working dtype: the state is summed over many batches.
        self.moments = RunningMoments(0, 1, dtype=np.float64, memory_budget=memory_budget, workers=workers)
        self.centre: NDArray[np.float64] | None = None  # K (P, C) of the augmented form, fixed by the first batch

    @property
    def count(self) -> int:
        return self.moments.count

    @property
    def mean(self) -> NDArray[np.float64]:
        if not self.augmented:
            return self.moments.mean
        assert self.centre is not None
        # (mean + residual) of x − K, plus K: rounded once.
        return self.centre + (self.moments.mean[:, 1:] + self.moments.mean_residual[:, 1:])

    def update(self, batch: NDArray) -> DensePatchMoments:
        if self.augmented:
            n, c, n_patches = batch.shape
            if self.centre is None:
                self.centre = np.ascontiguousarray(np.mean(batch, axis=0, dtype=np.float64).T)
            data = np.empty((n, c + 1, n_patches), dtype=np.float64)
            np.subtract(batch, self.centre.T, out=data[:, 1:])  # x − K in one pass (exact near K)
            np.einsum("ncp,ncp->np", data[:, 1:], data[:, 1:], out=data[:, 0])
            batch = data
        # partial_fit validated the batch (finite, real, shaped): no second check.
        self.moments._update(batch, None, check_finite=False)
        return self

    def merge(self, other: DensePatchMoments) -> DensePatchMoments:
        if not self.augmented or other.centre is None or other.count == 0:
            self.moments.merge(other.moments)
            return self
        if self.centre is None:
            self.centre = other.centre.copy()
        self.moments.merge(other._moments_about(self.centre))
        return self

    def _moments_about(self, centre: NDArray[np.float64]) -> RunningMoments:
        """This accumulator's augmented moments around another ``centre`` (``self`` unchanged).

        With ``d = K − K'`` (``K`` this centre, ``K'`` the new one): ``x − K' = (x − K) + d`` and
        ``‖x − K'‖² = ‖x − K‖² + 2 dᵀ(x − K) + ‖d‖²``, a linear map ``z' = A z + b`` of the augmented vector
        with ``A = [[1, 2dᵀ], [0, I]]``: the mean maps to ``A μ + b`` and the centred sums to ``A M Aᵀ``.
        """
        assert self.centre is not None
        if np.array_equal(centre, self.centre):
            return self.moments
        state = self.moments.state()
        d = self.centre - centre  # (P, C)
        mean = state["mean"] + state["mean_residual"]  # of (q, x − K): numbers of the data's spread
        sums = state["centred_sums"]
        m_xx, m_xq = sums[:, 1:, 1:], sums[:, 1:, 0]
        m_xx_d = np.einsum("pcd,pd->pc", m_xx, d)
        new_mean = np.empty_like(mean)
        new_mean[:, 1:] = mean[:, 1:] + d
        new_mean[:, 0] = mean[:, 0] + 2.0 * np.einsum("pc,pc->p", d, mean[:, 1:]) + np.einsum("pc,pc->p", d, d)
        new_sums = sums.copy()
        new_sums[:, 0, 0] = sums[:, 0, 0] + 4.0 * np.einsum("pc,pc->p", d, m_xq) + 4.0 * np.einsum("pc,pc->p", d, m_xx_d)
        new_sums[:, 1:, 0] = m_xq + 2.0 * m_xx_d
        new_sums[:, 0, 1:] = new_sums[:, 1:, 0]
        state.update(mean=new_mean, mean_residual=np.zeros_like(new_mean), centred_sums=new_sums)
        moved = RunningMoments(0, 1, dtype=np.float64, memory_budget=self.moments.memory_budget,
                               workers=self.moments.workers)
        return moved._load(state, check_values=False)  # computed here: rounding may leave a -0 variance

    def _sum_fourth_powers(self) -> NDArray[np.float64]:
        """``Σ_n ‖x_n − μ‖⁴`` per patch, from the augmented moments.

        With ``q = ‖x − μ‖² = (‖x − K‖², x − K)·(1, −2(μ − K)) + ‖μ − K‖²``: its variance comes from the
        augmented centred sums, its mean is ``trace(S)``, and ``Σ q² = n (var q + mean q²)``.
        """
        n = self.count
        sums = self.moments.centred_sums
        mu = self.moments.mean[:, 1:] + self.moments.mean_residual[:, 1:]  # μ − K, of the data's spread
        scatter = sums[:, 1:, 1:]  # n times the biased covariance S of x (a view, no copy)
        var_q = (
            sums[:, 0, 0]
            - 4.0 * np.einsum("pc,pc->p", mu, sums[:, 1:, 0])
            + 4.0 * np.einsum("pc,pc->p", np.einsum("pcd,pd->pc", scatter, mu), mu)
        ) / n
        trace = np.einsum("pcc->p", scatter) / n
        return n * (var_q + trace**2)

    def finalise_patches(
        self, settings: PatchFitSettings, dtype: np.dtype, memory_budget: int, workers: int, *, spend: bool = False
    ) -> tuple[NDArray, PatchOutputs]:
        """Regularise, factor and invert every patch from the accumulator's own centred sums.

        The sums are read patch by patch, chunked like a fit: no full-size covariance copy. ``spend`` makes
        no difference here (nothing is done in place); the model drops the accumulator when its stream ends.
        """
        offset = 1 if self.augmented else 0
        sums = self.moments.centred_sums
        n_patches, c = sums.shape[0], sums.shape[-1] - offset
        sum_fourth_powers = self._sum_fourth_powers() if self.augmented else None
        mean = np.ascontiguousarray(self.mean.T, dtype=dtype)
        outputs = PatchOutputs.allocate(n_patches, c, dtype, keep_covariance=settings.keep_covariance)
        scale = 1.0 / covariance_normalisation(self.count, None, settings.ddof)
        chunks = plan_patch_chunks(n_patches, 3 * c * c * dtype.itemsize, memory_budget, workers)
        scratch = ThreadScratch()
        run_chunks(
            lambda ch: finish_chunk(sums, scale, offset, *ch, sum_fourth_powers, outputs, settings, dtype, scratch),
            chunks,
            workers,
        )
        return mean, outputs

