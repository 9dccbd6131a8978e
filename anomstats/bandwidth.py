"""Bandwidth rules shared by :class:`anomstats.GaussianKDE` and the torch adapter.

(Initial version; the KDE work extends this module, keeping these function names and signatures.)
"""

from __future__ import annotations

import numpy as np


def scotts_factor(neff: float, d: int) -> float:
    """Scott's rule: ``neff ** (-1 / (d + 4))``."""
    return float(np.power(neff, -1.0 / (d + 4)))


def silverman_factor(neff: float, d: int) -> float:
    """Silverman's rule: ``(neff * (d + 2) / 4) ** (-1 / (d + 4))``."""
    return float(np.power(neff * (d + 2.0) / 4.0, -1.0 / (d + 4)))


def effective_sample_size(weights) -> float:
    """Kish's effective sample size ``1 / sum(w**2)`` of weights normalised to sum to one."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    return float(1.0 / np.sum(w * w))
