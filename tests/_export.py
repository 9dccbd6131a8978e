"""Shared machinery of the export tests: the wrappers a deployment exports, batch-1 export, the ONNX stack.

Kept out of the test modules so that the ONNX, ``torch.export`` and TorchScript tests of both forms use
one definition of "export at batch 1 with a dynamic batch" and one rule for when a missing ONNX stack is a
skip and when it is a failure (:func:`onnx_stack`).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import warnings

import pytest
import torch

#: Set (to anything but "" or "0") where the ONNX tests must run: a missing onnx is then a failure, not a skip.
REQUIRE_ONNX_ENV = "ANOMSTATS_REQUIRE_ONNX"

#: Batch sizes every exported graph is run at; the example it is exported from has batch 1.
BATCHES = (1, 4, 7)


class PadimScore(torch.nn.Module):
    """What a deployed PaDiM exports: the Mahalanobis map of a fitted Gaussian (either form)."""

    def __init__(self, gaussian) -> None:
        super().__init__()
        self.gaussian = gaussian

    def forward(self, embedding):
        return self.gaussian.mahalanobis(embedding)


class KDELogDensity(torch.nn.Module):
    """A KDE's ``log_prob`` as a module's ``forward`` (exporters export ``forward``)."""

    def __init__(self, kde) -> None:
        super().__init__()
        self.kde = kde

    def forward(self, features):
        return self.kde.log_prob(features)


def onnx_stack():
    """``(onnx, onnxruntime)``, with onnxscript (the exporter's translator) importable.

    Skips only where onnx itself is not installed (an environment without the ``test`` extra) and
    ``ANOMSTATS_REQUIRE_ONNX`` is unset. Where onnx is installed the test extra was, so a missing
    onnxruntime or onnxscript is a broken environment: a failure, never a silent skip.
    """
    if os.environ.get(REQUIRE_ONNX_ENV, "") not in ("", "0"):
        onnx = importlib.import_module("onnx")
    else:
        onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[test]')")
    try:
        ort = importlib.import_module("onnxruntime")
        importlib.import_module("onnxscript")
    except ImportError as error:  # pragma: no cover - a broken environment
        pytest.fail(f"onnx is installed but {error.name} is not: install the whole test extra ({error})")
    return onnx, ort


@contextlib.contextmanager
def batch_one_export():
    """Export from a batch-1 example and keep the batch symbolic.

    ``torch.export`` specialises a dimension whose example size is 0 or 1 to that constant ("0/1
    specialisation"): ``Dim("batch")`` with a batch-1 example is refused. PyTorch's documented way around
    it is ``torch.fx.experimental._config.backed_size_oblivious`` (the ``torch.export`` tutorial, "Avoiding
    0/1 specialization"), under which export assumes the general case for such sizes and the graph must
    not branch on them: exactly what these tests check by running the graph at 1, 4 and 7.
    """
    config = importlib.import_module("torch.fx.experimental._config")
    if not hasattr(config, "backed_size_oblivious"):  # pragma: no cover - older torch
        pytest.skip("this torch cannot export a dynamic batch from a batch-1 example (no backed_size_oblivious)")
    with config.patch(backed_size_oblivious=True), warnings.catch_warnings():
        # torch's own pytree deprecation, raised inside the exporter; nothing of ours
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        yield


def export_program(module: torch.nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``module`` at the batch-1 ``example`` with a dynamic batch (axis 0)."""
    with batch_one_export():
        return torch.export.export(module.eval(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))


def onnx_export_supports_external_data() -> bool:
    """Whether this torch's ``torch.onnx.export`` takes ``external_data`` (the dynamo exporter of recent torch)."""
    return "external_data" in inspect.signature(torch.onnx.export).parameters


def export_onnx(module: torch.nn.Module, example: torch.Tensor, path, **kwargs) -> None:
    """``torch.onnx.export`` (the dynamo exporter) of ``module`` at the batch-1 ``example``, dynamic batch."""
    with batch_one_export():
        torch.onnx.export(
            module.eval(), (example,), str(path), dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
            **kwargs,
        )


def run_onnx(session, inputs: torch.Tensor) -> torch.Tensor:
    """One ONNX Runtime evaluation of a single-input, single-output graph, as a tensor."""
    feed = {session.get_inputs()[0].name: inputs.detach().cpu().numpy()}
    return torch.from_numpy(session.run(None, feed)[0])
