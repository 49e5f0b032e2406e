"""An independent implementation of the paper's equations (section 3) with create_graph double backward.

This is the common way GradNorm is implemented: G_i = ||grad_W (w_i L_i)|| built with create_graph=True,
L_grad = mean_i |G_i - stopgrad(mean_j G_j * r_i^alpha)|, L_grad differentiated with respect to w by
autograd, w stepped by ``torch.optim.Adam`` and renormalised to sum T. It shares no code with the
toolkit's closed-form implementation, which the tests compare against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn


@dataclass
class ReferenceStep:
    grad_norms: list[float]
    targets: list[float]
    grad_loss: float
    weights_before: list[float]


@dataclass
class ReferenceRun:
    steps: list[ReferenceStep] = field(default_factory=list)
    final_weights: list[float] = field(default_factory=list)


def reference_gradnorm(
    model: nn.Module,
    shared: Tensor,
    batches: Sequence[tuple],
    loss_fn: Callable[[nn.Module, tuple], list[Tensor]],
    alpha: float,
    lr: float = 0.025,
    network_lr: float = 0.01,
    min_weight: float = 1e-4,
    per_channel: bool = False,
) -> ReferenceRun:
    """``per_channel``: eq. 2 per output channel of W (the paper's convolutional case), L_grad the mean
    over tasks and channels; the recorded norms and targets are then root sums of squares over channels."""
    run = ReferenceRun()
    network_opt = torch.optim.SGD(model.parameters(), lr=network_lr)
    weights = None
    weight_opt = None
    initial = None
    for batch in batches:
        losses = loss_fn(model, batch)
        num_tasks = len(losses)
        if weights is None:
            weights = nn.Parameter(torch.ones(num_tasks, dtype=losses[0].dtype))
            weight_opt = torch.optim.Adam([weights], lr=lr)
            initial = torch.stack([l.detach() for l in losses])
        grads = [torch.autograd.grad(weights[i] * losses[i], shared, retain_graph=True, create_graph=True)[0] for i in range(num_tasks)]
        if per_channel:
            grad_norms = torch.stack([torch.stack([g[c].norm() for c in range(g.shape[0])]) for g in grads])  # (T, C)
        else:
            grad_norms = torch.stack([g.norm() for g in grads])
        ratio = torch.stack([l.detach() for l in losses]) / initial
        rate = ratio / ratio.mean()
        if per_channel:
            target = (grad_norms.mean(0, keepdim=True) * (rate**alpha)[:, None]).detach()
        else:
            target = (grad_norms.mean() * rate**alpha).detach()
        grad_loss = (grad_norms - target).abs().mean()
        (weight_grad,) = torch.autograd.grad(grad_loss, weights, retain_graph=True)
        shown_norms = grad_norms.detach().norm(dim=1) if per_channel else grad_norms.detach()
        shown_targets = target.norm(dim=1) if per_channel else target
        run.steps.append(ReferenceStep(shown_norms.tolist(), shown_targets.tolist(), float(grad_loss.detach()), weights.detach().tolist()))
        network_opt.zero_grad()
        total = sum(w * l for w, l in zip(weights.detach(), losses))
        total.backward()
        network_opt.step()
        weight_opt.zero_grad()
        weights.grad = weight_grad
        weight_opt.step()
        with torch.no_grad():
            weights.clamp_(min=min_weight)
            weights.mul_(num_tasks / weights.sum())
    run.final_weights = weights.detach().tolist()
    return run
