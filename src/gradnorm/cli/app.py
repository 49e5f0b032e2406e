"""``gradnorm app``: the Streamlit app, the same entry file as ``streamlit run app`` in a checkout.

The runs root is resolved by the app itself, exactly as for ``streamlit run app``: ``--root`` (here, or
after ``--``), then ``$GRADNORM_RUNS_ROOT``, then ``./runs`` when it exists, then the bundled sample runs.
The Streamlit server is a child process; stopping this command (SIGTERM, SIGINT, SIGHUP) stops it too.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Callable, Optional, Union

#: How long the server has to shut down after being asked before it is killed.
STOP_GRACE_SECONDS = 10.0

#: The signals that stop the command, and with it the server (SIGHUP does not exist on Windows).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))

Handler = Union[Callable[[int, Optional[FrameType]], object], int, None]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "app",
        help="open the Streamlit app (balance, overfitting, weights export)",
        description="Open the Streamlit app, as `streamlit run app` does in a checkout. Arguments after `--` go to the app (`gradnorm app -- --root runs/`).",
    )
    parser.add_argument(
        "--root", type=Path, default=None, help="runs root (default: $GRADNORM_RUNS_ROOT, else ./runs when it exists, else the bundled sample runs)"
    )
    parser.add_argument("--port", type=int, default=8501)
    parser.add_argument("--address", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--headless", action="store_true", help="do not open a browser")
    parser.add_argument("app_args", nargs="*", metavar="-- APP_ARGS", help="arguments for the app, as after `streamlit run app --`")
    parser.set_defaults(handler=run)


def app_entry() -> Path:
    """The installed package's Streamlit entry, the file ``streamlit run app`` runs in a checkout."""
    from gradnorm import app

    return Path(app.__file__).resolve().parent / "streamlit_app.py"


def app_arguments(args: argparse.Namespace) -> list[str]:
    """What the app finds in its ``sys.argv[1:]``: ``--root`` first, so a ``--root`` after ``--`` wins (the
    app keeps the last one, as argparse does)."""
    extra = list(args.app_args)
    if extra[:1] == ["--"]:  # argparse versions differ on whether they drop the separator
        extra = extra[1:]
    return (["--root", str(args.root)] if args.root is not None else []) + extra


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
    script_args = app_arguments(args)
    if script_args:
        line += ["--", *script_args]
    return line


class _Stop(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stop(signum: int, _frame: Optional[FrameType]) -> None:
    raise _Stop(signum)


def stop_server(child: subprocess.Popen, grace: float = STOP_GRACE_SECONDS) -> int:
    """Ask the server to shut down (SIGTERM), wait up to ``grace`` seconds, then kill it."""
    if child.poll() is None:
        child.terminate()
        try:
            return child.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            child.kill()
    return child.wait()


def run(args: argparse.Namespace) -> int:
    line = command(args)
    child: Optional[subprocess.Popen] = None
    previous: dict[int, Handler] = {}
    try:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            for signum in STOP_SIGNALS:
                previous[signum] = signal.signal(signum, _raise_stop)
        child = subprocess.Popen(line)
        return child.wait()
    except _Stop as stop:
        if child is not None:
            server = child
            # A second signal while the server shuts down must not leave it behind: kill it at once.
            for signum in previous:
                signal.signal(signum, lambda _signum, _frame: server.kill())
            stop_server(server)
        return 128 + stop.signum
    finally:
        if child is not None and child.poll() is None:  # any other way out of the wait (an error here)
            stop_server(child)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
