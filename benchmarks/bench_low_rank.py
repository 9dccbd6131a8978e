"""Exact low-rank per-patch Gaussians (fewer images than channels) against the dense fit, side by side.

``anomstats.MultiVariateGaussian(form="low_rank")`` keeps, per patch, an orthonormal basis ``(C, r)`` and
``r`` eigenvalues (``r = N - 1``) instead of ``(C, C)`` stacks (issue 14, point 3). Two parts:

(a) **in process**, float32 embedding ``(100, 550, 16, 16)`` (PaDiM's wide_resnet50 channels, 100 images,
    a small grid), the dense fits ``MultiVariateGaussian()`` (default: covariance, Cholesky factor and
    precision kept) and ``MultiVariateGaussian(store_covariance=False)`` against the low-rank fit:

    - **fit time**: the contenders take turns (round robin, so that a busy spell of this shared machine
      hits them alike), 7 rounds after one warm-up run each; best (``seconds``) and median wall time. And
      the *first* fit in a fresh process (``first_call_seconds``, the best of 3 fresh processes: what a
      user feels; thread pools and the page faults of new stacks). Target: the low-rank fit >= 4x faster
      than each dense fit (best against best);
    - **machine floor**: :func:`benchmarks._floor.measure` (BLAS ``dgemm`` GFLOP/s and the memory
      copy rate, measured in the same run; the flop counts live in :mod:`benchmarks._floor`). The low-rank
      fit does about ``P·(4·C·N² + 8·N³)`` flops (a thin SVD of each patch's centred ``C×N`` block, QR then
      the ``N×N`` SVD: a nominal count, whatever route the core takes to the same basis), the dense one
      ``P·(N·C² + C³/3 + 2·C³/3)`` (``syrk``, ``potrf``, ``potri``). Its floor is those flops at the
      ``dgemm`` rate plus the bytes read and written (float32 input, fitted state) at the copy rate (issue
      12's definition, the same for every suite); ``x_floor`` is the best time over that floor;
    - **memory**: the fitted state's bytes and the fit's peak traced memory (``tracemalloc``, a separate
      untimed run; the embedding is allocated before tracing starts), each over ONE dense float64
      ``(P, C, C)`` stack (``8·P·C²`` bytes). Target: both <= 0.3;
    - **scoring**: Mahalanobis distances of 32 query embeddings, round robin (15 rounds after a warm-up),
      with its floor as for the fit (dense ``2·M·C²`` flops per patch and the precision read; low-rank
      ``4·M·C·r`` and the basis read). Target: the low-rank model >= 2x faster than the dense one, and
      its distances equal the dense ones within 1e-5 relative (the elementwise maximum of
      ``|low − dense| / dense`` is reported; also the log-densities and the log-determinants). The
      low-rank precision (materialised on request, for anomalib's ``inv_covariance``) is compared with
      the dense one per patch and timed too.

(b) **streamed** (tiny sizes in quick mode; the full run's take minutes each), PaDiM-550 at 256 px: C = 550, 64×64 = 4096 patches,
    100 and 300 float32 images generated in batches of 20 (the generator of
    :mod:`benchmarks.bench_padim_memory`), each through ``partial_fit`` and then a first use of the fit
    (reading ``log_det`` finalises it), each in a fresh subprocess so that its peak RSS is its own. The
    dense *default* streaming state would not fit this 24 GB machine (a float64 ``(P, C, C)`` moments
    stack of 9.9 GB plus the fitted stacks: ~25 GB with float32 outputs, ~40 GB with float64 ones), so
    the dense side is the lean ``MultiVariateGaussian(low_memory=True, dtype=float32)`` (packed float64
    moments, float32 precision written in place over them), and the low-rank side uses
    ``dtype=float32`` too. Plus an in-process accuracy check at C = 550, 4×4 patches: the stream against
    the one-shot low-rank fit and against the dense fit.

Writes ``benchmarks/results/low_rank.json``; :mod:`benchmarks.report` adds its table to ``summary.md``
and plots ``low_rank.png`` (one panel per suite; the streamed panel against N).

Usage::

    python -m benchmarks.bench_low_rank [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from collections.abc import Callable
from typing import Any, Sequence

import numpy as np

from benchmarks import _floor
from benchmarks._common import (
    best_time,
    first_call,
    headline,
    make_embedding,
    max_patch_rel_diff,
    peak_traced_bytes,
    print_header,
    targets_summary,
    write_rows,
)

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "low_rank.json"
REPO_ROOT = Path(__file__).resolve().parent.parent
OFFSET = 3.0

FIT_SPEED_TARGET = 4.0
SCORE_SPEED_TARGET = 2.0
MEMORY_TARGET = 0.3  # of one dense float64 (P, C, C) stack
SCORE_REL_TARGET = 1e-5

SUITE_FIT = "fit, float32 embedding"
SUITE_SCORE = "mahalanobis"
SUITE_STREAM = "partial_fit stream + first use, float32, batches of 20"
SUITE_STREAM_ACCURACY = "stream accuracy"
SUITE_MACHINE = "machine floor"

DENSE = "anomstats dense, store_covariance=True"
DENSE_LEAN = "anomstats dense MultiVariateGaussian() (lean default)"
LOW = "anomstats form='low_rank'"
LOW32 = "anomstats form='low_rank', dtype=float32"
LOW_PRECISION = "anomstats form='low_rank', .precision materialised"
STREAM_DENSE = "anomstats dense low_memory=True, dtype=float32"
STREAM_LOW = "anomstats form='low_rank', dtype=float32"

#: Constructor keywords of each fit contender (also passed to the fresh-process workers).
FIT_CONFIGS: dict[str, dict[str, Any]] = {
    DENSE: {"store_covariance": True},
    DENSE_LEAN: {},
    LOW: {"form": "low_rank"},
    LOW32: {"form": "low_rank", "dtype": "float32"},
}
STREAM_CONFIGS: dict[str, dict[str, Any]] = {
    STREAM_DENSE: {"low_memory": True, "dtype": "float32"},
    STREAM_LOW: {"form": "low_rank", "dtype": "float32"},
}

FULL = {
    "fit_shape": (100, 550, 16, 16), "n_test": 32, "rounds": 7, "first_calls": 3, "score_rounds": 15,
    "stream": {"channels": 550, "height": 64, "width": 64, "batch": 20, "images": (100, 300)},
    "accuracy": {"channels": 550, "height": 4, "width": 4, "batch": 20, "images": 100},
    "floor": dict(_floor.FULL_SIZES),
}
QUICK = {
    "fit_shape": (12, 40, 4, 4), "n_test": 4, "rounds": 2, "first_calls": 1, "score_rounds": 2,
    "stream": {"channels": 40, "height": 8, "width": 8, "batch": 10, "images": (20, 30)},
    "accuracy": {"channels": 40, "height": 2, "width": 2, "batch": 5, "images": 20},
    "floor": {"exp_repeats": 1, "gemm_n": 300, "copy_mib": 16},
}


# --------------------------------------------------------------------------------------------- models


def build(config: dict[str, Any]) -> Any:
    """A ``MultiVariateGaussian`` from a contender's keywords (``dtype`` given by name)."""
    from anomstats import MultiVariateGaussian

    kwargs = dict(config)
    if "dtype" in kwargs:
        kwargs["dtype"] = np.dtype(kwargs["dtype"])
    return MultiVariateGaussian(**kwargs)


def state_bytes(model: Any) -> int:
    """Bytes of everything the fitted model keeps (the low-rank precision is not kept: not counted)."""
    if getattr(model, "form", "dense") == "low_rank":
        arrays = [model.mean, model.basis, model.eigenvalues, model.log_det]
    else:
        arrays = [model.mean, model.precision, model.log_det, model.shrinkage_]
        if model.store_covariance and not model.low_memory:
            arrays += [model.covariance, model.cholesky]
    return int(sum(a.nbytes for a in arrays))


def fit_flops(form: str, n: int, c: int, p: int) -> float:
    """Flops of a fit: low-rank ``P·(4CN² + 8N³)``; dense ``P·(NC² + C³/3 + 2C³/3)`` (the counts of
    :mod:`benchmarks._floor`, where every workload's floor is defined).

    Examples
    --------
    >>> fit_flops("low_rank", 10, 100, 2), fit_flops("dense", 10, 100, 2)
    (96000.0, 2200000.0)
    """
    if form == "low_rank":
        return _floor.low_rank_fit_flops(n, c, p)
    return _floor.fit_flops(n, c, p)


def floor_seconds(flops: float, bytes_moved: float, floor: dict[str, Any]) -> tuple[float, float]:
    """(flops at the ``dgemm`` rate, bytes read + written at the copy rate), seconds; the floor is their sum.

    Examples
    --------
    >>> floor_seconds(2e9, 4e9, {"dgemm_gflops": 10.0, "copy_gbps": 8.0})
    (0.2, 0.5)
    """
    return _floor.gemm_seconds(flops, "float64", floor), _floor.byte_seconds(bytes_moved, floor)


def dense_stack_bytes(c: int, p: int) -> int:
    """ONE dense float64 ``(P, C, C)`` stack: ``8·P·C²`` bytes (the unit of the memory targets)."""
    return 8 * p * c * c


# --------------------------------------------------------------------------------------------- workers


def first_fit_work(config: dict[str, Any], shape: Sequence[int]) -> Callable[[], None]:
    """Factory for :func:`benchmarks._common.first_call`: the embedding and the model, then one fit."""
    x = make_embedding(tuple(shape), offset=OFFSET)
    model = build(config)

    def fit() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # quick sizes may reach N - 1 >= C
            model.fit(x)
    return fit


def stream_work(config: dict[str, Any], channels: int, height: int, width: int, images: int,
                batch: int) -> Callable[[], dict[str, Any]]:
    """Factory for :func:`benchmarks._common.first_call`: stream generated batches through ``partial_fit``,
    then read ``log_det`` (the first use, which finalises the fit)."""
    from benchmarks.bench_padim_memory import generate_batches

    model = build(config)

    def work() -> dict[str, Any]:
        start = time.perf_counter()
        for x in generate_batches(images, batch, channels, height, width):
            model.partial_fit(x)
        streamed = time.perf_counter()
        log_det = model.log_det  # finalises the fit
        done = time.perf_counter()
        return {"stream_seconds": streamed - start, "finalise_seconds": done - streamed,
                "state_bytes": state_bytes(model), "log_det_finite": bool(np.isfinite(log_det).all())}
    return work


# --------------------------------------------------------------------------------------------- (a) fit


def round_robin(contenders: dict[str, Callable[[], Any]], rounds: int) -> dict[str, dict[str, Any]]:
    """Time the contenders in turn, ``rounds`` times, after one warm-up run each (untimed).

    On a shared machine the load drifts; taking turns lets a busy spell hit every contender alike. Per
    contender: best and median wall seconds, best process CPU seconds, and the last result. A contender's
    previous result is dropped before it runs again (one result each alive at a time).
    """
    out = {name: {"walls": [], "cpus": [], "result": fn()} for name, fn in contenders.items()}
    for _ in range(max(rounds, 1)):
        for name, fn in contenders.items():
            out[name]["result"] = None
            cpu = time.process_time()
            start = time.perf_counter()
            out[name]["result"] = fn()
            out[name]["walls"].append(time.perf_counter() - start)
            out[name]["cpus"].append(time.process_time() - cpu)
    for timing in out.values():
        timing.update(best=min(timing["walls"]), median=float(np.median(timing["walls"])), cpu=min(timing["cpus"]))
    return out


def fit_rows(shape: tuple[int, int, int, int], rounds: int, first_calls: int,
             floor: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Round-robin and first-call fit times, floors, state and peak memory; returns the rows and the models."""
    n, c, h, w = shape
    p = h * w
    x = make_embedding(shape, offset=OFFSET)
    unit = dense_stack_bytes(c, p)
    case = f"N={n} C={c} {h}x{w}"
    print(f"\nfit float32 {shape}: {p} patches of {n} x {c}, r = {min(n - 1, c)}; one dense float64 stack "
          f"{unit / 2**20:.0f} MiB; best of {rounds} round-robin rounds after a warm-up, first call best of "
          f"{first_calls} fresh processes", flush=True)
    fits = {library: (lambda config=config: build(config).fit(x)) for library, config in FIT_CONFIGS.items()}
    timings = round_robin(fits, rounds)
    models = {library: timing.pop("result") for library, timing in timings.items()}
    rows: list[dict[str, Any]] = []
    for library, config in FIT_CONFIGS.items():
        form = config.get("form", "dense")
        firsts = first_call("benchmarks.bench_low_rank:first_fit_work", {"config": config, "shape": list(shape)},
                            runs=first_calls)["runs"]
        kept = state_bytes(models[library])
        peak = peak_traced_bytes(fits[library])
        flops = fit_flops(form, n, c, p)
        flop_s, byte_s = floor_seconds(flops, x.nbytes + kept, floor)
        wall = timings[library]["best"]
        rows.append({
            "suite": SUITE_FIT, "case": case, "library": library, "seconds": wall,
            "median_seconds": timings[library]["median"], "cpu_seconds": timings[library]["cpu"],
            "first_call_seconds": min(firsts), "first_call_runs": firsts,
            "gflop": flops / 1e9, "floor_seconds": flop_s + byte_s,
            "floor_flop_seconds": flop_s, "floor_byte_seconds": byte_s, "x_floor": wall / (flop_s + byte_s),
            "state_bytes": kept, "state_over_dense_stack": kept / unit,
            "peak_traced_bytes": peak, "peak_over_dense_stack": peak / unit, "size": n * c * p,
        })
        print(f"  {library}: best {wall:.3f} s, median {timings[library]['median']:.3f} s, first call "
              f"{min(firsts):.3f} s", flush=True)

    dense, low = models[DENSE], models[LOW]
    best = {r["library"]: r["seconds"] for r in rows}
    first = {r["library"]: r["first_call_seconds"] for r in rows}
    median = {r["library"]: r["median_seconds"] for r in rows}
    for row in rows:
        row["speedup_vs_dense"] = best[DENSE] / row["seconds"]
        row["speedup_vs_dense_lean"] = best[DENSE_LEAN] / row["seconds"]
        row["median_speedup_vs_dense_lean"] = median[DENSE_LEAN] / row["median_seconds"]
        row["first_call_speedup_vs_dense"] = first[DENSE] / row["first_call_seconds"]
        row["first_call_speedup_vs_dense_lean"] = first[DENSE_LEAN] / row["first_call_seconds"]

    # Accuracy of the fit: the materialised low-rank precision against the dense one, per patch; log det.
    wall, cpu, precision = best_time(lambda: low.precision, 1, warm_up=False)
    precision_diff = max_patch_rel_diff(precision, dense.precision)
    symmetric = bool(np.array_equal(precision, precision.transpose(0, 2, 1)))
    del precision
    log_det_diff = float(np.max(np.abs(low.log_det - dense.log_det) / np.abs(dense.log_det)))
    low32_precision_diff = max_patch_rel_diff(models[LOW32].precision, dense.precision)
    for row in rows:
        if row["library"] == LOW:
            row.update(max_rel_diff=precision_diff, log_det_max_rel_diff=log_det_diff, precision_symmetric=symmetric)
            row["speed_target_met"] = (row["speedup_vs_dense"] >= FIT_SPEED_TARGET
                                       and row["speedup_vs_dense_lean"] >= FIT_SPEED_TARGET)
            row["memory_target_met"] = (row["state_over_dense_stack"] <= MEMORY_TARGET
                                        and row["peak_over_dense_stack"] <= MEMORY_TARGET)
            row.update(headline(f"low-rank MVG fit float32 {shape} (N < C)", order=500,
                                peers=f"{row['speedup_vs_dense_lean']:.1f}x the dense default fit, "
                                      f"{row['speedup_vs_dense']:.1f}x store_covariance=True; state "
                                      f"{row['state_over_dense_stack']:.2f} of one dense float64 stack"))
            row["met"] = row["speed_target_met"] and row["memory_target_met"]
        elif row["library"] == LOW32:
            row.update(max_rel_diff=low32_precision_diff)
    rows.append({
        "suite": SUITE_FIT, "case": case, "library": LOW_PRECISION, "seconds": wall, "cpu_seconds": cpu,
        "max_rel_diff": precision_diff, "precision_symmetric": symmetric, "size": n * c * p,
    })

    print_header(f"{'library':48} {'best s':>7} {'median':>7} {'first s':>7} {'x dense':>7} {'x lean':>7} "
                 f"{'1st x lean':>10} {'GFLOP':>6} {'x floor':>7} {'state/stack':>11} {'peak/stack':>10} "
                 f"{'rel diff':>8}")
    for r in rows:
        print(f"{r['library']:48} {r['seconds']:7.3f} {_f(r.get('median_seconds'), '7.3f')} "
              f"{_f(r.get('first_call_seconds'), '7.3f')} {_f(r.get('speedup_vs_dense'), '7.2f')} "
              f"{_f(r.get('speedup_vs_dense_lean'), '7.2f')} {_f(r.get('first_call_speedup_vs_dense_lean'), '10.2f')} "
              f"{_f(r.get('gflop'), '6.1f')} {_f(r.get('x_floor'), '7.2f')} "
              f"{_f(r.get('state_over_dense_stack'), '11.3f')} {_f(r.get('peak_over_dense_stack'), '10.3f')} "
              f"{_f(r.get('max_rel_diff'), '8.1e')}")
    print(f"(x dense / x lean: store_covariance=True's / the lean default's best time over this row's; 1st: the "
          f"same for the first call in a fresh process; x floor: best time / (flops at "
          f"{floor['dgemm_gflops']:.1f} GFLOP/s + bytes at {floor['copy_gbps']:.1f} GB/s); stack = one dense "
          "float64 (P, C, C) stack; rel diff: precision, per patch, against the dense fit's)")
    return rows, {"dense": models[DENSE_LEAN], "low": low}


def _f(value: Any, spec: str) -> str:
    width = int(spec.split(".")[0]) if spec[0].isdigit() else 0
    return f"{'':>{width}}" if value is None else format(value, spec)


def score_flops_bytes(form: str, m: int, c: int, r: int, p: int, query_itemsize: int) -> tuple[float, float]:
    """Flops and bytes of scoring ``m`` queries (:func:`benchmarks._floor.score_floor`, float64 state): dense
    ``2mC²`` flops and the precision read per patch, low-rank ``4mCr`` flops and the basis read; plus the
    queries read (both).

    Examples
    --------
    >>> score_flops_bytes("dense", 2, 10, 3, 1, 4), score_flops_bytes("low_rank", 2, 10, 3, 1, 4)
    ((400.0, 880.0), (240.0, 320.0))
    """
    rates = {"dgemm_gflops": 1.0, "sgemm_gflops": 1.0, "copy_gbps": 1.0}  # only the counts are used
    floor = _floor.score_floor(m, c, p, f"float{8 * query_itemsize}", rates, precision_dtype="float64",
                               rank=r if form == "low_rank" else None)
    return floor["flops"], floor["bytes"]


# --------------------------------------------------------------------------------------------- (a) scoring


def score_rows(shape: tuple[int, int, int, int], n_test: int, rounds: int, dense: Any, low: Any,
               floor: dict[str, Any]) -> list[dict[str, Any]]:
    """Mahalanobis distances of ``n_test`` queries: dense model against low-rank model, same fit data."""
    n, c, h, w = shape
    test = make_embedding((n_test, c, h, w), offset=OFFSET, seed=1)
    case = f"M={n_test} N={n} C={c} {h}x{w}"
    units = n_test * h * w
    print(f"\nmahalanobis of {n_test} queries {(c, h, w)}: {units} patch-samples, best of {rounds} "
          "round-robin rounds", flush=True)
    models = {DENSE_LEAN: dense, LOW: low}
    timings = round_robin({lib: (lambda model=model: model.mahalanobis(test)) for lib, model in models.items()},
                          rounds)
    rows = []
    for library, timing in timings.items():
        form = "low_rank" if library == LOW else "dense"
        flops, moved = score_flops_bytes(form, n_test, c, min(n - 1, c), h * w, test.itemsize)
        floor_s = sum(floor_seconds(flops, moved, floor))
        rows.append({"suite": SUITE_SCORE, "case": case, "library": library, "seconds": timing["best"],
                     "median_seconds": timing["median"], "cpu_seconds": timing["cpu"],
                     "throughput_patch_samples_per_s": units / timing["best"], "gflop": flops / 1e9,
                     "floor_seconds": floor_s, "x_floor": timing["best"] / floor_s, "size": units * c})
    ref, got = timings[DENSE_LEAN]["result"], timings[LOW]["result"]
    rel = float(np.max(np.abs(got - ref) / np.abs(ref)))
    logpdf_ref, logpdf_low = dense.logpdf(test), low.logpdf(test)
    logpdf_rel = float(np.max(np.abs(logpdf_low - logpdf_ref) / np.abs(logpdf_ref)))
    for row in rows:
        row["speedup_vs_dense"] = rows[0]["seconds"] / row["seconds"]
        row["median_speedup_vs_dense"] = rows[0]["median_seconds"] / row["median_seconds"]
    rows[0]["max_rel_diff"] = 0.0
    rows[1].update(max_rel_diff=rel, logpdf_max_rel_diff=logpdf_rel,
                   speed_target_met=rows[1]["speedup_vs_dense"] >= SCORE_SPEED_TARGET,
                   accuracy_target_met=rel <= SCORE_REL_TARGET)
    rows[1]["met"] = rows[1]["speed_target_met"] and rows[1]["accuracy_target_met"]
    print_header(f"{'library':48} {'best s':>8} {'median':>8} {'patch·samples/s':>16} {'x dense':>7} "
                 f"{'x floor':>7} {'max rel diff':>12} {'logpdf diff':>11}")
    for r in rows:
        print(f"{r['library']:48} {r['seconds']:8.4f} {r['median_seconds']:8.4f} "
              f"{r['throughput_patch_samples_per_s']:16.3e} {r['speedup_vs_dense']:7.2f} {r['x_floor']:7.2f} "
              f"{r['max_rel_diff']:12.2e} {_f(r.get('logpdf_max_rel_diff'), '11.2e')}")
    return rows


# --------------------------------------------------------------------------------------------- (b) streaming


def stream_rows(channels: int, height: int, width: int, batch: int, images: Sequence[int],
                progress: bool) -> list[dict[str, Any]]:
    """Streamed fits, each in a fresh subprocess: peak RSS and time, low-rank against dense low_memory."""
    p = height * width
    rows: list[dict[str, Any]] = []
    unit = dense_stack_bytes(channels, p)
    for n in images:
        case = f"C={channels} {height}x{width} N={n} B={batch}"
        found: dict[str, dict[str, Any]] = {}
        for library, config in STREAM_CONFIGS.items():
            if progress:
                print(f"  streaming {case}: {library} ...", flush=True)
            payload = {"config": config, "channels": channels, "height": height, "width": width,
                       "images": n, "batch": batch}
            out = first_call("benchmarks.bench_low_rank:stream_work", payload)
            facts = out["result"]
            found[library] = result = {"seconds": facts["stream_seconds"] + facts["finalise_seconds"], **facts,
                                       "peak_rss_bytes": out["peak_rss_bytes"],
                                       "baseline_rss_bytes": out["baseline_rss_bytes"]}
            rows.append({
                "suite": SUITE_STREAM, "case": case, "library": library, **result,
                "peak_rss_over_dense_stack": result["peak_rss_bytes"] / unit,
                "size": n, "size_label": "N (images)",
            })
            if progress:
                print(f"    {result['seconds']:.1f} s, peak RSS {result['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
        dense, low = found[STREAM_DENSE], found[STREAM_LOW]
        for row in rows[-2:]:
            row["peak_ratio_low_rank_over_dense"] = low["peak_rss_bytes"] / dense["peak_rss_bytes"]
            row["time_ratio_dense_over_low_rank"] = dense["seconds"] / low["seconds"]
    tri = channels * (channels + 1) // 2
    moments = 8 * p * channels * channels
    print(f"\nstreamed fits, fresh process each (dense default streaming would hold a float64 moments stack of "
          f"{moments / 1e9:.1f} GB plus its fitted stacks: ~{(moments + 3 * moments / 2) / 1e9:.0f} GB with "
          f"float32 outputs; dense low_memory packs the moments: {8 * p * tri / 1e9:.1f} GB)")
    print_header(f"{'case':28} {'library':48} {'total s':>8} {'stream s':>8} {'first use s':>11} {'peak RSS':>9} "
                 f"{'state':>8} {'low/dense peak':>14} {'dense/low time':>14}")
    for r in rows:
        print(f"{r['case']:28} {r['library']:48} {r['seconds']:8.1f} {r['stream_seconds']:8.1f} "
              f"{r['finalise_seconds']:11.1f} {r['peak_rss_bytes'] / 1e9:6.2f} GB {r['state_bytes'] / 1e9:5.2f} GB "
              f"{r['peak_ratio_low_rank_over_dense']:14.2f} {r['time_ratio_dense_over_low_rank']:14.2f}")
    return rows


def stream_accuracy_rows(channels: int, height: int, width: int, batch: int, images: int) -> list[dict[str, Any]]:
    """In process: the low-rank stream against the one-shot low-rank fit and the dense fit (distances, log det)."""
    from benchmarks.bench_padim_memory import generate_batches

    from anomstats import MultiVariateGaussian

    batches = list(generate_batches(images, batch, channels, height, width, seed=2))
    x = np.concatenate(batches)
    test = np.concatenate(list(generate_batches(8, 8, channels, height, width, seed=3)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quick sizes may reach N - 1 >= C
        start = time.perf_counter()
        stream = MultiVariateGaussian(form="low_rank")
        for b in batches:
            stream.partial_fit(b)
        d_stream = stream.mahalanobis(test)
        seconds = time.perf_counter() - start
        one_shot = MultiVariateGaussian(form="low_rank").fit(x)
    dense = MultiVariateGaussian(store_covariance=False).fit(x)
    d_one, d_dense = one_shot.mahalanobis(test), dense.mahalanobis(test)
    case = f"C={channels} {height}x{width} N={images} B={batch}"
    row = {
        "suite": SUITE_STREAM_ACCURACY, "case": case, "library": "anomstats form='low_rank' partial_fit",
        "seconds": seconds,
        "max_rel_diff": float(np.max(np.abs(d_stream - d_dense) / d_dense)),
        "rel_diff_vs_one_shot": float(np.max(np.abs(d_stream - d_one) / d_one)),
        "log_det_rel_diff_vs_dense": float(np.max(np.abs(stream.log_det - dense.log_det) / np.abs(dense.log_det))),
        "size": images,
    }
    row["met"] = row["max_rel_diff"] <= SCORE_REL_TARGET
    print(f"\nstream accuracy {case}: distances vs dense {row['max_rel_diff']:.2e}, vs one-shot low-rank "
          f"{row['rel_diff_vs_one_shot']:.2e}, log det vs dense {row['log_det_rel_diff_vs_dense']:.2e}")
    return [row]


# --------------------------------------------------------------------------------------------- suite


def core_sources() -> dict[str, str]:
    """Short SHA-256 of the core files measured (the low-rank code may change between runs)."""
    import hashlib

    names = ("anomstats/_low_rank.py", "anomstats/gaussian.py")
    return {name: hashlib.sha256((REPO_ROOT / name).read_bytes()).hexdigest()[:12] for name in names}


def main(quick: bool = False) -> dict[str, Any]:
    """Run the suite, print the tables, write ``benchmarks/results/low_rank.json``; return a summary."""
    sizes = QUICK if quick else FULL
    load_start = os.getloadavg()
    floor = _floor.measure(sizes=sizes["floor"])
    print(f"Exact low-rank per-patch Gaussians against the dense fit{' [quick]' if quick else ''}")
    print(_floor.describe(floor))
    rows, models = fit_rows(sizes["fit_shape"], sizes["rounds"], sizes["first_calls"], floor)
    rows += score_rows(sizes["fit_shape"], sizes["n_test"], sizes["score_rounds"], models["dense"], models["low"],
                       floor)
    del models
    rows += stream_accuracy_rows(**sizes["accuracy"])
    stream = sizes["stream"]
    print(f"\nstreamed fits: C={stream['channels']} {stream['height']}x{stream['width']}, N = "
          f"{', '.join(map(str, stream['images']))} in batches of {stream['batch']}"
          f"{'' if quick else ' (minutes each)'}", flush=True)
    rows += stream_rows(**stream, progress=True)
    # The load average (other processes on this shared machine) and the core sources measured.
    rows.append(_floor.floor_row(floor, load_average_start=list(load_start), load_average_end=list(os.getloadavg()),
                                 core_sources=core_sources()))
    write_rows(RESULTS_PATH, rows)
    print(f"\nwrote {RESULTS_PATH}")
    ours = [r for r in rows if "met" in r]
    summary = targets_summary("low_rank", rows, ours)
    fit = next(r for r in rows if r["suite"] == SUITE_FIT and r["library"] == LOW)
    score = next(r for r in rows if r["suite"] == SUITE_SCORE and r["library"] == LOW)
    summary.update(
        fit_speedup_vs_dense=fit["speedup_vs_dense"], fit_speedup_vs_dense_lean=fit["speedup_vs_dense_lean"],
        score_speedup_vs_dense=score["speedup_vs_dense"], score_max_rel_diff=score["max_rel_diff"],
        state_over_dense_stack=fit["state_over_dense_stack"], peak_over_dense_stack=fit["peak_over_dense_stack"],
    )
    print("targets: fit >= {:.0f}x dense store_covariance=True ({:.2f}x) and the lean default ({:.2f}x); scoring >= {:.0f}x ({:.2f}x); "
          "state and peak <= {:.1f} stack ({:.3f}, {:.3f}); scores within {:.0e} ({:.2e}): {}".format(
              FIT_SPEED_TARGET, fit["speedup_vs_dense"], fit["speedup_vs_dense_lean"], SCORE_SPEED_TARGET,
              score["speedup_vs_dense"], MEMORY_TARGET, fit["state_over_dense_stack"], fit["peak_over_dense_stack"],
              SCORE_REL_TARGET, score["max_rel_diff"], "all met" if summary["all_targets_met"] else "NOT all met"))
    return summary


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes; finishes in seconds")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(quick=_parse(sys.argv[1:]).quick)
