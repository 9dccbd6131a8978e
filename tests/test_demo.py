"""``anomstats demo``: AUROC, features, defects, backends, missing packages, figure and command line."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from anomstats.cli import _optional, demo, main
from anomstats.cli.demo import DemoError, auroc, neighbourhood_features, paste_defect, run_demo

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _torch_adapter_ready() -> bool:
    return _optional.torch_adapter_unavailable_reason() is None


# ---- AUROC -----------------------------------------------------------------------------------------


def test_auroc_known_values():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auroc([3, 2, 1, 0], [1, 1, 0, 0]) == 1.0
    assert auroc([0, 1], [1, 0]) == 0.0
    assert auroc([5, 5, 5], [0, 1, 0]) == 0.5


@given(st.lists(st.tuples(st.floats(-1e3, 1e3), st.integers(0, 1)), min_size=2, max_size=40))
def test_auroc_properties(pairs):
    scores = np.array([p[0] for p in pairs])
    labels = np.array([p[1] for p in pairs])
    if labels.min() == labels.max():
        with pytest.raises(ValueError, match="both normal"):
            auroc(scores, labels)
        return
    a = auroc(scores, labels)
    assert 0.0 <= a <= 1.0
    # Reversing the scores mirrors the curve; a monotone transform changes nothing. Bound: an AUROC is a
    # count of ranked pairs (an integer below 2^53, exact) divided once by the number of pairs, so two
    # ways of computing it differ by a few eps (~1e-15); 1e-12 leaves a wide margin and still fails on
    # a single misranked pair among fewer than 10^12.
    assert auroc(-scores, labels) == pytest.approx(1.0 - a, abs=1e-12)
    assert auroc(np.arctan(scores / 100), labels) == pytest.approx(a, abs=1e-12)
    # Brute force: the fraction of (anomalous, normal) pairs ranked right, ties counting one half.
    pos, neg = scores[labels == 1], scores[labels == 0]
    brute = np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))
    assert a == pytest.approx(brute, abs=1e-12)


def test_auroc_errors_and_inputs_untouched():
    s, y = np.array([0.3, 0.1, 0.2]), np.array([1, 0, 1])
    s0, y0 = s.copy(), y.copy()
    auroc(s, y)
    np.testing.assert_array_equal(s, s0)
    np.testing.assert_array_equal(y, y0)
    with pytest.raises(ValueError, match="same length"):
        auroc([1.0, 2.0], [0, 1, 1])
    with pytest.raises(ValueError, match="labels must be 0"):
        auroc([1.0, 2.0], [0, 2])
    with pytest.raises(ValueError, match="NaN"):
        auroc([np.nan, 2.0], [0, 1])


# ---- features and defects ----------------------------------------------------------------------------


def test_neighbourhood_features_layout_and_padding():
    imgs = np.arange(2 * 4 * 5, dtype=float).reshape(2, 4, 5)
    before = imgs.copy()
    f = neighbourhood_features(imgs)
    assert f.shape == (2, 9, 4, 5)
    np.testing.assert_array_equal(imgs, before)
    np.testing.assert_array_equal(f[:, 4], imgs)  # channel 4 is the pixel itself
    np.testing.assert_array_equal(f[1, :, 2, 3], imgs[1, 1:4, 2:5].ravel())
    assert np.all(f[:, 0, 0, :] == 0) and np.all(f[:, 0, :, 0] == 0)  # zero padding above / left
    with pytest.raises(ValueError, match=r"shape \(N, H, W\)"):
        neighbourhood_features(np.ones((4, 4)))


@given(st.integers(0, 2**32 - 1))
def test_paste_defect_changes_exactly_the_masked_pixels(seed):
    rng = np.random.default_rng(seed)
    img = rng.uniform(0, 1, (8, 8))
    before = img.copy()
    bad, mask = paste_defect(img, np.random.default_rng(seed))
    np.testing.assert_array_equal(img, before)
    changed = np.abs(bad - img) > 0.2
    np.testing.assert_array_equal(mask, changed)
    assert 1 <= mask.sum() <= 9
    rows, cols = np.nonzero(np.abs(bad - img) > 0)
    assert rows.max() - rows.min() < 3 and cols.max() - cols.min() < 3  # one small square


# ---- backends and missing packages ---------------------------------------------------------------------


def test_unknown_backend_is_refused():
    with pytest.raises(DemoError, match="backend must be"):
        run_demo(backend="jax")


def test_torch_backend_requested_but_unavailable(monkeypatch):
    monkeypatch.setattr(_optional, "torch_adapter_unavailable_reason", lambda: "torch is not installed")
    with pytest.raises(DemoError, match=r"--backend torch: torch is not installed; install it with pip"):
        run_demo(backend="torch")
    impl, note = demo._pick_backend("auto")
    assert impl.name == "numpy" and "torch is not installed" in note


@pytest.mark.parametrize(("module", "name"), [("sklearn.datasets", "scikit-learn"), ("matplotlib", "matplotlib")])
def test_missing_package_fails_loudly(monkeypatch, tmp_path, capsys, module, name):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    out = tmp_path / "x.png"
    status = main(["demo", "--quick", "--backend", "numpy", "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2
    assert f"the demo needs {name}" in err and "pip install 'anomstats[bench]'" in err
    assert not out.exists()


# ---- the demo itself -----------------------------------------------------------------------------------


def test_quick_demo_numpy_backend(tmp_path, capsys):
    out = tmp_path / "sub" / "demo.png"
    result = run_demo(str(out), backend="numpy", quick=True)
    printed = capsys.readouterr().out
    assert out.read_bytes()[:8] == PNG_SIGNATURE and out.stat().st_size > 10_000
    assert result.figure == str(out) and f"figure written to {out}" in printed
    assert result.backend == "numpy"
    assert sorted(result.dfkde_auroc) == [0, 1, 2] == sorted(result.padim_pixel_auroc)
    # Both detectors work on this data: far better than chance on every class.
    assert min(result.dfkde_auroc.values()) > 0.85
    assert min(result.padim_pixel_auroc.values()) > 0.85
    assert min(result.padim_image_auroc.values()) > 0.85
    assert "DFKDE-style" in printed and "PaDiM-style" in printed and "pixel AUROC" in printed
    # Both bandwidth rules are reported, per digit and as the mean.
    assert "AUROC Scott" in printed and "AUROC cv_ml" in printed
    assert sorted(result.dfkde_cv_ml_auroc) == [0, 1, 2]
    assert all(0.0 <= a <= 1.0 for a in result.dfkde_cv_ml_auroc.values())
    mean_row = next(line for line in printed.splitlines() if line.strip().startswith("mean"))
    scott_mean, cv_ml_mean = (float(v) for v in mean_row.split()[1:3])
    assert scott_mean == pytest.approx(np.mean(list(result.dfkde_auroc.values())), abs=5e-4)
    assert cv_ml_mean == pytest.approx(np.mean(list(result.dfkde_cv_ml_auroc.values())), abs=5e-4)
    # The likelihood-selected bandwidth is a sensible detector too (not that it must beat Scott's here).
    assert cv_ml_mean > 0.5 and cv_ml_mean > scott_mean - 0.1


def test_demo_command_line_prints_the_figure_path(tmp_path, capsys):
    out = tmp_path / "cli.png"
    assert main(["demo", "--quick", "--backend", "numpy", "--out", str(out)]) == 0
    assert f"figure written to {out}" in capsys.readouterr().out
    assert out.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.skipif(not _torch_adapter_ready(), reason="the torch adapter is not available")
def test_quick_demo_torch_backend_agrees_with_numpy(tmp_path):
    torch_run = run_demo(str(tmp_path / "t.png"), backend="torch", quick=True, verbose=False)
    numpy_run = run_demo(str(tmp_path / "n.png"), backend="numpy", quick=True, verbose=False)
    assert torch_run.backend == "torch"
    # Bound: the torch backend scores in float32 (relative error ~1e-6 against float64), which can only
    # swap pairs whose scores are that close; the quick demo's AUROCs move by one such pair in 10^3 at most.
    for d in numpy_run.dfkde_auroc:
        assert torch_run.dfkde_auroc[d] == pytest.approx(numpy_run.dfkde_auroc[d], abs=1e-3)
        # The same bound for cv_ml: the factor is selected to 1e-10 relative on both backends (or by the core
        # for both, where the adapter lacks the rule), so only the scoring differs, as for Scott's rule.
        assert torch_run.dfkde_cv_ml_auroc[d] == pytest.approx(numpy_run.dfkde_cv_ml_auroc[d], abs=1e-3)
        assert torch_run.padim_pixel_auroc[d] == pytest.approx(numpy_run.padim_pixel_auroc[d], abs=1e-3)
