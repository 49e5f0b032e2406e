"""DB-MTL: dual-balancing multitask learning (Lin, Ye, Xu, Shi and Kwok, 2023, arXiv 2308.12029, section 3).

Two balances. Loss scale: train on log L_i (section 3.1), whose gradient is g_i / L_i. Gradient magnitude
(section 3.2): rescale every task's (log-loss) gradient to the largest one's norm, using an exponential
moving average of the gradients, u_i(t) = m_i(t) + (beta / t^sigma) (u_i(t-1) - m_i(t)) (LibMTL's
schedule, beta = 0.9, sigma = 0.5), so the update is sum_i (max_j u_j / u_i) g_i / L_i.

What this balancer computes: the moving average is taken over the norms m_i = ||grad_W L_i|| / L_i at the
shared layer W, not over the gradient vectors, and the rescaling acts on this step's gradients. The
effective weight on L_i is then

    w_i = max_j u_j / (u_i L_i),

recorded in the ``weight`` column. With ``beta=0`` this is DB-MTL exactly (every ||w_i g_i|| equals
max_j ||g_j|| / L_j); with beta > 0 the paper's update also mixes in earlier steps' gradient vectors, which a
weighting of this step's losses cannot express.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from .base import Balancer, StepStats, TaskGradients
from .checks import LOSS_FLOOR, require_non_negative_losses
from .state import expect_mapping, expect_tensor, restored, saved


def db_mtl_weights(norms: Tensor, losses: Tensor) -> Tensor:
    """w_i = max_j u_j / (u_i L_i) for the (averaged) log-loss gradient norms u (T,) and the losses (T,)."""
    norms = norms.clamp_min(1e-30)
    return norms.max() / (norms * losses.clamp_min(LOSS_FLOOR))


class DBMTL(Balancer):
    """DB-MTL's log losses with every log-loss gradient rescaled to the largest norm (at the shared layer).

    Args:
        beta: moving-average factor of the norms (default 0.9; 0: this step's norms only, DB-MTL exactly).
        sigma: decay exponent of the factor, beta / t^sigma (default 0.5).

    ``state_dict()`` adds the averaged norms.
    """

    name = "db-mtl"
    uses_current_step = True
    task_gradients: TaskGradients = "shared_layer"
    repr_omits = ("name", "recorded_weight")

    def __init__(self, beta: float = 0.9, sigma: float = 0.5) -> None:
        super().__init__()
        if not 0 <= beta < 1:
            raise ValueError(f"{self.name}: beta must be in [0, 1), got {beta}")
        if not sigma >= 0:
            raise ValueError(f"{self.name}: sigma must be non-negative, got {sigma}")
        self.beta = float(beta)
        self.sigma = float(sigma)
        self.average: Optional[Tensor] = None

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.update(beta=self.beta, sigma=self.sigma, space="shared_layer")
        cfg["recorded_weight"] = "effective: w_i = max_j u_j / (u_i L_i), u the averaged norms ||grad_W log L_i||"
        return cfg

    def step_weights(self, losses: Tensor, grad_norms: Optional[Tensor], task_grads: Optional[Tensor]) -> Tensor:
        require_non_negative_losses(self.tasks, losses, self.name)
        if task_grads is None:
            raise RuntimeError(f"{self.name} needs this step's per-task gradients at the shared layer")
        current = task_grads.detach().flatten(1).norm(dim=1).to(losses.dtype) / losses.clamp_min(LOSS_FLOOR)
        step = self.step_count + 1
        if self.average is None:
            self.average = current
        else:
            self.average = current + (self.beta / step**self.sigma) * (self.average - current)
        self._weights = db_mtl_weights(self.average, losses)
        return self._weights

    def _update(self, losses: Tensor, loss_ratio: Tensor, inverse_rate: Tensor, weights: Tensor, grad_norms: Optional[Tensor]) -> StepStats:
        return StepStats(loss=losses, loss_ratio=loss_ratio, inverse_rate=inverse_rate, weight=weights)

    def _method_state(self) -> dict[str, Any]:
        return {"average": saved(self.average)}

    def _check_method_state(self, state: Any, num_tasks: int) -> None:
        state = expect_mapping(state, "'method'", ("average",))
        expect_tensor(state["average"], "'method.average'", (num_tasks,), optional=True)

    def _load_method_state(self, state: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> None:
        self.average = restored(state["average"], device, dtype)
