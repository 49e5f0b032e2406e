"""What every balancer shares: task bookkeeping, the initial-loss reference and the per-step record.

A balancer turns the T per-task losses of a step into weights w_i(t). The hook layer (``hooks``)
measures the unweighted gradient norms ||grad_W L_i|| at the shared layer when a balancer (or the
monitor) asks for them, and hands them to :meth:`Balancer.update`. Everything here runs on the
device without host synchronisation, except the one check of the initial losses at the first step.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from gradnorm.toolkit import schema

from .state import STATE_FORMAT, cloned, config_differences, expect_count, expect_mapping, expect_tensor, plain, restored, saved

InitialLossSpec = Union[str, int, Sequence[float], Mapping[str, float]]

#: Where a method needs this step's per-task gradients (:attr:`Balancer.task_gradients`).
TaskGradients = Literal["shared_layer", "representation"]

INITIAL_LOSS_STATE = ("value", "sum", "seen")
BALANCER_STATE = ("format", "class", "config", "tasks", "step_count", "weights", "initial_loss", "method")


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
    present: Optional[Tensor] = None  # (T,) 1 where the task's loss was handed in, 0 where absent
    step_measured: Optional[Tensor] = None  # 1 where the norms were measured this step (update_every)


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
        self._explicit: Optional[Union[Sequence[float], Mapping[str, float]]] = None
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
            self._explicit = spec
        self.spec = spec
        self._sum: Optional[Tensor] = None
        self._seen = 0
        # Per task, once a step has lacked some task (see observe_present); None while every step had all.
        self._seen_tasks: Optional[list[int]] = None
        self.value: Optional[Tensor] = None

    def config(self) -> Any:
        return self.spec if not isinstance(self.spec, Mapping) else dict(self.spec)

    def bind(self, tasks: Sequence[str], device: torch.device, dtype: torch.dtype) -> None:
        explicit = self._explicit
        if explicit is None:
            return
        if isinstance(explicit, Mapping):
            missing = [t for t in tasks if t not in explicit]
            extra = [t for t in explicit if t not in tasks]
            if missing or extra:
                raise ValueError(f"initial_loss values: missing tasks {missing}, unknown tasks {extra}")
            values = [float(explicit[t]) for t in tasks]
        else:
            values = [float(v) for v in explicit]
            if len(values) != len(tasks):
                raise ValueError(f"initial_loss has {len(values)} values for {len(tasks)} tasks")
        check_initial_losses(tasks, values, "given as initial_loss")
        self.value = torch.tensor(values, device=device, dtype=dtype)

    def observe(self, tasks: Sequence[str], losses: Tensor) -> Tensor:
        """Feed one step's losses; return the reference to divide by for this step."""
        if self._seen < self._first_k:
            detached = losses.detach()
            if self._sum is None:  # the first step (no step seen yet)
                # The one host synchronisation of the run: a bad L(0) must fail loudly and at once.
                check_initial_losses(tasks, detached.tolist(), "the first step's loss")
                self._sum = detached.clone()
            else:
                self._sum = self._sum + detached
            self._seen += 1
            self.value = self._sum / self._seen
        return self.current()

    def observe_present(self, tasks: Sequence[str], losses: Tensor, present: Sequence[bool]) -> Tensor:
        """Feed a step whose tasks are only partly present (``present``, host booleans in task order).

        Each task's reference is taken from the steps where it is present: with ``"first"``, the first
        loss observed for it, however late it first appears; with k, the mean of its first k observed
        losses. A task not seen yet has NaN (its ratio is not used: it is absent). The first loss of a
        task is checked as at the first step (one host read, at the step where the task first appears).
        """
        if not self._first_k:
            return self.current()
        count = len(tasks)
        if self._seen_tasks is None:  # from now on, per task
            self._seen_tasks = [self._seen] * count
            if self._sum is None:
                self._sum = torch.zeros_like(losses)
        take = [bool(p) and seen < self._first_k for p, seen in zip(present, self._seen_tasks)]
        if any(take):
            detached = losses.detach()
            new = [i for i, flag in enumerate(take) if flag and self._seen_tasks[i] == 0]
            if new:
                values = detached[new].tolist()
                check_initial_losses([tasks[i] for i in new], values, "the first loss observed for it")
            mask = torch.tensor(take, device=losses.device)
            assert self._sum is not None
            self._sum = torch.where(mask, self._sum + detached, self._sum)
            self._seen_tasks = [seen + flag for seen, flag in zip(self._seen_tasks, take)]
            counts = torch.tensor(self._seen_tasks, device=losses.device, dtype=losses.dtype)
            self.value = torch.where(counts > 0, self._sum / counts, torch.full_like(counts, math.nan))
        if self.value is None:
            self.value = torch.full_like(losses, math.nan)
        return self.value

    @property
    def per_task(self) -> bool:
        """Whether the reference is kept per task (some step lacked a task)."""
        return self._seen_tasks is not None

    def current(self) -> Tensor:
        """The reference known so far: an error before the first step (before bind() for explicit values)."""
        if self.value is None:
            raise RuntimeError("the initial losses L(0) are not known yet: no step has been taken")
        return self.value

    # -- checkpoint -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """L_i(0) so far, the running sum behind it and how many steps it averages (paper 3.1)."""
        seen: Union[int, list[int]] = self._seen if self._seen_tasks is None else list(self._seen_tasks)
        return {"value": saved(self.value), "sum": saved(self._sum), "seen": seen}

    def check_state(self, state: Any, num_tasks: int) -> Mapping[str, Any]:
        state = expect_mapping(state, "'initial_loss'", INITIAL_LOSS_STATE)
        if isinstance(state["seen"], list):  # per task (a run where some step lacked a task)
            if len(state["seen"]) != num_tasks:
                raise ValueError(f"balancer state: 'initial_loss.seen' has {len(state['seen'])} counts for {num_tasks} tasks")
            for count in state["seen"]:
                expect_count(count, "'initial_loss.seen[i]'", 0, self._first_k)
            expect_tensor(state["value"], "'initial_loss.value'", (num_tasks,), optional=True)
            expect_tensor(state["sum"], "'initial_loss.sum'", (num_tasks,), optional=True)
            return state
        seen = expect_count(state["seen"], "'initial_loss.seen'", 0, self._first_k)
        expect_tensor(state["value"], "'initial_loss.value'", (num_tasks,), optional=True)
        expect_tensor(state["sum"], "'initial_loss.sum'", (num_tasks,), optional=True)
        if (state["sum"] is not None) != (seen > 0):
            raise ValueError(f"balancer state: 'initial_loss' has seen={seen} steps but {'a' if state['sum'] is not None else 'no'} running sum")
        # Explicit values are known from bind() on; a reference from the first k steps once one is seen.
        if (state["value"] is not None) != (seen > 0 or not self._first_k):
            raise ValueError(f"balancer state: 'initial_loss' has seen={seen} steps but {'a' if state['value'] is not None else 'no'} value")
        return state

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> None:
        """Restore a state that :meth:`check_state` accepted."""
        self.value = restored(state["value"], device, dtype)
        self._sum = restored(state["sum"], device, dtype)
        if isinstance(state["seen"], list):
            self._seen_tasks = list(state["seen"])
            self._seen = min(self._seen_tasks, default=0)
        else:
            self._seen_tasks = None
            self._seen = state["seen"]


class Balancer(ABC):
    """Base class of all loss-balancing methods.

    Subclasses implement :meth:`_update`; the base keeps the task list, the current weights and the
    loss-ratio reference. ``needs_grad_norms`` tells the hook layer whether ||grad_W L_i|| must be
    measured for the method itself (the monitor may measure them anyway).

    Checkpoint and resume, as with ``torch.optim``: :meth:`state_dict` holds everything that decides the
    weights of later steps, as tensors and plain Python values; save it beside the model's and the
    network optimiser's state, and load it into a balancer constructed with the same configuration::

        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "balancer": balancer.state_dict()}, path)
        ...
        checkpoint = torch.load(path, weights_only=True)
        balancer = GradNorm(alpha=1.5)  # the configuration of the interrupted run
        balancer.load_state_dict(checkpoint["balancer"])
        session = gradnorm.attach(model.shared, balancer)

    From there the weights follow, bit for bit, the trajectory of the uninterrupted run. A balancer not
    yet bound keeps the loaded state until :meth:`bind` (a session binds at its first step), which then
    requires the same task names in the same order and moves the state to that step's device and dtype.
    """

    name: str = "balancer"
    needs_grad_norms: bool = False
    #: Where the method needs this step's per-task gradients before the total loss is formed: None,
    #: ``"shared_layer"`` (grad_W L_i at the shared layer W) or ``"representation"`` (grad_Z L_i at the
    #: shared layer's output Z, the MGDA-UB bound of Sener & Koltun, 2018, section 3.3).
    task_gradients: Optional[TaskGradients] = None
    #: True for methods whose weights depend on this step's own losses or gradients (see
    #: :meth:`step_weights`); the hook layer then asks for them before it forms the total loss.
    uses_current_step: bool = False
    #: True for gradient surgery (PCGrad): the loss is summed with unit weights and the step weights are
    #: applied to the gradient at the shared representation only, so the heads see their own gradients.
    weights_act_on_representation: bool = False
    #: Whether a step may lack some tasks (:meth:`update`'s ``present``): the method is defined over the
    #: present tasks only, and an absent task's state stays as it is.
    supports_missing_tasks: bool = False
    #: :meth:`config` keys that do not change the weights; a state loads whatever they are.
    config_not_checked: tuple[str, ...] = ()
    #: :meth:`config` keys that describe the method rather than configure it, left out of ``repr``.
    repr_omits: tuple[str, ...] = ("name",)

    def __init__(self, initial_loss: InitialLossSpec = "first") -> None:
        self.tasks: list[str] = []
        self.initial_loss = InitialLoss(initial_loss)
        self._weights: Optional[Tensor] = None
        #: Updates taken (calls of :meth:`update`).
        self.step_count = 0
        self._pending_state: Optional[dict[str, Any]] = None

    # -- set-up -----------------------------------------------------------------------------------
    def bind(self, tasks: Sequence[str], device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        """Fix the task list (order matters) and create the state on ``device``.

        A state loaded before binding is restored here; its tasks must be ``tasks``.
        """
        if len(tasks) < 2:
            raise ValueError(f"a multitask balancer needs at least two tasks, got {list(tasks)}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task names must be unique, got {list(tasks)}")
        pending = self._pending_state
        if pending is not None:
            self._check_tasks(pending["tasks"], list(tasks))
        self.tasks = list(tasks)
        self.initial_loss.bind(self.tasks, device, dtype)
        self._weights = self.initial_weights(device, dtype)
        if pending is not None:
            self._restore(pending, device, dtype)
            self._pending_state = None

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

    def _current_weights(self) -> Tensor:
        """:meth:`weights` without the detach where there is nothing to detach (one operator less a step)."""
        weights = self._weights
        if weights is None:
            raise RuntimeError("balancer is not bound to tasks yet; call bind() or hand it a first step")
        return _detached(weights)

    def config(self) -> dict[str, Any]:
        """Name and hyperparameters, written to ``run.json``."""
        return {"name": self.name, "initial_loss": self.initial_loss.config()}

    def repr_config(self) -> dict[str, Any]:
        """The configuration ``repr`` shows: :meth:`config` without the descriptive keys."""
        return {key: value for key, value in self.config().items() if key not in self.repr_omits}

    def __repr__(self) -> str:
        # Constructor arguments first, in the constructor's order, then the derived settings.
        shown = self.repr_config()
        parameters = [name for name in inspect.signature(type(self).__init__).parameters if name in shown]
        order = parameters + [key for key in shown if key not in parameters]
        return f"{type(self).__name__}({', '.join(f'{key}={shown[key]!r}' for key in order)})"

    def step_weights(self, losses: Tensor, grad_norms: Optional[Tensor], task_grads: Optional[Tensor]) -> Tensor:
        """The weights applied in this step, for methods with ``uses_current_step``.

        ``losses`` are this step's detached losses (T,), ``grad_norms`` the unweighted ||grad_W L_i||
        when measured, ``task_grads`` the (T, D) per-task gradients in the space ``task_gradients``
        names. The result becomes :meth:`weights` until the next step. Other methods keep w(t).
        """
        return self.weights()

    # -- per step ---------------------------------------------------------------------------------
    def update(
        self, losses: Tensor, grad_norms: Optional[Tensor] = None, applied: Optional[Tensor] = None, present: Optional[Sequence[bool]] = None
    ) -> StepStats:
        """Take one step's detached losses (T,) and, if measured, the unweighted norms ||grad_W L_i||.

        ``applied`` is the weight vector training actually used (shadow mode: the user's own weights);
        by default the balancer's own. ``present`` (host booleans in task order) marks the tasks whose
        loss this step has; the values of absent ones are ignored (see :meth:`_update_present`). Returns
        the step's record; the new weights are in effect after.
        """
        if present is None and self.initial_loss.per_task:
            present = [True] * len(self.tasks)  # a run that had a step lacking a task keeps one rule (see docs/design.md)
        if present is not None:
            return self._update_masked(_detached(losses), grad_norms, applied, present)
        losses = _detached(losses)
        reference = self.initial_loss.observe(self.tasks, losses)
        loss_ratio = losses / reference
        inverse_rate = loss_ratio / loss_ratio.mean()
        own = self._current_weights()
        applied = own if applied is None else _detached(applied)
        stats = self._update(losses, loss_ratio, inverse_rate, own, grad_norms)
        if grad_norms is not None:
            # The gradient that really reached W from task i this step: the applied weight times n_i
            # (per-channel norms combine into the whole-weight norm).
            whole = grad_norms.norm(dim=1) if grad_norms.dim() == 2 else grad_norms
            stats.grad_norm = applied * whole
        stats.weight = applied
        stats.balancer_weight = own
        self.step_count += 1
        return stats

    def hold(self, losses: Tensor, applied: Optional[Tensor] = None, present: Optional[Sequence[bool]] = None) -> StepStats:
        """A step between updates (``update_every``): its losses and ratios, the weights unchanged.

        L_i(0) still sees the step (the reference is a function of the steps, not of the updates); no
        update is taken and ``step_count`` does not move.
        """
        losses = _detached(losses)
        mask = None
        if present is not None or self.initial_loss.per_task:
            flags = [True] * len(self.tasks) if present is None else list(present)
            reference = self.initial_loss.observe_present(self.tasks, losses, flags)
            mask = torch.tensor(flags, device=losses.device)
            loss_ratio, inverse_rate = _present_ratios(losses, reference, mask)
        else:
            reference = self.initial_loss.observe(self.tasks, losses)
            loss_ratio = losses / reference
            inverse_rate = loss_ratio / loss_ratio.mean()
        own = self._current_weights()
        stats = StepStats(loss=losses, loss_ratio=loss_ratio, inverse_rate=inverse_rate, weight=own if applied is None else _detached(applied))
        stats.balancer_weight = own
        if mask is not None:
            stats.present = mask.to(losses.dtype)
        return stats

    def _update_masked(self, losses: Tensor, grad_norms: Optional[Tensor], applied: Optional[Tensor], present: Sequence[bool]) -> StepStats:
        """:meth:`update` of a step whose tasks are partly present: ratios and the update over the present ones."""
        if not self.supports_missing_tasks:
            absent = [task for task, flag in zip(self.tasks, present) if not flag]
            raise ValueError(
                f"{type(self).__name__} balances all tasks at every step; this step lacks {absent} (GradNorm and static weights accept missing tasks)"
            )
        flags = list(present)
        reference = self.initial_loss.observe_present(self.tasks, losses, flags)
        mask = torch.tensor(flags, device=losses.device)
        loss_ratio, inverse_rate = _present_ratios(losses, reference, mask)
        own = self._current_weights()
        applied = own if applied is None else _detached(applied)
        stats = self._update_present(losses, loss_ratio, inverse_rate, own, grad_norms, mask)
        if grad_norms is not None:
            whole = grad_norms.norm(dim=1) if grad_norms.dim() == 2 else grad_norms
            stats.grad_norm = torch.where(mask, applied * whole, torch.full_like(whole, math.nan))
        stats.weight = applied
        stats.balancer_weight = own
        stats.present = mask.to(losses.dtype)
        self.step_count += 1
        return stats

    def _update_present(
        self, losses: Tensor, loss_ratio: Tensor, inverse_rate: Tensor, weights: Tensor, grad_norms: Optional[Tensor], present: Tensor
    ) -> StepStats:
        """The method's update over the present tasks (``present``: a (T,) bool tensor). By default the
        method's own update, for methods whose weights do not depend on the losses (static weights)."""
        return self._update(losses, loss_ratio, inverse_rate, weights, grad_norms)

    @abstractmethod
    def _update(self, losses: Tensor, loss_ratio: Tensor, inverse_rate: Tensor, weights: Tensor, grad_norms: Optional[Tensor]) -> StepStats:
        """Compute this step's record and set ``self._weights`` to w(t+1)."""

    # -- checkpoint -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything that decides the weights of later steps, for ``torch.save``.

        Keys: ``format`` (the layout's version), ``class`` and ``config`` (checked on loading),
        ``tasks``, ``step_count`` (updates taken), ``weights`` (w(t)), ``initial_loss`` (L_i(0) of the
        loss ratio, paper eq. 1, with the running sum and the number of steps averaged so far) and
        ``method``: the method's own state (e.g. GradNorm's weight-optimiser moments and step count,
        paper 5.5). Tensors are copies on the balancer's device; the rest is plain Python, so
        ``torch.load(..., weights_only=True)`` reads it. A balancer that holds a loaded state not yet
        bound returns that state.
        """
        if self._pending_state is not None:
            return cloned(self._pending_state)
        return {
            "format": STATE_FORMAT,
            "class": type(self).__name__,
            "config": plain(self.config()),
            "tasks": list(self.tasks),
            "step_count": self.step_count,
            "weights": saved(self._weights),
            "initial_loss": self.initial_loss.state_dict(),
            "method": self._method_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` of a balancer of the same class, configuration and tasks.

        A state of another class (a GradNorm state into DWA), another configuration (alpha 0.12 vs 1.5)
        or other tasks (['a', 'b'] vs ['a', 'c']) is a ValueError naming the difference, and nothing is
        restored. Bound: restored now, on this balancer's device and in its dtype. Not bound: kept until
        :meth:`bind`, which checks the tasks. A state taken before bind() holds no tasks and is the
        fresh state of its configuration; it loads into a balancer not yet bound.
        """
        state = expect_mapping(state, "the state", BALANCER_STATE)
        if state["format"] != STATE_FORMAT:
            raise ValueError(f"balancer state: format {state['format']!r} is not supported (this toolkit reads format {STATE_FORMAT})")
        if state["class"] != type(self).__name__:
            raise ValueError(f"balancer state is from a {state['class']} balancer, not {type(self).__name__}; construct a {state['class']} to load it")
        saved_config = state["config"]
        if not isinstance(saved_config, Mapping):
            raise ValueError(f"balancer state: 'config' must be a dict, got {type(saved_config).__name__}")
        differences = config_differences(saved_config, plain(self.config()), self.config_not_checked)
        if differences:
            raise ValueError(f"{type(self).__name__} state has another configuration: {'; '.join(differences)}")
        tasks = state["tasks"]
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise ValueError(f"balancer state: 'tasks' must be a list of task names, got {tasks!r}")
        if not tasks:
            if self.bound:
                raise ValueError(
                    f"{type(self).__name__} state was taken before bind() and holds no tasks, this balancer is bound to {self.tasks}; "
                    "construct a new balancer to start afresh"
                )
            self._pending_state = None  # the fresh state: what a balancer not yet bound already holds
            return
        if len(set(tasks)) != len(tasks) or len(tasks) < 2:
            raise ValueError(f"balancer state: 'tasks' must be two or more unique names, got {tasks}")
        self._check_state(state, len(tasks))
        if self._weights is None:
            self._pending_state = cloned(dict(state))
            return
        self._check_tasks(tasks, self.tasks)
        self._restore(state, self._weights.device, self._weights.dtype)

    def _check_tasks(self, saved_tasks: list[str], tasks: list[str]) -> None:
        if saved_tasks != tasks:
            missing = [t for t in saved_tasks if t not in tasks]
            extra = [t for t in tasks if t not in saved_tasks]
            detail = f"missing here {missing}, not in the state {extra}" if (missing or extra) else "the same names in another order"
            raise ValueError(f"{type(self).__name__} state has tasks {saved_tasks}, this balancer {tasks} ({detail})")

    def _check_state(self, state: Mapping[str, Any], num_tasks: int) -> None:
        """Check every part of a state with tasks before any of it is restored."""
        expect_tensor(state["weights"], "'weights'", (num_tasks,))
        expect_count(state["step_count"], "'step_count'", 0)
        self.initial_loss.check_state(state["initial_loss"], num_tasks)
        self._check_method_state(state["method"], num_tasks)

    def _restore(self, state: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> None:
        self._weights = restored(state["weights"], device, dtype)
        self.step_count = state["step_count"]
        self.initial_loss.load_state_dict(state["initial_loss"], device, dtype)
        self._load_method_state(state["method"], device, dtype)

    def _method_state(self) -> dict[str, Any]:
        """The method's own state beyond weights and L_i(0); none by default."""
        return {}

    def _check_method_state(self, state: Any, num_tasks: int) -> None:
        """Raise ValueError unless ``state`` is a valid :meth:`_method_state` for ``num_tasks`` tasks."""
        expect_mapping(state, "'method'", ())

    def _load_method_state(self, state: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> None:
        """Restore a :meth:`_method_state` that :meth:`_check_method_state` accepted (by default: nothing)."""
        return None


RECORDED_FIELDS = schema.RECORDED_FIELDS


def _present_ratios(losses: Tensor, reference: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
    """L~_i = L_i / L_i(0) and r_i = L~_i / mean_{j present} L~_j (paper eq. 1 over the present tasks); NaN where absent."""
    nan = torch.full_like(losses, math.nan)
    loss_ratio = torch.where(present, losses / reference, nan)
    mean = torch.where(present, loss_ratio, torch.zeros_like(losses)).sum() / present.sum()
    return loss_ratio, torch.where(present, loss_ratio / mean, nan)


def _detached(tensor: Tensor) -> Tensor:
    return tensor.detach() if tensor.requires_grad else tensor


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
    shape = (num_tasks,)
    for name in RECORDED_FIELDS:
        value = getattr(stats, name)
        if value is None:
            if nan is None:
                nan = torch.full(shape, float("nan"), device=reference.device, dtype=target)
            parts.append(nan)
            continue
        defined.add(name)
        # Each of these is an operator dispatch on a T-element tensor: only where needed.
        if value.requires_grad:
            value = value.detach()
        if value.dtype != target:
            value = value.to(target)
        if value.shape != shape:
            value = value.expand(num_tasks)
        parts.append(value)
    return torch.stack(parts, dim=1), frozenset(defined)
