"""Compact storage of per-patch precisions: the packed upper triangle and half-precision copies (issue 13).

The layout is the core's (:mod:`anomstats._packed`): the upper triangle of each symmetric ``C×C`` matrix,
row by row (``numpy.triu_indices`` order, which ``torch.triu_indices`` shares), ``C·(C+1)/2`` numbers
(:func:`anomstats._packed.packed_length`); the number of features of a packed length is the core's
:func:`anomstats._packed.features_of_packed_length`. This module keeps the adapter's own rules about tensors:
the names of the compact checkpoint formats, their state-dict key and dtypes, and the packing kernels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from anomstats._packed import features_of_packed_length

__all__ = [
    "COMPACT_FORMATS",
    "PACKED_KEY",
    "STORAGES",
    "check_compact_format",
    "check_storage",
    "pack",
    "packed_features",
    "unpack",
    "unpack_index",
    "upper_indices",
]

#: The state-dict key of a packed precision (P, C·(C+1)/2), next to ``mean``; the module's own buffer name
#: with ``storage="packed"``.
PACKED_KEY = "inv_covariance_packed"

#: ``compact_state_dict(format=...)``: name → (packed?, dtype of the stored precision; None: the module's).
COMPACT_FORMATS: dict[str, tuple[bool, torch.dtype | None]] = {
    "packed": (True, None),
    "float16": (False, torch.float16),
    "bfloat16": (False, torch.bfloat16),
    "packed_float16": (True, torch.float16),
    "packed_bfloat16": (True, torch.bfloat16),
}

#: ``MultiVariateGaussian(storage=...)``: how the dense form keeps its precision buffer.
STORAGES = ("dense", "packed")


def check_compact_format(format: Any) -> tuple[bool, torch.dtype | None]:
    """``(packed, dtype)`` of a compact format name; ``ValueError`` naming the formats otherwise."""
    if not isinstance(format, str) or format not in COMPACT_FORMATS:
        names = ", ".join(repr(name) for name in COMPACT_FORMATS)
        raise ValueError(f"format must be one of {names}, got {format!r}")
    return COMPACT_FORMATS[format]


def check_storage(storage: Any) -> str:
    """Validate ``storage``: ``"dense"`` (anomalib's ``inv_covariance``) or ``"packed"``."""
    if not isinstance(storage, str) or storage not in STORAGES:
        raise ValueError(f"storage must be 'dense' or 'packed', got {storage!r}")
    return storage


def packed_features(packed: Tensor, name: str) -> int:
    """``C`` of a packed precision (P, C·(C+1)/2); ``ValueError`` for another rank or length."""
    if packed.ndim != 2:
        raise ValueError(f"{name} must be 2-D (patches, C*(C+1)/2), got shape {tuple(packed.shape)}")
    return features_of_packed_length(packed.shape[1], name)


def upper_indices(n_features: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Rows and columns of the packed entries: the upper triangle row by row (``numpy.triu_indices``)."""
    rows, cols = torch.triu_indices(n_features, n_features, device=device)
    return rows, cols


def unpack_index(n_features: int, device: torch.device | str | None = None) -> Tensor:
    """(C·C,) positions in the packed triangle of the entries of a C-ordered ``C×C`` matrix (both halves).

    Entry ``(i, j)`` with ``a = min(i, j)``, ``b = max(i, j)`` sits at ``a·C − a·(a − 1)/2 + (b − a)``: row
    ``a`` of the triangle starts after the ``C + (C − 1) + … + (C − a + 1)`` entries of the rows above.
    """
    i = torch.arange(n_features, device=device)
    a = torch.minimum(i[:, None], i[None, :])
    b = torch.maximum(i[:, None], i[None, :])
    return (a * n_features - a * (a - 1) // 2 + (b - a)).reshape(-1)


def pack(precision: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Upper triangles (p, C·(C+1)/2) of a stack (p, C, C), of the symmetric part ``(P + Pᵀ)/2``.

    For an exactly symmetric stack (this package's precisions) that is the upper triangle itself, so
    :func:`unpack` gives the stack back bit for bit; for an anomalib precision (an explicit inverse, not
    exactly symmetric) it keeps the symmetric part. Computed in float32 at least (no overflow of ``P + Pᵀ``
    in half precision), returned in ``dtype`` (default: the stack's).
    """
    n_features = precision.shape[-1]
    rows, cols = upper_indices(n_features, precision.device)
    wide = precision.to(torch.promote_types(precision.dtype, torch.float32))
    upper = wide[:, rows, cols]
    upper = (upper + wide[:, cols, rows]) * 0.5
    return upper.to(precision.dtype if dtype is None else dtype)


def unpack(packed: Tensor, n_features: int, index: Tensor | None = None) -> Tensor:
    """The symmetric stack (p, C, C) of packed upper triangles (p, C·(C+1)/2), in their dtype.

    One gather with a constant index (:func:`unpack_index`): traceable, and exported to ONNX as a
    ``Gather``, so an exported graph holds the packed numbers only.
    """
    if index is None:
        index = unpack_index(n_features, packed.device)
    return packed.index_select(-1, index).reshape(packed.shape[:-1] + (n_features, n_features))

