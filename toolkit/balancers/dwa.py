"""Dynamic weight averaging (Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention",
CVPR 2019, eq. 7).

    w_i(t) = T exp(r_i(t-1) / K) / sum_j exp(r_j(t-1) / K),    r_i(t-1) = L_i(t-1) / L_i(t-2),

with temperature K (paper: 2) and w_i = 1 for the first two periods. The paper's period is an epoch and
L_i is the loss averaged over it; here a period is ``window`` consecutive steps (window=1: per step, the
common iteration-level variant), and the weights stay fixed within a period.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from .base import Balancer, StepStats
from .checks import LOSS_FLOOR, require_non_negative_losses
from .state import expect_count, expect_mapping, expect_tensor, restored, saved


def dwa_weights(previous: Tensor, before_previous: Tensor, temperature: float) -> Tensor:
    """Liu et al.'s eq. 7 from the mean losses of the last two periods."""
    rate = previous / before_previous.clamp_min(LOSS_FLOOR)
    return rate.numel() * torch.softmax(rate / temperature, dim=0)


class DynamicWeightAverage(Balancer):
    """DWA weights from the rate of change of each task's loss over the last two periods.

    ``state_dict()`` adds the loss history: the mean losses of the last two completed periods and the sum
    and step count of the period in progress, so a run resumed mid-period keeps Liu et al.'s eq. 7 exact.
    """

    name = "dwa"

    def __init__(self, temperature: float = 2.0, window: int = 1) -> None:
        super().__init__()
        if not (temperature > 0):
            raise ValueError(f"{self.name}: temperature must be positive, got {temperature!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"{self.name}: window must be an int >= 1 (steps per period), got {window!r}")
        self.temperature = float(temperature)
        self.window = window
        self._sum: Optional[Tensor] = None
        self._count = 0
        self._history: list[Tensor] = []  # mean losses of the last two completed periods

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.update(temperature=self.temperature, window=self.window)
        return cfg

    def _update(self, losses: Tensor, loss_ratio: Tensor, inverse_rate: Tensor, weights: Tensor, grad_norms: Optional[Tensor]) -> StepStats:
        require_non_negative_losses(self.tasks, losses, self.name)
        self._sum = losses.clone() if self._sum is None else self._sum + losses
        self._count += 1
        if self._count == self.window:
            self._history = (self._history + [self._sum / self.window])[-2:]
            self._sum, self._count = None, 0
            if len(self._history) == 2:
                self._weights = dwa_weights(self._history[1], self._history[0], self.temperature)
        return StepStats(loss=losses, loss_ratio=loss_ratio, inverse_rate=inverse_rate, weight=weights)

    def _method_state(self) -> dict[str, Any]:
        return {"period_sum": saved(self._sum), "period_steps": self._count, "history": [saved(h) for h in self._history]}

    def _check_method_state(self, state: Any, num_tasks: int) -> None:
        state = expect_mapping(state, "'method'", ("period_sum", "period_steps", "history"))
        steps = expect_count(state["period_steps"], "'method.period_steps'", 0, self.window - 1)
        expect_tensor(state["period_sum"], "'method.period_sum'", (num_tasks,), optional=steps == 0)
        if steps == 0 and state["period_sum"] is not None:
            raise ValueError("balancer state: 'method.period_sum' is set but no step of the period is counted")
        history = state["history"]
        if not isinstance(history, list) or len(history) > 2:
            raise ValueError(f"balancer state: 'method.history' must be a list of at most two periods' mean losses, got {history!r}")
        for index, mean in enumerate(history):
            expect_tensor(mean, f"'method.history[{index}]'", (num_tasks,))

    def _load_method_state(self, state: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> None:
        self._sum = restored(state["period_sum"], device, dtype)
        self._count = state["period_steps"]
        self._history = [restored(mean, device, dtype) for mean in state["history"]]
