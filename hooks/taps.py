"""Per-task gradient norms at the shared layer W from the user's own backward pass, without extra passes.

The gradient of sum_i w_i L_i that reaches the task heads' common input H is a sum over tasks, but the
pieces that leave each head are still separate: head i sends w_i grad_H L_i. A forward pre-hook gives
each head its own view of H and a tensor hook on that view keeps its gradient; when autograd has summed
them into H's gradient, a hook on H maps the T kept pieces through the short segment H -> W in one
batched vector-Jacobian product (``is_grads_batched``), which yields G_i = ||grad_W (w_i L_i)|| for every
task: the quantity of the paper's eq. 2, measured directly (section 3.1). The heads and the loss functions
are never differentiated twice; only the segment between W and H is, T-batched. Everything stays on the
device and nothing synchronises with the host.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .grad_norms import norms_of


class HeadTaps:
    """Forward/backward hooks on the task heads that hand ``on_norms(G)`` the (T,) weighted norms at W."""

    def __init__(
        self,
        heads: Sequence[nn.Module],
        parameter: Tensor,
        on_norms: Callable[[Tensor], None],
        reduce: Optional[Callable[[Tensor], Tensor]] = None,
        per_channel: bool = False,
    ) -> None:
        if len(heads) < 2:
            raise ValueError(f"heads= needs one module per task (at least two), got {len(heads)}")
        self.heads = list(heads)
        self.parameter = parameter
        self.on_norms = on_norms
        self.reduce = reduce or (lambda grads: grads)
        self.per_channel = per_channel
        self._grads: list[Optional[Tensor]] = [None] * len(self.heads)
        self._input: Optional[Tensor] = None
        self._armed = False
        self._handles = [head.register_forward_pre_hook(self._make_pre_hook(i)) for i, head in enumerate(self.heads)]

    def arm(self) -> None:
        """Measure on the next backward (called once the step's losses are known)."""
        self._armed = True

    def _make_pre_hook(self, index: int):
        def pre_hook(module: nn.Module, args: tuple):
            if not args or not isinstance(args[0], Tensor) or not args[0].requires_grad or not torch.is_grad_enabled():
                return None
            shared = args[0]
            if index == 0 or self._input is None:
                self._start(shared)
            elif shared is not self._input:
                raise ValueError(
                    f"task head {index} received a different input tensor than head 0; heads= needs every head to read "
                    "the same shared representation (the output of the trunk that contains the shared layer)"
                )
            view = shared.view_as(shared)
            view.register_hook(self._make_keeper(index))
            return (view,) + tuple(args[1:])

        return pre_hook

    def _start(self, shared: Tensor) -> None:
        self._input = shared
        self._grads = [None] * len(self.heads)
        shared.register_hook(self._measure)

    def _make_keeper(self, index: int):
        def keep(grad: Tensor) -> None:
            self._grads[index] = grad

        return keep

    def _measure(self, total: Tensor) -> None:
        if not self._armed:
            return
        self._armed = False
        missing = [i for i, g in enumerate(self._grads) if g is None]
        if missing:
            raise RuntimeError(
                f"task heads {missing} sent no gradient to the shared representation this step; every task's loss "
                "must come from its head's output"
            )
        stacked = torch.stack(self._grads)
        (per_task,) = torch.autograd.grad(self._input, self.parameter, grad_outputs=stacked, is_grads_batched=True, retain_graph=True)
        self._grads = [None] * len(self.heads)
        self._input = None
        self.on_norms(norms_of(self.reduce(per_task), self.per_channel))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
