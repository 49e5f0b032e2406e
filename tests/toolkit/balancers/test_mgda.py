"""MGDA (Sener and Koltun, 2018; survey 3): the Frank-Wolfe solution is the min-norm point of the convex hull."""

import itertools

import numpy as np
import pytest
import torch

from gradnorm import hooks
from gradnorm.toolkit.balancers import MGDA, min_norm_coefficients
from tests.helpers.models import TinyNet, batch, task_losses


def brute_force_min_norm(grads: np.ndarray, steps: int = 300) -> float:
    """Smallest ||sum_i a_i g_i||^2 over a grid of the 3-simplex."""
    best = np.inf
    for i, j in itertools.product(range(steps + 1), repeat=2):
        if i + j > steps:
            continue
        a = np.array([i, j, steps - i - j]) / steps
        best = min(best, float(np.sum((a @ grads) ** 2)))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_min_norm_point_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    grads = rng.normal(size=(3, 5))
    grads[1] = -0.7 * grads[0] + 0.1 * rng.normal(size=5)  # conflicting tasks: an interior optimum
    alpha = min_norm_coefficients(torch.tensor(grads @ grads.T), max_iter=2000).numpy()
    assert alpha.min() >= 0 and alpha.sum() == pytest.approx(1.0)
    value = float(np.sum((alpha @ grads) ** 2))
    assert value <= brute_force_min_norm(grads) + 1e-9
    # Optimality (KKT on the simplex): no vertex direction decreases the norm.
    gram = grads @ grads.T
    assert (gram @ alpha).min() >= alpha @ gram @ alpha - 1e-4


def test_two_tasks_closed_form():
    g1, g2 = np.array([1.0, 0.0]), np.array([-0.5, 2.0])
    gram = np.stack([g1, g2]) @ np.stack([g1, g2]).T
    expected = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0, 1)  # Sener and Koltun, Algorithm 1
    alpha = min_norm_coefficients(torch.tensor(gram)).numpy()
    np.testing.assert_allclose(alpha, [expected, 1 - expected], atol=1e-9)


@pytest.mark.parametrize("space", ["shared_layer", "representation"])
def test_session_applies_min_norm_of_autograd_gradients(space):
    model = TinyNet()
    x, y = batch()
    balancer = MGDA(space=space)
    session = hooks.attach(model.shared, balancer)
    losses = task_losses(model, x, y)
    total = session.loss(losses)
    if space == "shared_layer":
        target = model.shared.weight
        grads = [torch.autograd.grad(v, target, retain_graph=True)[0].flatten() for v in losses.values()]
    else:
        z = session.capture.current()
        grads = [torch.autograd.grad(v, z, retain_graph=True)[0].flatten() for v in losses.values()]
    matrix = torch.stack(grads).double()
    expected = min_norm_coefficients(matrix @ matrix.T)
    np.testing.assert_allclose(session.balancer.weights().numpy(), expected.numpy(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(total, (expected.float() * torch.stack(list(losses.values()))).sum())
    assert balancer.config()["recorded_weight"].startswith("effective")
    assert balancer.name == ("mgda-ub" if space == "representation" else "mgda")


def test_bad_options_and_input():
    with pytest.raises(ValueError, match="space"):
        MGDA(space="all_parameters")
    with pytest.raises(ValueError, match="normalisation"):
        MGDA(normalisation="max")
    model = TinyNet()
    with pytest.raises(ValueError, match="module"):
        hooks.attach(model.shared.weight, MGDA(space="representation"))
    balancer = MGDA(normalisation="loss")
    balancer.bind(["a", "b"], torch.device("cpu"), torch.float64)
    with pytest.raises(ValueError, match="'b'"):
        balancer.step_weights(torch.tensor([1.0, -2.0], dtype=torch.float64), None, torch.ones(2, 3, dtype=torch.float64))
