"""A real multitask problem available offline: the Palmer penguins (Gorman, Williams and Fraser, 2014; the
``palmerpenguins`` package ships the CSV).

Three tasks from bill length, bill depth, flipper length and island: species (3-class cross-entropy),
sex (2-class cross-entropy) and body mass (mean squared error in kg). Rows with a missing value are
dropped (333 remain); the train/test split and the network's initialisation are fixed by the seed, so
every method sees the same data and starts from the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

TASKS = ("species", "sex", "body_mass")
FEATURES = ("bill_length_mm", "bill_depth_mm", "flipper_length_mm")
TEST_FRACTION = 0.3
HIDDEN = 32


@dataclass
class PenguinData:
    x_train: Tensor
    x_test: Tensor
    y_train: dict[str, Tensor]
    y_test: dict[str, Tensor]
    num_species: int
    seed: int


def load_penguins(seed: int = 0) -> PenguinData:
    """Load, encode, split (by ``seed``) and standardise the features with the training rows' statistics."""
    try:
        from palmerpenguins import load_penguins as load_frame
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError("the penguins problem needs the 'palmerpenguins' package (pip install palmerpenguins)") from exc
    frame = load_frame().dropna(subset=list(FEATURES) + ["island", "species", "sex", "body_mass_g"]).reset_index(drop=True)
    species = sorted(frame["species"].unique())
    islands = sorted(frame["island"].unique())
    numeric = torch.tensor(frame[list(FEATURES)].to_numpy(), dtype=torch.float32)
    island = F.one_hot(torch.tensor(frame["island"].map(islands.index).to_numpy()), len(islands)).float()
    labels = {
        "species": torch.tensor(frame["species"].map(species.index).to_numpy()),
        "sex": torch.tensor((frame["sex"] == "male").astype(int).to_numpy()),
        "body_mass": torch.tensor(frame["body_mass_g"].to_numpy() / 1000.0, dtype=torch.float32),
    }
    order = torch.randperm(len(frame), generator=torch.Generator().manual_seed(seed))
    cut = int(len(frame) * (1 - TEST_FRACTION))
    train, test = order[:cut], order[cut:]
    mean, std = numeric[train].mean(0), numeric[train].std(0)
    x = torch.cat([(numeric - mean) / std, island], dim=1)
    return PenguinData(
        x_train=x[train],
        x_test=x[test],
        y_train={k: v[train] for k, v in labels.items()},
        y_test={k: v[test] for k, v in labels.items()},
        num_species=len(species),
        seed=seed,
    )


class PenguinNet(nn.Module):
    """Two shared ReLU layers; ``shared_layer`` (the second Linear) is the balancers' W."""

    def __init__(self, in_features: int, num_species: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(in_features, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU())
        self.heads = nn.ModuleDict({"species": nn.Linear(HIDDEN, num_species), "sex": nn.Linear(HIDDEN, 2), "body_mass": nn.Linear(HIDDEN, 1)})

    @property
    def shared_layer(self) -> nn.Linear:
        layer = self.trunk[2]
        assert isinstance(layer, nn.Linear)
        return layer

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.trunk(x)
        return {name: head(z) for name, head in self.heads.items()}


def make_model(data: PenguinData, init_seed: Optional[int] = None) -> PenguinNet:
    torch.manual_seed(data.seed + 1 if init_seed is None else init_seed)
    return PenguinNet(data.x_train.shape[1], data.num_species)


def task_losses(outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
    return {
        "species": F.cross_entropy(outputs["species"], targets["species"]),
        "sex": F.cross_entropy(outputs["sex"], targets["sex"]),
        "body_mass": F.mse_loss(outputs["body_mass"].squeeze(-1), targets["body_mass"]),
    }


def test_errors(model: PenguinNet, data: PenguinData) -> dict[str, float]:
    """Per-task test error: species and sex error rates, body-mass RMSE in grams."""
    with torch.no_grad():
        out = model(data.x_test)
        return {
            "species": float((out["species"].argmax(1) != data.y_test["species"]).float().mean()),
            "sex": float((out["sex"].argmax(1) != data.y_test["sex"]).float().mean()),
            "body_mass": float(((out["body_mass"].squeeze(-1) - data.y_test["body_mass"]) ** 2).mean().sqrt() * 1000.0),
        }


def test_losses(model: PenguinNet, data: PenguinData) -> Tensor:
    with torch.no_grad():
        return torch.stack(list(task_losses(model(data.x_test), data.y_test).values()))
