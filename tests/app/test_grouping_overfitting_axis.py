"""The Overfitting view with several runs: every chart (each run's losses, the overlaid gaps) on one steps
axis, so that the onsets of runs of different lengths line up down the page; the step range, when one is
chosen, is that axis."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from gradnorm.app import _charts as charts
from gradnorm.toolkit import schema
from tests.app.test_app import chart_specs, no_failure, opened_with
from tests.helpers.synthetic_runs import run_json, write_run

RUNS = {"short-s0": 200, "mid-s0": 400, "long-s0": 700}


def _x_domains(spec: dict) -> list:
    """The x scale domain of every layer of ``spec`` that encodes x."""
    return [layer["encoding"]["x"].get("scale", {}).get("domain") for layer in spec["layer"] if "x" in layer.get("encoding", {})]


def _validation_steps(root: Path) -> list[int]:
    steps = []
    for name in RUNS:
        for part in (root / name / schema.METRICS_DIR).glob("*/part-*.parquet"):
            steps += [row["step"] for row in pq.read_table(part, columns=["step", "split"]).to_pylist() if row["split"] == schema.VALIDATION]
    return steps


def test_the_overfitting_charts_of_several_runs_share_one_steps_domain(monkeypatch, tmp_path):
    for name, steps in RUNS.items():
        write_run(tmp_path, name, steps=steps, per_part=100, meta=run_json(name))
    at = opened_with(monkeypatch, {"run": list(RUNS), "view": "Overfitting", "smooth": "0"}, tmp_path)
    no_failure(at)
    specs = chart_specs(at)
    assert len(specs) == len(RUNS) + 1  # one losses chart per run, then the gaps
    steps = _validation_steps(tmp_path)
    expected = [float(min(steps)), float(max(steps))]
    for spec, _ in specs:
        domains = _x_domains(spec)
        assert domains and all(domain == expected for domain in domains), (spec.get("title"), domains)
    # (each chart keeps its own zoom: a Streamlit chart is its own Vega view)
    assert all('"bind": "scales"' in json.dumps(spec) for spec, _ in specs)
    # a chosen step range is the axis of every chart
    slider = next(s for s in at.slider if s.key.startswith("steps-"))
    slider.set_value((100, 500)).run()
    no_failure(at)
    for spec, _ in chart_specs(at):
        assert set(map(tuple, _x_domains(spec))) == {(100.0, 500.0)}


def test_with_x_domain_leaves_the_charts_it_was_given_alone():
    import pandas as pd

    frame = pd.DataFrame({"task": ["a", "a"], "step": [0, 10], "train_loss": [1.0, 0.5], "val_loss": [1.1, 0.9], "gap": [0.1, 0.4]})
    built = charts.overfitting_charts(frame, pd.DataFrame(columns=["task", "onset_step"]), run_id="r")
    shared = charts.with_x_domain(built, (0.0, 50.0))
    assert all(domain == [0.0, 50.0] for chart in shared for domain in _x_domains(chart.to_dict()))
    assert not any(domain for chart in built for domain in _x_domains(chart.to_dict()))
    assert charts.steps_domain([frame, frame.assign(step=[5, 80])]) == (0.0, 80.0)
    assert charts.steps_domain([frame.iloc[:1]]) is None  # one step: nothing to share
