"""Mixed precision: bf16 autocast keeps GradNorm finite and close to float32; whatever scales the backward
(a GradScaler in float16 or bfloat16, a loss multiplied by hand) is divided out of the tapped norms,
read from the backward itself, so the weights are those of an unscaled run."""

from __future__ import annotations

import copy

import pytest
import torch

from gradnorm import hooks
from gradnorm.experiments import toy
from gradnorm.toolkit.balancers import GradNorm

HEADS = {"general": None, "default": "auto", "given": "given"}


def run(model, data, steps: int, autocast: bool, heads="general", scaler=None, root=None, name="run", dtype=torch.bfloat16, by_hand: float = 0.0):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    session = hooks.attach(
        model.shared_layer, GradNorm(alpha=0.12), heads=list(model.heads) if heads == "given" else HEADS[heads], runs_root=root, run_name=name
    )
    generator = torch.Generator().manual_seed(2)
    trajectory = []
    for _ in range(steps):
        index = torch.randint(0, len(data.x_train), (32,), generator=generator)
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            outputs = model(data.x_train[index])
        losses = toy.task_losses([o.float() for o in outputs], data.y_train[index])
        loss = session.loss(losses)
        optimizer.zero_grad()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        elif by_hand:
            (loss * by_hand).backward()
            for parameter in model.parameters():
                parameter.grad /= by_hand
            optimizer.step()
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


@pytest.mark.parametrize("heads", ["default", "given"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_grad_scalers_scale_is_divided_out_of_the_tapped_norms(setup, tmp_path, heads, dtype):
    """Against the general path under the same scaler (its norms come from the unscaled losses, so the
    scale cannot reach them) and, in bfloat16, against the unscaled run. (In float16 the unscaled run's
    gradients underflow where the scaled run's do not, which is what the scaler is for.)"""
    import pyarrow.parquet as pq

    base, data = setup
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled = run(copy.deepcopy(base), data, 20, autocast=True, heads=heads, scaler=scaler, root=tmp_path, name="scaled", dtype=dtype)
    assert scaler.get_scale() == 2.0**10  # no step overflowed: every run below took the same steps
    general_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    general = run(copy.deepcopy(base), data, 20, autocast=True, heads="general", scaler=general_scaler, root=tmp_path, name="general", dtype=dtype)
    torch.testing.assert_close(scaled, general, rtol=1e-4, atol=1e-5)
    names = ["scaled", "general"]
    if dtype == torch.bfloat16:
        plain = run(copy.deepcopy(base), data, 20, autocast=True, heads=heads, root=tmp_path, name="plain", dtype=dtype)
        # Scaling by a power of two is exact, so the recorded G_i and the weights agree with the unscaled run.
        torch.testing.assert_close(scaled, plain, rtol=1e-4, atol=1e-5)
        names.append("plain")
    norms = {name: torch.tensor(pq.read_table(tmp_path / name / "metrics").to_pandas().sort_values(["step", "task"])["grad_norm"].to_numpy()) for name in names}
    # The general path's norms are those of its own backward in the autocast dtype: the same to its rounding.
    torch.testing.assert_close(norms["scaled"], norms["general"], rtol=1e-2, atol=1e-6)
    if "plain" in norms:
        torch.testing.assert_close(norms["scaled"], norms["plain"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("heads", ["default", "given"])
def test_a_loss_multiplied_by_hand_gives_the_weights_of_the_unscaled_run(setup, heads):
    base, data = setup
    plain = run(copy.deepcopy(base), data, 15, autocast=False, heads=heads)
    scaled = run(copy.deepcopy(base), data, 15, autocast=False, heads=heads, by_hand=1024.0)
    torch.testing.assert_close(scaled, plain, rtol=1e-6, atol=1e-7)
    general = run(copy.deepcopy(base), data, 15, autocast=False, heads="general")
    torch.testing.assert_close(scaled, general, rtol=1e-5, atol=1e-6)


def test_steps_the_grad_scaler_skips_skip_the_weight_update_and_are_recorded(setup, tmp_path):
    """A loss scale near float32's limit overflows the first backward passes; the scaler skips those
    optimiser steps and backs off, and GradNorm must skip the same steps and record them as skipped."""
    import pyarrow.parquet as pq

    base, data = setup
    model = copy.deepcopy(base)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)  # small enough for the 1e6-scaled losses below
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-4)
    session = hooks.attach(model.shared_layer, GradNorm(alpha=0.12), heads=list(model.heads), runs_root=tmp_path, run_name="overflow")
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
