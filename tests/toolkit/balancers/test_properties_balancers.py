"""Property tests: whatever the losses and gradient norms, the weights stay finite, positive and sum to T.

GradNorm renormalises to sum_i w_i = T after every update (paper 3.1, end); the survey's fixed-weight
baselines (survey 1.1) keep their weights. A non-finite loss or norm must skip the update (weights and
optimiser state untouched) and say so in ``step_update_skipped``. Hypothesis draws task counts, losses
and norms including zeros, huge and tiny values; expected values come from plain Python arithmetic.
"""

from __future__ import annotations

import math
import os

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gradnorm.toolkit.balancers import EqualWeights, GradNorm, StaticWeights

SETTINGS = settings(max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", 40)), deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Positive magnitudes spanning the float64 range a real loss or norm can take, edges included.
positive = st.one_of(
    st.floats(min_value=1e-300, max_value=1e300, allow_nan=False, allow_infinity=False),
    st.sampled_from([1e-300, 1e-30, 1e-8, 1.0, 1e8, 1e30, 1e300]),
)
non_negative = st.one_of(st.just(0.0), positive)
non_finite = st.sampled_from([float("nan"), float("inf"), float("-inf")])


@st.composite
def gradnorm_runs(draw):
    """A task count, a GradNorm configuration and a few steps of (losses, unweighted norms)."""
    num_tasks = draw(st.integers(min_value=2, max_value=12))
    steps = draw(st.integers(min_value=1, max_value=6))
    first = draw(st.lists(positive, min_size=num_tasks, max_size=num_tasks))
    later = [draw(st.lists(non_negative, min_size=num_tasks, max_size=num_tasks)) for _ in range(steps - 1)]
    norms = [draw(st.lists(non_negative, min_size=num_tasks, max_size=num_tasks)) for _ in range(steps)]
    options = dict(
        alpha=draw(st.sampled_from([0.0, 0.12, 1.5, 3.0])),
        lr=draw(st.sampled_from([1e-3, 0.025, 1.0, 100.0])),
        optimizer=draw(st.sampled_from(["adam", "sgd"])),
        reduction=draw(st.sampled_from(["mean", "sum"])),
    )
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    if dtype == torch.float32:
        # Keep the draws representable: a float64 1e300 would already be inf as float32.
        first, later, norms = _to_float32_range(first), [_to_float32_range(v) for v in later], [_to_float32_range(v) for v in norms]
    return num_tasks, [first] + later, norms, options, dtype


def _to_float32_range(values: list[float]) -> list[float]:
    return [0.0 if v == 0 else min(max(v, 1e-37), 1e37) for v in values]


def _weights_ok(weights: torch.Tensor, num_tasks: int) -> None:
    values = weights.double().tolist()
    assert all(math.isfinite(w) for w in values), values
    assert all(w > 0 for w in values), values
    assert math.isclose(sum(values), num_tasks, rel_tol=1e-4), (sum(values), values)


# Found by Hypothesis: three float32 weights pushed to ~1e38 by one SGD step made the renormalising sum
# overflow to inf, which turned every weight into 0.
OVERFLOWING_SUM = (
    8,
    [[1.0] * 8, [0.0] * 8, [0.0] * 8, [0.0] * 8, [0.0] * 7 + [1e-37]],
    [
        [0.0] * 6 + [7.176989780108902e16, 6.37845842289343e17],
        [0.0] * 8,
        [0.0] * 8,
        [0.0] * 8,
        [0.0] * 4 + [9.999998983077864e36, 9.999999616903162e36, 6.687960455561452e19, 7.222587293007914e36],
    ],
    {"alpha": 0.0, "lr": 100.0, "optimizer": "sgd", "reduction": "mean"},
    torch.float32,
)


@SETTINGS
@given(gradnorm_runs())
@example(OVERFLOWING_SUM)
def test_gradnorm_weights_stay_finite_positive_and_sum_to_T(case):
    num_tasks, losses, norms, options, dtype = case
    balancer = GradNorm(**options)
    tasks = [f"t{i}" for i in range(num_tasks)]
    balancer.bind(tasks, torch.device("cpu"), dtype)
    for step_losses, step_norms in zip(losses, norms):
        stats = balancer.update(torch.tensor(step_losses, dtype=dtype), torch.tensor(step_norms, dtype=dtype))
        _weights_ok(balancer.weights(), num_tasks)
        _weights_ok(stats.weight, num_tasks)


@SETTINGS
@given(gradnorm_runs(), st.data())
def test_a_non_finite_loss_or_norm_skips_the_update_and_is_recorded(case, data):
    num_tasks, losses, norms, options, dtype = case
    balancer = GradNorm(**options)
    balancer.bind([f"t{i}" for i in range(num_tasks)], torch.device("cpu"), dtype)
    for step_losses, step_norms in zip(losses, norms):
        balancer.update(torch.tensor(step_losses, dtype=dtype), torch.tensor(step_norms, dtype=dtype))
    before = balancer.weights().clone()
    state_before = [None if t is None else t.clone() for t in (balancer.optimizer._exp_avg, balancer.optimizer._exp_avg_sq, balancer.optimizer._steps)]
    bad_losses = list(data.draw(st.lists(positive, min_size=num_tasks, max_size=num_tasks)))
    bad_norms = list(data.draw(st.lists(positive, min_size=num_tasks, max_size=num_tasks)))
    where = data.draw(st.sampled_from(["loss", "norm"]))
    index = data.draw(st.integers(min_value=0, max_value=num_tasks - 1))
    (bad_losses if where == "loss" else bad_norms)[index] = data.draw(non_finite)
    stats = balancer.update(torch.tensor(bad_losses, dtype=dtype), torch.tensor(bad_norms, dtype=dtype))
    assert bool(stats.step_update_skipped) is True
    assert torch.equal(balancer.weights(), before)
    state_after = (balancer.optimizer._exp_avg, balancer.optimizer._exp_avg_sq, balancer.optimizer._steps)
    for old, new in zip(state_before, state_after):
        assert old is None or torch.equal(old, new)
    # The next finite step updates again and keeps the invariants.
    stats = balancer.update(torch.tensor([1.0] * num_tasks, dtype=dtype), torch.tensor([1.0] * num_tasks, dtype=dtype))
    assert bool(stats.step_update_skipped) is False
    _weights_ok(balancer.weights(), num_tasks)


@SETTINGS
@given(
    st.integers(min_value=2, max_value=12).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(positive, min_size=n, max_size=n),
            st.lists(st.one_of(non_negative, non_finite), min_size=n, max_size=n),
        )
    )
)
def test_equal_weights_are_ones_whatever_the_later_losses(case):
    num_tasks, first, later = case
    balancer = EqualWeights()
    balancer.bind([f"t{i}" for i in range(num_tasks)], torch.device("cpu"), torch.float64)
    balancer.update(torch.tensor(first, dtype=torch.float64))
    stats = balancer.update(torch.tensor(later, dtype=torch.float64))
    assert balancer.weights().tolist() == [1.0] * num_tasks
    assert stats.weight.tolist() == [1.0] * num_tasks
    # Loss ratios are plain division by the first step's losses.
    for got, value, reference in zip(stats.loss_ratio.tolist(), later, first):
        expected = value / reference
        assert (math.isnan(got) and math.isnan(expected)) or got == expected


@SETTINGS
@given(st.integers(min_value=2, max_value=12).flatmap(lambda n: st.lists(positive, min_size=n, max_size=n)))
def test_static_weights_are_kept_exactly(weights):
    tasks = [f"t{i}" for i in range(len(weights))]
    balancer = StaticWeights(dict(zip(tasks, weights)))
    balancer.bind(tasks, torch.device("cpu"), torch.float64)
    balancer.update(torch.ones(len(tasks), dtype=torch.float64))
    balancer.update(torch.full((len(tasks),), 0.5, dtype=torch.float64))
    assert balancer.weights().tolist() == weights


@SETTINGS
@given(
    st.integers(min_value=2, max_value=8).flatmap(
        lambda n: st.tuples(
            st.just(n), st.integers(min_value=0, max_value=n - 1), st.one_of(non_finite, st.just(0.0), st.floats(max_value=-1e-300, min_value=-1e300))
        )
    )
)
def test_static_weights_refuse_non_positive_or_non_finite_values_naming_the_task(case):
    num_tasks, index, bad = case
    tasks = [f"t{i}" for i in range(num_tasks)]
    weights = {t: 1.0 for t in tasks}
    weights[tasks[index]] = bad
    balancer = StaticWeights(weights)
    try:
        balancer.bind(tasks, torch.device("cpu"), torch.float64)
    except ValueError as exc:
        assert f"static weight of task {tasks[index]!r} is {bad!r}" in str(exc)
    else:
        raise AssertionError(f"weight {bad!r} was accepted")


@SETTINGS
@given(
    st.integers(min_value=2, max_value=8).flatmap(
        lambda n: st.tuples(
            st.just(n), st.integers(min_value=0, max_value=n - 1), st.one_of(non_finite, st.just(0.0), st.floats(max_value=-1e-300, min_value=-1e300))
        )
    )
)
def test_a_bad_first_loss_is_refused_naming_the_task_and_value(case):
    num_tasks, index, bad = case
    tasks = [f"t{i}" for i in range(num_tasks)]
    losses = [1.0] * num_tasks
    losses[index] = bad
    balancer = GradNorm()
    balancer.bind(tasks, torch.device("cpu"), torch.float64)
    try:
        balancer.update(torch.tensor(losses, dtype=torch.float64), torch.ones(num_tasks, dtype=torch.float64))
    except ValueError as exc:
        assert f"initial loss L(0) of task {tasks[index]!r} is {bad!r}" in str(exc)
    else:
        raise AssertionError(f"L(0) = {bad!r} was accepted")


# -- the survey's methods that take the same per-step inputs -------------------------------------------
from gradnorm.toolkit.balancers import (  # noqa: E402
    DirectGradNorm,
    DynamicWeightAverage,
    InitialLossWeights,
    RealTimeLossWeights,
    UncertaintyWeighting,
)

SURVEY_METHODS = {
    "initial-loss": InitialLossWeights,
    "real-time-loss": RealTimeLossWeights,
    "uncertainty-log": UncertaintyWeighting,
    "uncertainty-log1p": lambda: UncertaintyWeighting(regulariser="log1p"),
    "direct-gradnorm": DirectGradNorm,
    "direct-gradnorm-alpha": lambda: DirectGradNorm(alpha=1.5),
    "dwa": DynamicWeightAverage,
}


@st.composite
def survey_runs(draw):
    num_tasks = draw(st.integers(min_value=2, max_value=8))
    steps = draw(st.integers(min_value=1, max_value=5))
    first = draw(st.lists(positive, min_size=num_tasks, max_size=num_tasks))
    later = [draw(st.lists(non_negative, min_size=num_tasks, max_size=num_tasks)) for _ in range(steps - 1)]
    norms = [draw(st.lists(non_negative, min_size=num_tasks, max_size=num_tasks)) for _ in range(steps)]
    return draw(st.sampled_from(sorted(SURVEY_METHODS))), num_tasks, [first] + later, norms


@SETTINGS
@given(survey_runs())
def test_survey_methods_keep_weights_finite_and_non_negative(case):
    """Survey 1.1-1.4, 2.1 and DWA: for any non-negative losses and norms the weights stay finite, >= 0.

    Strict positivity holds for all but DWA, whose T * softmax(rate / K) underflows to exactly 0 for a
    task when loss-rate spreads exceed ~700 K (e.g. a loss falling from 1 to 1e-30 in one period);
    it still sums to T there.
    """
    method, num_tasks, losses, norms = case
    balancer = SURVEY_METHODS[method]()
    balancer.bind([f"t{i}" for i in range(num_tasks)], torch.device("cpu"), torch.float64)
    for step_losses, step_norms in zip(losses, norms):
        balancer.update(torch.tensor(step_losses, dtype=torch.float64), torch.tensor(step_norms, dtype=torch.float64))
        values = balancer.weights().tolist()
        assert all(math.isfinite(w) and w >= 0 for w in values), (method, values)
        if method == "dwa":
            assert math.isclose(sum(values), num_tasks, rel_tol=1e-9), values
        else:
            assert all(w > 0 for w in values), (method, values)


def test_adam_step_with_a_huge_float32_gradient_stays_finite():
    """Found by the property above: lr * exp_avg overflowed float32 (inf / inf = NaN in every weight)."""
    balancer = GradNorm(alpha=0.0, lr=100.0, optimizer="adam", reduction="sum")
    balancer.bind([f"t{i}" for i in range(5)], torch.device("cpu"), torch.float32)
    balancer.update(torch.ones(5), torch.zeros(5))
    balancer.update(torch.ones(5), torch.tensor([0.0, 0.0, 0.0, 0.0, 9.22e36]))
    _weights_ok(balancer.weights(), 5)
