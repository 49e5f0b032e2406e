"""The ``gradnorm`` command line. Each sub-command lives in ``toolkit/commands/<name>.py`` and exposes
``register(subparsers)``; commands that train import the ``hooks`` layer lazily, inside the command,
so that importing ``toolkit`` never pulls in the hook layer."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

COMMAND_MODULES = (
    "toolkit.commands.demo",
    "toolkit.commands.compare",
    "toolkit.commands.export",
    "toolkit.commands.summary",
    "toolkit.commands.sweep",
    "toolkit.commands.app",
    "toolkit.commands.report",
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
