"""The floor of each benchmarked workload: what this machine's measured rates allow, in ONE place.

Every suite measures the machine in the same run (:func:`measure`, built on
:func:`benchmarks._common.machine_floor`) and reports each timing as a multiple of its workload's floor
(``x_floor`` = seconds / floor seconds), next to its peer ratios. The floors, as issue 12 defines them:

- **exponentials** at the measured per-element ``exp`` rate of one thread (NumPy, in cache-sized blocks,
  in the working dtype), spread over the cores: ``count · exp_ns / cores``;
- **matrix products** at the measured ``dgemm`` / ``sgemm`` rate (all BLAS threads) of the working dtype;
- for **fits**, the ``syrk`` + ``potrf`` + ``potri`` flops at the ``dgemm`` rate (whatever the input dtype:
  the issue's definition, the one its figures use) plus the bytes read and written at the measured memory
  copy bandwidth (which counts read + written bytes, as STREAM's Copy does).

A floor is a dict: ``seconds`` (the floor) and its parts (``exp_seconds``, ``gemm_seconds``,
``byte_seconds``), the counts behind them (``exponentials``, ``flops``, ``bytes``) and ``formula`` (text
for the tables). The parts add up: nothing overlaps in a floor, so it is a bound no implementation on this
machine beats by much (a fused kernel could overlap memory traffic with arithmetic; the byte parts are
small next to the others at the issue's sizes).

Examples
--------
>>> rates = {"exp_ns": 1.0, "exp32_ns": 0.5, "dgemm_gflops": 100.0, "sgemm_gflops": 200.0,
...          "copy_gbps": 20.0, "cores": 2}
>>> f = kde_floor(10_000, 10_000, 2, "float64", rates)
>>> round(f["exp_seconds"], 4), round(f["gemm_seconds"], 4), round(f["seconds"], 4)
(0.05, 0.004, 0.054)
>>> round(x_floor(0.108, f), 2)
2.0
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks._common import machine_floor, machine_info

#: Sizes of the floor measurements: full runs (a few seconds) and quick runs (well under a second).
FULL_SIZES: dict[str, int] = {"exp_repeats": 15, "gemm_n": 2000, "copy_mib": 256}
QUICK_SIZES: dict[str, int] = {"exp_repeats": 3, "gemm_n": 300, "copy_mib": 16}
#: The suite name of the row that records the floor and the machine in every results file.
SUITE = "machine floor"


def measure(quick: bool = False, *, torch_rates: bool = False, sizes: dict[str, int] | None = None) -> dict[str, Any]:
    """This machine's rates (:func:`benchmarks._common.machine_floor`) and what it is (``machine_info``).

    The returned dict holds the rates (``exp_ns``, ``exp32_ns``, ``dgemm_gflops``, ``sgemm_gflops``,
    ``copy_gbps``, ``cores``, ...) and ``machine`` (CPU model, BLAS, versions, load average).
    """
    rates = machine_floor(**(sizes if sizes is not None else QUICK_SIZES if quick else FULL_SIZES),
                          torch_rates=torch_rates)
    return {**rates, "machine": machine_info()}


def floor_row(rates: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The results row recording the measured rates and the machine (``seconds`` None: nothing timed).

    The report takes the CPU of its headline table from these rows.
    """
    flat = {k: v for k, v in rates.items() if k != "machine"}
    machine = rates.get("machine") or machine_info()
    return {"suite": SUITE, "case": "this machine", "library": "numpy exp, BLAS gemm, memory copy",
            "seconds": None, **flat, "machine": machine, **extra}


def describe(rates: dict[str, Any]) -> str:
    """One line for a suite's printout: the rates measured.

    Examples
    --------
    >>> describe({"exp_ns": 0.55, "exp32_ns": 0.33, "dgemm_gflops": 117, "sgemm_gflops": 220, "copy_gbps": 31,
    ...           "cores": 2})
    'machine floor: exp 0.55 / 0.33 ns per float64 / float32 element (one thread), dgemm 117 / sgemm 220 GFLOP/s, copy 31.0 GB/s (read + write), 2 core(s)'
    """
    return (f"machine floor: exp {rates['exp_ns']:.2f} / {rates['exp32_ns']:.2f} ns per float64 / float32 element "
            f"(one thread), dgemm {rates['dgemm_gflops']:.0f} / sgemm {rates['sgemm_gflops']:.0f} GFLOP/s, "
            f"copy {rates['copy_gbps']:.1f} GB/s (read + write), {rates['cores']} core(s)")


# --------------------------------------------------------------------------------------------- rates


def _is_single(dtype: Any) -> bool:
    return np.dtype(str(dtype).replace("torch.", "")).itemsize <= 4


def exp_seconds(count: float, dtype: Any, rates: dict[str, Any]) -> float:
    """``count`` exponentials at the one-thread rate of ``dtype``'s ``exp``, spread over the cores."""
    ns = rates["exp32_ns"] if _is_single(dtype) else rates["exp_ns"]
    return float(count) * ns * 1e-9 / max(int(rates["cores"]), 1)


def gemm_seconds(flops: float, dtype: Any, rates: dict[str, Any]) -> float:
    """``flops`` of matrix products at the ``sgemm`` (float32 and narrower) or ``dgemm`` rate."""
    gflops = rates["sgemm_gflops"] if _is_single(dtype) else rates["dgemm_gflops"]
    return float(flops) / (gflops * 1e9)


def byte_seconds(nbytes: float, rates: dict[str, Any]) -> float:
    """``nbytes`` read plus written at the measured copy bandwidth (which counts both)."""
    return float(nbytes) / (rates["copy_gbps"] * 1e9)


def _floor(formula: str, **parts: float) -> dict[str, Any]:
    seconds = sum(v for k, v in parts.items() if k.endswith("_seconds"))
    return {"seconds": seconds, **parts, "formula": formula}


def x_floor(seconds: float | None, floor: dict[str, Any]) -> float | None:
    """A time as a multiple of its floor (None when the time is missing)."""
    if seconds is None or not floor["seconds"]:
        return None
    return float(seconds) / floor["seconds"]


def _itemsize(dtype: Any) -> int:
    return np.dtype(str(dtype).replace("torch.", "")).itemsize


# --------------------------------------------------------------------------------------------- workloads


def kde_floor(n: int, m: int, d: int, dtype: Any, rates: dict[str, Any]) -> dict[str, Any]:
    """Gaussian KDE at ``n`` data points and ``m`` queries in ``d`` dimensions (pdf, logpdf or forward).

    ``n·m`` exponentials at the ``dtype`` rate spread over the cores, plus the ``2·n·m·d`` flops of the
    distance products at the ``dtype`` GEMM rate. (logpdf's log-sum-exp needs the same exponentials.)

    Examples
    --------
    >>> rates = {"exp_ns": 0.55, "exp32_ns": 0.33, "dgemm_gflops": 117, "sgemm_gflops": 220, "copy_gbps": 31, "cores": 2}
    >>> round(kde_floor(10_000, 10_000, 2, "float64", rates)["seconds"] * 1e3, 1)  # ms
    30.9
    >>> round(kde_floor(40_000, 256, 16, "float32", rates)["seconds"] * 1e3, 2)  # the torch forward, ms
    3.18
    """
    pairs = float(n) * float(m)
    return _floor(
        "n·m exp (one-thread rate / cores) + 2·n·m·d flops at the gemm rate",
        exp_seconds=exp_seconds(pairs, dtype, rates),
        gemm_seconds=gemm_seconds(2.0 * pairs * d, dtype, rates),
        exponentials=pairs,
        flops=2.0 * pairs * d,
    )


def fit_flops(b: int, c: int, p: int) -> float:
    """``syrk`` + ``potrf`` + ``potri`` of ``p`` patches of ``b`` observations of ``c`` features:
    ``P·(B·C² + C³/3 + 2·C³/3)``.

    Examples
    --------
    >>> fit_flops(200, 100, 1)
    3000000.0
    """
    return float(p) * (float(b) * c * c + c**3 / 3.0 + 2.0 * c**3 / 3.0)


def fit_floor(b: int, c: int, p: int, dtype: Any, rates: dict[str, Any], *, out_dtype: Any = "float64",
              out_stacks: int = 1) -> dict[str, Any]:
    """Per-patch Gaussian fit of a ``(B, C, *spatial)`` embedding with ``P`` patches (one-shot or streamed).

    ``syrk`` + ``potrf`` + ``potri`` flops (:func:`fit_flops`) at the ``dgemm`` rate, plus the bytes read
    (the embedding, in ``dtype``) and written (``out_stacks`` ``(P, C, C)`` stacks, the mean ``(C, P)`` and
    the log-determinants, in ``out_dtype``) at the copy bandwidth. ``out_stacks=1``: what scoring needs
    (the precision).

    Examples
    --------
    >>> rates = {"exp_ns": 0.55, "exp32_ns": 0.33, "dgemm_gflops": 117, "sgemm_gflops": 220, "copy_gbps": 31, "cores": 2}
    >>> f = fit_floor(200, 100, 3136, "float32", rates)
    >>> round(f["gemm_seconds"], 4), round(f["byte_seconds"], 4), round(f["seconds"], 3)
    (0.0804, 0.0163, 0.097)
    """
    out = _itemsize(out_dtype)
    nbytes = float(b) * c * p * _itemsize(dtype) + float(p) * (out_stacks * c * c + c + 1) * out
    flops = fit_flops(b, c, p)
    return _floor(
        "syrk + potrf + potri flops at the dgemm rate + bytes read and written at the copy bandwidth",
        gemm_seconds=gemm_seconds(flops, "float64", rates),
        byte_seconds=byte_seconds(nbytes, rates),
        flops=flops,
        bytes=nbytes,
    )


def cov_floor(b: int, c: int, p: int, dtype: Any, rates: dict[str, Any], *, out_dtype: Any = "float64") -> dict[str, Any]:
    """Per-patch covariances alone: ``P·B·C²`` flops (``syrk``) at the ``dgemm`` rate, plus the embedding
    read and the ``(P, C, C)`` result written at the copy bandwidth.

    Examples
    --------
    >>> rates = {"exp_ns": 1, "exp32_ns": 1, "dgemm_gflops": 100, "sgemm_gflops": 200, "copy_gbps": 10, "cores": 2}
    >>> f = cov_floor(200, 100, 3136, "float32", rates)
    >>> round(f["gemm_seconds"], 4), round(f["byte_seconds"], 4)
    (0.0627, 0.0502)
    """
    flops = float(p) * b * c * c
    nbytes = float(b) * c * p * _itemsize(dtype) + float(p) * c * c * _itemsize(out_dtype)
    return _floor("P·B·C² flops at the dgemm rate + bytes read and written at the copy bandwidth",
                  gemm_seconds=gemm_seconds(flops, "float64", rates), byte_seconds=byte_seconds(nbytes, rates),
                  flops=flops, bytes=nbytes)


def score_floor(m: int, c: int, p: int, dtype: Any, rates: dict[str, Any], *, precision_dtype: Any = "float64",
                rank: int | None = None) -> dict[str, Any]:
    """Mahalanobis distances of ``m`` query embeddings at ``p`` patches of ``c`` features.

    Dense: ``2·M·C²`` flops per patch at the GEMM rate of ``precision_dtype``, plus the precision
    ``(P, C, C)`` and the queries read. Low-rank (``rank=r``): ``4·M·C·r`` flops per patch and the basis
    ``(P, C, r)`` read.

    Examples
    --------
    >>> rates = {"exp_ns": 1, "exp32_ns": 1, "dgemm_gflops": 100, "sgemm_gflops": 200, "copy_gbps": 10, "cores": 2}
    >>> f = score_floor(2, 10, 1, "float32", rates)
    >>> f["flops"], f["bytes"]
    (400.0, 880.0)
    >>> score_floor(2, 10, 1, "float32", rates, rank=3)["flops"]
    240.0
    """
    queries = float(m) * c * p * _itemsize(dtype)
    if rank is None:
        flops = 2.0 * m * c * c * p
        nbytes = float(p) * c * c * _itemsize(precision_dtype) + queries
    else:
        flops = 4.0 * m * c * rank * p
        nbytes = float(p) * c * rank * _itemsize(precision_dtype) + queries
    return _floor("scoring flops at the gemm rate + the precision (or basis) and queries read",
                  gemm_seconds=gemm_seconds(flops, precision_dtype, rates), byte_seconds=byte_seconds(nbytes, rates),
                  flops=flops, bytes=nbytes)


def low_rank_fit_flops(n: int, c: int, p: int) -> float:
    """A thin SVD of each patch's centred ``C×N`` block (QR, then the ``N×N`` SVD): ``P·(4·C·N² + 8·N³)``,
    a nominal count whatever route the core takes to the same basis.

    Examples
    --------
    >>> low_rank_fit_flops(10, 100, 2)
    96000.0
    """
    return float(p) * (4.0 * c * n * n + 8.0 * n**3)


def low_rank_fit_floor(n: int, c: int, p: int, dtype: Any, rates: dict[str, Any], *, kept_bytes: float) -> dict[str, Any]:
    """The exact low-rank fit: :func:`low_rank_fit_flops` at the ``dgemm`` rate, plus the embedding read and
    the ``kept_bytes`` of fitted state written at the copy bandwidth."""
    flops = low_rank_fit_flops(n, c, p)
    nbytes = float(n) * c * p * _itemsize(dtype) + float(kept_bytes)
    return _floor("P·(4CN² + 8N³) flops at the dgemm rate + bytes read and written at the copy bandwidth",
                  gemm_seconds=gemm_seconds(flops, "float64", rates), byte_seconds=byte_seconds(nbytes, rates),
                  flops=flops, bytes=nbytes)


def loo_floor(n: int, d: int, rates: dict[str, Any]) -> dict[str, Any]:
    """One leave-one-out likelihood evaluation of a KDE on ``n`` points: :func:`kde_floor` ``(n, n, d)``,
    float64."""
    return kde_floor(n, n, d, "float64", rates)
