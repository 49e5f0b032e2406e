"""Hugging Face Accelerate (docs/hugging-face.md): a real ``Accelerator`` on the CPU, prepared model,
optimiser and data loader, ``accelerator.backward``: the same GradNorm weights and network as the plain
loop on the same batches; with Accelerate's bf16 mixed precision the weights follow the float32 run's
within the bound of ``tests/hooks/test_precision.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch

accelerate = pytest.importorskip("accelerate", reason="accelerate is not installed (pip install 'gradnorm-toolkit[huggingface]')")

from accelerate.state import AcceleratorState, GradientState  # noqa: E402  (after importorskip)

from gradnorm import hooks  # noqa: E402
from gradnorm.experiments import toy  # noqa: E402
from gradnorm.toolkit import analysis, runs  # noqa: E402
from gradnorm.toolkit.balancers import GradNorm  # noqa: E402
from tests.hooks.test_lifecycle import global_hooks, hooks_left  # noqa: E402

STEPS, BATCH, TASKS = 12, 25, 3
BF16_BOUND = 4e-3  # tests/hooks/test_precision.py's bound for bfloat16 losses


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state; each test starts from none (mixed precision differs)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def setup():
    config = toy.ToyConfig(num_tasks=TASKS, train_size=STEPS * BATCH, test_size=8)
    return toy.make_model(config), toy.make_data(config)


def loader(data: toy.ToyData) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.x_train, data.y_train), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0)
    )


def with_accelerator(base, data, tmp_path, heads="auto", **accelerator_options):
    accelerator = accelerate.Accelerator(cpu=True, **accelerator_options)
    model = copy.deepcopy(base)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model, opt, batches = accelerator.prepare(model, opt, loader(data))
    unwrapped = accelerator.unwrap_model(model)
    before = global_hooks()
    session = hooks.attach(unwrapped.shared_layer, GradNorm(alpha=0.12), heads=heads, runs_root=tmp_path, run_name="acc")
    seen, trajectory = [], []
    for x, y in batches:
        seen.append((x.clone(), y.clone()))
        loss = session.loss(toy.task_losses(model(x), y))
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        trajectory.append(session.balancer.weights().clone())
    session.close()
    return unwrapped, session, torch.stack(trajectory), seen, hooks_left(unwrapped, before)


def plain_loop(base, seen, heads="auto"):
    model = copy.deepcopy(base)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    session = hooks.attach(model.shared_layer, GradNorm(alpha=0.12), heads=heads)
    trajectory = []
    for x, y in seen:
        loss = session.loss(toy.task_losses(model(x), y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        trajectory.append(session.balancer.weights().clone())
    session.close()
    return model, torch.stack(trajectory)


@pytest.mark.parametrize("heads", ["auto", None])
def test_an_accelerator_trains_as_the_plain_loop(setup, tmp_path, heads):
    base, data = setup
    model, session, weights, seen, left = with_accelerator(base, data, tmp_path, heads=heads)
    assert len(seen) == STEPS and (weights[-1] - 1).abs().max() > 1e-3  # GradNorm moved the weights
    plain, expected = plain_loop(base, seen, heads)
    torch.testing.assert_close(weights, expected, rtol=0, atol=0)
    for trained, reference in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(trained, reference, rtol=0, atol=0)
    assert (session.taps is not None) == (heads == "auto") and left == []
    meta = runs.read_run_json(tmp_path / "acc")
    assert meta["status"] == "finished"
    assert meta["grad_norm_path"].startswith("head-taps/linear-product") == (heads == "auto"), meta["grad_norm_path"]
    assert analysis.list_runs(tmp_path)["rows"].iloc[0] == STEPS * TASKS


def test_accelerate_bf16_mixed_precision_follows_the_float32_weights(setup, tmp_path):
    base, data = setup
    _, session, weights, seen, _ = with_accelerator(base, data, tmp_path, mixed_precision="bf16")
    assert session.taps is not None and session.taps.path == "linear-product"
    _, expected = plain_loop(base, seen)
    assert not torch.equal(weights, expected)  # autocast ran: the losses were bfloat16
    torch.testing.assert_close(weights, expected, rtol=0, atol=BF16_BOUND)
