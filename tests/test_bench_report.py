"""``make bench`` plumbing: the report from synthetic result JSON, suite discovery and isolated runs."""

from __future__ import annotations

import json
import textwrap

import pytest

from benchmarks import report, run_all

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write(path, payload):
    path.write_text(json.dumps(payload))


@pytest.fixture
def results(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    _write(
        d / "bench_kde.json",
        [
            {"suite": "pdf", "case": "n=1000 m=1000 d=2", "library": "anomstats", "seconds": 0.01, "ratio": 5.0, "max_rel_diff": 3e-15},
            {"suite": "pdf", "case": "n=1000 m=1000 d=2", "library": "scipy", "seconds": 0.05},
            {"suite": "pdf", "case": "n=4000 m=4000 d=2", "library": "anomstats", "seconds": 0.1, "peak_mib": 12.5},
            {"suite": "pdf", "case": "n=4000 m=4000 d=2", "library": "scipy", "seconds": 0.8},
            {"suite": "logpdf", "case": "offset", "library": "anomstats", "seconds": 0.2, "note": "a|b"},
            {"suite": "logpdf", "case": "nearly singular", "library": "anomstats", "seconds": None, "error": "failed"},
        ],
    )
    _write(d / "bench_cov.json", {"rows": [{"suite": "batched", "case": "(200, 100, 56, 56)", "library": "numpy loop", "seconds": 3.0}]})
    _write(d / "broken.json", {"not": "rows"})
    (d / "garbage.json").write_text("{")
    _write(d / "partial.json", [{"suite": "s", "case": "c"}, "not a row"])
    return d


def test_summary_table_has_the_union_of_keys_and_blank_cells(results):
    before = {p.name: p.read_bytes() for p in results.iterdir()}
    written = report.build_report(results)
    assert {p.name for p in written} == {"summary.md", "bench_kde.png", "bench_cov.png"}
    md = (results / "summary.md").read_text()
    assert "| suite | case | library | seconds | ratio | max_rel_diff | peak_mib | note | error |" in md
    assert "| pdf | n=1000 m=1000 d=2 | anomstats | 0.01 | 5 | 3.00e-15 |  |  |  |" in md
    assert "| pdf | n=1000 m=1000 d=2 | scipy | 0.05 |  |  |  |  |  |" in md
    assert "a\\|b" in md  # a pipe in a value cannot break the table
    assert "## bench_cov" in md and "| batched | (200, 100, 56, 56) | numpy loop | 3 |" in md
    assert "![bench_kde: time against problem size](bench_kde.png)" in md
    # Bad inputs are listed, not fatal.
    assert "broken.json: expected a list of row objects" in md
    assert "garbage.json: unreadable" in md
    assert "partial.json: row 0 lacks library, seconds" in md and "partial.json: row 1 is not an object" in md
    for name in ("bench_kde.png", "bench_cov.png"):
        assert (results / name).read_bytes()[:8] == PNG_SIGNATURE
    # The inputs are untouched.
    assert all((results / n).read_bytes() == b for n, b in before.items())


def test_report_into_another_folder_and_without_results(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    written = report.build_report(empty, out)
    assert written == [out / "summary.md"]
    assert "No benchmark results found." in (out / "summary.md").read_text()


def test_no_plot_when_no_row_is_timed(tmp_path):
    assert report.plot_file("x", [{"suite": "s", "case": "c", "library": "l", "seconds": None}], tmp_path / "x.png") is False
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("row", "size"),
    [
        ({"case": "n=10000 m=10000 d=2"}, 2e8),
        ({"case": "(200, 100, 56, 56)"}, 200 * 100 * 56 * 56),
        ({"case": "5·10^4 points, d=8"}, 4e5),
        ({"case": "n=1e4"}, 1e4),
        ({"case": "anything", "size": 12}, 12.0),
        ({"case": "anything", "size": True}, None),
        ({"case": "offset"}, None),
    ],
)
def test_problem_size(row, size):
    assert report.problem_size(row) == size


def test_format_value():
    assert report.format_value(float("nan")) == "nan"
    assert report.format_value(0.0) == "0"
    assert report.format_value([1, 2]) == "[1,2]"
    assert report.format_value("two\nlines") == "two lines"


def test_report_command_line(results, tmp_path, capsys):
    out = tmp_path / "elsewhere"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    assert f"wrote {out / 'summary.md'}" in capsys.readouterr().out


# ---- run_all -----------------------------------------------------------------------------------------


@pytest.fixture
def fake_suites(tmp_path, monkeypatch):
    pkg = tmp_path / "fakebench"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bench_ok.py").write_text(
        textwrap.dedent(
            """
            import json, os
            def main(quick=False):
                rows = [{"suite": "s", "case": "n=10", "library": "x", "seconds": 0.1, "quick": quick}]
                with open(os.environ["FAKE_OUT"], "w") as fh:
                    json.dump(rows, fh)
                return rows
            """
        )
    )
    (pkg / "bench_crash.py").write_text("def main(quick=False):\n    raise RuntimeError('boom')\n")
    (pkg / "bench_slow.py").write_text("import time\ndef main(quick=False):\n    time.sleep(30)\n")
    (pkg / "bench_nomain.py").write_text("x = 1\n")
    (pkg / "helper.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("FAKE_OUT", str(tmp_path / "ok.json"))
    return pkg


def test_discover_finds_only_bench_modules(fake_suites):
    assert run_all.discover(fake_suites) == ["bench_crash", "bench_nomain", "bench_ok", "bench_slow"]


def test_run_suite_outcomes(fake_suites, tmp_path):
    ok = run_all.run_suite("bench_ok", quick=True, timeout=120, package="fakebench")
    assert ok.ok and ok.error == ""
    assert json.loads((tmp_path / "ok.json").read_text())[0]["quick"] is True
    crash = run_all.run_suite("bench_crash", quick=True, timeout=120, package="fakebench")
    assert not crash.ok and "exited with status 1" in crash.error
    nomain = run_all.run_suite("bench_nomain", quick=True, timeout=120, package="fakebench")
    assert not nomain.ok
    slow = run_all.run_suite("bench_slow", quick=True, timeout=1.5, package="fakebench")
    assert not slow.ok and slow.error == "timed out after 1.5 s"


def test_run_all_rejects_unknown_suites(capsys):
    with pytest.raises(SystemExit) as exc:
        run_all.main(["--only", "no_such_suite"])
    assert exc.value.code == 2
    assert "unknown suite(s) bench_no_such_suite" in capsys.readouterr().err


def test_quick_results_go_aside_and_full_results_are_restored(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "kept.json").write_text("[1]")  # a full result the quick run does not touch
    (results / "cov.json").write_text("[full]")
    saved = run_all._snapshot(results)
    (results / "cov.json").write_text("[quick]")  # what a suite's quick run does
    (results / "new.json").write_text("[quick new]")
    run_all._move_quick_results(results, saved, results / "quick")
    assert (results / "cov.json").read_text() == "[full]"
    assert (results / "kept.json").read_text() == "[1]"
    assert not (results / "new.json").exists()
    assert sorted(p.name for p in (results / "quick").iterdir()) == ["cov.json", "new.json"]
    assert (results / "quick" / "cov.json").read_text() == "[quick]"


# ---- headline table, README section, cost-growth plots (issue 12) ---------------------------------------


def _headline_results(d):
    machine = {"cpu_model": "Test CPU 9000", "cores": 2, "blas": "openblas 0.3 (Zen, 2 threads)", "numpy": "2.4"}
    floor = {"suite": "machine floor", "case": "this machine", "library": "rates", "seconds": None, "exp_ns": 0.5,
             "exp32_ns": 0.3, "dgemm_gflops": 100.0, "sgemm_gflops": 200.0, "copy_gbps": 30.0, "machine": machine}
    _write(d / "kde.json", [
        {"suite": "kde", "case": "n=10 m=10 d=2", "library": "anomstats pdf", "seconds": 0.095, "x_floor": 3.06,
         "first_call_seconds": 0.2, "headline": "KDE pdf (10⁴, 10⁴, 2)", "headline_order": 1, "peers": "5.8x scipy",
         "targets": "<= 2x floor: 3.06x no", "met": False, "target_checks": [{"label": "floor", "met": False}]},
        {"suite": "kde", "case": "n=10 m=10 d=2", "library": "scipy pdf", "seconds": 0.55},
        floor,
    ])
    _write(d / "gaussian.json", [
        {"suite": "mem", "case": "c", "library": "fit peak", "seconds": None, "headline": "fit | peak",
         "headline_order": 0, "headline_value": "740 MiB peak", "targets": "<= 1.1x: 3x no", "met": False},
        {"suite": "cov", "case": "c", "library": "batched_cov", "seconds": 1.5, "headline": "batched_cov",
         "headline_order": 2, "peers": "6x loop", "targets": "", "met": True},
        floor,
    ])


def test_summary_starts_with_the_headline_table_and_the_machine(tmp_path):
    _headline_results(tmp_path)
    report.build_report(tmp_path, plots=False)
    md = (tmp_path / "summary.md").read_text()
    head = md.split("## gaussian")[0]
    assert "## Headline figures (issue 12)" in head
    # One line per distinct machine (both files recorded the same one), then each suite's rates.
    assert "Ran on: Test CPU 9000, 2 cores, BLAS openblas 0.3 (Zen, 2 threads); numpy 2.4.\n" in head
    assert "| gaussian | 0.50 / 0.30 | 100 / 200 | 30 |  |" in head and "| kde | 0.50 / 0.30 | 100 / 200 | 30 |  |" in head
    assert "| workload | ours | first call | × floor | peer ratios | issue targets | met |" in head
    # ordered by headline_order; a memory row shows its own value; a pipe in a name cannot break the table;
    # a row without issue targets leaves "met" blank.
    lines = [line for line in head.splitlines() if line.startswith("| ") and "workload" not in line]
    assert lines[0] == "| fit \\| peak | 740 MiB peak |  |  |  | <= 1.1x: 3x no | no |"
    assert lines[1] == "| KDE pdf (10⁴, 10⁴, 2) | 95 ms | 200 ms | 3.1x | 5.8x scipy | <= 2x floor: 3.06x no | no |"
    assert lines[2] == "| batched_cov | 1.5 s |  |  | 6x loop |  |  |"
    # Bookkeeping fields stay out of the per-file tables.
    assert "target_checks" not in md and "headline_order" not in md and "Test CPU 9000\"" not in md


def test_readme_section_is_rewritten_between_the_markers_only(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    _headline_results(results)
    readme = tmp_path / "README.md"
    before, after = "# Title\n\nintro\n\n## Benchmarks\n\n", "\n\n## Later section\n\ntext\n"
    readme.write_text(before + report.README_BEGIN + "\nold table\n" + report.README_END + after)
    written = report.build_report(results, plots=False, readme=readme)
    assert readme in written
    text = readme.read_text()
    assert text.startswith(before + report.README_BEGIN + "\n") and text.endswith(report.README_END + after)
    block = text[text.index(report.README_BEGIN) + len(report.README_BEGIN): text.index(report.README_END)]
    assert "old table" not in block and "Ran on: Test CPU 9000, 2 cores" in block
    assert "| KDE pdf (10⁴, 10⁴, 2) | 95 ms | 200 ms | 3.1x |" in block and "benchmarks/results/kde.png" in block
    # Run again: the same README (idempotent apart from the time stamp).
    report.build_report(results, plots=False, readme=readme)
    assert readme.read_text().count(report.README_BEGIN) == 1


def test_readme_left_alone_without_markers_or_without_headline_rows(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    _headline_results(results)
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    assert readme not in report.build_report(results, plots=False, readme=readme)
    assert readme.read_text() == "# no markers\n"
    assert "README.md left alone: no <!-- bench-table:begin -->" in (results / "summary.md").read_text()
    plain = tmp_path / "plain"
    plain.mkdir()
    _write(plain / "x.json", [{"suite": "s", "case": "c", "library": "l", "seconds": 1.0}])
    readme.write_text(report.README_BEGIN + "\nkeep\n" + report.README_END + "\n")
    report.build_report(plain, plots=False, readme=readme)
    assert "keep" in readme.read_text()
    assert "left alone: no headline rows" in (plain / "summary.md").read_text()


def test_loglog_slope():
    assert report.loglog_slope([1e3, 1e4, 1e5], [2e-3, 2e-2, 2e-1]) == pytest.approx(1.0)
    assert report.loglog_slope([1.0, 4.0], [1.0, 2.0]) == pytest.approx(0.5)
    assert report.loglog_slope([5.0, 5.0], [1.0, 2.0]) is None
    assert report.loglog_slope([1.0, 0.0, 10.0], [1.0, 1.0, 0.0]) is None  # non-positive points are dropped


def test_growth_panels_get_a_slope_reference(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    drawn = []
    original = Axes.plot

    def recording(self, *args, **kwargs):
        drawn.append((kwargs.get("label"), [list(a) for a in args if isinstance(a, list)]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", recording)
    rows = [{"suite": "KDE pdf", "case": f"n={n}", "library": lib, "seconds": sec, "size": n * n,
             "size_label": "n·m", "slope_reference": True}
            for n in (100, 200, 400) for lib, sec in (("anomstats", n * n * 1e-8), ("floor", (n * n) ** 0.5 * 1e-6))]
    path = tmp_path / "growth.png"
    assert report.plot_file("growth", rows, path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    labels = [label for label, _ in drawn]
    assert labels == ["anomstats (slope 1.00)", "floor (slope 0.50)", "slope 1 (linear)"]
    # The reference line ends at the first library's largest point and has slope 1 from the smallest size.
    (x0, x1), (y0, y1) = drawn[-1][1]
    assert (x0, x1) == (1e4, 1.6e5) and y1 == pytest.approx(1.6e5 * 1e-8) and y0 / y1 == pytest.approx(x0 / x1)
    # Without slope_reference: no reference line, plain labels.
    drawn.clear()
    report.plot_file("plain", [{**r, "slope_reference": False} for r in rows], tmp_path / "plain.png")
    assert [label for label, _ in drawn] == ["anomstats", "floor"]
