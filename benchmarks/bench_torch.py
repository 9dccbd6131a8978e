"""anomstats_torch vs anomalib's algorithms (faithful re-implementations), side by side in one process.

Suites (CPU always; CUDA too when present):

- ``kde_forward``: GaussianKDE densities, N = 40 000 training points, M = 256 queries, D = 16 (DFKDE's
  sizes), float32. Peer: anomalib's per-query-row loop on the same buffers. Target: >= 15x on CPU.
- ``mvg_fit``: MultiVariateGaussian fit of a (200, 100, 56, 56) float32 embedding (PaDiM, resnet18).
  Peer: anomalib's per-patch covariance loop and explicit batched inverse. Target: >= 5x on CPU.
- ``padim_score``: Mahalanobis map of 32 test embeddings (anomalib's scoring is already batched: this
  row is informative, no target).

On CUDA the rows also give the achieved throughput as a fraction of the device's measured matrix-product
rate (the "roofline" here: a large float32 matmul timed in the same process).

Run ``python -m benchmarks.bench_torch [--quick]``; writes ``benchmarks/results/torch.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

import torch

from anomstats_torch import GaussianKDE, MultiVariateGaussian
from benchmarks import _common
from benchmarks._common import print_header, targets_summary, write_rows
from tests.anomalib_oracle import AnomalibGaussianKDE, AnomalibMultiVariateGaussian, anomalib_padim_distance

SUITE = "torch"
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "torch.json"
OURS, PEER = "anomstats_torch", "anomalib (re-impl.)"

FULL = {"kde": (40_000, 256, 16), "mvg": (200, 100, 56, 56), "score_batch": 32}
QUICK = {"kde": (2_000, 32, 4), "mvg": (20, 8, 6, 6), "score_batch": 4}
TARGETS = {"kde_forward": 15.0, "mvg_fit": 5.0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    """Best wall time over ``repeats`` runs after one warm-up run; returns (seconds, last result).

    Each timed run waits for the device to finish (CUDA kernels are asynchronous).
    """
    seconds, _, result = _common.best_time(fn, repeats, sync=lambda: _sync(device))
    return seconds, result


def matmul_rate(device: torch.device, size: int = 4096) -> float:
    """Measured float32 matrix-product rate (FLOP/s) of the device: the roofline for the CUDA rows."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    seconds, _ = best_time(lambda: a @ b, device, 3)
    return 2.0 * size**3 / seconds


def _rows(suite, case, device, ours_s, peer_s, diff, flops=None, roofline=None) -> list[dict[str, Any]]:
    ratio = peer_s / ours_s
    target = TARGETS.get(suite) if device.type == "cpu" else None
    ours: dict[str, Any] = {
        "suite": suite, "case": case, "library": OURS, "device": device.type, "seconds": ours_s,
        "ratio": ratio, "max_rel_diff": diff, "threads": torch.get_num_threads(),
    }
    if target is not None:
        ours["target"] = target
        ours["met"] = ratio >= target
    if flops is not None and roofline:
        ours["gflops"] = flops / ours_s / 1e9
        ours["roofline_fraction"] = flops / ours_s / roofline
    peer = {"suite": suite, "case": case, "library": PEER, "device": device.type, "seconds": peer_s,
            "threads": torch.get_num_threads()}
    return [ours, peer]


def bench_kde(device: torch.device, sizes, repeats: int, roofline: float | None) -> list[dict[str, Any]]:
    n, m, d = sizes
    g = torch.Generator().manual_seed(0)
    train = torch.randn(n, d, generator=g)
    train = (train - train.mean(dim=0)).to(device)  # centred: the data anomalib handles correctly (PCA output)
    queries = (torch.randn(m, d, generator=g) * 1.2).to(device)
    ours = GaussianKDE(train)
    peer = AnomalibGaussianKDE().to(device)
    peer.load_state_dict(ours.state_dict())  # the same buffers: only the evaluation algorithm differs
    with torch.inference_mode():
        ours_s, got = best_time(lambda: ours(queries), device, repeats)
        peer_s, expected = best_time(lambda: peer(queries), device, max(1, repeats // 2))
    diff = ((got - expected).abs() / expected.abs()).max().item()
    flops = 2.0 * m * n * (d + 2) + 2.0 * m * n  # augmented product + exp and sum
    return _rows("kde_forward", f"N={n} M={m} D={d} float32", device, ours_s, peer_s, diff, flops, roofline)


def bench_mvg(device: torch.device, sizes, batch_score: int, repeats: int, roofline: float | None) -> list[dict[str, Any]]:
    b, c, h, w = sizes
    g = torch.Generator().manual_seed(1)
    embedding = torch.randn(b, c, h, w, generator=g).to(device)
    ours = MultiVariateGaussian()
    peer = AnomalibMultiVariateGaussian()
    with torch.inference_mode():
        ours_s, (mean, inv) = best_time(lambda: ours.fit(embedding), device, repeats)
        peer_s, (ref_mean, ref_inv) = best_time(lambda: peer.fit(embedding), device, 1)
    diff = ((inv - ref_inv).abs().max() / ref_inv.abs().max()).item()
    p = h * w
    flops = p * (2.0 * c * c * b + c**3 / 3 + c**3 / 3 + 2.0 * c**3)  # covariance, Cholesky, L⁻¹, L⁻ᵀL⁻¹
    rows = _rows("mvg_fit", f"B={b} C={c} H×W={h}×{w} float32", device, ours_s, peer_s, diff, flops, roofline)

    test = embedding[:batch_score] + 0.1
    with torch.inference_mode():
        ours_s, got = best_time(lambda: ours.mahalanobis(test), device, repeats)
        peer_s, expected = best_time(lambda: anomalib_padim_distance(test, mean, inv), device, repeats)
    diff = ((got - expected[:, 0]).abs() / expected[:, 0].abs()).max().item()
    flops = 2.0 * p * batch_score * c * c
    rows += _rows("padim_score", f"B={batch_score} C={c} H×W={h}×{w} float32", device, ours_s, peer_s, diff, flops, roofline)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'suite':<12} {'case':<30} {'device':<6} {'thr':>3} {'ours s':>9} {'anomalib s':>11} {'ratio':>8} {'target':>7} {'met':>5} {'max rel diff':>13} {'roofline':>9}"
    print_header(header)
    for ours in (r for r in rows if r["library"] == OURS):
        peer = next(
            r for r in rows
            if r["library"] == PEER and all(r[k] == ours[k] for k in ("suite", "device", "threads"))
        )
        target = f"{ours['target']:.0f}x" if "target" in ours else "-"
        met = str(ours["met"]) if "met" in ours else "-"
        roof = f"{ours['roofline_fraction']:.1%}" if "roofline_fraction" in ours else "-"
        print(
            f"{ours['suite']:<12} {ours['case']:<30} {ours['device']:<6} {ours['threads']:>3} {ours['seconds']:>9.4f} {peer['seconds']:>11.4f} "
            f"{ours['ratio']:>7.1f}x {target:>7} {met:>5} {ours['max_rel_diff']:>13.2e} {roof:>9}"
        )


def main(quick: bool = False, threads: list[int] | None = None) -> dict[str, Any]:
    """Run the suites, print the table, write ``benchmarks/results/torch.json``; return a summary.

    ``threads``: the torch intra-op thread counts to run the CPU cases with (default: torch's default
    and, for full runs, 1 as well: on a shared machine single-threaded figures are the least noisy).
    """
    sizes = QUICK if quick else FULL
    repeats = 2 if quick else 3
    default_threads = torch.get_num_threads()
    if threads is None:
        threads = [default_threads] if quick or default_threads == 1 else [default_threads, 1]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows: list[dict[str, Any]] = []
    try:
        for device in devices:
            roofline = matmul_rate(device, 1024 if quick else 4096) if device.type == "cuda" else None
            for count in threads if device.type == "cpu" else [default_threads]:
                torch.set_num_threads(count)  # this benchmark only; restored below
                rows += bench_kde(device, sizes["kde"], repeats, roofline)
                rows += bench_mvg(device, sizes["mvg"], sizes["score_batch"], repeats, roofline)
            if roofline:
                print(f"{device}: measured float32 matmul rate {roofline / 1e12:.1f} TFLOP/s (roofline)")
    finally:
        torch.set_num_threads(default_threads)
    if quick:  # the targets are for the full sizes only
        for row in rows:
            row.pop("target", None)
            row.pop("met", None)
    print(f"anomstats_torch vs anomalib's algorithms (torch {torch.__version__}; best of {repeats}, "
          "anomalib's fit timed once)")
    print_table(rows)
    write_rows(RESULTS_PATH, rows)
    return targets_summary(SUITE, rows, (r for r in rows if r["library"] == OURS))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds (smoke test)")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch intra-op thread counts for the CPU cases (default: torch's default and 1)")
    args = parser.parse_args()
    main(quick=args.quick, threads=args.threads)
