"""Small recorded runs for the analysis, export and app tests."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gradnorm import hooks
from gradnorm.toolkit.balancers import GradNorm


def record_run(root: Path, name: str, steps: int = 60, tasks: int = 3, flush_every: int = 7, validate_every: int = 10, seed: int = 0) -> Path:
    """A tiny shared-trunk model trained with GradNorm, recorded with several part files."""
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(tasks))
    optimizer = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.05)
    session = hooks.attach(trunk[2], GradNorm(alpha=0.5), runs_root=root, run_name=name, flush_every=flush_every)
    x = torch.randn(64, 5)
    targets = [torch.randn(64, 1) * (i + 1) for i in range(tasks)]
    with session:
        for step in range(steps):
            features = trunk(x)
            losses = {f"t{i}": ((head(features) - y) ** 2).mean() for i, (head, y) in enumerate(zip(heads, targets))}
            loss = session.loss(losses)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if validate_every and (step + 1) % validate_every == 0:
                session.log_validation({k: float(v.detach()) * 1.1 for k, v in losses.items()}, step=step)
    return root / name
