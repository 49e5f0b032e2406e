"""``gradnorm compare``: every balancing method on the paper's toy problem and on the Palmer penguins,
from the same initialisation and data for each seed, summarised as a table like the paper's Table 1.

Per problem and seed, all methods share the data, the network's initial weights and the batch order.
The table reports, per method, each task's test error (toy: test-loss ratio L_i/L_i(0); penguins: error
rates and RMSE) and the task-normalised test loss sum_i L_i(test) / L_i(test, initial) (paper section 4),
as mean +- standard deviation over the seeds. "static" retrains with the time-averaged weights E_t[w_i] of
the same seed's GradNorm run (paper 5.3).
"""

from __future__ import annotations

import functools
import importlib.util
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from gradnorm.experiments import toy
from gradnorm.hooks.session import attach
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
    TorchJDWeighting,
    UncertaintyWeighting,
    prior_cross_entropy,
    prior_l2,
)
from gradnorm.toolkit.balancers.torchjd_methods import METHODS as TORCHJD_SPECS

from . import penguins, qm9
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
    "famo",
    "imtl-l",
    "db-mtl",
)
#: The methods that come from TorchJD (``pip install "gradnorm-toolkit[methods]"``).
TORCHJD_METHODS = tuple(TORCHJD_SPECS)
ALL_METHODS = METHODS + TORCHJD_METHODS
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
    #: CPU time of the training thread per training step (time.thread_time), evaluation excluded.
    step_cpu_seconds: float = float("nan")


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
        "famo": FAMO,
        "imtl-l": IMTLL,
        "db-mtl": DBMTL,
    }
    for name in TORCHJD_METHODS:
        factories[name] = functools.partial(TorchJDWeighting, name, seed=seed)
    if method not in factories:
        raise ValueError(f"unknown method {method!r}; choose from {list(ALL_METHODS)}")
    if method == "static" and static is None:
        raise ValueError("the 'static' method retrains with a GradNorm run's E_t[w]; run 'gradnorm' first in the same seed")
    return factories[method]()


def torchjd_available() -> bool:
    return importlib.util.find_spec("torchjd") is not None


def default_methods() -> tuple[str, ...]:
    """Every method this installation can run: the toolkit's own, and TorchJD's where it is installed."""
    return ALL_METHODS if torchjd_available() else METHODS


#: The default methods on QM9: the baselines and the methods the recent QM9 tables report.
QM9_METHODS = (
    "equal",
    "static",
    "gradnorm",
    "uncertainty",
    "dwa",
    "mgda",
    "pcgrad",
    "famo",
    "imtl-l",
    "db-mtl",
)


def qm9_default_methods() -> tuple[str, ...]:
    return QM9_METHODS + (TORCHJD_METHODS if torchjd_available() else ())


def ordered(methods: Sequence[str]) -> list[str]:
    """Equal weights first (the cost ratio's reference), GradNorm before static, which reuses its weights;
    unknown names are an error."""
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(ALL_METHODS)}")
    out = list(dict.fromkeys(methods))
    if "static" in out and "gradnorm" not in out:
        raise ValueError("'static' retrains with GradNorm's time-averaged weights: include 'gradnorm' too")
    if "static" in out:
        out.remove("static")
        out.insert(out.index("gradnorm") + 1, "static")
    if "equal" in out:
        out.remove("equal")
        out.insert(0, "equal")
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
        cpu_started = time.thread_time()
        outcome = train_toy(config, balancer, steps, name, runs_root=runs_root, data=data, eval_every=max(1, steps // 4), progress=progress)
        if method == "gradnorm":
            gradnorm_weights = time_average(outcome.weights)
        errors = dict(zip(outcome.tasks, outcome.test_loss_ratios))
        # train_toy's evaluations (4 per run) are inside this CPU time: a small, equal share for every method
        step_cpu = (time.thread_time() - cpu_started) / max(1, steps)
        results.append(MethodResult(method, seed, errors, outcome.normalized_test_loss, outcome.seconds, name, outcome.weights, step_cpu))
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
    step_cpu = 0.0
    with session:
        for step in range(steps):
            if step % per_epoch == 0:
                order = torch.randperm(size, generator=batches)
            index = order[(step % per_epoch) * PENGUIN_BATCH : (step % per_epoch + 1) * PENGUIN_BATCH]
            targets = {k: v[index] for k, v in data.y_train.items()}
            cpu_started = time.thread_time()
            loss = session.loss(penguins.task_losses(model(data.x_train[index]), targets), epoch=step // per_epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step_cpu += time.thread_time() - cpu_started
            weights.append(session.balancer.weights().tolist())
            if (step + 1) % max(1, steps // 4) == 0 or step + 1 == steps:
                session.log_validation(dict(zip(penguins.TASKS, penguins.test_losses(model, data).tolist())), step=step)
            if progress is not None:
                progress(1)
    seconds = time.perf_counter() - started
    normalized = float((penguins.test_losses(model, data) / baseline).sum())
    return MethodResult(balancer.name, data.seed, penguins.test_errors(model, data), normalized, seconds, run_name, weights, step_cpu / max(1, steps))


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


COST_COLUMN = "step cost (× equal)"


def step_cost_ratios(results: Sequence[MethodResult]) -> dict[tuple[str, int], float]:
    """Each run's training-thread CPU time per step over the equal-weights run's of the same seed and problem,
    both measured in this invocation (NaN where no equal-weights run is there)."""
    equal = {r.seed: r.step_cpu_seconds for r in results if r.method == "equal"}
    return {(r.method, r.seed): (r.step_cpu_seconds / equal[r.seed] if r.seed in equal and equal[r.seed] > 0 else float("nan")) for r in results}


def format_table(title: str, results: Sequence[MethodResult], columns: Sequence[tuple[str, Callable[[MethodResult], float], int]], cost: bool = True) -> str:
    """A markdown table: one row per method, mean ± standard deviation over seeds for every column, and the
    per-step cost ratio to equal weights (training-thread CPU time, measured in the same invocation) last."""
    methods = list(dict.fromkeys(r.method for r in results))
    seeds = sorted({r.seed for r in results})
    names = [c[0] for c in columns] + ([COST_COLUMN] if cost else [])
    lines = [f"### {title}", "", f"Seeds: {seeds}.", "", "| method | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    ratios = step_cost_ratios(results)
    for method in methods:
        rows = [r for r in results if r.method == method]
        cells = [mean_spread([get(r) for r in rows], digits) for _, get, digits in columns]
        if cost:
            values = [ratios[(r.method, r.seed)] for r in rows]
            cells.append("n/a" if any(v != v for v in values) else mean_spread(values, 2))
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


# -- QM9 (11 regression targets) ---------------------------------------------------------------------------
QM9_ALPHA = 1.5  # paper 5.4's value for NYUv2; no tuned value exists for QM9
QM9_LR = 1e-3
QM9_BATCH = 128


def train_qm9(
    data: qm9.QM9Data, balancer: Balancer, steps: int, run_name: str, runs_root: Path, progress: Optional[Callable[[int], None]] = None
) -> MethodResult:
    """Train one method on the QM9 subset; test MAE per target (original units) at the last step."""
    model = qm9.make_model(data)
    optimizer = torch.optim.Adam(model.parameters(), lr=QM9_LR)
    baseline, _ = qm9.evaluate(model, data.x_test, data.y_test, data)
    config = {
        "problem": "QM9, 11 standardised regression targets (MSE); Coulomb-matrix eigenvalues and atom counts, MLP trunk",
        "seed": data.seed,
        "steps": steps,
        "train_size": int(data.x_train.shape[0]),
        "test_size": int(data.x_test.shape[0]),
        "network_optimizer": {"name": "adam", "lr": QM9_LR},
        "batch_size": QM9_BATCH,
        "target_units": qm9.UNITS,
        "initial_test_losses": dict(zip(qm9.TASKS, baseline.tolist())),
    }
    session = attach(model.shared_layer, balancer, runs_root=runs_root, run_name=run_name, config=config)
    batches = torch.Generator().manual_seed(data.seed + 2)
    size = data.x_train.shape[0]
    per_epoch = max(1, size // QM9_BATCH)
    weights: list[list[float]] = []
    started = time.perf_counter()
    step_cpu = 0.0
    with session:
        for step in range(steps):
            if step % per_epoch == 0:
                order = torch.randperm(size, generator=batches)
            index = order[(step % per_epoch) * QM9_BATCH : (step % per_epoch + 1) * QM9_BATCH]
            cpu_started = time.thread_time()
            loss = session.loss(qm9.task_losses(model(data.x_train[index]), data.y_train[index]), epoch=step // per_epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step_cpu += time.thread_time() - cpu_started
            weights.append(session.balancer.weights().tolist())
            if (step + 1) % max(1, steps // 4) == 0 or step + 1 == steps:
                val, _ = qm9.evaluate(model, data.x_val, data.y_val, data)
                session.log_validation(dict(zip(qm9.TASKS, val.tolist())), step=step)
            if progress is not None:
                progress(1)
    seconds = time.perf_counter() - started
    test_mse, test_mae = qm9.evaluate(model, data.x_test, data.y_test, data)
    normalized = float((test_mse / baseline).sum())
    return MethodResult(balancer.name, data.seed, test_mae, normalized, seconds, run_name, weights, step_cpu / max(1, steps))


def run_qm9(
    seed: int,
    methods: Sequence[str],
    steps: int,
    runs_root: Path,
    progress: Optional[Callable[[int], None]] = None,
    data: Optional[qm9.QM9Data] = None,
    on_result: Optional[Callable[[MethodResult], None]] = None,
) -> list[MethodResult]:
    """Every method on the QM9 subset with one seed; ``static`` retrains with this seed's GradNorm E_t[w_i]."""
    data = (data or qm9.load_qm9(seed)).with_seed(seed)
    results: list[MethodResult] = []
    gradnorm_weights: Optional[list[float]] = None
    for method in ordered(methods):
        balancer = make_balancer(method, QM9_ALPHA, [1.0] * len(qm9.TASKS), seed, gradnorm_weights)
        result = train_qm9(data, balancer, steps, f"qm9-{method}-s{seed}", runs_root, progress)
        result.method = method
        if method == "gradnorm":
            gradnorm_weights = time_average(result.weights)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def qm9_delta_m(results: Sequence[MethodResult]) -> dict[tuple[str, int], float]:
    """Delta_m% of every run against the equal-weights run of the same seed (NaN where there is none)."""
    equal = {r.seed: r.task_errors for r in results if r.method == "equal"}
    return {(r.method, r.seed): (qm9.delta_m(r.task_errors, equal[r.seed]) if r.seed in equal else float("nan")) for r in results}


def _task_error(result: MethodResult, task: str) -> float:
    return result.task_errors[task]


def qm9_columns(results: Sequence[MethodResult]) -> list[tuple[str, Callable[[MethodResult], float], int]]:
    deltas = qm9_delta_m(results)
    columns: list[tuple[str, Callable[[MethodResult], float], int]] = [
        (f"{task} ({qm9.UNITS[task]})", functools.partial(_task_error, task=task), 3 if task not in ("r2",) else 1) for task in qm9.TASKS
    ]
    columns.append(("Δm% vs equal", lambda r: deltas[(r.method, r.seed)], 1))
    return columns
