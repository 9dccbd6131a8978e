"""``anomstats validate``: error measures, rows, exit status, JSON, progress bar, failure handling."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import anomstats
from anomstats.cli import _optional, main, validate
from anomstats.cli.progress import ProgressBar
from anomstats.cli.validate import Check, Comparison, Row, compare, format_table, run_validation

ROW_KEYS = {"what", "case", "max_abs_error", "max_rel_error", "tolerance", "status", "reason", "seconds"}


# ---- compare ---------------------------------------------------------------------------------------


@given(hnp.arrays(np.float64, hnp.array_shapes(max_dims=3, max_side=5), elements=st.floats(-1e6, 1e6)))
def test_compare_identical_arrays_pass_with_zero_error(a):
    assert compare(a, a.copy(), 0.0) == (0.0, 0.0, "")


@given(
    hnp.arrays(np.float64, st.integers(1, 20), elements=st.floats(0.5, 1e3)),
    st.floats(1e-9, 1e-3),
)
def test_compare_elementwise_relative_error_is_measured(e, delta):
    a = e * (1.0 + delta)
    abs_err, rel_err, reason = compare(a, e, 1.0)
    assert rel_err == pytest.approx(delta, rel=1e-6)
    assert abs_err == pytest.approx(np.max(np.abs(a - e)))
    assert reason == ""
    # The same error fails a tolerance just below it, and the reason says so.
    _, _, reason = compare(a, e, delta / 2)
    assert "above tolerance" in reason


def test_compare_normwise_divides_by_the_largest_reference_entry():
    expected = np.array([[100.0, 1e-12], [1e-12, 100.0]])
    actual = expected + np.array([[0.0, 1e-10], [1e-10, 0.0]])
    _, rel_norm, why_norm = compare(actual, expected, 1e-11, "normwise")
    _, rel_elem, why_elem = compare(actual, expected, 1e-11, "elementwise")
    assert rel_norm == pytest.approx(1e-12) and why_norm == ""
    assert rel_elem == pytest.approx(100.0) and why_elem != ""


def test_compare_zero_reference_requires_zero():
    assert compare([0.0, 1.0], [0.0, 1.0], 1e-12)[2] == ""
    _, rel, reason = compare([1e-300, 1.0], [0.0, 1.0], 1e-12)
    assert rel == float("inf") and reason


def test_compare_nonfinite_must_match():
    assert compare([np.nan, np.inf, 1.0], [np.nan, np.inf, 1.0], 1e-12)[2] == ""
    reason = compare([np.nan, 1.0], [1.0, 1.0], 1e-12)[2]
    assert reason.startswith("non-finite mismatch at index (0,)")
    assert compare([-np.inf], [np.inf], 1e-12)[2].startswith("non-finite mismatch")


def test_compare_shape_mismatch_and_bad_metric():
    assert compare(np.ones((2, 3)), np.ones((3, 2)), 1.0)[2] == "shape (2, 3) differs from the expected (3, 2)"
    with pytest.raises(ValueError, match="metric must be"):
        compare([1.0], [1.0], 1.0, metric="max")


def test_compare_does_not_modify_inputs():
    a = np.array([1.0, np.nan, 3.0])
    e = np.array([1.0, np.nan, 2.0])
    a0, e0 = a.copy(), e.copy()
    compare(a, e, 1e-12)
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(e, e0)


# ---- running checks ----------------------------------------------------------------------------


def _check(result, *, case="c", reference=""):
    def run():
        if isinstance(result, BaseException):
            raise result
        return result

    return Check("thing vs ref", case, run, reference=reference)


def test_a_raising_component_becomes_a_fail_row_with_the_reason():
    rows = run_validation(
        checks=[
            _check(NotImplementedError()),
            _check(NotImplementedError("GaussianKDE.pdf")),
            _check(ValueError("bad shape")),
            _check([Comparison("q", [1.0], [1.0], 1e-12)], reference="numpy"),
        ],
        progress=False,
    )
    assert [r.status for r in rows] == ["FAIL", "FAIL", "FAIL", "PASS"]
    where = f"(raised in {__name__}._check.<locals>.run)"
    assert rows[0].reason == f"not implemented {where}"
    assert rows[1].reason == f"not implemented: GaussianKDE.pdf {where}"
    assert rows[2].reason == f"ValueError: bad shape {where}"
    assert rows[3].what == "q vs numpy"
    assert rows[0].max_abs_error is None and rows[0].tolerance is None


def test_skipped_checks_are_not_run_and_not_failures():
    rows = run_validation(checks=[Check("w", "c", lambda: 1 / 0, skip_reason="torch is not installed")], progress=False)
    assert [(r.status, r.reason) for r in rows] == [("SKIP", "torch is not installed")]


def test_only_filters_on_name_and_case():
    one = [Comparison("q", [1.0], [1.0], 1e-12)]
    checks = [_check(one, case="offset"), Check("other", "random", lambda: one)]
    assert [r.case for r in run_validation(checks=checks, only="OFFSET", progress=False)] == ["offset"]
    assert [r.case for r in run_validation(checks=checks, only="Other", progress=False)] == ["random"]
    assert run_validation(checks=checks, only="nothing", progress=False) == []


def test_battery_covers_every_case_kind_for_every_component():
    checks = validate.build_battery(quick=True)
    cases = {}
    for c in checks:
        cases.setdefault(c.what, set()).add(c.case)
    for kind in ("random", "offset", "nearly singular", "weighted", "high-dimensional", "float32"):
        assert kind in cases["cov vs numpy"]
        assert kind in cases["GaussianKDE vs scipy"]
    assert any("anomstats_torch" in w for w in cases)


def test_torch_rows_are_skipped_when_torch_is_missing(monkeypatch):
    real = _optional.is_installed
    monkeypatch.setattr(_optional, "is_installed", lambda name: name != "torch" and real(name))
    checks = validate.build_battery(quick=True)
    torch_checks = [c for c in checks if c.what.startswith("anomstats_torch")]
    assert torch_checks and all(c.skip_reason and "torch is not installed" in c.skip_reason for c in torch_checks)


def test_format_table_lists_every_row_and_the_counts():
    rows = [
        Row("cov vs numpy", "random", 0.0, 0.0, 1e-12, "PASS"),
        Row("GaussianKDE", "offset", None, None, None, "FAIL", "not implemented"),
        Row("torch", "float32", None, None, None, "SKIP", "torch is not installed"),
    ]
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["what", "case"]
    assert "FAIL  not implemented" in lines[2]
    assert lines[-1] == "1 passed, 1 failed, 1 skipped"


# ---- the command line -------------------------------------------------------------------------------


def test_validate_quick_cov_passes_and_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    status = main(["validate", "--quick", "--only", "cov vs numpy", "--json", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert status == 0
    assert payload["passed"] is True
    assert set(payload["versions"]) >= {"anomstats", "numpy", "scipy", "torch"}
    assert payload["settings"] == {"quick": True, "seed": 0, "only": "cov vs numpy", "torch_device": "cpu"}
    assert payload["rows"] and all(set(r) == ROW_KEYS for r in payload["rows"])
    assert {r["case"] for r in payload["rows"]} == {
        "random", "offset", "nearly singular", "weighted", "high-dimensional", "float32"
    }
    assert all(r["status"] == "PASS" and r["max_rel_error"] <= r["tolerance"] for r in payload["rows"])
    assert printed.splitlines()[-2].endswith("0 failed, 0 skipped") and f"wrote {out}" in printed


def test_a_wrong_component_makes_validate_fail(monkeypatch, tmp_path, capsys):
    def slightly_wrong_cov(*args, **kwargs):
        return np.cov(*args, **kwargs) * (1.0 + 1e-9)

    monkeypatch.setattr(anomstats, "cov", slightly_wrong_cov)
    out = tmp_path / "r.json"
    status = main(["validate", "--quick", "--only", "cov vs numpy", "--json", str(out), "--no-progress"])
    payload = json.loads(out.read_text())
    assert status == 1 and payload["passed"] is False
    failing = [r for r in payload["rows"] if r["status"] == "FAIL"]
    assert failing and all(r["what"].startswith("cov") for r in failing)
    assert all("above tolerance 1e-12" in r["reason"] for r in failing)
    assert "FAIL" in capsys.readouterr().out


def test_a_placeholder_component_fails_without_crashing(monkeypatch, capsys):
    class Placeholder:
        def __init__(self, *args, **kwargs):
            raise NotImplementedError

    monkeypatch.setattr(anomstats, "GaussianKDE", Placeholder)
    status = main(["validate", "--quick", "--only", "GaussianKDE vs scipy", "--no-progress"])
    lines = capsys.readouterr().out.splitlines()
    assert status == 1
    body = lines[1:-1]
    n_kde_checks = sum(c.what == "GaussianKDE vs scipy" for c in validate.build_battery(quick=True))
    assert n_kde_checks >= 8 and len(body) == n_kde_checks
    assert all("FAIL  not implemented (raised in " in line for line in body)
    assert all(line.rstrip().endswith("<locals>.Placeholder.__init__)") for line in body)


def test_only_matching_nothing_exits_2(capsys):
    assert main(["validate", "--only", "no such check"]) == 2
    assert "no check matches" in capsys.readouterr().err


def test_full_quick_run_exit_status_agrees_with_rows(tmp_path):
    # Whatever state the components are in, the run completes and the exit status tells the truth.
    out = tmp_path / "all.json"
    proc = subprocess.run(
        [sys.executable, "-m", "anomstats", "validate", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    payload = json.loads(out.read_text())
    statuses = [r["status"] for r in payload["rows"]]
    assert set(statuses) <= {"PASS", "FAIL", "SKIP"} and len(statuses) >= 40
    assert proc.returncode == (1 if "FAIL" in statuses else 0), proc.stdout[-2000:]
    assert payload["passed"] == ("FAIL" not in statuses)
    assert "Traceback" not in proc.stderr
    assert "\r[" not in proc.stderr  # not a terminal: no progress bar


# ---- progress bar -----------------------------------------------------------------------------------


def test_progress_bar_draws_when_enabled_and_erases_on_close():
    out = io.StringIO()
    bar = ProgressBar(3, stream=out, enabled=True, width=6)
    bar.advance("a long label")
    bar.advance("b")
    assert out.getvalue().split("\r")[2].startswith("[####..] 2/3 b")
    bar.close()
    assert out.getvalue().endswith("\r")


def test_progress_bar_is_silent_when_the_stream_is_not_a_terminal():
    out = io.StringIO()
    bar = ProgressBar(2, stream=out)
    bar.advance("x")
    bar.close()
    assert out.getvalue() == ""


def test_progress_bar_rejects_bad_arguments():
    with pytest.raises(ValueError, match="total must be >= 0"):
        ProgressBar(-1)
    with pytest.raises(ValueError, match="width must be >= 1"):
        ProgressBar(1, width=0)


def test_run_validation_draws_the_bar_on_the_given_stream():
    out = io.StringIO()
    run_validation(checks=[_check([]), _check([])], progress=True, stream=out)
    assert "2/2" in out.getvalue()


def test_progress_bar_describe_redraws_without_counting():
    out = io.StringIO()
    bar = ProgressBar(2, stream=out, enabled=True, width=4)
    bar.describe("running first")
    assert bar.done == 0 and out.getvalue().endswith("[....] 0/2 running first")
    bar.advance("first")
    assert bar.done == 1


def test_bad_torch_device_is_refused_before_running(capsys):
    pytest.importorskip("torch")
    assert main(["validate", "--quick", "--torch-device", "no-such-device"]) == 2
    err = capsys.readouterr().err
    assert "--torch-device no-such-device: not a torch device" in err


def test_cuda_device_without_cuda_is_refused(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["validate", "--quick", "--torch-device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("seed", ["-1", "1.5", "abc", ""])
@pytest.mark.parametrize("command", ["validate", "demo"])
def test_seed_is_checked_before_anything_runs(command, seed, monkeypatch, capsys):
    import anomstats.cli.demo as demo_module

    def must_not_run(*args, **kwargs):
        raise AssertionError("the work ran before --seed was checked")

    monkeypatch.setattr(validate, "run_validation", must_not_run)
    monkeypatch.setattr(demo_module, "run_demo", must_not_run)
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--seed", seed])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--seed: must be a non-negative integer" in err
    assert ("got -1" if seed == "-1" else f"got {seed!r}") in err  # the value received, as argparse read it


def test_unwritable_output_paths_fail_before_the_work(tmp_path, monkeypatch, capsys):
    import anomstats.cli.validate as validate_module
    import anomstats.cli.demo as demo_module

    def must_not_run(*args, **kwargs):
        raise AssertionError("the checks ran before the output path was checked")

    monkeypatch.setattr(validate_module, "run_validation", must_not_run)
    monkeypatch.setattr(demo_module, "run_demo", must_not_run)
    missing = tmp_path / "no-such-folder" / "report.json"
    assert main(["validate", "--quick", "--json", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["validate", "--quick", "--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["demo", "--quick", "--out", str(missing)]) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["name over 255 bytes", "under a file", "/proc as root"])
@pytest.mark.parametrize("command, option", [("validate", "--json"), ("demo", "--out")])
def test_output_paths_that_cannot_be_opened_fail_before_the_work(case, command, option, tmp_path, monkeypatch, capsys):
    import os

    import anomstats.cli.demo as demo_module

    def must_not_run(*args, **kwargs):
        raise AssertionError("the work ran before the output path was checked")

    monkeypatch.setattr(validate, "run_validation", must_not_run)
    monkeypatch.setattr(demo_module, "run_demo", must_not_run)
    if case == "name over 255 bytes":
        path, code = tmp_path / ("a" * 300 + ".json"), "ENAMETOOLONG"  # os.access says writable: the folder is
    elif case == "under a file":
        (tmp_path / "a-file.txt").write_text("")
        path, code = tmp_path / "a-file.txt" / "report.json", "ENOTDIR"
    else:
        if not (hasattr(os, "geteuid") and os.geteuid() == 0 and os.path.isdir("/proc/self")):
            pytest.skip("needs root and /proc: os.access grants root every write, /proc refuses new files")
        path, code = "/proc/anomstats-report.json", None  # ENOENT (or EACCES, by kernel)
    assert main([command, "--quick", option, str(path)]) == 2
    err = capsys.readouterr().err
    # The option, the path and the OS error, on one line; no traceback; nothing left behind.
    assert f"anomstats {command}: error: {option} {path}: cannot be opened for writing: " in err
    assert code is None or f"({code})" in err
    assert "Traceback" not in err
    assert not os.path.lexists(path)


def test_checking_an_output_path_leaves_no_file_and_keeps_an_existing_one(tmp_path):
    from anomstats.cli.commands import _unwritable

    new = tmp_path / "new.json"
    assert _unwritable(str(new)) is None and not new.exists()  # created to try, then removed
    existing = tmp_path / "old.json"
    existing.write_text("kept")
    assert _unwritable(str(existing)) is None and existing.read_text() == "kept"  # opened for append only
