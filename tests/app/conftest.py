"""The app served as users start it, shared by the served-page and the browser tests of this folder.

- ``repo_app``: ``streamlit run app`` from the repository root, word for word (the settings a test needs,
  headless, 127.0.0.1 and a free port, come from Streamlit's environment variables).
- ``scratch_app``: the installed (non-editable) package's app folder, ``python -m streamlit run
  <site>/gradnorm/app``, from a scratch project folder that has an ``app/`` and an ``app.py`` of its own
  (and so on ``sys.path`` first); those print ``USER_MARKER`` if they are ever run or imported.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from gradnorm.toolkit import analysis
from tests.app import servers

USER_MARKER = "USER-PROJECT-FILE-WAS-RUN"
USER_FILES = {
    "app.py": f"print({USER_MARKER!r}, 'app.py')\nimport streamlit as st\nst.title({USER_MARKER!r})\n",
    "app/__init__.py": f"print({USER_MARKER!r}, 'app/__init__.py')\n",
    "app/streamlit_app.py": f"print({USER_MARKER!r}, 'app/streamlit_app.py')\nimport streamlit as st\nst.title({USER_MARKER!r})\n",
}


@dataclass
class Served:
    server: servers.Server
    runs_root: Path  # what the page must name
    reason: str


def _served_env(port: int) -> dict[str, str]:
    # The script health check runs the entry script once in the server, without a browser.
    return servers.streamlit_env(port, STREAMLIT_SERVER_SCRIPT_HEALTH_CHECK_ENABLED="true")


@pytest.fixture(scope="session")
def repo_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    port = servers.free_port()
    env = _served_env(port)
    if (servers.REPO / "runs").is_dir():  # a checkout's own ./runs would be shown; keep the page known
        env["GRADNORM_RUNS_ROOT"] = str(analysis.bundled_runs_root())
        expected = analysis.RunsRoot(analysis.bundled_runs_root(), "from $GRADNORM_RUNS_ROOT")
    else:
        expected = analysis.RunsRoot(analysis.bundled_runs_root(), "the bundled sample runs")
    log = tmp_path_factory.mktemp("repo-app") / "streamlit.log"
    with servers.serve([str(servers.STREAMLIT), "run", "app"], cwd=servers.REPO, env=env, port=port, log_path=log) as server:
        yield Served(server, expected.path, expected.reason)


def make_user_project(folder: Path) -> Path:
    for name, content in USER_FILES.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def scratch_app(installed_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    project = make_user_project(tmp_path_factory.mktemp("user-project"))
    port = servers.free_port()
    env = _served_env(port) | {"PYTHONPATH": str(installed_wheel)}
    app_folder = installed_wheel / "gradnorm" / "app"
    log = project / "streamlit.log"
    argv = [sys.executable, "-m", "streamlit", "run", str(app_folder)]
    with servers.serve(argv, cwd=project, env=env, port=port, log_path=log) as server:
        yield Served(server, installed_wheel / "gradnorm" / "sample_runs", "the bundled sample runs")
