"""The DuckDB analysis against independent computations (pyarrow + numpy over the same part files)."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from gradnorm.toolkit import analysis
from gradnorm.toolkit.recorder import Recorder
from tests.helpers import waiting
from tests.helpers.runs import record_run


def read_all(run: Path, skip: set[str] = frozenset()) -> pd.DataFrame:
    files = sorted(p for p in run.glob("metrics/rank=*/part-*.parquet") if p.name not in skip)
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("runs")
    record_run(base, "alpha", seed=0)
    record_run(base, "beta", steps=45, seed=1)
    return base


def test_list_runs_counts_rows_and_steps(root):
    listing = analysis.list_runs(root).set_index("run_id")
    for run_id in ("alpha", "beta"):
        rows = read_all(root / run_id)
        assert listing.loc[run_id, "rows"] == len(rows)
        assert listing.loc[run_id, "last_step"] == rows["step"].max()
        assert listing.loc[run_id, "status"] == "finished"
        assert listing.loc[run_id, "tasks"] == ["t0", "t1", "t2"]


def test_series_without_downsampling_are_the_raw_values(root):
    series = analysis.metric_series(root, ["alpha", "beta"], "grad_norm", max_points=10_000)
    for run_id in ("alpha", "beta"):
        raw = read_all(root / run_id)
        raw = raw[raw["split"] == "train"].sort_values(["task", "step"])
        got = series[series["run_id"] == run_id].sort_values(["task", "x"])
        np.testing.assert_array_equal(got["x"].to_numpy(), raw["step"].to_numpy().astype(float))
        np.testing.assert_allclose(got["value"].to_numpy(), raw["grad_norm"].to_numpy(), rtol=1e-12)
        assert (got["n"] == 1).all()


def test_downsampled_buckets_match_numpy(root):
    points = 8
    series = analysis.metric_series(root, "alpha", "loss", max_points=points)
    raw = read_all(root / "alpha")
    lo, hi = raw["step"].min(), raw["step"].max()  # the run's range, all splits
    raw = raw[raw["split"] == "train"]
    for task, group in raw.groupby("task"):
        bucket = np.minimum(np.floor((group["step"] - lo) / (hi - lo) * points), points - 1)
        expected = group.assign(bucket=bucket).sort_values("step").groupby("bucket")
        got = series[series["task"] == task].sort_values("x")
        assert len(got) <= points
        np.testing.assert_allclose(got["value"].to_numpy(), expected["loss"].mean().to_numpy(), rtol=1e-12)
        np.testing.assert_allclose(got["value_min"].to_numpy(), expected["loss"].min().to_numpy())
        np.testing.assert_allclose(got["value_max"].to_numpy(), expected["loss"].max().to_numpy())
        np.testing.assert_allclose(got["last"].to_numpy(), expected["loss"].last().to_numpy())
        assert got["n"].sum() == len(group)


def test_unknown_metric_and_run_are_clear_errors(root):
    with pytest.raises(analysis.AnalysisError, match="unknown metric 'lossy'"):
        analysis.metric_series(root, "alpha", "lossy")
    with pytest.raises(analysis.AnalysisError, match="no run 'gamma'"):
        analysis.weight_average(root, "gamma")
    with pytest.raises(analysis.AnalysisError, match="window"):
        analysis.weight_average(root, "alpha", window=(500, 600))


@pytest.mark.parametrize("window", [None, (10, 40), (0, 59)])
def test_weight_average_matches_numpy(root, window):
    average = analysis.weight_average(root, "alpha", window=window)
    raw = read_all(root / "alpha")
    raw = raw[raw["split"] == "train"]
    first, last = raw["step"].min(), raw["step"].max()
    start, end = window if window else (first + math.ceil(0.1 * (last - first)), last)
    assert (average.start_step, average.end_step) == (start, end)
    assert average.method == "gradnorm"
    inside = raw[(raw["step"] >= start) & (raw["step"] <= end)]
    for _, row in average.table.iterrows():
        w = inside[inside["task"] == row["task"]].sort_values("step")["balancer_weight"].to_numpy()
        assert row["n"] == len(w)
        assert row["mean"] == pytest.approx(w.mean(), rel=1e-12)
        assert row["std"] == pytest.approx(w.std(ddof=1), rel=1e-9)
        steps = inside[inside["task"] == row["task"]].sort_values("step")["step"].to_numpy()
        middle = np.floor((steps - start) * 20 / (end - start + 1)) < 10
        drift = abs(w[~middle].mean() - w[middle].mean()) / abs(w.mean())
        assert row["half_drift"] == pytest.approx(drift, rel=1e-9)
        batch = np.floor((steps - start) * 20 / (end - start + 1))
        means = pd.Series(w).groupby(batch).mean().to_numpy()
        assert row["stderr"] == pytest.approx(means.std(ddof=1) / math.sqrt(len(means)), rel=1e-9)
    assert average.convergence == pytest.approx(average.table["half_drift"].max())
    assert sum(average.weights.values()) == pytest.approx(3.0, rel=1e-6)  # each w(t) sums to T


def test_overfitting_pairs_each_validation_with_the_training_since_the_last(root):
    frame = analysis.overfitting(root, "alpha")
    raw = read_all(root / "alpha")
    train = raw[raw["split"] == "train"]
    val = raw[raw["split"] == "val"]
    for task in ("t0", "t1"):
        val_steps = sorted(val[val["task"] == task]["step"])
        previous = -1
        for step in val_steps:
            window = train[(train["task"] == task) & (train["step"] > previous) & (train["step"] <= step)]["loss"]
            row = frame[(frame["task"] == task) & (frame["step"] == step)].iloc[0]
            assert row["train_loss"] == pytest.approx(window.mean(), rel=1e-12)
            expected_val = val[(val["task"] == task) & (val["step"] == step)]["loss"].iloc[0]
            assert row["gap"] == pytest.approx(expected_val - window.mean(), rel=1e-12)
            previous = step
    onsets = analysis.overfitting_onsets(root, "alpha")
    assert set(onsets["task"]) == {"t0", "t1", "t2"}
    last = frame.sort_values("step").groupby("task")["gap"].last()
    assert dict(zip(onsets["task"], onsets["final_gap"])) == pytest.approx(last.to_dict())


def test_balance_series_per_step_spread_matches_numpy(root):
    balance = analysis.balance_series(root, "beta", max_points=10_000)
    raw = read_all(root / "beta")
    raw = raw[raw["split"] == "train"]
    per_step = raw.groupby("step")["grad_norm"]
    expected = (per_step.std(ddof=0) / per_step.mean()).to_numpy()
    np.testing.assert_allclose(balance.sort_values("step")["grad_norm_cv"].to_numpy(), expected, rtol=1e-9)
    ratio = (per_step.max() / per_step.min()).to_numpy()
    np.testing.assert_allclose(balance.sort_values("step")["grad_norm_max_over_min"].to_numpy(), ratio, rtol=1e-9)


def test_a_damaged_part_file_is_reported_and_left_out(tmp_path):
    run = record_run(tmp_path, "damaged")
    victim = sorted((run / "metrics" / "rank=0").glob("part-*.parquet"))[2]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    found = analysis.problems(tmp_path)
    assert len(found) == 1 and victim.name in found[0]
    average = analysis.weight_average(tmp_path, "damaged", window=(0, 59))
    rest = read_all(run, skip={victim.name})
    rest = rest[rest["split"] == "train"]
    expected = rest.groupby("task")["balancer_weight"].mean()
    assert dict(zip(average.table["task"], average.table["mean"])) == pytest.approx(expected.to_dict(), rel=1e-12)
    listing = analysis.list_runs(tmp_path)
    assert listing["problems"].iloc[0] == found


def test_a_run_read_while_it_is_written(tmp_path, monkeypatch):
    errors: list[BaseException] = []
    done = threading.Event()
    seen = []
    real_write = Recorder._write_table

    def write_then_let_a_read_happen(recorder: Recorder, table) -> None:
        real_write(recorder, table)
        # after each of the first part files the writer goes on once the reader has read once more, so reads
        # overlap the writing however the threads are scheduled (the training thread waits once the backlog is full)
        if recorder.part_files_written <= 3:
            waiting.at_least(lambda: len(seen), recorder.part_files_written, "the next read of the live run")

    def write() -> None:
        try:
            record_run(tmp_path, "live", steps=150, flush_every=3, validate_every=0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    monkeypatch.setattr(Recorder, "_write_table", write_then_let_a_read_happen)
    writer = threading.Thread(target=write)
    writer.start()
    while not done.is_set():
        if (tmp_path / "live" / "run.json").exists():
            series = analysis.metric_series(tmp_path, "live", "weight", max_points=50)
            seen.append(int(series["n"].sum()) if len(series) else 0)
        time.sleep(0.01)
    writer.join()
    assert not errors
    final = analysis.metric_series(tmp_path, "live", "weight", max_points=50)
    assert final["n"].sum() == 150 * 3
    assert seen == sorted(seen)  # never fewer rows than before: no half files seen
    assert len(seen) >= 2
