"""Paper section 5.3 on the toy problem: does GradNorm's E_t[w_i] sit near the best static weights?

Train one GradNorm network, then N networks with random static weights, all from the same initialisation
and batches and for the same number of steps. For each static network: its task-normalised test loss and
the L2 distance between its weights and the GradNorm run's time-averaged weights E_t[w_i] (read back from
the recorded run). The paper finds a strong positive correlation (networks far from E_t[w_i] do worse; its
Figure 4 plots the change in performance).

Two sampling schemes (``sampling=``): ``uniform`` (the default, as in the paper: uniform on (0, 1),
renormalised to sum to T) and ``mixture``. At T=10 uniform draws all land far from E_t[w_i] (L2 distance
2.3 to 4.5 on the toy), so they cannot show whether being near it helps; ``mixture`` draws network k from
component k mod (C + 1): a Dirichlet centred on E_t[w_i] / T with concentration kappa_c (c < C), or a
uniform draw (c = C), each renormalised to sum to T. A Dirichlet(kappa m) draw times T has mean T m =
E_t[w_i] and expected squared distance T^2 (1 - sum_i m_i^2) / (kappa + 1) to it, so the concentrations
set how near the draws come (:func:`expected_distance`).
"""

from __future__ import annotations

import json
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from gradnorm.experiments import toy
from gradnorm.toolkit.analysis import export_weights
from gradnorm.toolkit.balancers import GradNorm, StaticWeights

from .toy_training import train_toy

BURN_IN = 0.1
SAMPLINGS = ("uniform", "mixture")
#: Dirichlet concentrations of the mixture: at T=10 on the toy, expected distances about 0.17 to 2.8.
DEFAULT_CONCENTRATIONS = (3000.0, 300.0, 100.0, 30.0, 10.0)
#: Smallest share of T a drawn weight keeps (a Dirichlet with small kappa m_i can return 0).
MIN_SHARE = 1e-4
BOOTSTRAP_RESAMPLES = 2000


@dataclass
class SweepPoint:
    run: str
    weights: list[float]
    distance: float  # ||w_static - E_t[w_gradnorm]||_2
    test_loss: float  # sum_i L_i(test) / L_i(test, init)
    draw: str = "uniform"  # the sampling component: "uniform" or "dirichlet-<kappa>"


@dataclass
class SweepResult:
    num_tasks: int
    steps: int
    gradnorm_weights: list[float]
    gradnorm_test_loss: float
    points: list[SweepPoint] = field(default_factory=list)
    sampling: str = "uniform"
    concentrations: list[float] = field(default_factory=list)
    seed: int = 0

    @property
    def pearson(self) -> float:
        return pearson([p.distance for p in self.points], [p.test_loss for p in self.points])

    @property
    def spearman(self) -> float:
        return pearson(_ranks([p.distance for p in self.points]), _ranks([p.test_loss for p in self.points]))

    @property
    def beaten_by(self) -> int:
        """How many random static networks did better than the GradNorm network."""
        return sum(p.test_loss < self.gradnorm_test_loss for p in self.points)

    def pearson_interval(self, resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
        """Percentile bootstrap 95% interval of the Pearson correlation, resampling networks with replacement."""
        return bootstrap_interval([p.distance for p in self.points], [p.test_loss for p in self.points], pearson, resamples, self.seed)

    def spearman_interval(self, resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
        rank_corr = lambda x, y: pearson(_ranks(x), _ranks(y))  # noqa: E731
        return bootstrap_interval([p.distance for p in self.points], [p.test_loss for p in self.points], rank_corr, resamples, self.seed)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(pearson=self.pearson, spearman=self.spearman, beaten_by=self.beaten_by)
        out.update(pearson_ci95=list(self.pearson_interval()), spearman_ci95=list(self.spearman_interval()))
        return out


def pearson(x: list[float], y: list[float]) -> float:
    if len(x) < 3:
        return float("nan")
    with np.errstate(invalid="ignore", divide="ignore"):  # constant x or y: NaN, which callers test for
        return float(np.corrcoef(np.asarray(x, dtype=float), np.asarray(y, dtype=float))[0, 1])


def _ranks(values: list[float]) -> list[float]:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks.tolist()


def bootstrap_interval(
    x: Sequence[float], y: Sequence[float], statistic: Callable[[list[float], list[float]], float], resamples: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(x, y)``: resample the (x, y) pairs with replacement
    ``resamples`` times (numpy's default_rng(seed)); resamples whose statistic is undefined (NaN: all x or
    all y equal) are left out."""
    if len(x) != len(y) or len(x) < 3:
        raise ValueError(f"bootstrap needs at least 3 paired values, got {len(x)} and {len(y)}")
    rng = np.random.default_rng(seed)
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    values = []
    for _ in range(resamples):
        index = rng.integers(0, len(xs), len(xs))
        values.append(statistic(xs[index].tolist(), ys[index].tolist()))
    finite = np.asarray([v for v in values if math.isfinite(v)])
    if len(finite) == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    return float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))


def random_static_weights(num_tasks: int, generator: torch.Generator) -> list[float]:
    """Uniform on (0, 1), renormalised to sum to T (paper 5.3)."""
    raw = torch.rand(num_tasks, generator=generator, dtype=torch.float64).clamp_min(1e-3)
    return (raw * (num_tasks / raw.sum())).tolist()


def expected_distance(target: Sequence[float], concentration: float) -> float:
    """Root-mean-square L2 distance of T x Dirichlet(kappa m) draws to their mean T m, m = target / T:
    sqrt(T^2 (1 - sum_i m_i^2) / (kappa + 1)), from the Dirichlet's variances m_i (1 - m_i) / (kappa + 1)."""
    total = float(sum(target))
    shares = np.asarray(target, dtype=float) / total
    return total * math.sqrt((1.0 - float((shares**2).sum())) / (concentration + 1.0))


def mixture_static_weights(
    target: Sequence[float], networks: int, rng: np.random.Generator, concentrations: Sequence[float] = DEFAULT_CONCENTRATIONS
) -> list[tuple[str, list[float]]]:
    """``networks`` weightings, each positive and summing to T = len(target): network k from component
    k mod (C + 1), a Dirichlet centred on target / sum(target) with concentration ``concentrations[c]``, or
    (c = C) uniform on (0, 1); each is floored at MIN_SHARE of T and renormalised to sum to T."""
    if not concentrations or any(not (c > 0 and math.isfinite(c)) for c in concentrations):
        raise ValueError(f"mixture sampling needs positive, finite Dirichlet concentrations, got {list(concentrations)}")
    if any(not (w > 0 and math.isfinite(w)) for w in target):
        raise ValueError(f"mixture sampling is centred on positive weights, got {list(target)}")
    num_tasks = len(target)
    shares = np.asarray(target, dtype=float) / float(sum(target))
    draws: list[tuple[str, list[float]]] = []
    for index in range(networks):
        component = index % (len(concentrations) + 1)
        if component == len(concentrations):
            name, raw = "uniform", rng.uniform(0.0, 1.0, num_tasks)
        else:
            kappa = float(concentrations[component])
            name, raw = f"dirichlet-{kappa:g}", rng.dirichlet(kappa * shares)
        raw = raw / raw.sum()
        raw = np.maximum(raw, MIN_SHARE)
        draws.append((name, (raw * (num_tasks / raw.sum())).tolist()))
    return draws


def run_sweep(
    root: Path,
    num_tasks: int = 2,
    networks: int = 16,
    steps: int = 500,
    alpha: float = 0.12,
    seed: int = 0,
    progress: Optional[Callable[[int], None]] = None,
    sampling: str = "uniform",
    concentrations: Sequence[float] = DEFAULT_CONCENTRATIONS,
    jobs: int = 1,
) -> SweepResult:
    """Train the GradNorm network and ``networks`` random static ones under ``root``; ``sampling``: see the
    module's docstring; ``jobs``: worker processes for the static networks (same results as 1)."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    if networks < 3:
        raise ValueError(f"a correlation needs at least 3 static networks, got {networks}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; choose from {list(SAMPLINGS)}")
    if sampling == "mixture" and (not concentrations or any(not (c > 0 and math.isfinite(c)) for c in concentrations)):
        raise ValueError(f"mixture sampling needs positive, finite Dirichlet concentrations, got {list(concentrations)}")
    root = Path(root)
    config = toy.ToyConfig(num_tasks=num_tasks, data_seed=seed, init_seed=seed + 1)
    data = toy.make_data(config)
    gradnorm_run = f"sweep-T{num_tasks}-gradnorm"
    reference = train_toy(config, GradNorm(alpha=alpha), steps, gradnorm_run, runs_root=root, data=data, progress=progress)
    averaged = export_weights(root, gradnorm_run, root / f"{gradnorm_run}-weights.json", burn_in=BURN_IN)["weights"]
    target = np.array([averaged[t] for t in data.task_names])
    used = [float(c) for c in concentrations] if sampling == "mixture" else []
    result = SweepResult(num_tasks, steps, target.tolist(), reference.normalized_test_loss, sampling=sampling, concentrations=used, seed=seed)
    if sampling == "uniform":
        generator = torch.Generator().manual_seed(seed + 1000)
        draws = [("uniform", random_static_weights(num_tasks, generator)) for _ in range(networks)]
    else:
        draws = mixture_static_weights(target.tolist(), networks, np.random.default_rng(seed + 1000), used)
    names = [f"sweep-T{num_tasks}-static-{index:03d}" for index in range(networks)]
    if jobs == 1:
        losses = [
            train_toy(config, StaticWeights(w), steps, name, runs_root=root, data=data, progress=progress).normalized_test_loss
            for name, (_, w) in zip(names, draws)
        ]
    else:
        # the static networks are independent (each from the config's initialisation and batches): one per worker
        # process at a time, each with this process's thread count; results come back in the draws' order
        work = [(config, weights, steps, name, str(root), torch.get_num_threads()) for name, (_, weights) in zip(names, draws)]
        losses = []
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for loss in pool.map(_train_static, *zip(*work)):
                losses.append(loss)
                if progress is not None:
                    progress(steps)
    for name, (draw, weights), loss in zip(names, draws, losses):
        distance = float(np.linalg.norm(np.asarray(weights) - target))
        result.points.append(SweepPoint(name, weights, distance, loss, draw))
    return result


def _train_static(config: toy.ToyConfig, weights: list[float], steps: int, name: str, root: str, threads: int) -> float:
    """One static-weights network in a worker process: its task-normalised test loss."""
    torch.set_num_threads(threads)
    return train_toy(config, StaticWeights(weights), steps, name, runs_root=Path(root), data=toy.make_data(config)).normalized_test_loss


def collect_sweep(
    root: Path, num_tasks: int, sampling: str = "uniform", concentrations: Sequence[float] = DEFAULT_CONCENTRATIONS, seed: int = 0
) -> SweepResult:
    """The sweep's result rebuilt from its recorded runs under ``root``, including a sweep stopped before its
    last network: every finished ``sweep-T<T>-static-<k>`` run, its weights from run.json, its test loss
    sum_i L_i(test) / L_i(test, init) from the last validation record and the initial test losses in its
    config. ``sampling``/``concentrations`` name the draw of network k as :func:`run_sweep` chose it."""
    import json as json_module

    from gradnorm.toolkit.analysis import validation_losses

    root = Path(root)
    gradnorm_run = f"sweep-T{num_tasks}-gradnorm"
    weights_file = root / f"{gradnorm_run}-weights.json"
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file} is missing: {root} holds no finished T={num_tasks} sweep's GradNorm run")
    averaged = json_module.loads(weights_file.read_text(encoding="utf-8"))["weights"]
    names = sorted(p.name for p in root.glob(f"sweep-T{num_tasks}-static-*") if _finished(p))
    losses = _final_test_losses(root, [gradnorm_run, *names], validation_losses)
    tasks = sorted(averaged, key=lambda t: int(t.removeprefix("task")) if t.removeprefix("task").isdigit() else t)
    target = np.array([averaged[t] for t in tasks])
    used = [float(c) for c in concentrations] if sampling == "mixture" else []
    result = SweepResult(num_tasks, _steps(root / gradnorm_run), target.tolist(), losses[gradnorm_run], sampling=sampling, concentrations=used, seed=seed)
    for name in names:
        index = int(name.rsplit("-", 1)[1])
        weights = [float(w) for w in json_module.loads((root / name / "run.json").read_text(encoding="utf-8"))["balancer"]["weights"]]
        component = index % (len(used) + 1)
        draw = "uniform" if sampling == "uniform" or component == len(used) else f"dirichlet-{used[component]:g}"
        result.points.append(SweepPoint(name, weights, float(np.linalg.norm(np.asarray(weights) - target)), losses[name], draw))
    if len(result.points) < 3:
        raise ValueError(f"{root} holds {len(result.points)} finished static networks; a correlation needs at least 3")
    return result


def _finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("status") == "finished"
    except (OSError, ValueError):
        return False


def _steps(run_dir: Path) -> int:
    return int(json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["config"]["steps"])


def _final_test_losses(root: Path, names: list[str], validation_losses: Callable) -> dict[str, float]:
    """sum_i L_i(test, last step) / L_i(test, init) per run, from its validation records and config."""
    frame = validation_losses(root, names)
    out = {}
    for name in names:
        initial = json.loads((root / name / "run.json").read_text(encoding="utf-8"))["config"]["initial_test_losses"]
        rows = frame[frame["run_id"] == name]
        last = rows[rows["step"] == rows["step"].max()]
        if set(last["task"]) != set(initial):
            raise ValueError(f"run {name}: the last validation record covers {sorted(set(last['task']))}, not every task {sorted(initial)}")
        out[name] = float(sum(loss / initial[task] for task, loss in zip(last["task"], last["loss"])))
    return out


def sampling_description(result: SweepResult) -> str:
    if result.sampling == "uniform":
        return "uniform on (0, 1), renormalised to sum to T"
    kappas = ", ".join(f"{c:g}" for c in result.concentrations)
    expected = ", ".join(f"{expected_distance(result.gradnorm_weights, c):.2f}" for c in result.concentrations)
    return (
        f"mixture: network k from component k mod {len(result.concentrations) + 1}, T x Dirichlet(kappa E_t[w_i]/T) with kappa in "
        f"({kappas}) (RMS distance to E_t[w_i] {expected}), or uniform on (0, 1); each renormalised to sum to T"
    )


def write_report(result: SweepResult, out_dir: Path) -> list[Path]:
    """``sweep.md`` (table), ``sweep.json`` (all figures), ``sweep.html`` and ``sweep.png`` (the scatter of
    the paper's Figure 4)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Section 5.3 on the toy problem (T={result.num_tasks}, {result.steps} steps, {len(result.points)} static networks)",
        "",
        f"GradNorm: E_t[w_i] = {', '.join(f'{w:.3f}' for w in result.gradnorm_weights)}; "
        f"task-normalised test loss {result.gradnorm_test_loss:.4f}; beaten by {result.beaten_by} of {len(result.points)} random static networks.",
        "",
        f"Static weights: {sampling_description(result)} (seed {result.seed}).",
        "",
        f"Correlation between test loss and L2 distance to E_t[w_i]: Pearson {result.pearson:.3f} "
        f"(bootstrap 95% interval {_interval(result.pearson_interval())}), Spearman {result.spearman:.3f} "
        f"({_interval(result.spearman_interval())}); {BOOTSTRAP_RESAMPLES} resamples of the networks.",
        "",
        *draw_summary(result),
        "| run | draw | static weights | L2 distance | test sum_i L_i/L_i(0) |",
        "|---|---|---|---|---|",
    ]
    for point in sorted(result.points, key=lambda p: p.distance):
        weights = ", ".join(f"{w:.3f}" for w in point.weights)
        lines.append(f"| {point.run} | {point.draw} | {weights} | {point.distance:.3f} | {point.test_loss:.4f} |")
    markdown = out_dir / "sweep.md"
    markdown.write_text("\n".join(lines) + "\n", encoding="utf-8")
    figures = out_dir / "sweep.json"
    figures.write_text(json.dumps(result.as_dict(), indent=2, default=_json_default) + "\n", encoding="utf-8")
    chart = out_dir / "sweep.html"
    figure = sweep_chart(result)
    figure.save(str(chart), inline=True)  # opens offline
    picture = out_dir / "sweep.png"
    figure.save(str(picture), scale_factor=1.5)
    return [markdown, figures, chart, picture]


def draw_summary(result: SweepResult) -> list[str]:
    """Per sampling component (nearest first): networks, distance range, median test loss, and how many beat
    the GradNorm run; nothing for a sweep with one component."""
    groups: dict[str, list[SweepPoint]] = {}
    for point in result.points:
        groups.setdefault(point.draw, []).append(point)
    if len(groups) < 2:
        return []
    lines = [
        "| draw | networks | L2 distance (min to max) | test loss, median | better than GradNorm |",
        "|---|---|---|---|---|",
    ]
    for draw, points in sorted(groups.items(), key=lambda item: float(np.median([p.distance for p in item[1]]))):
        distances = [p.distance for p in points]
        losses = [p.test_loss for p in points]
        better = sum(loss < result.gradnorm_test_loss for loss in losses)
        lines.append(f"| {draw} | {len(points)} | {min(distances):.3f} to {max(distances):.3f} | {float(np.median(losses)):.4f} | {better} of {len(points)} |")
    return lines + [""]


def sweep_chart(result: SweepResult):
    """Test loss against distance to E_t[w_i] (paper Figure 4), GradNorm's own loss as a rule."""
    import altair as alt
    import pandas as pd

    frame = pd.DataFrame([{"run": p.run, "draw": p.draw, "distance": p.distance, "test_loss": p.test_loss} for p in result.points])
    points = (
        alt.Chart(frame)
        .mark_circle(size=70)
        .encode(
            x=alt.X("distance:Q", title="L2 distance to GradNorm's E_t[w_i]"),
            y=alt.Y("test_loss:Q", title="task-normalised test loss", scale=alt.Scale(zero=False)),
            color=alt.Color("draw:N", title="static weights drawn from"),
            tooltip=["run", "draw", alt.Tooltip("distance:Q", format=".3f"), alt.Tooltip("test_loss:Q", format=".4f")],
        )
    )
    rule = alt.Chart(pd.DataFrame({"gradnorm": [result.gradnorm_test_loss]})).mark_rule(strokeDash=[4, 4], color="firebrick").encode(y="gradnorm:Q")
    title = f"Random static weights vs GradNorm (T={result.num_tasks}); Pearson {result.pearson:.2f}"
    return (points + rule).properties(title=title, width=480, height=320)


def _interval(bounds: tuple[float, float]) -> str:
    return f"[{bounds[0]:.3f}, {bounds[1]:.3f}]"


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(type(value).__name__)
