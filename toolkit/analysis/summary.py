"""One table per run: what to retrain with and how each task ended."""

from __future__ import annotations

from typing import Optional, Sequence

import pandas as pd

from gradnorm.toolkit import schema

from .catalog import PathLike
from .overfitting import overfitting_onsets
from .source import query, resolve_runs
from .weights import weight_average

SUMMARY_COLUMNS = ["task", "weight_mean", "weight_std", "final_loss_ratio", "overfitting_gap"]

#: The final loss ratio is the mean over this last fraction of the window (one step alone is noise).
FINAL_FRACTION = 0.05


def summary(root: PathLike, run_id: str, *, window: Optional[Sequence[Optional[int]]] = None) -> pd.DataFrame:
    """Per task: E_t[w_i] and its spread over the window, final loss ratio, last validation gap."""
    average = weight_average(root, run_id, window=window)
    (run,) = resolve_runs(root, [run_id])
    tail_start = average.end_step - int(FINAL_FRACTION * (average.end_step - average.start_step))
    final = query(
        [run],
        "SELECT task, avg(loss_ratio) AS final_loss_ratio FROM metrics WHERE split = $split AND step BETWEEN $start AND $end GROUP BY task",
        {"split": schema.TRAIN, "start": tail_start, "end": average.end_step},
        ["task", "final_loss_ratio"],
    )
    gaps = overfitting_onsets(root, run_id)[["task", "final_gap"]].rename(columns={"final_gap": "overfitting_gap"})
    table = average.table[["task", "mean", "std"]].rename(columns={"mean": "weight_mean", "std": "weight_std"})
    table = table.merge(final, on="task", how="left").merge(gaps, on="task", how="left")
    return table[SUMMARY_COLUMNS]
