"""Forwarding to trackers: what TensorBoard, W&B and MLflow hold equals the Parquet records, read back
with each tracker's own reader; a tracker that raises or blocks never stops training or loses records."""

from __future__ import annotations

import glob
import json
import struct
import threading
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
import torch

import gradnorm
from gradnorm.experiments import toy
from gradnorm.toolkit import analysis, forwarding, runs, schema
from gradnorm.toolkit.forwarding import Forwarder, Rows, RunSummary, Tracker
from gradnorm.toolkit.recorder import Recorder

STEPS = 61  # steps 0..60: with every=10, seven forwarded steps, the last inside the final, partial flush
FLUSH = 20
TASKS = ("task0", "task1", "task2")


def train(runs_root: Path, run_name: str, trackers: Any, steps: int = STEPS, during: Optional[Any] = None) -> gradnorm.Session:
    """The paper's toy problem at T=3 with GradNorm, recording and forwarding."""
    config = toy.ToyConfig(num_tasks=3, train_size=16 * 8, test_size=8)
    data = toy.make_data(config)
    model = toy.make_model(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    session = gradnorm.attach(model.shared_layer, gradnorm.GradNorm(alpha=0.12), runs_root=runs_root, run_name=run_name, flush_every=FLUSH, trackers=trackers)
    for i in range(steps):
        rows = slice((16 * i) % 128, (16 * i) % 128 + 16)
        loss = session.loss(toy.task_losses(model(data.x_train[rows]), data.y_train[rows]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if during is not None:
        during(session)
    session.close()
    return session


def recorded(runs_root: Path, run_name: str, metric: str) -> dict[str, dict[int, float]]:
    """Per task, step -> value of ``metric`` in the Parquet records, through the analysis API (one point per step)."""
    frame = analysis.metric_series(runs_root, run_name, metric, max_points=100_000)
    assert (frame["n"] == 1).all(), "one record per step and task"
    out: dict[str, dict[int, float]] = {}
    for task, x, value in zip(frame["task"], frame["x"], frame["value"]):
        out.setdefault(task, {})[int(x)] = float(value)
    return out


def forwarded_part(series: dict[int, float], every: int) -> dict[int, float]:
    return {step: value for step, value in series.items() if step % every == 0}


def forwarding_counts(runs_root: Path, run_name: str) -> dict[str, Any]:
    return runs.read_run_json(runs_root / run_name)["forwarding"]


# -- TensorBoard -----------------------------------------------------------------------------------
def test_tensorboard_event_files_hold_every_tasks_recorded_series(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'gradnorm-toolkit[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = gradnorm.TensorBoard(tmp_path / "tb")
    train(tmp_path / "runs", "tb-run", [tracker])
    counts = forwarding_counts(tmp_path / "runs", "tb-run")["tensorboard"]
    assert counts["sent"] == 7 and counts["failed"] == counts["dropped"] == counts["errors"] == 0 and counts["summary"] == "sent"
    average = analysis.weight_average(tmp_path / "runs", "tb-run")
    for quantity in ("weight", "grad_norm", "loss_ratio", "inverse_rate", "target_norm"):
        records = recorded(tmp_path / "runs", "tb-run", quantity)
        assert sorted(records) == list(TASKS)
        for task in TASKS:
            events = EventAccumulator(str(tmp_path / "tb" / task))
            events.Reload()
            scalars = events.Scalars(f"gradnorm/{quantity}" if quantity == "weight" else f"gradnorm-balance/{quantity}")
            expected = forwarded_part(records[task], 10)
            assert [e.step for e in scalars] == sorted(expected) == list(range(0, STEPS, 10))
            # TensorBoard keeps scalars as float32: each equals the record rounded to float32
            assert [e.value for e in scalars] == [float(np.float32(expected[s])) for s in sorted(expected)], (quantity, task)
    for task in TASKS:
        events = EventAccumulator(str(tmp_path / "tb" / task))
        events.Reload()
        (mean,) = events.Scalars("gradnorm-summary/mean_weight")
        assert mean.value == pytest.approx(average.weights[task], rel=1e-6) and mean.step == average.end_step
    root = EventAccumulator(str(tmp_path / "tb"))
    root.Reload()
    assert [e.value for e in root.Scalars("gradnorm-balance/skipped")] == [0.0] * 7
    (text,) = root.Tensors("gradnorm-summary/text/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    assert all(f"| {task} | {average.weights[task]:.4g} |" in table for task in TASKS), table


def test_tensorboard_into_the_users_writer_and_by_name(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'gradnorm-toolkit[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "mine"))
    writer.add_scalar("my/loss", 1.0, 0)
    train(tmp_path / "runs", "writer-run", [gradnorm.TensorBoard(writer=writer, every=20, quantities=["weight"])])
    writer.add_scalar("my/loss", 2.0, 1)  # still open: the tracker only flushed it
    writer.close()
    records = recorded(tmp_path / "runs", "writer-run", "weight")
    events = EventAccumulator(str(tmp_path / "mine" / "task1"))
    events.Reload()
    assert [e.step for e in events.Scalars("gradnorm/weight")] == [0, 20, 40, 60]
    assert [e.value for e in events.Scalars("gradnorm/weight")] == [float(np.float32(records["task1"][s])) for s in (0, 20, 40, 60)]
    assert events.Tags()["scalars"] == ["gradnorm/weight", "gradnorm-summary/mean_weight", "gradnorm-summary/drift"]
    mine = EventAccumulator(str(tmp_path / "mine"))
    mine.Reload()
    assert [e.value for e in mine.Scalars("my/loss")] == [1.0, 2.0]
    # trackers="tensorboard": the default folder, inside the run's directory
    train(tmp_path / "runs", "named", "tensorboard", steps=11)
    events = EventAccumulator(str(tmp_path / "runs" / "named" / "tensorboard" / "task0"))
    events.Reload()
    assert [e.step for e in events.Scalars("gradnorm/weight")] == [0, 10]


# -- Weights & Biases --------------------------------------------------------------------------------
def wandb_rows(run_dir: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """History rows and the final summary of an offline W&B run, read from its .wandb file: a LevelDB
    log of wandb's protobuf Records (32 KiB blocks, 7-byte chunk headers) after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(f"{run_dir}/run-*.wandb")
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    block, position, pieces, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:
            position += left
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind in (2, 3):
            pieces = (pieces if kind == 3 else b"") + chunk
        elif kind == 4:
            records.append(pieces + chunk)
    history, summary = [], {}
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        which = record.WhichOneof("record_type")
        if which == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
        elif which == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.summary.update})
    return history, summary


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install 'gradnorm-toolkit[wandb]')")
    wandb.teardown()  # settings an earlier wandb.init in this process left behind (a docs example) would outlive the env below
    monkeypatch.setenv("WANDB_MODE", "offline")  # nothing leaves the machine
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield wandb
    if wandb.run is not None:
        wandb.run.finish()
    wandb.teardown()  # wandb keeps its settings (WANDB_DIR) process-wide until torn down


def test_wandb_offline_run_history_equals_the_records(tmp_path: Path, wandb_offline: Any) -> None:
    train(tmp_path / "runs", "wb-run", [gradnorm.WandB(init={"project": "gradnorm-tests"})])
    wandb_offline.teardown()  # the run's files are complete once wandb's service has stopped
    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    history, summary = wandb_rows(run_dir)
    weights = recorded(tmp_path / "runs", "wb-run", "weight")
    grad_norms = recorded(tmp_path / "runs", "wb-run", "grad_norm")
    rows = [row for row in history if "gradnorm/weight/task0" in row]
    assert [row["_step"] for row in rows] == list(range(0, STEPS, 10))  # the session's steps are W&B's steps
    for row in rows:
        for task in TASKS:
            assert row[f"gradnorm/weight/{task}"] == weights[task][row["_step"]]
            assert row[f"gradnorm/grad_norm/{task}"] == grad_norms[task][row["_step"]]
    average = analysis.weight_average(tmp_path / "runs", "wb-run")
    for task in TASKS:
        assert summary[f"gradnorm/mean_weight/{task}"] == pytest.approx(average.weights[task], rel=1e-12)
    assert forwarding_counts(tmp_path / "runs", "wb-run")["wandb"]["sent"] == 7


def test_wandb_logs_into_the_users_active_run_on_its_own_x_axis(tmp_path: Path, wandb_offline: Any) -> None:
    run = wandb_offline.init(project="gradnorm-tests")
    run.log({"my/loss": 1.0})
    train(tmp_path / "runs", "wb-active", "wandb", steps=21)
    run.log({"my/loss": 2.0})  # the user's run is still theirs: not finished by the tracker
    run.finish()
    wandb_offline.teardown()
    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    history, _ = wandb_rows(run_dir)
    weights = recorded(tmp_path / "runs", "wb-active", "weight")
    ours = [row for row in history if "gradnorm/step" in row]
    assert [row["gradnorm/step"] for row in ours] == [0, 10, 20]
    assert all(row["gradnorm/weight/task2"] == weights["task2"][row["gradnorm/step"]] for row in ours)
    assert [row["my/loss"] for row in history if "my/loss" in row] == [1.0, 2.0]


# -- MLflow ----------------------------------------------------------------------------------------
def test_mlflow_metric_history_equals_the_records(tmp_path: Path) -> None:
    mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'gradnorm-toolkit[mlflow]'; CI leaves it out: it pulls ~60 packages)")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # a local store in the test's folder
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run() as active:
            train(tmp_path / "runs", "ml-run", [gradnorm.MLflow(every=15)])
        client = MlflowClient(tracking_uri=uri)
        for quantity in ("weight", "inverse_rate"):
            records = recorded(tmp_path / "runs", "ml-run", quantity)
            for task in TASKS:
                history = client.get_metric_history(active.info.run_id, f"gradnorm/{quantity}/{task}")
                expected = forwarded_part(records[task], 15)
                assert sorted((m.step, m.value) for m in history) == sorted(expected.items())
        average = analysis.weight_average(tmp_path / "runs", "ml-run")
        metrics = client.get_run(active.info.run_id).data.metrics
        assert {task: metrics[f"gradnorm/mean_weight/{task}"] for task in TASKS} == pytest.approx(average.weights, rel=1e-12)
        assert forwarding_counts(tmp_path / "runs", "ml-run")["mlflow"]["sent"] == len(range(0, STEPS, 15))
    finally:
        mlflow.set_tracking_uri(None)


# -- failures --------------------------------------------------------------------------------------
class Raising(Tracker):
    name = "raising"

    def send(self, rows: Rows) -> None:
        raise ConnectionError("tracker server down")

    def send_summary(self, summary: RunSummary) -> None:
        raise ConnectionError("still down")


class Blocked(Tracker):
    """Sends nothing until released: a tracker that hangs."""

    name = "blocked"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.release = threading.Event()
        self.entered = threading.Event()
        self.steps: list[int] = []

    def send(self, rows: Rows) -> None:
        self.entered.set()
        assert self.release.wait(timeout=60)
        self.steps += rows.steps.tolist()


def test_a_tracker_raising_on_every_call_stops_neither_training_nor_the_records(tmp_path: Path) -> None:
    with pytest.warns(RuntimeWarning, match="raising tracker failed in send"):
        train(tmp_path / "runs", "raises", [Raising(every=1)])
    meta = runs.read_run_json(tmp_path / "runs" / "raises")
    assert meta["status"] == "finished" and meta["rows_written"] == STEPS * 3 and meta["rows_lost"] == 0
    weights = recorded(tmp_path / "runs", "raises", "weight")
    assert all(sorted(weights[task]) == list(range(STEPS)) for task in TASKS)
    counts = meta["forwarding"]["raising"]
    assert counts["sent"] == 0 and counts["failed"] == STEPS and counts["dropped"] == 0
    assert counts["errors"] == 4 + 1  # one failed send per part file (61 steps at 20 a flush), and the summary
    assert counts["summary"] == "failed" and "still down" in counts["last_error"]


def test_a_hanging_tracker_does_not_hold_training_back(tmp_path: Path) -> None:
    blocked = Blocked(every=5)

    def records_complete_while_blocked(session: gradnorm.Session) -> None:
        assert session.recorder is not None
        session.recorder.wait()  # every step is on disk though the tracker has sent nothing
        assert session.recorder.rows_written == STEPS * 3 and blocked.steps == []
        blocked.release.set()

    train(tmp_path / "runs", "hangs", [blocked], during=records_complete_while_blocked)
    assert blocked.steps == list(range(0, STEPS, 5))
    assert forwarding_counts(tmp_path / "runs", "hangs")["blocked"]["sent"] == len(blocked.steps)


def test_a_full_queue_drops_and_counts_and_a_close_timeout_is_reported(tmp_path: Path) -> None:
    run_path = runs.create_run(tmp_path, "direct", {"tasks": list(TASKS)})
    blocked = Blocked(every=1)
    forwarder = Forwarder([blocked], max_queued_steps=10, close_timeout=0.5)
    recorder = Recorder(run_path, list(TASKS), flush_every=10, listeners=[forwarder])
    matrix = torch.zeros(3, len(schema.RECORDED_FIELDS), dtype=torch.float64)
    for step in range(40):
        recorder.record(step, matrix, frozenset({"weight"}))
        if step % 10 == 9:
            recorder.wait()  # one part file per 10 steps, each forwarded as written
        if step == 9:
            assert blocked.entered.wait(timeout=30)  # the tracker's thread holds the first part file
    recorder.close()
    counts = runs.read_run_json(run_path)["forwarding"]["blocked"]
    # the first part file is taken by the blocked thread, the second fills the queue, the rest are dropped
    assert counts["dropped"] == 20 and counts["sent"] == 0 and "close timeout" in counts["unfinished"]
    assert runs.read_run_json(run_path)["rows_written"] == 120
    blocked.release.set()


# -- arguments ---------------------------------------------------------------------------------------
def test_bad_tracker_arguments_are_refused_naming_the_problem(tmp_path: Path) -> None:
    layer = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"unknown tracker 'tensorbord'.*'mlflow', 'tensorboard', 'wandb'"):
        gradnorm.attach(layer, runs_root=tmp_path, trackers="tensorbord")
    with pytest.raises(ValueError, match="give runs_root= as well"):
        gradnorm.attach(layer, trackers=[Raising()])
    with pytest.raises(TypeError, match="got int: 3"):
        gradnorm.attach(layer, runs_root=tmp_path, trackers=[3])
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        Raising(every=0)
    with pytest.raises(ValueError, match=r"unknown quantities \['weights'\]"):
        Raising(quantities=["weights"])
    with pytest.raises(ValueError, match="same tracker object twice"):
        forwarding.resolve_trackers([t := Raising(), t])
    assert not list(tmp_path.iterdir()), "a refused attach leaves no run behind"
