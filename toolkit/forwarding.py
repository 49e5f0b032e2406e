"""Forwarding the recorder's per-task quantities to the trackers users already watch.

The recorder stays the single source: it writes part files from its writer thread, and right after a
part file is on disk it hands the rows it holds to a :class:`Forwarder` (its ``listeners``). The
forwarder picks every ``every``-th step of them, copies the chosen quantities out (host arrays the
writer already has; nothing on the device is read again) and queues them for each tracker, which sends
them from a thread of its own. So the training thread never makes a host synchronisation or a call per
step for forwarding, and a tracker that raises or hangs delays neither training nor the Parquet records:
its queue is bounded (``max_queued_steps``); what does not fit is dropped and counted.

At close, after the recorder has written its final ``run.json``, the forwarder computes the run's
time-averaged weights E_t[w_i] and their drift (:func:`gradnorm.toolkit.analysis.weight_average`, paper
sections 5.2-5.3), hands them to each tracker as summary values, closes the trackers (waiting at most
``close_timeout`` seconds for a slow one) and saves what happened in ``run.json`` under ``forwarding``::

    "forwarding": {"tensorboard": {"sent": 200, "failed": 0, "dropped": 0, "errors": 0, "last_error": null, ...}}

``sent``, ``failed`` and ``dropped`` count forwarded steps; ``errors`` counts the calls that raised. Only
rank 0 forwards (as Lightning's loggers log from rank 0); the other ranks' records stay in their part files.
"""

from __future__ import annotations

import collections
import math
import queue
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from . import runs, schema

#: Forward every 10th recorded step by default: curves in a tracker need no more, and a tracker's own
#: cost per scalar (TensorBoard's protobuf events, an HTTP batch for MLflow) stays off the CPU training needs.
DEFAULT_EVERY = 10

#: Per-task quantities a tracker can receive: the name a tracker shows -> the recorder's column.
TASK_QUANTITIES: dict[str, str] = {
    "weight": "weight",  # w_i(t) applied this step
    "grad_norm": "grad_norm",  # G_i(t) at the shared layer W (paper eq. 2)
    "target_norm": "target_norm",  # mean_j G_j(t) * r_i(t)^alpha, the target of G_i(t) (eq. 2)
    "loss_ratio": "loss_ratio",  # L_i(t) / L_i(0) (eq. 1)
    "inverse_rate": "inverse_rate",  # r_i(t) (eq. 1)
    "loss": "loss",  # L_i(t), unweighted (most users log it already)
    "balancer_weight": "balancer_weight",  # what the balancer would set (differs from weight in shadow mode)
}
#: Step-level quantities: one value per step.
STEP_QUANTITIES: dict[str, str] = {
    "skipped": "step_update_skipped",  # 1 where the weight update was skipped (non-finite input)
    "grad_loss": "step_grad_loss",  # L_grad(t) (eq. 2)
}
QUANTITIES: tuple[str, ...] = tuple(TASK_QUANTITIES) + tuple(STEP_QUANTITIES)
DEFAULT_QUANTITIES: tuple[str, ...] = ("weight", "grad_norm", "target_norm", "loss_ratio", "inverse_rate", "skipped")

#: Forwarded steps a tracker's queue holds before newer ones are dropped (counted): a tracker that is
#: down for a long time costs bounded memory.
DEFAULT_MAX_QUEUED_STEPS = 10_000
#: Seconds a run's close waits for the trackers to send what is queued, the summary, and to close.
DEFAULT_CLOSE_TIMEOUT = 30.0


@dataclass(frozen=True)
class RunInfo:
    """The run a tracker forwards: where it is recorded, its id (the folder name) and its tasks."""

    run_path: Path
    run_id: str
    tasks: tuple[str, ...]


@dataclass(frozen=True)
class Rows:
    """The forwarded steps of one part file: ``steps`` (n,), per-task values (n, T) and per-step values (n,)."""

    tasks: tuple[str, ...]
    steps: np.ndarray
    per_task: dict[str, np.ndarray]
    per_step: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.steps)

    def scalars(self, prefix: str = "gradnorm") -> Iterator[tuple[int, dict[str, float]]]:
        """Per step, ``{"<prefix>/<quantity>/<task>": value, "<prefix>/<quantity>": value}`` (step-level)."""
        for row, step in enumerate(self.steps.tolist()):
            values: dict[str, float] = {}
            for quantity, block in self.per_task.items():
                for task, value in zip(self.tasks, block[row].tolist()):
                    values[f"{prefix}/{quantity}/{task}"] = value
            for quantity, column in self.per_step.items():
                values[f"{prefix}/{quantity}"] = float(column[row])
            yield int(step), values


@dataclass(frozen=True)
class RunSummary:
    """What a sweep sorts runs by: E_t[w_i] over the analysis's default window and its half-to-half drift."""

    run_id: str
    status: str
    window: tuple[int, int]
    mean_weight: dict[str, float]
    drift: dict[str, float]
    convergence: float  # the largest drift across tasks

    def scalars(self, prefix: str = "gradnorm") -> dict[str, float]:
        values = {f"{prefix}/mean_weight/{task}": w for task, w in self.mean_weight.items()}
        values.update({f"{prefix}/drift/{task}": d for task, d in self.drift.items()})
        values[f"{prefix}/convergence"] = self.convergence
        return values


class Tracker:
    """Where forwarded quantities go. Subclasses: :class:`gradnorm.toolkit.trackers.TensorBoard`,
    :class:`~gradnorm.toolkit.trackers.WandB`, :class:`~gradnorm.toolkit.trackers.MLflow`, or your own.

    ``open`` runs on the training thread at the run's first step (the run exists then); ``send`` and
    ``send_summary`` run on the tracker's own thread, in step order; ``close`` runs there last. Whatever
    they raise is counted in ``run.json`` and never reaches training.

    Args:
        every: forward the steps that are multiples of ``every`` (of the steps the session records).
        quantities: which of :data:`QUANTITIES` to forward (default :data:`DEFAULT_QUANTITIES`).
    """

    #: The key of this tracker in ``run.json``'s ``forwarding``.
    name: str = "tracker"

    def __init__(self, *, every: int = DEFAULT_EVERY, quantities: Optional[Sequence[str]] = None) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1 (forward every k-th step), got {every!r}")
        chosen = DEFAULT_QUANTITIES if quantities is None else tuple(quantities)
        if isinstance(quantities, str):
            raise ValueError(f"quantities is a list of names, got the string {quantities!r}; e.g. quantities=[{quantities!r}]")
        unknown = [q for q in chosen if q not in QUANTITIES]
        if unknown or not chosen:
            raise ValueError(f"unknown quantities {unknown}; choose from {list(QUANTITIES)}" if unknown else "quantities is empty: nothing to forward")
        self.every = every
        self.quantities = chosen

    def open(self, run: RunInfo) -> None:
        """Called on the training thread when the run is created; find or create the tracker's run here."""

    def send(self, rows: Rows) -> None:
        """Send one batch of forwarded steps (on the tracker's thread). Every tracker defines it."""
        raise NotImplementedError(f"{type(self).__name__} does not define send(rows)")

    def send_summary(self, summary: RunSummary) -> None:
        """Log the run's summary values (on the tracker's thread, after the last ``send``)."""

    def close(self) -> None:
        """Flush and release what ``open`` made (on the tracker's thread, last)."""


TrackerSpec = Union[str, Tracker]


def resolve_trackers(spec: Union[None, TrackerSpec, Sequence[TrackerSpec]]) -> list[Tracker]:
    """``trackers=`` of :func:`gradnorm.attach`: a tracker, a name (``"tensorboard"``, ``"wandb"``,
    ``"mlflow"``: that tracker with its defaults), or a list of them."""
    if spec is None:
        return []
    items = [spec] if isinstance(spec, (str, Tracker)) else list(spec)
    resolved: list[Tracker] = []
    for item in items:
        if isinstance(item, Tracker):
            resolved.append(item)
        elif isinstance(item, str):
            from . import trackers  # the adapters, loaded only when a name asks for one

            resolved.append(trackers.by_name(item))
        else:
            raise TypeError(f"trackers= takes gradnorm trackers or their names ('tensorboard', 'wandb', 'mlflow'), got {type(item).__name__}: {item!r}")
    if len({id(t) for t in resolved}) != len(resolved):
        raise ValueError("trackers= lists the same tracker object twice; each tracker forwards one run")
    return resolved


@dataclass
class _Counts:
    sent: int = 0
    failed: int = 0
    dropped: int = 0
    errors: int = 0
    last_error: Optional[str] = None
    summary: str = "not sent"
    closed: bool = False

    def error(self, stage: str, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{stage}: {exc!r}"[:500]


@dataclass
class _Channel:
    """One tracker, its queue and its thread."""

    key: str
    tracker: Tracker
    counts: _Counts = field(default_factory=_Counts)
    queue: queue.Queue[Any] = field(default_factory=queue.Queue)
    queued_steps: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    thread: Optional[threading.Thread] = None
    active: bool = False
    warned: bool = False

    def run(self) -> None:
        while True:
            item = self.queue.get()
            if isinstance(item, Rows):
                with self.lock:
                    self.queued_steps -= len(item)
                try:
                    self.tracker.send(item)
                    self.counts.sent += len(item)
                except Exception as exc:
                    self.counts.failed += len(item)
                    self.fail("send", exc)
            elif isinstance(item, RunSummary):
                try:
                    self.tracker.send_summary(item)
                    self.counts.summary = "sent"
                except Exception as exc:
                    self.counts.summary = "failed"
                    self.fail("summary", exc)
            else:  # the close marker
                try:
                    self.tracker.close()
                except Exception as exc:
                    self.fail("close", exc)
                self.counts.closed = True
                return

    def fail(self, stage: str, exc: BaseException) -> None:
        self.counts.error(stage, exc)
        if not self.warned:
            self.warned = True
            warnings.warn(
                f"gradnorm: the {self.key} tracker failed in {stage} ({exc!r}); training and the Parquet records go on, "
                "failures are counted in run.json under 'forwarding' (warned once)",
                RuntimeWarning,
            )


class Forwarder:
    """The recorder listener that forwards its rows to ``trackers`` (see the module docstring)."""

    def __init__(
        self,
        trackers: Sequence[Tracker],
        *,
        max_queued_steps: int = DEFAULT_MAX_QUEUED_STEPS,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        if max_queued_steps < 1:
            raise ValueError(f"max_queued_steps must be >= 1, got {max_queued_steps}")
        if not (close_timeout >= 0 and math.isfinite(close_timeout)):
            raise ValueError(f"close_timeout must be a finite number of seconds >= 0, got {close_timeout!r}")
        self.max_queued_steps = int(max_queued_steps)
        self.close_timeout = float(close_timeout)
        self.channels: list[_Channel] = []
        for tracker in trackers:
            if not isinstance(tracker, Tracker):
                raise TypeError(f"a Forwarder takes Tracker objects, got {type(tracker).__name__}")
            key, n = tracker.name, 2
            while any(c.key == key for c in self.channels):
                key, n = f"{tracker.name}-{n}", n + 1
            self.channels.append(_Channel(key, tracker))
        self.tasks: tuple[str, ...] = ()
        self.run: Optional[RunInfo] = None
        self.rank = 0
        self.summary: Optional[RunSummary] = None
        self.summary_error: Optional[str] = None
        self._columns = {name: schema.RECORDED_FIELDS.index(name) for name in schema.RECORDED_FIELDS}

    # -- the recorder's listener --------------------------------------------------------------------
    def opened(self, recorder: Any) -> None:
        """On the training thread, when the run's recorder starts: open the trackers (rank 0 only)."""
        self.rank = int(recorder.rank)
        self.tasks = tuple(recorder.tasks)
        if self.rank != 0:
            return
        run_path = Path(recorder.run_path)
        self.run = RunInfo(run_path, run_path.name, self.tasks)
        for channel in self.channels:
            try:
                channel.tracker.open(self.run)
            except Exception as exc:
                channel.fail("open", exc)
                continue
            channel.active = True
            channel.thread = threading.Thread(target=channel.run, name=f"gradnorm-forward-{channel.key}", daemon=True)
            channel.thread.start()

    def rows_written(self, steps: Sequence[int], values: np.ndarray, defined: frozenset[str]) -> None:
        """On the recorder's writer thread: queue every ``every``-th step of the rows just written."""
        if self.rank != 0:
            return
        step_array = np.asarray(steps, dtype=np.int64)
        for channel in self.channels:
            if not channel.active:
                continue
            rows = self._select(channel.tracker, step_array, values, defined)
            if rows is None:
                continue
            with channel.lock:
                if channel.queued_steps + len(rows) > self.max_queued_steps:
                    channel.counts.dropped += len(rows)
                    continue
                channel.queued_steps += len(rows)
            channel.queue.put(rows)

    def closed(self, recorder: Any, status: str) -> None:
        """After the recorder's final run.json: summary values, close the trackers, save the counts."""
        if self.rank != 0 or self.run is None:
            return
        if any(c.active for c in self.channels):
            self.summary = self._summarize(status)
        deadline = time.monotonic() + self.close_timeout
        for channel in self.channels:
            if not channel.active:
                continue
            if self.summary is not None:
                channel.queue.put(self.summary)
            else:
                channel.counts.summary = f"none: {self.summary_error}"
            channel.queue.put(None)
        for channel in self.channels:
            if channel.thread is not None:
                channel.thread.join(timeout=max(0.0, deadline - time.monotonic()))
        try:
            runs.update_run_json(self.run.run_path, forwarding=self.report())
        except (OSError, runs.RunError) as exc:
            warnings.warn(f"gradnorm: could not save the trackers' counts in {self.run.run_path / schema.RUN_FILE}: {exc}", RuntimeWarning)

    # -- internals ----------------------------------------------------------------------------------
    def report(self) -> dict[str, dict[str, Any]]:
        """Per tracker: forwarded steps sent, failed and dropped, calls that raised, the last error, the summary."""
        out: dict[str, dict[str, Any]] = {}
        for channel in self.channels:
            counts = channel.counts
            entry: dict[str, Any] = {
                "sent": counts.sent,
                "failed": counts.failed,
                "dropped": counts.dropped,
                "errors": counts.errors,
                "last_error": counts.last_error,
                "summary": counts.summary,
                "every": channel.tracker.every,
                "quantities": list(channel.tracker.quantities),
            }
            if channel.active and not counts.closed:
                with channel.lock:
                    pending = channel.queued_steps
                entry["unfinished"] = f"still sending {pending} steps after the {self.close_timeout:g} s close timeout; left to its thread"
            out[channel.key] = entry
        return out

    def _select(self, tracker: Tracker, steps: np.ndarray, values: np.ndarray, defined: frozenset[str]) -> Optional[Rows]:
        chosen = np.flatnonzero(steps % tracker.every == 0)
        if not len(chosen):
            return None
        per_task: dict[str, np.ndarray] = {}
        per_step: dict[str, np.ndarray] = {}
        for quantity in tracker.quantities:
            column = TASK_QUANTITIES.get(quantity) or STEP_QUANTITIES[quantity]
            if column not in defined or column not in self._columns:
                continue  # this balancer does not produce it (e.g. no target norm for equal weights)
            index = self._columns[column]
            if quantity in TASK_QUANTITIES:
                per_task[quantity] = values[chosen, :, index].copy()
            else:
                per_step[quantity] = values[chosen, 0, index].copy()
        if not per_task and not per_step:
            return None
        return Rows(self.tasks, steps[chosen].copy(), per_task, per_step)

    def _summarize(self, status: str) -> Optional[RunSummary]:
        from .analysis import AnalysisError, weight_average  # DuckDB, only at the end of a forwarding run

        assert self.run is not None
        try:
            average = weight_average(self.run.run_path.parent, self.run.run_id)
        except (AnalysisError, runs.RunError, OSError) as exc:
            self.summary_error = str(exc)
            return None
        table = average.table
        drift = {str(t): float(d) for t, d in zip(table["task"], table["half_drift"])}
        return RunSummary(
            run_id=self.run.run_id,
            status=status,
            window=(average.start_step, average.end_step),
            mean_weight={str(t): float(w) for t, w in average.weights.items()},
            drift=drift,
            convergence=float(average.convergence),
        )


_UNSAFE = re.compile(r"[^A-Za-z0-9_.\- ]")


def safe_name(text: str) -> str:
    """``text`` with every character outside letters, digits, ``_ . - `` and space replaced by ``_``
    (MLflow metric keys and folder names allow only these)."""
    return _UNSAFE.sub("_", text) or "_"


#: Forwarded rows waiting for a logging step; beyond this the oldest go (a trainer that logs far less often than it records).
MAX_WAITING_ROWS = 1000


class LoggerRows(Tracker):
    """The rows forwarded for a trainer's own loggers (Lightning's, the Transformers Trainer's ``report_to``):
    filled on the forwarding thread, taken on the training thread at the trainer's logging steps."""

    name = "logger"

    def __init__(self, *, name: str = "logger", every: int = 50, quantities: Optional[Sequence[str]] = None) -> None:
        super().__init__(every=every, quantities=quantities)
        self.name = name
        self._rows: collections.deque[dict[str, float]] = collections.deque(maxlen=MAX_WAITING_ROWS)
        self._lock = threading.Lock()
        self.summary: Optional[RunSummary] = None

    def send(self, rows: Rows) -> None:
        with self._lock:
            self._rows.extend({"gradnorm/step": float(step), **values} for step, values in rows.scalars())

    def send_summary(self, summary: RunSummary) -> None:
        self.summary = summary

    def take(self) -> Optional[dict[str, float]]:
        """The oldest row not logged yet (rows arrive at about one per logging step, a flush late)."""
        with self._lock:
            return self._rows.popleft() if self._rows else None


def add_logger_rows(options: dict[str, Any], *, name: str, every: int, quantities: Sequence[str]) -> LoggerRows:
    """Add a :class:`LoggerRows` for a trainer that logs every ``every`` steps to ``attach``'s ``options``
    (after the user's own ``trackers``), and return it.

    Rows reach the trainer's logs after their flush, so the recorder flushes once per logging interval
    unless ``flush_every`` was given: the rows then arrive a step or two of that interval late.
    """
    rows = LoggerRows(name=name, every=every, quantities=quantities)
    options["trackers"] = resolve_trackers(options.get("trackers")) + [rows]
    options.setdefault("flush_every", every)
    return rows
