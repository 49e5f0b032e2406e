"""What every balancer shares: task bookkeeping, the initial-loss reference and the per-step record.

A balancer turns the T per-task losses of a step into weights w_i(t). The hook layer (``hooks``)
measures the unweighted gradient norms ||grad_W L_i|| at the shared layer when a balancer (or the
monitor) asks for them, and hands them to :meth:`Balancer.update`. Everything here runs on the
device without host synchronisation, except the one check of the initial losses at the first step.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from gradnorm.toolkit import schema

InitialLossSpec = Union[str, int, Sequence[float], Mapping[str, float]]


@dataclass
class StepStats:
    """One step's per-task values (each a (T,) tensor on the device) and step-level values.

    Fields follow :data:`toolkit.schema.TASK_METRICS` / ``STEP_METRICS``; a field a balancer does not
    define is None and is written as null.
    """

    loss: Tensor
    loss_ratio: Tensor
    inverse_rate: Tensor
    weight: Tensor
    grad_norm: Optional[Tensor] = None
    target_norm: Optional[Tensor] = None
    balancer_weight: Optional[Tensor] = None
    step_grad_loss: Optional[Tensor] = None
    step_update_skipped: Optional[Tensor] = None


def check_initial_losses(tasks: Sequence[str], values: Sequence[float], source: str) -> None:
    """Loss ratios divide by L_i(0) (paper eq. 1): it must be finite and strictly positive."""
    for task, value in zip(tasks, values):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(
                f"initial loss L(0) of task {task!r} is {value!r} ({source}); loss ratios L/L(0) "
                "need a finite, strictly positive initial loss. Shift or rescale that loss, or pass "
                "initial_loss={...} with a positive reference value for it"
            )


class InitialLoss:
    """The reference L_i(0) of the loss ratio (paper 3.1).

    ``"first"`` (the paper's choice): the first step's loss. An int k: the mean of the first k steps'
    losses; during those k steps the reference is the running mean so far. A mapping or sequence: fixed
    prior values (the survey's 1.2, e.g. log K for a K-class cross-entropy).
    """

    def __init__(self, spec: InitialLossSpec = "first") -> None:
        if isinstance(spec, str):
            if spec != "first":
                raise ValueError(f"initial_loss must be 'first', an int k, or explicit values; got {spec!r}")
            self._first_k = 1
        elif isinstance(spec, bool):
            raise ValueError(f"initial_loss must be 'first', an int k, or explicit values; got {spec!r}")
        elif isinstance(spec, int):
            if spec < 1:
                raise ValueError(f"initial_loss=k needs k >= 1, got {spec}")
            self._first_k = spec
        else:
            self._first_k = 0
        self.spec = spec
        self._sum: Optional[Tensor] = None
        self._seen = 0
        self.value: Optional[Tensor] = None

    def config(self) -> Any:
        return self.spec if not isinstance(self.spec, Mapping) else dict(self.spec)

    def bind(self, tasks: Sequence[str], device: torch.device, dtype: torch.dtype) -> None:
        if self._first_k:
            return
        if isinstance(self.spec, Mapping):
            missing = [t for t in tasks if t not in self.spec]
            extra = [t for t in self.spec if t not in tasks]
            if missing or extra:
                raise ValueError(f"initial_loss values: missing tasks {missing}, unknown tasks {extra}")
            values = [float(self.spec[t]) for t in tasks]
        else:
            values = [float(v) for v in self.spec]
            if len(values) != len(tasks):
                raise ValueError(f"initial_loss has {len(values)} values for {len(tasks)} tasks")
        check_initial_losses(tasks, values, "given as initial_loss")
        self.value = torch.tensor(values, device=device, dtype=dtype)

    def observe(self, tasks: Sequence[str], losses: Tensor) -> Tensor:
        """Feed one step's losses; return the reference to divide by for this step."""
        if self._seen < self._first_k:
            detached = losses.detach()
            if self._seen == 0:
                # The one host synchronisation of the run: a bad L(0) must fail loudly and at once.
                check_initial_losses(tasks, detached.tolist(), "the first step's loss")
                self._sum = detached.clone()
            else:
                self._sum = self._sum + detached
            self._seen += 1
            self.value = self._sum / self._seen
        assert self.value is not None
        return self.value


class Balancer(ABC):
    """Base class of all loss-balancing methods.

    Subclasses implement :meth:`_update`; the base keeps the task list, the current weights and the
    loss-ratio reference. ``needs_grad_norms`` tells the hook layer whether ||grad_W L_i|| must be
    measured for the method itself (the monitor may measure them anyway).
    """

    name: str = "balancer"
    needs_grad_norms: bool = False
    #: Where the method needs this step's per-task gradients before the total loss is formed: None,
    #: ``"shared_layer"`` (grad_W L_i at the shared layer W) or ``"representation"`` (grad_Z L_i at the
    #: shared layer's output Z, the MGDA-UB bound of Sener & Koltun, 2018, section 3.3).
    task_gradients: Optional[str] = None
    #: True for methods whose weights depend on this step's own losses or gradients (see
    #: :meth:`step_weights`); the hook layer then asks for them before it forms the total loss.
    uses_current_step: bool = False
    #: True for gradient surgery (PCGrad): the loss is summed with unit weights and the step weights are
    #: applied to the gradient at the shared representation only, so the heads see their own gradients.
    weights_act_on_representation: bool = False

    def __init__(self, initial_loss: InitialLossSpec = "first") -> None:
        self.tasks: list[str] = []
        self.initial_loss = InitialLoss(initial_loss)
        self._weights: Optional[Tensor] = None

    # -- set-up -----------------------------------------------------------------------------------
    def bind(self, tasks: Sequence[str], device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        """Fix the task list (order matters) and create the state on ``device``."""
        if len(tasks) < 2:
            raise ValueError(f"a multitask balancer needs at least two tasks, got {list(tasks)}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task names must be unique, got {list(tasks)}")
        self.tasks = list(tasks)
        self.initial_loss.bind(self.tasks, device, dtype)
        self._weights = self.initial_weights(device, dtype)

    def initial_weights(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        return torch.ones(len(self.tasks), device=device, dtype=dtype)

    @property
    def bound(self) -> bool:
        return self._weights is not None

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def weights(self) -> Tensor:
        """The current weights w_i(t), detached: the network's loss never sends gradient into w."""
        if self._weights is None:
            raise RuntimeError("balancer is not bound to tasks yet; call bind() or hand it a first step")
        return self._weights.detach()

    def config(self) -> dict[str, Any]:
        """Name and hyperparameters, written to ``run.json``."""
        return {"name": self.name, "initial_loss": self.initial_loss.config()}

    def step_weights(self, losses: Tensor, grad_norms: Optional[Tensor], task_grads: Optional[Tensor]) -> Tensor:
        """The weights applied in this step, for methods with ``uses_current_step``.

        ``losses`` are this step's detached losses (T,), ``grad_norms`` the unweighted ||grad_W L_i||
        when measured, ``task_grads`` the (T, D) per-task gradients in the space ``task_gradients``
        names. The result becomes :meth:`weights` until the next step. Other methods keep w(t).
        """
        return self.weights()

    # -- per step ---------------------------------------------------------------------------------
    def update(self, losses: Tensor, grad_norms: Optional[Tensor] = None, applied: Optional[Tensor] = None) -> StepStats:
        """Take one step's detached losses (T,) and, if measured, the unweighted norms ||grad_W L_i||.

        ``applied`` is the weight vector training actually used (shadow mode: the user's own weights);
        by default the balancer's own. Returns the step's record; the new weights are in effect after.
        """
        losses = losses.detach()
        reference = self.initial_loss.observe(self.tasks, losses)
        loss_ratio = losses / reference
        inverse_rate = loss_ratio / loss_ratio.mean()
        own = self.weights()
        applied = own if applied is None else applied.detach()
        stats = self._update(losses, loss_ratio, inverse_rate, own, grad_norms)
        if grad_norms is not None:
            # The gradient that really reached W from task i this step: the applied weight times n_i
            # (per-channel norms combine into the whole-weight norm).
            whole = grad_norms.norm(dim=1) if grad_norms.dim() == 2 else grad_norms
            stats.grad_norm = applied * whole
        stats.weight = applied
        stats.balancer_weight = own
        return stats

    @abstractmethod
    def _update(self, losses: Tensor, loss_ratio: Tensor, inverse_rate: Tensor, weights: Tensor, grad_norms: Optional[Tensor]) -> StepStats:
        """Compute this step's record and set ``self._weights`` to w(t+1)."""


RECORDED_FIELDS = schema.RECORDED_FIELDS


def stats_matrix(stats: StepStats, num_tasks: int, dtype: Optional[torch.dtype] = None) -> tuple[Tensor, frozenset[str]]:
    """Pack a :class:`StepStats` into a (T, len(RECORDED_FIELDS)) device tensor in schema order.

    Returns the matrix and the names of the fields the balancer defined; the others hold NaN in the
    matrix and are written as null, so "not applicable" never reads as a measured NaN. The matrix keeps
    the losses' floating dtype unless ``dtype`` is given (the recorder's buffer converts on copy), so the
    hot path costs one stack and no per-field conversions.
    """
    reference = stats.loss
    target = dtype or (reference.dtype if reference.dtype.is_floating_point else torch.float32)
    parts = []
    defined = set()
    nan: Optional[Tensor] = None
    for name in RECORDED_FIELDS:
        value = getattr(stats, name)
        if value is None:
            if nan is None:
                nan = torch.full((num_tasks,), float("nan"), device=reference.device, dtype=target)
            parts.append(nan)
            continue
        defined.add(name)
        value = value.detach()
        if value.dtype != target:
            value = value.to(target)
        parts.append(value.expand(num_tasks))
    return torch.stack(parts, dim=1), frozenset(defined)
