"""Smoke test of benchmarks/bench_torch.py at quick sizes: rows, fields and accuracy (no timing assertions)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from benchmarks import bench_torch  # noqa: E402


def test_quick_run_writes_rows_with_ratios_and_small_differences(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_torch, "RESULTS_PATH", tmp_path / "torch.json")
    summary = bench_torch.main(quick=True)
    rows = json.loads((tmp_path / "torch.json").read_text())
    assert rows == summary["rows"]
    assert {r["suite"] for r in rows} >= {"kde_forward", "mvg_fit", "padim_score"}
    for row in rows:
        assert {"suite", "case", "library", "seconds", "device"} <= set(row) and row["seconds"] > 0
    ours = [r for r in rows if r["library"] == bench_torch.OURS]
    assert all("ratio" in r and "max_rel_diff" in r for r in ours)
    # Bound: both sides run in float32; anomalib's explicit inverse of the ridge-regularised covariance
    # (condition number below ~1e2 at these sizes) is off by about κ·C·eps32 ~ 1e-4 relative.
    assert summary["max_rel_diff"] < 1e-3
    assert "kde_forward" in capsys.readouterr().out
