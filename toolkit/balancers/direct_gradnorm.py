"""Direct gradient normalisation: each loss divided by its own detached gradient norm (survey 2.1, side note).

    L(t) = sum_i L_i(t) r_i(t)^alpha / stopgrad(||grad_W L_i(t)||),

with r_i the inverse training rate of GradNorm (paper eq. 1) and W the shared layer, so every task's
gradient at W has norm r_i^alpha (1 for alpha = 0, the survey's first form). GradNorm reaches this
balance by gradient descent on the weights; this method imposes it at every step.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from .base import Balancer, StepStats
from .checks import LOSS_FLOOR, require_non_negative_losses


class DirectGradNorm(Balancer):
    """w_i(t) = r_i(t)^alpha / ||grad_W L_i(t)|| from this step's own gradient norms.

    ``eps`` guards a task whose gradient at W vanishes (w_i = r_i^alpha / (n_i + eps)). alpha > 0 uses
    loss ratios, so it needs non-negative losses; a negative one is an error naming the task.
    """

    name = "direct-gradnorm"
    needs_grad_norms = True
    uses_current_step = True

    def __init__(self, alpha: float = 0.0, eps: float = 1e-12) -> None:
        super().__init__()
        if not (alpha >= 0):
            raise ValueError(f"{self.name}: alpha must be a non-negative number, got {alpha!r}")
        if not (eps > 0):
            raise ValueError(f"{self.name}: eps must be positive, got {eps!r}")
        self.alpha = float(alpha)
        self.eps = float(eps)

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.update(alpha=self.alpha, eps=self.eps)
        return cfg

    def step_weights(self, losses: Tensor, grad_norms: Optional[Tensor], task_grads: Optional[Tensor]) -> Tensor:
        if grad_norms is None:
            raise RuntimeError(f"{self.name} needs the per-task gradient norms at the shared layer")
        scale = grad_norms.detach() + self.eps
        if self.alpha:
            require_non_negative_losses(self.tasks, losses, self.name)
            # The base class observes L(0) again in update(); for 'first' the second call changes nothing.
            reference = self.initial_loss.value if self.initial_loss.value is not None else self.initial_loss.observe(self.tasks, losses)
            ratio = losses / reference
            self._weights = (ratio / ratio.mean().clamp_min(LOSS_FLOOR)).pow(self.alpha) / scale
        else:
            self._weights = 1.0 / scale
        return self._weights

    def _update(self, losses: Tensor, loss_ratio: Tensor, inverse_rate: Tensor, weights: Tensor, grad_norms: Optional[Tensor]) -> StepStats:
        return StepStats(loss=losses, loss_ratio=loss_ratio, inverse_rate=inverse_rate, weight=weights)
