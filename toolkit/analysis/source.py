"""Run DuckDB queries over the part files of one or more runs.

Each query reads a common table expression ``metrics``: every row of the chosen runs with a ``run_id``
column and exactly the record format's columns, each cast to its schema type (``catalog.COLUMN_TYPES``):
a column no file of a run has reads as null, a file's own extra columns are never seen (so a stray
``run_id`` or ``rank`` column cannot shadow ours), and a row without a step, split or task is left out
(it belongs to no series). Files with the same layout are read by one ``read_parquet`` scan; layouts are
combined by name. File lists and run ids are bound as parameters, never pasted into the SQL text.

If DuckDB still trips on a file the footer check passed (a damaged data page), that file is reported and
left out, and the query runs again without it (when DuckDB's error names no file, each file is read on its
own to find the one that fails); a file that vanished under the query (a compaction
deleted what it merged) makes the run's files be listed again. Any other DuckDB error reaches the caller
as an :class:`AnalysisError`, never as DuckDB's own exception.
"""

from __future__ import annotations

import os
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import duckdb
import pandas as pd

from gradnorm.toolkit import runs, schema

from .catalog import COLUMN_TYPES, MAX_ABS_STEP, PartInfo, PathLike, RunFiles, load_run_files, remember

#: Damaged files one query leaves out before it gives up, and times it lists the runs' files again
#: because files vanished under it (each time a compaction moved on; it cannot do so for long).
MAX_RETRIES = 8
MAX_RESCANS = 64


class AnalysisError(ValueError):
    """A request the analysis cannot answer (unknown run, metric or task), with the reason."""


def resolve_runs(root: PathLike, run_ids: Iterable[str]) -> list[RunFiles]:
    """Load each requested run; unknown or unusable runs are a clear error."""
    resolved = []
    for run_id in run_ids:
        try:
            run = load_run_files(root, str(run_id))
        except runs.RunError as exc:
            raise AnalysisError(str(exc)) from None
        resolved.append(run)
    if not resolved:
        raise AnalysisError("no runs were given")
    return resolved


def check_metric(metric: str) -> str:
    if metric not in schema.NUMERIC_COLUMNS:
        raise AnalysisError(f"unknown metric {metric!r}; choose one of {', '.join(schema.NUMERIC_COLUMNS)}")
    return metric


def _column(name: str, parts: Sequence[PartInfo]) -> str:
    """The select expression of one record column over files of one layout."""
    sql_type = COLUMN_TYPES[name][2]
    if name not in parts[0].columns:
        return f'NULL::{sql_type} AS "{name}"'
    value = f'"{name}"' if name in parts[0].native else f'TRY_CAST("{name}" AS {sql_type})'
    if name == "wall_time" and any(p.first_wall_time is None for p in parts):
        value = f"CASE WHEN isfinite({value}) THEN {value} END"  # a time of inf or NaN places a row nowhere on the axis
    return f'{value} AS "{name}"'


def metrics_cte(run_list: Sequence[RunFiles], params: dict[str, Any], constants: Optional[Mapping[str, Sequence[Any]]] = None) -> Optional[str]:
    """``metrics AS (...)`` over the readable files of ``run_list``; None when no run has any rows.

    ``constants`` maps a column name to one value per run (e.g. each run's step range), added to that
    run's rows as a constant column: cheaper than joining a table of per-run values.
    """
    selects = []
    for index, run in enumerate(run_list):
        if not run.files:
            continue
        layouts: dict[str, list[PartInfo]] = {}
        for part in run.parts:
            layouts.setdefault(part.layout, []).append(part)
        scans = []
        for number, parts in enumerate(layouts.values()):
            params[f"files{index}_{number}"] = [part.path for part in parts]
            columns = ", ".join(_column(name, parts) for name in COLUMN_TYPES)
            scans.append(f"SELECT {columns} FROM read_parquet($files{index}_{number})")
        params[f"run{index}"] = run.run_id
        extra = ""
        for name, values in (constants or {}).items():
            params[f"{name}{index}"] = values[index]
            extra += f", ${name}{index} AS {name}"
        select = (
            f"SELECT $run{index}::VARCHAR AS run_id{extra}, * FROM ({' UNION ALL '.join(scans)}) "
            f"WHERE step BETWEEN {-MAX_ABS_STEP} AND {MAX_ABS_STEP} AND split IS NOT NULL AND task IS NOT NULL"
        )
        latest = _latest_attempt(run, index, params)
        if latest:
            # Of the rows left, one (split, task, step) recorded by two attempts is the later attempt's.
            select = f"SELECT * FROM ({select}{latest}) QUALIFY rank() OVER (PARTITION BY split, task, step ORDER BY COALESCE(attempt, 1) DESC) = 1"
        selects.append(select)
    if not selects:
        return None
    return "metrics AS (" + " UNION ALL BY NAME ".join(selects) + ")"


def _latest_attempt(run: RunFiles, index: int, params: dict[str, Any]) -> str:
    """The condition that leaves out rows a later attempt recorded again (a resumed run), or ''.

    Attempt n's training rows count up to the first step from which a later attempt recorded (its
    checkpoint's step): from there on the later attempt's rows win. Its validation rows count up to and
    including that step: a validation logged after the checkpoint's last training step carries the
    checkpoint's step (``log_validation``'s default) and is not logged again by the resumed process. A row
    without an attempt (schema version 1) is the first attempt's. Runs never resumed (nearly all) get no
    condition and cost nothing more.
    """
    bounds = schema.superseded_bounds(run.meta.get("attempts"))
    if not bounds:
        return ""
    cases = []
    for number, (attempt, bound) in enumerate(sorted(bounds.items())):
        params[f"attempt{index}_{number}"], params[f"bound{index}_{number}"] = attempt, bound
        cases.append(f"WHEN $attempt{index}_{number} THEN step < $bound{index}_{number} OR (split = '{schema.VALIDATION}' AND step = $bound{index}_{number})")
    return f" AND CASE COALESCE(attempt, 1) {' '.join(cases)} ELSE TRUE END"


_database: Optional[duckdb.DuckDBPyConnection] = None
_database_pid = 0
_database_lock = threading.Lock()


def _cursor() -> duckdb.DuckDBPyConnection:
    """A fresh connection to one in-memory database per process (opening a database costs ~80 ms, a
    cursor well under one); nothing is stored in it, every query brings its own files."""
    global _database, _database_pid
    with _database_lock:
        if _database is None or _database_pid != os.getpid():  # never share a database across a fork
            _database, _database_pid = duckdb.connect(), os.getpid()
        return _database.cursor()


_reads_open = 0
_last_read_ended = 0.0
_activity_lock = threading.Lock()


@contextmanager
def reading() -> Iterator[None]:
    """Marks the process's reads in progress (one query, or a reader's burst of them, such as an app page
    being drawn), so that background work (toolkit/analysis/partials.py) waits until they have ended."""
    global _reads_open, _last_read_ended
    with _activity_lock:
        _reads_open += 1
    try:
        yield
    finally:
        with _activity_lock:
            _reads_open -= 1
            _last_read_ended = time.monotonic()


def seconds_since_last_read() -> float:
    """0 while a read runs, else the seconds since the last one ended (background work yields until
    this is long enough: toolkit/analysis/partials.py)."""
    with _activity_lock:
        return 0.0 if _reads_open else time.monotonic() - _last_read_ended


def query(
    run_list: Sequence[RunFiles],
    body: str,
    params: Optional[Mapping[str, Any]] = None,
    columns: Sequence[str] = (),
    constants: Optional[Mapping[str, Sequence[Any]]] = None,
) -> pd.DataFrame:
    """Run ``WITH metrics AS (...) <body>``; an empty frame with ``columns`` when there are no rows."""
    dropped = rescans = 0
    while dropped < MAX_RETRIES and rescans < MAX_RESCANS:
        bound = dict(params or {})
        cte = metrics_cte(run_list, bound, constants)
        if cte is None:
            return pd.DataFrame(columns=list(columns))
        sql = f"WITH {cte} {body}"
        cursor = _cursor()
        try:
            with reading():
                return cursor.execute(sql, bound).df()
        except duckdb.Error as exc:
            recovered = _recover_from(run_list, exc)
            if recovered is None:
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise AnalysisError(f"the query over run(s) {', '.join(r.run_id for r in run_list)} failed: {message}") from None
            dropped, rescans = dropped + (recovered == "dropped"), rescans + (recovered == "rescanned")
        finally:
            cursor.close()
    if rescans >= MAX_RESCANS:
        raise AnalysisError(f"the part files of {[r.run_id for r in run_list]} kept vanishing under the query; try again")
    raise AnalysisError(f"too many damaged part files in {[r.run_id for r in run_list]}; see problems()")


def _recover_from(run_list: Sequence[RunFiles], error: Exception) -> Optional[str]:
    """Leave out the part file that DuckDB named in ``error`` (and remember it as unreadable): "dropped";
    or list the runs' files again if that file is gone: "rescanned"; None if it named none of ours."""
    message = str(error)
    for run in run_list:
        for part in list(run.parts):
            if part.path in message or Path(part.path).name in message and _names_file(message, part.path):
                if not os.path.lexists(part.path):
                    for each in run_list:
                        each.rescan()
                    return "rescanned"
                run.parts.remove(part)
                problem = f"{part.path}: cannot be read, left out ({message.strip().splitlines()[0] if message.strip() else type(error).__name__})"
                run.problems.append(problem)
                remember(Path(part.path), problem)
                return "dropped"
    # Some damage makes DuckDB fail without naming the file ("Variable-length int over 10 bytes"): each
    # file is then read on its own (every record column decoded) to find the one that fails.
    for run in run_list:
        for part in list(run.parts):
            if not os.path.lexists(part.path):
                for each in run_list:
                    each.rescan()
                return "rescanned"
            failure = _probe(part)
            if failure is not None:
                run.parts.remove(part)
                problem = f"{part.path}: cannot be read, left out ({failure})"
                run.problems.append(problem)
                remember(Path(part.path), problem)
                return "dropped"
    return None


def _probe(part: PartInfo) -> Optional[str]:
    """Why DuckDB cannot decode ``part``'s record columns, or None when it can."""
    columns = ", ".join(f'min("{name}")' for name in part.columns) or "count(*)"
    cursor = _cursor()
    try:
        cursor.execute(f"SELECT {columns} FROM read_parquet($file)", {"file": part.path}).fetchall()
    except duckdb.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    finally:
        cursor.close()
    return None


def _names_file(message: str, path: str) -> bool:
    return re.search(re.escape(Path(path).parent.name) + r"[/\\]" + re.escape(Path(path).name), message) is not None
