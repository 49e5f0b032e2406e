"""Run DuckDB queries over the part files of one or more runs.

Each query reads a common table expression ``metrics``: every row of the chosen runs with a ``run_id``
column. File lists and run ids are bound as parameters, never pasted into the SQL text. Runs written by
different schema versions are combined by column name (missing columns read as null). If DuckDB still
trips on a file the footer check passed (a damaged data page), that file is reported and left out, and
the query runs again without it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import duckdb
import pandas as pd

from gradnorm.toolkit import runs, schema

from .catalog import PathLike, RunFiles, load_run_files

MAX_RETRIES = 8


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


def metrics_cte(run_list: Sequence[RunFiles], params: dict[str, Any], constants: Optional[Mapping[str, Sequence[Any]]] = None) -> Optional[str]:
    """``metrics AS (...)`` over the readable files of ``run_list``; None when no run has any rows.

    ``constants`` maps a column name to one value per run (e.g. each run's step range), added to that
    run's rows as a constant column: cheaper than joining a table of per-run values.
    """
    selects = []
    for index, run in enumerate(run_list):
        if not run.files:
            continue
        params[f"run{index}"] = run.run_id
        params[f"files{index}"] = run.files
        extra = ""
        for name, values in (constants or {}).items():
            params[f"{name}{index}"] = values[index]
            extra += f", ${name}{index} AS {name}"
        selects.append(f"SELECT $run{index}::VARCHAR AS run_id{extra}, * FROM read_parquet($files{index}, union_by_name = true, hive_partitioning = true)")
    if not selects:
        return None
    return "metrics AS (" + " UNION ALL BY NAME ".join(selects) + ")"


def query(
    run_list: Sequence[RunFiles],
    body: str,
    params: Optional[Mapping[str, Any]] = None,
    columns: Sequence[str] = (),
    constants: Optional[Mapping[str, Sequence[Any]]] = None,
) -> pd.DataFrame:
    """Run ``WITH metrics AS (...) <body>``; an empty frame with ``columns`` when there are no rows."""
    for _ in range(MAX_RETRIES):
        bound = dict(params or {})
        cte = metrics_cte(run_list, bound, constants)
        if cte is None:
            return pd.DataFrame(columns=list(columns))
        sql = f"WITH {cte} {body}"
        connection = duckdb.connect()
        try:
            return connection.execute(sql, bound).df()
        except duckdb.Error as exc:
            if not _drop_file_named_in(run_list, exc):
                raise
        finally:
            connection.close()
    raise AnalysisError(f"too many damaged part files in {[r.run_id for r in run_list]}; see problems()")


def _drop_file_named_in(run_list: Sequence[RunFiles], error: Exception) -> bool:
    """Leave out the part file that DuckDB named in ``error``; False if it named none of ours."""
    message = str(error)
    for run in run_list:
        for part in list(run.parts):
            if part.path in message or Path(part.path).name in message and _names_file(message, part.path):
                run.parts.remove(part)
                run.problems.append(f"{part.path}: cannot be read, left out ({message.splitlines()[0]})")
                return True
    return False


def _names_file(message: str, path: str) -> bool:
    return re.search(re.escape(Path(path).parent.name) + r"[/\\]" + re.escape(Path(path).name), message) is not None
