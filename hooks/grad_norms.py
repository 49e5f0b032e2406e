"""Per-task gradient norms n_i = ||grad_W L_i||_2 at the shared layer, without touching ``.grad``.

This is the general path (paper section 3: G_W^(i) at the last shared layer W), used where the heads'
taps of ``hooks/taps.py`` cannot serve. How the T gradients are formed is chosen once, at the first
step, from the shape of the autograd graph between the losses and W, by :class:`RouteChooser`; the
route and the reason go to ``run.json`` (``grad_norm_path``, ``grad_norm_route``). The routes:

- ``autograd-loop``: one ``torch.autograd.grad`` per task, from its loss to W. Each call runs only the
  nodes on that task's own path, so each task's head and loss are differentiated once, and a
  non-finite loss reaches no other task's norm.
- ``autograd-batched``: one T-batched vector-Jacobian product (``is_grads_batched``, a vmap over the
  backward from the stacked losses to W). It runs every node of every task's path for every task: T
  times the work of each task's own part, and a non-finite loss makes every task's norm NaN (the zero
  gradient its other rows carry meets its NaN values: 0 * NaN). It is only taken when asked for
  (``GradNormMeter(batched=True)``).

A route is a :class:`NormRoute`: a name, an estimate from the graph's shape and the T gradients; other
candidates (say, the Gram identity of ``hooks/gram_norms.py``) join by being added to the chooser.
Everything runs on the device, without host synchronisation; the norms are taken in float32 at least
(float64 for a float64 W), whatever the gradients' dtype.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor

AUTOGRAD_LOOP = "autograd-loop"
AUTOGRAD_BATCHED = "autograd-batched"
#: Nodes visited per loss when the graph's shape is read (the first step only); beyond it, the shape is unknown.
MAX_GRAPH_NODES = 100_000


def statistics_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or float64 where any of ``dtypes`` is float64: the dtype of weights, norms and moments.

    Low-precision losses (bfloat16, float16 under autocast) never set it: the weights' optimiser and the
    norms' sums of squares would lose the update (or overflow) there.
    """
    return torch.float64 if torch.float64 in dtypes else torch.float32


def norms_of(per_task: Tensor, per_channel: bool = False) -> Tensor:
    """(T,) norms of (T, *W.shape) per-task gradients, or (T, C) norms per output channel of W.

    Taken in at least float32: a float16 sum of squares overflows at a norm of 256.
    """
    dtype = statistics_dtype(per_task.dtype)
    if per_channel:
        return torch.linalg.vector_norm(per_task.flatten(2), dim=2, dtype=dtype)
    return torch.linalg.vector_norm(per_task.flatten(1), dim=1, dtype=dtype)


@dataclass
class GraphShape:
    """The work of backpropagating from each loss to W, read from the first step's autograd graph.

    ``per_task[i]`` is the number of gradient elements the nodes on task i's paths to W receive; ``union``
    the same over the nodes of every task's paths, each counted once. The batched product carries every
    node of the union for every task; the loop carries each task's own paths once.
    """

    num_tasks: int
    per_task: list[int] = field(default_factory=list)
    union: int = 0
    complete: bool = True  # False where a graph was larger than MAX_GRAPH_NODES

    @property
    def loop_work(self) -> int:
        return sum(self.per_task)

    @property
    def batched_work(self) -> int:
        return self.num_tasks * self.union


def _node_size(node) -> int:
    size = 0
    for meta in getattr(node, "_input_metadata", ()):
        numel = 1
        for extent in getattr(meta, "shape", ()):
            numel *= int(extent)
        size += numel
    return max(size, 1)


def graph_shape(losses: Sequence[Tensor], parameter: Tensor) -> GraphShape:
    """The :class:`GraphShape` of ``losses`` down to ``parameter`` (nodes that do not lead to W are left out)."""
    shape = GraphShape(len(losses))
    leads: dict[object, bool] = {}  # node -> whether W's gradient flows through it
    sizes: dict[object, int] = {}

    def leads_to_w(root) -> set:
        # Iterative post-order walk: a node leads to W if it is W's AccumulateGrad or any child leads to W.
        on_path: set = set()
        stack = [(root, False)]
        visited = 0
        while stack:
            node, expanded = stack.pop()
            if node is None:
                continue
            if expanded:
                children = [child for child, _ in node.next_functions if child is not None]
                leads[node] = getattr(node, "variable", None) is parameter or any(leads.get(child, False) for child in children)
                continue
            if node in leads:
                continue
            visited += 1
            if visited > MAX_GRAPH_NODES:
                shape.complete = False
                break
            stack.append((node, True))
            stack.extend((child, False) for child, _ in node.next_functions if child is not None and child not in leads)
        seen: set = set()
        frontier = [root]
        while frontier:
            node = frontier.pop()
            if node is None or node in seen or not leads.get(node, False):
                continue
            seen.add(node)
            on_path.add(node)
            frontier.extend(child for child, _ in node.next_functions)
        return on_path

    union: set = set()
    for loss in losses:
        nodes = leads_to_w(loss.grad_fn)
        for node in nodes:
            if node not in sizes:
                sizes[node] = _node_size(node)
        shape.per_task.append(sum(sizes[node] for node in nodes))
        union |= nodes
    shape.union = sum(sizes[node] for node in union)
    return shape


@dataclass
class RouteEstimate:
    """A candidate's verdict on one graph: its work (None: it does not apply) and why."""

    route: str
    work: Optional[float]
    note: str
    nan_safe: bool = True  # a non-finite loss leaves the other tasks' norms finite


class NormRoute(Protocol):
    """One way of forming the (T, *W.shape) per-task gradients at W."""

    name: str

    def estimate(self, shape: GraphShape) -> RouteEstimate: ...

    def gradients(self, losses: Sequence[Tensor], parameter: Tensor) -> Tensor: ...


class LoopRoute:
    name = AUTOGRAD_LOOP

    def estimate(self, shape: GraphShape) -> RouteEstimate:
        return RouteEstimate(self.name, float(shape.loop_work), f"one backward per task: {shape.loop_work:,} gradient elements")

    def gradients(self, losses: Sequence[Tensor], parameter: Tensor) -> Tensor:
        return torch.stack([torch.autograd.grad(loss, parameter, retain_graph=True)[0] for loss in losses])


class BatchedRoute:
    name = AUTOGRAD_BATCHED

    def estimate(self, shape: GraphShape) -> RouteEstimate:
        ratio = shape.batched_work / max(shape.loop_work, 1)
        note = f"one T-batched backward: {shape.batched_work:,} gradient elements ({ratio:.1f}x the loop's)"
        return RouteEstimate(self.name, float(shape.batched_work), note, nan_safe=False)

    def gradients(self, losses: Sequence[Tensor], parameter: Tensor) -> Tensor:
        stacked = torch.stack([loss.reshape(()) for loss in losses])
        eye = torch.eye(len(losses), device=stacked.device, dtype=stacked.dtype)
        (grads,) = torch.autograd.grad(stacked, parameter, grad_outputs=eye, is_grads_batched=True, retain_graph=True)
        return grads


@dataclass
class RouteChoice:
    route: str
    reason: str


class RouteChooser:
    """Picks the route of least work among the candidates that keep a non-finite loss to its own task.

    ``forced`` names a route to take whatever the estimates (``GradNormMeter(batched=...)``).
    """

    def __init__(self, candidates: Sequence[NormRoute], forced: Optional[str] = None) -> None:
        self.candidates = {route.name: route for route in candidates}
        if forced is not None and forced not in self.candidates:
            raise ValueError(f"unknown gradient-norm route {forced!r}; the routes are {sorted(self.candidates)}")
        self.forced = forced

    def choose(self, losses: Sequence[Tensor], parameter: Tensor) -> RouteChoice:
        if self.forced is not None:
            return RouteChoice(self.forced, "asked for")
        shape = graph_shape(losses, parameter)
        estimates = [route.estimate(shape) for route in self.candidates.values()]
        eligible = [e for e in estimates if e.work is not None and e.nan_safe]
        if not eligible or not shape.complete:
            return RouteChoice(AUTOGRAD_LOOP, "the graph's shape is unknown" if not shape.complete else "no other route applies")
        best = min(eligible, key=lambda e: e.work if e.work is not None else float("inf"))
        others = "; ".join(
            f"{e.route} not taken: {e.note}" + ("" if e.nan_safe else ", and a non-finite loss would make every task's norm NaN")
            for e in estimates
            if e is not best
        )
        return RouteChoice(best.route, f"{best.note}" + (f"; {others}" if others else ""))


class GradNormMeter:
    """Measures the unweighted per-task gradient norms at one parameter.

    ``batched``: None chooses the route from the first step's graph (:class:`RouteChooser`); True or
    False asks for the T-batched product or the per-task loop. ``reduce`` is applied to the (T, *W.shape)
    per-task gradients before the norms (the mean over DDP ranks).
    """

    def __init__(
        self,
        parameter: Tensor,
        batched: Optional[bool] = None,
        reduce: Optional[Callable[[Tensor], Tensor]] = None,
        per_channel: bool = False,
        routes: Optional[Sequence[NormRoute]] = None,
    ) -> None:
        self.parameter = parameter
        self.per_channel = per_channel
        if per_channel and parameter.dim() < 2:
            raise ValueError(f"per-channel gradient norms need a weight with an output-channel dimension, got shape {tuple(parameter.shape)}")
        self.reduce = reduce or (lambda grads: grads)
        forced = None if batched is None else (AUTOGRAD_BATCHED if batched else AUTOGRAD_LOOP)
        self.chooser = RouteChooser(list(routes) if routes is not None else [LoopRoute(), BatchedRoute()], forced)
        self.choice: Optional[RouteChoice] = None

    @property
    def route(self) -> Optional[str]:
        """The route chosen at the first measurement (None before it)."""
        return self.choice.route if self.choice is not None else None

    @property
    def batched(self) -> bool:
        return self.route == AUTOGRAD_BATCHED

    def choose(self, losses: Sequence[Tensor]) -> RouteChoice:
        """Choose the route for ``losses``' graph, once; later calls return the first choice."""
        if self.choice is None:
            self.choice = self.chooser.choose(losses, self.parameter)
        return self.choice

    def __call__(self, losses: Sequence[Tensor]) -> Tensor:
        choice = self.choose(losses)
        route = self.chooser.candidates[choice.route]
        try:
            grads = route.gradients(losses, self.parameter)
        except RuntimeError as exc:
            if choice.route == AUTOGRAD_LOOP:
                raise
            # An operator without a batching rule: the loop, once and for good.
            warnings.warn(f"gradnorm: {choice.route} unavailable for this model ({exc}); using one backward per task", RuntimeWarning)
            self.choice = RouteChoice(AUTOGRAD_LOOP, f"{choice.route} failed: {exc}")
            grads = self.chooser.candidates[AUTOGRAD_LOOP].gradients(losses, self.parameter)
        return norms_of(self.reduce(grads), self.per_channel)
