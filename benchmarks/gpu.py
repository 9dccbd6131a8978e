"""anomstats_torch on one CUDA device against anomalib 2.7.0's algorithms, as fractions of the device's floor.

Issue 12, point 3. One process, under 5 minutes on one H200 (``--budget-s`` bounds the optional rows):

``python -m benchmarks.gpu --json gpu.json`` (full sizes, needs CUDA) or ``python -m benchmarks.gpu --quick``
(tiny sizes, seconds, on the CPU when there is no CUDA: the smoke test ``tests/test_gpu_script.py`` runs it).

What it measures, in this order, all float32 unless a row says otherwise:

1. **The device's floor**, in the same run: float32 GEMM (IEEE, TF32 off), TF32 GEMM, bfloat16 GEMM and
   float64 GEMM rates (square products of random data), and HBM bandwidth (a device-to-device copy, bytes read
   plus bytes written, as STREAM's Copy counts them).
2. ``kde_forward``: :class:`anomstats_torch.GaussianKDE` densities at N = 10⁶ training points, M = 4096
   queries, D = 16 (centred data, so that anomalib's densities are right too). Peer: anomalib's forward (one
   Python iteration per query row) on its own fit, timed on the first 128 rows and scaled to M; run on all M
   rows too when that estimate is under ``PEER_FULL_LIMIT_S`` (``peer_rows_timed`` says which rows the
   row's time is from, ``estimated_from_subset_s`` gives the scaled estimate next to the full run's).
3. ``padim_fit``: PaDiM-550 at 256 px: C = 550, 64×64 patches (P = 4096), 300 images streamed in batches
   of 20 through :meth:`~anomstats_torch.MultiVariateGaussian.update` and one
   :meth:`~anomstats_torch.MultiVariateGaussian.compute`; peak CUDA memory above what was allocated before
   (the 300 embeddings); accuracy of the precisions on a subset of patches against a float64 fit. Peer:
   anomalib's ``fit`` on all 300 images at once (skipped, with the reason, when it would not fit in memory or
   in the time left; its time is then estimated from a run on 64 patches).
4. ``padim_score``: the Mahalanobis map of 32 test images with the fitted buffers, ours
   (:meth:`~anomstats_torch.MultiVariateGaussian.mahalanobis`) against PaDiM's formula (one batched product,
   ``tests.anomalib_oracle.anomalib_padim_distance``) on the same buffers.

Each workload's **floor** is ``max(flops / float32 GEMM rate, compulsory bytes / copy bandwidth)`` (a
roofline; see :func:`floor_of`), the same for every contender of the workload; rows give ``times_floor``
(seconds over floor seconds), the achieved TFLOP/s as a fraction of the GEMM rate of the row's matmul precision
(``gemm_fraction``) and the compulsory bytes per second as a fraction of the copy bandwidth
(``bandwidth_fraction``). The KDE's floor counts its GEMM only: its ``M·N`` exponentials run on the special
function units besides the matrix units, and their rate cannot be measured without a custom kernel.

Variants besides float32 (each with its error against the float64 reference): TF32 matmuls (what
``torch.set_float32_matmul_precision("high")``, which Lightning users set, does to our modules), bfloat16
GEMMs (a formula of this script, not an option of the library: bf16 operands and output, float32 elsewhere;
for the fit, the update step's moments only, against their own floor), a module cast to bfloat16 for scoring
(``compact_state_dict("bfloat16")``: half the bytes read), float32 streamed moments, and a GPU-sized
``chunk_bytes`` (1 GiB instead of the 64 MiB default). Errors: the largest relative error of densities or
distances, elementwise; for precisions, the worst patch's ``max |P - P_ref| / max |P_ref|``.

Timing: CUDA events around each call after ``torch.cuda.synchronize()`` (on the CPU, ``time.perf_counter``);
the first call of each contender in this process (after the floor measurements initialised CUDA and cuBLAS)
is reported as ``first_s`` and serves as the warm-up; ``best_s`` is the best of up to ``--repeats`` further
calls (two for the fits, whose calls are long), fewer where a contender's calls exceed its time cap (``runs``
says how many). Peak memory is ``torch.cuda.max_memory_allocated`` during the first call, above what was
allocated before it.

Anomalib's modules come from :func:`benchmarks._anomalib_peer.load_anomalib_stats` (anomalib 2.7.0's own
files, from the wheel in ``.whl/``: carry that folder to a lent machine) when that module is present, else from
the re-implementations in :mod:`tests.anomalib_oracle`; the JSON's ``peer`` and ``peer_source`` say which.
Needs only torch, NumPy and this repository (and SciPy, which :mod:`anomstats` imports); nothing is
downloaded. The tables are printed and the JSON is written after each workload, so a run cut short keeps
what it measured; a workload that raises is recorded under ``errors`` (with its traceback) and the next one
still runs. Optional rows (the variants, anomalib's full runs) are skipped, and listed under ``skipped``, once
``--budget-s`` seconds have passed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from anomstats_torch import GaussianKDE, MultiVariateGaussian
from benchmarks._floor import fit_flops
from tests.anomalib_oracle import anomalib_padim_distance as padim_distance  # PaDiM's formula, its one copy

#: Workload sizes. ``kde``: (N, M, D); ``fit``: images, channels, side, batch; ``score_batch``: test images.
FULL: dict[str, Any] = {
    "gemm_n": 8192, "copy_bytes": 2 * 2**30,
    "kde": (1_000_000, 4096, 16), "kde_ref_rows": 256, "kde_peer_rows": 128,
    "fit": (300, 550, 64, 20), "fit_ref_patches": 64, "score_batch": 32,
}
QUICK: dict[str, Any] = {
    "gemm_n": 256, "copy_bytes": 8 * 2**20,
    "kde": (4000, 64, 16), "kde_ref_rows": 64, "kde_peer_rows": 16,
    "fit": (24, 16, 10, 8), "fit_ref_patches": 8, "score_batch": 4,
}

#: A GPU-sized memory budget for the chunked kernels (the default, 64 MiB, is sized for CPU caches).
BIG_CHUNK = 2**30

#: The peer's full run is made only when its estimate (from a subset) is below this many seconds.
PEER_FULL_LIMIT_S = 30.0

OURS = "anomstats_torch"
#: Where a full run writes its report unless ``--json`` says otherwise.
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "gpu.json"
#: The peer rows' name when anomalib's own files are not available (as benchmarks._anomalib_peer names it).
FALLBACK_PEER = "anomalib (re-impl.)"


# --------------------------------------------------------------------------- peers
def load_peers() -> tuple[type, type, str, str]:
    """anomalib 2.7.0's ``GaussianKDE`` and ``MultiVariateGaussian`` classes, where they came from, and the
    rows' name for them (``anomalib 2.7.0``, or ``anomalib (re-impl.)`` for the re-implementations).

    anomalib's own files through :func:`benchmarks._anomalib_peer.load_anomalib_stats` when that module
    exists (it falls back by itself); otherwise, or if it fails, the re-implementations of
    :mod:`tests.anomalib_oracle`, with a note saying why.
    """
    try:
        from benchmarks import _anomalib_peer
    except ModuleNotFoundError as exc:
        if exc.name not in ("benchmarks._anomalib_peer", "benchmarks"):
            raise
        reason = "benchmarks/_anomalib_peer.py is not present"
    else:
        try:
            kde_cls, mvg_cls, note = _anomalib_peer.load_anomalib_stats()
            return kde_cls, mvg_cls, str(note), _anomalib_peer.peer_name(note)
        except Exception as exc:  # the loader falls back itself; this is the last resort
            reason = f"load_anomalib_stats() failed: {type(exc).__name__}: {exc}"
    from tests.anomalib_oracle import AnomalibGaussianKDE, AnomalibMultiVariateGaussian

    return (AnomalibGaussianKDE, AnomalibMultiVariateGaussian,
            f"re-implementation of anomalib 2.7.0's algorithms (tests/anomalib_oracle.py); {reason}", FALLBACK_PEER)


# --------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_seconds(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds of one call of ``fn`` (CUDA events on a CUDA device, ``perf_counter`` otherwise) and its result."""
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, result
    start_s = time.perf_counter()
    result = fn()
    return time.perf_counter() - start_s, result


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, cap_s: float,
          first: tuple[float, Any] | None = None) -> dict[str, Any]:
    """First call (the warm-up) and best of up to ``repeats`` more, while their total stays under ``cap_s``.

    Returns ``first_s``, ``best_s`` (the first call's time when no further call was made), ``runs`` (further
    calls made) and ``result`` (the last call's). ``first``: (seconds, result) of a first call made by the
    caller (e.g. under :func:`peak_memory`). The previous result is dropped before each call, so that it does
    not count in the next call's memory.
    """
    first_s, result = first if first is not None else call_seconds(fn, device)
    best, runs, spent = math.inf, 0, 0.0
    while runs < repeats and first_s <= cap_s and (runs == 0 or spent + best <= cap_s):
        result = None
        seconds, result = call_seconds(fn, device)
        best, runs, spent = min(best, seconds), runs + 1, spent + seconds
    return {"first_s": first_s, "best_s": best if runs else first_s, "runs": runs, "result": result}


@contextlib.contextmanager
def matmul_precision(level: str) -> Iterator[None]:
    """``torch.set_float32_matmul_precision(level)`` for the block ("highest": IEEE float32; "high": TF32)."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(level)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[Any, dict[str, int | None]]:
    """Run ``fn`` once; its peak device memory above what was allocated before (None on the CPU)."""
    if device.type != "cuda":
        return fn(), {"peak_bytes": None, "baseline_bytes": None}
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    synchronize(device)
    return result, {"peak_bytes": torch.cuda.max_memory_allocated(device) - base, "baseline_bytes": base}


# --------------------------------------------------------------------------- the device's floor
def measure_floor(device: torch.device, gemm_n: int, copy_bytes: int, repeats: int = 5) -> dict[str, Any]:
    """GEMM rates (FLOP/s) in float32, TF32, bfloat16 and float64, and copy bandwidth (bytes/s), measured here.

    Square ``gemm_n`` products of random normal data (products of zeros run faster on some GPUs), best of
    ``repeats`` after a warm-up; the copy moves ``copy_bytes`` (counted twice: read and written).
    """
    g = torch.Generator(device=device).manual_seed(0)
    rates: dict[str, Any] = {}
    for name, dtype, level in (("fp32", torch.float32, "highest"), ("tf32", torch.float32, "high"),
                               ("bf16", torch.bfloat16, "highest"), ("fp64", torch.float64, "highest")):
        a = torch.randn(gemm_n, gemm_n, device=device, generator=g).to(dtype)
        b = torch.randn(gemm_n, gemm_n, device=device, generator=g).to(dtype)
        out = torch.empty_like(a)
        with matmul_precision(level):
            t = timed(lambda: torch.mm(a, b, out=out), device, repeats, cap_s=10.0)
        rates[f"{name}_flops"] = 2.0 * gemm_n**3 / t["best_s"]
        del a, b, out
    src = torch.ones(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), device, repeats, cap_s=10.0)
    rates["copy_bytes_per_s"] = 2.0 * src.nbytes / t["best_s"]
    rates.update(gemm_n=gemm_n, copy_bytes=copy_bytes)
    del src, dst
    free(device)
    return rates


def floor_of(flops: float, nbytes: float, floor: dict[str, Any]) -> dict[str, Any]:
    """A workload's floor: ``max(flops / float32 GEMM rate, bytes / copy bandwidth)`` and which bound it."""
    flop_s = flops / floor["fp32_flops"]
    byte_s = nbytes / floor["copy_bytes_per_s"]
    return {"flops": flops, "bytes": nbytes, "flop_s": flop_s, "byte_s": byte_s, "floor_s": max(flop_s, byte_s),
            "bound": "compute" if flop_s >= byte_s else "memory"}


def make_row(contender: str, variant: str, matmul: str, timing: dict[str, Any], work: dict[str, Any],
             floor: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """One result row: times, fractions of the floor and of the rates of the row's matmul precision."""
    best = timing["best_s"]
    row = {
        "contender": contender, "variant": variant, "matmul": matmul,
        "first_s": timing["first_s"], "best_s": best, "runs": timing["runs"],
        "floor_s": work["floor_s"], "times_floor": best / work["floor_s"],
        "tflops": work["flops"] / best / 1e12,
        "gemm_fraction": work["flops"] / best / floor[f"{matmul}_flops"],
        "gbps": work["bytes"] / best / 1e9,
        "bandwidth_fraction": work["bytes"] / best / floor["copy_bytes_per_s"],
    }
    row.update(extra)
    return row


def on_device(result: torch.Tensor, device: torch.device) -> None:
    """Refuse a result computed elsewhere (e.g. a module whose buffers stayed on the CPU)."""
    if result.device.type != device.type:
        raise RuntimeError(f"a contender computed on {result.device}, not on {device}: its row would be wrong")


def max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest elementwise ``|got - ref| / |ref|`` (float64)."""
    got, ref = got.double().flatten(), ref.double().flatten()
    return float(((got - ref).abs() / ref.abs()).max())


def max_patch_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Worst patch's ``max |got - ref| / max |ref|`` for (k, C, C) stacks (float64)."""
    got, ref = got.double(), ref.double()
    return float(((got - ref).abs().amax(dim=(-2, -1)) / ref.abs().amax(dim=(-2, -1))).max())


class Budget:
    """The run's time budget: optional rows are skipped (and listed) once it is spent."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start, self.skipped = seconds, time.perf_counter(), []

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def allows(self, what: str, needs_s: float = 0.0) -> bool:
        if self.left() > needs_s:
            return True
        self.skipped.append(f"{what}: skipped, {max(self.left(), 0.0):.0f} s of the budget left")
        return False


# --------------------------------------------------------------------------- (a) KDE forward
def kde_reference_log_density(train: torch.Tensor, queries: torch.Tensor, block: int = 1 << 16) -> torch.Tensor:
    """Float64 log-densities with Scott's bandwidth, by direct differences in whitened coordinates.

    Independent of both contenders: covariance, Cholesky factor of ``H = factor² Σ`` and the whitening
    ``y = H^(-1/2) x`` as ``solve_triangular``, then a streamed log-sum-exp of ``-|y_q - y_i|² / 2``.
    """
    x = train.double()
    n, d = x.shape
    factor = n ** (-1.0 / (d + 4))
    centre = x.mean(dim=0)
    xc = x - centre
    chol = torch.linalg.cholesky((xc.mT @ xc) / (n - 1) * factor**2)  # H = C Cᵀ

    def whiten(v: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve_triangular(chol, (v - centre).mT, upper=False).mT

    yq = whiten(queries.double())
    log_norm = -0.5 * d * math.log(2 * math.pi) - torch.log(chol.diagonal()).sum() - math.log(n)
    parts = []
    for t0 in range(0, n, block):
        yt = whiten(x[t0 : t0 + block])
        parts.append(torch.logsumexp(-0.5 * (yq[:, None, :] - yt[None, :, :]).square().sum(-1), dim=1))
    return torch.logsumexp(torch.stack(parts, dim=1), dim=1) + log_norm


def kde_bf16(ours: GaussianKDE, queries: torch.Tensor, rows: int) -> torch.Tensor:
    """Our KDE's algorithm with its GEMM in bfloat16 (operands and output), the exp and sums in float32.

    A formula of this script (the library offers no bfloat16 GEMM: this row shows why). Uses the module's
    whitened training data centred at its centroid, as the module does with loaded buffers.
    """
    train = ours.dataset.float()
    shift = train.mean(dim=0)
    train = train - shift
    q = queries.float() @ ours.bw_transform.float() - shift
    lhs = torch.cat([q, -0.5 * q.square().sum(1, keepdim=True), torch.ones_like(q[:, :1])], 1).bfloat16()
    rhs = torch.cat([train, torch.ones_like(train[:, :1]), -0.5 * train.square().sum(1, keepdim=True)], 1).bfloat16()
    scale = float(ours.norm) / train.shape[0]
    out = torch.empty(q.shape[0], device=q.device)
    for q0 in range(0, q.shape[0], rows):
        exponent = lhs[q0 : q0 + rows] @ rhs.mT  # bfloat16 GEMM
        out[q0 : q0 + rows] = exponent.float().clamp_(min=-103.0).exp_().sum(dim=1) * scale
    return out


def bench_kde(device, sizes, floor, repeats, budget, peer_kde_cls, peer: str) -> dict[str, Any]:
    n, m, d = sizes["kde"]
    g = torch.Generator(device=device).manual_seed(1)
    mixing = torch.randn(d, d, device=device, generator=g) * 0.3 + torch.eye(d, device=device)
    train = torch.randn(n, d, device=device, generator=g) @ mixing
    train -= train.mean(dim=0)  # centred (as PCA output): the data anomalib's KDE handles correctly
    queries = torch.randn(m, d, device=device, generator=g) @ mixing * 1.1
    # The distance products' 2·M·N·D flops (as benchmarks._floor.kde_floor counts them); ours runs 2·M·N·(D+2).
    work = floor_of(2.0 * m * n * d, 4.0 * (n * d + m * d + m), floor)
    work["exponentials"] = float(m) * n
    cap = 20.0
    rows: list[dict[str, Any]] = []
    k = min(sizes["kde_ref_rows"], m)
    ref = torch.exp(kde_reference_log_density(train, queries[:k]))

    def errors(out: torch.Tensor) -> dict[str, Any]:
        on_device(out, device)
        got = out[:k]
        return {"max_rel_err": max_rel_err(got, ref), "zeros": int((got == 0).sum()), "err_rows": k}

    with torch.inference_mode(), matmul_precision("highest"):
        ours = GaussianKDE(train)
        t = timed(lambda: ours(queries), device, repeats, cap)
        rows.append(make_row(OURS, "float32", "fp32", t, work, floor, **errors(t.pop("result"))))
        if budget.allows("kde_forward chunk_bytes=1 GiB"):
            big = GaussianKDE(train, chunk_bytes=BIG_CHUNK)
            t = timed(lambda: big(queries), device, repeats, cap)
            rows.append(make_row(OURS, "float32, chunk_bytes=1 GiB", "fp32", t, work, floor, **errors(t.pop("result"))))
            del big
        if budget.allows("kde_forward TF32"):
            with matmul_precision("high"):
                t = timed(lambda: ours(queries), device, repeats, cap)
            rows.append(make_row(OURS, "TF32 matmuls", "tf32", t, work, floor, **errors(t.pop("result"))))
        if budget.allows("kde_forward bfloat16 GEMM"):
            block = max(1, min(m, (2**30) // (6 * n)))
            t = timed(lambda: kde_bf16(ours, queries, block), device, repeats, cap)
            rows.append(make_row("script formula", "bfloat16 GEMM (not offered: accuracy)", "bf16", t, work, floor,
                                 **errors(t.pop("result"))))
        free(device)

        theirs = peer_kde_cls()
        theirs.fit(train.clone())  # anomalib centres its argument in place
        s = min(sizes["kde_peer_rows"], m)
        sub = timed(lambda: theirs(queries[:s]), device, max(1, repeats // 2), cap)
        estimate = sub["best_s"] * m / s
        if s == m:
            rows.append(make_row(peer, "float32, per-row loop", "fp32", sub, work, floor, peer_rows_timed=m,
                                 **errors(sub.pop("result"))))
        elif estimate < PEER_FULL_LIMIT_S and budget.allows("kde_forward peer, all rows", 2 * estimate):
            sub.pop("result")
            t = timed(lambda: theirs(queries), device, 1, cap)
            rows.append(make_row(peer, "float32, per-row loop", "fp32", t, work, floor, peer_rows_timed=m,
                                 estimated_from_subset_s=estimate,
                                 note=f"first call after a warm-up on {s} rows; {estimate:.3f} s estimated from "
                                      f"{s} rows", **errors(t.pop("result"))))
        else:
            result = sub.pop("result")
            j = min(s, k)
            scaled = {"first_s": sub["first_s"] * m / s, "best_s": estimate, "runs": sub["runs"]}
            rows.append(make_row(peer, f"float32, per-row loop, {s} rows timed, x{m / s:g}", "fp32", scaled, work,
                                 floor, peer_rows_timed=s, note=f"timed on the first {s} query rows, scaled by {m / s:g}",
                                 max_rel_err=max_rel_err(result[:j], ref[:j]), zeros=int((result == 0).sum()),
                                 err_rows=j))
        del theirs
    free(device)
    return {"sizes": {"N": n, "M": m, "D": d}, "work": work, "rows": rows,
            "reference": f"float64 direct differences, first {k} queries"}


# --------------------------------------------------------------------------- (b) PaDiM fit, (c) scoring
def padim_embedding(images: int, channels: int, side: int, device: torch.device, seed: int,
                    batch: int = 20) -> torch.Tensor:
    """Synthetic float32 (images, C, side, side) embedding: correlated channels plus a shared low-rank part,
    offset by 1 (PaDiM's features are ReLU outputs, not centred). Generated batch by batch on the device."""
    g = torch.Generator(device=device).manual_seed(seed)
    mixing = torch.randn(channels, channels, device=device, generator=g) * (0.5 / math.sqrt(channels))
    mixing += torch.eye(channels, device=device)
    shared = torch.randn(4, channels, device=device, generator=g) * 0.5
    out = torch.empty(images, channels, side, side, device=device)
    for i in range(0, images, batch):
        b = min(batch, images - i)
        z = torch.randn(b, side * side, channels, device=device, generator=g) @ mixing
        z += torch.randn(b, side * side, 4, device=device, generator=g) @ shared
        out[i : i + b] = z.add_(1.0).mT.reshape(b, channels, side, side)
    return out


def reference_fit(embedding: torch.Tensor, patches: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 mean (C, k) and precision (k, C, C) of the chosen patches (two-pass covariance, Cholesky)."""
    x = embedding.flatten(2)[:, :, patches].double()  # (B, C, k)
    mean = x.mean(dim=0)
    centred = (x - mean).permute(2, 0, 1)  # (k, B, C)
    cov = centred.mT @ centred / (x.shape[0] - 1)
    cov.diagonal(dim1=-2, dim2=-1).add_(ridge)
    return mean, torch.cholesky_inverse(torch.linalg.cholesky(cov))


def reference_distance(test: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor,
                       patches: torch.Tensor) -> torch.Tensor:
    """Float64 ``sqrt(δᵀ P δ)`` of the chosen patches → (B, k)."""
    delta = (test.flatten(2)[:, :, patches].double() - mean.double()).permute(2, 0, 1)  # (k, B, C)
    return ((delta @ precision.double()) * delta).sum(-1).clamp(min=0).sqrt().mT


def stream_fit(embedding: torch.Tensor, batch: int, **options: Any) -> tuple[MultiVariateGaussian, dict[str, float]]:
    """A fresh module fitted by ``update`` over batches then ``compute``; seconds of both phases (synchronised)."""
    module = MultiVariateGaussian(**options)
    device = embedding.device
    synchronize(device)
    start = time.perf_counter()
    for i in range(0, embedding.shape[0], batch):
        module.update(embedding[i : i + batch])
    synchronize(device)
    middle = time.perf_counter()
    module.compute()
    synchronize(device)
    return module, {"update_s": middle - start, "compute_s": time.perf_counter() - middle}


def bf16_moments(embedding: torch.Tensor, batch: int, chunk: int) -> torch.Tensor:
    """Streamed sums of centred products (P, C, C) with bfloat16 GEMMs (operands and output), float32 sums.

    The update step's products as a formula of this script (no option of the library); Chan's merge as ours.
    """
    images, channels = embedding.shape[:2]
    x = embedding.flatten(2)
    patches = x.shape[2]
    m2 = torch.zeros(patches, channels, channels, device=x.device)
    mean = torch.zeros(channels, patches, device=x.device)
    count = 0
    for i in range(0, images, batch):
        part = x[i : i + batch]
        b = part.shape[0]
        batch_mean = part.mean(dim=0)
        for p0 in range(0, patches, chunk):
            c = (part[:, :, p0 : p0 + chunk] - batch_mean[:, p0 : p0 + chunk]).permute(2, 0, 1).bfloat16()
            m2[p0 : p0 + chunk] += (c.mT @ c).float()
        delta = batch_mean - mean
        if count:
            step = delta.mT  # (P, C)
            m2.baddbmm_(step.unsqueeze(2), step.unsqueeze(1), alpha=count * b / (count + b))
        mean += delta * (b / (count + b))
        count += b
    return m2


def bench_padim(device, sizes, floor, repeats, budget, peer_mvg_cls, peer: str,
                out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """(b) and (c): ``out`` gets ``padim_fit`` as soon as the fits are done (kept if scoring fails), then
    ``padim_score``; returns ``out``."""
    images, channels, side, batch = sizes["fit"]
    patches = side * side
    embedding = padim_embedding(images, channels, side, device, seed=2, batch=batch)
    test = padim_embedding(sizes["score_batch"], channels, side, device, seed=3, batch=batch)
    test[:, :, : side // 4, : side // 4] += 0.5  # an "anomalous" corner
    ridge = MultiVariateGaussian().ridge
    subset = torch.linspace(0, patches - 1, min(sizes["fit_ref_patches"], patches), device=device).round().long()
    ref_mean, ref_precision = reference_fit(embedding, subset, ridge)
    ref_distance = reference_distance(test, ref_mean, ref_precision, subset)
    fit_work = floor_of(
        fit_flops(images, channels, patches),  # syrk (B·C²) + potrf (C³/3) + potri (2C³/3) per patch
        4.0 * (images * channels * patches + patches * channels**2 + channels * patches),  # read x, write P and mean
        floor,
    )
    b_test = test.shape[0]
    score_work = floor_of(
        2.0 * patches * b_test * channels**2,
        4.0 * (patches * channels**2 + (b_test + 1) * channels * patches + b_test * patches),
        floor,
    )
    cap = 30.0
    fit_repeats = min(repeats, 2)  # a stream is long and steady: first call plus best of two
    fit_rows: list[dict[str, Any]] = []
    kept: dict[str, MultiVariateGaussian] = {}

    def fit_errors(precision: torch.Tensor, *, of_subset: bool = False) -> dict[str, Any]:
        got = precision if of_subset else precision[subset]
        return {"max_rel_err": max_patch_rel_err(got, ref_precision), "err_patches": int(subset.numel())}

    configs = [("float32 input, float64 moments (default)", {}),
               ("float32 moments", {"accumulate_dtype": torch.float32}),
               ("default, chunk_bytes=1 GiB", {"chunk_bytes": BIG_CHUNK})]
    with torch.inference_mode(), matmul_precision("highest"):
        for i, (variant, options) in enumerate(configs):
            if i and not budget.allows(f"padim_fit {variant}", 30.0):
                continue
            phases: dict[str, float] = {}

            def run(options=options, phases=phases) -> MultiVariateGaussian:
                module, seconds = stream_fit(embedding, batch, **options)
                phases.update({key: min(value, phases.get(key, math.inf)) for key, value in seconds.items()})
                return module

            first, memory = peak_memory(lambda: call_seconds(run, device), device)
            t = timed(run, device, fit_repeats, cap, first=first)
            del first
            module = t.pop("result")
            state = sum(b.numel() * b.element_size() for b in module.buffers())
            matmul = "fp32" if options.get("accumulate_dtype") == torch.float32 else "fp64"
            fit_rows.append(make_row(OURS, variant, matmul, t, fit_work, floor, update_s=phases["update_s"],
                                     compute_s=phases["compute_s"], state_bytes=state, **memory,
                                     **fit_errors(module.inv_covariance)))
            on_device(module.inv_covariance, device)
            if i == 0:
                module.reset()  # scoring needs the buffers only: drop the streamed moments
                kept["ours"] = module
            del module
            free(device)

        if budget.allows("padim_fit bfloat16 moments", 20.0):
            # The moments' GEMMs alone (the update step), with their own floor; compute() is not included.
            moments_work = floor_of(patches * images * channels**2, 4.0 * (images * channels * patches), floor)
            chunk = max(1, min(patches, 2**30 // (batch * channels * 2 + channels * channels * 6)))
            t = timed(lambda: bf16_moments(embedding, batch, chunk), device, max(1, repeats // 2), cap)
            m2 = t.pop("result")[subset].double()
            cov = m2 / (images - 1)
            cov.diagonal(dim1=-2, dim2=-1).add_(ridge)
            precision = torch.cholesky_inverse(torch.linalg.cholesky(cov))
            del m2
            default_update = fit_rows[0]["update_s"]
            fit_rows.append(make_row("script formula", "bfloat16 GEMMs, moments only", "bf16", t, moments_work,
                                     floor, **fit_errors(precision, of_subset=True),
                                     ours_default_update_s=default_update, note="update step only (its own floor: the moments' syrk); precision from "
                                          "these moments in float64; compare best_s with ours' update_s"))
            free(device)

        # anomalib's fit on all images at once: its time estimated on a few patches first.
        side_sub = min(side, 8)
        small = embedding[:, :, :side_sub, :side_sub].contiguous()
        theirs = peer_mvg_cls()
        sub = timed(lambda: theirs.fit(small), device, 1, cap)
        del small, theirs, sub["result"]
        free(device)
        estimate = sub["best_s"] * patches / side_sub**2
        stack = patches * channels**2 * 4
        need = 4 * stack  # covariance, its permuted copy, the inverse's factorisation and result
        free_bytes = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        peer_note = f"estimated from a fit on {side_sub}x{side_sub} patches: {estimate:.2f} s"
        skipped = {"contender": peer, "variant": "fit on all images at once", "skipped": True,
                   "estimated_s": estimate}
        if free_bytes is not None and need > 0.9 * free_bytes:
            fit_rows.append({**skipped, "note": f"does not fit: needs about {need / 2**30:.1f} GiB, "
                                                f"{free_bytes / 2**30:.1f} GiB free; {peer_note}"})
        elif estimate > PEER_FULL_LIMIT_S or not budget.allows("padim_fit peer", 2 * estimate + 30.0):
            fit_rows.append({**skipped, "note": f"not run (time): {peer_note}"})
        else:
            theirs = peer_mvg_cls()
            try:
                first, memory = peak_memory(lambda: call_seconds(lambda: theirs.fit(embedding), device), device)
                t = timed(lambda: theirs.fit(embedding), device, 1 if estimate > 5 else fit_repeats, cap, first=first)
                del first, t["result"]
                fit_rows.append(make_row(peer, "fit on all images at once", "fp32", t, fit_work, floor,
                                         note=peer_note, **memory, **fit_errors(theirs.inv_covariance)))
                kept["peer"] = theirs
            except torch.cuda.OutOfMemoryError as exc:
                fit_rows.append({**skipped, "note": f"out of memory: {str(exc).splitlines()[0]}"})
            del theirs
            free(device)

        fit_sizes = {"images": images, "C": channels, "H": side, "W": side, "P": patches, "batch": batch}
        out["padim_fit"] = {"sizes": fit_sizes, "work": fit_work, "rows": fit_rows,
                            "reference": f"float64 two-pass covariance and Cholesky inverse, {subset.numel()} patches"}

        # (c) scoring, with our default fit's buffers for every contender; end-to-end errors against a float64 fit.
        ours = kept["ours"]
        mean32, precision32 = ours.mean, ours.inv_covariance
        same_ref = reference_distance(test, mean32[:, subset], precision32[subset], subset)

        def score_errors(distance: torch.Tensor, same: bool = True) -> dict[str, Any]:
            on_device(distance, device)
            got = distance.reshape(distance.shape[0], -1)[:, subset]
            out = {"max_rel_err": max_rel_err(got, ref_distance)}
            if same:
                out["max_rel_err_same_buffers"] = max_rel_err(got, same_ref)
            return out

        score_rows: list[dict[str, Any]] = []
        t = timed(lambda: ours.mahalanobis(test), device, repeats, cap)
        score_rows.append(make_row(OURS, "float32", "fp32", t, score_work, floor, **score_errors(t.pop("result"))))
        if budget.allows("padim_score chunk_bytes=1 GiB"):
            big = MultiVariateGaussian(chunk_bytes=BIG_CHUNK).to(device)  # loading keeps the module's device
            big.load_state_dict(ours.state_dict())
            t = timed(lambda: big.mahalanobis(test), device, repeats, cap)
            score_rows.append(make_row(OURS, "float32, chunk_bytes=1 GiB", "fp32", t, score_work, floor,
                                       **score_errors(t.pop("result"))))
            del big
        if budget.allows("padim_score TF32"):
            with matmul_precision("high"):
                t = timed(lambda: ours.mahalanobis(test), device, repeats, cap)
            score_rows.append(make_row(OURS, "TF32 matmuls", "tf32", t, score_work, floor, **score_errors(t.pop("result"))))
        if budget.allows("padim_score bfloat16 module"):
            half = MultiVariateGaussian().to(device, torch.bfloat16)
            half.load_state_dict(ours.compact_state_dict("bfloat16"))
            t = timed(lambda: half.mahalanobis(test), device, repeats, cap)
            score_rows.append(make_row(OURS, "module cast to bfloat16 (bf16 buffers)", "fp32", t,
                                       score_work, floor, **score_errors(t.pop("result"))))
            del half
        if budget.allows("padim_score bfloat16 GEMM"):
            precision16 = precision32.bfloat16()

            def score_bf16() -> torch.Tensor:
                delta = (test.flatten(2) - mean32).permute(2, 0, 1)  # (P, B, C)
                weighted = torch.matmul(delta.bfloat16(), precision16)  # bfloat16 GEMM
                return (weighted.float() * delta).sum(-1).clamp(min=0).sqrt().mT.reshape(-1, side, side)

            t = timed(score_bf16, device, repeats, cap)
            score_rows.append(make_row("script formula", "bfloat16 GEMM, precision kept in bf16", "bf16", t,
                                       score_work, floor, **score_errors(t.pop("result"))))
            del precision16
        t = timed(lambda: padim_distance(test, mean32, precision32), device, repeats, cap)
        score_rows.append(make_row(peer, "PaDiM's formula, our buffers", "fp32", t, score_work, floor,
                                   **score_errors(t.pop("result")[:, 0])))
        if "peer" in kept:
            theirs = kept["peer"]
            distance = padim_distance(test, theirs.mean, theirs.inv_covariance)[:, 0]
            peer_end = {"contender": peer, "variant": "PaDiM's formula, anomalib's own fit", "timed": False,
                        **score_errors(distance, same=False)}
            score_rows.append(peer_end)
    kept.clear()
    del embedding, test
    free(device)
    out["padim_score"] = {"sizes": {**fit_sizes, "test_images": b_test}, "work": score_work, "rows": score_rows,
                          "reference": f"float64 fit and scoring of {subset.numel()} patches (max_rel_err); float64 "
                                       "scoring of our float32 buffers (max_rel_err_same_buffers)"}
    return out


# --------------------------------------------------------------------------- report
def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_header(report: dict[str, Any]) -> None:
    f = report["floor"]
    print(f"{report['device_name']} (torch {report['torch']}, CUDA {report['cuda']}); peer: {report['peer_source']}")
    print(f"floor: fp32 {f['fp32_flops'] / 1e12:.1f}, TF32 {f['tf32_flops'] / 1e12:.1f}, "
          f"bf16 {f['bf16_flops'] / 1e12:.1f}, fp64 {f['fp64_flops'] / 1e12:.1f} TFLOP/s (n={f['gemm_n']}); "
          f"copy {f['copy_bytes_per_s'] / 1e9:.0f} GB/s", flush=True)


def print_workload(name: str, w: dict[str, Any]) -> None:
    work = w["work"]
    print(f"\n{name} {w['sizes']}: floor {work['floor_s'] * 1e3:.2f} ms ({work['bound']}-bound: "
          f"{work['flops'] / 1e9:.1f} GFLOP, {work['bytes'] / 1e9:.2f} GB); errors vs {w['reference']}")
    header = (f"{'contender':<16} {'variant':<44} {'first s':>9} {'best s':>9} {'x floor':>8} {'TFLOP/s':>8} "
              f"{'%GEMM':>6} {'%BW':>6} {'peak GiB':>8} {'max rel err':>11}")
    print(header)
    print("-" * len(header))
    for r in w["rows"]:
        if r.get("skipped"):
            print(f"{r['contender']:<16} {r['variant'][:44]:<44} skipped: {r['note']}")
            continue
        if r.get("timed") is False:
            print(f"{r['contender']:<16} {r['variant'][:44]:<44} {'':>9} {'':>9} {'':>8} {'':>8} {'':>6} {'':>6} "
                  f"{'':>8} {r['max_rel_err']:>11.2e}")
            continue
        peak = r.get("peak_bytes")
        print(f"{r['contender']:<16} {r['variant'][:44]:<44} {r['first_s']:>9.4f} {r['best_s']:>9.4f} "
              f"{r['times_floor']:>7.1f}x {r['tflops']:>8.2f} {r['gemm_fraction']:>6.1%} "
              f"{r['bandwidth_fraction']:>6.1%} {_fmt(None if peak is None else peak / 2**30, '8.2f'):>8} "
              f"{r['max_rel_err']:>11.2e}")
        if "update_s" in r:
            print(f"{'':<16}   update {r['update_s']:.3f} s + compute {r['compute_s']:.3f} s (best runs)")
        if "max_rel_err_same_buffers" in r:
            print(f"{'':<16}   scoring alone (vs float64 scoring of the same buffers): "
                  f"{r['max_rel_err_same_buffers']:.2e}")
        if r.get("note"):
            print(f"{'':<16}   {r['note']}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the tables, write the JSON (``--json``); return the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds; runs on the CPU without CUDA")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--json", type=Path, default=None, help="write the report here (default: "
                        "benchmarks/results/gpu.json for full runs, none for --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls after the first (default 5, quick 2)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds after which optional rows are skipped (default 170, quick 60)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here; use --quick --device cpu for the smoke test")
    if device.type != "cuda" and not args.quick:
        parser.error("the full sizes need a CUDA device; use --quick for the CPU smoke test")
    sizes = QUICK if args.quick else FULL
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    budget = Budget(args.budget_s if args.budget_s is not None else (60.0 if args.quick else 170.0))
    start = time.perf_counter()
    kde_cls, mvg_cls, peer_source, peer = load_peers()
    floor = measure_floor(device, sizes["gemm_n"], sizes["copy_bytes"])
    report: dict[str, Any] = {
        "script": "benchmarks/gpu.py", "quick": args.quick, "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "peer": peer, "peer_source": peer_source, "repeats": repeats,
        "timing": "first call (the warm-up) and best of up to `repeats` more; CUDA events after synchronize",
        "settings": {
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "bf16_reduced_precision_reduction": torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
        },
        "floor": floor, "workloads": {}, "errors": [], "skipped": [],
    }
    path = args.json if args.json is not None else (None if args.quick else RESULTS_PATH)
    print_header(report)

    def write() -> None:
        report["skipped"] = budget.skipped
        report["wall_s"] = time.perf_counter() - start
        if path is not None:  # after every workload: a run cut short keeps what it measured
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2) + "\n")

    def kde(out: dict[str, Any]) -> None:
        out["kde_forward"] = bench_kde(device, sizes, floor, repeats, budget, kde_cls, peer)

    def padim(out: dict[str, Any]) -> None:
        bench_padim(device, sizes, floor, repeats, budget, mvg_cls, peer, out)

    for label, suite in (("kde_forward", kde), ("padim_fit and padim_score", padim)):
        results: dict[str, Any] = {}
        try:
            suite(results)
        except Exception as exc:  # record it and go on: one lent GPU run should bring back all it can
            report["errors"].append({"workloads": label, "error": f"{type(exc).__name__}: {exc}",
                                     "traceback": traceback.format_exc()})
            print(f"\n{label} failed:\n{traceback.format_exc()}", flush=True)
            free(device)
        report["workloads"].update(results)  # what finished before a failure is kept
        for name, workload in results.items():
            print_workload(name, workload)
        write()
    for line in budget.skipped:
        print(f"skipped: {line}")
    print(f"\ntotal {report['wall_s']:.1f} s" + (f"; wrote {path}" if path is not None else ""))
    return report


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # progress shows as it happens, also through a pipe
    main(sys.argv[1:])
