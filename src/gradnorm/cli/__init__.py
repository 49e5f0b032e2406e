"""The ``gradnorm`` command line. Each sub-command lives in ``gradnorm/cli/<name>.py`` and exposes
``register(subparsers)``; commands import what they train or read lazily, inside the command, so that
``gradnorm --help`` answers without importing torch."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

COMMAND_MODULES = (
    "gradnorm.cli.demo",
    "gradnorm.cli.compare",
    "gradnorm.cli.export",
    "gradnorm.cli.summary",
    "gradnorm.cli.sweep",
    "gradnorm.cli.app",
    "gradnorm.cli.report",
    "gradnorm.cli.compact",
    "gradnorm.cli.report_paper",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradnorm", description="Balance and monitor multitask PyTorch training with GradNorm.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError, PermissionError) as exc:  # includes RunError, AnalysisError
        print(f"gradnorm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
