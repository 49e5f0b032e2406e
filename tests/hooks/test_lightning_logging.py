"""The Lightning callback logs the recorded per-task quantities through ``log_dict`` to the Trainer's
loggers (CSVLogger, TensorBoardLogger), at its logging steps, with the values of the Parquet records."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed")

from gradnorm.experiments import toy  # noqa: E402
from gradnorm.hooks.lightning import GradNormCallback  # noqa: E402
from gradnorm.toolkit import analysis, runs  # noqa: E402  (after importorskip)
from gradnorm.toolkit.balancers import GradNorm  # noqa: E402

STEPS = 60
EVERY = 5  # the Trainer's log_every_n_steps
TASKS = ("task0", "task1", "task2")


class ToyModule(pl.LightningModule):
    def __init__(self, model: toy.ToyNet) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.gradnorm.loss(toy.task_losses(self.model(x), y))
        self.log("train_loss", loss)  # the user's own logging goes on beside ours
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(tmp_path: Path, logger: Any, run_name: str, **options: Any) -> GradNormCallback:
    config = toy.ToyConfig(num_tasks=3, train_size=STEPS * 8, test_size=8)
    data = toy.make_data(config)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x_train, data.y_train), batch_size=8, shuffle=False)
    callback = GradNormCallback(lambda m: m.model.shared_layer, GradNorm(alpha=0.12), runs_root=tmp_path / "runs", run_name=run_name, **options)
    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=logger,
        log_every_n_steps=EVERY,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(ToyModule(toy.make_model(config)), loader)
    return callback


def records(tmp_path: Path, run_name: str, metric: str) -> dict[str, dict[int, float]]:
    frame = analysis.metric_series(tmp_path / "runs", run_name, metric, max_points=100_000)
    out: dict[str, dict[int, float]] = {}
    for task, x, value in zip(frame["task"], frame["x"], frame["value"]):
        out.setdefault(task, {})[int(x)] = float(value)
    return out


def test_csv_logger_gets_the_per_task_weights_of_the_records(tmp_path: Path) -> None:
    logger = pl.loggers.CSVLogger(tmp_path / "logs", name="toy")
    fit(tmp_path, logger, "csv-run", flush_every=10)
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    weights = records(tmp_path, "csv-run", "weight")
    grad_norms = records(tmp_path, "csv-run", "grad_norm")
    ours = [row for row in rows if row.get("gradnorm/weight/task0")]
    # rows reach the logger a flush late, one per logging step, in order and none left out (how many
    # depends on how far the writer thread lags on a loaded machine)
    recorded_steps = [int(float(row["gradnorm/step"])) for row in ours]
    assert len(ours) >= 3 and recorded_steps == list(range(0, EVERY * len(ours), EVERY))
    for row in ours:
        assert (int(row["step"]) + 1) % EVERY == 0  # logged at the Trainer's logging steps only
        step = int(float(row["gradnorm/step"]))
        assert step <= int(row["step"])  # a recorded step, never one ahead of the Trainer
        for task in TASKS:
            # Lightning logs floats as float32 tensors: each value is the record rounded to float32
            assert float(row[f"gradnorm/weight/{task}"]) == pytest.approx(float(np.float32(weights[task][step])), rel=1e-6)
            assert float(row[f"gradnorm/grad_norm/{task}"]) == pytest.approx(float(np.float32(grad_norms[task][step])), rel=1e-6)
    assert any(row.get("train_loss") for row in rows)
    average = analysis.weight_average(tmp_path / "runs", "csv-run")
    (summary,) = [row for row in rows if row.get("gradnorm/mean_weight/task0")]
    for task in TASKS:
        assert float(summary[f"gradnorm/mean_weight/{task}"]) == pytest.approx(average.weights[task], rel=1e-6)
    assert runs.read_run_json(tmp_path / "runs" / "csv-run")["forwarding"]["lightning"]["failed"] == 0


def test_tensorboard_logger_gets_the_per_task_weights(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'gradnorm-toolkit[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = pl.loggers.TensorBoardLogger(tmp_path / "tb", name="toy")
    fit(tmp_path, logger, "tb-run", log_quantities=["weight", "skipped"])
    assert runs.read_run_json(tmp_path / "runs" / "tb-run")["flush_every"] == EVERY  # flushed once per logging interval
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {f"gradnorm/weight/{task}" for task in TASKS} <= set(tags) and "gradnorm/skipped" in tags
    assert not any(tag.startswith("gradnorm/grad_norm") for tag in tags), "only the quantities asked for"
    weights = records(tmp_path, "tb-run", "weight")
    recorded_step = {e.step: int(e.value) for e in events.Scalars("gradnorm/step")}
    for task in TASKS:
        logged = events.Scalars(f"gradnorm/weight/{task}")
        assert len(logged) >= 3  # the writer is a logging step or two behind; under load, more
        assert [recorded_step[e.step] for e in logged] == list(range(0, EVERY * len(logged), EVERY))
        for event in logged:
            assert event.value == float(np.float32(weights[task][recorded_step[event.step]]))
    assert all(not math.isnan(e.value) and e.value == 0.0 for e in events.Scalars("gradnorm/skipped"))


def test_a_logging_step_without_a_new_row_logs_nothing_rather_than_the_last_row_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A writer that lags (a loaded machine) has no row at some logging steps. Lightning keeps a step
    # metric's last value and logs it again at its next logging step, so rows given to self.log would be
    # repeated under a new step; the callback must log each recorded step once.
    from gradnorm.toolkit.forwarding import LoggerRows

    taken = {"calls": 0}
    original_take = LoggerRows.take

    def lagging_take(self: LoggerRows) -> Any:
        taken["calls"] += 1
        return None if taken["calls"] % 2 == 0 else original_take(self)

    monkeypatch.setattr(LoggerRows, "take", lagging_take)
    logger = pl.loggers.CSVLogger(tmp_path / "logs", name="toy")
    fit(tmp_path, logger, "lagging-run")
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as handle:
        ours = [row for row in csv.DictReader(handle) if row.get("gradnorm/weight/task0")]
    recorded_steps = [int(float(row["gradnorm/step"])) for row in ours]
    assert taken["calls"] == STEPS // EVERY and len(ours) >= 2
    assert recorded_steps == list(range(0, EVERY * len(ours), EVERY)), "each recorded step logged once, in order"
    assert len({row["step"] for row in ours}) == len(ours)


def test_without_a_logger_or_records_nothing_is_forwarded(tmp_path: Path) -> None:
    callback = fit(tmp_path, False, "no-logger")
    assert callback.logged_rows is None
    assert "forwarding" not in runs.read_run_json(tmp_path / "runs" / "no-logger")
    with pytest.raises(ValueError, match=r"unknown quantities \['weights'\]"):
        GradNormCallback(lambda m: m.model.shared_layer, log_quantities=["weights"])
