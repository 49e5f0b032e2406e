"""Properties GradNorm must have (paper section 3 and Figure 2)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradnorm import hooks
from gradnorm.experiments import toy
from gradnorm.experiments.toy_training import train_toy
from gradnorm.toolkit.balancers import GradNorm, gradnorm_terms


class ThreeHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(16, 2) for _ in range(3))

    def forward(self, x):
        h = self.trunk(x)
        return [head(h) for head in self.heads]


def train_three(model, order, steps=30, seed=0):
    """Train with the tasks handed in ``order``; return the final weights by task name."""
    g = torch.Generator().manual_seed(seed)
    scales = {"a": 1.0, "b": 10.0, "c": 100.0}
    session = hooks.attach(model.trunk[2], GradNorm(alpha=0.5))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(steps):
        x = torch.randn(32, 10, generator=g, dtype=torch.float64)
        y = torch.randn(32, 3, 2, generator=g, dtype=torch.float64)
        outputs = dict(zip("abc", model(x)))
        losses = {name: F.mse_loss(outputs[name], y[:, "abc".index(name)] * scales[name]) for name in order}
        loss = session.loss(losses)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return session.weights()


def test_weights_sum_to_T_and_stay_positive_on_the_toy():
    config = toy.ToyConfig(num_tasks=10, train_size=500, test_size=100)
    result = train_toy(config, GradNorm(alpha=0.12, lr=0.1, min_weight=1e-3), steps=120, run_name="unused", eval_every=0)
    trajectory = torch.tensor(result.weights)
    assert torch.allclose(trajectory.sum(dim=1), torch.full((120,), 10.0), atol=1e-4)
    assert (trajectory > 0).all()
    # With lr=0.1 some weights are pushed down to the floor: positivity holds there too.
    assert trajectory.min() >= 1e-3 * 0.999
    assert trajectory.std(dim=1).max() > 0.1, "the weights should have moved apart"


def test_permuting_tasks_permutes_the_weights():
    torch.manual_seed(0)
    model = ThreeHeads().double()
    forward = train_three(copy.deepcopy(model), order="abc")
    permuted = train_three(copy.deepcopy(model), order="cab")
    assert list(permuted) == ["c", "a", "b"]
    for task in "abc":
        assert permuted[task] == pytest.approx(forward[task], rel=1e-9)
    assert max(forward.values()) - min(forward.values()) > 0.01


def test_alpha_zero_with_equal_ratios_pulls_grad_norms_together():
    """alpha = 0 pins every G_i to the mean (paper 3.1): with fixed n_i the spread of G_i shrinks."""
    balancer = GradNorm(alpha=0.0, lr=0.01)
    balancer.bind(["a", "b", "c"], torch.device("cpu"), torch.float64)
    norms = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)
    losses = torch.tensor([2.0, 3.0, 5.0], dtype=torch.float64)  # constant, so every loss ratio is 1
    spread_before = (balancer.weights() * norms).std() / (balancer.weights() * norms).mean()
    for _ in range(400):
        balancer.update(losses, norms)
    grad_norms = balancer.weights() * norms
    spread_after = grad_norms.std() / grad_norms.mean()
    assert spread_after < 0.05 * spread_before
    # Equal G_i means w_i proportional to 1/n_i, renormalised to sum T = 3.
    expected = (1 / norms) * 3 / (1 / norms).sum()
    assert balancer.weights().tolist() == pytest.approx(expected.tolist(), rel=0.05)


def test_closed_form_gradient_matches_autograd_of_eq2():
    """dL_grad/dw from the closed form equals autograd on eq. 2 with the target held constant."""
    g = torch.Generator().manual_seed(4)
    for reduction in ("mean", "sum"):
        for num_tasks in (2, 5, 9):
            w = (torch.rand(num_tasks, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
            n = torch.rand(num_tasks, generator=g, dtype=torch.float64) * 10
            r = torch.rand(num_tasks, generator=g, dtype=torch.float64) + 0.5
            terms = gradnorm_terms(w.detach(), n, r, alpha=1.5, reduction=reduction)
            G = w * n
            target = (G.mean() * r**1.5).detach()
            loss = (G - target).abs().sum() / (num_tasks if reduction == "mean" else 1)
            (grad,) = torch.autograd.grad(loss, w)
            assert terms.weight_grad.tolist() == pytest.approx(grad.tolist(), rel=1e-12)
            assert float(terms.grad_loss) == pytest.approx(float(loss.detach()), rel=1e-12)


def test_toy_T2_raises_the_small_sigma_weight_above_one():
    """Paper Figure 2 (top): with sigma = (1, 100), GradNorm raises w_0 to counter task 1's gradients."""
    config = toy.ToyConfig(num_tasks=2, train_size=2000, test_size=200)
    result = train_toy(config, GradNorm(alpha=0.12), steps=150, run_name="unused", eval_every=0)
    w0 = [w[0] for w in result.weights]
    assert w0[-1] > 1.5
    assert result.time_averaged_weights()[0] > 1.0


def test_non_finite_loss_skips_the_update_and_keeps_weights_finite():
    balancer = GradNorm(alpha=1.0)
    balancer.bind(["a", "b"], torch.device("cpu"), torch.float64)
    norms = torch.tensor([1.0, 3.0], dtype=torch.float64)
    balancer.update(torch.tensor([1.0, 1.0], dtype=torch.float64), norms)
    before = balancer.weights().clone()
    for bad in (float("nan"), float("inf")):
        stats = balancer.update(torch.tensor([bad, 1.0], dtype=torch.float64), norms)
        assert bool(stats.step_update_skipped)
        assert torch.equal(balancer.weights(), before)
    stats = balancer.update(torch.tensor([0.5, 1.0], dtype=torch.float64), torch.tensor([float("nan"), 3.0], dtype=torch.float64))
    assert bool(stats.step_update_skipped) and torch.equal(balancer.weights(), before)
    # The optimiser state was not poisoned: the next good step moves the weights and stays finite.
    stats = balancer.update(torch.tensor([0.5, 1.0], dtype=torch.float64), norms)
    assert not bool(stats.step_update_skipped)
    assert torch.isfinite(balancer.weights()).all() and not torch.equal(balancer.weights(), before)


def test_steps_that_would_leave_the_weights_non_finite_are_skipped():
    """0/0 inverse rates (every loss of a step is zero) and an overflowing SGD step: skipped, recorded."""
    balancer = GradNorm(alpha=1.5, lr=100.0, optimizer="sgd", reduction="sum")
    balancer.bind(["a", "b", "c"], torch.device("cpu"), torch.float32)
    balancer.update(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 2.0, 3.0]))
    before = balancer.weights().clone()
    zeros = balancer.update(torch.zeros(3), torch.tensor([1.0, 2.0, 3.0]))
    assert bool(zeros.step_update_skipped) and torch.equal(balancer.weights(), before)
    huge = balancer.update(torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 3.4e37]))  # 100 x 3.4e37 overflows float32
    assert bool(huge.step_update_skipped) and torch.equal(balancer.weights(), before)
    assert torch.isfinite(balancer.weights()).all()
    moved = balancer.update(torch.tensor([1.0, 0.5, 0.2]), torch.tensor([1.0, 2.0, 3.0]))
    assert not bool(moved.step_update_skipped) and not torch.equal(balancer.weights(), before)
