"""Find the runs under a runs root and the part files that are safe to read.

DuckDB's ``read_parquet`` fails the whole query on one damaged file, so every part file is checked first
from its Parquet footer (a file cut short has none) and its schema (the columns the queries need, with
usable types). The verdict is cached by (path, size, mtime), so a live run costs only its new files.
Everything outside the chosen root is refused: run ids are validated and resolved paths must stay under it.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gradnorm import toolkit
from gradnorm.toolkit import runs, schema

PathLike = Union[str, os.PathLike]

RUNS_ROOT_ENV = "GRADNORM_RUNS_ROOT"
INVALID = "invalid"

#: Columns a part file must have, and the Arrow type families they must belong to.
REQUIRED_COLUMNS = {"step": pa.types.is_integer, "split": pa.types.is_string, "task": pa.types.is_string}


#: Where ``attach(..., runs_root="runs")`` and the training commands write, relative to the working folder.
LOCAL_RUNS = Path("runs")


def bundled_runs_root() -> Path:
    """The small demo runs shipped with the package (``sample_runs/`` in the repository)."""
    return Path(toolkit.__file__).resolve().parent.parent / "sample_runs"


@dataclass(frozen=True)
class RunsRoot:
    """A runs root and why it was chosen, in words a page or a command can show."""

    path: Path
    reason: str


def resolve_runs_root(explicit: Optional[PathLike] = None) -> RunsRoot:
    """The runs root every entry point uses (the CLI, ``streamlit run app``, ``gradnorm app``).

    In order: ``explicit`` (``--root``), then ``$GRADNORM_RUNS_ROOT``, then ``./runs`` when it exists, then
    the bundled sample runs. The first two are returned even when they do not exist, so the caller can say
    so instead of silently showing something else.
    """
    if explicit is not None and str(explicit) != "":
        return RunsRoot(Path(explicit), "given with --root")
    configured = os.environ.get(RUNS_ROOT_ENV)
    if configured:
        return RunsRoot(Path(configured), f"from ${RUNS_ROOT_ENV}")
    if LOCAL_RUNS.is_dir():
        return RunsRoot(LOCAL_RUNS.resolve(), "./runs in the working folder")
    return RunsRoot(bundled_runs_root(), f"the bundled sample runs (no --root, no ${RUNS_ROOT_ENV}, no ./runs here)")


def default_runs_root() -> Path:
    """The root :func:`resolve_runs_root` picks when none is given."""
    return resolve_runs_root().path


@dataclass(frozen=True)
class PartInfo:
    path: str
    rows: int
    first_step: Optional[int]
    last_step: Optional[int]
    columns: tuple[str, ...]
    first_wall_time: Optional[float] = None
    last_wall_time: Optional[float] = None


@dataclass
class RunFiles:
    """One run's directory, its run.json (or the reason it is unusable) and its readable part files."""

    run_id: str
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    parts: list[PartInfo] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    invalid: bool = False

    @property
    def files(self) -> list[str]:
        return [part.path for part in self.parts]

    def range_of(self, column: str) -> tuple[Optional[float], Optional[float]]:
        """(min, max) of ``step`` or ``wall_time`` over the readable parts, from their statistics."""
        attribute = {"step": ("first_step", "last_step"), "wall_time": ("first_wall_time", "last_wall_time")}[column]
        lows = [getattr(p, attribute[0]) for p in self.parts]
        highs = [getattr(p, attribute[1]) for p in self.parts]
        if not lows or any(v is None for v in lows + highs):
            return None, None
        return min(lows), max(highs)


_cache: dict[str, tuple[int, int, Union[PartInfo, str]]] = {}
_cache_lock = threading.Lock()


def inspect_part(path: Path) -> Union[PartInfo, str]:
    """A :class:`PartInfo` for a readable part file, else a sentence saying what is wrong with it."""
    try:
        stat = path.stat()
    except OSError as exc:
        return f"{path}: cannot be read ({exc.strerror or exc})"
    key = str(path)
    with _cache_lock:
        cached = _cache.get(key)
    if cached is not None and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
        return cached[2]
    verdict = _inspect_uncached(path)
    with _cache_lock:
        _cache[key] = (stat.st_size, stat.st_mtime_ns, verdict)
    return verdict


def _inspect_uncached(path: Path) -> Union[PartInfo, str]:
    try:
        metadata = pq.ParquetFile(path).metadata
        arrow_schema = metadata.schema.to_arrow_schema()
    except Exception as exc:  # pyarrow raises several types for damaged files
        return f"{path}: damaged or partial Parquet file, left out ({type(exc).__name__}: {exc})"
    for name, is_usable in REQUIRED_COLUMNS.items():
        index = arrow_schema.get_field_index(name)
        if index < 0:
            return f"{path}: no {name!r} column, left out"
        if not is_usable(arrow_schema.field(index).type):
            return f"{path}: column {name!r} has type {arrow_schema.field(index).type}, left out"
    for name in schema.NUMERIC_COLUMNS + ("wall_time",):
        index = arrow_schema.get_field_index(name)
        if index >= 0 and not (pa.types.is_floating(arrow_schema.field(index).type) or pa.types.is_integer(arrow_schema.field(index).type)):
            return f"{path}: column {name!r} has type {arrow_schema.field(index).type}, expected a number, left out"
    first, last = _column_range(metadata, arrow_schema.get_field_index("step"))
    wall_first, wall_last = _column_range(metadata, arrow_schema.get_field_index("wall_time"))
    return PartInfo(str(path), metadata.num_rows, first, last, tuple(arrow_schema.names), wall_first, wall_last)


def _column_range(metadata: pq.FileMetaData, column: int) -> tuple[Optional[Any], Optional[Any]]:
    """Min and max of a column from the row groups' statistics (no data read); None if unknown."""
    if column < 0:
        return None, None
    lows, highs = [], []
    for group in range(metadata.num_row_groups):
        stats = metadata.row_group(group).column(column).statistics
        if stats is None or not stats.has_min_max:
            return None, None
        lows.append(stats.min)
        highs.append(stats.max)
    return (min(lows), max(highs)) if lows else (None, None)


def run_directory(root: PathLike, run_id: str) -> Path:
    """The directory of ``run_id`` under ``root``; refuses ids that would leave the root."""
    runs.validate_run_id(run_id)
    base = Path(root).resolve()
    path = (base / run_id).resolve()
    if path.parent != base:
        raise runs.RunError(f"run {run_id!r} is not a directory directly under {base}")
    return path


def load_run_files(root: PathLike, run_id: str) -> RunFiles:
    """Read one run's run.json and check its part files (never raises on damaged content)."""
    path = run_directory(root, run_id)
    run = RunFiles(run_id=run_id, path=path)
    if not path.is_dir():
        raise runs.RunError(f"no run {run_id!r} under {Path(root).resolve()} (choose the runs root with --root or ${RUNS_ROOT_ENV})")
    try:
        run.meta = runs.read_run_json(path)
    except runs.RunError as exc:
        run.invalid = True
        run.problems.append(str(exc))
    metrics = path / schema.METRICS_DIR
    if metrics.is_dir():
        for rank_dir in sorted(metrics.iterdir()):
            if not rank_dir.is_dir() or not rank_dir.name.startswith("rank="):
                continue
            for part in sorted(rank_dir.glob(f"{schema.PART_PREFIX}*{schema.PART_SUFFIX}")):
                verdict = inspect_part(part)
                if isinstance(verdict, PartInfo):
                    if verdict.rows:
                        run.parts.append(verdict)
                else:
                    run.problems.append(verdict)
    return run


def run_ids(root: PathLike) -> list[str]:
    """Names of the run directories under ``root`` (directories holding a run.json or metrics)."""
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"runs root {base} does not exist or is not a directory")
    found = []
    for entry in sorted(base.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        if (entry / schema.RUN_FILE).exists() or (entry / schema.METRICS_DIR).is_dir():
            try:
                runs.validate_run_id(entry.name)
            except runs.RunError:
                continue
            found.append(entry.name)
    return found


def list_runs(root: PathLike, now: Optional[float] = None) -> pd.DataFrame:
    """One row per run: status (a stale ``running`` run shows as ``interrupted``), balancer, tasks, size."""
    now = time.time() if now is None else now
    rows = []
    for run_id in run_ids(root):
        run = _load_or_invalid(root, run_id)
        meta = run.meta
        recorded = meta.get("balancer")
        balancer = recorded if isinstance(recorded, dict) else {}
        tasks = list(meta.get("tasks", [])) if not run.invalid else []
        last_steps = [p.last_step for p in run.parts if p.last_step is not None]
        status = INVALID if run.invalid else runs.effective_status(meta, now=now)
        found = list(run.problems)
        if status == runs.RUNNING:
            stalled = runs.stalled_ranks(run.path, now=now)
            if stalled:
                status = runs.INTERRUPTED
                found.append(f"{run_id}: rank(s) {stalled} stopped beating while rank 0 still runs")
        rows.append(
            {
                "run_id": run_id,
                "status": status,
                "balancer": str(balancer.get("name", "")),
                "mode": str(meta.get("mode", "")),
                "tasks": tasks,
                "num_tasks": len(tasks),
                "last_step": max(last_steps) if last_steps else None,
                "rows": sum(p.rows for p in run.parts),
                "created": _timestamp(meta.get("created")),
                "updated": _timestamp(meta.get("heartbeat") or meta.get("updated")),
                "problems": found,
            }
        )
    columns = ["run_id", "status", "balancer", "mode", "tasks", "num_tasks", "last_step", "rows", "created", "updated", "problems"]
    frame = pd.DataFrame(rows, columns=columns)
    frame["last_step"] = frame["last_step"].astype("Int64")
    return frame


def problems(root: PathLike) -> list[str]:
    """Every damaged or unusable file under ``root`` that the analysis leaves out."""
    found: list[str] = []
    for run_id in run_ids(root):
        found.extend(_load_or_invalid(root, run_id).problems)
    return found


def _load_or_invalid(root: PathLike, run_id: str) -> RunFiles:
    """A run that cannot be opened at all (e.g. a symlink leading out of the root) lists as invalid, with why."""
    try:
        return load_run_files(root, run_id)
    except runs.RunError as exc:
        return RunFiles(run_id=run_id, path=Path(root) / run_id, problems=[str(exc)], invalid=True)


def _timestamp(value: Any) -> Optional[pd.Timestamp]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return pd.Timestamp(value, unit="s", tz="UTC")
        except (OverflowError, ValueError):  # a hostile run.json: 1e300 or inf seconds is no time
            return None
    return None
