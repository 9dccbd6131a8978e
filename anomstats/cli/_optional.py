"""The one place that decides which optional packages the command line can use.

torch (and with it the adapter :mod:`anomstats_torch`), scikit-learn and matplotlib are optional:
the commands skip, fall back or fail with a clear message when one is missing. Every such decision
goes through this module: :func:`is_installed` (nothing is imported to find out),
:func:`optional_module` (import it, or say why not) and, for the torch adapter,
:func:`torch_adapter_unavailable_reason`. Tests replace these functions to simulate a machine
without torch.

Examples
--------
>>> is_installed("numpy")
True
>>> is_installed("no_such_package_anywhere")
False
>>> TORCH_MISSING
'torch is not installed'
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Sequence

__all__ = ["TORCH_MISSING", "is_installed", "optional_module", "torch_adapter_unavailable_reason"]

#: The reason every command gives when torch cannot be found.
TORCH_MISSING = "torch is not installed"

#: The classes of :mod:`anomstats_torch` the commands use.
TORCH_ADAPTER_CLASSES = ("GaussianKDE", "MultiVariateGaussian")


def is_installed(name: str) -> bool:
    """Whether the module ``name`` can be imported, found without importing it.

    Parameters
    ----------
    name : str
        A module name such as ``"torch"``, ``"sklearn"`` or ``"matplotlib"``.

    Returns
    -------
    bool
        False also when ``sys.modules`` holds ``None`` for it (an import that is known to fail).

    Examples
    --------
    >>> is_installed("scipy")
    True
    """
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        return False


def optional_module(name: str) -> ModuleType:
    """Import and return the optional module ``name``.

    Raises
    ------
    ImportError
        It is not installed or fails to import; the message says why.

    Examples
    --------
    >>> optional_module("json").__name__
    'json'
    """
    return importlib.import_module(name)


def torch_adapter_unavailable_reason(classes: Sequence[str] = TORCH_ADAPTER_CLASSES) -> str | None:
    """Why :mod:`anomstats_torch` cannot be used, or None when it can.

    torch must be installed, the adapter must import, and it must export ``classes``.

    Examples
    --------
    >>> reason = torch_adapter_unavailable_reason()
    >>> reason is None or isinstance(reason, str)
    True
    """
    if not is_installed("torch"):
        return TORCH_MISSING
    try:
        adapter = optional_module("anomstats_torch")
    except Exception as exc:  # noqa: BLE001 - any import problem means: fall back or report
        return f"anomstats_torch cannot be imported ({type(exc).__name__}: {exc})"
    missing = [name for name in classes if not hasattr(adapter, name)]
    if missing:
        return f"anomstats_torch has no {', '.join(missing)} yet"
    return None
