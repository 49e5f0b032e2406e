"""Weights export, retraining with them, the demo's Table-1 runs and the section 5.3 sweep."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradnorm import cli
from gradnorm.toolkit import analysis
from gradnorm.toolkit.balancers import StaticWeights
from gradnorm.toolkit.weights_file import load_weights
from tests.helpers.runs import record_run


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    record_run(base, "source", steps=80)
    return base


def test_export_is_the_time_average_and_round_trips(root, tmp_path):
    out = tmp_path / "w.json"
    document = analysis.export_weights(root, "source", out, window=(20, 79))
    average = analysis.weight_average(root, "source", window=(20, 79))
    assert document["weights"] == pytest.approx(average.weights, rel=1e-12)
    assert document["window"] == [20, 79] and document["run"] == "source" and document["method"] == "gradnorm"
    assert document["convergence"] == pytest.approx(average.convergence)
    assert load_weights(out) == pytest.approx(document["weights"], rel=1e-15)
    balancer = StaticWeights.from_file(out)
    assert balancer.config()["source"] == str(out)


def test_export_and_summary_commands(root, tmp_path, capsys):
    out = tmp_path / "cli.json"
    assert cli.main(["export", "source", "--root", str(root), "--out", str(out), "--window", "10", "70"]) == 0
    assert json.loads(out.read_text())["window"] == [10, 70]
    assert cli.main(["summary", "source", "--root", str(root)]) == 0
    printed = capsys.readouterr().out
    table = analysis.summary(root, "source")
    for task, weight in zip(table["task"], table["weight_mean"]):
        assert f"{task}" in printed and f"{weight:.4f}" in printed
    assert cli.main(["summary", "missing-run", "--root", str(root)]) == 2


def test_demo_retrains_with_the_converged_weights(tmp_path, capsys):
    from gradnorm.experiments.toy_demo import run_demo

    results = [run.result for run in run_demo(tmp_path, task_counts=(2,), steps=40, progress=False)]
    assert [r.run_name for r in results] == ["toy-T2-equal", "toy-T2-gradnorm", "toy-T2-static-converged"]
    exported = load_weights(tmp_path / "toy-T2-gradnorm-weights.json")
    recorded = analysis.weight_average(tmp_path, "toy-T2-gradnorm").weights
    assert exported == pytest.approx(recorded, rel=1e-12)
    retrained = analysis.weight_average(tmp_path, "toy-T2-static-converged", window=(0, 39)).weights
    assert retrained == pytest.approx(exported, rel=1e-6)  # float32 on the device
    printed = capsys.readouterr().out
    assert "Lower is better" in printed and "the untrained network scores T" in printed
    assert f"{results[1].normalized_test_loss:.3f}" in printed and "best: " in printed


def test_export_writes_next_to_the_run_not_into_the_working_folder(root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["export", "source", "--root", str(root)]) == 0
    assert (root / "source-weights.json").is_file() and not list(tmp_path.glob("*.json"))
    assert json.loads(capsys.readouterr().out)["run"] == "source"
    (root / "source-weights.json").unlink()
    assert cli.main(["export", "source", "--root", str(root), "--out", "-"]) == 0
    assert not (root / "source-weights.json").exists()
    assert json.loads(capsys.readouterr().out)["weights"]


def test_export_of_the_bundled_runs_prints_instead_of_writing_into_the_package(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GRADNORM_RUNS_ROOT", raising=False)
    before = sorted(p.name for p in analysis.bundled_runs_root().iterdir())
    assert cli.main(["export", "toy-T2-gradnorm"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["run"] == "toy-T2-gradnorm" and "--out" in captured.err
    assert sorted(p.name for p in analysis.bundled_runs_root().iterdir()) == before and not list(tmp_path.iterdir())


def test_sweep_reports_distances_to_the_gradnorm_average(tmp_path):
    from gradnorm.experiments.grid_sweep import run_sweep, write_report

    result = run_sweep(tmp_path, num_tasks=2, networks=4, steps=30, seed=3)
    target = np.array(list(load_weights(tmp_path / "sweep-T2-gradnorm-weights.json").values()))
    for point in result.points:
        assert sum(point.weights) == pytest.approx(2.0)
        assert point.distance == pytest.approx(float(np.linalg.norm(np.array(point.weights) - target)))
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    expected = np.corrcoef(ranks([p.distance for p in result.points]), ranks([p.test_loss for p in result.points]))[0, 1]
    assert result.spearman == pytest.approx(expected)
    written = write_report(result, tmp_path / "out")
    assert {p.name for p in written} == {"sweep.md", "sweep.json", "sweep.html", "sweep.png"}
    assert written[3].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Pearson" in written[0].read_text()
    with pytest.raises(ValueError, match="at least 3"):
        run_sweep(tmp_path / "few", networks=2)
