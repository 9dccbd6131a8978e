"""anomstats_torch: PyTorch modules that are drop-in replacements for anomalib's statistics components.

The formulas (bandwidth, normalisation, ridge, validation) come from :mod:`anomstats`; this package
re-implements only the hot kernels as torch operations on the tensors' device.
"""

import torch  # noqa: F401  (the adapter requires torch; the core never imports it)

from anomstats import __version__

__all__ = ["__version__"]
