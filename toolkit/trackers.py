"""Tracker adapters: TensorBoard, Weights & Biases and MLflow, fed by :mod:`gradnorm.toolkit.forwarding`.

Each is an optional extra, imported when the adapter is made (``pip install 'gradnorm-toolkit[tensorboard]'``,
``[wandb]``, ``[mlflow]``); without it the constructor says which to install. What they show, per
forwarded step: ``gradnorm/<quantity>/<task>`` (W&B, MLflow); step-level values (``gradnorm/skipped``)
have no task. At the end of the run: E_t[w_i] and its drift between the halves of the window
(``gradnorm/mean_weight/<task>``, ``gradnorm/drift/<task>``, ``gradnorm/convergence``; paper 5.2-5.3)
as summary values a sweep sorts by.

TensorBoard draws one chart per tag and one curve per run, so there each task is a sub-run and a
quantity is one tag: its task curves overlay in one chart. Its Scalars page groups charts by the tag's
first part and sorts the groups by name (``-`` after the end of a name, ``_`` before it), so the weights
come first in their own section (``gradnorm/weight``), then the quantities behind them (``gradnorm-balance/grad_norm``, ``target_norm``, ``loss_ratio``,
``inverse_rate``, ``skipped``), then the summary (``gradnorm-summary/mean_weight``, ``drift``, ``text``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .forwarding import DEFAULT_EVERY, Rows, RunInfo, RunSummary, Tracker, safe_name

__all__ = ["MLflow", "TensorBoard", "WandB", "by_name"]


def _missing(package: str, extra: str, exc: ImportError) -> ImportError:
    return ImportError(f"the {extra} tracker needs the {package} package: pip install 'gradnorm-toolkit[{extra}]' (or pip install {package}); {exc}")


class TensorBoard(Tracker):
    """Scalars in TensorBoard event files, through ``torch.utils.tensorboard.SummaryWriter``.

    Args:
        log_dir: the folder to write (default: ``<run>/tensorboard`` inside the run's directory, so that
            ``tensorboard --logdir runs`` shows every run). Each task's curves go to ``<log_dir>/<task>``
            as tags ``gradnorm/weight``, ``gradnorm-balance/grad_norm``, ... (see :func:`tensorboard_tag`);
            step-level ones and the summary text to ``log_dir`` itself.
        writer: a ``SummaryWriter`` of yours instead: the task sub-runs go under its ``log_dir``, the
            step-level scalars into it; it is flushed at the end, not closed.
        every, quantities: see :class:`gradnorm.toolkit.forwarding.Tracker`.
    """

    name = "tensorboard"

    def __init__(
        self,
        log_dir: Union[None, str, Path] = None,
        *,
        writer: Any = None,
        every: int = DEFAULT_EVERY,
        quantities: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__(every=every, quantities=quantities)
        if log_dir is not None and writer is not None:
            raise ValueError("give TensorBoard either log_dir= or writer=, not both (the writer has its own log_dir)")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise _missing("tensorboard", "tensorboard", exc) from None
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(f"writer= takes a torch.utils.tensorboard.SummaryWriter, got {type(writer).__name__}")
        self._writer_class = SummaryWriter
        self.log_dir = None if log_dir is None else Path(log_dir)
        self._user_writer = writer
        self.writer: Any = writer
        self.task_writers: dict[str, Any] = {}
        self.task_dirs: dict[str, Path] = {}

    def open(self, run: RunInfo) -> None:
        if self._user_writer is not None:
            self.log_dir = Path(self._user_writer.log_dir)
        else:
            if self.log_dir is None:
                self.log_dir = run.run_path / "tensorboard"
            self.writer = self._writer_class(log_dir=str(self.log_dir))
        assert self.log_dir is not None
        used: set[str] = set()
        for task in run.tasks:
            folder, n = safe_name(task), 2
            while folder in used:
                folder, n = f"{safe_name(task)}-{n}", n + 1
            used.add(folder)
            self.task_dirs[task] = self.log_dir / folder
            self.task_writers[task] = self._writer_class(log_dir=str(self.task_dirs[task]))

    def send(self, rows: Rows) -> None:
        for row, step in enumerate(rows.steps.tolist()):
            for quantity, block in rows.per_task.items():
                for task, value in zip(rows.tasks, block[row].tolist()):
                    self.task_writers[task].add_scalar(tensorboard_tag(quantity), value, step)
            for quantity, column in rows.per_step.items():
                self.writer.add_scalar(tensorboard_tag(quantity), float(column[row]), step)

    def send_summary(self, summary: RunSummary) -> None:
        step = summary.window[1]
        for task in summary.mean_weight:
            writer = self.task_writers.get(task)
            if writer is None:
                continue
            writer.add_scalar("gradnorm-summary/mean_weight", summary.mean_weight[task], step)
            writer.add_scalar("gradnorm-summary/drift", summary.drift.get(task, float("nan")), step)
        lines = [
            f"E_t[w_i] of run `{summary.run_id}` ({summary.status}) over steps {summary.window[0]}-{summary.window[1]}; "
            f"largest drift between the window's halves {summary.convergence:.3g}",
            "",
            "| task | E_t[w_i] | drift |",
            "|---|---|---|",
        ]
        lines += [f"| {task} | {w:.4g} | {summary.drift.get(task, float('nan')):.3g} |" for task, w in summary.mean_weight.items()]
        self.writer.add_text("gradnorm-summary/text", "\n".join(lines), step)

    def close(self) -> None:
        for writer in self.task_writers.values():
            writer.close()
        if self.writer is not None:
            if self._user_writer is None:
                self.writer.close()
            else:
                self.writer.flush()


def tensorboard_tag(quantity: str) -> str:
    """The TensorBoard tag of a forwarded quantity: the weights (``weight``, ``balancer_weight``) in the
    ``gradnorm`` section, which TensorBoard shows first, every other quantity in ``gradnorm-balance``."""
    return f"gradnorm/{quantity}" if quantity in ("weight", "balancer_weight") else f"gradnorm-balance/{quantity}"


class WandB(Tracker):
    """Weights & Biases: ``log`` into your active run (``wandb.run``), or into one made by ``wandb.init``.

    Args:
        run: the W&B run to log into (default: ``wandb.run`` when the run starts, else
            ``wandb.init(**init)``, finished at the end).
        init: keyword arguments of that ``wandb.init`` (``project=``, ``mode="offline"``, ...).
        every, quantities: see :class:`gradnorm.toolkit.forwarding.Tracker`.

    The x axis is the training step the session records (``step=`` of ``session.loss``, else its own
    count). In a run this tracker made, each forwarded step is logged with ``step=`` that step. Into your
    own run it cannot pass ``step=`` (W&B drops a step lower than one already logged, and these rows come
    a flush late), so it logs ``gradnorm/step`` with them and declares it their x axis
    (``define_metric("gradnorm/*", step_metric="gradnorm/step")``); each forwarded step is then one more
    row of W&B's own ``_step``. If your code passes ``step=`` to ``wandb.log``, declare an x axis of your
    own for your metrics, or give this tracker a run of its own (``run=``).
    """

    name = "wandb"

    def __init__(
        self, *, run: Any = None, init: Optional[dict[str, Any]] = None, every: int = DEFAULT_EVERY, quantities: Optional[Sequence[str]] = None
    ) -> None:
        super().__init__(every=every, quantities=quantities)
        try:
            import wandb
        except ImportError as exc:
            raise _missing("wandb", "wandb", exc) from None
        if run is not None and init is not None:
            raise ValueError("give WandB either run= or init=, not both (init= makes a run)")
        self._wandb = wandb
        self.run: Any = run
        self.init = dict(init or {})
        self.owns_run = False

    def open(self, run: RunInfo) -> None:
        if self.run is None:
            self.run = self._wandb.run
        if self.run is None:
            options: dict[str, Any] = {"name": run.run_id, "config": {"gradnorm_run": str(run.run_path)}}
            options.update(self.init)
            self.run = self._wandb.init(**options)
            self.owns_run = True
        else:
            self.run.define_metric("gradnorm/step")
            self.run.define_metric("gradnorm/*", step_metric="gradnorm/step")

    def send(self, rows: Rows) -> None:
        for step, values in rows.scalars():
            if self.owns_run:
                self.run.log(values, step=step)
            else:
                self.run.log({"gradnorm/step": step, **values})

    def send_summary(self, summary: RunSummary) -> None:
        self.run.summary.update(summary.scalars())

    def close(self) -> None:
        if self.owns_run:
            self.run.finish()


class MLflow(Tracker):
    """MLflow: metrics logged in batches (``MlflowClient.log_batch``, one call per 1000 values) into the run
    active when the session's run starts (``mlflow.start_run``), else into a run made in ``experiment``
    (default: MLflow's current experiment), ended at the end.

    Args:
        run_id: the MLflow run to log into instead of the active one.
        experiment: the experiment's name for a run this tracker makes (created when missing).
        tracking_uri: where MLflow stores runs (default: ``mlflow.get_tracking_uri()``).
        every, quantities: see :class:`gradnorm.toolkit.forwarding.Tracker`.

    Metric keys are ``gradnorm/<quantity>/<task>`` with characters MLflow refuses in a task's name
    replaced by ``_``.
    """

    name = "mlflow"
    #: MLflow's limit of metrics per log_batch call.
    BATCH = 1000

    def __init__(
        self,
        *,
        run_id: Optional[str] = None,
        experiment: Optional[str] = None,
        tracking_uri: Optional[str] = None,
        every: int = DEFAULT_EVERY,
        quantities: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__(every=every, quantities=quantities)
        try:
            import mlflow
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise _missing("mlflow", "mlflow", exc) from None
        if run_id is not None and experiment is not None:
            raise ValueError("give MLflow either run_id= or experiment= (for a run it makes), not both")
        self._mlflow = mlflow
        self._metric = Metric
        self._client_class = MlflowClient
        self.run_id = run_id
        self.experiment = experiment
        self.tracking_uri = tracking_uri
        self.client: Any = None
        self.owns_run = False
        self._keys: dict[str, str] = {}

    def open(self, run: RunInfo) -> None:
        uri = self.tracking_uri or self._mlflow.get_tracking_uri()
        self.client = self._client_class(tracking_uri=uri)
        if self.run_id is None and self.experiment is None:
            active = self._mlflow.active_run()  # the training thread's active run (MLflow keeps one per thread)
            if active is not None:
                self.run_id = active.info.run_id
        if self.run_id is None:
            if self.experiment is not None:
                found = self.client.get_experiment_by_name(self.experiment)
                experiment_id = found.experiment_id if found is not None else self.client.create_experiment(self.experiment)
            else:
                experiment_id = self._mlflow.tracking.fluent._get_experiment_id() or "0"
            created = self.client.create_run(experiment_id, run_name=run.run_id, tags={"gradnorm.run": str(run.run_path)})
            self.run_id = created.info.run_id
            self.owns_run = True
        self._keys = {task: safe_name(task) for task in run.tasks}

    def _log(self, metrics: list[Any]) -> None:
        for start in range(0, len(metrics), self.BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + self.BATCH])

    def send(self, rows: Rows) -> None:
        now = int(time.time() * 1000)
        metrics = []
        for row, step in enumerate(rows.steps.tolist()):
            for quantity, block in rows.per_task.items():
                for task, value in zip(rows.tasks, block[row].tolist()):
                    metrics.append(self._metric(f"gradnorm/{quantity}/{self._keys[task]}", value, now, step))
            for quantity, column in rows.per_step.items():
                metrics.append(self._metric(f"gradnorm/{quantity}", float(column[row]), now, step))
        self._log(metrics)

    def send_summary(self, summary: RunSummary) -> None:
        now = int(time.time() * 1000)
        values = {f"gradnorm/mean_weight/{safe_name(t)}": w for t, w in summary.mean_weight.items()}
        values.update({f"gradnorm/drift/{safe_name(t)}": d for t, d in summary.drift.items()})
        values["gradnorm/convergence"] = summary.convergence
        self._log([self._metric(key, value, now, summary.window[1]) for key, value in values.items()])

    def close(self) -> None:
        if self.owns_run:
            self.client.set_terminated(self.run_id)


_BY_NAME: dict[str, type[Tracker]] = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def by_name(name: str) -> Tracker:
    """The tracker called ``name`` with its defaults (``trackers="tensorboard"``)."""
    kind = _BY_NAME.get(name.strip().lower())
    if kind is None:
        raise ValueError(f"unknown tracker {name!r}; the trackers are {sorted(_BY_NAME)} (or pass a Tracker object)")
    return kind()
