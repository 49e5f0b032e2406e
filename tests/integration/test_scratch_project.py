"""The README's example in a user's own repository, as a subprocess from that repository's folder.

A typical ML project has its own ``hooks/``, ``app/``, ``app.py`` and ``toolkit/``; with the script's folder
first on ``sys.path`` they would shadow generic top-level names. The package installs one import root,
``gradnorm``, so the example runs there unchanged, from the non-editable wheel and from the editable
install, and the command line and app entry found there are ours.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers.user_project import REPO, TRAINER_SETUP, python_blocks

README_EXAMPLE = next(block for block in python_blocks(REPO / "README.md") if "gradnorm.attach" in block.code)

USER_FILES = {
    "hooks/__init__.py": "raise ImportError('the user project hooks package was imported')\n",
    "hooks/session.py": "raise ImportError('the user project hooks.session was imported')\n",
    "app.py": "raise ImportError('the user project app.py was imported')\n",
    "app/streamlit_app.py": "raise ImportError('the user project app/streamlit_app.py was imported')\n",
    "toolkit/__init__.py": "raise ImportError('the user project toolkit package was imported')\n",
    "toolkit/schema.py": "raise ImportError('the user project toolkit.schema was imported')\n",
}

REPORT = """
import json, sys
import gradnorm, gradnorm.cli.app
print(json.dumps({"gradnorm": gradnorm.__file__, "app_entry": str(gradnorm.cli.app.app_entry()), "status": json.load(open(session.run_path / "run.json"))["status"]}))
"""


def make_user_project(folder: Path) -> Path:
    for name, content in USER_FILES.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    (folder / "train.py").write_text(TRAINER_SETUP + "\n" + README_EXAMPLE.code + REPORT)
    return folder


def run(folder: Path, argv: list[str], pythonpath: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GRADNORM_RUNS_ROOT")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(params=["wheel", "editable"])
def install(request: pytest.FixtureRequest) -> tuple[str, str | None, Path, Path]:
    """(kind, PYTHONPATH, the folder the package must be imported from, the folder of its app)."""
    if request.param == "wheel":
        site: Path = request.getfixturevalue("installed_wheel")
        return "wheel", str(site), site / "gradnorm", site / "gradnorm" / "app"
    return "editable", None, REPO / "src" / "gradnorm", REPO / "app"


def test_readme_example_runs_in_a_user_project_with_its_own_hooks_app_and_toolkit(tmp_path: Path, install: tuple[str, str | None, Path, Path]) -> None:
    kind, pythonpath, package_folder, app_folder = install
    project = make_user_project(tmp_path / "user-project")
    done = run(project, [sys.executable, "train.py"], pythonpath)
    assert done.returncode == 0, f"{kind}: {done.stderr[-3000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(report["gradnorm"]).resolve().parent == package_folder.resolve()
    # our app entry, inside the installed package, never the user's app/ or app.py
    assert Path(report["app_entry"]).resolve() == (app_folder / "streamlit_app.py").resolve()
    assert report["status"] == "finished"
    (run_dir,) = (project / "runs").iterdir()
    assert sorted(p.name for p in (run_dir / "metrics" / "rank=0").glob("part-*.parquet")), "the example recorded no part file"


def test_command_line_in_a_user_project_reads_its_runs_and_names_the_root(tmp_path: Path, install: tuple[str, str | None, Path, Path]) -> None:
    kind, pythonpath, _, _ = install
    project = make_user_project(tmp_path / "user-project")
    assert run(project, [sys.executable, "train.py"], pythonpath).returncode == 0
    (run_dir,) = (project / "runs").iterdir()
    # ./runs is the default root of every command once it exists
    summary = run(project, [sys.executable, "-m", "gradnorm", "summary", run_dir.name], pythonpath)
    assert summary.returncode == 0, summary.stderr
    assert "depth" in summary.stdout and "normals" in summary.stdout
    exported = run(project, [sys.executable, "-m", "gradnorm", "export", run_dir.name, "--out", "weights.json"], pythonpath)
    assert exported.returncode == 0, exported.stderr
    weights = json.loads((project / "weights.json").read_text())["weights"]
    assert set(weights) == {"depth", "normals", "seg"} and abs(sum(weights.values()) - 3.0) < 1e-6
    missing = run(project, [sys.executable, "-m", "gradnorm", "summary", "toy-T2-gradnorm"], pythonpath)
    assert missing.returncode == 2
    assert "--root" in missing.stderr and "$GRADNORM_RUNS_ROOT" in missing.stderr and "Traceback" not in missing.stderr


def test_wheel_installs_one_top_level_name_and_every_subpackage(installed_wheel: Path) -> None:
    top_level = sorted(p.name for p in installed_wheel.iterdir() if not p.name.endswith((".dist-info", "bin")))
    assert top_level == ["gradnorm"]
    # every package folder in the repository is in the wheel (pyproject.toml lists them by hand)
    installed = {".".join(init.parent.relative_to(installed_wheel).parts) for init in (installed_wheel / "gradnorm").rglob("__init__.py")}
    for folder in ("toolkit", "hooks", "app"):
        for init in (REPO / folder).rglob("__init__.py"):
            name = ".".join(("gradnorm", folder, *init.parent.relative_to(REPO / folder).parts))
            assert name in installed, f"{name} is missing from the wheel: add it to [tool.setuptools] packages"
    assert (installed_wheel / "gradnorm" / "sample_runs" / "toy-T2-gradnorm" / "run.json").is_file()
    assert (installed_wheel / "gradnorm" / "py.typed").is_file()


def test_console_script_of_the_wheel_answers_help_without_torch(installed_wheel: Path, tmp_path: Path) -> None:
    script = installed_wheel / "bin" / "gradnorm"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(installed_wheel)}
    probe = textwrap.dedent(
        """
        import sys, runpy
        sys.argv = ["gradnorm", "--help"]
        try:
            runpy.run_path(sys.argv_path, run_name="__main__")
        except SystemExit:
            pass
        print("torch imported:", "torch" in sys.modules)
        """
    ).replace("sys.argv_path", repr(str(script)))
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage: gradnorm" in done.stdout and "torch imported: False" in done.stdout
