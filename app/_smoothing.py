"""TensorBoard's smoothing: an exponential moving average with its start-up bias removed.

A plain EMA starting at 0 drags the first points towards 0; dividing by 1 - weight**k (k the number of
finite points seen) removes that bias, which is what TensorBoard's scalar dashboard does. Non-finite
values are passed through unsmoothed and do not enter the average.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd


def debiased_ema(values: Iterable[float], weight: float) -> np.ndarray:
    """Smooth ``values`` with ``weight`` in [0, 1): 0 returns them unchanged."""
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight!r}")
    array = np.asarray(list(values), dtype=float)
    if weight == 0:
        return array.copy()
    out = np.empty_like(array)
    last = 0.0
    count = 0
    for index, value in enumerate(array):
        if not math.isfinite(value):
            out[index] = value
            continue
        last = last * weight + (1 - weight) * value
        count += 1
        out[index] = last / (1 - weight**count)
    return out


def smooth_series(frame: pd.DataFrame, weight: float, column: str = "value", by: tuple[str, ...] = ("run_id", "task")) -> pd.DataFrame:
    """A copy of ``frame`` with ``column`` smoothed within each group, ordered by ``x``; the raw values
    are kept in ``<column>_raw`` for tooltips."""
    result = frame.copy()
    result[f"{column}_raw"] = result[column]
    if weight == 0 or result.empty:
        return result
    keys = [key for key in by if key in result.columns]
    result = result.sort_values(keys + ["x"]) if "x" in result.columns else result
    if keys:
        result[column] = result.groupby(keys, sort=False)[column].transform(lambda s: debiased_ema(s.to_numpy(), weight))
    else:
        result[column] = debiased_ema(result[column].to_numpy(), weight)
    return result
