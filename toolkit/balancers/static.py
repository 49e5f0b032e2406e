"""Fixed weights: the equal-weights baseline and retraining with exported weights (paper 5.2)."""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .base import Balancer, InitialLossSpec, StepStats


class StaticWeights(Balancer):
    """Constant weights w_i, e.g. GradNorm's time average E_t[w_i] of an earlier run (paper 5.2, 5.3).

    ``weights`` is a mapping task -> weight (every task named exactly once) or a sequence in task order.
    Weights must be finite and positive. A state (``state_dict``) loads whatever file the weights came
    from, as long as the weights are the same.
    """

    name = "static"
    config_not_checked = ("source",)
    supports_missing_tasks = True  # constant weights: an absent task changes nothing

    def __init__(self, weights: Union[Mapping[str, float], Sequence[float]], initial_loss: InitialLossSpec = "first") -> None:
        super().__init__(initial_loss=initial_loss)
        self.given: Union[dict[str, float], list[float]] = dict(weights) if isinstance(weights, Mapping) else [float(w) for w in weights]
        #: The weights file they were read from (:meth:`from_file`).
        self.source: Optional[str] = None

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike[str]], initial_loss: InitialLossSpec = "first") -> StaticWeights:
        """Retrain with the weights of a file written by ``gradnorm export`` (paper 5.2)."""
        from gradnorm.toolkit.weights_file import load_weights

        balancer = cls(load_weights(path), initial_loss=initial_loss)
        balancer.source = str(path)
        return balancer

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["weights"] = self.given
        if self.source:
            cfg["source"] = self.source
        return cfg

    def initial_weights(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        if isinstance(self.given, dict):
            unknown = sorted(set(self.given) - set(self.tasks))
            missing = [t for t in self.tasks if t not in self.given]
            if unknown or missing:
                raise ValueError(f"static weights: unknown tasks {unknown}, missing tasks {missing} (run has {self.tasks})")
            values = [float(self.given[t]) for t in self.tasks]
        else:
            if len(self.given) != len(self.tasks):
                raise ValueError(f"static weights: {len(self.given)} values for {len(self.tasks)} tasks {self.tasks}")
            values = list(self.given)
        for task, value in zip(self.tasks, values):
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"static weight of task {task!r} is {value!r}; weights must be finite and positive")
        return torch.tensor(values, device=device, dtype=dtype)

    def _update(self, losses: Tensor, loss_ratio: Tensor, inverse_rate: Tensor, weights: Tensor, grad_norms: Optional[Tensor]) -> StepStats:
        return StepStats(loss=losses, loss_ratio=loss_ratio, inverse_rate=inverse_rate, weight=weights)


class EqualWeights(StaticWeights):
    """w_i = 1 for every task: the baseline of the paper's Figure 2 and Table 1."""

    name = "equal"

    def __init__(self, initial_loss: InitialLossSpec = "first") -> None:
        super().__init__(weights=[], initial_loss=initial_loss)

    def config(self) -> dict[str, Any]:
        return Balancer.config(self)

    def initial_weights(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        return torch.ones(len(self.tasks), device=device, dtype=dtype)
