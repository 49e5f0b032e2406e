"""One table per run: what to retrain with and how each task ended."""

from __future__ import annotations

from typing import Optional, Sequence

import pandas as pd

from gradnorm.toolkit import schema

from .catalog import PathLike
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
    per_task = query(
        [run],
        """SELECT task,
                  avg(loss_ratio) FILTER (WHERE step >= $tail) AS final_loss_ratio,
                  avg(weight) AS applied_weight_mean
           FROM metrics WHERE split = $split AND step BETWEEN $start AND $end GROUP BY task""",
        {"split": schema.TRAIN, "start": average.start_step, "end": average.end_step, "tail": tail_start},
        ["task", "final_loss_ratio", "applied_weight_mean"],
    )
    pairs = overfitting(root, run_id, max_points=0)
    last = pairs.dropna(subset=["val_loss", "train_loss"]).groupby("task", sort=False).tail(1)
    gaps = pd.DataFrame({"task": last["task"], "overfitting_gap": (last["val_loss"] - last["train_loss"]) / last["train_loss"].abs()})
    table = average.table[["task", "mean", "std"]].rename(columns={"mean": "weight_mean", "std": "weight_std"})
    table = table.merge(per_task, on="task", how="left").merge(gaps, on="task", how="left")
    return table[SUMMARY_COLUMNS]
