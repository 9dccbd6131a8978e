"""Argument and shape validation for the per-patch Gaussian, shared by the core and the torch adapter.

Everything here works on plain Python values (shapes, ints, strings) rather than arrays, so that the
PyTorch adapter can validate tensors with exactly the messages the NumPy core uses, without converting
them. Each check raises :class:`ValueError` (or :class:`TypeError` for a wrong kind of argument) whose
message names the bad argument and says what to do.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

__all__ = [
    "SHRINKAGE_METHODS",
    "check_fit_shape",
    "check_score_shape",
    "check_ridge",
    "check_shrinkage",
    "check_dtype",
    "describe_patch",
]

#: Accepted values of ``shrinkage`` (``None`` means the plain unbiased covariance).
SHRINKAGE_METHODS: tuple[str, ...] = ("ledoit-wolf", "oas")


def _shape_text(shape: Sequence[int]) -> str:
    return str(tuple(int(s) for s in shape))  # Python's tuple text: "(10,)" for one axis


def check_fit_shape(
    shape: Sequence[int], *, min_observations: int = 2, name: str = "embedding"
) -> tuple[int, int, tuple[int, ...]]:
    """Validate the shape of a training embedding ``(N, C, *spatial)``.

    Parameters
    ----------
    shape : sequence of int
        Shape of the embedding: N observations, C features, then any number of spatial axes
        (PaDiM: ``(B, C, H, W)``). No spatial axes means a single patch.
    min_observations : int, default 2
        Smallest acceptable N. A one-shot fit needs 2 (an unbiased covariance of one observation is
        undefined); a streaming update may bring a single observation.
    name : str, default "embedding"
        Argument name used in the messages.

    Returns
    -------
    n, c, spatial : int, int, tuple of int
        Observations, features and the spatial shape.

    Raises
    ------
    ValueError
        If the rank is below 2, a dimension is zero, or N is below ``min_observations``.

    Examples
    --------
    >>> check_fit_shape((200, 100, 56, 56))
    (200, 100, (56, 56))
    >>> check_fit_shape((1, 3, 4, 4))
    Traceback (most recent call last):
    ...
    ValueError: embedding has 1 observation (shape (1, 3, 4, 4)); a Gaussian fit needs at least 2 observations along axis 0
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(
            f"{name} must have shape (N, C, *spatial) with at least 2 axes "
            f"(observations, features), got shape {_shape_text(shape)}"
        )
    n, c, spatial = shape[0], shape[1], shape[2:]
    if c < 1 or any(s < 1 for s in spatial):
        raise ValueError(
            f"{name} has an empty feature or spatial axis (shape {_shape_text(shape)}); "
            "every axis after the first must be at least 1"
        )
    if n < min_observations:
        plural = "observation" if n == 1 else "observations"
        raise ValueError(
            f"{name} has {n} {plural} (shape {_shape_text(shape)}); a Gaussian fit needs at "
            f"least {min_observations} observation{'' if min_observations == 1 else 's'} along axis 0"
        )
    return n, c, spatial


def check_score_shape(shape: Sequence[int], n_features: int, spatial: Sequence[int], *, name: str = "x") -> int:
    """Validate the shape of embeddings to score against a fitted ``(C, *spatial)`` model.

    Parameters
    ----------
    shape : sequence of int
        Shape of the embeddings, expected ``(M, C, *spatial)``.
    n_features : int
        C of the fitted model.
    spatial : sequence of int
        Spatial shape of the fitted model.
    name : str, default "x"
        Argument name used in the messages.

    Returns
    -------
    int
        M, the number of embeddings.

    Raises
    ------
    ValueError
        If the rank, the feature count or the spatial shape differ from the fitted model's.

    Examples
    --------
    >>> check_score_shape((8, 100, 56, 56), 100, (56, 56))
    8
    >>> check_score_shape((100, 56, 56), 100, (56, 56))
    Traceback (most recent call last):
    ...
    ValueError: x must have shape (M, 100, 56, 56) (M embeddings of the fitted model's features and spatial shape), got shape (100, 56, 56)
    """
    shape = tuple(int(s) for s in shape)
    spatial = tuple(int(s) for s in spatial)
    expected = (int(n_features),) + spatial
    if len(shape) != len(expected) + 1 or shape[1:] != expected:
        raise ValueError(
            f"{name} must have shape (M, {', '.join(str(s) for s in expected)}) (M embeddings of the "
            f"fitted model's features and spatial shape), got shape {_shape_text(shape)}"
        )
    return shape[0]


def check_ridge(ridge: float) -> float:
    """Validate the ridge constant added to every covariance diagonal.

    Examples
    --------
    >>> check_ridge(0)
    0.0
    >>> check_ridge(-1.0)
    Traceback (most recent call last):
    ...
    ValueError: ridge must be a finite number >= 0, got -1.0
    """
    if isinstance(ridge, bool) or not isinstance(ridge, numbers.Real):
        raise TypeError(f"ridge must be a real number >= 0, got {type(ridge).__name__}")
    value = float(ridge)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    return value


def check_shrinkage(shrinkage: str | None) -> str | None:
    """Validate the shrinkage method name (``None``, ``"ledoit-wolf"`` or ``"oas"``).

    Examples
    --------
    >>> check_shrinkage("OAS")
    'oas'
    >>> check_shrinkage("lw")
    Traceback (most recent call last):
    ...
    ValueError: shrinkage must be None, 'ledoit-wolf' or 'oas', got 'lw'
    """
    if shrinkage is None:
        return None
    if isinstance(shrinkage, str):
        key = shrinkage.lower().replace("_", "-")
        if key in SHRINKAGE_METHODS:
            return key
    raise ValueError(f"shrinkage must be None, 'ledoit-wolf' or 'oas', got {shrinkage!r}")


def check_dtype(dtype: object) -> np.dtype:
    """Validate the working dtype of the fit: float64 or float32.

    Examples
    --------
    >>> check_dtype("float32")
    dtype('float32')
    >>> check_dtype(np.float16)
    Traceback (most recent call last):
    ...
    ValueError: dtype must be float64 or float32, got float16
    """
    try:
        resolved = np.dtype(dtype)
    except TypeError as err:
        raise ValueError(f"dtype must be float64 or float32, got {dtype!r}") from err
    if resolved not in (np.dtype(np.float64), np.dtype(np.float32)):
        raise ValueError(f"dtype must be float64 or float32, got {resolved}")
    return resolved


def describe_patch(index: int, spatial: Sequence[int]) -> str:
    """Name a flat patch index with its position in the spatial grid, for error messages.

    Examples
    --------
    >>> describe_patch(57, (56, 56))
    'patch 57 (position (1, 1) of the 56x56 grid)'
    >>> describe_patch(3, (10,))
    'patch 3'
    """
    spatial = tuple(int(s) for s in spatial)
    if len(spatial) < 2:  # the flat index already is the position
        return f"patch {int(index)}"
    position = tuple(int(i) for i in np.unravel_index(int(index), spatial))
    grid = "x".join(str(s) for s in spatial)
    return f"patch {int(index)} (position {_shape_text(position)} of the {grid} grid)"
