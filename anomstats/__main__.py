"""Command line: ``python -m anomstats demo`` (and, later, ``validate``)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _demo(args: argparse.Namespace) -> int:
    import numpy as np

    from . import cov

    rng = np.random.default_rng(0)
    cases = {
        "gaussian (5 vars, 1000 obs)": rng.standard_normal((5, 1000)),
        "offset by 1e3": rng.standard_normal((4, 500)) + 1e3,
        "float32": rng.standard_normal((3, 200)).astype(np.float32),
        "weighted": rng.standard_normal((3, 300)),
    }
    worst = 0.0
    print(f"{'case':32s} {'max rel. diff vs numpy.cov':>28s}")
    for name, data in cases.items():
        kw = {"aweights": rng.uniform(0.1, 2.0, data.shape[1])} if name == "weighted" else {}
        ours, ref = cov(data, **kw), np.cov(data, **kw)
        rel = float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
        worst = max(worst, rel)
        print(f"{name:32s} {rel:28.2e}")
    ok = worst < 1e-12
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anomstats", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the demonstration")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
