"""Per-task gradient norms at the shared layer W from the user's own backward pass, without extra passes.

The gradient of sum_i w_i L_i that reaches the task heads' common input H is a sum over tasks, but the
pieces that leave each head are still separate: head i sends f_i grad_H L_i, f_i being w_i times whatever
else scales the backward (a loss scale, say). A forward pre-hook on the
first head routes H through one fan-out node (``_FanOut``) that hands every head its own alias of H; in
the backward pass that node receives the T pieces together, in one call, adds them up for the rest of
the backward, and maps them through the short segment H -> W to get n_i = ||grad_W L_i|| for every task
(G_i = w_i n_i, the quantity of the paper's eq. 2, measured directly: section 3.1). The heads and the
loss functions are never differentiated twice.

The segment H -> W is crossed one of three ways, chosen per step and stated by ``path``:

- ``linear-product``: W is an ``nn.Linear`` weight and H is its output, or its output through ReLUs. Then
  grad_W L_i = (g_i * mask)^T X, with X the layer's input (captured by a forward hook) and the mask read
  from the ReLU's saved output: one matrix product for all tasks, no autograd call.
- ``conv-product``: the same for an ``nn.Conv2d`` weight (zero padding, one group): the T tasks' masked
  gradients, laid side by side as T * C output channels, go through one weight-gradient convolution
  with X, whose T * C filters are the T tasks' grad_W.
- ``gram-vjp``: W is a stock ``nn.Linear`` or ``nn.Conv2d`` (any stride, padding, dilation, groups) and
  something else stands between its output Y and H (batch norm, a residual add, LayerNorm, pooling,
  dropout, attention): the T pieces cross H -> Y in T-batched vector-Jacobian products
  (``is_grads_batched``, chunked over tasks), which never reach W's weight gradient, and the norms come
  by the Gram identity ||grad_W L_i||^2 = <D_i D_i^T, X X^T> from D_i = grad_Y L_i and W's input X
  (``hooks/gram_norms.py``): no per-task weight gradient is formed. Taken where its cost model
  (``gram_norms.choose_route``: g P^2 (d_in + T d_out) against T P d_in d_out multiply-adds) says it is
  cheaper than forming the T weight gradients; ``reason`` says which and why.
- ``batched-vjp``: anything else; one T-batched vector-Jacobian product (``is_grads_batched``) from H to W.

Under ``torch.distributed`` with the rows, sketch or gradients exchange of ``hooks/distributed_norms.py``
(an ``exchange`` given), the taps form no norm themselves: each rank's D_i at W's output (``output-mask``:
the pieces through the segment's ReLU masks, H being W's output; ``output-vjp``: the pieces carried from H
to W's output by T-batched vector-Jacobian products) and W's input rows X go to the exchange, factors
divided out, as soon as the last forward pass of the step's loss has sent its pieces. The heads' part of
the backward runs before the trunk's, so the exchange's collective (issued asynchronously) overlaps the
trunk's backward; it is waited for in the engine's callback at the backward's end, where the norms are used.

The products are formed in float32 (float64 for a float64 W) whatever the gradients' dtype, so that
bfloat16 or float16 pieces under autocast give the same norms as float32 ones, to their own rounding.
Everything stays on the device and nothing synchronises with the host.

Each forward pass through the heads keeps its own state (H, W's input, the segment) in its fan-out node,
so a loss built from several forward passes (two halves of a batch, say) gets the sum of their
gradients at W, as autograd would; the norms are taken once the backward has finished (a callback the
autograd engine runs at its end). The pieces carry whatever multiplies each loss in that backward (its
weight, a loss scale); ``factor`` says what it is, task by task (``hooks/session.py``), and it is
divided out before the norms: where the shared layer's input is the smaller tensor, that input is
divided by the largest factor (the products then carry f_i / max f, at most 1, so no sum of squares
overflows) and the T norms by the rest; otherwise the T gradients at W are divided by their factors.

Heads given in the wrong order would pair each task's loss with another task's gradient; at the first
step a forward hook on each head notes its output, and the step's autograd graph says which loss each
head feeds (:meth:`HeadTaps.check_pairing`).
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.autograd.graph import Node
from torch.nn.grad import conv2d_weight
from torch.utils._pytree import tree_leaves
from torch.utils.hooks import RemovableHandle

from . import gram_norms
from .grad_norms import norms_of, statistics_dtype
from .shared_layer import graph_nodes

LINEAR_PRODUCT = "linear-product"
CONV_PRODUCT = "conv-product"
GRAM_VJP = "gram-vjp"
BATCHED_VJP = "batched-vjp"
#: Under ``torch.distributed`` (an ``exchange`` given): how the taps form D_i, each task's gradient at W's
#: output, for the exchange of ``hooks/distributed_norms.py``: the heads' pieces through the segment's ReLU
#: mask (H is W's output, or it through ReLUs), or one T-batched vector-Jacobian product from H to W's output.
OUTPUT_MASK = "output-mask"
OUTPUT_VJP = "output-vjp"
# The task axis of the stacked pieces: just before the channel axis (last for a Linear, 1 for a
# convolution), so that the product routes read the T pieces as T * C channels without a copy.
_TASK_AXIS = {LINEAR_PRODUCT: -2, CONV_PRODUCT: 1, GRAM_VJP: 0, BATCHED_VJP: 0, OUTPUT_MASK: 0, OUTPUT_VJP: 0}
#: Bytes of the tasks' gradients at W's output per batched product of the Gram route (chunks of tasks).
GRAM_CHUNK_BYTES = 16 << 20
# Elementwise nodes between W's output and H whose Jacobian is a 0/1 mask read from what they saved: for
# a ReLU, sign(relu(y)), which is that mask already in a floating dtype (a boolean mask would cost a
# conversion in every product it multiplies).
_MASK_NODES = {"ReluBackward0": lambda node: torch.sign(node._saved_result)}
_MAX_SEGMENT_NODES = 8
#: Above this many bytes for holding T - 1 extra copies of H's gradient, the taps stream (see HeadTaps).
STREAM_ABOVE_BYTES = 1 << 20

Mask = Union[None, bool, Tensor]


class TapsError(RuntimeError):
    """A backward the taps cannot measure (a head sent no gradient, a task's factor is unknown)."""


class _Forward:
    """One forward pass through the heads: H, W's input and call count then, and (streaming) its pieces.

    Its fan-out node's context or its streaming hooks hold it; it holds nothing that holds them (not the
    heads' aliases of H, which hold the node or the hooks): a reference back would make a cycle through
    the autograd graph's C++ side that no garbage collection can free, and keep every step's graph alive.
    """

    __slots__ = (
        "shared",
        "layer_input",
        "layer_node",
        "layer_calls",
        "calls",
        "served",
        "pieces",
        "arrived",
        "mask",
        "mode",
        "rows",
        "work",
        "spent",
        "__weakref__",
    )

    def __init__(
        self,
        shared: Tensor,
        layer_input: Optional[tuple[Tensor, int]],
        layer_node: Optional[Node],
        layer_calls: int,
        calls: Sequence[gram_norms.LayerCall] = (),
    ) -> None:
        self.shared = shared
        self.layer_input = layer_input
        self.layer_node = layer_node
        self.layer_calls = layer_calls
        # The Gram route: every call of W's module in this forward pass (input, its version, output edge).
        self.calls = list(calls)
        self.served: set[int] = set()
        self.pieces: list[Optional[Tensor]] = []
        self.arrived = 0
        self.rows: Optional[Tensor] = None  # streaming through a Linear: W's input as (positions, in_features)
        self.work: Optional[Tensor] = None  # and one masked piece at a time, in one buffer
        self.mask: Mask = None  # streaming: the segment's mask, read at the first piece
        self.mode = "fan-out"
        self.spent = False  # an unmeasured backward went through it (a step between updates)


class _FanOut(torch.autograd.Function):
    """Identity from H to T aliases of H; its backward sees the T heads' gradients at once."""

    @staticmethod
    def forward(ctx, taps: HeadTaps, forward: _Forward, shared: Tensor) -> tuple[Tensor, ...]:
        ctx.taps, ctx.forward = taps, forward
        ctx.set_materialize_grads(False)
        count = len(taps.heads)
        if count <= 3:
            return tuple(shared.view_as(shared) for _ in range(count))
        return shared.unsqueeze(0).expand(count, *shared.shape).unbind(0)  # T views, three operators

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]):
        return None, None, ctx.taps._backward(ctx.forward, grads)


class HeadTaps:
    """Hooks on the task heads that hand ``on_norms`` the (T,) norms at W after each measured backward."""

    def __init__(
        self,
        heads: Sequence[nn.Module],
        parameter: Tensor,
        on_norms: Callable[[Tensor], None],
        reduce: Optional[Callable[[Tensor], Tensor]] = None,
        factor: Optional[Callable[[], Tensor]] = None,
        per_channel: bool = False,
        module: Optional[nn.Module] = None,
        on_failure: Optional[Callable[[TapsError], None]] = None,
        check_pairing: bool = False,
        warn_fallback: bool = True,
        exchange: Optional[Callable[[Tensor, Tensor], Callable[[], Tensor]]] = None,
    ) -> None:
        if len(heads) < 2:
            raise ValueError(f"heads= needs one module per task (at least two), got {len(heads)}")
        if exchange is not None and reduce is not None:
            raise ValueError("the taps take either an exchange of W's rows or a reduce of the gradients, not both")
        self.heads = list(heads)
        self.parameter = parameter
        self.on_norms = on_norms
        # Applied to the unscaled (T, *W.shape) gradients before the norms: the mean over DDP ranks, which
        # needs each rank's gradients exactly unscaled (``scale_input`` False).
        self.reduce = reduce
        # The (T,) factors of this backward; None: every piece comes unscaled.
        self.factor = factor
        self.scale_input = reduce is None
        self.per_channel = per_channel
        # Where a backward cannot be measured: raise (None) or hand the error to the owner.
        self.on_failure = on_failure
        self.dtype = statistics_dtype(parameter.dtype)
        # Under torch.distributed: called with this rank's (X rows, unscaled D rows) of the measured backward
        # as soon as the heads' part of it has run; it issues the step's collective and returns the function
        # that waits for it and gives the norms (hooks/distributed_norms.py, DistributedNormMeter.issue).
        self.exchange = exchange
        self._exchange_parts: list[tuple[Tensor, Tensor]] = []  # this backward's (X rows, D rows) per forward pass
        self._exchange_finish: Optional[Callable[[], Tensor]] = None  # the issued collective's wait-and-norms
        self._exchange_arrived = 0  # forward passes of this backward whose pieces arrived
        self._recent: list[weakref.ref[_Forward]] = []  # forward passes since the last arm()
        self._expected = 0  # of those, the ones alive and not yet backpropagated at arm(): the step's loss's
        self._forward: Optional[_Forward] = None  # the latest forward pass through the heads
        self._aliases: tuple[Tensor, ...] = ()  # its aliases of H, until the step's loss is known
        self._streams: list[_Forward] = []  # streaming forward passes the measured backward reached
        self._armed = False  # the next backward through the taps is measured
        self._collecting = False  # inside the measured backward, until the engine's callback at its end
        self._result: Optional[Tensor] = None  # (T, *W.shape), summed over the forward passes it reached
        self._norm_scale: Optional[Tensor] = None  # (T,): what the norms of ``_result`` are multiplied by
        self._step_factor: Optional[Tensor] = None  # this backward's factors, read at its first forward
        self._unscale: Optional[str] = None  # how this backward divides them out (see _unscaling)
        self._largest: Optional[Tensor] = None
        self._problem: Optional[TapsError] = None
        self._handles: list[RemovableHandle] = [head.register_forward_pre_hook(self._make_pre_hook(i)) for i, head in enumerate(self.heads)]
        # The streaming taps' hooks on the tensors of a forward pass whose graph may still be alive.
        self._tensor_handles: list[RemovableHandle] = []
        self._layer = module if _has_product_route(module, parameter) else None
        # The Gram route needs the norms of each rank's own gradients: not under a reduce over ranks.
        self._gram_layer: Optional[gram_norms.Layer] = module if reduce is None and _has_gram_route(module, parameter) else None  # type: ignore[assignment]
        self._layer_input: Optional[tuple[Tensor, int]] = None  # (X, its version when captured)
        self._layer_node: Optional[Node] = None  # grad_fn of the layer's output, taken before any in-place op on it
        self._layer_calls = 0  # calls of the layer since the heads last read H
        self._calls: list[gram_norms.LayerCall] = []  # those calls, for the Gram route (at most MAX_CALLS)
        self._gram_parts: list[tuple[Tensor, Tensor]] = []  # this backward's (X rows, D rows) per forward pass
        self._gram_choices: dict[tuple, tuple[str, str]] = {}  # (shapes, T) -> (route, reason)
        if module is not None and (self._layer is not None or self._gram_layer is not None):
            self._handles.append(module.register_forward_hook(self._capture_layer))
        # heads= given by the user: the first forward's head outputs, to check which loss each feeds.
        self._outputs: Optional[list[list]] = None
        self._output_handles: list[RemovableHandle] = []
        if check_pairing:
            self._outputs = [[] for _ in self.heads]
            self._output_handles = [head.register_forward_hook(self._make_output_hook(i)) for i, head in enumerate(self.heads)]
        # Heads the user gave were meant for a product route: a warning says when none applies.
        self._warned_fallback = not warn_fallback
        self.path: Optional[str] = None  # the route of the last measured step
        self.reason: Optional[str] = None  # why the Gram route was or was not taken, where it was considered
        self.mode: Optional[str] = None  # "fan-out" or "stream", of the last forward pass

    def arm(self) -> None:
        """Measure the next backward through the taps (called once the step's losses are known)."""
        self._armed = True
        # The exchange is issued once the forward passes the step's loss can come from have all sent their pieces.
        self._expected = sum(1 for ref in self._recent if (forward := ref()) is not None and not forward.spent)
        self._recent = []
        # The forward passes are done; a head called again starts a new one.
        self._forward, self._aliases = None, ()

    def remove(self) -> None:
        """Remove every hook the taps registered (again: a no-op) and let go of the forward pass they saw.

        A graph built before still backpropagates: the fan-out node then only adds the heads' gradients
        up, as the graph without taps would, and measures nothing.
        """
        self._armed = self._collecting = False
        for handle in self._handles + self._tensor_handles + self._output_handles:
            handle.remove()
        self._handles, self._tensor_handles, self._output_handles, self._outputs = [], [], [], None
        self._forward, self._aliases, self._streams, self._result, self._problem = None, (), [], None, None
        self._layer_input, self._layer_node, self._calls, self._gram_parts = None, None, [], []
        self._exchange_parts, self._exchange_finish, self._recent = [], None, []

    def describe_path(self) -> str:
        """The route the next measurement will take (for ``run.json``), decided from this step's graph."""
        if self._forward is None:
            return BATCHED_VJP
        return self._route(self._segment_mask(self._forward), self._forward)

    def describe_path_of(self, shared: Tensor, layer_input: Optional[tuple[Tensor, int]], layer_node, layer_calls: int) -> str:
        """The route for a forward pass seen from outside (``heads="auto"``'s first step).

        For the Gram route's cost model, each of the ``layer_calls`` calls is taken to have the shapes of
        the last one (``layer_input``).
        """
        calls: list[gram_norms.LayerCall] = []
        if self._gram_layer is not None and layer_input is not None:
            x, version = layer_input
            y_shape = torch.Size(gram_norms.output_shape(self._gram_layer, x.shape))
            calls = [gram_norms.LayerCall(x, version, x, y_shape, x.dtype)] * layer_calls
        return self._route(
            self._segment_mask(_Forward(shared, layer_input, layer_node, layer_calls)), _Forward(shared, layer_input, layer_node, layer_calls, calls)
        )

    def check_pairing(self, losses: Sequence[Tensor], tasks: Sequence[str]) -> None:
        """Raise ValueError unless head i's output reaches task i's loss and no other (the first step only).

        Heads handed in another order than the tasks would otherwise pair each loss with another head's
        gradient and train on wrong norms without any sign of it.
        """
        outputs, self._outputs = self._outputs, None
        for handle in self._output_handles:
            handle.remove()
        self._output_handles = []
        if outputs is None or not all(outputs):  # (a head that did not run this step: its taps say so)
            return
        reach = [graph_nodes(loss) for loss in losses]
        fed = [[task for task, nodes in zip(tasks, reach) if any(node in nodes for node in head_nodes)] for head_nodes in outputs]
        if all(feeds == [task] for feeds, task in zip(fed, tasks)):
            return
        described = "; ".join(f"head {i} ({type(head).__name__}) feeds {feeds or 'no task'}" for i, (head, feeds) in enumerate(zip(self.heads, fed)))
        order = [feeds[0] for feeds in fed if len(feeds) == 1]
        if len(order) == len(tasks) and sorted(order) == sorted(tasks):
            raise ValueError(
                f"heads= are not in task order: {described}, but the tasks are {list(tasks)}; give the heads in task order "
                f"(head {order.index(tasks[0])} first), or leave heads= out to find them"
            )
        raise ValueError(
            f"heads= needs each head's output to reach its own task's loss and no other: {described} (tasks {list(tasks)}); "
            "pass the modules that split the tasks, or heads=None for the general path"
        )

    def _make_output_hook(self, index: int):
        def keep(module: nn.Module, args: tuple, output) -> None:
            if self._outputs is not None and torch.is_grad_enabled():
                self._outputs[index] = [t.grad_fn for t in tree_leaves(output) if isinstance(t, Tensor) and t.grad_fn is not None]

        return keep

    def _route(self, mask: Mask, forward: Optional[_Forward] = None) -> str:
        if self.exchange is not None:
            return self._exchange_route(mask, forward)
        if mask is not None:
            return LINEAR_PRODUCT if isinstance(self._layer, nn.Linear) else CONV_PRODUCT
        if forward is not None and self._gram_route(forward) == gram_norms.GRAM:
            return GRAM_VJP
        return BATCHED_VJP

    def _exchange_route(self, mask: Mask, forward: Optional[_Forward]) -> str:
        """How D_i is formed for the exchange (``OUTPUT_MASK``, ``OUTPUT_VJP``; ``BATCHED_VJP``: it cannot be)."""
        if mask is not None and (forward is None or forward.layer_input is not None):
            self.reason = f"{OUTPUT_MASK}: D_i at W's output are the heads' gradients at H through the segment's ReLU masks (no product)"
            return OUTPUT_MASK
        problem = "no forward pass seen" if forward is None else self._calls_problem(forward)
        if problem is None:
            self.reason = f"{OUTPUT_VJP}: D_i at W's output from the heads' gradients by T-batched vector-Jacobian products from H to W's output"
            return OUTPUT_VJP
        self.reason = f"{BATCHED_VJP}: the exchange of W's rows cannot be fed: {problem}"
        return BATCHED_VJP

    def _calls_problem(self, forward: _Forward) -> Optional[str]:
        """Why ``forward``'s calls of W cannot give W's input and output rows (None when they can)."""
        if self._gram_layer is None:
            return "W is not a stock nn.Linear or nn.Conv2d whose weight is the shared parameter"
        calls = forward.calls
        if not calls or len(calls) != forward.layer_calls:
            return f"every call of W in the forward pass must be kept ({len(calls)} of {forward.layer_calls})"
        if any(call.input._version != call.input_version for call in calls):
            return "W's input was changed in place after the call"
        return None

    def _gram_route(self, forward: _Forward) -> Optional[str]:
        """``gram`` or ``direct`` by the cost model for ``forward``'s calls of W (None: it cannot apply).

        Decided by shapes alone (the calls' input and output shapes and T), once per shape.
        """
        layer, calls = self._gram_layer, forward.calls
        if layer is None:
            return None
        if not calls or len(calls) != forward.layer_calls:
            self.reason = f"batched-vjp: the Gram route needs every call of W in the forward pass kept ({len(calls)} of {forward.layer_calls})"
            return None
        if any(call.input._version != call.input_version for call in calls):
            self.reason = "batched-vjp: W's input was changed in place after the call, so the Gram identity cannot use it"
            return None
        key = (tuple((tuple(c.input.shape), tuple(c.output_shape)) for c in calls), len(self.heads), forward.shared.dtype)
        choice = self._gram_choices.get(key)
        if choice is None:
            first = calls[0]
            positions = sum(gram_norms.geometry(layer, c.input.shape, c.output_shape).positions for c in calls)
            size = torch.finfo(self.dtype).bits // 8
            route, reason = gram_norms.choose_route(layer, first.input.shape, first.output_shape, len(self.heads), element_size=size, positions=positions)
            name = GRAM_VJP if route == gram_norms.GRAM else BATCHED_VJP
            choice = self._gram_choices[key] = (route, f"{name}: {reason}")
        self.reason = choice[1]
        return choice[0]

    # -- forward ---------------------------------------------------------------------------------
    def _make_pre_hook(self, index: int):
        def pre_hook(module: nn.Module, args: tuple):
            if not args or not isinstance(args[0], Tensor) or not args[0].requires_grad or not torch.is_grad_enabled():
                return None
            shared = args[0]
            forward = self._forward
            # A head called again, whatever the order of the heads' calls, means a new forward pass.
            if forward is None or index in forward.served:
                forward = self._forward = _Forward(shared, self._layer_input, self._layer_node, self._layer_calls, self._calls)
                self._layer_calls, self._calls = 0, []
                if self.exchange is not None:
                    if len(self._recent) >= 64:  # steps between updates arm nothing: keep the live ones only
                        self._recent = [ref for ref in self._recent if ref() is not None]
                    self._recent.append(weakref.ref(forward))
                if self._should_stream(forward):
                    self._aliases = self._stream(forward)
                else:
                    self._aliases = _FanOut.apply(self, forward, shared)
                self.mode = forward.mode
            elif shared is not forward.shared:
                raise ValueError(_different_inputs(self.heads, forward, index, shared))
            forward.served.add(index)
            return (self._aliases[index],) + tuple(args[1:])

        return pre_hook

    def _capture_layer(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return
        self._layer_calls += 1
        self._layer_input = (args[0], args[0]._version) if args and isinstance(args[0], Tensor) else None
        self._layer_node = output.grad_fn
        # Reset at each forward pass through the heads; bounded, for calls of W that never reach them.
        if self._gram_layer is not None and self._layer_input is not None and output.requires_grad and len(self._calls) < gram_norms.DEFAULT_MAX_CALLS:
            x = self._layer_input[0]
            self._calls.append(gram_norms.LayerCall(x, x._version, gram_norms.gradient_edge(output), output.shape, output.dtype))

    def _should_stream(self, forward: _Forward) -> bool:
        """Stream when holding the T pieces at once would cost more than ``STREAM_ABOVE_BYTES``."""
        shared = forward.shared
        held = (len(self.heads) - 1) * shared.numel() * shared.element_size()
        # The exchange needs every task's gradient at W's output at once (it sends them, or sketches them together).
        return self.exchange is None and held > STREAM_ABOVE_BYTES and self._segment_mask(forward, compute=False) is not None

    def _stream(self, forward: _Forward) -> tuple[Tensor, ...]:
        """Aliases whose gradients are turned into their task's grad_W one by one, as they arrive."""
        forward.mode = "stream"
        forward.pieces = [None] * len(self.heads)
        aliases = tuple(forward.shared.view_as(forward.shared) for _ in self.heads)
        # Handles of graphs already freed are dropped (their hooks went with their tensors).
        handles = [handle for handle in self._tensor_handles if handle.hooks_dict_ref() is not None]
        handles += [alias.register_hook(self._make_piece_hook(forward, index)) for index, alias in enumerate(aliases)]
        self._tensor_handles = handles
        return aliases

    # -- backward --------------------------------------------------------------------------------
    def _measuring(self) -> bool:
        """Whether the running backward is measured; the first tap it reaches after arm() starts it."""
        if self._armed:
            self._armed = False
            self._collecting = True
            self._result, self._norm_scale, self._step_factor, self._problem = None, None, None, None
            self._unscale, self._largest = None, None
            self._exchange_parts, self._exchange_finish, self._exchange_arrived = [], None, 0
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
        return self._collecting

    def _factors(self) -> Optional[Tensor]:
        """This backward's (T,) factors in ``self.dtype`` (None without a ``factor`` source).

        Read at the first forward pass that needs them, once every piece has arrived (all the losses'
        hooks have run by then: each head's gradient comes after its loss's).
        """
        if self.factor is None:
            return None
        if self._step_factor is None:
            self._step_factor = self.factor()
        return self._step_factor

    def _unscaling(self, input_numel: int, per_task_numel: int) -> str:
        """How this backward divides the factors out, chosen at its first forward pass: "none" (no
        factors), "input" (W's input divided by the largest factor, the norms by the rest) or "output"
        (the T gradients at W divided by their factors)."""
        if self._unscale is None:
            factor = self._factors()
            if factor is None:
                self._unscale = "none"
            elif self.scale_input and input_numel < per_task_numel:
                magnitude = factor.abs()
                self._largest = magnitude.amax()
                self._norm_scale = self._largest / magnitude
                self._unscale = "input"
            else:
                self._unscale = "output"
        return self._unscale

    def _add_gram(self, forward: _Forward, stacked: Tensor) -> None:
        """The Gram route for one forward pass: D_i at W's output for the (T, *H.shape) pieces, kept with X.

        D carries the factors still; ``_finish_backward`` divides them out and takes the norms, over every
        forward pass of the backward at once (the norm of a sum of gradients has cross terms).
        """
        layer = self._gram_layer
        if layer is None:
            raise TapsError("heads=: the Gram route without a Linear or Conv2d shared layer")
        self.path = GRAM_VJP
        rows, d_rows = self._vjp_rows(layer, forward, stacked)
        self._gram_parts.append((rows, d_rows))
        if self._result is not None:  # an earlier forward pass of this backward formed its gradients at W
            self._gram_to_result()

    def _vjp_rows(self, layer: gram_norms.Layer, forward: _Forward, stacked: Tensor) -> tuple[Tensor, Tensor]:
        """(X rows (P, g, d_in), D rows (T, P, g, d_out)) of ``forward``'s calls of W: the (T, *H.shape) pieces
        carried from H to W's outputs by T-batched vector-Jacobian products (chunked over tasks)."""
        calls = forward.calls
        rows = torch.cat([gram_norms.input_rows(layer, call.input, self.dtype) for call in calls], 0)
        num_tasks = stacked.shape[0]
        numbers = sum(math.prod(call.output_shape) for call in calls)
        chunk = gram_norms.default_chunk(numbers, num_tasks, torch.finfo(self.dtype).bits // 8, GRAM_CHUNK_BYTES)
        outputs: Any = [call.output for call in calls]  # tensors or gradient edges
        parts = []
        for start in range(0, num_tasks, chunk):
            piece = stacked[start : start + chunk]
            grads = torch.autograd.grad(forward.shared, outputs, grad_outputs=piece, is_grads_batched=True, retain_graph=True, allow_unused=True)
            parts.append(
                torch.cat(
                    [
                        gram_norms.output_rows(layer, g if g is not None else piece.new_zeros((piece.shape[0], *call.output_shape)), self.dtype)
                        for call, g in zip(calls, grads)
                    ],
                    1,
                )
            )
        return rows, parts[0] if len(parts) == 1 else torch.cat(parts, 0)

    # -- the exchange under torch.distributed --------------------------------------------------------
    def _add_rows(self, forward: _Forward, stacked: Tensor) -> None:
        """One forward pass's X and D rows for the exchange; the last expected pass issues its collective."""
        layer = self._gram_layer
        if layer is None:
            raise TapsError("the exchange of W's rows needs W as a stock nn.Linear or nn.Conv2d whose weight is the shared parameter")
        if self._exchange_finish is not None:
            raise TapsError(
                "a forward pass reached the measured backward after its exchange was issued; build each step's loss from that step's forward passes"
            )
        mask = self._segment_mask(forward)
        route = self._route(mask, forward)
        if route == OUTPUT_MASK and forward.layer_input is not None:
            # D_i = the piece times the ReLU mask: H's shape is W's output's, so the pieces are D already.
            d = stacked * mask if isinstance(mask, Tensor) else stacked
            rows = gram_norms.input_rows(layer, forward.layer_input[0], self.dtype)
            d_rows = gram_norms.output_rows(layer, d, self.dtype)
        elif route == OUTPUT_VJP:
            rows, d_rows = self._vjp_rows(layer, forward, stacked)
        else:
            raise TapsError(f"heads=: {self.reason}")
        self.path = route
        self._exchange_parts.append((rows, d_rows))
        self._exchange_arrived += 1
        if self._exchange_arrived >= self._expected:
            self._issue_exchange()

    def _issue_exchange(self) -> None:
        """Divide the factors out of D (every rank's are the same) and hand the rows to the exchange."""
        parts, self._exchange_parts = self._exchange_parts, []
        if not parts or self.exchange is None:
            return
        rows = parts[0][0] if len(parts) == 1 else torch.cat([x for x, _ in parts], 0)
        d = parts[0][1] if len(parts) == 1 else torch.cat([g for _, g in parts], 1)
        factor = self._factors()
        if factor is not None:
            d = d / factor.to(d.dtype).view(-1, 1, 1, 1)
        self._exchange_finish = self.exchange(rows, d)

    def _finish_exchange(self, problem: Optional[TapsError]) -> None:
        """The end of the measured backward under an exchange: wait for the collective where the norms are used."""
        if problem is None and self._exchange_parts:  # fewer forward passes reached the backward than were alive at arm()
            try:
                self._issue_exchange()
            except TapsError as exc:
                problem = exc
        finish, self._exchange_finish = self._exchange_finish, None
        self._exchange_parts, self._exchange_arrived = [], 0
        try:
            if problem is not None:
                if finish is not None:
                    finish()  # issued: waited for, so that no collective of this rank is left in flight
                raise problem
            if finish is None:
                raise TapsError("the measured backward reached the heads but no forward pass's pieces were complete")
            self.on_norms(finish())
        except TapsError as exc:
            if self.on_failure is None:
                raise
            self.on_failure(exc)

    def _gram_to_result(self) -> None:
        """Where forward passes of one backward took different routes: the Gram parts as weight gradients."""
        parts, self._gram_parts = self._gram_parts, []
        for rows, d in parts:
            grads = torch.einsum("tpgo,pgi->tgoi", d, rows).reshape(d.shape[0], *self.parameter.shape)
            self._add(grads, False)

    def _gram_norms(self, parts: list[tuple[Tensor, Tensor]], factor: Optional[Tensor]) -> Tensor:
        """(T,) or (T, C) norms by the Gram identity over every forward pass's positions, factors divided out."""
        rows = parts[0][0] if len(parts) == 1 else torch.cat([x for x, _ in parts], 0)
        d = parts[0][1] if len(parts) == 1 else torch.cat([g for _, g in parts], 1)
        if factor is not None:
            d = d / factor.to(d.dtype).view(-1, 1, 1, 1)
        return gram_norms.GramOfInput(rows).sq_norms(d, self.per_channel).sqrt()

    def _add(self, per_task: Tensor, scaled_input: bool) -> None:
        """Add one forward pass's gradients at W (products of the scaled input, or to be divided here)."""
        if self._gram_parts:
            self._gram_to_result()
        if not scaled_input:
            mode = self._unscaling(per_task.numel(), 0)
            if mode == "input" and self._largest is not None:  # an earlier forward pass scaled its input: the same units
                per_task = per_task / self._largest
            elif mode == "output":
                factor = self._factors()
                if factor is not None:
                    per_task = per_task / factor.view(-1, *([1] * (per_task.dim() - 1)))
        self._result = per_task if self._result is None else self._result + per_task

    def _finish_backward(self) -> None:
        """The end of the measured backward: the norms of the summed per-task gradients, or the failure."""
        self._collecting = False
        for forward in self._streams:  # streaming forward passes some of whose heads sent nothing
            self._fail(_missing([i for i, piece in enumerate(forward.pieces) if piece is None]))
            forward.pieces, forward.arrived, forward.mask, forward.rows, forward.work = [None] * len(self.heads), 0, None, None, None
        self._streams = []
        if self.exchange is not None:
            problem = self._problem
            self._result, self._problem, self._norm_scale, self._step_factor, self._gram_parts = None, None, None, None, []
            self._finish_exchange(problem)
            return
        result, problem, scale, gram_parts = self._result, self._problem, self._norm_scale, self._gram_parts
        factor = self._step_factor if gram_parts else None
        if gram_parts and factor is None and self.factor is not None:
            try:
                factor = self._factors()
            except TapsError as exc:
                problem = problem or exc
        self._result, self._problem, self._norm_scale, self._step_factor, self._gram_parts = None, None, None, None, []
        self._unscale, self._largest = None, None
        try:
            if problem is not None:
                raise problem
            if gram_parts:
                self.on_norms(self._gram_norms(gram_parts, factor))
                return
            if result is None:
                raise TapsError("the measured backward reached the heads but no forward pass's pieces were complete")
            norms = norms_of(result if self.reduce is None else self.reduce(result), self.per_channel)
            if scale is not None:
                norms = norms * (scale if norms.dim() == 1 else scale[:, None])
            self.on_norms(norms)
        except TapsError as exc:
            if self.on_failure is None:
                raise
            self.on_failure(exc)

    def _fail(self, exc: TapsError) -> None:
        if self._problem is None:
            self._problem = exc

    def _make_piece_hook(self, forward: _Forward, index: int):
        def piece(grad: Tensor) -> None:
            if not self._measuring():
                return
            if forward.arrived == 0:
                self._streams.append(forward)
            try:
                if forward.mask is None:
                    forward.mask = self._segment_mask(forward)
                route = self._route(forward.mask)
                if route == LINEAR_PRODUCT and forward.layer_input is not None:
                    # One product per piece: its task's grad_W, (F, I); the piece itself is not kept.
                    if forward.rows is None:
                        x = forward.layer_input[0].to(self.dtype)
                        forward.rows = x.reshape(-1, x.shape[-1])
                    g = grad
                    if isinstance(forward.mask, Tensor):
                        # Into one buffer for all T pieces: fresh memory for each would be page-faulted in.
                        if forward.work is None or forward.work.shape != grad.shape:
                            forward.work = torch.empty(grad.shape, dtype=self.dtype, device=grad.device)
                        g = torch.mul(grad, forward.mask, out=forward.work)
                    elif g.dtype != self.dtype:
                        g = g.to(self.dtype)
                    self.path = route
                    forward.pieces[index] = torch.mm(g.reshape(-1, g.shape[-1]).t(), forward.rows)
                else:
                    masked = grad * forward.mask if isinstance(forward.mask, Tensor) else grad
                    masked = masked.unsqueeze(_TASK_AXIS[route])
                    # A product route keeps only this task's grad_W (|W|), never the piece itself.
                    forward.pieces[index] = masked if route == BATCHED_VJP else self._per_task_weight_grads(forward, masked, route)[0][0]
            except TapsError as exc:
                self._fail(exc)
            forward.arrived += 1
            if forward.arrived == len(self.heads):  # the last piece of this forward pass
                self._finish_stream(forward)

        return piece

    def _finish_stream(self, forward: _Forward) -> None:
        pieces, mask = forward.pieces, forward.mask
        forward.pieces, forward.arrived, forward.mask, forward.rows, forward.work = [None] * len(self.heads), 0, None, None, None
        self._streams.remove(forward)
        try:
            present = _present(pieces)
            if self._route(mask) == BATCHED_VJP:  # no product route after all: the general product over the segment
                self._add(self._per_task_weight_grads(forward, torch.cat(present, 0), BATCHED_VJP)[0], False)
            else:
                self._add(torch.stack(present), False)
        except TapsError as exc:
            self._fail(exc)

    def _backward(self, forward: _Forward, grads: tuple[Optional[Tensor], ...]) -> Optional[Tensor]:
        present = [g for g in grads if g is not None]
        if not self._measuring():
            if self.exchange is not None:  # (only there: a compiled backward traces this, and would change with it)
                forward.spent = True
            return torch.stack(present).sum(0) if present else None
        if len(present) != len(grads):
            self._fail(_missing([i for i, g in enumerate(grads) if g is None]))
            return torch.stack(present).sum(0) if present else None
        if self.exchange is not None:
            pieces = torch.stack(present)
            try:
                self._add_rows(forward, pieces)
            except TapsError as exc:
                self._fail(exc)
            return pieces.sum(0)
        mask = self._segment_mask(forward)
        route = self._route(mask, forward)
        axis = _TASK_AXIS[route]
        stacked = torch.stack(present, dim=axis)
        total = stacked.sum(axis)
        if route == GRAM_VJP:
            try:
                self._add_gram(forward, stacked)
            except TapsError as exc:
                self._fail(exc)
            return total
        try:
            # The products in float32 at least (a copy, where the pieces are bfloat16 or float16).
            work = stacked if route == BATCHED_VJP or stacked.dtype == self.dtype else stacked.to(self.dtype)
            if isinstance(mask, Tensor):
                work.mul_(mask.unsqueeze(axis))  # ours, and not needed unmasked any more
            self._add(*self._per_task_weight_grads(forward, work, route, scalable=True))
        except TapsError as exc:
            self._fail(exc)
        return total

    def _per_task_weight_grads(self, forward: _Forward, stacked: Tensor, route: str, scalable: bool = False) -> tuple[Tensor, bool]:
        """(T, *W.shape): grad_W of each head's (masked) piece, by the route chosen for this step, and
        whether it came from W's input divided by the largest factor (only where ``scalable``).

        The product routes work in ``self.dtype`` (float32 at least); the batched product runs in the
        gradient's dtype, as autograd would, and hands W's gradient in W's dtype.
        """
        self.path = route
        if route == BATCHED_VJP:
            if self._layer is not None and not self._warned_fallback:
                self._warned_fallback = True
                warnings.warn(
                    f"gradnorm heads=: the segment between the shared {type(self._layer).__name__} and the heads is not "
                    "ReLU/identity (or the layer ran more than once); using one batched vector-Jacobian product per step",
                    RuntimeWarning,
                )
            (per_task,) = torch.autograd.grad(forward.shared, self.parameter, grad_outputs=stacked, is_grads_batched=True, retain_graph=True)
            return per_task, False
        if forward.layer_input is None:  # a product route is chosen only with the layer's input captured
            raise TapsError(f"heads=: {route} without the shared layer's captured input")
        stacked = stacked.to(self.dtype)  # (a no-op for the fan-out, which converts first)
        x = forward.layer_input[0].to(self.dtype)
        num_tasks = stacked.shape[_TASK_AXIS[route]]
        largest = self._largest if scalable and self._unscaling(x.numel(), num_tasks * self.parameter.numel()) == "input" else None
        scaled = largest is not None
        if largest is not None:
            x = x / largest
        if route == LINEAR_PRODUCT:
            features = stacked.shape[-1]
            rows = stacked.reshape(-1, num_tasks * features)  # row t * F + o of the product: grad_W[o] of task t
            product = torch.mm(rows.t(), x.reshape(-1, x.shape[-1]))
            return product.view(num_tasks, features, -1), scaled
        conv = self._layer
        if not isinstance(conv, nn.Conv2d):  # the other product route: _has_product_route admits Linear and Conv2d only
            raise TapsError(f"heads=: {route} needs an nn.Conv2d shared layer, got {type(conv).__name__}")
        channels = stacked.shape[2]
        grad_output = stacked.reshape(stacked.shape[0], num_tasks * channels, *stacked.shape[3:])
        weight_shape = (num_tasks * channels, *self.parameter.shape[1:])
        product = conv2d_weight(x, weight_shape, grad_output, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
        return product.view(num_tasks, *self.parameter.shape), scaled

    def _segment_mask(self, forward: _Forward, compute: bool = True) -> Mask:
        """True (identity), a 0/1 mask, or None where no product route applies to ``forward``.

        ``compute=False`` only says whether one applies (True or None), without forming the mask.
        """
        layer_input, layer_node = forward.layer_input, forward.layer_node
        if self._layer is None or forward.layer_calls != 1 or layer_input is None or layer_node is None:
            return None
        x, version = layer_input
        expected = x.shape[-1] if isinstance(self._layer, nn.Linear) else (x.shape[1] if x.dim() == 4 else None)
        if x._version != version or expected != self.parameter.shape[1]:
            return None
        node = forward.shared.grad_fn
        mask: Union[bool, Tensor] = True
        for _ in range(_MAX_SEGMENT_NODES):
            if node is layer_node:
                return mask.to(self.dtype) if isinstance(mask, Tensor) else mask
            rule = _MASK_NODES.get(type(node).__name__) if node is not None else None
            inputs = [edge for edge in node.next_functions if edge[0] is not None] if node is not None else []
            if rule is None or len(inputs) != 1:
                return None
            if compute:
                mask = rule(node) if mask is True else mask * rule(node)
            node = inputs[0][0]
        return None


def _present(pieces: Sequence[Optional[Tensor]]) -> list[Tensor]:
    """Every head's piece; a head that sent none is an error naming it."""
    missing = [i for i, g in enumerate(pieces) if g is None]
    if missing:
        raise _missing(missing)
    return [g for g in pieces if g is not None]


def _missing(heads: list[int]) -> TapsError:
    return TapsError(f"task heads {heads} sent no gradient to the shared representation this step; every task's loss must come from its head's output")


def _has_gram_route(module: Optional[nn.Module], parameter: Tensor) -> bool:
    """A stock Linear or Conv2d whose weight is W: the Gram identity applies (``hooks/gram_norms.py``)."""
    return module is not None and getattr(module, "weight", None) is parameter and gram_norms.unsupported(module) is None


def _describe_tensor(tensor: Tensor) -> str:
    node = type(tensor.grad_fn).__name__ if tensor.grad_fn is not None else "a leaf"
    return f"a {tuple(tensor.shape)} {str(tensor.dtype).replace('torch.', '')} tensor from {node}"


def _different_inputs(heads: Sequence[nn.Module], forward: _Forward, index: int, shared: Tensor) -> str:
    """The error for heads given that read different tensors: which head reads which, and what to do."""
    first = min(forward.served) if forward.served else 0
    readers = ", ".join(f"head {i} ({type(heads[i]).__name__})" for i in sorted(forward.served))
    return (
        f"heads= needs every head to read one tensor, the shared representation H, but {readers} read "
        f"{_describe_tensor(forward.shared)} and head {index} ({type(heads[index]).__name__}) reads {_describe_tensor(shared)}"
        f"{' (the same shape: a different tensor, e.g. another layer' + chr(39) + 's output)' if shared.shape == forward.shared.shape else ''}; "
        f'pass the modules that all read one tensor (head {first}\'s input), or leave heads= out (heads="auto") to let the '
        "session find such heads, or use the general path (heads=None), which accepts heads reading different tensors"
    )


def _has_product_route(module: Optional[nn.Module], parameter: Tensor) -> bool:
    """A layer whose per-task weight gradients the taps can form from its captured input."""
    if module is None or getattr(module, "weight", None) is not parameter:
        return False
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
