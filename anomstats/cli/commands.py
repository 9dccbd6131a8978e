"""The ``anomstats`` command (``anomstats ...`` or ``python -m anomstats ...``): its parser and ``main``.

``anomstats validate`` checks the core against NumPy/SciPy and the torch adapter against the core
on a built-in battery of generated datasets, prints a table and exits with status 1 if any check
fails. ``anomstats demo`` runs anomaly detection on scikit-learn's bundled 8x8 digits (DFKDE-style
and PaDiM-style), prints AUROCs and writes a PNG figure.

Examples
--------
>>> parser = build_parser()
>>> args = parser.parse_args(["validate", "--quick", "--only", "cov"])
>>> args.command, args.quick, args.only, args.torch_device
('validate', True, 'cov', 'cpu')
>>> parser.parse_args(["demo"]).backend
'auto'
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Sequence

from . import _optional

__all__ = ["build_parser", "main"]


def _seed(text: str) -> int:
    """``--seed``: a non-negative integer (NumPy seeds its generators from those), checked before anything runs."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer (NumPy's seeds are), got {value}")
    return value


def _unwritable(path: str) -> str | None:
    """Why ``path`` cannot be written, or None: checked before the work, not after it.

    The file is really opened for appending (``os.access`` answers for permission bits only: not for a
    name too long for the file system, a read-only mount, or ``/proc`` when run as root), and removed again
    if it did not exist before; an existing file keeps its contents. Through a symbolic link, the file
    checked (and removed again when the check created it) is the one the link resolves to: a dangling link
    stays dangling. The reason names the OS error.
    """
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return "is a directory"
    if not os.path.lexists(parent):
        return f"its folder {parent} does not exist"
    # Opening a dangling link creates its target: what must be removed afterwards is that target, not the link.
    target = os.path.realpath(path)
    existed = os.path.lexists(target)
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else None
        return f"cannot be opened for writing: {reason}" + (f" ({code})" if code else "")
    if not existed:
        try:
            os.remove(target)
        except OSError:
            pass  # created but not removable: the write will replace it
    return None


def _validate(args: argparse.Namespace) -> int:
    from .validate import format_table, run_validation, write_json

    problem = _unwritable(args.json) if args.json else None
    if problem:
        print(f"anomstats validate: error: --json {args.json}: {problem}", file=sys.stderr)
        return 2
    if args.torch_device != "cpu" and not args.no_torch:
        problem = _torch_device_problem(args.torch_device)
        if problem:
            print(f"anomstats validate: error: --torch-device {args.torch_device}: {problem}", file=sys.stderr)
            return 2
    rows = run_validation(
        quick=args.quick,
        seed=args.seed,
        only=args.only,
        include_torch=not args.no_torch,
        torch_device=args.torch_device,
        progress=False if args.no_progress else None,
    )
    if not rows:
        print(f"no check matches --only {args.only!r}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.json:
        settings = {"quick": args.quick, "seed": args.seed, "only": args.only, "torch_device": args.torch_device}
        write_json(rows, args.json, settings)
        print(f"wrote {args.json}")
    return 1 if any(row.status == "FAIL" for row in rows) else 0


def _torch_device_problem(device: str) -> str | None:
    """Why the torch checks cannot run on ``device``, or None when they can."""
    if not _optional.is_installed("torch"):
        return _optional.TORCH_MISSING
    import torch

    try:
        torch_device = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        return f"not a torch device ({exc})"
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available (torch.cuda.is_available() is False)"
    return None


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoError, run_demo

    problem = _unwritable(args.out)
    if problem:
        print(f"anomstats demo: error: --out {args.out}: {problem}", file=sys.stderr)
        return 2
    try:
        run_demo(out=args.out, backend=args.backend, quick=args.quick, seed=args.seed)
    except DemoError as exc:
        print(f"anomstats demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _add_validate_parser(subparsers: argparse._SubParsersAction) -> None:
    val = subparsers.add_parser(
        "validate", help="check the numerics against NumPy/SciPy (and the torch adapter against the core)"
    )
    val.add_argument("--quick", action="store_true", help="small problem sizes (a few seconds)")
    val.add_argument("--json", metavar="FILE", help="also write the rows to FILE as JSON")
    val.add_argument("--only", metavar="TEXT", help="run only the checks whose name or case contains TEXT")
    val.add_argument("--seed", type=_seed, default=0, help="seed of the generated datasets (default 0)")
    val.add_argument("--no-torch", action="store_true", help="skip the torch adapter's checks")
    val.add_argument(
        "--torch-device", default="cpu", metavar="DEVICE", help="device for the torch adapter's checks, e.g. cuda (default: cpu)"
    )
    val.add_argument("--no-progress", action="store_true", help="never draw the progress bar")
    val.set_defaults(func=_validate)


def _add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser("demo", help="anomaly detection on scikit-learn's 8x8 digits, with a PNG figure")
    demo.add_argument("--out", default="anomstats-demo.png", help="where to write the figure (default: %(default)s)")
    demo.add_argument(
        "--backend",
        choices=("auto", "numpy", "torch"),
        default="auto",
        help="torch adapter or NumPy core; auto uses torch when it is installed (default: %(default)s)",
    )
    demo.add_argument("--quick", action="store_true", help="fewer classes and images (a few seconds)")
    demo.add_argument("--seed", type=_seed, default=0, help="seed of the splits and synthetic defects (default 0)")
    demo.set_defaults(func=_demo)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``anomstats`` command."""
    parser = argparse.ArgumentParser(
        prog="anomstats",
        description="Exact, fast, memory-bounded statistics for density-based anomaly detection.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{validate,demo}")
    _add_validate_parser(subparsers)
    _add_demo_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (``sys.argv[1:]`` by default); return the exit status."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))
