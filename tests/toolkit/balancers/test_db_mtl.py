"""DB-MTL (Lin et al. 2023): log losses, every log-loss gradient rescaled to the largest one's norm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradnorm import hooks
from gradnorm.toolkit.balancers import DBMTL
from tests.helpers.models import TinyNet, batch, task_losses
from tests.toolkit.balancers.test_state_dict import bound

CPU = torch.device("cpu")


def test_without_averaging_every_task_contributes_the_largest_log_gradient_norm():
    """beta = 0: ||w_i grad_W L_i|| = max_j ||grad_W log L_j|| for every task, gradients by autograd of log L."""
    model = TinyNet()
    x, y = batch()
    session = hooks.attach(model.shared, DBMTL(beta=0.0))
    losses = task_losses(model, x, y)
    log_grads = [torch.autograd.grad(v.log(), model.shared.weight, retain_graph=True)[0] for v in losses.values()]
    grads = [torch.autograd.grad(v, model.shared.weight, retain_graph=True)[0] for v in losses.values()]
    session.loss(losses)
    w = session.balancer.weights()
    target = max(float(g.norm()) for g in log_grads)
    contributions = [float((wi * g).norm()) for wi, g in zip(w, grads)]
    np.testing.assert_allclose(contributions, target, rtol=1e-4)
    session.close()


def test_moving_average_follows_libmtls_schedule():
    """u(t) = m(t) + (beta / t^sigma) (u(t-1) - m(t)), m_i = ||g_i|| / L_i."""
    beta, sigma = 0.9, 0.5
    balancer = DBMTL(beta=beta, sigma=sigma)
    balancer.bind(["a", "b"], CPU, torch.float64)
    rng = np.random.default_rng(2)
    average = None
    for t in range(1, 7):
        losses = rng.uniform(0.2, 2.0, size=2)
        grads = rng.normal(size=(2, 4))
        m = np.linalg.norm(grads, axis=1) / losses
        average = m if average is None else m + beta / t**sigma * (average - m)
        w = balancer.step_weights(torch.tensor(losses), None, torch.tensor(grads)).numpy()
        balancer.update(torch.tensor(losses))
        np.testing.assert_allclose(w, average.max() / (average * losses), rtol=1e-12)


def test_bad_input_is_refused_naming_it():
    # Resume is covered with every balancer in test_state_dict.py (CASES).
    with pytest.raises(ValueError, match="beta"):
        DBMTL(beta=1.0)
    with pytest.raises(RuntimeError, match="per-task gradients"):
        bound(DBMTL).step_weights(torch.ones(3, dtype=torch.float64), None, None)
