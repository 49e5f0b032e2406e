"""Per-step records: device buffer -> one host copy every N steps -> background Parquet writer.

The training thread only writes a (T, columns) tensor into a preallocated device buffer (no host sync);
every ``flush_every`` steps the filled block is copied to the host in one transfer (asynchronously into
pinned memory on CUDA) and handed to a writer thread. The writer builds an Arrow table and writes a
complete part file under a temporary name, then renames it: a reader never sees half a file, and a crash
loses at most the unflushed tail.

A write that fails (disk full, directory unwritable) does not stop training: the recorder warns once with
the path and the reason, keeps the batch and retries it with the next flush or heartbeat, so writing
resumes by itself when space comes back; rows it finally has to drop (beyond ``max_pending_rows``, or
still unwritable when the run closes) are counted in ``run.json`` as ``rows_lost``, never dropped silently.

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
from typing import Any, Callable, Mapping, Optional, Sequence, Union

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


#: Written by ranks other than 0 at close, in their own ``metrics/rank=<r>/`` folder.
RANK_FILE = runs.RANK_FILE


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
    ) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        if not (heartbeat_interval > 0 and math.isfinite(heartbeat_interval)):
            raise ValueError(f"heartbeat_interval must be a positive number of seconds, got {heartbeat_interval!r}")
        self.run_path = Path(run_path)
        runs.check_writable(self.run_path)
        self.heartbeat_interval = float(heartbeat_interval)
        self.tasks = list(tasks)
        self.flush_every = int(flush_every)
        self.rank = _default_rank() if rank is None else int(rank)
        self.max_pending_rows = int(max_pending_rows)
        self.directory = self.run_path / schema.METRICS_DIR / schema.rank_dir_name(self.rank)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_file = runs.WriterLock(self.directory)
        self._lock_file.acquire()
        self._sequence = _last_sequence(self.directory)
        self._buffer: Optional[Tensor] = None
        self._filled = 0
        self._defined: frozenset[str] = frozenset()
        self._steps: list[int] = []
        self._epochs: list[Optional[int]] = []
        self._wall: list[float] = []
        self._validation: list[tuple[int, Optional[int], float, str, float]] = []
        self._queue: queue.Queue[Optional[_Batch]] = queue.Queue()
        self._pending: list[_Batch] = []  # batches whose write failed, retried first
        self.rows_written = 0
        self.rows_lost = 0
        self.write_errors = 0
        self.skipped_updates = 0
        self.heartbeat_errors = 0
        self._last_beat = 0.0
        self._warned_write = False
        self._warned_skip = False
        self.closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._write_loop, name=f"gradnorm-recorder-{self.run_path.name}", daemon=True)
        self._thread.start()
        _EXIT.opened(self)

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
        """Flush, stop the writer and set the run's status and row counts in ``run.json``.

        ``closed_by`` (saved as such) says what closed a run its owner did not close, e.g. ``"garbage collection"``.
        """
        if self.closed:
            return
        if threading.current_thread() is self._thread:
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
        final: dict[str, Any] = {"status": status, "finished": time.time(), **self.counts()}
        if closed_by is not None:
            final["closed_by"] = closed_by
        try:
            if self.rank == 0:
                runs.update_run_json(self.run_path, **final)
            else:
                # run.json belongs to rank 0; another rank's counts stay beside its own part files.
                runs.write_json_atomic(self.directory / RANK_FILE, {"rank": self.rank, **final})
        except (OSError, runs.RunError) as exc:
            warnings.warn(f"gradnorm recorder: could not update {self.run_path / schema.RUN_FILE}: {exc}", RuntimeWarning, stacklevel=2)
        finally:
            self._lock_file.release()

    def counts(self) -> dict[str, int]:
        """Rows written and lost, failed writes and skipped weight updates so far (saved in ``run.json``)."""
        return {
            "rows_written": self.rows_written,
            "rows_lost": self.rows_lost,
            "write_errors": self.write_errors,
            "skipped_updates": self.skipped_updates,
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
        self._queue.put(batch)

    # -- writer thread ------------------------------------------------------------------------
    def _write_loop(self) -> None:
        self._beat(force=True)
        while True:
            try:
                batch = self._queue.get(timeout=self.heartbeat_interval)
            except queue.Empty:
                # Idle: beat, and retry what failed so writing resumes once the disk has room again.
                self._guarded(self._retry_pending)
                self._beat(force=True)
                continue
            try:
                if batch is None:
                    self._guarded(self._retry_pending)
                    self._give_up_pending()
                    return
                self._pending.append(batch)
                self._guarded(self._retry_pending)
                self._beat(force=False)
            finally:
                self._queue.task_done()

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
        target = self.run_path / schema.RUN_FILE if self.rank == 0 else self.directory / RANK_FILE
        try:
            if self.rank == 0:
                runs.beat(self.run_path, now, **self.counts())
            else:
                runs.write_json_atomic(target, {"rank": self.rank, "status": runs.RUNNING, "heartbeat": now, **self.counts()})
        except (OSError, runs.RunError) as exc:
            self.heartbeat_errors += 1
            self._warn_write_once(target, exc)

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
        num_tasks = len(self.tasks)
        while self._pending:
            batch = self._pending[0]
            try:
                table = self._table(batch)
            except Exception as exc:
                # A batch that cannot become a table never will: drop it, counted, instead of
                # blocking every later batch behind it.
                self._pending.pop(0)
                self.rows_lost += batch.num_rows(num_tasks)
                self.write_errors += 1
                warnings.warn(f"gradnorm recorder: dropped {batch.num_rows(num_tasks)} rows of {self.run_path.name!r}: {exc!r}", RuntimeWarning)
                continue
            try:
                self._write_table(table)
            except OSError as exc:
                self.write_errors += 1
                self._warn_write_once(self.directory, exc)
                self._drop_excess()
                return
            self._pending.pop(0)
            self.rows_written += table.num_rows
            self._note_skips(batch)

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
        columns: dict[str, list] = {name: [] for name in schema.COLUMNS}
        num_tasks = len(self.tasks)
        if batch.values is not None:
            if batch.ready is not None:
                batch.ready.synchronize()
            values = batch.values.numpy()
            n = len(batch.steps)
            columns["step"] = np.repeat(np.asarray(batch.steps, dtype=np.int64), num_tasks).tolist()
            columns["epoch"] = [e for e in batch.epochs for _ in range(num_tasks)]
            columns["wall_time"] = np.repeat(np.asarray(batch.wall_times, dtype=np.float64), num_tasks).tolist()
            columns["split"] = [schema.TRAIN] * (n * num_tasks)
            columns["task"] = self.tasks * n
            flat = values.reshape(n * num_tasks, len(schema.RECORDED_FIELDS))
            for index, name in enumerate(schema.RECORDED_FIELDS):
                if name not in batch.defined:
                    columns[name] = [None] * (n * num_tasks)
                elif name == "step_update_skipped":
                    columns[name] = (flat[:, index] > 0.5).tolist()
                else:
                    columns[name] = flat[:, index].tolist()
        for step, epoch, wall, task, loss in batch.validation:
            columns["step"].append(step)
            columns["epoch"].append(epoch)
            columns["wall_time"].append(wall)
            columns["split"].append(schema.VALIDATION)
            columns["task"].append(task)
            for name in schema.COLUMNS[5:]:
                columns[name].append(loss if name == "loss" else None)
        return pa.table(columns, schema=schema.METRICS_SCHEMA)

    def _write_table(self, table: pa.Table) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = schema.part_file_name(self._sequence + 1)
        final = self.directory / name
        temporary = self.directory / f".{name}.tmp"
        try:
            pq.write_table(table, temporary, compression="zstd")
            os.replace(temporary, final)
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise
        self._sequence += 1


def _default_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def _last_sequence(directory: Path) -> int:
    last = 0
    for entry in directory.glob(f"{schema.PART_PREFIX}*{schema.PART_SUFFIX}"):
        digits = entry.name[len(schema.PART_PREFIX) : -len(schema.PART_SUFFIX)]
        if digits.isdigit():
            last = max(last, int(digits))
    return last


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
