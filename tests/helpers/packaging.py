"""Build the distribution as a user gets it (a non-editable wheel) and install it apart from the editable
install, so subprocesses can run against exactly what ``pip install gradnorm-toolkit`` would put in
site-packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# What the wheel is built from: the repository as a user would clone it, without local build products.
_LEFT_OUT = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis", "runs")


def build_wheel(workdir: Path) -> Path:
    """A wheel of the working tree, built from a clean copy (in-tree builds can carry stale modules)."""
    source = workdir / "source"
    shutil.copytree(REPO, source, ignore=_LEFT_OUT, symlinks=True)
    out = workdir / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--disable-pip-version-check", "-w", str(out), str(source)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = out.glob("gradnorm_toolkit-*.whl")
    return wheel


def install_wheel(wheel: Path, target: Path) -> Path:
    """Install ``wheel`` (no dependencies: they are the environment's) into ``target``; put ``target`` on
    ``PYTHONPATH`` to use it ahead of the editable install."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--disable-pip-version-check", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    return target
