"""Attach a balancer and the recorder to a training loop you already have.

    session = gradnorm.attach(model.trunk[-1], gradnorm.GradNorm(alpha=0.12), runs_root="runs")
    for x, y in loader:
        loss = session.loss({"depth": l_depth, "normals": l_normals})
        opt.zero_grad(); loss.backward(); opt.step()
    session.close()

``loss()`` measures the per-task gradient norms at the shared layer, returns sum_i w_i(t) L_i with the
weights detached (no gradient of the network's loss reaches w), and updates w to w(t+1). Because it
does no backward of the total loss itself, it also works where a framework calls ``backward()``.
Shadow mode (``shadow=True``) keeps the user's own fixed weights for training and records what the
balancer would have set.

The session owns every hook it registers on the user's modules (the heads' pre-hooks and the layer's
forward hook of ``heads=``, ``heads="auto"``'s global forward hook, the capture of the shared
representation, one step's gradient-surgery hook) and its run's recorder. :meth:`Session.close`, leaving
a ``with`` block (normally or by an exception) and the garbage collection of a session dropped without
either release them all; the modules reach the session only through weak references, so that they never
keep a dropped session alive.
"""

from __future__ import annotations

import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, TypeVar, Union

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradnorm.toolkit import runs
from gradnorm.toolkit.balancers import Balancer, EqualWeights, StaticWeights, stats_matrix
from gradnorm.toolkit.recorder import DEFAULT_FLUSH_EVERY, Recorder

from . import distributed
from .grad_norms import GradNormMeter
from .head_finder import HeadFinder, layer_call
from .shared_layer import SharedLayer, reaches, resolve_shared_layer
from .taps import HeadTaps
from .task_gradients import RepresentationCapture, reweight_representation, step_weights

Losses = Union[Mapping[str, Tensor], Sequence[Tensor]]
#: A deferred heads= step: (losses, applied weights, epoch, step), finished from inside the user's backward.
_PendingStep = tuple[Tensor, Tensor, Optional[int], Optional[int]]
#: What ``Recorder.close`` records as ``closed_by`` for a session dropped without ``close()``.
CLOSED_BY_COLLECTION = "garbage collection"


class _Removable(Protocol):
    def remove(self) -> None: ...


_R = TypeVar("_R", bound=_Removable)


class _Owned:
    """Everything a session registered or opened, released together, once.

    It holds no reference to the session: it is what the session's ``weakref.finalize`` keeps, and a
    reference back would keep the session alive and the finalizer from ever running.
    """

    def __init__(self) -> None:
        self.removables: list[_Removable] = []  # hook handles, the taps, the representation capture
        self.step_hook: Optional[RemovableHandle] = None  # this step's gradient-surgery hook on Z
        self.recorder: Optional[Recorder] = None
        self.released = False

    def own(self, removable: _R) -> _R:
        self.removables.append(removable)
        return removable

    def release(self, status: str, closed_by: Optional[str] = None) -> None:
        if self.released:
            return
        self.released = True
        try:
            while self.removables:
                self.removables.pop().remove()
            if self.step_hook is not None:
                self.step_hook.remove()
                self.step_hook = None
        finally:
            if self.recorder is not None:
                self.recorder.close(status=status, closed_by=closed_by)

    def collected(self) -> None:
        """The session was garbage-collected without close(): its run did not say it finished."""
        if self.recorder is not None and not self.recorder.closed:
            warnings.warn(
                f"gradnorm: the session of run {self.recorder.run_path.name!r} was garbage-collected without close(); "
                f"its records are flushed and the run is marked {runs.INTERRUPTED!r} (close it, or use `with`, to mark it finished)",
                ResourceWarning,
            )
        self.release(runs.INTERRUPTED, closed_by=CLOSED_BY_COLLECTION)


def _weakly(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` without a strong reference to its object.

    The hooks on the user's modules call back into the session through this, so the modules (which the
    user keeps) do not keep the session alive after the user has dropped it.
    """
    ref = weakref.WeakMethod(method)
    name = method.__name__  # (not the method itself: the closure would hold it, and it holds the session)

    def call(*args: Any) -> Any:
        bound = ref()
        if bound is None:  # the finalizer removes the hooks with the session, so no hook gets here
            raise ReferenceError(f"the gradnorm session behind {name} no longer exists")
        return bound(*args)

    return call


class Session:
    """A balancer, a gradient-norm meter at the shared layer and (optionally) a recorder, for one run."""

    def __init__(
        self,
        shared: SharedLayer,
        balancer: Optional[Balancer] = None,
        *,
        runs_root: Optional[Union[str, Path]] = None,
        run_name: Optional[str] = None,
        tasks: Optional[Sequence[str]] = None,
        shadow: bool = False,
        weights: Optional[Union[Mapping[str, float], Sequence[float]]] = None,
        flush_every: int = DEFAULT_FLUSH_EVERY,
        measure_grad_norms: bool = True,
        config: Optional[Mapping[str, Any]] = None,
        heads: Union[None, str, Sequence[nn.Module]] = None,
        grad_scaler: Optional[Any] = None,
    ) -> None:
        # First, so that hooks registered before a later argument check fails are removed with the half-made session.
        self._owned = _Owned()
        self._finalizer = weakref.finalize(self, self._owned.collected)
        # At interpreter exit the recorder's exit handler closes open runs with the exit's status; hooks no longer matter.
        self._finalizer.atexit = False
        self.layer = resolve_shared_layer(shared)
        self.balancer = balancer if balancer is not None else EqualWeights()
        self.shadow = shadow
        if weights is not None and not shadow:
            raise ValueError("weights= sets the user's own weights in shadow mode; pass shadow=True (or use StaticWeights)")
        self._user_weights = weights
        self._applied: Optional[Tensor] = None
        self.measure = measure_grad_norms or self.balancer.needs_grad_norms
        per_channel = bool(getattr(self.balancer, "per_channel", False))
        self.meter = GradNormMeter(self.layer.parameter, reduce=distributed.mean_across_ranks, per_channel=per_channel)
        # Methods that need gradients at the shared representation see its output through a forward hook.
        needs_capture = self.balancer.task_gradients == "representation"
        self.capture = self._owned.own(RepresentationCapture(self.layer.module, self.layer.description)) if needs_capture else None
        self._step_norms: Optional[Tensor] = None
        self._surgery: Optional[tuple[RepresentationCapture, Tensor, Tensor]] = None
        # heads=: the norms come from the user's own backward (hooks/taps.py) and w updates after it.
        self.taps: Optional[HeadTaps] = None
        # With heads= the tapped gradients carry the AMP loss scale of torch.amp.GradScaler; it is divided out.
        self.grad_scaler = grad_scaler
        self._pending: Optional[_PendingStep] = None
        self._per_channel = per_channel
        self._finder: Optional[HeadFinder] = None
        self._heads_search: Optional[str] = None  # heads="auto": what the first step found
        taps_unusable = self.balancer.uses_current_step or needs_capture or self.balancer.weights_act_on_representation
        if isinstance(heads, str):
            if heads != "auto":
                raise ValueError(f"heads= takes the task heads in task order or 'auto', got {heads!r}")
            if taps_unusable or not self.measure:
                self._heads_search = f"not searched: {self.balancer.name} needs this step's per-task gradients before the loss is formed"
            else:
                self._finder = HeadFinder()
                self._owned.own(self._finder.handle)
        elif heads is not None:
            if taps_unusable:
                raise ValueError(
                    f"heads= measures gradient norms during your backward, but {self.balancer.name} needs this step's "
                    "per-task gradients before the loss is formed; leave heads= out for it"
                )
            self.taps = self._make_taps(list(heads))
        self.tasks: Optional[list[str]] = list(tasks) if tasks is not None else None
        self.step_index = 0
        self.runs_root = None if runs_root is None else Path(runs_root)
        self.run_name = run_name or time.strftime(f"{self.balancer.name}-%Y%m%d-%H%M%S")
        self.flush_every = flush_every
        self.user_config = dict(config or {})
        self.run_path: Optional[Path] = None
        self.recorder: Optional[Recorder] = None
        self.closed = False

    # -- public API ------------------------------------------------------------------------------
    def loss(self, losses: Losses, *, epoch: Optional[int] = None, step: Optional[int] = None) -> Tensor:
        """The weighted loss sum_i w_i L_i of this step (shadow mode: with the user's weights)."""
        self._check_open()
        names, values = self._split(losses)
        stacked = torch.stack([v.reshape(()) for v in values])
        # heads="auto": this step is measured the general way; the taps found here serve from the next.
        finder = self._finder
        route = self._search_heads(finder, values) if finder is not None else None
        self._bind(names, stacked, route)
        applied = self._applied_weights()
        if self.balancer.uses_current_step:
            applied = self._current_step_weights(values, stacked, applied)
        # Gradient surgery acts on Z's gradient; the heads then train on unit-weighted losses.
        loss_weights = torch.ones_like(applied) if self.balancer.weights_act_on_representation and not self.shadow else applied
        total = (loss_weights.to(stacked.dtype) * stacked).sum()
        if self.taps is not None and finder is None:
            self._defer(self.taps, values, stacked, applied, epoch, step)
            return total
        self._observe(values, stacked, applied, epoch, step)
        if self._surgery is not None:
            # Registered last, so that the gradient-norm measurement above does not pass through it.
            self._owned.step_hook = reweight_representation(*self._surgery)
            self._surgery = None
        return total

    def observe(self, losses: Losses, *, epoch: Optional[int] = None, step: Optional[int] = None) -> None:
        """Shadow mode for loops that build their own total loss: measure and record, change nothing."""
        if not self.shadow:
            raise RuntimeError("observe() is for shadow mode (attach(..., shadow=True)); use loss() to balance")
        self._check_open()
        names, values = self._split(losses)
        stacked = torch.stack([v.reshape(()) for v in values])
        self._stop_head_search("not searched: observe() measures before your backward")
        self._bind(names, stacked)
        applied = self._applied_weights()
        if self.balancer.uses_current_step:
            self._current_step_weights(values, stacked, applied)
        self._observe(values, stacked, applied, epoch, step)

    def weights(self) -> dict[str, float]:
        """The balancer's current weights by task (a host copy: call it outside the hot path)."""
        if not self.balancer.bound:
            return {}
        return dict(zip(self.balancer.tasks, self.balancer.weights().tolist()))

    def log_validation(self, losses: Mapping[str, Union[float, Tensor]], *, step: Optional[int] = None, epoch: Optional[int] = None) -> None:
        """Record validation losses by task (they feed the overfitting view)."""
        if self.recorder is None:
            return
        self.recorder.record_validation(self.step_index if step is None else step, losses, epoch=epoch)

    def close(self, status: str = runs.FINISHED) -> None:
        """Flush every record, mark the run ``status`` (``finished`` by default) and remove every hook the
        session registered. Closing again does nothing; a step whose backward has not run yet is not recorded,
        and that backward then trains on the weights the step applied, unmeasured."""
        if self.closed:
            return
        self.closed = True
        self._stop_head_search("not searched: the session closed before its first step")
        self._pending = None
        self._finalizer.detach()
        self._owned.release(status)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(status=runs.FAILED if kind is not None else runs.FINISHED)

    # -- internals -------------------------------------------------------------------------------
    def _make_taps(self, heads: list[nn.Module]) -> HeadTaps:
        taps = HeadTaps(
            heads,
            self.layer.parameter,
            _weakly(self._norms_from_backward),
            reduce=_weakly(self._unscale_tapped),
            per_channel=self._per_channel,
            module=self.layer.module,
        )
        return self._owned.own(taps)

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("session is closed")

    def _applied_weights(self) -> Tensor:
        """The weights this step trains with: the user's own in shadow mode, else the balancer's w(t)."""
        if not self.shadow:
            return self.balancer.weights()
        if self._applied is None:
            raise RuntimeError("shadow mode's weights are set when the first step names the tasks")
        return self._applied

    def _known_tasks(self) -> list[str]:
        if self.tasks is None:
            raise RuntimeError("the tasks are known from the first step on")
        return self.tasks

    def _stop_head_search(self, reason: str) -> None:
        if self._finder is not None:
            self._finder.stop()
            self._finder = None
            self._heads_search = reason

    def _search_heads(self, finder: HeadFinder, values: list[Tensor]) -> Optional[str]:
        """heads="auto", first step: find the heads; the taps serve from the next step. Returns the route."""
        self._finder = None
        found = finder.find(values, self.layer.parameter)
        self._heads_search = found.reason
        if found.heads is None or found.shared is None:
            return None
        self.taps = self._make_taps(found.heads)
        call, count = layer_call(found.calls, self.layer.module)
        layer_input = (call.input, call.input_version) if call is not None else None
        return self.taps.describe_path_of(found.shared, layer_input, call.output_node if call is not None else None, count)

    def _split(self, losses: Losses) -> tuple[list[str], list[Tensor]]:
        if isinstance(losses, Mapping):
            names, values = [str(k) for k in losses.keys()], list(losses.values())
        elif isinstance(losses, (list, tuple)):
            values = list(losses)
            names = self.tasks if self.tasks is not None and len(self.tasks) == len(values) else [f"task{i}" for i in range(len(values))]
        else:
            raise TypeError(f"losses must be a dict name -> loss or a sequence of losses, got {type(losses).__name__}")
        if len(values) < 2:
            raise ValueError(f"GradNorm balances two or more task losses; got {len(values)} ({names})")
        for name, value in zip(names, values):
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise TypeError(
                    f"loss of task {name!r} must be a scalar tensor, got {type(value).__name__}{'' if not isinstance(value, Tensor) else tuple(value.shape)}"
                )
            if self.measure and not value.requires_grad:
                raise ValueError(f"loss of task {name!r} does not require grad: it is not connected to the model")
        if self.tasks is not None and names != self.tasks:
            missing = [t for t in self.tasks if t not in names]
            extra = [t for t in names if t not in self.tasks]
            detail = f"missing {missing}, unexpected {extra}" if (missing or extra) else f"order {names} vs {self.tasks}"
            raise ValueError(f"task names changed at step {self.step_index}: {detail}; every step must hand the same tasks in the same order")
        return names, values

    def _current_step_weights(self, values: list[Tensor], stacked: Tensor, applied: Tensor) -> Tensor:
        """Weights of a method that reads this step's own losses or gradients (MGDA, PCGrad, 1/L, 1/||g||)."""
        meter = self.meter if self.measure else None
        own, self._step_norms, grads = step_weights(self.balancer, values, stacked, meter, self.layer.parameter, self.capture)
        if self.shadow:
            return applied
        if self.balancer.weights_act_on_representation:
            if self.capture is None or grads is None:
                raise RuntimeError(f"{self.balancer.name} changes the gradient at the shared representation, but none was captured")
            self._surgery = (self.capture, grads, own)
        return own

    def _bind(self, names: list[str], stacked: Tensor, auto_route: Optional[str] = None) -> None:
        if self.balancer.bound:
            return
        self.tasks = names
        self.balancer.bind(names, stacked.device, stacked.dtype if stacked.dtype.is_floating_point else torch.float32)
        applied: Optional[Tensor] = None
        if self.shadow:
            user = EqualWeights() if self._user_weights is None else StaticWeights(self._user_weights)
            user.bind(names, stacked.device, self.balancer.weights().dtype)
            applied = self._applied = user.weights()
        if self.runs_root is not None:
            meta = {
                "tasks": names,
                "balancer": self.balancer.config(),
                "shared_layer": self.layer.config(),
                "mode": "shadow" if self.shadow else "balance",
                "grad_norm_path": self._grad_norm_path(auto_route),
                "flush_every": self.flush_every,
                "config": self.user_config,
            }
            if self._heads_search is not None:
                meta["heads_search"] = self._heads_search
            if applied is not None:
                meta["applied_weights"] = dict(zip(names, applied.tolist()))
            self.run_path = distributed.create_or_join_run(self.runs_root, self.run_name, meta)
            self.recorder = self._owned.recorder = Recorder(self.run_path, names, flush_every=self.flush_every)

    def _grad_norm_path(self, auto_route: Optional[str]) -> str:
        general = "autograd-batched" if self.meter.batched else "autograd-loop"
        if self.taps is None:
            return general
        if auto_route is not None:
            return f"head-taps/{auto_route} (step 0: {general})"
        return f"head-taps/{self.taps.describe_path()}"

    def _defer(self, taps: HeadTaps, values: list[Tensor], stacked: Tensor, applied: Tensor, epoch: Optional[int], step: Optional[int]) -> None:
        """heads= mode: keep the step; the taps finish it from inside the user's backward."""
        self._check_first_step(values)
        tasks = self._known_tasks()
        if len(taps.heads) != len(tasks):
            raise ValueError(f"heads= has {len(taps.heads)} modules for {len(tasks)} tasks {tasks}; give one head per task, in task order")
        if self._pending is not None:
            raise RuntimeError(
                f"the loss of step {self.step_index} was never backpropagated: with heads= the weights update during "
                "backward(); call backward() on every loss that session.loss() returns"
            )
        self._pending = (stacked.detach(), applied, epoch, step)
        taps.arm()

    def _unscale_tapped(self, per_task: Tensor) -> Tensor:
        """The tapped (T, *W.shape) gradients, averaged over ranks and with the AMP loss scale divided out.

        Divided before the norms are taken: the scale is a power of two, so the division is exact, while
        the sum of squares of gradients still multiplied by a large scale (2^100 after a few back-offs
        from an overflow) would overflow float32 and turn a good step into a skipped one.
        """
        per_task = distributed.mean_across_ranks(per_task)
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            scale = self.grad_scaler._get_scale_async()  # a device tensor: no host synchronisation
            if scale is not None:
                per_task = per_task / scale.to(per_task.dtype)
        return per_task

    def _norms_from_backward(self, weighted_norms: Tensor) -> None:
        if self._pending is None:  # the taps measure only a backward that _defer armed, right after keeping its step
            raise RuntimeError("heads=: a backward was measured for which no step was kept")
        stacked, applied, epoch, step = self._pending
        self._pending = None
        # The taps see grad_W of w_i L_i (the weighted loss); the balancer takes n_i = ||grad_W L_i||.
        norms = weighted_norms.to(applied.dtype) / (applied[:, None] if weighted_norms.dim() == 2 else applied)
        self._finish(stacked, norms, applied, epoch, step)

    def _check_first_step(self, values: list[Tensor]) -> None:
        self._check_open()
        if self.step_index == 0 and self.measure:
            for name, value in zip(self._known_tasks(), values):
                if not reaches(value, self.layer.parameter):
                    raise ValueError(
                        f"the shared layer {self.layer.description} receives no gradient from task {name!r}: "
                        "choose a layer that every task's loss depends on (the last shared trunk layer)"
                    )

    def _observe(self, values: list[Tensor], stacked: Tensor, applied: Tensor, epoch: Optional[int], step: Optional[int]) -> None:
        self._check_first_step(values)
        norms = self._step_norms if self._step_norms is not None else (self.meter(values) if self.measure else None)
        self._step_norms = None
        self._finish(stacked.detach(), norms, applied, epoch, step)

    def _finish(self, stacked: Tensor, norms: Optional[Tensor], applied: Tensor, epoch: Optional[int], step: Optional[int]) -> None:
        # Under DDP every rank balances the global (rank-averaged) losses, so the weights agree.
        stacked = distributed.mean_across_ranks(stacked)
        stats = self.balancer.update(stacked, norms, applied=applied)
        if self.recorder is not None:
            matrix, defined = stats_matrix(stats, len(self._known_tasks()))
            self.recorder.record(self.step_index if step is None else step, matrix, defined, epoch=epoch)
        self.step_index += 1


def attach(
    shared: SharedLayer,
    balancer: Optional[Balancer] = None,
    *,
    runs_root: Optional[Union[str, Path]] = None,
    run_name: Optional[str] = None,
    tasks: Optional[Sequence[str]] = None,
    shadow: bool = False,
    weights: Optional[Union[Mapping[str, float], Sequence[float]]] = None,
    flush_every: int = DEFAULT_FLUSH_EVERY,
    measure_grad_norms: bool = True,
    config: Optional[Mapping[str, Any]] = None,
    heads: Union[None, str, Sequence[nn.Module]] = None,
    grad_scaler: Optional[Any] = None,
) -> Session:
    """Attach ``balancer`` (default: equal weights, monitor only) at the shared layer ``shared``
    (paper section 3: W, the last shared layer, where the per-task gradient norms G_W^(i) are taken).

    ``runs_root``/``run_name`` write records there; ``shadow``/``weights`` record without changing
    training; ``flush_every`` sets how many steps the device buffer holds; ``tasks`` names the tasks of a
    sequence of losses; ``config`` is saved in ``run.json``; ``heads`` (the task heads in task order, or
    ``"auto"``) taps the gradient norms from your own backward instead of a separate pass; ``grad_scaler``
    is the ``torch.amp.GradScaler`` whose scale multiplies the loss you backpropagate, with ``heads``.
    Under ``torch.distributed`` every rank attaches with the same ``run_name``; see ``hooks/distributed.py``.
    The session owns every hook it registers and removes them on :meth:`Session.close`.
    """
    return Session(
        shared,
        balancer,
        runs_root=runs_root,
        run_name=run_name,
        tasks=tasks,
        shadow=shadow,
        weights=weights,
        flush_every=flush_every,
        measure_grad_norms=measure_grad_norms,
        config=config,
        heads=heads,
        grad_scaler=grad_scaler,
    )
