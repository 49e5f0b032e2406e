"""The three ways to open the app: ``streamlit run app`` (from a checkout), ``gradnorm app`` and
``python -m gradnorm app``, as subprocesses; they run the same entry file with the same arguments after
``--``, and ``gradnorm app`` takes its Streamlit server down with it when it is stopped."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gradnorm.cli import app as app_command
from gradnorm.cli import build_parser
from gradnorm.toolkit import analysis
from tests.app import servers
from tests.app.conftest import USER_MARKER, Served
from tests.helpers import waiting


def check_served(served: Served) -> None:
    server = served.server
    log = server.log()
    # Streamlit's own startup lines, on the address and port the test chose.
    assert "You can now view your Streamlit app in your browser." in log, log
    assert f"URL: http://127.0.0.1:{server.port}" in log, log
    status, page = servers.get(server.url + "/")
    assert status == 200 and "<title>Streamlit</title>" in page
    # The server runs the entry script once, to the end, without an exception.
    assert servers.get(server.url + "/_stcore/script-health-check", timeout=120) == (200, "ok"), server.log()
    assert "Traceback" not in server.log(), server.log()


def test_streamlit_run_app_from_the_repository_root_serves_the_app(repo_app: Served) -> None:
    check_served(repo_app)


def test_the_installed_app_folder_is_served_from_a_project_with_its_own_app(scratch_app: Served) -> None:
    check_served(scratch_app)
    assert USER_MARKER not in scratch_app.server.log()


def parse(*argv: str):
    return build_parser().parse_args(["app", *argv])


def test_gradnorm_app_runs_the_same_entry_with_the_same_arguments_after_the_separator() -> None:
    entry = app_command.app_entry()
    assert entry == Path(analysis.__file__).resolve().parents[2] / "app" / "streamlit_app.py"
    assert entry.parent.name == "app" and (entry.parent / "__init__.py").is_file()  # `streamlit run <that folder>`
    line = app_command.command(parse("--headless", "--port", "8600"))
    assert line[:5] == [sys.executable, "-m", "streamlit", "run", str(entry)]
    assert "--" not in line  # no arguments: the app resolves the root as `streamlit run app` does
    line = app_command.command(parse("--", "--root", "runs/"))
    assert line[line.index("--") :] == ["--", "--root", "runs/"]  # as in `streamlit run app -- --root runs/`
    assert app_command.app_arguments(parse("--root", "runs")) == ["--root", "runs"]
    # --root is shorthand for `-- --root`; a --root after the separator is the one the app keeps
    assert app_command.app_arguments(parse("--root", "a", "--", "--root", "b")) == ["--root", "a", "--root", "b"]


def sample_runs(folder: Path) -> Path:
    shutil.copytree(analysis.bundled_runs_root() / "toy-T2-gradnorm", folder / "toy-T2-gradnorm")
    return folder


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads child processes from /proc (Linux)")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopping_gradnorm_app_by_its_pid_stops_its_server(tmp_path: Path, signum: int) -> None:
    root = sample_runs(tmp_path / "runs")
    port = servers.free_port()
    argv = [sys.executable, "-m", "gradnorm", "app", "--headless", "--port", str(port), "--root", str(root)]
    with servers.serve(argv, cwd=tmp_path, env=servers.base_env(), port=port, log_path=tmp_path / "app.log") as server:
        gradnorm = server.process
        streamlit = servers.children(gradnorm.pid)
        assert streamlit and all("streamlit" in (servers.cmdline(pid) or "") for pid in streamlit), [servers.cmdline(p) for p in streamlit]
        gradnorm.send_signal(signum)  # this process only, not its group
        try:
            # the grace it gives its server, then the kill: on a loaded machine the rest may take a while too
            code = gradnorm.wait(timeout=app_command.STOP_GRACE_SECONDS + waiting.PATIENCE)
        except subprocess.TimeoutExpired:
            pytest.fail(f"gradnorm app did not exit after {signal.Signals(signum).name}:\n{server.log()}")
        assert code == 128 + signum
        assert servers.wait_for(lambda: not servers.answers(port), timeout=waiting.PATIENCE), "the server still answers"
        assert servers.wait_for(lambda: not any(servers.alive(pid) for pid in streamlit), timeout=waiting.PATIENCE), "a streamlit child is left"
        assert "Traceback" not in server.log(), server.log()
