"""Attach a balancer and the recorder to a training loop you already have.

    session = gradnorm.attach(model.trunk[-1], gradnorm.GradNorm(alpha=0.12), runs_root="runs")
    for x, y in loader:
        loss = session.loss({"depth": l_depth, "normals": l_normals})
        opt.zero_grad(); loss.backward(); opt.step()
    session.close()

``loss()`` returns sum_i w_i(t) L_i with the weights detached (no gradient of the network's loss reaches
w) and moves w to w(t+1), from the per-task gradient norms at the shared layer W (paper section 3). It
does no backward of the total loss itself, so it also works where a framework calls ``backward()``.

Where the norms come from (``grad_norm_path`` in ``run.json``): by default (``heads="auto"``) the first
step finds the task heads from its autograd graph (``hooks/head_finder.py``) and, from the second step,
the norms are tapped from the user's own backward at the heads' input (``hooks/taps.py``); where no heads
qualify, or the balancer needs this step's per-task gradients before the loss is formed, the general
path measures them with extra backward passes from the losses to W (``hooks/grad_norms.py``), and
``run.json`` says why (``heads_search``). ``heads=None`` asks for the general path. Under
``torch.distributed`` the taps feed the rank-averaged norms' exchange (``hooks/distributed_norms.py``)
from the same backward, and its collective overlaps the trunk's backward.

The tapped gradients carry whatever multiplies each task's loss in the backward: its weight w_i, a
``GradScaler``'s or Accelerate's loss scale, a division for gradient accumulation. A tensor hook on each
task's loss reads that factor (the gradient the loss receives) on the device, without a host
synchronisation, and the taps divide it out, so the norms are those of grad_W L_i whatever scaled the
backward. The weights, their optimiser's state and the norms are float32 (float64 for a float64 model)
whatever the losses' dtype.

Shadow mode (``shadow=True``) keeps the user's own fixed weights for training and records what the
balancer would have set.

The session owns every hook it registers on the user's modules and tensors (the heads' pre-hooks and the
layer's forward hook of the taps, the head search's global forward hook, the losses' factor hooks, the
capture of the shared representation, one step's gradient-surgery hook) and its run's recorder.
:meth:`Session.close`, leaving a ``with`` block (normally or by an exception) and the garbage collection
of a session dropped without either release them all; the modules reach the session only through weak
references, so that they never keep a dropped session alive.
"""

from __future__ import annotations

import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, TypeVar, Union

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradnorm.toolkit import runs
from gradnorm.toolkit.balancers import Balancer, EqualWeights, StaticWeights, StepStats, stats_matrix
from gradnorm.toolkit.forwarding import Forwarder, TrackerSpec, resolve_trackers
from gradnorm.toolkit.recorder import DEFAULT_FLUSH_EVERY, Recorder

from . import distributed
from .distributed_norms import DEFAULT_SKETCH_SIZE, DistributedNormMeter, meter_for, release
from .grad_norms import AUTOGRAD_LOOP, GradNormMeter, statistics_dtype
from .head_finder import HeadFinder, layer_call
from .shared_layer import SharedLayer, reaches, resolve_shared_layer
from .taps import OUTPUT_MASK, OUTPUT_VJP, HeadTaps, TapsError
from .task_gradients import RepresentationCapture, reweight_representation, step_weights

Losses = Union[Mapping[str, Tensor], Sequence[Tensor]]
#: A step the taps finish from inside the user's backward: (the losses as handed in, with their graph;
#: the stacked losses, detached; the applied weights; epoch; step).
_PendingStep = tuple[list[Tensor], Tensor, Tensor, Optional[int], Optional[int]]
#: Layout of :meth:`Session.state_dict`, and its keys.
SESSION_STATE_FORMAT = 1
SESSION_STATE_KEYS = ("format", "balancer", "step", "tasks", "run_id", "attempt")
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
        self.factor_hooks: list[RemovableHandle] = []  # this step's hooks on the losses (the taps' factors)
        self.recorder: Optional[Recorder] = None
        self.claim: Optional[Path] = None  # the run directory reserved at attach, until the first step fills it
        # run.json keys that changed after the run was created, written once the recorder has stopped.
        self.meta_updates: dict[str, Any] = {}
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
            self.remove_factor_hooks()
        finally:
            recorder = self.recorder
            if recorder is None and self.claim is not None:
                runs.release_run(self.claim)  # a session that never recorded a step leaves no run behind
            if recorder is not None:
                recorder.close(status=status, closed_by=closed_by)
                # Once closed here its writer has stopped, so nothing else writes run.json now (a close
                # handed to another thread, from the writer itself, leaves run.json to that thread).
                if self.meta_updates and recorder.closed and recorder.rank == 0 and threading.current_thread() is not recorder._thread:
                    try:
                        runs.update_run_json(recorder.run_path, **self.meta_updates)
                    except (OSError, runs.RunError) as exc:
                        warnings.warn(f"gradnorm: could not note the gradient-norm path in run.json: {exc}", RuntimeWarning)

    def remove_factor_hooks(self) -> None:
        while self.factor_hooks:
            self.factor_hooks.pop().remove()

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


class _Factors:
    """What multiplies each task's loss in the user's backward: the gradient that loss receives.

    Head i's piece at H is that gradient times grad_H L_i (the loss's own graph below it is linear in
    it), so it is the factor the taps divide out: w_i, times any loss scale (``GradScaler``,
    Accelerate), times any division for gradient accumulation. Two ways to read it, on the device:

    - balancing: one pre-hook on the autograd node of the stacked losses that ``session.loss()``'s
      result is formed from, which receives all T at once (then rounded to each loss's dtype, as the
      backward hands it on);
    - shadow mode, where the loop may backpropagate a total of its own: a pre-hook on each loss's node.

    Holds no reference to the session.
    """

    def __init__(self, num_tasks: int) -> None:
        self.parts: list[Optional[Tensor]] = [None] * num_tasks
        self.whole: Optional[Tensor] = None
        self._node_hooks: dict[tuple[int, int], Callable[[tuple], None]] = {}
        self._whole_hook = self._keep_whole

    def _keep_whole(self, grads: tuple) -> None:
        self.whole = grads[0]

    def watch_stacked(self, stacked: Tensor) -> RemovableHandle:
        """Keep the (T,) gradient that the stacked losses receive."""
        if stacked.grad_fn is None:
            raise RuntimeError("the stacked losses have no autograd node")
        return stacked.grad_fn.register_prehook(self._whole_hook)

    def watch(self, index: int, loss: Tensor) -> RemovableHandle:
        """Keep the gradient ``loss`` receives as task ``index``'s factor; returns the hook's handle.

        A pre-hook on the loss's autograd node where it has one (cheaper to register than a tensor hook,
        and it sees the gradient after any hook the user put on the loss), else a tensor hook.
        """
        node = loss.grad_fn
        parts = self.parts
        if node is None:

            def keep(grad: Tensor) -> None:
                parts[index] = grad

            return loss.register_hook(keep)
        key = (index, loss.output_nr)
        hook = self._node_hooks.get(key)
        if hook is None:
            output = loss.output_nr

            def hook(grads: tuple) -> None:
                parts[index] = grads[output]

            self._node_hooks[key] = hook
        return node.register_prehook(hook)

    def reset(self) -> None:
        self.whole = None
        for index in range(len(self.parts)):
            self.parts[index] = None


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
        heads: Union[None, bool, str, Sequence[nn.Module]] = "auto",
        grad_scaler: Optional[Any] = None,
        trackers: Union[None, TrackerSpec, Sequence[TrackerSpec]] = None,
        distributed_norms: str = "auto",
        sketch_size: int = DEFAULT_SKETCH_SIZE,
        resume: bool = False,
        update_every: int = 1,
        accumulate: int = 1,
    ) -> None:
        # First, so that hooks registered before a later argument check fails are removed with the half-made session.
        self._owned = _Owned()
        self._finalizer = weakref.finalize(self, self._owned.collected)
        # At interpreter exit the recorder's exit handler closes open runs with the exit's status; hooks no longer matter.
        self._finalizer.atexit = False
        # trackers=: the recorder's rows, forwarded from its writer side to TensorBoard, W&B, MLflow (toolkit/forwarding.py).
        forward_to = resolve_trackers(trackers)
        if forward_to and runs_root is None:
            raise ValueError("trackers= forwards the rows the session records; give runs_root= as well")
        self.listeners = [Forwarder(forward_to)] if forward_to else []  # the Recorder's listeners
        self.layer = resolve_shared_layer(shared)
        self.balancer = balancer if balancer is not None else EqualWeights()
        self.shadow = shadow
        if weights is not None and not shadow:
            raise ValueError("weights= sets the user's own weights in shadow mode; pass shadow=True (or use StaticWeights)")
        if grad_scaler is not None:
            warnings.warn(
                "gradnorm: grad_scaler= is no longer needed and is ignored: the taps read the factor each task's loss "
                "carries in your backward (a GradScaler's or Accelerate's loss scale included) from the backward itself",
                DeprecationWarning,
                stacklevel=3,
            )
        self._user_weights = weights
        for name, value in (("update_every", update_every), ("accumulate", accumulate)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if (update_every > 1 or accumulate > 1) and self.balancer.uses_current_step:
            raise ValueError(
                f"{self.balancer.name} sets each step's weights from that step's own losses or gradients; update_every and accumulate do not apply to it"
            )
        #: Norms measured and weights updated every update_every-th step only (the others cost what equal weights cost).
        self.update_every = update_every
        #: Micro-batches per optimiser step; the k-th finishes the step.
        self.accumulate = accumulate
        self._micro = 0
        self._acc_losses: Optional[Tensor] = None
        self._acc_counts: list[int] = []
        self._acc_grads: list[Optional[Tensor]] = []
        self._partial = False  # some step lacked a task: every step is balanced over the present tasks since
        self._defined: frozenset[str] = frozenset()  # the recorded fields of the last step
        self._applied: Optional[Tensor] = None
        self.measure = measure_grad_norms or self.balancer.needs_grad_norms
        per_channel = bool(getattr(self.balancer, "per_channel", False))
        # Under DDP a reduce over ranks forces a route that forms the gradients (no Gram route); the Gram
        # route's hook on W's module only where norms are measured (hooks/grad_norms.py).
        self.meter = self._owned.own(
            GradNormMeter(
                self.layer.parameter,
                reduce=distributed.mean_across_ranks if distributed.world_size() > 1 else None,
                per_channel=per_channel,
                module=self.layer.module if self.measure else None,
            )
        )
        # Under torch.distributed: one small exchange of W's rows or of a sketch per step (hooks/distributed_norms.py).
        dist_meter = meter_for(self.layer.parameter, self.layer.module, distributed_norms, sketch_size=sketch_size, per_channel=per_channel, owner=self)
        if dist_meter is not None:
            release(self.meter)
            self.meter = self._owned.own(dist_meter)
        # Methods that need gradients at the shared representation see its output through a forward hook.
        needs_capture = self.balancer.task_gradients == "representation"
        self.capture = self._owned.own(RepresentationCapture(self.layer.module, self.layer.description)) if needs_capture else None
        self._step_norms: Optional[Tensor] = None
        self._surgery: Optional[tuple[RepresentationCapture, Tensor, Tensor]] = None
        # The taps: the norms come from the user's own backward (hooks/taps.py) and w updates inside it.
        self.taps: Optional[HeadTaps] = None
        self._factors: Optional[_Factors] = None
        self._pending: Optional[_PendingStep] = None
        self._per_channel = per_channel
        self._dtype: Optional[torch.dtype] = None  # of the weights and statistics, fixed at the first step
        # The losses' dtype(s) where not that one: the taps' factors are rounded to them (see _step_factors).
        self._loss_dtypes: Union[None, torch.dtype, list[torch.dtype]] = None
        self._finder: Optional[HeadFinder] = None
        self._heads_search: Optional[str] = None  # what the first step's search found, or why none ran
        self._auto = False  # the heads were found by the session (heads="auto"), not given
        self._warned_taps = False
        taps_unusable = self.balancer.uses_current_step or needs_capture or self.balancer.weights_act_on_representation
        if heads is True or isinstance(heads, str):
            if heads is not True and heads != "auto":
                raise ValueError(f"heads= takes the task heads in task order, 'auto', or None for the general path; got {heads!r}")
            self._auto = True
            if not self.measure:
                self._heads_search = f"not searched: no gradient norms are measured ({self.balancer.name} needs none, measure_grad_norms=False)"
            elif taps_unusable:
                self._heads_search = (
                    f"not searched: {self.balancer.name} sets this step's weights from this step's losses or gradients before the loss is formed"
                )
            elif accumulate > 1:
                self._heads_search = (
                    f"not searched: accumulate={accumulate} sums each task's gradient at W over the micro-batches, "
                    "which the taps (one norm per backward) do not keep"
                )
            else:
                self._finder = HeadFinder()
                self._owned.own(self._finder.handle)
        elif heads is None or heads is False:
            self._heads_search = f"not searched: heads={heads!r} asks for the general path"
        else:
            if accumulate > 1:
                raise ValueError(
                    f"heads= taps one norm per backward; accumulate={accumulate} needs each task's gradient summed over the micro-batches: leave heads= out"
                )
            if taps_unusable:
                raise ValueError(
                    f"heads= measures gradient norms during your backward, but {self.balancer.name} needs this step's "
                    "per-task gradients before the loss is formed; leave heads= out for it"
                )
            self.taps = self._make_taps(list(heads), check_pairing=True)
        self.tasks: Optional[list[str]] = list(tasks) if tasks is not None else None
        self.step_index = 0
        # An unusable runs root or a taken run name is refused here, naming the path and the cause, not at
        # the first step. Under torch.distributed rank 0 creates the run at the first step, with the name
        # every rank was given, so the claim is made only by a single process.
        if runs_root is not None and run_name is not None:
            runs.validate_run_id(run_name)  # before anything is created on disk
        self.runs_root = None if runs_root is None else runs.check_runs_root(runs_root)
        if resume and (self.runs_root is None or run_name is None):
            raise ValueError("resume=True continues the run named run_name under runs_root; give both")
        if self.runs_root is not None and distributed.world_size() == 1 and not resume:
            self.run_name, self._owned.claim = runs.reserve_run(self.runs_root, run_name, self.balancer.name)
        else:
            self.run_name = run_name or time.strftime(f"{self.balancer.name}-%Y%m%d-%H%M%S")
        self.flush_every = flush_every
        self.user_config = dict(config or {})
        self._named = run_name is not None
        self._first_step: Optional[int] = None  # the step number the first step is recorded under
        # resume=True: record into run_name as its next attempt if it exists (else create it); a loaded state
        # continues its own run the same way (load_state_dict).
        self._resume_asked = bool(resume)
        self._resume = False
        self.attempt = 1
        self.run_path: Optional[Path] = None
        self.recorder: Optional[Recorder] = None
        self.closed = False

    # -- public API ------------------------------------------------------------------------------
    def loss(self, losses: Losses, *, epoch: Optional[int] = None, step: Optional[int] = None) -> Tensor:
        """The weighted loss sum_i w_i L_i of this step (shadow mode: with the user's weights)."""
        self._check_open()
        names, optional_values, present = self._split(losses)
        if self._pending is not None:
            self._unfinished_step()
        stacked = self._stack(optional_values)
        if present is not None:
            self._check_partial(present, names)
            self._stop_head_search(f"not searched: the first step lacks task(s) {[t for t, p in zip(names, present) if not p]}")
        values = [v for v in optional_values if v is not None]
        # The head search: this step is measured the general way; the taps found here serve from the next.
        finder = self._finder
        first = not self.balancer.bound
        if first:
            self._bind(names, stacked)
            self._first_step = step
        route = self._search_heads(finder, values) if finder is not None else None
        if first:
            self._open_run(values, route)
        applied = self._applied_weights()
        if self.balancer.uses_current_step:
            applied = self._current_step_weights(values, stacked, applied)
        # Gradient surgery acts on Z's gradient; the heads then train on unit-weighted losses.
        loss_weights = torch.ones_like(applied) if self.balancer.weights_act_on_representation and not self.shadow else applied
        total = (loss_weights * stacked).sum()
        if self.accumulate > 1:
            self._micro_batch(optional_values, stacked, applied, present, epoch, step)
            return total
        if not self._measures_now():
            self._hold(stacked, applied, present, epoch, step)
            return total
        if present is not None:
            self._observe_present(optional_values, stacked, applied, present, epoch, step)
            return total
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
        names, optional_values, present = self._split(losses)
        if self._pending is not None:
            self._unfinished_step()
        stacked = self._stack(optional_values)
        if present is not None:
            self._check_partial(present, names)
        values = [v for v in optional_values if v is not None]
        self._stop_head_search("not searched: observe() measures before your backward")
        if self.taps is not None and self._auto:
            self._drop_taps(f"from step {self.step_index}: observe() measures before your backward")
        if not self.balancer.bound:
            self._bind(names, stacked)
            self._first_step = step
            self._open_run(values, None)
        applied = self._applied_weights()
        if self.accumulate > 1:
            self._micro_batch(optional_values, stacked, applied, present, epoch, step)
        elif not self._measures_now():
            self._hold(stacked, applied, present, epoch, step)
        elif present is not None:
            self._observe_present(optional_values, stacked, applied, present, epoch, step)
        else:
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
    def _make_taps(self, heads: list[nn.Module], check_pairing: bool = False) -> HeadTaps:
        # Under torch.distributed with the rows or the sketch (a DistributedNormMeter): the taps hand W's input
        # and output-gradient rows of the user's backward to the meter's exchange, which overlaps the trunk's
        # backward; otherwise (the gradients route) the gradients are averaged over ranks before the norms.
        exchange = isinstance(self.meter, DistributedNormMeter)
        taps = HeadTaps(
            heads,
            self.layer.parameter,
            _weakly(self._norms_from_backward),
            reduce=distributed.mean_across_ranks if distributed.world_size() > 1 and not exchange else None,
            exchange=_weakly(self._exchange_rows) if exchange else None,
            factor=_weakly(self._step_factors),
            per_channel=self._per_channel,
            module=self.layer.module,
            # Heads the session found fall back to the general path on a backward they cannot measure;
            # heads the user gave make it an error.
            on_failure=_weakly(self._taps_failed) if self._auto else None,
            check_pairing=check_pairing,
            warn_fallback=not self._auto,
        )
        self.meter.pause()  # the taps serve: the general path's Gram hook keeps no forward pass's graph
        return self._owned.own(taps)

    # -- checkpoint and resume ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the session needs to continue bit for bit, for ``torch.save`` beside the model's state.

        The balancer's state (weights w(t), their optimiser's moments and step, L_i(0); see
        :meth:`Balancer.state_dict`), the step counter, the tasks, and the run it records into (its id and
        attempt), as tensors and plain Python values that ``torch.load(weights_only=True)`` reads. Take it
        after the step's ``backward()`` (the taps finish a step there). The recorder is flushed and waited
        for first, so every step before the checkpoint is on disk when the checkpoint is.
        """
        if self._pending is not None:
            raise RuntimeError(f"step {self.step_index}'s backward has not run yet (its weights update during backward()); take the state after backward()")
        if self._micro:
            raise RuntimeError(
                f"the state is taken between optimiser steps: this is micro-batch {self._micro} of {self.accumulate} of step {self.step_index}; "
                "take it after the optimiser step"
            )
        if self.recorder is not None and not self.recorder.closed:
            self.recorder.wait()
        return {
            "format": SESSION_STATE_FORMAT,
            "balancer": self.balancer.state_dict(),
            "step": self.step_index,
            "tasks": list(self.tasks) if self.tasks is not None else None,
            "run_id": self.run_name if self.runs_root is not None else None,
            "attempt": self.attempt,
        }

    def load_state_dict(self, state: Mapping[str, Any], *, same_run: bool = True) -> None:
        """Continue from a :meth:`state_dict`: call it after ``attach`` and before the first step.

        The balancer, the step counter and the tasks are restored, so the weights follow the interrupted
        run's trajectory bit for bit (on the general path, ``heads=None``; with the default taps the first
        step after loading is measured the general way, whose norms agree to rounding). With a
        ``runs_root`` and ``same_run=True`` (the default), the session records into the state's run, as
        its next attempt (``run.json``'s ``attempts``): the run must be under this ``runs_root``, and the
        directory ``attach`` claimed for a new run is released. Steps the interrupted process recorded
        after its checkpoint are recorded again, and every analysis reads each step once, the latest
        attempt's. ``same_run=False`` records into the new run ``attach`` named instead.
        """
        self._check_open()
        if self.step_index or self.balancer.bound:
            raise RuntimeError("load_state_dict() restores a session before its first step; attach a new session and load the state into it")
        if not isinstance(state, Mapping):
            raise ValueError(f"session state must be a dict from Session.state_dict(), got {type(state).__name__}")
        missing = [key for key in SESSION_STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"session state lacks {missing}: not a Session.state_dict() (a balancer's state loads with balancer.load_state_dict)")
        if state["format"] != SESSION_STATE_FORMAT:
            raise ValueError(f"session state has format {state['format']!r}; this toolkit reads format {SESSION_STATE_FORMAT}")
        step, tasks, run_id = state["step"], state["tasks"], state["run_id"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"session state: 'step' must be an int >= 0, got {step!r}")
        if tasks is not None and (not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks)):
            raise ValueError(f"session state: 'tasks' must be a list of task names, got {tasks!r}")
        if tasks is not None and self.tasks is not None and list(self.tasks) != tasks:
            raise ValueError(f"session state has tasks {tasks}, this session was attached with tasks={self.tasks}")
        resume = same_run and self.runs_root is not None and run_id is not None
        if resume:
            if not isinstance(run_id, str):
                raise ValueError(f"session state: 'run_id' must be a run name, got {run_id!r}")
            runs.validate_run_id(run_id)
            if self._named and run_id != self.run_name:
                raise ValueError(
                    f"session state records into run {run_id!r}, but this session was attached with run_name={self.run_name!r}; "
                    "leave run_name out (or give the same) to continue that run, or pass same_run=False to record into the new one"
                )
            assert self.runs_root is not None
            if not (self.runs_root / run_id / "run.json").exists():
                raise runs.RunError(
                    f"cannot resume run {run_id!r}: it is not under {self.runs_root}; attach with the runs_root of the interrupted run, "
                    "or pass same_run=False to record into a new run"
                )
        self.balancer.load_state_dict(state["balancer"])
        if tasks is not None:
            self.tasks = list(tasks)
        self.step_index = step
        if resume:
            claim, self._owned.claim = self._owned.claim, None
            if claim is not None and claim.name != run_id:
                runs.release_run(claim)
            self.run_name, self._resume = run_id, True

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

    def _stack(self, values: Sequence[Optional[Tensor]]) -> Tensor:
        """The (T,) losses in the statistics' dtype: float32, or float64 for a float64 model or losses.

        Autocast's bfloat16 or float16 losses are converted (autograd converts their gradients back), so
        that the weights, their optimiser and the norms never run in half precision.
        """
        given = [v for v in values if v is not None]
        if len(given) < len(values):
            # An absent task's place holds 0 (no gradient: w_i * 0 adds nothing to the total loss).
            zero = torch.zeros((), dtype=given[0].dtype, device=given[0].device)
            given = [zero if v is None else v for v in values]
        values = given
        stacked = torch.stack([v if v.dim() == 0 else v.reshape(()) for v in values])
        dtype = self._dtype
        if dtype is None:
            dtype = self._dtype = statistics_dtype(self.layer.parameter.dtype, stacked.dtype)
        dtypes = {v.dtype for v in values}
        self._loss_dtypes = None if dtypes == {dtype} else (dtypes.pop() if len(dtypes) == 1 else [v.dtype for v in values])
        return stacked if stacked.dtype == dtype else stacked.to(dtype)

    def _stop_head_search(self, reason: str) -> None:
        if self._finder is not None:
            self._finder.stop()
            self._finder = None
            self._heads_search = reason

    def _search_heads(self, finder: HeadFinder, values: list[Tensor]) -> Optional[str]:
        """The first step: find the heads; the taps serve from the next step. Returns the route."""
        self._finder = None
        found = finder.find(values, self.layer.parameter)
        self._heads_search = found.reason
        if found.heads is None or found.shared is None:
            return None
        zero = self._zero_weight_task()
        if zero is not None:
            self._heads_search = f"{found.reason}; not used: task {zero!r} has weight 0, so its head sends no gradient to measure"
            return None
        self.taps = self._make_taps(found.heads)
        call, count = layer_call(found.calls, self.layer.module)
        layer_input = (call.input, call.input_version) if call is not None else None
        route = self.taps.describe_path_of(found.shared, layer_input, call.output_node if call is not None else None, count)
        if self.taps.exchange is not None and route not in (OUTPUT_MASK, OUTPUT_VJP):
            # The taps cannot hand the exchange W's rows (W called otherwise than the heads' forward shows):
            # the distributed meter's own per-task path serves.
            self._heads_search = f"{found.reason}; not used: {self.taps.reason}"
            self.taps.remove()
            self.taps = None
            if isinstance(self.meter, DistributedNormMeter):
                self.meter.resume()
            return None
        return route

    def _zero_weight_task(self) -> Optional[str]:
        """A task whose applied weight is 0 (the first step only: a host read)."""
        applied = self._applied_weights()
        for task, weight in zip(self._known_tasks(), applied.tolist()):
            if weight == 0:
                return task
        return None

    def _split(self, losses: Losses) -> tuple[list[str], list[Optional[Tensor]], Optional[list[bool]]]:
        """Names, losses in task order (None for a task absent from this step) and the present flags
        (None when every task is present)."""
        values: list[Any]
        if isinstance(losses, Mapping):
            names, values = [str(k) for k in losses.keys()], list(losses.values())
            if self.tasks is not None and names != self.tasks and set(names) < set(self.tasks):
                # A step that lacks some tasks (multi-dataset or partly labelled batches): absent, in task order.
                given = dict(zip(names, values))
                names, values = list(self.tasks), [given.get(task) for task in self.tasks]
        elif isinstance(losses, (list, tuple)):
            values = list(losses)
            names = self.tasks if self.tasks is not None and len(self.tasks) == len(values) else [f"task{i}" for i in range(len(values))]
        else:
            raise TypeError(f"losses must be a dict name -> loss or a sequence of losses, got {type(losses).__name__}")
        if len(values) < 2:
            raise ValueError(f"GradNorm balances two or more task losses; got {len(values)} ({names})")
        flags = [value is not None for value in values]
        if not any(flags):
            raise ValueError(f"step {self.step_index} hands no task's loss (all of {names} are None); skip the step instead")
        for name, value in zip(names, values):
            if value is None:
                continue
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
            raise ValueError(
                f"task names changed at step {self.step_index}: {detail}; every step must hand the same tasks in the same order "
                "(a step may leave tasks out, or give None for them; a task first seen after the first step needs attach(..., tasks=[...]))"
            )
        return names, values, (None if all(flags) else flags)

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

    def _bind(self, names: list[str], stacked: Tensor) -> None:
        """The first step: the tasks, the balancer's state and the shadow weights, in the statistics' dtype."""
        self.tasks = names
        self.balancer.bind(names, stacked.device, stacked.dtype)
        if self.shadow:
            user = EqualWeights() if self._user_weights is None else StaticWeights(self._user_weights)
            user.bind(names, stacked.device, stacked.dtype)
            self._applied = user.weights()

    def _open_run(self, values: list[Tensor], auto_route: Optional[str]) -> None:
        """The first step: choose the general path's route and create the run, saying how norms are measured."""
        if self.measure and (self.taps is None or auto_route is not None or isinstance(self.meter, DistributedNormMeter)):
            self.meter.choose(values)
        if self.runs_root is None:
            return
        names = self._known_tasks()
        first_step = self.step_index if self._first_step is None else self._first_step
        meta: dict[str, Any] = {
            "tasks": names,
            "balancer": self.balancer.config(),
            "shared_layer": self.layer.config(),
            "mode": "shadow" if self.shadow else "balance",
            "grad_norm_path": self._grad_norm_path(auto_route),
            "flush_every": self.flush_every,
            "config": self.user_config,
        }
        if self.meter.choice is not None:
            meta["grad_norm_route"] = f"{self.meter.choice.route}: {self.meter.choice.reason}"
        if isinstance(self.meter, DistributedNormMeter):
            meta["distributed_norms"] = {**self.meter.describe(), "fed_by": self._exchange_feed(auto_route)}
        if self.taps is not None and self.taps.reason is not None:
            meta["head_taps_route"] = self.taps.reason  # the taps' Gram route taken or not, and why
        if self._heads_search is not None:
            meta["heads_search"] = self._heads_search
        if self._applied is not None:
            meta["applied_weights"] = dict(zip(names, self._applied.tolist()))
        if self._resume or (self._resume_asked and self._run_exists()):
            self.run_path, self.attempt = self._resume_run(first_step, meta)
        else:
            self.run_path = distributed.create_or_join_run(self.runs_root, self.run_name, meta)
        self.recorder = self._owned.recorder = Recorder(self.run_path, names, flush_every=self.flush_every, listeners=self.listeners, attempt=self.attempt)

    def _run_exists(self) -> bool:
        """Whether run_name exists under runs_root: rank 0's answer on every rank (before rank 0 creates it)."""
        assert self.runs_root is not None
        exists = (self.runs_root / self.run_name / "run.json").exists()
        if distributed.world_size() == 1:
            return exists
        import torch.distributed as dist

        flag = torch.tensor([int(exists)])
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def _resume_run(self, first_step: int, meta: Mapping[str, Any]) -> tuple[Path, int]:
        """The run continues as its next attempt: rank 0 opens it (``runs.resume_run``), every other rank
        learns the attempt number from it and writes its own partition under it."""
        assert self.runs_root is not None
        if distributed.world_size() == 1:
            return runs.resume_run(self.runs_root, self.run_name, first_step, meta)
        import torch.distributed as dist

        attempt = torch.zeros(1, dtype=torch.int64)
        error: Optional[Exception] = None
        if distributed.rank() == 0:
            try:
                attempt[0] = runs.resume_run(self.runs_root, self.run_name, first_step, meta)[1]
            except Exception as exc:  # every rank must reach the broadcast, then all fail alike
                error = exc
        dist.broadcast(attempt, src=0)
        if error is not None:
            raise error
        if int(attempt[0]) < 1:
            raise runs.RunError(f"rank 0 could not resume run {self.run_name!r} under {self.runs_root}")
        return self.runs_root / self.run_name, int(attempt[0])

    def _exchange_feed(self, auto_route: Optional[str]) -> str:
        """What hands the distributed meter its rows (run.json's ``distributed_norms.fed_by``)."""
        if self.accumulate > 1:
            return (
                f"not used: accumulate={self.accumulate} sums each task's gradient at W over the micro-batches (one backward per task to W "
                "in session.loss()) and averages the sums across ranks, T x |W| numbers per optimiser step"
            )
        per_task = "one backward per task from the losses to W's output in session.loss(), before your backward"
        if self.taps is None:
            return f"{per_task} ({self._heads_search or 'no heads'})"
        since = "step 1" if auto_route is not None else "step 0"
        how = self.taps.reason or "the heads' gradients at their input"
        return (
            f"the heads' taps in your backward from {since} ({how}); the collective is issued once the heads' part of the "
            "backward has run and overlaps the trunk's, and is waited for at the backward's end where the norms are used"
            + (f"; step 0: {per_task}" if auto_route is not None else "")
        )

    def _grad_norm_path(self, auto_route: Optional[str]) -> str:
        if not self.measure:
            return "not measured"
        if self.accumulate > 1:
            return f"{AUTOGRAD_LOOP} (accumulate={self.accumulate}: each task's gradient at W summed over the micro-batches)"
        general = self.meter.route or AUTOGRAD_LOOP
        if self.taps is None:
            return general
        # Under an exchange: how the taps form D at W's output, then the route that exchanges it.
        exchanged = f"+{general}" if isinstance(self.meter, DistributedNormMeter) else ""
        if auto_route is not None:
            return f"head-taps/{auto_route}{exchanged} (step 0: {general})"
        return f"head-taps/{self.taps.describe_path()}{exchanged}"

    def _defer(self, taps: HeadTaps, values: list[Tensor], stacked: Tensor, applied: Tensor, epoch: Optional[int], step: Optional[int]) -> None:
        """Taps: keep the step; they finish it from inside the user's backward."""
        self._check_first_step(values)
        tasks = self._known_tasks()
        if len(taps.heads) != len(tasks):
            raise ValueError(f"heads= has {len(taps.heads)} modules for {len(tasks)} tasks {tasks}; give one head per task, in task order")
        if self.step_index == 0:
            taps.check_pairing(values, tasks)
        factors = self._factors
        if factors is None:
            factors = self._factors = _Factors(len(tasks))
        factors.reset()
        # The last step's hooks went with its graph; only this step's are kept, for close().
        if self.shadow:
            self._owned.factor_hooks = [factors.watch(index, value) for index, value in enumerate(values)]
        else:
            self._owned.factor_hooks = [factors.watch_stacked(stacked)]
        self._pending = (values, stacked.detach(), applied, epoch, step)
        taps.arm()

    def _unfinished_step(self) -> None:
        """A kept step whose backward never reached the taps: an error for heads the user gave; for heads
        the session found, the step is measured the general way (its graph is still there unless some other
        backward freed it) and the general path serves from now on."""
        pending = self._pending
        if pending is None:
            return
        values, stacked, applied, epoch, step = pending
        self._pending = None
        if not self._auto:
            raise RuntimeError(
                f"the loss of step {self.step_index} was never backpropagated: with heads= the weights update during "
                "backward(); call backward() on every loss that session.loss() returns"
            )
        # First, so that the measurement below does not pass through armed taps.
        self._drop_taps(f"from step {self.step_index + 1}: the loss of step {self.step_index} was never backpropagated")
        try:
            norms: Optional[Tensor] = self.meter(values)
        except RuntimeError:  # its graph was freed by a backward that did not pass the heads
            norms = torch.full((len(values),), float("nan"), device=stacked.device, dtype=stacked.dtype)
        self._finish(stacked, norms, applied, epoch, step)

    def _drop_taps(self, note: str) -> None:
        """The general path from now on; ``run.json`` notes when and why, once the run closes."""
        taps, self.taps = self.taps, None
        if taps is not None:
            taps.remove()
        self._owned.remove_factor_hooks()
        general = self.meter.route or AUTOGRAD_LOOP
        self._owned.meta_updates["grad_norm_path"] = f"{self._first_path()}; {general} {note}"
        if isinstance(self.meter, DistributedNormMeter):
            self.meter.resume()  # its own per-task path measures from now on: W's calls are kept again
            record = {**self.meter.describe(), "fed_by": f"{self._exchange_feed(None)}; {note}"}
            self._owned.meta_updates["distributed_norms"] = record

    def _first_path(self) -> str:
        recorded = self._owned.meta_updates.get("grad_norm_path")
        if recorded is not None:
            return str(recorded)
        if self.run_path is not None:
            try:
                return str(runs.read_run_json(self.run_path).get("grad_norm_path", "head-taps"))
            except (OSError, runs.RunError):
                pass
        return "head-taps"

    def _taps_failed(self, exc: TapsError) -> None:
        """A backward the taps the session found cannot measure: this step's norms are unknown (recorded
        as such, and GradNorm skips its update); the general path serves from the next step."""
        pending, self._pending = self._pending, None
        self._owned.remove_factor_hooks()
        if not self._warned_taps:
            self._warned_taps = True
            warnings.warn(
                f"gradnorm: the heads' taps could not measure step {self.step_index} ({exc}); its gradient norms are recorded "
                "as unknown and the general path measures them from the next step",
                RuntimeWarning,
            )
        self._drop_taps(f"from step {self.step_index + 1}: {exc}")
        if pending is not None:
            _, stacked, applied, epoch, step = pending
            self._finish(stacked, torch.full((len(stacked),), float("nan"), device=stacked.device, dtype=stacked.dtype), applied, epoch, step)

    def _step_factors(self) -> Tensor:
        """The (T,) factors f_i of this backward (see :class:`_Factors`), in the statistics' dtype; the
        taps divide them out of the gradients of f_i L_i they measure."""
        factors = self._factors
        if factors is None:
            raise TapsError("no step was kept for this backward")
        dtype = self._dtype or torch.float32
        if not self.shadow:
            whole = factors.whole
            if whole is None:
                raise TapsError(
                    "this backward reached the heads but not through the loss session.loss() returned; backpropagate that "
                    "loss (scaled or divided as you like), or attach with shadow=True and call observe() for a total of your own"
                )
            rounding = self._loss_dtypes
            if rounding is None:
                return whole
            # Each loss receives its factor in its own dtype (a bfloat16 loss: the float32 gradient rounded).
            if isinstance(rounding, torch.dtype):
                return whole.to(rounding).to(dtype)
            return torch.stack([part.to(loss_dtype) for part, loss_dtype in zip(whole.unbind(), rounding)]).to(dtype)
        parts = factors.parts
        present = [part for part in parts if part is not None]
        if len(present) != len(parts):
            missing = [task for task, part in zip(self._known_tasks(), parts) if part is None]
            raise TapsError(
                f"the losses of tasks {missing} did not reach this backward, though their heads did; the taps need each "
                "task's loss in the backward (session.loss()'s result, or a loss built from the losses handed to it)"
            )
        factor = torch.stack(present)
        return factor if factor.dtype == dtype else factor.to(dtype)

    def _exchange_rows(self, x_rows: Tensor, d_rows: Tensor) -> Callable[[], Tensor]:
        """The taps' rows of this step's backward into the distributed meter's one collective (issued now)."""
        if self._pending is None or not isinstance(self.meter, DistributedNormMeter):
            raise TapsError("heads=: a backward was measured for which no step was kept")
        return self.meter.issue(self._pending[1], x_rows, d_rows, self.step_index)

    def _norms_from_backward(self, norms: Tensor) -> None:
        if self._pending is None:  # the taps measure only a backward that _defer armed, right after keeping its step
            raise RuntimeError("heads=: a backward was measured for which no step was kept")
        _, stacked, applied, epoch, step = self._pending
        self._pending = None
        self._finish(stacked, norms, applied, epoch, step)

    def _check_first_step(self, values: list[Tensor]) -> None:
        self._check_open()
        if self.step_index == 0 and self.measure:
            for name, value in zip(self._known_tasks(), values):
                # (Under FSDP the weight held here is the shard; the distributed meter checks W's outputs.)
                if not reaches(value, self.layer.parameter) and not (isinstance(self.meter, DistributedNormMeter) and self.meter.reaches(value)):
                    raise ValueError(
                        f"the shared layer {self.layer.description} receives no gradient from task {name!r}: "
                        "choose a layer that every task's loss depends on (the last shared trunk layer)"
                    )

    def _observe(self, values: list[Tensor], stacked: Tensor, applied: Tensor, epoch: Optional[int], step: Optional[int]) -> None:
        self._check_first_step(values)
        norms = self._step_norms if self._step_norms is not None else (self.meter(values) if self.measure else None)
        self._step_norms = None
        self._finish(stacked.detach(), norms, applied, epoch, step)

    def _finish(
        self, stacked: Tensor, norms: Optional[Tensor], applied: Tensor, epoch: Optional[int], step: Optional[int], present: Optional[list[bool]] = None
    ) -> None:
        # Under DDP every rank balances the global (rank-averaged) losses, so the weights agree.
        stacked = self.meter.global_losses(stacked) if isinstance(self.meter, DistributedNormMeter) else distributed.mean_across_ranks(stacked)
        if present is None and (self._partial or self.balancer.initial_loss.per_task):
            present = [True] * len(stacked)  # once a step lacked a task, every step is balanced over the present ones
        stats = self.balancer.update(stacked, norms, applied=applied, present=present)
        if self.update_every > 1:
            stats.step_measured = torch.ones_like(stacked)
        self._record(stats, epoch, step)

    def _record(self, stats: StepStats, epoch: Optional[int], step: Optional[int]) -> None:
        if self.recorder is not None:
            matrix, defined = stats_matrix(stats, len(self._known_tasks()))
            # A step between updates defines fewer fields; the recorder keeps one layout per flush, and the
            # fields it lacks are null on its rows (step_measured False), so it takes the measured steps' layout.
            if defined < self._defined:
                defined = self._defined
            self._defined = defined
            self.recorder.record(self.step_index if step is None else step, matrix, defined, epoch=epoch)
        self.step_index += 1

    # -- update_every, tasks missing from a step, gradient accumulation --------------------------------
    def _measures_now(self) -> bool:
        """Whether this step measures the norms and updates the weights (every ``update_every``-th step)."""
        return self.update_every == 1 or self.step_index % self.update_every == 0

    def _hold(self, stacked: Tensor, applied: Tensor, present: Optional[list[bool]], epoch: Optional[int], step: Optional[int]) -> None:
        """A step between updates: no taps armed, no norms, the weights as they are; its losses recorded."""
        stacked = distributed.mean_across_ranks(stacked.detach())
        if present is None and (self._partial or self.balancer.initial_loss.per_task):
            present = [True] * len(stacked)
        stats = self.balancer.hold(stacked, applied=applied, present=present)
        stats.step_measured = torch.zeros_like(stacked)
        self._record(stats, epoch, step)

    def _check_partial(self, present: list[bool], names: Sequence[str]) -> None:
        """A step lacking some tasks: the balancer must balance the present ones among themselves."""
        absent = [task for task, flag in zip(names, present) if not flag]
        if not self.balancer.supports_missing_tasks:
            raise ValueError(
                f"step {self.step_index} lacks task(s) {absent}, but {self.balancer.name} balances all tasks at every step "
                "(GradNorm and static weights accept missing tasks)"
            )
        if distributed.world_size() > 1:
            raise NotImplementedError("steps that lack some tasks are not supported under torch.distributed yet (the ranks' tasks would differ)")
        self._partial = True

    def _observe_present(
        self, values: list[Optional[Tensor]], stacked: Tensor, applied: Tensor, present: list[bool], epoch: Optional[int], step: Optional[int]
    ) -> None:
        """A step lacking some tasks: the present tasks' norms, one backward each (an absent task's head
        gets no gradient, so the taps, armed for all heads, are not used for it)."""
        self._check_first_step([v for v in values if v is not None])
        norms = self._task_norms(self._task_gradients(values)) if self.measure else None
        self._finish(stacked.detach(), norms, applied, epoch, step, present)

    def _task_gradients(self, values: Sequence[Optional[Tensor]]) -> list[Optional[Tensor]]:
        """grad_W L_i of each present task (None where absent), the user's graph kept for their backward."""
        parameter = self.layer.parameter
        return [None if v is None else torch.autograd.grad(v, parameter, retain_graph=True)[0] for v in values]

    def _task_norms(self, grads: Sequence[Optional[Tensor]]) -> Tensor:
        """(T,) norms ||grad_W L_i|| (per output channel: (T, C)), NaN where absent, in the statistics' dtype."""
        dtype = self._dtype or torch.float32
        rows: list[Optional[Tensor]] = []
        for grad in grads:
            if grad is None:
                rows.append(None)
                continue
            g = grad.to(dtype)
            rows.append(g.reshape(g.shape[0], -1).norm(dim=1) if self._per_channel else torch.linalg.vector_norm(g))
        known = next(r for r in rows if r is not None)
        nan = torch.full(known.shape, float("nan"), dtype=dtype, device=known.device)
        return torch.stack([nan if r is None else r for r in rows])

    def _micro_batch(
        self, values: list[Optional[Tensor]], stacked: Tensor, applied: Tensor, present: Optional[list[bool]], epoch: Optional[int], step: Optional[int]
    ) -> None:
        """One of ``accumulate`` micro-batches of an optimiser step: each task's loss and its gradient at W
        are averaged over the micro-batches where it is present (as the network's gradient accumulates,
        with the usual division by k), and the k-th one finishes the step: one update, one record."""
        if self.step_index == 0 and self._micro == 0:
            self._check_first_step([v for v in values if v is not None])
        measured = self._measures_now() and self.measure
        flags = present if present is not None else [True] * len(values)
        if self._micro == 0 or self._acc_losses is None:
            self._acc_losses = torch.zeros_like(stacked.detach())
            self._acc_counts = [0] * len(values)
            self._acc_grads = [None] * len(values)
        self._acc_losses = self._acc_losses + stacked.detach()
        self._acc_counts = [count + flag for count, flag in zip(self._acc_counts, flags)]
        if measured:
            for index, grad in enumerate(self._task_gradients(values)):
                if grad is not None:
                    held = self._acc_grads[index]
                    self._acc_grads[index] = grad if held is None else held + grad
        self._micro += 1
        if self._micro < self.accumulate:
            return
        self._micro = 0
        counts = self._acc_counts
        divisor = torch.tensor([max(c, 1) for c in counts], dtype=stacked.dtype, device=stacked.device)
        losses = self._acc_losses / divisor
        seen = [c > 0 for c in counts]
        partial = None if all(seen) else seen
        if partial is not None:
            self._check_partial(partial, self._known_tasks())
        if not measured:
            self._hold(losses, applied, partial, epoch, step)
            return
        grads = [None if g is None else distributed.mean_across_ranks(g / c) for g, c in zip(self._acc_grads, counts)]
        self._acc_grads = [None] * len(values)
        self._finish(losses, self._task_norms(grads), applied, epoch, step, partial)


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
    heads: Union[None, bool, str, Sequence[nn.Module]] = "auto",
    grad_scaler: Optional[Any] = None,
    trackers: Union[None, TrackerSpec, Sequence[TrackerSpec]] = None,
    distributed_norms: str = "auto",
    sketch_size: int = DEFAULT_SKETCH_SIZE,
    resume: bool = False,
    update_every: int = 1,
    accumulate: int = 1,
) -> Session:
    """Attach ``balancer`` (default: equal weights, monitor only) at the shared layer ``shared``
    (paper section 3: W, the last shared layer, where the per-task gradient norms G_W^(i) are taken).

    ``runs_root``/``run_name`` write records there; ``shadow``/``weights`` record without changing
    training; ``flush_every`` sets how many steps the device buffer holds; ``tasks`` names the tasks of a
    sequence of losses; ``config`` is saved in ``run.json``. ``heads`` says where the norms come from:
    ``"auto"`` (the default) finds the task heads at the first step and taps the norms from your own
    backward from the second step where the model allows (``run.json``'s ``heads_search`` says why where
    it does not); the task heads in task order tap them from the first step; ``None`` (or ``False``)
    measures them with separate backward passes, the general path. ``grad_scaler`` is accepted and
    ignored: the loss scale is read from the backward itself. ``resume=True`` records into the existing run
    ``run_name`` as its next attempt (created if absent), for a job that restarts from a checkpoint:
    load the checkpoint's :meth:`Session.state_dict` with :meth:`Session.load_state_dict` before the first
    step (``docs/training-jobs.md``).
    Under ``torch.distributed`` every rank attaches with the same ``run_name``; see ``hooks/distributed.py``.
    ``distributed_norms`` says how the norms of the rank-averaged gradient are formed there: ``"auto"``
    chooses by the bytes each route sends, ``"exact"`` forces the cheaper exact route, ``"rows"``,
    ``"sketch"`` (``sketch_size`` random pairs, an estimate with a stated error) or ``"gradients"`` one
    route (``docs/distributed.md``; ``run.json``'s ``distributed_norms`` records the choice and its bytes).
    ``trackers`` forwards the recorded per-task quantities to TensorBoard, W&B or MLflow (a tracker, its name, or
    a list; ``docs/trackers.md``). The session owns every hook it registers and removes them on :meth:`Session.close`.
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
        trackers=trackers,
        distributed_norms=distributed_norms,
        sketch_size=sketch_size,
        resume=resume,
        update_every=update_every,
        accumulate=accumulate,
    )
