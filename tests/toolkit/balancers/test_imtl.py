"""IMTL-L (Liu et al. 2021, section 3.1): the closed-form gradient of e^s L - s, and its fixed point e^s L = 1."""

from __future__ import annotations

import pytest
import torch

from gradnorm.toolkit.balancers import IMTLL, UncertaintyWeighting, imtl_l_state_grad
from tests.toolkit.balancers.test_state_dict import bound

CPU = torch.device("cpu")


def test_closed_form_gradient_matches_autograd():
    s = torch.tensor([0.2, -1.0, 0.7], dtype=torch.float64, requires_grad=True)
    losses = torch.tensor([3.0, 0.5, 0.01], dtype=torch.float64)
    (expected,) = torch.autograd.grad((torch.exp(s) * losses - s).sum(), s)
    torch.testing.assert_close(imtl_l_state_grad(s.detach(), losses), expected)


@pytest.mark.parametrize("optimizer,lr", [("adam", 0.05), ("sgd", 0.05)])
def test_constant_losses_drive_every_scaled_loss_to_one(optimizer, lr):
    balancer = IMTLL(lr=lr, optimizer=optimizer)
    balancer.bind(["a", "b", "c"], CPU, torch.float64)
    losses = torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64)
    for _ in range(3000):
        balancer.update(losses)
    torch.testing.assert_close(balancer.weights() * losses, torch.ones(3, dtype=torch.float64), rtol=1e-3, atol=1e-3)


def test_bad_input_is_refused_naming_it():
    # Resume is covered with every balancer in test_state_dict.py (CASES).
    with pytest.raises(ValueError, match="'c'"):
        bound(IMTLL).update(torch.tensor([1.0, 1.0, -3.0], dtype=torch.float64))


def test_same_trajectory_as_uncertainty_weighting_with_the_state_negated():
    """e^s L - s is Kendall et al.'s e^(-s) L + s with s -> -s; Adam is sign-equivariant, so the weights agree
    step for step (docs/methods.md: their QM9 rows are identical for this reason)."""
    imtl, uncertainty = bound(IMTLL), bound(UncertaintyWeighting)
    for step in range(50):
        losses = torch.tensor([2.0, 0.3, 5.0], dtype=torch.float64) * (1 + 0.1 * torch.sin(torch.tensor(float(step))))
        imtl.update(losses)
        uncertainty.update(losses)
        torch.testing.assert_close(imtl.weights(), uncertainty.weights(), rtol=1e-12, atol=1e-14)
