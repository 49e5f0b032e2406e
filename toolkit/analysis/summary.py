"""One table per run: what to retrain with and how each task ended."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from gradnorm.toolkit import schema

from . import partials
from .catalog import PathLike, RunFiles
from .overfitting import overfitting
from .source import query, resolve_runs
from .weights import weight_average

SUMMARY_COLUMNS = ["task", "weight_mean", "weight_std", "applied_weight_mean", "final_loss_ratio", "overfitting_gap"]

#: The final loss ratio is the mean over this last fraction of the window (one step alone is noise).
FINAL_FRACTION = 0.05


def summary(root: PathLike, run_id: str, *, window: Optional[Sequence[Optional[int]]] = None) -> pd.DataFrame:
    """Per task over the window: E_t[w_i] of the balancer and its spread (``weight_mean``, ``weight_std``:
    what ``export_weights`` writes, paper 5.2), the mean weight the network actually trained with
    (``applied_weight_mean``: the same as ``weight_mean`` unless the run is a shadow run, where it is the
    user's own weights), the final loss ratio L_i(t)/L_i(0), and the relative overfitting gap at the last
    validation point, (L_val - L_train) / L_train (NaN when no validation was logged for the task)."""
    average = weight_average(root, run_id, window=window)
    (run,) = resolve_runs(root, [run_id])
    tail_start = average.end_step - int(FINAL_FRACTION * (average.end_step - average.start_step))
    params: dict[str, Any] = {"split": schema.TRAIN, "start": average.start_step, "end": average.end_step, "tail": tail_start}
    per_task = None
    if partials.usable(run):
        try:
            per_task = partials.with_rescans(run, lambda: _cached_per_task(run, params))
        except partials.Uncacheable:
            per_task = None
    if per_task is None:
        per_task = query(
            [run],
            """SELECT task,
                      avg(loss_ratio) FILTER (WHERE step >= $tail) AS final_loss_ratio,
                      avg(weight) AS applied_weight_mean
               FROM metrics WHERE split = $split AND step BETWEEN $start AND $end GROUP BY task""",
            params,
            ["task", "final_loss_ratio", "applied_weight_mean"],
        )
    pairs = overfitting(root, run_id, max_points=0)
    last = pairs.dropna(subset=["val_loss", "train_loss"]).groupby("task", sort=False).tail(1)
    gaps = pd.DataFrame({"task": last["task"], "overfitting_gap": (last["val_loss"] - last["train_loss"]) / last["train_loss"].abs()})
    table = average.table[["task", "mean", "std"]].rename(columns={"mean": "weight_mean", "std": "weight_std"})
    table = table.merge(per_task, on="task", how="left").merge(gaps, on="task", how="left")
    return table[SUMMARY_COLUMNS]


def _cached_per_task(run: RunFiles, params: dict[str, Any]) -> pd.DataFrame:
    """The per-task query above from the cached per-file block sums: buckets [start, tail) and [tail, end],
    the blocks across an edge read again."""
    start, end, tail = int(params["start"]), int(params["end"]), int(params["tail"])

    def bucket(steps: np.ndarray) -> np.ndarray:
        return np.where(steps < start, partials.BEFORE, np.where(steps > end, partials.AFTER, (steps >= tail).astype(np.int64)))

    sums = partials.block_sums(run, partials.SUMMARY)
    inside, edges = partials.split_blocks(partials.train_blocks(sums), bucket)
    read = partials.edge_query(
        run,
        edges,
        ("step", "split", "task", "weight", "loss_ratio"),
        """SELECT task, (step >= $tail)::BIGINT AS bucket, count(weight) AS an, sum(weight) AS asum, count(loss_ratio) AS rn, sum(loss_ratio) AS rs
           FROM metrics WHERE split = $split AND step BETWEEN $start AND $end GROUP BY task, bucket""",
        params,
    )
    both = pd.concat([frame[["task", "bucket", "an", "asum", "rn", "rs"]] for frame in (inside, read) if len(frame)], ignore_index=True)
    if both.empty:
        return pd.DataFrame(columns=["task", "final_loss_ratio", "applied_weight_mean"])
    both["tail"] = (both["bucket"] == 1).astype(np.int64)
    both["rn_tail"] = np.where(both["tail"] == 1, both["rn"], 0)
    applied = partials.group_sums(both, ["task"], {"an": ("an", "an"), "asum": ("asum", "an"), "rn": ("rn_tail", "rn_tail"), "rs": ("rs", "rn_tail")})
    with np.errstate(invalid="ignore", divide="ignore"):
        final = np.where(applied["rn"] > 0, applied["rs"] / applied["rn"].where(applied["rn"] > 0, 1), np.nan)
        mean = np.where(applied["an"] > 0, applied["asum"] / applied["an"].where(applied["an"] > 0, 1), np.nan)
    return pd.DataFrame({"task": applied["task"], "final_loss_ratio": final, "applied_weight_mean": mean})
