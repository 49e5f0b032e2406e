"""FAMO (Liu et al. 2023): the effective weights are the gradient coefficients of FAMO's loss, and the logits
follow the update rule of Algorithm 1 (plain step) or the official code's Adam on the same gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradnorm import hooks
from gradnorm.toolkit.balancers import FAMO, famo_weights
from tests.helpers.models import TinyNet, batch, task_losses
from tests.toolkit.balancers.test_state_dict import bound

CPU = torch.device("cpu")


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_effective_weights_give_the_gradient_of_famos_loss():
    """grad_theta sum_i w_i L_i = grad_theta sum_i z_i log L_i / c, c = sum_j z_j / L_j held constant (section 3.3)."""
    model = TinyNet()
    x, y = batch()
    logits = torch.tensor([0.3, -0.5, 0.1], dtype=torch.float32)
    losses = torch.stack(list(task_losses(model, x, y).values()))
    w = famo_weights(logits, losses.detach())
    (ours,) = torch.autograd.grad((w * losses).sum(), model.shared.weight, retain_graph=True)
    z = torch.softmax(logits, 0)
    c = (z / losses.detach()).sum()
    (famo,) = torch.autograd.grad((z * losses.log()).sum() / c, model.shared.weight)
    torch.testing.assert_close(ours, famo, rtol=1e-5, atol=1e-7)
    assert float(w.sum()) == pytest.approx(1.0)


def test_plain_step_follows_algorithm_1():
    """xi <- xi - beta (J_z^T delta + gamma xi), delta = log L(t-1) - log L(t), J_z = diag(z) - z z^T."""
    beta, gamma = 0.3, 0.01
    balancer = FAMO(lr=beta, gamma=gamma, optimizer="sgd")
    balancer.bind(["a", "b", "c"], CPU, torch.float64)
    rng = np.random.default_rng(0)
    xi = np.zeros(3)
    previous = None
    for _ in range(6):
        losses = rng.uniform(0.1, 3.0, size=3)
        weights = balancer.step_weights(torch.tensor(losses), None, None).numpy()
        if previous is not None:
            z = softmax(xi)
            jacobian = np.diag(z) - np.outer(z, z)
            xi = xi - beta * (jacobian.T @ (np.log(previous) - np.log(losses)) + gamma * xi)
        np.testing.assert_allclose(balancer.logits.numpy(), xi, rtol=1e-12, atol=1e-15)
        z = softmax(xi)
        np.testing.assert_allclose(weights, (z / losses) / (z / losses).sum(), rtol=1e-12)
        balancer.update(torch.tensor(losses))
        previous = losses


def test_adam_step_is_the_official_codes_adam_with_weight_decay():
    """The official code: w.grad = autograd of softmax(w) against delta, then Adam(lr, weight_decay=gamma)."""
    balancer = FAMO(lr=0.025, gamma=0.001)
    balancer.bind(["a", "b", "c", "d"], CPU, torch.float64)
    logits = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    reference = torch.optim.Adam([logits], lr=0.025, weight_decay=0.001)
    rng = np.random.default_rng(1)
    previous = None
    for _ in range(10):
        losses = torch.tensor(rng.uniform(0.1, 3.0, size=4))
        balancer.step_weights(losses, None, None)
        if previous is not None:
            delta = previous.log() - losses.log()
            (logits.grad,) = torch.autograd.grad(torch.softmax(logits, 0), logits, grad_outputs=delta)
            reference.step()
        torch.testing.assert_close(balancer.logits, logits.detach(), rtol=1e-12, atol=1e-14)
        balancer.update(losses)
        previous = losses


def test_faster_task_loses_weight():
    """A task whose log loss falls faster gets a smaller logit (FAMO's intent: equal rates of improvement)."""
    balancer = FAMO(lr=0.1, optimizer="sgd", gamma=0.0)
    balancer.bind(["fast", "slow"], CPU, torch.float64)
    for t in range(20):
        losses = torch.tensor([0.8**t, 0.99**t], dtype=torch.float64)
        balancer.step_weights(losses, None, None)
        balancer.update(losses)
    assert balancer.logits[0] < balancer.logits[1]


def test_session_records_famo_weights(tmp_path):
    model = TinyNet()
    x, y = batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    session = hooks.attach(model.shared, FAMO(), runs_root=None)
    for _ in range(3):
        losses = task_losses(model, x, y)
        total = session.loss(losses)
        stacked = torch.stack(list(losses.values())).detach()
        torch.testing.assert_close(total, (famo_weights(session.balancer.logits, stacked) * torch.stack(list(losses.values()))).sum())
        opt.zero_grad()
        total.backward()
        opt.step()
    session.close()


def test_bad_input_is_refused_naming_it():
    # Resume is covered with every balancer in test_state_dict.py (CASES).
    with pytest.raises(ValueError, match="lr"):
        FAMO(lr=0.0)
    with pytest.raises(ValueError, match="gamma"):
        FAMO(gamma=-1.0)
    balancer = bound(FAMO)
    with pytest.raises(ValueError, match="'b'"):
        balancer.step_weights(torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64), None, None)
