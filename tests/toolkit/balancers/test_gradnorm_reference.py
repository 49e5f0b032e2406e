"""The closed-form GradNorm against create_graph double backward on the paper's equations.

Several models (dense toy, convolutional shared layer, a shared layer in the middle of the trunk with
deeper heads and mixed loss types) and task counts; the same G_i, targets, L_grad and weight trajectory
within floating-point tolerance, read back from the Parquet records (so the recorder is checked too).
"""

from __future__ import annotations

import copy

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradnorm import hooks
from gradnorm.toolkit.balancers import GradNorm
from tests.helpers.reference import reference_gradnorm

STEPS = 23


class Dense(nn.Module):
    def __init__(self, num_tasks: int, width: int = 16) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(12, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(width, 3) for _ in range(num_tasks))

    shared = property(lambda self: self.trunk[2])

    def forward(self, x):
        h = self.trunk(x)
        return [head(h) for head in self.heads]


class Conv(nn.Module):
    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.Tanh())
        self.heads = nn.ModuleList(nn.Conv2d(4, 1, 1) for _ in range(num_tasks))

    shared = property(lambda self: self.trunk[2])

    def forward(self, x):
        h = self.trunk(x)
        return [head(h) for head in self.heads]


class MiddleShared(nn.Module):
    """W sits in the middle of the trunk; heads are two layers deep."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU())
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, n)) for n in (4, 1, 2))

    shared = property(lambda self: self.trunk[2])

    def forward(self, x):
        h = self.trunk(x)
        return [head(h) for head in self.heads]


def dense_batches(num_tasks, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, 2, num_tasks)
    out = []
    for _ in range(STEPS):
        x = torch.randn(8, 12, generator=g, dtype=torch.float64)
        y = torch.randn(8, num_tasks, 3, generator=g, dtype=torch.float64) * scales.view(1, -1, 1)
        out.append((x, y))
    return out


def dense_losses(model, batch):
    x, y = batch
    return [F.mse_loss(o, y[:, i]) for i, o in enumerate(model(x))]


def conv_batches(num_tasks, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(3, 2, 6, 6, generator=g, dtype=torch.float64), torch.randn(3, num_tasks, 6, 6, generator=g, dtype=torch.float64) * 5) for _ in range(STEPS)
    ]


def conv_losses(model, batch):
    x, y = batch
    return [F.mse_loss(o[:, 0], y[:, i]) for i, o in enumerate(model(x))]


def mixed_batches(seed=2):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(16, 12, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (16,), generator=g),
            torch.randn(16, 1, generator=g, dtype=torch.float64) * 30,
            torch.randint(0, 2, (16,), generator=g),
        )
        for _ in range(STEPS)
    ]


def mixed_losses(model, batch):
    x, cls, reg, binary = batch
    a, b, c = model(x)
    return [F.cross_entropy(a, cls), F.l1_loss(b, reg), F.cross_entropy(c, binary)]


def run_toolkit(model, batches, loss_fn, alpha, tmp_path, lr=0.025, network_lr=0.01, per_channel=False):
    session = hooks.attach(model.shared, GradNorm(alpha=alpha, lr=lr, per_channel=per_channel), runs_root=tmp_path, run_name="under-test", flush_every=7)
    opt = torch.optim.SGD(model.parameters(), lr=network_lr)
    weights_before = []
    with session:
        for batch in batches:
            losses = loss_fn(model, batch)
            names = [f"t{i}" for i in range(len(losses))]
            weights_before.append(session.balancer.weights().tolist() if session.balancer.bound else [1.0] * len(losses))
            loss = session.loss(dict(zip(names, losses)))
            opt.zero_grad()
            loss.backward()
            opt.step()
    table = pq.read_table(tmp_path / "under-test" / "metrics").to_pandas()
    table = table.sort_values(["step", "task"]).reset_index(drop=True)
    return session, weights_before, table


CASES = {
    "dense-T2": (lambda: Dense(2), lambda: dense_batches(2), dense_losses, 0.12),
    "dense-T6": (lambda: Dense(6), lambda: dense_batches(6), dense_losses, 1.5),
    "conv-T3": (lambda: Conv(3), lambda: conv_batches(3), conv_losses, 0.5),
    "conv-T3-per-channel": (lambda: Conv(3), lambda: conv_batches(3), conv_losses, 0.5),
    "middle-mixed-T3": (MiddleShared, mixed_batches, mixed_losses, 1.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_closed_form_matches_double_backward(case, tmp_path):
    make_model, make_batches, loss_fn, alpha = CASES[case]
    torch.manual_seed(0)
    with torch.random.fork_rng():
        torch.set_default_dtype(torch.float64)
        try:
            model = make_model()
        finally:
            torch.set_default_dtype(torch.float32)
    batches = make_batches()
    reference_model = copy.deepcopy(model)
    per_channel = case.endswith("per-channel")
    reference = reference_gradnorm(reference_model, reference_model.shared.weight, batches, loss_fn, alpha=alpha, per_channel=per_channel)
    session, weights_before, table = run_toolkit(model, batches, loss_fn, alpha, tmp_path, per_channel=per_channel)

    num_tasks = len(reference.final_weights)
    train = table[table["split"] == "train"]
    assert len(train) == STEPS * num_tasks
    for step, expected in enumerate(reference.steps):
        rows = train[train["step"] == step].sort_values("task")
        assert rows["grad_norm"].tolist() == pytest.approx(expected.grad_norms, rel=1e-9, abs=1e-12)
        assert rows["target_norm"].tolist() == pytest.approx(expected.targets, rel=1e-9, abs=1e-12)
        assert rows["step_grad_loss"].iloc[0] == pytest.approx(expected.grad_loss, rel=1e-9, abs=1e-12)
        assert rows["weight"].tolist() == pytest.approx(expected.weights_before, rel=1e-9)
        assert weights_before[step] == pytest.approx(expected.weights_before, rel=1e-9)
    assert session.balancer.weights().tolist() == pytest.approx(reference.final_weights, rel=1e-9)
    # The trajectory really moved: a test that compares two constant vectors would prove nothing.
    assert max(abs(w - 1.0) for w in reference.final_weights) > 1e-3


def test_network_gradients_unchanged_by_balancing(tmp_path):
    """Measuring G_i must not touch .grad: after backward, the network's gradient is that of sum w_i L_i."""
    torch.manual_seed(3)
    model = Dense(3).double()
    twin = copy.deepcopy(model)
    batch = dense_batches(3)[0]
    session = hooks.attach(model.shared, GradNorm(alpha=0.5))
    losses = dense_losses(model, batch)
    weights = torch.ones(3, dtype=torch.float64)  # the first step applies w(0) = 1
    session.loss(dict(zip("abc", losses))).backward()
    sum(w * l for w, l in zip(weights, dense_losses(twin, batch))).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-12, atol=1e-14), name
