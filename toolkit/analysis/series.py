"""Per-task series and balance figures over time, downsampled in SQL to a bounded number of points.

Each series is cut into at most ``max_points`` equal-width buckets along x; a bucket keeps the mean, the
min/max band and the last value, so a spike is never averaged away unseen and the end of a live run is
exact. The cost is one scan of the needed columns, whatever the run's length.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
import pandas as pd

from gradnorm.toolkit import schema

from . import partials
from .catalog import PathLike, RunFiles
from .source import AnalysisError, check_metric, query, resolve_runs

SERIES_COLUMNS = ["run_id", "task", "x", "value", "value_min", "value_max", "last", "n"]
BALANCE_COLUMNS = ["run_id", "step", "grad_norm_cv", "loss_ratio_cv", "grad_norm_max_over_min"]
X_AXES = ("step", "wall_time")


def _check_points(max_points: int) -> int:
    if not isinstance(max_points, int) or max_points < 1:
        raise AnalysisError(f"max_points must be a positive integer, got {max_points!r}")
    return max_points


def _filters(params: dict[str, Any], split: Optional[str], tasks: Optional[Sequence[str]], step_range: Optional[Sequence[Optional[int]]]) -> str:
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
    lows, highs = _x_ranges(run_list, x, step_range)
    x_value = "step::DOUBLE" if x == "step" else "wall_time - x_lo"
    x_span = "x_hi - x_lo"
    body = f"""
        , src AS (
            SELECT run_id, task, {x_value} AS x, "{metric}"::DOUBLE AS v,
                   CASE WHEN x_hi > x_lo THEN least(floor(({x_value} - {"x_lo" if x == "step" else "0"}) / ({x_span}) * $points), $points - 1)
                        ELSE 0 END AS bucket
            FROM metrics WHERE {where} AND "{metric}" IS NOT NULL
        )
        SELECT run_id, task, min(x) AS x, avg(v) AS value, min(v) AS value_min, max(v) AS value_max,
               arg_max(v, x) AS last, count(*) AS n
        FROM src GROUP BY run_id, task, bucket ORDER BY run_id, task, x
    """
    return query(run_list, body, params, SERIES_COLUMNS, constants={"x_lo": lows, "x_hi": highs})


def _x_ranges(run_list: Sequence[RunFiles], x: str, step_range: Optional[Sequence[Optional[int]]]) -> tuple[list[float], list[float]]:
    """Each run's x range, from the part files' statistics (a query only where they lack them)."""
    lows, highs = [], []
    for run in run_list:
        low, high = run.range_of(x)
        if low is None and run.files:
            frame = query([run], f"SELECT min({x}) AS lo, max({x}) AS hi FROM metrics", {}, ["lo", "hi"])
            low, high = frame["lo"].iloc[0], frame["hi"].iloc[0]
        low = 0.0 if low is None or pd.isna(low) else float(low)
        high = low if high is None or pd.isna(high) else float(high)
        if x == "step" and step_range is not None:
            low = low if step_range[0] is None else max(low, float(step_range[0]))
            high = high if step_range[1] is None else min(high, float(step_range[1]))
        lows.append(low)
        highs.append(max(high, low))
    return lows, highs


def balance_series(root: PathLike, run_ids: Union[str, Sequence[str]], *, max_points: int = 2000) -> pd.DataFrame:
    """Spread across tasks of the gradient norms G_i and of the loss ratios, over time.

    Per bucket of steps (at most ``max_points`` per run), each task's mean G_i and mean loss ratio are
    taken first; the figures are the coefficient of variation across tasks of those means and the ratio
    of the largest to the smallest mean G_i. Where a run has no more steps than ``max_points``, a bucket
    is one step and these are the per-step spreads. Bucketing before comparing tasks keeps the cost at
    one scan of a 10 M-row run.
    """
    _check_points(max_points)
    return _balance(resolve_runs(root, [run_ids] if isinstance(run_ids, str) else run_ids), max_points)


#: Per (run, task, bucket): the first step and the mean G_i and loss ratio (the spreads are taken across tasks).
_PER_TASK = "min(step) AS step, avg(grad_norm) AS g, avg(loss_ratio) AS r"
#: Per (run, task, bucket) as well, for :func:`balance_summary` in the same scan: the last step with a loss
#: ratio and that ratio, and the steps whose weight update was skipped.
_LAST = (
    "max(step) FILTER (WHERE loss_ratio IS NOT NULL) AS rstep, arg_max(loss_ratio, step) FILTER (WHERE loss_ratio IS NOT NULL) AS rlast, "
    "count(*) FILTER (WHERE step_update_skipped) AS skipped"
)
_SPREADS = """run_id, min(step) AS step,
               stddev_pop(g) / nullif(avg(g), 0) AS grad_norm_cv,
               stddev_pop(r) / nullif(avg(r), 0) AS loss_ratio_cv,
               max(g) / nullif(min(g), 0) AS grad_norm_max_over_min"""


def _per_task_cte(run_list: Sequence[RunFiles], max_points: int, params: dict[str, Any], only: Optional[tuple[int, int, float, float]], aggregates: str) -> str:
    """``, per_task AS (...)``: the training rows grouped by run, task and bucket of steps (at most
    ``max_points`` per run), with ``aggregates``; ``only`` as in :func:`_balance`."""
    params["points"] = max_points
    where = _filters(params, schema.TRAIN, None, None)
    having = ""
    if only is not None:
        params.update(b_first=only[0], b_last=only[1], s_first=only[2], s_last=only[3])
        where += " AND (step <= $s_first OR step >= $s_last)"
        having = "HAVING bucket <= $b_first OR bucket >= $b_last"
    return f"""
        , per_task AS MATERIALIZED (
            SELECT run_id, task,
                   CASE WHEN x_hi > x_lo THEN least(floor((step - x_lo) / (x_hi - x_lo) * $points), $points - 1) ELSE 0 END AS bucket,
                   {aggregates}
            FROM metrics WHERE {where} GROUP BY run_id, task, bucket {having}
        )"""


def _balance(run_list: Sequence[RunFiles], max_points: int, only: Optional[tuple[int, int, float, float]] = None) -> pd.DataFrame:
    """:func:`balance_series`' query; with ``only`` = (b1, b2, s1, s2) just the buckets numbered up to b1
    or from b2 on, whose rows lie at steps up to s1 or from s2 on (a range DuckDB prunes row groups by)."""
    params: dict[str, Any] = {}
    lows, highs = _x_ranges(run_list, "step", None)
    body = _per_task_cte(run_list, max_points, params, only, _PER_TASK) + f" SELECT {_SPREADS} FROM per_task GROUP BY run_id, bucket ORDER BY run_id, step"
    return query(run_list, body, params, BALANCE_COLUMNS, constants={"x_lo": lows, "x_hi": highs})


def _balance_and_last(run: RunFiles, max_points: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`_balance` over the whole run and, from the same scan, each task's last loss ratio and its
    count of skipped updates (task, final_loss_ratio, skipped): the first view of a long run that the
    per-file sums do not cover yet reads its rows once for the balance headline, not twice."""
    params: dict[str, Any] = {}
    lows, highs = _x_ranges([run], "step", None)
    body = (
        _per_task_cte([run], max_points, params, None, f"{_PER_TASK}, {_LAST}")
        + f"""
        SELECT 'bucket' AS part, NULL::VARCHAR AS task, {_SPREADS},
               NULL::DOUBLE AS final_loss_ratio, NULL::BIGINT AS skipped
        FROM per_task GROUP BY run_id, bucket
        UNION ALL
        SELECT 'task', task, run_id, NULL, NULL, NULL, NULL,
               arg_max(rlast, rstep) FILTER (WHERE rstep IS NOT NULL), sum(skipped)::BIGINT
        FROM per_task GROUP BY run_id, task"""
    )
    columns = ["part", "task", *BALANCE_COLUMNS, "final_loss_ratio", "skipped"]
    both = query([run], body, params, columns, constants={"x_lo": lows, "x_hi": highs})
    buckets = both[both["part"] == "bucket"].sort_values("step", kind="stable")[BALANCE_COLUMNS].reset_index(drop=True)
    last = both[both["part"] == "task"].sort_values("task")[["task", "final_loss_ratio", "skipped"]].reset_index(drop=True)
    return buckets, last


def _edge_buckets(run: RunFiles, points: int, edge: float) -> Optional[tuple[int, tuple[int, int, float, float]]]:
    """The number of non-empty buckets of :func:`balance_series` and the ``only`` argument of
    :func:`_balance` that selects the first and the last ``edge`` of them, from the cached per-file block
    sums: a block's first and last training step are steps with rows, so their buckets hold rows, and
    a bucket lying between them inside one block is unknown (then None: the whole series is queried).
    None as well where the two ends would cover every bucket."""
    try:
        sums = partials.with_rescans(run, lambda: partials.block_sums(run, partials.WEIGHTS))
    except partials.Uncacheable:
        return None
    train = partials.train_blocks(sums)
    lows, highs = _x_ranges([run], "step", None)
    x_lo, x_hi = lows[0], highs[0]
    if train.empty or not x_hi > x_lo:
        return None

    def bucket(steps: pd.Series) -> np.ndarray:
        # (step - x_lo) / (x_hi - x_lo) * points in doubles, as the query computes it
        return np.minimum(np.floor((steps.to_numpy(dtype=np.float64) - x_lo) / (x_hi - x_lo) * points), points - 1).astype(np.int64)

    first, last = bucket(train["lo"]), bucket(train["hi"])
    if (last - first >= 2).any():
        return None
    filled = np.union1d(first, last)
    count = max(1, int(round(edge * len(filled))))
    if 2 * count >= len(filled):
        return None
    b1, b2 = int(filled[count - 1]), int(filled[-count])
    width = (x_hi - x_lo) / points
    # A margin of a step (and of the doubles' rounding) keeps every row of those buckets inside the ranges.
    s1 = x_lo + (b1 + 1) * width + 1 + 1e-9 * abs(x_hi)
    s2 = x_lo + b2 * width - 1 - 1e-9 * abs(x_hi)
    return len(filled), (b1, b2, s1, s2)


def balance_summary(root: PathLike, run_id: str, edge: float = 0.1, buckets: int = 200) -> dict[str, Any]:
    """Headline balance figures: the spreads of :func:`balance_series` (``buckets`` buckets) averaged
    over the first and the last ``edge`` of the run, the number of skipped weight updates and the
    final loss ratio per task."""
    if not 0 < edge <= 0.5:
        raise AnalysisError(f"edge is a fraction of the run in (0, 0.5], got {edge!r}")
    _check_points(buckets)
    run_list = resolve_runs(root, [run_id])
    (run,) = run_list
    # Only the first and the last ``edge`` of the buckets are averaged: where the cached block sums tell
    # which buckets hold rows, only those buckets' steps are read (two ranges of row groups), and the last
    # ratios and skipped steps come from the sums as well.
    cached = partials.usable(run)
    plan = _edge_buckets(run, buckets, edge) if cached else None
    series = _balance(run_list, buckets, plan[1]) if plan is not None else None
    if plan is not None and series is not None and len(series) != 2 * max(1, int(round(edge * plan[0]))):
        series = None  # not the buckets the sums foretold: read them all
    last = _cached_last(run) if cached else None
    if series is not None and plan is not None and last is not None:
        filled = plan[0]
    else:
        # The whole series; the last ratios and skipped steps from the same scan unless the sums gave them.
        series, last = _balance_and_last(run, buckets) if last is None else (_balance(run_list, buckets), last)
        filled = len(series)
    figures: dict[str, Any] = {"run_id": run_id, "buckets": filled}
    if len(series):
        count = max(1, int(round(edge * filled)))
        for column in ("grad_norm_cv", "loss_ratio_cv", "grad_norm_max_over_min"):
            figures[f"{column}_start"] = float(series[column].iloc[:count].mean())
            figures[f"{column}_end"] = float(series[column].iloc[-count:].mean())
    # The flag is repeated on every task's row of a step, so any one task's count is the step count.
    figures["skipped_updates"] = int(last["skipped"].max()) if len(last) else 0
    figures["final_loss_ratio"] = dict(zip(last["task"], last["final_loss_ratio"].astype(float)))
    return figures


def _cached_last(run: RunFiles) -> Optional[pd.DataFrame]:
    """:func:`_balance_and_last`'s (task, final_loss_ratio, skipped) from the cached per-file sums (each
    task's ratio at its last step that has one, the skipped steps counted per file); None when the cache
    cannot answer."""
    try:
        sums = partials.with_rescans(run, lambda: partials.block_sums(run, partials.BALANCE))
    except partials.Uncacheable:
        return None
    train = partials.train_blocks(sums)
    tasks = sorted(train["task"].unique())
    skipped = partials.group_sums(train, ["task"], {"skipped": ("skipped", "skipped")}).set_index("task")["skipped"]
    rated = train[train["rstep"].notna()]
    final = rated.loc[rated.groupby("task")["rstep"].idxmax()].set_index("task")["rlast"] if len(rated) else pd.Series(dtype=float)
    return pd.DataFrame({"task": tasks, "final_loss_ratio": [final.get(t, float("nan")) for t in tasks], "skipped": [int(skipped.get(t, 0)) for t in tasks]})
