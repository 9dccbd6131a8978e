"""Export: torch.jit.trace, torch.export and ONNX graphs made at batch 1 are right at every batch size.

Every exported graph here (KDE ``forward`` and ``log_prob``, PaDiM's ``mahalanobis`` in the dense and the
low-rank form) is exported from a batch-1 example with a dynamic batch axis and run at batches 1, 4 and 7:
``torch.export.export`` (the ``ExportedProgram``'s module) and ``torch.onnx.export`` (run in ONNX Runtime).
The ONNX tests need the ``test`` extra (onnx, onnxruntime, onnxscript); they skip only where onnx is not
installed, and fail instead with ``ANOMSTATS_REQUIRE_ONNX=1`` (:func:`tests._export.onnx_stack`).

Tolerances (float32, two evaluations of the same buffers; :mod:`tests._tolerances`)
----------------------------------------------------------------------------------
The issue asks for agreement "within 1e-5 of eager". The assertions use the stated float32 bound of each
comparison, per element; where that bound is tighter than 1e-5 the test asserts so, where it is not the
reason is below. The bounds are first-order worst cases: the differences measured on these problems are at
most 5e-7 (relative; absolute on ``log p``), 1-2% of the bound or less.

* PaDiM, dense: ``mahalanobis_tolerances(..., shared_fit=True)``, ``rtol = kappa (C + 2) C eps32`` (the
  evaluation of ``dᵀ P d``, halved by the square root, two sides). The test problem is well conditioned
  (200 images of C = 4 features) so that the bound is below 1e-5 (4.9e-6), and the test asserts that it is.
* KDE ``forward`` / ``log_prob``: ``KDEErrorModel`` with two ``ADAPTER32`` routes on a shared whitening: per
  query ``2 eps32 ((D + 2)(1.5 |y|² + q) + sqrt(N) + 1 + |log p|)`` relative to the density (absolute on
  ``log p``). It is above 1e-5 (2.4e-5..4.4e-5 for the near queries, D = 3, N = 300) because of the
  expanded square: the exponent of every (query, point) pair is rounded relative to ``|y|² + |t|²``, not to
  the distance. Even at the data mean, where ``q = D log(1 + 1/h²)`` ≈ 5.4 (Scott's ``h``), the rounding
  terms ``2 eps32 ((D + 2) q + sqrt(N) + 1)`` alone are 1.1e-5. The bound is used as it is: it stays far
  below what a defect of one path would cost (an off-by-one normaliser is 3e-3 here, a bandwidth off by
  1e-4 moves the density by about q·1e-4 ≈ 5e-4).
* PaDiM, low rank: ``low_rank_evaluation_rtol``, ``((4 sqrt(r) + 1)(C + 2) + 2 r) eps32 sqrt(kappa)`` with
  ``kappa = λ_max / ρ``. The residual term divides by the ridge ``ρ`` (0.01), so ``kappa`` is the data's
  variance over the ridge (hundreds here, more for PaDiM features) and the bound is 1.0e-3 here: a
  property of the low-rank form with a small ridge, not of export.

Large models: ONNX external data
--------------------------------
A protobuf message cannot exceed 2 GiB, so one ``.onnx`` file cannot hold PaDiM's precision stack at
wide_resnet50 width (C = 550, 64x64 patches: 4096 · 550² · 4 B = 4.96 GB in float32). The weights then go to
ONNX external data: ``test_large_models_export_with_external_data`` shows the mechanism on a small model
with the flag forced. The recipe for a >2 GiB PaDiM model::

    import onnx, onnxruntime, torch
    from anomstats_torch import MultiVariateGaussian

    class PadimScore(torch.nn.Module):            # what a deployment scores: the Mahalanobis map
        def __init__(self, gaussian):
            super().__init__()
            self.gaussian = gaussian
        def forward(self, embedding):
            return self.gaussian.mahalanobis(embedding)

    gaussian = MultiVariateGaussian()
    gaussian.load_state_dict(torch.load("padim_gaussian.pt"))  # {"mean", "inv_covariance"}, or fit()
    gaussian.chunk_bytes = 16 * 2**30  # one block: the graph holds the precision as one tensor (see below)
    model = PadimScore(gaussian).eval()
    example = torch.randn(2, 550, 64, 64)  # (B, C, H, W); B >= 2, see the note on batch 1
    torch.onnx.export(
        model, (example,), "padim.onnx",
        dynamo=True,          # the torch.export-based exporter (the default since torch 2.9)
        external_data=True,   # tensors -> padim.onnx.data next to padim.onnx (the default in recent torch)
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    onnx.checker.check_model("padim.onnx")           # a path: the checker reads the data file itself
    session = onnxruntime.InferenceSession("padim.onnx")   # a path, not bytes
    scores = session.run(None, {session.get_inputs()[0].name: embedding.numpy()})[0]  # (B, 64, 64)

* ``padim.onnx`` holds the graph (tens of kB) and names ``padim.onnx.data`` (the 4.96 GB of tensors) by a
  relative path: keep the two files together in one directory and do not rename the data file.
* ``onnx.load("padim.onnx")`` reads the tensors into one in-memory ``ModelProto``, which cannot be
  serialised again beyond 2 GiB: ``onnx.checker.check_model(proto)`` then refuses ("too large (>2GiB).
  Call check_model with model path instead"); use ``onnx.load(path, load_external_data=False)`` to
  inspect the graph only. Build sessions from the path: from bytes, ONNX Runtime cannot find the data.
* A model made another way (the legacy ``dynamo=False`` exporter, an edited proto): save it with
  ``onnx.save_model(proto, "padim.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
  location="padim.onnx.data", size_threshold=1024)``.
* Batch 1: exporting from a batch-1 example needs ``with torch.fx.experimental._config.patch(
  backed_size_oblivious=True):`` around the export (``torch.export`` otherwise fixes a size-1 dimension
  to 1); an example of batch 2 or more gives a graph that runs at any batch, batch 1 included.
* Memory and disk, measured on a 0.58 GiB dense model (C = 550, 512 patches; torch 2.13, onnxruntime
  1.32, 2 cores): the export took 7-10 s and raised the peak RSS from 0.87 GiB (building the model) to
  1.03 GiB; ``padim.onnx`` was 7-70 kB and ``padim.onnx.data`` exactly the buffers (large tensors are not
  constant-folded into copies: the ONNX optimizer folds inputs of at most 8192 elements). Scale by 8 for
  the 4.96 GB model; the disk needs the size of the buffers.
* ``chunk_bytes``: the scoring graph is blocked over patches as eager scoring is, planned for a batch of
  64 (per patch ``64 · C · 3 · 4 + C² · 4`` bytes, 1.6 MB at C = 550). With the default 64 MiB a large
  precision becomes dozens of slices of one initializer, which ONNX Runtime's graph optimisations fold
  into copies at load: 7-8 s and a peak of 1.75 GiB (3x the buffers) for the model above. With
  ``chunk_bytes`` above ``P`` times that (16 GiB for 4096 patches) the graph holds one unsliced tensor:
  the session loads at once with a peak of 0.69 GiB (1.2x), and scores a batch 25% faster. Set it on the
  module you export (eager scoring then runs in one block too: ``B · P · C · 12`` bytes of temporaries),
  or keep the default and build the session with ``SessionOptions()`` whose ``graph_optimization_level``
  is ``GraphOptimizationLevel.ORT_DISABLE_ALL`` (0.73 GiB, scoring about 30% slower). The low-rank
  form's ``basis`` is blocked the same way.
* ``MultiVariateGaussian(form="low_rank")`` stores ``P · C · r`` numbers instead of ``P · C²``: 1.79 GB at
  200 images (r = 199) for the size above, under the 2 GiB limit but over the exporter's 1.5 GiB
  threshold, above which it writes external data even with ``external_data=False``.
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from anomstats._low_rank import dense_from_low_rank  # noqa: E402
from anomstats_torch import GaussianKDE, MultiVariateGaussian  # noqa: E402
from tests._export import (  # noqa: E402
    BATCHES,
    KDELogDensity,
    PadimScore,
    export_onnx,
    export_program,
    onnx_export_supports_external_data,
    onnx_stack,
    run_onnx,
)
from tests._tolerances import (  # noqa: E402
    ADAPTER32,
    KDEErrorModel,
    assert_close_each,
    bandwidth_from_whitening,
    kde_log_density_whitened,
    low_rank_evaluation_rtol,
    mahalanobis_tolerances,
)
from tests.anomalib_oracle import AnomalibGaussianKDE  # noqa: E402

#: The agreement issue 13 asks of exported graphs; asserted where the stated float32 bound is tighter.
ISSUE_TOLERANCE = 1e-5


def _fitted():
    g = torch.Generator().manual_seed(0)
    kde = GaussianKDE(torch.randn(300, 3, generator=g) + 2.0)
    mvg = MultiVariateGaussian()
    mvg.fit(torch.randn(20, 4, 3, 5, generator=g))
    queries = torch.randn(9, 3, generator=g) + 2.0
    embeddings = torch.randn(7, 4, 3, 5, generator=g)
    return kde, mvg, queries, embeddings


def _kde_bound(kde, queries):
    """kde_route_error for two float32 evaluations of one module (traced / exported / ONNX against eager).

    Shared whitening; both form expanded squares of centred float32 queries (the traced graph through the
    log-sum-exp route, whose exp(log p) is term (4)). ``q`` from a float64 evaluation of the same buffers.
    """
    train = np.linalg.solve(kde.bw_transform.double().numpy().T, kde.dataset.double().numpy().T).T
    h = bandwidth_from_whitening(kde.bw_transform)
    log_density = _log_density64(kde, queries)
    bound = KDEErrorModel.of(train, queries.double().numpy(), h, (ADAPTER32, ADAPTER32), shared_whitening=True)
    return bound, log_density


def _log_density64(kde, queries):
    whitening = kde.bw_transform.double().numpy()
    return kde_log_density_whitened(
        kde.dataset.double().numpy(), queries.double().numpy() @ whitening, float(torch.log(kde.norm.double()))
    )


def _score_rtol(mvg):
    """mahalanobis_tolerances for two float32 evaluations of the same buffers (shared fit)."""
    covariance = np.linalg.inv(mvg.inv_covariance.double().numpy())
    return mahalanobis_tolerances(covariance, 2, dtype=np.float32, shared_fit=True)[0]


def _low_rank_rtol(low):
    """low_rank_evaluation_rtol for two float32 evaluations of the same low-rank buffers."""
    basis = low.basis.double().numpy()
    c = basis.shape[1]
    covariance = dense_from_low_rank(
        basis, low.eigenvalues.double().numpy(), float(low.ridge), inverse=False, out=np.empty((basis.shape[0], c, c))
    )
    return low_rank_evaluation_rtol(covariance, basis.shape[2], np.float32)


def _trace(fn, example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace is deprecated in favour of export
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("error", torch.jit.TracerWarning)  # our code gives the tracer nothing to doubt
        return fn(example)


# --------------------------------------------------------------------------- what is exported, and its bounds
@functools.lru_cache(maxsize=None)
def _cases():
    """name -> (module, inputs (7 rows), tolerance(b): assert_close_each's keywords for the first b rows).

    Fitted once per session (the modules are only evaluated and exported, never changed).
    """
    kde, _, queries, _ = _fitted()
    features = queries[:7].clone()
    features[1] += 30.0  # far from the data: densities underflow to 0 in float32, log p stays finite
    features[6] -= 30.0

    def kde_density(b):  # relative bound on densities (0 where both underflow: compared exactly)
        bound, log_density = _kde_bound(kde, features[:b])
        return dict(rtol=bound.rtol_each(log_density), atol=0)

    def kde_log(b):  # the same number as an absolute bound on log p (|d log p| = |dp / p|)
        bound, log_density = _kde_bound(kde, features[:b])
        return dict(rtol=0, atol=bound.log_atol_each(log_density))

    g = torch.Generator().manual_seed(1)
    dense = MultiVariateGaussian()
    dense.fit(torch.randn(200, 4, 3, 5, generator=g))  # well conditioned: the bound is below 1e-5
    dense_rtol = _score_rtol(dense)
    assert dense_rtol <= ISSUE_TOLERANCE, dense_rtol  # issue 13's 1e-5, guaranteed by the stated bound
    low = MultiVariateGaussian(form="low_rank")
    low.fit(torch.randn(6, 24, 3, 5, generator=g))  # r = 5 < C = 24
    low_rtol = _low_rank_rtol(low)
    return {
        "kde_forward": (kde, features, kde_density),
        "kde_log_prob": (KDELogDensity(kde), features, kde_log),
        "padim_dense": (PadimScore(dense), torch.randn(7, 4, 3, 5, generator=g), lambda b: {"rtol": dense_rtol}),
        "padim_low_rank": (PadimScore(low), torch.randn(7, 24, 3, 5, generator=g), lambda b: {"rtol": low_rtol}),
    }


CASES = ["kde_forward", "kde_log_prob", "padim_dense", "padim_low_rank"]


# --------------------------------------------------------------------------- TorchScript tracing
def test_jit_trace_at_batch_one_is_correct_at_other_batch_sizes():
    kde, mvg, queries, embeddings = _fitted()
    traced_kde = _trace(lambda ex: torch.jit.trace(kde, ex), queries[:1])
    for m in (1, 2, 9):
        bound, log_density = _kde_bound(kde, queries[:m])  # float32 rounding of both evaluations
        assert_close_each(traced_kde(queries[:m]), kde(queries[:m]), rtol=bound.rtol_each(log_density), atol=0)
    traced_score = _trace(lambda ex: torch.jit.trace(PadimScore(mvg), ex), embeddings[:1])
    rtol = _score_rtol(mvg)  # the same buffers: float32 evaluation rounding only
    for b in (1, 3, 7):
        torch.testing.assert_close(traced_score(embeddings[:b]), mvg.mahalanobis(embeddings[:b]), rtol=rtol, atol=0)


def test_anomalib_style_loop_trace_scores_only_the_first_row():
    # the defect this module fixes: a per-row Python loop is unrolled by the tracer
    kde, _, queries, _ = _fitted()
    reference = AnomalibGaussianKDE()
    reference.load_state_dict(kde.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(reference, queries[:1])
    out = traced(queries)
    assert torch.count_nonzero(out[1:]) == 0 and out[0] != 0


def test_log_prob_traces_too():
    kde, _, queries, _ = _fitted()
    traced = _trace(lambda ex: torch.jit.trace(KDELogDensity(kde), ex), queries[:1])
    far = queries + 100.0
    # _kde_bound as an absolute bound on log p: q ~ |y|^2 ~ 1e5 here, so eps32 q ~ 1e-2 absolute.
    bound, log_density = _kde_bound(kde, far)
    assert_close_each(traced(far), kde.log_prob(far), atol=bound.log_atol_each(log_density))
    assert torch.isfinite(traced(far)).all()


# --------------------------------------------------------------------------- torch.export
@pytest.mark.parametrize("case", CASES)
def test_torch_export_at_batch_one_is_correct_at_other_batch_sizes(case):
    module, inputs, tolerance = _cases()[case]
    exported = export_program(module, inputs[:1]).module()
    for b in BATCHES:
        # the exported graph against eager, float32 both: the case's stated bound (module docstring)
        assert_close_each(exported(inputs[:b]), module(inputs[:b]), **tolerance(b))


# --------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("case", CASES)
def test_onnx_export_at_batch_one_runs_in_onnxruntime_at_other_batch_sizes(case, tmp_path):
    onnx, ort = onnx_stack()
    module, inputs, tolerance = _cases()[case]
    path = tmp_path / f"{case}.onnx"
    export_onnx(module, inputs[:1], path)
    onnx.checker.check_model(str(path))
    _assert_dynamic_batch(onnx, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in BATCHES:
        # ONNX Runtime against eager torch, float32 both: the case's stated bound (module docstring)
        assert_close_each(run_onnx(session, inputs[:b]), module(inputs[:b]), **tolerance(b))


def _assert_dynamic_batch(onnx, path):
    """The exported graph's batch axis is symbolic (the exporter falls back to a fixed batch of 1 if it must)."""
    axis = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    assert axis.dim_param and not axis.HasField("dim_value"), f"the batch axis of {path.name} is fixed: {axis}"


def _external_tensors(onnx, path):
    """(name, location, length) of the initializers of the .onnx at ``path`` stored as external data."""
    model = onnx.load(str(path), load_external_data=False)
    out = []
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {entry.key: entry.value for entry in tensor.external_data}
            out.append((tensor.name, entries["location"], int(entries.get("length", 0))))
    return model, out


def test_large_models_export_with_external_data(tmp_path):
    """Beyond 2 GiB the tensors must live outside the .onnx protobuf: the mechanism, at 1 MiB with the flag on."""
    onnx, ort = onnx_stack()
    if not onnx_export_supports_external_data():  # pragma: no cover - torch < 2.5
        pytest.skip("this torch.onnx.export has no external_data argument")
    g = torch.Generator().manual_seed(2)
    mvg = MultiVariateGaussian()
    mvg.fit(torch.randn(256, 64, 8, 8, generator=g))  # precision (64, 64, 64) float32: 1 MiB
    model = PadimScore(mvg)
    embeddings = torch.randn(7, 64, 8, 8, generator=g)
    buffer_bytes = sum(t.numel() * t.element_size() for t in mvg.buffers())
    rtol = _score_rtol(mvg)  # two float32 evaluations of the same buffers

    # Forced on: the graph in padim.onnx, every tensor of weight in padim.onnx.data beside it.
    external = tmp_path / "external"
    external.mkdir()
    export_onnx(model, embeddings[:1], external / "padim.onnx", external_data=True)
    assert sorted(os.listdir(external)) == ["padim.onnx", "padim.onnx.data"]
    _assert_dynamic_batch(onnx, external / "padim.onnx")
    graph_bytes = (external / "padim.onnx").stat().st_size
    data_bytes = (external / "padim.onnx.data").stat().st_size
    assert graph_bytes < buffer_bytes / 8, (graph_bytes, buffer_bytes)  # the .onnx holds no weights
    # the data file holds the buffers, once (large tensors are not constant-folded into copies)
    assert buffer_bytes <= data_bytes <= 1.5 * buffer_bytes + 65536, (data_bytes, buffer_bytes)
    proto, tensors = _external_tensors(onnx, external / "padim.onnx")
    assert {location for _, location, _ in tensors} == {"padim.onnx.data"}  # relative: the pair can move
    assert sum(length for *_, length in tensors) >= mvg.inv_covariance.numel() * 4
    assert proto.ByteSize() == graph_bytes

    # The pair moves together (the .onnx names its data file relatively); checked and run from the path.
    moved = tmp_path / "deployed"
    shutil.copytree(external, moved)
    shutil.rmtree(external)
    onnx.checker.check_model(str(moved / "padim.onnx"))
    session = ort.InferenceSession(str(moved / "padim.onnx"), providers=["CPUExecutionProvider"])
    for b in BATCHES:
        # ONNX Runtime against eager torch, float32 both: mahalanobis_tolerances (shared fit)
        assert_close_each(run_onnx(session, embeddings[:b]), model(embeddings[:b]), rtol=rtol, atol=0)

    # Forced off: one self-contained file holding the weights (what a > 2 GiB model cannot do).
    inline = tmp_path / "inline"
    inline.mkdir()
    export_onnx(model, embeddings[:1], inline / "padim.onnx", external_data=False)
    assert os.listdir(inline) == ["padim.onnx"]
    assert (inline / "padim.onnx").stat().st_size >= buffer_bytes
    assert not _external_tensors(onnx, inline / "padim.onnx")[1]
    inline_session = ort.InferenceSession(str(inline / "padim.onnx"), providers=["CPUExecutionProvider"])

    # The same model re-saved by onnx itself (the route for protos made otherwise), loaded back with its data.
    resaved = tmp_path / "resaved"
    resaved.mkdir()
    onnx.save_model(
        onnx.load(str(inline / "padim.onnx")), str(resaved / "padim.onnx"), save_as_external_data=True,
        all_tensors_to_one_file=True, location="padim.onnx.data", size_threshold=1024,
    )
    assert sorted(os.listdir(resaved)) == ["padim.onnx", "padim.onnx.data"]
    assert (resaved / "padim.onnx").stat().st_size < buffer_bytes / 8
    resaved_session = ort.InferenceSession(str(resaved / "padim.onnx"), providers=["CPUExecutionProvider"])
    for b in BATCHES:
        inline_scores = run_onnx(inline_session, embeddings[:b])
        # one graph, one runtime, the same weights: the same numbers, whichever file holds the weights
        torch.testing.assert_close(run_onnx(resaved_session, embeddings[:b]), inline_scores, rtol=0, atol=0)
        # two float32 evaluations of the same buffers (exports of one module): mahalanobis_tolerances
        assert_close_each(run_onnx(session, embeddings[:b]), inline_scores, rtol=rtol, atol=0)
