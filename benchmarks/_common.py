"""Helpers shared by the benchmark suites (``bench_cov``, ``bench_kde``, ``bench_gaussian``, ``bench_torch``, ...).

One copy of what several suites measure or write the same way: best-of-N timing, the first call in a fresh
process (:func:`first_call`, which also gives that process's peak resident memory), peak traced memory, the
per-patch relative difference, a run with BLAS held to one thread, the synthetic PaDiM-like embedding, the
machine's throughput floors (:func:`machine_floor`; the workloads' floors built from them live in
:mod:`benchmarks._floor`) and what it is (:func:`machine_info`), the issue targets of a row
(:func:`target`, :func:`headline`), table headers, the results JSON and the targets summary. Measures that
only look alike but mean something else (the KDE suite's elementwise relative difference, the covariance
suite's round-robin timing) stay in their suites.

This module imports NumPy only (torch only inside ``machine_floor(torch_rates=True)``): the NumPy suites
import it too.
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


def print_targets(rows: Iterable[dict[str, Any]]) -> None:
    """Print each headline row's issue targets and whether they were met (one line per headline).

    Examples
    --------
    >>> print_targets([{"headline": "KDE pdf", "targets": "<= 2.0x floor: 1.9x yes", "met": True}, {"case": "x"}])
    target KDE pdf: <= 2.0x floor: 1.9x yes -> met
    """
    for row in rows:
        if row.get("headline"):
            print(f"target {row['headline']}: {row['targets']} -> {'met' if row['met'] else 'NOT met'}")


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
    # A row without a "met" field, or with met=None (a headline row without targets), has no target.
    return {
        "suite": suite,
        "rows": rows,
        "all_targets_met": all(r.get("met") is not False for r in ours),
        "max_rel_diff": max(r["max_rel_diff"] for r in ours),
    }


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS tells it, else ``os.cpu_count()``).

    Examples
    --------
    >>> usable_cores() >= 1
    True
    """
    import os

    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _exp_ns(dtype: Any, block: int, repeats: int) -> float:
    """Best ns per element of ``np.exp`` on one in-cache block of ``dtype`` (ufuncs run on one thread)."""
    rng = np.random.default_rng(0)
    # Exponents in the range a KDE meets (-r2/2 of nearby points).
    x = rng.uniform(-30.0, 0.0, block).astype(dtype)
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
    best = float("inf")
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        for _ in range(calls):
            np.exp(x, out=y)
        best = min(best, (time.perf_counter() - start) / (calls * block))
    return best * 1e9


def _gemm_gflops(dtype: Any, n: int, one_thread: bool = False) -> float:
    """Best GFLOP/s of a square ``n``-sided ``A @ B`` in ``dtype`` (all BLAS threads, or one), after a warm-up."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    c = np.empty((n, n), dtype=dtype)
    product = (lambda: np.matmul(a, b, out=c))
    if one_thread:
        product = one_blas_thread(product)
    # A shared machine's other work shows up as slow runs: more of them (about half a second) steady the best.
    wall, _, _ = best_time(product, repeats=3, fill_seconds=0.5, max_runs=20)
    return 2.0 * n**3 / wall / 1e9


def _torch_exp_ns(block: int, repeats: int) -> dict[str, float]:
    """ns per element of ``torch.exp`` (float64, float32) on one in-cache block, torch's default threads."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is optional for the NumPy suites
        return {}
    out = {}
    for name, dtype in (("torch_exp_ns", torch.float64), ("torch_exp32_ns", torch.float32)):
        x = torch.empty(block, dtype=dtype).uniform_(-30.0, 0.0)
        y = torch.empty_like(x)
        wall, _, _ = best_time(lambda: torch.exp(x, out=y), repeats=max(repeats, 3), fill_seconds=0.2, max_runs=200)
        out[name] = wall / block * 1e9
    out["torch_threads"] = torch.get_num_threads()
    return out


def machine_floor(
    *,
    exp_block: int = 65_536,
    exp_repeats: int = 15,
    gemm_n: int = 1000,
    copy_mib: int = 128,
    torch_rates: bool = False,
) -> dict[str, Any]:
    """Measure this machine's throughput floors: NumPy ``exp``, BLAS ``dgemm``/``sgemm`` and memory copy.

    A suite bound by exponentials and matrix products (the KDE's kernel sums, a per-patch fit) can then say
    how far it is from what the hardware allows in the same run, on the same (shared) machine, instead of
    against a number measured elsewhere. The workloads' floors are formed from these rates in ONE place,
    :mod:`benchmarks._floor`.

    Parameters
    ----------
    exp_block : int, default 65536
        Elements per ``np.exp`` call: 512 KiB (float64) in and out, so the block stays in the L2/L3 cache
        and the rate measured is the arithmetic's, not the memory's. Measured for float64 and float32.
    exp_repeats : int, default 15
        Timed rounds (each ~10 ms of ``exp`` calls); the best is kept.
    gemm_n : int, default 1000
        Side of the square ``A @ B`` (``2 n**3`` flops), float64 and float32, best of at least 3 runs (up
        to 20 while they take under half a second) after a warm-up, with all BLAS threads (as the library's
        kernels run) and with one; the rate kept is the better of the two (see Returns).
    copy_mib : int, default 128
        Size of the array copied (well beyond the caches), best of at least 3 runs after a warm-up.
    torch_rates : bool, default False
        Also time ``torch.exp`` on the same block (float64 and float32, torch's default threads):
        informative for the torch suites (the floors use NumPy's one-thread rates, spread over the cores).

    Returns
    -------
    dict
        ``exp_ns`` / ``exp32_ns`` (ns per float64 / float32 element, one thread), ``dgemm_gflops`` /
        ``sgemm_gflops`` (GFLOP/s: the better of all BLAS threads and one thread, each also given as
        ``*_threads_gflops`` and ``*_one_thread_gflops``: on a busy machine threaded BLAS can fall far below
        one thread, and the floor must not take that for the hardware's rate), ``copy_gbps`` (GB/s counting
        bytes read plus bytes written, as STREAM's Copy does), ``cores`` (:func:`usable_cores`), the sizes
        used and, with ``torch_rates``, ``torch_exp_ns``, ``torch_exp32_ns`` and ``torch_threads``.

    Examples
    --------
    >>> f = machine_floor(exp_block=4096, exp_repeats=1, gemm_n=64, copy_mib=1)
    >>> sorted(f)  # doctest: +NORMALIZE_WHITESPACE
    ['copy_gbps', 'copy_mib', 'cores', 'dgemm_gflops', 'dgemm_one_thread_gflops', 'dgemm_threads_gflops',
     'exp32_ns', 'exp_block', 'exp_ns', 'gemm_n', 'sgemm_gflops', 'sgemm_one_thread_gflops',
     'sgemm_threads_gflops']
    >>> all(f[k] > 0 for k in ('copy_gbps', 'dgemm_gflops', 'sgemm_gflops', 'exp_ns', 'exp32_ns'))
    True
    >>> f["dgemm_gflops"] == max(f["dgemm_threads_gflops"], f["dgemm_one_thread_gflops"])
    True
    """
    exp64 = _exp_ns(np.float64, exp_block, exp_repeats)
    exp32 = _exp_ns(np.float32, exp_block, exp_repeats)
    gemm = {(dtype, one): _gemm_gflops(dtype, gemm_n, one_thread=one)
            for dtype in (np.float64, np.float32) for one in (False, True)}

    src = np.ones(copy_mib * 2**20 // 8)
    dst = np.empty_like(src)
    copy_wall, _, _ = best_time(lambda: np.copyto(dst, src), repeats=3, fill_seconds=0.3, max_runs=20)

    out = {
        "exp_ns": exp64,
        "exp32_ns": exp32,
        # The hardware's rate: the better of all BLAS threads and one. On a quiet machine that is the threaded
        # rate; when other processes hold cores, threaded BLAS waits for its descheduled threads (measured 18
        # GFLOP/s against 50 for one thread on a busy 2-core machine), which would make the floor look lax.
        "dgemm_gflops": max(gemm[np.float64, False], gemm[np.float64, True]),
        "sgemm_gflops": max(gemm[np.float32, False], gemm[np.float32, True]),
        "dgemm_threads_gflops": gemm[np.float64, False],
        "dgemm_one_thread_gflops": gemm[np.float64, True],
        "sgemm_threads_gflops": gemm[np.float32, False],
        "sgemm_one_thread_gflops": gemm[np.float32, True],
        "copy_gbps": 2.0 * src.nbytes / copy_wall / 1e9,
        "cores": usable_cores(),
        "exp_block": exp_block,
        "gemm_n": gemm_n,
        "copy_mib": copy_mib,
    }
    if torch_rates:
        out.update(_torch_exp_ns(exp_block, exp_repeats))
    return out


def machine_info() -> dict[str, Any]:
    """What the suite ran on: CPU model, cores, BLAS (threadpoolctl), library versions, load average.

    Recorded with every suite's results (the report's table names the CPU from it), not looked up when the
    report is written, which may be on another machine.

    Examples
    --------
    >>> info = machine_info()
    >>> sorted(k for k in info if k in ("cpu_model", "cores", "blas", "numpy"))
    ['blas', 'cores', 'cpu_model', 'numpy']
    """
    import os
    import platform
    from importlib.metadata import PackageNotFoundError, version

    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu_model": model or platform.processor() or platform.machine() or "unknown CPU",
        "cores": usable_cores(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        from threadpoolctl import threadpool_info

        blas = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        # numpy and scipy may each load their own OpenBLAS (in either order): one sorted list of distinct ones.
        info["blas"] = "; ".join(sorted({
            f"{p.get('internal_api')} {p.get('version')} ({p.get('architecture') or '?'}, {p.get('num_threads')} threads)"
            for p in blas
        })) or "unknown"
    except Exception:  # pragma: no cover - threadpoolctl missing or failing: the table says so
        info["blas"] = "unknown (threadpoolctl unavailable)"
    for dist in ("numpy", "scipy", "torch"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            continue
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        pass
    return info


# --------------------------------------------------------------------------------------------- first calls


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (``ru_maxrss``; Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def first_call(
    factory: str,
    kwargs: dict[str, Any] | None = None,
    *,
    runs: int = 1,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    memory_limit_bytes: int | None = None,
    raise_on_error: bool = True,
) -> dict[str, Any]:
    """Time the first call of some work in a fresh Python process (what a user feels), best of ``runs``.

    ``factory`` is ``"module:function"``: in a new interpreter (repository root as working directory)
    the module is imported and ``function(**kwargs)`` is called, untimed: it does the imports and builds
    the inputs, and returns a zero-argument callable (the work). That callable is then called once and
    timed; thread pools, lazy initialisation and the page faults of fresh memory are all in that time.
    The process also reports its peak resident memory (``ru_maxrss``) before and after the call, so the
    same helper measures a streamed fit's peak RSS in isolation.

    Parameters
    ----------
    factory : str
        ``"package.module:function"``, keyword arguments JSON-serialisable.
    kwargs : dict, optional
        Keyword arguments of the factory.
    runs : int, default 1
        Fresh processes to run; the best time is reported (and every run's).
    timeout : float, optional
        Seconds allowed per process.
    env : dict, optional
        Extra environment variables of the child (e.g. ``OPENBLAS_NUM_THREADS``).
    memory_limit_bytes : int, optional
        Address-space limit of the child (``RLIMIT_AS``): an allocation beyond it fails with
        ``MemoryError`` instead of pushing the shared machine into the OOM killer.
    raise_on_error : bool, default True
        Raise ``RuntimeError`` (with the child's stderr tail) when a child fails; with False, return
        ``{"seconds": None, "error": ...}`` instead.

    Returns
    -------
    dict
        ``seconds`` (best first-call time), ``runs`` (every run's seconds), ``peak_rss_bytes`` and
        ``baseline_rss_bytes`` of the best run (before the call: interpreter, imports, inputs), and
        ``result``: what the work returned when it was JSON-serialisable (e.g. a dict of facts), else None.

    Examples
    --------
    >>> out = first_call("benchmarks._common:_demo_work", {"n": 1000})
    >>> out["seconds"] > 0, out["result"], out["peak_rss_bytes"] >= out["baseline_rss_bytes"]
    (True, 1000, True)
    """
    import os
    import subprocess
    import sys

    payload = json.dumps({"factory": factory, "kwargs": kwargs or {}, "memory_limit": memory_limit_bytes})
    code = "from benchmarks._common import _first_call_child; _first_call_child()"
    child_env = dict(os.environ)
    child_env.update(env or {})
    root = Path(__file__).resolve().parent.parent
    results: list[dict[str, Any]] = []
    for _ in range(max(int(runs), 1)):
        try:
            proc = subprocess.run([sys.executable, "-c", code, payload], cwd=root, capture_output=True, text=True,
                                  timeout=timeout, env=child_env)
        except subprocess.TimeoutExpired:
            error = f"{factory}: first call timed out after {timeout:g} s"
            if raise_on_error:
                raise RuntimeError(error) from None
            return {"seconds": None, "error": error}
        if proc.returncode != 0:
            tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            error = f"{factory}: fresh process failed ({proc.returncode}): {tail[0]}"
            if raise_on_error:
                raise RuntimeError(f"{error}\n{proc.stderr[-2000:]}")
            return {"seconds": None, "error": error}
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    best = min(results, key=lambda r: r["seconds"])
    return {**best, "runs": [r["seconds"] for r in results]}


def _first_call_child() -> None:
    """The child side of :func:`first_call` (reads its JSON payload from ``sys.argv[1]``)."""
    import importlib
    import sys

    payload = json.loads(sys.argv[1])
    if payload.get("memory_limit"):
        import resource

        limit = int(payload["memory_limit"])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    module_name, _, function = payload["factory"].partition(":")
    work = getattr(importlib.import_module(module_name), function)(**payload["kwargs"])
    baseline = peak_rss_bytes()
    start = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    try:
        json.dumps(result)
    except (TypeError, ValueError):
        result = None
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak, "baseline_rss_bytes": baseline, "result": result}))


def _demo_work(n: int) -> Callable[[], int]:
    """A tiny factory for :func:`first_call`'s example: the work sums ``n`` ones."""
    data = np.ones(n)
    return lambda: int(data.sum())


# --------------------------------------------------------------------------------------------- targets


def target(label: str, value: float | None, op: str, bound: float, unit: str = "x") -> dict[str, Any]:
    """One issue target checked: ``value op bound`` with ``op`` one of ``"<="``, ``">="``.

    A missing value (``None``: not measured, e.g. a peer skipped) does not meet the target.

    Examples
    --------
    >>> target("floor", 1.8, "<=", 2.0)["met"], target("x scipy", 2.5, ">=", 3.0)["met"]
    (True, False)
    >>> target("x loop", None, ">=", 3.0)["met"]
    False
    """
    if op not in ("<=", ">="):
        raise ValueError(f"op must be '<=' or '>=', got {op!r}")
    met = value is not None and value == value and (value <= bound if op == "<=" else value >= bound)
    return {"label": label, "value": value, "op": op, "bound": bound, "unit": unit, "met": bool(met)}


def _fmt_num(value: float | None, unit: str = "") -> str:
    if value is None or value != value:
        return "n/a"
    text = f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return f"{text}{unit}" if unit != "x" else f"{text}x"


def describe_targets(targets: Iterable[dict[str, Any]]) -> str:
    """The targets as one line: ``"<= 2x floor: 1.8x yes; >= 3x scipy: 2.5x no"``.

    Examples
    --------
    >>> describe_targets([target("floor", 1.8, "<=", 2.0), target("scipy", 2.5, ">=", 3.0)])
    '<= 2x floor: 1.8x yes; >= 3x scipy: 2.5x no'
    """
    parts = []
    for t in targets:
        unit = t.get("unit", "x")
        parts.append(f"{t['op']} {_fmt_num(t['bound'], unit)} {t['label']}: {_fmt_num(t['value'], unit)} "
                     f"{'yes' if t['met'] else 'no'}")
    return "; ".join(parts)


def headline(workload: str, targets: Iterable[dict[str, Any]] = (), *, peers: str = "", order: int = 0) -> dict[str, Any]:
    """Fields that put a row in the report's headline table (and the README's): the issue's workloads.

    Parameters
    ----------
    workload : str
        The row's name in the headline table (e.g. ``"KDE pdf (10⁴, 10⁴, 2)"``).
    targets : iterable of dict
        :func:`target` results; ``met`` is whether all are met (not set when there is none).
    peers : str
        The peer ratios as text (e.g. ``"5.8x scipy"``).
    order : int
        Sort key of the row within the headline table (suites are ordered by name first).

    Examples
    --------
    >>> h = headline("KDE pdf", [target("floor", 1.8, "<=", 2.0)], peers="5.8x scipy")
    >>> h["headline"], h["targets"], h["met"]
    ('KDE pdf', '<= 2x floor: 1.8x yes', True)
    """
    targets = list(targets)
    fields = {
        "headline": workload,
        "headline_order": order,
        "peers": peers,
        "targets": describe_targets(targets),
        "target_checks": targets,
    }
    if targets:  # without targets a row keeps whatever "met" it has (a suite's own targets)
        fields["met"] = all(t["met"] for t in targets)
    return fields


def kept_bytes(obj: Any, _depth: int = 4) -> int:
    """Bytes of the arrays an object keeps (NumPy arrays and torch tensors reachable from its attributes).

    Walks ``obj.__dict__`` (and the dicts, lists, tuples and plain objects in it, ``_depth`` levels deep)
    without calling properties, so a lazily derived quantity is not computed by asking. Views count once,
    as their base buffer (e.g. a precision written in place over the moments it was computed from).

    Examples
    --------
    >>> class Fitted:
    ...     def __init__(self):
    ...         self.a = np.zeros(100)
    ...         self.parts = {"view": self.a[:10], "b": np.zeros(10, dtype=np.float32)}
    >>> kept_bytes(Fitted())
    840
    """
    seen: set[int] = set()
    total = 0

    def visit(value: Any, depth: int) -> None:
        nonlocal total
        if isinstance(value, np.ndarray):
            root = value
            while isinstance(root.base, np.ndarray):
                root = root.base
            if id(root) not in seen:
                seen.add(id(root))
                total += root.nbytes
        elif hasattr(value, "untyped_storage") and hasattr(value, "data_ptr"):  # a torch tensor
            storage = value.untyped_storage()
            key = storage.data_ptr()
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif depth <= 0:
            return
        elif isinstance(value, dict):
            for item in value.values():
                visit(item, depth - 1)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item, depth - 1)
        elif hasattr(value, "__dict__") and not isinstance(value, type) and type(value).__module__ != "builtins":
            for item in vars(value).values():
                visit(item, depth - 1)
        elif hasattr(value, "__slots__"):
            for name in getattr(value, "__slots__", ()):
                if hasattr(value, name):
                    visit(getattr(value, name), depth - 1)

    visit(obj, _depth)
    return total
