"""``gradnorm compare``: every balancing method on the paper's toy problem, the Palmer penguins, QM9 and
the encoder-decoder's generated scenes, from the same initialisation and data for each seed, summarised as
a table like the paper's Table 1.

Per problem and seed, all methods share the data, the network's initial weights and the batch order.
The table reports, per method, each task's test error (toy: test-loss ratio L_i/L_i(0); penguins: error
rates and RMSE; QM9: MAE; scenes: NYUv2-style depth, normals and segmentation metrics) and the
task-normalised test loss sum_i L_i(test) / L_i(test, initial) (paper section 4), as mean +- standard
deviation over the seeds. "static" retrains with the time-averaged weights E_t[w_i] of the same seed's
GradNorm run (paper 5.3). Penguins, QM9 and the scenes share one training loop (:func:`train_problem`);
:func:`interleaved_step_costs` measures every method's step on the same batches, interleaved.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gradnorm.experiments import dense_model, toy
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


_T = TypeVar("_T")


@dataclass
class Problem:
    """One multitask problem as the shared training loop sees it (penguins, QM9, the generated scenes).

    ``make_model`` returns the same initial network at every call (it seeds); ``losses(model, rows)`` the
    task losses (task -> scalar, in ``tasks`` order) on the training rows ``rows``; ``evaluate(model)`` the
    test losses (T,) and the per-task test errors of the table; ``validate(model)`` the per-task losses
    logged at each quarter of a run. Evaluation runs in eval mode without gradients (:func:`evaluated`).
    """

    prefix: str
    tasks: tuple[str, ...]
    seed: int
    train_size: int
    batch_size: int
    lr: float
    alpha: float
    make_model: Callable[[], nn.Module]
    shared_layer: Callable[[nn.Module], nn.Module]
    losses: Callable[[nn.Module, Tensor], dict[str, Tensor]]
    evaluate: Callable[[nn.Module], tuple[Tensor, dict[str, float]]]
    validate: Callable[[nn.Module], dict[str, float]]
    priors: Optional[Sequence[float]] = None
    config: dict[str, Any] = field(default_factory=dict)


def module_attribute(model: nn.Module, name: str) -> nn.Module:
    """``model.<name>``, the problem's shared layer W (a module, or the error says what it is instead)."""
    layer = getattr(model, name)
    if not isinstance(layer, nn.Module):
        raise TypeError(f"{type(model).__name__}.{name} is a {type(layer).__name__}, not the shared layer module")
    return layer


def evaluated(model: nn.Module, evaluate: Callable[[nn.Module], _T]) -> _T:
    """``evaluate(model)`` in eval mode (batch norm's running statistics) and without gradients; the
    training mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return evaluate(model)
    finally:
        model.train(was_training)


def batch_rows(problem: Problem) -> Callable[[int], Tensor]:
    """The training rows of step ``step`` (called with 0, 1, 2, ...): a new permutation at each epoch from the
    seed's own generator, so that every method of a seed sees the same batches in the same order."""
    generator = torch.Generator().manual_seed(problem.seed + 2)
    per_epoch = max(1, problem.train_size // problem.batch_size)
    order = torch.empty(0, dtype=torch.long)

    def rows(step: int) -> Tensor:
        nonlocal order
        if step % per_epoch == 0:
            order = torch.randperm(problem.train_size, generator=generator)
        offset = (step % per_epoch) * problem.batch_size
        return order[offset : offset + problem.batch_size]

    return rows


def train_problem(
    problem: Problem,
    balancer: Optional[Balancer],
    steps: int,
    run_name: str,
    runs_root: Optional[Path],
    progress: Optional[Callable[[int], None]] = None,
    single_task: Optional[str] = None,
) -> MethodResult:
    """The training loop that penguins, QM9 and the scenes share: Adam on the seed's batches, the balancer's
    weighted loss through :func:`attach` at the problem's shared layer W (paper 3.1), validation losses at
    each quarter, the last step evaluated (no model selection).

    ``single_task`` trains that task's loss alone, without a session (nothing recorded): the single-task
    baseline that Delta_m% (Maninis et al. 2019) is usually taken against; the other heads stay untrained.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if (balancer is None) == (single_task is None):
        raise ValueError("train_problem takes exactly one of balancer= and single_task=")
    if single_task is not None and single_task not in problem.tasks:
        raise ValueError(f"single_task {single_task!r} is not one of the tasks {list(problem.tasks)}")
    model = problem.make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=problem.lr)
    baseline, _ = evaluated(model, problem.evaluate)
    rows = batch_rows(problem)
    per_epoch = max(1, problem.train_size // problem.batch_size)
    weights: list[list[float]] = []
    step_cpu = 0.0
    started = time.perf_counter()
    if single_task is not None:
        for step in range(steps):
            index = rows(step)
            cpu_started = time.thread_time()
            loss = problem.losses(model, index)[single_task]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step_cpu += time.thread_time() - cpu_started
            if progress is not None:
                progress(1)
        method = f"single-{single_task}"
    else:
        assert balancer is not None
        config = dict(
            problem.config,
            seed=problem.seed,
            steps=steps,
            network_optimizer={"name": "adam", "lr": problem.lr},
            batch_size=problem.batch_size,
            initial_test_losses=dict(zip(problem.tasks, baseline.tolist())),
        )
        session = attach(problem.shared_layer(model), balancer, runs_root=runs_root, run_name=run_name, config=config)
        with session:
            for step in range(steps):
                index = rows(step)
                cpu_started = time.thread_time()
                loss = session.loss(problem.losses(model, index), epoch=step // per_epoch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step_cpu += time.thread_time() - cpu_started
                weights.append(session.balancer.weights().tolist())
                if (step + 1) % max(1, steps // 4) == 0 or step + 1 == steps:
                    session.log_validation(evaluated(model, problem.validate), step=step)
                if progress is not None:
                    progress(1)
        method = balancer.name
    seconds = time.perf_counter() - started
    test_losses, errors = evaluated(model, problem.evaluate)
    normalized = float((test_losses / baseline).sum())
    return MethodResult(method, problem.seed, errors, normalized, seconds, run_name, weights, step_cpu / steps)


def run_problem(
    problem: Problem,
    methods: Sequence[str],
    steps: int,
    runs_root: Path,
    progress: Optional[Callable[[int], None]] = None,
    on_result: Optional[Callable[[MethodResult], None]] = None,
    single_task: bool = False,
) -> list[MethodResult]:
    """Every method on one problem and seed, runs named ``<prefix>-<method>-s<seed>``; ``static`` retrains
    with this seed's GradNorm E_t[w_i] (paper 5.3); ``single_task`` adds one single-task run per task
    (methods ``single-<task>``, not recorded)."""
    priors = list(problem.priors) if problem.priors is not None else [1.0] * len(problem.tasks)
    results: list[MethodResult] = []
    gradnorm_weights: Optional[list[float]] = None

    def keep(result: MethodResult) -> None:
        results.append(result)
        if on_result is not None:
            on_result(result)

    for method in ordered(methods):
        balancer = make_balancer(method, problem.alpha, priors, problem.seed, gradnorm_weights)
        result = train_problem(problem, balancer, steps, f"{problem.prefix}-{method}-s{problem.seed}", runs_root, progress)
        result.method = method
        if method == "gradnorm":
            gradnorm_weights = time_average(result.weights)
        keep(result)
    for task in problem.tasks if single_task else ():
        keep(train_problem(problem, None, steps, f"{problem.prefix}-single-{task}-s{problem.seed}", None, progress, single_task=task))
    return results


def penguin_problem(data: penguins.PenguinData) -> Problem:
    """The Palmer penguins: species and sex (cross-entropy) and body mass (MSE, kg) from one MLP trunk."""

    def losses(model: nn.Module, index: Tensor) -> dict[str, Tensor]:
        return penguins.task_losses(model(data.x_train[index]), {k: v[index] for k, v in data.y_train.items()})

    def evaluate(model: nn.Module) -> tuple[Tensor, dict[str, float]]:
        assert isinstance(model, penguins.PenguinNet)
        return penguins.test_losses(model, data), penguins.test_errors(model, data)

    def validate(model: nn.Module) -> dict[str, float]:
        assert isinstance(model, penguins.PenguinNet)
        return dict(zip(penguins.TASKS, penguins.test_losses(model, data).tolist()))

    priors = [
        prior_cross_entropy(data.y_train["species"], data.num_species),
        prior_cross_entropy(data.y_train["sex"], 2),
        prior_l2(data.y_train["body_mass"]),
    ]
    return Problem(
        prefix="penguins",
        tasks=tuple(penguins.TASKS),
        seed=data.seed,
        train_size=int(data.x_train.shape[0]),
        batch_size=PENGUIN_BATCH,
        lr=PENGUIN_LR,
        alpha=PENGUIN_ALPHA,
        make_model=lambda: penguins.make_model(data),
        shared_layer=functools.partial(module_attribute, name="shared_layer"),
        losses=losses,
        evaluate=evaluate,
        validate=validate,
        priors=priors,
        config={"problem": "palmer penguins: species, sex, body mass (kg)"},
    )


def train_penguins(
    data: penguins.PenguinData, balancer: Balancer, steps: int, run_name: str, runs_root: Path, progress: Optional[Callable[[int], None]] = None
) -> MethodResult:
    return train_problem(penguin_problem(data), balancer, steps, run_name, runs_root, progress)


def run_penguins(seed: int, methods: Sequence[str], steps: int, runs_root: Path, progress: Optional[Callable[[int], None]] = None) -> list[MethodResult]:
    return run_problem(penguin_problem(penguins.load_penguins(seed)), methods, steps, runs_root, progress)


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


def qm9_problem(data: qm9.QM9Data) -> Problem:
    """QM9's 11 standardised targets (MSE) from one MLP trunk; test MAE in the original units."""

    def losses(model: nn.Module, index: Tensor) -> dict[str, Tensor]:
        return qm9.task_losses(model(data.x_train[index]), data.y_train[index])

    def evaluate(model: nn.Module) -> tuple[Tensor, dict[str, float]]:
        assert isinstance(model, qm9.QM9Net)
        return qm9.evaluate(model, data.x_test, data.y_test, data)

    def validate(model: nn.Module) -> dict[str, float]:
        assert isinstance(model, qm9.QM9Net)
        val, _ = qm9.evaluate(model, data.x_val, data.y_val, data)
        return dict(zip(qm9.TASKS, val.tolist()))

    return Problem(
        prefix="qm9",
        tasks=tuple(qm9.TASKS),
        seed=data.seed,
        train_size=int(data.x_train.shape[0]),
        batch_size=QM9_BATCH,
        lr=QM9_LR,
        alpha=QM9_ALPHA,
        make_model=lambda: qm9.make_model(data),
        shared_layer=functools.partial(module_attribute, name="shared_layer"),
        losses=losses,
        evaluate=evaluate,
        validate=validate,
        config={
            "problem": "QM9, 11 standardised regression targets (MSE); Coulomb-matrix eigenvalues and atom counts, MLP trunk",
            "train_size": int(data.x_train.shape[0]),
            "test_size": int(data.x_test.shape[0]),
            "target_units": qm9.UNITS,
        },
    )


def train_qm9(
    data: qm9.QM9Data, balancer: Balancer, steps: int, run_name: str, runs_root: Path, progress: Optional[Callable[[int], None]] = None
) -> MethodResult:
    """Train one method on the QM9 subset; test MAE per target (original units) at the last step."""
    return train_problem(qm9_problem(data), balancer, steps, run_name, runs_root, progress)


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
    return run_problem(qm9_problem(data), methods, steps, runs_root, progress, on_result)


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


def delta_m(errors: dict[str, float], baseline: dict[str, float], higher_better: Sequence[str] = ()) -> float:
    """Delta_m% (Maninis et al. 2019): the mean over the metrics of (-1)^h_k (M_k - M_k,base) / M_k,base x 100,
    h_k = 1 for a metric where higher is better (mIoU, pixel accuracy); lower is better."""
    terms = [(-1.0 if name in higher_better else 1.0) * (errors[name] - base) / base for name, base in baseline.items()]
    return 100.0 * statistics.fmean(terms)


# -- the encoder-decoder's generated scenes (3 dense tasks, the NYUv2 analogue) -----------------------------
SCENES_ALPHA = 1.5  # paper 5.4: GradNorm's alpha on NYUv2
SCENES_LR = 1e-3
SCENES_BATCH = 16
SCENES_SIZE = 16  # pixels per side
SCENES_TRAIN = 256
SCENES_TEST = 64
SCENES_WIDTH = 8  # the encoder-decoder's base width (dense_model.DenseMultiTaskNet)
SCENES_CLASSES = 5
SCENES_NOISE = 0.3  # the image's noise: its depth and segmentation cues only become the labels after smoothing
#: The table's metrics per scene task (NYUv2's usual ones that the generated data supports), and those where
#: higher is better (for Delta_m%).
SCENE_METRICS = {"depth": ("depth_abs_err",), "normals": ("normal_angle_deg",), "segmentation": ("miou", "pixel_acc")}
SCENE_HIGHER_BETTER = ("miou", "pixel_acc")


@dataclass
class SceneData:
    train: dense_model.Scenes
    test: dense_model.Scenes
    seed: int
    classes: int
    width: int


def make_scene_data(
    seed: int,
    train: int = SCENES_TRAIN,
    test: int = SCENES_TEST,
    size: int = SCENES_SIZE,
    width: int = SCENES_WIDTH,
    classes: int = SCENES_CLASSES,
    noise: float = SCENES_NOISE,
) -> SceneData:
    """``train`` + ``test`` generated scenes of ``size`` pixels, drawn from the seed (a new set per seed)."""
    if train < 1 or test < 1:
        raise ValueError(f"scenes: train and test need at least one scene each, got {train} and {test}")
    if size < 4 or size % 4:
        raise ValueError(f"scenes: the image size must be a multiple of 4 (the encoder downsamples by 4), got {size}")
    if width < 1 or classes < 2:
        raise ValueError(f"scenes: width must be >= 1 and classes >= 2, got {width} and {classes}")
    scenes = dense_model.make_scenes(train + test, size=size, classes=classes, seed=1000 + seed, noise=noise)
    part = functools.partial(dense_model.batch, scenes, device=torch.device("cpu"))
    return SceneData(part(torch.arange(train)), part(torch.arange(train, train + test)), seed, classes, width)


def scene_metrics(outputs: Sequence[Tensor], scenes: dense_model.Scenes, classes: int) -> dict[str, Any]:
    """The sums behind the NYUv2-style metrics of one chunk: absolute depth error, angle between the predicted
    and true normals, and the segmentation's confusion matrix (rows: true class, columns: predicted)."""
    seg, depth, normals = outputs
    cosine = F.cosine_similarity(normals.double(), scenes.normals.double(), dim=1).clamp(-1.0, 1.0)
    predicted = seg.argmax(1)
    confusion = torch.bincount(scenes.segmentation.flatten() * classes + predicted.flatten(), minlength=classes * classes).view(classes, classes)
    return {
        "depth_abs_sum": float((depth.double() - scenes.depth.double()).abs().sum()),
        "angle_sum": float(torch.rad2deg(torch.acos(cosine)).sum()),
        "pixels": int(scenes.depth.numel()),
        "confusion": confusion,
    }


def summarize_scene_metrics(parts: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Depth absolute error and mean normal angle (degrees) over all pixels; mIoU over the classes present in
    the truth or the prediction (IoU_c = TP / (TP + FP + FN)); pixel accuracy."""
    pixels = sum(p["pixels"] for p in parts)
    confusion = torch.stack([p["confusion"] for p in parts]).sum(0).double()
    true_positive = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    present = union > 0
    return {
        "depth_abs_err": sum(p["depth_abs_sum"] for p in parts) / pixels,
        "normal_angle_deg": sum(p["angle_sum"] for p in parts) / pixels,
        "miou": float((true_positive[present] / union[present]).mean()),
        "pixel_acc": float(true_positive.sum() / confusion.sum()),
    }


def scene_problem(data: SceneData) -> Problem:
    """The encoder-decoder (``dense_model.DenseMultiTaskNet``) on generated scenes: segmentation (cross-entropy),
    depth (L1) and surface normals (1 - cosine), the losses of the paper's NYUv2 set-up (section 5); W is the
    trunk's last convolution."""
    tasks = dense_model.TASKS
    chunk = 64

    def make_model() -> nn.Module:
        torch.manual_seed(data.seed + 1)
        return dense_model.DenseMultiTaskNet(classes=data.classes, width=data.width)

    def losses(model: nn.Module, index: Tensor) -> dict[str, Tensor]:
        scenes = dense_model.batch(data.train, index, torch.device("cpu"))
        return dict(zip(tasks, dense_model.task_losses(model(scenes.images), scenes)))

    def evaluate(model: nn.Module) -> tuple[Tensor, dict[str, float]]:
        count = data.test.images.shape[0]
        total = torch.zeros(len(tasks), dtype=torch.float64)
        parts = []
        for start in range(0, count, chunk):
            scenes = dense_model.batch(data.test, torch.arange(start, min(count, start + chunk)), torch.device("cpu"))
            outputs = model(scenes.images)
            # every loss is a mean over the chunk's pixels and every scene has as many: weight by scene count
            total += torch.stack(dense_model.task_losses(outputs, scenes)).double() * scenes.images.shape[0]
            parts.append(scene_metrics(outputs, scenes, data.classes))
        return (total / count).float(), summarize_scene_metrics(parts)

    def validate(model: nn.Module) -> dict[str, float]:
        test_losses, _ = evaluate(model)
        return dict(zip(tasks, test_losses.tolist()))

    size = int(data.train.images.shape[-1])
    return Problem(
        prefix="scenes",
        tasks=tuple(tasks),
        seed=data.seed,
        train_size=int(data.train.images.shape[0]),
        batch_size=SCENES_BATCH,
        lr=SCENES_LR,
        alpha=SCENES_ALPHA,
        make_model=make_model,
        shared_layer=functools.partial(module_attribute, name="shared"),
        losses=losses,
        evaluate=evaluate,
        validate=validate,
        config={
            "problem": "generated scenes: segmentation (cross-entropy), depth (L1), normals (1 - cosine); ResNet-style encoder-decoder",
            "image_size": size,
            "train_scenes": int(data.train.images.shape[0]),
            "test_scenes": int(data.test.images.shape[0]),
            "width": data.width,
            "classes": data.classes,
        },
    )


def run_scenes(
    seed: int,
    methods: Sequence[str],
    steps: int,
    runs_root: Path,
    data: Optional[SceneData] = None,
    progress: Optional[Callable[[int], None]] = None,
    on_result: Optional[Callable[[MethodResult], None]] = None,
    single_task: bool = True,
) -> list[MethodResult]:
    """Every method on this seed's scenes, and (``single_task``) one single-task run per task."""
    data = data if data is not None else make_scene_data(seed)
    return run_problem(scene_problem(data), methods, steps, runs_root, progress, on_result, single_task)


def merge_single_task(results: Sequence[MethodResult]) -> list[MethodResult]:
    """The ``single-<task>`` runs of each seed merged into one ``single-task`` result: each task's metrics from
    its own run, the task-normalised loss sum_i L_i/L_i(0) over the tasks' own runs, the runs' mean step cost."""
    out = [r for r in results if not r.method.startswith("single-")]
    for seed in sorted({r.seed for r in results}):
        singles = {r.method.removeprefix("single-"): r for r in results if r.seed == seed and r.method.startswith("single-")}
        if not singles:
            continue
        missing = [t for t in SCENE_METRICS if t not in singles]
        if missing:
            raise ValueError(f"seed {seed}: single-task runs of {missing} are missing")
        errors = {m: singles[task].task_errors[m] for task, metrics in SCENE_METRICS.items() for m in metrics}
        cpu = statistics.fmean(r.step_cpu_seconds for r in singles.values())
        seconds = sum(r.seconds for r in singles.values())
        out.append(MethodResult("single-task", seed, errors, float("nan"), seconds, "", [], cpu))
    return out


def scene_deltas(results: Sequence[MethodResult], reference: str) -> dict[tuple[str, int], float]:
    """Delta_m% over the four scene metrics against the ``reference`` method's result of the same seed."""
    base = {r.seed: r.task_errors for r in results if r.method == reference}
    metrics = [m for ms in SCENE_METRICS.values() for m in ms]
    return {
        (r.method, r.seed): (
            delta_m({m: r.task_errors[m] for m in metrics}, {m: base[r.seed][m] for m in metrics}, SCENE_HIGHER_BETTER) if r.seed in base else float("nan")
        )
        for r in results
    }


def scene_columns(results: Sequence[MethodResult]) -> list[tuple[str, Callable[[MethodResult], float], int]]:
    vs_equal = scene_deltas(results, "equal")
    columns: list[tuple[str, Callable[[MethodResult], float], int]] = [
        ("depth abs. error", functools.partial(_task_error, task="depth_abs_err"), 4),
        ("normals mean angle (°)", functools.partial(_task_error, task="normal_angle_deg"), 2),
        ("seg. mIoU ↑", functools.partial(_task_error, task="miou"), 4),
        ("seg. pixel acc. ↑", functools.partial(_task_error, task="pixel_acc"), 4),
        ("Δm% vs equal", lambda r: vs_equal[(r.method, r.seed)], 2),
    ]
    if any(r.method == "single-task" for r in results):
        vs_single = scene_deltas(results, "single-task")
        columns.append(("Δm% vs single-task", lambda r: vs_single[(r.method, r.seed)], 2))
    return columns


# -- step cost, interleaved ---------------------------------------------------------------------------------
def toy_problem(num_tasks: int, seed: int, train_size: int = 10_000) -> Problem:
    """The toy problem (paper section 4) as a :class:`Problem`, for :func:`interleaved_step_costs` (the toy's
    table comes from ``toy_training.train_toy``, the loop ``gradnorm demo`` uses)."""
    from .toy_training import BATCH_SIZE, NETWORK_LR

    config = toy.ToyConfig(num_tasks=num_tasks, data_seed=seed, init_seed=seed + 1, train_size=train_size)
    data = toy.make_data(config)
    tasks = tuple(data.task_names)

    def losses(model: nn.Module, index: Tensor) -> dict[str, Tensor]:
        return dict(zip(tasks, toy.task_losses(model(data.x_train[index]), data.y_train[index])))

    def evaluate(model: nn.Module) -> tuple[Tensor, dict[str, float]]:
        test = torch.stack(toy.task_losses(model(data.x_test), data.y_test))
        return test, dict(zip(tasks, test.tolist()))

    return Problem(
        prefix=f"toy-T{num_tasks}",
        tasks=tasks,
        seed=seed,
        train_size=train_size,
        batch_size=BATCH_SIZE,
        lr=NETWORK_LR,
        alpha=TOY_ALPHA,
        make_model=lambda: toy.make_model(config),
        shared_layer=functools.partial(module_attribute, name="shared_layer"),
        losses=losses,
        evaluate=evaluate,
        validate=lambda model: evaluate(model)[1],
        priors=[prior_l2(data.y_train[:, i]) for i in range(num_tasks)],
    )


@dataclass
class InterleavedCost:
    method: str
    #: The training thread's CPU time of every timed step (seconds).
    step_seconds: list[float]
    #: Median step over equal weights' median step.
    ratio: float
    #: The same ratio per round (each method's median step of the round over equal's of that round).
    round_ratios: list[float]


def interleaved_step_costs(problem: Problem, methods: Sequence[str], rounds: int = 12, block: int = 4, warmup: int = 3, seed: int = 0) -> list[InterleavedCost]:
    """Every method's training step (forward, ``session.loss``, backward, Adam step), timed side by side.

    All methods' models, optimisers and sessions live in this one process from the same initial network; in
    every round each method takes ``block`` steps on the same ``block`` batches, in an order shuffled per round,
    so drift of a shared machine (other jobs, frequency, caches) falls on all of them alike. The clock is the
    training thread's CPU time (``time.thread_time``), which leaves out the time other jobs hold the cores and
    the recorder's background writer. ``static`` runs with equal constant weights: its cost does not depend on
    their values. The first ``warmup`` steps (GradNorm's and the taps' first-step set-up) are not timed.
    """
    if rounds < 1 or block < 1 or warmup < 0:
        raise ValueError(f"interleaved costs need rounds >= 1 and block >= 1, warmup >= 0; got {rounds}, {block}, {warmup}")
    names = ordered(methods)
    if "equal" not in names:
        raise ValueError("the interleaved cost is a ratio to equal weights: include 'equal' in the methods")
    priors = list(problem.priors) if problem.priors is not None else [1.0] * len(problem.tasks)
    rows = batch_rows(problem)
    batches = [rows(i) for i in range(warmup + rounds * block)]
    per_epoch = max(1, problem.train_size // problem.batch_size)
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="gradnorm-cost-") as root, contextlib.ExitStack() as stack:
        steps: dict[str, Callable[[int], None]] = {}
        for name in names:
            balancer = make_balancer(name, problem.alpha, priors, problem.seed, [1.0] * len(problem.tasks))
            model = problem.make_model()
            optimizer = torch.optim.Adam(model.parameters(), lr=problem.lr)
            session = stack.enter_context(attach(problem.shared_layer(model), balancer, runs_root=Path(root), run_name=f"cost-{name}"))

            def step(i: int, model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer, session: Any = session) -> None:
                loss = session.loss(problem.losses(model, batches[i]), epoch=i // per_epoch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            steps[name] = step
        for name in names:
            for i in range(warmup):
                steps[name](i)
        shuffler = random.Random(seed)
        order = list(names)
        for round_index in range(rounds):
            shuffler.shuffle(order)
            first = warmup + round_index * block
            for name in order:
                block_times = []
                for i in range(first, first + block):
                    started = time.thread_time()
                    steps[name](i)
                    block_times.append(time.thread_time() - started)
                times[name].append(block_times)
    equal_rounds = [statistics.median(t) for t in times["equal"]]
    equal_median = statistics.median(t for block_times in times["equal"] for t in block_times)
    out = []
    for name in names:
        flat = [t for block_times in times[name] for t in block_times]
        ratios = [statistics.median(t) / e if e > 0 else math.nan for t, e in zip(times[name], equal_rounds)]
        out.append(InterleavedCost(name, flat, statistics.median(flat) / equal_median if equal_median > 0 else math.nan, ratios))
    return out


def format_interleaved(title: str, costs: Sequence[InterleavedCost], note: str = "") -> str:
    """A markdown table of :func:`interleaved_step_costs`: median step (ms of the training thread's CPU), its
    ratio to equal weights, and the quartiles of the per-round ratios (how well the ratio is resolved)."""
    lines = [f"### {title}", ""]
    if note:
        lines += [note, ""]
    lines += ["| method | median step (ms CPU) | × equal | per-round × equal, 25%–75% |", "|---|---|---|---|"]
    for cost in costs:
        quartiles = statistics.quantiles(cost.round_ratios, n=4) if len(cost.round_ratios) > 1 else [cost.round_ratios[0]] * 3
        lines.append(f"| {cost.method} | {1e3 * statistics.median(cost.step_seconds):.2f} | {cost.ratio:.2f} | {quartiles[0]:.2f}–{quartiles[2]:.2f} |")
    return "\n".join(lines)
