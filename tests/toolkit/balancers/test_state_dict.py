"""Checkpoint and resume: every balancer's ``state_dict`` / ``load_state_dict``, and ``repr``.

A run saved after N steps, loaded into a freshly constructed balancer of the same configuration and
continued for M steps must give, bit for bit, the weights of an uninterrupted run of N + M steps: the
weights, the weight optimiser's moments and step count (GradNorm paper 5.5), L_i(0) and how many steps it
averages (paper eq. 1), and each method's own state (DWA's loss history, the uncertainty state and its
optimiser, PCGrad's order generator) all travel in the state. Every state goes through ``torch.save`` and
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import io
import typing
from typing import Any, Callable

import pytest
import torch

import gradnorm
from gradnorm.toolkit.balancers import (
    DBMTL,
    FAMO,
    IMTLL,
    MGDA,
    Balancer,
    DirectGradNorm,
    DynamicWeightAverage,
    EqualWeights,
    GradNorm,
    InitialLossWeights,
    PCGrad,
    PriorLossWeights,
    RealTimeLossWeights,
    StaticWeights,
    UncertaintyWeighting,
)
from gradnorm.toolkit.balancers.base import TaskGradients
from tests.helpers.models import TinyNet, batch, task_losses

TASKS = ["a", "b", "c"]
CPU = torch.device("cpu")
DTYPE = torch.float64
CHANNELS = 4

# Each case: a factory for the balancer, and whether it takes per-channel gradient norms (T, C).
CASES: dict[str, tuple[Callable[[], Balancer], bool]] = {
    "gradnorm": (lambda: GradNorm(alpha=1.5), False),
    "gradnorm-sgd-sum": (lambda: GradNorm(alpha=0.12, lr=0.1, optimizer="sgd", reduction="sum"), False),
    "gradnorm-first-3": (lambda: GradNorm(alpha=0.12, initial_loss=3), False),
    "gradnorm-explicit-l0": (lambda: GradNorm(initial_loss={"a": 2.0, "b": 0.5, "c": 1.5}), False),
    "gradnorm-per-channel": (lambda: GradNorm(per_channel=True), True),
    "equal": (lambda: EqualWeights(), False),
    "static": (lambda: StaticWeights({"a": 0.5, "b": 2.0, "c": 0.5}), False),
    "dwa": (lambda: DynamicWeightAverage(temperature=2.0), False),
    "dwa-window-3": (lambda: DynamicWeightAverage(temperature=1.0, window=3), False),
    "uncertainty-log": (lambda: UncertaintyWeighting(regulariser="log"), False),
    "uncertainty-log1p-sgd": (lambda: UncertaintyWeighting(regulariser="log1p", optimizer="sgd", lr=0.05), False),
    "initial-loss-3": (lambda: InitialLossWeights(initial_loss=3), False),
    "prior-loss": (lambda: PriorLossWeights({"a": 1.1, "b": 0.4, "c": 2.3}), False),
    "real-time-loss": (lambda: RealTimeLossWeights(), False),
    "mgda": (lambda: MGDA(normalisation="loss+"), False),
    "mgda-ub": (lambda: MGDA(space="representation"), False),
    "pcgrad": (lambda: PCGrad(seed=3), False),
    "pcgrad-mean": (lambda: PCGrad(reduction="mean", seed=11), False),
    "direct-gradnorm": (lambda: DirectGradNorm(alpha=0.5), False),
    "famo": (lambda: FAMO(lr=0.05), False),
    "imtl-l": (lambda: IMTLL(lr=0.1), False),
    "db-mtl": (lambda: DBMTL(), False),
}

N, M = 4, 5  # steps before the checkpoint (mid-period for DWA's window of 3, mid-average for k = 3), after


def step_inputs(step: int, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic losses, gradient norms and per-task gradients (some of them conflicting) of a step."""
    generator = torch.Generator().manual_seed(1000 + step)
    scales = torch.tensor([1.0, 10.0, 0.1], dtype=DTYPE)
    losses = (torch.rand(len(TASKS), generator=generator, dtype=DTYPE) + 0.05) * scales
    shape = (len(TASKS), CHANNELS) if per_channel else (len(TASKS),)
    norms = torch.rand(shape, generator=generator, dtype=DTYPE) * scales.reshape(-1, *([1] * (len(shape) - 1))) + 0.01
    grads = torch.randn(len(TASKS), 6, generator=generator, dtype=DTYPE)
    return losses, norms, grads


def drive(balancer: Balancer, steps: range, per_channel: bool, nan_norm_at: int = -1) -> list[torch.Tensor]:
    """Step the balancer as the session does; per step: the applied weights and the weights after."""
    trajectory = []
    for step in steps:
        losses, norms, grads = step_inputs(step, per_channel)
        if step == nan_norm_at:
            norms[1] = float("nan")
        if balancer.uses_current_step:
            balancer.step_weights(losses, norms, grads)
        stats = balancer.update(losses, norms)
        trajectory.append(torch.stack([stats.weight, balancer.weights()]))
    return trajectory


def round_trip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def bound(factory: Callable[[], Balancer], tasks: list[str] = TASKS) -> Balancer:
    balancer = factory()
    balancer.bind(tasks, CPU, DTYPE)
    return balancer


def assert_identical(actual: Any, expected: Any, where: str = "state") -> None:
    """Equal nests, with tensors equal bit for bit (same dtype, same values)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, where
        assert torch.equal(actual, expected), f"{where}: {actual} != {expected}"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            assert_identical(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_identical(a, e, f"{where}[{index}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


@pytest.mark.parametrize("order", ["bind-then-load", "load-then-bind"])
@pytest.mark.parametrize("case", list(CASES))
def test_resumed_run_repeats_the_uninterrupted_trajectory_bit_for_bit(case, order):
    factory, per_channel = CASES[case]
    uninterrupted = bound(factory)
    expected = drive(uninterrupted, range(N + M), per_channel)

    first = bound(factory)
    before = drive(first, range(N), per_channel)
    state = round_trip(first.state_dict())
    resumed = factory()
    if order == "bind-then-load":
        resumed.bind(TASKS, CPU, DTYPE)
        resumed.load_state_dict(state)
    else:
        resumed.load_state_dict(state)
        assert not resumed.bound  # kept until bind(), as a session binds at its first step
        assert_identical(round_trip(resumed.state_dict()), state)
        resumed.bind(TASKS, CPU, DTYPE)
    assert resumed.step_count == N
    after = drive(resumed, range(N, N + M), per_channel)

    for step, (got, want) in enumerate(zip(before + after, expected)):
        assert torch.equal(got, want), f"{case}: step {step} weights {got.tolist()} vs uninterrupted {want.tolist()}"
    # Not only the weights: the whole state (optimiser moments, L(0), history, generator) ends the same.
    assert_identical(round_trip(resumed.state_dict()), round_trip(uninterrupted.state_dict()))
    assert resumed.step_count == uninterrupted.step_count == N + M


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_gradnorm_resumed_after_a_skipped_update(optimizer):
    """A non-finite norm skips the update and leaves the optimiser state alone (design.md); so does a resume."""
    factory = lambda: GradNorm(alpha=0.12, optimizer=optimizer, lr=0.1)
    expected = drive(bound(factory), range(N + M), False, nan_norm_at=N - 1)
    first = bound(factory)
    before = drive(first, range(N), False, nan_norm_at=N - 1)
    resumed = factory()
    resumed.load_state_dict(round_trip(first.state_dict()))
    resumed.bind(TASKS, CPU, DTYPE)
    after = drive(resumed, range(N, N + M), False)
    assert torch.equal(expected[N - 1][1], expected[N - 2][1])  # the skipped step kept the weights
    assert all(torch.equal(g, e) for g, e in zip(before + after, expected))
    assert int(resumed.optimizer.state_dict()["steps"]) == N + M - 1  # the skipped step is not counted


@pytest.mark.parametrize("case", list(CASES))
def test_state_taken_before_the_first_step_loads(case):
    factory, per_channel = CASES[case]
    expected = drive(bound(factory), range(N), per_channel)

    fresh = bound(factory).state_dict()  # bound, no step yet
    never_bound = factory().state_dict()  # not even bound: no tasks
    assert never_bound["tasks"] == [] and never_bound["weights"] is None
    if isinstance(factory().initial_loss.spec, (str, int)):
        assert fresh["initial_loss"]["value"] is None and fresh["initial_loss"]["seen"] == 0  # no L(0) yet
    for state, bind_first in ((fresh, True), (fresh, False), (never_bound, False)):
        resumed = factory()
        if bind_first:
            resumed.bind(TASKS, CPU, DTYPE)
        resumed.load_state_dict(round_trip(state))
        if not bind_first:
            resumed.bind(TASKS, CPU, DTYPE)
        got = drive(resumed, range(N), per_channel)
        assert all(torch.equal(g, e) for g, e in zip(got, expected)), case


@pytest.mark.parametrize("balancer_class", [GradNorm, DynamicWeightAverage, PCGrad])
def test_another_task_set_is_refused_naming_both(balancer_class):
    state = round_trip(bound(balancer_class, ["a", "b"]).state_dict())
    other = bound(balancer_class, ["a", "c"])
    weights = other.weights().clone()
    with pytest.raises(ValueError, match=r"\['a', 'b'\].*\['a', 'c'\]"):
        other.load_state_dict(state)
    assert torch.equal(other.weights(), weights)

    # Not yet bound: the tasks are checked where they become known, at bind(); it can then bind as saved.
    pending = balancer_class()
    pending.load_state_dict(state)
    with pytest.raises(ValueError, match=r"\['a', 'b'\].*\['a', 'c'\]"):
        pending.bind(["a", "c"], CPU, DTYPE)
    assert not pending.bound
    pending.bind(["a", "b"], CPU, DTYPE)
    assert pending.tasks == ["a", "b"]

    reordered = bound(balancer_class, ["b", "a"])
    with pytest.raises(ValueError, match="another order"):
        reordered.load_state_dict(state)


def test_a_state_of_another_method_is_refused():
    gradnorm_state = round_trip(bound(GradNorm).state_dict())
    with pytest.raises(ValueError, match="GradNorm.*DynamicWeightAverage"):
        bound(DynamicWeightAverage).load_state_dict(gradnorm_state)
    with pytest.raises(ValueError, match="GradNorm.*DynamicWeightAverage"):
        DynamicWeightAverage().load_state_dict(gradnorm_state)
    with pytest.raises(ValueError, match="StaticWeights.*EqualWeights"):
        bound(EqualWeights).load_state_dict(bound(lambda: StaticWeights([1.0, 1.0, 1.0])).state_dict())


@pytest.mark.parametrize(
    ("saved", "loading", "named"),
    [
        (lambda: GradNorm(alpha=0.12), lambda: GradNorm(alpha=1.5), r"alpha: 0\.12 in the state vs 1\.5 here"),
        (lambda: GradNorm(), lambda: GradNorm(initial_loss=3), "initial_loss"),
        (lambda: GradNorm(), lambda: GradNorm(optimizer="sgd"), "optimizer"),
        (lambda: GradNorm(), lambda: GradNorm(per_channel=True), "per_channel"),
        (lambda: DynamicWeightAverage(window=1), lambda: DynamicWeightAverage(window=3), "window"),
        (lambda: UncertaintyWeighting(), lambda: UncertaintyWeighting(regulariser="log1p"), "regulariser"),
        (lambda: PCGrad(seed=0), lambda: PCGrad(seed=1), "seed"),
        (lambda: MGDA(), lambda: MGDA(space="representation"), "space"),
        (lambda: StaticWeights([1.0, 2.0, 1.0]), lambda: StaticWeights([1.0, 1.0, 2.0]), "weights"),
    ],
)
def test_another_configuration_is_refused_naming_the_setting(saved, loading, named):
    state = round_trip(bound(saved).state_dict())
    target = bound(loading)
    with pytest.raises(ValueError, match=named):
        target.load_state_dict(state)
    with pytest.raises(ValueError, match=named):
        loading().load_state_dict(state)


def test_settings_that_do_not_change_the_weights_may_differ(tmp_path):
    compiled = GradNorm(compile_update=True)
    compiled.load_state_dict(round_trip(bound(GradNorm).state_dict()))
    path = tmp_path / "weights.json"
    path.write_text('{"format": "gradnorm-weights", "version": 1, "weights": {"a": 0.5, "b": 2.0, "c": 0.5}}')
    from_file = StaticWeights.from_file(path)
    from_file.bind(TASKS, CPU, DTYPE)
    from_file.load_state_dict(round_trip(bound(CASES["static"][0]).state_dict()))


def test_fresh_state_into_a_bound_balancer_and_damaged_states_are_refused():
    running = bound(GradNorm)
    drive(running, range(3), False)
    before = round_trip(running.state_dict())
    with pytest.raises(ValueError, match="before bind"):
        running.load_state_dict(GradNorm().state_dict())
    damaged = copy.deepcopy(before)
    damaged["weights"] = torch.ones(2, dtype=DTYPE)
    with pytest.raises(ValueError, match="'weights' has shape"):
        running.load_state_dict(damaged)
    damaged = copy.deepcopy(before)
    damaged["method"]["optimizer"]["exp_avg"] = None
    with pytest.raises(ValueError, match="optimizer"):
        running.load_state_dict(damaged)
    damaged = copy.deepcopy(before)
    damaged["format"] = 99
    with pytest.raises(ValueError, match="format 99"):
        running.load_state_dict(damaged)
    with pytest.raises(ValueError, match="missing keys"):
        running.load_state_dict({"class": "GradNorm"})
    assert_identical(round_trip(running.state_dict()), before)  # nothing of a refused state was restored


def test_state_is_a_copy_and_follows_the_bound_dtype():
    balancer = bound(GradNorm)
    drive(balancer, range(2), False)
    state = balancer.state_dict()
    drive(balancer, range(2, 4), False)
    assert state["step_count"] == 2 and not torch.equal(state["weights"], balancer.weights())
    single = GradNorm()
    single.bind(TASKS, CPU, torch.float32)
    single.load_state_dict(state)
    assert single.weights().dtype == torch.float32
    assert single.optimizer.state_dict()["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize(
    "factory",
    [
        lambda: GradNorm(alpha=0.12),
        lambda: PCGrad(seed=2),
        lambda: MGDA(space="representation"),
        lambda: DynamicWeightAverage(),
        lambda: UncertaintyWeighting(),
    ],
    ids=["gradnorm", "pcgrad", "mgda-ub", "dwa", "uncertainty"],
)
def test_resume_through_attach_on_a_model(factory):
    """The whole checkpoint: model, network optimiser and balancer; the session binds the loaded state."""

    def train(model: TinyNet, optimizer: torch.optim.Optimizer, session: Any, steps: range) -> list[torch.Tensor]:
        weights = []
        for step in steps:
            x, y = batch(num_tasks=3, seed=step)
            total = session.loss(task_losses(model, x, y))
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            weights.append(session.balancer.weights().clone())
        return weights

    model = TinyNet(num_tasks=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    expected = train(model, optimizer, gradnorm.attach(model.shared, factory()), range(N + M))

    model = TinyNet(num_tasks=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    session = gradnorm.attach(model.shared, factory())
    before = train(model, optimizer, session, range(N))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "balancer": session.balancer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    model = TinyNet(num_tasks=3, seed=99)
    model.load_state_dict(checkpoint["model"])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    optimizer.load_state_dict(checkpoint["optimizer"])
    balancer = factory()
    balancer.load_state_dict(checkpoint["balancer"])
    after = train(model, optimizer, gradnorm.attach(model.shared, balancer), range(N, N + M))

    for step, (got, want) in enumerate(zip(before + after, expected)):
        assert torch.equal(got, want), f"step {step}: {got.tolist()} vs uninterrupted {want.tolist()}"
    assert balancer.step_count == N + M


@pytest.mark.parametrize("case", list(CASES))
def test_repr_shows_class_and_configuration(case):
    balancer = CASES[case][0]()
    text = repr(balancer)
    assert text.startswith(f"{type(balancer).__name__}(") and text.endswith(")")
    for key, value in balancer.repr_config().items():
        assert f"{key}={value!r}" in text
    assert repr(balancer) == repr(bound(CASES[case][0]))  # configuration only, not the state
    assert balancer.task_gradients in (None, *typing.get_args(TaskGradients))


def test_gradnorm_repr_lists_constructor_arguments_first():
    assert repr(GradNorm()).startswith("GradNorm(alpha=1.5, lr=0.025, optimizer='adam', reduction='mean', min_weight=0.0001, initial_loss='first'")
    assert repr(PriorLossWeights([1.0, 2.0])) == "PriorLossWeights(priors=[1.0, 2.0])"
    assert "compile_update=True" in repr(GradNorm(compile_update=True))
