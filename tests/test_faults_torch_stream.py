"""Fault injection for the torch adapter's streams and checkpoints (issue 11, points 4, 5, 6; 7 is in
tests/test_torch_distributed.py).

- streams that survive restarts: a checkpoint taken mid-stream resumes exactly; a finished fit saves anomalib's
  keys; the stream moves with ``.to(device)``, keeps its precision under dtype casts, is cleared by ``reset()``;
- location-free streaming: any split of the data, at any distance from the origin up to 1e8 sigma, gives the
  exact moments to a few eps (before: about eps * offset / sigma, 2.6e-9 at 1e8 in 10 updates);
- consistent, atomic loading: inconsistent entries are refused before anything changes, and a failed load
  (inconsistent entries, missing keys under strict, a bad entry) leaves the module exactly as it was.
"""

from __future__ import annotations

import copy
import io
import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from anomstats._packed import features_of_packed_length  # noqa: E402
from anomstats._validation import NotFittedError  # noqa: E402
from anomstats.gaussian import DEFAULT_RIDGE  # noqa: E402
from anomstats_torch import DynamicBufferModule, MultiVariateGaussian  # noqa: E402
from anomstats_torch import _compact, _streaming  # noqa: E402
from tests._tolerances import eps, mean_atol, patch_covariances, precision_atol  # noqa: E402
from tests.anomalib_oracle import AnomalibMultiVariateGaussian  # noqa: E402

DEVICES = ["meta", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
FORMS = [{}, {"storage": "packed"}, {"form": "low_rank"}]
FORM_IDS = ["dense", "packed", "low_rank"]
STREAM_KEYS = {
    "stream_count", "stream_info", "stream_shift", "stream_mean", "stream_m2", "stream_factor", "stream_pending",
}


# --------------------------------------------------------------------------- error bounds
def streamed_m2_rtol(n: int, merges: int, radius_over_sigma: float, dtype=np.float64) -> float:
    """Relative error of the centred sums of products ``M`` a stream accumulates about a fixed shift.

    Relative to ``sqrt(M_ii M_jj)`` (``|M_ij|`` is at most that), for ``n`` observations, ``merges`` merges
    (updates and ranks) and ``r = R / sigma``, ``R = max |x - shift|``, ``sigma = sqrt(min_i M_ii / n)``; first
    order, in the conventions of tests/_tolerances.py (a sum of n terms: ``sqrt(n) eps``):

    - each ``x - shift`` is rounded once relative to itself, by at most ``eps R``: with
      ``sum |c| <= sqrt(n M_ii)`` (Cauchy-Schwarz) that moves ``M_ij`` by ``<= 2 r eps sqrt(M_ii M_jj)``;
    - each batch's sums of products: ``(sqrt(n) + 1) eps`` of ``sum |c_i||c_j| <= sqrt(M_ii M_jj)``, plus one
      rounding adding it in;
    - each merge's cross term ``w δδᵀ`` (``w = w_a w_b / W``) with ``δ`` off by ``e``: ``w δ_i² <= M_ii``, so
      it moves by ``<= 2 sqrt(n) e sqrt(M_ii M_jj) / (sqrt(n) sigma)``; ``e`` is two means' error, each a sum of
      at most n shifted values (``|.| <= R``) plus one rounding per earlier merge:
      ``e <= 2 (sqrt(n) + 1 + merges) eps R``.

    A stream about the origin instead (before) has ``R`` about the data's distance from the origin.
    """
    root = math.sqrt(n)
    r = radius_over_sigma
    return float(eps(dtype) * (2 * r + root + 2 + 4 * merges * (root + 1 + merges) * r))


def streamed_mean_atol(n: int, merges: int, radius, dtype=np.float64):
    """Absolute error of a stream's mean about its shift: a sum of n values ``|.| <= R`` and one rounding per merge.

    The stored mean ``shift + mean`` adds one rounding relative to ``|mean|`` (the one-shot mean has it too).
    """
    return eps(dtype) * (math.sqrt(n) + 1 + merges) * np.asarray(radius)


def exact_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (C, P) and centred sums of products (P, C, C) of ``x`` (n, C, P) in rational arithmetic, rounded once."""
    n, c, p = x.shape
    values = [[[Fraction(float(v)) for v in x[i, :, j]] for j in range(p)] for i in range(n)]
    mean = np.empty((c, p))
    m2 = np.empty((p, c, c))
    for j in range(p):
        mu = [sum(values[i][j][a] for i in range(n)) / n for a in range(c)]
        for a in range(c):
            mean[a, j] = float(mu[a])
            for b in range(a, c):
                m2[j, a, b] = m2[j, b, a] = float(
                    sum((values[i][j][a] - mu[a]) * (values[i][j][b] - mu[b]) for i in range(n))
                )
    return mean, m2


def unpack_sums(packed: torch.Tensor) -> np.ndarray:
    """The symmetric (P, C, C) stack of a dense stream's packed sums (P, C·(C+1)/2), in float64."""
    channels = features_of_packed_length(packed.shape[1])
    return _compact.unpack(packed.double(), channels).numpy()


def _stream_moments(module) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shift, mean about it, M2 (P, C, C)) of a module's open stream, from its buffers, in float64.

    A batch still waiting to be folded in is folded first (the buffers then hold every observation).
    """
    _streaming.settle(module, module._stream_kind, module.chunk_bytes)
    shift = module.stream_shift.double().numpy()
    mean = module.stream_mean.double().numpy()
    if "stream_m2" in module._buffers:
        m2 = unpack_sums(module.stream_m2)
    else:
        factor = module.stream_factor.double().numpy()
        m2 = np.einsum("pck,pdk->pcd", factor, factor)
    return shift, mean, m2


def _check_stream_against_exact(module, x: np.ndarray, merges: int, dtype=np.float64) -> float:
    """Assert the stream's moments are within the bounds of the exact ones; return the relative error of M2."""
    n = x.shape[0]
    flat = x.reshape(n, x.shape[1], -1)
    exact_mean, exact_m2 = exact_moments(flat)
    shift, mean, m2 = _stream_moments(module)
    radius = np.abs(flat - shift[None]).max(axis=(0, 1))  # R per patch
    sigma = np.sqrt(np.min(np.diagonal(exact_m2, axis1=1, axis2=2), axis=1) / n)
    rtol = streamed_m2_rtol(n, merges, float(np.max(radius / sigma)), dtype)
    scale = np.sqrt(np.einsum("pii,pjj->pij", exact_m2, exact_m2))
    error = float(np.max(np.abs(m2 - exact_m2) / scale))
    assert error <= rtol, (error, rtol)
    # shift + mean is rounded once more, relative to |mean|, when stored (checked here in float64).
    bound = streamed_mean_atol(n, merges, radius, dtype) + eps(np.float64) * np.abs(exact_mean)
    assert np.all(np.abs((shift + mean) - exact_mean) <= bound)
    return error


def _embedding(b=24, c=5, h=3, w=2, offset=0.0, seed=0, scale=1.0, dtype=torch.float64) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(c, c)) * 0.3 + np.eye(c)
    x = np.einsum("bchw,cd->bdhw", rng.normal(size=(b, c, h, w)), mixing) * scale + offset
    return torch.from_numpy(x).to(dtype)


def _stream(module, x, splits):
    for part in torch.split(x, splits):
        module.update(part)
    return module


# --------------------------------------------------------------------------- 5. location-free streaming
@pytest.mark.parametrize("form", ["dense", "low_rank"])
def test_the_issue_case_offset_1e8_in_10_updates(form):
    # Before: 2.6e-9 relative (about eps * 1e8 / sigma / sqrt(n)); the shifted stream: a few eps.
    g = torch.Generator().manual_seed(0)
    c = 4 if form == "dense" else 16  # the low-rank factor stays exact below C columns (no reduction)
    n = 100 if form == "dense" else 12
    x = torch.randn(n, c, 1, 1, generator=g, dtype=torch.float64) + 1e8
    module = _stream(MultiVariateGaussian(form=form), x, n // (10 if form == "dense" else 3))
    error = _check_stream_against_exact(module, x.numpy(), merges=10)
    assert error <= 1e-12  # the promise (the bound above is below it at these sizes)


@settings(max_examples=25)
@given(
    offset_exponent=st.integers(0, 8),
    scale_exponent=st.integers(-3, 3),
    splits=st.lists(st.integers(1, 9), min_size=1, max_size=7),
    seed=st.integers(0, 2**16),
)
def test_any_split_at_any_offset_gives_the_exact_moments(offset_exponent, scale_exponent, splits, seed):
    # Data N(offset, sigma^2) with offset up to 1e8 sigma, streamed in any split: the moments are the exact
    # ones to streamed_m2_rtol (a few hundred eps at most here), independent of the offset.
    sigma = 10.0**scale_exponent
    n = sum(splits) + 1
    x = _embedding(b=n, c=2, h=2, w=1, offset=sigma * 10.0**offset_exponent, seed=seed, scale=sigma)
    module = _stream(MultiVariateGaussian(), x, splits + [1])
    _check_stream_against_exact(module, x.numpy(), merges=len(splits) + 1)


def test_float32_streams_are_location_free_too():
    # Float32 input accumulated in float32, 1e5 sigma from the origin: the float32 bound (eps32 instead of eps64).
    x = _embedding(b=30, c=3, h=1, w=2, offset=1e5, seed=4, dtype=torch.float32)
    module = _stream(MultiVariateGaussian(accumulate_dtype=torch.float32), x, 5)
    assert module.stream_m2.dtype == torch.float32
    _check_stream_against_exact(module, x.double().numpy(), merges=6, dtype=np.float32)


def test_far_stream_computes_the_one_shot_fit():
    x = _embedding(b=40, c=4, h=2, w=2, offset=1e8, seed=5)
    streamed = _stream(MultiVariateGaussian(), x, [3, 17, 1, 19])
    mean, precision = streamed.compute()
    ref_mean, ref_precision = MultiVariateGaussian().fit(x)
    # precision_atol (the one-shot fits' bound, kappa delta |P|) covers the stream's few eps too; mean_atol.
    covariances = patch_covariances(x.numpy() - 1e8, DEFAULT_RIDGE)  # x - 1e8 is exact: the same covariances
    torch.testing.assert_close(precision, ref_precision, rtol=0, atol=precision_atol(covariances, 40))
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=mean_atol(x.abs().max().item(), 40))


def test_a_refused_batch_leaves_the_stream_as_it_was():
    x = _embedding(b=10, seed=6)
    for options in FORMS:
        module = _stream(MultiVariateGaussian(**options), x, 5)
        before = {name: t.clone() for name, t in module.state_dict().items()}
        bad = x[:3].clone()
        bad[1, 2, 0, 1] = float("nan")
        with pytest.raises(ValueError, match="NaN or infinite"):
            module.update(bad)
        with pytest.raises(ValueError, match="reset"):
            module.update(x[:, :3])
        after = module.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# --------------------------------------------------------------------------- 4. streams that survive restarts
def _fresh(options, **extra):
    return MultiVariateGaussian(**options, **extra)


def _saved(module) -> dict:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("options", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_mid_stream_checkpoint_resumes_exactly(options, dtype):
    x = _embedding(b=10, c=12, offset=300.0, seed=7, dtype=dtype)
    splits = [4, 1, 3, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the low-rank form's "no advantage" warning does not apply (B < C)
        uninterrupted = _stream(_fresh(options), x, splits).compute()
        first = _stream(_fresh(options), x[:5], splits[:2])
        state = _saved(first)
        assert STREAM_KEYS & set(state)  # the stream is in the checkpoint
        resumed = _fresh(options)
        assert resumed.load_state_dict(state) is not None  # strict
        _stream(resumed, x[5:], splits[2:])
        got = resumed.compute()
    # Bit for bit: the same state, the same operations (not a re-fit of the second half).
    assert all(torch.equal(a, b) for a, b in zip(got, uninterrupted))
    if options.get("form") != "low_rank":
        # and it is the one-shot fit of all the data: precision_atol and mean_atol of the fit in x's dtype, plus
        # the rounding of the stream's float64 results when stored in float32 (half an ulp of each entry).
        expected = _fresh(options).fit(x)
        covariances = patch_covariances(x.double().numpy(), DEFAULT_RIDGE)
        np_dtype = np.float32 if dtype == torch.float32 else np.float64
        stored = eps(np_dtype) / 2 * expected[1].abs().max().item()
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=precision_atol(covariances, 10, np_dtype) + stored)
        torch.testing.assert_close(got[0], expected[0], rtol=eps(np_dtype) / 2, atol=mean_atol(x.abs().max().item(), 10, np_dtype))


@pytest.mark.parametrize("options", FORMS, ids=FORM_IDS)
def test_a_finished_fit_saves_exactly_the_buffers(options):
    x = _embedding(b=10, c=12, seed=8)
    keys = {"mean", "basis", "eigenvalues", "ridge"} if options.get("form") else (
        {"mean", "inv_covariance_packed"} if options else {"mean", "inv_covariance"}
    )
    stream_keys = STREAM_KEYS - {"stream_m2", "stream_pending"} if options.get("form") else STREAM_KEYS - {"stream_factor"}
    fitted = _fresh(options)
    fitted.fit(x)
    streamed = _stream(_fresh(options), x, [4, 4, 2])  # the dense form's last batch waits to be folded in
    assert set(streamed.state_dict()) == keys | stream_keys  # mid-stream: the fit's buffers and the stream
    streamed.compute(keep_stream=True)
    assert set(fitted.state_dict()) == set(streamed.state_dict()) == keys
    streamed.update(x[:2])  # kept: more updates can follow, and the stream is back in the checkpoint
    mid_stream = streamed.state_dict()
    assert STREAM_KEYS & set(mid_stream)
    streamed.compute()  # the default spends the stream (both forms): the same keys
    assert set(streamed.state_dict()) == keys and not STREAM_KEYS & set(streamed._buffers)
    if not options:  # anomalib's own module loads a finished fit (strict), and refuses a mid-stream one
        anomalib = AnomalibMultiVariateGaussian()
        anomalib.load_state_dict(fitted.state_dict())
        with pytest.raises(RuntimeError, match="Unexpected key.*stream_"):
            AnomalibMultiVariateGaussian().load_state_dict(mid_stream)


@pytest.mark.parametrize("options", FORMS, ids=FORM_IDS)
def test_reset_and_a_checkpoint_without_a_stream_close_it(options):
    x = _embedding(b=10, c=12, seed=9)
    module = _stream(_fresh(options), x, 5)
    module.reset()
    assert not STREAM_KEYS & set(module.state_dict()) and not STREAM_KEYS & set(module._buffers)
    with pytest.raises(NotFittedError, match="update"):
        module.compute()
    # A fitted checkpoint (no stream) loaded into a module mid-stream: the checkpoint is the whole state.
    fitted = _fresh(options)
    fitted.fit(x)
    mid = _stream(_fresh(options), x, 5)
    mid.load_state_dict(fitted.state_dict())
    assert not STREAM_KEYS & set(mid._buffers)
    with pytest.raises(NotFittedError, match="update"):
        mid.compute()


@pytest.mark.parametrize("device", DEVICES)
def test_the_stream_moves_with_the_module_and_keeps_its_precision(device):
    x = _embedding(b=12, seed=10)
    module = _stream(MultiVariateGaussian(accumulate_dtype=torch.float32), x.float(), 4)
    before = {name: module._buffers[name].clone() for name in STREAM_KEYS if name in module._buffers}
    # Module dtype casts (.double(), .half(), .to(dtype)) leave the moments' precision alone.
    module.double()
    assert module.stream_m2.dtype == torch.float32 and module.mean.dtype == torch.float64
    module.half()
    assert all(torch.equal(module._buffers[name], value) for name, value in before.items())
    module.float()
    module.to(device)
    assert {module._buffers[name].device.type for name in before} == {device}
    assert module.stream_m2.dtype == torch.float32
    if device == "meta":
        return
    module.update(x[:3].float().to(device))
    reference = _stream(MultiVariateGaussian(accumulate_dtype=torch.float32), x.float(), 4)
    reference.update(x[:3].float())
    for got, want in zip(module.compute(), reference.compute()):
        # float32 on two devices: the float32 precision bound (the stream's own moments match exactly on the CPU)
        covariances = patch_covariances(np.concatenate([x.numpy(), x[:3].numpy()]), DEFAULT_RIDGE)
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=precision_atol(covariances, 15, np.float32))


def test_a_loaded_stream_keeps_the_checkpoints_precision_and_copies_resume():
    x = _embedding(b=12, seed=11).float()
    stream32 = _stream(MultiVariateGaussian(accumulate_dtype=torch.float32), x[:6], 3)
    module = MultiVariateGaussian()  # float64 accumulation by default
    module.load_state_dict(stream32.state_dict())
    assert module.stream_m2.dtype == torch.float32  # resumed in the precision it was accumulated in
    clone = copy.deepcopy(module)
    for m in (module, clone, stream32):
        m.update(x[6:])
    expected = stream32.compute()[1]
    assert torch.equal(module.compute()[1], expected)
    assert torch.equal(clone.compute()[1], expected)


# --------------------------------------------------------------------------- 6. consistent, atomic loading
def _snapshot(module) -> dict:
    """Every buffer (the object, a copy of its values, dtype, device), persistence and the plain attributes."""
    return {
        "buffers": {name: (t, t.clone(), t.dtype, t.device) for name, t in module._buffers.items()},
        "persistent": set(module.state_dict()),
        "attributes": {k: v for k, v in module.__dict__.items() if not k.startswith("_")},
    }


def _assert_unchanged(module, snapshot) -> None:
    assert module._buffers.keys() == snapshot["buffers"].keys()
    for name, (obj, values, dtype, device) in snapshot["buffers"].items():
        now = module._buffers[name]
        assert now is obj and now.dtype == dtype and now.device == device and torch.equal(now, values), name
    assert set(module.state_dict()) == snapshot["persistent"]
    assert {k: v for k, v in module.__dict__.items() if not k.startswith("_")} == snapshot["attributes"]


def _fitted_and_streaming(options=None) -> MultiVariateGaussian:
    module = MultiVariateGaussian(**(options or {}))
    module.fit(_embedding(b=10, c=12, seed=12))
    module.update(_embedding(b=6, c=12, seed=13))  # a stream open too: it must survive a failed load
    return module


def test_inconsistent_mean_and_precision_are_refused_before_anything_changes():
    # The issue's case: a mean for 4 patches with an inv_covariance for 2, accepted under strict=True before.
    bad = {"mean": torch.zeros(3, 4), "inv_covariance": torch.eye(3).repeat(2, 1, 1)}
    for module in (MultiVariateGaussian(), _fitted_and_streaming(), MultiVariateGaussian(storage="packed")):
        snapshot = _snapshot(module)
        with pytest.raises(RuntimeError, match=r"inconsistent buffers: .*2 patch\(es\) of 3 features.*mean has shape \(3, 4\)"):
            module.load_state_dict(bad)
        with pytest.raises(RuntimeError, match="inconsistent buffers"):
            module.load_state_dict(bad, strict=False)  # refused whatever strict is
        _assert_unchanged(module, snapshot)


@pytest.mark.parametrize(
    "entries, words",
    [
        ({"mean": torch.zeros(3, 4), "inv_covariance": torch.zeros(4, 3, 2)}, "square matrices"),
        ({"mean": torch.zeros(3, 4, 1), "inv_covariance": torch.zeros(4, 3, 3)}, "mean must be 2-D"),
        ({"mean": torch.zeros(0), "inv_covariance": torch.zeros(4, 3, 3)}, "mean empty but the others fitted"),
        ({"mean": torch.zeros(3, 4, dtype=torch.complex64), "inv_covariance": torch.zeros(4, 3, 3)}, "complex64"),
        ({"mean": torch.zeros(12, 4)}, r"mean has shape \(12, 4\)"),  # against the module's own precision
    ],
)
def test_each_inconsistency_is_named(entries, words):
    module = _fitted_and_streaming()
    snapshot = _snapshot(module)
    with pytest.raises(RuntimeError, match=words):
        module.load_state_dict(entries, strict=False)
    _assert_unchanged(module, snapshot)


def _stream_state() -> dict:
    module = MultiVariateGaussian()
    module.update(_embedding(b=6, c=3, seed=14))
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda s: s.pop("stream_mean"), "stream_mean missing"),
        (lambda s: s.update(stream_count=torch.tensor(0)), "stream_count is 0"),
        (lambda s: s.update(stream_count=torch.tensor(2.0)), "0-d integer"),
        (lambda s: s.update(stream_m2=torch.zeros(6, 4, 4, dtype=torch.float64)), "does not match stream_shift"),
        (lambda s: s.update(stream_shift=s["stream_shift"].float()), "all float32 or all float64"),
        (lambda s: s["stream_shift"].__setitem__((0, 0), float("nan")), "stream_shift holds NaN"),
        (lambda s: s["stream_m2"].__setitem__((0, 3), -1.0), "negative diagonal"),  # entry (1, 1) of C = 3
        (lambda s: s.update(stream_info=torch.tensor([1, 4, 4])), "do not multiply to P = 6"),
        (lambda s: s.update(stream_factor=torch.zeros(6, 3, 2)), "other form's stream"),
    ],
)
def test_inconsistent_stream_entries_are_refused(change, words):
    state = _stream_state()
    change(state)
    for module in (MultiVariateGaussian(), _fitted_and_streaming()):
        snapshot = _snapshot(module)
        with pytest.raises(RuntimeError, match=words):
            module.load_state_dict(state, strict=False)
        _assert_unchanged(module, snapshot)


def test_low_rank_entries_are_checked():
    source = MultiVariateGaussian(form="low_rank")
    source.fit(_embedding(b=6, c=12, seed=15))
    state = source.state_dict()
    for change, words in (
        (dict(eigenvalues=torch.ones(5, 5)), r"eigenvalues must be \(H\*W, r\)"),
        (dict(basis=torch.zeros(6, 12, 13)), "r <= C"),
        (dict(mean=torch.zeros(11, 6)), "mean has shape"),
        (dict(ridge=torch.tensor(-1.0)), "ridge must be finite and >= 0"),
        (dict(eigenvalues=-state["eigenvalues"]), "positive and finite"),
    ):
        module = MultiVariateGaussian(form="low_rank")
        module.fit(_embedding(b=6, c=12, seed=16))
        snapshot = _snapshot(module)
        with pytest.raises(RuntimeError, match=words):
            module.load_state_dict({**state, **change})
        _assert_unchanged(module, snapshot)


def test_a_load_that_fails_later_leaves_the_module_as_it_was():
    other = MultiVariateGaussian()
    other.fit(_embedding(b=10, c=4, h=2, w=2, seed=17))  # another shape: every buffer would be reshaped
    module = _fitted_and_streaming()
    snapshot = _snapshot(module)
    # strict=True with a missing key (torch reports it only after loading the rest): nothing changes
    with pytest.raises(RuntimeError, match='Missing key.*"inv_covariance"'):
        module.load_state_dict({"mean": torch.zeros(12, 6)})
    _assert_unchanged(module, snapshot)
    with pytest.raises(RuntimeError, match='Unexpected key.*"extra"'):
        module.load_state_dict({**other.state_dict(), "extra": torch.zeros(1)})
    _assert_unchanged(module, snapshot)
    # an entry that cannot be copied (a meta tensor has no values; a list is not a tensor)
    with pytest.raises(RuntimeError, match="meta"):
        module.load_state_dict({"mean": torch.empty(4, 4, device="meta"), "inv_covariance": other.inv_covariance})
    _assert_unchanged(module, snapshot)
    with pytest.raises(RuntimeError, match="expected torch.Tensor"):
        module.load_state_dict({"mean": [1.0, 2.0], "inv_covariance": torch.zeros(6, 12, 12)})
    _assert_unchanged(module, snapshot)
    # and a good load still works afterwards, under strict=False too (missing keys reported as torch does)
    result = module.load_state_dict({"mean": torch.zeros(12, 6)}, strict=False)
    assert result.missing_keys == ["inv_covariance"] and torch.equal(module.mean, torch.zeros(12, 6))
    module.load_state_dict(other.state_dict())
    assert torch.equal(module.inv_covariance, other.inv_covariance) and not STREAM_KEYS & set(module._buffers)


def test_inside_a_model_the_prefix_is_honoured_and_a_failure_leaves_the_module_as_it_was():
    class Padim(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 7, 1)
            self.gaussian = MultiVariateGaussian()

    fitted = Padim()
    fitted.gaussian.fit(_embedding(b=10, c=5, seed=18))
    fitted.gaussian.update(_embedding(b=4, c=5, seed=19))
    model = Padim()
    model.load_state_dict(fitted.state_dict())  # strict, mid-stream, under the prefix
    assert torch.equal(model.gaussian.stream_m2, fitted.gaussian.stream_m2)
    snapshot = _snapshot(model.gaussian)
    state = fitted.state_dict()
    state["gaussian.inv_covariance"] = state["gaussian.inv_covariance"][:2]
    with pytest.raises(RuntimeError, match="inconsistent buffers"):
        model.load_state_dict(state)
    _assert_unchanged(model.gaussian, snapshot)
    state = fitted.state_dict()
    del state["gaussian.inv_covariance"]
    with pytest.raises(RuntimeError, match='Missing key.*"gaussian.inv_covariance"'):
        model.load_state_dict(state)  # strict: the caller's flag is honoured below the root too
    _assert_unchanged(model.gaussian, snapshot)


class _Recorder(DynamicBufferModule):
    """A DynamicBufferModule with a parameter and hooks that record what they see."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))
        self.register_buffer("table", torch.empty(0))
        self.seen: list = []

    def _check_state_consistency(self, incoming):
        self.seen.append(("check", sorted(incoming), tuple(self.table.shape)))
        if "table" in incoming and incoming["table"].ndim != 2:
            raise RuntimeError("table must be 2-D")

    def _finish_state_load(self, incoming):
        self.seen.append(("finish", tuple(self.table.shape)))


def test_the_hook_sees_the_entries_before_anything_changes_and_its_error_propagates():
    module = _Recorder()
    module.load_state_dict({"weight": torch.full((2,), 3.0), "table": torch.ones(2, 3)})
    assert module.seen == [("check", ["table", "weight"], (0,)), ("finish", (2, 3))]
    module.seen.clear()
    snapshot = _snapshot(module)
    weight = module.weight.detach().clone()
    with pytest.raises(RuntimeError, match="table must be 2-D"):  # unchanged, whatever strict is
        module.load_state_dict({"weight": torch.zeros(2), "table": torch.ones(4)}, strict=False)
    assert module.seen == [("check", ["table", "weight"], (2, 3))]  # no finish: nothing was loaded
    _assert_unchanged(module, snapshot)
    # a parameter of another shape: torch's size-mismatch error, reported before any buffer changes
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        module.load_state_dict({"weight": torch.zeros(3), "table": torch.ones(5, 5)})
    _assert_unchanged(module, snapshot)
    assert torch.equal(module.weight.detach(), weight)


def test_load_pre_hooks_run_once_before_the_check():
    module = _Recorder()
    calls = []

    def rename(state_dict, prefix, *args):
        calls.append(prefix)
        if prefix + "old_table" in state_dict:
            state_dict[prefix + "table"] = state_dict.pop(prefix + "old_table")

    module._register_load_state_dict_pre_hook(rename)
    module.load_state_dict({"weight": torch.ones(2), "old_table": torch.ones(2, 2)})
    assert calls == [""] and module.table.shape == (2, 2)
    assert module.seen[0] == ("check", ["table", "weight"], (0,))
