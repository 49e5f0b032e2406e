"""One run = one directory: ``<root>/<run_id>/run.json`` plus Parquet parts under ``metrics/``.

``run.json`` is always replaced atomically (write a temporary file, then ``os.replace``), so a reader
never sees half of it. Its last version, written when the run closes, goes into space reserved when the
recorder started (:func:`reserve_space`), so a disk that filled up during the run still gets the final
status and row counts.

Before a run's first step the session checks the runs root (:func:`check_runs_root`: a directory, writable,
with room) and claims the run's directory (:func:`reserve_run`: one ``mkdir``, so two jobs started in the
same second get different default names and a taken name is refused before training starts).

A process killed with SIGKILL cannot mark its run: ``run.json`` keeps saying ``running``. The recorder
therefore refreshes a ``heartbeat`` time in it while it lives, and :func:`effective_status` reads a
``running`` run whose heartbeat is older than a threshold as ``interrupted``.
"""

from __future__ import annotations

import errno
import json
import math
import os
import platform
import re
import socket
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


def reserve_space(path: str | os.PathLike, size: int) -> Path:
    """Allocate ``size`` bytes now for a later rewrite of ``path`` (``.<name>.reserve`` beside it).

    The bytes are written and fsynced, so the file system has given them to the file; rewriting them
    later (:func:`write_json_reserved`) needs no new space on file systems that overwrite in place (ext4,
    xfs, tmpfs). Raises ``OSError`` (nothing left behind) when the space is not there.
    """
    path = Path(path)
    reserve = path.parent / f".{path.name}.reserve"
    fd = os.open(reserve, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        chunk = b" " * min(size, 1 << 16)
        left = size
        while left > 0:
            left -= os.write(fd, chunk[:left])
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(reserve)
        except OSError:
            pass
        raise
    os.close(fd)
    return reserve


def write_json_reserved(path: str | os.PathLike, payload: Mapping[str, Any], reserve: Optional[Path]) -> None:
    """Replace ``path`` with ``payload`` written into the space :func:`reserve_space` set aside, then renamed
    over ``path`` (atomic, as :func:`write_json_atomic`); the reserve is used up. Without a reserve (or
    when it is gone) this is :func:`write_json_atomic`."""
    path = Path(path)
    if reserve is None or not reserve.exists():
        write_json_atomic(path, payload)
        return
    data = json.dumps(payload, indent=2, sort_keys=True, default=str).encode("utf-8")
    fd = os.open(reserve, os.O_WRONLY)  # no O_TRUNC: the reserved blocks stay with the file
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.ftruncate(fd, len(data))  # shrinking frees blocks, it never needs any
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(reserve, path)


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

    A directory this process claimed with :func:`reserve_run` is filled; any other existing one raises
    :class:`RunError`: records are never overwritten. A run that cannot be written (read-only, full) is a
    :class:`RunError` naming the cause, and leaves no folder behind that would take the name.
    """
    validate_run_id(run_id)
    root = Path(root)
    _make_root(root)
    path = root / run_id
    try:
        path.mkdir()
        reserved = False
    except FileExistsError:
        if not _reserved_here(path):
            raise RunError(_taken(root, run_id)) from None
        reserved = True
    except OSError as exc:
        raise RunError(f"cannot create run {run_id!r} under {root} ({_reason(exc)})") from None
    now = time.time()
    payload = dict(meta)
    payload.update(
        run_id=run_id,
        schema_version=schema.SCHEMA_VERSION,
        status=RUNNING,
        created=now,
        updated=now,
        versions=library_versions(),
        attempts=[{"attempt": 1, "started": now}],
    )
    try:
        (path / schema.METRICS_DIR).mkdir(exist_ok=reserved)
        write_json_atomic(path / schema.RUN_FILE, payload)
    except OSError as exc:
        if not reserved:  # (a claimed folder stays claimed; its session releases it)
            for leftover in (path / schema.METRICS_DIR, path):
                try:
                    leftover.rmdir()
                except OSError:
                    pass
        raise RunError(f"cannot create run {run_id!r} under {root} ({_reason(exc)}); free some space or choose another runs_root") from None
    if reserved:
        _remove(path / RESERVATION_FILE)
    return path


# -- the runs root and the run's name, checked and claimed before the first step ----------------------------
#: What a runs root must have free: a run's run.json, its reserve and its first part files.
MIN_FREE_BYTES = 1 << 20
#: Written into a run directory claimed by :func:`reserve_run` until :func:`create_run` fills it.
RESERVATION_FILE = ".reserved"
#: Default names taken in the same second get ``-2``, ``-3``, ... up to this many.
MAX_NAME_ATTEMPTS = 1000


def _reason(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return exc.strerror or str(exc)


def _first_non_directory(path: Path) -> Optional[Path]:
    """``path`` or the nearest of its parents that exists (or is a link) but is not a directory."""
    for candidate in (path, *path.parents):
        if candidate.is_symlink() and not candidate.exists():
            return candidate
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def _make_root(root: Path) -> None:
    blocker = _first_non_directory(root)
    if blocker is not None:
        what = "a broken symbolic link" if blocker.is_symlink() and not blocker.exists() else "a file, not a directory"
        where = f"{blocker} is {what}" if blocker == root else f"{blocker}, on its path, is {what}"
        raise RunError(f"runs root {root} cannot be used: {where}; choose another runs_root")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"runs root {root} cannot be created ({_reason(exc)}); choose another runs_root") from None


def _free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    blocks = stats.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else stats.f_bavail
    return int(blocks) * int(stats.f_frsize)


def check_runs_root(root: str | os.PathLike, min_free_bytes: int = MIN_FREE_BYTES) -> Path:
    """The runs root, created if missing, once it is known to take a run's records; else a :class:`RunError`
    naming the path and the cause: a file (or a file on its path), a read-only file system, no permission,
    or less than ``min_free_bytes`` free. Checks by writing (and removing) a small file, since neither the
    permission bits (root ignores them) nor ``statvfs`` alone tell whether a write will succeed."""
    path = Path(root).expanduser()
    created = [p for p in (path, *path.parents) if not (p.exists() or p.is_symlink())]
    _make_root(path)
    try:
        _probe(path, min_free_bytes)
    except RunError:
        for folder in created:  # (deepest first) a refused root leaves nothing behind
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    return path


def _probe(path: Path, min_free_bytes: int) -> None:
    probe_size = min(max(int(min_free_bytes), 0), 1 << 16)
    try:
        fd, probe = tempfile.mkstemp(prefix=".gradnorm-probe-", dir=path)
    except OSError as exc:
        raise RunError(f"runs root {path} is not writable ({_reason(exc)}); choose another runs_root") from None
    try:
        try:
            data = b" " * probe_size
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
            _remove(Path(probe))
    except OSError as exc:
        raise RunError(f"runs root {path} cannot take records ({_reason(exc)}); free some space or choose another runs_root") from None
    free = _free_bytes(path)
    if free < min_free_bytes:
        raise RunError(
            f"runs root {path} has only {free:,} bytes free (no space left for records; a run needs at least "
            f"{min_free_bytes:,}); free some space or choose another runs_root"
        )


def _reservation(path: Path) -> Optional[dict[str, Any]]:
    try:
        meta = json.loads((path / RESERVATION_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reserved_here(path: Path) -> bool:
    """A directory claimed by this process with :func:`reserve_run` and not yet filled by :func:`create_run`."""
    meta = _reservation(path)
    return meta is not None and meta.get("pid") == os.getpid() and meta.get("host") == socket.gethostname() and not (path / schema.RUN_FILE).exists()


def _taken(root: Path, run_id: str) -> str:
    path = root / run_id
    meta = _reservation(path)
    if meta is not None and not (path / schema.RUN_FILE).exists():
        pid, host = meta.get("pid"), meta.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
            return (
                f"run {run_id!r} already exists under {root}: it was claimed by process {pid}, which is no longer running, "
                f"and holds no records; remove the folder {path} or choose another name"
            )
        return f"run {run_id!r} already exists under {root}: another session (process {pid} on {host}) has claimed it for its first step; choose another name"
    return f"run {run_id!r} already exists under {root}: choose another name or remove it first"


def _claim(root: Path, run_id: str) -> Path:
    """mkdir the run directory and mark it as this process's; FileExistsError if the name is taken."""
    path = root / run_id
    try:
        path.mkdir()
    except FileExistsError:
        raise
    except OSError as exc:
        raise RunError(f"cannot create run {run_id!r} under {root} ({_reason(exc)}); choose another runs_root") from None
    try:
        marker = {"pid": os.getpid(), "host": socket.gethostname(), "created": time.time()}
        (path / RESERVATION_FILE).write_text(json.dumps(marker), encoding="utf-8")
    except OSError as exc:
        _remove(path / RESERVATION_FILE)
        try:
            path.rmdir()
        except OSError:
            pass
        raise RunError(f"cannot create run {run_id!r} under {root} ({_reason(exc)}); free some space or choose another runs_root") from None
    return path


def reserve_run(root: str | os.PathLike, run_name: Optional[str], default_prefix: str, now: Optional[float] = None) -> tuple[str, Path]:
    """Claim ``<root>/<run id>`` for a run that starts recording at its first step; returns (run id, path).

    The claim is one ``mkdir``, which the file system grants to exactly one process: an explicit
    ``run_name`` that is already taken (by a run, or by another session's claim) is refused here with a
    :class:`RunError`; without a name, ``<default_prefix>-%Y%m%d-%H%M%S`` is tried, then the same with
    ``-2``, ``-3``, ..., so jobs started in the same second get different runs. The directory holds only a
    ``.reserved`` marker (not listed as a run) until :func:`create_run`, called by the same process, fills
    it; :func:`release_run` removes a claim whose session never recorded a step.
    """
    base_root = Path(root)
    if run_name is not None:
        validate_run_id(run_name)
        try:
            return run_name, _claim(base_root, run_name)
        except FileExistsError:
            raise RunError(_taken(base_root, run_name)) from None
    stamp = time.strftime(f"{default_prefix}-%Y%m%d-%H%M%S", time.localtime(now))
    validate_run_id(stamp)
    for attempt in range(1, MAX_NAME_ATTEMPTS + 1):
        candidate = stamp if attempt == 1 else f"{stamp}-{attempt}"
        try:
            return candidate, _claim(base_root, candidate)
        except FileExistsError:
            continue
    raise RunError(f"no free run name {stamp}[-N] under {base_root} after {MAX_NAME_ATTEMPTS} attempts; pass run_name")


def release_run(path: str | os.PathLike) -> bool:
    """Remove a directory this process claimed with :func:`reserve_run` and never filled (a session closed
    before its first step), so the name is free again. Returns whether it was removed."""
    path = Path(path)
    if not _reserved_here(path):
        return False
    _remove(path / RESERVATION_FILE)
    metrics = path / schema.METRICS_DIR
    try:
        if metrics.is_dir():
            metrics.rmdir()
        path.rmdir()
    except OSError:
        return False
    return True


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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


def resume_run(root: str | os.PathLike, run_id: str, first_step: int, changes: Mapping[str, Any]) -> tuple[Path, int]:
    """Open ``<root>/<run_id>`` for a process that resumes it from a checkpoint; returns (path, attempt).

    The run keeps its records: ``run.json``'s ``attempts`` gains ``{"attempt": n, "started", "first_step",
    "previous_status"}``, its status becomes ``running`` again and ``changes`` (this process's settings)
    are merged in. Rows of earlier attempts at ``first_step`` or later were recorded again by this one
    (the killed process had gone on past its checkpoint), so every reader leaves them out
    (:func:`schema.superseded_bounds`). A run that another live process is writing, or that does not
    exist, is a :class:`RunError` naming it.
    """
    validate_run_id(run_id)
    path = Path(root) / run_id
    if not (path / schema.RUN_FILE).exists():
        raise RunError(
            f"cannot resume run {run_id!r}: no run.json under {path} (attach with the runs_root of the interrupted run, "
            "or load the state with same_run=False to record into a new run)"
        )
    meta = read_run_json(path)
    # A live writer of rank 0 (the interrupted process is still running) refuses the resume before run.json changes.
    directory = path / schema.METRICS_DIR / schema.rank_dir_name(0)
    directory.mkdir(parents=True, exist_ok=True)
    probe = WriterLock(directory)
    probe.acquire()
    probe.release()
    attempts = meta.get("attempts")
    history = [a for a in attempts if isinstance(a, dict)] if isinstance(attempts, list) else [{"attempt": 1, "started": meta.get("created")}]
    numbers: list[int] = [n for a in history if isinstance(n := a.get("attempt"), int) and not isinstance(n, bool)]
    attempt = max(numbers, default=1) + 1
    now = time.time()
    history.append({"attempt": attempt, "started": now, "first_step": int(first_step), "previous_status": meta.get("status")})
    payload = dict(meta)
    payload.update(changes)
    payload.update(attempts=history, status=RUNNING, updated=now, schema_version=schema.SCHEMA_VERSION)
    for key in ("finished", "closed_by"):
        payload.pop(key, None)
    write_json_atomic(path / schema.RUN_FILE, payload)
    return path, attempt


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
