"""The comparison per group (seeds of one configuration together): mean, spread and Delta_m% against a
baseline group, checked against the validation rows read directly from the part files with pyarrow and
combined with the statistics module; and the notes for what a group's runs lack."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gradnorm.toolkit import analysis, schema
from tests.helpers.synthetic_runs import metrics_table, run_json, write_run

#: run -> (steps, tasks): seeds of different lengths end on different validation losses.
RUNS = {
    "m-equal-s0": (40, ("a", "b")),
    "m-equal-s1": (60, ("a", "b")),
    "m-gradnorm-s0": (50, ("a", "b")),
    "m-gradnorm-s1": (70, ("a", "b")),
    "m-gradnorm-s2": (90, ("a",)),  # validates a only: b's cell is over the other two
    "m-single-s0": (80, ("a",)),  # a group that never validated b
}
GROUPS = {
    "m-equal": ["m-equal-s0", "m-equal-s1"],
    "m-gradnorm": ["m-gradnorm-s0", "m-gradnorm-s1", "m-gradnorm-s2"],
    "m-single": ["m-single-s0"],
    "m-dwa": ["m-dwa-s0", "m-dwa-s1"],  # no validation split at all
}


def _root(tmp_path: Path) -> Path:
    for name, (steps, tasks) in RUNS.items():
        write_run(tmp_path, name, steps=steps, tasks=tasks, meta=run_json(name, tasks=tasks))
    for name in GROUPS["m-dwa"]:
        rank_dir = tmp_path / name / schema.METRICS_DIR / schema.rank_dir_name(0)
        rank_dir.mkdir(parents=True)
        pq.write_table(metrics_table(range(30), validate_every=0), rank_dir / schema.part_file_name(1))
        (tmp_path / name / schema.RUN_FILE).write_text(json.dumps(run_json(name)), encoding="utf-8")
    return tmp_path


def _validation(root: Path) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(run, task) -> [(step, loss)] of its validation rows, from the part files."""
    found: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for name in RUNS:
        for part in sorted((root / name / schema.METRICS_DIR).glob("*/part-*.parquet")):
            for row in pq.read_table(part, columns=["step", "split", "task", "loss"]).to_pylist():
                if row["split"] == schema.VALIDATION:
                    found.setdefault((name, row["task"]), []).append((row["step"], row["loss"]))
    return {key: sorted(rows) for key, rows in found.items()}


@pytest.mark.parametrize("metric", ["final", "best"])
def test_group_means_spreads_and_delta_m_match_an_independent_computation(tmp_path, metric):
    root = _root(tmp_path)
    runs = [r for members in GROUPS.values() for r in members]
    per_task = analysis.compare_runs(root, runs, baseline="m-equal-s0").per_task
    result = analysis.grouped_comparison(per_task, GROUPS, baseline="m-equal", metric=metric)
    rows = _validation(root)
    value = {key: (points[-1][1] if metric == "final" else min(loss for _, loss in points)) for key, points in rows.items()}
    cells = result.per_task.set_index(["group", "task"])
    expected_means = {}
    for group, members in GROUPS.items():
        for task in ("a", "b"):
            values = [value[(r, task)] for r in members if (r, task) in value]
            if not values:
                assert (group, task) not in cells.index
                continue
            cell = cells.loc[(group, task)]
            expected_means[(group, task)] = statistics.fmean(values)
            assert cell["mean"] == pytest.approx(statistics.fmean(values), rel=1e-12)
            assert cell["std"] == pytest.approx(statistics.pstdev(values), rel=1e-9, abs=1e-15)
            assert (cell["low"], cell["high"]) == (min(values), max(values))
            assert (cell["runs"], cell["runs_in_group"]) == (len(values), len(members))
    assert cells.loc[("m-gradnorm", "b"), "runs"] == 2
    for task in ("a", "b"):
        lowest = min(m for (g, t), m in expected_means.items() if t == task)
        assert [g for (g, t), m in expected_means.items() if t == task and m == lowest] == list(cells.xs(task, level="task").query("best").index)
    summary = result.per_group.set_index("group")
    for group in ("m-gradnorm", "m-single"):
        changes = [
            (expected_means[(group, t)] - expected_means[("m-equal", t)]) / expected_means[("m-equal", t)] * 100
            for t in ("a", "b")
            if (group, t) in expected_means
        ]
        assert summary.loc[group, "delta_m_pct"] == pytest.approx(statistics.fmean(changes), rel=1e-9)
        assert summary.loc[group, "tasks_compared"] == len(changes)
        # the spread across the group's runs: each run's own Delta_m% against the baseline group's means
        per_run = []
        for run in GROUPS[group]:
            own = [(value[(run, t)] - expected_means[("m-equal", t)]) / expected_means[("m-equal", t)] * 100 for t in ("a", "b") if (run, t) in value]
            per_run.append(statistics.fmean(own))
        assert summary.loc[group, "delta_m_std"] == pytest.approx(statistics.pstdev(per_run), rel=1e-9, abs=1e-12)
        assert (summary.loc[group, "delta_m_low"], summary.loc[group, "delta_m_high"]) == pytest.approx((min(per_run), max(per_run)), rel=1e-12)
    assert summary.loc["m-equal", "delta_m_pct"] == 0.0
    assert summary.loc["m-dwa", "runs_with_validation"] == 0 and summary.loc["m-dwa", "tasks_compared"] == 0
    # the task-normalised loss (paper section 4): each run's sum of final / first validation loss, then across the runs
    normalised = [sum(rows[(r, t)][-1][1] / rows[(r, t)][0][1] for t in ("a", "b")) for r in GROUPS["m-equal"]]
    assert summary.loc["m-equal", "task_normalised_loss"] == pytest.approx(statistics.fmean(normalised), rel=1e-12)
    assert summary.loc["m-equal", "task_normalised_std"] == pytest.approx(statistics.pstdev(normalised), rel=1e-9)
    # only the runs that validated every task enter it: a sum over fewer tasks would look better
    complete = [sum(rows[(r, t)][-1][1] / rows[(r, t)][0][1] for t in ("a", "b")) for r in ("m-gradnorm-s0", "m-gradnorm-s1")]
    assert summary.loc["m-gradnorm", "task_normalised_runs"] == 2
    assert summary.loc["m-gradnorm", "task_normalised_loss"] == pytest.approx(statistics.fmean(complete), rel=1e-12)
    assert summary.loc["m-single", "task_normalised_runs"] == 0 and math.isnan(summary.loc["m-single", "task_normalised_loss"])
    finite = summary["delta_m_pct"].dropna()
    assert list(summary.index[summary["best_delta"]]) == list(finite.index[finite == finite.min()])


def test_the_notes_say_which_group_lacks_a_task_or_a_validation_split(tmp_path):
    root = _root(tmp_path)
    runs = [r for members in GROUPS.values() for r in members]
    per_task = analysis.compare_runs(root, runs).per_task
    notes = analysis.grouped_comparison(per_task, GROUPS, baseline="m-equal").notes
    assert "group m-dwa: none of its 2 run(s) logged validation losses; it has no figures" in notes
    assert any(n.startswith("group m-gradnorm: only 2 of its 3 run(s) with validation losses validated task(s) b;") for n in notes)
    assert "group m-single: no run validated task(s) b (no cell; its Delta_m% leaves them out, and it has no task-normalised loss)" in notes
    assert not any(n.startswith("group m-equal") for n in notes)  # a complete group has none
    # a run without validation inside a group that has some
    mixed = {"m-equal": ["m-equal-s0", "m-dwa-s0"], "rest": ["m-equal-s1"]}
    notes = analysis.grouped_comparison(per_task, mixed, baseline="rest").notes
    assert notes == ["group m-equal: run m-dwa-s0 logged no validation losses and is left out of the group's figures"]


def test_bad_groups_are_refused_with_a_message(tmp_path):
    root = _root(tmp_path)
    per_task = analysis.compare_runs(root, ["m-equal-s0", "m-equal-s1"]).per_task
    with pytest.raises(analysis.AnalysisError, match="the baseline group 'nope' is not among the groups"):
        analysis.grouped_comparison(per_task, {"g": ["m-equal-s0"]}, baseline="nope")
    with pytest.raises(analysis.AnalysisError, match="run 'm-equal-s0' is in two groups, 'g' and 'h'"):
        analysis.grouped_comparison(per_task, {"g": ["m-equal-s0"], "h": ["m-equal-s0"]}, baseline="g")
    with pytest.raises(analysis.AnalysisError, match=r"group\(s\) \['h'\] have no runs"):
        analysis.grouped_comparison(per_task, {"g": ["m-equal-s0"], "h": []}, baseline="g")
    with pytest.raises(analysis.AnalysisError, match="metric must be one of"):
        analysis.grouped_comparison(per_task, {"g": ["m-equal-s0"]}, baseline="g", metric="last")
    with pytest.raises(analysis.AnalysisError, match="per_task lacks the column"):
        analysis.grouped_comparison(per_task[["run_id", "task"]], {"g": ["m-equal-s0"]}, baseline="g")
