"""The low-rank per-patch Gaussian on a CUDA device against the dense one (``python benchmarks/gpu_low_rank.py``).

PaDiM with wide_resnet50 (C = 550) at 56×56 patches and N = 200 training images, float32 embeddings:
fit time (best of 3 after a warm-up, plus the first call), peak device memory of the fit (module state
included), scoring time for 32 images, and the largest relative difference of the distances from the
dense fit. Not part of ``make bench`` (it needs a GPU); the closing notes of the low-rank issue quote it.
"""

from __future__ import annotations

import time

import torch

from anomstats_torch import MultiVariateGaussian


def _timed(fn, repeats: int = 3) -> tuple[float, float]:
    """(first call, best of ``repeats`` after it), seconds, with the device synchronised."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return first, best


def main(n: int = 200, c: int = 550, side: int = 56, queries: int = 32) -> None:
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    mixing = torch.randn(c, c, device=device, generator=g) * 0.05 + torch.eye(c, device=device)
    train = torch.einsum("nchw,cd->ndhw", torch.randn(n, c, side, side, device=device, generator=g), mixing)
    test = torch.einsum("nchw,cd->ndhw", torch.randn(queries, c, side, side, device=device, generator=g), mixing)
    print(f"{torch.cuda.get_device_name()}: N={n}, C={c}, {side}x{side} patches, float32 embeddings")
    results = {}
    for form in ("dense", "low_rank"):
        module = MultiVariateGaussian(form=form).to(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        first, best = _timed(lambda: module.fit(train))
        peak = torch.cuda.max_memory_allocated() - base
        state = sum(b.numel() * b.element_size() for b in module.buffers())
        _, score = _timed(lambda: module.mahalanobis(test))
        results[form] = module.mahalanobis(test).double()
        print(f"{form:>9}: fit first {first:7.3f} s, best {best:7.3f} s; peak {peak / 2**30:6.2f} GiB, "
              f"state {state / 2**30:6.2f} GiB; scoring {queries} images {score * 1e3:7.2f} ms")
        del module
        torch.cuda.empty_cache()
    diff = ((results["low_rank"] - results["dense"]).abs() / results["dense"].abs()).max().item()
    print(f"max relative difference of the distances (float32 dense vs low-rank): {diff:.2e}")


if __name__ == "__main__":
    main()
