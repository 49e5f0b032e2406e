"""Optimisers for the task-weight vector w, written as plain tensor algebra.

GradNorm updates w with its own optimiser (paper 5.5: Adam, learning rate 0.025). We do not use
``torch.optim`` here for one reason: a step whose inputs are non-finite must leave w *and the
optimiser's state* untouched, and deciding that with ``torch.where`` on the device keeps the training
step free of host-device synchronisation. The arithmetic follows ``torch.optim.Adam`` / ``SGD``
exactly (no weight decay, no amsgrad), so trajectories match a reference built on them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

OPTIMIZERS = ("adam", "sgd")


@dataclass
class WeightOptimizer:
    """Masked Adam or SGD(momentum) over a 1-D weight vector."""

    kind: str = "adam"
    lr: float = 0.025
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in OPTIMIZERS:
            raise ValueError(f"unknown weight optimizer {self.kind!r}; choose one of {OPTIMIZERS}")
        if not (self.lr > 0):
            raise ValueError(f"weight learning rate must be positive, got {self.lr!r}")
        self._exp_avg: Optional[Tensor] = None
        self._exp_avg_sq: Optional[Tensor] = None
        self._steps: Optional[Tensor] = None

    def config(self) -> dict:
        cfg = {"optimizer": self.kind, "lr": self.lr}
        if self.kind == "adam":
            cfg.update(betas=list(self.betas), eps=self.eps)
        else:
            cfg.update(momentum=self.momentum)
        return cfg

    def step(self, weights: Tensor, grad: Tensor, apply: Tensor) -> Tensor:
        """Return the updated weights; where ``apply`` (a 0-d bool tensor) is False, nothing changes."""
        if self._exp_avg is None:
            self._exp_avg = torch.zeros_like(weights)
            self._exp_avg_sq = torch.zeros_like(weights)
            self._steps = torch.zeros((), dtype=weights.dtype, device=weights.device)
        # A masked-off step may carry NaN in grad; zeroing it first keeps NaN out of the state
        # even through the arithmetic of the branch that torch.where discards.
        grad = torch.where(apply, grad, torch.zeros_like(grad))
        if self.kind == "sgd":
            if self.momentum:
                buf = torch.where(self._steps > 0, self.momentum * self._exp_avg + grad, grad)
                self._exp_avg = torch.where(apply, buf, self._exp_avg)
                grad = buf
            self._steps = torch.where(apply, self._steps + 1, self._steps)
            return torch.where(apply, weights - self.lr * grad, weights)
        beta1, beta2 = self.betas
        steps = self._steps + 1
        exp_avg = self._exp_avg * beta1 + grad * (1 - beta1)
        exp_avg_sq = self._exp_avg_sq * beta2 + grad * grad * (1 - beta2)
        bias_correction1 = 1 - beta1**steps
        bias_correction2 = 1 - beta2**steps
        denom = exp_avg_sq.sqrt() / bias_correction2.sqrt() + self.eps
        # exp_avg / denom first, as torch.optim.Adam's addcdiv does: it is bounded, while lr * exp_avg
        # can overflow float32 for huge gradient norms and turn the step into inf / inf = NaN.
        updated = weights - (self.lr / bias_correction1) * (exp_avg / denom)
        self._exp_avg = torch.where(apply, exp_avg, self._exp_avg)
        self._exp_avg_sq = torch.where(apply, exp_avg_sq, self._exp_avg_sq)
        self._steps = torch.where(apply, steps, self._steps)
        return torch.where(apply, updated, weights)
