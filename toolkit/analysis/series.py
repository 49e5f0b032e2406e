"""Per-task series and balance figures over time, downsampled in SQL to a bounded number of points.

Each series is cut into at most ``max_points`` equal-width buckets along x; a bucket keeps the mean, the
min/max band and the last value, so a spike is never averaged away unseen and the end of a live run is
exact. The cost is one scan of the needed columns, whatever the run's length.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import pandas as pd

from toolkit import schema

from .catalog import PathLike
from .source import AnalysisError, check_metric, query, resolve_runs

SERIES_COLUMNS = ["run_id", "task", "x", "value", "value_min", "value_max", "last", "n"]
BALANCE_COLUMNS = ["run_id", "step", "grad_norm_cv", "loss_ratio_cv", "grad_norm_max_over_min"]
X_AXES = ("step", "wall_time")


def _check_points(max_points: int) -> int:
    if not isinstance(max_points, int) or max_points < 1:
        raise AnalysisError(f"max_points must be a positive integer, got {max_points!r}")
    return max_points


def _filters(params: dict[str, Any], split: Optional[str], tasks: Optional[Sequence[str]], step_range: Optional[Sequence[int]]) -> str:
    clauses = []
    if split is not None:
        params["split"] = split
        clauses.append("split = $split")
    if tasks is not None:
        params["tasks"] = [str(t) for t in tasks]
        clauses.append("list_contains($tasks, task)")
    if step_range is not None:
        low, high = step_range
        if low is not None:
            params["step_low"] = int(low)
            clauses.append("step >= $step_low")
        if high is not None:
            params["step_high"] = int(high)
            clauses.append("step <= $step_high")
    return " AND ".join(clauses) if clauses else "TRUE"


def metric_series(
    root: PathLike,
    run_ids: Union[str, Sequence[str]],
    metric: str,
    *,
    split: str = schema.TRAIN,
    tasks: Optional[Sequence[str]] = None,
    step_range: Optional[Sequence[Optional[int]]] = None,
    max_points: int = 2000,
    x: str = "step",
) -> pd.DataFrame:
    """``metric`` per (run, task) along ``x`` ("step", or "wall_time": seconds since the run's first row)."""
    check_metric(metric)
    _check_points(max_points)
    if x not in X_AXES:
        raise AnalysisError(f"x must be one of {X_AXES}, got {x!r}")
    run_list = resolve_runs(root, [run_ids] if isinstance(run_ids, str) else run_ids)
    params: dict[str, Any] = {"points": max_points}
    where = _filters(params, split, tasks, step_range)
    selected = f'SELECT run_id, task, step, wall_time, "{metric}"::DOUBLE AS v FROM metrics WHERE {where} AND "{metric}" IS NOT NULL'
    if x == "step":
        source = "SELECT run_id, task, step::DOUBLE AS x, v FROM selected"
    else:
        source = (
            "SELECT f.run_id, f.task, f.wall_time - s.start AS x, f.v FROM selected f "
            "JOIN (SELECT run_id, min(wall_time) AS start FROM metrics GROUP BY run_id) s ON f.run_id = s.run_id"
        )
    body = f"""
        , selected AS ({selected}),
        src AS ({source}),
        bounds AS (SELECT run_id, task, min(x) AS lo, max(x) AS hi FROM src GROUP BY run_id, task),
        bucketed AS (
            SELECT s.run_id, s.task, s.x, s.v,
                   CASE WHEN b.hi > b.lo THEN least(floor((s.x - b.lo) / (b.hi - b.lo) * $points), $points - 1) ELSE 0 END AS bucket
            FROM src s JOIN bounds b ON s.run_id = b.run_id AND s.task = b.task
        )
        SELECT run_id, task, min(x) AS x, avg(v) AS value, min(v) AS value_min, max(v) AS value_max,
               arg_max(v, x) AS last, count(*) AS n
        FROM bucketed GROUP BY run_id, task, bucket ORDER BY run_id, task, x
    """
    return query(run_list, body, params, SERIES_COLUMNS)


def _per_step_balance(where: str) -> str:
    # Averaging over ranks first keeps a multi-process run's spread a spread across tasks only.
    return f"""
        , per_task AS (
            SELECT run_id, step, task, avg(grad_norm) AS g, avg(loss_ratio) AS r
            FROM metrics WHERE {where} GROUP BY run_id, step, task
        ),
        per_step AS (
            SELECT run_id, step,
                   stddev_pop(g) / nullif(avg(g), 0) AS grad_norm_cv,
                   stddev_pop(r) / nullif(avg(r), 0) AS loss_ratio_cv,
                   max(g) / nullif(min(g), 0) AS grad_norm_max_over_min
            FROM per_task GROUP BY run_id, step
        )
    """


def balance_series(root: PathLike, run_ids: Union[str, Sequence[str]], *, max_points: int = 2000) -> pd.DataFrame:
    """Spread of the G_i and of the loss ratios across tasks per step (coefficient of variation), bucketed."""
    _check_points(max_points)
    run_list = resolve_runs(root, [run_ids] if isinstance(run_ids, str) else run_ids)
    params: dict[str, Any] = {"points": max_points}
    where = _filters(params, schema.TRAIN, None, None)
    body = (
        _per_step_balance(where)
        + """
        , bounds AS (SELECT run_id, min(step) AS lo, max(step) AS hi FROM per_step GROUP BY run_id),
        bucketed AS (
            SELECT p.*, CASE WHEN b.hi > b.lo THEN least(floor((p.step - b.lo) / (b.hi - b.lo) * $points), $points - 1) ELSE 0 END AS bucket
            FROM per_step p JOIN bounds b USING (run_id)
        )
        SELECT run_id, min(step) AS step, avg(grad_norm_cv) AS grad_norm_cv, avg(loss_ratio_cv) AS loss_ratio_cv,
               avg(grad_norm_max_over_min) AS grad_norm_max_over_min
        FROM bucketed GROUP BY run_id, bucket ORDER BY run_id, step
    """
    )
    return query(run_list, body, params, BALANCE_COLUMNS)


def balance_summary(root: PathLike, run_id: str, edge: float = 0.1) -> dict[str, Any]:
    """Headline balance figures: spread of G_i and of loss ratios in the first and last ``edge`` of steps,
    the number of skipped weight updates and the final loss ratio per task."""
    run_list = resolve_runs(root, [run_id])
    params: dict[str, Any] = {"edge": float(edge)}
    where = _filters(params, schema.TRAIN, None, None)
    body = (
        _per_step_balance(where)
        + """
        , bounds AS (SELECT min(step) AS lo, max(step) AS hi FROM per_step)
        SELECT
            avg(grad_norm_cv) FILTER (WHERE step <= lo + (hi - lo) * $edge) AS grad_norm_cv_start,
            avg(grad_norm_cv) FILTER (WHERE step >= hi - (hi - lo) * $edge) AS grad_norm_cv_end,
            avg(loss_ratio_cv) FILTER (WHERE step <= lo + (hi - lo) * $edge) AS loss_ratio_cv_start,
            avg(loss_ratio_cv) FILTER (WHERE step >= hi - (hi - lo) * $edge) AS loss_ratio_cv_end,
            count(*) AS steps, any_value(lo) AS first_step, any_value(hi) AS last_step
        FROM per_step, bounds
    """
    )
    row = query(run_list, body, params)
    figures: dict[str, Any] = {"run_id": run_id}
    if not row.empty:
        figures.update({k: (None if pd.isna(v) else (int(v) if k in ("steps", "first_step", "last_step") else float(v))) for k, v in row.iloc[0].items()})
    skipped = query(
        run_list,
        "SELECT count(DISTINCT step) AS skipped FROM metrics WHERE split = $split AND step_update_skipped",
        {"split": schema.TRAIN},
        ["skipped"],
    )
    figures["skipped_updates"] = int(skipped["skipped"].iloc[0]) if not skipped.empty else 0
    last = query(
        run_list,
        "SELECT task, arg_max(loss_ratio, step) AS final_loss_ratio FROM metrics WHERE split = $split AND loss_ratio IS NOT NULL GROUP BY task ORDER BY task",
        {"split": schema.TRAIN},
        ["task", "final_loss_ratio"],
    )
    figures["final_loss_ratio"] = dict(zip(last["task"], last["final_loss_ratio"].astype(float)))
    return figures
