"""patch_anomalib(): anomstats_torch's classes inside anomalib's own modules, and exactly anomalib's afterwards.

The tests build a stand-in ``anomalib`` package in a temporary directory with anomalib 2.x's module names and
import statements (``anomalib.models.components`` re-exporting ``.stats``, DFKDE's ``kde_classifier`` and
PaDiM's ``torch_model`` binding the classes under their own names at import time), in two layouts: the
classes defined in submodules of ``stats`` as in anomalib 2.7.0 (``stats/kde.py``,
``stats/multi_variate_gaussian.py``), or in ``stats/__init__.py`` itself. Each test starts and ends with no
``anomalib`` module loaded (any that were are put back afterwards) and no patch on. The last test runs
against a real anomalib when one is importable.
"""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest

pytest.importorskip("torch")

import anomstats_torch  # noqa: E402
from anomstats_torch import GaussianKDE, MultiVariateGaussian, patch_anomalib  # noqa: E402
from anomstats_torch import anomalib_patch  # noqa: E402

NAMES = ("GaussianKDE", "MultiVariateGaussian")
OURS = {"GaussianKDE": GaussianKDE, "MultiVariateGaussian": MultiVariateGaussian}

STATS = "anomalib.models.components.stats"
COMPONENTS = "anomalib.models.components"
KDE_CLASSIFIER = "anomalib.models.components.classification.kde_classifier"
PADIM = "anomalib.models.image.padim.torch_model"

_KDE_SOURCE = '''
class GaussianKDE:
    """anomalib's KDE (stand-in)."""

    def __init__(self, dataset=None):
        self.dataset = dataset
'''
_MVG_SOURCE = '''
class MultiVariateGaussian:
    """anomalib's per-patch Gaussian (stand-in)."""
'''

_COMMON = {
    "anomalib/__init__.py": '''
        """Stand-in for anomalib 2.x: its module names and import statements, nothing else."""
        __version__ = "2.7.0+stand-in"
        asked = []


        def __getattr__(name):  # a lazy module attribute: the patch must never trigger one
            asked.append(name)
            raise AttributeError(name)
        ''',
    # anomalib.models registers placeholder modules whose __getattr__ answers every name (its
    # _legacy_compat, for old checkpoints): the sweep reads namespaces, so it neither asks nor touches them.
    "anomalib/models/__init__.py": """
        import sys
        import types


        def _placeholder(name):
            if name.startswith("__") and name.endswith("__"):
                raise AttributeError(name)
            return object


        legacy = types.ModuleType("anomalib.models.components.dinov2.dinov2_loader")
        legacy.__getattr__ = _placeholder
        sys.modules[legacy.__name__] = legacy
        """,
    "anomalib/models/components/__init__.py": """
        from .stats import GaussianKDE, MultiVariateGaussian

        __all__ = ["GaussianKDE", "MultiVariateGaussian"]
        """,
    "anomalib/models/components/classification/__init__.py": """
        from .kde_classifier import KDEClassifier
        """,
    "anomalib/models/components/classification/kde_classifier.py": """
        from anomalib.models.components import GaussianKDE


        class KDEClassifier:
            def __init__(self):
                self.kde_model = GaussianKDE()
        """,
    "anomalib/models/image/__init__.py": "",
    "anomalib/models/image/padim/__init__.py": "",
    "anomalib/models/image/padim/torch_model.py": """
        from anomalib.models.components import MultiVariateGaussian


        class PadimModel:
            def __init__(self):
                self.gaussian = MultiVariateGaussian()
        """,
}

LAYOUTS = {
    # anomalib 2.7.0: the classes are defined in submodules of stats and re-exported by its __init__.
    "submodules": {
        "anomalib/models/components/stats/__init__.py": """
            from .kde import GaussianKDE
            from .multi_variate_gaussian import MultiVariateGaussian
            """,
        "anomalib/models/components/stats/kde.py": _KDE_SOURCE,
        "anomalib/models/components/stats/multi_variate_gaussian.py": _MVG_SOURCE,
    },
    # The classes defined in stats/__init__.py itself.
    "flat": {"anomalib/models/components/stats/__init__.py": _KDE_SOURCE + _MVG_SOURCE},
}


def _in_anomalib(name: str) -> bool:
    return name == "anomalib" or name.startswith("anomalib.")


class FakeAnomalib:
    """The stand-in package on sys.path (``root``), and helpers to write user modules next to it."""

    def __init__(self, root):
        self.root = root

    def write(self, relative: str, source: str) -> None:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source).lstrip("\n"), encoding="utf-8")
        importlib.invalidate_caches()

    @staticmethod
    def load(name: str):
        return importlib.import_module(name)


def _unload(predicate) -> None:
    for name in [name for name, module in list(sys.modules.items()) if predicate(name, module)]:
        del sys.modules[name]


@pytest.fixture(params=sorted(LAYOUTS))
def fake(request, tmp_path, monkeypatch):
    root = tmp_path / "site"
    tree = FakeAnomalib(root)
    for relative, source in {**_COMMON, **LAYOUTS[request.param]}.items():
        tree.write(relative, source)
    for name in [name for name in sys.modules if _in_anomalib(name)]:  # a real anomalib, if one was loaded
        monkeypatch.delitem(sys.modules, name)  # put back by monkeypatch after the test
    monkeypatch.syspath_prepend(str(root))
    try:
        yield tree
    finally:
        for handle in list(anomalib_patch._STATE.handles):  # a failed test may leave the patch on
            handle.undo()
        _unload(lambda name, module: _in_anomalib(name) or str(root) in str(getattr(module, "__file__", "")))
        importlib.invalidate_caches()
    assert not any(isinstance(f, anomalib_patch._PatchingFinder) for f in sys.meta_path)


def _bindings() -> dict[tuple[str, str], object]:
    """Every binding of the two names in the loaded anomalib modules, read from their namespaces."""
    return {
        (name, attr): vars(module)[attr]
        for name, module in list(sys.modules.items())
        if _in_anomalib(name) and module is not None
        for attr in NAMES
        if attr in vars(module)
    }


def _assert_anomalib_classes(bindings) -> None:
    stats = sys.modules[STATS]
    for (module, attr), obj in bindings.items():
        assert obj is vars(stats)[attr], (module, attr)
        assert obj is not OURS[attr] and obj.__module__.startswith(STATS), (module, attr)


def _assert_ours(bindings) -> None:
    for (module, attr), obj in bindings.items():
        assert obj is OURS[attr], (module, attr)


# ---------------------------------------------------------------------- both directions
def test_modules_loaded_before_the_patch_are_patched_and_restored(fake):
    kde_classifier = fake.load(KDE_CLASSIFIER)
    padim = fake.load(PADIM)
    before = _bindings()
    _assert_anomalib_classes(before)
    assert (KDE_CLASSIFIER, "GaussianKDE") in before and (PADIM, "MultiVariateGaussian") in before

    with patch_anomalib() as handle:
        during = _bindings()
        assert during.keys() == before.keys()
        _assert_ours(during)
        assert handle.patched == sorted(f"{module}.{attr}" for module, attr in before)
        classifier, model = kde_classifier.KDEClassifier(), padim.PadimModel()
        assert type(classifier.kde_model) is GaussianKDE and type(model.gaussian) is MultiVariateGaussian

    after = _bindings()
    assert after.keys() == before.keys()
    assert all(after[key] is before[key] for key in before)  # exactly the objects that were there
    assert handle.patched == [] and not handle.active
    # Models built under the patch keep the modules they got; new ones get anomalib's again.
    assert type(classifier.kde_model) is GaussianKDE
    assert type(kde_classifier.KDEClassifier().kde_model) is before[(STATS, "GaussianKDE")]
    assert sys.modules["anomalib"].asked == []  # no lazy module attribute was looked up
    assert "GaussianKDE" not in vars(sys.modules["anomalib.models.components.dinov2.dinov2_loader"])


def test_modules_imported_during_the_patch_get_ours_and_anomalib_s_after(fake):
    with patch_anomalib() as handle:
        assert not any(_in_anomalib(name) for name in sys.modules)  # the patch imported nothing
        padim = fake.load(PADIM)
        kde_classifier = fake.load(KDE_CLASSIFIER)
        during = _bindings()
        _assert_ours(during)
        assert {(PADIM, "MultiVariateGaussian"), (KDE_CLASSIFIER, "GaussianKDE"), (COMPONENTS, "GaussianKDE")} <= set(
            during
        )
        model = padim.PadimModel()
        assert type(model.gaussian) is MultiVariateGaussian
        assert type(kde_classifier.KDEClassifier().kde_model) is GaussianKDE
        assert handle.patched == sorted(f"{module}.{attr}" for module, attr in during)

    after = _bindings()
    assert after.keys() == during.keys()
    _assert_anomalib_classes(after)  # what each module would hold had it been imported without the patch
    assert type(model.gaussian) is MultiVariateGaussian
    assert type(padim.PadimModel().gaussian) is vars(sys.modules[STATS])["MultiVariateGaussian"]


def test_stats_loaded_before_and_models_imported_during(fake):
    components = fake.load(COMPONENTS)
    original = components.MultiVariateGaussian
    with patch_anomalib():
        padim = fake.load(PADIM)
        assert padim.MultiVariateGaussian is MultiVariateGaussian
        assert components.MultiVariateGaussian is MultiVariateGaussian
    assert padim.MultiVariateGaussian is original and components.MultiVariateGaussian is original


def test_a_module_keeps_its_real_loader(fake):
    with patch_anomalib():
        padim = fake.load(PADIM)
    for module in (padim, sys.modules[STATS]):
        assert not isinstance(module.__loader__, anomalib_patch._PatchingLoader)
        assert not isinstance(module.__spec__.loader, anomalib_patch._PatchingLoader)
    assert "class PadimModel" in padim.__loader__.get_source(PADIM)


def test_plain_call_returns_an_undo_handle(fake):
    padim = fake.load(PADIM)
    original = padim.MultiVariateGaussian
    handle = patch_anomalib()
    assert handle.active and padim.MultiVariateGaussian is MultiVariateGaussian
    assert "active" in repr(handle)
    handle.undo()
    assert not handle.active and padim.MultiVariateGaussian is original
    handle.undo()  # a no-op
    handle.restore()
    assert padim.MultiVariateGaussian is original
    with handle:  # a handle may be used again
        assert padim.MultiVariateGaussian is MultiVariateGaussian
    assert padim.MultiVariateGaussian is original


# ---------------------------------------------------------------------- nesting
def test_nested_with_blocks(fake):
    padim = fake.load(PADIM)
    original = padim.MultiVariateGaussian
    with patch_anomalib():
        with patch_anomalib():
            assert padim.MultiVariateGaussian is MultiVariateGaussian
        assert padim.MultiVariateGaussian is MultiVariateGaussian  # the outer block still holds it
        kde_classifier = fake.load(KDE_CLASSIFIER)  # the hook is still on
        assert kde_classifier.GaussianKDE is GaussianKDE
    assert padim.MultiVariateGaussian is original
    assert kde_classifier.GaussianKDE is vars(sys.modules[STATS])["GaussianKDE"]


@pytest.mark.parametrize("order", ["first_first", "last_first"])
def test_calls_nest_and_undo_in_any_order(fake, order):
    padim = fake.load(PADIM)
    before = _bindings()
    first, second = patch_anomalib(), patch_anomalib()  # calling twice patches once
    _assert_ours(_bindings())
    assert sum(isinstance(f, anomalib_patch._PatchingFinder) for f in sys.meta_path) == 1
    undo = [first, second] if order == "first_first" else [second, first]
    undo[0].undo()
    undo[0].undo()  # undoing a handle twice does not release the other one
    assert padim.MultiVariateGaussian is MultiVariateGaussian and undo[1].active
    undo[1].undo()
    after = _bindings()
    assert all(after[key] is before[key] for key in before) and after.keys() == before.keys()


def test_a_name_rebound_meanwhile_is_left_alone(fake):
    padim = fake.load(PADIM)

    class Mine:
        pass

    with patch_anomalib():
        padim.MultiVariateGaussian = Mine
    assert padim.MultiVariateGaussian is Mine


# ---------------------------------------------------------------------- what is not touched
def test_modules_outside_anomalib_are_not_touched(fake):
    """Documented: only the anomalib package is patched; a user's own binding is the user's."""
    fake.write("user_pipeline.py", "from anomalib.models.components import GaussianKDE\n")
    fake.write("anomalib_extras/__init__.py", "from anomalib.models.components import MultiVariateGaussian\n")
    fake.write("user_late.py", "from anomalib.models.components import GaussianKDE\n")
    user, extras = fake.load("user_pipeline"), fake.load("anomalib_extras")
    anomalib_kde, anomalib_mvg = user.GaussianKDE, extras.MultiVariateGaussian
    with patch_anomalib():
        assert user.GaussianKDE is anomalib_kde and extras.MultiVariateGaussian is anomalib_mvg
        late = fake.load("user_late")  # read the patched name while the patch was on: keeps ours
    assert user.GaussianKDE is anomalib_kde and extras.MultiVariateGaussian is anomalib_mvg
    assert late.GaussianKDE is GaussianKDE


def test_other_imports_are_not_hooked(fake):
    fake.write("plain_module.py", "VALUE = 1\n")
    with patch_anomalib():
        plain = fake.load("plain_module")
    assert not isinstance(plain.__spec__.loader, anomalib_patch._PatchingLoader)
    assert anomalib_patch._PatchingFinder().find_spec("plain_module") is None


def test_the_patch_imports_nothing(fake):
    handle = patch_anomalib()  # anomalib is importable (the stand-in) but not imported
    assert not any(_in_anomalib(name) for name in sys.modules)
    assert handle.patched == []
    handle.undo()
    assert not any(_in_anomalib(name) for name in sys.modules)


# ---------------------------------------------------------------------- without anomalib
def test_a_clear_error_when_anomalib_is_not_installed(monkeypatch):
    for name in [name for name in sys.modules if _in_anomalib(name)]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "anomalib", None)  # what importlib reads as "not importable"
    with pytest.raises(ModuleNotFoundError, match=r"anomalib.*pip install anomalib") as info:
        patch_anomalib()
    assert isinstance(info.value, ImportError) and info.value.name == "anomalib"
    with pytest.raises(ImportError, match="not installed"):
        with patch_anomalib():
            pass  # pragma: no cover
    assert not anomalib_patch._STATE.handles
    assert not any(isinstance(f, anomalib_patch._PatchingFinder) for f in sys.meta_path)


def test_it_is_exported():
    assert "patch_anomalib" in anomstats_torch.__all__ and anomstats_torch.patch_anomalib is patch_anomalib


# ---------------------------------------------------------------------- a real anomalib
def test_real_anomalib_models_get_our_classes():
    pytest.importorskip("anomalib", reason="anomalib is not installed")
    kde_classifier = pytest.importorskip(KDE_CLASSIFIER)
    padim = pytest.importorskip(PADIM)
    before = _bindings()
    assert before[(PADIM, "MultiVariateGaussian")] is not MultiVariateGaussian
    stats = sys.modules[STATS]
    anomalib_s = {key for key, obj in before.items() if obj is vars(stats)[key[1]]}
    assert {(PADIM, "MultiVariateGaussian"), (KDE_CLASSIFIER, "GaussianKDE")} <= anomalib_s
    with patch_anomalib():
        during = _bindings()
        assert all(during[key] is OURS[key[1]] for key in anomalib_s)
        assert padim.MultiVariateGaussian is MultiVariateGaussian
        assert type(kde_classifier.KDEClassifier().kde_model) is GaussianKDE
    after = _bindings()
    assert after.keys() == before.keys() and all(after[key] is before[key] for key in before)
