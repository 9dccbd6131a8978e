"""anomstats: exact, fast, memory-bounded statistics for density-based anomaly detection.

The core is pure NumPy/SciPy; importing it never imports torch. The PyTorch adapter lives in the
separate package :mod:`anomstats_torch`.

Examples
--------
>>> import numpy as np
>>> import anomstats
>>> x = np.array([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
>>> anomstats.cov(x)
array([[ 1., -1.],
       [-1.,  1.]])
"""

from ._version import __version__
from .covariance import corrcoef, cov
from .batched import batched_cov
from .moments import RunningMoments
from . import bandwidth
from .kde import GaussianKDE
from .gaussian import LowRankMultiVariateGaussian, MultiVariateGaussian
from ._validation import NotFittedError

__all__ = [
    "__version__",
    "cov",
    "corrcoef",
    "batched_cov",
    "RunningMoments",
    "bandwidth",
    "GaussianKDE",
    "MultiVariateGaussian",
    "LowRankMultiVariateGaussian",
    "NotFittedError",
]
