"""FAMO: fast adaptive multitask optimisation (Liu, Liu, Stone and Liu, NeurIPS 2023), loss-only and O(1) a step.

FAMO keeps task logits xi (T,), z = softmax(xi), and trains the network on sum_i z_i log L_i / c with
c = sum_j z_j / L_j (section 3.3; the official code's ``get_weighted_loss``, min losses 0). The gradient
of that loss is sum_i w_i grad L_i with

    w_i = z_i / (c L_i),    so sum_i w_i = 1,

and these effective weights are what this balancer applies to the losses and records. The logits follow
the rule of Algorithm 1 (section 3.4): with delta_i = log L_i(t-1) - log L_i(t), the observed decrease of
each task's log loss,

    xi <- xi - beta (J_z(xi)^T delta + gamma xi),     J_z = diag(z) - z z^T,

a plain gradient step (``optimizer="sgd"``) or, as in the official code, Adam with L2 decay gamma on the
same gradient (``optimizer="adam"``, the default; beta = 0.025, gamma = 0.001, the code's defaults).

One difference from the official training scripts, stated in ``run.json``: they evaluate the losses again
on the same batch after the network's step to get L_i(t+1); a balancer sees each step's losses once, so
delta here compares consecutive steps' batches (no extra forward pass, which keeps FAMO's cost a step O(1)
in the number of tasks; the decrease is noisier by the batch-to-batch spread).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from .base import Balancer, StepStats
from .checks import LOSS_FLOOR, require_non_negative_losses
from .state import expect_mapping, expect_tensor, restored, saved
from .weight_optim import WeightOptimizer


def famo_weights(logits: Tensor, losses: Tensor) -> Tensor:
    """The effective loss weights w_i = z_i / (c L_i), c = sum_j z_j / L_j, z = softmax(logits)."""
    z = torch.softmax(logits, dim=0)
    inverse = z / losses.clamp_min(LOSS_FLOOR)
    return inverse / inverse.sum()


def famo_logit_grad(logits: Tensor, previous: Tensor, current: Tensor, gamma: float) -> Tensor:
    """J_z(xi)^T delta + gamma xi with delta = log L(t-1) - log L(t) (FAMO Algorithm 1)."""
    z = torch.softmax(logits, dim=0)
    delta = previous.clamp_min(LOSS_FLOOR).log() - current.clamp_min(LOSS_FLOOR).log()
    return z * (delta - (z * delta).sum()) + gamma * logits


class FAMO(Balancer):
    """FAMO's logits trained on the observed decrease of the log losses; effective weights recorded.

    Args:
        lr: beta, the logits' learning rate (default 0.025, the official code's ``w_lr``).
        gamma: the logits' L2 decay (default 0.001, the official code's ``gamma``).
        optimizer: ``"adam"`` (the official code) or ``"sgd"`` (Algorithm 1 as written).

    Losses must be non-negative (FAMO takes their logarithm); a negative one is an error naming the task.
    ``state_dict()`` adds the logits, the previous step's losses and the optimiser's moments.
    """

    name = "famo"
    uses_current_step = True
    repr_omits = ("name", "recorded_weight", "loss_decrease")

    def __init__(self, lr: float = 0.025, gamma: float = 0.001, optimizer: str = "adam") -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"{self.name}: lr must be positive, got {lr}")
        if not gamma >= 0:
            raise ValueError(f"{self.name}: gamma must be non-negative, got {gamma}")
        self.gamma = float(gamma)
        self.optimizer = WeightOptimizer(kind=optimizer, lr=lr)
        self.logits: Optional[Tensor] = None
        self.previous: Optional[Tensor] = None

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.update(gamma=self.gamma, **self.optimizer.config())
        cfg["recorded_weight"] = "effective: w_i = z_i / (c L_i), c = sum_j z_j / L_j, the gradient coefficients of sum_i z_i log L_i / c"
        cfg["loss_decrease"] = "log L_i(t-1) - log L_i(t), consecutive steps' batches (no second forward pass)"
        return cfg

    def initial_weights(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        self.logits = torch.zeros(len(self.tasks), device=device, dtype=dtype)
        self.previous = None
        return torch.full((len(self.tasks),), 1.0 / len(self.tasks), device=device, dtype=dtype)

    def step_weights(self, losses: Tensor, grad_norms: Optional[Tensor], task_grads: Optional[Tensor]) -> Tensor:
        require_non_negative_losses(self.tasks, losses, self.name)
        assert self.logits is not None
        if self.previous is not None:
            grad = famo_logit_grad(self.logits, self.previous, losses, self.gamma)
            finite = torch.isfinite(grad).all()
            self.logits = torch.where(finite, self.optimizer.step(self.logits, grad, finite), self.logits)
        self.previous = losses.detach().clone()
        self._weights = famo_weights(self.logits, losses)
        return self._weights

    def _update(self, losses: Tensor, loss_ratio: Tensor, inverse_rate: Tensor, weights: Tensor, grad_norms: Optional[Tensor]) -> StepStats:
        return StepStats(loss=losses, loss_ratio=loss_ratio, inverse_rate=inverse_rate, weight=weights)

    def _method_state(self) -> dict[str, Any]:
        return {"logits": saved(self.logits), "previous": saved(self.previous), "optimizer": self.optimizer.state_dict()}

    def _check_method_state(self, state: Any, num_tasks: int) -> None:
        state = expect_mapping(state, "'method'", ("logits", "previous", "optimizer"))
        expect_tensor(state["logits"], "'method.logits'", (num_tasks,))
        expect_tensor(state["previous"], "'method.previous'", (num_tasks,), optional=True)
        self.optimizer.check_state(state["optimizer"], num_tasks, "'method.optimizer'")

    def _load_method_state(self, state: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> None:
        self.logits = restored(state["logits"], device, dtype)
        self.previous = restored(state["previous"], device, dtype)
        self.optimizer.load_state_dict(state["optimizer"], device, dtype)
