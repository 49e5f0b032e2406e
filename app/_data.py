"""The app's access to runs: the analysis functions behind a cache keyed by what is on disk.

A cached answer is reused until a run's files change: the signature of a run is a digest of the name,
size, mtime and inode of every part file and rank.json under its rank folders, and of its run.json. A live
run's refresh re-queries only when a new batch has landed; a compaction (a merged file appears, its
originals go) changes the signature at each step; a finished run is read once. Nothing is opened to
compute it (``lstat`` only), and links are not followed.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd
import streamlit as st

from gradnorm.toolkit import analysis, schema
from gradnorm.toolkit.analysis import partials


def _stat_entry(digest: Any, path: str) -> None:
    try:
        info = os.lstat(path)
    except OSError:
        digest.update(b"-")
        return
    digest.update(f"{info.st_size}:{info.st_mtime_ns}:{info.st_ino}:{stat.S_IFMT(info.st_mode)};".encode())


def run_signature(run_dir: Path) -> str:
    """A digest that changes whenever the run's records or its run.json change."""
    digest = hashlib.blake2b(digest_size=16)
    _stat_entry(digest, str(run_dir / schema.RUN_FILE))
    metrics = run_dir / schema.METRICS_DIR
    _stat_entry(digest, str(metrics))
    try:
        ranks = sorted((e for e in os.scandir(metrics) if e.is_dir(follow_symlinks=False)), key=lambda e: e.name)
    except OSError:
        return digest.hexdigest()
    for rank_dir in ranks:
        try:
            entries = sorted(os.scandir(rank_dir.path), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if entry.name.endswith(schema.PART_SUFFIX) or entry.name == "rank.json":
                digest.update(f"{rank_dir.name}/{entry.name}=".encode("utf-8", "surrogateescape"))
                _stat_entry(digest, entry.path)
    return digest.hexdigest()


def sum_long_runs_in_background() -> None:
    """A page answers a fresh server's first queries on a long run with the plain query and has the
    per-file sums computed in the background for its reruns (toolkit/analysis/partials.py): the app is
    the long-lived reader that pays for them once."""
    partials.fill_in_background(True)


def runs_signature(root: str, run_ids: Sequence[str]) -> tuple:
    """(run, digest of its files) per run: changes whenever records land or files are replaced."""
    return tuple((run_id, run_signature(Path(root) / run_id)) for run_id in run_ids)


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
    """The run directories and the signature of each: changes when a run appears, changes status, or its
    files change (the listing shows rows, problems and lost rows). ``lstat`` of each part file costs far
    less than the listing it saves, and compaction keeps a run's files few."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return ()
    return tuple((entry.name, run_signature(Path(entry.path))) for entry in entries if entry.is_dir())


@st.cache_data(show_spinner=False, max_entries=64)
def comparison(root: str, run_ids: tuple, baseline: str, metric: str, signature: tuple) -> tuple[pd.DataFrame, pd.DataFrame]:
    result = analysis.compare_runs(root, list(run_ids), baseline=baseline, metric=metric)
    return result.per_task, result.per_run


def root_entries(root: str) -> tuple[str, ...]:
    """The names of the run directories under ``root`` that hold a run.json (``lstat`` only): a new run
    shows up here as soon as its run.json is written."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return ()
    found = []
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False) and os.path.lexists(os.path.join(entry.path, schema.RUN_FILE)):
                found.append(entry.name)
        except OSError:
            continue
    return tuple(sorted(found))
