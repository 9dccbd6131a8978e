"""numpy.cov / numpy.corrcoef-exact covariance (placeholder: delegates to numpy until implemented)."""
import numpy as np


def cov(m, y=None, rowvar=True, bias=False, ddof=None, fweights=None, aweights=None, *, dtype=None):
    return np.cov(m, y, rowvar, bias, ddof, fweights, aweights, dtype=dtype)


def corrcoef(x, y=None, rowvar=True, *, dtype=None):
    return np.corrcoef(x, y, rowvar, dtype=dtype)
