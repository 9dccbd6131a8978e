"""PaDiM's largest fit from a stream: peak RSS and time, ours (NumPy core and torch adapter) vs anomalib's.

Every measurement runs in a fresh subprocess (:func:`benchmarks._common.first_call`), so its peak RSS
(``resource.getrusage``'s ``ru_maxrss``, the whole process: interpreter, imports, one batch and the fit)
belongs to that fit alone. The embeddings are generated on the fly in batches (float32, from a seeded RNG);
``seconds`` is the time spent in the library (updates plus the final compute / first read), the generation
excluded (``total_seconds`` includes it). Parts:

(a) **PaDiM-550** (issue 12), wide_resnet50_2 at 256 px: C = 550, 64×64 = 4096 patches, 300 images in
    batches of 20, streamed through

    - ``anomstats_torch.MultiVariateGaussian().update`` per batch, then ``compute()`` (CPU, under
      ``torch.inference_mode``): target peak RSS <= 7 GB and <= 45 s;
    - the core's default ``anomstats.MultiVariateGaussian().partial_fit`` per batch, then a first read of
      ``precision`` / ``log_det``: target <= 45 s (its peak RSS is reported);
    - the core's ``MultiVariateGaussian(dtype=float32)`` likewise: a float32 precision, as the torch
      adapter gives, with the stream going on (reported, no target of its own);
    - the core's ``MultiVariateGaussian(low_memory=True, dtype=float32)`` likewise (the lean streaming mode).

    Each row gives its floor (:func:`benchmarks._floor.fit_floor`: ``syrk`` + ``potrf`` + ``potri`` flops
    at the ``dgemm`` rate plus the embeddings read and the precision written at the copy bandwidth, measured
    in the same run) and ``x_floor``. A child that runs out of memory (its address space is limited to the
    machine's physical memory, so it fails with ``MemoryError`` instead of calling in the OOM killer) is a
    row with ``error`` and no time. Run by default (several minutes and up to ~15 GB); ``--no-550`` skips
    it; at quick sizes only with ``stream=True`` (tests).
(b) side by side at C = 550, 32×32 (1024 patches), same stream: ours (``low_memory=True, dtype=float32``)
    vs a faithful NumPy re-implementation of anomalib's fit (all embeddings stacked; per-patch covariance in
    float32 + 0.01·I into a (C, C, P) stack; + 1e-5·I (a second stack); a contiguous (P, C, C) copy and its
    float32 inverse). Target: ours <= half of anomalib's peak.
(c) accuracy, in process, at C = 550 and 2×2 patches (300 images): relative max error of the float32
    precision against a float64 one-shot ``numpy.cov`` + ridge + ``numpy.linalg.inv`` per patch, for
    ours with float64 and float32 accumulation and for the anomalib re-implementation.

Usage::

    python -m benchmarks.bench_padim_memory            # (a), (b) and (c)
    python -m benchmarks.bench_padim_memory --no-550   # (b) and (c)
    python -m benchmarks.bench_padim_memory --quick    # tiny sizes, seconds ((b) and (c))

The embeddings are ``|N(0, 1)|`` plus a shared low-rank component (ReLU-like, correlated channels);
the generator is the same in every process, so all fits see the same data.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from scipy.linalg import lapack

from benchmarks import _floor
from benchmarks._common import first_call, headline, print_targets, target

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "padim_memory.json"
REPO_ROOT = Path(__file__).resolve().parent.parent
SUITE = "padim_memory"
ANOMALIB_RIDGE, ANOMALIB_EPS = 0.01, 1e-5


# --------------------------------------------------------------------------------------------- data


def generate_batches(
    n_images: int, batch: int, channels: int, height: int, width: int, seed: int = 0
) -> Iterator[np.ndarray]:
    """Yield float32 embeddings ``(b, C, H, W)``; batch ``i`` depends only on ``(seed, i)``."""
    rank = 8
    mixing = np.random.default_rng([seed, 10**6]).normal(size=(rank, channels)).astype(np.float32) * 0.3
    for i, start in enumerate(range(0, n_images, batch)):
        b = min(batch, n_images - start)
        rng = np.random.default_rng([seed, i])
        x = np.abs(rng.standard_normal((b, channels, height, width), dtype=np.float32))
        factors = rng.standard_normal((b, rank, height, width), dtype=np.float32)
        x += np.einsum("brhw,rc->bchw", factors, mixing, dtype=np.float32)
        yield x


# --------------------------------------------------------------------------------------------- fits


def fit_ours(batches: Iterator[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The public low-memory streaming fit; float32 (mean, precision) in anomalib's layout.

    ``MultiVariateGaussian(low_memory=True, dtype=float32)``: packed float64 moments, the float32
    precision written in place over them when ``.precision`` is first read.
    """
    from anomstats import MultiVariateGaussian

    model = MultiVariateGaussian(low_memory=True, dtype=np.float32)
    for x in batches:
        model.partial_fit(x)
    precision = model.precision  # finalises (in place) on first use
    return model.mean, precision


def fit_ours_float32_accumulation(
    batches: Iterator[np.ndarray], channels: int, patches: int
) -> tuple[np.ndarray, np.ndarray]:
    """The accumulator with float32 accumulation (not offered publicly): for the accuracy table only."""
    from anomstats._packed import PackedGaussianAccumulator

    acc = PackedGaussianAccumulator(channels, patches, dtype=np.float32)
    for x in batches:
        acc.update(x)
    return acc.finalise(out_dtype=np.float32)


def fit_anomalib(batches: Iterator[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """anomalib 2.x's PaDiM fit re-implemented in NumPy, keeping its buffers and its float32 arithmetic.

    Buffers alive at the peak, as in anomalib with torch: the stacked embeddings, the (C, C, P)
    covariance stack, the contiguous (P, C, C) copy that the batched inverse factors, and the
    (P, C, C) inverse: about three float32 stacks.
    """
    memory_bank = list(batches)  # PaDiM appends every training embedding
    embedding = np.concatenate(memory_bank)  # torch.vstack at fit time
    del memory_bank  # (favourable to anomalib: the list is dropped as soon as it is stacked)
    n, c, h, w = embedding.shape
    vectors = embedding.reshape(n, c, h * w)
    mean = vectors.mean(axis=0)
    covariance = np.zeros((c, c, h * w), dtype=np.float32)
    identity = np.eye(c, dtype=np.float32)
    for patch in range(h * w):
        x = vectors[:, :, patch].T  # (C, N), rowvar=False
        x = x - x.mean(axis=1, keepdims=True)
        covariance[:, :, patch] = x @ x.T / np.float32(n - 1) + np.float32(ANOMALIB_RIDGE) * identity
    covariance = covariance + np.float32(ANOMALIB_EPS) * identity[:, :, None]
    # torch.linalg.inv of the permuted stack: a contiguous (P, C, C) copy to factor, and the result;
    # float32 LU arithmetic, as torch (numpy.linalg.inv would compute in float64 and need a 2x stack).
    stacked = np.ascontiguousarray(covariance.transpose(2, 0, 1))
    inv_covariance = np.empty_like(stacked)
    for patch in range(h * w):
        lu, piv, info = lapack.sgetrf(stacked[patch], overwrite_a=1)
        inv_covariance[patch], info = lapack.sgetri(lu, piv)
    return mean, inv_covariance


def fit_float64_reference(emb: np.ndarray) -> np.ndarray:
    n, c = emb.shape[:2]
    x = emb.astype(np.float64).reshape(n, c, -1)
    ridge = (ANOMALIB_RIDGE + ANOMALIB_EPS) * np.eye(c)
    return np.stack([np.linalg.inv(np.cov(x[:, :, p], rowvar=False) + ridge) for p in range(x.shape[2])])


# --------------------------------------------------------------------------------------------- workers

#: The streamed contenders measured in fresh processes: name -> how the work is built (see ``stream_work``).
STREAMERS = {
    "anomstats_torch update/compute": "torch",
    "anomstats MultiVariateGaussian() partial_fit": "core",
    "anomstats dtype=float32 partial_fit": "core32",
    "anomstats low_memory=True float32 partial_fit": "ours",
    "anomalib (numpy)": "anomalib",
}
#: Issue 12's PaDiM-550 targets.
RSS_TARGET_BYTES, SECONDS_TARGET = 7e9, 45.0


def stream_work(kind: str, channels: int, height: int, width: int, images: int, batch: int,
                seed: int = 0) -> Any:
    """Factory for :func:`benchmarks._common.first_call`: the library imported and the model built (untimed);
    the work streams the generated batches and finalises, timing the library apart from the generation.

    ``kind``: ``"torch"`` (``anomstats_torch.MultiVariateGaussian`` update/compute), ``"core"`` (the core's
    default ``partial_fit``, then ``precision`` and ``log_det`` read), ``"core32"`` (the same with
    ``dtype=float32``: a float32 precision, as the torch adapter's, and the stream goes on), ``"ours"``
    (``low_memory=True, dtype=float32``) or ``"anomalib"`` (:func:`fit_anomalib`, all batches stacked).
    """
    if kind == "torch":
        import torch

        import anomstats_torch

        model = anomstats_torch.MultiVariateGaussian()
    elif kind in ("core", "core32", "ours"):
        import anomstats

        settings = {"core": {}, "core32": {"dtype": np.float32}, "ours": {"low_memory": True, "dtype": np.float32}}
        model = anomstats.MultiVariateGaussian(**settings[kind])
    elif kind != "anomalib":
        raise ValueError(f"unknown stream kind {kind!r}")

    def work() -> dict[str, Any]:
        batches = generate_batches(images, batch, channels, height, width, seed)
        generating = fitting = 0.0
        if kind == "anomalib":
            made = []
            for x in _timed_iter(batches):
                made.append(x)
            generating = _timed_iter.seconds
            start = time.perf_counter()
            mean, prec = fit_anomalib(iter(made))
            fitting = time.perf_counter() - start
        else:
            context = torch.inference_mode() if kind == "torch" else contextlib.nullcontext()
            with context:
                for x in _timed_iter(batches):
                    start = time.perf_counter()
                    if kind == "torch":
                        model.update(torch.from_numpy(x))
                    else:
                        model.partial_fit(x)
                    fitting += time.perf_counter() - start
                generating = _timed_iter.seconds
                start = time.perf_counter()
                if kind == "torch":
                    mean, prec = model.compute()
                    prec = prec.numpy()
                else:
                    prec = model.precision  # the first read finalises the fit
                    _ = model.log_det
                fitting += time.perf_counter() - start
        return {
            "fit_seconds": fitting,
            "generate_seconds": generating,
            "precision_shape": list(prec.shape),
            "precision_dtype": str(prec.dtype).replace("torch.", ""),
            "precision_finite": bool(np.isfinite(np.asarray(prec[:: max(1, prec.shape[0] // 16)])).all()),
        }

    return work


class _TimedIter:
    """Iterate a generator, adding the time spent producing its items to :attr:`seconds`."""

    seconds = 0.0

    def __call__(self, iterable: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        self.seconds = 0.0
        iterator = iter(iterable)
        while True:
            start = time.perf_counter()
            item = next(iterator, None)
            self.seconds += time.perf_counter() - start
            if item is None:
                return
            yield item


_timed_iter = _TimedIter()


def _physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def measure(library: str, channels: int, height: int, width: int, images: int, batch: int,
            blas_threads: int | None = None, timeout: float | None = None) -> dict[str, Any]:
    """One streamed fit in a fresh process: seconds (library only), total seconds, peak and baseline RSS.

    ``library``: a key of :data:`STREAMERS` (or its kind). A failed child (e.g. out of memory) gives
    ``{"seconds": None, "error": ...}``.
    """
    env = {}
    if blas_threads is not None:
        # Same limit for every library; on an oversubscribed machine threaded BLAS spends most of
        # its time waiting for its own threads on these small per-patch products.
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(blas_threads)
    kind = STREAMERS.get(library, library)
    out = first_call("benchmarks.bench_padim_memory:stream_work",
                     {"kind": kind, "channels": channels, "height": height, "width": width, "images": images,
                      "batch": batch},
                     timeout=timeout, env=env, memory_limit_bytes=_physical_memory_bytes(), raise_on_error=False)
    if out.get("seconds") is None:
        return {"seconds": None, "error": out["error"]}
    facts = out["result"]
    return {
        "seconds": facts["fit_seconds"],
        "total_seconds": out["seconds"],
        "generate_seconds": facts["generate_seconds"],
        "peak_rss_bytes": out["peak_rss_bytes"],
        "baseline_rss_bytes": out["baseline_rss_bytes"],
        **{k: facts[k] for k in ("precision_shape", "precision_dtype", "precision_finite")},
    }


# --------------------------------------------------------------------------------------------- suite


def _gb(x: float) -> str:
    return f"{x / 1e9:8.2f} GB"


def _state_estimate(channels: int, patches: int, images: int, batch: int) -> dict[str, float]:
    """Bytes each design holds at its peak, from the sizes of the arrays it stores."""
    tri = channels * (channels + 1) // 2
    stack32 = patches * channels * channels * 4
    return {
        # packed float64 moments + mean, the fold buffer (< 64 + B observations) and one batch
        "ours_bytes_estimate": patches * (tri + channels) * 8 + (64 + 2 * batch) * channels * patches * 4,
        "anomalib_bytes_estimate": images * channels * patches * 4 + 3 * stack32,
    }


def accuracy_rows(channels: int, height: int, width: int, images: int, batch: int) -> list[dict[str, Any]]:
    import anomstats._packed  # noqa: F401 - keep the package import out of the first timing

    emb = np.concatenate(list(generate_batches(images, batch, channels, height, width, seed=1)))
    reference = fit_float64_reference(emb)
    scale = np.abs(reference).max()
    case = f"accuracy C={channels} {height}x{width} N={images}"
    rows = []
    fits = {
        "anomstats (float64 acc)": lambda: fit_ours(iter(np.split(emb, images // batch))),
        "anomstats (float32 acc)": lambda: fit_ours_float32_accumulation(
            iter(np.split(emb, images // batch)), channels, height * width
        ),
        "anomalib (numpy)": lambda: fit_anomalib(iter(np.split(emb, images // batch))),
    }
    for library, fit in fits.items():
        start = time.perf_counter()
        _, prec = fit()
        seconds = time.perf_counter() - start
        rel = float(np.abs(prec.astype(np.float64) - reference).max() / scale)
        asym = float(np.abs(prec - prec.transpose(0, 2, 1)).max() / scale)
        rows.append({"suite": SUITE, "case": case, "library": library, "seconds": seconds,
                     "max_rel_error_vs_float64": rel, "max_asymmetry": asym})
    return rows


def stream_550_rows(size: dict[str, int], rates: dict[str, Any], blas_threads: int | None,
                    timeout: float | None) -> list[dict[str, Any]]:
    """Part (a): the torch adapter, the core's default, its float32 and its low-memory modes, each streamed in a
    fresh process (only the torch adapter and the core's default carry the issue's targets)."""
    c, h, w, n, b = size["channels"], size["height"], size["width"], size["images"], size["batch"]
    case = f"PaDiM-{c}: C={c} {h}x{w} N={n} B={b}, streamed"
    rows = []
    for order, library in enumerate(["anomstats_torch update/compute", "anomstats MultiVariateGaussian() partial_fit",
                                     "anomstats dtype=float32 partial_fit",
                                     "anomstats low_memory=True float32 partial_fit"]):
        print(f"  {library} ...", flush=True)
        result = measure(library, blas_threads=blas_threads, timeout=timeout, **size)
        out_dtype = result.get("precision_dtype", "float64")
        floor = _floor.fit_floor(n, c, h * w, "float32", rates, out_dtype=out_dtype)
        row = {"suite": "padim-550 stream", "case": case, "library": library, **result,
               "x_floor": _floor.x_floor(result["seconds"], floor), "floor_seconds": floor["seconds"],
               "blas_threads": blas_threads or "default", "size": c**2 * h * w * n}
        checks = [target("time", result["seconds"], "<=", SECONDS_TARGET, unit=" s")]
        if library.startswith("anomstats_torch"):
            checks.insert(0, target("peak RSS", None if result["seconds"] is None else result["peak_rss_bytes"] / 1e9,
                                    "<=", RSS_TARGET_BYTES / 1e9, unit=" GB"))
            label = f"PaDiM-{c} ({h}×{w}, {n} images in batches of {b}) streamed through the torch adapter, CPU"
        elif "MultiVariateGaussian()" in library:
            label = f"PaDiM-{c} ({h}×{w}, {n} images in batches of {b}) streamed through the core's default partial_fit"
        else:
            label = None
        if label:
            row.update(headline(label, checks, order=400 + order))
            row["headline_value"] = (f"error: {result['error']}" if result["seconds"] is None else
                                     f"{result['seconds']:.1f} s, {result['peak_rss_bytes'] / 1e9:.1f} GB peak RSS")
        else:
            row["targets"] = ""
        rows.append(row)
    return rows


def main(quick: bool = False, full: bool = True, blas_threads: int | None = None, stream: bool | None = None,
         timeout: float | None = 1200.0) -> dict[str, Any]:
    """Run the suite; write ``benchmarks/results/padim_memory.json``; return a summary dict.

    ``full`` (default True) runs part (a), PaDiM-550 streamed, in full runs; ``stream`` forces it on or off
    (at quick sizes it is off unless ``stream=True``).
    """
    if quick:
        stream_size = dict(channels=16, height=8, width=8, images=40, batch=10)
        shared = dict(channels=16, height=4, width=4, images=40, batch=10)
        accuracy = dict(channels=16, height=2, width=2, images=40, batch=10)
    else:
        stream_size = dict(channels=550, height=64, width=64, images=300, batch=20)
        shared = dict(channels=550, height=32, width=32, images=300, batch=20)
        accuracy = dict(channels=550, height=2, width=2, images=300, batch=20)
    run_stream = (full and not quick) if stream is None else stream
    rates = _floor.measure(quick)
    print(_floor.describe(rates), flush=True)
    rows: list[dict[str, Any]] = []
    if run_stream:
        print(f"\n(a) streamed fits, C={stream_size['channels']} {stream_size['height']}x{stream_size['width']}, "
              f"{stream_size['images']} images in batches of {stream_size['batch']} (fresh process each)", flush=True)
        rows += stream_550_rows(stream_size, rates, blas_threads, timeout)
    size = shared
    case = f"shared: C={size['channels']} {size['height']}x{size['width']} N={size['images']} B={size['batch']}"
    estimate = _state_estimate(size["channels"], size["height"] * size["width"], size["images"], size["batch"])
    found = {}
    for library in ["anomstats", "anomalib (numpy)"]:
        result = measure("ours" if library == "anomstats" else "anomalib", blas_threads=blas_threads,
                         timeout=timeout, **size)
        if result["seconds"] is None:
            raise RuntimeError(f"{library} at {case} failed: {result['error']}")
        found[library] = result
        rows.append({"suite": SUITE, "case": case, "library": library, "seconds": result["seconds"],
                     "total_seconds": result["total_seconds"], "peak_rss_bytes": result["peak_rss_bytes"],
                     "baseline_rss_bytes": result["baseline_rss_bytes"], "blas_threads": blas_threads or "default",
                     "estimate_bytes": estimate["ours_bytes_estimate" if library == "anomstats"
                                                else "anomalib_bytes_estimate"],
                     "size": size["channels"] ** 2 * size["height"] * size["width"] * size["images"]})
    ratio = found["anomstats"]["peak_rss_bytes"] / found["anomalib (numpy)"]["peak_rss_bytes"]
    for row in rows[-2:]:
        row["peak_ratio_ours_over_anomalib"] = ratio
        row["time_ratio_anomalib_over_ours"] = found["anomalib (numpy)"]["seconds"] / found["anomstats"]["seconds"]
    rows.extend(accuracy_rows(**accuracy))

    print(f"\nPaDiM fit from a stream: peak RSS (fresh process each) and accuracy{' [quick]' if quick else ''}")
    print(f"{'case':<44} {'library':<46} {'seconds':>8} {'x floor':>7} {'peak RSS':>11} {'estimate':>11} {'ratio':>6}")
    for row in rows:
        if "peak_rss_bytes" in row or "error" in row:
            ratio = row.get("peak_ratio_ours_over_anomalib")
            secs = "  failed" if row["seconds"] is None else f"{row['seconds']:8.2f}"
            xf = f"{row['x_floor']:7.1f}" if row.get("x_floor") else " " * 7
            rss = _gb(row["peak_rss_bytes"]) if "peak_rss_bytes" in row else " " * 11
            est = _gb(row["estimate_bytes"]) if "estimate_bytes" in row else " " * 11
            print(f"{row['case']:<44} {row['library']:<46} {secs} {xf} {rss} {est} "
                  f"{'' if ratio is None else f'{ratio:6.2f}'}")
            if "error" in row:
                print(f"    {row['error']}")
    print_targets(rows)
    for row in rows if not quick else []:  # at quick sizes the interpreter's baseline dominates
        if row.get("library") == "anomstats" and "peak_ratio_ours_over_anomalib" in row:
            ok = row["peak_ratio_ours_over_anomalib"] <= 0.5
            print(f"target: peak <= half of anomalib's at the shared size: {'met' if ok else 'NOT met'} "
                  f"({row['peak_ratio_ours_over_anomalib']:.2f})")
    print(f"\n{'case':<44} {'library':<46} {'seconds':>8} {'max rel err':>12} {'asymmetry':>10}")
    for row in rows:
        if "max_rel_error_vs_float64" in row:
            print(f"{row['case']:<44} {row['library']:<46} {row['seconds']:8.2f} "
                  f"{row['max_rel_error_vs_float64']:12.2e} {row['max_asymmetry']:10.2e}")
    rows.append(_floor.floor_row(rates))
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(rows, indent=2))
    return {"rows": rows}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--no-550", action="store_true",
                        help="skip part (a), PaDiM-550 streamed at 64x64 (minutes, up to ~15 GB)")
    parser.add_argument("--full", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    parser.add_argument("--blas-threads", type=int, default=None,
                        help="BLAS threads in the measured processes (default: the environment's)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = _parse(sys.argv[1:])
    main(quick=arguments.quick, full=not arguments.no_550, blas_threads=arguments.blas_threads)
