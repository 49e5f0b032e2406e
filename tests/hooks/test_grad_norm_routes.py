"""The general path's route chooser (``hooks/grad_norms.py``): the per-task loop by default, the T-batched
product only when asked for, both giving the same norms; a non-finite loss stays with its own task on the
loop; another candidate joins by being handed to the chooser, and wins where its work is least."""

from __future__ import annotations

import pytest
import torch

from gradnorm.experiments import toy
from gradnorm.hooks.grad_norms import AUTOGRAD_BATCHED, AUTOGRAD_LOOP, BatchedRoute, GradNormMeter, LoopRoute, RouteChooser, RouteEstimate, graph_shape


def toy_losses(num_tasks: int = 4, nan_task: int = -1):
    config = toy.ToyConfig(num_tasks=num_tasks, train_size=64, test_size=8)
    data = toy.make_data(config)
    model = toy.make_model(config).double()
    targets = data.y_train[:16].double()
    if nan_task >= 0:
        targets[:, nan_task] = float("nan")
    return model, toy.task_losses(model(data.x_train[:16].double()), targets)


def test_the_loop_is_chosen_and_the_batched_product_gives_the_same_norms():
    model, losses = toy_losses()
    chosen = GradNormMeter(model.shared_layer.weight)
    loop = chosen(losses)
    assert chosen.route == AUTOGRAD_LOOP
    assert "autograd-batched not taken" in chosen.choice.reason and "non-finite loss" in chosen.choice.reason
    batched = GradNormMeter(model.shared_layer.weight, batched=True)
    torch.testing.assert_close(batched(losses), loop, rtol=1e-12, atol=1e-14)
    assert batched.route == AUTOGRAD_BATCHED and batched.choice.reason == "asked for"


def test_the_graph_shape_counts_each_tasks_own_work_once_in_the_loop_and_t_times_in_the_batch():
    model, losses = toy_losses(num_tasks=5)
    shape = graph_shape(losses, model.shared_layer.weight)
    assert shape.complete and len(shape.per_task) == 5
    # Every task's path includes the shared segment; the union counts it once and every head once.
    assert shape.union < shape.loop_work < shape.batched_work
    assert shape.batched_work == 5 * shape.union


def test_a_nan_loss_leaves_the_other_tasks_norms_finite_on_the_loop_but_not_in_the_batch():
    model, losses = toy_losses(nan_task=2)
    loop = GradNormMeter(model.shared_layer.weight)(losses)
    assert torch.isnan(loop[2]) and torch.isfinite(loop[[0, 1, 3]]).all()
    batched = GradNormMeter(model.shared_layer.weight, batched=True)(losses)
    assert torch.isnan(batched).all()  # why the batched product is not chosen by itself


class Cheap:
    """A stand-in for another route (say, the Gram identity of hooks/gram_norms.py): claims little work."""

    name = "cheap"

    def __init__(self, nan_safe: bool = True) -> None:
        self.nan_safe = nan_safe
        self.calls = 0

    def estimate(self, shape):
        return RouteEstimate(self.name, 1.0, "claims one element", nan_safe=self.nan_safe)

    def gradients(self, losses, parameter):
        self.calls += 1
        return LoopRoute().gradients(losses, parameter)


@pytest.mark.parametrize("nan_safe", [True, False])
def test_another_candidate_joins_the_chooser_and_is_taken_where_its_work_is_least(nan_safe):
    model, losses = toy_losses()
    cheap = Cheap(nan_safe)
    meter = GradNormMeter(model.shared_layer.weight, routes=[LoopRoute(), BatchedRoute(), cheap])
    norms = meter(losses)
    torch.testing.assert_close(norms, GradNormMeter(model.shared_layer.weight)(losses), rtol=1e-12, atol=1e-14)
    if nan_safe:
        assert meter.route == "cheap" and cheap.calls == 1
        assert meter.choice.reason.startswith("claims one element; autograd-loop not taken")
    else:
        assert meter.route == AUTOGRAD_LOOP and cheap.calls == 0


def test_an_unknown_forced_route_is_refused():
    with pytest.raises(ValueError, match="unknown gradient-norm route"):
        RouteChooser([LoopRoute()], forced="gram")
