"""``anomstats demo``: density-based anomaly detection on scikit-learn's bundled 8x8 digits.

Two detectors, in the way anomalib's models use the statistics:

* **DFKDE-style** (image level): images are projected by PCA (fitted on the normal training images,
  by NumPy's SVD) and scored by the negative Gaussian-KDE log-density. One digit is normal, the nine
  others are the anomalies; the AUROC is printed per normal digit, with the bandwidth of Scott's rule
  (anomalib's) and with the one that maximises the leave-one-out likelihood (``bw_method='cv_ml'``).
* **PaDiM-style** (pixel level): each pixel gets a feature vector (its 3x3 neighbourhood, C = 9), a
  ``MultiVariateGaussian`` is fitted per pixel position on the normal training images, and test
  images of the same digit with a synthetic defect pasted in (a small inverted square) are scored by
  their Mahalanobis anomaly map. The pixel-level AUROC (against the defect masks) and the image-level
  AUROC (maximum of the map, defective against clean test images) are printed.

A PNG figure (KDE density contours over the 2-D PCA data, anomaly maps over defective images) is
written to ``out``. The digits ship inside scikit-learn: nothing is downloaded. The torch adapter is
used when torch is installed (``backend="auto"``), the NumPy core otherwise.

Examples
--------
>>> print(f"{auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]):.2f}")
0.75
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

import anomstats

from . import _optional

__all__ = ["DemoError", "DemoResult", "auroc", "neighbourhood_features", "paste_defect", "run_demo"]


class DemoError(RuntimeError):
    """A problem the user can fix (a missing package, an unavailable backend, a bad path)."""


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the binary ``labels`` (1 = anomalous).

    Computed as the Mann-Whitney statistic from average ranks, so tied scores count one half.

    Parameters
    ----------
    scores : array_like
        Anomaly scores (higher means more anomalous).
    labels : array_like
        0 for normal, 1 for anomalous, same length as ``scores``.

    Returns
    -------
    float
        The probability that a random anomalous item scores above a random normal one.

    Examples
    --------
    >>> auroc([0.0, 1.0, 2.0, 3.0], [0, 0, 1, 1])
    1.0
    >>> auroc([1.0, 1.0], [0, 1])
    0.5
    """
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels must have the same length, got {s.size} and {y.size}")
    if not np.all(np.isin(y, (0, 1))):
        raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; the AUROC is undefined")
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("labels must contain both normal (0) and anomalous (1) items")
    ranks = rankdata(s)  # average ranks: ties contribute one half
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def neighbourhood_features(images: np.ndarray, radius: int = 1) -> np.ndarray:
    """Per-pixel feature vectors: the (2r+1)² neighbourhood of each pixel, zero-padded.

    Parameters
    ----------
    images : ndarray, shape (N, H, W)
    radius : int

    Returns
    -------
    ndarray, shape (N, (2r+1)², H, W)
        Laid out as PaDiM's embeddings ``(B, C, H, W)``.

    Examples
    --------
    >>> f = neighbourhood_features(np.arange(9.0).reshape(1, 3, 3))
    >>> f.shape
    (1, 9, 3, 3)
    >>> f[0, :, 1, 1]  # the centre pixel sees the whole image
    array([0., 1., 2., 3., 4., 5., 6., 7., 8.])
    """
    imgs = np.asarray(images, dtype=np.float64)
    if imgs.ndim != 3:
        raise ValueError(f"images must have shape (N, H, W), got {imgs.shape}")
    n, h, w = imgs.shape
    k = 2 * radius + 1
    padded = np.pad(imgs, ((0, 0), (radius, radius), (radius, radius)))
    out = np.empty((n, k * k, h, w))
    for i in range(k):
        for j in range(k):
            out[:, i * k + j] = padded[:, i : i + h, j : j + w]
    return out


def paste_defect(image: np.ndarray, rng: np.random.Generator, *, threshold: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Return a copy of ``image`` (values in [0, 1]) with a small square inverted, and its mask.

    The square is 2 or 3 pixels wide at a random position; the mask marks the pixels that changed
    by more than ``threshold`` (inverting a mid-grey pixel changes nothing visible).

    Examples
    --------
    >>> img = np.zeros((8, 8))
    >>> bad, mask = paste_defect(img, np.random.default_rng(0))
    >>> bool(mask.sum() >= 4) and bool(np.all(bad[mask] == 1.0)) and bool(np.all(img == 0))
    True
    """
    h, w = image.shape
    size = int(rng.integers(2, 4))
    r, c = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    out = np.array(image, dtype=np.float64, copy=True)
    out[r : r + size, c : c + size] = 1.0 - out[r : r + size, c : c + size]
    mask = np.abs(out - image) > threshold
    if not mask.any():  # a mid-grey square: make the defect visible instead of an empty mask
        out[r : r + size, c : c + size] = 1.0
        mask = np.abs(out - image) > threshold
    return out, mask


# --------------------------------------------------------------------------------------------------
# Backends: the same two operations on the NumPy core or on the torch adapter
# --------------------------------------------------------------------------------------------------


class _NumpyBackend:
    name = "numpy"

    def kde_logpdf(self, train: np.ndarray, query: np.ndarray, bw_method: str = "scott") -> np.ndarray:
        # The core takes scipy's layout: variables in rows.
        kde = anomstats.GaussianKDE(train.T, bw_method=bw_method)
        return np.asarray(kde.logpdf(query.T), dtype=np.float64)

    def mahalanobis_maps(self, train: np.ndarray, test: np.ndarray) -> np.ndarray:
        model = anomstats.MultiVariateGaussian().fit(train)
        return np.asarray(model.mahalanobis(test), dtype=np.float64)


class _TorchBackend:
    name = "torch"

    def __init__(self) -> None:
        import torch

        import anomstats_torch

        self.torch = torch
        self.mod = anomstats_torch

    def _tensor(self, a: np.ndarray) -> Any:
        """A float64 tensor sharing memory with a contiguous float64 copy (or view) of ``a``."""
        return self.torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))

    def kde_logpdf(self, train: np.ndarray, query: np.ndarray, bw_method: str = "scott") -> np.ndarray:
        kde = self.mod.GaussianKDE(bw_method=bw_method).double()
        with self.torch.no_grad():
            kde.fit(self._tensor(train))
            out = kde.log_prob(self._tensor(query))
        return out.cpu().double().numpy()

    def mahalanobis_maps(self, train: np.ndarray, test: np.ndarray) -> np.ndarray:
        mvg = self.mod.MultiVariateGaussian().double()
        with self.torch.no_grad():
            mvg.fit(self._tensor(train))
            out = mvg.mahalanobis(self._tensor(test))
        return out.cpu().double().numpy().reshape(test.shape[0], *test.shape[2:])


def _pick_backend(backend: str) -> tuple[_NumpyBackend | _TorchBackend, str]:
    if backend not in ("auto", "numpy", "torch"):
        raise DemoError(f"backend must be 'auto', 'numpy' or 'torch', got {backend!r}")
    if backend == "numpy":
        return _NumpyBackend(), "numpy (requested)"
    why_not = _optional.torch_adapter_unavailable_reason()
    if backend == "torch":
        if why_not:
            raise DemoError(f"--backend torch: {why_not}; install it with pip install 'anomstats[torch]'")
        return _TorchBackend(), "torch adapter (requested)"
    if why_not:
        return _NumpyBackend(), f"numpy core ({why_not})"
    return _TorchBackend(), "torch adapter (torch is installed)"


def _require(module: str, what: str) -> object:
    try:
        return _optional.optional_module(module)
    except ImportError as exc:
        raise DemoError(
            f"the demo needs {what} ({exc}); install the demo's extras with pip install 'anomstats[bench]' "
            "(or run `make demo`, which does)"
        ) from None


# --------------------------------------------------------------------------------------------------
# The two experiments
# --------------------------------------------------------------------------------------------------


@dataclass
class DemoResult:
    """What the demo measured (also returned by :func:`run_demo`)."""

    backend: str
    figure: str
    dfkde_auroc: dict[int, float] = field(default_factory=dict)
    #: The same detector with the bandwidth factor maximising the leave-one-out likelihood.
    dfkde_cv_ml_auroc: dict[int, float] = field(default_factory=dict)
    padim_pixel_auroc: dict[int, float] = field(default_factory=dict)
    padim_image_auroc: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0


def _pca(train: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and the top-k principal axes (k, features) of ``train`` (rows are samples)."""
    mean = train.mean(axis=0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    return mean, vt[:k]


def _split(labels: np.ndarray, digit: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    idx = rng.permutation(np.flatnonzero(labels == digit))
    half = len(idx) // 2
    return idx[:half], idx[half:]


def _dfkde(backend, x: np.ndarray, y: np.ndarray, digit: int, k: int, rng: np.random.Generator, max_anomalies: int):
    """AUROCs of the KDE score with Scott's and with the ``cv_ml`` bandwidth, and the split used."""
    train_idx, test_idx = _split(y, digit, rng)
    others = rng.permutation(np.flatnonzero(y != digit))[:max_anomalies]
    mean, axes = _pca(x[train_idx], k)
    train = (x[train_idx] - mean) @ axes.T
    query_idx = np.concatenate([test_idx, others])
    query = (x[query_idx] - mean) @ axes.T
    # DFKDE scales the features by the training set's largest norm; it leaves the ranking unchanged
    # (Scott's bandwidth follows the data) but keeps the numbers in anomalib's range.
    scale = np.linalg.norm(train, axis=1).max()
    labels = np.r_[np.zeros(len(test_idx), dtype=int), np.ones(len(others), dtype=int)]
    aucs = {
        rule: auroc(-backend.kde_logpdf(train / scale, query / scale, bw_method=rule), labels)
        for rule in ("scott", "cv_ml")
    }
    return aucs["scott"], aucs["cv_ml"], (train_idx, test_idx, others)


def _padim(backend, images: np.ndarray, y: np.ndarray, digit: int, rng: np.random.Generator):
    train_idx, test_idx = _split(y, digit, rng)
    n_bad = len(test_idx) // 2
    bad_imgs, masks = [], []
    for i in test_idx[:n_bad]:
        img, mask = paste_defect(images[i], rng)
        bad_imgs.append(img)
        masks.append(mask)
    clean = images[test_idx[n_bad:]]
    test = np.concatenate([np.stack(bad_imgs), clean])
    test_masks = np.concatenate([np.stack(masks), np.zeros(clean.shape, dtype=bool)])
    maps = backend.mahalanobis_maps(neighbourhood_features(images[train_idx]), neighbourhood_features(test))
    pixel = auroc(maps.ravel(), test_masks.ravel().astype(int))
    image = auroc(maps.reshape(len(test), -1).max(axis=1), np.r_[np.ones(n_bad, int), np.zeros(len(clean), int)])
    return pixel, image, (test[:n_bad], test_masks[:n_bad], maps[:n_bad])


def _figure(path: str, backend, x, y, digit, split, dfkde_auc, padim_auc, examples, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train_idx, test_idx, others = split
    mean, axes = _pca(x[train_idx], 2)
    tr = (x[train_idx] - mean) @ axes.T
    te = (x[test_idx] - mean) @ axes.T
    an = (x[others] - mean) @ axes.T
    pts = np.vstack([tr, te, an])
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    pad = 0.05 * (hi - lo)
    gx, gy = np.meshgrid(np.linspace(lo[0] - pad[0], hi[0] + pad[0], 90), np.linspace(lo[1] - pad[1], hi[1] + pad[1], 90))
    grid = np.column_stack([gx.ravel(), gy.ravel()])
    logd = backend.kde_logpdf(tr, grid).reshape(gx.shape)

    fig = Figure(figsize=(13, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.25, 1])
    ax_kde, ax_bar = top.subplots(1, 2, width_ratios=[1.2, 1])
    levels = np.linspace(np.percentile(logd, 40), logd.max(), 12)
    cs = ax_kde.contourf(gx, gy, logd, levels=levels, cmap="Blues", extend="min")
    top.colorbar(cs, ax=ax_kde, label="KDE log-density")
    ax_kde.scatter(an[:, 0], an[:, 1], s=6, c="tab:red", alpha=0.35, label="other digits (anomalies)")
    ax_kde.scatter(te[:, 0], te[:, 1], s=10, c="tab:green", label=f"test digit {digit} (normal)")
    ax_kde.scatter(tr[:, 0], tr[:, 1], s=10, c="black", marker="x", label=f"train digit {digit}")
    ax_kde.set(title=f"GaussianKDE over 2-D PCA of digit {digit}", xlabel="PC 1", ylabel="PC 2")
    ax_kde.legend(loc="lower right", fontsize=8)

    digits = sorted(dfkde_auc)
    pos = np.arange(len(digits))
    ax_bar.bar(pos - 0.2, [dfkde_auc[d] for d in digits], 0.4, label="DFKDE-style (image AUROC)")
    ax_bar.bar(pos + 0.2, [padim_auc[d] for d in digits], 0.4, label="PaDiM-style (pixel AUROC)")
    ax_bar.set(xticks=pos, xticklabels=[str(d) for d in digits], ylim=(0.5, 1.0), xlabel="normal digit", ylabel="AUROC")
    ax_bar.set_title("AUROC per normal digit")
    ax_bar.legend(loc="lower center", fontsize=8, ncol=2, framealpha=0.95)

    imgs, masks, maps = examples
    n_show = min(5, len(imgs))
    axs = bottom.subplots(2, n_show, squeeze=False)
    vmax = float(np.percentile(maps, 99))
    for j in range(n_show):
        # Outline the defect along pixel edges: contour a finely upsampled copy of the mask.
        fine = np.kron(masks[j].astype(float), np.ones((20, 20)))
        h, w = masks[j].shape
        fx, fy = np.meshgrid(np.linspace(-0.5, w - 0.5, fine.shape[1]), np.linspace(-0.5, h - 0.5, fine.shape[0]))
        axs[0, j].imshow(imgs[j], cmap="gray", vmin=0, vmax=1)
        axs[0, j].contour(fx, fy, fine, levels=[0.5], colors="red", linewidths=1.2)
        axs[1, j].imshow(maps[j], cmap="inferno", vmin=0, vmax=vmax)
        axs[1, j].contour(fx, fy, fine, levels=[0.5], colors="cyan", linewidths=1.2)
        for a in axs[:, j]:
            a.set_xticks([])
            a.set_yticks([])
    axs[0, 0].set_ylabel("with defect")
    axs[1, 0].set_ylabel("Mahalanobis map")
    bottom.suptitle(f"PaDiM-style anomaly maps, digit {digit} (outline: pasted defect)", fontsize=11)
    fig.suptitle(title, fontsize=12)
    fig.savefig(path, dpi=90)


def _silent(*args: object, **kwargs: object) -> None:
    """A ``print`` that prints nothing (``verbose=False``)."""


def _dfkde_table(
    backend, flat_images: np.ndarray, labels: np.ndarray, classes: Sequence[int], pca_dims: int,
    max_anomalies: int, seed: int, say: Callable[..., None], result: DemoResult,
) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Run the DFKDE-style experiment for each normal digit, print its table and fill ``result``.

    Returns each digit's split (train, normal test, anomaly indices), which the figure reuses.
    """
    say(f"DFKDE-style: PCA to {pca_dims} dimensions, GaussianKDE log-density as the normality score;")
    say("one digit is normal (half of it trains, half tests), the other digits are the anomalies.")
    say("Bandwidth: Scott's rule (anomalib's), and the factor maximising the leave-one-out likelihood (cv_ml).")
    say(f"{'normal digit':>12}  {'train':>5}  {'test normal':>11}  {'anomalies':>9}  {'AUROC Scott':>11}  "
        f"{'AUROC cv_ml':>11}")
    splits = {}
    for digit in classes:
        rng = np.random.default_rng([seed, digit])
        auc, auc_cv, split = _dfkde(backend, flat_images, labels, digit, pca_dims, rng, max_anomalies)
        result.dfkde_auroc[digit] = auc
        result.dfkde_cv_ml_auroc[digit] = auc_cv
        splits[digit] = split
        train_idx, test_idx, anomaly_idx = split
        say(f"{digit:>12}  {len(train_idx):>5}  {len(test_idx):>11}  {len(anomaly_idx):>9}  {auc:11.3f}  "
            f"{auc_cv:11.3f}")
    say(f"{'mean':>12}  {'':>5}  {'':>11}  {'':>9}  {np.mean(list(result.dfkde_auroc.values())):11.3f}  "
        f"{np.mean(list(result.dfkde_cv_ml_auroc.values())):11.3f}")
    return splits


def _padim_table(
    backend, images: np.ndarray, labels: np.ndarray, classes: Sequence[int], seed: int,
    say: Callable[..., None], result: DemoResult,
) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Run the PaDiM-style experiment for each normal digit, print its table and fill ``result``.

    Returns each digit's defective test images, defect masks and anomaly maps, for the figure.
    """
    say("PaDiM-style: one MultiVariateGaussian per pixel position on 3x3-neighbourhood features (C=9, 8x8),")
    say("fitted on normal training images; half the test images get a pasted defect (an inverted square).")
    say(f"{'normal digit':>12}  {'pixel AUROC':>11}  {'image AUROC':>11}")
    examples = {}
    for digit in classes:
        rng = np.random.default_rng([seed, digit, 1])
        pixel_auc, image_auc, examples[digit] = _padim(backend, images, labels, digit, rng)
        result.padim_pixel_auroc[digit] = pixel_auc
        result.padim_image_auroc[digit] = image_auc
        say(f"{digit:>12}  {pixel_auc:11.3f}  {image_auc:11.3f}")
    say(
        f"{'mean':>12}  {np.mean(list(result.padim_pixel_auroc.values())):11.3f}  "
        f"{np.mean(list(result.padim_image_auroc.values())):11.3f}"
    )
    return examples


def run_demo(
    out: str = "anomstats-demo.png",
    *,
    backend: str = "auto",
    quick: bool = False,
    seed: int = 0,
    verbose: bool = True,
) -> DemoResult:
    """Run both experiments, print their AUROCs and write the figure to ``out``.

    Parameters
    ----------
    out : str
        Path of the PNG figure; its folder is created if needed.
    backend : {"auto", "numpy", "torch"}
        ``auto`` uses the torch adapter when torch is installed, the NumPy core otherwise.
    quick : bool
        Three normal digits instead of ten, fewer anomalies, 8 PCA dimensions (a few seconds).
    seed : int
        Seed of the splits and of the synthetic defects.
    verbose : bool
        Print the tables.

    Returns
    -------
    DemoResult

    Raises
    ------
    DemoError
        scikit-learn or matplotlib is missing, or the torch backend was requested and is unavailable.
    """
    start = time.perf_counter()
    datasets = _require("sklearn.datasets", "scikit-learn (for its bundled digits)")
    _require("matplotlib", "matplotlib (for the figure)")
    impl, backend_note = _pick_backend(backend)
    say = print if verbose else _silent

    digits = datasets.load_digits()
    images = digits.images / 16.0  # pixel values 0..16 -> [0, 1]
    flat_images = images.reshape(len(images), -1)
    labels = digits.target
    classes = [0, 1, 2] if quick else list(range(10))
    pca_dims = 8 if quick else 16  # DFKDE reduces to 16 dimensions
    max_anomalies = 300 if quick else 2000

    say(
        f"anomstats {anomstats.__version__} demo on scikit-learn's 8x8 digits ({len(flat_images)} images); "
        f"backend: {backend_note}"
    )
    say("")
    result = DemoResult(backend=impl.name, figure=os.path.abspath(out))
    splits = _dfkde_table(impl, flat_images, labels, classes, pca_dims, max_anomalies, seed, say, result)
    say("")
    examples = _padim_table(impl, images, labels, classes, seed, say, result)

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    shown = classes[0]
    _figure(
        out,
        impl,
        flat_images,
        labels,
        shown,
        splits[shown],
        result.dfkde_auroc,
        result.padim_pixel_auroc,
        examples[shown],
        f"anomstats demo ({impl.name} backend): density-based anomaly detection on 8x8 digits",
    )
    result.seconds = time.perf_counter() - start
    say("")
    say(f"figure written to {result.figure}  ({result.seconds:.1f} s)")
    return result
