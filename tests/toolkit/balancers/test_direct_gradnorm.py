"""Direct gradient normalisation (survey 2.1, side note): every task's gradient at W has norm r_i^alpha."""

import numpy as np
import pytest
import torch

from gradnorm import hooks
from gradnorm.toolkit.balancers import DirectGradNorm
from tests.helpers.models import TinyNet, batch, task_losses


def weighted_norms_by_autograd(model, losses, weights):
    return [torch.autograd.grad(w * value, model.shared.weight, retain_graph=True)[0].norm().item() for w, value in zip(weights, losses.values())]


def test_alpha_zero_gives_unit_gradient_norms():
    model = TinyNet()
    x, y = batch()
    session = hooks.attach(model.shared, DirectGradNorm())
    losses = task_losses(model, x, y)
    session.loss(losses)
    norms = weighted_norms_by_autograd(model, losses, session.balancer.weights().tolist())
    np.testing.assert_allclose(norms, [1.0, 1.0, 1.0], rtol=1e-5)


def test_alpha_scales_norms_by_inverse_training_rate():
    model = TinyNet()
    x, y = batch()
    session = hooks.attach(model.shared, DirectGradNorm(alpha=0.5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    first = {k: v.item() for k, v in task_losses(model, x, y).items()}
    for _ in range(3):
        losses = task_losses(model, x, y)
        total = session.loss(losses)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    losses = task_losses(model, x, y)
    session.loss(losses)
    ratio = np.array([losses[k].item() / first[k] for k in losses])
    expected = (ratio / ratio.mean()) ** 0.5
    norms = weighted_norms_by_autograd(model, losses, session.balancer.weights().tolist())
    np.testing.assert_allclose(norms, expected, rtol=1e-5)


def test_negative_loss_with_alpha_and_bad_alpha():
    balancer = DirectGradNorm(alpha=1.0)
    balancer.bind(["a", "b"], torch.device("cpu"), torch.float64)
    with pytest.raises(ValueError, match="'a'"):
        balancer.step_weights(torch.tensor([-1.0, 1.0], dtype=torch.float64), torch.ones(2, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="alpha"):
        DirectGradNorm(alpha=-0.1)
