"""MultiVariateGaussian.compute() merges streamed moments across torch.distributed ranks (two gloo processes).

Besides the global fit: ranks agree on shapes, dtypes and device types through one small collective first,
so an empty rank works with any ``accumulate_dtype`` and a real mismatch raises the same clear error on every
rank (before: gloo "collective mismatch" and SIGABRT); ranks whose streams have different shifts merge exactly.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from anomstats._validation import NotFittedError  # noqa: E402
from anomstats.gaussian import DEFAULT_RIDGE  # noqa: E402
from anomstats_torch import MultiVariateGaussian  # noqa: E402
from anomstats_torch import _distributed, _streaming  # noqa: E402
from tests._tolerances import eps, mean_atol, patch_covariances, precision_atol  # noqa: E402
from tests.test_faults_torch_stream import exact_moments, streamed_m2_rtol, streamed_mean_atol, unpack_sums  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")

WORLD = 2
DEADLINE_S = 180


def _spawn(worker, workdir: Path) -> list[dict]:
    """Run ``worker(rank, workdir)`` on WORLD gloo processes (a file store: no ports); their saved results."""
    context = torch.multiprocessing.start_processes(
        worker, args=(str(workdir),), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    return [torch.load(workdir / f"rank{rank}.pt") for rank in range(WORLD)]


def _init(rank: int, workdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{Path(workdir) / 'store'}", rank=rank, world_size=WORLD,
        timeout=timedelta(seconds=60),
    )


def _attempt(fn) -> tuple[str, object]:
    """``("ok", result)`` or ``(exception type name, message)``: what a rank saw."""
    try:
        return "ok", fn()
    except Exception as exc:  # noqa: BLE001 - the test compares what every rank raised
        return type(exc).__name__, str(exc)


# --------------------------------------------------------------------------- the global fit
def _fit_worker(rank: int, workdir: str) -> None:
    _init(rank, workdir)
    try:
        data = torch.load(Path(workdir) / "data.pt")
        results = {}
        # uneven split, several updates per rank
        uneven = MultiVariateGaussian()
        for part in torch.split(data[:5] if rank == 0 else data[5:], 3):
            uneven.update(part)
        local = {name: t.clone() for name, t in uneven.state_dict().items() if name.startswith("stream_")}
        results["uneven"] = uneven.compute(keep_stream=True)
        # keep_stream=True: the local moments stay the rank's own (the all-reduce ran on a copy)
        results["local_unchanged"] = all(torch.equal(uneven._buffers[name], t) for name, t in local.items())
        results["local_count"] = uneven.stream_count.clone()
        # the default spends the local stream: its sums are all-reduced in place and, for float32 data (float64
        # sums, a float32 fit), become the precision; the same numbers as keeping the stream
        mine = data[:5].float() if rank == 0 else data[5:].float()
        kept, spending = MultiVariateGaussian(), MultiVariateGaussian()
        for part in torch.split(mine, 3):
            kept.update(part)
            spending.update(part)
        results["kept"] = [t.clone() for t in kept.compute(keep_stream=True)]
        sums = spending.stream_m2
        results["spent"] = [t.clone() for t in spending.compute()]
        results["spent_in_place"] = spending.inv_covariance.data_ptr() == sums.data_ptr()
        results["spent_closed"] = "stream_count" not in spending._buffers
        # a rank whose stream is spent must not count as an empty rank: every rank raises
        if rank == 0:
            spending.reset()
            spending.update(data[:5])
        results["spent_rank"] = _attempt(spending.compute)
        # a rank without data still takes part and gets the global fit
        lopsided = MultiVariateGaussian()
        if rank == 0:
            lopsided.update(data)
        results["lopsided"] = lopsided.compute()
        torch.save(results, Path(workdir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_get_the_global_fit(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = torch.randn(17, 3, 2, 2, generator=g, dtype=torch.float64) * 2 + 5
    torch.save(data, tmp_path / "data.pt")
    expected = MultiVariateGaussian().fit(data)
    ranks = _spawn(_fit_worker, tmp_path)
    # Bounds (tests/_tolerances.py): mean_atol for the means of 17 values (times the number of merges, 4
    # at most here: each streamed batch and each rank adds one rounding of the running mean) and
    # precision_atol, kappa(A) delta_A |A^-1|, for the precisions of the regularised covariances.
    numbers = data.numpy()
    mean_tol = mean_atol(np.abs(numbers).max(), 17) * 4
    precision_tol = precision_atol(patch_covariances(numbers, DEFAULT_RIDGE), 17)
    for rank, results in enumerate(ranks):
        for key in ("uneven", "lopsided"):
            mean, precision = results[key]
            torch.testing.assert_close(mean, expected[0], rtol=0, atol=mean_tol)
            torch.testing.assert_close(precision, expected[1], rtol=0, atol=precision_tol)
        assert all(torch.equal(a, b) for a, b in zip(results["spent"], results["kept"]))  # the same operations
        assert results["local_unchanged"] and int(results["local_count"]) == (5 if rank == 0 else 12)
        assert results["spent_in_place"] and results["spent_closed"]
    seen = [results["spent_rank"] for results in ranks]
    assert seen[0] == seen[1] and seen[0][0] == "RuntimeError", seen
    assert "compute() spent this stream" in seen[0][1] and "rank(s) 1" in seen[0][1], seen[0]


# --------------------------------------------------------------------------- faults and far data
def _faults_worker(rank: int, workdir: str) -> None:
    _init(rank, workdir)
    try:
        data = torch.load(Path(workdir) / "data.pt")
        small, far = data["small"], data["far"]
        results = {}
        # ranks with data in different accumulation dtypes: the same ValueError on both, nothing aborts
        mixed = MultiVariateGaussian(accumulate_dtype=torch.float64 if rank == 0 else torch.float32)
        mixed.update(small.float())
        results["dtypes"] = _attempt(mixed.compute)
        # different channel counts
        shapes = MultiVariateGaussian()
        shapes.update(small if rank == 0 else small[:, :2])
        results["channels"] = _attempt(shapes.compute)
        # no rank has data
        results["no_data"] = _attempt(MultiVariateGaussian().compute)
        # an empty rank with float32 accumulation (it aborted the process before), and one whose own
        # accumulate_dtype differs from the data rank's (an empty rank has no dtype to disagree with)
        for key, empty_dtype in (("empty_float32", torch.float32), ("empty_float64", torch.float64)):
            module = MultiVariateGaussian(accumulate_dtype=torch.float32 if rank == 0 else empty_dtype)
            if rank == 0:
                module.update(small.float()[:7])
                module.update(small.float()[7:])
            results[key] = _attempt(lambda: [t.clone() for t in module.compute()])
        # far from the origin, the ranks' streams shifted differently (rank 1's data lie 40 sigma away)
        mine = far[: far.shape[0] // 2] if rank == 0 else far[far.shape[0] // 2:]
        stream = MultiVariateGaussian()
        for part in torch.split(mine, 4):
            stream.update(part)
        results["far_local_shift"] = stream.stream_shift.clone()
        moments = _distributed.global_moments(_streaming.settle(stream, "dense", stream.chunk_bytes))
        results["far_moments"] = [moments.count, moments.shift.clone(), moments.mean.clone(), moments.m2.clone()]
        results["far_fit"] = [t.clone() for t in stream.compute()]
        torch.save(results, Path(workdir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _far_data() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    near = torch.randn(24, 3, 2, 1, generator=g, dtype=torch.float64)
    other = torch.randn(24, 3, 2, 1, generator=g, dtype=torch.float64) + 40.0
    return torch.cat([near, other]) + 1e8


def test_ranks_agree_before_the_large_collectives(tmp_path):
    g = torch.Generator().manual_seed(1)
    small = torch.randn(12, 3, 2, 2, generator=g, dtype=torch.float64) + 3.0
    far = _far_data()
    torch.save({"small": small, "far": far}, tmp_path / "data.pt")
    ranks = _spawn(_faults_worker, tmp_path)

    # Faults: both ranks raise the same error, with the same words (no abort, no hang; the later scenarios
    # ran on the same process group, so it stayed usable).
    for key, kind, words in (
        ("dtypes", "ValueError", ["different dtypes", "rank 0: torch.float64", "rank 1: torch.float32", "accumulate_dtype"]),
        ("channels", "ValueError", ["different shapes", "rank 0: C=3, H*W=4", "rank 1: C=2, H*W=4"]),
        ("no_data", "NotFittedError", ["no rank has data", "update(embedding)"]),
    ):
        seen = [results[key] for results in ranks]
        assert seen[0] == seen[1], seen
        assert seen[0][0] == kind and all(word in seen[0][1] for word in words), seen[0]
    assert issubclass(NotFittedError, ValueError)

    # An empty rank: every rank gets the data rank's own fit, bit for bit (its moments plus zeros; one data
    # rank, so no merge term), whatever the empty rank's accumulate_dtype.
    alone = MultiVariateGaussian(accumulate_dtype=torch.float32)
    alone.update(small.float()[:7])
    alone.update(small.float()[7:])
    expected = alone.compute()
    for key in ("empty_float32", "empty_float64"):
        for results in ranks:
            status, fitted = results[key]
            assert status == "ok", fitted
            assert all(torch.equal(a, b) for a, b in zip(fitted, expected))

    # Far data, shifts that differ by 40 sigma between the ranks: the merged moments against exact arithmetic.
    x = far.numpy().reshape(far.shape[0], 3, -1)
    n = x.shape[0]
    exact_mean, exact_m2 = exact_moments(x)
    count, origin, mean, packed = ranks[0]["far_moments"]
    m2 = torch.from_numpy(unpack_sums(packed))
    assert count == n
    assert not torch.equal(ranks[0]["far_local_shift"], ranks[1]["far_local_shift"])
    shift_all = origin.numpy()
    radius = np.abs(x - shift_all[None]).max(axis=(0, 1))  # R per patch: max |x - shift|
    sigma = np.sqrt(np.min(np.diagonal(exact_m2, axis1=1, axis2=2), axis=1) / n)
    merges = 6 + 1 + WORLD  # 6 updates per rank (merges inside), the ranks' merges
    rtol = streamed_m2_rtol(n, merges, float(np.max(radius / sigma)))
    scale = np.sqrt(np.einsum("pii,pjj->pij", exact_m2, exact_m2))
    assert np.all(np.abs(m2.numpy() - exact_m2) <= rtol * scale)
    assert rtol <= 1e-12  # the promise at this size: 48 observations, 12 updates, 2 ranks, R/sigma about 3
    # The mean: one rounding of shift + mean (relative to |mean|) plus the shifted mean's error.
    got_mean = (origin + mean).numpy()
    mean_bound = eps(np.float64) * np.abs(exact_mean) + streamed_mean_atol(n, merges, radius)
    assert np.all(np.abs(got_mean - exact_mean) <= mean_bound)
    # Every rank got the same numbers, and compute() is the one-shot fit (precision_atol, and mean_atol).
    for a, b in zip(ranks[0]["far_fit"], ranks[1]["far_fit"]):
        assert torch.equal(a, b)
    one_shot = MultiVariateGaussian().fit(far)
    covariances = patch_covariances(far.numpy() - 1e8, DEFAULT_RIDGE)  # exact shift: same covariances
    torch.testing.assert_close(ranks[0]["far_fit"][1], one_shot[1], rtol=0, atol=precision_atol(covariances, n))
    torch.testing.assert_close(ranks[0]["far_fit"][0], one_shot[0], rtol=0, atol=mean_atol(1e8 + 45, n))



# --------------------------------------------------------------------------- CUDA tensors under gloo
def _cuda_worker(rank: int, workdir: str) -> None:
    _init(rank, workdir)
    try:
        small = torch.load(Path(workdir) / "data.pt")
        results = {}
        # a rank without data joins ranks that streamed on CUDA (its zeros go to its CUDA device)
        lopsided = MultiVariateGaussian()
        if rank == 0:
            lopsided.update(small.cuda())
        results["empty_rank"] = _attempt(lambda: [t.cpu() for t in lopsided.compute()])
        # ranks with data on different device types: the same ValueError on both
        mixed = MultiVariateGaussian()
        mixed.update(small.cuda() if rank == 0 else small)
        results["device_types"] = _attempt(mixed.compute)
        both = MultiVariateGaussian()
        both.update(small[:5].cuda() if rank == 0 else small[5:].cuda())
        results["both"] = _attempt(lambda: [t.cpu() for t in both.compute()])
        torch.save(results, Path(workdir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_ranks_streaming_on_cuda(tmp_path):
    g = torch.Generator().manual_seed(2)
    small = torch.randn(12, 3, 2, 2, generator=g, dtype=torch.float64) + 3.0
    torch.save(small, tmp_path / "data.pt")
    ranks = _spawn(_cuda_worker, tmp_path)
    alone = MultiVariateGaussian()
    alone.update(small.cuda())
    expected = [t.cpu() for t in alone.compute()]
    one_shot = MultiVariateGaussian().fit(small)
    covariances = patch_covariances(small.numpy(), DEFAULT_RIDGE)
    for results in ranks:
        status, fitted = results["empty_rank"]
        assert status == "ok", fitted
        assert all(torch.equal(a, b) for a, b in zip(fitted, expected))  # the data rank's own fit, exactly
        status, fitted = results["both"]
        assert status == "ok", fitted
        # precision_atol: the merged CUDA fit against the one-shot CPU fit (two float64 computations)
        torch.testing.assert_close(fitted[1], one_shot[1], rtol=0, atol=precision_atol(covariances, 12))
    seen = [results["device_types"] for results in ranks]
    assert seen[0] == seen[1] and seen[0][0] == "ValueError", seen
    assert "different device types" in seen[0][1] and "rank 0: cuda" in seen[0][1] and "rank 1: cpu" in seen[0][1]
