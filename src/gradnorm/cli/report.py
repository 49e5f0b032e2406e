"""``gradnorm report RUN...``: one self-contained HTML file with the app's charts and summary tables."""

from __future__ import annotations

import argparse
from pathlib import Path

from .summary import listing, print_problems


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help="write a self-contained HTML report of one or more runs")
    parser.add_argument("runs", nargs="+", help="run ids under the runs root")
    parser.add_argument(
        "--root", type=Path, default=None, help="runs root (default: $GRADNORM_RUNS_ROOT, else ./runs if it exists, else the bundled sample runs)"
    )
    parser.add_argument("--out", type=Path, default=Path("gradnorm-report.html"), help="output file (default: gradnorm-report.html)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from gradnorm.app.report import write_report
    from gradnorm.toolkit.analysis import default_runs_root

    root = args.root or default_runs_root()
    out = write_report(root, args.runs, args.out)
    print(f"report written to {out} ({out.stat().st_size / 1e6:.1f} MB, opens offline)")
    print_problems("report", listing(root, args.runs))
    return 0
