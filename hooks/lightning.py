"""PyTorch Lightning: a callback that attaches GradNorm to a LightningModule and logs its quantities.

Lightning calls ``backward()`` itself; the session never does, so the module only has to hand its task
losses to ``self.gradnorm.loss`` and return the result::

    class Model(L.LightningModule):
        def training_step(self, batch, batch_idx):
            losses = {"depth": ..., "normals": ...}
            return self.gradnorm.loss(losses, epoch=self.current_epoch)

    trainer = L.Trainer(callbacks=[gradnorm.hooks.lightning.GradNormCallback(lambda m: m.trunk[-1], gradnorm.GradNorm(1.5), runs_root="runs")])

The run is closed as ``finished`` at the end of fitting and as ``failed`` when fitting raises.

With a ``runs_root`` and a logger on the Trainer, the recorded per-task quantities (``gradnorm/weight/<task>``,
``gradnorm/grad_norm/<task>``, ...) also go to each of the Trainer's loggers (``logger.log_metrics``), at the
Trainer's logging steps (``log_every_n_steps``) and under the step Lightning logs them at. The values come from the recorder's writer (host floats,
toolkit/forwarding.py): the training thread reads nothing back from the device for them. The recorder then
flushes every ``log_every_n_steps`` steps (unless ``flush_every=`` is given), and a row reaches the logger
after its flush, one or two logging steps late, so each logged row carries ``gradnorm/step``, the step it
was recorded at; the logger's own step is the Trainer's. The rows of the last interval arrive as the run
closes, after the last logging step: they are in the records, not in the logger. At the end of fitting, E_t[w_i] and its drift
(``gradnorm/mean_weight/<task>``, ``gradnorm/drift/<task>``) go to each logger as metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union, cast

from gradnorm.toolkit import runs
from gradnorm.toolkit.balancers import Balancer
from gradnorm.toolkit.forwarding import DEFAULT_QUANTITIES, LoggerRows, add_logger_rows

from .session import Session, attach

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - exercised only without lightning
    raise ImportError("gradnorm.hooks.lightning needs the lightning package: pip install 'gradnorm-toolkit[lightning]'") from exc

#: The key of the session's state in Lightning's checkpoint.
CHECKPOINT_KEY = "gradnorm"


class GradNormCallback(pl.Callback):
    """Creates ``pl_module.gradnorm`` (a :class:`hooks.Session`) when fitting starts.

    Args:
        shared_layer: a function of the LightningModule returning the shared layer W (module or parameter).
        balancer: GradNorm or any toolkit balancer.
        heads: ``"auto"`` (the default: the session finds the heads and taps the norms from Lightning's
            backward), a function of the module returning the task heads in task order, or None for the
            general path (see ``heads=`` of :func:`hooks.attach`).
        log: log the recorded quantities to the Trainer's loggers (needs ``runs_root``: they come from the records).
        log_quantities: which quantities (default: weight, grad_norm, target_norm, loss_ratio, inverse_rate, skipped).
        options: the other keyword arguments of :func:`hooks.attach` (``run_name``, ``trackers``, ...).
    """

    def __init__(
        self,
        shared_layer: Callable[[pl.LightningModule], Any],
        balancer: Optional[Balancer] = None,
        *,
        heads: Union[None, bool, str, Callable[[pl.LightningModule], Sequence[Any]]] = "auto",
        runs_root: Optional[Union[str, Path]] = None,
        log: bool = True,
        log_quantities: Optional[Sequence[str]] = None,
        **options: Any,
    ) -> None:
        self.shared_layer = shared_layer
        self.balancer = balancer
        self.heads = heads
        self.runs_root = runs_root
        self.log = log
        self.log_quantities = tuple(DEFAULT_QUANTITIES if log_quantities is None else log_quantities)
        LoggerRows(name="lightning", quantities=self.log_quantities)  # bad names are refused here, not when fitting starts
        self.options = options
        self.session: Optional[Session] = None
        self.logged_rows: Optional[LoggerRows] = None
        self._loaded_state: Optional[dict[str, Any]] = None  # from on_load_checkpoint, for on_fit_start

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        options = dict(self.options)
        if self.heads is None or isinstance(self.heads, (str, bool)):
            options["heads"] = self.heads
        else:
            options["heads"] = list(self.heads(pl_module))
        self.logged_rows = None
        every = int(getattr(trainer, "log_every_n_steps", 50))  # set by the Trainer's logger connector
        if self.log and self.runs_root is not None and trainer.loggers and every > 0:
            self.logged_rows = add_logger_rows(options, name="lightning", every=every, quantities=self.log_quantities)
        loaded, self._loaded_state = self._loaded_state, None
        if loaded is not None and self.runs_root is not None and options.get("run_name") is not None:
            options["resume"] = True  # the checkpoint's run continues under its name, as its next attempt
        self.session = attach(self.shared_layer(pl_module), self.balancer, runs_root=self.runs_root, **options)
        if loaded is not None:
            self.session.load_state_dict(loaded)
        # nn.Module.__setattr__ is annotated for tensors and modules, though it keeps any other value as a plain attribute.
        cast(Any, pl_module).gradnorm = self.session

    # -- Lightning's checkpoints carry the session (docs/training-jobs.md) --------------------------------
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Put :meth:`Session.state_dict` into Lightning's checkpoint (key ``gradnorm``)."""
        if self.session is not None:  # (also after fitting ends: trainer.save_checkpoint then)
            checkpoint[CHECKPOINT_KEY] = self.session.state_dict()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Keep the checkpoint's session state; ``on_fit_start`` loads it into the new session, which then
        continues the balancer bit for bit and records into the checkpoint's run as its next attempt."""
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is not None:
            self._loaded_state = state

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Only at the Trainer's logging steps (the test its own logged values meet right after this hook), so
        # the steps between cost nothing; the values are host floats from the recorder's writer.
        if self.logged_rows is None or not _logs_now(trainer):
            return
        row = self.logged_rows.take()
        if row is not None:
            # Straight to the loggers, not through pl_module.log_dict: Lightning keeps a step metric's last value
            # and logs it again at every later logging step until it is logged anew, so a logging step at which
            # the writer had no row yet (it lags on a loaded machine) would repeat the previous row under a new
            # step. The values are host floats: nothing is read back from the device.
            step = _logging_step(trainer)
            for logger in trainer.loggers:
                logger.log_metrics(row, step=step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.session is not None:
            self.session.close(runs.FINISHED)
        summary = self.logged_rows.summary if self.logged_rows is not None else None
        if summary is not None:
            # self.log is not allowed at on_fit_end; the loggers are finalised after it, so this still lands.
            for logger in trainer.loggers:
                logger.log_metrics(summary.scalars(), step=trainer.global_step)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.session is not None:
            self.session.close(runs.INTERRUPTED if isinstance(exception, KeyboardInterrupt) else runs.FAILED)


def _logging_step(trainer: pl.Trainer) -> int:
    """The step Lightning gives the metrics it logs after this batch (optimizer steps taken before it)."""
    batches_that_stepped = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", None)
    return int(batches_that_stepped) if batches_that_stepped is not None else max(trainer.global_step - 1, 0)


def _logs_now(trainer: pl.Trainer) -> bool:
    """Whether the Trainer writes its loggers after this training batch (its own test, where it has one)."""
    connector = getattr(trainer, "_logger_connector", None)
    should = getattr(connector, "should_update_logs", None)
    return True if should is None else bool(should)
