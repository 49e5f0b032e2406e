"""The first chart's line layer asks Vega for no per-point work the data does not need (issue 16).

Streamlit runs Vega without ``eval``, so every per-point expression goes through Vega's interpreter; the
line layer drops the per-point ``defined`` test where pandas finds every x and y finite, and the
``toNumber(x)`` Vega-Lite computes for each row of a line's data, while still drawing what it drew.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from gradnorm.app import _charts as charts


def _series(values: list[float]) -> pd.DataFrame:
    rows = []
    for run in ("r1", "r2"):
        for task in ("a", "b"):
            for x, value in enumerate(values):
                rows.append({"run_id": run, "task": task, "x": float(x * 10), "value": value, "n": 1})
    return pd.DataFrame(rows)


def _lines(spec: dict) -> dict:
    (layer,) = [layer for layer in spec["layer"] if isinstance(layer["mark"], dict) and layer["mark"]["type"] == "line"]
    return layer


def test_finite_series_draw_without_a_per_point_validity_test_and_keep_colour_dash_and_x_order():
    (chart,) = charts.weights_charts(_series([1.0, 1.2, 0.9, 1.1]), {}, {}, runs=["r1", "r2"])
    lines = _lines(chart.to_dict())
    assert "invalid" in lines["mark"] and lines["mark"]["invalid"] is None
    encoding = lines["encoding"]
    assert encoding["order"] == {"value": 0}  # (a constant order: Vega-Lite parses no x per row, still sorts by x)
    assert encoding["color"]["field"] == "task" and encoding["strokeDash"]["field"] == "run_id"
    assert encoding["x"]["field"] == "x" and encoding["x"]["type"] == "quantitative"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_series_with_a_gap_keeps_vega_lites_test_so_the_line_breaks_there(bad):
    (chart,) = charts.weights_charts(_series([1.0, bad, 0.9, 1.1]), {}, {}, runs=["r1", "r2"])
    assert "invalid" not in _lines(chart.to_dict())["mark"]


def test_a_non_finite_x_also_keeps_the_test():
    frame = _series([1.0, 1.2, 0.9, 1.1])
    frame.loc[3, "x"] = np.nan
    (chart,) = charts.weights_charts(frame, {}, {}, runs=["r1", "r2"])
    assert "invalid" not in _lines(chart.to_dict())["mark"]


def test_every_view_that_draws_lines_through_the_hover_layers_gets_the_lean_line():
    """The same line layer in the metric, gradient-norm and balance charts (they share ``_interactive``)."""
    frame = _series([1.0, 1.2, 0.9, 1.1])
    (metric,) = charts.metric_charts(frame, "loss", runs=["r1", "r2"])
    norms = charts.grad_norm_charts(frame, frame.assign(value=frame["value"] * 2), runs=["r1", "r2"], log=True)
    balance = pd.DataFrame({"run_id": "r1", "step": [0, 1, 2], "grad_norm_cv": [0.1, 0.2, 0.3], "loss_ratio_cv": [0.3, np.nan, 0.1]})
    grad_cv, loss_cv = charts.balance_charts(balance, runs=["r1"])
    for chart in (metric, *norms, grad_cv):
        lines = _lines(chart.to_dict())
        assert lines["mark"]["invalid"] is None and lines["encoding"]["order"] == {"value": 0}
    assert "invalid" not in _lines(loss_cv.to_dict())["mark"]  # a NaN in this one: the gap stays a gap


def test_the_first_chart_benchmark_sends_each_frame_once_as_the_app_does():
    """``bench_app.py --first-chart`` serves the chart's own datasets: the lines, points and rule layers
    share one frame, which must arrive once (Streamlit names a dataset by its content), not once per layer."""
    from benchmarks import bench_app

    frame = _series([1.0, 1.2, 0.9, 1.1])
    average = pd.DataFrame({"task": ["a", "b"], "mean": [1.05, 1.05]})
    spec, frames = bench_app._spec_and_data(charts, (frame, {"r1": average}, {"r1": (10, 30)}), {"runs": ["r1", "r2"]})
    names = [layer["data"]["name"] for layer in spec["layer"]]
    assert len(names) == 4 and len(set(names[:3])) == 1 and names[3] != names[0]
    assert sorted(frames) == sorted(set(names))
    assert len(frames[names[0]]) == len(frame) and len(frames[names[3]]) == len(average)
