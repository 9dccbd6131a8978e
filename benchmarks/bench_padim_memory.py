"""PaDiM's largest fit from a stream: peak RSS of ``MultiVariateGaussian(low_memory=True)`` vs anomalib's.

Three parts, each measurement in a fresh subprocess so its peak RSS (``resource.getrusage``'s
``ru_maxrss``) belongs to that fit alone:

(a) ``--full``: wide_resnet50_2 at 256 px, C = 550, 64×64 = 4096 patches, 300 images generated on the
    fly in batches of 20 from a seeded RNG (float32), streamed through the public
    ``MultiVariateGaussian(low_memory=True, dtype=numpy.float32).partial_fit`` (the packed accumulator:
    float64 accumulation, float32 precision written in place), then ``.precision`` read. Target: peak RSS ≤ 16 GB. (Needs ~6 GB; not
    run by default because the machine is shared.)
(b) side by side at C = 550, 32×32 (1024 patches), same stream: ours vs a faithful NumPy
    re-implementation of anomalib's fit (all embeddings stacked; per-patch covariance in float32 +
    0.01·I into a (C, C, P) stack; + 1e-5·I (a second stack); a contiguous (P, C, C) copy and its
    float32 inverse). Target: ours ≤ half of anomalib's peak.
(c) accuracy, in process, at C = 550 and 2×2 patches (300 images): relative max error of the float32
    precision against a float64 one-shot ``numpy.cov`` + ridge + ``numpy.linalg.inv`` per patch, for
    ours with float64 and float32 accumulation and for the anomalib re-implementation.

Usage::

    python -m benchmarks.bench_padim_memory            # (b) and (c)
    python -m benchmarks.bench_padim_memory --full     # (a), (b) and (c)
    python -m benchmarks.bench_padim_memory --quick    # tiny sizes, seconds

The embeddings are ``|N(0, 1)|`` plus a shared low-rank component (ReLU-like, correlated channels);
the generator is the same in every process, so both fits see the same data.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from scipy.linalg import lapack

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


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement (runs in its own process): fit from generated batches, report peak RSS."""
    import anomstats._packed  # noqa: F401 - import cost belongs to the baseline

    baseline = _peak_rss_bytes()
    batches = generate_batches(args.images, args.batch, args.channels, args.height, args.width, args.seed)
    start = time.perf_counter()
    if args.worker == "anomalib":
        mean, prec = fit_anomalib(batches)
    else:
        mean, prec = fit_ours(batches)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_rss_bytes": _peak_rss_bytes(),
        "baseline_rss_bytes": baseline,
        "precision_shape": list(prec.shape),
        "precision_dtype": str(prec.dtype),
        "precision_finite": bool(np.isfinite(prec[:: max(1, prec.shape[0] // 16)]).all()),
    }


def measure(library: str, channels: int, height: int, width: int, images: int, batch: int,
            blas_threads: int | None = None, timeout: float | None = None) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "benchmarks.bench_padim_memory", "--worker", library,
        "--channels", str(channels), "--height", str(height), "--width", str(width),
        "--images", str(images), "--batch", str(batch),
    ]
    env = dict(os.environ)
    if blas_threads is not None:
        # Same limit for both libraries; on an oversubscribed machine threaded BLAS spends most of
        # its time waiting for its own threads on these small per-patch products.
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(blas_threads)
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{library} worker failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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


def main(quick: bool = False, full: bool = False, blas_threads: int | None = None) -> dict[str, Any]:
    """Run the suite; write ``benchmarks/results/padim_memory.json``; return a summary dict."""
    if quick:
        shared = dict(channels=16, height=4, width=4, images=40, batch=10)
        accuracy = dict(channels=16, height=2, width=2, images=40, batch=10)
    else:
        shared = dict(channels=550, height=32, width=32, images=300, batch=20)
        accuracy = dict(channels=550, height=2, width=2, images=300, batch=20)
    rows: list[dict[str, Any]] = []
    sizes = [("shared", shared)]
    if full and not quick:
        sizes.insert(0, ("full", dict(channels=550, height=64, width=64, images=300, batch=20)))
    for label, size in sizes:
        case = f"{label}: C={size['channels']} {size['height']}x{size['width']} N={size['images']} B={size['batch']}"
        estimate = _state_estimate(size["channels"], size["height"] * size["width"], size["images"], size["batch"])
        libraries = ["anomstats"] if label == "full" else ["anomstats", "anomalib (numpy)"]
        found = {}
        for library in libraries:
            result = measure("ours" if library == "anomstats" else "anomalib", blas_threads=blas_threads, **size)
            found[library] = result
            rows.append({"suite": SUITE, "case": case, "library": library, "seconds": result["seconds"],
                         "peak_rss_bytes": result["peak_rss_bytes"],
                         "baseline_rss_bytes": result["baseline_rss_bytes"],
                         "blas_threads": blas_threads or "default",
                         "estimate_bytes": estimate["ours_bytes_estimate" if library == "anomstats"
                                                    else "anomalib_bytes_estimate"],
                         "size": size["channels"] ** 2 * size["height"] * size["width"] * size["images"]})
        if "anomalib (numpy)" in found:
            ratio = found["anomstats"]["peak_rss_bytes"] / found["anomalib (numpy)"]["peak_rss_bytes"]
            for row in rows[-2:]:
                row["peak_ratio_ours_over_anomalib"] = ratio
                row["time_ratio_anomalib_over_ours"] = (
                    found["anomalib (numpy)"]["seconds"] / found["anomstats"]["seconds"]
                )
        else:
            rows[-1]["meets_16GB_target"] = found["anomstats"]["peak_rss_bytes"] <= 16e9
    rows.extend(accuracy_rows(**accuracy))

    print(f"\nPaDiM fit from a stream: peak RSS (fresh process each) and accuracy{' [quick]' if quick else ''}")
    print(f"{'case':<42} {'library':<26} {'seconds':>8} {'peak RSS':>11} {'estimate':>11} {'ratio':>6}")
    for row in rows:
        if "peak_rss_bytes" in row:
            ratio = row.get("peak_ratio_ours_over_anomalib")
            print(f"{row['case']:<42} {row['library']:<26} {row['seconds']:8.2f} {_gb(row['peak_rss_bytes'])} "
                  f"{_gb(row['estimate_bytes'])} {'' if ratio is None else f'{ratio:6.2f}'}")
    for row in rows if not quick else []:  # at quick sizes the interpreter's baseline dominates
        if "meets_16GB_target" in row:
            print(f"target: full-size peak <= 16 GB: {'met' if row['meets_16GB_target'] else 'NOT met'}")
        if row.get("library") == "anomstats" and "peak_ratio_ours_over_anomalib" in row:
            ok = row["peak_ratio_ours_over_anomalib"] <= 0.5
            print(f"target: peak <= half of anomalib's at the shared size: {'met' if ok else 'NOT met'} "
                  f"({row['peak_ratio_ours_over_anomalib']:.2f})")
    print(f"\n{'case':<42} {'library':<26} {'seconds':>8} {'max rel err':>12} {'asymmetry':>10}")
    for row in rows:
        if "max_rel_error_vs_float64" in row:
            print(f"{row['case']:<42} {row['library']:<26} {row['seconds']:8.2f} "
                  f"{row['max_rel_error_vs_float64']:12.2e} {row['max_asymmetry']:10.2e}")
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(rows, indent=2))
    return {"rows": rows}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--full", action="store_true", help="also run the full C=550, 64x64 fit (~6 GB)")
    parser.add_argument("--blas-threads", type=int, default=None,
                        help="BLAS threads in the measured processes (default: the environment's)")
    parser.add_argument("--worker", choices=["ours", "anomalib"], help=argparse.SUPPRESS)
    parser.add_argument("--channels", type=int, default=550, help=argparse.SUPPRESS)
    parser.add_argument("--height", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=300, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=20, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = _parse(sys.argv[1:])
    if arguments.worker:
        print(json.dumps(worker(arguments)))
    else:
        main(quick=arguments.quick, full=arguments.full, blas_threads=arguments.blas_threads)
