"""Weights that divide each loss by a reference value of itself (survey sections 1.1, 1.2 and 1.3).

- :class:`InitialLossWeights`: w_i = 1 / L_i(initial), the first step's loss or the mean of the first k
  steps (survey 1.1).
- :class:`PriorLossWeights`: w_i = 1 / L_i(prior), the loss of a model that has learned only the label
  distribution: the class entropy -sum_k p_k log p_k for cross-entropy, the label variance E||y - mu||^2
  for an L2 loss (survey 1.2). Given by the user or estimated from a data sample with
  :func:`prior_cross_entropy` / :func:`prior_l2`.
- :class:`RealTimeLossWeights`: w_i(t) = 1 / stopgrad(L_i(t)), so every task's gradient is
  grad L_i / L_i (survey 1.3).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .base import Balancer, StepStats
from .checks import LOSS_FLOOR, require_non_negative_losses


def prior_cross_entropy(labels: Tensor, num_classes: int, prior: str = "entropy") -> float:
    """The prior loss of a K-class cross-entropy task from a sample of integer labels (survey 1.2).

    ``prior="entropy"``: -sum_k p_k log p_k with p the class frequencies of the sample (1.2);
    ``prior="uniform"``: log K, the loss of a uniform prediction (1.1's theoretical initial value).
    """
    if prior == "uniform":
        if num_classes < 2:
            raise ValueError(f"a classification task needs at least 2 classes, got num_classes={num_classes}")
        return math.log(num_classes)
    if prior != "entropy":
        raise ValueError(f"prior={prior!r} is not supported; choose 'entropy' or 'uniform'")
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.numel() == 0:
        raise ValueError("cannot estimate a prior loss from an empty label sample")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got values from {int(labels.min())} to {int(labels.max())}")
    p = torch.bincount(labels.long(), minlength=num_classes).double() / labels.numel()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def prior_l2(targets: Tensor) -> float:
    """The prior loss of a mean-squared-error task: the per-element label variance E[(y - mu)^2] (survey 1.2).

    The mean runs over the elements as ``torch.nn.functional.mse_loss`` does by default, with mu the
    per-output mean over the sample (first dimension).
    """
    targets = torch.as_tensor(targets).double()
    if targets.shape[0] < 2:
        raise ValueError(f"a label-variance prior needs at least two samples, got {targets.shape[0]}")
    return float(((targets - targets.mean(dim=0, keepdim=True)) ** 2).mean())


class _FixedReferenceWeights(Balancer):
    def _update(self, losses: Tensor, loss_ratio: Tensor, inverse_rate: Tensor, weights: Tensor, grad_norms: Optional[Tensor]) -> StepStats:
        self._weights = 1.0 / self.initial_loss.current()
        return StepStats(loss=losses, loss_ratio=loss_ratio, inverse_rate=inverse_rate, weight=weights)


class InitialLossWeights(_FixedReferenceWeights):
    """w_i = 1 / L_i(initial) (survey 1.1).

    ``initial_loss="first"`` takes the first step's loss, an int k the mean of the first k steps (the
    weights follow the running mean during those k steps). The first step trains with w = 1, because the
    reference is only known once that step's losses are in; from the second step on w_i = 1 / L_i(0).
    """

    name = "initial-loss"

    def __init__(self, initial_loss: Union[str, int] = "first") -> None:
        if not (initial_loss == "first" or (isinstance(initial_loss, int) and not isinstance(initial_loss, bool))):
            raise ValueError(f"initial-loss: initial_loss={initial_loss!r} is not supported; use 'first' or an int k (PriorLossWeights takes given values)")
        super().__init__(initial_loss=initial_loss)


class PriorLossWeights(_FixedReferenceWeights):
    """w_i = 1 / L_i(prior), from given prior values (survey 1.2), fixed for the whole run.

    ``priors`` maps each task to its prior loss (see :func:`prior_cross_entropy`, :func:`prior_l2`);
    values must be finite and positive. The loss ratios recorded are L_i / L_i(prior).
    """

    name = "prior-loss"

    def __init__(self, priors: Union[Mapping[str, float], Sequence[float]]) -> None:
        if isinstance(priors, str) or not isinstance(priors, (Mapping, Sequence)):
            raise ValueError(f"prior-loss: priors must be a mapping task -> prior loss or a sequence, got {priors!r}")
        super().__init__(initial_loss=dict(priors) if isinstance(priors, Mapping) else [float(v) for v in priors])

    def initial_weights(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        return 1.0 / self.initial_loss.current()

    def repr_config(self) -> dict[str, Any]:
        shown = super().repr_config()
        shown["priors"] = shown.pop("initial_loss")  # the priors are this method's L_i(0)
        return shown


class RealTimeLossWeights(Balancer):
    """w_i(t) = 1 / stopgrad(L_i(t)) (survey 1.3): each task contributes grad L_i / L_i.

    The weight uses this step's own loss, so every weighted loss equals 1. A negative loss is an error
    naming the task; a loss of exactly 0 divides by ``LOSS_FLOOR`` instead.
    """

    name = "real-time-loss"
    uses_current_step = True

    def step_weights(self, losses: Tensor, grad_norms: Optional[Tensor], task_grads: Optional[Tensor]) -> Tensor:
        require_non_negative_losses(self.tasks, losses, self.name)
        self._weights = 1.0 / losses.detach().clamp_min(LOSS_FLOOR)
        return self._weights

    def _update(self, losses: Tensor, loss_ratio: Tensor, inverse_rate: Tensor, weights: Tensor, grad_norms: Optional[Tensor]) -> StepStats:
        return StepStats(loss=losses, loss_ratio=loss_ratio, inverse_rate=inverse_rate, weight=weights)
