"""Smoke test of benchmarks/gpu.py (issue 12, point 3) in its quick mode on the CPU, and of its references.

The script is run once, by hand, on a lent GPU; these tests keep it from rotting between those runs: the quick
mode runs every workload and contender at tiny sizes and writes the JSON fields a GPU run is read by, and the
float64 references (which every reported error is measured against) and the bfloat16 moments formula are
checked against independent computations, with tolerances from tests/_tolerances.py. The paths the script
times (float32 KDE forward and log_prob at D = 16, the streamed fit with float64 or float32 moments, scoring) are
checked for accuracy on each device: the CPU here, CUDA where there is one (skipped otherwise). No timing
assertions.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import scipy.stats
import torch

import anomstats
from anomstats._rules import DEFAULT_RIDGE
from anomstats_torch import GaussianKDE, MultiVariateGaussian
from benchmarks import gpu
from tests._tolerances import (
    ADAPTER32,
    SCIPY,
    KDEErrorModel,
    Route,
    assert_close_each,
    core_route,
    eps,
    inverse_perturbation_atol,
    mahalanobis_tolerances,
    mean_atol,
    patch_covariances,
    precision_atol,
    streaming_covariance_atol,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]

WORKLOADS = {"kde_forward", "padim_fit", "padim_score"}
TIMED_FIELDS = {"contender", "variant", "matmul", "first_s", "best_s", "runs", "floor_s", "times_floor", "tflops",
                "gemm_fraction", "gbps", "bandwidth_fraction", "max_rel_err"}


def _run(tmp_path, *extra: str) -> dict:
    path = tmp_path / "gpu.json"
    report = gpu.main(["--quick", "--device", "cpu", "--repeats", "1", "--json", str(path), *extra])
    on_disk = json.loads(path.read_text())
    assert on_disk == json.loads(json.dumps(report))  # the file is the returned report
    return on_disk


def _timed_rows(workload: dict) -> list[dict]:
    return [r for r in workload["rows"] if not r.get("skipped") and r.get("timed", True)]


def test_quick_run_reports_every_workload_against_its_floor(tmp_path, capsys):
    report = _run(tmp_path)
    assert report["quick"] is True and report["device"] == "cpu" and report["script"] == "benchmarks/gpu.py"
    # Where anomalib's classes came from, and the rows' name for them (its own files or the re-implementation).
    assert report["peer_source"] and report["peer"] in ("anomalib 2.7.0", gpu.FALLBACK_PEER)
    floor = report["floor"]
    for key in ("fp32_flops", "tf32_flops", "bf16_flops", "fp64_flops", "copy_bytes_per_s"):
        assert floor[key] > 0, key
    assert set(report["workloads"]) == WORKLOADS
    assert report["skipped"] == [] and report["errors"] == []  # the quick sizes fit the default budget
    for name, workload in report["workloads"].items():
        work = workload["work"]
        assert work["floor_s"] == max(work["flop_s"], work["byte_s"]) > 0
        assert work["flop_s"] == pytest.approx(work["flops"] / floor["fp32_flops"])
        assert work["byte_s"] == pytest.approx(work["bytes"] / floor["copy_bytes_per_s"])
        rows = _timed_rows(workload)
        contenders = {r["contender"] for r in rows}
        assert {gpu.OURS, report["peer"]} <= contenders, name
        assert "script formula" in contenders, name  # the bfloat16 GEMM row
        for row in rows:
            assert TIMED_FIELDS <= set(row), (name, row)
            assert row["first_s"] > 0 and row["best_s"] > 0 and 0 <= row["runs"] <= 1
            assert math.isfinite(row["max_rel_err"]) and row["max_rel_err"] >= 0, (name, row)
            assert row["times_floor"] == pytest.approx(row["best_s"] / row["floor_s"])
            # Every row is measured against its workload's floor, except the moments-only bfloat16 row (its own).
            assert (row["floor_s"] == work["floor_s"]) == (row["variant"] != "bfloat16 GEMMs, moments only")
            assert row["gemm_fraction"] == pytest.approx(row["tflops"] * 1e12 / floor[f"{row['matmul']}_flops"])
    fit = _timed_rows(report["workloads"]["padim_fit"])
    ours_fit = [r for r in fit if r["contender"] == gpu.OURS]
    assert len(ours_fit) == 3 and all(r["update_s"] > 0 and r["compute_s"] > 0 and r["state_bytes"] > 0 for r in ours_fit)
    assert all("peak_bytes" in r for r in ours_fit)  # None on the CPU: torch.cuda.max_memory_allocated only
    scores = report["workloads"]["padim_score"]["rows"]
    assert any(r.get("timed") is False for r in scores)  # anomalib's own fit scored end to end
    out = capsys.readouterr().out
    assert all(name in out for name in WORKLOADS) and "x floor" in out


def test_peer_is_scaled_and_optional_rows_skip_when_the_time_is_spent(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "PEER_FULL_LIMIT_S", 0.0)  # every full peer run "would take too long"
    report = _run(tmp_path, "--budget-s", "0")
    kde = report["workloads"]["kde_forward"]
    (peer,) = [r for r in kde["rows"] if r["contender"] == report["peer"]]
    rows_timed = gpu.QUICK["kde_peer_rows"]
    assert peer["peer_rows_timed"] == rows_timed < kde["sizes"]["M"] and "scaled" in peer["note"]
    assert [r["variant"] for r in kde["rows"] if r["contender"] == gpu.OURS] == ["float32"]  # optional rows skipped
    (fit_peer,) = [r for r in report["workloads"]["padim_fit"]["rows"] if r["contender"] == report["peer"]]
    assert fit_peer["skipped"] and fit_peer["estimated_s"] > 0 and "not run (time)" in fit_peer["note"]
    scores = report["workloads"]["padim_score"]["rows"]
    assert [(r["contender"], r["variant"]) for r in scores] == [
        (gpu.OURS, "float32"), (report["peer"], "PaDiM's formula, our buffers")]
    assert len(report["skipped"]) >= 8 and all("skipped" in line for line in report["skipped"])


def test_a_failing_workload_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("planted")

    monkeypatch.setattr(gpu, "bench_kde", broken)
    report = _run(tmp_path, "--budget-s", "0")
    (error,) = report["errors"]
    assert error["workloads"] == "kde_forward" and "RuntimeError: planted" in error["error"] and error["traceback"]
    assert set(report["workloads"]) == {"padim_fit", "padim_score"}


def test_timed_counts_its_calls():
    calls = []

    def fn():
        calls.append(1)
        return len(calls)

    cpu = torch.device("cpu")
    t = gpu.timed(fn, cpu, repeats=3, cap_s=math.inf)
    assert len(calls) == 4 and t["runs"] == 3 and t["result"] == 4  # the first call, then three timed ones
    calls.clear()
    t = gpu.timed(fn, cpu, repeats=3, cap_s=0.0)  # the first call already exceeds the cap
    assert len(calls) == 1 and t["runs"] == 0 and t["best_s"] == t["first_s"]
    calls.clear()
    t = gpu.timed(fn, cpu, repeats=2, cap_s=math.inf, first=(1.0, "given"))
    assert len(calls) == 2 and t["first_s"] == 1.0 and t["result"] == 2


def test_peers_fall_back_to_the_reimplementation(monkeypatch):
    import benchmarks

    monkeypatch.setitem(sys.modules, "benchmarks._anomalib_peer", None)  # as if the module were absent
    monkeypatch.delattr(benchmarks, "_anomalib_peer", raising=False)
    kde_cls, mvg_cls, note, name = gpu.load_peers()
    from tests.anomalib_oracle import AnomalibGaussianKDE, AnomalibMultiVariateGaussian

    assert (kde_cls, mvg_cls) == (AnomalibGaussianKDE, AnomalibMultiVariateGaussian)
    assert "re-implementation" in note and "not present" in note and name == gpu.FALLBACK_PEER


def test_kde_reference_agrees_with_scipy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 3)) @ np.array([[1.0, 0.3, 0.0], [0.0, 0.8, 0.2], [0.0, 0.0, 0.5]]) + 5.0
    q = x[:20] + rng.standard_normal((20, 3)) * 0.7
    got = gpu.kde_reference_log_density(torch.from_numpy(x), torch.from_numpy(q), block=128).numpy()
    want = scipy.stats.gaussian_kde(x.T).logpdf(q.T)
    # kde_route_error of both float64 routes (direct differences; ours centred at the mean, scipy's at the
    # origin), each with its own fit: bound (1) with cond(H).
    h = np.cov(x.T) * len(x) ** (-2.0 / 7.0)
    bound = KDEErrorModel.of(x, q, h, (Route("direct", "mean"), SCIPY))
    assert_close_each(got, want, atol=bound.log_atol_each(want))
    assert got.dtype == np.float64


def test_padim_references_agree_with_numpy():
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((12, 5, 3, 3)) + 2.0)
    test = x[:4] + 0.3
    patches = torch.tensor([0, 4, 8])
    ridge = 0.01
    mean, precision = gpu.reference_fit(x, patches, ridge)
    covariances = patch_covariances(x.numpy(), ridge)[patches.numpy()]
    want = np.linalg.inv(covariances)
    # precision_atol: two float64 inverses of the same regularised covariances (doubled).
    assert_close_each(precision, want, atol=precision_atol(covariances, 12))
    flat = x.numpy().reshape(12, 5, -1)[:, :, patches.numpy()]
    assert_close_each(mean, flat.mean(axis=0), rtol=4 * eps(np.float64))  # a mean of 12 values, then one division
    distance = gpu.reference_distance(test, mean, precision, patches).numpy()
    delta = test.numpy().reshape(4, 5, -1)[:, :, patches.numpy()] - mean.numpy()  # (B, C, k)
    expected = np.sqrt(np.einsum("bck,kcd,bdk->bk", delta, precision.numpy(), delta))
    # mahalanobis_tolerances, shared_fit: the same mean and precision, only the evaluation differs.
    rtol, _ = mahalanobis_tolerances(covariances, 12, shared_fit=True)
    assert_close_each(distance, expected, rtol=rtol)
    assert distance.shape == (4, 3)


def test_bf16_moments_are_within_bfloat16_rounding():
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((12, 6, 2, 2)).astype(np.float32) + 1.0)
    batch = 5  # three batches: two Chan merges
    got = gpu.bf16_moments(x, batch, chunk=3).double().numpy()
    flat = x.double().numpy().reshape(12, 6, -1)
    u = eps(torch.bfloat16) / 2  # unit roundoff of bfloat16
    for p in range(flat.shape[2]):
        obs = flat[:, :, p]
        centred = obs - obs.mean(axis=0)
        want = centred.T @ centred
        # Per batch, the centred block is rounded to bfloat16 (u each factor) and the product's output too
        # (u of the sum of magnitudes): (3u + u²) |C_b|ᵀ|C_b|; the float32 centring, sums and merges are
        # streaming_covariance_atol's in float32, times n - 1 (it bounds the covariance, this is its sum).
        bf16_part = sum(
            np.abs(b - b.mean(axis=0)).T @ np.abs(b - b.mean(axis=0)) for b in np.split(obs, [5, 10])
        ) * (3 * u + u * u)
        atol = bf16_part + 11 * streaming_covariance_atol(obs, dtype=np.float32)
        assert_close_each(got[p], want, atol=atol)


# --------------------------------------------------------------------------- the timed paths, on each device
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_bytes", [2**12, 2**30], ids=["small_blocks", "gpu_budget"])
def test_the_timed_kde_path_is_accurate_on_each_device(device, chunk_bytes):
    # The script's KDE rows: float32 forward at D = 16 with the default-sized and a GPU-sized budget (the small
    # budget splits the kernel matrix into many blocks on either device), and log_prob, against the float64 core.
    rng = np.random.default_rng(3)
    mixing = rng.standard_normal((16, 16)) * 0.3 + np.eye(16)
    x = (rng.standard_normal((1500, 16)) @ mixing + 2.0).astype(np.float32)
    q = (rng.standard_normal((40, 16)) @ mixing * 1.1 + 2.0).astype(np.float32)
    core = anomstats.GaussianKDE(x.T.astype(np.float64))
    kde = GaussianKDE(torch.from_numpy(x).to(device), chunk_bytes=chunk_bytes)
    queries = torch.from_numpy(q).to(device)
    got, got_log = kde(queries), kde.log_prob(queries)
    assert got.device.type == got_log.device.type == device and got.dtype == torch.float32
    want_log = core.logpdf(q.T.astype(np.float64))
    # kde_route_error of the adapter's float32 route (its float64 fit in float32 buffers, the expanded square
    # of centred queries) and of the float64 core, each with its own fit.
    bound = KDEErrorModel.of(x, q, core.covariance, (ADAPTER32, core_route(16)))
    assert_close_each(got.cpu().numpy(), core.evaluate(q.T.astype(np.float64)), rtol=bound.rtol_each(want_log), atol=0)
    assert_close_each(got_log.cpu().numpy(), want_log, atol=bound.log_atol_each(want_log))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("accumulate", [torch.float64, torch.float32], ids=str)
def test_the_timed_streamed_fit_and_scoring_are_accurate_on_each_device(device, accumulate):
    # The script's fit rows: float32 embeddings streamed through update() in batches, then compute() and
    # mahalanobis(), on the device, with float64 (default) or float32 moments, against a float64 fit.
    rng = np.random.default_rng(4)
    b, c = 30, 5
    mixing = rng.standard_normal((c, c)) * 0.1 + np.eye(c)  # well conditioned: cond(A) about 2
    x = torch.from_numpy((np.einsum("bchw,cd->bdhw", rng.standard_normal((b, c, 2, 3)), mixing) + 1.0).astype(np.float32))
    q = x[:6] + 0.25
    mvg = MultiVariateGaussian(accumulate_dtype=accumulate, chunk_bytes=2**10)  # several chunks of patches
    parts = torch.split(x.to(device), 7)
    for part in parts:
        mvg.update(part)
    mean, precision = mvg.compute()
    assert precision.device.type == device and mean.dtype == precision.dtype == torch.float32
    v = x.double().numpy().reshape(b, c, -1)
    ref_mean = v.mean(axis=0)
    covariances = patch_covariances(x.double().numpy(), DEFAULT_RIDGE)
    ref_precision = np.linalg.inv(covariances)
    work = np.float64 if accumulate == torch.float64 else np.float32
    half_ulp = eps(np.float32) / 2  # the final rounding of the stored float32 buffers
    merges = len(parts) - 1
    # mean_atol in the moments' dtype, one more rounding per Chan merge, plus the stored rounding.
    mean_tol = mean_atol(x.abs().max().item(), b, work) * (1 + merges) + half_ulp * np.abs(ref_mean)
    assert_close_each(mean.cpu().numpy(), ref_mean, atol=mean_tol)
    # precision_atol in the moments' dtype; the stream's merges move each covariance by at most
    # streaming_covariance_atol (in the moments' dtype), which moves its inverse by inverse_perturbation_atol;
    # plus the stored rounding of the largest entry.
    streamed = [streaming_covariance_atol(v[:, :, p], dtype=work) for p in range(v.shape[2])]
    stream_term = max(inverse_perturbation_atol(a, da) for a, da in zip(covariances, streamed))
    atol = precision_atol(covariances, b, work) + stream_term + half_ulp * np.abs(ref_precision).max()
    assert_close_each(precision.cpu().numpy(), ref_precision, atol=atol)
    got = mvg.mahalanobis(q.to(device))
    assert got.device.type == device
    delta = q.double().numpy().reshape(6, c, -1) - ref_mean
    want = np.sqrt(np.einsum("bcp,pcd,bdp->bp", delta, ref_precision, delta)).reshape(got.shape)
    # mahalanobis_tolerances of a float32 fit and evaluation (the mean's error as above); the stream's and the
    # stored rounding's |dP|₂ (inverse_perturbation_atol is a 2-norm bound; c·max|dP_ij| bounds the rounding's)
    # move d² by at most |δ|² |dP|₂ <= d² |dP|₂ λmax(A): half of that relative to d.
    rtol, mean_part = mahalanobis_tolerances(covariances, b, float(np.max(mean_tol)), np.float32)
    dp = stream_term + c * half_ulp * np.abs(ref_precision).max()
    extra = 0.5 * dp * max(np.linalg.eigvalsh(a)[-1] for a in covariances)
    assert_close_each(got.cpu().numpy(), want, rtol=rtol + extra, atol=mean_part)
