"""Per-patch covariance of a PaDiM embedding: ``batched_cov`` / ``RunningMoments`` vs a ``numpy.cov`` loop.

The case from issue 2: a float32 embedding ``(B, C, H, W) = (200, 100, 56, 56)`` (3136 patches of
200 observations of 100 variables), offset by 100 from the origin so that an estimator built on raw
sums of products would visibly lose digits. Side by side in one process:

- ``numpy.cov loop``: ``numpy.cov(x[:, :, h, w], rowvar=False)`` for every patch, as PaDiM-style code
  does it, with numpy's default BLAS threading;
- ``numpy.cov loop, 1 BLAS thread``: the same loop with BLAS held to one thread (``threadpoolctl``),
  which is much faster for these small products on a busy machine; the fairer baseline;
- ``anomstats.batched_cov``: one call, result ``(56, 56, 100, 100)`` (with one worker, and default);
- ``anomstats.RunningMoments``: the same data fed as 4 batches of 50 images, then ``covariance()``.

Reported per row: best wall time over ``repeats`` round-robin rounds (after a warm-up of every contender, the
loops included), the time as a multiple of the machine's floor measured in the same run (``x_floor``;
:func:`benchmarks._floor.cov_floor`: ``P·B·C²`` flops at the ``dgemm`` rate plus the embedding read and the
float64 result written at the copy bandwidth), speed-up over each loop, the max
relative difference against the default loop (per patch: max |Δ| / max |reference|, then the max
over patches), and the peak traced memory (``tracemalloc``, measured in a separate untimed run; it
includes the 251 MB float64 result; both loops are traced with one BLAS thread, which allocates
the same arrays and runs much faster). Writes ``benchmarks/results/cov.json``.

Usage::

    python -m benchmarks.bench_cov [--quick]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from anomstats import RunningMoments, batched_cov
from benchmarks import _floor
from benchmarks._common import headline, max_patch_rel_diff, one_blas_thread, peak_traced_mib, print_header, write_rows
from benchmarks._common import make_embedding as _make_embedding

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "cov.json"
SUITE = "batched covariance"
OFFSET = 100.0


def make_embedding(shape: tuple[int, int, int, int], seed: int = 0) -> np.ndarray:
    """float32 ``(B, C, H, W)``: correlated channels (a shared low-rank part) plus ``OFFSET``."""
    return _make_embedding(shape, offset=OFFSET, seed=seed)


def numpy_loop(x: np.ndarray) -> np.ndarray:
    """The baseline: one ``numpy.cov`` call per patch, stacked as ``(H, W, C, C)``."""
    _, c, h, w = x.shape
    out = np.empty((h, w, c, c))
    for i in range(h):
        for j in range(w):
            out[i, j] = np.cov(x[:, :, i, j], rowvar=False)
    return out


def numpy_loop_one_blas_thread(x: np.ndarray) -> np.ndarray:
    """:func:`numpy_loop` with BLAS held to one thread."""
    return one_blas_thread(lambda: numpy_loop(x))()


def running_moments(x: np.ndarray, n_batches: int = 4) -> np.ndarray:
    moments = RunningMoments()
    for part in np.array_split(x, n_batches, axis=0):
        moments.update(part)
    return moments.covariance()


def main(quick: bool = False) -> dict[str, Any]:
    """Run the suite, print the table, write ``benchmarks/results/cov.json``; return a summary."""
    shape = (20, 8, 7, 7) if quick else (200, 100, 56, 56)
    repeats = 2 if quick else 3
    x = make_embedding(shape)
    case = f"float32 {shape} +{OFFSET:g}"
    patches = shape[2] * shape[3]
    rates = _floor.measure(quick)
    print(_floor.describe(rates), flush=True)
    floor = _floor.cov_floor(shape[0], shape[1], patches, "float32", rates)
    print(f"Per-patch covariance, {case}: {patches} patches of {shape[0]} x {shape[1]}")

    contenders: list[tuple[str, Callable[[], np.ndarray], int]] = [
        # The default loop runs once after its warm-up (~20-30 s each on a busy 2-core machine); its result is
        # the reference.
        ("numpy.cov loop", lambda: numpy_loop(x), 1 if not quick else repeats),
        ("numpy.cov loop, 1 BLAS thread", lambda: numpy_loop_one_blas_thread(x), repeats),
        ("anomstats.batched_cov, workers=1", lambda: batched_cov(x, workers=1), repeats),
        ("anomstats.batched_cov", lambda: batched_cov(x), repeats),
        ("anomstats.RunningMoments, 4 updates", lambda: running_moments(x), repeats),
    ]
    for _, fn, _ in contenders:
        fn()  # warm-up, every contender (issue 12: peers too)
    # Round robin, best of the rounds: a change in the machine's load hits every contender alike.
    timings = {library: float("inf") for library, _, _ in contenders}
    diffs: dict[str, float] = {}
    reference: np.ndarray | None = None
    for round_ in range(repeats):
        for library, fn, reps in contenders:
            if round_ >= reps:
                continue
            start = time.perf_counter()
            result = fn()
            timings[library] = min(timings[library], time.perf_counter() - start)
            reference = result if reference is None else reference  # the default loop comes first
            diffs[library] = max_patch_rel_diff(result, reference)
            del result  # one 251 MB result at a time besides the reference
    del reference  # not held while tracing memory
    loop_time = timings["numpy.cov loop"]
    loop1_time = timings["numpy.cov loop, 1 BLAS thread"]

    rows: list[dict[str, Any]] = []
    for library, fn, _ in contenders:
        if library == "numpy.cov loop":
            # Same allocations as the one-thread loop, which traces in a fraction of the time.
            fn = contenders[1][1]
        rows.append(
            {
                "suite": SUITE,
                "case": case,
                "library": library,
                "seconds": timings[library],
                "x_floor": _floor.x_floor(timings[library], floor),
                "ratio": loop_time / timings[library],
                "ratio_vs_one_thread_loop": loop1_time / timings[library],
                "max_rel_diff": diffs[library],
                "peak_mib": peak_traced_mib(fn),
                "size": int(np.prod(shape)),
            }
        )

    header = (f"{'library':38} {'seconds':>9} {'x floor':>7} {'x loop':>8} {'x loop(1t)':>10} {'max rel diff':>13} "
              f"{'peak MiB':>9}")
    print_header(header)
    for row in rows:
        print(
            f"{row['library']:38} {row['seconds']:9.3f} {row['x_floor']:7.2f} {row['ratio']:8.2f} "
            f"{row['ratio_vs_one_thread_loop']:10.2f} {row['max_rel_diff']:13.2e} {row['peak_mib']:9.1f}"
        )
    ours = next(r for r in rows if r["library"] == "anomstats.batched_cov")
    ours.update(headline(f"batched_cov float32 {shape}", peers=f"{ours['ratio']:.1f}x numpy.cov loop "
                         f"({ours['ratio_vs_one_thread_loop']:.1f}x with 1 BLAS thread)", order=200))
    rows.append(_floor.floor_row(rates))
    write_rows(RESULTS_PATH, rows)
    print(f"wrote {RESULTS_PATH}")
    return {
        "rows": rows,
        "speedup": ours["ratio"],
        "speedup_vs_one_thread_loop": ours["ratio_vs_one_thread_loop"],
        "max_rel_diff": max(r["max_rel_diff"] for r in rows if "max_rel_diff" in r),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes; finishes in seconds")
    main(quick=parser.parse_args().quick)
