"""Gradient accumulation: attach(..., accumulate=k) takes k micro-batches as one optimiser step. Each task's
loss and its gradient at W are averaged over the micro-batches, as the network's gradient is, so k=4
micro-batches of 25 give the weights of one batch of 100; one update and one record per optimiser step."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import gradnorm
from gradnorm.toolkit import schema

T, STEPS, BATCH = 3, 15, 100


def _model() -> tuple[nn.Module, nn.ModuleList]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU()).double()
    return trunk, nn.ModuleList([nn.Linear(16, 1) for _ in range(T)]).double()


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, 5, generator=g, dtype=torch.float64), torch.randn(BATCH, T, generator=g, dtype=torch.float64) * torch.tensor(
        [1.0, 8.0, 0.3], dtype=torch.float64
    )


def _losses(trunk: nn.Module, heads: nn.ModuleList, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    z = trunk(x)
    return {f"t{i}": ((heads[i](z)[:, 0] - y[:, i]) ** 2).mean() for i in range(T)}


def _train(micro: int, tmp_path: Path | None = None, name: str = "", **options) -> tuple[list[list[float]], list[torch.Tensor]]:
    trunk, heads = _model()
    params = list(trunk.parameters()) + list(heads.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    session = gradnorm.attach(
        trunk[2], gradnorm.GradNorm(alpha=1.5), accumulate=micro, runs_root=tmp_path, run_name=name if tmp_path else None, flush_every=4, **options
    )
    trajectory = []
    for step in range(STEPS):
        x, y = _data(step)
        opt.zero_grad()
        for part in range(micro):
            rows = slice(part * BATCH // micro, (part + 1) * BATCH // micro)
            loss = session.loss(_losses(trunk, heads, x[rows], y[rows]))
            (loss / micro).backward()  # the usual accumulation: the mean over micro-batches
        opt.step()
        trajectory.append(session.balancer.weights().tolist())
    session.close()
    return trajectory, [p.detach().clone() for p in params]


@pytest.mark.parametrize("heads", [None, "auto"], ids=["general", "default"])
def test_four_micro_batches_of_25_give_one_batch_of_100(tmp_path: Path, heads) -> None:
    whole, whole_params = _train(1, heads=heads)
    accumulated, accumulated_params = _train(4, tmp_path, "acc", heads=heads)
    for step in range(STEPS):
        assert accumulated[step] == pytest.approx(whole[step], rel=1e-10, abs=1e-12), f"step {step}"
    for a, b in zip(accumulated_params, whole_params):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # One row per task per optimiser step; the step counter counts optimiser steps.
    table = pq.read_table(tmp_path / "acc" / "metrics" / "rank=0").to_pandas()
    train = table[table["split"] == schema.TRAIN]
    assert sorted(train["step"].unique()) == list(range(STEPS)) and len(train) == STEPS * T
    meta = gradnorm.toolkit.runs.read_run_json(tmp_path / "acc")
    if heads == "auto":  # the default: the taps keep one norm per backward, so the general path sums the micro-batches
        assert "accumulate=4" in meta["heads_search"] and meta["grad_norm_path"].startswith("autograd-loop (accumulate=4")


def test_accumulation_with_update_every_and_state() -> None:
    """accumulate and update_every together: updates at every other optimiser step; a state taken
    between micro-batches is refused, one taken after the k-th loads and continues."""
    trunk, heads = _model()
    session = gradnorm.attach(trunk[2], gradnorm.GradNorm(), accumulate=2, update_every=2, heads=None)
    history = []
    for step in range(6):
        x, y = _data(step)
        for part in range(2):
            session.loss(_losses(trunk, heads, x[part * 50 : (part + 1) * 50], y[part * 50 : (part + 1) * 50])).backward()
            if part == 0 and step == 1:
                with pytest.raises(RuntimeError, match="micro-batch 1 of 2"):
                    session.state_dict()
        history.append(session.weights())
    assert session.step_index == 6 and session.balancer.step_count == 3
    assert history[1] == history[0] and history[2] != history[1] and history[3] == history[2]
    session.close()


def test_accumulate_refusals() -> None:
    trunk, heads = _model()
    with pytest.raises(ValueError, match="accumulate must be an int >= 1"):
        gradnorm.attach(trunk[2], gradnorm.GradNorm(), accumulate=0)
    with pytest.raises(ValueError, match="leave heads= out"):
        gradnorm.attach(trunk[2], gradnorm.GradNorm(), accumulate=2, heads=list(heads))


def test_lightning_accumulate_grad_batches(tmp_path: Path) -> None:
    """Lightning's accumulate_grad_batches=4 over micro-batches of 25 with the callback's accumulate=4
    gives the weights of a plain loop on batches of 100."""
    pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed")
    from gradnorm.hooks.lightning import GradNormCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.trunk, self.heads = _model()
            self.trajectory: list[list[float]] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.gradnorm.loss(_losses(self.trunk, self.heads, x, y))

        def on_train_batch_end(self, outputs, batch, batch_idx):
            if (batch_idx + 1) % 4 == 0:
                self.trajectory.append(self.gradnorm.balancer.weights().tolist())

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    xs, ys = zip(*(_data(step) for step in range(STEPS)))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=BATCH // 4)
    module = Module()
    callback = GradNormCallback(lambda m: m.trunk[2], gradnorm.GradNorm(alpha=1.5), heads=None, accumulate=4)
    trainer = pl.Trainer(
        max_epochs=1,
        accumulate_grad_batches=4,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[callback],
    )
    trainer.fit(module, data)
    whole, _ = _train(1, heads=None)
    assert len(module.trajectory) == STEPS
    for step in range(STEPS):
        assert module.trajectory[step] == pytest.approx(whole[step], rel=1e-10, abs=1e-12)
