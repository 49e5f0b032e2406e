"""The paper's toy regression problem (section 4), generated offline from a seed.

f_i(x) = sigma_i * tanh((B + eps_i) x), x in R^250, outputs in R^100; a 4-layer, 100-unit ReLU trunk
with one affine head per task. The paper leaves the distributions of B, eps_i and x, the data size, the
optimiser and the batch size open; our choices (written to each run's ``run.json``):

- B_jk ~ N(0, 1), eps_i,jk ~ N(0, 0.35) (the 10 : 3.5 variance ratio of common reimplementations),
  both scaled by 1/sqrt(250) so that tanh's argument has unit-order variance for x ~ N(0, I);
- T = 2: sigma = (1, 100) (paper); T = 10: sigma_i log-uniform on [1, 100] (a wide spread);
- 10,000 training and 2,000 test points; Adam, learning rate 1e-3, batch 100 for the network.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

INPUT_DIM = 250
OUTPUT_DIM = 100
HIDDEN = 100
TRUNK_LAYERS = 4


@dataclass
class ToyConfig:
    num_tasks: int = 2
    sigmas: Optional[list[float]] = None
    train_size: int = 10_000
    test_size: int = 2_000
    data_seed: int = 0
    init_seed: int = 1
    eps_variance: float = 0.35

    def resolved_sigmas(self) -> list[float]:
        if self.sigmas is not None:
            if len(self.sigmas) != self.num_tasks:
                raise ValueError(f"{len(self.sigmas)} sigmas for {self.num_tasks} tasks")
            return [float(s) for s in self.sigmas]
        if self.num_tasks == 2:
            return [1.0, 100.0]
        generator = torch.Generator().manual_seed(self.data_seed + 7919)
        log_sigma = torch.rand(self.num_tasks, generator=generator) * math.log(100.0)
        return [round(float(s), 4) for s in log_sigma.exp()]

    def as_dict(self) -> dict:
        out = asdict(self)
        out["sigmas"] = self.resolved_sigmas()
        return out


@dataclass
class ToyData:
    x_train: Tensor
    y_train: Tensor  # (N, T, 100)
    x_test: Tensor
    y_test: Tensor
    sigmas: list[float] = field(default_factory=list)

    @property
    def task_names(self) -> list[str]:
        return [f"task{i}" for i in range(len(self.sigmas))]


def make_data(config: ToyConfig) -> ToyData:
    sigmas = config.resolved_sigmas()
    generator = torch.Generator().manual_seed(config.data_seed)
    scale = 1.0 / math.sqrt(INPUT_DIM)
    base = torch.randn(OUTPUT_DIM, INPUT_DIM, generator=generator)
    eps = torch.randn(config.num_tasks, OUTPUT_DIM, INPUT_DIM, generator=generator) * math.sqrt(config.eps_variance)
    maps = (base + eps) * scale
    sigma = torch.tensor(sigmas).view(1, -1, 1)

    def targets(x: Tensor) -> Tensor:
        return sigma * torch.tanh(torch.einsum("tok,nk->nto", maps, x))

    x_train = torch.randn(config.train_size, INPUT_DIM, generator=generator)
    x_test = torch.randn(config.test_size, INPUT_DIM, generator=generator)
    return ToyData(x_train, targets(x_train), x_test, targets(x_test), sigmas)


class ToyNet(nn.Module):
    """Shared 4-layer ReLU trunk; ``shared_layer`` (the trunk's last Linear) is GradNorm's W."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = INPUT_DIM
        for _ in range(TRUNK_LAYERS):
            layers += [nn.Linear(width, HIDDEN), nn.ReLU()]
            width = HIDDEN
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(HIDDEN, OUTPUT_DIM) for _ in range(num_tasks))

    @property
    def shared_layer(self) -> nn.Linear:
        layer = self.trunk[-2]
        assert isinstance(layer, nn.Linear)
        return layer

    def forward(self, x: Tensor) -> list[Tensor]:
        features = self.trunk(x)
        return [head(features) for head in self.heads]


def make_model(config: ToyConfig) -> ToyNet:
    torch.manual_seed(config.init_seed)
    return ToyNet(config.num_tasks)


def task_losses(outputs: list[Tensor], targets: Tensor) -> list[Tensor]:
    """Mean squared error per task; ``targets`` is (N, T, 100)."""
    return [torch.mean((out - targets[:, i]) ** 2) for i, out in enumerate(outputs)]
