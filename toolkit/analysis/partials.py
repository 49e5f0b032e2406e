"""Partial aggregates per part file, cached, so that a query over a live run scans only what is new.

A part file never changes once it exists under its name (the recorder and the compaction write a
temporary file and rename it; a compaction's merged file is a new file, with a new inode, and the
originals are deleted). The sums a query needs are therefore kept per file, keyed by (path, size,
mtime_ns, inode) as the catalog saw the file: per (split, task, block of ``BLOCK_STEPS`` steps) the
count, the first and last step and the sums (of the weights E_t[w_i] averages, paper 5.2; of the applied
weights and loss ratios; the skipped updates and the last loss ratio). A call reads the footers of the files it has not seen (the catalog's cache does that) and scans
only those files for their sums.

A window that moves with the run (the default E_t[w_i] window ends at the last step, and its 20 batches
move with it) needs exact sums between arbitrary steps. A block whose steps all fall into one batch (or
all outside the window) adds its cached sums; a block that straddles an edge is read again from its
file, only its own steps (``step BETWEEN`` a block, which DuckDB prunes to one row group by the
statistics), and its rows are bucketed by the same SQL expression as the uncached query. So a query
costs the new files, at most two blocks per edge and a sum over the cached blocks, whatever the length
of the run; the figures equal the uncached query's (the counts exactly, the sums up to the order of
floating-point addition). A run resumed by a later process (run.json ``attempts``) has rows that a later
attempt supersedes across files; it is queried without the cache.

Summing a file costs more than one query of it (ten aggregates per block against one per query), so a
long-lived reader, the app, calls :func:`fill_in_background`: a call that meets more than
``SYNC_FILL_ROWS`` rows it has not summed (a fresh process on a long run) is answered by the uncached
query at once, and those files are summed on one background thread with one DuckDB thread at a lower
priority, for the calls after it, once the process's own reads have paused (:func:`source.reading`: a
query, or an app page being drawn; the summing then runs between a live page's refreshes). A one-shot
command sums them in its first call, which its next query then reuses.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import duckdb
import numpy as np
import pandas as pd

from gradnorm.toolkit import schema

from .catalog import MAX_ABS_STEP, PartInfo, RunFiles
from .source import _column, _cursor, reading, seconds_since_last_read

#: Steps per block. The cached frame of a 1 M-step x 10-task run holds about 10,000 rows; a block read
#: again at an edge costs at most one row group of a compacted file (131,072 rows).
BLOCK_STEPS = 1024
#: Cached files at most (one entry per part file and family); past that the cache starts again.
MAX_CACHED_FILES = 50_000
#: Files of one layout read by one scan each, with their number as a constant; more share one scan.
FILES_PER_SCAN = 64
#: Set to False to answer every query without the cache (the benchmark compares the two side by side).
ENABLED = True
#: Times the cached path lists a run's files again when one vanished under it (a compaction's delete).
RESCANS = 3
#: Rows of files not summed yet that a call sums itself when filling in the background is on; past that
#: it answers with the uncached query and the files are summed in the background. A live page's rerun
#: meets the few files written since the last one (5 s at 2,000 steps/s x 10 tasks: 100,000 rows).
SYNC_FILL_ROWS = 500_000
#: The background thread's niceness above the process's (Linux: per thread), so the page's own queries go first.
BACKGROUND_NICENESS = 10
#: The background summing starts once the process's own reads (queries, app pages: ``source.reading``)
#: have been idle this long, so that it runs between a page's refreshes and not during its first view; or
#: after ``BACKGROUND_MAX_DEFER`` seconds whatever the reads do.
BACKGROUND_QUIET_SECONDS = 0.5
BACKGROUND_MAX_DEFER = 30.0

_W = "coalesce(balancer_weight, weight)"
_PRESENT = "coalesce(present, TRUE)"


@dataclass(frozen=True)
class Family:
    """Sums kept per (file, split, task, block): output name -> SQL aggregate over ``metrics`` rows."""

    name: str
    columns: tuple[str, ...]  # the record columns the aggregates read (besides step, split and task)
    aggregates: tuple[tuple[str, str], ...]


_WEIGHTS = (
    ("wn", f"count({_W}) FILTER (WHERE {_PRESENT})"),
    ("ws", f"sum({_W}) FILTER (WHERE {_PRESENT})"),
    ("wss", f"sum({_W} * {_W}) FILTER (WHERE {_PRESENT})"),
)
_SUMMARY = (("an", "count(weight)"), ("asum", "sum(weight)"), ("rn", "count(loss_ratio)"), ("rs", "sum(loss_ratio)"))
_BALANCE = (
    ("skipped", "count(*) FILTER (WHERE step_update_skipped)"),
    ("rstep", "max(step) FILTER (WHERE loss_ratio IS NOT NULL)"),
    ("rlast", "arg_max(loss_ratio, step) FILTER (WHERE loss_ratio IS NOT NULL)"),
)
#: The sums E_t[w_i] (WEIGHTS), the summary's per-task figures (SUMMARY) and the balance summary (BALANCE)
#: need, computed together: the app's first view asks for two of them, and one scan of the five columns
#: they read costs about half of two scans.
ALL = Family("blocks", ("balancer_weight", "weight", "present", "loss_ratio", "step_update_skipped"), _WEIGHTS + _SUMMARY + _BALANCE)
WEIGHTS = SUMMARY = BALANCE = ALL
#: Bucket numbers of steps before and after every bucket (``split_blocks``).
BEFORE, AFTER = -1, 2**62
KEY_COLUMNS = ["file", "split", "task", "block", "rows", "lo", "hi"]

#: (path, family) -> ((size, mtime_ns, inode, BLOCK_STEPS), the file's sums, the rows its footer counts)
_cache: dict[tuple[str, str], tuple[tuple[int, ...], pd.DataFrame, int]] = {}
_lock = threading.Lock()
_background = False
_executor: Optional[ThreadPoolExecutor] = None
_filling: dict[tuple[str, str], tuple[int, ...]] = {}  # (path, family) -> key, of the files being summed
_background_database: Optional[duckdb.DuckDBPyConnection] = None


class Uncacheable(Exception):
    """The run cannot be answered from partial aggregates (it was resumed, or files kept vanishing)."""


def usable(run: RunFiles) -> bool:
    """Whether ``run`` may be answered from the cache: enabled, and no attempt supersedes another's rows."""
    return ENABLED and not schema.superseded_bounds(run.meta.get("attempts"))


def _select(parts: Sequence[PartInfo], names: Sequence[str], extra: str = "") -> str:
    """The select list of ``names`` over files of one layout, cast as ``source.metrics_cte`` casts."""
    return ", ".join([*(_column(name, parts) for name in names), *([extra] if extra else [])])


def _file_column(parts: Sequence[PartInfo]) -> str:
    """A name for DuckDB's file-name column that none of the files has as a column of its own."""
    taken = {line.split(":", 1)[0].strip().lower() for part in parts for line in part.layout.splitlines()}
    name = "gradnorm_file"
    while name in taken:
        name += "_"
    return name


_VALID = f"step BETWEEN {-MAX_ABS_STEP} AND {MAX_ABS_STEP} AND split IS NOT NULL AND task IS NOT NULL"


def _compute(parts: Sequence[PartInfo], family: Family, cursor: Any = None) -> dict[str, pd.DataFrame]:
    """The family's per-block sums of each of ``parts`` (one scan per layout), by path."""
    layouts: dict[str, list[PartInfo]] = {}
    for part in parts:
        layouts.setdefault(part.layout, []).append(part)
    params: dict[str, Any] = {}
    scans = []
    names = ("step", "split", "task", *family.columns)
    numbered = 0
    for number, group in enumerate(layouts.values()):
        if len(group) <= FILES_PER_SCAN:
            # One scan per file with its number as a constant: grouping by it costs a fifth less than by
            # DuckDB's file-name column.
            for part in group:
                params[f"file{numbered}"] = part.path
                scans.append(f"SELECT {_select([part], names, f'$file{numbered} AS file')} FROM read_parquet($file{numbered})")
                numbered += 1
            continue
        column = _file_column(group)
        params[f"files{number}"] = [part.path for part in group]
        file_name = f'"{column}" AS file'
        scans.append(f"SELECT {_select(group, names, file_name)} FROM read_parquet($files{number}, filename = '{column}')")
    aggregates = ", ".join(f"{sql} AS {name}" for name, sql in family.aggregates)
    sql = (
        f"WITH metrics AS (SELECT * FROM ({' UNION ALL '.join(scans)}) WHERE {_VALID}) "
        f"SELECT file, split, task, floor(step / {BLOCK_STEPS})::BIGINT AS block, count(*) AS rows, min(step) AS lo, max(step) AS hi, "
        f"{aggregates} FROM metrics GROUP BY file, split, task, block"
    )
    frame = _run(sql, params, cursor)
    found = {str(path): group.drop(columns="file").reset_index(drop=True) for path, group in frame.groupby("file", sort=False)}
    empty = frame.iloc[0:0].drop(columns="file")
    return {part.path: found.get(part.path, empty) for part in parts}


def _run(sql: str, params: Mapping[str, Any], opened: Any = None) -> pd.DataFrame:
    cursor = opened() if opened is not None else _cursor()
    try:
        # A scan on a cursor of its own is the background summing's, not a read it should wait for.
        with reading() if opened is None else nullcontext():
            return cursor.execute(sql, dict(params)).df()
    finally:
        cursor.close()


def block_sums(run: RunFiles, family: Family) -> pd.DataFrame:
    """Every readable file's cached sums of ``family``, one frame (``file`` = the index in ``run.parts``)."""
    parts = list(run.parts)
    frames: list[Optional[pd.DataFrame]] = []
    missing = []
    with _lock:
        for part in parts:
            entry = _cache.get((part.path, family.name))
            if entry is not None and entry[0] == (*part.key, BLOCK_STEPS) and part.key != (0, 0, 0):
                frames.append(entry[1])
            else:
                frames.append(None)
                missing.append(part)
    if missing:
        # A compaction's merged file holds exactly the rows of the files it replaced: its sums are theirs.
        tiles = _cached_tiles(family)
        composed = {part.path: frame for part in missing if (frame := _composed(part, family, tiles)) is not None}
        if composed:
            _store([part for part in missing if part.path in composed], family, composed)
            frames = [composed.get(part.path) if frame is None else frame for part, frame in zip(parts, frames)]
            missing = [part for part in missing if part.path not in composed]
    if missing and _background and sum(part.rows for part in missing) > SYNC_FILL_ROWS:
        _fill_later(missing, family)
        raise Uncacheable(f"the per-file sums of {len(missing)} file(s) of {run.run_id!r} are being computed in the background")
    if missing:
        computed = _compute(missing, family)
        _store(missing, family, computed)
        frames = [computed[part.path] if frame is None else frame for part, frame in zip(parts, frames)]
    _forget_replaced(run, parts, family)
    pieces = [frame.assign(file=index) for index, frame in enumerate(frames) if frame is not None and len(frame)]
    if not pieces:
        return pd.DataFrame(columns=KEY_COLUMNS + [name for name, _ in family.aggregates])
    return pd.concat(pieces, ignore_index=True)


def _store(parts: Sequence[PartInfo], family: Family, computed: Mapping[str, pd.DataFrame]) -> None:
    with _lock:
        if len(_cache) + len(computed) > MAX_CACHED_FILES:
            _cache.clear()
        for part in parts:
            _cache[(part.path, family.name)] = ((*part.key, BLOCK_STEPS), computed[part.path], part.rows)


# -- a merged file's sums from the files it replaced ------------------------------------------------------
#: How each per-block figure of the family combines over files: a count or a sum adds (a sum only over the
#: files with rows for it, NULL where none has), the first and last step take the min and max, and the last
#: loss ratio is the one at the largest of the files' last steps.
_COMBINE: dict[str, tuple[str, Optional[str]]] = {
    "rows": ("count", None),
    "lo": ("min", None),
    "hi": ("max", None),
    "wn": ("count", None),
    "ws": ("sum", "wn"),
    "wss": ("sum", "wn"),
    "an": ("count", None),
    "asum": ("sum", "an"),
    "rn": ("count", None),
    "rs": ("sum", "rn"),
    "skipped": ("count", None),
    "rstep": ("max", None),
    "rlast": ("at_max", "rstep"),
}


#: folder -> first sequence -> (last sequence, sums, footer rows, path) of each cached file of one family
_Tiles = dict[str, dict[int, list[tuple[int, pd.DataFrame, int, str]]]]


def _cached_tiles(family: Family) -> _Tiles:
    """The family's cached files by folder and by the first sequence their names cover (one pass over
    the cache for every file a call composes)."""
    tiles: _Tiles = {}
    with _lock:
        for (path, family_name), (key, frame, rows) in _cache.items():
            found = schema.part_file_range(Path(path).name)
            if family_name == family.name and key[-1] == BLOCK_STEPS and found is not None:
                tiles.setdefault(str(Path(path).parent), {}).setdefault(found[0], []).append((found[1], frame, rows, path))
    return tiles


def _composed(part: PartInfo, family: Family, cached: _Tiles) -> Optional[pd.DataFrame]:
    """The sums of ``part`` from the cached sums of files its name's sequence range covers, when they tile
    that range and hold its footer's row count (a compaction merges whole adjacent files, rows unchanged:
    toolkit/recorder.py ``merge_part_files``); None otherwise (it is then read)."""
    covering = schema.part_file_range(Path(part.path).name)
    names = [name for name, _ in family.aggregates]
    if covering is None or covering[0] == covering[1] or part.key == (0, 0, 0) or set(names) - _COMBINE.keys():
        return None
    by_first = cached.get(str(Path(part.path).parent), {})
    inner = {
        first: [(last, frame, rows) for last, frame, rows, path in entries if last <= covering[1] and path != part.path]
        for first, entries in by_first.items()
        if covering[0] <= first <= covering[1]
    }
    inner = {first: entries for first, entries in inner.items() if entries}
    tiles: list[tuple[pd.DataFrame, int]] = []
    cursor = covering[0]
    while cursor <= covering[1]:
        if cursor not in inner:
            return None
        last, frame, rows = max(inner[cursor], key=lambda entry: entry[0])
        tiles.append((frame, rows))
        cursor = last + 1
    if sum(rows for _, rows in tiles) != part.rows:
        return None
    frames = [frame for frame, _ in tiles if len(frame)]
    if not frames:
        return tiles[0][0].iloc[0:0].copy()
    combined = _combine(frames, ["split", "task", "block"], names)
    if part.first_step is not None and part.last_step is not None and not combined.empty:
        if (int(combined["lo"].min()), int(combined["hi"].max())) != (part.first_step, part.last_step):
            return None  # the footer's steps are not the tiles': read the file
    return combined


def _combine(frames: Sequence[pd.DataFrame], keys: list[str], names: Sequence[str]) -> pd.DataFrame:
    both = pd.concat(frames, ignore_index=True)
    codes, uniques = pd.MultiIndex.from_frame(both[keys]).factorize()
    result = pd.MultiIndex.from_tuples(list(uniques), names=keys).to_frame(index=False)
    groups = len(uniques)
    for column in ["rows", "lo", "hi", *names]:
        rule, count = _COMBINE[column]
        values = both[column].to_numpy(dtype=np.float64, na_value=np.nan)
        if rule == "count":
            combined: Any = np.bincount(codes, weights=values, minlength=groups).astype(np.int64)
        elif rule == "sum":
            assert count is not None
            has = both[count].to_numpy(dtype=np.float64) > 0
            # NaN or infinity in a file's sum stays in the total, as SQL's sum keeps it.
            combined = np.bincount(codes, weights=np.where(has, values, 0.0), minlength=groups)
            combined = np.where(np.bincount(codes, weights=has.astype(np.float64), minlength=groups) > 0, combined, np.nan)
        elif rule in ("min", "max"):
            by_code = pd.Series(values).groupby(codes)
            combined = (by_code.min() if rule == "min" else by_code.max()).reindex(range(groups)).to_numpy()
        else:  # at_max: the value at the largest ``count`` column
            assert count is not None
            at = pd.DataFrame({"code": codes, "at": both[count].to_numpy(dtype=np.float64, na_value=np.nan), "value": values}).dropna(subset=["at"])
            chosen = at.loc[at.groupby("code")["at"].idxmax()] if len(at) else at
            combined = np.full(groups, np.nan)
            combined[chosen["code"].to_numpy(dtype=np.int64)] = chosen["value"].to_numpy()
        result[column] = _like(combined, both[column].dtype)
    return result


def _like(values: np.ndarray, dtype: Any) -> Any:
    """``values`` in the dtype the scanned frames have for that column, where it holds them (no NULL)."""
    try:
        if pd.api.types.is_integer_dtype(dtype) and not np.isnan(np.asarray(values, dtype=np.float64)).any():
            return np.asarray(values).astype(dtype)
        return pd.array(values, dtype=dtype) if pd.api.types.is_extension_array_dtype(dtype) else np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        return values


# -- summing in the background (a long-lived reader) --------------------------------------------------
def fill_in_background(enabled: bool = True) -> None:
    """Sum large sets of files not seen yet on a background thread, answering meanwhile with the uncached
    query (see the module's docstring). For a process that queries the same runs again and again (the
    app); off by default, as a one-shot command is better served by summing in its first call."""
    global _background
    _background = enabled


def wait_for_background(timeout: float = 60.0) -> bool:
    """Wait until the background summing queued so far has run; False if that took longer than ``timeout``."""
    with _lock:
        executor = _executor
    if executor is None:
        return True
    try:
        # One worker: a task submitted now runs after every task queued before it.
        executor.submit(lambda: None).result(timeout=timeout)
    except FutureTimeout:
        return False
    return True


def _fill_later(parts: Sequence[PartInfo], family: Family) -> None:
    global _executor
    with _lock:
        todo = [part for part in parts if _filling.get((part.path, family.name)) != part.key]
        if not todo:
            return
        for part in todo:
            _filling[(part.path, family.name)] = part.key
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradnorm-partials")
        executor = _executor
    executor.submit(_fill, todo, family)


def _fill(parts: Sequence[PartInfo], family: Family) -> None:
    _lower_this_threads_priority()
    _wait_for_quiet()
    try:
        _store(parts, family, _compute(parts, family, _background_cursor))
    except (duckdb.Error, OSError):
        pass  # a file merged away meanwhile, or damaged: the next call sums what is there, or the uncached query reports it
    finally:
        with _lock:
            for part in parts:
                if _filling.get((part.path, family.name)) == part.key:
                    del _filling[(part.path, family.name)]


def _wait_for_quiet() -> None:
    deadline = time.monotonic() + BACKGROUND_MAX_DEFER
    while time.monotonic() < deadline:
        idle = seconds_since_last_read()
        if idle >= BACKGROUND_QUIET_SECONDS:
            return
        time.sleep(max(0.02, BACKGROUND_QUIET_SECONDS - idle))


def _background_cursor() -> duckdb.DuckDBPyConnection:
    """A cursor of a second in-memory database with one thread: DuckDB then runs the query on the calling
    thread (the background one, whose priority is lowered) instead of its worker pool, which the page's
    queries use."""
    global _background_database
    with _lock:
        if _background_database is None:
            _background_database = duckdb.connect(config={"threads": 1})
        return _background_database.cursor()


def _lower_this_threads_priority() -> None:
    if not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return
    try:
        # On Linux a thread id names that thread alone to setpriority; elsewhere this may be the process,
        # which is why it is tried only where PRIO_PROCESS with a thread id is per thread.
        if os.uname().sysname == "Linux":
            current = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), current + BACKGROUND_NICENESS)
    except OSError:
        pass


def _forget_replaced(run: RunFiles, parts: Sequence[PartInfo], family: Family) -> None:
    """Drop the entries of files of ``run``'s rank folders that are no longer among its live files
    (merged away by a compaction): they are never asked for again."""
    live = {part.path for part in parts}
    folders = {str(Path(part.path).parent) for part in parts}
    with _lock:
        stale = [key for key in _cache if key[1] == family.name and key[0] not in live and str(Path(key[0]).parent) in folders]
        for key in stale:
            del _cache[key]


def with_rescans(run: RunFiles, compute: Any) -> Any:
    """``compute()``; when a file vanished under it (a compaction deleted what it merged) the run's files
    are listed again and it runs again; :class:`Uncacheable` if that keeps happening or DuckDB fails
    otherwise (the caller then asks the uncached query, which reports and leaves out damaged files)."""
    for _ in range(RESCANS):
        try:
            return compute()
        except duckdb.Error as exc:
            if not any(not Path(part.path).exists() for part in run.parts):
                raise Uncacheable(str(exc)) from None
            run.rescan()
    raise Uncacheable(f"the part files of {run.run_id!r} kept vanishing")


# -- splitting blocks at edges ---------------------------------------------------------------------------
def train_blocks(sums: pd.DataFrame) -> pd.DataFrame:
    return sums[sums["split"] == schema.TRAIN]


def split_blocks(sums: pd.DataFrame, bucket: Any) -> tuple[pd.DataFrame, list[tuple[int, int, int]]]:
    """The rows of ``sums`` whose (file, block) lies in one bucket, with that bucket in ``bucket``; and
    the (file, first step, last step) of the blocks that straddle an edge (to be read again).

    ``bucket(steps)`` maps an array of steps to bucket numbers, non-decreasing in the step: ``BEFORE``
    for a step before every bucket, ``AFTER`` for one after them all. A block lies in one bucket when its
    first and last step map to the same number; it is left out when that number is BEFORE or AFTER.
    """
    if sums.empty:
        return sums.assign(bucket=pd.Series(dtype="int64")), []
    extent = sums.groupby(["file", "block"], sort=False).agg(lo=("lo", "min"), hi=("hi", "max"))
    low = bucket(extent["lo"].to_numpy(dtype=np.int64))
    high = bucket(extent["hi"].to_numpy(dtype=np.int64))
    whole = low == high
    keep = pd.Series(low, index=extent.index)[whole & (low != BEFORE) & (low != AFTER)]
    straddling = extent[~whole]
    edges = [(int(f), int(b) * BLOCK_STEPS, int(b) * BLOCK_STEPS + BLOCK_STEPS - 1) for f, b in straddling.index]
    inside = sums.join(keep.rename("bucket"), on=["file", "block"], how="inner")
    return inside, edges


def edge_cte(run: RunFiles, edges: Sequence[tuple[int, int, int]], names: Sequence[str], params: dict[str, Any]) -> Optional[str]:
    """``metrics AS (...)`` over the rows of the straddling blocks only: one scan of each block's file,
    filtered to the block's steps; the rows and casts of ``source.metrics_cte``. None when no block."""
    if not edges:
        return None
    scans = []
    for number, (file, low, high) in enumerate(edges):
        part = run.parts[file]
        params[f"edge{number}"], params[f"low{number}"], params[f"high{number}"] = part.path, low, high
        scans.append(f"SELECT {_select([part], names)} FROM read_parquet($edge{number}) WHERE step BETWEEN $low{number} AND $high{number}")
    return f"metrics AS (SELECT * FROM ({' UNION ALL '.join(scans)}) WHERE {_VALID})"


def edge_query(run: RunFiles, edges: Sequence[tuple[int, int, int]], names: Sequence[str], body: str, params: Mapping[str, Any]) -> pd.DataFrame:
    """``WITH metrics AS (the straddling blocks' rows) <body>``; None-safe: an empty frame when no block."""
    bound = dict(params)
    cte = edge_cte(run, edges, names, bound)
    if cte is None:
        return pd.DataFrame()
    return _run(f"WITH {cte} {body}", bound)


def batch_of(start: int, end: int, batches: int) -> Any:
    """The weights query's batch of each step in [start, end] (as its SQL computes it); BEFORE, AFTER outside."""
    span = float(end - start + 1)

    def bucket(steps: np.ndarray) -> np.ndarray:
        # float((step - start) * batches) / span: the division DuckDB makes of the BIGINT product
        numbers = np.floor(((steps - start) * batches).astype(np.float64) / span)
        numbers = np.minimum(numbers, batches - 1).astype(np.int64)
        return np.where(steps < start, BEFORE, np.where(steps > end, AFTER, numbers))

    return bucket


def step_range(sums: pd.DataFrame) -> Optional[tuple[int, int]]:
    """First and last training step, from the cached blocks; None when there are no training rows."""
    train = train_blocks(sums)
    if train.empty:
        return None
    return int(train["lo"].min()), int(train["hi"].max())


def group_sums(frame: pd.DataFrame, keys: Sequence[str], columns: Mapping[str, tuple[str, str]]) -> pd.DataFrame:
    """Per distinct ``keys``: ``output = sum of value`` for each ``output: (value, count)``, adding only
    the rows whose ``count`` is positive (a block without such rows holds NULL, not a sum), and keeping a
    NaN or an infinity as the SQL sum keeps it."""
    if frame.empty:
        return pd.DataFrame(columns=[*keys, *columns])
    codes, uniques = pd.MultiIndex.from_frame(frame[list(keys)]).factorize()
    result = pd.MultiIndex.from_tuples(list(uniques), names=list(keys)).to_frame(index=False) if len(uniques) else pd.DataFrame(columns=list(keys))
    for output, (value, count) in columns.items():
        values = frame[value].to_numpy(dtype=np.float64)
        values = np.where(frame[count].to_numpy() > 0, values, 0.0)
        result[output] = np.bincount(codes, weights=values, minlength=len(uniques))
    return result
