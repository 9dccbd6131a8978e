"""Compact statistics (issue 13, point 3): the per-patch precision in half the bytes, loadable back.

``MultiVariateGaussian.compact_state_dict(format)`` ("packed", "float16", "bfloat16", "packed_float16",
"packed_bfloat16") and ``MultiVariateGaussian(storage="packed")`` (the packed triangle as the persistent buffer,
unpacked on the fly when scoring, so checkpoints and exported graphs hold half the bytes).
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from anomstats._packed import features_of_packed_length, packed_length  # noqa: E402
from anomstats.gaussian import DEFAULT_RIDGE  # noqa: E402
from anomstats_torch import MultiVariateGaussian  # noqa: E402
from anomstats_torch.gaussian import PackedMultiVariateGaussian  # noqa: E402
from tests._tolerances import (  # noqa: E402
    assert_close_each,
    cast_mahalanobis_atol,
    mahalanobis_tolerances,
    patch_covariances,
    rounding_bounds,
)
from tests.anomalib_oracle import AnomalibMultiVariateGaussian  # noqa: E402

FORMATS = ["packed", "float16", "bfloat16", "packed_float16", "packed_bfloat16"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
HALF_OF = {"float16": torch.float16, "bfloat16": torch.bfloat16, "packed_float16": torch.float16,
           "packed_bfloat16": torch.bfloat16}


def _embedding(b=40, c=7, h=3, w=4, seed=0, offset=1.5):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(c, c, generator=g) * 0.3 + torch.eye(c)
    return torch.einsum("bchw,cd->bdhw", torch.randn(b, c, h, w, generator=g), mixing) + offset


def _fitted(dtype=torch.float32, storage="dense", seed=0):
    mvg = MultiVariateGaussian(storage=storage)
    mvg.fit(_embedding(seed=seed).to(dtype))
    return mvg


# --------------------------------------------------------------------------- keys, shapes, bytes
@pytest.mark.parametrize("fmt", FORMATS)
def test_key_names_shapes_and_dtypes(fmt):
    mvg = _fitted()
    c, p = mvg.mean.shape
    state = mvg.compact_state_dict(fmt)
    packed = fmt.startswith("packed")
    key = "inv_covariance_packed" if packed else "inv_covariance"
    assert list(state) == ["mean", key]
    assert state["mean"].dtype == torch.float32 and torch.equal(state["mean"], mvg.mean)
    assert state["mean"].data_ptr() != mvg.mean.data_ptr()  # copies
    assert state[key].shape == ((p, packed_length(c)) if packed else (p, c, c))
    assert state[key].dtype == HALF_OF.get(fmt, torch.float32)
    dense_bytes = mvg.inv_covariance.nbytes
    ratio = state[key].nbytes / dense_bytes
    expected = (c + 1) / (2 * c) if packed else 1.0
    assert ratio == pytest.approx(expected * (0.5 if fmt in HALF_OF else 1.0))


def test_packed_layout_is_the_cores():
    # The core's packed layout (anomstats._packed): the upper triangle, row by row, numpy.triu_indices' order.
    mvg = _fitted()
    c = mvg.mean.shape[0]
    packed = mvg.compact_state_dict("packed")["inv_covariance_packed"].numpy()
    rows, cols = np.triu_indices(c)
    np.testing.assert_array_equal(packed, mvg.inv_covariance.numpy()[:, rows, cols])
    assert features_of_packed_length(packed.shape[1]) == c


def test_wrong_format_name():
    mvg = _fitted()
    with pytest.raises(ValueError, match=r"format must be one of 'packed', 'float16', 'bfloat16', 'packed_float16', 'packed_bfloat16', got 'int8'"):
        mvg.compact_state_dict("int8")
    with pytest.raises(ValueError, match="format must be one of"):
        mvg.compact_state_dict(None)
    with pytest.raises(ValueError, match="not fitted"):
        MultiVariateGaussian().compact_state_dict("packed")


def test_storage_argument():
    assert type(MultiVariateGaussian(storage="packed")) is PackedMultiVariateGaussian
    assert type(MultiVariateGaussian(storage="dense")) is MultiVariateGaussian
    with pytest.raises(ValueError, match="storage must be 'dense' or 'packed', got 'half'"):
        MultiVariateGaussian(storage="half")
    with pytest.raises(ValueError, match="low-rank form keeps no"):
        MultiVariateGaussian(form="low_rank", storage="packed")
    low = MultiVariateGaussian(form="low_rank")
    low.fit(_embedding(b=5, c=9))
    with pytest.raises(ValueError, match="compact already"):
        low.compact_state_dict("packed")


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_packed_round_trip_is_bit_exact(dtype):
    mvg = _fitted(dtype)
    state = mvg.compact_state_dict("packed")
    assert state["inv_covariance_packed"].dtype == dtype
    dense = MultiVariateGaussian().to(dtype)
    assert str(dense.load_state_dict(state)) == "<All keys matched successfully>"  # strict
    assert torch.equal(dense.inv_covariance, mvg.inv_covariance) and torch.equal(dense.mean, mvg.mean)
    # Through the file format too (torch.save / torch.load).
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    again = MultiVariateGaussian().to(dtype)
    again.load_state_dict(torch.load(buffer))
    assert torch.equal(again.inv_covariance, mvg.inv_covariance)
    q = _embedding(b=3, seed=1).to(dtype)
    assert torch.equal(again.mahalanobis(q), mvg.mahalanobis(q))


@pytest.mark.parametrize("device", DEVICES)
def test_packed_storage_module(device):
    dense = _fitted().to(device)
    packed = _fitted(storage="packed").to(device)
    assert sorted(packed.state_dict()) == ["inv_covariance_packed", "mean"]
    # Same fit, packed as it goes: bit for bit the dense module's numbers (the fit is computed alike).
    assert torch.equal(packed.inv_covariance_packed, dense.compact_state_dict("packed")["inv_covariance_packed"])
    assert torch.equal(packed.inv_covariance, dense.inv_covariance)  # unpacked on access, for anomalib's PaDiM
    q = _embedding(b=4, seed=2).to(device)
    assert torch.equal(packed.mahalanobis(q), dense.mahalanobis(q))
    # Small chunks (one patch each): the unpacking is per chunk; the dense module chunked alike gives the same
    # numbers (the same batched products; on CUDA another chunking may round differently, for both).
    small = MultiVariateGaussian(storage="packed", chunk_bytes=1).to(device)
    small.load_state_dict(packed.state_dict())
    small_dense = MultiVariateGaussian(chunk_bytes=1).to(device)
    small_dense.load_state_dict(dense.state_dict())
    assert torch.equal(small.mahalanobis(q), small_dense.mahalanobis(q))
    # Its checkpoint loads into a dense module and the other way round (strict), exactly.
    other = MultiVariateGaussian().to(device)
    other.load_state_dict({k: v.cpu() for k, v in packed.state_dict().items()})  # a CPU checkpoint
    assert other.inv_covariance.device == dense.inv_covariance.device  # the module's device is kept
    assert torch.equal(other.inv_covariance, dense.inv_covariance)
    back = MultiVariateGaussian(storage="packed").to(device)
    back.load_state_dict(dense.state_dict())
    assert torch.equal(back.inv_covariance_packed, packed.inv_covariance_packed)
    # dense_state_dict: anomalib's checkpoint, which anomalib's module loads (strict).
    reference = AnomalibMultiVariateGaussian().to(device)
    reference.load_state_dict(packed.dense_state_dict())
    assert torch.equal(reference.inv_covariance, dense.inv_covariance)
    # Streaming and compact formats work the same way.
    stream = MultiVariateGaussian(storage="packed")
    x = _embedding().to(device)
    stream.update(x[:15])
    stream.update(x[15:])
    stream.compute()
    ref = MultiVariateGaussian()
    ref.update(x[:15])
    ref.update(x[15:])
    ref.compute()
    assert torch.equal(stream.inv_covariance, ref.inv_covariance)
    for fmt in FORMATS:
        for a, b in zip(stream.compact_state_dict(fmt).values(), ref.compact_state_dict(fmt).values()):
            assert torch.equal(a, b)


def test_packed_storage_unfitted():
    packed = MultiVariateGaussian(storage="packed")
    assert packed.inv_covariance.shape == (0,)  # the empty buffer, as a dense module's
    with pytest.raises(ValueError, match="not fitted"):
        packed.mahalanobis(_embedding(b=2))
    with pytest.raises(ValueError, match="not fitted"):
        packed.dense_state_dict()


def test_packed_storage_assignment_and_presized():
    packed = MultiVariateGaussian(3, 4, storage="packed")  # anomalib 0.x's pre-sized buffers: identities
    assert packed.inv_covariance_packed.shape == (4, 6)
    assert torch.equal(packed.inv_covariance, torch.eye(3).repeat(4, 1, 1))
    stack = _fitted().inv_covariance
    holder = MultiVariateGaussian(storage="packed")
    holder.mean = torch.zeros(stack.shape[1], stack.shape[0])
    holder.inv_covariance = stack  # packs
    assert torch.equal(holder.inv_covariance, stack)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f in HALF_OF])
@pytest.mark.parametrize("storage", ["dense", "packed"])
def test_half_formats_restore_with_one_rounding(fmt, storage):
    mvg = _fitted(seed=3)
    state = mvg.compact_state_dict(fmt)
    dtype = HALF_OF[fmt]
    restored = MultiVariateGaussian(storage=storage)
    restored.load_state_dict(state)  # strict; a half entry is cast to the module's float32 by torch's copy
    assert restored.inv_covariance.dtype == torch.float32
    # Bound: one rounding of each entry to `dtype` (rounding_bounds: relative 2**-11 / 2**-8, float16's
    # subnormal spacing below 6.1e-5); bit for bit the rounded entry, which float32 holds exactly.
    rtol, atol = rounding_bounds(dtype)
    assert_close_each(restored.inv_covariance, mvg.inv_covariance, rtol=rtol, atol=atol)
    assert torch.equal(restored.inv_covariance, mvg.inv_covariance.to(dtype).float())
    assert torch.equal(restored.mean, mvg.mean)  # the mean is kept in float32
    # Scores: cast_mahalanobis_atol with the precision rounded (the mean is not) and both float32 evaluations.
    q = _embedding(b=5, seed=4)
    atol_d = cast_mahalanobis_atol(q.flatten(2).numpy(), mvg.mean.numpy(), mvg.inv_covariance.numpy(), precision_dtype=dtype)
    assert_close_each(restored.mahalanobis(q), mvg.mahalanobis(q), atol=atol_d.reshape(5, 3, 4))


def test_anomalib_loads_the_half_formats():
    # Same key as anomalib's buffer: its module loads them (strict) and casts to its float32.
    mvg = _fitted()
    for fmt in ("float16", "bfloat16"):
        reference = AnomalibMultiVariateGaussian()
        reference.load_state_dict(mvg.compact_state_dict(fmt))
        assert reference.inv_covariance.dtype == torch.float32
    reference = AnomalibMultiVariateGaussian()
    with pytest.raises(RuntimeError, match="inv_covariance_packed"):  # the packed ones go through our module
        reference.load_state_dict(mvg.compact_state_dict("packed"))


@pytest.mark.parametrize("storage", ["dense", "packed"])
def test_half_precision_buffer_in_a_float32_module(storage):
    # The exportable half-size path: only the precision buffer in half precision, the module (and its mean)
    # float32; scoring upcasts the precision chunk by chunk and computes in float32.
    mvg = _fitted(seed=5)
    lean = MultiVariateGaussian(storage=storage)
    lean.load_state_dict(mvg.state_dict())
    if storage == "packed":
        lean.inv_covariance_packed = lean.inv_covariance_packed.to(torch.bfloat16)
    else:
        lean.inv_covariance = lean.inv_covariance.to(torch.bfloat16)
    restored = MultiVariateGaussian()
    restored.load_state_dict(mvg.compact_state_dict("bfloat16"))  # float32 buffers holding the rounded values
    q = _embedding(b=3, seed=6)
    got = lean.mahalanobis(q)
    assert got.dtype == torch.float32
    assert torch.equal(got, restored.mahalanobis(q))  # the same float32 computation on the same values
    # Loading keeps the buffers' dtypes (torch casts), so a compact checkpoint reloads into the lean module.
    lean.load_state_dict(mvg.state_dict())
    assert {b.dtype for b in lean.buffers()} == {torch.float32, torch.bfloat16}
    # A refit stores the module's working dtype (its mean is float32).
    assert all(b.dtype == torch.float32 for b in lean.fit(_embedding(seed=7)))


def test_float16_overflow_is_refused():
    # Ridge 1e-6 and fewer images than features: precision eigenvalues up to 1e6, beyond float16's 65504.
    mvg = MultiVariateGaussian(ridge=1e-6)
    mvg.fit(_embedding(b=3, c=6))
    with pytest.raises(ValueError, match="beyond float16's range"):
        mvg.compact_state_dict("float16")
    with pytest.raises(ValueError, match="beyond float16's range"):
        mvg.compact_state_dict("packed_float16")
    assert torch.isfinite(mvg.compact_state_dict("bfloat16")["inv_covariance"]).all()


# --------------------------------------------------------------------------- strict loading and faults
def test_strict_loading():
    mvg = _fitted()
    state = mvg.compact_state_dict("packed")
    with pytest.raises(RuntimeError, match='Unexpected key.*"extra"'):
        MultiVariateGaussian().load_state_dict({**state, "extra": torch.zeros(1)})
    with pytest.raises(RuntimeError, match='Missing key.*"mean"'):
        MultiVariateGaussian().load_state_dict({"inv_covariance_packed": state["inv_covariance_packed"]})
    partial = MultiVariateGaussian()
    result = partial.load_state_dict({"inv_covariance_packed": state["inv_covariance_packed"]}, strict=False)
    assert result.missing_keys == ["mean"] and result.unexpected_keys == []
    assert torch.equal(partial.inv_covariance, mvg.inv_covariance)
    with pytest.raises(RuntimeError, match="hold both inv_covariance and inv_covariance_packed"):
        MultiVariateGaussian().load_state_dict({**state, "inv_covariance": mvg.inv_covariance})
    with pytest.raises(RuntimeError, match=r"C\*\(C\+1\)/2 numbers for some C >= 1, got 27"):
        MultiVariateGaussian().load_state_dict({"mean": state["mean"], "inv_covariance_packed": torch.zeros(12, 27)})
    with pytest.raises(RuntimeError, match=r"holds 12 patch\(es\) of 6 features but the checkpoint's mean has shape \(7, 12\)"):
        MultiVariateGaussian().load_state_dict({"mean": state["mean"], "inv_covariance_packed": torch.zeros(12, 21)})
    with pytest.raises(RuntimeError, match=r"must be a stack of square matrices"):
        MultiVariateGaussian(storage="packed").load_state_dict({"mean": state["mean"], "inv_covariance": torch.zeros(12, 7)})
    with pytest.raises(RuntimeError, match="form='dense'"):  # a low-rank module says what the checkpoint is
        MultiVariateGaussian(form="low_rank").load_state_dict(state)


def test_inside_a_model_with_prefix():
    class Padim(nn.Module):
        def __init__(self, storage="dense"):
            super().__init__()
            self.conv = nn.Conv2d(3, 7, 1)
            self.gaussian = MultiVariateGaussian(storage=storage)

    fitted = Padim()
    fitted.gaussian.fit(_embedding())
    state = {k: v for k, v in fitted.state_dict().items() if not k.startswith("gaussian.")}
    state.update({f"gaussian.{k}": v for k, v in fitted.gaussian.compact_state_dict("packed").items()})
    for storage in ("dense", "packed"):
        model = Padim(storage)
        model.load_state_dict(state)  # strict, under the prefix
        assert torch.equal(model.gaussian.inv_covariance, fitted.gaussian.inv_covariance)
    # The packed model's own checkpoint loads into the dense model (strict).
    packed_model = Padim("packed")
    packed_model.load_state_dict(state)
    dense_model = Padim()
    dense_model.load_state_dict(packed_model.state_dict())
    assert torch.equal(dense_model.gaussian.inv_covariance, fitted.gaussian.inv_covariance)


def test_half_module_compacts_in_its_dtype():
    half = MultiVariateGaussian().half()
    half.fit(_embedding().half())
    state = half.compact_state_dict("packed")
    assert state["inv_covariance_packed"].dtype == torch.float16
    restored = MultiVariateGaussian().half()
    restored.load_state_dict(state)
    assert torch.equal(restored.inv_covariance, half.inv_covariance)


# --------------------------------------------------------------------------- export holds the packed numbers
class PadimScore(nn.Module):
    def __init__(self, gaussian) -> None:
        super().__init__()
        self.gaussian = gaussian

    def forward(self, embedding):
        return self.gaussian.mahalanobis(embedding)


def _evaluation_rtol(x):
    """mahalanobis_tolerances, shared fit, float32: two evaluations of the same buffers (eager vs traced/ONNX)."""
    return mahalanobis_tolerances(patch_covariances(x.numpy(), DEFAULT_RIDGE), x.shape[0], dtype=np.float32, shared_fit=True)[0]


def test_jit_trace_of_the_packed_module():
    x = _embedding(c=20)
    packed = MultiVariateGaussian(storage="packed")
    packed.fit(x)
    q = _embedding(b=5, c=20, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(PadimScore(packed), (q[:1],))
    assert sorted(traced.state_dict()) == ["gaussian.inv_covariance_packed", "gaussian.mean"]
    assert_close_each(traced(q), packed.mahalanobis(q), rtol=_evaluation_rtol(x))


@pytest.mark.parametrize("precision_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_onnx_export_holds_the_packed_numbers(tmp_path, precision_dtype):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    x = _embedding(c=40, h=3, w=5)
    packed = MultiVariateGaussian(storage="packed")
    packed.fit(x)
    packed.inv_covariance_packed = packed.inv_covariance_packed.to(precision_dtype)  # bfloat16: a quarter
    q = _embedding(b=7, c=40, h=3, w=5, seed=6)
    path = tmp_path / "padim_packed.onnx"
    # (exported at batch 2: torch.export specialises an example dimension of size 1)
    torch.onnx.export(PadimScore(packed).eval(), (q[:2],), str(path), dynamic_shapes=({0: torch.export.Dim("batch")},))
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    c, p = packed.mean.shape
    itemsize = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.BFLOAT16: 2, onnx.TensorProto.INT64: 8}
    stored = sum(math.prod(init.dims) * itemsize[init.data_type] for init in model.graph.initializer)
    precision_bytes = p * packed_length(c) * (4 if precision_dtype == torch.float32 else 2)
    # The packed triangle, the mean and the (C*C,) int64 unpacking index: nothing dense.
    assert stored <= precision_bytes + 4 * c * p + 8 * c * c + 256
    numbers = sum(math.prod(i.dims) * itemsize[i.data_type] for i in model.graph.initializer if i.data_type != onnx.TensorProto.INT64)
    assert numbers < (0.55 if precision_dtype == torch.float32 else 0.3) * 4 * p * c * c  # of the dense float32 stack
    session = ort.InferenceSession(str(path))
    rtol = _evaluation_rtol(x)  # ONNX Runtime against eager torch, both float32 on the same (upcast) buffers
    for b in (1, 4, 7):
        got = session.run(None, {session.get_inputs()[0].name: q[:b].numpy()})[0]
        assert_close_each(torch.from_numpy(got), packed.mahalanobis(q[:b]), rtol=rtol, atol=0)
