"""``gradnorm export RUN``: write E_t[w_i] of a run as static weights for retraining (paper 5.2)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import add_root_and_window, window_of


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="write a run's time-averaged weights E_t[w_i] to a JSON file")
    parser.add_argument("run", help="run id (a directory under the runs root)")
    add_root_and_window(parser)
    parser.add_argument("--out", type=Path, default=None, help="output file (default: <run>-weights.json here)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from gradnorm.toolkit.analysis import default_runs_root, export_weights

    root = args.root or default_runs_root()
    out = args.out or Path(f"{args.run}-weights.json")
    document = export_weights(root, args.run, out, window=window_of(args), burn_in=args.burn_in)
    print(json.dumps(document, indent=2, sort_keys=True))
    print(f"\nwritten to {out}")
    return 0
