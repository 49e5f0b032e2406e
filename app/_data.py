"""The app's access to runs: the analysis functions behind a cache keyed by what is on disk.

A cached answer is reused until a run's part files change (count, total size, newest mtime), so a live
run's refresh re-queries only when a new batch has landed and a finished run is read once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd
import streamlit as st

from gradnorm.toolkit import analysis, schema


def runs_signature(root: str, run_ids: Sequence[str]) -> tuple:
    """(run, files, bytes, newest mtime, run.json mtime) per run: changes whenever records land."""
    signature = []
    for run_id in run_ids:
        run_dir = Path(root) / run_id
        count = size = newest = 0
        metrics = run_dir / schema.METRICS_DIR
        if metrics.is_dir():
            for rank_dir in os.scandir(metrics):
                if not rank_dir.is_dir():
                    continue
                for entry in os.scandir(rank_dir.path):
                    if entry.name.endswith(schema.PART_SUFFIX) and not entry.name.startswith("."):
                        stat = entry.stat()
                        count, size, newest = count + 1, size + stat.st_size, max(newest, stat.st_mtime_ns)
        try:
            meta_mtime = (run_dir / schema.RUN_FILE).stat().st_mtime_ns
        except OSError:
            meta_mtime = 0
        signature.append((run_id, count, size, newest, meta_mtime))
    return tuple(signature)


@st.cache_data(show_spinner=False, max_entries=64)
def list_runs(root: str, listing_signature: tuple) -> pd.DataFrame:
    return analysis.list_runs(root)


@st.cache_data(show_spinner=False, max_entries=256)
def metric_series(
    root: str, run_ids: tuple, metric: str, split: str, tasks: Optional[tuple], step_range: Optional[tuple], max_points: int, x: str, signature: tuple
) -> pd.DataFrame:
    return analysis.metric_series(
        root, list(run_ids), metric, split=split, tasks=None if tasks is None else list(tasks), step_range=step_range, max_points=max_points, x=x
    )


@st.cache_data(show_spinner=False, max_entries=256)
def weight_average(root: str, run_id: str, window: Optional[tuple], signature: tuple) -> dict[str, Any]:
    average = analysis.weight_average(root, run_id, window=window)
    return {"table": average.table, "window": (average.start_step, average.end_step), "convergence": average.convergence, "method": average.method}


@st.cache_data(show_spinner=False, max_entries=128)
def overfitting(root: str, run_id: str, max_points: int, signature: tuple) -> tuple[pd.DataFrame, pd.DataFrame]:
    return analysis.overfitting(root, run_id, max_points=max_points), analysis.overfitting_onsets(root, run_id)


@st.cache_data(show_spinner=False, max_entries=128)
def balance(root: str, run_ids: tuple, max_points: int, signature: tuple) -> pd.DataFrame:
    return analysis.balance_series(root, list(run_ids), max_points=max_points)


@st.cache_data(show_spinner=False, max_entries=128)
def balance_summary(root: str, run_id: str, signature: tuple) -> dict[str, Any]:
    return analysis.balance_summary(root, run_id)


@st.cache_data(show_spinner=False, max_entries=128)
def export_document(root: str, run_id: str, window: Optional[tuple], signature: tuple) -> dict[str, Any]:
    return analysis.export_weights(root, run_id, window=window)


def listing_signature(root: str) -> tuple:
    """Names and run.json mtimes of the run directories: changes when a run appears or changes status."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return ()
    signature = []
    for entry in entries:
        if entry.is_dir():
            try:
                mtime = os.stat(os.path.join(entry.path, schema.RUN_FILE)).st_mtime_ns
            except OSError:
                mtime = 0
            signature.append((entry.name, mtime))
    return tuple(signature)
