"""``gradnorm compare``: every balancing method on the paper's toy problem and on the Palmer penguins,
from the same initialisation and data for each seed, summarised as a table like the paper's Table 1.

Per problem and seed, all methods share the data, the network's initial weights and the batch order.
The table reports, per method, each task's test error (toy: test-loss ratio L_i/L_i(0); penguins: error
rates and RMSE) and the task-normalised test loss sum_i L_i(test) / L_i(test, initial) (paper section 4),
as mean +- standard deviation over the seeds. "static" retrains with the time-averaged weights E_t[w_i] of
the same seed's GradNorm run (paper 5.3).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from gradnorm.experiments import toy
from gradnorm.hooks.session import attach
from gradnorm.toolkit.balancers import (
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
    prior_cross_entropy,
    prior_l2,
)

from . import penguins
from .toy_training import train_toy

METHODS = (
    "equal",
    "static",
    "initial-loss",
    "prior-loss",
    "real-time-loss",
    "uncertainty",
    "uncertainty-log1p",
    "dwa",
    "gradnorm",
    "direct-gradnorm",
    "pcgrad",
    "mgda",
    "mgda-ub",
)
TOY_ALPHA = 0.12  # paper section 4
PENGUIN_ALPHA = 1.5  # paper 5.4 (NYUv2); no tuned value exists for this problem
PENGUIN_LR = 3e-3
PENGUIN_BATCH = 32
BURN_IN = 0.1


@dataclass
class MethodResult:
    method: str
    seed: int
    task_errors: dict[str, float]
    normalized_test_loss: float
    seconds: float
    run_name: str
    weights: list[list[float]] = field(default_factory=list)


def make_balancer(method: str, alpha: float, priors: Sequence[float], seed: int, static: Optional[Sequence[float]] = None) -> Balancer:
    """One balancer per method name, with the hyperparameters of its source."""

    def static_weights() -> Balancer:
        if static is None:
            raise ValueError("method 'static' needs static= weights")
        return StaticWeights(static)

    factories: dict[str, Callable[[], Balancer]] = {
        "equal": EqualWeights,
        "static": static_weights,
        "initial-loss": InitialLossWeights,
        "prior-loss": lambda: PriorLossWeights(list(priors)),
        "real-time-loss": RealTimeLossWeights,
        "uncertainty": UncertaintyWeighting,
        "uncertainty-log1p": lambda: UncertaintyWeighting(regulariser="log1p"),
        "dwa": DynamicWeightAverage,
        "gradnorm": lambda: GradNorm(alpha=alpha),
        "direct-gradnorm": lambda: DirectGradNorm(alpha=alpha),
        "pcgrad": lambda: PCGrad(seed=seed),
        "mgda": MGDA,
        "mgda-ub": lambda: MGDA(space="representation"),
    }
    if method not in factories:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    if method == "static" and static is None:
        raise ValueError("the 'static' method retrains with a GradNorm run's E_t[w]; run 'gradnorm' first in the same seed")
    return factories[method]()


def ordered(methods: Sequence[str]) -> list[str]:
    """GradNorm before static, which reuses its weights; unknown names are an error."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    out = list(dict.fromkeys(methods))
    if "static" in out and "gradnorm" not in out:
        raise ValueError("'static' retrains with GradNorm's time-averaged weights: include 'gradnorm' too")
    if "static" in out:
        out.remove("static")
        out.insert(out.index("gradnorm") + 1, "static")
    return out


def time_average(weights: list[list[float]]) -> list[float]:
    start = int(len(weights) * BURN_IN)
    return torch.tensor(weights[start:]).mean(dim=0).tolist()


def run_toy(
    num_tasks: int, seed: int, methods: Sequence[str], steps: int, runs_root: Path, train_size: int = 10_000, progress: Optional[Callable[[int], None]] = None
) -> list[MethodResult]:
    config = toy.ToyConfig(num_tasks=num_tasks, data_seed=seed, init_seed=seed + 1, train_size=train_size)
    data = toy.make_data(config)
    priors = [prior_l2(data.y_train[:, i]) for i in range(num_tasks)]
    results: list[MethodResult] = []
    gradnorm_weights: Optional[list[float]] = None
    for method in ordered(methods):
        balancer = make_balancer(method, TOY_ALPHA, priors, seed, gradnorm_weights)
        name = f"toy-T{num_tasks}-{method}-s{seed}"
        outcome = train_toy(config, balancer, steps, name, runs_root=runs_root, data=data, eval_every=max(1, steps // 4), progress=progress)
        if method == "gradnorm":
            gradnorm_weights = time_average(outcome.weights)
        errors = dict(zip(outcome.tasks, outcome.test_loss_ratios))
        results.append(MethodResult(method, seed, errors, outcome.normalized_test_loss, outcome.seconds, name, outcome.weights))
    return results


def train_penguins(
    data: penguins.PenguinData, balancer: Balancer, steps: int, run_name: str, runs_root: Path, progress: Optional[Callable[[int], None]] = None
) -> MethodResult:
    model = penguins.make_model(data)
    optimizer = torch.optim.Adam(model.parameters(), lr=PENGUIN_LR)
    baseline = penguins.test_losses(model, data)
    config = {
        "problem": "palmer penguins: species, sex, body mass (kg)",
        "seed": data.seed,
        "steps": steps,
        "network_optimizer": {"name": "adam", "lr": PENGUIN_LR},
        "batch_size": PENGUIN_BATCH,
        "initial_test_losses": dict(zip(penguins.TASKS, baseline.tolist())),
    }
    session = attach(model.shared_layer, balancer, runs_root=runs_root, run_name=run_name, config=config)
    batches = torch.Generator().manual_seed(data.seed + 2)
    size = data.x_train.shape[0]
    per_epoch = max(1, size // PENGUIN_BATCH)
    weights: list[list[float]] = []
    started = time.perf_counter()
    with session:
        for step in range(steps):
            if step % per_epoch == 0:
                order = torch.randperm(size, generator=batches)
            index = order[(step % per_epoch) * PENGUIN_BATCH : (step % per_epoch + 1) * PENGUIN_BATCH]
            targets = {k: v[index] for k, v in data.y_train.items()}
            loss = session.loss(penguins.task_losses(model(data.x_train[index]), targets), epoch=step // per_epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            weights.append(session.balancer.weights().tolist())
            if (step + 1) % max(1, steps // 4) == 0 or step + 1 == steps:
                session.log_validation(dict(zip(penguins.TASKS, penguins.test_losses(model, data).tolist())), step=step)
            if progress is not None:
                progress(1)
    seconds = time.perf_counter() - started
    normalized = float((penguins.test_losses(model, data) / baseline).sum())
    return MethodResult(balancer.name, data.seed, penguins.test_errors(model, data), normalized, seconds, run_name, weights)


def run_penguins(seed: int, methods: Sequence[str], steps: int, runs_root: Path, progress: Optional[Callable[[int], None]] = None) -> list[MethodResult]:
    data = penguins.load_penguins(seed)
    priors = [
        prior_cross_entropy(data.y_train["species"], data.num_species),
        prior_cross_entropy(data.y_train["sex"], 2),
        prior_l2(data.y_train["body_mass"]),
    ]
    results: list[MethodResult] = []
    gradnorm_weights: Optional[list[float]] = None
    for method in ordered(methods):
        balancer = make_balancer(method, PENGUIN_ALPHA, priors, seed, gradnorm_weights)
        result = train_penguins(data, balancer, steps, f"penguins-{method}-s{seed}", runs_root, progress)
        result.method = method
        if method == "gradnorm":
            gradnorm_weights = time_average(result.weights)
        results.append(result)
    return results


def mean_spread(values: Sequence[float], digits: int) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def format_table(title: str, results: Sequence[MethodResult], columns: Sequence[tuple[str, Callable[[MethodResult], float], int]]) -> str:
    """A markdown table: one row per method, mean ± standard deviation over seeds for every column."""
    methods = list(dict.fromkeys(r.method for r in results))
    seeds = sorted({r.seed for r in results})
    lines = [f"### {title}", "", f"Seeds: {seeds}.", "", "| method | " + " | ".join(c[0] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method in methods:
        rows = [r for r in results if r.method == method]
        cells = [mean_spread([get(r) for r in rows], digits) for _, get, digits in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def toy_columns(num_tasks: int) -> list[tuple[str, Callable[[MethodResult], float], int]]:
    normalized = ("Σ_i L_i/L_i(0) (test)", lambda r: r.normalized_test_loss, 4)
    if num_tasks <= 3:
        return [(f"{t} L/L(0)", (lambda r, t=t: r.task_errors[t]), 4) for t in (f"task{i}" for i in range(num_tasks))] + [normalized]
    return [
        ("mean_i L_i/L_i(0)", lambda r: statistics.fmean(r.task_errors.values()), 4),
        ("max_i L_i/L_i(0)", lambda r: max(r.task_errors.values()), 4),
        normalized,
    ]


PENGUIN_COLUMNS = [
    ("species error", lambda r: r.task_errors["species"], 3),
    ("sex error", lambda r: r.task_errors["sex"], 3),
    ("body mass RMSE (g)", lambda r: r.task_errors["body_mass"], 1),
    ("Σ_i L_i/L_i(0) (test)", lambda r: r.normalized_test_loss, 4),
]
