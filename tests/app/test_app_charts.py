"""Chart builders and smoothing, without Streamlit."""

from __future__ import annotations

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


def test_weights_chart_draws_averages_and_window():
    series = pd.DataFrame(
        {"run_id": "r", "task": ["a", "b"] * 3, "x": [0, 0, 1, 1, 2, 2], "value": [1, 1, 1.5, 0.5, 1.6, 0.4], "value_min": 0, "value_max": 2, "last": 1, "n": 1}
    )
    average = pd.DataFrame({"task": ["a", "b"], "mean": [1.55, 0.45]})
    spec = charts.weights_chart(series, {"r": average}, {"r": (1, 2)}).to_dict()
    layers = spec["hconcat"][0]["layer"]
    marks = [layer["mark"]["type"] if isinstance(layer["mark"], dict) else layer["mark"] for layer in layers]
    assert marks == ["rect", "line", "rule"]
    assert layers[2]["encoding"]["y"]["field"] == "average"
    wall = charts.weights_chart(series, {"r": average}, {"r": (1, 2)}, x="wall_time").to_dict()
    assert [l["mark"]["type"] if isinstance(l["mark"], dict) else l["mark"] for l in wall["hconcat"][0]["layer"]] == ["line", "rule"]
