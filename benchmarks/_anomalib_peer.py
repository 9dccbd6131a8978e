"""anomalib 2.7.0's own ``GaussianKDE`` and ``MultiVariateGaussian``, loaded standalone, as benchmark peers.

anomalib's package ``__init__`` pulls in Lightning, torchvision, OpenVINO helpers and more, none of which the
two statistics classes use: they need only torch and anomalib's ``DynamicBufferMixin``. So this module reads
just three source files of the published 2.7.0 release,

- ``anomalib/models/components/base/dynamic_buffer.py`` (the mixin),
- ``anomalib/models/components/stats/kde.py`` (``GaussianKDE``),
- ``anomalib/models/components/stats/multi_variate_gaussian.py`` (``MultiVariateGaussian``),

and executes them as private modules whose only intra-anomalib import (``from
anomalib.models.components.base import DynamicBufferMixin``) is answered by a stub holding the mixin just
loaded. Nothing is added to ``sys.modules``: a real anomalib imported later, or
:func:`anomstats_torch.patch_anomalib`, never sees these copies.

Where the files come from, in order:

1. an installed ``anomalib`` distribution of version 2.7.0 (its files are read, never imported);
2. the wheel named by the environment variable ``ANOMSTATS_ANOMALIB_WHEEL``;
3. ``anomalib-2.7.0-py3-none-any.whl`` in the cache folder (``<repository>/.whl/``, git-ignored);
4. with ``download=True`` only: ``pip download anomalib==2.7.0 --no-deps`` into the cache folder (a
   bounded attempt: no retries, a short timeout), then 3.

When none of these works (e.g. a machine without network and without the wheel carried along), the
faithful re-implementations of :mod:`tests.anomalib_oracle` are returned with a note saying so: the
benchmark rows then name their peer ``anomalib (re-impl.)``, not ``anomalib 2.7.0``.

Usage::

    from benchmarks._anomalib_peer import load_anomalib_stats
    GaussianKDE, MultiVariateGaussian, note = load_anomalib_stats(download=True)

``python -m benchmarks._anomalib_peer [--download]`` prints where the classes came from.
"""

from __future__ import annotations

import argparse
import builtins
import hashlib
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Where the wheel is looked for and downloaded to (git-ignored).
CACHE_DIR = REPO_ROOT / ".whl"
VERSION = "2.7.0"
WHEEL_NAME = f"anomalib-{VERSION}-py3-none-any.whl"
#: SHA-256 of the wheel published on PyPI (checked when the wheel is read; a mismatch is reported in the note).
WHEEL_SHA256 = "8b31490815670549a3901068addd0306856c174c032ba93388e7b37b90219332"
#: Environment variable naming a wheel file to use instead of the cache folder's.
WHEEL_ENV = "ANOMSTATS_ANOMALIB_WHEEL"
#: The files read, in execution order (the mixin first: the other two import it).
SOURCES = {
    "dynamic_buffer": "anomalib/models/components/base/dynamic_buffer.py",
    "kde": "anomalib/models/components/stats/kde.py",
    "multi_variate_gaussian": "anomalib/models/components/stats/multi_variate_gaussian.py",
}
#: Peer names used by the benchmark rows.
REAL_PEER = f"anomalib {VERSION}"
FALLBACK_PEER = "anomalib (re-impl.)"

_CACHE: dict[tuple[Any, ...], tuple[type, type, str]] = {}


class AnomalibSourcesUnavailable(RuntimeError):
    """The anomalib 2.7.0 sources could not be found or executed (the message says why)."""


# --------------------------------------------------------------------------------------------- finding


def _installed_sources() -> tuple[dict[str, str], str] | None:
    """The three files of an installed anomalib 2.7.0 distribution (read, not imported), or None."""
    from importlib import metadata

    try:
        dist = metadata.distribution("anomalib")
    except metadata.PackageNotFoundError:
        return None
    if dist.version != VERSION:
        return None
    sources = {}
    for key, rel in SOURCES.items():
        path = Path(str(dist.locate_file(rel)))
        if not path.is_file():
            return None
        sources[key] = path.read_text(encoding="utf-8")
    return sources, f"installed anomalib {VERSION} ({Path(str(dist.locate_file(''))).resolve()})"


def find_wheel(cache_dir: Path | None = None, *, download: bool = False, timeout: float = 120.0) -> Path | None:
    """Path of the anomalib 2.7.0 wheel: the ``ANOMSTATS_ANOMALIB_WHEEL`` file, else the cache folder's.

    With ``download=True`` and no wheel found, one bounded ``pip download`` into ``cache_dir`` is tried
    first (no dependencies, no retries); its failure is not an error: the result is then None.

    Examples
    --------
    >>> import tempfile
    >>> find_wheel(Path(tempfile.mkdtemp())) is None or WHEEL_ENV in os.environ
    True
    """
    cache_dir = CACHE_DIR if cache_dir is None else Path(cache_dir)
    named = os.environ.get(WHEEL_ENV)
    if named:
        path = Path(named)
        return path if path.is_file() else None
    path = cache_dir / WHEEL_NAME
    if path.is_file():
        return path
    if download:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", f"anomalib=={VERSION}", "--no-deps", "--only-binary=:all:",
               "--retries", "0", "--timeout", "15", "--disable-pip-version-check", "-q", "-d", str(cache_dir)]
        try:
            subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if path.is_file():
            return path
    return None


def wheel_sources(wheel: Path) -> dict[str, str]:
    """The three source files, read from the wheel (a zip archive)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            return {key: archive.read(rel).decode("utf-8") for key, rel in SOURCES.items()}
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise AnomalibSourcesUnavailable(f"cannot read the anomalib sources from {wheel}: {exc}") from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------- loading


def _module(name: str, origin: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__ = origin
    return module


def load_from_sources(sources: dict[str, str], origin: str) -> tuple[type, type]:
    """Execute the three sources standalone; return ``(GaussianKDE, MultiVariateGaussian)``.

    Each file runs in its own private module (named ``anomalib_2_7_0_standalone.<file>``, not registered
    in ``sys.modules``) whose ``import`` statements for ``anomalib.*`` are answered by a stub module
    holding the mixin; any other ``anomalib`` import raises :class:`AnomalibSourcesUnavailable` (a
    release that needs more than this loader provides).
    """
    stubs: dict[str, types.ModuleType] = {}

    def importer(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
        if level == 0 and (name == "anomalib" or name.startswith("anomalib.")):
            if name not in stubs:
                raise AnomalibSourcesUnavailable(
                    f"{origin}: the stats files import {name!r}, which this standalone loader does not provide"
                )
            return stubs[name]
        return builtins.__import__(name, globals, locals, fromlist, level)

    patched_builtins = dict(vars(builtins), __import__=importer)
    loaded: dict[str, types.ModuleType] = {}
    for key in SOURCES:
        module = _module(f"anomalib_2_7_0_standalone.{key}", f"{origin}!/{SOURCES[key]}")
        module.__dict__["__builtins__"] = patched_builtins
        try:
            exec(compile(sources[key], module.__file__, "exec"), module.__dict__)
        except AnomalibSourcesUnavailable:
            raise
        except Exception as exc:  # a syntax or import problem of the release: report, fall back
            raise AnomalibSourcesUnavailable(f"executing {module.__file__} failed: {type(exc).__name__}: {exc}") from exc
        loaded[key] = module
        if key == "dynamic_buffer":
            base = _module("anomalib.models.components.base", origin)
            base.DynamicBufferMixin = module.DynamicBufferMixin  # type: ignore[attr-defined]
            stubs["anomalib.models.components.base"] = base
    return loaded["kde"].GaussianKDE, loaded["multi_variate_gaussian"].MultiVariateGaussian


def _fallback(reason: str) -> tuple[type, type, str]:
    from tests.anomalib_oracle import AnomalibGaussianKDE, AnomalibMultiVariateGaussian

    note = (f"anomalib {VERSION} unavailable ({reason}): peers are tests/anomalib_oracle.py's re-implementation "
            f"of its algorithms (get the wheel with `pip download anomalib=={VERSION} --no-deps -d .whl`)")
    return AnomalibGaussianKDE, AnomalibMultiVariateGaussian, note


def load_anomalib_stats(
    *, download: bool = False, cache_dir: Path | None = None, allow_fallback: bool = True
) -> tuple[type, type, str]:
    """anomalib 2.7.0's ``GaussianKDE`` and ``MultiVariateGaussian`` classes, and where they came from.

    Parameters
    ----------
    download : bool, default False
        Try one bounded ``pip download`` of the wheel into ``cache_dir`` when it is not there yet.
    cache_dir : Path, optional
        Folder of the wheel (default: ``<repository>/.whl``).
    allow_fallback : bool, default True
        When the real sources are unavailable, return :mod:`tests.anomalib_oracle`'s re-implementations
        (with a note saying so) instead of raising :class:`AnomalibSourcesUnavailable`.

    Returns
    -------
    GaussianKDE_cls, MultiVariateGaussian_cls : type
        ``torch.nn.Module`` subclasses with anomalib's constructors, buffers and methods.
    source_note : str
        ``"anomalib 2.7.0 from <wheel> (sha256 ...)"`` for the real classes; for the fallback, a sentence
        beginning ``"anomalib 2.7.0 unavailable"`` with the reason. :func:`is_real` tells them apart.

    Examples
    --------
    >>> kde_cls, mvg_cls, note = load_anomalib_stats()
    >>> note.startswith(("anomalib 2.7.0 from", "installed anomalib", "anomalib 2.7.0 unavailable"))
    True
    """
    key = (bool(download), str(cache_dir), bool(allow_fallback), os.environ.get(WHEEL_ENV))
    if key in _CACHE:
        return _CACHE[key]
    try:
        found = _installed_sources()
        if found is None:
            wheel = find_wheel(cache_dir, download=download)
            if wheel is None:
                where = os.environ.get(WHEEL_ENV) or str((CACHE_DIR if cache_dir is None else Path(cache_dir)) / WHEEL_NAME)
                raise AnomalibSourcesUnavailable(f"no wheel at {where}" + ("" if download else "; download not tried"))
            digest = _sha256(wheel)
            check = "" if digest == WHEEL_SHA256 else f"; WARNING: sha256 differs from PyPI's {WHEEL_SHA256[:12]}"
            found = wheel_sources(wheel), f"anomalib {VERSION} from {wheel} (sha256 {digest[:12]}{check})"
        sources, origin = found
        kde_cls, mvg_cls = load_from_sources(sources, origin)
        result = (kde_cls, mvg_cls, origin)
    except AnomalibSourcesUnavailable as exc:
        if not allow_fallback:
            raise
        result = _fallback(str(exc))
    _CACHE[key] = result
    return result


def is_real(note: str) -> bool:
    """Whether a ``source_note`` of :func:`load_anomalib_stats` names the real anomalib classes.

    Examples
    --------
    >>> is_real("anomalib 2.7.0 from .whl/x.whl (sha256 8b3149081567)"), is_real("anomalib 2.7.0 unavailable (x)")
    (True, False)
    """
    return not note.startswith(f"anomalib {VERSION} unavailable")


def peer_name(note: str) -> str:
    """The benchmark rows' peer name for a ``source_note``: ``anomalib 2.7.0`` or ``anomalib (re-impl.)``."""
    return REAL_PEER if is_real(note) else FALLBACK_PEER


def padim_distance(embedding: Any, mean: Any, inv_covariance: Any) -> Any:
    """PaDiM's scoring with anomalib's buffers (anomalib computes it in its anomaly-map generator, not in
    the stats module): :func:`tests.anomalib_oracle.anomalib_padim_distance`."""
    from tests.anomalib_oracle import anomalib_padim_distance

    return anomalib_padim_distance(embedding, mean, inv_covariance)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Where the benchmarks' anomalib 2.7.0 peers come from.")
    parser.add_argument("--download", action="store_true", help="pip-download the wheel into .whl/ if missing")
    args = parser.parse_args(argv)
    kde_cls, mvg_cls, note = load_anomalib_stats(download=args.download)
    print(note)
    print(f"GaussianKDE: {kde_cls.__module__}.{kde_cls.__qualname__}")
    print(f"MultiVariateGaussian: {mvg_cls.__module__}.{mvg_cls.__qualname__}")
    return 0 if is_real(note) else 1


if __name__ == "__main__":
    sys.exit(main())
