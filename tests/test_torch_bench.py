"""Smoke test of benchmarks/bench_torch.py at quick sizes: rows, fields and accuracy (no timing assertions)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from benchmarks import _anomalib_peer, _floor, bench_torch  # noqa: E402


def test_quick_run_writes_rows_with_ratios_floors_and_small_differences(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_torch, "RESULTS_PATH", tmp_path / "torch.json")
    # Fresh-process first calls are covered by test_first_call_factories (each costs a torch import here).
    summary = bench_torch.main(quick=True, download=False, first_calls=False)
    rows = json.loads((tmp_path / "torch.json").read_text())
    assert rows == summary["rows"]
    floor_row = rows[-1]
    assert floor_row["suite"] == _floor.SUITE and floor_row["seconds"] is None
    assert floor_row["torch_exp32_ns"] > 0 and floor_row["machine"]["cores"] >= 1
    timed = rows[:-1]
    assert {r["suite"] for r in timed} >= {"kde_forward", "mvg_fit", "padim_score"}
    for row in timed:
        assert {"suite", "case", "library", "seconds", "device"} <= set(row) and row["seconds"] > 0
        assert row["x_floor"] > 0
    # The peers are anomalib 2.7.0's own classes when the wheel is in .whl/, else the re-implementation,
    # and the rows say which.
    _, _, note = _anomalib_peer.load_anomalib_stats()
    peer = _anomalib_peer.peer_name(note)
    assert floor_row["peer_source"] == note
    assert {r["library"] for r in timed if r["suite"] == "kde_forward"} == {bench_torch.OURS, peer}
    assert {r["library"] for r in timed if r["suite"] == "mvg_fit"} == {bench_torch.OURS, peer, bench_torch.CORE}
    ours = [r for r in timed if r["library"] == bench_torch.OURS]
    assert all("ratio" in r and "max_rel_diff" in r and r["peer"] == peer for r in ours)
    fit = next(r for r in ours if r["suite"] == "mvg_fit")
    assert fit["over_core"] == pytest.approx(fit["seconds"] / fit["core_seconds"])
    # The two CPU workloads are headline rows with their targets.
    heads = {r["suite"]: r for r in ours if r.get("headline")}
    assert set(heads) == {"kde_forward", "mvg_fit"}
    assert "<= 1.5x floor" in heads["kde_forward"]["targets"] and f">= 10x {peer}" in heads["kde_forward"]["targets"]
    assert "<= 1.15x the core's time" in heads["mvg_fit"]["targets"] and isinstance(heads["mvg_fit"]["met"], bool)
    # Bound: both sides run in float32; anomalib's explicit inverse of the ridge-regularised covariance
    # (condition number below ~1e2 at these sizes) is off by about κ·C·eps32 ~ 1e-4 relative.
    assert summary["max_rel_diff"] < 1e-3
    core = next(r for r in timed if r["library"] == bench_torch.CORE)
    assert core["max_rel_diff"] < 1e-3  # the same bound: float32 precision against the core's float64
    out = capsys.readouterr().out
    assert "kde_forward" in out and "peers: " in out


@pytest.mark.parametrize(("workload", "sizes", "library"), [
    ("kde", [200, 5, 3], "ours"), ("kde", [200, 5, 3], "anomalib"),
    ("mvg", [6, 3, 2, 2], "ours"), ("mvg", [6, 3, 2, 2], "anomalib"), ("mvg", [6, 3, 2, 2], "core"),
])
def test_first_call_factories(workload, sizes, library):
    work = bench_torch.first_call_work(workload, sizes, library)
    assert callable(work) and work() is None
