"""Train the paper's toy problem (section 4) with any balancer, attached through :func:`hooks.attach`.

Used by ``gradnorm demo``, the benchmarks and the sample runs. Equal weights and GradNorm start from the
same initialisation and see the same batches (both seeded), as the paper requires.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from gradnorm.experiments import toy
from gradnorm.hooks.session import attach
from gradnorm.toolkit.balancers import Balancer

NETWORK_LR = 1e-3
BATCH_SIZE = 100


@dataclass
class ToyResult:
    run_name: str
    tasks: list[str]
    weights: list[list[float]] = field(default_factory=list)  # w(t) per step, from the balancer
    test_loss_ratios: list[float] = field(default_factory=list)  # final L_i(test) / L_i(test, init)
    seconds: float = 0.0
    run_path: Optional[Path] = None

    @property
    def normalized_test_loss(self) -> float:
        """Task-normalised test loss sum_i L_i / L_i(0) (paper section 4)."""
        return float(sum(self.test_loss_ratios))

    def time_averaged_weights(self, burn_in: float = 0.1) -> list[float]:
        start = int(len(self.weights) * burn_in)
        window = torch.tensor(self.weights[start:])
        return window.mean(dim=0).tolist()


def test_losses(model: toy.ToyNet, data: toy.ToyData) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack(toy.task_losses(model(data.x_test), data.y_test))


def train_toy(
    config: toy.ToyConfig,
    balancer: Balancer,
    steps: int,
    run_name: str,
    runs_root: Optional[Path] = None,
    data: Optional[toy.ToyData] = None,
    eval_every: int = 100,
    flush_every: int = 100,
    progress: Optional[Callable[[int], None]] = None,
) -> ToyResult:
    """Train ``steps`` steps; record to ``runs_root/run_name`` when a root is given."""
    data = data if data is not None else toy.make_data(config)
    model = toy.make_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=NETWORK_LR)
    tasks = data.task_names
    baseline = test_losses(model, data)
    run_config = {
        "problem": "toy (paper section 4)",
        "toy": config.as_dict(),
        "steps": steps,
        "network_optimizer": {"name": "adam", "lr": NETWORK_LR},
        "batch_size": BATCH_SIZE,
        "initial_test_losses": dict(zip(tasks, baseline.tolist())),
    }
    session = attach(model.shared_layer, balancer, runs_root=runs_root, run_name=run_name, flush_every=flush_every, config=run_config)
    result = ToyResult(run_name=run_name, tasks=tasks)
    batches = torch.Generator().manual_seed(config.data_seed + 1)
    started = time.perf_counter()
    steps_per_epoch = max(1, config.train_size // BATCH_SIZE)
    with session:
        for step in range(steps):
            if step % steps_per_epoch == 0:
                order = torch.randperm(config.train_size, generator=batches)
            start = (step % steps_per_epoch) * BATCH_SIZE
            index = order[start : start + BATCH_SIZE]
            outputs = model(data.x_train[index])
            losses = dict(zip(tasks, toy.task_losses(outputs, data.y_train[index])))
            loss = session.loss(losses, epoch=step // steps_per_epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            result.weights.append(session.balancer.weights().tolist())
            if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
                session.log_validation(dict(zip(tasks, test_losses(model, data).tolist())), step=step, epoch=step // steps_per_epoch)
            if progress is not None:
                progress(1)
    result.seconds = time.perf_counter() - started
    result.test_loss_ratios = (test_losses(model, data) / baseline).tolist()
    result.run_path = session.run_path
    return result
