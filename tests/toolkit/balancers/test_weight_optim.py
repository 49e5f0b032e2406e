"""The weights' own Adam (paper 5.5) against ``torch.optim.Adam``: bit for bit in float32 and float64 over
many steps, with its step count in float64 whatever the weights' dtype, through checkpoints too."""

from __future__ import annotations

import pytest
import torch

from gradnorm.toolkit.balancers import GradNorm
from gradnorm.toolkit.balancers.weight_optim import STEPS_DTYPE, WeightOptimizer

STEPS = 3000


def gradients(dtype: torch.dtype, steps: int = STEPS, size: int = 7) -> list[torch.Tensor]:
    """Gradients over six orders of magnitude, as GradNorm's dL_grad/dw are (they scale with the norms)."""
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(size, generator=generator, dtype=torch.float64) * 10.0 ** int(torch.randint(-3, 3, (1,), generator=generator))).to(dtype)
        for _ in range(steps)
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lr", [0.025, 0.1])  # the paper's rate and the largest with the overflow-free order
def test_adam_agrees_with_torch_optim_adam_bit_for_bit(dtype, lr):
    reference = torch.nn.Parameter(torch.ones(7, dtype=dtype))
    adam = torch.optim.Adam([reference], lr=lr)
    optimizer = WeightOptimizer(lr=lr)
    weights = torch.ones(7, dtype=dtype)
    for step, grad in enumerate(gradients(dtype)):
        reference.grad = grad.clone()
        adam.step()
        weights = optimizer.step(weights, grad, torch.tensor(True))
        assert torch.equal(weights, reference.detach()), f"step {step}: {weights.tolist()} vs {reference.tolist()}"
    state = adam.state[reference]
    assert torch.equal(optimizer._exp_avg, state["exp_avg"]) and torch.equal(optimizer._exp_avg_sq, state["exp_avg_sq"])
    assert optimizer._steps is not None and optimizer._steps.dtype == STEPS_DTYPE and float(optimizer._steps) == STEPS


def test_a_float32_step_count_would_not_agree():
    """Why the count is float64: torch.optim.Adam forms 1 - beta^t in double precision."""
    steps32 = torch.tensor(7.0, dtype=torch.float32)
    assert float(1 - 0.999**steps32) != float(torch.tensor(1 - 0.999**7, dtype=torch.float32))


def test_refused_steps_leave_the_state_and_count_as_they_were():
    optimizer = WeightOptimizer(lr=0.025)
    weights = torch.ones(3)
    weights = optimizer.step(weights, torch.tensor([0.1, -0.2, 0.3]), torch.tensor(True))
    before = [t.clone() for t in (optimizer._steps, optimizer._exp_avg, optimizer._exp_avg_sq)]
    same = optimizer.step(weights, torch.tensor([float("nan"), 1.0, 1.0]), torch.tensor(False))
    assert torch.equal(same, weights)
    for kept, was in zip((optimizer._steps, optimizer._exp_avg, optimizer._exp_avg_sq), before):
        assert torch.equal(kept, was)


def test_gradnorm_keeps_the_count_in_float64_through_a_checkpoint():
    tasks = ["a", "b", "c"]
    first = GradNorm(alpha=1.5)
    first.bind(tasks, torch.device("cpu"), torch.float32)
    generator = torch.Generator().manual_seed(1)
    steps = [(torch.rand(3, generator=generator) + 0.2, torch.rand(3, generator=generator) * 3) for _ in range(8)]
    for losses, norms in steps[:4]:
        first.update(losses, norms)
    state = first.state_dict()
    assert state["method"]["optimizer"]["steps"].dtype == STEPS_DTYPE
    assert state["weights"].dtype == torch.float32 and state["method"]["optimizer"]["exp_avg"].dtype == torch.float32
    resumed = GradNorm(alpha=1.5)
    resumed.load_state_dict(state)
    resumed.bind(tasks, torch.device("cpu"), torch.float32)
    for losses, norms in steps[4:]:
        first.update(losses, norms)
        resumed.update(losses, norms)
        assert torch.equal(first.weights(), resumed.weights())
    # A state saved with the count in float32 (before it was float64) loads, exactly.
    old = first.state_dict()
    old["method"]["optimizer"]["steps"] = old["method"]["optimizer"]["steps"].to(torch.float32)
    again = GradNorm(alpha=1.5)
    again.load_state_dict(old)
    again.bind(tasks, torch.device("cpu"), torch.float32)
    assert again.optimizer._steps is not None and again.optimizer._steps.dtype == STEPS_DTYPE and float(again.optimizer._steps) == 8
