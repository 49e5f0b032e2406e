"""The taps by default: ``attach(layer, balancer)`` finds the heads at the first step and taps the norms from
the user's own backward from the second wherever the model allows, with the same numbers as the general
path; ``run.json`` says which path ran and why. ``heads=None`` forces the general path; the methods that
need this step's per-task gradients, shadow mode, ``observe()``, a loss never backpropagated and a
backward the taps cannot measure all keep working."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import gradnorm
from gradnorm import hooks
from gradnorm.experiments import dense_model, toy
from gradnorm.toolkit.balancers import (
    MGDA,
    DirectGradNorm,
    DynamicWeightAverage,
    EqualWeights,
    GradNorm,
    PCGrad,
    RealTimeLossWeights,
    StaticWeights,
    UncertaintyWeighting,
)
from tests.helpers.user_project import REPO, TRAINER_SETUP, python_blocks


def run_json(root: Path, name: str) -> dict:
    return json.loads((root / name / "run.json").read_text())


def recorded(root: Path, name: str, column: str = "grad_norm") -> torch.Tensor:
    table = pq.read_table(root / name / "metrics").to_pandas()
    table = table[table["split"] == "train"].sort_values(["step", "task"])
    return torch.tensor(table[column].to_numpy())


def toy_setup(num_tasks: int = 3, dtype=torch.float64):
    config = toy.ToyConfig(num_tasks=num_tasks, train_size=256, test_size=8)
    data = toy.make_data(config)
    model = toy.make_model(config).to(dtype)
    return model, data.x_train.to(dtype), data.y_train.to(dtype)


def train_toy(model, x, y, root: Path, name: str, balancer=None, steps: int = 8, **options):
    """The README's loop on the toy: attach, loss, zero_grad, backward, step, close."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    session = gradnorm.attach(model.shared_layer, balancer if balancer is not None else GradNorm(alpha=1.5), runs_root=root, run_name=name, **options)
    weights = []
    for step in range(steps):
        index = torch.arange(step * 16, step * 16 + 16) % len(x)
        loss = session.loss(toy.task_losses(model(x[index]), y[index]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        weights.append(session.balancer.weights().clone())
    session.close()
    return torch.stack(weights), session


def test_the_readme_example_unchanged_runs_the_taps(tmp_path, monkeypatch):
    (block,) = [b for b in python_blocks(REPO / "README.md") if "gradnorm.attach" in b.code]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(TRAINER_SETUP + "\n" + block.code, "README.md", "exec"), namespace)
    (run,) = list((tmp_path / "runs").iterdir())
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "finished"
    assert meta["grad_norm_path"] == "head-taps/linear-product (step 0: gram-loop)"
    assert meta["heads_search"] == "found 3 heads reading one tensor: Linear, Linear, Linear"
    assert namespace["session"].taps.heads == [namespace["model"].depth, namespace["model"].normals, namespace["model"].seg]


def test_on_the_toy_the_default_taps_give_the_general_paths_numbers(tmp_path):
    model, x, y = toy_setup()
    default, session = train_toy(copy.deepcopy(model), x, y, tmp_path, "default")
    general, general_session = train_toy(copy.deepcopy(model), x, y, tmp_path, "general", heads=None)
    assert session.taps is not None and session.taps.path == "linear-product" and general_session.taps is None
    torch.testing.assert_close(default, general, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(recorded(tmp_path, "default"), recorded(tmp_path, "general"), rtol=1e-10, atol=1e-12)
    assert run_json(tmp_path, "default")["grad_norm_path"] == "head-taps/linear-product (step 0: gram-loop)"
    meta = run_json(tmp_path, "general")
    assert meta["grad_norm_path"] == "gram-loop" and meta["heads_search"] == "not searched: heads=None asks for the general path"
    assert meta["grad_norm_route"].startswith("gram-loop: one backward per task to W's output")
    assert "autograd-batched not taken" in meta["grad_norm_route"] and "non-finite loss" in meta["grad_norm_route"]
    # The search's global forward hook went with the first step.
    assert not nn.modules.module._global_forward_hooks


def test_heads_false_also_forces_the_general_path(tmp_path):
    model, x, y = toy_setup(2)
    _, session = train_toy(model, x, y, tmp_path, "off", heads=False, steps=2)
    assert session.taps is None and run_json(tmp_path, "off")["grad_norm_path"] == "gram-loop"


def test_the_dense_encoder_decoder_takes_the_conv_product_by_default(tmp_path):
    torch.manual_seed(0)
    base = dense_model.DenseMultiTaskNet(width=8).double()
    scenes = dense_model.make_scenes(6, size=16)
    scenes = dense_model.Scenes(scenes.images.double(), scenes.segmentation, scenes.depth.double(), scenes.normals.double())

    def run(name, **options):
        model = copy.deepcopy(base)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        session = gradnorm.attach(model.shared, gradnorm.GradNorm(alpha=1.5), runs_root=tmp_path, run_name=name, **options)
        for step in range(3):
            part = dense_model.batch(scenes, torch.arange(2 * step, 2 * step + 2), torch.device("cpu"))
            loss = session.loss(dict(zip(dense_model.TASKS, dense_model.task_losses(model(part.images), part))))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        session.close()
        return session

    session = run("default")
    run("general", heads=None)
    assert session.taps is not None and session.taps.path == "conv-product"
    assert run_json(tmp_path, "default")["grad_norm_path"] == "head-taps/conv-product (step 0: autograd-loop)"
    # Its losses are float32 (``task_losses`` casts the outputs), so the weighted and the unweighted
    # backward round differently there: float32's precision, not float64's.
    torch.testing.assert_close(recorded(tmp_path, "default"), recorded(tmp_path, "general"), rtol=1e-6, atol=1e-9)


def test_a_lightning_module_runs_the_taps_by_default(tmp_path):
    pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed")
    from gradnorm.hooks.lightning import GradNormCallback

    model, x, y = toy_setup(3, torch.float32)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            return self.gradnorm.loss(toy.task_losses(self.model(inputs), targets), epoch=self.current_epoch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:96], y[:96]), batch_size=16)
    callback = GradNormCallback(lambda m: m.model.shared_layer, gradnorm.GradNorm(alpha=1.5), runs_root=tmp_path, run_name="lit")
    trainer = pl.Trainer(
        max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[callback]
    )
    trainer.fit(Module(), loader)
    meta = run_json(tmp_path, "lit")
    assert meta["status"] == "finished" and meta["grad_norm_path"] == "head-taps/linear-product (step 0: gram-loop)"
    assert torch.isfinite(recorded(tmp_path, "lit")).all()


@pytest.mark.parametrize(
    "make, searched",
    [
        (lambda: MGDA(), False),
        (lambda: PCGrad(seed=0), False),
        (lambda: DirectGradNorm(), False),
        (lambda: RealTimeLossWeights(), False),
        (lambda: DynamicWeightAverage(), True),
        (lambda: UncertaintyWeighting(), True),
        (lambda: StaticWeights([1.0, 2.0, 0.5]), True),
        (lambda: EqualWeights(), True),
    ],
    ids=["mgda", "pcgrad", "direct-gradnorm", "real-time", "dwa", "uncertainty", "static", "equal"],
)
def test_every_balancer_works_with_the_default_and_run_json_says_why(make, searched, tmp_path):
    model, x, y = toy_setup()
    default, session = train_toy(copy.deepcopy(model), x, y, tmp_path, "default", balancer=make(), steps=6)
    general, _ = train_toy(copy.deepcopy(model), x, y, tmp_path, "general", balancer=make(), steps=6, heads=None)
    torch.testing.assert_close(default, general, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(recorded(tmp_path, "default"), recorded(tmp_path, "general"), rtol=1e-9, atol=1e-12, equal_nan=True)
    meta = run_json(tmp_path, "default")
    if searched:
        assert session.taps is not None and meta["grad_norm_path"].startswith("head-taps/")
    else:
        assert session.taps is None and meta["heads_search"].startswith("not searched: ") and not meta["grad_norm_path"].startswith("head-taps")


def test_shadow_mode_with_the_returned_loss_own_total_or_observe_gets_the_same_norms(tmp_path):
    model, x, y = toy_setup()
    user = {"task0": 1.0, "task1": 2.0, "task2": 0.5}

    def run(name: str, how: str, **options):
        net = copy.deepcopy(model)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
        session = hooks.attach(net.shared_layer, GradNorm(alpha=1.5), shadow=True, weights=user, runs_root=tmp_path, run_name=name, **options)
        for step in range(6):
            index = torch.arange(step * 16, step * 16 + 16)
            losses = dict(zip(user, toy.task_losses(net(x[index]), y[index])))
            if how == "observe":
                session.observe(losses)
                total = sum(user[task] * loss for task, loss in losses.items())
            elif how == "own-total":  # the returned loss is ignored; the user's own sum is backpropagated
                session.loss(losses)
                total = sum(user[task] * loss for task, loss in losses.items())
            else:
                total = session.loss(losses)
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
        session.close()
        return session

    reference = run("general", "returned", heads=None)
    assert reference.taps is None
    for how in ("returned", "own-total", "observe"):
        session = run(how, how)
        assert (session.taps is not None) == (how != "observe"), how
        torch.testing.assert_close(recorded(tmp_path, how), recorded(tmp_path, "general"), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(recorded(tmp_path, how, "balancer_weight"), recorded(tmp_path, "general", "balancer_weight"), rtol=1e-10, atol=1e-12)
    assert run_json(tmp_path, "observe")["heads_search"] == "not searched: observe() measures before your backward"


class FirstTaskOnly(EqualWeights):
    """Weights (1, 0): the second task's loss sends no gradient through the heads."""

    def initial_weights(self, device, dtype):
        return torch.tensor([1.0, 0.0], device=device, dtype=dtype)


def test_a_weight_of_zero_keeps_the_general_path(tmp_path):
    model, x, y = toy_setup(2)
    session = hooks.attach(model.shared_layer, FirstTaskOnly(), runs_root=tmp_path, run_name="zero")
    for step in range(3):
        outputs = model(x[step * 8 : step * 8 + 8])
        session.loss(dict(zip("ab", toy.task_losses(outputs, y[step * 8 : step * 8 + 8])))).backward()
    session.close()
    assert session.taps is None
    assert "task 'b' has weight 0" in run_json(tmp_path, "zero")["heads_search"]
    assert torch.isfinite(recorded(tmp_path, "zero")).all()


def test_a_loss_never_backpropagated_is_measured_the_general_way_and_the_general_path_serves_on(tmp_path):
    model, x, y = toy_setup()

    def run(name: str, backward: bool, **options):
        net = copy.deepcopy(model)
        session = hooks.attach(net.shared_layer, GradNorm(alpha=1.5), shadow=True, runs_root=tmp_path, run_name=name, **options)
        for step in range(5):
            index = torch.arange(step * 16, step * 16 + 16)
            loss = session.loss(toy.task_losses(net(x[index]), y[index]))
            if backward:
                loss.backward()
        session.close()
        return session

    run("general", True, heads=None)
    session = run("forgotten", False)
    assert session.taps is None
    # Step 1 waited for its backward until step 2's loss(), which measured it; from there nothing waits.
    torch.testing.assert_close(recorded(tmp_path, "forgotten"), recorded(tmp_path, "general"), rtol=1e-10, atol=1e-12)
    meta = run_json(tmp_path, "forgotten")
    assert meta["grad_norm_path"] == "head-taps/linear-product (step 0: gram-loop); gram-loop from step 2: the loss of step 1 was never backpropagated"


def test_a_backward_the_taps_cannot_measure_is_recorded_as_unknown_and_the_general_path_takes_over(tmp_path):
    model, x, y = toy_setup()
    net = copy.deepcopy(model)
    session = hooks.attach(net.shared_layer, GradNorm(alpha=1.5), runs_root=tmp_path, run_name="partial")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(5):
            index = torch.arange(step * 16, step * 16 + 16)
            losses = toy.task_losses(net(x[index]), y[index])
            total = session.loss(losses)
            (losses[0] if step == 2 else total).backward()  # step 2: only task 0's loss reaches the heads
    session.close()
    assert session.taps is None
    assert sum("could not measure step 2" in str(w.message) for w in caught) == 1
    norms = recorded(tmp_path, "partial").view(5, 3)
    assert torch.isnan(norms[2]).all() and torch.isfinite(norms[[0, 1, 3, 4]]).all()
    skipped = recorded(tmp_path, "partial", "step_update_skipped").view(5, 3)[:, 0]
    assert skipped.tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert "gram-loop from step 3: task heads [1, 2] sent no gradient" in run_json(tmp_path, "partial")["grad_norm_path"]


def test_a_backward_that_bypasses_the_returned_loss_is_recorded_as_unknown_when_balancing(tmp_path):
    """Balancing, the taps read the factors where session.loss()'s result is formed; a backward of another
    total (here the plain sum, at step 2) cannot be measured, and says so instead of measuring wrongly."""
    model, x, y = toy_setup()
    session = hooks.attach(model.shared_layer, GradNorm(alpha=1.5), runs_root=tmp_path, run_name="bypass")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            index = torch.arange(step * 16, step * 16 + 16)
            losses = toy.task_losses(model(x[index]), y[index])
            total = session.loss(losses)
            (sum(losses) if step == 2 else total).backward()
    session.close()
    assert session.taps is None
    assert any("not through the loss session.loss() returned" in str(w.message) for w in caught)
    norms = recorded(tmp_path, "bypass").view(4, 3)
    assert torch.isnan(norms[2]).all() and torch.isfinite(norms[[0, 1, 3]]).all()


def test_a_loss_from_two_forward_passes_gets_the_sum_of_their_gradients(tmp_path):
    """Each half of the batch through the heads separately, the losses averaged (DDP's objective on one process)."""
    model, x, y = toy_setup()

    def run(name, **options):
        net = copy.deepcopy(model)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
        session = hooks.attach(net.shared_layer, GradNorm(alpha=1.5), runs_root=tmp_path, run_name=name, **options)
        for step in range(5):
            index = torch.arange(step * 16, step * 16 + 16)
            halves = [toy.task_losses(net(x[index[r::2]]), y[index[r::2]]) for r in range(2)]
            loss = session.loss([(a + b) / 2 for a, b in zip(*halves)])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        session.close()
        return session

    assert run("taps").taps is not None
    run("general", heads=None)
    torch.testing.assert_close(recorded(tmp_path, "taps"), recorded(tmp_path, "general"), rtol=1e-10, atol=1e-12)


def test_heads_in_the_wrong_order_are_refused_naming_heads_and_tasks():
    model, x, y = toy_setup(2, torch.float32)
    session = hooks.attach(model.shared_layer, GradNorm(alpha=0.12), heads=[model.heads[1], model.heads[0]])
    small, large = toy.task_losses(model(x[:8]), y[:8])
    with pytest.raises(ValueError) as error:
        session.loss({"small": small, "large": large})
    message = str(error.value)
    assert "not in task order" in message and "head 0 (Linear) feeds ['large']" in message and "head 1 (Linear) feeds ['small']" in message
    assert "['small', 'large']" in message
    session.close()


def test_a_head_that_feeds_two_losses_is_refused():
    trunk = nn.Linear(4, 6)
    heads = nn.ModuleList([nn.Linear(6, 1), nn.Linear(6, 1)])
    session = hooks.attach(trunk, GradNorm(), heads=list(heads))
    features = torch.relu(trunk(torch.randn(5, 4)))
    first, second = heads[0](features), heads[1](features)
    with pytest.raises(ValueError, match=r"head 0 \(Linear\) feeds \['task0', 'task1'\]"):
        session.loss([first.pow(2).mean(), (second + first).pow(2).mean()])


def test_grad_scaler_is_accepted_with_a_deprecation_warning():
    model, _, _ = toy_setup(2, torch.float32)
    with pytest.warns(DeprecationWarning, match="grad_scaler= is no longer needed"):
        hooks.attach(model.shared_layer, GradNorm(), grad_scaler=torch.amp.GradScaler("cpu")).close()
