"""Faithful re-implementations of anomalib 2.7's statistics algorithms: the oracle of the tests and benchmarks.

Written from the behavioural description in ``shared/reference/anomalib-stats.md`` (not copied from
anomalib): the same buffers, the same arithmetic, the same loops and the same defects (in-place centring,
centred stored data with uncentred queries, one Python iteration per query row / per patch, explicit float32
inverse). The adapter's tests use them as the reference (anomalib-shaped checkpoints, anomalib's numbers), and
:mod:`benchmarks.bench_torch` times against them; this module is their one copy (the benchmarks import it
from here: ``from tests.anomalib_oracle import ...``, with the repository root on ``sys.path`` as
``python -m benchmarks.run_all`` and ``python -m pytest`` have it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class AnomalibDynamicBuffers(nn.Module):
    """anomalib's dynamic buffers: resized *in place* to the checkpoint's shape before the usual copy."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        for name, buffer in self._buffers.items():
            key = prefix + name
            if buffer is not None and name not in self._non_persistent_buffers_set and key in state_dict:
                if buffer.shape != state_dict[key].shape:
                    buffer.resize_(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


class AnomalibGaussianKDE(AnomalibDynamicBuffers):
    """anomalib's KDE: Scott factor, inverse-then-Cholesky, centred stored data, per-row forward loop."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bw_transform", torch.empty(0))
        self.register_buffer("dataset", torch.empty(0))
        self.register_buffer("norm", torch.empty(0))

    @staticmethod
    def cov(tensor: Tensor) -> Tensor:
        # anomalib's defect, reproduced: the caller's tensor is centred in place.
        tensor -= tensor.mean(dim=1)[:, None]
        return tensor @ tensor.T / (tensor.shape[1] - 1)

    def fit(self, dataset: Tensor) -> None:
        n, d = dataset.shape
        factor = n ** (-1.0 / (d + 4))
        covariance = self.cov(dataset.T)  # centres `dataset` too, through the transposed view
        inv_cov = torch.linalg.inv(covariance) / (factor**2)
        whitening = torch.linalg.cholesky(inv_cov)
        self.bw_transform = whitening
        self.dataset = dataset @ whitening
        self.norm = torch.prod(torch.diag(whitening)) * (2 * math.pi) ** (-d / 2)

    def forward(self, features: Tensor) -> Tensor:
        features = features @ self.bw_transform
        estimate = torch.zeros(features.shape[0], device=features.device)
        for i in range(features.shape[0]):
            sq = ((self.dataset - features[i]) ** 2).sum(dim=1)
            estimate[i] = torch.mean(self.norm * torch.exp(-sq / 2))
        return estimate


class AnomalibMultiVariateGaussian(AnomalibDynamicBuffers):
    """anomalib's MVG: per-patch covariance loop, ridge 0.01 then 1e-5, explicit batched float32 inverse."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("inv_covariance", torch.empty(0))

    @staticmethod
    def _cov(observations: Tensor, rowvar: bool = False) -> Tensor:
        x = observations if rowvar else observations.T
        x = x - x.mean(dim=1, keepdim=True)
        return (x @ x.T / (x.shape[1] - 1)).squeeze()

    def fit(self, embedding: Tensor) -> list[Tensor]:
        batch, channels, height, width = embedding.shape
        vectors = embedding.reshape(batch, channels, height * width)
        self.mean = vectors.mean(dim=0)
        covariance = torch.zeros(channels, channels, height * width, device=embedding.device)
        identity = torch.eye(channels, device=embedding.device)
        for patch in range(height * width):
            covariance[:, :, patch] = self._cov(vectors[:, :, patch]) + 0.01 * identity
        covariance = covariance + 1e-5 * identity[:, :, None]
        self.inv_covariance = torch.linalg.inv(covariance.permute(2, 0, 1))
        return [self.mean, self.inv_covariance]

    forward = fit


def anomalib_padim_distance(embedding: Tensor, mean: Tensor, inv_covariance: Tensor) -> Tensor:
    """PaDiM's scoring with anomalib's buffers: sqrt(clamp(δᵀ Σ⁻¹ δ, 0)) per patch → (B, 1, H, W)."""
    batch, channels, height, width = embedding.shape
    delta = (embedding.reshape(batch, channels, -1) - mean).permute(2, 0, 1)  # (P, B, C)
    d2 = torch.matmul(delta, inv_covariance).mul(delta).sum(2).permute(1, 0)
    return d2.reshape(batch, 1, height, width).clamp(min=0).sqrt()
