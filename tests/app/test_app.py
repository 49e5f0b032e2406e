"""The Streamlit app through ``AppTest``: it starts on the bundled runs, its charts carry the right specs
and data (checked against the analysis functions), the controls change what is drawn, the page names the
runs root and why it was chosen (``-- --root``, ``$GRADNORM_RUNS_ROOT``, ``./runs``, the bundled runs), and
bad runs roots or runs give a message, never a traceback."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
from streamlit import dataframe_util
from streamlit.testing.v1 import AppTest

from gradnorm.toolkit import analysis, runs

APP = Path(__file__).resolve().parents[2] / "app" / "streamlit_app.py"
SAMPLE = analysis.bundled_runs_root()


def start(monkeypatch, root: Path | None = None, *, argv: tuple[str, ...] = ()) -> AppTest:
    """The app on ``root`` (through $GRADNORM_RUNS_ROOT), run with ``argv`` after ``--``.

    AppTest runs the script in this process, so the script finds the arguments ``streamlit run app --
    ...`` would give it in ``sys.argv``, never pytest's own."""
    if root is not None:
        monkeypatch.setenv("GRADNORM_RUNS_ROOT", str(root))
    else:
        monkeypatch.delenv("GRADNORM_RUNS_ROOT", raising=False)
        if Path("runs").is_dir():  # ./runs in the working folder would be chosen before the bundled runs
            monkeypatch.setenv("GRADNORM_RUNS_ROOT", str(SAMPLE))
    monkeypatch.setattr(sys, "argv", [str(APP), *argv])
    return AppTest.from_file(str(APP), default_timeout=120).run()


def root_caption(at: AppTest) -> str:
    (caption,) = [c.value for c in at.caption if c.value.startswith("Runs root:")]
    return caption


def chart_specs(at: AppTest) -> list[tuple[dict, dict[str, pd.DataFrame]]]:
    """(spec, {dataset name: frame}) of every Vega-Lite chart on the page."""
    found = []
    for element in at.get("vega_lite_chart"):
        spec = json.loads(element.proto.spec)
        datasets = {ds.name: dataframe_util.convert_arrow_bytes_to_pandas_df(ds.data.data) for ds in element.proto.datasets}
        found.append((spec, datasets))
    return found


def frames_with(datasets: dict[str, pd.DataFrame], *columns: str) -> list[pd.DataFrame]:
    return [frame for frame in datasets.values() if all(c in frame.columns for c in columns)]


def no_failure(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def opened_with(monkeypatch, params: dict, root: Path = SAMPLE) -> AppTest:
    """The app opened on a URL with ``params`` (a reload or a shared link)."""
    monkeypatch.setenv("GRADNORM_RUNS_ROOT", str(root))
    monkeypatch.setattr(sys, "argv", [str(APP)])
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.query_params.update(params)
    return at.run()


def clean(at: AppTest) -> None:
    no_failure(at)
    assert not at.error, [e.value for e in at.error]


def opened_clean(monkeypatch, params: dict, root: Path = SAMPLE) -> AppTest:
    """:func:`opened_with`, checked to have drawn without an exception or an error."""
    at = opened_with(monkeypatch, params, root)
    clean(at)
    return at


def test_starts_on_the_bundled_runs_and_draws_every_view(monkeypatch):
    at = start(monkeypatch)
    no_failure(at)
    selected = at.multiselect[0].value
    assert selected == ["toy-T10-equal", "toy-T10-gradnorm", "toy-T10-static-converged"]
    specs = chart_specs(at)
    assert len(specs) == 1  # the weights view; the others draw when chosen
    weights_spec, weights_data = specs[0]
    # one layered chart with every run overlaid (colour = task, dash = run), at the container's width
    assert "layer" in weights_spec and "hconcat" not in weights_spec
    lines = weights_spec["layer"][0]
    assert lines["encoding"]["color"]["field"] == "task" and lines["encoding"]["strokeDash"]["field"] == "run_id"
    assert lines["encoding"]["strokeDash"]["scale"]["domain"] == selected
    series = frames_with(weights_data, "run_id", "task", "x", "value")
    assert set(pd.concat(series)["run_id"]) == set(selected)
    # E_t[w_i] segments equal the analysis' time average for each run, over its default window.
    rules = pd.concat(frames_with(weights_data, "task", "average", "start", "end"))
    assert set(rules["run_id"]) == set(selected)
    for run_id in selected:
        expected = analysis.weight_average(SAMPLE, run_id)
        mine = rules[rules["run_id"] == run_id].set_index("task")
        assert (mine["average"] - expected.table.set_index("task")["mean"].reindex(mine.index)).abs().max() < 1e-9
        assert (mine["start"].iloc[0], mine["end"].iloc[0]) == (expected.start_step, expected.end_step)
    for view, charts_expected in (("Compare runs", 1), ("Gradient norms & loss ratios", 5), ("Overfitting", 4), ("Balance", 2), ("Export weights", 0)):
        at.radio(key="view").set_value(view).run()
        no_failure(at)
        assert len(at.get("vega_lite_chart")) == charts_expected, view


def test_gradient_norm_view_draws_norms_against_targets(monkeypatch):
    at = start(monkeypatch)
    at.radio(key="view").set_value("Gradient norms & loss ratios").run()
    specs = chart_specs(at)
    # one chart per run, on one y domain, G_i solid and the target dashed, both named in the legend
    per_run = [(spec, data) for spec, data in specs if frames_with(data, "kind")]
    assert len(per_run) == 3
    domains = {json.dumps(spec["layer"][0]["encoding"]["y"]["scale"].get("domain")) for spec, _ in per_run}
    assert len(domains) == 1 and domains != {"null"}
    dash = per_run[0][0]["layer"][0]["encoding"]["strokeDash"]
    assert dash["field"] == "kind" and dash["legend"]["title"] == "series"
    gradnorm = pd.concat(
        next(frames_with(data, "kind", "value") for _, data in per_run if set(pd.concat(frames_with(data, "kind"))["run_id"]) == {"toy-T10-gradnorm"})
    )
    assert set(gradnorm["kind"]) == {"G_i (solid)", "target (dashed)"}
    norms = gradnorm[gradnorm["kind"] == "G_i (solid)"]
    raw = analysis.metric_series(SAMPLE, "toy-T10-gradnorm", "grad_norm", max_points=500)
    merged = norms.merge(raw, on=["task", "x"], suffixes=("", "_analysis"))
    assert len(merged) == len(raw)
    assert (merged["value_raw"] - merged["value_analysis"]).abs().max() < 1e-9


def test_series_are_downsampled_to_the_chosen_number_of_points(monkeypatch):
    at = start(monkeypatch)
    at.sidebar.select_slider[0].set_value(250).run()  # (the default is 500)
    no_failure(at)
    spec, data = chart_specs(at)[0]
    series = frames_with(data, "run_id", "task", "x", "value", "value_raw")
    assert series
    for frame in series:
        counts = frame.groupby(["run_id", "task"]).size()
        assert counts.max() <= 250
        # 2000 steps in 250 buckets: every bucket averages 8 points.
        assert frame["n"].sum() == 2000 * len(counts)


def test_controls_change_what_is_drawn(monkeypatch):
    at = start(monkeypatch)
    smooth_spec, smooth_data = chart_specs(at)[0]
    smoothed = frames_with(smooth_data, "value", "value_raw")[0]
    assert not (smoothed["value"] == smoothed["value_raw"]).all()  # default smoothing 0.6 moves values

    at.sidebar.slider[0].set_value(0.0).run()  # no smoothing
    raw = frames_with(chart_specs(at)[0][1], "value", "value_raw")[0]
    assert (raw["value"] == raw["value_raw"]).all()

    at.sidebar.checkbox[0].check().run()  # log scale
    assert '"type": "log"' in json.dumps(chart_specs(at)[0][0])

    at.sidebar.multiselect[1].set_value(["task0", "task3"]).run()  # task filter
    no_failure(at)
    for frame in frames_with(chart_specs(at)[0][1], "task", "value"):
        assert set(frame["task"]) == {"task0", "task3"}

    at.sidebar.radio[0].set_value("wall_time").run()
    no_failure(at)
    spec = json.dumps(chart_specs(at)[0][0])
    assert "wall time (s)" in spec


def test_export_tab_offers_the_same_document_as_gradnorm_export(monkeypatch):
    at = start(monkeypatch)
    at.radio(key="view").set_value("Export weights").run()
    expected = analysis.export_weights(SAMPLE, "toy-T10-gradnorm")
    buttons = at.get("download_button")
    assert buttons, "no download button"
    markdown = " ".join(m.value for m in at.markdown)
    assert f"steps **{expected['window'][0]}-{expected['window'][1]}**" in markdown
    frames = [d.value for d in at.dataframe]
    weights = next(f for f in frames if list(f.columns) == ["task", "weight"])
    assert dict(zip(weights["task"], weights["weight"])) == pytest.approx(expected["weights"], rel=1e-12)


def test_without_arguments_the_page_names_the_bundled_runs(monkeypatch, tmp_path):
    monkeypatch.delenv("GRADNORM_RUNS_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./runs here
    monkeypatch.setattr(sys, "argv", [str(APP)])
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    no_failure(at)
    caption = root_caption(at)
    assert f"`{SAMPLE}`" in caption and "the bundled sample runs" in caption
    assert at.sidebar.text_input[0].value == str(SAMPLE)
    assert len(at.get("vega_lite_chart")) == 1


def test_root_after_the_separator_is_shown_and_wins_over_the_environment(monkeypatch, tmp_path):
    copy_run(tmp_path, "toy-T2-gradnorm")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    at = start(monkeypatch, elsewhere, argv=("--root", str(tmp_path)))
    no_failure(at)
    assert root_caption(at) == f"Runs root: `{tmp_path}` — given with --root"
    assert at.multiselect[0].value == ["toy-T2-gradnorm"]
    assert at.get("vega_lite_chart")


def test_environment_then_local_runs_are_named_as_the_reason(monkeypatch, tmp_path):
    at = start(monkeypatch, SAMPLE)
    assert "from \\$GRADNORM_RUNS_ROOT" in root_caption(at)  # escaped: a pair of $ would start LaTeX
    project = tmp_path / "project"
    copy_run(project / "runs", "toy-T2-equal")
    monkeypatch.delenv("GRADNORM_RUNS_ROOT")
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "argv", [str(APP)])
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    no_failure(at)
    assert root_caption(at) == f"Runs root: `{project / 'runs'}` — ./runs in the working folder"
    assert at.multiselect[0].value == ["toy-T2-equal"]


def test_a_missing_root_is_a_message(monkeypatch, tmp_path):
    at = start(monkeypatch, tmp_path / "nowhere")
    no_failure(at)
    assert any("does not exist" in e.value for e in at.error)


def test_a_missing_root_after_the_separator_is_a_message_naming_it(monkeypatch, tmp_path):
    missing = tmp_path / "no-such-runs"
    at = start(monkeypatch, argv=("--root", str(missing)))
    no_failure(at)
    (error,) = [e.value for e in at.error]
    assert f"`{missing}` does not exist or is not a folder (given with --root)" in error
    assert not at.get("vega_lite_chart")
    # another root typed in the sidebar replaces it, and the page says so
    at.sidebar.text_input[0].set_value(str(SAMPLE)).run()
    no_failure(at)
    assert root_caption(at) == f"Runs root: `{SAMPLE}` — typed in the sidebar"
    assert not at.error and at.get("vega_lite_chart")


def test_an_empty_root_is_a_message(monkeypatch, tmp_path):
    at = start(monkeypatch, tmp_path)
    no_failure(at)
    assert any("No runs under" in i.value for i in at.info)


def copy_run(root: Path, run_id: str) -> Path:
    shutil.copytree(SAMPLE / run_id, root / run_id)
    return root / run_id


def test_damaged_files_invalid_runs_and_missing_validation_are_explained(monkeypatch, tmp_path):
    good = copy_run(tmp_path, "toy-T2-gradnorm")
    part = sorted((good / "metrics" / "rank=0").glob("part-*.parquet"))[3]
    part.write_bytes(part.read_bytes()[:100])  # cut short: no footer
    broken = tmp_path / "broken-run"
    broken.mkdir()
    (broken / "run.json").write_text("{not json", encoding="utf-8")
    no_val = copy_run(tmp_path, "toy-T2-equal")
    for file in (no_val / "metrics" / "rank=0").glob("part-*.parquet"):
        frame = pd.read_parquet(file)
        frame[frame["split"] == "train"].to_parquet(file, index=False)
    at = start(monkeypatch, tmp_path)
    at.sidebar.multiselect[0].set_value(["broken-run", "toy-T2-equal", "toy-T2-gradnorm"]).run()
    no_failure(at)
    assert any("broken-run" in e.value and "not valid JSON" in e.value for e in at.error)
    assert any("left out" in text.value for text in at.get("text"))
    at.radio(key="view").set_value("Overfitting").run()
    at.multiselect(key="overfitting_runs").set_value(["toy-T2-equal"]).run()
    no_failure(at)
    assert any("no validation losses" in i.value for i in at.info)


def test_a_live_run_is_refreshed_by_a_fragment(monkeypatch, tmp_path):
    live = copy_run(tmp_path, "toy-T2-gradnorm")
    runs.update_run_json(live, status=runs.RUNNING)
    runs.beat(live)
    at = start(monkeypatch, tmp_path)
    no_failure(at)
    assert any("refreshing every" in c.value for c in at.caption)


def test_a_run_with_one_task_is_drawn(monkeypatch, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gradnorm.toolkit import schema

    run = runs.create_run(tmp_path, "solo", {"tasks": ["only"], "balancer": {"name": "equal"}})
    steps = list(range(50))
    columns = {name: [None] * 50 for name in schema.COLUMNS}
    columns.update(
        step=steps,
        wall_time=[1.7e9 + s for s in steps],
        split=["train"] * 50,
        task=["only"] * 50,
        loss=[1.0 / (s + 1) for s in steps],
        weight=[1.0] * 50,
        grad_norm=[0.5] * 50,
        loss_ratio=[1.0 / (s + 1) for s in steps],
    )
    directory = run / "metrics" / "rank=0"
    directory.mkdir(parents=True)
    pq.write_table(pa.table(columns, schema=schema.METRICS_SCHEMA), directory / schema.part_file_name(1))
    runs.update_run_json(run, status=runs.FINISHED)
    at = start(monkeypatch, tmp_path)
    no_failure(at)
    assert at.multiselect[0].value == ["solo"]
    spec, data = chart_specs(at)[0]
    series = frames_with(data, "task", "value")
    assert set(series[0]["task"]) == {"only"} and len(series[0]) == 50
    for view in ("Gradient norms & loss ratios", "Balance", "Export weights"):
        at.radio(key="view").set_value(view).run()
        no_failure(at)
    at.radio(key="view").set_value("Overfitting").run()
    assert any("no validation losses" in i.value for i in at.info)
