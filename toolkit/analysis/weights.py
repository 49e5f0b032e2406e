"""The time-averaged weights E_t[w_i] of a run (paper 5.2 and 5.3), with their spread and convergence.

GradNorm's converged static weights are the mean of w_i(t) over a window of steps. The default window
skips a burn-in (the first 10% of steps), while the weights move away from 1; it is always stated. Two
figures say whether the average can be trusted: the standard error from batch means (the window cut
into consecutive batches, so the autocorrelation of w(t) is not mistaken for independent samples) and
the drift between the window's two halves relative to the mean. In shadow mode the balancer's own
weights (what it would have set) are averaged, not the user's fixed ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from gradnorm.toolkit import schema

from . import partials
from .catalog import PathLike, RunFiles
from .source import AnalysisError, query, resolve_runs

BATCHES = 20
WEIGHT_TABLE_COLUMNS = ["task", "mean", "std", "n", "stderr", "half_drift"]


@dataclass
class WeightAverage:
    run_id: str
    start_step: int
    end_step: int
    method: str
    table: pd.DataFrame  # task, mean, std, n, stderr (batch means), half_drift
    convergence: float  # the largest relative drift between the window's halves, across tasks

    @property
    def weights(self) -> dict[str, float]:
        return dict(zip(self.table["task"], self.table["mean"].astype(float)))

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "window": [self.start_step, self.end_step],
            "method": self.method,
            "convergence": self.convergence,
            "weights": self.weights,
            "table": self.table.to_dict(orient="records"),
        }


def step_bounds(run: RunFiles) -> tuple[int, int]:
    """First and last recorded training step of a run (from the cached per-file sums where it can)."""
    if partials.usable(run):
        try:
            found = partials.with_rescans(run, lambda: partials.step_range(partials.block_sums(run, partials.WEIGHTS)))
        except partials.Uncacheable:
            pass
        else:
            if found is None:
                raise AnalysisError(f"run {run.run_id!r} has no training rows yet")
            return found
    frame = query([run], "SELECT min(step) AS lo, max(step) AS hi FROM metrics WHERE split = $split", {"split": schema.TRAIN}, ["lo", "hi"])
    if frame.empty or pd.isna(frame["lo"].iloc[0]):
        raise AnalysisError(f"run {run.run_id!r} has no training rows yet")
    return int(frame["lo"].iloc[0]), int(frame["hi"].iloc[0])


def resolve_window(run: RunFiles, window: Optional[Sequence[Optional[int]]], burn_in: float) -> tuple[int, int]:
    if not 0 <= burn_in < 1:
        raise AnalysisError(f"burn_in is a fraction of the run in [0, 1), got {burn_in!r}")
    return window_within(run, step_bounds(run), window, burn_in)


def window_within(run: RunFiles, bounds: tuple[int, int], window: Optional[Sequence[Optional[int]]], burn_in: float) -> tuple[int, int]:
    """The window of steps ``window`` names (default: after the first ``burn_in`` of the run) inside ``bounds``."""
    first, last = bounds
    if window is None:
        return first + math.ceil(burn_in * (last - first)), last
    if len(window) != 2:
        raise AnalysisError(f"window is (start_step, end_step), got {window!r}")
    start = first if window[0] is None else int(window[0])
    end = last if window[1] is None else int(window[1])
    if start > end:
        raise AnalysisError(f"window start {start} is after its end {end}")
    if end < first or start > last:
        raise AnalysisError(f"window [{start}, {end}] holds no training steps of run {run.run_id!r} (steps {first} to {last})")
    return max(start, first), min(end, last)


# One scan: per (task, batch) counts, sums and sums of squares; everything else follows from them.
_BATCHES_BODY = """
    , rows AS (
        SELECT task, step, coalesce(balancer_weight, weight) AS w FROM metrics
        WHERE split = $split AND step BETWEEN $start AND $end AND coalesce(balancer_weight, weight) IS NOT NULL
          AND coalesce(present, TRUE)
    )
    SELECT task, least(floor((step - $start) * $batches / ($end - $start + 1)), $batches - 1)::INTEGER AS batch,
           count(*) AS n, sum(w) AS s, sum(w * w) AS ss
    FROM rows GROUP BY task, batch
"""


def _cached_batches(run: RunFiles, window: Optional[Sequence[Optional[int]]], burn_in: float) -> tuple[pd.DataFrame, tuple[int, int]]:
    """The weights query's (task, batch, n, s, ss) from the cached per-file block sums, and the window:
    the blocks inside one batch add their sums, the blocks across a batch's edge are read again."""
    sums = partials.block_sums(run, partials.WEIGHTS)
    bounds = partials.step_range(sums)
    if bounds is None:
        raise AnalysisError(f"run {run.run_id!r} has no training rows yet")
    start, end = window_within(run, bounds, window, burn_in)
    inside, edges = partials.split_blocks(partials.train_blocks(sums), partials.batch_of(start, end, BATCHES))
    inside = inside.rename(columns={"bucket": "batch"})
    whole = partials.group_sums(inside, ["task", "batch"], {"n": ("wn", "wn"), "s": ("ws", "wn"), "ss": ("wss", "wn")})
    params = {"split": schema.TRAIN, "start": start, "end": end, "batches": BATCHES}
    read = partials.edge_query(run, edges, ("step", "split", "task", "balancer_weight", "weight", "present"), _BATCHES_BODY, params)
    both = pd.concat([frame for frame in (whole, read) if len(frame)], ignore_index=True) if len(whole) or len(read) else whole
    if both.empty:
        return pd.DataFrame(columns=["task", "batch", "n", "s", "ss"]), (start, end)
    both["n"] = both["n"].astype(np.float64)
    combined = partials.group_sums(both, ["task", "batch"], {"n": ("n", "n"), "s": ("s", "n"), "ss": ("ss", "n")})
    combined = combined[combined["n"] > 0].astype({"n": np.int64, "batch": np.int64})
    return combined.reset_index(drop=True), (start, end)


def weight_average(root: PathLike, run_id: str, *, window: Optional[Sequence[Optional[int]]] = None, burn_in: float = 0.1) -> WeightAverage:
    """E_t[w_i] over ``window`` (inclusive steps; default: after the first ``burn_in`` of the run).

    A task absent from some steps (``present`` false: its loss was not handed in) is averaged over the
    steps where it was present, the steps where its weight multiplied a loss (docs/design.md).
    """
    (run,) = resolve_runs(root, [run_id])
    if not 0 <= burn_in < 1:
        raise AnalysisError(f"burn_in is a fraction of the run in [0, 1), got {burn_in!r}")
    cached = None
    if partials.usable(run):
        try:
            cached = partials.with_rescans(run, lambda: _cached_batches(run, window, burn_in))
        except partials.Uncacheable:
            cached = None
    if cached is not None:
        parts, (start, end) = cached
    else:
        start, end = resolve_window(run, window, burn_in)
        params = {"split": schema.TRAIN, "start": start, "end": end, "batches": BATCHES}
        parts = query([run], _BATCHES_BODY, params, ["task", "batch", "n", "s", "ss"])
    if parts.empty:
        raise AnalysisError(f"run {run_id!r} has no recorded weights in steps [{start}, {end}]")
    table = _table(parts, run.meta.get("tasks") or sorted(parts["task"].unique()))
    drifts = table["half_drift"].dropna()
    recorded = run.meta.get("balancer")
    balancer = recorded if isinstance(recorded, dict) else {}
    return WeightAverage(
        run_id=run_id,
        start_step=start,
        end_step=end,
        method=str(balancer.get("name", "unknown")),
        table=table,
        convergence=float(drifts.max()) if len(drifts) else float("nan"),
    )


def _table(parts: pd.DataFrame, task_order: Sequence[str]) -> pd.DataFrame:
    rows = []
    for task, group in parts.groupby("task", sort=False):
        n = group["n"].to_numpy(dtype=float)
        s = group["s"].to_numpy(dtype=float)
        ss = group["ss"].to_numpy(dtype=float)
        total = n.sum()
        mean = s.sum() / total
        variance = max(ss.sum() - total * mean * mean, 0.0) / (total - 1) if total > 1 else float("nan")
        batch_means = s / n
        stderr = float(np.std(batch_means, ddof=1) / math.sqrt(len(batch_means))) if len(batch_means) > 1 else float("nan")
        first = (group["batch"] < BATCHES // 2).to_numpy()
        if first.any() and (~first).any():
            drift = abs(s[~first].sum() / n[~first].sum() - s[first].sum() / n[first].sum()) / abs(mean) if mean else float("inf")
        else:
            drift = float("nan")
        rows.append(
            {
                "task": task,
                "mean": mean,
                "std": math.sqrt(variance) if variance == variance else variance,
                "n": int(total),
                "stderr": stderr,
                "half_drift": drift,
            }
        )
    table = pd.DataFrame(rows, columns=WEIGHT_TABLE_COLUMNS)
    order = {task: index for index, task in enumerate(task_order)}
    return table.sort_values("task", key=lambda col: col.map(lambda t: order.get(t, len(order)))).reset_index(drop=True)
