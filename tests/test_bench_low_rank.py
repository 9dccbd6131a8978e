"""Smoke test of benchmarks/bench_low_rank.py at tiny sizes: rows, fields and accuracy (no timing assertions)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import bench_low_rank as bench

#: Tiny sizes: N < C everywhere (r = N - 1), two streamed sizes, a small machine floor.
TINY = {
    "fit_shape": (10, 24, 3, 3), "n_test": 3, "rounds": 1, "first_calls": 1, "score_rounds": 1,
    "stream": {"channels": 24, "height": 4, "width": 4, "batch": 5, "images": (10, 15)},
    "accuracy": {"channels": 24, "height": 2, "width": 2, "batch": 4, "images": 12},
    "floor": {"exp_repeats": 1, "gemm_n": 64, "copy_mib": 1},
}


def test_round_robin_keeps_the_best_and_the_last_result():
    calls = []
    timing = bench.round_robin({"a": lambda: calls.append("a") or len(calls), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # one warm-up each, then turns
    assert timing["a"]["result"] == 7 and len(timing["a"]["walls"]) == 3
    assert timing["a"]["best"] == min(timing["a"]["walls"]) <= timing["a"]["median"]


def test_flop_and_floor_models():
    n, c, p = 100, 550, 256
    assert bench.fit_flops("low_rank", n, c, p) == p * (4 * c * n * n + 8 * n**3)
    assert bench.fit_flops("dense", n, c, p) == pytest.approx(p * (n * c * c + c**3))
    flop_s, byte_s = bench.floor_seconds(1e9, 1e9, {"dgemm_gflops": 10.0, "copy_gbps": 4.0})
    assert flop_s == pytest.approx(0.1) and byte_s == pytest.approx(0.25)
    assert bench.dense_stack_bytes(550, 4096) == 8 * 4096 * 550 * 550


def test_quick_run_writes_rows_with_the_expected_fields(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "RESULTS_PATH", tmp_path / "low_rank.json")
    monkeypatch.setattr(bench, "QUICK", TINY)
    summary = bench.main(quick=True)
    rows = json.loads((tmp_path / "low_rank.json").read_text())
    assert rows == summary["rows"]
    for row in rows:
        assert {"suite", "case", "library", "seconds"} <= set(row)
    by = {(r["suite"], r["library"], r["case"]): r for r in rows}
    n, c, h, w = TINY["fit_shape"]
    p, r = h * w, n - 1
    unit = 8 * p * c * c

    fits = {lib: row for (suite, lib, _), row in by.items() if suite == bench.SUITE_FIT}
    assert set(fits) == set(bench.FIT_CONFIGS) | {bench.LOW_PRECISION}
    for lib in bench.FIT_CONFIGS:
        row = fits[lib]
        for key in ("seconds", "median_seconds", "first_call_seconds", "gflop", "floor_seconds", "x_floor", "state_bytes",
                    "peak_traced_bytes", "speedup_vs_dense", "speedup_vs_dense_lean"):
            assert row[key] > 0, (lib, key)
        # Issue 12's floor: the flops at the dgemm rate PLUS the bytes at the copy bandwidth (benchmarks/_floor.py).
        assert row["floor_seconds"] == pytest.approx(row["floor_flop_seconds"] + row["floor_byte_seconds"])
        assert row["seconds"] <= row["median_seconds"] and row["first_call_seconds"] == min(row["first_call_runs"])
        assert row["state_over_dense_stack"] == pytest.approx(row["state_bytes"] / unit)
    # The state is exactly mean + basis + eigenvalues + log_det (float64 here): P·C·r + P·r + C·P + P numbers.
    low = fits[bench.LOW]
    assert low["state_bytes"] == 8 * (p * c * r + p * r + c * p + p)
    assert fits[bench.DENSE_LEAN]["state_bytes"] >= unit and fits[bench.DENSE]["state_bytes"] >= 3 * unit
    assert {"speed_target_met", "memory_target_met", "met"} <= set(low)
    # Bounds: the low-rank precision is exact algebra on the same float64 moments; both fits are accurate
    # to about cond(Σ)·eps (cond <= ~1e3 here), measured ~1e-13, so 1e-9 flags a real error, not rounding.
    assert low["max_rel_diff"] < 1e-9 and low["log_det_max_rel_diff"] < 1e-9 and low["precision_symmetric"]
    assert fits[bench.LOW_PRECISION]["precision_symmetric"]
    # float32 storage of the basis and eigenvalues: the precision to ~1e-7 relative (float32 eps 6e-8).
    assert fits[bench.LOW32]["max_rel_diff"] < 1e-5

    scores = {lib: row for (suite, lib, _), row in by.items() if suite == bench.SUITE_SCORE}
    assert set(scores) == {bench.DENSE_LEAN, bench.LOW}
    score = scores[bench.LOW]
    assert score["seconds"] > 0 and score["speedup_vs_dense"] > 0 and score["throughput_patch_samples_per_s"] > 0
    assert all(row["x_floor"] > 0 and row["median_seconds"] >= row["seconds"] for row in scores.values())
    # Same bound and reason as the precision: distances and log-densities of the same model, float64.
    assert score["max_rel_diff"] < 1e-9 and score["logpdf_max_rel_diff"] < 1e-9 and score["accuracy_target_met"]

    (accuracy,) = [row for (suite, _, _), row in by.items() if suite == bench.SUITE_STREAM_ACCURACY]
    # Any split of the stream gives the one-shot fit to rounding; the dense fit as above.
    assert accuracy["rel_diff_vs_one_shot"] < 1e-10 and accuracy["max_rel_diff"] < 1e-9 and accuracy["met"]
    assert accuracy["log_det_rel_diff_vs_dense"] < 1e-9

    streamed = [row for row in rows if row["suite"] == bench.SUITE_STREAM]
    assert {(row["library"], row["size"]) for row in streamed} == {
        (lib, size) for lib in bench.STREAM_CONFIGS for size in TINY["stream"]["images"]
    }
    for row in streamed:
        assert row["peak_rss_bytes"] >= row["baseline_rss_bytes"] > 0 and row["log_det_finite"]
        assert row["seconds"] == pytest.approx(row["stream_seconds"] + row["finalise_seconds"])
        assert row["peak_ratio_low_rank_over_dense"] > 0 and row["time_ratio_dense_over_low_rank"] > 0
        assert row["state_bytes"] > 0 and row["size_label"] == "N (images)"

    machine = next(row for row in rows if row["suite"] == bench.SUITE_MACHINE)
    assert machine["seconds"] is None and machine["dgemm_gflops"] > 0 and machine["copy_gbps"] > 0

    assert summary["suite"] == "low_rank" and np.isfinite(summary["max_rel_diff"])
    assert summary["max_rel_diff"] < 1e-9
    out = capsys.readouterr().out
    assert "targets:" in out and "machine floor" in out


def test_report_includes_the_suite(tmp_path, monkeypatch):
    from benchmarks import report

    rows = [
        {"suite": bench.SUITE_STREAM, "case": f"C=24 4x4 N={n} B=5", "library": lib, "seconds": sec, "size": n,
         "size_label": "N (images)"}
        for n, lib, sec in [(10, bench.STREAM_LOW, 0.1), (15, bench.STREAM_LOW, 0.2), (10, bench.STREAM_DENSE, 0.3)]
    ]
    rows.append({"suite": bench.SUITE_MACHINE, "case": "this machine", "library": "x", "seconds": None})
    (tmp_path / "low_rank.json").write_text(json.dumps(rows))
    written = report.build_report(tmp_path)
    assert tmp_path / "low_rank.png" in written
    assert "## low_rank" in (tmp_path / "summary.md").read_text()
