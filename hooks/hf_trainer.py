"""Hugging Face Transformers: GradNorm in a ``transformers.Trainer``.

The Trainer calls ``compute_loss`` for one scalar loss and backpropagates it itself (through
Accelerate's ``backward``); a multitask model has T losses. Two pieces, for two kinds of users:

- :class:`GradNormTrainer`, a ``Trainer`` whose ``compute_loss`` hands the per-task losses to the
  session and returns sum_i w_i L_i (paper section 3). It needs one function, ``task_losses(outputs,
  inputs) -> {task: loss}``, or a model whose outputs carry a ``losses`` mapping::

      callback = GradNormCallback(lambda m: m.encoder.pooler.dense, gradnorm.GradNorm(1.5), runs_root="runs")
      trainer = GradNormTrainer(model=model, args=args, train_dataset=data, gradnorm=callback, task_losses=fn)
      trainer.train()

- :class:`GradNormCallback`, a ``TrainerCallback`` that owns the session's life: it attaches at
  ``on_train_begin`` (to the unwrapped model the Trainer trains) and closes the run, removing every hook
  the session registered, at ``on_train_end``. A Trainer subclass of your own calls
  ``callback.session.loss(losses)`` in its ``compute_loss``.

What the Trainer does around the loss needs nothing special: Accelerate's loss scale is divided out of
the tapped norms, and gradient clipping comes after the backward, where the norms are already taken.
Gradient accumulation (``gradient_accumulation_steps=k``) is the session's ``accumulate=k``: each task's
loss and gradient at W are averaged over the k micro-batches, as the network's gradient is, and GradNorm
updates once per optimiser step; an epoch whose batches are not a multiple of k is refused (the
Trainer's last step of the epoch would take fewer).

Evaluation (``Trainer.evaluate`` or evaluation during training) runs the same ``compute_loss`` without
gradients: it returns the unweighted sum of the task losses (comparable across runs and methods, whatever
the weights) and does not step the session; the mean of each task's loss over the evaluation is recorded
as that step's validation loss (the overfitting view, paper section 5.2).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from gradnorm.toolkit import runs
from gradnorm.toolkit.balancers import Balancer
from gradnorm.toolkit.forwarding import DEFAULT_QUANTITIES, LoggerRows, add_logger_rows

from .session import Losses, Session, attach
from .shared_layer import SharedLayer

try:
    from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("gradnorm.hooks.hf_trainer needs transformers and accelerate: pip install 'gradnorm-toolkit[huggingface]'") from exc

#: ``task_losses(outputs, inputs)``: the model's outputs and the batch it was given -> one loss per task.
TaskLosses = Callable[[Any, Mapping[str, Any]], Losses]


def accumulation_steps(args: TrainingArguments, batches_per_epoch: Optional[int] = None) -> int:
    """The Trainer's ``gradient_accumulation_steps``, which the session takes as ``accumulate=``.

    The Trainer's last optimiser step of an epoch takes the remaining micro-batches, fewer than k where the
    epoch's batches are not a multiple of k; GradNorm's accumulation counts k micro-batches per step, so
    such an epoch is refused, naming both numbers.
    """
    steps = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
    if steps > 1 and batches_per_epoch is not None and batches_per_epoch % steps:
        raise ValueError(
            f"gradnorm: an epoch has {batches_per_epoch} batches, not a multiple of TrainingArguments(gradient_accumulation_steps={steps}): "
            f"the Trainer's last optimiser step of each epoch would take {batches_per_epoch % steps} micro-batches where GradNorm "
            f"accumulates {steps}; choose a batch size or a data set size that divides evenly"
        )
    return steps


def outputs_losses(outputs: Any, inputs: Mapping[str, Any]) -> Losses:
    """The default ``task_losses``: the ``losses`` mapping of the model's outputs (a dict or a ModelOutput)."""
    losses = outputs.get("losses") if isinstance(outputs, Mapping) else getattr(outputs, "losses", None)
    if losses is None:
        kind = type(outputs).__name__
        raise ValueError(
            f"gradnorm: the model's outputs ({kind}) carry no 'losses' mapping; return {{'losses': {{task: loss, ...}}, ...}} "
            "from forward(), or give GradNormTrainer(task_losses=fn), fn(outputs, inputs) -> {task: loss}"
        )
    return losses


class GradNormCallback(TrainerCallback):
    """Attaches a :class:`hooks.Session` when training starts and closes its run when training ends.

    Args:
        shared_layer: a function of the model (the unwrapped one the Trainer trains) returning the shared
            layer W, the last shared layer (paper 3.1): a module or a parameter.
        balancer: GradNorm or any toolkit balancer (default: equal weights, monitor only).
        heads: ``"auto"`` (the default: the session finds the heads at the first step and taps the norms
            from the Trainer's backward), a function of the model returning the task heads in task order,
            or None for the general path (see ``heads=`` of :func:`hooks.attach`).
        runs_root, options: the other keyword arguments of :func:`hooks.attach` (``run_name``, ``flush_every``, ...).
        log: with :class:`GradNormTrainer`, add the recorded per-task quantities (``gradnorm/weight/<task>``,
            ``gradnorm/grad_norm/<task>``, ...) to the Trainer's logs at its logging steps, so whatever
            ``report_to`` names (TensorBoard, W&B, MLflow) shows them beside the loss; each row carries its
            own ``gradnorm/step`` (it reaches the logs a flush late). Needs ``runs_root``: the values come from the records.
        log_quantities: which quantities (default: weight, grad_norm, target_norm, loss_ratio, inverse_rate, skipped).

    ``session`` is None before ``on_train_begin`` and stays, closed, after ``on_train_end``. A second
    ``train()`` with the same callback and balancer is refused (that balancer's weights and L_i(0) belong
    to the first run): give each ``train()`` a new callback. The Trainer's ``gradient_accumulation_steps``
    is passed on as ``accumulate=``.
    """

    def __init__(
        self,
        shared_layer: Callable[[nn.Module], SharedLayer],
        balancer: Optional[Balancer] = None,
        *,
        heads: Union[None, bool, str, Callable[[nn.Module], Sequence[nn.Module]]] = "auto",
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
        LoggerRows(name="trainer", quantities=self.log_quantities)  # bad names are refused here, not when training starts
        self.logged_rows: Optional[LoggerRows] = None
        self.options = options
        self.session: Optional[Session] = None
        self._attached = False  # the balancer is bound to its first run's tasks; a second train() starts over from its state

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Optional[nn.Module] = None, **kwargs: Any) -> None:
        loader = kwargs.get("train_dataloader")
        try:
            batches = len(loader) if loader is not None else None
        except TypeError:  # an iterable data set: its length is unknown
            batches = None
        accumulate = accumulation_steps(args, batches)
        if model is None:
            raise RuntimeError("gradnorm: the Trainer passed no model to on_train_begin")
        if self.session is not None and not self.session.closed:
            self.session.close(runs.INTERRUPTED)
        options = dict(self.options)
        # The Trainer backpropagates each micro-batch's loss divided by k and steps the optimiser every k-th:
        # the session accumulates the per-task losses and gradients at W over the same k (one update, one row).
        given = options.setdefault("accumulate", accumulate)
        if given != accumulate:
            raise ValueError(
                f"gradnorm: accumulate={given} was given, but the Trainer accumulates gradient_accumulation_steps={accumulate}; leave accumulate= out"
            )
        options["heads"] = self.heads if self.heads is None or isinstance(self.heads, (str, bool)) else list(self.heads(model))
        balancer = self.balancer
        if self._attached and balancer is not None:
            # The same balancer object would carry the last run's weights and L_i(0) into a new run as if it were its first step.
            raise RuntimeError("gradnorm: this GradNormCallback already trained once; give each train() a new callback (and a new balancer)")
        self.logged_rows = None
        every = _logging_every(args)
        if self.log and self.runs_root is not None and every is not None:
            self.logged_rows = add_logger_rows(options, name="trainer", every=every, quantities=self.log_quantities)
        self.session = attach(self.shared_layer(model), balancer, runs_root=self.runs_root, **options)
        self._attached = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.close(runs.FINISHED)

    def close(self, status: str = runs.FINISHED) -> None:
        """Close the session's run as ``status`` (``failed`` for a Trainer that raised) and remove its hooks."""
        if self.session is not None:
            self.session.close(status)

    def log_validation(self, losses: Mapping[str, float], state: TrainerState) -> None:
        if self.session is not None and not self.session.closed:
            self.session.log_validation(losses, step=state.global_step, epoch=_epoch(state))


def _logging_every(args: TrainingArguments) -> Optional[int]:
    """The Trainer's logging interval in optimiser steps, or None where it does not log by steps."""
    strategy = str(getattr(args.logging_strategy, "value", args.logging_strategy))
    steps = args.logging_steps
    if strategy != "steps" or not steps or steps < 1:  # a fraction of the run, or epochs: no fixed interval known here
        return None
    return int(steps)


def _epoch(state: TrainerState) -> int:
    """The epoch being trained: ``state.epoch`` is the fraction of epochs done (e + k/n after step k)."""
    return int(math.floor(state.epoch or 0.0))


class GradNormTrainer(Trainer):
    """A ``transformers.Trainer`` that balances the task losses with GradNorm (or any toolkit balancer).

    ``gradnorm``: the :class:`GradNormCallback` that owns the session (it is added to the Trainer's
    callbacks). ``task_losses(outputs, inputs)``: the per-task losses of a batch, from the model's
    outputs and the batch (default: ``outputs["losses"]``). ``model_inputs``: the keys of the batch the
    model is called with (default: all of them, as the Trainer does; the targets then reach the model
    too); given, the Trainer keeps every key of the batch (``remove_unused_columns=False``), since the
    targets that ``task_losses`` reads are not ``forward()``'s arguments. The other arguments are the Trainer's.
    A ``train()`` that raises closes the run as ``failed`` (``interrupted`` on Ctrl-C).
    """

    # compute_loss returns a per-batch mean, which the Trainer divides by the accumulation steps itself.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        gradnorm: GradNormCallback,
        task_losses: Optional[TaskLosses] = None,
        model_inputs: Optional[Sequence[str]] = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(gradnorm, GradNormCallback):
            raise TypeError(f"gradnorm= takes a gradnorm.hooks.hf_trainer.GradNormCallback, got {type(gradnorm).__name__}")
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), gradnorm]
        super().__init__(*args, **kwargs)
        if model_inputs is not None:
            # The Trainer would drop the batch's keys that forward() does not take: the targets task_losses reads.
            self.args.remove_unused_columns = False
        accumulation_steps(self.args)
        self.gradnorm = gradnorm
        self.task_losses: TaskLosses = task_losses if task_losses is not None else outputs_losses
        self.model_inputs = None if model_inputs is None else list(model_inputs)
        self._validation: dict[str, list[float]] = {}  # per task: sum of batch losses, batches, over one evaluation

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[Union[Tensor, int]] = None,
    ) -> Union[Tensor, tuple[Tensor, Any]]:
        if self.model_inputs is None:
            outputs = model(**inputs)
        else:
            missing = [key for key in self.model_inputs if key not in inputs]
            if missing:
                raise KeyError(f"gradnorm: model_inputs={self.model_inputs} names {missing}, which the batch lacks (it has {sorted(inputs)})")
            outputs = model(**{key: inputs[key] for key in self.model_inputs})
        losses = self.task_losses(outputs, inputs)
        session = self.gradnorm.session
        if session is not None and not session.closed and model.training and torch.is_grad_enabled():
            total = session.loss(losses, epoch=_epoch(self.state), step=self.state.global_step)
        else:
            total = self._evaluation_loss(losses)
        return (total, outputs) if return_outputs else total

    def _evaluation_loss(self, losses: Losses) -> Tensor:
        """Evaluation: the unweighted sum; each task's loss joins the evaluation's mean (a host copy per batch)."""
        named = dict(losses) if isinstance(losses, Mapping) else {f"task{i}": value for i, value in enumerate(losses)}
        session = self.gradnorm.session
        if session is not None and session.tasks is not None and not isinstance(losses, Mapping):
            named = dict(zip(session.tasks, losses))
        for task, value in named.items():
            entry = self._validation.setdefault(str(task), [0.0, 0.0])
            entry[0] += float(value.detach())
            entry[1] += 1
        return torch.stack([value.reshape(()) for value in named.values()]).sum()

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        self._validation = {}
        metrics = super().evaluate(*args, **kwargs)
        if self._validation:
            self.gradnorm.log_validation({task: total / count for task, (total, count) in self._validation.items()}, self.state)
        self._validation = {}
        return metrics

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's logs, with the oldest recorded row not logged yet (``GradNormCallback(log=True)``)
        added to a training step's logs: every ``report_to`` integration receives them from here."""
        rows = self.gradnorm.logged_rows
        if rows is not None and "loss" in logs:  # a training step's logs, not an evaluation's
            row = rows.take()
            if row is not None:
                logs = {**logs, **row}
        super().log(logs, *args, **kwargs)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().train(*args, **kwargs)
        except BaseException as exc:
            self.gradnorm.close(runs.INTERRUPTED if isinstance(exc, KeyboardInterrupt) else runs.FAILED)
            raise
