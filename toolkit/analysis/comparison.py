"""Did balancing help? Runs compared per task on their validation losses, against a chosen baseline run.

Per (run, task): the final validation loss (at the task's last validation step with a finite loss), the
best one (the lowest) and its step, and the final loss divided by the task's initial test loss: the
paper's *task-normalised* test loss (section 4: the sum over tasks of the test loss ratios L'_i, which
weighs every task equally). The initial loss is the run's ``config.initial_test_losses[task]`` where the
run recorded one (the toy problem does), else the task's first validation loss in that run.

Per run: the multitask benchmarks' relative figure against the baseline run b (Maninis et al. 2019;
Navon et al. 2022),

    Delta_m% = (1/T) sum_i (-1)^{l_i} (M_{m,i} - M_{b,i}) / M_{b,i} * 100,

with l_i = 1 where higher is better; validation losses are lower-is-better (l_i = 0), so a negative
Delta_m% means the run beat the baseline. It is taken over the tasks both runs report with a finite,
non-zero baseline value (``tasks_compared`` says how many), on the final loss by default or the best one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from gradnorm.toolkit import schema

from .catalog import PathLike
from .source import AnalysisError, query, resolve_runs

PER_TASK_COLUMNS = [
    "run_id",
    "task",
    "final_val_loss",
    "final_step",
    "best_val_loss",
    "best_step",
    "initial_val_loss",
    "initial_source",
    "normalised_final",
    "delta_pct",
    "best_final",
    "best_best",
]
PER_RUN_COLUMNS = ["run_id", "delta_m_pct", "task_normalised_loss", "tasks_compared", "tasks_with_validation"]
METRICS = ("final", "best")


@dataclass(frozen=True)
class Comparison:
    """The comparison of ``runs`` against ``baseline`` on ``metric`` ("final" or "best" validation loss).

    ``per_task``: one row per (run, task) with a validation loss (columns ``PER_TASK_COLUMNS``);
    ``delta_pct`` is that task's relative change against the baseline in percent, ``best_final`` /
    ``best_best`` mark the run with the lowest final / best loss of the task. ``per_run``: Delta_m% (NaN for
    the baseline itself is never the case: it is 0), the task-normalised loss (sum over tasks of
    ``normalised_final``) and how many tasks entered each figure."""

    baseline: str
    metric: str
    runs: list[str]
    per_task: pd.DataFrame
    per_run: pd.DataFrame


def validation_losses(root: PathLike, run_ids: Sequence[str]) -> pd.DataFrame:
    """(run_id, task, step, loss): the mean validation loss of each task at each validation step."""
    run_list = resolve_runs(root, run_ids)
    body = """
        SELECT run_id, task, step, avg(loss) AS loss FROM metrics
        WHERE split = $val AND loss IS NOT NULL AND isfinite(loss)
        GROUP BY run_id, task, step ORDER BY run_id, task, step
    """
    return query(run_list, body, {"val": schema.VALIDATION}, ["run_id", "task", "step", "loss"])


def _initial_losses(meta: dict[str, Any]) -> dict[str, float]:
    config = meta.get("config")
    found = config.get("initial_test_losses") if isinstance(config, dict) else None
    if not isinstance(found, dict):
        return {}
    out = {}
    for task, value in found.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            out[str(task)] = float(value)
    return out


def compare_runs(root: PathLike, run_ids: Sequence[str], *, baseline: Optional[str] = None, metric: str = "final") -> Comparison:
    """Compare ``run_ids`` per task against ``baseline`` (default: the first run) on ``metric``."""
    runs = [str(r) for r in run_ids]
    if not runs:
        raise AnalysisError("name at least one run to compare")
    if len(set(runs)) != len(runs):
        raise AnalysisError(f"a run is named twice in {runs}")
    if metric not in METRICS:
        raise AnalysisError(f"metric must be one of {METRICS}, got {metric!r}")
    baseline = runs[0] if baseline is None else str(baseline)
    if baseline not in runs:
        raise AnalysisError(f"the baseline run {baseline!r} is not among the compared runs {runs}")
    run_files = {run.run_id: run for run in resolve_runs(root, runs)}
    losses = validation_losses(root, runs)
    rows = []
    for (run_id, task), group in losses.groupby(["run_id", "task"], sort=False):
        group = group.sort_values("step")
        steps, values = group["step"].to_numpy(), group["loss"].to_numpy(dtype=float)
        best = int(np.argmin(values))
        initial = _initial_losses(run_files[str(run_id)].meta).get(str(task))
        source = "config.initial_test_losses"
        if initial is None:
            initial, source = float(values[0]), "first validation loss"
        rows.append(
            {
                "run_id": str(run_id),
                "task": str(task),
                "final_val_loss": float(values[-1]),
                "final_step": int(steps[-1]),
                "best_val_loss": float(values[best]),
                "best_step": int(steps[best]),
                "initial_val_loss": initial,
                "initial_source": source,
                "normalised_final": float(values[-1]) / initial if initial else float("nan"),
            }
        )
    per_task = pd.DataFrame(rows, columns=PER_TASK_COLUMNS[:9])
    column = "final_val_loss" if metric == "final" else "best_val_loss"
    reference = per_task[per_task["run_id"] == baseline].set_index("task")[column]
    base = per_task["task"].map(reference)
    usable = base.notna() & np.isfinite(base.astype(float)) & (base != 0)
    per_task["delta_pct"] = np.where(usable, (per_task[column] - base) / base.where(usable, 1.0) * 100.0, np.nan)
    for flag, source_column in (("best_final", "final_val_loss"), ("best_best", "best_val_loss")):
        lowest = per_task.groupby("task")[source_column].transform("min")
        per_task[flag] = per_task[source_column] == lowest
    order = {run_id: index for index, run_id in enumerate(runs)}
    per_task = per_task.sort_values(["task", "run_id"], key=lambda s: s.map(order) if s.name == "run_id" else s).reset_index(drop=True)
    summary = []
    for run_id in runs:
        mine = per_task[per_task["run_id"] == run_id]
        deltas = mine["delta_pct"].dropna()
        summary.append(
            {
                "run_id": run_id,
                "delta_m_pct": float(deltas.mean()) if len(deltas) else float("nan"),
                "task_normalised_loss": float(mine["normalised_final"].sum()) if len(mine) else float("nan"),
                "tasks_compared": int(len(deltas)),
                "tasks_with_validation": int(len(mine)),
            }
        )
    return Comparison(baseline, metric, runs, per_task[PER_TASK_COLUMNS], pd.DataFrame(summary, columns=PER_RUN_COLUMNS))
