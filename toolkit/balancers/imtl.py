"""IMTL-L: the loss-balance half of impartial multitask learning (Liu et al., ICLR 2021, section 3.1).

Each task's loss is scaled as e^{s_i} L_i - s_i with a trainable s_i; the network sees the detached
weights w_i = e^{s_i}. The term -s_i does not depend on the network, so the network's gradient is that of
sum_i w_i L_i. The s_i take gradient steps on the same objective, whose gradient has a closed form,

    d/ds_i (e^{s_i} L_i - s_i) = e^{s_i} L_i - 1,

so the fixed point is e^{s_i} L_i = 1: every scaled loss is brought to 1 (the paper's "scale-invariant"
loss balance). The gradient half, IMTL-G, comes from TorchJD (``TorchJDWeighting("imtl-g")``).

With s negated this is uncertainty weighting's objective e^(-s) L + s (Kendall et al. 2018, the ``"log"``
form of :class:`UncertaintyWeighting`); Adam's step is sign-equivariant, so with the same optimiser settings
the two balancers give the same weights at every step (a test checks this).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from .base import Balancer, StepStats
from .checks import require_non_negative_losses
from .state import expect_mapping, expect_tensor, restored, saved
from .weight_optim import WeightOptimizer


def imtl_l_state_grad(scale: Tensor, losses: Tensor) -> Tensor:
    """The closed-form gradient e^{s_i} L_i - 1 of the IMTL-L objective with respect to s."""
    return torch.exp(scale) * losses - 1.0


class IMTLL(Balancer):
    """IMTL-L's learned loss scales e^{s_i} (Liu et al. 2021, section 3.1).

    Args:
        lr: learning rate of the scales' own optimiser (default 0.025, as the toolkit's other learned
            weights; the paper trains s with the network's optimiser).
        optimizer: ``"adam"`` or ``"sgd"``.

    Losses must be non-negative. ``state_dict()`` adds s and its optimiser's moments.
    """

    name = "imtl-l"
    repr_omits = ("name", "trainable_state")

    def __init__(self, lr: float = 0.025, optimizer: str = "adam") -> None:
        super().__init__()
        self.optimizer = WeightOptimizer(kind=optimizer, lr=lr)
        self.scale: Optional[Tensor] = None

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.update(**self.optimizer.config())
        cfg["trainable_state"] = {"name": "log_scale", "per_task": True, "trained_by": "the balancer's own optimiser on e^s L - s (closed form)"}
        return cfg

    def initial_weights(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        self.scale = torch.zeros(len(self.tasks), device=device, dtype=dtype)
        return torch.exp(self.scale)

    def _update(self, losses: Tensor, loss_ratio: Tensor, inverse_rate: Tensor, weights: Tensor, grad_norms: Optional[Tensor]) -> StepStats:
        require_non_negative_losses(self.tasks, losses, self.name)
        assert self.scale is not None
        grad = imtl_l_state_grad(self.scale, losses)
        finite = torch.isfinite(grad).all()
        self.scale = torch.where(finite, self.optimizer.step(self.scale, grad, finite), self.scale)
        self._weights = torch.exp(self.scale)
        return StepStats(loss=losses, loss_ratio=loss_ratio, inverse_rate=inverse_rate, weight=weights, step_update_skipped=~finite)

    def _method_state(self) -> dict[str, Any]:
        return {"log_scale": saved(self.scale), "optimizer": self.optimizer.state_dict()}

    def _check_method_state(self, state: Any, num_tasks: int) -> None:
        state = expect_mapping(state, "'method'", ("log_scale", "optimizer"))
        expect_tensor(state["log_scale"], "'method.log_scale'", (num_tasks,))
        self.optimizer.check_state(state["optimizer"], num_tasks, "'method.optimizer'")

    def _load_method_state(self, state: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> None:
        self.scale = restored(state["log_scale"], device, dtype)
        self.optimizer.load_state_dict(state["optimizer"], device, dtype)
