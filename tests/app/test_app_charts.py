"""Chart builders and smoothing, without Streamlit."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from gradnorm.app import _charts as charts
from gradnorm.app._smoothing import debiased_ema, smooth_series


def test_debiased_ema_matches_the_closed_form():
    rng = np.random.default_rng(0)
    values = rng.normal(size=50)
    weight = 0.8
    got = debiased_ema(values, weight)
    for k in range(1, len(values) + 1):
        terms = [(1 - weight) * weight ** (k - j) * values[j - 1] for j in range(1, k + 1)]
        assert got[k - 1] == pytest.approx(sum(terms) / (1 - weight**k), rel=1e-12)
    assert got[0] == values[0]  # no pull towards zero at the start


def test_smoothing_skips_non_finite_values_and_keeps_raw():
    frame = pd.DataFrame({"run_id": "r", "task": "a", "x": [0.0, 1.0, 2.0], "value": [1.0, float("nan"), 3.0]})
    smoothed = smooth_series(frame, 0.5)
    assert math.isnan(smoothed["value"].iloc[1])
    assert smoothed["value"].iloc[2] == pytest.approx((0.5 * 0.5 * 1 + 0.5 * 3) / (1 - 0.25))
    assert smoothed["value_raw"].tolist()[0::2] == [1.0, 3.0]
    with pytest.raises(ValueError, match="smoothing weight"):
        debiased_ema([1.0], 1.0)


def test_task_colours_are_stable_and_naturally_ordered():
    scale = charts.task_scale(["task10", "task2", "task1"])
    assert scale.domain == ["task1", "task2", "task10"]
    assert charts.task_scale(["task2", "task10", "task1"]).domain == scale.domain


def _marks(spec: dict) -> list[str]:
    return [layer["mark"]["type"] if isinstance(layer["mark"], dict) else layer["mark"] for layer in spec["layer"]]


SERIES = pd.DataFrame(
    {"run_id": "r", "task": ["a", "b"] * 3, "x": [0, 0, 1, 1, 2, 2], "value": [1, 1, 1.5, 0.5, 1.6, 0.4], "value_min": 0, "value_max": 2, "last": 1, "n": 1}
)


def test_weights_chart_draws_averages_over_their_window_and_zooms():
    average = pd.DataFrame({"task": ["a", "b"], "mean": [1.55, 0.45]})
    (chart,) = charts.weights_charts(SERIES, {"r": average}, {"r": (1, 2)})
    spec = chart.to_dict()
    assert spec["width"] == "container"
    assert _marks(spec) == ["line", "point", "rule", "rule"]
    segments = spec["layer"][3]
    assert segments["encoding"]["y"]["field"] == "average" and segments["encoding"]["x2"]["field"] == "end"
    params = spec.get("params", []) + [p for layer in spec["layer"] for p in layer.get("params", [])]
    assert any(p["select"]["type"] == "interval" and p.get("bind") == "scales" and p["select"]["encodings"] == ["x"] for p in params)
    assert any(p["select"]["type"] == "point" and p["select"].get("nearest") for p in params)
    (wall,) = charts.weights_charts(SERIES, {"r": average}, {"r": (1, 2)}, x="wall_time")
    assert _marks(wall.to_dict()) == ["line", "point", "rule"]  # windows are in steps: not drawn on wall time


def test_runs_are_overlaid_with_a_dash_each_and_split_past_eight_on_one_y_domain():
    runs = [f"run{i}" for i in range(13)]
    frame = pd.concat([SERIES.assign(run_id=r, value=SERIES["value"] * (i + 1)) for i, r in enumerate(runs)])
    built = charts.metric_charts(frame, "loss", runs=runs)
    assert len(built) == 2  # 8 + 5
    specs = [c.to_dict() for c in built]
    dashes = [s["layer"][0]["encoding"]["strokeDash"]["scale"] for s in specs]
    assert dashes[0]["domain"] == runs[:8] and dashes[1]["domain"] == runs[8:]
    assert len({json.dumps(d) for d in dashes[0]["range"]}) == 8  # eight distinct patterns
    domains = [s["layer"][0]["encoding"]["y"]["scale"]["domain"] for s in specs]
    assert domains[0] == domains[1] == [float(frame["value"].min()), float(frame["value"].max())]
    assert all(s["width"] == "container" for s in specs)


def test_forty_tasks_get_forty_distinct_colours_and_runs_another_palette():
    tasks = [f"t{i}" for i in range(40)]
    scale = charts.task_scale(tasks)
    assert len(set(scale.range)) == 40
    assert scale.range[:3] == charts.TASK_COLOURS[:3] and scale.domain[:3] == ["t0", "t1", "t2"]
    assert not set(charts.RUN_COLOURS) & set(charts.TASK_COLOURS)
    assert len(set(charts.RUN_COLOURS)) == len(charts.RUN_COLOURS) == 20
    # stable: the same task gets the same colour whatever order the names come in
    assert charts.task_scale(list(reversed(tasks))).range == scale.range


def test_every_chart_with_more_than_one_series_has_a_legend():
    norms = SERIES.assign(run_id="r")
    built = [
        *charts.metric_charts(SERIES, "loss"),
        *charts.grad_norm_charts(norms, norms.assign(value=1.0)),
        *charts.balance_charts(
            pd.DataFrame({"run_id": ["r", "r", "s", "s"], "step": [0, 1, 0, 1], "grad_norm_cv": [0.1, 0.2, 0.3, 0.4], "loss_ratio_cv": 0.1})
        ),
    ]
    for chart in built:
        spec = json.dumps(chart.to_dict())
        assert '"legend": {' in spec and '"legend": null' not in spec


def test_overfitting_chart_normalises_by_the_first_validation_loss_and_draws_onsets_in_task_colours():
    frame = pd.DataFrame(
        {
            "task": ["a"] * 3 + ["b"] * 3,
            "step": [10, 20, 30] * 2,
            "train_loss": [4.0, 3.0, 2.0, 40.0, 30.0, 20.0],
            "val_loss": [5.0, 4.0, 4.5, 50.0, 40.0, 30.0],
        }
    )
    frame["gap"] = frame["val_loss"] - frame["train_loss"]
    long = charts.overfitting_frame(frame)
    a_val = long[(long["task"] == "a") & (long["split"] == "validation")].sort_values("step")
    assert a_val["normalised"].tolist() == pytest.approx([1.0, 0.8, 0.9])
    b_train = long[(long["task"] == "b") & (long["split"] == "train")].sort_values("step")
    assert b_train["normalised"].tolist() == pytest.approx([0.8, 0.6, 0.4])
    onsets = pd.DataFrame({"task": ["a", "b"], "gap_slope": [0.1, 0.0], "onset_step": pd.array([20, None], dtype="Int64"), "final_gap": [2.5, 10.0]})
    losses, gaps = charts.overfitting_charts(frame, onsets, run_id="r")
    spec = losses.to_dict()
    onset_layer = spec["layer"][-1]
    assert onset_layer["mark"]["type"] == "rule" and onset_layer["encoding"]["color"]["field"] == "task"  # not black: readable on a dark theme
    data = [d for d in spec["datasets"].values() if d and "x" in d[0] and len(d[0]) == 2]
    assert data == [[{"task": "a", "x": 20.0}]]
    assert spec["layer"][0]["encoding"]["strokeDash"]["legend"]["symbolStrokeColor"] == "gray"  # train/validation: not two black dots


def test_delta_chart_leaves_the_baseline_out_of_its_bars_and_legend():
    per_task = pd.DataFrame({"run_id": ["base", "m", "base", "m"], "task": ["a", "a", "b", "b"], "delta_pct": [0.0, -10.0, 0.0, 5.0]})
    spec = charts.delta_chart(per_task, "base", runs=["base", "m"]).to_dict()
    bars = spec["layer"][0]
    assert bars["encoding"]["color"]["legend"]["values"] == ["m"]
    (rows,) = [d for d in spec["datasets"].values() if d and "delta_pct" in d[0]]
    assert {r["run_id"] for r in rows} == {"m"}


def test_the_hover_points_are_only_those_at_the_hovered_x_and_never_an_empty_layer():
    """The points layer is what the first chart waited for (one interpreted mark per point): it keeps the
    points at the hovered x, and those at the first x (hidden) so that it is never empty."""
    frame = pd.DataFrame(
        [{"run_id": r, "task": t, "x": float(x), "value": float(x) + i} for r in ("r0", "r1") for i, t in enumerate(("a", "b", "c")) for x in range(3, 40)]
    )
    (chart,) = charts.metric_charts(frame, "w", runs=["r0", "r1"], name="m")
    spec = chart.to_dict()
    points = [layer for layer in spec["layer"] if layer["mark"]["type"] == "point"]
    (layer,) = points
    (transform,) = layer["transform"]
    test = transform["filter"]
    assert test.startswith("datum.x === 3.0 || ") and "vlSelectionTest('m0_hover_store', datum)" in test
    assert "length(data('m0_hover_store'))" in test  # no point passes on an empty hover (empty=False)
    assert {p["name"] for p in spec.get("params", [])} >= {"m0_hover", "m0_zoom"}  # (the store the filter reads)
    # with nothing hovered: one point per series (6 of 222), drawn at opacity 0 until hovered
    assert layer["encoding"]["opacity"]["value"] == 0.0 and layer["encoding"]["opacity"]["condition"]["value"] == 1.0
    assert len(frame[frame["x"] == 3.0]) == 6 < len(frame)
