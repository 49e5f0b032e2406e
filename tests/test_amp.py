"""Mixed precision: bf16 autocast keeps GradNorm finite and close to float32; with heads= the AMP loss
scale of a GradScaler is divided out of the tapped norms."""
from __future__ import annotations

import copy

import pytest
import torch

import hooks
from toolkit import GradNorm, toy


def run(model, data, steps: int, autocast: bool, heads: bool = False, scaler=None, root=None, name="run"):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    session = hooks.attach(model.shared_layer, GradNorm(alpha=0.12), heads=list(model.heads) if heads else None, grad_scaler=scaler,
                           runs_root=root, run_name=name)
    generator = torch.Generator().manual_seed(2)
    trajectory = []
    for _ in range(steps):
        index = torch.randint(0, len(data.x_train), (32,), generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outputs = model(data.x_train[index])
        losses = toy.task_losses([o.float() for o in outputs], data.y_train[index])
        loss = session.loss(losses)
        optimizer.zero_grad()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        trajectory.append(session.balancer.weights().clone())
    session.close()
    return torch.stack(trajectory)


@pytest.fixture(scope="module")
def setup():
    config = toy.ToyConfig(num_tasks=3, train_size=256, test_size=16)
    return toy.make_model(config), toy.make_data(config)


def test_bf16_autocast_stays_finite_and_near_float32(setup):
    base, data = setup
    full = run(copy.deepcopy(base), data, 30, autocast=False)
    half = run(copy.deepcopy(base), data, 30, autocast=True)
    assert torch.isfinite(half).all() and (half > 0).all()
    torch.testing.assert_close(half.sum(1), torch.full((30,), 3.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.02)


def test_grad_scaler_scale_is_divided_out_of_tapped_norms(setup, tmp_path):
    import pyarrow.parquet as pq

    base, data = setup
    plain = run(copy.deepcopy(base), data, 20, autocast=True, heads=True, root=tmp_path, name="plain")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled = run(copy.deepcopy(base), data, 20, autocast=True, heads=True, scaler=scaler, root=tmp_path, name="scaled")
    # Scaling by a power of two is exact, so the recorded G_i and the weights agree with the unscaled run.
    torch.testing.assert_close(scaled, plain, rtol=1e-4, atol=1e-5)
    norms = {name: pq.read_table(tmp_path / name / "metrics").to_pandas().sort_values(["step", "task"])["grad_norm"].to_numpy() for name in ("plain", "scaled")}
    torch.testing.assert_close(torch.tensor(norms["scaled"]), torch.tensor(norms["plain"]), rtol=1e-4, atol=1e-7)
