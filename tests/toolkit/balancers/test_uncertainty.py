"""Uncertainty weighting (Kendall et al., 2018; survey 1.4): closed-form gradient and optimum of the state."""

import numpy as np
import pytest
import torch

from gradnorm.toolkit.balancers import UncertaintyWeighting
from gradnorm.toolkit.balancers.uncertainty import uncertainty_objective, uncertainty_state_grad

TASKS = ["depth", "seg"]


@pytest.mark.parametrize("regulariser", ["log", "log1p"])
def test_state_gradient_matches_autograd(regulariser):
    state = torch.tensor([0.3, 1.7], dtype=torch.float64, requires_grad=True)
    losses = torch.tensor([2.5, 0.04], dtype=torch.float64)
    (auto,) = torch.autograd.grad(uncertainty_objective(state, losses, regulariser), state)
    torch.testing.assert_close(uncertainty_state_grad(state.detach(), losses, regulariser), auto)


def brute_force_minimiser(loss: float, regulariser: str) -> float:
    """Minimise the one-task objective on a fine grid, independently of the balancer's formulas."""
    if regulariser == "log":
        s = np.linspace(-8, 8, 400_001)
        return float(s[np.argmin(np.exp(-s) * loss + s)])
    sigma = np.linspace(1e-3, 20, 400_001)
    return float(sigma[np.argmin(0.5 / sigma**2 * loss + np.log1p(sigma**2))])


@pytest.mark.parametrize("regulariser", ["log", "log1p"])
def test_state_converges_to_the_closed_form_optimum_for_a_fixed_loss(regulariser):
    fixed = [3.0, 0.2]
    balancer = UncertaintyWeighting(regulariser=regulariser, lr=0.05)
    balancer.bind(TASKS, torch.device("cpu"), torch.float64)
    for _ in range(3000):
        balancer.update(torch.tensor(fixed, dtype=torch.float64))
    expected = [brute_force_minimiser(value, regulariser) for value in fixed]
    np.testing.assert_allclose(balancer.state.numpy(), expected, atol=2e-3)
    if regulariser == "log":
        # The optimum weight exp(-s*) = 1 / L: uncertainty weighting ends at the survey's 1.3 weights.
        np.testing.assert_allclose(balancer.weights().numpy(), [1 / v for v in fixed], rtol=5e-3)


def test_records_name_the_trainable_state():
    config = UncertaintyWeighting().config()
    assert config["trainable_state"]["name"] == "log_variance"
    assert config["lr"] == 0.025


def test_negative_loss_names_the_task():
    balancer = UncertaintyWeighting()
    balancer.bind(TASKS, torch.device("cpu"), torch.float64)
    with pytest.raises(ValueError, match="'seg'"):
        balancer.update(torch.tensor([1.0, -0.1], dtype=torch.float64))


def test_unsupported_regulariser_is_an_error():
    with pytest.raises(ValueError, match="regulariser"):
        UncertaintyWeighting(regulariser="softplus")
    with pytest.raises(ValueError, match="optimizer"):
        UncertaintyWeighting(optimizer="rmsprop")
