"""Exported static weights: E_t[w_i] of a run, written as a small JSON file and read back to retrain.

The paper retrains with GradNorm's time-averaged weights as fixed weights ("GradNorm Converged Weights",
section 5.2, Table 1) and shows they sit near the best static weights a grid search finds (5.3). The file
keeps where the weights came from, so a retrained run can say so::

    {"format": "gradnorm-weights", "version": 1, "weights": {"depth": 0.71, ...},
     "run": "nyu-gradnorm", "window": [800, 8000], "method": "gradnorm", "convergence": 0.012}
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

FORMAT = "gradnorm-weights"
VERSION = 1
FIELDS = {"format", "version", "weights", "run", "window", "method", "convergence", "tasks_table"}
REQUIRED = ("format", "version", "weights")

PathLike = Union[str, os.PathLike]


def write_weights(path: PathLike, document: dict[str, Any]) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temporary, target)
    return target


def check_weights(weights: Any, source: str) -> dict[str, float]:
    """Task names to finite, positive numbers; a ValueError naming the task and value otherwise."""
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"{source}: 'weights' must be a non-empty object task -> weight, got {weights!r}")
    checked = {}
    for task, value in weights.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{source}: weight of task {task!r} is {value!r}, not a number")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{source}: weight of task {task!r} is {value!r}; weights must be finite and positive")
        checked[str(task)] = float(value)
    return checked


def load_weights(path: PathLike, tasks: Optional[Sequence[str]] = None) -> dict[str, float]:
    """Read a weights file written by :func:`export_weights`; with ``tasks``, they must match exactly."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"weights file {file} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"weights file {file} cannot be read ({exc})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"weights file {file} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(document, dict):
        raise ValueError(f"weights file {file} must hold a JSON object, found {type(document).__name__}")
    missing = [name for name in REQUIRED if name not in document]
    unknown = sorted(set(document) - FIELDS)
    if missing or unknown:
        raise ValueError(f"weights file {file}: missing fields {missing}, unknown fields {unknown}")
    if document["format"] != FORMAT:
        raise ValueError(f"weights file {file}: format is {document['format']!r}, expected {FORMAT!r}")
    if document["version"] != VERSION:
        raise ValueError(f"weights file {file}: version {document['version']!r} is not supported (this toolkit reads version {VERSION})")
    weights = check_weights(document["weights"], f"weights file {file}")
    if tasks is not None:
        extra = sorted(set(weights) - set(tasks))
        absent = [t for t in tasks if t not in weights]
        if extra or absent:
            raise ValueError(f"weights file {file}: unknown tasks {extra}, missing tasks {absent} (the run has {list(tasks)})")
    return weights
