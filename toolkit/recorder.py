"""Per-step records: device buffer -> one host copy every N steps -> background Parquet writer.

The training thread only writes a (T, columns) tensor into a preallocated device buffer (no host sync);
every ``flush_every`` steps the filled block is copied to the host in one transfer (asynchronously into
pinned memory on CUDA) and handed to a writer thread. The writer builds an Arrow table and writes a
complete part file under a temporary name, then renames it: a reader never sees half a file.

The backlog handed to the writer and not yet on disk is bounded (``max_backlog_steps``, default
``flush_every``; ``max_backlog_bytes``): when a flush would exceed it, the training thread waits for the
writer (counted in ``run.json`` as ``backlog_waits`` and ``backlog_wait_seconds``), and the writer puts
whatever has queued into one part file. So while writes succeed, a SIGKILL at any moment loses at most
``flush_every + max_backlog_steps`` recorded steps (``loss_bound_steps`` in ``run.json``; 200 by default),
however long the run and however slow the disk.

A write that fails (disk full, directory unwritable) does not stop training: the recorder warns once with
the path and the reason, keeps the batch and retries it with the next flush or heartbeat, so writing
resumes by itself when space comes back; rows it finally has to drop (beyond ``max_pending_rows``, or
still unwritable when the run closes) are counted in ``run.json`` as ``rows_lost``, never dropped silently.
The final ``run.json`` is written into space reserved when the recorder started, so a disk that is full
at close still gets the final status and counts.

Part files are compacted (:func:`compact_part_directory`): when a rank holds more than ``compact_above``
part files, a background thread merges runs of adjacent small ones (``fanout`` files of similar size at a
time, so each row is rewritten only a few times), and at close the rest are packed into files of up to
``compact_target_rows`` rows. A merged file is written under a temporary name, fsynced and renamed to
``part-<first>-<last>.parquet`` before the files it replaces are deleted, and readers take only the files
:func:`toolkit.schema.live_part_files` names, so a reader at any moment, or after a crash at any point of
a compaction, sees every row exactly once. ``gradnorm compact`` does the same for runs written earlier.

While it lives, the writer thread refreshes ``heartbeat`` in ``run.json`` (after a write, at most once a
second, and every ``heartbeat_interval`` seconds when idle): a run killed with SIGKILL keeps status
``running`` but stops beating, and :func:`toolkit.runs.effective_status` shows it as ``interrupted``.
A recorder refuses to start on a run that is not ``running`` or whose rank another live process is
writing (:class:`toolkit.runs.WriterLock`), so records are never mixed or overwritten.

Runs still open when the interpreter exits are closed then (``failed`` after an uncaught exception,
``interrupted`` after Ctrl-C, else ``finished``). The handlers that do it (an ``atexit`` handler and a
``sys.excepthook`` wrapper) are installed when the first recorder opens and removed when the last one
closes: importing this module changes nothing in the process.
"""

from __future__ import annotations

import atexit
import math
import os
import queue
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from . import runs, schema

DEFAULT_FLUSH_EVERY = 100
#: A write refreshes the heartbeat at most this often: ``run.json`` is fsynced, and a run flushing
#: every few milliseconds should not pay that on each flush.
MIN_BEAT_SPACING = 1.0
#: Host memory the batches waiting for the writer may take before the training thread waits.
DEFAULT_MAX_BACKLOG_BYTES = 64 << 20
#: A training thread that has waited this long for the writer is told so (once).
SLOW_WRITER_WARNING = 10.0
#: Space set aside for the final run.json (or rank.json); at least this, else four times its size at start.
MIN_RESERVE_BYTES = 64 << 10

#: A rank is compacted once it holds more part files than this: the analysis meets its targets at
#: 1 M steps x 10 tasks with 200 files (benchmarks/results/analysis.md), and fewer are not worth rewriting.
COMPACT_ABOVE_FILES = 200
#: The columns that are null on an absent task's row (its weight stays: it is frozen, not unknown).
ABSENT_NULL = frozenset(("loss", "loss_ratio", "inverse_rate", "grad_norm", "target_norm"))
#: The columns that are null at a step whose norms were not measured (``update_every``).
UNMEASURED_NULL = frozenset(("grad_norm", "target_norm", "step_grad_loss"))
#: Rows of a compacted file; a file this large is never merged again.
COMPACT_TARGET_ROWS = 1_000_000
#: The background compaction merges this many adjacent files of the same size class at a time, so a row
#: is rewritten about log_fanout(COMPACT_TARGET_ROWS / rows per flush) times (3 at 1,000 rows per flush).
COMPACT_FANOUT = 10
#: Seconds the files a background merge replaced stay on disk after the rename, so that a reader that
#: listed them just before can still open them (readers skip them: the merged file covers their range).
COMPACT_GRACE = 5.0
#: How much lower the background compaction thread's priority is (Unix niceness, added to the process's).
COMPACT_NICENESS = 10
#: Rows per row group in a compacted file (DuckDB scans row groups in parallel and prunes them by the
#: step and wall_time statistics).
ROW_GROUP_ROWS = 131_072


def _columns_of(kind: Callable[[pa.DataType], bool]) -> list[str]:
    return [f.name for f in schema.METRICS_SCHEMA if kind(f.type)]


#: How part files are encoded (measured in benchmarks/results/records.md). Floats stay float64 (the
#: schema's type, exact for float64 balancers), stored byte-stream-split: the bytes of each position
#: become one stream, so the eight bytes of a value that was float32 on the device (its low four bytes
#: are zero) compress to about four, and a float64 value loses nothing. step and epoch are delta-encoded
#: (step repeats T times, then grows by one), split and task are dictionary-encoded (a few bits a row),
#: and zstd level 3 is as fast as level 1 here and 5 % smaller.
PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": _columns_of(pa.types.is_string),
    "column_encoding": {
        **{name: "BYTE_STREAM_SPLIT" for name in _columns_of(pa.types.is_floating)},
        **{name: "DELTA_BINARY_PACKED" for name in _columns_of(pa.types.is_integer)},
    },
}


@dataclass
class _Batch:
    """Rows waiting for the writer; ``values`` may still be in flight from the device."""

    steps: list[int]
    epochs: list[Optional[int]]
    wall_times: list[float]
    values: Optional[Tensor]  # (n, T, len(schema.RECORDED_FIELDS)) on the host
    defined: frozenset[str]
    ready: Any = None  # a CUDA event to wait on before reading ``values``
    validation: list[tuple[int, Optional[int], float, str, float]] = field(default_factory=list)

    def num_rows(self, num_tasks: int) -> int:
        return len(self.steps) * num_tasks + len(self.validation)

    def num_bytes(self) -> int:
        """Host memory this batch holds, roughly: its values plus the Python lists beside them."""
        values = 0 if self.values is None else self.values.element_size() * self.values.nelement()
        return values + 112 * len(self.steps) + 256 * len(self.validation)


#: Written by ranks other than 0 at close, in their own ``metrics/rank=<r>/`` folder.
RANK_FILE = runs.RANK_FILE


class RecordListener(Protocol):
    """Hears what a recorder writes (toolkit/forwarding.py forwards it to trackers). ``opened`` runs on the
    thread that creates the recorder, ``rows_written`` on the writer thread right after a part file holding
    those rows is on disk (``values``: (steps, T, len(schema.RECORDED_FIELDS)), valid during the call only),
    ``closed`` after the final run.json is written. What a listener raises is caught and warned about."""

    def opened(self, recorder: Recorder) -> None: ...
    def rows_written(self, steps: Sequence[int], values: np.ndarray, defined: frozenset[str]) -> None: ...
    def closed(self, recorder: Recorder, status: str) -> None: ...


class Recorder:
    """Writes one rank's records of a run. Thread-safe for one training thread plus its own writer."""

    def __init__(
        self,
        run_path: str | os.PathLike,
        tasks: Sequence[str],
        flush_every: int = DEFAULT_FLUSH_EVERY,
        rank: Optional[int] = None,
        max_pending_rows: int = 5_000_000,
        heartbeat_interval: float = runs.HEARTBEAT_INTERVAL,
        max_backlog_steps: Optional[int] = None,
        max_backlog_bytes: int = DEFAULT_MAX_BACKLOG_BYTES,
        compact: bool = True,
        compact_above: int = COMPACT_ABOVE_FILES,
        compact_target_rows: int = COMPACT_TARGET_ROWS,
        compact_fanout: int = COMPACT_FANOUT,
        compact_grace: float = COMPACT_GRACE,
        listeners: Sequence[RecordListener] = (),
        attempt: int = 1,
    ) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        if not (heartbeat_interval > 0 and math.isfinite(heartbeat_interval)):
            raise ValueError(f"heartbeat_interval must be a positive number of seconds, got {heartbeat_interval!r}")
        backlog_steps = int(flush_every) if max_backlog_steps is None else int(max_backlog_steps)
        if backlog_steps < flush_every:
            raise ValueError(f"max_backlog_steps must be >= flush_every ({flush_every}), got {backlog_steps}: a whole flush must fit")
        if max_backlog_bytes < 1:
            raise ValueError(f"max_backlog_bytes must be >= 1, got {max_backlog_bytes}")
        if compact_above < 1 or compact_target_rows < 1 or compact_fanout < 2 or not (compact_grace >= 0 and math.isfinite(compact_grace)):
            raise ValueError(
                f"compaction needs compact_above >= 1, compact_target_rows >= 1, compact_fanout >= 2 and a finite compact_grace >= 0, "
                f"got {compact_above}, {compact_target_rows}, {compact_fanout}, {compact_grace!r}"
            )
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            raise ValueError(f"attempt must be an int >= 1 (the run's n-th process), got {attempt!r}")
        #: Written on every row (schema ``attempt``): of two rows of one step, the later attempt's wins.
        self.attempt = attempt
        self.run_path = Path(run_path)
        runs.check_writable(self.run_path)
        self.heartbeat_interval = float(heartbeat_interval)
        self.tasks = list(tasks)
        self.flush_every = int(flush_every)
        self.rank = _default_rank() if rank is None else int(rank)
        self.max_pending_rows = int(max_pending_rows)
        self.max_backlog_steps = backlog_steps
        self.max_backlog_bytes = int(max_backlog_bytes)
        self.compact = bool(compact)
        self.compact_above = int(compact_above)
        self.compact_target_rows = int(compact_target_rows)
        self.compact_fanout = int(compact_fanout)
        self.compact_grace = float(compact_grace)
        self.directory = self.run_path / schema.METRICS_DIR / schema.rank_dir_name(self.rank)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_file = runs.WriterLock(self.directory)
        self._lock_file.acquire()
        # This process now owns the rank: what a killed writer or compaction left is finished or removed.
        _tidy_rank_directory(self.directory)
        self._sequence = _last_sequence(self.directory)
        self._live_files = len(schema.live_part_files(os.listdir(self.directory))[0])
        self._status_file = self.run_path / schema.RUN_FILE if self.rank == 0 else self.directory / RANK_FILE
        self._reserve = self._reserve_final_json()
        self._buffer: Optional[Tensor] = None
        self._filled = 0
        self._defined: frozenset[str] = frozenset()
        self._steps: list[int] = []
        self._epochs: list[Optional[int]] = []
        self._wall: list[float] = []
        self._validation: list[tuple[int, Optional[int], float, str, float]] = []
        self._queue: queue.Queue[Optional[_Batch]] = queue.Queue()
        self._pending: list[_Batch] = []  # batches whose write failed, retried first
        self._backlog = threading.Condition()
        self._backlog_steps = 0
        self._backlog_bytes = 0
        self.rows_written = 0
        self.rows_lost = 0
        self.write_errors = 0
        self.skipped_updates = 0
        self.heartbeat_errors = 0
        self.part_files_written = 0
        self.batches_coalesced = 0
        self.backlog_waits = 0
        self.backlog_wait_seconds = 0.0
        self.compactions = 0
        self.files_compacted = 0
        self.compaction_errors = 0
        self._compacted_once = False
        self._last_beat = 0.0
        self._warned_write = False
        self._write_failing = False
        self._warned_skip = False
        self._warned_slow = False
        self._warned_compaction = False
        self.closed = False
        self._lock = threading.Lock()
        self._compactor: Optional[threading.Thread] = None
        self._compactor_wake = threading.Event()
        self._compactor_stop = threading.Event()
        self._to_delete: list[tuple[float, str]] = []  # (due time, name): merged away, kept for COMPACT_GRACE
        self._footers: dict[str, PartFile] = {}
        self._split_column: Optional[pa.Array] = None
        self._task_column: Optional[pa.Array] = None
        self._listeners = list(listeners)
        self._tell("opened", self)
        self._thread = threading.Thread(target=self._write_loop, name=f"gradnorm-recorder-{self.run_path.name}", daemon=True)
        self._thread.start()
        _EXIT.opened(self)

    @property
    def loss_bound_steps(self) -> int:
        """Recorded steps a SIGKILL can lose while writes succeed: the device buffer plus the backlog."""
        return self.flush_every + self.max_backlog_steps

    def settings(self) -> dict[str, Any]:
        """How this recorder writes, saved in ``run.json`` under ``recorder``."""
        return {
            "flush_every": self.flush_every,
            "max_backlog_steps": self.max_backlog_steps,
            "max_backlog_bytes": self.max_backlog_bytes,
            "loss_bound_steps": self.loss_bound_steps,
            "compaction": (
                {"above_files": self.compact_above, "target_rows": self.compact_target_rows, "fanout": self.compact_fanout, "grace_seconds": self.compact_grace}
                if self.compact
                else None
            ),
            "encoding": "parquet zstd-3; floats float64 byte-stream-split; step, epoch delta; split, task dictionary",
        }

    def _reserve_final_json(self) -> Optional[Path]:
        """Set aside the bytes the final run.json (rank.json) needs, so a full disk at close cannot lose it."""
        try:
            size = self._status_file.stat().st_size if self._status_file.exists() else 0
            return runs.reserve_space(self._status_file, max(MIN_RESERVE_BYTES, 4 * size))
        except OSError as exc:
            warnings.warn(
                f"gradnorm recorder: cannot reserve space for the final {self._status_file} ({exc.strerror or exc}); "
                "if the disk fills up, the run's final status and counts may not be saved",
                RuntimeWarning,
                stacklevel=3,
            )
            return None

    # -- training thread ------------------------------------------------------------------------
    def record(self, step: int, matrix: Tensor, defined: frozenset[str], epoch: Optional[int] = None) -> None:
        """Store one training step's (T, columns) values; copies to the host every ``flush_every`` steps."""
        if self.closed:
            raise RuntimeError(f"recorder of {self.run_path} is closed")
        if self._buffer is None or self._buffer.device != matrix.device:
            self._flush_buffer()
            self._buffer = torch.empty((self.flush_every,) + tuple(matrix.shape), dtype=torch.float64, device=matrix.device)
        if defined != self._defined and self._filled:
            self._flush_buffer()
        self._defined = defined
        self._buffer[self._filled].copy_(matrix, non_blocking=True)
        self._steps.append(int(step))
        self._epochs.append(None if epoch is None else int(epoch))
        self._wall.append(time.time())
        self._filled += 1
        if self._filled == self.flush_every:
            self._flush_buffer()

    def record_validation(self, step: int, losses: Mapping[str, Union[float, Tensor]], epoch: Optional[int] = None) -> None:
        """Store validation losses of some tasks (rows with split ``val``); written with the next flush."""
        if self.closed:
            raise RuntimeError(f"recorder of {self.run_path} is closed")
        unknown = sorted(set(losses) - set(self.tasks))
        if unknown:
            raise ValueError(f"validation losses for unknown tasks {unknown}; the run's tasks are {self.tasks}")
        now = time.time()
        for task, value in losses.items():
            value = float(value.detach().item()) if isinstance(value, Tensor) else float(value)
            self._validation.append((int(step), None if epoch is None else int(epoch), now, task, value))

    def flush(self) -> None:
        """Hand everything buffered to the writer now (it still writes in the background)."""
        self._flush_buffer(force=True)

    def wait(self) -> None:
        """Block until the writer has handled everything handed to it so far."""
        self.flush()
        self._queue.join()

    def close(self, status: str = runs.FINISHED, *, closed_by: Optional[str] = None) -> None:
        """Flush, stop the writer, compact, and set the run's status and row counts in ``run.json``.

        ``closed_by`` (saved as such) says what closed a run its owner did not close, e.g. ``"garbage collection"``.
        """
        if self.closed:
            return
        if threading.current_thread() in (self._thread, self._compactor):
            # A garbage collection that ran on the writer thread finalised the session owning this recorder;
            # the writer cannot wait for itself to finish, so another thread closes the run.
            helper = threading.Thread(target=self.close, args=(status,), kwargs={"closed_by": closed_by}, name=f"gradnorm-close-{self.run_path.name}")
            helper.start()
            return
        self.flush()
        self.closed = True
        self._queue.put(None)
        self._thread.join()
        _EXIT.closed(self)
        self._finish_compaction()
        final: dict[str, Any] = {"status": status, "finished": time.time(), **self.counts(), "recorder": self.settings()}
        if closed_by is not None:
            final["closed_by"] = closed_by
        try:
            if self.rank == 0:
                meta = runs.read_run_json(self.run_path)
                meta.update(final)
                attempts = meta.get("attempts")
                if isinstance(attempts, list) and attempts and isinstance(attempts[-1], dict) and attempts[-1].get("attempt") == self.attempt:
                    attempts[-1].update(status=status, finished=final["finished"], rows_written=self.rows_written)
                meta["updated"] = time.time()
                runs.write_json_reserved(self._status_file, meta, self._reserve)
            else:
                # run.json belongs to rank 0; another rank's counts stay beside its own part files.
                runs.write_json_reserved(self._status_file, {"rank": self.rank, **final}, self._reserve)
        except (OSError, runs.RunError) as exc:
            warnings.warn(f"gradnorm recorder: could not update {self._status_file}: {exc}", RuntimeWarning, stacklevel=2)
        finally:
            if self._reserve is not None:
                _unlink(self._reserve)
            self._lock_file.release()
        self._tell("closed", self, status)

    def counts(self) -> dict[str, Any]:
        """Rows written and lost, failed writes, skipped weight updates, the writer's waits and the
        compaction so far (saved in ``run.json``)."""
        return {
            "rows_written": self.rows_written,
            "rows_lost": self.rows_lost,
            "write_errors": self.write_errors,
            "skipped_updates": self.skipped_updates,
            "part_files_written": self.part_files_written,
            "batches_coalesced": self.batches_coalesced,
            "backlog_waits": self.backlog_waits,
            "backlog_wait_seconds": round(self.backlog_wait_seconds, 3),
            "compactions": self.compactions,
            "files_compacted": self.files_compacted,
            "compaction_errors": self.compaction_errors,
        }

    def _flush_buffer(self, force: bool = False) -> None:
        if not self._filled and not (force and self._validation):
            return
        values = None
        ready = None
        if self._filled and self._buffer is not None:  # (the buffer exists whenever rows are filled)
            block = self._buffer[: self._filled]
            if block.is_cuda:
                values = torch.empty(block.shape, dtype=block.dtype, pin_memory=True)
                values.copy_(block, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
            else:
                values = block.clone()
        batch = _Batch(self._steps, self._epochs, self._wall, values, self._defined, ready, self._validation)
        self._steps, self._epochs, self._wall, self._validation = [], [], [], []
        self._filled = 0
        self._admit(batch)
        self._queue.put(batch)

    def _admit(self, batch: _Batch) -> None:
        """Wait until the batch fits in the backlog: the tail a SIGKILL can lose never grows past the bound."""
        steps, size = len(batch.steps), batch.num_bytes()
        with self._backlog:

            def full() -> bool:
                over = self._backlog_steps + steps > self.max_backlog_steps or self._backlog_bytes + size > self.max_backlog_bytes
                return over and (self._backlog_steps > 0 or self._backlog_bytes > 0)

            if full():
                self.backlog_waits += 1
                started = time.perf_counter()
                while full() and self._thread.is_alive():
                    self._backlog.wait(timeout=1.0)
                    waited = time.perf_counter() - started
                    if waited > SLOW_WRITER_WARNING and not self._warned_slow:
                        self._warned_slow = True
                        warnings.warn(
                            f"gradnorm recorder: the writer of {self.directory} has been behind for {waited:.0f} s; training waits "
                            f"for it so that at most {self.loss_bound_steps} recorded steps are ever unwritten (warned once)",
                            RuntimeWarning,
                        )
                self.backlog_wait_seconds += time.perf_counter() - started
            self._backlog_steps += steps
            self._backlog_bytes += size

    # -- writer thread ------------------------------------------------------------------------
    def _write_loop(self) -> None:
        self._beat(force=True)
        # pyarrow's first numpy conversion imports its pandas shim (about 0.4 s): done now, while the
        # training thread fills the first block, rather than when that block is written.
        pa.array(np.zeros(1))
        while True:
            try:
                first = self._queue.get(timeout=self.heartbeat_interval)
            except queue.Empty:
                # Idle: beat, and retry what failed so writing resumes once the disk has room again.
                self._guarded(self._retry_pending)
                self._beat(force=True)
                continue
            # Whatever else queued meanwhile goes into the same part file: a writer that fell behind
            # catches up with fewer, larger files.
            got: list[Optional[_Batch]] = [first]
            while got[-1] is not None:
                try:
                    got.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            batches = [b for b in got if b is not None]
            stop = got[-1] is None
            try:
                self._pending.extend(batches)
                self._guarded(self._retry_pending)
                if stop:
                    self._give_up_pending()
                else:
                    self._beat(force=False)
            finally:
                self._release(batches)
                for _ in got:
                    self._queue.task_done()
            if stop:
                return

    def _release(self, batches: list[_Batch]) -> None:
        """The batches are written, or kept as pending after a failed write: either way out of the backlog."""
        with self._backlog:
            self._backlog_steps -= sum(len(b.steps) for b in batches)
            self._backlog_bytes -= sum(b.num_bytes() for b in batches)
            self._backlog.notify_all()

    def _guarded(self, action) -> None:
        try:
            action()
        except Exception as exc:  # never let the writer die silently
            self.write_errors += 1
            warnings.warn(f"gradnorm recorder: unexpected writer error in {self.directory}: {exc!r}", RuntimeWarning)

    def _beat(self, force: bool) -> None:
        """Refresh the heartbeat and row counts: rank 0 in ``run.json``, any other rank in its own
        ``rank.json`` (so ranks never race on one file, and a dead rank of any number shows)."""
        now = time.time()
        if not force and now - self._last_beat < MIN_BEAT_SPACING:
            return
        self._last_beat = now
        try:
            if self.rank == 0:
                runs.beat(self.run_path, now, **self.counts(), recorder=self.settings())
            else:
                runs.write_json_atomic(
                    self._status_file, {"rank": self.rank, "status": runs.RUNNING, "heartbeat": now, **self.counts(), "recorder": self.settings()}
                )
        except (OSError, runs.RunError) as exc:
            self.heartbeat_errors += 1
            self._warn_write_once(self._status_file, exc)

    def _warn_write_once(self, path: Path, exc: BaseException) -> None:
        if self._warned_write:
            return
        self._warned_write = True
        reason = getattr(exc, "strerror", None) or str(exc)
        warnings.warn(
            f"gradnorm recorder: cannot write to {path} ({reason}); training goes on, rows are kept and "
            "retried with the next flush; rows that cannot be kept are counted in run.json as rows_lost "
            "(warned once)",
            RuntimeWarning,
        )

    def _retry_pending(self) -> None:
        """Write the pending batches, as many as fit in one file of ``compact_target_rows`` at a time."""
        num_tasks = len(self.tasks)
        while self._pending:
            tables: list[pa.Table] = []
            rows = 0
            index = 0
            # After a failed write only the oldest batch is tried, so a disk that stays full costs one small
            # table per attempt, not all that is pending; once it works again the rest goes out coalesced.
            limit = 1 if self._write_failing else self.compact_target_rows
            while index < len(self._pending) and (not tables or rows < limit):
                batch = self._pending[index]
                try:
                    table = self._table(batch)
                except Exception as exc:
                    # A batch that cannot become a table never will: drop it, counted, instead of
                    # blocking every later batch behind it.
                    self._pending.pop(index)
                    self.rows_lost += batch.num_rows(num_tasks)
                    self.write_errors += 1
                    warnings.warn(f"gradnorm recorder: dropped {batch.num_rows(num_tasks)} rows of {self.run_path.name!r}: {exc!r}", RuntimeWarning)
                    continue
                tables.append(table)
                rows += table.num_rows
                index += 1
            if not tables:
                return
            try:
                self._write_table(tables[0] if len(tables) == 1 else pa.concat_tables(tables))
            except OSError as exc:
                self.write_errors += 1
                self._write_failing = True
                self._warn_write_once(self.directory, exc)
                self._drop_excess()
                return
            self._write_failing = False
            written, self._pending = self._pending[: len(tables)], self._pending[len(tables) :]
            self.rows_written += rows
            self.batches_coalesced += len(written) - 1
            for batch in written:
                self._note_skips(batch)
                if self._listeners and batch.values is not None and batch.steps:
                    self._tell("rows_written", batch.steps, batch.values.numpy(), batch.defined)

    def _tell(self, event: str, *args: Any) -> None:
        """Call ``event`` on every listener; a failing listener never stops recording (it counts its own failures)."""
        for listener in self._listeners:
            try:
                getattr(listener, event)(*args)
            except Exception as exc:
                warnings.warn(f"gradnorm recorder: a record listener failed in {event} ({exc!r}); the records are unaffected", RuntimeWarning)

    def _give_up_pending(self) -> None:
        """At close: rows that still cannot be written are lost; count them and say so."""
        if not self._pending:
            return
        lost = sum(b.num_rows(len(self.tasks)) for b in self._pending)
        self._pending.clear()
        self.rows_lost += lost
        warnings.warn(
            f"gradnorm recorder: {lost} rows of run {self.run_path.name!r} could not be written to {self.directory} "
            "before the run closed; counted in run.json as rows_lost",
            RuntimeWarning,
        )

    def _drop_excess(self) -> None:
        num_tasks = len(self.tasks)
        while len(self._pending) > 1 and sum(b.num_rows(num_tasks) for b in self._pending) > self.max_pending_rows:
            dropped = self._pending.pop(0)
            self.rows_lost += dropped.num_rows(num_tasks)

    def _note_skips(self, batch: _Batch) -> None:
        if batch.values is None or "step_update_skipped" not in batch.defined:
            return
        column = schema.RECORDED_FIELDS.index("step_update_skipped")
        skipped_steps = [s for s, flag in zip(batch.steps, batch.values[:, 0, column].tolist()) if flag > 0.5]
        self.skipped_updates += len(skipped_steps)
        if skipped_steps and not self._warned_skip:
            self._warned_skip = True
            warnings.warn(
                f"gradnorm: non-finite loss or gradient norm at step {skipped_steps[0]} of run "
                f"{self.run_path.name!r}; the weight update was skipped (recorded as step_update_skipped; "
                "warned once)",
                RuntimeWarning,
            )

    def _table(self, batch: _Batch) -> pa.Table:
        """The batch as Arrow columns, built from numpy arrays (no Python object per value)."""
        tables = []
        num_tasks = len(self.tasks)
        if batch.values is not None and batch.steps:
            if batch.ready is not None:
                batch.ready.synchronize()
            n = len(batch.steps)
            rows = n * num_tasks
            flat = batch.values.numpy().reshape(rows, len(schema.RECORDED_FIELDS))
            if all(e is None for e in batch.epochs):
                epoch = pa.nulls(rows, pa.int64())
            else:
                missing = np.repeat(np.array([e is None for e in batch.epochs]), num_tasks)
                epoch = pa.array(np.repeat(np.array([0 if e is None else e for e in batch.epochs], dtype=np.int64), num_tasks), mask=missing)
            columns: dict[str, pa.Array] = {
                "step": pa.array(np.repeat(np.asarray(batch.steps, dtype=np.int64), num_tasks)),
                "epoch": epoch,
                "wall_time": pa.array(np.repeat(np.asarray(batch.wall_times, dtype=np.float64), num_tasks)),
                "split": self._constant_columns(rows)[0],
                "task": self._constant_columns(rows)[1],
            }
            absent = unmeasured = None
            if "present" in batch.defined:
                flags = flat[:, schema.RECORDED_FIELDS.index("present")] < 0.5
                absent = flags if flags.any() else None
            if "step_measured" in batch.defined:
                flags = flat[:, schema.RECORDED_FIELDS.index("step_measured")] < 0.5
                unmeasured = flags if flags.any() else None
            for index, name in enumerate(schema.RECORDED_FIELDS):
                kind = schema.METRICS_SCHEMA.field(name).type
                if name not in batch.defined:
                    columns[name] = pa.nulls(rows, kind)
                elif name == "step_update_skipped" or name in schema.FLAG_FIELDS:
                    columns[name] = pa.array(flat[:, index] > 0.5)
                else:
                    values = np.ascontiguousarray(flat[:, index])
                    # An absent task's values are null, not NaN: nothing was measured (schema ``present``).
                    mask = absent if name in ABSENT_NULL else None
                    if unmeasured is not None and name in UNMEASURED_NULL:
                        mask = unmeasured if mask is None else mask | unmeasured
                    columns[name] = pa.array(values, kind, mask=mask)
            columns["attempt"] = pa.array(np.full(rows, self.attempt, dtype=np.int64))
            tables.append(pa.Table.from_arrays([columns[name] for name in schema.COLUMNS], schema=schema.METRICS_SCHEMA))
        if batch.validation:
            validation: dict[str, list] = {name: [] for name in schema.COLUMNS}
            for step, epoch_value, wall, task, loss in batch.validation:
                validation["step"].append(step)
                validation["epoch"].append(epoch_value)
                validation["wall_time"].append(wall)
                validation["split"].append(schema.VALIDATION)
                validation["task"].append(task)
                for name in schema.COLUMNS[5:]:
                    validation[name].append(loss if name == "loss" else self.attempt if name == "attempt" else None)
            tables.append(pa.table(validation, schema=schema.METRICS_SCHEMA))
        if not tables:
            return schema.METRICS_SCHEMA.empty_table()
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables)

    def _constant_columns(self, rows: int) -> tuple[pa.Array, pa.Array]:
        """The split and task columns of ``rows`` training rows: slices (no copy) of arrays built once."""
        if self._split_column is None or len(self._split_column) < rows:
            steps = max(self.flush_every, -(-rows // max(len(self.tasks), 1)))
            self._split_column = pa.array([schema.TRAIN] * (steps * len(self.tasks)), pa.string())
            self._task_column = pa.array(self.tasks * steps, pa.string())
        assert self._task_column is not None
        return self._split_column.slice(0, rows), self._task_column.slice(0, rows)

    def _write_table(self, table: pa.Table) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = schema.part_file_name(self._sequence + 1)
        final = self.directory / name
        temporary = self.directory / f".{name}.tmp"
        try:
            pq.write_table(table, temporary, **PARQUET_OPTIONS)
            os.replace(temporary, final)
        except BaseException:
            _unlink(temporary)
            raise
        self._sequence += 1
        self.part_files_written += 1
        self._footers[name] = PartFile(name, self._sequence, self._sequence, table.num_rows, True)
        self._live_files += 1
        if self.compact and self._live_files > self.compact_above:
            self._start_compactor()
            self._compactor_wake.set()

    # -- compaction ---------------------------------------------------------------------------------
    def _start_compactor(self) -> None:
        if self._compactor is None:
            self._compactor = threading.Thread(target=self._compact_loop, name=f"gradnorm-compact-{self.run_path.name}", daemon=True)
            self._compactor.start()

    def _compact_loop(self) -> None:
        # Merging is background work: on Linux this thread alone runs at a lower priority, so it takes the
        # CPU that training, the writer and anyone reading the run leave over.
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(os.getpriority(os.PRIO_PROCESS, 0) + COMPACT_NICENESS, 19))
        except (AttributeError, OSError):
            pass
        while not self._compactor_stop.is_set():
            self._compactor_wake.wait(timeout=max(self.compact_grace, 0.1))
            self._compactor_wake.clear()
            if self._compactor_stop.is_set():
                return
            self._delete_due(time.monotonic())
            if self._live_files > self.compact_above:
                self._compact_pass(final=False)

    def _compact_pass(self, final: bool) -> None:
        try:
            result = compact_part_directory(
                self.directory,
                final=final,
                above=0 if final else self.compact_above,
                target_rows=self.compact_target_rows,
                fanout=self.compact_fanout,
                delete=final,
                footers=self._footers,
                stop=None if final else self._compactor_stop,
                after_merge=None if final else self._merged,
            )
        except Exception as exc:  # the records are intact either way: compaction only adds a covering file
            self.compaction_errors += 1
            if not self._warned_compaction:
                self._warned_compaction = True
                warnings.warn(
                    f"gradnorm recorder: compaction of {self.directory} failed ({exc!r}); the part files are left as written (warned once)", RuntimeWarning
                )
            return
        if final:
            self._compacted_once = self._compacted_once or bool(result.merged)
            self.compactions += len(result.merged)
            self.files_compacted += sum(len(originals) for _, originals in result.merged)
        self._live_files = result.live_files
        due = time.monotonic() + self.compact_grace
        queued = {name for _, name in self._to_delete}
        self._to_delete += [(due, name) for name in result.covered if name not in queued]

    def _merged(self, name: str, originals: list[str]) -> None:
        """After each background merge: count it, and delete what earlier merges replaced once their grace
        is over, so a long catch-up never leaves the directory holding every file twice."""
        self._compacted_once = True
        self.compactions += 1
        self.files_compacted += len(originals)
        now = time.monotonic()
        self._to_delete += [(now + self.compact_grace, original) for original in originals]
        self._delete_due(now)

    def _delete_due(self, now: float) -> None:
        keep = []
        for due, name in self._to_delete:
            if due <= now:
                _unlink(self.directory / name)
                self._footers.pop(name, None)
            else:
                keep.append((due, name))
        self._to_delete = keep

    def _finish_compaction(self) -> None:
        """At close: stop the background merges; a rank that was compacted, or holds more files than
        ``compact_above``, is packed into files of up to ``compact_target_rows`` rows."""
        if self._compactor is not None:
            self._compactor_stop.set()
            self._compactor_wake.set()
            self._compactor.join()
        if not self.compact:
            return
        if self._compacted_once or self._live_files > self.compact_above:
            self._compact_pass(final=True)
        self._delete_due(math.inf)


# -- compaction of one rank's part files -------------------------------------------------------------------
@dataclass(frozen=True)
class PartFile:
    """A live part file: the sequences its name covers, its rows, and whether it may be merged (a
    complete Parquet file with exactly the recorder's schema)."""

    name: str
    first: int
    last: int
    rows: int
    mergeable: bool


@dataclass
class CompactionResult:
    """What one compaction of a rank directory did."""

    merged: list[tuple[str, list[str]]] = field(default_factory=list)  # (new file, the files it replaces)
    covered: list[str] = field(default_factory=list)  # files now covered by another, deleted unless delete=False
    deleted: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # files not merged, with why
    rows_merged: int = 0
    live_files: int = 0


def _footer(directory: Path, name: str, footers: Optional[dict[str, PartFile]]) -> PartFile:
    if footers is not None and name in footers:
        return footers[name]
    first, last = schema.part_file_range(name) or (0, 0)
    try:
        metadata = pq.read_metadata(directory / name)
        mergeable = metadata.schema.to_arrow_schema().remove_metadata().equals(schema.METRICS_SCHEMA)
        part = PartFile(name, first, last, metadata.num_rows, mergeable)
    except Exception:  # a damaged or partial file is left exactly as it is, for the reader to report
        part = PartFile(name, first, last, -1, False)
    if footers is not None:
        footers[name] = part
    return part


def scan_part_files(directory: Path, footers: Optional[dict[str, PartFile]] = None) -> tuple[list[PartFile], list[str], list[str]]:
    """A rank directory's live part files (in sequence order), the files another one covers (already
    counted there: left over by a compaction that stopped between its rename and its deletes), and the
    files that overlap another partially (never written by the recorder; left alone)."""
    names = [n for n in os.listdir(directory) if schema.part_file_range(n) is not None]
    live, overlapping = schema.live_part_files(names)
    taken = set(live) | set(overlapping)
    covered = sorted(n for n in names if n not in taken)
    return [_footer(directory, n, footers) for n in live], covered, overlapping


def plan_merges(live: Sequence[PartFile], *, target_rows: int, fanout: int, final: bool) -> list[list[PartFile]]:
    """Groups of adjacent live files to merge, each into one file of at most ``target_rows`` rows.

    Only runs of mergeable files below ``target_rows`` are merged, and a group is always every live file
    of its range (a merged file's name covers its whole range). ``final``: pack each run greedily.
    Otherwise (in the background) merge ``fanout`` adjacent files of the same size class (rows within a
    factor ``fanout``), so a merged file lands in a larger class and each row is rewritten about once per
    class; if that finds nothing, pack.
    """
    runs_of: list[list[PartFile]] = [[]]
    for part in live:
        if part.mergeable and part.rows < target_rows:
            runs_of[-1].append(part)
        elif runs_of[-1]:
            runs_of.append([])

    def pack(run: list[PartFile]) -> list[list[PartFile]]:
        groups: list[list[PartFile]] = [[]]
        rows = 0
        for part in run:
            if groups[-1] and rows + part.rows > target_rows:
                groups.append([])
                rows = 0
            groups[-1].append(part)
            rows += part.rows
        return [g for g in groups if len(g) > 1]

    if final:
        return [g for run in runs_of for g in pack(run)]
    tiered: list[list[PartFile]] = []
    for run in runs_of:
        index = 0
        while index < len(run):
            size_class = _size_class(run[index].rows, fanout)
            same = index
            while same < len(run) and _size_class(run[same].rows, fanout) == size_class:
                same += 1
            for start in range(index, same - fanout + 1, fanout):
                tiered += pack(run[start : start + fanout])
            index = same
    return tiered or [g for run in runs_of for g in pack(run)]


def _size_class(rows: int, fanout: int) -> int:
    return int(math.log(max(rows, 1), fanout))


def merge_part_files(directory: Path, group: Sequence[PartFile], on_stage: Optional[Callable[[str, str], None]] = None) -> str:
    """Write the rows of ``group`` (adjacent live files, in order) into one file named for their range.

    Written under a temporary name, fsynced, renamed, and the directory fsynced: the merged file is
    complete and durable before anyone may delete the originals. Row groups of ``ROW_GROUP_ROWS`` rows;
    the schema is the recorder's. ``on_stage(stage, name)`` is called after ``"written"`` (the temporary
    file is complete) and ``"renamed"``. Returns the new file's name.
    """
    name = schema.compacted_part_file_name(group[0].first, group[-1].last)
    final = directory / name
    temporary = directory / f".{name}.tmp"
    rows = 0
    try:
        with pq.ParquetWriter(temporary, schema.METRICS_SCHEMA, **PARQUET_OPTIONS) as writer:
            carry: list[pa.Table] = []
            carried = 0
            for part in group:
                source = pq.ParquetFile(directory / part.name)
                for index in range(source.num_row_groups):
                    piece = source.read_row_group(index)
                    if not piece.schema.remove_metadata().equals(schema.METRICS_SCHEMA):
                        raise ValueError(f"{directory / part.name} does not have the recorder's schema")
                    carry.append(piece)
                    carried += piece.num_rows
                    rows += piece.num_rows
                    if carried >= ROW_GROUP_ROWS:
                        block = pa.concat_tables(carry)
                        whole = (carried // ROW_GROUP_ROWS) * ROW_GROUP_ROWS
                        writer.write_table(block.slice(0, whole), row_group_size=ROW_GROUP_ROWS)
                        carry, carried = [block.slice(whole)], carried - whole
            if carried:
                writer.write_table(pa.concat_tables(carry), row_group_size=ROW_GROUP_ROWS)
        expected = sum(p.rows for p in group)
        if rows != expected:
            raise ValueError(f"read {rows} rows from {[p.name for p in group]}, their footers say {expected}")
        _fsync_path(temporary)
        if on_stage is not None:
            on_stage("written", name)
        os.replace(temporary, final)
    except BaseException:
        _unlink(temporary)
        raise
    _fsync_path(directory)
    if on_stage is not None:
        on_stage("renamed", name)
    return name


def compact_part_directory(
    directory: str | os.PathLike,
    *,
    final: bool = True,
    above: int = 0,
    target_rows: int = COMPACT_TARGET_ROWS,
    fanout: int = COMPACT_FANOUT,
    delete: bool = True,
    footers: Optional[dict[str, PartFile]] = None,
    on_stage: Optional[Callable[[str, str], None]] = None,
    stop: Optional[threading.Event] = None,
    after_merge: Optional[Callable[[str, list[str]], None]] = None,
) -> CompactionResult:
    """Merge one rank's part files (see :func:`plan_merges`) while it holds more than ``above`` live files.

    The caller must own the rank (hold its :class:`toolkit.runs.WriterLock`, as the recorder does): no
    other process may write or compact it meanwhile. The originals a merge replaces are deleted after
    the merged file is renamed into place (``delete=False``: returned in ``covered`` for the caller to
    delete later). ``on_stage`` also hears ``"deleted"`` after the originals of a merge are gone;
    ``after_merge(new file, originals)`` is called after each merge.
    """
    directory = Path(directory)
    result = CompactionResult()
    live, covered, overlapping = scan_part_files(directory, footers)
    result.left_out += [f"{directory / n}: overlaps another part file partially, left alone" for n in overlapping]
    result.left_out += [f"{directory / p.name}: damaged or with another schema, left as it is" for p in live if not p.mergeable]
    result.covered += covered
    while len(live) > above and (stop is None or not stop.is_set()):
        groups = plan_merges(live, target_rows=target_rows, fanout=fanout, final=final)
        if not groups:
            break
        for group in groups:
            if stop is not None and stop.is_set():
                break
            name = merge_part_files(directory, group, on_stage)
            originals = [p.name for p in group]
            merged = PartFile(name, group[0].first, group[-1].last, sum(p.rows for p in group), True)
            if footers is not None:
                footers[name] = merged
            result.merged.append((name, originals))
            result.rows_merged += merged.rows
            result.covered += originals
            if delete:
                for original in originals:
                    _unlink(directory / original)
                    if footers is not None:
                        footers.pop(original, None)
                if on_stage is not None:
                    on_stage("deleted", name)
            if after_merge is not None:
                after_merge(name, originals)
        live = scan_part_files(directory, footers)[0]
        if final:
            break
    if delete:
        for name in result.covered:
            _unlink(directory / name)
        result.deleted, result.covered = result.covered, []
    result.live_files = len(live)
    return result


def compact_run(
    run_path: str | os.PathLike,
    *,
    target_rows: int = COMPACT_TARGET_ROWS,
    on_stage: Optional[Callable[[str, str], None]] = None,
) -> dict[str, Union[CompactionResult, str]]:
    """Compact every rank of a run written earlier (``gradnorm compact``): per rank directory, the result,
    or why it was left alone. A rank whose writer lock another live process holds is never touched."""
    run_path = Path(run_path)
    metrics = run_path / schema.METRICS_DIR
    if not metrics.is_dir():
        raise runs.RunError(f"{run_path} has no {schema.METRICS_DIR}/ folder: not a run directory, or no records yet")
    outcome: dict[str, Union[CompactionResult, str]] = {}
    for rank_dir in sorted(p for p in metrics.iterdir() if p.is_dir() and p.name.startswith("rank=")):
        lock = runs.WriterLock(rank_dir)
        try:
            lock.acquire()
        except runs.RunError:
            outcome[rank_dir.name] = f"{rank_dir}: a live process is writing it; left alone (compact it after the run closes)"
            continue
        try:
            _tidy_rank_directory(rank_dir)
            outcome[rank_dir.name] = compact_part_directory(rank_dir, final=True, target_rows=target_rows, on_stage=on_stage)
        finally:
            lock.release()
    return outcome


def _tidy_rank_directory(directory: Path) -> None:
    """In a rank directory this process owns: remove the temporary files of a killed writer or compaction
    (never read by anyone) and the files a stopped compaction had already merged (covered by its file)."""
    for entry in os.listdir(directory):
        if entry.startswith(f".{schema.PART_PREFIX}") and entry.endswith(".tmp"):
            _unlink(directory / entry)
    for name in scan_part_files(directory)[1]:
        _unlink(directory / name)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _default_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def _last_sequence(directory: Path) -> int:
    """The highest sequence any part file's name covers (compacted ``part-<first>-<last>`` included), so a
    new part file is numbered after every row already written."""
    ranges = [r for r in map(schema.part_file_range, os.listdir(directory)) if r is not None]
    return max((last for _, last in ranges), default=0)


_ExceptHook = Callable[[type[BaseException], BaseException, Optional[TracebackType]], Any]


class _ExitHandling:
    """Closes the runs still open when the interpreter exits, with a status that says how it exited.

    Installed when the first recorder opens and removed when the last one closes, so that importing the
    toolkit changes nothing in the process: no ``atexit`` handler, no ``sys.excepthook`` replaced. While
    installed, an ``atexit`` handler closes every open recorder, and a ``sys.excepthook`` wrapper notes
    the uncaught exception that ends the program (it then calls the hook it replaced), so that those runs
    are marked ``failed`` (``interrupted`` for Ctrl-C) rather than ``finished``.
    """

    def __init__(self) -> None:
        # Re-entrant: a garbage collection inside these methods can run a session's finalizer, which
        # closes a recorder and comes back here on the same thread.
        self._lock = threading.RLock()
        self.open: set[Recorder] = set()
        self.uncaught: list[BaseException] = []
        self._previous_hook: _ExceptHook = sys.__excepthook__  # the hook ours replaced and calls
        self._hook_in_chain = False  # our wrapper is sys.excepthook, or inside a hook set after it
        self._exiting = False

    def opened(self, recorder: Recorder) -> None:
        with self._lock:
            first = not self.open
            self.open.add(recorder)
            if first:
                self._install()

    def closed(self, recorder: Recorder) -> None:
        with self._lock:
            if recorder not in self.open:
                return
            self.open.discard(recorder)
            if not self.open:
                self._uninstall()

    def _install(self) -> None:
        atexit.register(self.close_open_recorders)
        if not self._hook_in_chain:
            self._previous_hook = sys.excepthook
            sys.excepthook = self.note_uncaught
            self._hook_in_chain = True

    def _uninstall(self) -> None:
        if not self._exiting:
            # (Left alone while the handler itself runs: it is called once and then discarded anyway.)
            atexit.unregister(self.close_open_recorders)
        # An exception that ended no run (one shown at an interactive prompt) says nothing about later runs.
        self.uncaught.clear()
        if sys.excepthook == self.note_uncaught:
            sys.excepthook = self._previous_hook
            self._hook_in_chain = False
        # Otherwise someone set a hook after ours that may still call ours: it stays in their chain,
        # passing every exception on, and is reused (not wrapped again) by the next run.

    def note_uncaught(self, kind: type[BaseException], value: BaseException, traceback: Optional[TracebackType]) -> None:
        if self.open:
            self.uncaught.append(value)
        self._previous_hook(kind, value, traceback)

    def close_open_recorders(self) -> None:
        """At interpreter exit, flush every open recorder; an uncaught exception marks its runs failed.

        Ctrl-C (an uncaught KeyboardInterrupt) is the user stopping the run, not the run failing: ``interrupted``.
        """
        with self._lock:
            self._exiting = True
            if not self.uncaught:
                status = runs.FINISHED
            elif all(isinstance(exc, KeyboardInterrupt) for exc in self.uncaught):
                status = runs.INTERRUPTED
            else:
                status = runs.FAILED
            recorders = list(self.open)
        for recorder in recorders:
            recorder.close(status=status)


_EXIT = _ExitHandling()
