"""The page's state in the URL: root, runs, view and controls as query parameters, so that a reload or a
shared link restores the view (``st.query_params``; repeated keys for lists).

``parse`` turns the parameters into plain values (anything malformed is dropped, never an error: a URL is
user input); ``encode`` writes them back. Which runs, tasks and views exist is checked by the page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

Params = Mapping[str, Union[str, Sequence[str]]]


@dataclass
class UrlState:
    root: Optional[str] = None
    runs: Optional[list[str]] = None
    view: Optional[str] = None
    smoothing: Optional[float] = None
    x: Optional[str] = None
    log: Optional[bool] = None
    step_range: Optional[tuple[int, int]] = None
    tasks: Optional[list[str]] = None
    max_points: Optional[int] = None
    baseline: Optional[str] = None
    group: Optional[str] = None  # a run grouping key (gradnorm.app._grouping): balancer, name, config:<field>
    band: Optional[str] = None
    extra: dict[str, str] = field(default_factory=dict)


def _all(params: Params, key: str) -> list[str]:
    value = params.get(key)
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _one(params: Params, key: str) -> Optional[str]:
    values = _all(params, key)
    return values[-1] if values else None


def parse(params: Params) -> UrlState:
    state = UrlState(root=_one(params, "root"), view=_one(params, "view"), x=_one(params, "x"), baseline=_one(params, "baseline"), group=_one(params, "group"))
    band = _one(params, "band")
    state.band = band if band in ("minmax", "std", "none") else None
    runs, tasks = _all(params, "run"), _all(params, "task")
    state.runs = runs or None
    state.tasks = tasks or None
    try:
        smoothing = float(_one(params, "smooth") or "nan")
        state.smoothing = smoothing if math.isfinite(smoothing) and 0 <= smoothing < 1 else None
    except ValueError:
        pass
    log = _one(params, "log")
    state.log = None if log is None else log in ("1", "true", "yes")
    steps = _one(params, "steps")
    if steps and "-" in steps.strip("-"):
        low, _, high = steps.partition("-")
        if low.isdigit() and high.isdigit() and int(low) <= int(high):
            state.step_range = (int(low), int(high))
    points = _one(params, "points")
    state.max_points = int(points) if points and points.isdigit() else None
    return state


def encode(
    *,
    root: str,
    runs: Sequence[str],
    view: str,
    smoothing: float,
    x: str,
    log: bool,
    step_range: Optional[tuple[int, int]],
    tasks: Optional[Sequence[str]],
    max_points: int,
    baseline: Optional[str],
    group: Optional[str] = None,
    band: Optional[str] = None,
) -> dict[str, Union[str, list[str]]]:
    params: dict[str, Union[str, list[str]]] = {"root": root, "run": list(runs), "view": view, "smooth": f"{smoothing:g}", "x": x, "log": "1" if log else "0"}
    if step_range is not None:
        params["steps"] = f"{step_range[0]}-{step_range[1]}"
    if tasks is not None:
        params["task"] = list(tasks)
    params["points"] = str(max_points)
    if baseline:
        params["baseline"] = baseline
    if group and group != "none":
        params["group"] = group
        if band:
            params["band"] = band
    return params
