"""Helpers shared by the benchmark suites (``bench_cov``, ``bench_kde``, ``bench_gaussian``, ``bench_torch``).

One copy of what several suites measure or write the same way: best-of-N timing, peak traced memory,
the per-patch relative difference, a run with BLAS held to one thread, the synthetic PaDiM-like
embedding, table headers, the results JSON and the targets summary. Measures that only look alike
but mean something else (the KDE suite's elementwise relative difference, the covariance suite's
round-robin timing) stay in their suites.

This module imports NumPy only (never torch): the NumPy suites import it too.
"""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

_BLAS_CONTROLLER: Any = None  # a threadpoolctl.ThreadpoolController, built on first use


def best_time(
    fn: Callable[[], T],
    repeats: int,
    warm_up: bool = True,
    fill_seconds: float = 0.0,
    max_runs: int = 15,
    sync: Callable[[], None] | None = None,
) -> tuple[float, float, T]:
    """Best wall and CPU seconds (all threads of the process) over repeated runs of ``fn()``.

    Parameters
    ----------
    fn : callable
        The work to time, called without arguments.
    repeats : int
        Minimum number of timed runs (at least one run is always made).
    warm_up : bool, default True
        Make one untimed run first (caches, thread pools, lazy initialisation).
    fill_seconds : float, default 0.0
        Fast contenders get extra runs, up to ``max_runs`` in all, while the runs so far (counted at
        the best time) stay under this many seconds: a steadier minimum. 0 means exactly ``repeats``.
    max_runs : int, default 15
        Cap on the runs added by ``fill_seconds``.
    sync : callable, optional
        Called after every run, inside the timed interval (e.g. waiting for a CUDA device), so
        that asynchronous work is counted.

    Returns
    -------
    wall : float
        Best wall-clock time, seconds.
    cpu : float
        Best process CPU time, seconds. On a shared machine wall-time ratios understate a
        multi-threaded contender when other processes hold the cores; CPU-time ratios compare work.
    result
        The result of the last run.

    Examples
    --------
    >>> wall, cpu, value = best_time(lambda: sum(range(10)), repeats=2)
    >>> value, wall >= 0.0, cpu >= 0.0
    (45, True, True)
    """
    if warm_up:
        result = fn()
        if sync is not None:
            sync()
    best_wall = best_cpu = float("inf")
    runs = 0
    while runs < max(repeats, 1) or (runs < max_runs and best_wall * runs < fill_seconds):
        runs += 1
        cpu = time.process_time()
        start = time.perf_counter()
        result = fn()
        if sync is not None:
            sync()
        best_wall = min(best_wall, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu, result


def peak_traced_bytes(fn: Callable[[], Any]) -> int:
    """Peak memory traced by ``tracemalloc`` during ``fn()``, in bytes.

    NumPy reports its array buffers to ``tracemalloc``, so this counts the temporaries and the
    result of ``fn()``, but not memory allocated before the call (e.g. its inputs).

    Examples
    --------
    >>> peak_traced_bytes(lambda: np.zeros(1_000_000)) >= 8_000_000
    True
    """
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def peak_traced_mib(fn: Callable[[], Any]) -> float:
    """:func:`peak_traced_bytes` in MiB.

    Examples
    --------
    >>> peak_traced_mib(lambda: np.zeros(2**20)) >= 8.0
    True
    """
    return peak_traced_bytes(fn) / 2**20


def max_patch_rel_diff(got: np.ndarray, ref: np.ndarray) -> float:
    """Max over patches of ``max |got - ref| / max |ref|`` for stacks of per-patch matrices.

    Both arrays have shape ``(..., C, C)``: each patch's difference is scaled by that patch's largest
    reference entry (so near-zero entries do not inflate it), then the worst patch is reported.

    Examples
    --------
    >>> ref = np.array([[[2.0, 1.0], [1.0, 2.0]], [[4.0, 0.0], [0.0, 4.0]]])
    >>> got = ref + np.array([[[0.0, 0.02], [0.02, 0.0]], [[0.0, 0.0], [0.0, 0.04]]])
    >>> print(f"{max_patch_rel_diff(got, ref):.3f}")
    0.010
    """
    diff = np.abs(got - ref).max(axis=(-2, -1))
    scale = np.abs(ref).max(axis=(-2, -1))
    return float((diff / scale).max())


def one_blas_thread(fn: Callable[[], T]) -> Callable[[], T]:
    """Wrap ``fn`` so that it runs with BLAS held to one thread (``threadpoolctl``).

    Many small matrix products run much faster single-threaded on a busy machine, which makes a
    per-patch NumPy loop held to one thread the fairer baseline. The thread-pool controller is built
    once (it scans the loaded libraries) and shared by all wrapped functions.

    Examples
    --------
    >>> one_blas_thread(lambda: int(np.ones((2, 2)) @ np.ones(2) @ np.ones(2)))()
    4
    """

    def wrapped() -> T:
        global _BLAS_CONTROLLER
        from threadpoolctl import ThreadpoolController

        _BLAS_CONTROLLER = _BLAS_CONTROLLER or ThreadpoolController()
        with _BLAS_CONTROLLER.limit(limits=1, user_api="blas"):
            return fn()

    return wrapped


def make_embedding(shape: tuple[int, int, int, int], offset: float, seed: int = 0) -> np.ndarray:
    """Synthetic float32 PaDiM embedding ``(B, C, H, W)``: correlated channels, offset from the origin.

    Each patch holds standard normal noise plus a shared rank-4 part (which correlates the channels),
    plus ``offset`` (which makes estimators built on raw sums of products lose digits).

    Examples
    --------
    >>> x = make_embedding((5, 3, 2, 2), offset=10.0)
    >>> x.shape, x.dtype, bool(5.0 < x.mean() < 15.0)
    ((5, 3, 2, 2), dtype('float32'), True)
    """
    b, c, h, w = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32)
    mixing = rng.standard_normal((4, c), dtype=np.float32) * 0.5
    factors = rng.standard_normal((b, 4, h, w), dtype=np.float32)
    x += np.einsum("brhw,rc->bchw", factors, mixing, dtype=np.float32)
    x += np.float32(offset)
    return x


def print_header(header: str) -> None:
    """Print a table's column header and a rule of the same width under it.

    Examples
    --------
    >>> print_header(f"{'library':8} {'seconds':>8}")
    library   seconds
    -----------------
    """
    print(header)
    print("-" * len(header))


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write a suite's rows to ``path`` as an indented JSON list (creating the folder if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")


def targets_summary(suite: str, rows: list[dict[str, Any]], ours: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The summary returned by a suite's ``main``: its rows, whether every target was met, worst accuracy.

    ``ours`` are the rows of the library under test; a row without a ``met`` field has no target.

    Examples
    --------
    >>> rows = [{"met": True, "max_rel_diff": 1e-9}, {"max_rel_diff": 3e-9}]
    >>> s = targets_summary("demo", rows, rows)
    >>> s["all_targets_met"], s["max_rel_diff"]
    (True, 3e-09)
    """
    ours = list(ours)
    return {
        "suite": suite,
        "rows": rows,
        "all_targets_met": all(r.get("met", True) for r in ours),
        "max_rel_diff": max(r["max_rel_diff"] for r in ours),
    }


def machine_floor(*, exp_block: int = 65_536, exp_repeats: int = 15, gemm_n: int = 1000, copy_mib: int = 128) -> dict[str, Any]:
    """Measure this machine's throughput floors: NumPy ``exp``, BLAS ``dgemm`` and memory copy.

    A suite that is bound by exponentials and a matrix product (the KDE's kernel sums) can then say how
    far it is from what the hardware allows in the same run, on the same (shared) machine, instead of
    against a number measured elsewhere.

    Parameters
    ----------
    exp_block : int, default 65536
        Elements per ``np.exp`` call, float64: 512 KiB in and out, so the block stays in the L2/L3
        cache and the rate measured is the arithmetic's, not the memory's.
    exp_repeats : int, default 15
        Timed rounds (each ~0.1 s of ``exp`` calls at most); the best is kept.
    gemm_n : int, default 1000
        Side of the square float64 ``A @ B`` (``2 n**3`` flops), best of at least 3 runs (up to 20 while
        they take under half a second) after a warm-up. BLAS uses all its threads, as the library's
        kernel sums do.
    copy_mib : int, default 128
        Size of the array copied (well beyond the caches), best of at least 3 runs after a warm-up.

    Returns
    -------
    dict
        ``exp_ns`` (ns per float64 element, one thread), ``dgemm_gflops`` (GFLOP/s, all BLAS threads),
        ``copy_gbps`` (GB/s counting bytes read plus bytes written, as STREAM's Copy does), ``cores``
        (``os.cpu_count()``) and the sizes used.

    Examples
    --------
    >>> f = machine_floor(exp_block=4096, exp_repeats=1, gemm_n=64, copy_mib=1)
    >>> sorted(f) == ['copy_gbps', 'copy_mib', 'cores', 'dgemm_gflops', 'exp_block', 'exp_ns', 'gemm_n']
    True
    >>> all(f[k] > 0 for k in ('copy_gbps', 'dgemm_gflops', 'exp_ns'))
    True
    """
    import os

    rng = np.random.default_rng(0)
    # Exponents in the range a KDE meets (-r2/2 of nearby points); ufunc exp runs on one thread.
    x = rng.uniform(-30.0, 0.0, exp_block)
    y = np.empty_like(x)
    np.exp(x, out=y)
    calls = 1
    # Enough calls per round for ~10 ms, so that the timer's resolution does not matter.
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            np.exp(x, out=y)
        if time.perf_counter() - start > 0.01 or calls >= 1 << 16:
            break
        calls *= 2
    best_exp = float("inf")
    for _ in range(max(exp_repeats, 1)):
        start = time.perf_counter()
        for _ in range(calls):
            np.exp(x, out=y)
        best_exp = min(best_exp, (time.perf_counter() - start) / (calls * exp_block))

    a = rng.standard_normal((gemm_n, gemm_n))
    b = rng.standard_normal((gemm_n, gemm_n))
    c = np.empty((gemm_n, gemm_n))
    # A shared machine's other work shows up as slow runs: more of them (about half a second) steady the best.
    gemm_wall, _, _ = best_time(lambda: np.matmul(a, b, out=c), repeats=3, fill_seconds=0.5, max_runs=20)

    src = np.ones(copy_mib * 2**20 // 8)
    dst = np.empty_like(src)
    copy_wall, _, _ = best_time(lambda: np.copyto(dst, src), repeats=3, fill_seconds=0.3, max_runs=20)

    return {
        "exp_ns": best_exp * 1e9,
        "dgemm_gflops": 2.0 * gemm_n**3 / gemm_wall / 1e9,
        "copy_gbps": 2.0 * src.nbytes / copy_wall / 1e9,
        "cores": os.cpu_count() or 1,
        "exp_block": exp_block,
        "gemm_n": gemm_n,
        "copy_mib": copy_mib,
    }
