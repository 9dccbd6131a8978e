"""Draw ``docs/_static/bandwidth.png``, the figure of ``docs/bandwidth.rst`` (bandwidth selection).

Left: a 1-D bimodal sample, its true density and the KDEs with Scott's, Silverman's and the ``cv_ml``
bandwidth. Right: the leave-one-out log-likelihood against the bandwidth factor, its maximum marked
(the ``cv_ml`` factor) next to the two rules of thumb.

Not run by the documentation build (which must not depend on matplotlib's rendering); rerun it by hand
after a change that moves the curves, and commit the PNG::

    .venv/bin/python docs/_ext/bandwidth_figure.py [--out docs/_static/bandwidth.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import stats

import anomstats
from anomstats import bandwidth

OUT = Path(__file__).resolve().parents[1] / "_static" / "bandwidth.png"

#: The mixture: a broad mode and a narrow one, the case where the rules of thumb (derived for one
#: Gaussian) over-smooth and the likelihood's choice does not.
WEIGHTS = (0.65, 0.35)
MEANS = (0.0, 3.5)
SDS = (1.0, 0.5)
N = 300


def sample(n: int = N, seed: int = 0) -> np.ndarray:
    """``n`` points of the bimodal mixture, fixed seed."""
    rng = np.random.default_rng(seed)
    component = rng.random(n) < WEIGHTS[1]
    return np.where(component, rng.normal(MEANS[1], SDS[1], n), rng.normal(MEANS[0], SDS[0], n))


def true_density(grid: np.ndarray) -> np.ndarray:
    return sum(w * stats.norm.pdf(grid, m, s) for w, m, s in zip(WEIGHTS, MEANS, SDS))


def draw(out: Path = OUT) -> Path:
    """Write the figure to ``out`` and return the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = sample()
    grid = np.linspace(x.min() - 1.0, x.max() + 1.0, 600)
    kdes = {rule: anomstats.GaussianKDE(x, bw_method=rule) for rule in ("scott", "silverman", "cv_ml")}
    variance = float(np.var(x, ddof=1))
    factors = np.geomspace(0.03, 1.5, 120)
    loo = np.array([bandwidth.loo_log_likelihood(x, f**2 * variance) for f in factors])

    fig = Figure(figsize=(9.0, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_d, ax_l = fig.subplots(1, 2, width_ratios=[1.25, 1])
    colours = {"scott": "tab:orange", "silverman": "tab:green", "cv_ml": "tab:blue"}
    ax_d.plot(grid, true_density(grid), color="black", lw=2.2, alpha=0.35, label="true density")
    truth = true_density(grid)
    for rule, kde in kdes.items():
        density = kde.pdf(grid)
        # Integrated squared error against the truth: how close each curve is, in one number.
        ise = float(np.sum((density - truth) ** 2) * (grid[1] - grid[0]))
        ax_d.plot(grid, density, color=colours[rule], lw=1.3, label=f"{rule}: factor {kde.factor:.3f}, ISE {ise:.4f}")
    ax_d.plot(x, np.full_like(x, -0.012), "|", color="0.4", ms=6, alpha=0.5)
    ax_d.set(xlabel="x", ylabel="density", title=f"KDE of {N} points from a two-mode mixture")
    ax_d.legend(fontsize=8, loc="upper left")

    ax_l.plot(factors, loo, color="tab:blue", lw=1.5)
    best = float(kdes["cv_ml"].factor)
    ax_l.plot([best], [bandwidth.loo_log_likelihood(x, best**2 * variance)], "o", color="tab:blue",
              label=f"maximum: cv_ml, {best:.3f}")
    for rule in ("scott", "silverman"):
        ax_l.axvline(float(kdes[rule].factor), color=colours[rule], ls="--", lw=1.0, label=rule)
    ax_l.set_xscale("log")
    ax_l.set_ylim(max(loo.min(), loo.max() - 1.0), loo.max() + 0.08)  # the top of the curve, not its tails
    ax_l.set(xlabel="bandwidth factor (log)", ylabel="mean leave-one-out log-density",
             title="Leave-one-out log-likelihood")
    ax_l.legend(fontsize=8, loc="lower center")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"where to write (default {OUT})")
    print(f"wrote {draw(parser.parse_args().out)}")
