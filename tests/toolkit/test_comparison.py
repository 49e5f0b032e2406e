"""compare_runs: final and best validation losses, the task-normalised loss and Delta_m% against a baseline,
checked against hand-made values and against plain Python over the part files (no DuckDB, no pandas)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradnorm.toolkit import analysis, schema
from tests.helpers.synthetic_runs import run_json


def write_rows(root: Path, run_id: str, rows: list[tuple[str, int, float]], tasks: list[str], config: dict | None = None) -> None:
    """A run whose rows are validation losses (task, step, loss), plus one training row per task."""
    columns: dict[str, list] = {name: [] for name in schema.COLUMNS}
    train = [(task, 0, 1.0, schema.TRAIN) for task in tasks]
    for task, step, loss, split in [(t, s, v, schema.VALIDATION) for t, s, v in rows] + train:
        row = {name: None for name in schema.COLUMNS}
        row.update(step=step, epoch=0, wall_time=1.7e9 + step, split=split, task=task, loss=loss)
        for name in schema.COLUMNS:
            columns[name].append(row[name])
    rank_dir = root / run_id / schema.METRICS_DIR / schema.rank_dir_name(0)
    rank_dir.mkdir(parents=True)
    pq.write_table(pa.table(columns, schema=schema.METRICS_SCHEMA), rank_dir / schema.part_file_name(1))
    meta = run_json(run_id, tasks=tasks)
    if config is not None:
        meta["config"] = config
    (root / run_id / schema.RUN_FILE).write_text(json.dumps(meta), encoding="utf-8")


def write_validation_run(root: Path, run_id: str, losses: dict[str, list[float]], config: dict | None = None) -> None:
    """Validation losses ``losses[task][k]`` at steps 10, 20, ..."""
    rows = [(task, 10 * (k + 1), value) for task, values in losses.items() for k, value in enumerate(values)]
    write_rows(root, run_id, rows, list(losses), config)


def test_hand_made_losses_give_the_hand_computed_figures(tmp_path):
    write_validation_run(tmp_path, "equal", {"a": [4.0, 3.0, 2.0], "b": [8.0, 4.0, 5.0]})
    write_validation_run(tmp_path, "gradnorm", {"a": [4.0, 1.5, 1.0], "b": [8.0, 6.0, 5.0]}, config={"initial_test_losses": {"a": 5.0, "b": 10.0}})
    result = analysis.compare_runs(tmp_path, ["equal", "gradnorm"], baseline="equal")
    rows = {(r["run_id"], r["task"]): r for r in result.per_task.to_dict("records")}
    assert rows["equal", "b"]["final_val_loss"] == 5.0 and rows["equal", "b"]["best_val_loss"] == 4.0 and rows["equal", "b"]["best_step"] == 20
    # final: a 2 -> 1 (-50%), b 5 -> 5 (0%): Delta_m = -25%
    assert rows["gradnorm", "a"]["delta_pct"] == pytest.approx(-50.0)
    assert rows["gradnorm", "b"]["delta_pct"] == pytest.approx(0.0)
    per_run = result.per_run.set_index("run_id")
    assert per_run.loc["gradnorm", "delta_m_pct"] == pytest.approx(-25.0)
    assert per_run.loc["equal", "delta_m_pct"] == pytest.approx(0.0)
    # task-normalised: the equal run has no recorded initial losses (first validation loss: 4 and 8)
    assert per_run.loc["equal", "task_normalised_loss"] == pytest.approx(2.0 / 4.0 + 5.0 / 8.0)
    assert per_run.loc["gradnorm", "task_normalised_loss"] == pytest.approx(1.0 / 5.0 + 5.0 / 10.0)
    assert rows["gradnorm", "a"]["initial_source"] == "config.initial_test_losses"
    assert rows["equal", "a"]["initial_source"] == "first validation loss"
    # the better cell: a is gradnorm's; b's final is a tie (both marked), b's best is equal's (4 < 5)
    assert rows["gradnorm", "a"]["best_final"] and not rows["equal", "a"]["best_final"]
    assert rows["gradnorm", "b"]["best_final"] and rows["equal", "b"]["best_final"]
    assert rows["equal", "b"]["best_best"] and not rows["gradnorm", "b"]["best_best"]
    # on the best losses: a 2 -> 1 (-50%), b 4 -> 5 (+25%): -12.5%
    best = analysis.compare_runs(tmp_path, ["equal", "gradnorm"], baseline="equal", metric="best")
    assert best.per_run.set_index("run_id").loc["gradnorm", "delta_m_pct"] == pytest.approx(-12.5)
    # against the other baseline the sign turns
    other = analysis.compare_runs(tmp_path, ["equal", "gradnorm"], baseline="gradnorm")
    assert other.per_run.set_index("run_id").loc["equal", "delta_m_pct"] == pytest.approx((100.0 + 0.0) / 2)


def _plain_validation(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Task -> [(step, mean validation loss)] from the part files with pyarrow and plain Python."""
    sums: dict[tuple[str, int], list[float]] = {}
    for part in sorted((path / schema.METRICS_DIR).rglob("part-*.parquet")):
        for row in pq.read_table(part).to_pylist():
            if row["split"] == schema.VALIDATION and row["loss"] is not None and math.isfinite(row["loss"]):
                sums.setdefault((row["task"], row["step"]), []).append(row["loss"])
    out: dict[str, list[tuple[int, float]]] = {}
    for (task, step), values in sorted(sums.items()):
        out.setdefault(task, []).append((step, sum(values) / len(values)))
    return out


def test_the_figures_match_plain_python_over_the_part_files(tmp_path):
    tasks = ("t0", "t1", "t2")
    generator = random.Random(7)
    for run_id, steps in (("base", 80), ("method", 120)):
        # two validation rows per (task, step) (two ranks' batches), a NaN now and then, uneven steps
        rows = [
            (task, step, generator.choice([float("nan")] + [generator.uniform(0.5, 3.0)] * 9))
            for task in tasks
            for step in sorted(generator.sample(range(1, steps), 12))
            for _ in range(2)
        ]
        write_rows(tmp_path, run_id, rows, list(tasks))
    result = analysis.compare_runs(tmp_path, ["method", "base"], baseline="base")
    expected_final = {}
    for run_id in ("base", "method"):
        for task, points in _plain_validation(tmp_path / run_id).items():
            final_step, final = points[-1]
            best_step, best = min(points, key=lambda p: p[1])
            expected_final[run_id, task] = final
            (row,) = result.per_task[(result.per_task["run_id"] == run_id) & (result.per_task["task"] == task)].to_dict("records")
            assert row["final_val_loss"] == pytest.approx(final, rel=1e-12) and row["final_step"] == final_step
            assert row["best_val_loss"] == pytest.approx(best, rel=1e-12) and row["best_step"] == best_step
            assert row["normalised_final"] == pytest.approx(final / points[0][1], rel=1e-12)
    deltas = [(expected_final["method", t] - expected_final["base", t]) / expected_final["base", t] * 100 for t in tasks]
    per_run = result.per_run.set_index("run_id")
    assert per_run.loc["method", "delta_m_pct"] == pytest.approx(sum(deltas) / len(deltas), rel=1e-12)
    assert per_run.loc["method", "tasks_compared"] == 3
    assert list(result.per_run["run_id"]) == ["method", "base"]


def test_tasks_the_baseline_lacks_are_left_out_of_delta_m_and_counted(tmp_path):
    write_validation_run(tmp_path, "base", {"a": [2.0]})
    write_validation_run(tmp_path, "wide", {"a": [3.0], "b": [1.0]})
    result = analysis.compare_runs(tmp_path, ["base", "wide"])
    per_run = result.per_run.set_index("run_id")
    assert per_run.loc["wide", "delta_m_pct"] == pytest.approx(50.0)
    assert per_run.loc["wide", "tasks_compared"] == 1 and per_run.loc["wide", "tasks_with_validation"] == 2


def test_a_run_without_validation_has_no_figures_but_does_not_fail(tmp_path):
    write_validation_run(tmp_path, "base", {"a": [2.0]})
    write_rows(tmp_path, "noval", [], ["a"])
    result = analysis.compare_runs(tmp_path, ["base", "noval"])
    row = result.per_run.set_index("run_id").loc["noval"]
    assert math.isnan(row["delta_m_pct"]) and row["tasks_with_validation"] == 0


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"run_ids": []}, "at least one run"),
        ({"run_ids": ["base", "base"]}, "named twice"),
        ({"run_ids": ["base"], "baseline": "other"}, "baseline run 'other'"),
        ({"run_ids": ["base"], "metric": "mean"}, "metric must be one of"),
        ({"run_ids": ["missing"]}, "missing"),
    ],
)
def test_bad_requests_are_refused_by_name(tmp_path, kwargs, words):
    write_validation_run(tmp_path, "base", {"a": [2.0]})
    with pytest.raises(analysis.AnalysisError, match=words):
        analysis.compare_runs(tmp_path, **kwargs)
