"""Survey 1.1-1.3: loss divided by its initial, prior or real-time value."""

import math

import numpy as np
import pytest
import torch

from gradnorm import hooks
from gradnorm.toolkit.balancers import InitialLossWeights, PriorLossWeights, RealTimeLossWeights, prior_cross_entropy, prior_l2
from tests.helpers.models import TinyNet, batch, task_losses

TASKS = ["a", "b", "c"]


def bound(balancer):
    balancer.bind(TASKS, torch.device("cpu"), torch.float64)
    return balancer


def test_initial_loss_weights_are_reciprocal_of_first_loss():
    balancer = bound(InitialLossWeights())
    first = torch.tensor([2.0, 0.5, 40.0], dtype=torch.float64)
    stats = balancer.update(first)
    assert stats.weight.tolist() == [1.0, 1.0, 1.0]  # step 0 trains before L(0) is known
    np.testing.assert_allclose(balancer.weights().numpy(), [0.5, 2.0, 0.025])
    balancer.update(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    np.testing.assert_allclose(balancer.weights().numpy(), [0.5, 2.0, 0.025])


def test_initial_loss_weights_mean_of_first_k():
    balancer = bound(InitialLossWeights(initial_loss=2))
    balancer.update(torch.tensor([2.0, 4.0, 6.0], dtype=torch.float64))
    balancer.update(torch.tensor([4.0, 2.0, 2.0], dtype=torch.float64))
    np.testing.assert_allclose(balancer.weights().numpy(), [1 / 3.0, 1 / 3.0, 1 / 4.0])


def test_prior_cross_entropy_is_label_entropy():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    p = np.array([3, 1, 2]) / 6
    assert prior_cross_entropy(labels, 3) == pytest.approx(float(-(p * np.log(p)).sum()))
    assert prior_cross_entropy(labels, 3, prior="uniform") == pytest.approx(math.log(3))


def test_prior_l2_is_label_variance():
    targets = torch.tensor([[1.0, 10.0], [3.0, 14.0], [5.0, 30.0]])
    array = targets.numpy()
    assert prior_l2(targets) == pytest.approx(float(((array - array.mean(axis=0)) ** 2).mean()))


def test_prior_weights_are_fixed_reciprocals():
    balancer = bound(PriorLossWeights({"a": 2.0, "b": 0.25, "c": 1.0}))
    np.testing.assert_allclose(balancer.weights().numpy(), [0.5, 4.0, 1.0])
    stats = balancer.update(torch.tensor([1.0, 1.0, 3.0], dtype=torch.float64))
    np.testing.assert_allclose(stats.loss_ratio.numpy(), [0.5, 4.0, 3.0])
    np.testing.assert_allclose(balancer.weights().numpy(), [0.5, 4.0, 1.0])


def test_real_time_gradient_is_grad_over_loss():
    model = TinyNet()
    x, y = batch()
    session = hooks.attach(model.shared, RealTimeLossWeights())
    losses = task_losses(model, x, y)
    total = session.loss(losses)
    params = list(model.parameters())
    got = torch.autograd.grad(total, params)
    reference_losses = task_losses(model, x, y)
    expected = [torch.zeros_like(p) for p in params]
    for value in reference_losses.values():
        grads = torch.autograd.grad(value, params, allow_unused=True, retain_graph=True)
        for acc, g in zip(expected, grads):
            if g is not None:
                acc += g / value.item()
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    np.testing.assert_allclose(session.balancer.weights().numpy(), [1 / v.item() for v in reference_losses.values()], rtol=1e-6)


def test_negative_loss_is_rejected_naming_the_task():
    balancer = bound(RealTimeLossWeights())
    with pytest.raises(ValueError, match="'b'"):
        balancer.step_weights(torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64), None, None)
    with pytest.raises(ValueError, match="'c'"):
        bound(InitialLossWeights()).update(torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="'a'"):
        bound(PriorLossWeights([-1.0, 1.0, 1.0]))


def test_unsupported_options_are_errors():
    with pytest.raises(ValueError, match="initial_loss"):
        InitialLossWeights(initial_loss="prior")
    with pytest.raises(ValueError, match="prior"):
        prior_cross_entropy(torch.tensor([0, 1]), 2, prior="median")
    with pytest.raises(ValueError, match="labels"):
        prior_cross_entropy(torch.tensor([0, 3]), 2)


def test_real_time_zero_loss_uses_the_floor_not_infinity():
    from gradnorm.toolkit.balancers.checks import LOSS_FLOOR

    balancer = bound(RealTimeLossWeights())
    weights = balancer.step_weights(torch.tensor([0.0, 2.0, 4.0], dtype=torch.float64), None, None)
    np.testing.assert_allclose(weights.numpy(), [1 / LOSS_FLOOR, 0.5, 0.25])
