"""Options shared by the commands that read recorded runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional


def add_root_and_window(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root", type=Path, default=None, help="runs root (default: $GRADNORM_RUNS_ROOT, else ./runs if it exists, else the bundled sample runs)"
    )
    parser.add_argument("--window", type=int, nargs=2, metavar=("START", "END"), default=None, help="step window, inclusive (default: after the burn-in)")
    parser.add_argument("--burn-in", type=float, default=0.1, help="fraction of steps left out at the start when no window is given (default: 0.1)")


def window_of(args: argparse.Namespace) -> Optional[tuple[int, int]]:
    return None if args.window is None else (args.window[0], args.window[1])
