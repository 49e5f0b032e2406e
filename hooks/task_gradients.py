"""Per-task gradients for the methods that weigh or change this step's gradients (MGDA, PCGrad, direct
gradient normalisation): at the shared layer W, or at its output Z, the shared representation.

:func:`step_weights` is the one entry the session calls before it forms the total loss; it hands the
balancer this step's losses, gradient norms at W and, where the balancer asks, the (T, ...) per-task
gradients. For gradient surgery at Z (``weights_act_on_representation``), :func:`reweight_representation`
adds sum_j (beta_j - 1) grad_Z L_j to the gradient that reaches Z in the user's backward, so the network
below Z trains on sum_j beta_j grad_Z L_j while the heads keep their own gradients.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradnorm.toolkit.balancers import Balancer

from .grad_norms import GradNormMeter


def per_task_gradients(stacked: Tensor, target: Tensor) -> Tensor:
    """grad_target L_i for every task, stacked to (T, *target.shape); one batched backward where possible."""
    eye = torch.eye(stacked.numel(), device=stacked.device, dtype=stacked.dtype)
    try:
        (grads,) = torch.autograd.grad(stacked, target, grad_outputs=eye, is_grads_batched=True, retain_graph=True)
        return grads
    except RuntimeError:
        rows = [torch.autograd.grad(stacked[i], target, retain_graph=True)[0] for i in range(stacked.numel())]
        return torch.stack(rows)


class RepresentationCapture:
    """Keeps the latest output Z of the shared layer's module (a forward hook), for MGDA-UB and PCGrad."""

    def __init__(self, module: Optional[nn.Module], description: str) -> None:
        if module is None:
            raise ValueError(
                f"the shared layer {description} was given as a parameter; gradients at the shared representation "
                "need the module (e.g. model.trunk[-1]) whose output is that representation"
            )
        self.description = description
        self.output: Optional[Tensor] = None
        self._handle = module.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        self.output = output

    def current(self) -> Tensor:
        if self.output is None or not isinstance(self.output, Tensor) or not self.output.requires_grad:
            raise RuntimeError(
                f"no differentiable output of the shared layer {self.description} from this step's forward pass; "
                "the losses must come from a forward pass with gradients enabled"
            )
        return self.output

    def remove(self) -> None:
        """Remove the forward hook (idempotent) and let go of the last output and its graph."""
        self._handle.remove()
        self.output = None


def step_weights(
    balancer: Balancer,
    values: Sequence[Tensor],
    stacked: Tensor,
    meter: Optional[GradNormMeter],
    parameter: Tensor,
    capture: Optional[RepresentationCapture],
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """This step's weights from a ``uses_current_step`` balancer; returns (weights, norms at W, grads)."""
    norms = None
    grads = None
    if balancer.task_gradients == "shared_layer":
        grads = per_task_gradients(stacked, parameter)
        norms = grads.flatten(1).norm(dim=1)  # the meter's quantity, without a second backward
    elif meter is not None:
        norms = meter(values)
    if balancer.task_gradients == "representation":
        if capture is None:
            raise RuntimeError("the balancer needs gradients at the shared representation but none is captured")
        grads = per_task_gradients(stacked, capture.current())
    return balancer.step_weights(stacked.detach(), norms, grads), norms, grads


def reweight_representation(capture: RepresentationCapture, grads: Tensor, weights: Tensor) -> RemovableHandle:
    """Make the gradient reaching Z equal sum_j w_j grad_Z L_j (plus any non-task term the user adds).

    Returns the hook's handle, so that a session closed before the step's backward can take it off Z.
    """
    extra = ((weights.to(grads.dtype) - 1.0).view(-1, *([1] * (grads.dim() - 1))) * grads).sum(dim=0)

    def once(grad: Tensor) -> Tensor:
        # Only the first backward through Z after the step's loss() is the user's training backward.
        handle.remove()
        return grad + extra.to(grad.dtype)

    handle = capture.current().register_hook(once)
    return handle
