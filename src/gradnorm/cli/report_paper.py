"""``gradnorm report-paper``: regenerate the technical report's numbers, tables and figures from the
committed results (``gradnorm.experiments.paper``), and with ``--pdf`` build ``docs/report/report.pdf``."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report-paper", help="regenerate docs/report's tables, numbers and figures from the committed results")
    parser.add_argument("--report-dir", type=Path, default=None, help="the folder holding report.tex (default: the repository's docs/report)")
    parser.add_argument("--results", type=Path, default=None, help="results folder (default: the repository's benchmarks/results)")
    parser.add_argument("--runs", type=Path, default=None, help="recorded runs (default: the repository's sample_runs)")
    parser.add_argument("--no-figures", action="store_true", help="write only the .tex fragments")
    parser.add_argument("--pdf", action="store_true", help="then build report.pdf with latexmk")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from gradnorm.experiments import paper

    argv = []
    for flag, value in (("--report-dir", args.report_dir), ("--results", args.results), ("--runs", args.runs)):
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--no-figures"] if args.no_figures else []
    argv += ["--pdf"] if args.pdf else []
    return paper.main(argv)
