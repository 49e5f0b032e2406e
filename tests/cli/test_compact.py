"""``gradnorm compact``: runs written as many small part files read the same afterwards from few large
ones; a rank a live process writes is left alone; mistakes are messages."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from gradnorm import cli
from gradnorm.toolkit import analysis, runs, schema
from gradnorm.toolkit.recorder import Recorder
from tests.helpers import faults as scenarios
from tests.helpers.runs import record_run


def _small_files_run(root, name, steps=60, flush_every=2):
    run_path = runs.create_run(root, name, {"tasks": ["a", "b"], "balancer": {"name": "gradnorm"}, "mode": "balance"})
    rec = Recorder(run_path, ["a", "b"], flush_every=flush_every, compact=False)
    scenarios._record_steps(rec, range(steps), ["a", "b"])
    rec.close()
    return run_path


def test_compact_merges_a_run_and_every_reading_stays_the_same(tmp_path, capsys):
    run_path = record_run(tmp_path, "old", steps=90, flush_every=3)
    before_rows = scenarios._sorted_rows(scenarios.read_back(run_path))
    before_weights = analysis.weight_average(tmp_path, "old").table.to_dict("records")
    before_listing = analysis.list_runs(tmp_path).drop(columns=["updated"]).to_dict("records")
    assert len(scenarios.live_parts(run_path)) >= 30
    assert cli.main(["compact", "old", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "old rank=0:" in out and "merged into 1; 1 part files now" in out
    [merged] = scenarios.live_parts(run_path)
    assert schema.part_file_range(merged.name)[0] == 1
    assert sorted(os.listdir(merged.parent)) == sorted([merged.name, runs.WriterLock.FILE_NAME])
    assert scenarios._sorted_rows(scenarios.read_back(run_path)).equals(before_rows)
    after_weights = analysis.weight_average(tmp_path, "old").table.to_dict("records")
    assert [r["task"] for r in after_weights] == [r["task"] for r in before_weights]
    for after, before in zip(after_weights, before_weights):
        assert after == pytest.approx(before, rel=1e-12)  # (DuckDB may sum in another order)
    assert analysis.list_runs(tmp_path).drop(columns=["updated"]).to_dict("records") == before_listing
    # Again: nothing left to merge, nothing changes.
    assert cli.main(["compact", "old", "--root", str(tmp_path)]) == 0
    assert "0 part files merged into 0; 1 part files now" in capsys.readouterr().out


def test_compact_all_with_a_target_size(tmp_path, capsys):
    for name in ("one", "two"):
        _small_files_run(tmp_path, name)
    assert cli.main(["compact", "--all", "--root", str(tmp_path), "--target-rows", "25"]) == 0
    out = capsys.readouterr().out
    for name in ("one", "two"):
        assert f"{name} rank=0: " in out
        rows = [pq.read_metadata(p).num_rows for p in scenarios.live_parts(tmp_path / name)]
        assert rows == [24] * 5  # files of 4 rows, packed six to a file


def test_compact_leaves_a_rank_being_written_alone(tmp_path, capsys):
    run_path = _small_files_run(tmp_path, "done")
    live = runs.create_run(tmp_path, "live", {"tasks": ["a", "b"]})
    rec = Recorder(live, ["a", "b"], flush_every=1, compact=False)
    scenarios._record_steps(rec, range(10), ["a", "b"])
    rec.wait()
    before = sorted(os.listdir(live / schema.METRICS_DIR / "rank=0"))
    try:
        assert cli.main(["compact", "--all", "--root", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert "live rank=0: " in out and "a live process is writing it; left alone" in out
        assert sorted(os.listdir(live / schema.METRICS_DIR / "rank=0")) == before
        assert len(scenarios.live_parts(run_path)) == 1
    finally:
        rec.close()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compact"], "name the runs to compact, or pass --all"),
        (["compact", "x", "--all"], "name the runs to compact, or pass --all"),
        (["compact", "../etc"], "invalid run name '../etc'"),
        (["compact", "x", "--target-rows", "0"], "--target-rows must be >= 1"),
    ],
)
def test_compact_mistakes_are_messages(tmp_path, capsys, argv, message):
    assert cli.main(argv + ["--root", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_compact_names_a_missing_run_and_refuses_the_bundled_runs(tmp_path, capsys, monkeypatch):
    assert cli.main(["compact", "nowhere", "--root", str(tmp_path)]) == 1
    assert f"nowhere: no run directory {tmp_path / 'nowhere'}" in capsys.readouterr().err
    monkeypatch.delenv("GRADNORM_RUNS_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["compact", "--all"]) == 2
    assert "the bundled sample runs" in capsys.readouterr().err
