"""The torch kernel of :func:`numpy.cov`: one implementation for the adapter's modules.

:meth:`anomstats_torch.MultiVariateGaussian._cov` (anomalib's static helper) is this function; the KDE's
``cov`` may call it too (``numpy_cov(tensor, rowvar=True)``). Every check is the core's, in numpy's
vocabulary: ``ddof`` by :func:`anomstats._validation.check_ddof` (``numpy_exact=True``), the weights by
:func:`anomstats._weights.as_analytic_weights`, the normalisation and its "degrees of freedom <= 0" warning by
:func:`anomstats._rules.degrees_of_freedom`. Only the tensor arithmetic lives here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from anomstats._rules import degrees_of_freedom
from anomstats._validation import check_ddof
from anomstats._weights import as_analytic_weights, require_nonzero_weight_sum

from ._policy import as_float_tensor

__all__ = ["numpy_cov"]


def _host_weights(aweights: Any) -> Any:
    """``aweights`` as numpy sees them: a tensor's values as float64 on the host, anything else as given."""
    if isinstance(aweights, Tensor):
        return as_float_tensor(aweights, "aweights").detach().cpu().to(torch.float64).numpy()
    return aweights


def numpy_cov(
    observations: Tensor,
    rowvar: Any = True,
    bias: Any = False,
    ddof: Any = None,
    aweights: Any = None,
) -> Tensor:
    """:func:`numpy.cov` of a tensor (``m``, ``rowvar``, ``bias``, ``ddof``, ``aweights``), squeezed, as a tensor.

    The same values (to rounding) and the same exceptions as numpy 2.x on the same arguments, checked in
    numpy's order: ``ddof`` first (``ValueError("ddof must be integer")`` for 1.5; NaN and strings raise what
    ``int()`` raises), then the number of axes (``ValueError``), then, unless there are no variables (an empty
    (0, 0) result, as numpy), the weights: ``RuntimeError`` for 2-D weights or a wrong number of them,
    ``IndexError`` for a scalar (numpy indexes its shape), ``ValueError`` for negative ones,
    ``ZeroDivisionError("Weights sum to zero, can't be normalized")`` for a zero sum. ``rowvar`` and ``bias``
    are taken by truth value as numpy takes them (``bias == 0`` selects ``ddof=1``, so ``bias=None`` is biased,
    as in numpy). Fewer than one degree of freedom: numpy's ``RuntimeWarning`` and inf/NaN entries.

    ``aweights`` may be a tensor (any device) or anything :func:`numpy.asarray` takes. The weights are
    normalised by their float64 sum before they meet the data: the covariance does not depend on their scale,
    and weights beyond float32's range (1e-50, 1e50) give numpy's result instead of 0/0.

    Differences from numpy: floating input keeps its dtype (numpy computes float32 in float64); integer and
    bool input are computed in torch's default dtype (numpy: float64); 1-D input is one variable for either
    ``rowvar`` (numpy too); the arithmetic is torch's (the same to rounding, not bit for bit).

    Examples
    --------
    >>> import torch
    >>> numpy_cov(torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]]))
    tensor([[ 1., -1.],
            [-1.,  1.]])
    >>> numpy_cov(torch.tensor([0.0, 1.0, 2.0]), aweights=[1.0, 1.0, 0.0])
    tensor(0.5000)
    """
    check_ddof(ddof, numpy_exact=True)  # numpy checks ddof before anything else
    x = as_float_tensor(observations, "observations")
    if x.ndim > 2:
        raise ValueError(f"observations must be 1-D or 2-D (numpy: m has more than 2 dimensions), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    # As numpy >= 2: a 2-D input is transposed for rowvar=False even with a single row (then it holds one
    # observation of several variables); only 1-D input is always one variable.
    if x.ndim < 2:
        x = x.reshape(1, -1)
    elif not rowvar:
        x = x.mT
    if x.shape[0] == 0:
        return x.new_empty((0, 0))  # numpy returns before looking at the weights
    if ddof is None:
        ddof = 1 if bias == 0 else 0
    n = x.shape[1]
    if aweights is None:
        mean = x.mean(dim=1, keepdim=True)
        dof = degrees_of_freedom(n, None, ddof)
        weighted = x - mean
    else:
        weights = as_analytic_weights(_host_weights(aweights), n)  # numpy's checks, types and messages
        total = float(weights.sum())
        require_nonzero_weight_sum(total)
        dof = degrees_of_freedom(total, float(np.dot(weights, weights)), ddof)
        # Σ w (x − μ)(x − μ)ᵀ / dof with w/Σw and dof/Σw: the same quotient, with weights of order 1.
        with np.errstate(invalid="ignore", over="ignore"):
            unit = weights / total
            dof = dof / total
        w = torch.as_tensor(unit, dtype=x.dtype, device=x.device)
        mean = (x * w).sum(dim=1, keepdim=True)
        weighted = (x - mean) * w
    if isinstance(dof, int):
        # N - ddof of a Python integer ddof is exact and of any size (2**70): compared as an integer, then a
        # float as numpy's 1/fact makes it (OverflowError beyond float64's range, as numpy's).
        dof = float(dof) if dof > 0 else 0.0
    elif not dof > 0 and not np.isnan(dof):  # degrees_of_freedom warned, as numpy does; numpy's 1/0: inf/NaN entries
        dof = 0.0
    return ((x - mean) @ weighted.mT / dof).squeeze()
