"""The machine line and the writing of results sections, shared by the benchmarks."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Optional


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(*extra: str) -> str:
    """CPU, core count, Python version and any ``extra`` library versions."""
    return ", ".join([cpu_name(), f"{os.cpu_count()} cores", f"Python {platform.python_version()}", *extra])


def publish(report: str, markdown: Optional[Path]) -> None:
    """Print a results section and, when a results file is named, append it there."""
    print(report)
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        with markdown.open("a") as handle:
            handle.write("\n" + report)
