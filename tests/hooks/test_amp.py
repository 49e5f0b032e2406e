"""Mixed precision: bf16 autocast keeps GradNorm finite and close to float32; with heads= the AMP loss
scale of a GradScaler is divided out of the tapped norms."""

from __future__ import annotations

import copy

import pytest
import torch

from gradnorm import hooks
from gradnorm.experiments import toy
from gradnorm.toolkit.balancers import GradNorm


def run(model, data, steps: int, autocast: bool, heads: bool = False, scaler=None, root=None, name="run"):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    session = hooks.attach(
        model.shared_layer, GradNorm(alpha=0.12), heads=list(model.heads) if heads else None, grad_scaler=scaler, runs_root=root, run_name=name
    )
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


def test_steps_the_grad_scaler_skips_skip_the_weight_update_and_are_recorded(setup, tmp_path):
    """A loss scale near float32's limit overflows the first backward passes; the scaler skips those
    optimiser steps and backs off, and GradNorm must skip the same steps and record them as skipped."""
    import pyarrow.parquet as pq

    base, data = setup
    model = copy.deepcopy(base)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)  # small enough for the 1e6-scaled losses below
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-4)
    session = hooks.attach(model.shared_layer, GradNorm(alpha=0.12), heads=list(model.heads), grad_scaler=scaler, runs_root=tmp_path, run_name="overflow")
    scaler_skipped, weights = [], [session.balancer.weights().clone() if session.balancer.bound else None]
    for step in range(12):
        index = torch.arange(step * 16, step * 16 + 16) % len(data.x_train)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = model(data.x_train[index])
        # Large losses (1e6 x the toy's) make the scaled gradients overflow float32 until the scale backs off.
        loss = session.loss([1e6 * task_loss for task_loss in toy.task_losses([o.float() for o in outputs], data.y_train[index])])
        optimizer.zero_grad()
        scale_before = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scaler_skipped.append(scaler.get_scale() < scale_before)
        weights.append(session.balancer.weights().clone())
    session.close()
    assert any(scaler_skipped[1:]) and not all(scaler_skipped), scaler_skipped  # both kinds of step happened
    table = pq.read_table(tmp_path / "overflow" / "metrics").to_pandas()
    recorded = table[table["split"] == "train"].groupby("step")["step_update_skipped"].first().tolist()
    # Step 0 only sets L_i(0); from step 1 on GradNorm skips exactly where the scaler did.
    assert recorded[1:] == scaler_skipped[1:], (str(recorded), str(scaler_skipped))
    for step in range(1, 12):
        if scaler_skipped[step]:
            torch.testing.assert_close(weights[step + 1], weights[step], rtol=0, atol=0)
