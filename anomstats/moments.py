"""Streaming, mergeable first and second moments (placeholder with the final interface)."""
import numpy as np


class RunningMoments:
    def __init__(self, obs_axis=0, var_axis=1):
        self.obs_axis = obs_axis
        self.var_axis = var_axis
        self._chunks = []

    def update(self, x, weights=None):
        xt = np.moveaxis(np.asarray(x, dtype=np.float64), (self.obs_axis, self.var_axis), (-2, -1))
        self._chunks.append(xt.copy())
        return self

    def merge(self, other):
        self._chunks.extend(other._chunks)
        return self

    @property
    def count(self):
        return sum(c.shape[-2] for c in self._chunks)

    @property
    def mean(self):
        return np.concatenate(self._chunks, axis=-2).mean(axis=-2)

    def covariance(self, ddof=1):
        xt = np.concatenate(self._chunks, axis=-2)
        xc = xt - xt.mean(axis=-2, keepdims=True)
        return np.einsum("...nc,...nd->...cd", xc, xc) / (xt.shape[-2] - ddof)
