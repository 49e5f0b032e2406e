"""Every error path of the foundation says what is wrong: the task, the value, the path.

Attach-time and step-time mistakes of the user (hooks.attach / Session.loss), balancer configuration,
the recorder's arguments, and hostile ``run.json`` files. Each test asserts the message, not just the type.
"""

from __future__ import annotations

import math
import warnings

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from gradnorm import hooks
from gradnorm.toolkit import runs, schema
from gradnorm.toolkit.balancers import GradNorm, StaticWeights
from gradnorm.toolkit.recorder import Recorder


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(3)])
        self.side = nn.Linear(4, 1)  # a head that bypasses the trunk

    def losses(self, shift: float = 1.0, **override):
        x = torch.randn(16, 4)
        h = self.trunk(x)
        values = {"a": self.heads[0](h).pow(2).mean() + shift, "b": (self.heads[1](h) - 1).pow(2).mean() + shift}
        values.update(override)
        return values


@pytest.fixture
def model():
    return TwoHeads()


# -- the user's losses ----------------------------------------------------------------------------------
def test_fewer_than_two_tasks(model):
    session = hooks.attach(model.trunk[-1], GradNorm())
    with pytest.raises(ValueError, match=r"two or more task losses; got 1 \(\['a'\]\)"):
        session.loss({"a": model.losses()["a"]})
    with pytest.raises(ValueError, match=r"at least two tasks, got \['only'\]"):
        GradNorm().bind(["only"], torch.device("cpu"))


def test_duplicate_task_names():
    with pytest.raises(ValueError, match=r"task names must be unique, got \['a', 'a'\]"):
        GradNorm().bind(["a", "a"], torch.device("cpu"))


@pytest.mark.parametrize("bad", [0.0, -2.5, float("nan"), float("inf")])
def test_bad_initial_loss_names_the_task_and_value(model, bad):
    session = hooks.attach(model.trunk[-1], GradNorm())
    losses = model.losses()
    losses["b"] = losses["b"] * 0 + bad
    with pytest.raises(ValueError, match=rf"initial loss L\(0\) of task 'b' is {bad!r} \(the first step's loss\)"):
        session.loss(losses)


def test_bad_given_initial_loss_values():
    with pytest.raises(ValueError, match=r"initial loss L\(0\) of task 'b' is -1.0 \(given as initial_loss\)"):
        GradNorm(initial_loss={"a": 1.0, "b": -1.0}).bind(["a", "b"], torch.device("cpu"))
    with pytest.raises(ValueError, match=r"missing tasks \['b'\], unknown tasks \['c'\]"):
        GradNorm(initial_loss={"a": 1.0, "c": 1.0}).bind(["a", "b"], torch.device("cpu"))
    with pytest.raises(ValueError, match=r"initial_loss has 3 values for 2 tasks"):
        GradNorm(initial_loss=[1.0, 2.0, 3.0]).bind(["a", "b"], torch.device("cpu"))
    with pytest.raises(ValueError, match=r"initial_loss=k needs k >= 1, got 0"):
        GradNorm(initial_loss=0)
    with pytest.raises(ValueError, match=r"initial_loss must be 'first', an int k, or explicit values; got 'last'"):
        GradNorm(initial_loss="last")


def test_task_names_changing_between_steps(model):
    session = hooks.attach(model.trunk[-1], GradNorm())
    session.loss(model.losses())
    losses = model.losses()
    renamed = {"a": losses["a"], "c": losses["b"]}
    with pytest.raises(ValueError, match=r"task names changed at step 1: missing \['b'\], unexpected \['c'\]"):
        session.loss(renamed)
    with pytest.raises(ValueError, match=r"task names changed at step 1: order \['b', 'a'\] vs \['a', 'b'\]"):
        session.loss({"b": losses["b"], "a": losses["a"]})


def test_shared_layer_without_gradient_from_a_task(model):
    session = hooks.attach(model.trunk[-1], GradNorm())
    losses = model.losses()
    losses["side"] = model.side(torch.randn(16, 4)).pow(2).mean() + 1
    with pytest.raises(ValueError, match=r"Linear.weight receives no gradient from task 'side'"):
        session.loss(losses)


def test_losses_that_are_not_scalars_or_not_connected(model):
    session = hooks.attach(model.trunk[-1], GradNorm())
    losses = model.losses()
    with pytest.raises(TypeError, match=r"loss of task 'a' must be a scalar tensor, got Tensor\(3,\)"):
        session.loss({"a": torch.ones(3, requires_grad=True), "b": losses["b"]})
    with pytest.raises(TypeError, match=r"loss of task 'a' must be a scalar tensor, got float"):
        session.loss({"a": 1.0, "b": losses["b"]})
    with pytest.raises(ValueError, match=r"loss of task 'a' does not require grad"):
        session.loss({"a": torch.tensor(1.0), "b": losses["b"]})
    with pytest.raises(TypeError, match=r"losses must be a dict name -> loss or a sequence of losses, got str"):
        session.loss("a")


def test_shared_layer_arguments():
    with pytest.raises(TypeError, match=r"shared layer ReLU has no 'weight' parameter"):
        hooks.attach(nn.ReLU(), GradNorm())
    with pytest.raises(TypeError, match=r"shared layer must be an nn.Module or a parameter tensor, got str"):
        hooks.attach("trunk", GradNorm())
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match=r"shared layer Linear.weight does not require grad"):
        hooks.attach(frozen, GradNorm())


def test_non_finite_later_loss_skips_the_update_is_recorded_and_warns_once(model, tmp_path):
    session = hooks.attach(model.trunk[-1], GradNorm(alpha=0.5, lr=0.1), runs_root=tmp_path, run_name="nan", flush_every=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(12):
            losses = model.losses()
            if step in (5, 9):
                losses["a"] = losses["a"] * float("nan")
            before = session.weights()
            session.loss(losses).backward()
            if step in (5, 9):
                assert session.weights() == before  # the update was skipped
        session.close()
    skip_warnings = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert len(skip_warnings) == 1
    assert "at step 5 of run 'nan'" in skip_warnings[0] and "step_update_skipped" in skip_warnings[0]
    table = pq.read_table(tmp_path / "nan" / "metrics").to_pandas()
    per_step = table.groupby("step")["step_update_skipped"].agg(["all", "any"])
    assert per_step.index[per_step["any"]].tolist() == [5, 9]
    assert per_step["all"].equals(per_step["any"])  # repeated on each task's row of the step
    assert math.isnan(table[(table.step == 5) & (table.task == "a")]["loss"].iloc[0])
    assert runs.read_run_json(tmp_path / "nan")["skipped_updates"] == 2


# -- configuration --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: GradNorm(alpha=-0.1), r"alpha must be a non-negative number, got -0.1"),
        (lambda: GradNorm(alpha=float("nan")), r"alpha must be a non-negative number, got nan"),
        (lambda: GradNorm(reduction="max"), r"reduction must be one of \('mean', 'sum'\), got 'max'"),
        (lambda: GradNorm(min_weight=0.0), r"min_weight must be positive .* got 0.0"),
        (lambda: GradNorm(optimizer="rmsprop"), r"unknown weight optimizer 'rmsprop'"),
        (lambda: GradNorm(lr=0.0), r"weight learning rate must be positive, got 0.0"),
    ],
)
def test_gradnorm_configuration_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_static_weights_errors():
    with pytest.raises(ValueError, match=r"unknown tasks \['z'\], missing tasks \['b'\] \(run has \['a', 'b'\]\)"):
        StaticWeights({"a": 1.0, "z": 1.0}).bind(["a", "b"], torch.device("cpu"))
    with pytest.raises(ValueError, match=r"3 values for 2 tasks"):
        StaticWeights([1.0, 1.0, 1.0]).bind(["a", "b"], torch.device("cpu"))
    with pytest.raises(ValueError, match=r"static weight of task 'b' is -1.0"):
        StaticWeights([1.0, -1.0]).bind(["a", "b"], torch.device("cpu"))


def test_unbound_balancer_and_shadow_misuse(model):
    with pytest.raises(RuntimeError, match=r"not bound to tasks yet"):
        GradNorm().weights()
    with pytest.raises(ValueError, match=r"weights= sets the user's own weights in shadow mode; pass shadow=True"):
        hooks.attach(model.trunk[-1], GradNorm(), weights={"a": 1.0, "b": 1.0})
    with pytest.raises(RuntimeError, match=r"observe\(\) is for shadow mode"):
        hooks.attach(model.trunk[-1], GradNorm()).observe(model.losses())


# -- the recorder -------------------------------------------------------------------------------------
def test_recorder_argument_errors(tmp_path):
    run_path = runs.create_run(tmp_path, "r", {"tasks": ["a", "b"]})
    with pytest.raises(ValueError, match=r"flush_every must be >= 1, got 0"):
        Recorder(run_path, ["a", "b"], flush_every=0)
    with pytest.raises(ValueError, match=r"heartbeat_interval must be a positive number of seconds, got 0"):
        Recorder(run_path, ["a", "b"], heartbeat_interval=0)
    rec = Recorder(run_path, ["a", "b"])
    with pytest.raises(ValueError, match=r"validation losses for unknown tasks \['c'\]; the run's tasks are \['a', 'b'\]"):
        rec.record_validation(3, {"a": 1.0, "c": 2.0})
    rec.close()
    with pytest.raises(RuntimeError, match=rf"recorder of {run_path} is closed"):
        rec.record_validation(3, {"a": 1.0})
    with pytest.raises(runs.RunError, match=r"does not exist: 'nowhere' is not a run directory"):
        Recorder(tmp_path / "nowhere", ["a", "b"])
    assert not (tmp_path / "nowhere").exists()  # a mistyped path creates nothing


def test_recording_after_close_through_the_session(model, tmp_path):
    session = hooks.attach(model.trunk[-1], GradNorm(), runs_root=tmp_path, run_name="closed")
    session.loss(model.losses())
    session.close()
    with pytest.raises(RuntimeError, match=r"session is closed"):
        session.loss(model.losses())


# -- hostile run.json -------------------------------------------------------------------------------------
HOSTILE_RUN_JSON = [
    ("{not json", r"run.json is not valid JSON \(Expecting property name enclosed in double quotes at line 1\)"),
    ("", r"run.json is not valid JSON"),
    ("[1, 2]", r"run.json must hold a JSON object, found list"),
    ('"text"', r"run.json must hold a JSON object, found str"),
    ('{"status": "running"}', r"run.json lacks a 'tasks' list of names"),
    ('{"status": "running", "tasks": "a,b"}', r"run.json lacks a 'tasks' list of names"),
    ('{"status": "running", "tasks": [1, 2]}', r"run.json lacks a 'tasks' list of names"),
    ('{"tasks": ["a", "b"]}', r"run.json has status None; expected one of"),
    ('{"tasks": ["a", "b"], "status": "exploded"}', r"run.json has status 'exploded'; expected one of"),
    ('{"tasks": ["a", "b"], "status": "running"', r"run.json is not valid JSON"),  # cut off mid-write by another tool
]


@pytest.mark.parametrize("text, message", HOSTILE_RUN_JSON)
def test_hostile_run_json_is_a_clear_error(tmp_path, text, message):
    run_path = tmp_path / "hostile"
    run_path.mkdir()
    (run_path / schema.RUN_FILE).write_text(text, encoding="utf-8")
    with pytest.raises(runs.RunError, match=message) as info:
        runs.read_run_json(run_path)
    assert str(run_path / schema.RUN_FILE) in str(info.value)


def test_run_json_that_is_not_utf8(tmp_path):
    run_path = tmp_path / "binary"
    run_path.mkdir()
    (run_path / schema.RUN_FILE).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(runs.RunError, match=r"run.json is not valid UTF-8 text \(byte 0\)"):
        runs.read_run_json(run_path)


def test_run_json_that_is_a_directory(tmp_path):
    (tmp_path / "odd" / schema.RUN_FILE).mkdir(parents=True)
    with pytest.raises(runs.RunError, match=r"run.json cannot be read \(Is a directory\)"):
        runs.read_run_json(tmp_path / "odd")


def test_missing_run_json(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(runs.RunError, match=r"run.json does not exist: 'empty' is not a run directory"):
        runs.read_run_json(tmp_path / "empty")
