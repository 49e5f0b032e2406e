"""The section 5.3 sweep's sampling schemes (``gradnorm sweep --sampling``) and its bootstrap interval."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gradnorm import cli
from gradnorm.experiments import grid_sweep
from gradnorm.toolkit.weights_file import load_weights

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "sweep"
# GradNorm's E_t[w_i] of the committed T=10 toy sweep (alpha 0.12, seed 0): far from uniform, as in a real sweep
TARGET_T10 = [0.941, 0.539, 2.804, 0.716, 0.403, 0.225, 0.367, 1.313, 0.514, 2.178]


def test_mixture_draws_are_positive_sum_to_t_and_span_near_to_far():
    kappas = (3000.0, 300.0, 30.0)
    draws = grid_sweep.mixture_static_weights(TARGET_T10, 4 * 400, np.random.default_rng(7), kappas)
    names = [name for name, _ in draws]
    assert names[:4] == ["dirichlet-3000", "dirichlet-300", "dirichlet-30", "uniform"] and names[4:8] == names[:4]
    weights = np.array([w for _, w in draws])
    assert weights.shape == (1600, 10) and (weights > 0).all()
    assert all(math.fsum(row) == pytest.approx(10.0, abs=1e-12) for row in weights)
    target = np.array(TARGET_T10) * (10.0 / sum(TARGET_T10))  # the sweep's E_t[w_i] sums to T; these rounded ones nearly
    distance = np.sqrt(((weights - target) ** 2).sum(axis=1))
    shares = target / 10.0
    for component, kappa in enumerate(kappas):
        rows = weights[component::4]
        # Dirichlet(kappa m): Var(x_i) = m_i (1 - m_i) / (kappa + 1), so E||T x - T m||^2 = T^2 sum_i m_i (1 - m_i) / (kappa + 1)
        expected_sq = 100.0 * float(np.sum(shares * (1 - shares))) / (kappa + 1)
        assert float(np.mean(distance[component::4] ** 2)) == pytest.approx(expected_sq, rel=0.12)
        assert rows.mean(axis=0) == pytest.approx(target, abs=4 * math.sqrt(expected_sq / 400))
        assert grid_sweep.expected_distance(target.tolist(), kappa) == pytest.approx(math.sqrt(expected_sq), rel=1e-9)
    medians = [float(np.median(distance[c::4])) for c in range(4)]
    assert medians[0] < medians[1] < medians[2] and medians[0] < 0.25  # near E_t[w_i] ...
    assert distance.max() > 4.0 and medians[3] > 2.0  # ... to as far as uniform draws land


def test_mixture_rejects_bad_concentrations_and_targets():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="positive, finite Dirichlet concentrations"):
        grid_sweep.mixture_static_weights([1.0, 1.0], 4, rng, (100.0, 0.0))
    with pytest.raises(ValueError, match="centred on positive weights"):
        grid_sweep.mixture_static_weights([2.0, 0.0], 4, rng)
    with pytest.raises(ValueError, match="unknown sampling 'grid'"):
        grid_sweep.run_sweep(Path("unused"), networks=3, sampling="grid")


def test_default_sampling_still_draws_the_committed_sweeps_weights():
    """The default (uniform) draws of seed 0 are those of the committed T=2 sweep, so it reproduces."""
    committed = json.loads((RESULTS / "sweep-T2.json").read_text())
    generator = torch.Generator().manual_seed(1000)
    for point in committed["points"][:16]:
        assert grid_sweep.random_static_weights(2, generator) == pytest.approx(point["weights"], rel=1e-12)


def test_bootstrap_interval_agrees_with_fishers_interval():
    """For n bivariate-normal pairs the percentile bootstrap of Pearson's r is close to Fisher's
    tanh(atanh r +- 1.96 / sqrt(n - 3)); a perfectly linear sample gives [1, 1]."""
    rng = np.random.default_rng(3)
    n, rho = 400, 0.6
    x = rng.standard_normal(n)
    y = rho * x + math.sqrt(1 - rho**2) * rng.standard_normal(n)
    r = float(np.corrcoef(x, y)[0, 1])
    low, high = grid_sweep.bootstrap_interval(x.tolist(), y.tolist(), grid_sweep.pearson, 1000, seed=0)
    fisher = [math.tanh(math.atanh(r) + s * 1.96 / math.sqrt(n - 3)) for s in (-1, 1)]
    assert low == pytest.approx(fisher[0], abs=0.03) and high == pytest.approx(fisher[1], abs=0.03)
    line = [float(i) for i in range(10)]
    assert grid_sweep.bootstrap_interval(line, [2 * v + 1 for v in line], grid_sweep.pearson, 200, seed=1) == pytest.approx((1.0, 1.0))
    with pytest.raises(ValueError, match="at least 3 paired values"):
        grid_sweep.bootstrap_interval([1.0, 2.0], [1.0, 2.0], grid_sweep.pearson, 10, seed=0)


@pytest.mark.slow
def test_sweep_command_with_mixture_sampling(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["sweep", "--tasks", "3", "--networks", "4", "--steps", "20", "--sampling", "mixture", "--concentrations", "1000", "10"]
    assert cli.main(args + ["--runs-root", str(tmp_path / "runs"), "--out", str(out), "--no-progress"]) == 0
    figures = json.loads((out / "sweep.json").read_text())
    target = np.array(list(load_weights(tmp_path / "runs" / "sweep-T3-gradnorm-weights.json").values()))
    assert figures["sampling"] == "mixture" and figures["concentrations"] == [1000.0, 10.0]
    assert [p["draw"] for p in figures["points"]] == ["dirichlet-1000", "dirichlet-10", "uniform", "dirichlet-1000"]
    for point in figures["points"]:
        assert math.fsum(point["weights"]) == pytest.approx(3.0, abs=1e-12) and min(point["weights"]) > 0
        assert point["distance"] == pytest.approx(float(np.linalg.norm(np.array(point["weights"]) - target)), rel=1e-12)
    low, high = figures["pearson_ci95"]
    assert -1.0 <= low <= high <= 1.0
    printed = capsys.readouterr().out
    assert "Dirichlet" in printed and "bootstrap 95% interval" in printed
    near = [p for p in figures["points"] if p["draw"] == "dirichlet-1000"]
    better = sum(p["test_loss"] < figures["gradnorm_test_loss"] for p in near)
    assert f"| dirichlet-1000 | 2 | {min(p['distance'] for p in near):.3f} to {max(p['distance'] for p in near):.3f} |" in printed
    assert f"| {better} of 2 |" in printed.split("| dirichlet-1000 | 2 |", 1)[1].splitlines()[0]
    # the same report rebuilt from the recorded runs alone (what a sweep stopped early still leaves)
    (tmp_path / "runs" / "sweep-T3-static-003" / "run.json").unlink()  # as if the last network had not finished
    again = tmp_path / "again"
    assert cli.main(args + ["--from-runs", str(tmp_path / "runs"), "--out", str(again)]) == 0
    rebuilt = json.loads((again / "sweep.json").read_text())
    assert [(p["run"], p["draw"], p["weights"]) for p in rebuilt["points"]] == [(p["run"], p["draw"], p["weights"]) for p in figures["points"][:3]]
    assert [p["test_loss"] for p in rebuilt["points"]] == pytest.approx([p["test_loss"] for p in figures["points"][:3]], rel=1e-6)
    assert rebuilt["gradnorm_test_loss"] == pytest.approx(figures["gradnorm_test_loss"], rel=1e-6) and rebuilt["steps"] == 20
    capsys.readouterr()
    assert cli.main(["sweep", "--concentrations", "10", "--runs-root", str(tmp_path / "r2")]) == 2
    assert "--sampling mixture only" in capsys.readouterr().err
    assert cli.main(["sweep", "--sampling", "mixture", "--concentrations", "0", "--runs-root", str(tmp_path / "r3")]) == 2
    assert "must be positive" in capsys.readouterr().err


@pytest.mark.slow
def test_static_networks_in_worker_processes_match_one_process(tmp_path):
    one = grid_sweep.run_sweep(tmp_path / "one", num_tasks=2, networks=3, steps=10, sampling="mixture", seed=2)
    two = grid_sweep.run_sweep(tmp_path / "two", num_tasks=2, networks=3, steps=10, sampling="mixture", seed=2, jobs=2)
    assert [(p.run, p.draw, p.weights, p.test_loss) for p in two.points] == [(p.run, p.draw, p.weights, p.test_loss) for p in one.points]
    assert all((tmp_path / "two" / p.run / "run.json").is_file() for p in two.points)
    with pytest.raises(ValueError, match="jobs must be at least 1"):
        grid_sweep.run_sweep(tmp_path / "none", jobs=0)
