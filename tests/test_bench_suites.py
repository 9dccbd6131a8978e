"""Smoke tests of the floor-measured suites (bench_kde, bench_gaussian, bench_cov, bench_growth, bench_padim_memory)
at tiny sizes: rows, floor fractions, first calls, headline rows and targets (no timing assertions)."""

from __future__ import annotations

import json

import pytest

from benchmarks import _floor

TINY_FLOOR = {"exp_repeats": 1, "gemm_n": 48, "copy_mib": 1}


@pytest.fixture(autouse=True)
def _tiny_floor(monkeypatch):
    monkeypatch.setattr(_floor, "QUICK_SIZES", TINY_FLOOR)


def _rates(rows):
    (row,) = [r for r in rows if r["suite"] == _floor.SUITE]
    assert row["seconds"] is None and row["machine"]["cpu_model"]
    return row


def test_kde_suite(tmp_path, monkeypatch):
    from benchmarks import bench_kde

    monkeypatch.setattr(bench_kde, "RESULTS_PATH", tmp_path / "kde.json")
    monkeypatch.setattr(bench_kde, "QUICK_CASES", [(60, 40, 2)])
    summary = bench_kde.main(quick=True)
    rows = json.loads((tmp_path / "kde.json").read_text())
    assert rows == summary["rows"]
    rates = _rates(rows)
    floor = _floor.kde_floor(60, 40, 2, "float64", rates)
    by = {r["library"]: r for r in rows if r["suite"] == bench_kde.SUITE}
    for library in ("scipy pdf", "scipy logpdf", "anomstats pdf", "anomstats logpdf"):
        row = by[library]
        # Same floor for every contender of a case: x_floor is the time over it (one division).
        assert row["x_floor"] == pytest.approx(row["seconds"] / floor["seconds"], rel=1e-12)
        assert row["first_call_seconds"] > 0 and row["size"] == 60 * 40
    for method, ratio_target in (("pdf", 3.0), ("logpdf", 8.0)):
        ours = by[f"anomstats {method}"]
        assert ours["headline"] == f"KDE {method} (60, 40, 2)" and ours["target"] == ratio_target
        assert ours["floor_met"] == (ours["x_floor"] <= bench_kde.FLOOR_TARGET)
        assert ours["ratio_met"] == (ours["ratio"] >= ratio_target)
        assert ours["met"] == (ours["floor_met"] and ours["ratio_met"])
        assert ours["targets"].startswith("<= 2x floor: ") and f">= {ratio_target:g}x scipy {method}" in ours["targets"]
        # Bound: scipy's and our float64 sums of at most 60 terms: relative differences of ~n·eps, far below 1e-9.
        assert ours["max_rel_diff_bulk"] < 1e-9
    assert summary["all_targets_met"] == all(r.get("met") is not False for r in rows if "anomstats" in r["library"])


def test_gaussian_suite(tmp_path, monkeypatch):
    from benchmarks import bench_gaussian

    monkeypatch.setattr(bench_gaussian, "RESULTS_PATH", tmp_path / "gaussian.json")
    monkeypatch.setattr(bench_gaussian, "QUICK", {"fits": [(12, 4, 3, 3), (10, 5, 2, 2)], "repeats": [1, 1],
                                                  "ref_repeats": 1, "score": ((12, 4, 3, 3), 2, 1)})
    summary = bench_gaussian.main(quick=True)
    rows = json.loads((tmp_path / "gaussian.json").read_text())
    assert rows == summary["rows"]
    rates = _rates(rows)
    fit = [r for r in rows if r["suite"] == bench_gaussian.SUITE_FIT and r["case"] == "fit float32 (12, 4, 3, 3)"]
    by = {r["library"]: r for r in fit}
    main = by[bench_gaussian.DEFAULT]
    floor = _floor.fit_floor(12, 4, 9, "float32", rates, out_dtype="float64")
    assert main["x_floor"] == pytest.approx(main["seconds"] / floor["seconds"], rel=1e-12)
    # First calls in fresh processes: ours and both loops; the ratio is against the faster loop.
    firsts = [by[bench_gaussian.LOOP]["first_call_seconds"], by[bench_gaussian.LOOP_1T]["first_call_seconds"]]
    assert main["first_call_ratio_vs_best_reference"] == pytest.approx(min(firsts) / main["first_call_seconds"])
    assert main["headline"] == "MVG core fit float32 (12, 4, 3, 3)"
    for text in ("<= 2.5x floor", ">= 3x numpy loop, warm", ">= 2.5x numpy loop, first call"):
        assert text in main["targets"]
    # Memory: peak over (what scoring needs + the work budget); the needs are mean, precision, log-dets.
    (memory,) = [r for r in rows if r["suite"] == bench_gaussian.SUITE_MEMORY]
    needed = (4 * 9 + 9 * 16 + 9) * 8
    assert memory["needed_mib"] * 2**20 == needed and memory["seconds"] is None
    assert memory["peak_over_needed_plus_budget"] == pytest.approx(
        memory["peak_mib"] / (memory["needed_mib"] + memory["budget_mib"]))
    assert memory["met"] == (memory["peak_over_needed_plus_budget"] <= bench_gaussian.MEMORY_TARGET)
    assert "MiB peak" in memory["headline_value"]
    # Only the case (the first shape) gets first calls and headlines.
    second = [r for r in rows if r.get("case") == "fit float32 (10, 5, 2, 2)"]
    assert second and not any(r.get("headline") or r.get("first_call_seconds") for r in second)
    # Bound: float64 fits of the same data, the core's (Cholesky) against numpy's inv: κ·eps ~ 1e-14.
    assert max(r["max_rel_diff"] for r in fit if "max_rel_diff" in r) < 1e-9
    scores = [r for r in rows if r["suite"] == bench_gaussian.SUITE_SCORE]
    assert len(scores) == 3 and all(r["x_floor"] > 0 for r in scores)


def test_cov_suite(tmp_path, monkeypatch):
    from benchmarks import bench_cov

    monkeypatch.setattr(bench_cov, "RESULTS_PATH", tmp_path / "cov.json")
    summary = bench_cov.main(quick=True)
    rows = summary["rows"]
    rates = _rates(rows)
    floor = _floor.cov_floor(20, 8, 49, "float32", rates)
    timed = [r for r in rows if r["suite"] == bench_cov.SUITE]
    assert all(r["x_floor"] == pytest.approx(r["seconds"] / floor["seconds"], rel=1e-12) for r in timed)
    (head,) = [r for r in rows if r.get("headline")]
    assert head["library"] == "anomstats.batched_cov" and "x numpy.cov loop" in head["peers"]


def test_growth_suite(tmp_path, monkeypatch):
    from benchmarks import bench_growth

    monkeypatch.setattr(bench_growth, "RESULTS_PATH", tmp_path / "growth.json")
    monkeypatch.setattr(bench_growth, "QUICK", {"kde": [(50, 40), (100, 80), (200, 160)],
                                                 "fit": [(4, 2, 2), (6, 3, 3), (8, 3, 3)], "repeats": 1})
    summary = bench_growth.main(quick=True)
    rows = json.loads((tmp_path / "growth.json").read_text())
    series = {r["suite"] for r in rows if r.get("slope_reference")}
    assert series == {"KDE pdf, d=8, float64", "KDE logpdf, d=8, float64", "MVG fit, float32, B = 2C"}
    for suite in series:
        ours = [r for r in rows if r["suite"] == suite and r["library"] == bench_growth.OURS]
        floors = [r for r in rows if r["suite"] == suite and r["library"] == bench_growth.FLOOR]
        assert len(ours) == len(floors) == 3
        for o, f in zip(ours, floors):
            assert o["size"] == f["size"] and o["x_floor"] == pytest.approx(o["seconds"] / f["seconds"], rel=1e-12)
        assert ours[0]["fitted_slope"] == pytest.approx(bench_growth.loglog_slope(
            [r["size"] for r in ours], [r["seconds"] for r in ours]))
        floor_slope = bench_growth.loglog_slope([r["size"] for r in floors], [r["seconds"] for r in floors])
        if suite.startswith("KDE"):
            # n·m exponentials and 2·n·m·d flops: the KDE's floor is exactly proportional to n·m.
            assert floor_slope == pytest.approx(1.0, abs=1e-9)
        else:
            # The fit's floor is a sum of P·C^k terms (k = 3: syrk with B = 2C, potrf, potri; k = 2, 1, 0: the
            # bytes of the embedding, the precision, the mean, the log-determinants). Their mix depends on the
            # machine's bandwidth-to-flops ratio, but with P and C growing together each term's secant slope
            # against P·C³ lies in [0, 1], so the floor's does too (mediant inequality), whatever the machine.
            assert all(a["seconds"] < b["seconds"] for a, b in zip(floors, floors[1:]))
            assert 0.0 < floor_slope <= 1.0 + 1e-12
    assert set(summary["slopes"]) == series


def test_padim_stream_rows(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from benchmarks import bench_padim_memory as bench

    monkeypatch.setattr(bench, "RESULTS_PATH", tmp_path / "padim.json")
    summary = bench.main(quick=True, stream=True)
    rows = summary["rows"]
    stream = {r["library"]: r for r in rows if r["suite"] == "padim-550 stream"}
    assert set(stream) == {"anomstats_torch update/compute", "anomstats MultiVariateGaussian() partial_fit",
                           "anomstats dtype=float32 partial_fit", "anomstats low_memory=True float32 partial_fit"}
    for row in stream.values():
        assert row["peak_rss_bytes"] >= row["baseline_rss_bytes"] > 0 and row["precision_finite"]
        assert row["total_seconds"] >= row["seconds"] > 0 and row["x_floor"] > 0
        assert row["precision_shape"] == [64, 16, 16]
    torch_row = stream["anomstats_torch update/compute"]
    assert torch_row["precision_dtype"] == "float32"
    assert "<= 7 GB peak RSS" in torch_row["targets"] and "<= 45 s time" in torch_row["targets"]
    assert torch_row["met"] == (torch_row["peak_rss_bytes"] <= 7e9 and torch_row["seconds"] <= 45)
    assert stream["anomstats MultiVariateGaussian() partial_fit"]["headline"].endswith("core's default partial_fit")
    assert "headline" not in stream["anomstats low_memory=True float32 partial_fit"]
    assert "headline" not in stream["anomstats dtype=float32 partial_fit"]
    assert stream["anomstats dtype=float32 partial_fit"]["precision_dtype"] == "float32"
    assert stream["anomstats MultiVariateGaussian() partial_fit"]["precision_dtype"] == "float64"


def test_padim_measure_reports_a_failed_child():
    from benchmarks import bench_padim_memory as bench

    out = bench.measure("no such kind", channels=4, height=2, width=2, images=4, batch=2)
    assert out["seconds"] is None and "unknown stream kind" in out["error"]
