"""MultiVariateGaussian.compute() all-reduces streamed moments across torch.distributed ranks (two gloo processes)."""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from anomstats.gaussian import DEFAULT_RIDGE  # noqa: E402
from anomstats_torch import MultiVariateGaussian  # noqa: E402
from tests._tolerances import mean_atol, patch_covariances, precision_atol  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")

WORLD = 2
DEADLINE_S = 180


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, workdir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        data = torch.load(Path(workdir) / "data.pt")
        results = {}
        # uneven split, several updates per rank
        uneven = MultiVariateGaussian()
        for part in torch.split(data[:5] if rank == 0 else data[5:], 3):
            uneven.update(part)
        results["uneven"] = uneven.compute()
        local_count = uneven._count
        results["local_unchanged"] = torch.tensor(local_count)
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

    context = torch.multiprocessing.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
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

    # Bounds (tests/_tolerances.py): mean_atol for the means of 17 values (times the number of merges, 4
    # at most here: each streamed batch and each rank adds one rounding of the running mean) and
    # precision_atol, kappa(A) delta_A |A^-1|, for the precisions of the regularised covariances.
    numbers = data.numpy()
    mean_tol = mean_atol(np.abs(numbers).max(), 17) * 4
    precision_tol = precision_atol(patch_covariances(numbers, DEFAULT_RIDGE), 17)
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for key in ("uneven", "lopsided"):
            mean, precision = results[key]
            torch.testing.assert_close(mean, expected[0], rtol=0, atol=mean_tol)
            torch.testing.assert_close(precision, expected[1], rtol=0, atol=precision_tol)
        assert int(results["local_unchanged"]) == (5 if rank == 0 else 12)  # local moments stay local
