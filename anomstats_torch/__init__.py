"""anomstats_torch: PyTorch modules that are drop-in replacements for anomalib's statistics components.

The formulas (bandwidth, normalisation, ridge, validation) come from :mod:`anomstats`; this package
re-implements only the hot kernels as torch operations on the tensors' device.

- :class:`DynamicBufferModule` (alias :data:`DynamicBufferMixin`): buffers that take a checkpoint's shape;
- :class:`GaussianKDE`: anomalib's KDE buffers, correct for data of any mean, vectorised and traceable;
- :class:`MultiVariateGaussian`: PaDiM's per-patch Gaussian, batched fit, streaming/distributed fit,
  Mahalanobis scoring; ``form="low_rank"`` keeps the exact low-rank form (basis and eigenvalues) for
  fewer images than features;
- :func:`patch_anomalib`: swaps the two classes into anomalib's own models (PaDiM, DFKDE), also as they are
  imported; a context manager or a call that returns an undo handle.
"""

import torch  # noqa: F401  (the adapter requires torch; the core never imports it)

from anomstats import __version__

from .anomalib_patch import patch_anomalib
from .dynamic_buffer import DynamicBufferMixin, DynamicBufferModule
from .gaussian import LowRankMultiVariateGaussian, MultiVariateGaussian, PackedMultiVariateGaussian
from .kde import GaussianKDE

__all__ = ["__version__", "DynamicBufferModule", "DynamicBufferMixin", "GaussianKDE", "MultiVariateGaussian",
           "LowRankMultiVariateGaussian", "PackedMultiVariateGaussian", "patch_anomalib"]
