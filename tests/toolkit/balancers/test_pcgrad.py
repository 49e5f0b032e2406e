"""PCGrad (Yu et al., 2020; survey 2.2, Algorithm 1): projections, the non-conflict property, and the
gradient the trunk actually receives through the session."""

import random

import numpy as np
import pytest
import torch

from gradnorm import hooks
from gradnorm.toolkit.balancers import PCGrad, pcgrad_coefficients
from tests.helpers.models import TinyNet, batch, task_losses


def algorithm_1(grads: np.ndarray, orders: list[list[int]]) -> np.ndarray:
    """PCGrad's projections on the vectors themselves, as written in Algorithm 1."""
    projected = grads.copy()
    for i, order in enumerate(orders):
        for j in order:
            dot = projected[i] @ grads[j]
            if dot < 0:
                projected[i] = projected[i] - dot / (grads[j] @ grads[j]) * grads[j]
    return projected


@pytest.mark.parametrize("seed", range(5))
def test_coefficients_reproduce_algorithm_1(seed):
    rng = np.random.default_rng(seed)
    grads = rng.normal(size=(4, 7))
    shuffler = random.Random(seed)
    orders = [shuffler.sample([j for j in range(4) if j != i], 3) for i in range(4)]
    coefficients, _ = pcgrad_coefficients(torch.tensor(grads @ grads.T), orders)
    np.testing.assert_allclose(coefficients.numpy() @ grads, algorithm_1(grads, orders), atol=1e-10)


def test_two_conflicting_tasks_no_longer_conflict_with_each_other():
    rng = np.random.default_rng(3)
    for _ in range(20):
        g = rng.normal(size=(2, 6))
        if g[0] @ g[1] >= 0:
            g[1] = -g[1]
        coefficients, projections = pcgrad_coefficients(torch.tensor(g @ g.T), [[1], [0]])
        projected = coefficients.numpy() @ g
        assert projections == 2
        # Each projected gradient is orthogonal to (so no longer conflicts with) the other task's gradient.
        assert abs(projected[0] @ g[1]) < 1e-10 and abs(projected[1] @ g[0]) < 1e-10
        # And the combined update does not increase either loss to first order.
        combined = projected.sum(axis=0)
        assert combined @ g[0] >= -1e-10 and combined @ g[1] >= -1e-10


def test_non_conflicting_gradients_are_left_alone():
    g = np.array([[1.0, 0.2], [0.5, 1.0], [0.1, 0.1]])
    coefficients, projections = pcgrad_coefficients(torch.tensor(g @ g.T), [[1, 2], [0, 2], [0, 1]])
    assert projections == 0
    np.testing.assert_allclose(coefficients.numpy(), np.eye(3))


def test_trunk_receives_projected_gradient_and_heads_their_own():
    model = TinyNet(num_tasks=3)
    x, y = batch(num_tasks=3, seed=5)
    session = hooks.attach(model.shared, PCGrad(seed=0))
    losses = task_losses(model, x, y)
    z = session.capture.current()
    per_task = [torch.autograd.grad(v, z, retain_graph=True)[0] for v in losses.values()]
    total = session.loss(losses)
    beta = session.balancer.weights()
    model.zero_grad()
    total.backward(retain_graph=True)
    # Independent: the trunk's gradient is the backward of sum_j beta_j grad_Z L_j from Z.
    combined = sum(b * g for b, g in zip(beta.tolist(), per_task))
    trunk = list(model.bottom.parameters()) + list(model.shared.parameters())
    expected = torch.autograd.grad(z, trunk, grad_outputs=combined)
    for p, e in zip(trunk, expected):
        torch.testing.assert_close(p.grad, e)
    for i, head in enumerate(model.heads):
        (own,) = torch.autograd.grad(list(task_losses(model, x, y).values())[i], head.weight)
        torch.testing.assert_close(head.weight.grad, own)


def test_unsupported_options():
    with pytest.raises(ValueError, match="space"):
        PCGrad(space="shared_layer")
    with pytest.raises(ValueError, match="reduction"):
        PCGrad(reduction="max")


def test_recorded_gradient_norms_are_effective_weight_times_task_norm(tmp_path):
    import pyarrow.dataset as ds

    model = TinyNet(num_tasks=3)
    x, y = batch(num_tasks=3, seed=7)
    session = hooks.attach(model.shared, PCGrad(seed=1), runs_root=tmp_path, run_name="pc")
    losses = task_losses(model, x, y)
    norms = [torch.autograd.grad(v, model.shared.weight, retain_graph=True)[0].norm().item() for v in losses.values()]
    session.loss(losses).backward()
    beta = session.balancer.weights().tolist()
    session.close()
    rows = ds.dataset(tmp_path / "pc" / "metrics", format="parquet", partitioning="hive").to_table().to_pandas()
    rows = rows.set_index("task").loc[list(losses)]
    np.testing.assert_allclose(rows["weight"], beta, rtol=1e-6)
    np.testing.assert_allclose(rows["grad_norm"], np.array(beta) * np.array(norms), rtol=1e-5)
