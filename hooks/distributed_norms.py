"""GradNorm's per-task norms under ``torch.distributed`` with one small exchange per step.

DDP (and FSDP) train with the mean over ranks of each rank's gradient, so GradNorm's norms must be those
of the global gradient (paper eq. 2 is about the gradient the network trains with):
g_i = ||G_i||, G_i = (1/R) sum_r grad_W L_i^r. Averaging the (T, |W|) per-task gradients across ranks
(``hooks/distributed.py``'s ``mean_across_ranks``, the ``gradients`` route) sends T x |W| numbers per
step, more than DDP's own gradient all-reduce once T is large. W acts at positions p (``hooks/gram_norms.py``),
so with X^r (P x d_in) the layer's input rows and D_i^r (P x d_out) task i's gradient rows at W's output
on rank r, grad_W L_i^r = D_i^r^T X^r, and two cheaper routes need only X and D, never W itself:

- ``rows`` (exact): all_gather every rank's X^r and D^r (P (d_in + T d_out) numbers per rank), after which
  every rank holds the global rows and G_i = (1/R) D_i^T X with the positions of all ranks stacked; its
  norm follows by the Gram identity ||G_i||^2 = (1/R^2) <D_i D_i^T, X X^T> or by forming G_i, whichever
  costs fewer multiply-adds (``gram_norms.route_costs``). Exact to rounding.
- ``sketch`` (estimated): k random pairs (u_j, v_j), Gaussian, drawn from the same seed on every rank and
  fresh at every step; s_{i,j} = u_j^T G_i v_j = (1/R) sum_r sum_p (u_j . d^r_{i,p})(v_j . x^r_p) is linear
  in the ranks' contributions, so an all_reduce of the (T, k) local sketches gives the global one, and
  n_i^2 = (1/k) sum_j s_{i,j}^2 estimates ||G_i||^2 without bias. The exchange is T k numbers whatever
  the layer's size and the world size.

The sketch's error (derived in ``docs/distributed.md``): for one pair, s = u^T G v with u, v standard
Gaussian; given v, s ~ N(0, ||G v||^2), so E[s^2] = E||G v||^2 = ||G||_F^2 and E[s^4] = 3 E[(v^T A v)^2]
with A = G^T G, = 3 ((tr A)^2 + 2 tr A^2). Hence

    Var[s^2] = 2 ||G||_F^4 + 6 ||G^T G||_F^2 <= 8 ||G||_F^4      (||G^T G||_F^2 = sum sigma^4 <= (sum sigma^2)^2)

and the mean of k independent pairs has relative variance Var[n^2]/||G||_F^4 = (2 + 6 / r) / k <= 8 / k,
r = ||G||_F^4 / ||G^T G||_F^2 >= 1 the gradient's effective rank. Since |n/g - 1| <= |n^2/g^2 - 1|,
Chebyshev gives P(|n_i / g_i - 1| >= eps) <= 8 / (k eps^2) for every task and step. A grouped
convolution sketches each group with its own pair (the groups' terms are independent, so the bound holds).

Every route bucketing its numbers with the T per-task losses into one collective per step (the losses'
mean rides along), issued with ``async_op=True`` and waited on just before its result is used: under
NCCL the wait is a stream dependency, not a host synchronisation; shapes, never tensor values, decide
every branch. ``choose`` picks the route from the bytes each sends (ring algorithms: an all_reduce of n
numbers sends 2 (R-1)/R n per rank, an all_gather of n per rank sends (R-1) n), keeping an exact route
unless the sketch sends at least ``SKETCH_GAIN`` times less and the exact one exceeds
``EXACT_BYTES_FLOOR``, and unless the sketch costs more than the exact route in multiply-adds per rank
(``route_multiply_adds``) plus its bytes at ``BYTE_MULTIPLY_ADDS`` each (then it would save bytes at the
step's expense: k = 512 pairs at a layer narrower than k);
``attach(..., distributed_norms="exact")`` forces the cheaper exact route.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import distributed, gram_norms
from .grad_norms import GradNormMeter, RouteChoice
from .shared_layer import graph_nodes

ROUTE_GRADIENTS = "gradients"
ROUTE_ROWS = "rows"
ROUTE_SKETCH = "sketch"
ROUTES = (ROUTE_GRADIENTS, ROUTE_ROWS, ROUTE_SKETCH)
#: What ``attach(distributed_norms=...)`` accepts: a route, ``exact`` (the cheaper exact route) or ``auto``.
MODES = ("auto", "exact", *ROUTES)
DEFAULT_SKETCH_SIZE = 512
#: ``auto`` keeps an exact route while it sends at most this many bytes per rank and step ...
EXACT_BYTES_FLOOR = 256 << 10
#: ... or while the sketch would send fewer than this many times less.
SKETCH_GAIN = 8
#: ``auto`` weighs a route's products against its bytes: one byte sent counts as this many multiply-adds
#: (assumed, not measured: a CPU core's ~3e10 multiply-adds/s against ~1.5 GB/s through gloo; a GPU's
#: ~1e14 against ~50 GB/s through NCCL between nodes). The sketch is taken only where it is the cheaper.
BYTE_MULTIPLY_ADDS = {"cpu": 20.0, "accelerator": 2000.0}
#: The prefix of the routes' names in ``run.json``'s ``grad_norm_path`` and ``grad_norm_route``.
PATH_PREFIX = "distributed-"


class DistributedNormsError(distributed.CollectiveError):
    """A step's exchange failed: another rank stopped, or the ranks disagree on the shapes."""


# -- sizes -------------------------------------------------------------------------------------------------
def ring_bytes(collective: str, numbers: int, world: int, element_size: int) -> int:
    """Bytes each rank sends for ``numbers`` of its own under ring algorithms (the NCCL and gloo defaults)."""
    if world <= 1:
        return 0
    if collective == "all_reduce":
        return int(2 * (world - 1) * numbers * element_size / world)
    if collective == "all_gather":
        return (world - 1) * numbers * element_size
    raise ValueError(f"unknown collective {collective!r}")


@dataclass(frozen=True)
class Exchange:
    """What one route hands to its one collective each step, on each rank (the T losses included)."""

    route: str
    collective: str
    numbers: int  # handed to the collective by each rank
    payload_bytes: int  # numbers x element size
    wire_bytes: int  # sent by each rank under ring algorithms
    exact: bool
    # Multiply-adds each rank spends on the route's own products per step (0 where the shapes are unknown).
    multiply_adds: float = 0.0


def exchanges(
    num_tasks: int,
    weight_numel: int,
    world: int,
    *,
    shape: Optional[gram_norms.Geometry] = None,
    sketch_size: int = DEFAULT_SKETCH_SIZE,
    element_size: int = 4,
) -> dict[str, Exchange]:
    """Each route's exchange for T tasks at a W of ``weight_numel`` numbers (``rows`` and ``sketch`` need ``shape``).

    gradients: T + T |W| numbers, all-reduced. rows: T + P g (d_in + T d_out), all-gathered. sketch:
    T + T k, all-reduced. ``multiply_adds``: each rank's products per step (``route_multiply_adds``).
    """
    t = num_tasks
    sizes = {ROUTE_GRADIENTS: ("all_reduce", t + t * weight_numel, True)}
    if shape is not None:
        rows = shape.positions * shape.groups * (shape.fan_in + t * shape.fan_out)
        sizes[ROUTE_ROWS] = ("all_gather", t + rows, True)
        sizes[ROUTE_SKETCH] = ("all_reduce", t + t * sketch_size, False)
    return {
        route: Exchange(
            route,
            collective,
            numbers,
            numbers * element_size,
            ring_bytes(collective, numbers, world, element_size),
            exact,
            route_multiply_adds(route, t, shape, world, sketch_size, element_size) if shape is not None else 0.0,
        )
        for route, (collective, numbers, exact) in sizes.items()
    }


def route_multiply_adds(route: str, num_tasks: int, shape: gram_norms.Geometry, world: int, sketch_size: int, element_size: int = 4) -> float:
    """Multiply-adds of a route's own products on each rank per step, at P positions per rank.

    gradients: the T local weight gradients D_i^T X, T P g d_in d_out (what one process's product route
    pays). rows: the global norms from all R P positions, the cheaper of the Gram identity and the product
    (``gram_norms.route_costs``), on every rank. sketch: X V^T, D_i U^T and their products,
    P g d_in k + T P g d_out k + T P g k.
    """
    t, p, g, a, b = num_tasks, shape.positions, shape.groups, shape.fan_in, shape.fan_out
    if route == ROUTE_GRADIENTS:
        return float(t * p * g * a * b)
    if route == ROUTE_ROWS:
        costs = gram_norms.route_costs(gram_norms.Geometry(world * p, g, a, b), t, element_size=element_size)
        return min(costs.gram_flops, costs.direct_flops)
    if route == ROUTE_SKETCH:
        return float(p * g * a * sketch_size + t * p * g * b * sketch_size + t * p * g * sketch_size)
    raise ValueError(f"unknown route {route!r}")


def sketch_error_bound(sketch_size: int) -> dict[str, Any]:
    """The sketch's stated error for ``run.json``: the relative variance bound and Chebyshev's tail."""
    return {
        "pairs": sketch_size,
        "distribution": "Gaussian u, v, one seed on every rank, fresh at each step",
        "relative_variance_of_squared_norm": "(2 + 6 ||G^T G||_F^2 / ||G||_F^4) / k",
        "relative_variance_bound": 8.0 / sketch_size,
        "relative_std_bound": math.sqrt(8.0 / sketch_size),
        "tail": "P(|n_i / g_i - 1| >= eps) <= 8 / (k eps^2)",
    }


def byte_multiply_adds(device: torch.device) -> float:
    """``BYTE_MULTIPLY_ADDS`` for the device the rows live on."""
    return BYTE_MULTIPLY_ADDS["cpu" if device.type == "cpu" else "accelerator"]


def choose(mode: str, options: dict[str, Exchange], *, per_channel: bool = False, byte_weight: float = BYTE_MULTIPLY_ADDS["cpu"]) -> tuple[str, str]:
    """(route, reason) for ``mode`` among ``options`` (see the module's docstring); ``byte_weight``: the
    multiply-adds one byte sent is worth (``byte_multiply_adds``)."""
    if mode not in MODES:
        raise ValueError(f"distributed_norms must be one of {MODES}, got {mode!r}")
    if mode in ROUTES:
        if mode not in options:
            raise ValueError(f"distributed_norms={mode!r} needs the shared layer's input and output rows (a stock nn.Linear or nn.Conv2d)")
        if mode == ROUTE_SKETCH and per_channel:
            raise ValueError("distributed_norms='sketch' estimates whole-weight norms; per-channel norms need an exact route ('exact')")
        return mode, f"{mode}: asked for, {_describe(options[mode])}"
    exact = min((e for e in options.values() if e.exact), key=lambda e: e.wire_bytes)
    others = "; ".join(f"{e.route}: {_describe(e)}" for e in options.values() if e is not exact)
    if mode == "exact" or ROUTE_SKETCH not in options or per_channel:
        why = "the cheaper exact route" if mode == "exact" else ("per-channel norms need an exact route" if per_channel else "the only route")
        return exact.route, f"{exact.route} ({why}): {_describe(exact)}" + (f"; {others}" if others else "")
    sketch = options[ROUTE_SKETCH]
    if exact.wire_bytes <= EXACT_BYTES_FLOOR or exact.wire_bytes <= SKETCH_GAIN * sketch.wire_bytes:
        return exact.route, f"{exact.route} (exact, small enough): {_describe(exact)}; {others}"
    exact_cost = exact.multiply_adds + byte_weight * exact.wire_bytes
    sketch_cost = sketch.multiply_adds + byte_weight * sketch.wire_bytes
    if sketch_cost >= exact_cost:
        # Fewer bytes, but more work on every rank than the exact route's products and bytes: the step would be slower.
        return exact.route, (
            f"{exact.route} (exact: the sketch sends {exact.wire_bytes / max(sketch.wire_bytes, 1):.0f}x fewer bytes but costs "
            f"{sketch.multiply_adds / max(exact.multiply_adds, 1.0):.1f}x its multiply-adds, {sketch_cost / exact_cost:.1f}x in all at "
            f"{byte_weight:g} multiply-adds a byte): {_describe(exact)}; {others}"
        )
    return ROUTE_SKETCH, f"sketch ({exact.wire_bytes / max(sketch.wire_bytes, 1):.0f}x fewer bytes than exact): {_describe(sketch)}; {others}"


def _describe(exchange: Exchange) -> str:
    work = f", ~{exchange.multiply_adds:.3g} multiply-adds" if exchange.multiply_adds else ""
    return f"{exchange.collective} of {exchange.numbers:,} numbers, {exchange.wire_bytes:,} bytes sent per rank{work}"


# -- local contributions --------------------------------------------------------------------------------------
def local_gradients(x_rows: Tensor, d_rows: Tensor) -> Tensor:
    """(T, g d_out d_in): each task's grad_W = D_i^T X of this rank, flattened as W.reshape(C_out, -1) is."""
    tasks, positions, groups, fan_out = d_rows.shape
    if groups == 1:  # one matrix product, rows t d_out + o: task t's grad_W[o] (faster than the einsum's batched form)
        stacked = d_rows.reshape(tasks, positions, fan_out).transpose(0, 1).reshape(positions, tasks * fan_out)
        return torch.mm(stacked.t(), x_rows.reshape(positions, -1)).view(tasks, -1)
    per_group = torch.einsum("tpgb,pga->tgba", d_rows, x_rows)
    return per_group.reshape(tasks, -1)


def sketch_pairs(
    generator: torch.Generator, sketch_size: int, groups: int, fan_in: int, fan_out: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """(U, V): (k, g, d_out) and (k, g, d_in) standard Gaussian, from ``generator`` (seeded alike on every rank)."""
    u = torch.randn((sketch_size, groups, fan_out), generator=generator, dtype=dtype, device=device)
    v = torch.randn((sketch_size, groups, fan_in), generator=generator, dtype=dtype, device=device)
    return u, v


def local_sketch(x_rows: Tensor, d_rows: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """(T, k): s_{i,j} = sum_g sum_p (u_{j,g} . d_{i,p,g}) (v_{j,g} . x_{p,g}) = <u_j v_j^T, grad_W L_i> per group,
    from the rows without forming grad_W (T P g d_out k + P g d_in k multiply-adds)."""
    xv = torch.einsum("pga,jga->pgj", x_rows, v)
    du = torch.einsum("tpgb,jgb->tpgj", d_rows, u)
    return torch.einsum("tpgj,pgj->tj", du, xv)


def sketch_sq_norms(sketch: Tensor) -> Tensor:
    """(T,): the unbiased estimates (1/k) sum_j s_{i,j}^2 of ||G_i||_F^2."""
    return sketch.square().mean(1)


def rows_sq_norms(x_rows: Tensor, d_rows: Tensor, per_channel: bool = False) -> Tensor:
    """||D_i^T X||^2 (or per output channel) of stacked rows, by the cheaper of the Gram identity and the product."""
    tasks, positions, groups, fan_out = d_rows.shape
    shape = gram_norms.Geometry(positions, groups, x_rows.shape[2], fan_out)
    costs = gram_norms.route_costs(shape, tasks, element_size=x_rows.element_size())
    if costs.gram_flops < costs.direct_flops:
        return gram_norms.GramOfInput(x_rows).sq_norms(d_rows, per_channel)
    grads = local_gradients(x_rows, d_rows).view(tasks, groups * fan_out, -1)
    per_channel_sq = grads.square().sum(2)
    return per_channel_sq if per_channel else per_channel_sq.sum(1)


# -- the meter -----------------------------------------------------------------------------------------------
def _wait(work: Any, route: str, step: int) -> None:
    try:
        work.wait()
    except RuntimeError as exc:  # gloo: a peer's closed connection or the group's timeout; NCCL: an abort
        raise exchange_failed(route, step, exc) from exc


def exchange_failed(route: str, step: int, exc: BaseException, issued: bool = True) -> DistributedNormsError:
    """The error naming the rank, the route, the step and the likely cause."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
    cause = (
        "another rank has probably stopped (crashed, killed or stuck); the process group's timeout (init_process_group(timeout=...)) bounds the wait"
        if issued
        else "the collective was refused: the ranks must hand the same shapes (the same positions at W on every rank for 'rows')"
    )
    return DistributedNormsError(
        f"gradnorm: rank {distributed.rank()} of {distributed.world_size()}: the {route} exchange of step {step} failed ({type(exc).__name__}: {detail}); {cause}"
    )


class DistributedNormMeter(GradNormMeter):
    """The per-task norms of the global (rank-averaged) gradient at a stock ``nn.Linear``/``nn.Conv2d`` W,
    from each rank's input rows and output-gradient rows (``gram_norms.capture`` and ``output_gradients``),
    with one collective per step by the route :func:`choose` picks at the first step.

    ``owner``: the session, held weakly, whose ``step_index`` seeds the sketch with ``seed`` (so a resumed
    run draws the pairs an uninterrupted one would). ``remove()`` removes the layer's forward hook.
    """

    def __init__(
        self,
        parameter: Tensor,
        module: nn.Module,
        *,
        mode: str = "auto",
        sketch_size: int = DEFAULT_SKETCH_SIZE,
        seed: int = 0,
        per_channel: bool = False,
        owner: Optional[object] = None,
    ) -> None:
        super().__init__(parameter, per_channel=per_channel)
        if mode not in MODES:
            raise ValueError(f"distributed_norms must be one of {MODES}, got {mode!r}")
        if not isinstance(sketch_size, int) or sketch_size < 1:
            raise ValueError(f"sketch_size must be a positive number of pairs, got {sketch_size!r}")
        if getattr(module, "weight", None) is not parameter:
            raise ValueError("the distributed norms need the shared layer as a module whose weight is W")
        self.mode = mode
        self.sketch_size = sketch_size
        self.seed = seed
        self._owner = weakref.ref(owner) if owner is not None else None
        self._calls = 0
        self.capture = gram_norms.capture(module)
        self.layer = self.capture.module
        # A step the owner does not measure (update_every, no norms needed) never calls this meter: its
        # calls are dropped when the next step's forward pass begins, so no older step's graph is held.
        self._calls_step: Optional[int] = None
        self._pre_hook = module.register_forward_pre_hook(self._new_step) if owner is not None else None
        self.exchange: Optional[Exchange] = None  # of the route chosen, at the first step's sizes
        self.options: dict[str, Exchange] = {}
        self._generator: Optional[torch.Generator] = None
        self._losses: Optional[Tensor] = None  # this step's losses averaged across ranks, from the bucket
        self._paused = False  # the heads' taps feed the exchange (see pause())
        # One backward per task to W's output (as the Gram route does): a non-finite loss stays with its task
        # (a batched product's 0 * NaN would reach every task), and it costs about the same through the heads.
        self._batched = False

    # the GradNormMeter interface ------------------------------------------------------------------------
    @property
    def batched(self) -> bool:
        return False

    @property
    def distributed_route(self) -> Optional[str]:
        return None if self.choice is None else self.choice.route[len(PATH_PREFIX) :]

    def choose(self, losses: Sequence[Tensor]) -> RouteChoice:
        if self.choice is None:
            problem = self.capture.problem()
            if problem is not None:
                raise RuntimeError(f"gradnorm distributed norms: {problem}")
            first = self.capture.calls[0]
            shape = gram_norms.geometry(self.layer, first.input.shape, first.output_shape)
            shape = gram_norms.Geometry(self.capture.positions(), shape.groups, shape.fan_in, shape.fan_out)
            size = torch.finfo(gram_norms.accumulation_dtype(first.input)).bits // 8
            self.options = exchanges(
                len(losses), self.parameter.numel(), distributed.world_size(), shape=shape, sketch_size=self.sketch_size, element_size=size
            )
            route, reason = choose(self.mode, self.options, per_channel=self.per_channel, byte_weight=byte_multiply_adds(first.input.device))
            self.exchange = self.options[route]
            self.choice = RouteChoice(PATH_PREFIX + route, reason)
            if self._paused:
                self.capture.pause()
        return self.choice

    def describe(self) -> dict[str, Any]:
        """What ``run.json`` records under ``distributed_norms`` (after the first step's choice)."""
        if self.choice is None or self.exchange is None:
            return {"mode": self.mode}
        route = self.exchange.route
        exact = min((e for e in self.options.values() if e.exact), key=lambda e: e.wire_bytes)
        record: dict[str, Any] = {
            "mode": self.mode,
            "route": route,
            "reason": self.choice.reason,
            "world_size": distributed.world_size(),
            "collectives_per_step": 1,
            "exchange": asdict(self.exchange),
            "routes": {name: asdict(e) for name, e in self.options.items()},
            "sizes": "at the first step's shapes",
        }
        if route == ROUTE_SKETCH:
            record["error_bound"] = sketch_error_bound(self.sketch_size)
            record["exact_alternative"] = asdict(exact)
            record["seed"] = self.seed
        return record

    def reaches(self, loss: Tensor) -> bool:
        """Whether ``loss`` depends on an output of W captured this step: under FSDP the sharded weight
        the session holds is not the graph's leaf (the gathered one is), so its own check cannot tell."""
        nodes = graph_nodes(loss)
        return any(getattr(call.output, "node", call.output.grad_fn if isinstance(call.output, Tensor) else None) in nodes for call in self.capture.calls)

    def _new_step(self, module: nn.Module, args: tuple) -> None:
        owner = self._owner() if self._owner is not None else None
        step = getattr(owner, "step_index", None)
        if step != self._calls_step:
            self.capture.clear()
            self._calls_step = step

    def remove(self) -> None:
        self.capture.remove()
        if self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook = None

    def pause(self) -> None:
        """The heads' taps feed this meter's exchange from the user's backward (:meth:`issue`): W's calls are
        no longer kept (each holds its forward pass's graph) once the first step has chosen the route."""
        self._paused = True
        if self.choice is not None:
            self.capture.pause()

    def resume(self) -> None:
        """The taps stopped serving: W's calls are kept again, from the next step's forward pass on."""
        self._paused = False
        self.capture.resume()

    def global_losses(self, stacked: Tensor) -> Tensor:
        """The step's losses averaged across ranks: from this step's bucket where it carried them."""
        reduced, self._losses = self._losses, None
        if reduced is None or reduced.shape != stacked.shape:
            return distributed.mean_across_ranks(stacked)
        return reduced.to(stacked.dtype)

    def __call__(self, losses: Sequence[Tensor]) -> Tensor:
        """The per-task path: one backward per task from the losses to W's output (``session.loss()``,
        before the user's backward), then the exchange, waited for at once."""
        self.choose(losses)
        owner = self._owner() if self._owner is not None else None
        step = int(getattr(owner, "step_index", self._calls))
        stacked = torch.stack([loss.detach().reshape(()) for loss in losses])
        problem = self.capture.problem()
        if problem is not None:
            # This step's calls of W were not kept (the heads' taps were meant to serve it and stopped): the
            # per-task weight gradients, averaged, this once. Every rank is in the same state, so all take it.
            self.capture.clear()
            return self._gradients_once(losses, stacked, problem)
        layer, calls = self.layer, self.capture.calls
        dtype = gram_norms.accumulation_dtype(*(call.input for call in calls))
        x_rows = torch.cat([gram_norms.input_rows(layer, call.input, dtype) for call in calls], 0)
        try:
            d_rows = self._output_rows(losses, dtype)
        finally:
            self.capture.clear()
        return self.issue(stacked, x_rows, d_rows, step)()

    def issue(self, stacked: Tensor, x_rows: Tensor, d_rows: Tensor, step: int) -> Callable[[], Tensor]:
        """Hand this rank's step to the route's one collective, issued with ``async_op=True``; returns the
        function that waits for it and forms the (T,) norms (or (T, C) per channel).

        ``stacked``: the (T,) losses (they ride in the bucket); ``x_rows``: (P, g, d_in) W's input rows;
        ``d_rows``: (T, P, g, d_out) each task's gradient at W's output, unscaled, over this rank's P
        positions (all forward passes of the step's loss stacked). The heads' taps call this from inside the
        user's backward as soon as the heads' part of it has run, so that the collective overlaps the
        trunk's backward and the wait comes where the norms are used (the engine's callback at its end).
        """
        if self.choice is None or self.exchange is None:
            self._choose_from(x_rows, d_rows)
        assert self.exchange is not None
        route = self.exchange.route
        self._calls += 1
        tasks = d_rows.shape[0]
        dtype = x_rows.dtype
        stacked = stacked.detach().reshape(-1).to(dtype)
        world = distributed.world_size()
        if route == ROUTE_GRADIENTS:
            bucket = torch.cat([stacked, local_gradients(x_rows, d_rows).flatten()])
            work = self._issue_all_reduce(bucket, route, step)
            per_channel, channels = self.per_channel, self.parameter.shape[0]

            def gradients_norms() -> Tensor:
                reduced = self._reduced(work, bucket, route, step)
                self._losses = reduced[:tasks]
                grads = reduced[tasks:].view(tasks, -1)
                if per_channel:
                    return grads.view(tasks, channels, -1).square().sum(2).sqrt()
                return grads.square().sum(1).sqrt()

            return gradients_norms
        if route == ROUTE_SKETCH:
            u, v = sketch_pairs(self._seeded(step, x_rows.device), self.sketch_size, x_rows.shape[1], x_rows.shape[2], d_rows.shape[3], dtype, x_rows.device)
            bucket = torch.cat([stacked, local_sketch(x_rows, d_rows, u, v).flatten()])
            work = self._issue_all_reduce(bucket, route, step)

            def sketch_norms() -> Tensor:
                reduced = self._reduced(work, bucket, route, step)
                self._losses = reduced[:tasks]
                return sketch_sq_norms(reduced[tasks:].view(tasks, -1)).sqrt()

            return sketch_norms
        # rows: every rank gathers every rank's X and D and forms the same global norms.
        positions = x_rows.shape[0]
        bucket = torch.cat([stacked, x_rows.flatten(), d_rows.flatten()])
        flat = bucket
        gathered_work = None
        if world > 1:
            flat = torch.empty(world * bucket.numel(), dtype=dtype, device=bucket.device)
            try:
                # all_gather_single where this torch has it (all_gather_into_tensor, its older name, is deprecated there).
                gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
                gathered_work = gather(flat, bucket, async_op=True)
            except RuntimeError as exc:
                raise exchange_failed(route, step, exc, issued=False) from exc
        x_size, x_shape, d_shape, per_channel = x_rows.numel(), x_rows.shape, d_rows.shape, self.per_channel

        def rows_norms() -> Tensor:
            if gathered_work is not None:
                _wait(gathered_work, route, step)
            gathered = flat.view(world, -1)
            self._losses = gathered[:, :tasks].mean(0)
            x_all = gathered[:, tasks : tasks + x_size].reshape(world * positions, *x_shape[1:])
            # (R, T, P, g, b) -> (T, R P, g, b): rank r's positions follow rank r-1's, as in x_all.
            d_all = gathered[:, tasks + x_size :].reshape(world, *d_shape).transpose(0, 1).reshape(tasks, world * positions, *d_shape[2:])
            sq = rows_sq_norms(x_all, d_all, per_channel) / (world * world)
            return sq.clamp_min(0).sqrt()

        return rows_norms

    # internals ----------------------------------------------------------------------------------------------
    def _gradients_once(self, losses: Sequence[Tensor], stacked: Tensor, problem: str) -> Tensor:
        try:
            grads = torch.stack([torch.autograd.grad(loss, self.parameter, retain_graph=True)[0] for loss in losses])
        except RuntimeError as exc:
            raise RuntimeError(f"gradnorm distributed norms: {problem}; the per-task gradients at W are not reachable either ({exc})") from exc
        dtype = gram_norms.accumulation_dtype(grads)
        tasks = len(losses)
        reduced = distributed.mean_across_ranks(torch.cat([stacked.to(dtype), grads.to(dtype).flatten()]))
        self._losses = reduced[:tasks]
        grads = reduced[tasks:].view(tasks, -1)
        if self.per_channel:
            return grads.view(tasks, self.parameter.shape[0], -1).square().sum(2).sqrt()
        return grads.square().sum(1).sqrt()

    def _choose_from(self, x_rows: Tensor, d_rows: Tensor) -> None:
        """The route from the rows' shapes, where no step measured by this meter chose it (heads given)."""
        tasks, positions, groups, fan_out = d_rows.shape
        shape = gram_norms.Geometry(positions, groups, x_rows.shape[2], fan_out)
        self.options = exchanges(
            tasks, self.parameter.numel(), distributed.world_size(), shape=shape, sketch_size=self.sketch_size, element_size=x_rows.element_size()
        )
        route, reason = choose(self.mode, self.options, per_channel=self.per_channel, byte_weight=byte_multiply_adds(x_rows.device))
        self.exchange = self.options[route]
        self.choice = RouteChoice(PATH_PREFIX + route, reason)

    def _seeded(self, step: int, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        # The same (seed, step) on every rank: the same pairs; a new step, new pairs.
        self._generator.manual_seed((self.seed * 0x9E3779B1 + step * 0x85EBCA77 + 1) % (1 << 63))
        return self._generator

    def _issue_all_reduce(self, bucket: Tensor, route: str, step: int) -> Any:
        if distributed.world_size() == 1:
            return None
        try:
            return dist.all_reduce(bucket, op=dist.ReduceOp.SUM, async_op=True)
        except RuntimeError as exc:
            raise exchange_failed(route, step, exc) from exc

    def _reduced(self, work: Any, bucket: Tensor, route: str, step: int) -> Tensor:
        if work is None:
            return bucket
        _wait(work, route, step)
        return bucket / distributed.world_size()

    def _output_rows(self, losses: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
        """(T, P, g, d_out): every task's gradient at W's output at every captured position."""
        calls = self.capture.calls
        tasks = len(losses)
        chunk = min(self.capture.default_chunk(tasks), gram_norms.DEFAULT_TASK_CHUNK)
        for attempt in (0, 1):
            try:
                parts = []
                for tasks_slice, grads in gram_norms.output_gradients(list(losses), [call.output for call in calls], chunk, batched=self._batched):
                    count = tasks_slice.stop - tasks_slice.start
                    rows = [
                        gram_norms.output_rows(
                            self.layer, g if g is not None else torch.zeros((count, *call.output_shape), dtype=dtype, device=call.input.device), dtype
                        )
                        for call, g in zip(calls, grads)
                    ]
                    parts.append(torch.cat(rows, 1))
                return torch.cat(parts, 0)
            except RuntimeError as exc:
                if not self._batched or attempt:
                    raise
                self._batched = False
                warnings.warn(
                    f"gradnorm: batched gradients at the shared layer's output unavailable for this model ({exc}); using one backward per task", RuntimeWarning
                )
        raise AssertionError("unreachable")


def meter_for(
    parameter: Tensor,
    module: Optional[nn.Module],
    mode: str,
    *,
    sketch_size: int = DEFAULT_SKETCH_SIZE,
    seed: int = 0,
    per_channel: bool = False,
    owner: Optional[object] = None,
) -> Optional[DistributedNormMeter]:
    """The meter for ``attach(distributed_norms=mode)``, or None where the default path serves.

    None in a single process unless ``rows`` or ``sketch`` is asked for (the default paths are exact and send
    nothing), and under ``torch.distributed`` for ``gradients``, or for ``auto``/``exact`` at a layer the rows
    cannot describe (not a stock Linear or Conv2d: the gradients are averaged, as before).
    """
    if mode not in MODES:
        raise ValueError(f"distributed_norms must be one of {MODES}, got {mode!r}")
    if mode == ROUTE_GRADIENTS or (distributed.world_size() == 1 and mode in ("auto", "exact")):
        return None
    reason = gram_norms.unsupported(module) if module is not None else "the shared layer was given as a parameter, not its module"
    if reason is None and getattr(module, "weight", None) is not parameter:
        reason = "the shared parameter is not its module's weight"
    if reason is not None:
        if mode in (ROUTE_ROWS, ROUTE_SKETCH):
            raise ValueError(f"distributed_norms={mode!r} needs a stock nn.Linear or nn.Conv2d as the shared layer: {reason}")
        return None
    assert module is not None
    return DistributedNormMeter(parameter, module, mode=mode, sketch_size=sketch_size, seed=seed, per_channel=per_channel, owner=owner)


def release(meter: object) -> None:
    """Remove whatever hook a meter the distributed one replaces registered (a no-op for one without)."""
    remove = getattr(meter, "remove", None)
    if callable(remove):
        remove()
