"""The Lightning callback: the same weights as a plain loop, records closed as finished or failed."""

from __future__ import annotations

import copy

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed")

from gradnorm import hooks  # noqa: E402
from gradnorm.experiments import toy  # noqa: E402
from gradnorm.hooks.lightning import GradNormCallback  # noqa: E402
from gradnorm.toolkit import analysis, runs  # noqa: E402  (after importorskip)
from gradnorm.toolkit.balancers import GradNorm  # noqa: E402

STEPS = 8


class ToyModule(pl.LightningModule):
    def __init__(self, model: toy.ToyNet, fail_at: int = -1) -> None:
        super().__init__()
        self.model = model
        self.fail_at = fail_at
        self.trajectory: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            raise RuntimeError("boom")
        x, y = batch
        losses = toy.task_losses(self.model(x), y)
        return self.gradnorm.loss(losses, epoch=self.current_epoch)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.trajectory.append(self.gradnorm.balancer.weights().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.fixture(scope="module")
def toy_setup():
    config = toy.ToyConfig(num_tasks=3, train_size=STEPS * 16, test_size=8)
    data = toy.make_data(config)
    return toy.make_model(config), data


def loader(data):
    dataset = torch.utils.data.TensorDataset(data.x_train, data.y_train)
    return torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=False)


def trainer(callback):
    return pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )


def plain_loop(model, data):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    session = hooks.attach(model.shared_layer, GradNorm(alpha=0.12), heads=None)
    trajectory = []
    for x, y in loader(data):
        loss = session.loss(toy.task_losses(model(x), y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        trajectory.append(session.balancer.weights().clone())
    return torch.stack(trajectory)


@pytest.mark.parametrize("use_heads", ["default", None, "given", "auto"])
def test_callback_matches_a_plain_loop(toy_setup, tmp_path, use_heads):
    base, data = toy_setup
    module = ToyModule(copy.deepcopy(base))
    options = {} if use_heads == "default" else {"heads": {None: None, "given": lambda m: list(m.model.heads), "auto": "auto"}[use_heads]}
    callback = GradNormCallback(lambda m: m.model.shared_layer, GradNorm(alpha=0.12), runs_root=tmp_path, run_name="lit", **options)
    trainer(callback).fit(module, loader(data))
    if use_heads is None:
        assert callback.session.taps is None
    else:
        assert callback.session.taps.heads == list(module.model.heads)
        assert callback.session.taps.path == "linear-product"
    expected = plain_loop(copy.deepcopy(base), data)
    torch.testing.assert_close(torch.stack(module.trajectory), expected, rtol=1e-5, atol=1e-6)
    assert runs.read_run_json(tmp_path / "lit")["status"] == "finished"
    assert analysis.list_runs(tmp_path)["rows"].iloc[0] == STEPS * 3


def test_an_exception_in_training_marks_the_run_failed(toy_setup, tmp_path):
    base, data = toy_setup
    module = ToyModule(copy.deepcopy(base), fail_at=5)
    callback = GradNormCallback(lambda m: m.model.shared_layer, GradNorm(alpha=0.12), runs_root=tmp_path, run_name="lit", flush_every=2)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(callback).fit(module, loader(data))
    assert runs.read_run_json(tmp_path / "lit")["status"] == "failed"
    assert analysis.list_runs(tmp_path)["rows"].iloc[0] == 5 * 3  # every step before the failure kept
