"""One run = one directory: ``<root>/<run_id>/run.json`` plus Parquet parts under ``metrics/``.

``run.json`` is always replaced atomically (write a temporary file, then ``os.replace``), so a reader
never sees half of it.

A process killed with SIGKILL cannot mark its run: ``run.json`` keeps saying ``running``. The recorder
therefore refreshes a ``heartbeat`` time in it while it lives, and :func:`effective_status` reads a
``running`` run whose heartbeat is older than a threshold as ``interrupted``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Mapping, Optional

from . import schema

RUNNING = "running"
FINISHED = "finished"
FAILED = "failed"
INTERRUPTED = "interrupted"
STATUSES = (RUNNING, FINISHED, FAILED, INTERRUPTED)

#: Seconds without a heartbeat after which a ``running`` run is read as ``interrupted``. The recorder
#: beats every ``HEARTBEAT_INTERVAL`` seconds from its own thread (independent of the training step's
#: length), so only a dead or frozen process misses eight beats in a row.
HEARTBEAT_INTERVAL = 15.0
STALE_AFTER = 120.0
STALE_AFTER_ENV = "GRADNORM_STALE_AFTER"

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,127}$")


class RunError(ValueError):
    """A run directory or its ``run.json`` is missing, malformed or would be overwritten."""


def validate_run_id(run_id: str) -> str:
    """Accept plain names only, so a run id can never escape its runs root (``../x``, ``/etc``)."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise RunError(
            f"invalid run name {run_id!r}: use letters, digits, '.', '_', '=' and '-' (at most 128 characters, not starting with '.' and without '..')"
        )
    return run_id


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    """Write JSON to ``path`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def library_versions() -> dict[str, str]:
    """Versions that decide how a run's numbers were produced."""
    import pyarrow
    import torch

    from . import __version__

    return {
        "toolkit": __version__,
        "torch": torch.__version__,
        "pyarrow": pyarrow.__version__,
        "python": platform.python_version(),
    }


@dataclass
class RunInfo:
    """What ``run.json`` says about a run."""

    run_id: str
    path: Path
    meta: dict[str, Any]

    @property
    def status(self) -> str:
        return str(self.meta.get("status", "unknown"))

    @property
    def tasks(self) -> list[str]:
        return list(self.meta.get("tasks", []))


def create_run(root: str | os.PathLike, run_id: str, meta: Mapping[str, Any]) -> Path:
    """Create ``<root>/<run_id>`` and its ``run.json`` with status ``running``.

    Raises :class:`RunError` if the run already exists: records are never overwritten.
    """
    validate_run_id(run_id)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / run_id
    try:
        path.mkdir()
    except FileExistsError:
        raise RunError(f"run {run_id!r} already exists under {root}: choose another name or remove it first") from None
    (path / schema.METRICS_DIR).mkdir()
    now = time.time()
    payload = dict(meta)
    payload.update(
        run_id=run_id,
        schema_version=schema.SCHEMA_VERSION,
        status=RUNNING,
        created=now,
        updated=now,
        versions=library_versions(),
    )
    write_json_atomic(path / schema.RUN_FILE, payload)
    return path


def read_run_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a run's ``run.json``; a clear :class:`RunError` if it is missing or malformed."""
    file = Path(path) / schema.RUN_FILE
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunError(f"{file} does not exist: {Path(path).name!r} is not a run directory") from None
    except UnicodeDecodeError as exc:
        raise RunError(f"{file} is not valid UTF-8 text (byte {exc.start}), so not a run.json") from None
    except OSError as exc:
        raise RunError(f"{file} cannot be read ({exc.strerror or exc})") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunError(f"{file} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(meta, dict):
        raise RunError(f"{file} must hold a JSON object, found {type(meta).__name__}")
    tasks = meta.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise RunError(f"{file} lacks a 'tasks' list of names")
    if meta.get("status") not in STATUSES:
        raise RunError(f"{file} has status {meta.get('status')!r}; expected one of {STATUSES}")
    return meta


def update_run_json(path: str | os.PathLike, **changes: Any) -> dict[str, Any]:
    """Merge ``changes`` into ``run.json`` (atomically) and return the new content."""
    meta = read_run_json(path)
    meta.update(changes)
    meta["updated"] = time.time()
    write_json_atomic(Path(path) / schema.RUN_FILE, meta)
    return meta


def beat(path: str | os.PathLike, now: Optional[float] = None, **counts: Any) -> None:
    """Refresh a ``running`` run's ``heartbeat`` (and counts); a closed run's ``run.json`` is left alone."""
    meta = read_run_json(path)
    if meta["status"] != RUNNING:
        return
    meta.update(counts)
    meta["heartbeat"] = time.time() if now is None else float(now)
    write_json_atomic(Path(path) / schema.RUN_FILE, meta)


def stale_after_default() -> float:
    """The stale-heartbeat threshold: ``$GRADNORM_STALE_AFTER`` seconds if set, else :data:`STALE_AFTER`."""
    text = os.environ.get(STALE_AFTER_ENV)
    if text is None:
        return STALE_AFTER
    try:
        value = float(text)
    except ValueError:
        raise RunError(f"{STALE_AFTER_ENV}={text!r} is not a number of seconds") from None
    if not (value > 0 and value != float("inf")):
        raise RunError(f"{STALE_AFTER_ENV}={text!r} must be a positive, finite number of seconds")
    return value


def effective_status(meta: Mapping[str, Any], now: Optional[float] = None, stale_after: Optional[float] = None) -> str:
    """The status to show for a run: ``interrupted`` for a ``running`` run whose writer stopped beating.

    The last sign of life is ``heartbeat`` (written by the recorder), else ``updated``, else ``created``;
    a ``running`` run without any of them, or with only non-numeric, non-finite or far-future ones, is also
    ``interrupted`` because nothing shows it is alive. Other statuses are returned unchanged.
    """
    status = str(meta.get("status", "unknown"))
    if status != RUNNING:
        return status
    now = time.time() if now is None else float(now)
    limit = stale_after_default() if stale_after is None else float(stale_after)
    recorded = [meta.get(key) for key in ("heartbeat", "updated", "created")]
    beats = [float(b) for b in recorded if isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)]
    # A time far in the future (a hostile or corrupted run.json) proves nothing; slight skew between
    # machines sharing the runs root is tolerated up to the threshold itself.
    beats = [b for b in beats if b - now <= limit]
    if not beats or now - max(beats) > limit:
        return INTERRUPTED
    return RUNNING


RANK_FILE = "rank.json"


def stalled_ranks(path: str | os.PathLike, now: Optional[float] = None, stale_after: Optional[float] = None) -> list[int]:
    """Ranks other than 0 whose ``rank.json`` says ``running`` but whose heartbeat went stale.

    Under torch.distributed rank 0 owns ``run.json``; every other rank beats in its own
    ``metrics/rank=<r>/rank.json``, so the death of any rank shows, not only rank 0's. A ``rank.json``
    that cannot be read is left to the other checks (it proves nothing either way).
    """
    stalled = []
    for file in sorted(Path(path, schema.METRICS_DIR).glob(f"rank=*/{RANK_FILE}")):
        try:
            meta = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and isinstance(meta.get("rank"), int) and effective_status(meta, now, stale_after) == INTERRUPTED:
            stalled.append(meta["rank"])
    return stalled


class WriterLock:
    """An exclusive lock on one rank's records of a run, held by the writing process while it lives.

    ``flock`` on ``<rank dir>/.writer.lock``: the kernel drops it when the process dies (even by
    SIGKILL), so a dead writer never blocks anyone, while a second live process is refused at once.
    On systems without ``fcntl`` the lock is a no-op and only the status check protects the run.
    """

    FILE_NAME = ".writer.lock"

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / self.FILE_NAME
        self._handle: Optional[IO[str]] = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RunError(
                f"another process is writing records to {self.path.parent}: two writers of the same run and rank would mix their records; use another run name"
            ) from None
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor releases the flock
            self._handle = None


def check_writable(path: str | os.PathLike) -> dict[str, Any]:
    """Refuse to add records to a run that is not ``running`` (finished, failed or interrupted)."""
    meta = read_run_json(path)
    if meta["status"] != RUNNING:
        raise RunError(
            f"run {Path(path).name!r} under {Path(path).parent} has status {meta['status']!r}: its records "
            "are closed and new ones would be mixed into them; start a new run with another name"
        )
    return meta


def load_run(path: str | os.PathLike) -> RunInfo:
    path = Path(path)
    return RunInfo(run_id=path.name, path=path, meta=read_run_json(path))
