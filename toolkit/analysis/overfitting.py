"""Overfitting trend per task: training vs validation loss, their gap, its slope and where it opens.

The paper reads regularisation from these curves (section 5.2, Figure 3: GradNorm's test loss falls while
its training loss need not). At each validation step the training loss is the mean over the training
steps since the previous validation step (so both sides cover the same stretch of training); the gap is
validation minus training loss.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from gradnorm.toolkit import schema

from . import partials
from .catalog import PathLike, RunFiles
from .source import query, resolve_runs

OVERFITTING_COLUMNS = ["task", "step", "train_loss", "val_loss", "gap"]
ONSET_COLUMNS = ["task", "gap_slope", "onset_step", "final_gap"]

#: The validation loss must end this much (relative) above its minimum for an onset to be reported.
ONSET_TOLERANCE = 0.02


def overfitting(root: PathLike, run_id: str, *, tasks: Optional[Sequence[str]] = None, max_points: int = 2000) -> pd.DataFrame:
    """Per task and validation step: training loss, validation loss and the gap between them."""
    (run,) = resolve_runs(root, [run_id])
    if partials.usable(run) and not _has_validation(run):
        return pd.DataFrame(columns=OVERFITTING_COLUMNS)  # what the query gives without validation rows, without the scan
    params: dict[str, Any] = {"train": schema.TRAIN, "val": schema.VALIDATION}
    task_filter = ""
    if tasks is not None:
        params["tasks"] = [str(t) for t in tasks]
        task_filter = "AND list_contains($tasks, task)"
    body = f"""
        , val AS (
            SELECT task, step, avg(loss) AS val_loss FROM metrics
            WHERE split = $val AND loss IS NOT NULL {task_filter} GROUP BY task, step
        ),
        train AS (
            SELECT task, step, loss FROM metrics
            WHERE split = $train AND loss IS NOT NULL {task_filter} AND step <= (SELECT max(step) FROM val)
        ),
        matched AS (
            SELECT t.task, v.step AS val_step, t.loss FROM train t
            ASOF JOIN val v ON t.task = v.task AND v.step >= t.step
        )
        SELECT v.task, v.step, avg(m.loss) AS train_loss, v.val_loss, v.val_loss - avg(m.loss) AS gap
        FROM val v LEFT JOIN matched m ON m.task = v.task AND m.val_step = v.step
        GROUP BY v.task, v.step, v.val_loss ORDER BY v.task, v.step
    """
    frame = query([run], body, params, OVERFITTING_COLUMNS)
    if max_points and len(frame):
        frame = pd.concat([_thin(group, max_points) for _, group in frame.groupby("task", sort=False)])
    return frame.reset_index(drop=True)


def _has_validation(run: RunFiles) -> bool:
    """Whether any readable file holds validation rows, from the cached per-file block sums (True when
    they cannot be had: the query then decides)."""
    try:
        sums = partials.with_rescans(run, lambda: partials.block_sums(run, partials.WEIGHTS))
    except partials.Uncacheable:
        return True
    return bool((sums["split"] == schema.VALIDATION).any())


def _thin(group: pd.DataFrame, max_points: int) -> pd.DataFrame:
    """Evenly spaced validation points, the first and last always kept."""
    if len(group) <= max_points:
        return group
    keep = np.unique(np.linspace(0, len(group) - 1, max_points).round().astype(int))
    return group.iloc[keep]


def overfitting_onsets(root: PathLike, run_id: str) -> pd.DataFrame:
    """Per task: the gap's slope over the second half of validation points (loss per step), the step
    where overfitting starts (the validation minimum, reported only when the validation loss ends more
    than ``ONSET_TOLERANCE`` above it while the gap has widened since), and the last gap."""
    frame = overfitting(root, run_id, max_points=0)
    rows = []
    for task, group in frame.groupby("task", sort=False):
        group = group.dropna(subset=["val_loss"])
        steps = group["step"].to_numpy(dtype=float)
        gaps = group["gap"].to_numpy(dtype=float)
        val = group["val_loss"].to_numpy(dtype=float)
        tail = slice(len(steps) // 2, None)
        finite = np.isfinite(gaps[tail])
        slope = float(np.polyfit(steps[tail][finite], gaps[tail][finite], 1)[0]) if finite.sum() >= 3 else float("nan")
        onset = pd.NA
        if len(val) >= 3:
            smooth = pd.Series(val).rolling(3, center=True, min_periods=1).median().to_numpy()
            best = int(np.argmin(smooth))
            rose = smooth[-1] > smooth[best] * (1 + ONSET_TOLERANCE)
            widened = np.isfinite(gaps[-1]) and np.isfinite(gaps[best]) and gaps[-1] > gaps[best]
            if best < len(val) - 1 and rose and widened:
                onset = int(steps[best])
        rows.append({"task": task, "gap_slope": slope, "onset_step": onset, "final_gap": float(gaps[-1]) if len(gaps) else float("nan")})
    result = pd.DataFrame(rows, columns=ONSET_COLUMNS)
    result["onset_step"] = result["onset_step"].astype("Int64")
    return result
