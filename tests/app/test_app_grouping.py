"""Run grouping (W&B's): one line per group, the mean across its runs, with a min-max or +/- std band; the
key and the band in the URL. Figures checked against the part files read directly with pyarrow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from gradnorm.app import _grouping as grouping
from gradnorm.app import _state as url
from gradnorm.toolkit import schema
from tests.app.test_app import chart_specs, no_failure, opened_clean
from tests.helpers.synthetic_runs import run_json, write_run

SEEDS = {"qm9-gradnorm-s0": 40, "qm9-gradnorm-s1": 50, "qm9-gradnorm-s2": 60, "qm9-equal-s0": 40, "qm9-equal-s1": 50}


def test_name_groups_strip_a_seed_suffix_only():
    assert grouping.name_group("qm9-gradnorm-s2") == "qm9-gradnorm"
    assert grouping.name_group("qm9_gradnorm_seed13") == "qm9_gradnorm"
    assert grouping.name_group("toy-T10-equal") == "toy-T10-equal"  # T10 is part of the name, not a seed
    assert grouping.name_group("run-3") == "run"
    assert grouping.name_group("-s1") == "-s1"  # nothing left: its own group


def test_groups_by_balancer_and_by_a_config_field_keep_the_runs_order():
    metas = {
        "a": {"config": {"lr": 0.1, "seed": 0}, "balancer": {"name": "gradnorm", "alpha": 1.5}},
        "b": {"config": {"lr": 0.1, "seed": 1}, "balancer": {"name": "equal"}},
        "c": {"config": {"lr": 0.01, "seed": 2}, "balancer": {"name": "gradnorm", "alpha": 0.5}},
    }
    balancers = {r: m["balancer"]["name"] for r, m in metas.items()}
    assert grouping.config_fields(metas) == ["balancer.alpha", "config.lr", "config.seed"]  # lr and seed vary; balancer.name is "balancer"
    assert grouping.groups(["a", "b", "c"], "balancer", balancers) == {"gradnorm": ["a", "c"], "equal": ["b"]}
    assert grouping.groups(["a", "b", "c"], "config:config.lr", balancers, metas) == {"config.lr=0.1": ["a", "b"], "config.lr=0.01": ["c"]}
    assert grouping.groups(["b", "a"], "config:balancer.alpha", balancers, metas) == {"balancer.alpha=(unset)": ["b"], "balancer.alpha=1.5": ["a"]}
    with pytest.raises(ValueError, match="unknown group key 'colour'"):
        grouping.groups(["a"], "colour", balancers)
    with pytest.raises(ValueError, match="unknown band 'iqr'"):
        grouping.with_band(pd.DataFrame({"value": [1.0]}), "iqr")


def test_group_series_is_the_mean_min_max_and_std_across_runs_at_each_x():
    rng = np.random.default_rng(3)
    rows = []
    for run, length in (("r0", 10), ("r1", 10), ("r2", 7)):
        for task in ("a", "b"):
            for x in range(length):
                rows.append({"run_id": run, "task": task, "x": float(x), "value": float(rng.normal()), "value_raw": float(rng.normal())})
    frame = pd.DataFrame(rows)
    result = grouping.group_series(frame, {"g": ["r0", "r1", "r2"], "h": ["r1"]}, points=10)
    for record in result.to_dict("records"):
        runs = ["r0", "r1", "r2"] if record["run_id"] == "g" else ["r1"]
        values, raws = [], []
        for row in rows:  # the same x of each member run, in plain Python
            if row["run_id"] in runs and row["task"] == record["task"] and row["x"] == record["x"]:
                values.append(row["value"])
                raws.append(row["value_raw"])
        mean = sum(values) / len(values)
        assert record["value"] == pytest.approx(mean, abs=1e-12)
        assert record["value_raw"] == pytest.approx(sum(raws) / len(raws), abs=1e-12)
        assert (record["band_low"], record["band_high"]) == (min(values), max(values))
        assert record["std"] == pytest.approx((sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5, abs=1e-12)
        assert record["runs"] == len(values)
    assert len(result) == 2 * 10 + 2 * 10  # g: every x of the longest run; h: r1's
    assert set(result[(result["run_id"] == "g") & (result["x"] >= 7)]["runs"]) == {2}  # r2 ended at x = 6
    banded = grouping.with_band(result, "std")
    assert np.allclose(banded["band_low"], result["value"] - result["std"]) and np.allclose(banded["band_high"], result["value"] + result["std"])
    assert "band_low" not in grouping.with_band(result, "none").columns


def test_a_longer_run_is_bucketed_before_the_runs_are_combined():
    """Two points of one run in one bucket count once (their mean), so a denser run weighs no more."""
    frame = pd.DataFrame({"run_id": ["p", "p", "q"], "task": ["a"] * 3, "x": [0.0, 0.4, 0.0], "value": [1.0, 3.0, 10.0]})
    frame = pd.concat([frame, pd.DataFrame({"run_id": ["q"], "task": ["a"], "x": [10.0], "value": [0.0]})], ignore_index=True)
    result = grouping.group_series(frame, {"g": ["p", "q"]}, points=5)
    first = result.iloc[0]
    assert (first["x"], first["value"], first["band_low"], first["band_high"], first["runs"]) == (0.0, 6.0, 2.0, 10.0, 2)


def _seed_root(root: Path) -> Path:
    for name, steps in SEEDS.items():
        meta = run_json(name, balancer={"name": "gradnorm" if "gradnorm" in name else "equal"}, config={"seed": int(name[-1]), "lr": 0.1})
        write_run(root, name, steps=steps, meta=meta)
    return root


def _raw(root: Path, metric: str) -> pd.DataFrame:
    """Every training row of every run, read from the part files directly."""
    frames = []
    for name in SEEDS:
        for part in sorted((root / name / schema.METRICS_DIR).glob("*/part-*.parquet")):
            table = pq.read_table(part, columns=["step", "split", "task", metric]).to_pandas()
            frames.append(table[table["split"] == schema.TRAIN].assign(run=name))
    return pd.concat(frames, ignore_index=True)


def test_the_app_draws_one_line_per_group_with_its_band_and_keeps_the_grouping_in_the_url(monkeypatch, tmp_path):
    root = _seed_root(tmp_path)
    at = opened_clean(monkeypatch, {"run": list(SEEDS), "group": "name", "smooth": "0", "view": "Weights"}, root)
    assert at.selectbox(key="group").value == "name" and at.radio(key="band").value == "minmax"
    ((spec, datasets),) = chart_specs(at)
    marks = [layer["mark"]["type"] if isinstance(layer["mark"], dict) else layer["mark"] for layer in spec["layer"]]
    assert marks[0] == "area"  # the band, under the lines
    assert next(layer["encoding"]["strokeDash"]["legend"]["title"] for layer in spec["layer"] if "strokeDash" in layer["encoding"]) == "group (dash)"
    (drawn,) = [frame for frame in datasets.values() if "band_low" in frame.columns]
    assert set(drawn["run_id"].astype(str)) == {"qm9-gradnorm", "qm9-equal"}
    raw = _raw(root, "balancer_weight")
    raw["group"] = raw["run"].map(grouping.name_group)
    expected = raw.groupby(["group", "task", "step"])["balancer_weight"].agg(["mean", "min", "max", "count"])
    for record in drawn.to_dict("records"):
        row = expected.loc[(str(record["run_id"]), str(record["task"]), int(record["x"]))]
        assert record["value"] == pytest.approx(row["mean"], rel=1e-12)
        assert (record["band_low"], record["band_high"]) == pytest.approx((row["min"], row["max"]), rel=1e-12)
        assert record["runs"] == row["count"]
    assert len(drawn) == len(expected)
    assert dict(at.query_params)["group"] in ("name", ["name"])
    # the band as mean +/- std, in the URL too
    at.radio(key="band").set_value("std").run()
    no_failure(at)
    ((_, datasets),) = chart_specs(at)
    (drawn,) = [frame for frame in datasets.values() if "band_low" in frame.columns]
    stds = raw.groupby(["group", "task", "step"])["balancer_weight"].std(ddof=0)
    for record in drawn.to_dict("records")[:50]:
        std = stds.loc[(str(record["run_id"]), str(record["task"]), int(record["x"]))]
        assert record["band_high"] - record["value"] == pytest.approx(std, abs=1e-12)
    state = url.parse({key: at.query_params[key] for key in at.query_params})
    assert (state.group, state.band) == ("name", "std")
    # the headline names each run's group; no grouping draws the runs again, and leaves the URL
    assert at.dataframe[0].value.set_index("run")["group"].to_dict() == {name: grouping.name_group(name) for name in SEEDS}
    at.selectbox(key="group").set_value("none").run()
    no_failure(at)
    ((spec, datasets),) = chart_specs(at)
    assert not [frame for frame in datasets.values() if "band_low" in frame.columns]
    assert "group" not in at.query_params


def test_balance_and_the_norms_view_are_grouped_and_overfitting_says_it_is_not(monkeypatch, tmp_path):
    root = _seed_root(tmp_path)
    at = opened_clean(monkeypatch, {"run": list(SEEDS), "group": "balancer", "view": "Balance"}, root)
    specs = chart_specs(at)
    assert len(specs) == 2
    for _, datasets in specs:
        (drawn,) = [frame for frame in datasets.values() if "band_low" in frame.columns]
        assert set(drawn["run_id"].astype(str)) == {"gradnorm", "equal"}
        assert (drawn["band_low"] <= drawn["value"] + 1e-12).all() and (drawn["value"] <= drawn["band_high"] + 1e-12).all()
        assert drawn["runs"].max() == 3
    at = opened_clean(monkeypatch, {"run": list(SEEDS), "group": "balancer", "view": "Gradient norms & loss ratios"}, root)
    titles = [m.value for m in at.markdown]  # (a chart's title is Markdown above it)
    assert titles.index("**gradnorm**") < titles.index("**equal**")  # one G_i chart per group
    (_, datasets) = chart_specs(at)[0]
    (drawn,) = [frame for frame in datasets.values() if "band_low" in frame.columns]
    assert set(drawn["run_id"].astype(str)) == {"gradnorm"} and set(drawn["kind"].astype(str)) == {"G_i (solid)", "target (dashed)"}
    at = opened_clean(monkeypatch, {"run": list(SEEDS), "group": "balancer", "view": "Overfitting"}, root)
    assert at.selectbox(key="group").disabled


def test_the_overfitting_view_shows_several_runs_on_one_y_axis_with_each_runs_onsets(monkeypatch, tmp_path):
    """Small multiples: one losses chart per run on a shared y domain, the onsets of each run (the synthetic
    validation loss turns up, so every task overfits), and the relative gaps of all runs in one chart."""
    from gradnorm.toolkit import analysis

    chosen = ["qm9-gradnorm-s0", "qm9-gradnorm-s2", "qm9-equal-s1"]
    root = tmp_path
    for index, name in enumerate(chosen):  # long enough for the validation loss to turn up (from step ~460)
        write_run(root, name, steps=800 + 100 * index, per_part=100, meta=run_json(name))
    at = opened_clean(monkeypatch, {"run": chosen, "view": "Overfitting", "smooth": "0"}, root)
    assert at.multiselect(key="overfitting_runs").value == chosen
    specs = chart_specs(at)
    assert len(specs) == len(chosen) + 1
    domains = []
    for run_id, (spec, datasets) in zip(chosen, specs):
        losses = [frame for frame in datasets.values() if "normalised" in frame.columns]
        (losses,) = losses
        expected = analysis.overfitting(root, run_id, max_points=500)
        first = expected.sort_values("step").dropna(subset=["val_loss"]).groupby("task")["val_loss"].first()
        validation = losses[losses["split"].astype(str) == "validation"]
        for record in validation.to_dict("records")[:20]:
            row = expected[(expected["task"] == record["task"]) & (expected["step"] == record["x"])].iloc[0]
            assert record["normalised"] == pytest.approx(row["val_loss"] / first[record["task"]], rel=1e-12)
        rules = [frame for frame in datasets.values() if set(frame.columns) == {"task", "x"}]
        onsets = analysis.overfitting_onsets(root, run_id).dropna(subset=["onset_step"])
        assert len(onsets) and sorted(rules[0]["x"]) == sorted(onsets["onset_step"].astype(float))
        domains.append(next(layer["encoding"]["y"]["scale"]["domain"] for layer in spec["layer"] if layer["encoding"]["y"].get("field") == "normalised"))
    assert domains[0] == domains[1] == domains[2]  # one y axis for every run
    _, gap_data = specs[-1]
    (gaps,) = [frame for frame in gap_data.values() if "relative_gap" in frame.columns]
    assert set(gaps["run_id"].astype(str)) == set(chosen)
    table = at.dataframe[1].value
    assert set(table["run"]) == set(chosen)
