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
from typing import Any, Mapping, Optional, Sequence

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


GROUP_TASK_COLUMNS = ["group", "task", "runs", "runs_in_group", "mean", "std", "low", "high", "delta_pct", "best"]
GROUP_COLUMNS = [
    "group",
    "runs",
    "runs_with_validation",
    "delta_m_pct",
    "delta_m_std",
    "delta_m_low",
    "delta_m_high",
    "task_normalised_loss",
    "task_normalised_std",
    "task_normalised_low",
    "task_normalised_high",
    "task_normalised_runs",
    "tasks_compared",
    "tasks_with_validation",
    "best_delta",
    "best_normalised",
]


@dataclass(frozen=True)
class GroupedComparison:
    """The comparison of groups of runs (seeds of one configuration) against a ``baseline`` group.

    ``per_task``: one row per (group, task) that at least one of the group's runs validated (columns
    ``GROUP_TASK_COLUMNS``): ``mean``, ``std`` (population: the runs are all there is, as the app's group
    bands), ``low``/``high`` (min and max) of the runs' ``metric`` loss, ``runs`` how many runs have the task
    out of ``runs_in_group``; ``delta_pct`` the relative change of the group's mean against the baseline
    group's mean in percent; ``best`` marks the lowest mean of the task.

    ``per_group`` (columns ``GROUP_COLUMNS``): ``delta_m_pct`` is Delta_m% of the group's mean losses
    against the baseline group's mean losses; ``delta_m_std``/``_low``/``_high`` its spread across the
    group's runs, each run's Delta_m% taken against the same baseline means (where every run has every
    task, the mean of those per-run figures is ``delta_m_pct``: Delta_m% is linear in the losses). The
    task-normalised loss (paper section 4) is each run's, then its mean and spread across the runs that
    validated every task of the comparison (``task_normalised_runs`` of them: a sum over fewer tasks would
    look better for it).
    ``best_delta``/``best_normalised`` mark the lowest.

    ``notes``: what a figure leaves out, in words: a group none of whose runs validated, a run without
    validation losses, a task only some of a group's runs (or none of them) validated."""

    baseline: str
    metric: str
    groups: dict[str, list[str]]
    per_task: pd.DataFrame
    per_group: pd.DataFrame
    notes: list[str]


def _spread(values: Sequence[float]) -> tuple[float, float, float, float]:
    """(mean, population std, min, max) of ``values``; NaN for none."""
    if not len(values):
        return (math.nan,) * 4
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std()), float(array.min()), float(array.max())


def grouped_comparison(per_task: pd.DataFrame, groups: Mapping[str, Sequence[str]], *, baseline: str, metric: str = "final") -> GroupedComparison:
    """Group the per-run comparison ``per_task`` (``Comparison.per_task``, possibly filtered to some
    tasks) by ``groups`` (group name -> its runs) and compare each group with the ``baseline`` group on the
    ``metric`` ("final" or "best") validation loss.

    Delta_m% of a group g against the baseline group b (Maninis et al. 2019; Navon et al. 2022), over the
    tasks T both groups validated with a finite, non-zero baseline mean:

        Delta_m%(g) = (1/|T|) sum_{i in T} (mean_g,i - mean_b,i) / mean_b,i * 100

    where mean_g,i is the mean of task i's loss over the runs of g that validated it."""
    if metric not in METRICS:
        raise AnalysisError(f"metric must be one of {METRICS}, got {metric!r}")
    members = {str(name): [str(r) for r in runs] for name, runs in groups.items()}
    if not members:
        raise AnalysisError("name at least one group to compare")
    empty = [name for name, runs in members.items() if not runs]
    if empty:
        raise AnalysisError(f"group(s) {empty} have no runs")
    seen: dict[str, str] = {}
    for name, runs in members.items():
        for run_id in runs:
            if run_id in seen:
                raise AnalysisError(f"run {run_id!r} is in two groups, {seen[run_id]!r} and {name!r}")
            seen[run_id] = name
    baseline = str(baseline)
    if baseline not in members:
        raise AnalysisError(f"the baseline group {baseline!r} is not among the groups {list(members)}")
    missing = [c for c in ("run_id", "task", "final_val_loss", "best_val_loss", "normalised_final") if c not in per_task.columns]
    if missing:
        raise AnalysisError(f"per_task lacks the column(s) {missing}: pass Comparison.per_task")
    column = "final_val_loss" if metric == "final" else "best_val_loss"
    frame = per_task[per_task["run_id"].astype(str).isin(seen)]
    frame = frame.assign(run_id=frame["run_id"].astype(str), task=frame["task"].astype(str))
    tasks = list(dict.fromkeys(frame["task"]))
    notes: list[str] = []
    rows = []
    for name, runs in members.items():
        mine = frame[frame["run_id"].isin(runs)]
        validated = set(mine["run_id"])
        if not validated:
            notes.append(f"group {name}: none of its {len(runs)} run(s) logged validation losses; it has no figures")
            continue
        for run_id in runs:
            if run_id not in validated:
                notes.append(f"group {name}: run {run_id} logged no validation losses and is left out of the group's figures")
        absent: list[str] = []
        partial: dict[int, list[str]] = {}
        for task in tasks:
            values = mine.loc[mine["task"] == task, column].astype(float).tolist()
            if not values:
                absent.append(task)
                continue
            if len(values) < len(validated):
                partial.setdefault(len(values), []).append(task)
            mean, std, low, high = _spread(values)
            rows.append({"group": name, "task": task, "runs": len(values), "runs_in_group": len(runs), "mean": mean, "std": std, "low": low, "high": high})
        # One note per kind of gap (a list of tasks), not one per task: ten tasks make one line, not ten.
        if absent:
            notes.append(
                f"group {name}: no run validated task(s) {', '.join(absent)} (no cell; its Delta_m% leaves them out, and it has no task-normalised loss)"
            )
        for count, names in sorted(partial.items()):
            notes.append(
                f"group {name}: only {count} of its {len(validated)} run(s) with validation losses validated task(s) {', '.join(names)}; "
                "those cells are over them, and the group's task-normalised loss over its runs with every task"
            )
    table = pd.DataFrame(rows, columns=GROUP_TASK_COLUMNS[:8])
    reference = table[table["group"] == baseline].set_index("task")["mean"]
    base = table["task"].map(reference).astype(float)
    usable = base.notna() & np.isfinite(base) & (base != 0)
    table["delta_pct"] = np.where(usable, (table["mean"] - base) / base.where(usable, 1.0) * 100.0, np.nan)
    table["best"] = table["mean"] == table.groupby("task")["mean"].transform("min") if len(table) else pd.Series(dtype=bool)
    usable_reference = reference[np.isfinite(reference.astype(float)) & (reference != 0)]
    summary = []
    for name, runs in members.items():
        mine = table[table["group"] == name]
        deltas = mine["delta_pct"].dropna()
        run_frame = frame[frame["run_id"].isin(runs)]
        per_run_delta, per_run_normalised = [], []
        for run_id in runs:
            own = run_frame[run_frame["run_id"] == run_id]
            if own.empty:
                continue
            compared = own[own["task"].isin(usable_reference.index)]
            if len(compared):
                b = compared["task"].map(usable_reference).astype(float)
                per_run_delta.append(float(((compared[column].astype(float) - b) / b * 100.0).mean()))
            # A sum over fewer tasks is no figure to set beside the others: only runs with every task count.
            if set(own["task"]) >= set(tasks):
                per_run_normalised.append(float(own["normalised_final"].astype(float).sum()))
        _, delta_std, delta_low, delta_high = _spread(per_run_delta)
        normalised = _spread(per_run_normalised)
        summary.append(
            {
                "group": name,
                "runs": len(runs),
                "runs_with_validation": int(run_frame["run_id"].nunique()),
                "delta_m_pct": float(deltas.mean()) if len(deltas) else math.nan,
                "delta_m_std": delta_std,
                "delta_m_low": delta_low,
                "delta_m_high": delta_high,
                "task_normalised_loss": normalised[0],
                "task_normalised_std": normalised[1],
                "task_normalised_low": normalised[2],
                "task_normalised_high": normalised[3],
                "task_normalised_runs": len(per_run_normalised),
                "tasks_compared": int(len(deltas)),
                "tasks_with_validation": int(len(mine)),
            }
        )
    per_group = pd.DataFrame(summary, columns=GROUP_COLUMNS[:-2])
    per_group["best_delta"] = per_group["delta_m_pct"] == per_group["delta_m_pct"].min()
    per_group["best_normalised"] = per_group["task_normalised_loss"] == per_group["task_normalised_loss"].min()
    order = {name: index for index, name in enumerate(members)}
    table = table.sort_values(["task", "group"], key=lambda s: s.map(order) if s.name == "group" else s, kind="stable").reset_index(drop=True)
    return GroupedComparison(baseline, metric, members, table[GROUP_TASK_COLUMNS], per_group[GROUP_COLUMNS], notes)
