"""PCGrad: gradient surgery for multitask learning (Yu et al., NeurIPS 2020; survey section 2.2, Algorithm 1).

For each task i, in a random order over the other tasks j: if g_i^PC . g_j < 0, set
g_i^PC <- g_i^PC - (g_i^PC . g_j / ||g_j||^2) g_j; the update is sum_i g_i^PC.

Every projection subtracts a multiple of some g_j, so g_i^PC = sum_j C_ij g_j and the combined update is
sum_j beta_j g_j with beta_j = sum_i C_ij. We compute C from the Gram matrix g_i . g_j alone and apply
the surgery at the shared representation Z (the shared layer's output): the hook layer adds
sum_j (beta_j - 1) grad_Z L_j to the gradient arriving at Z, so the trunk below receives exactly
sum_i g_i^PC (projections on the per-task gradients at Z) and the task heads their own, unprojected
gradients.

Recording: beta_j is the effective weight, written in the ``weight`` column: the coefficient of task j's
gradient in the combined gradient at Z and, since W's gradient is linear in Z's, also at W (so
``grad_norm`` = beta_j ||grad_W L_j||).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from .base import Balancer, StepStats, TaskGradients
from .checks import require_choice
from .state import expect_count, expect_mapping

SPACES = ("representation",)
REDUCTIONS = ("sum", "mean")


def pcgrad_coefficients(gram: Tensor, orders: list[list[int]]) -> tuple[Tensor, int]:
    """C with g_i^PC = sum_j C_ij g_j, following Algorithm 1 with the given order of j for each i."""
    gram = gram.double()
    count = gram.shape[0]
    coefficients = torch.eye(count, dtype=torch.float64, device=gram.device)
    projections = 0
    for i in range(count):
        for j in orders[i]:
            dot = coefficients[i] @ gram[:, j]
            if dot < 0 and gram[j, j] > 0:
                coefficients[i, j] -= dot / gram[j, j]
                projections += 1
    return coefficients, projections


class PCGrad(Balancer):
    """Projecting conflicting gradients, at the shared representation; effective weights beta_j recorded.

    Args:
        space: only ``"representation"`` (the output of the shared layer); other spaces are an error.
        reduction: ``"sum"`` (Algorithm 1) or ``"mean"`` (sum / T, as in a common implementation).
        seed: seed of the random order of Algorithm 1, line 4.

    ``state_dict()`` adds the state of the generator of that order, so a resumed run draws the orders
    the uninterrupted run would have drawn.
    """

    name = "pcgrad"
    uses_current_step = True
    weights_act_on_representation = True
    task_gradients: TaskGradients = "representation"
    repr_omits = ("name", "recorded_weight")

    def __init__(self, space: str = "representation", reduction: str = "sum", seed: int = 0) -> None:
        super().__init__()
        require_choice("space", space, SPACES, self.name)
        require_choice("reduction", reduction, REDUCTIONS, self.name)
        self.reduction = reduction
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        self.projections = 0  # projections made in the last step

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.update(space="representation", reduction=self.reduction, seed=self.seed)
        cfg["recorded_weight"] = "effective: beta_j with sum_i g_i^PC = sum_j beta_j g_j at the shared representation; the heads train on unit-weighted losses"
        return cfg

    def orders(self) -> list[list[int]]:
        count = len(self.tasks)
        out = []
        for i in range(count):
            others = [j for j in torch.randperm(count, generator=self._generator).tolist() if j != i]
            out.append(others)
        return out

    def step_weights(self, losses: Tensor, grad_norms: Optional[Tensor], task_grads: Optional[Tensor]) -> Tensor:
        if task_grads is None:
            raise RuntimeError("pcgrad needs this step's per-task gradients at the shared representation")
        grads = task_grads.detach().flatten(1).double()
        coefficients, projections = pcgrad_coefficients(grads @ grads.T, self.orders())
        beta = coefficients.sum(dim=0)
        if self.reduction == "mean":
            beta = beta / len(self.tasks)
        self.projections = projections
        self._weights = beta.to(losses.dtype)
        return self._weights

    def _update(self, losses: Tensor, loss_ratio: Tensor, inverse_rate: Tensor, weights: Tensor, grad_norms: Optional[Tensor]) -> StepStats:
        return StepStats(loss=losses, loss_ratio=loss_ratio, inverse_rate=inverse_rate, weight=weights)

    def _method_state(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state(), "projections": self.projections}

    def _check_method_state(self, state: Any, num_tasks: int) -> None:
        state = expect_mapping(state, "'method'", ("generator", "projections"))
        generator = state["generator"]
        size = self._generator.get_state().numel()
        if not isinstance(generator, Tensor) or generator.dtype != torch.uint8 or tuple(generator.shape) != (size,):
            raise ValueError(f"balancer state: 'method.generator' must be the uint8 tensor of torch.Generator.get_state(), got {generator!r}")
        expect_count(state["projections"], "'method.projections'", 0)

    def _load_method_state(self, state: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> None:
        # The order generator lives on the host whatever the balancer's device (set_state takes a CPU tensor).
        self._generator.set_state(state["generator"].to("cpu", copy=True))
        self.projections = state["projections"]
