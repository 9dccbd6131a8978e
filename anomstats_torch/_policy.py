"""Dtype, device and chunking policy shared by the adapter's modules.

One place decides: which dtype a computation runs in, which dtype fitted buffers are stored in, which dtype a
result is returned in, whether the code is being traced or exported (then shape-dependent Python branching must
be avoided), and how many rows fit in a chunk under a memory budget.

The dtype rules, together (issue 13, "dtypes that follow the model"):

* compute (:func:`working_dtype`): float64 if the module or the input is float64, otherwise float32. Half
  precision (float16, bfloat16) is never computed in: a module cast with ``module.half()`` or
  ``module.to(torch.bfloat16)`` upcasts its buffers for each computation;
* results (:func:`result_dtype`): in the dtype of a half-precision input (the layers after the module, cast
  with the rest of the model, expect it), otherwise in the working dtype;
* fitted buffers (:func:`storage_dtype`): in the working dtype, except that a module cast to half precision
  keeps its dtype (the fit is computed in float32 and rounded once when stored), as ``load_state_dict`` keeps
  the module's dtype.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from anomstats._budget import DEFAULT_MEMORY_BUDGET, items_per_chunk

#: Default budget, in bytes, for the temporaries of one chunk of a hot kernel.
DEFAULT_CHUNK_BYTES = DEFAULT_MEMORY_BUDGET

#: While tracing/exporting the batch size is symbolic, so chunk sizes are planned for this many rows
#: (the recorded graph must not depend on the example's batch size).
TRACE_PLANNING_ROWS = 64

_HALF_TYPES = (torch.float16, torch.bfloat16)


def working_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The floating dtype a computation over tensors of ``dtypes`` runs in.

    The promotion of the dtypes, raised to at least float32: half precision (float16, bfloat16) and
    integer inputs are computed in float32; anything involving float64 is computed in float64.
    """
    result = torch.float32
    for dtype in dtypes:
        if dtype.is_complex:
            raise TypeError(f"complex tensors are not supported (got {dtype})")
        if dtype == torch.float64:
            result = torch.float64
    return result


#: The torch floating dtypes that NumPy has too.
_NUMPY_TWINS = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The NumPy dtype of a torch floating dtype, for the core's dtype rules (eps, smallest normal, names).

    float64, float32 and float16 map to their NumPy twins. bfloat16, which NumPy lacks, and non-floating dtypes
    raise ``TypeError``: the core functions that must take them accept ``torch.finfo(dtype)`` instead (the
    representability messages of :mod:`anomstats._patch_kernels`).

    Examples
    --------
    >>> numpy_dtype(torch.float32), numpy_dtype(torch.float16)
    (dtype('float32'), dtype('float16'))
    """
    twin = _NUMPY_TWINS.get(dtype)
    if twin is None:
        raise TypeError(f"{dtype} has no NumPy twin (float64, float32 and float16 have); pass torch.finfo({dtype}) instead")
    return np.dtype(twin)


def result_dtype(input_dtype: torch.dtype, working: torch.dtype) -> torch.dtype:
    """The dtype a result computed in ``working`` from an input of ``input_dtype`` is returned in.

    Half precision in, half precision out (the result is rounded once, from the working dtype); any other
    input gets the working dtype (float32 or float64), as before.
    """
    return input_dtype if input_dtype in _HALF_TYPES else working


def storage_dtype(module_dtype: torch.dtype, *input_dtypes: torch.dtype) -> torch.dtype:
    """The dtype a fit stores its buffers in, for a module whose buffers are ``module_dtype``.

    The working dtype of the module and the inputs, except that a module cast to half precision (its buffers
    float16 or bfloat16, by ``module.half()`` or ``module.to(torch.bfloat16)``) keeps that dtype when no
    float64 is involved: it computes in float32 and rounds once when storing.
    """
    working = working_dtype(module_dtype, *input_dtypes)
    if working == torch.float32 and module_dtype in _HALF_TYPES:
        return module_dtype
    return working


def as_float_tensor(value: object, name: str) -> Tensor:
    """Check that ``value`` is a real tensor; return it unchanged (no copy, never modified)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}; wrap it with torch.as_tensor")
    if value.dtype.is_complex:
        raise TypeError(f"{name} must be real, got dtype {value.dtype}")
    return value


def is_tracing() -> bool:
    """True while torch.jit tracing/scripting, torch.export, torch.compile or ONNX export runs the code.

    Then the modules avoid Python branches on data values and chunk only along axes whose length is fixed
    by the module's buffers, so the recorded graph stays correct for every batch size.
    """
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    compiler = getattr(torch, "compiler", None)
    if compiler is not None:
        if getattr(compiler, "is_exporting", lambda: False)() or getattr(compiler, "is_compiling", lambda: False)():
            return True
    onnx = getattr(torch, "onnx", None)
    return bool(onnx is not None and getattr(onnx, "is_in_onnx_export", lambda: False)())


@contextlib.contextmanager
def static_shapes_while_tracing() -> Iterator[None]:
    """Silence torch.jit's TracerWarnings about Python ints/bools taken from tensor shapes.

    Use only around code whose Python-side shape values come from axes fixed by the module's buffers
    (features, patches, training points), never from the batch axis: those values are constants of the
    model, so recording them as constants is correct.
    """
    if not torch.jit.is_tracing():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def rows_per_chunk(bytes_per_row: int, chunk_bytes: int, total: int) -> int:
    """How many rows of ``bytes_per_row`` fit in ``chunk_bytes`` (the core's rule; at least 1, at most ``total``)."""
    return max(1, min(int(total), items_per_chunk(int(bytes_per_row), int(chunk_bytes))))
