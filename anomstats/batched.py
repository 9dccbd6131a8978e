"""Batched covariance (placeholder with the final signature; simple, correct, not memory-bounded)."""
import numpy as np


def batched_cov(x, *, obs_axis=0, var_axis=1, ddof=1, aweights=None, dtype=None):
    x = np.asarray(x)
    if dtype is None:
        dtype = np.result_type(x.dtype, np.float64)
    xt = np.moveaxis(x, (obs_axis, var_axis), (-2, -1)).astype(dtype)  # (*batch, N, C)
    n = xt.shape[-2]
    if aweights is None:
        w = np.ones(n, dtype=dtype)
    else:
        w = np.asarray(aweights, dtype=dtype)
    wsum = w.sum()
    mean = np.einsum("n,...nc->...c", w, xt) / wsum
    xc = xt - mean[..., None, :]
    fact = wsum - ddof * (w * w).sum() / wsum if aweights is not None else n - ddof
    return np.einsum("...nc,n,...nd->...cd", xc, w, xc) / fact
