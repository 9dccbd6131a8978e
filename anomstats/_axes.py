"""Naming the observation and variable axes of a batched array.

Private helper shared by :func:`anomstats.batched_cov`, :class:`anomstats.RunningMoments` and the
per-patch Gaussian. An input holds observations along ``obs_axis``, variables along ``var_axis`` and
any number of *batch* axes everywhere else; each batch item is one independent ``(N, C)`` dataset.
Only views are made here: moving the two named axes to the end never copies the data.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
from numpy.exceptions import AxisError

__all__ = ["check_axis_index", "normalise_axis", "normalise_axes", "batch_view"]


def check_axis_index(axis: Any, name: str) -> int:
    """Return ``axis`` as an ``int`` (any integer type, not bool), or raise ``TypeError`` naming ``name``.

    Examples
    --------
    >>> check_axis_index(np.int64(-1), "obs_axis")
    -1
    >>> check_axis_index(1.0, "var_axis")
    Traceback (most recent call last):
    ...
    TypeError: var_axis must be an integer axis index, got 1.0
    """
    if isinstance(axis, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer axis index, got {axis!r}")
    try:
        return operator.index(axis)
    except TypeError:
        raise TypeError(f"{name} must be an integer axis index, got {axis!r}") from None


def normalise_axis(axis: Any, name: str, ndim: int) -> int:
    """Return ``axis`` as a non-negative int below ``ndim``, or raise naming ``name``.

    Examples
    --------
    >>> normalise_axis(-1, "var_axis", 3)
    2
    """
    index = check_axis_index(axis, name)
    if not -ndim <= index < ndim:
        raise AxisError(
            f"{name}={index} is out of range for an input with {ndim} dimensions "
            f"(valid values: {-ndim}..{ndim - 1})"
        )
    return index % ndim


def normalise_axes(ndim: int, obs_axis: Any, var_axis: Any) -> tuple[int, int]:
    """Validate the two named axes of an ``ndim``-dimensional input and make them non-negative.

    Parameters
    ----------
    ndim : int
        Number of dimensions of the input (at least 2).
    obs_axis, var_axis : int
        Axis of the observations and axis of the variables; negative values count from the end.

    Returns
    -------
    (int, int)
        ``(obs_axis, var_axis)`` in ``range(ndim)``.

    Raises
    ------
    ValueError
        If ``ndim < 2`` or both names refer to the same axis.
    numpy.exceptions.AxisError
        If an axis is out of range (``AxisError`` is both a ``ValueError`` and an ``IndexError``).
    TypeError
        If an axis is not an integer.

    Examples
    --------
    >>> normalise_axes(4, 0, -3)
    (0, 1)
    >>> normalise_axes(2, 1, -1)
    Traceback (most recent call last):
    ...
    ValueError: obs_axis=1 and var_axis=-1 both refer to axis 1 of a 2-d input; they must name two different axes
    """
    if ndim < 2:
        raise ValueError(
            f"x must have at least 2 dimensions (one of observations, one of variables), got {ndim}; "
            "for a single variable add an axis, e.g. x[:, None]"
        )
    obs = normalise_axis(obs_axis, "obs_axis", ndim)
    var = normalise_axis(var_axis, "var_axis", ndim)
    if obs == var:
        raise ValueError(
            f"obs_axis={obs_axis} and var_axis={var_axis} both refer to axis {obs} of a {ndim}-d "
            "input; they must name two different axes"
        )
    return obs, var


def batch_view(x: np.ndarray, obs_axis: Any, var_axis: Any) -> np.ndarray:
    """Return a view of ``x`` laid out ``(*batch, N, C)``; the batch axes keep their order.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.zeros((5, 3, 4, 2))          # (N, C, H, W)
    >>> v = batch_view(x, 0, 1)
    >>> v.shape, np.shares_memory(v, x)
    ((4, 2, 5, 3), True)
    """
    obs, var = normalise_axes(x.ndim, obs_axis, var_axis)
    return np.moveaxis(x, (obs, var), (-2, -1))
