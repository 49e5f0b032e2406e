"""``gradnorm export RUN``: write E_t[w_i] of a run as static weights for retraining (paper 5.2)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._common import add_root_and_window, window_of
from .summary import listing, print_problems


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="write a run's time-averaged weights E_t[w_i] to a JSON file")
    parser.add_argument("run", help="run id (a directory under the runs root)")
    add_root_and_window(parser)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output file, or - for standard output (default: <run>-weights.json next to the run; standard output for the bundled sample runs)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from gradnorm.toolkit.analysis import bundled_runs_root, export_weights, resolve_runs_root

    root = resolve_runs_root(args.root).path
    out: Path | None = args.out
    if out is None and root.resolve() != bundled_runs_root().resolve():
        out = root / f"{args.run}-weights.json"  # beside the run it came from, not wherever the command ran
    if out is not None and str(out) == "-":
        out = None
    document = export_weights(root, args.run, out, window=window_of(args), burn_in=args.burn_in)
    print(json.dumps(document, indent=2, sort_keys=True))
    if out is not None:
        print(f"\nwritten to {out}", file=sys.stderr)
    elif args.out is None:
        print("\n(the bundled sample runs are not written to: give --out FILE to save this)", file=sys.stderr)
    print_problems("export", listing(root, [args.run]))
    return 0
