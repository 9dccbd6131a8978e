"""The benchmarks' floor formulas (benchmarks/_floor.py), machine measurements and fresh-process timing helper.

No timing assertions: the formulas are checked on made-up rates, the measurements only for their fields and
signs, the fresh-process helper for what it reports and how it fails.
"""

from __future__ import annotations

import sys

import pytest

from benchmarks import _common, _floor

#: Made-up rates, round numbers so that every expected value below can be worked out by hand.
RATES = {"exp_ns": 1.0, "exp32_ns": 0.5, "dgemm_gflops": 100.0, "sgemm_gflops": 200.0, "copy_gbps": 10.0, "cores": 2}
# Each floor is a handful of products and one sum of float64 numbers: a relative error of a few eps.
REL = 1e-12


def test_kde_floor_is_exponentials_over_the_cores_plus_gemm_flops():
    f = _floor.kde_floor(10_000, 5_000, 16, "float64", RATES)
    pairs = 10_000 * 5_000
    assert f["exponentials"] == pairs and f["flops"] == 2 * pairs * 16
    assert f["exp_seconds"] == pytest.approx(pairs * 1.0e-9 / 2, rel=REL)
    assert f["gemm_seconds"] == pytest.approx(2 * pairs * 16 / 100e9, rel=REL)
    assert f["seconds"] == pytest.approx(f["exp_seconds"] + f["gemm_seconds"], rel=REL)
    # float32 (the torch forward): the float32 exp rate and sgemm.
    g = _floor.kde_floor(10_000, 5_000, 16, "float32", RATES)
    assert g["exp_seconds"] == pytest.approx(f["exp_seconds"] / 2, rel=REL)
    assert g["gemm_seconds"] == pytest.approx(f["gemm_seconds"] / 2, rel=REL)
    # torch dtypes are understood by name
    assert _floor.kde_floor(10, 10, 2, "torch.float32", RATES) == _floor.kde_floor(10, 10, 2, "float32", RATES)
    # one core: the exponentials are not spread
    one = _floor.kde_floor(10_000, 5_000, 16, "float64", {**RATES, "cores": 1})
    assert one["exp_seconds"] == pytest.approx(2 * f["exp_seconds"], rel=REL)


def test_fit_floor_is_syrk_potrf_potri_at_dgemm_plus_bytes_at_the_copy_rate():
    b, c, p = 200, 100, 3136
    f = _floor.fit_floor(b, c, p, "float32", RATES, out_dtype="float64")
    flops = p * (b * c * c + c**3 / 3 + 2 * c**3 / 3)
    assert _floor.fit_flops(b, c, p) == pytest.approx(flops, rel=REL) == f["flops"]
    # dgemm rate even for float32 input (the definition); bytes: the input read, the precision, the
    # mean and the log-determinants written.
    assert f["gemm_seconds"] == pytest.approx(flops / 100e9, rel=REL)
    nbytes = b * c * p * 4 + p * (c * c + c + 1) * 8
    assert f["bytes"] == nbytes and f["byte_seconds"] == pytest.approx(nbytes / 10e9, rel=REL)
    assert f["seconds"] == pytest.approx(f["gemm_seconds"] + f["byte_seconds"], rel=REL)
    three = _floor.fit_floor(b, c, p, "float32", RATES, out_stacks=3)
    assert three["bytes"] == b * c * p * 4 + p * (3 * c * c + c + 1) * 8
    assert _floor.fit_floor(b, c, p, "float32", RATES, out_dtype="float32")["bytes"] == b * c * p * 4 + p * (c * c + c + 1) * 4


def test_other_floors_and_x_floor():
    cov = _floor.cov_floor(10, 4, 3, "float32", RATES)
    assert cov["flops"] == 3 * 10 * 16 and cov["bytes"] == 10 * 4 * 3 * 4 + 3 * 16 * 8
    score = _floor.score_floor(5, 4, 3, "float32", RATES, precision_dtype="float32")
    assert score["flops"] == 2 * 5 * 16 * 3 and score["bytes"] == 3 * 16 * 4 + 5 * 4 * 3 * 4
    assert score["gemm_seconds"] == pytest.approx(score["flops"] / 200e9, rel=REL)  # float32: sgemm
    low = _floor.score_floor(5, 4, 3, "float32", RATES, rank=2)
    assert low["flops"] == 4 * 5 * 4 * 2 * 3 and low["bytes"] == 3 * 4 * 2 * 8 + 5 * 4 * 3 * 4
    lr = _floor.low_rank_fit_floor(10, 40, 3, "float32", RATES, kept_bytes=1000)
    assert lr["flops"] == 3 * (4 * 40 * 100 + 8 * 1000) and lr["bytes"] == 10 * 40 * 3 * 4 + 1000
    assert _floor.loo_floor(100, 4, RATES) == _floor.kde_floor(100, 100, 4, "float64", RATES)
    f = _floor.kde_floor(1000, 1000, 2, "float64", RATES)
    assert _floor.x_floor(2 * f["seconds"], f) == pytest.approx(2.0, rel=REL)
    assert _floor.x_floor(None, f) is None


def test_machine_floor_measures_every_rate():
    rates = _common.machine_floor(exp_block=2048, exp_repeats=1, gemm_n=48, copy_mib=1)
    for key in ("exp_ns", "exp32_ns", "dgemm_gflops", "sgemm_gflops", "copy_gbps"):
        assert rates[key] > 0, key
    assert rates["cores"] == _common.usable_cores() >= 1


def test_machine_floor_with_torch_rates():
    pytest.importorskip("torch")
    rates = _common.machine_floor(exp_block=2048, exp_repeats=1, gemm_n=32, copy_mib=1, torch_rates=True)
    assert rates["torch_exp_ns"] > 0 and rates["torch_exp32_ns"] > 0 and rates["torch_threads"] >= 1


def test_measure_and_floor_row_record_the_machine():
    rates = _floor.measure(sizes={"exp_repeats": 1, "gemm_n": 32, "copy_mib": 1})
    machine = rates["machine"]
    assert isinstance(machine["cpu_model"], str) and machine["cpu_model"]
    assert machine["cores"] >= 1 and isinstance(machine["blas"], str) and machine["numpy"]
    row = _floor.floor_row(rates, note="x")
    assert row["suite"] == _floor.SUITE and row["seconds"] is None and row["note"] == "x"
    assert row["machine"] == machine and row["dgemm_gflops"] == rates["dgemm_gflops"]
    assert "machine floor: exp" in _floor.describe(rates)


def test_first_call_runs_the_work_in_a_fresh_process():
    out = _common.first_call("benchmarks._common:_demo_work", {"n": 500}, runs=2)
    assert out["result"] == 500 and len(out["runs"]) == 2 and out["seconds"] == min(out["runs"]) > 0
    assert out["peak_rss_bytes"] >= out["baseline_rss_bytes"] > 0


def test_first_call_reports_failures():
    # The factory fails in the child: raised by default, returned as an error when asked.
    with pytest.raises(RuntimeError, match="fresh process failed"):
        _common.first_call("benchmarks._common:_demo_work", {"n": "not a number"})
    out = _common.first_call("benchmarks._common:_demo_work", {"no_such_argument": 1}, raise_on_error=False)
    assert out["seconds"] is None and "TypeError" in out["error"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS semantics are Linux's")
def test_first_call_memory_limit_turns_a_huge_allocation_into_an_error():
    # 64 GiB of float64 ones under a 2 GiB address-space limit: MemoryError in the child, not the OOM killer.
    out = _common.first_call("benchmarks._common:_demo_work", {"n": 8 * 2**30}, memory_limit_bytes=2 * 2**30,
                             raise_on_error=False)
    assert out["seconds"] is None and "MemoryError" in out["error"]


def test_targets_and_headline_fields():
    ok = _common.target("floor", 1.5, "<=", 2.0)
    no = _common.target("x scipy", 2.0, ">=", 3.0)
    missing = _common.target("x loop", None, ">=", 3.0)
    assert ok["met"] and not no["met"] and not missing["met"]
    assert not _common.target("nan", float("nan"), "<=", 1.0)["met"]
    with pytest.raises(ValueError, match="op must be"):
        _common.target("x", 1.0, "<", 2.0)
    h = _common.headline("w", [ok, no], peers="2x scipy", order=3)
    assert h["headline"] == "w" and h["met"] is False and h["headline_order"] == 3
    assert h["targets"] == "<= 2x floor: 1.5x yes; >= 3x x scipy: 2x no"
    assert "met" not in _common.headline("w")  # no targets: a row keeps its own "met"
    gb = _common.target("peak RSS", 6.5, "<=", 7.0, unit=" GB")
    assert _common.describe_targets([gb]) == "<= 7 GB peak RSS: 6.5 GB yes"
    summary = _common.targets_summary("s", [], [{"max_rel_diff": 0.0, "met": None}, {"max_rel_diff": 1.0}])
    assert summary["all_targets_met"]


def test_kept_bytes_counts_arrays_once_without_calling_properties():
    np = pytest.importorskip("numpy")

    class Lazy:
        def __init__(self):
            self.base = np.zeros((10, 10))
            self.views = [self.base[:5], self.base.T]
            self.other = {"a": np.zeros(3, dtype=np.float32)}

        @property
        def derived(self):  # must not be evaluated
            raise AssertionError("kept_bytes called a property")

    assert _common.kept_bytes(Lazy()) == 800 + 12
