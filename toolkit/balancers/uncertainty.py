"""Uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018; survey section 1.4).

The objective is sum_i exp(-s_i) L_i + s_i with s_i = log sigma_i^2, a trainable per-task log variance
(``regulariser="log"``); the survey's variant 1/(2 sigma_i^2) L_i + log(1 + sigma_i^2) keeps the penalty
non-negative (``regulariser="log1p"``, trained in sigma_i as in the survey's code).

The s_i appear only in this objective, so their gradient has a closed form,

    log:    d/ds_i     = 1 - exp(-s_i) L_i                      (optimum: s_i = log L_i)
    log1p:  d/dsigma_i = -L_i / sigma_i^3 + 2 sigma_i / (1 + sigma_i^2)
            (optimum: sigma_i^2 = (L_i/2 + sqrt(L_i^2/4 + 2 L_i)) / 2),

and the network sees the detached weights w_i = exp(-s_i) (resp. 1/(2 sigma_i^2)): the penalty term does
not depend on the network, so the network's gradient is the same as with the full objective. The state
(s or sigma) is trained by its own Adam optimiser (paper 5.5 uses learning rate 0.025 for the weights).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from .base import Balancer, StepStats
from .checks import require_choice, require_non_negative_losses
from .state import expect_mapping, expect_tensor, restored, saved
from .weight_optim import WeightOptimizer

REGULARISERS = ("log", "log1p")


def uncertainty_weights(state: Tensor, regulariser: str) -> Tensor:
    """The loss weights the state implies: exp(-s) or 1 / (2 sigma^2)."""
    return torch.exp(-state) if regulariser == "log" else 0.5 / state.pow(2)


def uncertainty_objective(state: Tensor, losses: Tensor, regulariser: str) -> Tensor:
    """sum_i w_i L_i + penalty_i, the quantity the state minimises."""
    penalty = state if regulariser == "log" else torch.log1p(state.pow(2))
    return (uncertainty_weights(state, regulariser) * losses + penalty).sum()


def uncertainty_state_grad(state: Tensor, losses: Tensor, regulariser: str) -> Tensor:
    """Closed-form gradient of :func:`uncertainty_objective` with respect to the state."""
    if regulariser == "log":
        return 1.0 - torch.exp(-state) * losses
    return -losses / state.pow(3) + 2.0 * state / (1.0 + state.pow(2))


def optimal_state(losses: Tensor, regulariser: str) -> Tensor:
    """The minimiser of the objective for fixed losses (s = log L, or sigma of the log1p variant)."""
    if regulariser == "log":
        return losses.log()
    variance = (losses / 2 + torch.sqrt(losses.pow(2) / 4 + 2 * losses)) / 2
    return variance.sqrt()


class UncertaintyWeighting(Balancer):
    """Kendall et al.'s homoscedastic-uncertainty weights, with trainable per-task state.

    Args:
        regulariser: ``"log"`` (Kendall et al.: exp(-s) L + s) or ``"log1p"`` (survey 1.4's variant).
        lr: learning rate of the state's own optimiser (default 0.025, paper 5.5).
        optimizer: ``"adam"`` or ``"sgd"``.
        initial_state: s_i(0) (``"log"``, default 0, i.e. w = 1) or sigma_i(0) (``"log1p"``, default 1 as in
            the survey's code).

    ``run.json`` records ``trainable_state`` (what the state is and its optimiser); losses must be non-
    negative (log L is the optimum of s), a negative loss is an error naming the task. ``state_dict()``
    adds the trainable state (s or sigma) and its optimiser's step count and moments.
    """

    name = "uncertainty"
    repr_omits = ("name", "trainable_state")

    def __init__(self, regulariser: str = "log", lr: float = 0.025, optimizer: str = "adam", initial_state: Optional[float] = None) -> None:
        super().__init__()
        require_choice("regulariser", regulariser, REGULARISERS, self.name)
        self.regulariser = regulariser
        self.initial_state = float(initial_state) if initial_state is not None else (0.0 if regulariser == "log" else 1.0)
        if regulariser == "log1p" and not self.initial_state > 0:
            raise ValueError(f"{self.name}: initial sigma must be positive for regulariser='log1p', got {self.initial_state}")
        self.optimizer = WeightOptimizer(kind=optimizer, lr=lr)
        self.state: Optional[Tensor] = None

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.update(regulariser=self.regulariser, initial_state=self.initial_state, **self.optimizer.config())
        cfg["trainable_state"] = {
            "name": "log_variance" if self.regulariser == "log" else "sigma",
            "per_task": True,
            "trained_by": "the balancer's own optimiser on the closed-form gradient of the uncertainty objective",
        }
        return cfg

    def initial_weights(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        self.state = torch.full((len(self.tasks),), self.initial_state, device=device, dtype=dtype)
        return uncertainty_weights(self.state, self.regulariser)

    def _update(self, losses: Tensor, loss_ratio: Tensor, inverse_rate: Tensor, weights: Tensor, grad_norms: Optional[Tensor]) -> StepStats:
        require_non_negative_losses(self.tasks, losses, self.name)
        assert self.state is not None
        grad = uncertainty_state_grad(self.state, losses, self.regulariser)
        finite = torch.isfinite(grad).all()
        self.state = torch.where(finite, self.optimizer.step(self.state, grad, finite), self.state)
        if self.regulariser == "log1p":
            self.state = self.state.clamp_min(1e-6)  # sigma must stay positive for 1/(2 sigma^2)
        self._weights = uncertainty_weights(self.state, self.regulariser)
        return StepStats(
            loss=losses,
            loss_ratio=loss_ratio,
            inverse_rate=inverse_rate,
            weight=weights,
            step_update_skipped=~finite,
        )

    def _method_state(self) -> dict[str, Any]:
        return {"trainable_state": saved(self.state), "optimizer": self.optimizer.state_dict()}

    def _check_method_state(self, state: Any, num_tasks: int) -> None:
        state = expect_mapping(state, "'method'", ("trainable_state", "optimizer"))
        expect_tensor(state["trainable_state"], "'method.trainable_state'", (num_tasks,))
        self.optimizer.check_state(state["optimizer"], num_tasks, "'method.optimizer'")

    def _load_method_state(self, state: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> None:
        self.state = restored(state["trainable_state"], device, dtype)
        self.optimizer.load_state_dict(state["optimizer"], device, dtype)
