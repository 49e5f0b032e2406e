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

- ``gram-loop``: one ``torch.autograd.grad`` per task from its loss to W's *output* (not to W), then the
  norms by the Gram identity ||grad_W L_i||^2 = <D_i D_i^T, X X^T> with W's input X captured by a forward
  hook (``hooks/gram_norms.py``), never forming a per-task weight gradient. For an ``nn.Linear`` or
  ``nn.Conv2d`` W only. Like the loop, each task's own path is run once and a non-finite loss stays with
  its task; the T products at W (T P d_in d_out multiply-adds) become g P^2 (d_in + T d_out).

A route is a :class:`NormRoute`: a name, an estimate from the graph's shape and the T gradients (or, for
the Gram route, the T squared norms). The estimates add to the gradient elements the backward passes
carry the multiply-adds of the products at W: T P d_in d_out for every route that forms the T weight
gradients, the Gram identity's for ``gram-loop`` (one unit each: at a late convolution or a small batch
the products dominate by orders of magnitude; where they do not, the routes cost about the same).
Under ``torch.distributed`` (a ``reduce`` given) the norms are those of the rank-averaged gradients,
which only a route that forms the gradients has: the Gram route is then not a candidate, and the
reason says so. Everything runs on the device, without host synchronisation; the norms are taken in
float32 at least (float64 for a float64 W), whatever the gradients' dtype.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor, nn

from . import gram_norms

AUTOGRAD_LOOP = "autograd-loop"
AUTOGRAD_BATCHED = "autograd-batched"
GRAM_LOOP = "gram-loop"
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
    # Multiply-adds of the T weight-gradient products at W, where a candidate knows W's shapes (else 0).
    weight_grad_flops: float = 0.0

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


def _products(shape: GraphShape) -> str:
    return f" and ~{shape.weight_grad_flops:.3g} multiply-adds forming the T weight gradients" if shape.weight_grad_flops else ""


class LoopRoute:
    name = AUTOGRAD_LOOP

    def estimate(self, shape: GraphShape) -> RouteEstimate:
        work = shape.loop_work + shape.weight_grad_flops
        return RouteEstimate(self.name, float(work), f"one backward per task: {shape.loop_work:,} gradient elements{_products(shape)}")

    def gradients(self, losses: Sequence[Tensor], parameter: Tensor) -> Tensor:
        return torch.stack([torch.autograd.grad(loss, parameter, retain_graph=True)[0] for loss in losses])


class BatchedRoute:
    name = AUTOGRAD_BATCHED

    def estimate(self, shape: GraphShape) -> RouteEstimate:
        ratio = shape.batched_work / max(shape.loop_work, 1)
        note = f"one T-batched backward: {shape.batched_work:,} gradient elements ({ratio:.1f}x the loop's){_products(shape)}"
        return RouteEstimate(self.name, float(shape.batched_work + shape.weight_grad_flops), note, nan_safe=False)

    def gradients(self, losses: Sequence[Tensor], parameter: Tensor) -> Tensor:
        stacked = torch.stack([loss.reshape(()) for loss in losses])
        eye = torch.eye(len(losses), device=stacked.device, dtype=stacked.dtype)
        (grads,) = torch.autograd.grad(stacked, parameter, grad_outputs=eye, is_grads_batched=True, retain_graph=True)
        return grads


class GramRoute:
    """``gram-loop``: one backward per task to W's output, then the Gram identity (``hooks/gram_norms.py``).

    Its forward hook on W's module keeps each call's input and output edge until the step is measured
    (:meth:`finish` clears them; :meth:`pause` stops keeping them while another path serves, so that no
    forward pass's graph is held); :meth:`remove` takes the hook off.
    """

    name = GRAM_LOOP

    def __init__(self, module: nn.Module, max_calls: int = gram_norms.DEFAULT_MAX_CALLS) -> None:
        self.capture = gram_norms.capture(module) if max_calls else None
        if self.capture is not None:
            self.capture.max_calls = max_calls
            # One backward per task: the batched product would carry a non-finite loss's NaN into every
            # task's row (0 * NaN in the other losses' graphs), and the loop costs about the same here.
            self.capture.batched = False

    @staticmethod
    def supports(module: Optional[nn.Module], parameter: Tensor) -> bool:
        return module is not None and getattr(module, "weight", None) is parameter and gram_norms.unsupported(module) is None

    def _costs(self, num_tasks: int) -> Optional[gram_norms.RouteCosts]:
        capture = self.capture
        if capture is None or capture.problem() is not None:
            return None
        first = capture.calls[0]
        shape = gram_norms.geometry(capture.module, first.input.shape, first.output_shape)
        shape = gram_norms.Geometry(capture.positions(), shape.groups, shape.fan_in, shape.fan_out)
        size = torch.finfo(gram_norms.accumulation_dtype(first.input)).bits // 8
        return gram_norms.route_costs(shape, num_tasks, element_size=size)

    def weight_grad_flops(self, num_tasks: int) -> float:
        costs = self._costs(num_tasks)
        return 0.0 if costs is None else costs.direct_flops

    def estimate(self, shape: GraphShape) -> RouteEstimate:
        costs = self._costs(shape.num_tasks)
        if costs is None:
            problem = self.capture.problem() if self.capture is not None else "removed"
            return RouteEstimate(self.name, None, f"the Gram identity does not apply: {problem}")
        note = (
            f"one backward per task to W's output: {shape.loop_work:,} gradient elements, and ~{costs.gram_flops:.3g} multiply-adds "
            f"by the Gram identity{' (formed in row blocks)' if costs.gram_blocked else ''}"
        )
        return RouteEstimate(self.name, float(shape.loop_work + costs.gram_flops), note)

    def gradients(self, losses: Sequence[Tensor], parameter: Tensor) -> Tensor:
        raise NotImplementedError("gram-loop never forms the per-task gradients; use sq_norms()")

    def sq_norms(self, losses: Sequence[Tensor], per_channel: bool) -> Optional[Tensor]:
        """(T,) or (T, C) squared norms of this step, or None where the capture cannot serve it."""
        capture = self.capture
        if capture is None or capture.problem() is not None:
            return None
        return capture.sq_norms(list(losses), per_channel=per_channel, route=gram_norms.GRAM)

    def finish(self) -> None:
        """The step is measured: drop its calls. Paused with calls dropped, this meter measured a step that
        another path was meant to serve: that path no longer does, so the next steps' calls are kept again
        (paused right after the step's forward pass, as at the step the taps take over, it stays paused)."""
        capture = self.capture
        if capture is not None:
            if capture.paused and capture.dropped:
                capture.resume()
            capture.clear()

    def pause(self) -> None:
        if self.capture is not None:
            self.capture.pause()

    def remove(self) -> None:
        if self.capture is not None:
            self.capture.remove()
            self.capture = None


@dataclass
class RouteChoice:
    route: str
    reason: str


class RouteChooser:
    """Picks the route of least work among the candidates that keep a non-finite loss to its own task.

    ``forced`` names a route to take whatever the estimates (``GradNormMeter(batched=...)``).
    """

    def __init__(self, candidates: Sequence[NormRoute], forced: Optional[str] = None, note: str = "") -> None:
        self.candidates = {route.name: route for route in candidates}
        if forced is not None and forced not in self.candidates:
            raise ValueError(f"unknown gradient-norm route {forced!r}; the routes are {sorted(self.candidates)}")
        self.forced = forced
        self.note = note  # added to every reason (a route left out, and why)

    def choose(self, losses: Sequence[Tensor], parameter: Tensor) -> RouteChoice:
        choice = self._choose(losses, parameter)
        return RouteChoice(choice.route, f"{choice.reason}; {self.note}") if self.note else choice

    def _choose(self, losses: Sequence[Tensor], parameter: Tensor) -> RouteChoice:
        if self.forced is not None:
            return RouteChoice(self.forced, "asked for")
        shape = graph_shape(losses, parameter)
        for route in self.candidates.values():
            flops = getattr(route, "weight_grad_flops", None)
            if flops is not None:
                shape.weight_grad_flops = max(shape.weight_grad_flops, flops(len(losses)))
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
    per-task gradients before the norms (the mean over DDP ranks); given, it leaves the Gram route out.
    ``module``: W's module; where it is an ``nn.Linear`` or ``nn.Conv2d`` whose weight is ``parameter``,
    the Gram route (``gram-loop``) is a candidate, with a forward hook on it that :meth:`remove` takes off.
    ``route`` names a route to take whatever the estimates (``gram-loop`` among them).
    """

    def __init__(
        self,
        parameter: Tensor,
        batched: Optional[bool] = None,
        reduce: Optional[Callable[[Tensor], Tensor]] = None,
        per_channel: bool = False,
        routes: Optional[Sequence[NormRoute]] = None,
        module: Optional[nn.Module] = None,
        route: Optional[str] = None,
    ) -> None:
        self.parameter = parameter
        self.per_channel = per_channel
        if per_channel and parameter.dim() < 2:
            raise ValueError(f"per-channel gradient norms need a weight with an output-channel dimension, got shape {tuple(parameter.shape)}")
        self.reduce = reduce or (lambda grads: grads)
        forced = route if route is not None else (None if batched is None else (AUTOGRAD_BATCHED if batched else AUTOGRAD_LOOP))
        candidates: list[NormRoute] = list(routes) if routes is not None else [LoopRoute(), BatchedRoute()]
        self.gram: Optional[GramRoute] = None
        note = ""
        if routes is None and GramRoute.supports(module, parameter):
            if reduce is None:
                self.gram = GramRoute(module)  # type: ignore[arg-type]
                candidates.append(self.gram)
            else:
                note = f"{GRAM_LOOP} not a candidate: the per-task gradients are averaged across ranks before their norms, which needs the gradients"
        self.chooser = RouteChooser(candidates, forced, note)
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
            if self.choice.route != GRAM_LOOP and self.gram is not None:
                self.gram.remove()  # not taken: its hook would only keep what no step reads
        return self.choice

    def pause(self) -> None:
        """Another path measures the next steps: the Gram route's hook keeps no calls until this meter runs again."""
        if self.gram is not None:
            self.gram.pause()

    def remove(self) -> None:
        """Remove the Gram route's forward hook (again: a no-op)."""
        if self.gram is not None:
            self.gram.remove()

    def __call__(self, losses: Sequence[Tensor]) -> Tensor:
        try:
            return self._measure(losses)
        finally:
            if self.gram is not None:
                self.gram.finish()

    def _measure(self, losses: Sequence[Tensor]) -> Tensor:
        choice = self.choose(losses)
        route = self.chooser.candidates[choice.route]
        if isinstance(route, GramRoute):
            squared = route.sq_norms(losses, self.per_channel)
            if squared is not None:
                return squared.sqrt()
            # This step's calls were not kept (another path served the step before): the loop, this once.
            route = self.chooser.candidates[AUTOGRAD_LOOP]
        try:
            grads = route.gradients(losses, self.parameter)
        except RuntimeError as exc:
            if route.name == AUTOGRAD_LOOP:
                raise
            # An operator without a batching rule: the loop, once and for good.
            warnings.warn(f"gradnorm: {choice.route} unavailable for this model ({exc}); using one backward per task", RuntimeWarning)
            self.choice = RouteChoice(AUTOGRAD_LOOP, f"{choice.route} failed: {exc}")
            grads = self.chooser.candidates[AUTOGRAD_LOOP].gradients(losses, self.parameter)
        return norms_of(self.reduce(grads), self.per_channel)
