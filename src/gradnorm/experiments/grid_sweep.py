"""Paper section 5.3 on the toy problem: does GradNorm's E_t[w_i] sit near the best static weights?

Train one GradNorm network, then N networks with random static weights (uniform, renormalised to sum to
T), all from the same initialisation and batches and for the same number of steps. For each static
network: its task-normalised test loss and the L2 distance between its weights and the GradNorm run's
time-averaged weights E_t[w_i] (read back from the recorded run). The paper finds a strong positive
correlation (networks far from E_t[w_i] do worse; its Figure 4 plots the change in performance).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from gradnorm.experiments import toy
from gradnorm.toolkit.analysis import export_weights
from gradnorm.toolkit.balancers import GradNorm, StaticWeights

from .toy_training import train_toy

BURN_IN = 0.1


@dataclass
class SweepPoint:
    run: str
    weights: list[float]
    distance: float  # ||w_static - E_t[w_gradnorm]||_2
    test_loss: float  # sum_i L_i(test) / L_i(test, init)


@dataclass
class SweepResult:
    num_tasks: int
    steps: int
    gradnorm_weights: list[float]
    gradnorm_test_loss: float
    points: list[SweepPoint] = field(default_factory=list)

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

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(pearson=self.pearson, spearman=self.spearman, beaten_by=self.beaten_by)
        return out


def pearson(x: list[float], y: list[float]) -> float:
    if len(x) < 3:
        return float("nan")
    return float(np.corrcoef(np.asarray(x, dtype=float), np.asarray(y, dtype=float))[0, 1])


def _ranks(values: list[float]) -> list[float]:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks.tolist()


def random_static_weights(num_tasks: int, generator: torch.Generator) -> list[float]:
    """Uniform on (0, 1), renormalised to sum to T (paper 5.3)."""
    raw = torch.rand(num_tasks, generator=generator, dtype=torch.float64).clamp_min(1e-3)
    return (raw * (num_tasks / raw.sum())).tolist()


def run_sweep(
    root: Path,
    num_tasks: int = 2,
    networks: int = 16,
    steps: int = 500,
    alpha: float = 0.12,
    seed: int = 0,
    progress: Optional[Callable[[int], None]] = None,
) -> SweepResult:
    """Train the GradNorm network and ``networks`` random static ones under ``root``."""
    if networks < 3:
        raise ValueError(f"a correlation needs at least 3 static networks, got {networks}")
    root = Path(root)
    config = toy.ToyConfig(num_tasks=num_tasks, data_seed=seed, init_seed=seed + 1)
    data = toy.make_data(config)
    gradnorm_run = f"sweep-T{num_tasks}-gradnorm"
    reference = train_toy(config, GradNorm(alpha=alpha), steps, gradnorm_run, runs_root=root, data=data, progress=progress)
    averaged = export_weights(root, gradnorm_run, root / f"{gradnorm_run}-weights.json", burn_in=BURN_IN)["weights"]
    target = np.array([averaged[t] for t in data.task_names])
    result = SweepResult(num_tasks, steps, target.tolist(), reference.normalized_test_loss)
    generator = torch.Generator().manual_seed(seed + 1000)
    for index in range(networks):
        weights = random_static_weights(num_tasks, generator)
        name = f"sweep-T{num_tasks}-static-{index:03d}"
        trained = train_toy(config, StaticWeights(weights), steps, name, runs_root=root, data=data, progress=progress)
        distance = float(np.linalg.norm(np.asarray(weights) - target))
        result.points.append(SweepPoint(name, weights, distance, trained.normalized_test_loss))
    return result


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
        f"Correlation between test loss and L2 distance to E_t[w_i]: Pearson {result.pearson:.3f}, Spearman {result.spearman:.3f}.",
        "",
        "| run | static weights | L2 distance | test sum_i L_i/L_i(0) |",
        "|---|---|---|---|",
    ]
    for point in sorted(result.points, key=lambda p: p.distance):
        lines.append(f"| {point.run} | {', '.join(f'{w:.3f}' for w in point.weights)} | {point.distance:.3f} | {point.test_loss:.4f} |")
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


def sweep_chart(result: SweepResult):
    """Test loss against distance to E_t[w_i] (paper Figure 4), GradNorm's own loss as a rule."""
    import altair as alt
    import pandas as pd

    frame = pd.DataFrame([{"run": p.run, "distance": p.distance, "test_loss": p.test_loss} for p in result.points])
    points = (
        alt.Chart(frame)
        .mark_circle(size=70)
        .encode(
            x=alt.X("distance:Q", title="L2 distance to GradNorm's E_t[w_i]"),
            y=alt.Y("test_loss:Q", title="task-normalised test loss", scale=alt.Scale(zero=False)),
            tooltip=["run", alt.Tooltip("distance:Q", format=".3f"), alt.Tooltip("test_loss:Q", format=".4f")],
        )
    )
    rule = alt.Chart(pd.DataFrame({"gradnorm": [result.gradnorm_test_loss]})).mark_rule(strokeDash=[4, 4], color="firebrick").encode(y="gradnorm:Q")
    title = f"Random static weights vs GradNorm (T={result.num_tasks}); Pearson {result.pearson:.2f}"
    return (points + rule).properties(title=title, width=480, height=320)


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(type(value).__name__)
