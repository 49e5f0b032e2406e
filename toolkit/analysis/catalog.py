"""Find the runs under a runs root and the part files that are safe to read.

DuckDB's ``read_parquet`` fails the whole query on one damaged file, so every part file is checked first
from its Parquet footer (a file cut short has none) and its schema: every column the record format names
must have a type the query can cast to the schema's (``step`` an integer, ``split``/``task`` text, the
metrics numbers, the update flag a boolean or a number) and ``step`` must lie within +-2**53, where a
double holds it exactly (the analysis buckets steps in floating point). The verdict is cached by (path,
size, mtime, inode), so a live run costs only its new files.

Of each rank folder only the files :func:`schema.live_part_files` names are read: a file whose sequence
range lies inside a compacted file's is counted there (both exist between the compaction's rename and its
delete), one that overlaps another partially is left out and reported. A damaged compacted file gives way
to the originals it replaced while they are still there.

Nothing but regular files inside the root is opened: run ids are validated and must resolve directly under
the root; inside a run, symbolic links (``run.json``, ``metrics/``, ``rank=N/``, part files) are refused
and reported, as are FIFOs, sockets and devices, which a reader opening them would wait on forever; JSON
files are read up to a size and a nesting depth. A run whose ``run.json`` is unusable is listed as invalid
with the reason; it never stops the listing of the others.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gradnorm import toolkit
from gradnorm.toolkit import runs, schema

PathLike = Union[str, os.PathLike]

RUNS_ROOT_ENV = "GRADNORM_RUNS_ROOT"
INVALID = "invalid"
#: ``list_runs()``'s status of a finished run whose recorder could not write some of its rows.
FINISHED_ROWS_LOST = "finished, rows lost"

#: Bounds on what one file may cost a reader. A run.json holds the run's settings and the user's config
#: (a few kB); rank.json a rank's status and counts.
MAX_RUN_JSON_BYTES = 8 << 20
MAX_RANK_JSON_BYTES = 1 << 20
MAX_JSON_DEPTH = 64
#: A part file's footer (the recorder's are a few kB) and its number of columns.
MAX_FOOTER_BYTES = 64 << 20
MAX_COLUMNS = 4096
#: Steps must be exact as doubles: the series and the weight window bucket them in floating point.
MAX_ABS_STEP = 2**53
#: Inspection verdicts kept at most (one per part file seen); past that the cache starts again.
MAX_CACHED_VERDICTS = 200_000


def _text_type(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))


def _integer_type(kind: pa.DataType) -> bool:
    return bool(pa.types.is_integer(kind))


def _number_type(kind: pa.DataType) -> bool:
    return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind))


def _flag_type(kind: pa.DataType) -> bool:
    return bool(pa.types.is_boolean(kind) or _number_type(kind))


#: Each column of the record format: the Arrow types a part file may store it as, in words for the reason
#: a file is left out, and the SQL type the queries read it as (``source.metrics_cte`` casts to it).
COLUMN_TYPES: dict[str, tuple[Callable[[pa.DataType], bool], str, str]] = {
    "step": (_integer_type, "an integer", "BIGINT"),
    "epoch": (lambda t: _integer_type(t) or pa.types.is_null(t), "an integer", "BIGINT"),
    "wall_time": (_number_type, "a number", "DOUBLE"),
    "split": (_text_type, "text", "VARCHAR"),
    "task": (_text_type, "text", "VARCHAR"),
    **{name: (_number_type, "a number", "DOUBLE") for name in schema.TASK_METRICS + ("step_grad_loss",)},
    "step_update_skipped": (_flag_type, "a flag (boolean or number)", "BOOLEAN"),
    **{name: (_flag_type, "a flag (boolean or number)", "BOOLEAN") for name in schema.FLAG_FIELDS},
    "attempt": (_integer_type, "an integer", "BIGINT"),
}
REQUIRED_COLUMNS = ("step", "split", "task")
#: The Arrow type DuckDB reads as each SQL type without a conversion.
NATIVE_TYPES = {"BIGINT": pa.int64(), "DOUBLE": pa.float64(), "VARCHAR": pa.string(), "BOOLEAN": pa.bool_()}


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
    columns: tuple[str, ...]  # the record format's columns this file has (lower case, as DuckDB matches them)
    first_wall_time: Optional[float] = None
    last_wall_time: Optional[float] = None
    layout: str = ""  # the file's full Arrow schema: files with the same layout are read by one scan
    native: tuple[str, ...] = ()  # the columns stored as their SQL type already (read without a cast)
    key: tuple[int, int, int] = (0, 0, 0)  # (size, mtime_ns, inode) when inspected: what partials.py caches by


@dataclass
class RunFiles:
    """One run's directory, its run.json (or the reason it is unusable) and its readable part files."""

    run_id: str
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    parts: list[PartInfo] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    invalid: bool = False
    ranks: dict[int, dict[str, Any]] = field(default_factory=dict)  # rank.json of ranks other than 0
    meta_problems: list[str] = field(default_factory=list)  # what is wrong with run.json

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

    def rescan(self) -> None:
        """Look at the part files again (after files changed under a query: a compaction renamed and deleted)."""
        self.parts, self.problems, self.ranks = [], list(self.meta_problems), {}
        _scan_metrics(self)


# -- opening files -----------------------------------------------------------------------------------
class NotRegular(OSError):
    """A path that is a link, a FIFO, a folder or a device where a regular file was expected."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.reason = reason


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def _refusal_reason(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link, not followed (nothing but a run's own files is read)"
    kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    return f"not a regular file ({kind}), not opened"


def refusal(path: Path, mode: int) -> str:
    """Why ``path`` is not opened, for a problems list."""
    return f"{path}: {_refusal_reason(mode)}, left out"


def open_regular(path: Path) -> tuple[int, os.stat_result]:
    """A read-only descriptor of ``path`` and its status, if it is a regular file; else :class:`NotRegular`.

    The status is taken without following a link before anything is opened (opening a FIFO waits for a
    writer), the open refuses a link that replaced the file meanwhile, and the opened file must be the one
    looked at. A live run's recorder replaces ``run.json`` atomically at every heartbeat, so a file that
    was replaced between the look and the open by another regular file is looked at again, up to
    ``_REPLACED_RETRIES`` times, rather than reported as a bad run."""
    for _ in range(_REPLACED_RETRIES):
        before = os.lstat(path)
        if not stat.S_ISREG(before.st_mode):
            raise NotRegular(path, _refusal_reason(before.st_mode))
        fd = os.open(path, _OPEN_FLAGS)
        try:
            after = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if stat.S_ISREG(after.st_mode) and (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino):
            return fd, after
        os.close(fd)
        if not stat.S_ISREG(after.st_mode):
            raise NotRegular(path, "replaced while it was opened, now " + _refusal_reason(after.st_mode))
    raise NotRegular(path, f"replaced while it was opened, {_REPLACED_RETRIES} times in a row")


# A writer replaces run.json once per heartbeat (seconds apart); three looks in a row that each lose
# that race mean the file is being swapped on purpose.
_REPLACED_RETRIES = 3


def read_json_file(path: Path, limit: int, what: str) -> Any:
    """The JSON value in ``path``: a regular file of at most ``limit`` bytes, nested at most
    ``MAX_JSON_DEPTH`` levels; a :class:`runs.RunError` saying what is wrong otherwise."""
    try:
        fd, info = open_regular(path)
    except FileNotFoundError:
        raise runs.RunError(f"{path} does not exist: {path.parent.name!r} is not a run directory") from None
    except NotRegular as exc:
        raise runs.RunError(f"{path}: {exc.reason}, so not {what}") from None
    except OSError as exc:
        raise runs.RunError(f"{path} cannot be read ({exc.strerror or exc})") from None
    try:
        if info.st_size > limit:
            raise runs.RunError(f"{path} is larger than {limit} bytes ({info.st_size}), so not {what}")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise runs.RunError(f"{path} cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise runs.RunError(f"{path} is larger than {limit} bytes, so not {what}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise runs.RunError(f"{path} is not valid UTF-8 text (byte {exc.start}), so not {what}") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise runs.RunError(f"{path} is nested deeper than {MAX_JSON_DEPTH} levels, so not {what}") from None
    except json.JSONDecodeError as exc:
        raise runs.RunError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}), so not {what}") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise runs.RunError(f"{path} is not valid JSON ({str(exc)[:200]}), so not {what}") from None
    if _deeper_than(value, MAX_JSON_DEPTH):
        raise runs.RunError(f"{path} is nested deeper than {MAX_JSON_DEPTH} levels, so not {what}")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists and objects more than ``limit`` levels (without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def read_run_meta(path: Path) -> dict[str, Any]:
    """A run's ``run.json``, checked as :func:`runs.read_run_json` checks it, read as :func:`read_json_file` reads."""
    file = path / schema.RUN_FILE
    meta = read_json_file(file, MAX_RUN_JSON_BYTES, "a run.json")
    if not isinstance(meta, dict):
        raise runs.RunError(f"{file} must hold a JSON object, found {type(meta).__name__}")
    tasks = meta.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise runs.RunError(f"{file} lacks a 'tasks' list of names")
    status = meta.get("status")
    if not isinstance(status, str) or status not in runs.STATUSES:
        raise runs.RunError(f"{file} has status {_short(status)}; expected one of {runs.STATUSES}")
    return meta


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# -- part files ------------------------------------------------------------------------------------
_cache: dict[str, tuple[tuple[int, int, int], Union[PartInfo, str]]] = {}
_cache_lock = threading.Lock()


def _key(info: os.stat_result) -> tuple[int, int, int]:
    return (info.st_size, info.st_mtime_ns, info.st_ino)


def inspect_part(path: Path) -> Union[PartInfo, str]:
    """A :class:`PartInfo` for a readable part file, else a sentence saying what is wrong with it."""
    try:
        info = os.lstat(path)
    except OSError as exc:
        return f"{path}: cannot be read ({exc.strerror or exc}), left out"
    if not stat.S_ISREG(info.st_mode):
        return refusal(path, info.st_mode)
    name = str(path)
    with _cache_lock:
        cached = _cache.get(name)
    if cached is not None and cached[0] == _key(info):
        return cached[1]
    try:
        fd, opened = open_regular(path)
    except NotRegular as exc:
        return f"{exc}, left out"
    except OSError as exc:
        return f"{path}: cannot be read ({exc.strerror or exc}), left out"
    try:
        with os.fdopen(fd, "rb", closefd=False) as handle:
            verdict = _inspect_open(path, handle, opened.st_size)
    finally:
        os.close(fd)
    if isinstance(verdict, PartInfo):
        verdict = dataclasses.replace(verdict, key=_key(opened))
    remember(path, verdict, opened)
    return verdict


def remember(path: Path, verdict: Union[PartInfo, str], info: Optional[os.stat_result] = None) -> None:
    """Cache ``verdict`` for ``path`` as it is now (a file the query could not read is remembered as such)."""
    if info is None:
        try:
            info = os.lstat(path)
        except OSError:
            return
    with _cache_lock:
        if len(_cache) >= MAX_CACHED_VERDICTS:
            _cache.clear()
        _cache[str(path)] = (_key(info), verdict)


def _inspect_open(path: Path, handle: Any, size: int) -> Union[PartInfo, str]:
    if size < 12:
        return f"{path}: damaged or partial Parquet file ({size} bytes, no footer), left out"
    try:
        handle.seek(size - 8)
        tail = handle.read(8)
        handle.seek(0)
    except OSError as exc:
        return f"{path}: cannot be read ({exc.strerror or exc}), left out"
    footer = int.from_bytes(tail[:4], "little")
    if tail[4:] != b"PAR1" or footer > size - 12:
        return f"{path}: damaged or partial Parquet file (no footer), left out"
    if footer > MAX_FOOTER_BYTES:
        return f"{path}: a Parquet footer of {footer} bytes (at most {MAX_FOOTER_BYTES}), left out"
    try:
        parquet = pq.ParquetFile(handle)
        metadata = parquet.metadata
        if metadata.num_columns > MAX_COLUMNS:
            return f"{path}: {metadata.num_columns} columns (at most {MAX_COLUMNS}), left out"
        arrow_schema = parquet.schema_arrow
    except Exception as exc:  # pyarrow raises several types for damaged files
        return f"{path}: damaged or partial Parquet file, left out ({type(exc).__name__}: {str(exc)[:300]})"
    fields: dict[str, int] = {}
    for index, column in enumerate(arrow_schema):
        lowered = column.name.lower()
        if lowered in fields:
            return f"{path}: columns {arrow_schema.field(fields[lowered]).name!r} and {column.name!r} differ only in case, left out"
        fields[lowered] = index
    for name in REQUIRED_COLUMNS:
        if name not in fields:
            return f"{path}: no {name!r} column, left out"
    for name, (usable, words, _) in COLUMN_TYPES.items():
        if name in fields:
            kind = arrow_schema.field(fields[name]).type
            if not usable(kind):
                return f"{path}: column {name!r} has type {kind}, expected {words}, left out"
    leaves = {metadata.schema.column(i).path: i for i in range(metadata.num_columns)}
    step_name = arrow_schema.field(fields["step"]).name
    wall_name = arrow_schema.field(fields["wall_time"]).name if "wall_time" in fields else ""
    try:
        first, last = _column_range(metadata, leaves.get(step_name, -1))
        if first is None and metadata.num_rows:
            first, last = _read_range(parquet, step_name)
        wall_first, wall_last = _column_range(metadata, leaves.get(wall_name, -1))
    except Exception as exc:  # statistics or a column that cannot be decoded
        return f"{path}: damaged Parquet file, left out ({type(exc).__name__}: {str(exc)[:300]})"
    for value in (first, last):
        if value is not None and abs(int(value)) > MAX_ABS_STEP:
            return f"{path}: column 'step' holds {int(value)}, out of range (steps lie within +-2**53), left out"
    finite = isinstance(wall_first, (int, float)) and isinstance(wall_last, (int, float)) and math.isfinite(wall_first) and math.isfinite(wall_last)
    return PartInfo(
        str(path),
        metadata.num_rows,
        None if first is None else int(first),
        None if last is None else int(last),
        tuple(sorted(set(fields) & set(COLUMN_TYPES))),
        float(wall_first) if finite and wall_first is not None else None,
        float(wall_last) if finite and wall_last is not None else None,
        layout=str(arrow_schema.remove_metadata()),
        native=tuple(
            sorted(name for name, index in fields.items() if name in COLUMN_TYPES and arrow_schema.field(index).type == NATIVE_TYPES[COLUMN_TYPES[name][2]])
        ),
    )


def _column_range(metadata: pq.FileMetaData, column: int) -> tuple[Optional[Any], Optional[Any]]:
    """Min and max of a (leaf) column from the row groups' statistics (no data read); None if unknown."""
    if column < 0:
        return None, None
    lows, highs = [], []
    for group in range(metadata.num_row_groups):
        chunk = metadata.row_group(group)
        if chunk.num_rows == 0:
            continue
        stats = chunk.column(column).statistics
        if stats is None or not stats.has_min_max:
            return None, None
        lows.append(stats.min)
        highs.append(stats.max)
    return (min(lows), max(highs)) if lows else (None, None)


def _read_range(parquet: pq.ParquetFile, name: str) -> tuple[Optional[int], Optional[int]]:
    """Min and max of an integer column read from the data (a file written without statistics)."""
    extremes = pc.min_max(parquet.read(columns=[name])[name])
    low, high = extremes["min"].as_py(), extremes["max"].as_py()
    return low, high


# -- run directories -------------------------------------------------------------------------------
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
        run.meta = read_run_meta(path)
    except runs.RunError as exc:
        run.invalid = True
        run.meta_problems.append(str(exc))
        run.problems.append(str(exc))
    _scan_metrics(run)
    return run


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    with os.scandir(folder) as listing:
        return sorted(listing, key=lambda entry: entry.name)


def _settled_entries(folder: Path) -> list[os.DirEntry[str]]:
    """The entries of a folder that may change while it is listed, as two listings in a row agree on.

    A listing taken while a compaction renames its merged file in and deletes the originals may miss
    both (the new name lands behind the listing's position, the old ones go before it is reached). Two
    listings in a row that agree cannot both have missed them: the merged file exists, unchanged, when
    the second one starts."""
    entries = _entries(folder)
    for _ in range(RELIST_ATTEMPTS):
        again = _entries(folder)
        if [e.name for e in again] == [e.name for e in entries]:
            return again
        entries = again
    return entries


def _scan_metrics(run: RunFiles) -> None:
    metrics = run.path / schema.METRICS_DIR
    try:
        info = os.lstat(metrics)
    except OSError:
        return
    if not stat.S_ISDIR(info.st_mode):
        run.problems.append(refusal(metrics, info.st_mode).replace(", left out", ", the run's records are left out"))
        return
    try:
        entries = _entries(metrics)
    except OSError as exc:
        run.problems.append(f"{metrics}: cannot be listed ({exc.strerror or exc}), the run's records are left out")
        return
    for entry in entries:
        if not entry.name.startswith("rank="):
            continue
        folder = Path(entry.path)
        if entry.is_symlink():
            run.problems.append(refusal(folder, stat.S_IFLNK))
            continue
        if not entry.is_dir(follow_symlinks=False):
            continue
        rank = entry.name[len("rank=") :]
        if not (rank.isascii() and rank.isdigit()):
            run.problems.append(f"{folder}: not a rank folder (rank=<number>), left out")
            continue
        _scan_rank(run, folder, int(rank))


#: Times a rank folder is listed again when files it named vanished before they were read.
RELIST_ATTEMPTS = 5


def _scan_rank(run: RunFiles, folder: Path, rank: int) -> None:
    for _ in range(RELIST_ATTEMPTS):
        found = _scan_rank_once(run, folder, rank)
        if found is not None:
            break
    else:
        found = _scan_rank_once(run, folder, rank, settle=True)
    assert found is not None
    parts, problems = found
    run.parts.extend(parts)
    run.problems.extend(problems)


def _scan_rank_once(run: RunFiles, folder: Path, rank: int, settle: bool = False) -> Optional[tuple[list[PartInfo], list[str]]]:
    """The readable live part files of one rank folder and the problems found, or None when a file listed
    vanished before it was read (a compaction deleted what it had merged: the listing is out of date)."""
    try:
        entries = _settled_entries(folder)
    except OSError as exc:
        return [], [f"{folder}: cannot be listed ({exc.strerror or exc}), left out"]
    problems: list[str] = []
    names = []
    for entry in entries:
        name = entry.name
        path = Path(entry.path)
        if name == runs.RANK_FILE and rank != 0:
            _read_rank_file(run, path, rank, problems)
            continue
        if name.startswith(".") or not (name.startswith(schema.PART_PREFIX) and name.endswith(schema.PART_SUFFIX)):
            continue  # temporaries of a writer or a compaction, locks, anything else
        try:
            mode = entry.stat(follow_symlinks=False).st_mode
        except OSError:
            if settle:
                continue
            return None  # gone since the listing (a compaction's delete): what replaced it may be missing from it
        if not stat.S_ISREG(mode):
            problems.append(refusal(path, mode))
        elif schema.part_file_range(name) is None:
            problems.append(f"{path}: not a part file name (part-NNNNNN.parquet or part-NNNNNN-NNNNNN.parquet), left out")
        else:
            names.append(name)
    verdicts: dict[str, Union[PartInfo, str]] = {}
    candidates = set(names)
    while True:
        live, overlapping = schema.live_part_files(sorted(candidates))
        for name in live:
            if name not in verdicts:
                verdicts[name] = inspect_part(folder / name)
        damaged = [name for name in live if isinstance(verdicts[name], str)]
        if not damaged:
            break
        if not settle and any(not os.path.lexists(folder / name) for name in damaged):
            return None
        candidates.difference_update(damaged)  # the files a damaged compacted file covered count again
    problems += [verdict for _, verdict in sorted(verdicts.items()) if isinstance(verdict, str)]
    problems += [f"{folder / name}: its sequences overlap another part file's partially, left out so that no row is counted twice" for name in overlapping]
    parts = [verdict for name in live if isinstance(verdict := verdicts[name], PartInfo) and verdict.rows]
    return parts, problems


def _read_rank_file(run: RunFiles, path: Path, rank: int, problems: list[str]) -> None:
    try:
        meta = read_json_file(path, MAX_RANK_JSON_BYTES, "a rank.json")
    except runs.RunError as exc:
        if os.path.lexists(path):
            problems.append(f"{exc}; ignored")
        return
    if isinstance(meta, dict):
        run.ranks[rank] = meta


def run_ids(root: PathLike) -> list[str]:
    """Names of the run directories under ``root`` (directories holding a run.json or metrics)."""
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"runs root {base} does not exist or is not a directory")
    found = []
    for entry in _entries(base):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        path = Path(entry.path)
        if os.path.lexists(path / schema.RUN_FILE) or os.path.lexists(path / schema.METRICS_DIR):
            try:
                runs.validate_run_id(entry.name)
            except runs.RunError:
                continue
            found.append(entry.name)
    return found


LISTING_COLUMNS = [
    "run_id",
    "status",
    "balancer",
    "mode",
    "tasks",
    "num_tasks",
    "last_step",
    "rows",
    "rows_lost",
    "write_errors",
    "created",
    "updated",
    "problems",
]


def list_runs(root: PathLike, now: Optional[float] = None, *, only: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """One row per run (of ``only``, when given): status (a stale ``running`` run shows as ``interrupted``,
    a finished one that lost rows as ``FINISHED_ROWS_LOST``), balancer, tasks, size, the rows the recorder
    could not write and its failed writes (from run.json and each rank's rank.json), and the problems found.
    """
    now = time.time() if now is None else now
    wanted = run_ids(root) if only is None else [str(r) for r in only]
    rows = [_listing_row(root, run_id, now) for run_id in wanted]
    frame = pd.DataFrame(rows, columns=LISTING_COLUMNS)
    for column in ("last_step", "rows_lost", "write_errors"):
        frame[column] = frame[column].astype("Int64")
    return frame


def _listing_row(root: PathLike, run_id: str, now: float) -> dict[str, Any]:
    run = _load_or_invalid(root, run_id)
    meta = run.meta
    recorded = meta.get("balancer")
    balancer = recorded if isinstance(recorded, dict) else {}
    tasks = list(meta.get("tasks", [])) if not run.invalid else []
    last_steps = [p.last_step for p in run.parts if p.last_step is not None]
    status = INVALID if run.invalid else runs.effective_status(meta, now=now)
    found = list(run.problems)
    if status == runs.RUNNING:
        stalled = sorted(r for r, m in run.ranks.items() if m.get("rank") == r and runs.effective_status(m, now) == runs.INTERRUPTED)
        if stalled:
            status = runs.INTERRUPTED
            found.append(f"{run_id}: rank(s) {stalled} stopped beating while rank 0 still runs")
    lost, errors = (None, None) if run.invalid else _losses(run, found)
    if lost:
        found.append(f"{run_id}: {lost} row(s) could not be written ({errors or 0} failed write(s)); its records are incomplete")
        if status == runs.FINISHED:
            status = FINISHED_ROWS_LOST
    rows = sum(p.rows for p in run.parts)
    last_step = max(last_steps) if last_steps else None
    if run.parts and schema.superseded_bounds(meta.get("attempts")):
        rows, last_step = _resumed_counts(run, rows, last_step, found)
    name, mode = balancer.get("name", ""), meta.get("mode", "")
    return {
        "run_id": run_id,
        "status": status,
        "balancer": name if isinstance(name, str) else "",
        "mode": mode if isinstance(mode, str) else "",
        "tasks": tasks,
        "num_tasks": len(tasks),
        "last_step": last_step,
        "rows": rows,
        "rows_lost": lost,
        "write_errors": errors,
        "created": _timestamp(meta.get("created")),
        "updated": _timestamp(meta.get("heartbeat") or meta.get("updated")),
        "problems": found,
    }


def _resumed_counts(run: RunFiles, rows: int, last_step: Optional[int], found: list[str]) -> tuple[int, Optional[int]]:
    """Rows and last step of a resumed run, each step counted once (the latest attempt's rows); a query,
    paid only by runs whose ``attempts`` say a process resumed them. On failure, the files' counts."""
    from .source import AnalysisError, query  # (source builds on this module)

    try:
        frame = query([run], "SELECT count(*) AS n, max(step) AS last FROM metrics", columns=("n", "last"))
    except AnalysisError as exc:
        found.append(f"{run.run_id}: rows of its attempts not counted once ({exc})")
        return rows, last_step
    if frame.empty:
        return rows, last_step
    last = frame["last"].iloc[0]
    return int(frame["n"].iloc[0]), (None if pd.isna(last) else int(last))


def _losses(run: RunFiles, found: list[str]) -> tuple[Optional[int], Optional[int]]:
    """Rows lost and failed writes over run.json (rank 0) and every other rank's rank.json; None where no
    file says a count (or what one says is not a count, which is reported)."""
    totals: list[Optional[int]] = []
    for key in ("rows_lost", "write_errors"):
        total: Optional[int] = None
        for where, meta in [(run.path / schema.RUN_FILE, run.meta)] + [
            (run.path / schema.METRICS_DIR / f"rank={r}" / runs.RANK_FILE, m) for r, m in sorted(run.ranks.items())
        ]:
            if key not in meta:
                continue
            value = meta[key]
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_ABS_STEP:
                found.append(f"{where}: {key} is {_short(value)}, not a count; ignored")
                total = None
                break
            total = (total or 0) + value
        totals.append(total)
    return totals[0], totals[1]


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
