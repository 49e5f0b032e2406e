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
    parser.add_argument(
        "--group",
        type=group_key,
        default="none",
        metavar="KEY",
        help="compare groups of runs instead of runs: balancer, name (the run name without a seed suffix such as -s0) or config:<field> "
        "(a dotted run.json field, e.g. config:balancer.alpha); default: none",
    )
    parser.add_argument(
        "--band",
        choices=("std", "minmax", "none"),
        default="std",
        help="with --group, the spread shown with each group's mean: mean ± std (default), [min, max] or none",
    )
    parser.set_defaults(handler=run)


def group_key(text: str) -> str:
    """A grouping key as the app's "Group runs by" takes it (``gradnorm.app._grouping``)."""
    if text in ("none", "balancer", "name") or (text.startswith("config:") and len(text) > len("config:")):
        return text
    raise argparse.ArgumentTypeError(f"unknown grouping {text!r}: expected none, balancer, name or config:<field>")


def run(args: argparse.Namespace) -> int:
    from gradnorm.app.report import write_report
    from gradnorm.toolkit.analysis import default_runs_root

    root = args.root or default_runs_root()
    out = write_report(root, args.runs, args.out, group=args.group, band=args.band)
    print(f"report written to {out} ({out.stat().st_size / 1e6:.1f} MB, opens offline)")
    print_problems("report", listing(root, args.runs))
    return 0
