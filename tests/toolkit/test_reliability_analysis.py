"""The analysis survives what a crash, a full disk or a hostile file leaves behind, and reads only its root.

Expected values come from pyarrow reading the intact part files directly, never from the analysis itself.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from gradnorm.toolkit import analysis, runs, schema
from gradnorm.toolkit.recorder import Recorder
from tests.helpers import faults as scenarios
from tests.helpers import waiting

TASKS = ["a", "b"]


def make_run(root: Path, name: str, steps: int = 50, flush_every: int = 10, tasks=TASKS, close: bool = True) -> Path:
    run_path = runs.create_run(root, name, {"tasks": list(tasks), "balancer": {"name": "gradnorm"}, "mode": "balance"})
    rec = Recorder(run_path, list(tasks), flush_every=flush_every)
    scenarios._record_steps(rec, range(steps), list(tasks))
    if close:
        rec.close()
    else:
        rec.wait()
    return run_path


def parts_of(run_path: Path) -> list[Path]:
    return sorted((run_path / schema.METRICS_DIR / "rank=0").glob("part-*.parquet"))


def loss_by_step(files: list[Path], task: str) -> dict[int, float]:
    table = pa.concat_tables([pq.read_table(f) for f in files])
    table = table.filter(pc.and_(pc.equal(table["task"], task), pc.equal(table["split"], "train")))
    return dict(zip(table["step"].to_pylist(), table["loss"].to_pylist()))


def series_by_step(frame, task: str) -> dict[int, float]:
    rows = frame[frame.task == task]
    assert (rows.n == 1).all()  # one step per bucket: values are the raw ones
    return dict(zip(rows.x.astype(int), rows.value))


# -- damaged part files -----------------------------------------------------------------------------
def test_damaged_and_hostile_part_files_are_left_out_reported_and_never_fail_a_query(tmp_path):
    run_path = make_run(tmp_path, "damaged", steps=60, flush_every=10)
    parts = parts_of(run_path)
    assert len(parts) == 6
    intact = [parts[0], parts[2], parts[4]]
    # A part cut short (a crash of some other copy tool; the recorder itself renames complete files only).
    data = parts[1].read_bytes()
    parts[1].write_bytes(data[: len(data) // 2])
    # Wrong column types: step as text, loss as text.
    table = pq.read_table(parts[3])
    pq.write_table(table.set_column(0, "step", pc.cast(table["step"], pa.string())), parts[3])
    table = pq.read_table(parts[5])
    index = table.schema.get_field_index("loss")
    pq.write_table(table.set_column(index, "loss", pc.cast(table["loss"], pa.string())), parts[5])
    # An empty file and a leftover temporary file of a killed writer.
    (parts[0].parent / "part-000007.parquet").write_bytes(b"")
    (parts[0].parent / ".part-000008.parquet.tmp").write_bytes(b"PAR1 half")

    frame = analysis.metric_series(tmp_path, "damaged", "loss", max_points=10_000)
    expected = loss_by_step(intact, "a")
    assert series_by_step(frame, "a") == pytest.approx(expected)
    assert sorted(expected) == list(range(0, 10)) + list(range(20, 30)) + list(range(40, 50))

    found = analysis.problems(tmp_path)
    for damaged in (parts[1], parts[3], parts[5], parts[0].parent / "part-000007.parquet"):
        assert sum(str(damaged) in p for p in found) == 1, (damaged, found)
    assert any("column 'step' has type string" in p for p in found)
    assert any("column 'loss' has type string, expected a number" in p for p in found)
    assert not any(".tmp" in p for p in found)  # never even looked at
    listed = analysis.list_runs(tmp_path).set_index("run_id")
    assert listed.loc["damaged", "rows"] == 3 * 10 * 2
    assert len(listed.loc["damaged", "problems"]) == 4
    # Every other analysis function answers too.
    analysis.weight_average(tmp_path, "damaged")
    analysis.summary(tmp_path, "damaged")
    analysis.balance_series(tmp_path, ["damaged"])


def test_a_damaged_data_page_behind_an_intact_footer_is_left_out(tmp_path):
    run_path = make_run(tmp_path, "page", steps=40, flush_every=10)
    parts = parts_of(run_path)
    data = bytearray(parts[2].read_bytes())
    # Scribble over the column chunks but keep the footer (and its magic), so only reading the data fails.
    for i in range(8, len(data) // 2):
        data[i] = 0xAB
    parts[2].write_bytes(bytes(data))
    frame = analysis.metric_series(tmp_path, "page", "loss", max_points=10_000)
    intact = [p for i, p in enumerate(parts) if i != 2]
    assert series_by_step(frame, "a") == pytest.approx(loss_by_step(intact, "a"))
    assert any(str(parts[2]) in p for p in analysis.list_runs(tmp_path).set_index("run_id").loc["page", "problems"] + analysis.problems(tmp_path))


# -- hostile run directories ----------------------------------------------------------------------
def test_list_runs_never_crashes_on_hostile_run_directories(tmp_path):
    root = tmp_path / "root"
    make_run(root, "good", steps=20)
    for label, content in scenarios.HOSTILE_RUN_JSON.items():
        run_dir = root / ("hostile-" + label.replace(" ", "-"))
        (run_dir / schema.METRICS_DIR).mkdir(parents=True)
        (run_dir / schema.RUN_FILE).write_bytes(content)
    future = make_run(root, "future-times", steps=10)
    meta = json.loads((future / schema.RUN_FILE).read_text())
    meta.update(created=1e300, updated=float("inf"), heartbeat="soon", status="running")
    (future / schema.RUN_FILE).write_text(json.dumps(meta))  # json writes Infinity, and reads it back
    outside = tmp_path / "outside" / "escaped"
    make_run(tmp_path / "outside", "escaped", steps=10)
    os.symlink(outside, root / "link-out")
    (root / "a-file-not-a-run").write_text("hello")
    (root / "not a valid name").mkdir()
    (root / "not a valid name" / schema.RUN_FILE).write_text("{}")

    listed = analysis.list_runs(root).set_index("run_id")
    expected_ids = {"good", "future-times", "link-out"} | {"hostile-" + k.replace(" ", "-") for k in scenarios.HOSTILE_RUN_JSON}
    assert set(listed.index) == expected_ids
    assert listed.loc["good", "status"] == runs.FINISHED and listed.loc["good", "rows"] == 40
    for label in scenarios.HOSTILE_RUN_JSON:
        row = listed.loc["hostile-" + label.replace(" ", "-")]
        assert row["status"] == "invalid"
        assert any("run.json" in p for p in row["problems"])
    assert listed.loc["future-times", "status"] == runs.INTERRUPTED  # no believable sign of life
    assert listed.loc["link-out", "status"] == "invalid"
    assert "not a directory directly under" in listed.loc["link-out", "problems"][0]
    # The escaped run's data is never read through the link.
    with pytest.raises(analysis.AnalysisError, match=r"run 'link-out' is not a directory directly under"):
        analysis.metric_series(root, "link-out", "loss")
    assert len(analysis.problems(root)) >= len(scenarios.HOSTILE_RUN_JSON) + 1


@pytest.mark.parametrize("run_id", ["../../etc", "../outside/escaped", "/etc", "a/../../b", "..", "good\n"])
def test_every_analysis_function_refuses_run_ids_outside_the_root(tmp_path, run_id):
    root = tmp_path / "root"
    make_run(root, "good", steps=10)
    make_run(tmp_path / "outside", "escaped", steps=10)
    calls = [
        lambda: analysis.metric_series(root, [run_id], "loss"),
        lambda: analysis.weight_average(root, run_id),
        lambda: analysis.overfitting(root, run_id),
        lambda: analysis.overfitting_onsets(root, run_id),
        lambda: analysis.balance_series(root, [run_id]),
        lambda: analysis.balance_summary(root, run_id),
        lambda: analysis.summary(root, run_id),
    ]
    for call in calls:
        with pytest.raises(analysis.AnalysisError, match=r"invalid run name"):
            call()


def test_unknown_metric_and_run_are_clear_errors(tmp_path):
    make_run(tmp_path, "good", steps=10)
    with pytest.raises(analysis.AnalysisError, match=r"unknown metric 'loss; DROP TABLE metrics'"):
        analysis.metric_series(tmp_path, "good", "loss; DROP TABLE metrics")
    with pytest.raises(analysis.AnalysisError, match=r"no run 'missing' under"):
        analysis.metric_series(tmp_path, "missing", "loss")


# -- names are data --------------------------------------------------------------------------------
SQLISH_TASKS = ["depth'; DROP TABLE metrics; --", 'normals" OR 1=1 --', "$tasks", "a%b_c"]


def test_sql_like_task_and_run_names_are_handled_as_data(tmp_path):
    run_path = make_run(tmp_path, "x=1.y-z_w", steps=30, tasks=SQLISH_TASKS)
    files = parts_of(run_path)
    for task in SQLISH_TASKS:
        frame = analysis.metric_series(tmp_path, "x=1.y-z_w", "loss", tasks=[task], max_points=10_000)
        assert set(frame.task) == {task}
        assert series_by_step(frame, task) == pytest.approx(loss_by_step(files, task))
    # A filter naming a task that only *looks* like SQL matching everything returns nothing.
    assert analysis.metric_series(tmp_path, "x=1.y-z_w", "loss", tasks=["' OR '1'='1"]).empty
    table = analysis.weight_average(tmp_path, "x=1.y-z_w").table
    assert sorted(table.task) == sorted(SQLISH_TASKS)


# -- the writer and the reader at once ------------------------------------------------------------
def test_the_analysis_reads_a_live_run_without_errors_or_half_files(tmp_path):
    run_path = runs.create_run(tmp_path, "live", {"tasks": TASKS, "balancer": {"name": "gradnorm"}})
    rec = Recorder(run_path, TASKS, flush_every=1, heartbeat_interval=0.005)
    stop = threading.Event()
    counts: list[int] = []
    errors: list[BaseException] = []

    def read_forever():
        while not stop.is_set():
            try:
                listed = analysis.list_runs(tmp_path).set_index("run_id")
                assert listed.loc["live", "status"] in (runs.RUNNING, runs.FINISHED)
                assert listed.loc["live", "problems"] == []
                frame = analysis.metric_series(tmp_path, "live", "loss", max_points=100_000)
                counts.append(int(frame.n.sum()))
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

    def keep_pace(step: int) -> None:
        # every 50 steps the reader reads once more before the writing goes on: reads overlap the writes
        # however the threads are scheduled
        if step % 50 == 49:
            waiting.at_least(lambda: len(counts) + len(errors), (step + 1) // 50, "the reader's next read", alive=reader.is_alive)

    reader = threading.Thread(target=read_forever)
    reader.start()
    try:
        scenarios._record_steps(rec, range(150), TASKS, after=keep_pace)
        rec.close()
    finally:
        stop.set()
        reader.join()
    assert errors == []
    assert len(counts) >= 3
    assert all(c % 2 == 0 for c in counts) and counts == sorted(counts)
    assert int(analysis.metric_series(tmp_path, "live", "loss", max_points=100_000).n.sum()) == 300


def test_run_json_replaced_between_the_look_and_the_open_is_read_again_not_listed_invalid(tmp_path, monkeypatch):
    # The recorder's heartbeat replaces run.json with os.replace; a reader that loses that race once
    # must read the new file, while a FIFO swapped in is still refused without being read.
    from gradnorm.toolkit.analysis import catalog

    run_path = make_run(tmp_path, "live", steps=20)
    run_json = run_path / "run.json"
    real_open = os.open
    swaps = {"left": 1}

    def open_after_a_heartbeat(path, flags, *args, **kwargs):
        if Path(path) == run_json and swaps["left"] > 0:
            swaps["left"] -= 1
            meta = json.loads(run_json.read_text())
            meta["heartbeat"] = float(meta.get("heartbeat") or 0) + 1
            runs.write_json_atomic(run_json, meta)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(catalog.os, "open", open_after_a_heartbeat)
    listed = analysis.list_runs(tmp_path).set_index("run_id")
    assert swaps["left"] == 0
    assert listed.loc["live", "problems"] == []
    assert listed.loc["live", "status"] == runs.FINISHED

    def open_after_a_fifo_swap(path, flags, *args, **kwargs):
        if Path(path) == run_json and not run_json.is_fifo():
            run_json.unlink()
            os.mkfifo(run_json)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(catalog.os, "open", open_after_a_fifo_swap)
    with pytest.raises(catalog.NotRegular, match="FIFO"):
        catalog.open_regular(run_json)


def test_a_killed_run_lists_as_interrupted_and_its_flushed_steps_read_back(tmp_path, monkeypatch):
    figures = scenarios.kill_scenario(tmp_path, flush_every=10, min_parts=3)
    monkeypatch.setenv(runs.STALE_AFTER_ENV, "30")
    fresh = analysis.list_runs(tmp_path, now=figures["heartbeat"] + 1).set_index("run_id")
    stale = analysis.list_runs(tmp_path, now=figures["heartbeat"] + 31).set_index("run_id")
    assert fresh.loc["killed-run", "status"] == runs.RUNNING
    assert stale.loc["killed-run", "status"] == runs.INTERRUPTED
    assert stale.loc["killed-run", "last_step"] == figures["steps_read_back"] - 1
    frame = analysis.metric_series(tmp_path, "killed-run", "loss", max_points=100_000)
    assert sorted(set(frame.x.astype(int))) == list(range(figures["steps_read_back"]))


HOSTILE_PART_VARIANTS = {
    # name: (rewrite of the second part file, is the file left out?)
    "extra-column": (lambda t: t.append_column("zzz", pa.array(["x"] * t.num_rows)), False),
    "no-weight-column": (lambda t: t.drop(["weight"]), False),
    "null-task": (lambda t: t.set_column(t.schema.get_field_index("task"), "task", pa.array([None] * t.num_rows, pa.string())), False),
    "nan-loss": (lambda t: t.set_column(t.schema.get_field_index("loss"), "loss", pa.array([float("nan")] * t.num_rows)), False),
    "negative-steps": (lambda t: t.set_column(0, "step", pc.multiply(t["step"], -1)), False),
    "skipped-as-int": (
        lambda t: t.set_column(t.schema.get_field_index("step_update_skipped"), "step_update_skipped", pa.array([1] * t.num_rows, pa.int64())),
        False,
    ),
    "zero-rows": (lambda t: t.slice(0, 0), False),
    "step-as-float": (lambda t: t.set_column(0, "step", pc.cast(t["step"], pa.float64())), True),
    "wall-time-as-text": (lambda t: t.set_column(2, "wall_time", pc.cast(t["wall_time"], pa.string())), True),
}


@pytest.mark.parametrize("variant", sorted(HOSTILE_PART_VARIANTS))
def test_odd_part_files_never_crash_any_analysis_function(tmp_path, variant):
    rewrite, left_out = HOSTILE_PART_VARIANTS[variant]
    run_path = make_run(tmp_path, variant, steps=30, flush_every=10)
    target = parts_of(run_path)[1]
    pq.write_table(rewrite(pq.read_table(target)), target)
    expected_rows = sum(pq.read_metadata(p).num_rows for p in parts_of(run_path) if not (left_out and p == target))
    listed = analysis.list_runs(tmp_path).set_index("run_id")
    assert listed.loc[variant, "rows"] == expected_rows
    assert [str(target) in p for p in listed.loc[variant, "problems"]] == ([True] if left_out else [])
    analysis.metric_series(tmp_path, variant, "loss")
    analysis.metric_series(tmp_path, variant, "weight", x="wall_time")
    analysis.weight_average(tmp_path, variant)
    analysis.summary(tmp_path, variant)
    analysis.balance_series(tmp_path, [variant])
    analysis.balance_summary(tmp_path, variant)
    analysis.overfitting(tmp_path, variant)
    analysis.overfitting_onsets(tmp_path, variant)


def test_the_damaged_part_figures_hold(tmp_path):
    results = scenarios.damaged_part_scenario(tmp_path)
    assert [r["damage"] for r in results] == list(scenarios.PART_DAMAGE)
    for result in results:
        assert result["query_answered"] is True, result
        assert result["steps_read"] == result["intact_steps"] == 30, result
        assert result["reported"] is True, result
