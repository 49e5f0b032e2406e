"""``gradnorm app``: open the Streamlit app on a runs root (default: the bundled sample runs)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("app", help="open the Streamlit app (balance, overfitting, weights export)")
    parser.add_argument("--root", type=Path, default=None, help="runs root (default: $GRADNORM_RUNS_ROOT or the bundled sample_runs/)")
    parser.add_argument("--port", type=int, default=8501)
    parser.add_argument("--address", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--headless", action="store_true", help="do not open a browser")
    parser.set_defaults(handler=run)


def app_entry() -> Path:
    """The installed package's Streamlit entry, the file ``streamlit run app`` runs in a checkout."""
    from gradnorm import app

    return Path(app.__file__).resolve().parent / "streamlit_app.py"


def command(args: argparse.Namespace) -> list[str]:
    line = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app_entry()),
        "--server.address",
        args.address,
        "--server.port",
        str(args.port),
        "--browser.gatherUsageStats",
        "false",
    ]
    if args.headless:
        line += ["--server.headless", "true"]
    if args.root is not None:
        if not args.root.is_dir():
            raise FileNotFoundError(f"runs root {args.root} does not exist or is not a folder")
        line += ["--", "--root", str(args.root.resolve())]
    return line


def run(args: argparse.Namespace) -> int:
    return subprocess.call(command(args))
