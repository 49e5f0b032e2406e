"""Start the app as a user does (``streamlit run app``, ``gradnorm app``) in a subprocess, and stop it.

Servers bind to 127.0.0.1 on a free port, are configured through Streamlit's environment variables (so the
command line stays word for word what a user types), run in their own process group so that cleanup
reaches every process they started, and every wait has a timeout.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
#: The ``streamlit`` console script a user's shell runs: this interpreter's own, else the first on PATH (a
#: virtual environment made with --system-site-packages has the package but not the script).
STREAMLIT = Path(sys.executable).with_name("streamlit")
if not STREAMLIT.exists() and shutil.which("streamlit"):
    STREAMLIT = Path(str(shutil.which("streamlit")))
START_TIMEOUT = 180.0  # returns as soon as the server answers; a loaded machine may take long to import Streamlit
STOP_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def get(url: str, timeout: float = 30.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")


def base_env(**extra: str) -> dict[str, str]:
    """This environment without a runs root of its own or a PYTHONPATH, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("GRADNORM_RUNS_ROOT", "PYTHONPATH")}
    env.update(STREAMLIT_BROWSER_GATHER_USAGE_STATS="false", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def streamlit_env(port: int, **extra: str) -> dict[str, str]:
    """Streamlit's settings as environment variables: headless, this machine only, on ``port``."""
    return base_env(STREAMLIT_SERVER_HEADLESS="true", STREAMLIT_SERVER_ADDRESS="127.0.0.1", STREAMLIT_SERVER_PORT=str(port), **extra)


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def wait_until_healthy(server: Server, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"the server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if get(f"{server.url}/_stcore/health", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"the server did not answer within {timeout:.0f} s:\n{server.log()}")


def stop_group(process: subprocess.Popen) -> None:
    """Stop ``process`` and everything in its process group (it was started in a session of its own)."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=STOP_TIMEOUT)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # children left behind by a parent that did exit
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=STOP_TIMEOUT)


@contextlib.contextmanager
def serve(argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], port: int, log_path: Path) -> Iterator[Server]:
    """Run ``argv`` from ``cwd`` until the app answers on ``port``; always stopped afterwards."""
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(list(argv), cwd=cwd, env=dict(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        server = Server(process, port, log_path)
        try:
            wait_until_healthy(server)
            yield server
        finally:
            stop_group(process)


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux: from /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found.extend(int(child) for child in (task / "children").read_text().split())
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie that only waits to be reaped is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(condition, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())


def cmdline(pid: int) -> Optional[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None
