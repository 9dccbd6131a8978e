"""Swap this package's ``GaussianKDE`` and ``MultiVariateGaussian`` into anomalib's own modules.

anomalib's models bind the classes under their own names when they are imported
(``anomalib.models.image.padim.torch_model`` does ``from anomalib.models.components import
MultiVariateGaussian``), so replacing ``anomalib.models.components.stats.MultiVariateGaussian`` after the
fact reaches nothing. :func:`patch_anomalib` rebinds the names in every loaded module of the ``anomalib``
package that bound anomalib's classes, and, while it is active, in each ``anomalib`` module right after it is
imported (a :data:`sys.meta_path` finder that wraps the module's loader for that one import). Undoing it
puts back exactly the objects that were there.

anomalib's classes are recognised by identity: they are the objects bound in
``anomalib.models.components.stats`` and its submodules (which define them), learnt when the patch starts
for those loaded, else as they are imported under the patch. Nothing here imports anomalib: it patches what
is loaded and hooks what comes.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from importlib.util import find_spec
from types import ModuleType
from typing import Any

from .gaussian import MultiVariateGaussian
from .kde import GaussianKDE

__all__ = ["patch_anomalib"]

#: The package whose modules are patched, and the package where anomalib defines the two classes.
PACKAGE = "anomalib"
STATS_MODULE = "anomalib.models.components.stats"

#: anomalib's name -> this package's class bound in its place.
REPLACEMENTS: dict[str, type] = {"GaussianKDE": GaussianKDE, "MultiVariateGaussian": MultiVariateGaussian}

ANOMALIB_MISSING = (
    "patch_anomalib() swaps anomstats_torch's GaussianKDE and MultiVariateGaussian into anomalib, which is not "
    "installed here (no module named 'anomalib'): install it with `pip install anomalib`, or use the classes "
    "from anomstats_torch directly"
)

_MISSING = object()


def _in_package(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _in_stats(name: str) -> bool:
    return name == STATS_MODULE or name.startswith(STATS_MODULE + ".")


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, gives the module back its own loader, then patches the module."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> Any:  # get_code, get_source, is_package, resource readers, ...
        if name == "_loader":  # not set yet (a copy under construction): no recursion
            raise AttributeError(name)
        return getattr(self._loader, name)

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        try:
            self._loader.exec_module(module)
        finally:
            # The wrapper is for this import only: the module keeps its real loader afterwards.
            if getattr(module, "__loader__", None) is self:
                module.__loader__ = self._loader
            spec = getattr(module, "__spec__", None)
            if spec is not None and spec.loader is self:
                spec.loader = self._loader
        _STATE.imported(module)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    """Finds ``anomalib`` modules with the other finders and wraps their loaders."""

    def find_spec(self, fullname: str, path: Any = None, target: ModuleType | None = None) -> Any:
        if not _in_package(fullname):
            return None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if isinstance(finder, _PatchingFinder) or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchingLoader(spec.loader)
        return spec


class _PatchState:
    """The one patch of the process, on while at least one handle is active (so handles nest in any order)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.handles: set[AnomalibPatch] = set()
        self.finder: _PatchingFinder | None = None
        self.originals: dict[str, list[Any]] = {name: [] for name in REPLACEMENTS}
        # (id(module), name) -> (module, name, the object to put back)
        self.records: dict[tuple[int, str], tuple[ModuleType, str, Any]] = {}

    # ------------------------------------------------------------------ on / off
    def acquire(self, handle: AnomalibPatch) -> None:
        with self.lock:
            if not self.handles:
                self._start()
            self.handles.add(handle)

    def release(self, handle: AnomalibPatch) -> None:
        with self.lock:
            self.handles.discard(handle)
            if not self.handles:
                self._stop()

    def _start(self) -> None:
        self.finder = _PatchingFinder()
        sys.meta_path.insert(0, self.finder)
        for module_name, module in list(sys.modules.items()):
            if _in_stats(module_name) and module is not None:
                self._learn_originals(module)
        self._sweep()

    def _stop(self) -> None:
        for module, name, previous in reversed(list(self.records.values())):
            # Put back only what is still ours: a name the user rebound meanwhile keeps the user's object.
            if vars(module).get(name, _MISSING) is REPLACEMENTS[name]:
                setattr(module, name, previous)
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
        self.finder = None
        self.records.clear()
        for found in self.originals.values():
            found.clear()

    # ------------------------------------------------------------------ patching
    def _learn_originals(self, stats: ModuleType) -> bool:
        """Record the classes a module of anomalib's stats package binds (anomalib's); True if one was new."""
        new = False
        for name, ours in REPLACEMENTS.items():
            value = _bound(stats, name)
            if value is not _MISSING and value is not ours and not _is_one_of(value, self.originals[name]):
                self.originals[name].append(value)
                new = True
        return new

    def _sweep(self) -> None:
        for module_name, module in list(sys.modules.items()):
            if _in_package(module_name) and module is not None:
                self._patch(module, imported_under_patch=False)

    def _patch(self, module: ModuleType, *, imported_under_patch: bool) -> None:
        for name, ours in REPLACEMENTS.items():
            value = _bound(module, name)
            key = (id(module), name)
            if _is_one_of(value, self.originals[name]):
                self.records.setdefault(key, (module, name, value))
                setattr(module, name, ours)
            elif value is ours and imported_under_patch and self.originals[name] and key not in self.records:
                # It read our class from a patched module while being imported: without the patch it would
                # hold anomalib's, which is what it gets back.
                self.records[key] = (module, name, self.originals[name][-1])

    def imported(self, module: ModuleType) -> None:
        """The hook: ``module`` (of the anomalib package) has just been executed."""
        with self.lock:
            if not self.handles:
                return
            if _in_stats(getattr(module, "__name__", "")) and self._learn_originals(module):
                self._sweep()  # modules executed before the classes were known (none, in anomalib 2.x)
            self._patch(module, imported_under_patch=True)

    def patched(self) -> list[str]:
        with self.lock:
            return sorted(
                f"{getattr(module, '__name__', '?')}.{name}"
                for module, name, _ in self.records.values()
                if _bound(module, name) is REPLACEMENTS[name]
            )


def _bound(module: Any, name: str) -> Any:
    """What ``module`` binds as ``name``, read from its namespace (a module ``__getattr__`` is never called)."""
    namespace = getattr(module, "__dict__", None)
    return namespace.get(name, _MISSING) if isinstance(namespace, dict) else _MISSING


def _is_one_of(value: Any, objects: list[Any]) -> bool:
    return any(value is obj for obj in objects)


def _check_importable() -> None:
    if sys.modules.get(PACKAGE) is not None:
        return
    try:
        spec = find_spec(PACKAGE)  # locates the package; imports nothing
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModuleNotFoundError(ANOMALIB_MISSING, name=PACKAGE)


_STATE = _PatchState()


class AnomalibPatch:
    """The handle :func:`patch_anomalib` returns: a context manager and an undo handle.

    The patch stays on while any handle is active, so handles nest and may be undone in any order.
    """

    def __init__(self) -> None:
        self._active = False

    @property
    def active(self) -> bool:
        """Whether this handle holds the patch on."""
        return self._active

    @property
    def patched(self) -> list[str]:
        """``module.name`` for every binding the patch holds now (of all handles; empty when off)."""
        return _STATE.patched()

    def apply(self) -> AnomalibPatch:
        """Turn the patch on for this handle (nothing if it is on); returns the handle."""
        _check_importable()
        with _STATE.lock:
            if not self._active:
                _STATE.acquire(self)
                self._active = True
        return self

    def undo(self) -> None:
        """Release this handle; the last active handle restores anomalib's classes. Repeating is a no-op."""
        with _STATE.lock:
            if self._active:
                self._active = False
                _STATE.release(self)

    restore = undo

    def __enter__(self) -> AnomalibPatch:
        return self.apply()

    def __exit__(self, *exc_info: object) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"<anomstats_torch.patch_anomalib: {'active' if self._active else 'undone'}>"


def patch_anomalib() -> AnomalibPatch:
    """Use this package's ``GaussianKDE`` and ``MultiVariateGaussian`` inside anomalib's own models.

    Rebinds the two names to :class:`GaussianKDE` and :class:`MultiVariateGaussian` in every loaded module of
    the ``anomalib`` package that bound anomalib's classes (``anomalib.models.components.stats`` and its
    submodules, ``anomalib.models.components``, PaDiM's ``torch_model``, DFKDE's ``kde_classifier``, ...) and,
    while the patch is on, in every ``anomalib`` module imported meanwhile. Models built while it is on hold
    this package's modules, and keep them after it is undone.

    The patch starts at the call. Use the handle as a context manager (undone on exit) or keep it and
    call ``undo()`` (alias ``restore()``). Undoing puts back exactly the objects that were there, in loaded
    modules and in those imported meanwhile; a name rebound by someone else in the meantime is left alone.
    Calls nest: the patch stays on until every handle is undone, in any order, and each handle undoes once.

    Returns
    -------
    AnomalibPatch
        The handle: ``with`` it, or call ``undo()``/``restore()``; ``active`` says whether it holds the
        patch, ``patched`` lists the bindings (``"module.name"``) the patch holds now.

    Raises
    ------
    ModuleNotFoundError
        If anomalib is not installed (an ``ImportError``; the message says how to install it).

    Notes
    -----
    Only modules of the ``anomalib`` package are touched, and nothing is imported: the check that anomalib
    is installed locates it without importing it. A module of your own that ran ``from anomalib... import
    GaussianKDE`` keeps what it bound: anomalib's class if it was imported before the patch, this package's
    if it was imported during it (also after the undo). anomalib's classes are recognised by identity as
    the objects that ``anomalib.models.components.stats`` and its submodules bind.

    Examples
    --------
    >>> from anomstats_torch import patch_anomalib
    >>> with patch_anomalib():  # doctest: +SKIP
    ...     from anomalib.models import Padim
    ...     model = Padim()     # model.model.gaussian is anomstats_torch.MultiVariateGaussian
    >>> handle = patch_anomalib()  # doctest: +SKIP
    >>> handle.undo()              # doctest: +SKIP

    The migration guide (``docs/torch_adapter.rst``) has an example that runs without anomalib.
    """
    return AnomalibPatch().apply()
