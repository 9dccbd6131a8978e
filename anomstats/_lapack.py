"""GIL-free calls of the three LAPACK/BLAS routines the per-patch kernels run in worker threads.

scipy's Python-level wrappers (``scipy.linalg.lapack`` / ``scipy.linalg.blas``) keep the GIL held while
the Fortran routine runs, so worker threads that call them take turns instead of sharing the cores
(measured here: ``potrf`` + ``potri`` over 3136 SPD 100 x 100 matrices took 0.25 s serially and 0.29 s
on two threads). scipy also exports the very same routines as C function pointers for Cython
(``scipy.linalg.cython_lapack`` / ``cython_blas``). Calling those pointers through :mod:`ctypes`
releases the GIL for the duration of each call, so the threads really overlap (same measurement:
0.44 s serially through ctypes, 0.25 s on two threads). Where the pointers cannot be obtained, the
functions fall back to scipy's wrappers: same results, serialised threads.

All three functions work on C-ordered square matrices and their *lower* triangle. LAPACK is
column-major, so the lower triangle of a C-ordered matrix is the upper triangle ('U') of the same
memory read as a Fortran matrix: no copies, no transposes.
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable

import numpy as np
from numpy.typing import NDArray
from scipy.linalg import get_blas_funcs, get_lapack_funcs

__all__ = ["potrf_lower", "potri_lower", "syrk_lower"]

_INT_P = ctypes.POINTER(ctypes.c_int)
_PREFIX = {np.dtype(np.float32): "s", np.dtype(np.float64): "d"}


def _capsule_function(module: Any, name: str, argtypes: list[Any]) -> Callable[..., None] | None:
    """The C function ``name`` exported by a scipy Cython module, wrapped by ctypes (GIL released)."""
    try:
        capsule = module.__pyx_capi__[name]
        api = ctypes.pythonapi
        api.PyCapsule_GetName.restype = ctypes.c_char_p
        api.PyCapsule_GetName.argtypes = [ctypes.py_object]
        api.PyCapsule_GetPointer.restype = ctypes.c_void_p
        api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        pointer = api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
    except Exception:  # another Python implementation, or a scipy without the Cython exports
        return None
    if not pointer:
        return None
    # CFUNCTYPE (unlike PYFUNCTYPE) releases the GIL around every call.
    return ctypes.CFUNCTYPE(None, *argtypes)(pointer)


def _load() -> dict[str, Callable[..., None] | None]:
    try:
        from scipy.linalg import cython_blas, cython_lapack
    except ImportError:  # pragma: no cover - every supported scipy ships them
        return {}
    found: dict[str, Callable[..., None] | None] = {}
    for prefix in _PREFIX.values():
        # xPOTRF / xPOTRI(uplo, n, a, lda, info)
        for routine in ("potrf", "potri"):
            found[prefix + routine] = _capsule_function(
                cython_lapack, prefix + routine, [ctypes.c_char_p, _INT_P, ctypes.c_void_p, _INT_P, _INT_P]
            )
        # xSYRK(uplo, trans, n, k, alpha, a, lda, beta, c, ldc)
        found[prefix + "syrk"] = _capsule_function(
            cython_blas,
            prefix + "syrk",
            [ctypes.c_char_p, ctypes.c_char_p, _INT_P, _INT_P, ctypes.c_void_p, ctypes.c_void_p, _INT_P,
             ctypes.c_void_p, ctypes.c_void_p, _INT_P],
        )
    return found


_ROUTINES = _load()


def _routine(name: str, dtype: np.dtype[Any]) -> Callable[..., None] | None:
    prefix = _PREFIX.get(np.dtype(dtype))
    return None if prefix is None else _ROUTINES.get(prefix + name)


def _check_square(t: NDArray[Any]) -> int:
    if t.ndim != 2 or t.shape[0] != t.shape[1] or not t.flags.c_contiguous or not t.flags.writeable:
        raise ValueError("expected a writeable, C-contiguous square matrix")
    return int(t.shape[0])


def potrf_lower(t: NDArray[np.floating]) -> int:
    """Cholesky-factor the lower triangle of ``t`` in place (``t = L Lᵀ``); return LAPACK's ``info``.

    Only the lower triangle is read and written. ``info > 0``: the leading minor of that order is not
    positive definite.

    Examples
    --------
    >>> t = np.array([[4.0, 0.0], [2.0, 5.0]])
    >>> potrf_lower(t), t.tolist()
    (0, [[2.0, 0.0], [1.0, 2.0]])
    """
    n = _check_square(t)
    fn = _routine("potrf", t.dtype)
    if fn is None:
        _, info = get_lapack_funcs("potrf", dtype=t.dtype)(t.T, lower=0, overwrite_a=1, clean=0)
        return int(info)
    size, info = ctypes.c_int(n), ctypes.c_int(0)
    fn(b"U", ctypes.byref(size), t.ctypes.data, ctypes.byref(size), ctypes.byref(info))
    return info.value


def potri_lower(t: NDArray[np.floating]) -> int:
    """Replace the lower Cholesky factor in ``t`` by the lower triangle of ``(L Lᵀ)⁻¹``; return ``info``.

    Examples
    --------
    >>> t = np.array([[2.0, 0.0], [1.0, 2.0]])  # the factor of [[4, 2], [2, 5]]
    >>> potri_lower(t), t.tolist()
    (0, [[0.3125, 0.0], [-0.125, 0.25]])
    """
    n = _check_square(t)
    fn = _routine("potri", t.dtype)
    if fn is None:
        _, info = get_lapack_funcs("potri", dtype=t.dtype)(t.T, lower=0, overwrite_c=1)
        return int(info)
    size, info = ctypes.c_int(n), ctypes.c_int(0)
    fn(b"U", ctypes.byref(size), t.ctypes.data, ctypes.byref(size), ctypes.byref(info))
    return info.value


def syrk_lower(alpha: float, rows: NDArray[np.floating], t: NDArray[np.floating]) -> None:
    """Write ``alpha · rowsᵀ rows`` into the lower triangle of ``t`` (the strict upper one is untouched).

    ``rows`` is a C-contiguous ``(N, C)`` matrix of the same dtype as the ``(C, C)`` matrix ``t``.

    Examples
    --------
    >>> t = np.zeros((2, 2))
    >>> syrk_lower(0.5, np.array([[1.0, 2.0], [3.0, 4.0]]), t)
    >>> t.tolist()
    [[5.0, 0.0], [7.0, 10.0]]
    """
    c = _check_square(t)
    if rows.ndim != 2 or rows.shape[1] != c or rows.dtype != t.dtype or not rows.flags.c_contiguous:
        raise ValueError("rows must be a C-contiguous (N, C) matrix of t's dtype")
    fn = _routine("syrk", t.dtype)
    if fn is None:
        syrk = get_blas_funcs("syrk", dtype=t.dtype)
        syrk(alpha, rows.T, beta=0.0, c=t.T, trans=0, lower=0, overwrite_c=1)
        return
    scalar = np.ctypeslib.as_ctypes_type(t.dtype)
    c_size, k_size = ctypes.c_int(c), ctypes.c_int(rows.shape[0])
    a, zero = scalar(alpha), scalar(0.0)
    # Read column-major, rows (N, C) is the (C, N) matrix Xᵀ with leading dimension C: 'N' gives Xᵀ X.
    fn(b"U", b"N", ctypes.byref(c_size), ctypes.byref(k_size), ctypes.byref(a), rows.ctypes.data,
       ctypes.byref(c_size), ctypes.byref(zero), t.ctypes.data, ctypes.byref(c_size))


class ScratchKernels:
    """The three routines bound to one ``(C, C)`` scratch matrix, their arguments prepared once.

    The per-patch loop of a fit calls them thousands of times from one thread; building the ctypes
    arguments once per thread instead of once per call removes most of the Python overhead around
    each (GIL-free) call. Falls back to the functions above where the C pointers are unavailable.
    """

    def __init__(self, t: NDArray[np.floating]) -> None:
        n = _check_square(t)
        self.t = t
        self._address = t.ctypes.data
        self._potrf = _routine("potrf", t.dtype)
        self._potri = _routine("potri", t.dtype)
        self._syrk = _routine("syrk", t.dtype)
        scalar = np.ctypeslib.as_ctypes_type(t.dtype)
        self._n, self._k, self._info = ctypes.c_int(n), ctypes.c_int(0), ctypes.c_int(0)
        self._alpha, self._zero = scalar(0.0), scalar(0.0)
        self._n_p, self._k_p, self._info_p = (ctypes.pointer(v) for v in (self._n, self._k, self._info))
        self._alpha_p, self._zero_p = ctypes.pointer(self._alpha), ctypes.pointer(self._zero)

    def potrf(self) -> int:
        """:func:`potrf_lower` of the scratch matrix."""
        if self._potrf is None:
            return potrf_lower(self.t)
        self._potrf(b"U", self._n_p, self._address, self._n_p, self._info_p)
        return self._info.value

    def potri(self) -> int:
        """:func:`potri_lower` of the scratch matrix."""
        if self._potri is None:
            return potri_lower(self.t)
        self._potri(b"U", self._n_p, self._address, self._n_p, self._info_p)
        return self._info.value

    def syrk(self, alpha: float, rows: NDArray[np.floating]) -> None:
        """:func:`syrk_lower` into the scratch matrix; ``rows`` as there (validated, C-contiguous)."""
        if self._syrk is None or rows.dtype != self.t.dtype or not rows.flags.c_contiguous:
            syrk_lower(alpha, rows, self.t)
            return
        if rows.ndim != 2 or rows.shape[1] != self._n.value:
            raise ValueError("rows must be a C-contiguous (N, C) matrix of t's dtype")
        self._alpha.value, self._k.value = alpha, rows.shape[0]
        self._syrk(b"U", b"N", self._n_p, self._k_p, self._alpha_p, rows.ctypes.data, self._n_p,
                   self._zero_p, self._address, self._n_p)
