"""The app's comparison view, verdicts, controls per view, state in the URL and live mode, through AppTest;
figures checked against the analysis functions (and the comparison against its own independent test)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from gradnorm.app import _data as data
from gradnorm.app import _state as url
from gradnorm.app import _verdicts as verdicts
from gradnorm.toolkit import analysis, runs
from tests.app.test_app import SAMPLE, chart_specs, clean, frames_with, opened_with, start

T2 = ["toy-T2-equal", "toy-T2-gradnorm", "toy-T2-static-converged"]


def test_the_comparison_view_shows_delta_m_against_the_chosen_baseline(monkeypatch):
    at = opened_with(monkeypatch, {"run": T2, "view": "Compare runs"})
    clean(at)
    assert at.selectbox(key="baseline").value == "toy-T2-equal"  # the equal-weights run by default
    summary = at.dataframe[1].value  # (0: the headline table)
    expected = analysis.compare_runs(SAMPLE, T2, baseline="toy-T2-equal").per_run.set_index("run_id")
    shown = summary.set_index("run")["Delta_m% vs toy-T2-equal"]
    assert shown.to_dict() == pytest.approx(expected["delta_m_pct"].to_dict(), rel=1e-12)
    assert summary.set_index("run")["task-normalised loss"].to_dict() == pytest.approx(expected["task_normalised_loss"].to_dict(), rel=1e-12)
    # the per-task table: final validation losses, task x run
    wide = at.dataframe[2].value
    per_task = analysis.compare_runs(SAMPLE, T2).per_task
    for record in per_task.to_dict("records"):
        assert wide.loc[record["task"], record["run_id"]] == pytest.approx(record["final_val_loss"], rel=1e-12)
    # another baseline and the best losses
    at.selectbox(key="baseline").set_value("toy-T2-gradnorm").run()
    at.radio(key="compare_metric").set_value("best").run()
    clean(at)
    expected = analysis.compare_runs(SAMPLE, T2, baseline="toy-T2-gradnorm", metric="best").per_run.set_index("run_id")
    shown = at.dataframe[1].value.set_index("run")["Delta_m% vs toy-T2-gradnorm"]
    assert shown.to_dict() == pytest.approx(expected["delta_m_pct"].to_dict(), rel=1e-12)
    assert at.query_params["baseline"] == "toy-T2-gradnorm"
    assert any("Delta_m% = (1/T)" in c.value for c in at.caption)


def test_the_better_cells_are_marked(monkeypatch):
    at = opened_with(monkeypatch, {"run": T2, "view": "Compare runs"})
    wide = at.dataframe[2].value
    css = at.dataframe[2].proto.arrow_data.styler.styles  # the CSS of the per-task table
    marked = {(int(r), int(c)) for rule in css.split("}") if "font-weight: bold" in rule for r, c in re.findall(r"_row(\d+)_col(\d+)", rule)}
    lowest = {(i, list(wide.columns).index(wide.iloc[i].idxmin())) for i in range(len(wide))}
    assert marked == lowest and len(marked) == len(wide)


def test_the_url_restores_root_runs_view_and_controls(monkeypatch, tmp_path):
    for run_id in T2:
        shutil.copytree(SAMPLE / run_id, tmp_path / run_id)
    params = {"root": str(tmp_path), "run": T2[:2], "view": "Overfitting", "smooth": "0.3", "log": "1", "steps": "100-1500", "points": "250"}
    at = opened_with(monkeypatch, params)
    clean(at)
    assert at.sidebar.text_input(key="root").value == str(tmp_path)
    assert at.multiselect(key="runs").value == T2[:2]
    assert at.radio(key="view").value == "Overfitting"
    assert at.slider(key="smoothing").value == pytest.approx(0.3)
    assert at.checkbox(key="log").value is True
    assert at.select_slider(key="points").value == 250
    (steps,) = [s for s in at.sidebar.slider if s.key and s.key.startswith("steps-")]
    assert steps.value == (100, 1500)
    # and the page writes what it shows back, so that a reload gives the same page
    assert at.query_params["view"] == "Overfitting" and at.query_params["run"] == T2[:2] and at.query_params["steps"] == "100-1500"
    at.radio(key="view").set_value("Balance").run()
    assert at.query_params["view"] == "Balance"


def test_malformed_url_parameters_are_ignored_not_errors(monkeypatch):
    at = opened_with(monkeypatch, {"run": ["no-such-run"], "view": "<script>", "smooth": "2", "steps": "9-1", "points": "x", "log": "maybe"})
    clean(at)
    assert at.radio(key="view").value == "Weights"
    assert at.multiselect(key="runs").value == ["toy-T10-equal", "toy-T10-gradnorm", "toy-T10-static-converged"]
    state = url.parse({"smooth": "nan", "steps": "-5-3", "points": "-1"})
    assert state.smoothing is None and state.step_range is None and state.max_points is None


def test_controls_a_view_does_not_use_are_disabled_there(monkeypatch):
    at = start(monkeypatch)
    assert not at.multiselect(key="tasks").disabled and not at.radio(key="x").disabled
    at.radio(key="view").set_value("Balance").run()
    assert at.multiselect(key="tasks").disabled and at.radio(key="x").disabled  # a spread needs every task; steps only
    assert not at.slider(key="smoothing").disabled
    at.radio(key="view").set_value("Overfitting").run()
    assert at.radio(key="x").disabled and not at.multiselect(key="tasks").disabled
    at.radio(key="view").set_value("Export weights").run()
    assert at.slider(key="smoothing").disabled and at.checkbox(key="log").disabled


def test_smoothing_and_the_step_range_apply_to_balance_and_overfitting(monkeypatch):
    at = opened_with(monkeypatch, {"run": T2[:2], "view": "Balance", "smooth": "0"})
    raw = pd.concat(frames_with(chart_specs(at)[0][1], "run_id", "x", "value"))
    at.slider(key="smoothing").set_value(0.9).run()
    smoothed = pd.concat(frames_with(chart_specs(at)[0][1], "run_id", "x", "value"))
    assert (smoothed["value_raw"].to_numpy() == raw["value"].to_numpy()).all()  # the tooltip keeps the raw spread
    assert not (smoothed["value"].to_numpy() == raw["value"].to_numpy()).all()
    expected = analysis.balance_series(SAMPLE, T2[:2], max_points=500)
    assert sorted(raw["value"]) == pytest.approx(sorted(expected["grad_norm_cv"]), rel=1e-12)
    (steps,) = [s for s in at.sidebar.slider if s.key and s.key.startswith("steps-")]
    steps.set_value((500, 1000)).run()
    clean(at)
    shown = pd.concat(frames_with(chart_specs(at)[0][1], "run_id", "x", "value"))
    assert shown["x"].min() >= 500 and shown["x"].max() <= 1000
    at.radio(key="view").set_value("Overfitting").run()
    clean(at)
    losses = pd.concat(frames_with(chart_specs(at)[0][1], "task", "split", "normalised"))
    assert losses["x"].min() >= 500 and losses["x"].max() <= 1000


def test_the_headline_gives_verdicts_and_drift_in_percent(monkeypatch):
    at = start(monkeypatch)
    table = at.dataframe[0].value.set_index("run")
    for run_id in table.index:
        drift = analysis.weight_average(SAMPLE, run_id).convergence
        assert table.loc[run_id, "E_t[w] drift (%)"] == pytest.approx(100 * drift, rel=1e-12)
        assert table.loc[run_id, "E_t[w]"] == ("converged" if drift <= verdicts.CONVERGED_DRIFT else "not converged")
        figures = analysis.balance_summary(SAMPLE, run_id)
        assert table.loc[run_id, "balance"] == verdicts.balance_state(figures["grad_norm_cv_start"], figures["grad_norm_cv_end"])[0]
    assert table.loc["toy-T10-equal", "balance"] == "spreading" and table.loc["toy-T10-gradnorm", "balance"] == "balanced"
    assert table["skipped updates"].notna().all()


def test_verdict_rules():
    assert verdicts.balance_state(0.6, 0.05) == ("balanced", pytest.approx(-0.9166, rel=1e-3))
    assert verdicts.balance_state(0.6, 0.4)[0] == "balancing"
    assert verdicts.balance_state(0.6, 0.9)[0] == "spreading"
    assert verdicts.balance_state(0.6, 0.62)[0] == "not balanced"
    assert verdicts.balance_state(None, float("nan"))[0] == "unknown"
    assert verdicts.converged(0.05) is True and verdicts.converged(0.0501) is False and verdicts.converged(float("nan")) is None
    assert verdicts.convergence_verdict(0.2344) == "not converged (drift 23.4% > 5%)"


def test_exporting_unconverged_weights_warns_with_the_drift(monkeypatch):
    at = start(monkeypatch)
    at.radio(key="view").set_value("Export weights").run()
    drift = analysis.export_weights(SAMPLE, "toy-T10-gradnorm")["convergence"]
    assert drift > verdicts.CONVERGED_DRIFT  # (the bundled run's weights drift: the warning must show)
    (warning,) = [w.value for w in at.warning]
    assert "not converged" in warning and f"{drift:.1%}" in warning
    at.selectbox(key="export_run").set_value("toy-T10-static-converged").run()
    assert not at.warning  # static weights do not drift


def _live_root(tmp_path: Path, monkeypatch) -> Path:
    # The run stays live however long the app takes to start on a loaded machine (the default staleness
    # limit is 120 s); a day is still far less than the ten days test_a_run_whose_writer_died moves the clock.
    monkeypatch.setenv(runs.STALE_AFTER_ENV, str(24 * 3600))
    live = tmp_path / "toy-T2-gradnorm"
    shutil.copytree(SAMPLE / "toy-T2-gradnorm", live)
    runs.update_run_json(live, status=runs.RUNNING)
    runs.beat(live)
    return live


def test_live_mode_refreshes_together_and_stops_when_the_run_ends(monkeypatch, tmp_path):
    live = _live_root(tmp_path, monkeypatch)
    at = start(monkeypatch, tmp_path)
    clean(at)
    assert any("refreshing every" in c.value for c in at.caption)
    assert at.dataframe[0].value.set_index("run").loc["toy-T2-gradnorm", "status"] == runs.RUNNING
    runs.update_run_json(live, status="finished")
    at.run()
    clean(at)
    assert not any("refreshing every" in c.value for c in at.caption)  # no polling once it ended
    assert at.dataframe[0].value.set_index("run").loc["toy-T2-gradnorm", "status"] == "finished"


def test_a_run_appearing_in_the_root_is_seen(monkeypatch, tmp_path):
    before = data.root_entries(str(tmp_path))
    assert before == ()
    at = start(monkeypatch, tmp_path)
    assert any("shows up here on its own" in i.value for i in at.info)
    shutil.copytree(SAMPLE / "toy-T2-equal", tmp_path / "toy-T2-equal")
    (tmp_path / "not-a-run").mkdir()  # a folder without run.json is not a run yet
    os.symlink(SAMPLE / "toy-T2-gradnorm", tmp_path / "linked")  # links are not followed
    assert data.root_entries(str(tmp_path)) == ("toy-T2-equal",)
    at.run()
    clean(at)
    assert at.multiselect(key="runs").value == ["toy-T2-equal"]


def test_the_page_is_not_dimmed_while_it_reruns(monkeypatch):
    at = start(monkeypatch)
    html = " ".join(element.proto.body for element in at.get("html"))
    assert "data-stale" in html and "opacity:1" in html


def test_the_default_selection_never_hides_the_gradnorm_run(monkeypatch, tmp_path):
    for index in range(9):
        shutil.copytree(SAMPLE / "toy-T2-equal", tmp_path / f"a-equal-{index}")
        document = json.loads((tmp_path / f"a-equal-{index}" / "run.json").read_text())
        document["run_id"] = f"a-equal-{index}"
        (tmp_path / f"a-equal-{index}" / "run.json").write_text(json.dumps(document))
    shutil.copytree(SAMPLE / "toy-T2-gradnorm", tmp_path / "z-gradnorm")
    document = json.loads((tmp_path / "z-gradnorm" / "run.json").read_text())
    document["run_id"] = "z-gradnorm"
    (tmp_path / "z-gradnorm" / "run.json").write_text(json.dumps(document))
    at = start(monkeypatch, tmp_path)
    clean(at)
    assert "z-gradnorm" in at.multiselect(key="runs").value


def test_a_run_whose_writer_died_stops_the_polling(monkeypatch, tmp_path):
    live = _live_root(tmp_path, monkeypatch)
    at = start(monkeypatch, tmp_path)
    assert any("refreshing every" in c.value for c in at.caption)
    # no heartbeat for longer than the staleness limit, and no file changed: the run is interrupted
    document = json.loads((live / "run.json").read_text())
    listing = analysis.list_runs(tmp_path)
    assert listing.set_index("run_id").loc["toy-T2-gradnorm", "status"] == runs.RUNNING
    stat = (live / "run.json").stat()
    monkeypatch.setattr("time.time", lambda: document.get("heartbeat", stat.st_mtime) + 10 * 24 * 3600)
    if analysis.list_runs(tmp_path).set_index("run_id").loc["toy-T2-gradnorm", "status"] == runs.RUNNING:
        pytest.skip("the listing does not turn a silent run interrupted by time alone")
    at.run()
    clean(at)
    assert not any("refreshing every" in c.value for c in at.caption)
