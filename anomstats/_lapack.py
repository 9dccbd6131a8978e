"""GIL-free calls of the LAPACK/BLAS routines the per-patch kernels run in worker threads.

Dense triangles: ``potrf`` (``potf2`` for small orders), ``potri``, ``syrk``, and the factor-and-invert of
:meth:`ScratchKernels.invert` (``potrf`` + ``potri``, or from order 129 on :class:`_RecursiveInverse`, built from
``trmm``, ``syrk``, ``trtri`` and ``lauum``); packed (RFP) triangles: ``sfrk`` and ``tfttr`` (:class:`RfpKernels`,
used by the packed accumulator :mod:`anomstats._packed`).

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
from numpy.typing import DTypeLike, NDArray
from scipy.linalg import get_blas_funcs, get_lapack_funcs

__all__ = ["RfpKernels", "ScratchKernels", "potrf_lower", "potri_lower", "syrk_lower"]

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
        # xPOTRF / xPOTF2 / xPOTRI / xLAUUM(uplo, n, a, lda, info)
        for routine in ("potrf", "potf2", "potri", "lauum"):
            found[prefix + routine] = _capsule_function(
                cython_lapack, prefix + routine, [ctypes.c_char_p, _INT_P, ctypes.c_void_p, _INT_P, _INT_P]
            )
        # xTRTRI(uplo, diag, n, a, lda, info)
        found[prefix + "trtri"] = _capsule_function(
            cython_lapack, prefix + "trtri", [ctypes.c_char_p, ctypes.c_char_p, _INT_P, ctypes.c_void_p, _INT_P, _INT_P]
        )
        # xSYRK(uplo, trans, n, k, alpha, a, lda, beta, c, ldc)
        found[prefix + "syrk"] = _capsule_function(
            cython_blas,
            prefix + "syrk",
            [ctypes.c_char_p, ctypes.c_char_p, _INT_P, _INT_P, ctypes.c_void_p, ctypes.c_void_p, _INT_P,
             ctypes.c_void_p, ctypes.c_void_p, _INT_P],
        )
        # xTRMM(side, uplo, transa, diag, m, n, alpha, a, lda, b, ldb)
        found[prefix + "trmm"] = _capsule_function(
            cython_blas,
            prefix + "trmm",
            [ctypes.c_char_p] * 4 + [_INT_P, _INT_P, ctypes.c_void_p, ctypes.c_void_p, _INT_P, ctypes.c_void_p, _INT_P],
        )
    return found


_ROUTINES = _load()


def _routine(name: str, dtype: np.dtype[Any]) -> Callable[..., None] | None:
    prefix = _PREFIX.get(np.dtype(dtype))
    return None if prefix is None else _ROUTINES.get(prefix + name)


#: Up to this order the Cholesky factor comes from LAPACK's unblocked ``xPOTF2`` rather than ``xPOTRF``. The
#: blocked routine splits a small matrix into blocks of a few dozen rows whose level-3 calls cost more than
#: they save: measured (OpenBLAS 0.3.30, one thread, ctypes), ``potf2`` took 0.70-0.81x ``potrf``'s time at
#: every order from 48 to 127 in float64 (100: 32 against 42 µs) and in float32, was equal at 16, and lost
#: beyond (1.1x at exactly 128, whose 1 KiB column stride aliases in cache; 1.25x at 192, 1.75x at 256). Both
#: are the same Cholesky algorithm, with the same backward error bound and the same ``info`` convention.
UNBLOCKED_CHOLESKY_MAX_ORDER = 120


def _cholesky_routine(n: int, dtype: np.dtype[Any]) -> Callable[..., None] | None:
    """``xPOTF2`` for small orders, ``xPOTRF`` beyond (see :data:`UNBLOCKED_CHOLESKY_MAX_ORDER`)."""
    unblocked = _routine("potf2", dtype) if n <= UNBLOCKED_CHOLESKY_MAX_ORDER else None
    return unblocked if unblocked is not None else _routine("potrf", dtype)


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
    fn = _cholesky_routine(n, t.dtype)
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


#: Above this order a covariance is factored and inverted by :class:`_RecursiveInverse` rather than by ``potrf`` +
#: ``potri``; at or below it the two LAPACK calls are faster than the recursion's extra calls.
RECURSIVE_INVERSE_MIN_ORDER = 129

# What _RecursiveInverse calls (xPOTF2 only where _cholesky_routine picks it, and it falls back to xPOTRF).
_RECURSIVE_ROUTINES = ("potrf", "trtri", "trmm", "syrk", "lauum")


class _RecursiveInverse:
    """Cholesky factor and inverse of one ``n×n`` matrix in place, by halving, with no triangular solve.

    LAPACK's ``potrf`` and ``trtri`` run at a third of the matrix-product rate at PaDiM's orders (OpenBLAS 0.3.30,
    one thread, n = 550: 20 and 14 GFLOP/s against 57 for a product), and its triangular solve ``trsm`` is as slow
    (15-19 GFLOP/s) while ``trmm`` and ``syrk`` reach 41-52. Factoring and inverting together needs no solve:
    with the lower triangle read as LAPACK's upper one (``A = UᵀU``, see the module notes) and
    ``A = [[A11, A12], [A12ᵀ, A22]]``,

    1. ``A11 → W11 = U11⁻¹`` (recursively; at most :data:`RECURSIVE_INVERSE_MIN_ORDER` - 1 rows: ``potrf``, then
       ``trtri``);
    2. ``U12 = W11ᵀ A12`` (``trmm``: ``U11ᵀ U12 = A12``);
    3. ``A22 ← A22 − U12ᵀ U12`` (``syrk``), the Schur complement, ``= U22ᵀ U22``;
    4. ``A22 → W22 = U22⁻¹`` (recursively);
    5. ``W12 = −W11 U12 W22`` (two ``trmm``), so that ``W = U⁻¹``;

    then ``lauum`` forms ``W Wᵀ = (UᵀU)⁻¹``, as ``potri`` does after its ``trtri``. The same flops as ``potrf`` +
    ``potri`` and the same error bounds (blocked Cholesky and triangular inversion, as LAPACK's own); measured
    (same conditions) n = 550: 4.8 ms against 7.5 ms; 384: 2.0 against 3.5; 200: 0.49 against 0.69.
    """

    def __init__(self, t: NDArray[np.floating]) -> None:
        self.t = t
        self.n = t.shape[0]
        self.itemsize = t.dtype.itemsize
        self.base = t.ctypes.data
        self.diagonal = t.reshape(-1)[:: self.n + 1]  # a view of t's diagonal
        self.lda = ctypes.byref(ctypes.c_int(self.n))
        scalar = np.ctypeslib.as_ctypes_type(t.dtype)
        self.one, self.minus_one = ctypes.byref(scalar(1.0)), ctypes.byref(scalar(-1.0))
        self.info = ctypes.c_int(0)
        self.routines = {name: _routine(name, t.dtype) for name in _RECURSIVE_ROUTINES}
        # Blocks below this order are leaves; read once (as ScratchKernels reads the switch), and never below 2,
        # where halving would leave a block of the same order.
        self.leaf_below = max(2, RECURSIVE_INVERSE_MIN_ORDER)

    @classmethod
    def available(cls, dtype: np.dtype[Any]) -> bool:
        return all(_routine(name, dtype) is not None for name in _RECURSIVE_ROUTINES)

    def __call__(self, factor_diagonal: NDArray[np.floating] | None) -> int:
        info = self._invert_factor(0, self.n, factor_diagonal)
        if info == 0:
            self.routines["lauum"](b"U", self.lda, self.base, self.lda, ctypes.byref(self.info))
        return info

    def _address(self, row: int, col: int) -> int:
        """Address of element (row, col) of LAPACK's column-major view of ``t`` (``t[col, row]``)."""
        return self.base + self.itemsize * (col * self.n + row)

    def _invert_factor(self, start: int, size: int, factor_diagonal: NDArray[np.floating] | None) -> int:
        """Rows and columns ``start:start + size`` (a Schur complement by now) → the inverse of their factor."""
        corner = self._address(start, start)
        if size < self.leaf_below:
            order = ctypes.byref(ctypes.c_int(size))
            self.info.value = 0
            _cholesky_routine(size, self.t.dtype)(b"U", order, corner, self.lda, ctypes.byref(self.info))
            if self.info.value:
                return start + self.info.value
            if factor_diagonal is not None:
                factor_diagonal[start : start + size] = self.diagonal[start : start + size]
            self.routines["trtri"](b"U", b"N", order, corner, self.lda, ctypes.byref(self.info))
            return 0  # trtri cannot fail: the factor's diagonal is positive
        half = size // 2
        rest = size - half
        info = self._invert_factor(start, half, factor_diagonal)
        if info:
            return info
        upper_right, lower_right = self._address(start, start + half), self._address(start + half, start + half)
        m, n = ctypes.byref(ctypes.c_int(half)), ctypes.byref(ctypes.c_int(rest))
        trmm = self.routines["trmm"]
        trmm(b"L", b"U", b"T", b"N", m, n, self.one, corner, self.lda, upper_right, self.lda)  # U12 = W11ᵀ A12
        self.routines["syrk"](b"U", b"T", n, m, self.minus_one, upper_right, self.lda, self.one, lower_right,
                              self.lda)  # A22 − U12ᵀ U12
        info = self._invert_factor(start + half, rest, factor_diagonal)
        if info:
            return info
        trmm(b"L", b"U", b"N", b"N", m, n, self.minus_one, corner, self.lda, upper_right, self.lda)  # −W11 U12
        trmm(b"R", b"U", b"N", b"N", m, n, self.one, lower_right, self.lda, upper_right, self.lda)  # ... W22
        return 0


class ScratchKernels:
    """The per-patch routines (``syrk``, ``potrf``, ``potri``, :meth:`invert`) bound to one ``(C, C)`` scratch
    matrix, their arguments prepared once.

    The per-patch loop of a fit calls them thousands of times from one thread; building the ctypes
    arguments once per thread instead of once per call removes most of the Python overhead around
    each (GIL-free) call. Falls back to the functions above where the C pointers are unavailable.
    """

    def __init__(self, t: NDArray[np.floating]) -> None:
        n = _check_square(t)
        self.t = t
        self._address = t.ctypes.data
        self._diagonal = t.reshape(-1)[:: n + 1]  # a view: after potrf, the factor's diagonal
        self._potrf = _cholesky_routine(n, t.dtype)
        self._potri = _routine("potri", t.dtype)
        recursive = n >= RECURSIVE_INVERSE_MIN_ORDER and _RecursiveInverse.available(t.dtype)
        self._recursive = _RecursiveInverse(t) if recursive else None
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

    def invert(self, factor_diagonal: NDArray[np.floating] | None = None) -> int:
        """Replace the scratch's lower triangle (a covariance) by that of its inverse; return the factor's ``info``.

        The inverse comes from the Cholesky factor ``L`` (``A = L Lᵀ``): ``potrf`` + ``potri`` up to order
        :data:`RECURSIVE_INVERSE_MIN_ORDER` - 1, :class:`_RecursiveInverse` (faster, no triangular solve) from
        it. ``factor_diagonal`` (``n`` values), when given, receives ``L``'s diagonal (the log-determinant's
        terms). ``info > 0``: the leading minor of that order is not positive definite, and the scratch is left
        partly overwritten.
        """
        if self._recursive is not None:
            return self._recursive(factor_diagonal)
        info = self.potrf()
        if info:
            return info
        if factor_diagonal is not None:
            factor_diagonal[:] = self._diagonal
        self.potri()  # cannot fail: the factor's diagonal is positive
        return 0

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


def _load_rfp_routines() -> dict[str, Callable[..., None] | None]:
    """``xSFRK`` and ``xTFTTR`` (x = d, s) as C functions called without the GIL, where scipy exports them."""
    try:
        from scipy.linalg import cython_lapack
    except ImportError:  # pragma: no cover - every supported scipy ships it
        return {}
    text, address = ctypes.c_char_p, ctypes.c_void_p
    found: dict[str, Callable[..., None] | None] = {}
    for prefix in ("d", "s"):
        # xSFRK(transr, uplo, trans, n, k, alpha, a, lda, beta, c)
        found[prefix + "sfrk"] = _capsule_function(
            cython_lapack, prefix + "sfrk",
            [text, text, text, _INT_P, _INT_P, address, address, _INT_P, address, address],
        )
        # xTFTTR(transr, uplo, n, arf, a, lda, info)
        found[prefix + "tfttr"] = _capsule_function(
            cython_lapack, prefix + "tfttr", [text, text, _INT_P, address, address, _INT_P, _INT_P]
        )
    return found


_RFP_ROUTINES = _load_rfp_routines()


class RfpKernels:
    """LAPACK's two RFP routines on one accumulator's ``C×C`` triangles, called without the GIL.

    The format is ``TRANSR='N'``, ``UPLO='U'`` as LAPACK reads memory (column-major); unpacked into a
    C-ordered matrix the triangle is its *lower* one, the triangle of :mod:`anomstats._lapack` and of
    :class:`anomstats._patch_kernels.PatchFinisher`. One instance per thread (it holds its ctypes
    arguments). Where scipy's C pointers are not available, scipy's wrappers do the same (holding the GIL).

    Examples
    --------
    >>> rows = np.array([[1.0, 2.0], [3.0, 4.0]])
    >>> kernels, packed, t = RfpKernels(2, np.float64), np.zeros(3), np.zeros((2, 2))
    >>> kernels.rank_update(rows, packed, 1.0, 0.0)       # rowsᵀ rows, packed
    >>> kernels.unpack(packed, t)
    >>> t.tolist()                                        # its lower triangle
    [[10.0, 0.0], [14.0, 20.0]]
    """

    def __init__(self, n_features: int, dtype: DTypeLike) -> None:
        self.dtype = np.dtype(dtype)
        prefix = "d" if self.dtype == np.float64 else "s"
        self._sfrk = _RFP_ROUTINES.get(prefix + "sfrk")
        self._tfttr = _RFP_ROUTINES.get(prefix + "tfttr")
        scalar = np.ctypeslib.as_ctypes_type(self.dtype)
        self.n_features = int(n_features)
        self._n, self._k, self._info = ctypes.c_int(self.n_features), ctypes.c_int(0), ctypes.c_int(0)
        self._alpha, self._beta = scalar(0.0), scalar(0.0)

    def rank_update(self, rows: NDArray[Any], packed: NDArray[Any], alpha: float, beta: float) -> None:
        """``packed ← alpha·rowsᵀ·rows + beta·packed`` for C-contiguous ``rows`` (K, C) and one packed triangle.

        ``beta = 0`` overwrites ``packed`` without reading it.
        """
        if self._sfrk is None:
            sfrk = get_lapack_funcs("sfrk", dtype=self.dtype)
            packed[...] = sfrk(self.n_features, rows.shape[0], alpha, rows.T, beta, packed,
                               transr="N", uplo="U", trans="N")
            return
        self._k.value, self._alpha.value, self._beta.value = rows.shape[0], alpha, beta
        n = ctypes.byref(self._n)
        # Read column-major, rows (K, C) is the (C, K) matrix Xᵀ with leading dimension C: 'N' gives Xᵀ X.
        self._sfrk(b"N", b"U", b"N", n, ctypes.byref(self._k), ctypes.byref(self._alpha), rows.ctypes.data, n,
                   ctypes.byref(self._beta), packed.ctypes.data)

    def unpack(self, packed: NDArray[Any], t: NDArray[Any]) -> None:
        """Copy one packed triangle into the lower triangle of the C-ordered ``(C, C)`` matrix ``t``.

        The strict upper triangle of ``t`` is not touched.
        """
        if self._tfttr is None:
            tfttr = get_lapack_funcs("tfttr", dtype=self.dtype)
            full, _ = tfttr(self.n_features, packed, transr="N", uplo="U")
            lower = np.tril_indices(self.n_features)
            t[lower] = full.T[lower]  # LAPACK's upper triangle is the C-ordered lower one
            return
        n = ctypes.byref(self._n)
        self._tfttr(b"N", b"U", n, packed.ctypes.data, t.ctypes.data, n, ctypes.byref(self._info))
