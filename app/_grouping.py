"""Run grouping as W&B does it: runs that share a key (their balancer, a run.json config field, or their
name without a seed suffix such as ``qm9-gradnorm-s0``/``-s1``/``-s2``) are drawn as one line per group,
the mean across the group's runs, with a band (min-max or mean +/- std across the runs) around it.

Plain functions over the analysis' DataFrames (no Streamlit): the page, the tests and any other reader
share them. Run metadata comes from ``gradnorm.toolkit.analysis`` (its run.json reader), never from the
files directly.

Runs of one group rarely share their exact x positions (different lengths, wall times, buckets), so each
group's runs are put on one grid first: ``points`` equal-width buckets over the group's x range; a run's
points in one bucket are averaged, then the runs are combined bucket by bucket. A bucket where only some of
the runs have a value is drawn from those, and ``runs`` says how many.

The Compare runs view and ``gradnorm report --group`` show a grouped comparison
(``gradnorm.toolkit.analysis.grouped_comparison``) through :func:`comparison_tables`: one row per group,
each cell the group's mean with its spread (the band chosen here) and how many runs it is over.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from gradnorm.toolkit.analysis import GroupedComparison

from ._charts import natural_key

#: Group keys the page offers besides the run.json config fields (``config:<dotted.field>``).
NONE, BALANCER, NAME = "none", "balancer", "name"
CONFIG_PREFIX = "config:"
#: Bands around a group's mean.
BANDS = ("minmax", "std", "none")
BAND_TITLES = {"minmax": "min-max", "std": "mean ± std", "none": "no band"}
#: A seed or repeat suffix: ``-s0``, ``_seed3``, ``.r2``, ``-rep1``, ``-run4``, ``-2``.
SEED_SUFFIX = re.compile(r"[-_.](?:s|seed|r|rep|run|trial)?\d+$", re.IGNORECASE)


def name_group(run_id: str) -> str:
    """``run_id`` without its seed suffix (``qm9-gradnorm-s2`` -> ``qm9-gradnorm``); a name without one is
    its own group."""
    stripped = SEED_SUFFIX.sub("", str(run_id))
    return stripped or str(run_id)


def flatten(document: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The scalar fields of a nested run.json section as ``dotted.name: value`` (lists and dicts inside
    lists are left out: they are not keys to group by)."""
    found: dict[str, Any] = {}
    for key, value in document.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            found.update(flatten(value, f"{name}."))
        elif value is None or isinstance(value, (str, int, float, bool)):
            found[name] = value
    return found


def config_fields(metas: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The config fields (``config`` and ``balancer`` sections of run.json, dotted) whose value differs
    between the given runs: the keys worth grouping by. Sorted by name."""
    values: dict[str, set[str]] = {}
    for meta in metas.values():
        flat = flatten({"config": meta.get("config") or {}, "balancer": meta.get("balancer") or {}})
        for name in set(values) | set(flat):
            values.setdefault(name, set()).add(repr(flat.get(name)))
    return sorted(name for name, seen in values.items() if len(seen) > 1 and name != "balancer.name")  # (that one is "balancer")


def group_key_value(run_id: str, key: str, balancer: Optional[str], meta: Optional[Mapping[str, Any]]) -> str:
    """The group ``run_id`` falls in under ``key``."""
    if key == BALANCER:
        return str(balancer) if balancer else "(no balancer)"
    if key == NAME:
        return name_group(run_id)
    if key.startswith(CONFIG_PREFIX):
        field = key[len(CONFIG_PREFIX) :]
        flat = flatten({"config": (meta or {}).get("config") or {}, "balancer": (meta or {}).get("balancer") or {}})
        value = flat.get(field)
        return f"{field}={'(unset)' if value is None else value}"
    raise ValueError(f"unknown group key {key!r}: expected {NONE!r}, {BALANCER!r}, {NAME!r} or {CONFIG_PREFIX}<field>")


def groups(
    run_ids: Sequence[str], key: str, balancers: Mapping[str, Optional[str]], metas: Optional[Mapping[str, Mapping[str, Any]]] = None
) -> dict[str, list[str]]:
    """Group name -> its runs, in the order the runs are given (a group is placed where its first run is)."""
    found: dict[str, list[str]] = {}
    for run_id in run_ids:
        name = group_key_value(run_id, key, balancers.get(run_id), (metas or {}).get(run_id))
        found.setdefault(name, []).append(run_id)
    return found


def _bucket(x: pd.Series, points: int) -> pd.Series:
    low, high = float(x.min()), float(x.max())
    if not high > low:
        return pd.Series(0, index=x.index)
    return np.minimum(np.floor((x - low) / (high - low) * points), points - 1).astype(int)


def group_series(
    frame: pd.DataFrame, members: Mapping[str, Sequence[str]], *, points: int, by: Iterable[str] = ("task",), value: str = "value"
) -> pd.DataFrame:
    """One series per (group, ``by``...) from per-run series (columns run_id, x, ``value``, ``by``...):
    ``value`` the mean across the group's runs, ``value_raw`` the same mean of the runs' raw values (where
    the frame has them), ``band_low``/``band_high`` the min and max across the runs, ``std`` their standard
    deviation (population: the runs are all there is), ``runs`` how many runs have a value there. ``run_id``
    holds the group's name, so the charts draw a group as they draw a run."""
    by = list(by)
    columns = ["run_id", *by, "x", "value", "value_raw", "band_low", "band_high", "std", "runs"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    raw = "value_raw" if "value_raw" in frame.columns else value
    parts = []
    for name, runs in members.items():
        mine = frame[frame["run_id"].isin(list(runs))]
        mine = mine[mine[value].notna()]
        if mine.empty:
            continue
        mine = mine.assign(bucket=_bucket(mine["x"].astype(float), points))
        # a run's points in one bucket first (so a run with more points does not weigh more), then the runs
        per_run = mine.groupby(["run_id", *by, "bucket"], observed=True, sort=False).agg(x=("x", "min"), v=(value, "mean"), r=(raw, "mean")).reset_index()
        keys = [*by, "bucket"]
        combined = (
            per_run.groupby(keys, observed=True, sort=False)
            .agg(
                x=("x", "min"),
                value=("v", "mean"),
                value_raw=("r", "mean"),
                band_low=("v", "min"),
                band_high=("v", "max"),
                std=("v", lambda v: float(np.std(v.to_numpy(dtype=float)))),
                runs=("run_id", "nunique"),
            )
            .reset_index()
        )
        parts.append(combined.assign(run_id=name))
    if not parts:
        return pd.DataFrame(columns=columns)
    result = pd.concat(parts, ignore_index=True).sort_values(["run_id", *by, "x"], kind="stable")
    return result[columns].reset_index(drop=True)


def with_band(frame: pd.DataFrame, band: str) -> pd.DataFrame:
    """``frame`` (from :func:`group_series`) with ``band_low``/``band_high`` as the chosen band: the runs'
    min and max, the mean +/- one standard deviation, or none (the columns dropped)."""
    if band not in BANDS:
        raise ValueError(f"unknown band {band!r}: expected one of {', '.join(BANDS)}")
    if band == "none" or frame.empty:
        return frame.drop(columns=["band_low", "band_high"], errors="ignore")
    if band == "std":
        return frame.assign(band_low=frame["value"] - frame["std"], band_high=frame["value"] + frame["std"])
    return frame


def label(key: str) -> str:
    """How a group key reads in the sidebar."""
    if key == NONE:
        return "no grouping"
    if key == BALANCER:
        return "balancer"
    if key == NAME:
        return "name without seed suffix"
    return key[len(CONFIG_PREFIX) :] if key.startswith(CONFIG_PREFIX) else key


def spread_text(mean: float, std: float, low: float, high: float, runs: int, band: str, number: str = "{:.5g}") -> str:
    """A group's cell: its mean, the spread the band names (``± std`` or ``[min, max]``; none: nothing) and
    ``n=`` its runs; a dash where the mean is missing."""
    if band not in BANDS:
        raise ValueError(f"unknown band {band!r}: expected one of {', '.join(BANDS)}")
    if mean is None or not np.isfinite(mean):
        return "–"
    text = number.format(mean)
    if runs > 1 and band == "std":
        text += f" ± {std:.2g}"
    elif runs > 1 and band == "minmax":
        text += f" [{number.format(low)}, {number.format(high)}]"
    return f"{text} (n={runs})"


def comparison_tables(result: GroupedComparison, band: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The grouped comparison as text tables to show, and where their better cells are.

    (summary, summary_best, per_task, per_task_best): ``summary`` one row per group (group, runs, Delta_m%
    against the baseline group with its spread across the group's runs, the task-normalised loss likewise,
    tasks compared); ``per_task`` one row per group, one column per task (natural order), each cell the
    group's mean loss with its spread and n. The ``_best`` frames are booleans of the same shape: the lowest
    Delta_m% and task-normalised loss, the lowest mean of each task."""
    delta_title = f"Delta_m% vs {result.baseline}"
    per_group = result.per_group
    summary = pd.DataFrame(
        {
            "group": per_group["group"].astype(str),
            "runs": [
                f"{int(r)}" if int(r) == int(v) else f"{int(v)} of {int(r)} validated" for r, v in zip(per_group["runs"], per_group["runs_with_validation"])
            ],
            delta_title: [
                spread_text(m, s, lo, hi, int(n), band, "{:+.2f}")
                for m, s, lo, hi, n in zip(
                    per_group["delta_m_pct"], per_group["delta_m_std"], per_group["delta_m_low"], per_group["delta_m_high"], per_group["runs_with_validation"]
                )
            ],
            "task-normalised loss": [
                spread_text(m, s, lo, hi, int(n), band, "{:.4f}")
                for m, s, lo, hi, n in zip(
                    per_group["task_normalised_loss"],
                    per_group["task_normalised_std"],
                    per_group["task_normalised_low"],
                    per_group["task_normalised_high"],
                    per_group["task_normalised_runs"],
                )
            ],
            "tasks compared": per_group["tasks_compared"].astype(int),
        }
    )
    summary_best = pd.DataFrame(False, index=summary.index, columns=summary.columns)
    summary_best[delta_title] = per_group["best_delta"].to_numpy(dtype=bool)
    summary_best["task-normalised loss"] = per_group["best_normalised"].to_numpy(dtype=bool)
    groups = list(result.groups)
    tasks = sorted({str(t) for t in result.per_task["task"]}, key=natural_key)
    cells = {(str(r["group"]), str(r["task"])): r for r in result.per_task.to_dict("records")}
    per_task = pd.DataFrame(
        {
            task: [
                spread_text(
                    cells[(g, task)]["mean"], cells[(g, task)]["std"], cells[(g, task)]["low"], cells[(g, task)]["high"], int(cells[(g, task)]["runs"]), band
                )
                if (g, task) in cells
                else "–"
                for g in groups
            ]
            for task in tasks
        },
        index=pd.Index(groups, name="group"),
    )
    per_task_best = pd.DataFrame(
        {task: [bool(cells[(g, task)]["best"]) if (g, task) in cells else False for g in groups] for task in tasks}, index=per_task.index
    )
    return summary, summary_best, per_task, per_task_best
