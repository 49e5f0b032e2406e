"""Per-task gradient norms n_i = ||grad_W L_i||_2 at the shared layer, without touching ``.grad``.

All T vector-Jacobian products run in one batched autograd call (``is_grads_batched``: a vmap over the
backward from the losses to W only, so the trunk below W is never visited). Where an operator has no
batching rule the call falls back, once and for good, to a loop of T calls.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor


class GradNormMeter:
    """Measures the unweighted per-task gradient norms at one parameter."""

    def __init__(self, parameter: Tensor, batched: bool = True, reduce: Optional[Callable[[Tensor], Tensor]] = None, per_channel: bool = False) -> None:
        self.parameter = parameter
        self.batched = batched
        self.per_channel = per_channel
        if per_channel and parameter.dim() < 2:
            raise ValueError(f"per-channel gradient norms need a weight with an output-channel dimension, got shape {tuple(parameter.shape)}")
        # Applied to the (T, *W.shape) per-task gradients before the norms: the mean over DDP ranks.
        self.reduce = reduce or (lambda grads: grads)

    def __call__(self, losses: Sequence[Tensor]) -> Tensor:
        stacked = torch.stack([loss.reshape(()) for loss in losses])
        if self.batched:
            try:
                eye = torch.eye(len(losses), device=stacked.device, dtype=stacked.dtype)
                (grads,) = torch.autograd.grad(stacked, self.parameter, grad_outputs=eye, is_grads_batched=True, retain_graph=True)
                return norms_of(self.reduce(grads), self.per_channel)
            except RuntimeError as exc:
                self.batched = False
                warnings.warn(f"gradnorm: batched gradient norms unavailable for this model ({exc}); using one backward per task", RuntimeWarning)
        rows = [torch.autograd.grad(loss, self.parameter, retain_graph=True)[0] for loss in losses]
        return norms_of(self.reduce(torch.stack(rows)), self.per_channel)


def norms_of(per_task: Tensor, per_channel: bool = False) -> Tensor:
    """(T,) norms of (T, *W.shape) per-task gradients, or (T, C) norms per output channel of W."""
    return per_task.flatten(2).norm(dim=2) if per_channel else per_task.flatten(1).norm(dim=1)
