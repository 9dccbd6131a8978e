"""benchmarks/_anomalib_peer.py: anomalib 2.7.0's stats classes loaded standalone, or the oracle with a note.

The tests never download: the real-class tests run only when the wheel is already in ``.whl/`` (e.g. after
``pip download anomalib==2.7.0 --no-deps -d .whl`` or a full ``make bench``) and are skipped otherwise.
"""

from __future__ import annotations

import sys
import zipfile

import pytest

torch = pytest.importorskip("torch")

from benchmarks import _anomalib_peer as peer  # noqa: E402
from tests import anomalib_oracle as oracle  # noqa: E402

WHEEL = peer.CACHE_DIR / peer.WHEEL_NAME
needs_wheel = pytest.mark.skipif(not WHEEL.is_file(), reason=f"{WHEEL} not present (the tests never download it)")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    """No cached result, no wheel named in the environment, no installed anomalib taken for the sources."""
    monkeypatch.setattr(peer, "_CACHE", {})
    monkeypatch.delenv(peer.WHEEL_ENV, raising=False)
    monkeypatch.setattr(peer, "_installed_sources", lambda: None)


def test_fallback_without_the_wheel_returns_the_oracle_with_a_note(tmp_path):
    kde_cls, mvg_cls, note = peer.load_anomalib_stats(cache_dir=tmp_path)
    assert kde_cls is oracle.AnomalibGaussianKDE and mvg_cls is oracle.AnomalibMultiVariateGaussian
    assert note.startswith("anomalib 2.7.0 unavailable (no wheel at ") and "download not tried" in note
    assert str(tmp_path) in note and "pip download anomalib==2.7.0 --no-deps" in note
    assert not peer.is_real(note) and peer.peer_name(note) == "anomalib (re-impl.)"
    assert list(tmp_path.iterdir()) == []  # nothing downloaded without download=True
    with pytest.raises(peer.AnomalibSourcesUnavailable, match="no wheel at"):
        peer.load_anomalib_stats(cache_dir=tmp_path, allow_fallback=False)


def test_a_wheel_named_in_the_environment_that_does_not_exist_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv(peer.WHEEL_ENV, str(tmp_path / "missing.whl"))
    _, _, note = peer.load_anomalib_stats()
    assert note.startswith("anomalib 2.7.0 unavailable") and "missing.whl" in note


def test_a_broken_wheel_falls_back_with_the_reason(tmp_path):
    broken = tmp_path / peer.WHEEL_NAME
    with zipfile.ZipFile(broken, "w") as archive:
        archive.writestr("anomalib/__init__.py", "")
    _, _, note = peer.load_anomalib_stats(cache_dir=tmp_path)
    assert note.startswith("anomalib 2.7.0 unavailable (cannot read the anomalib sources from")


def test_load_from_sources_answers_only_the_mixin_import():
    sources = {
        "dynamic_buffer": "from torch import nn\nclass DynamicBufferMixin(nn.Module):\n    pass\n",
        "kde": "from anomalib.models.components.base import DynamicBufferMixin\nclass GaussianKDE(DynamicBufferMixin):\n    pass\n",
        "multi_variate_gaussian": "from anomalib.models.components.base import DynamicBufferMixin\n"
                                  "class MultiVariateGaussian(DynamicBufferMixin):\n    pass\n",
    }
    before = set(sys.modules)
    kde_cls, mvg_cls = peer.load_from_sources(sources, "test")
    assert kde_cls.__name__ == "GaussianKDE" and issubclass(mvg_cls, torch.nn.Module)
    assert kde_cls.__mro__[1] is mvg_cls.__mro__[1]  # one mixin, shared
    assert not {m for m in set(sys.modules) - before if m.startswith("anomalib")}
    bad = dict(sources, kde="from anomalib.data import Batch\n")
    with pytest.raises(peer.AnomalibSourcesUnavailable, match="'anomalib.data'"):
        peer.load_from_sources(bad, "test")
    with pytest.raises(peer.AnomalibSourcesUnavailable, match="SyntaxError"):
        peer.load_from_sources(dict(sources, kde="def ("), "test")


@needs_wheel
def test_the_real_classes_load_without_registering_anomalib():
    before = set(sys.modules)
    kde_cls, mvg_cls, note = peer.load_anomalib_stats()
    assert peer.is_real(note) and note.startswith(f"anomalib 2.7.0 from {WHEEL}") and "WARNING" not in note
    assert peer.peer_name(note) == "anomalib 2.7.0"
    assert kde_cls is not oracle.AnomalibGaussianKDE and kde_cls.__name__ == "GaussianKDE"
    assert mvg_cls.__name__ == "MultiVariateGaussian"
    assert not any(m == "anomalib" or m.startswith("anomalib.") for m in set(sys.modules) - before)
    assert peer.load_anomalib_stats() == (kde_cls, mvg_cls, note)  # cached


@needs_wheel
def test_the_real_classes_give_the_oracles_numbers():
    kde_cls, mvg_cls, _ = peer.load_anomalib_stats()
    g = torch.Generator().manual_seed(0)
    data = torch.randn(300, 4, generator=g) @ torch.randn(4, 4, generator=g) + 2.0
    queries = torch.randn(9, 4, generator=g)
    real, mine = kde_cls(), oracle.AnomalibGaussianKDE()
    real.fit(data.clone())
    mine.fit(data.clone())
    # The same float32 operations on the same data, possibly summed in another order: a few eps32 (6e-8)
    # relative in the buffers, times the exponent's size (|log density| < ~50 here) in the densities.
    torch.testing.assert_close(real.dataset, mine.dataset, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(real(queries), mine(queries), rtol=1e-5, atol=0.0)

    embedding = torch.randn(30, 6, 3, 3, generator=g)
    (mean_r, inv_r), (mean_o, inv_o) = mvg_cls().fit(embedding), oracle.AnomalibMultiVariateGaussian().fit(embedding)
    # Means: the same reduction. Inverses: covariances equal to ~B·eps32 relative, amplified by the condition
    # number of the ridge-regularised covariance (below ~1e2 for 30 observations of 6 channels): < 1e-4.
    torch.testing.assert_close(mean_r, mean_o, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(inv_r, inv_o, rtol=1e-4, atol=1e-5)

    # Its dynamic buffers: a fresh module takes the checkpoint's shapes.
    fresh = kde_cls()
    fresh.load_state_dict(real.state_dict())
    assert fresh.dataset.shape == real.dataset.shape and fresh.norm.shape == real.norm.shape
