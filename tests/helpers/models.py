"""A tiny shared-trunk, multi-head model and a one-step driver for the balancer tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_tasks: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.bottom = nn.Linear(5, 8)
        self.shared = nn.Linear(8, 6)
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = torch.tanh(self.shared(torch.tanh(self.bottom(x))))
        return [head(z).squeeze(-1) for head in self.heads]


def batch(num_tasks: int = 3, seed: int = 1, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 5, generator=generator)
    scales = torch.tensor([1.0, 10.0, 0.1, 3.0, 0.5][:num_tasks])
    y = torch.randn(size, num_tasks, generator=generator) * scales
    return x, y


def task_losses(model: TinyNet, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"t{i}": ((out - y[:, i]) ** 2).mean() for i, out in enumerate(model(x))}
