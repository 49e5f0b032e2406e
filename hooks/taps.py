"""Per-task gradient norms at the shared layer W from the user's own backward pass, without extra passes.

The gradient of sum_i w_i L_i that reaches the task heads' common input H is a sum over tasks, but the
pieces that leave each head are still separate: head i sends w_i grad_H L_i. A forward pre-hook on the
first head routes H through one fan-out node (``_FanOut``) that hands every head its own alias of H; in
the backward pass that node receives the T pieces together, in one call, adds them up for the rest of
the backward, and maps them through the short segment H -> W to get G_i = ||grad_W (w_i L_i)|| for every
task: the quantity of the paper's eq. 2, measured directly (section 3.1). The heads and the loss functions
are never differentiated twice.

The segment H -> W is crossed one of three ways, chosen per step and stated by ``path``:

- ``linear-product``: W is an ``nn.Linear`` weight and H is its output, or its output through ReLUs. Then
  grad_W L_i = (g_i * mask)^T X, with X the layer's input (captured by a forward hook) and the mask read
  from the ReLU's saved output: one matrix product for all tasks, no autograd call.
- ``conv-product``: the same for an ``nn.Conv2d`` weight (zero padding, one group): the T tasks' masked
  gradients, laid side by side as T * C output channels, go through one weight-gradient convolution
  with X, whose T * C filters are the T tasks' grad_W.
- ``batched-vjp``: anything else; one T-batched vector-Jacobian product (``is_grads_batched``) from H to W.

Everything stays on the device and nothing synchronises with the host.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.autograd.graph import Node
from torch.nn.grad import conv2d_weight
from torch.utils.hooks import RemovableHandle

from .grad_norms import norms_of

LINEAR_PRODUCT = "linear-product"
CONV_PRODUCT = "conv-product"
BATCHED_VJP = "batched-vjp"
# Elementwise nodes between W's output and H whose Jacobian is a 0/1 mask read from what they saved.
_MASK_NODES = {"ReluBackward0": lambda node: node._saved_result > 0}
_MAX_SEGMENT_NODES = 8
#: Above this many bytes for holding T - 1 extra copies of H's gradient, the taps stream (see HeadTaps).
STREAM_ABOVE_BYTES = 1 << 20


class _FanOut(torch.autograd.Function):
    """Identity from H to T aliases of H; its backward sees the T heads' gradients at once."""

    @staticmethod
    def forward(ctx, taps: HeadTaps, shared: Tensor) -> tuple[Tensor, ...]:
        ctx.taps = taps
        ctx.set_materialize_grads(False)
        return tuple(shared.view_as(shared) for _ in range(len(taps.heads)))

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]):
        return None, ctx.taps._backward(grads)


class HeadTaps:
    """Hooks on the task heads that hand ``on_norms(G)`` the (T,) weighted norms at W after each backward."""

    def __init__(
        self,
        heads: Sequence[nn.Module],
        parameter: Tensor,
        on_norms: Callable[[Tensor], None],
        reduce: Optional[Callable[[Tensor], Tensor]] = None,
        per_channel: bool = False,
        module: Optional[nn.Module] = None,
    ) -> None:
        if len(heads) < 2:
            raise ValueError(f"heads= needs one module per task (at least two), got {len(heads)}")
        self.heads = list(heads)
        self.parameter = parameter
        self.on_norms = on_norms
        self.reduce = reduce or (lambda grads: grads)
        self.per_channel = per_channel
        self._input: Optional[Tensor] = None
        self._aliases: tuple[Tensor, ...] = ()
        self._served: set[int] = set()  # heads that read H in this forward pass
        self._armed = False
        self._handles: list[RemovableHandle] = [head.register_forward_pre_hook(self._make_pre_hook(i)) for i, head in enumerate(self.heads)]
        # The streaming taps' hooks on the tensors of a forward pass whose graph may still be alive.
        self._tensor_handles: list[RemovableHandle] = []
        self._layer = module if _has_product_route(module, parameter) else None
        self._layer_input: Optional[tuple[Tensor, int]] = None  # (X, its version when captured)
        self._layer_node: Optional[Node] = None  # grad_fn of the layer's output, taken before any in-place op on it
        self._layer_calls = 0  # calls of the layer since the heads last read H
        self._layer_calls_this_forward = 0
        if self._layer is not None:
            self._handles.append(self._layer.register_forward_hook(self._capture_layer))
        self._warned_fallback = False
        self.path: Optional[str] = None  # the route of the last measured step
        self.mode: Optional[str] = None  # "fan-out" or "stream", of the last forward pass
        self._pieces: list[Optional[Tensor]] = []
        self._step_mask: Union[None, bool, Tensor] = None

    def arm(self) -> None:
        """Measure on the next backward (called once the step's losses are known)."""
        self._armed = True

    def remove(self) -> None:
        """Remove every hook the taps registered (again: a no-op) and let go of the forward pass they saw.

        A graph built before still backpropagates: the fan-out node then only adds the heads' gradients
        up, as the graph without taps would, and measures nothing.
        """
        self._armed = False
        for handle in self._handles + self._tensor_handles:
            handle.remove()
        self._handles, self._tensor_handles = [], []
        self._input, self._aliases, self._served = None, (), set()
        self._layer_input, self._layer_node, self._pieces, self._step_mask = None, None, [], None

    def describe_path(self) -> str:
        """The route the next measurement will take (for ``run.json``), decided from this step's graph."""
        if self._input is None:
            return BATCHED_VJP
        return self._route(self._segment_mask())

    def describe_path_of(self, shared: Tensor, layer_input: Optional[tuple[Tensor, int]], layer_node, layer_calls: int) -> str:
        """The route for a forward pass seen from outside (``heads="auto"``'s first step)."""
        return self._route(self._segment_mask(shared, layer_input, layer_node, layer_calls))

    def _route(self, mask) -> str:
        if mask is None:
            return BATCHED_VJP
        return LINEAR_PRODUCT if isinstance(self._layer, nn.Linear) else CONV_PRODUCT

    # -- forward ---------------------------------------------------------------------------------
    def _make_pre_hook(self, index: int):
        def pre_hook(module: nn.Module, args: tuple):
            if not args or not isinstance(args[0], Tensor) or not args[0].requires_grad or not torch.is_grad_enabled():
                return None
            shared = args[0]
            # A head called again, whatever the order of the heads' calls, means a new forward pass.
            if self._input is None or index in self._served:
                self._input = shared
                self._served = set()
                self._layer_calls_this_forward, self._layer_calls = self._layer_calls, 0
                if self._should_stream(shared):
                    self._aliases = self._stream(shared)
                else:
                    self.mode = "fan-out"
                    self._aliases = _FanOut.apply(self, shared)
            elif shared is not self._input:
                raise ValueError(
                    f"task head {index} received a different input tensor than the heads before it; heads= needs every head to read "
                    "the same shared representation (the output of the trunk that contains the shared layer)"
                )
            self._served.add(index)
            return (self._aliases[index],) + tuple(args[1:])

        return pre_hook

    def _capture_layer(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return
        self._layer_calls += 1
        self._layer_input = (args[0], args[0]._version) if args and isinstance(args[0], Tensor) else None
        self._layer_node = output.grad_fn

    def _should_stream(self, shared: Tensor) -> bool:
        """Stream when holding the T pieces at once would cost more than ``STREAM_ABOVE_BYTES``."""
        held = (len(self.heads) - 1) * shared.numel() * shared.element_size()
        return held > STREAM_ABOVE_BYTES and self._segment_mask() is not None

    def _stream(self, shared: Tensor) -> tuple[Tensor, ...]:
        """Aliases whose gradients are turned into their task's grad_W one by one, as they arrive."""
        self.mode = "stream"
        self._pieces = [None] * len(self.heads)
        self._step_mask = None
        aliases = tuple(shared.view_as(shared) for _ in self.heads)
        # Handles of graphs already freed are dropped (their hooks went with their tensors).
        handles = [handle for handle in self._tensor_handles if handle.hooks_dict_ref() is not None]
        handles += [alias.register_hook(self._make_piece_hook(index)) for index, alias in enumerate(aliases)]
        handles.append(shared.register_hook(self._finish_stream))
        self._tensor_handles = handles
        return aliases

    def _make_piece_hook(self, index: int):
        def piece(grad: Tensor) -> None:
            if not self._armed:
                return
            if self._step_mask is None:
                self._step_mask = self._segment_mask()
            mask = self._step_mask
            route = self._route(mask)
            axis = {LINEAR_PRODUCT: -2, CONV_PRODUCT: 1}.get(route, 0)
            masked = grad * mask if isinstance(mask, Tensor) else grad
            # A product route keeps only this task's grad_W (|W|), never the piece itself.
            self._pieces[index] = masked.unsqueeze(axis) if route == BATCHED_VJP else self._per_task_weight_grads(masked.unsqueeze(axis), route)

        return piece

    def _finish_stream(self, total: Tensor) -> None:
        if not self._armed:
            return
        self._armed = False
        pieces, self._pieces = self._present(self._pieces), [None] * len(self.heads)
        if self._step_mask is None:  # no product route after all: the general product over the segment
            per_task = self._per_task_weight_grads(torch.cat(pieces, 0), BATCHED_VJP)
        else:
            per_task = torch.cat(pieces, 0)
        self._input, self._aliases, self._layer_input = None, (), None
        self.on_norms(norms_of(self.reduce(per_task), self.per_channel))

    def _present(self, pieces: Sequence[Optional[Tensor]]) -> list[Tensor]:
        """Every head's piece; a head that sent none is an error naming it."""
        missing = [i for i, g in enumerate(pieces) if g is None]
        if missing:
            raise RuntimeError(
                f"task heads {missing} sent no gradient to the shared representation this step; every task's loss must come from its head's output"
            )
        return [g for g in pieces if g is not None]

    # -- backward --------------------------------------------------------------------------------
    def _backward(self, grads: tuple[Optional[Tensor], ...]) -> Optional[Tensor]:
        present = [g for g in grads if g is not None]
        if not self._armed:
            return torch.stack(present).sum(0) if present else None
        self._armed = False
        pieces = self._present(grads)
        mask = self._segment_mask()
        route = self._route(mask)
        # The task axis goes just before the channel axis (last for a Linear, 1 for a convolution), so
        # that the product routes read the T pieces as T * C channels without a copy.
        axis = {LINEAR_PRODUCT: -2, CONV_PRODUCT: 1, BATCHED_VJP: 0}[route]
        stacked = torch.stack(pieces, dim=axis)
        total = stacked.sum(axis)
        if isinstance(mask, Tensor):
            stacked.mul_(mask.unsqueeze(axis))  # stacked is ours and not needed unmasked any more
        per_task = self._per_task_weight_grads(stacked, route)
        self._input, self._aliases, self._layer_input = None, (), None
        self.on_norms(norms_of(self.reduce(per_task), self.per_channel))
        return total

    def _per_task_weight_grads(self, stacked: Tensor, route: str) -> Tensor:
        """(T, *W.shape): grad_W of each head's (masked) piece, by the route chosen for this step."""
        self.path = route
        if route == BATCHED_VJP:
            if self._layer is not None and not self._warned_fallback:
                self._warned_fallback = True
                warnings.warn(
                    f"gradnorm heads=: the segment between the shared {type(self._layer).__name__} and the heads is not "
                    "ReLU/identity (or the layer ran more than once); using one batched vector-Jacobian product per step",
                    RuntimeWarning,
                )
            if self._input is None:
                raise RuntimeError("heads=: a backward reached the taps without the forward pass that feeds them")
            (per_task,) = torch.autograd.grad(self._input, self.parameter, grad_outputs=stacked, is_grads_batched=True, retain_graph=True)
            return per_task
        if self._layer_input is None:  # a product route is chosen only with the layer's input captured
            raise RuntimeError(f"heads=: {route} without the shared layer's captured input")
        # In the gradient's dtype, as autograd computes it (bf16 under autocast), then in W's dtype, as
        # autograd hands it to W.
        x = self._layer_input[0].to(stacked.dtype)
        if route == LINEAR_PRODUCT:
            num_tasks, features = stacked.shape[-2], stacked.shape[-1]
            rows = stacked.reshape(-1, num_tasks * features)  # row t * F + o of the product: grad_W[o] of task t
            product = torch.mm(rows.t(), x.reshape(-1, x.shape[-1]))
            return product.view(num_tasks, features, -1).to(self.parameter.dtype)
        conv = self._layer
        if not isinstance(conv, nn.Conv2d):  # the other product route: _has_product_route admits Linear and Conv2d only
            raise RuntimeError(f"heads=: {route} needs an nn.Conv2d shared layer, got {type(conv).__name__}")
        num_tasks, channels = stacked.shape[1], stacked.shape[2]
        grad_output = stacked.reshape(stacked.shape[0], num_tasks * channels, *stacked.shape[3:])
        weight_shape = (num_tasks * channels, *self.parameter.shape[1:])
        product = conv2d_weight(x, weight_shape, grad_output, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
        return product.view(num_tasks, *self.parameter.shape).to(self.parameter.dtype)

    def _segment_mask(self, shared=None, layer_input=None, layer_node=None, layer_calls=None) -> Union[None, bool, Tensor]:
        """True (identity), a 0/1 mask, or None where no product route applies this step.

        By default for the forward pass the hooks saw; the arguments describe another one.
        """
        if shared is None:
            shared, layer_input, layer_node, layer_calls = self._input, self._layer_input, self._layer_node, self._layer_calls_this_forward
        if self._layer is None or layer_calls != 1 or layer_input is None or layer_node is None:
            return None
        x, version = layer_input
        expected = x.shape[-1] if isinstance(self._layer, nn.Linear) else (x.shape[1] if x.dim() == 4 else None)
        if x._version != version or expected != self.parameter.shape[1]:
            return None
        node, mask = shared.grad_fn, True
        for _ in range(_MAX_SEGMENT_NODES):
            if node is layer_node:
                return mask
            rule = _MASK_NODES.get(type(node).__name__) if node is not None else None
            inputs = [edge for edge in node.next_functions if edge[0] is not None] if node is not None else []
            if rule is None or len(inputs) != 1:
                return None
            mask = rule(node) if mask is True else mask & rule(node)
            node = inputs[0][0]
        return None


def _has_product_route(module: Optional[nn.Module], parameter: Tensor) -> bool:
    """A layer whose per-task weight gradients the taps can form from its captured input."""
    if module is None or getattr(module, "weight", None) is not parameter:
        return False
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
