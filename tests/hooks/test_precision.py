"""The same answer in float32, bfloat16 and float16: on every route the norms can take (the general path's
backward passes, per-task loop or Gram identity, the taps' linear and convolution products, their Gram
route, their batched product, and the streaming taps) and with each task's loss in float32, bfloat16, float16 or a mix (autocast on the CPU, the losses
computed inside it), GradNorm's weight trajectory follows the float32 run's within a stated tolerance,
and the weights, their optimiser's state and the norms stay float32 (the step count float64). At a step
whose loss is NaN, the update is skipped and the other tasks' recorded norms stay finite, on every route.
"""

from __future__ import annotations

import copy
import warnings

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from gradnorm import hooks
from gradnorm.hooks import taps as taps_module
from gradnorm.toolkit.balancers import GradNorm

STEPS = 30
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
#: The largest difference from the float32 run allowed in any weight at any step, over 30 steps in which
#: the weights (summing to T = 3) move by about 0.8. bfloat16 keeps 8 bits of mantissa, float16 11: the
#: differences measured on these routes are at most 8.6e-4 and 2.9e-4 (a mix: 6.7e-4); the bounds leave
#: a factor of about 5.
TOLERANCE = {F32: 1e-6, BF16: 4e-3, F16: 1.5e-3}
LOSS_DTYPES = {
    "float32": (F32, F32, F32),
    "bfloat16": (BF16, BF16, BF16),
    "float16": (F16, F16, F16),
    "mixed": (BF16, F16, F32),
}


class LinearNet(nn.Module):
    """A shared Linear W and three heads reading relu(W x), or gelu(W x) (no product route: batched-vjp),
    or LayerNorm(W x) on a batch of 4 (few positions: the Gram identity is the cheaper route)."""

    def __init__(self, segment: str = "relu") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lower = nn.Linear(12, 16)
        self.shared = nn.Linear(16, 16)
        self.segment = segment
        self.batch = 4 if segment == "layernorm" else 32
        self.heads = nn.ModuleList([nn.Linear(16, 4), nn.Linear(16, 2), nn.Linear(16, 3)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.shared(torch.relu(self.lower(x)))
        if self.segment == "layernorm":
            h = nn.functional.layer_norm(y, (16,))
        else:
            h = torch.relu(y) if self.segment == "relu" else nn.functional.gelu(y)
        return [head(h) for head in self.heads]


class ConvNet(nn.Module):
    """A shared Conv2d W behind ReLU and three convolutional heads (the conv-product route)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lower = nn.Conv2d(3, 6, 3, padding=1)
        self.shared = nn.Conv2d(6, 8, 3, padding=1)
        self.heads = nn.ModuleList([nn.Conv2d(8, 2, 1), nn.Conv2d(8, 1, 3, padding=1), nn.Conv2d(8, 3, 1)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = torch.relu(self.shared(torch.relu(self.lower(x))))
        return [head(h) for head in self.heads]


ROUTES = {
    # route: (model, heads=, stream, the path the taps report or (general path) the meter's route)
    "general": (LinearNet, None, False, "autograd-loop"),
    "general-gram": (lambda: LinearNet("layernorm"), None, False, "gram-loop"),
    "linear-product": (LinearNet, "auto", False, "linear-product"),
    "conv-product": (ConvNet, "auto", False, "conv-product"),
    "gram-vjp": (lambda: LinearNet("layernorm"), "auto", False, "gram-vjp"),
    "batched-vjp": (lambda: LinearNet("gelu"), "auto", False, "batched-vjp"),
    "stream": (LinearNet, "auto", True, "linear-product"),
}


def batches(model: nn.Module, steps: int):
    generator = torch.Generator().manual_seed(3)
    conv = isinstance(model, ConvNet)
    for _ in range(steps):
        x = torch.randn((8, 3, 6, 6) if conv else (model.batch, 12), generator=generator)
        targets = [torch.randn(o.shape, generator=generator) * scale for o, scale in zip(model(x), (1.0, 5.0, 0.3))]
        yield x, [t.detach() for t in targets]


def losses_in(outputs: list[torch.Tensor], targets: list[torch.Tensor], dtypes: tuple, nan_task: int = -1) -> list[torch.Tensor]:
    losses = []
    for task, (out, target, dtype) in enumerate(zip(outputs, targets, dtypes)):
        target = target.to(dtype)
        if task == nan_task:
            target = torch.full_like(target, float("nan"))
        losses.append(((out.to(dtype) - target) ** 2).mean())
    return losses


def train(route: str, dtypes: tuple, monkeypatch, steps: int = STEPS, nan_at: int = -1, root=None):
    make, heads, stream, _ = ROUTES[route]
    monkeypatch.setattr(taps_module, "STREAM_ABOVE_BYTES", 0 if stream else 1 << 40)
    model = make()
    data = list(batches(copy.deepcopy(model), steps))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    session = hooks.attach(model.shared, GradNorm(alpha=1.5), heads=heads, runs_root=root, run_name=route)
    low = [d for d in dtypes if d != F32]
    trajectory = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the NaN step's warning
        for step, (x, targets) in enumerate(data):
            with torch.autocast("cpu", dtype=low[0] if low else BF16, enabled=bool(low)):
                losses = losses_in(model(x), targets, dtypes, nan_task=1 if step == nan_at else -1)
            loss = session.loss(losses)
            optimizer.zero_grad()
            loss.backward()
            if step != nan_at:  # (as a GradScaler would, the network skips the step whose gradient is NaN)
                optimizer.step()
            trajectory.append(session.balancer.weights().clone())
    session.close()
    return torch.stack(trajectory), session


@pytest.fixture(scope="module")
def float32_runs():
    """The float32 trajectory of each model (the general path's; every route gives it, see below)."""
    runs = {}
    patch = pytest.MonkeyPatch()
    try:
        for route in ROUTES:
            runs[route] = train(route, LOSS_DTYPES["float32"], patch)[0]
    finally:
        patch.undo()
    return runs


@pytest.mark.parametrize("loss_dtypes", list(LOSS_DTYPES))
@pytest.mark.parametrize("route", list(ROUTES))
def test_every_route_follows_the_float32_run_in_every_loss_dtype(route, loss_dtypes, float32_runs, monkeypatch):
    dtypes = LOSS_DTYPES[loss_dtypes]
    trajectory, session = train(route, dtypes, monkeypatch)
    expected_path = ROUTES[route][3]
    if ROUTES[route][1] is None:
        assert session.taps is None and session.meter.route == expected_path
    else:
        assert session.taps is not None and session.taps.path == expected_path
        assert session.taps.mode == ("stream" if route == "stream" else "fan-out")
    # Kept in float32 whatever the losses: the weights, the optimiser's moments; the step count in float64.
    optimizer = session.balancer.optimizer
    assert trajectory.dtype == F32 and optimizer._exp_avg is not None and optimizer._exp_avg.dtype == F32
    assert optimizer._steps is not None and optimizer._steps.dtype == torch.float64 and float(optimizer._steps) == STEPS
    # (The LayerNorm model's weights move less: 0.47.)
    assert (trajectory[-1] - 1).abs().max() > (0.4 if "gram" in route else 0.5), "the weights did not move"
    tolerance = max(TOLERANCE[d] for d in dtypes)
    difference = (trajectory - float32_runs[route]).abs().max().item()
    assert difference <= tolerance, f"{route}, losses {loss_dtypes}: weights differ from float32 by {difference:.2e} (allowed {tolerance:.0e})"


def test_the_float32_runs_of_the_taps_are_the_general_paths(float32_runs):
    """(The convolutional and GELU models are other models; tests/hooks/test_fast_path.py checks their routes.)"""
    torch.testing.assert_close(float32_runs["linear-product"], float32_runs["general"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(float32_runs["stream"], float32_runs["general"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(float32_runs["gram-vjp"], float32_runs["general-gram"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_dtypes", ["float32", "bfloat16"])
@pytest.mark.parametrize("route", list(ROUTES))
def test_a_nan_loss_skips_the_update_and_leaves_the_other_tasks_norms_finite(route, loss_dtypes, monkeypatch, tmp_path):
    trajectory, _ = train(route, LOSS_DTYPES[loss_dtypes], monkeypatch, steps=6, nan_at=3, root=tmp_path)
    rows = pq.read_table(tmp_path / route / "metrics").to_pandas()
    rows = rows[rows["split"] == "train"].sort_values(["step", "task"])
    norms = torch.tensor(rows["grad_norm"].to_numpy()).view(6, 3)
    skipped = rows.groupby("step")["step_update_skipped"].first().tolist()
    assert skipped == [False, False, False, True, False, False]
    assert torch.isnan(norms[3, 1]) and torch.isfinite(norms[3, [0, 2]]).all(), norms[3]
    assert torch.isfinite(norms[[0, 1, 2, 4, 5]]).all()
    torch.testing.assert_close(trajectory[3], trajectory[2], rtol=0, atol=0)  # the NaN step left w alone
