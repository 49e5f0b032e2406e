"""Long runs: the writer's backlog is bounded, part files are compact and encoded deliberately, and
compaction keeps every row exactly once at every moment.

Expected rows come from pyarrow reading the files that ``schema.live_part_files`` names, never from the
recorder's own counters alone.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradnorm.toolkit import analysis, runs, schema
from gradnorm.toolkit import recorder as recorder_module
from gradnorm.toolkit.recorder import PartFile, Recorder, compact_part_directory, compact_run, plan_merges
from tests.helpers import faults as scenarios
from tests.helpers import waiting

TASKS = ["a", "b", "c"]
DEFINED = frozenset(schema.RECORDED_FIELDS) - {"step_update_skipped"}


def _run(root: Path, name: str, tasks=TASKS) -> Path:
    return runs.create_run(root, name, {"tasks": list(tasks), "balancer": {"name": "synthetic"}, "mode": "balance"})


def _matrix(step: int, tasks: int = len(TASKS)) -> torch.Tensor:
    """Column ``loss`` carries the step, ``weight`` the task index: each row says where it belongs."""
    matrix = torch.full((tasks, len(schema.RECORDED_FIELDS)), 0.5, dtype=torch.float64)
    matrix[:, schema.RECORDED_FIELDS.index("loss")] = step
    matrix[:, schema.RECORDED_FIELDS.index("weight")] = torch.arange(tasks, dtype=torch.float64)
    return matrix


def _record(rec: Recorder, steps, tasks: int = len(TASKS)) -> None:
    for step in steps:
        rec.record(step, _matrix(step, tasks), DEFINED)


def _rank_dir(run_path: Path) -> Path:
    return run_path / schema.METRICS_DIR / schema.rank_dir_name(0)


def _assert_exactly_once(run_path: Path, steps: int, tasks: int = len(TASKS)) -> None:
    figures = scenarios.check_read_back(run_path, tasks)
    assert figures["steps_read_back"] == steps and figures["rows_read_back"] == steps * tasks, figures
    assert figures["steps_contiguous"] and figures["each_step_once"] and figures["values_match_steps"], figures


class SlowWrites:
    """Part-file writes that take ``delay`` seconds each (a slow disk)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.real = recorder_module.pq.write_table

    def __call__(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.real(*args, **kwargs)


# -- the backlog --------------------------------------------------------------------------------------
def test_a_slow_writer_makes_training_wait_instead_of_queueing_without_bound(tmp_path, monkeypatch):
    run_path = _run(tmp_path, "slow")
    monkeypatch.setattr(recorder_module.pq, "write_table", SlowWrites(0.02))
    rec = Recorder(run_path, TASKS, flush_every=5, compact=False)
    largest = 0
    for step in range(200):
        rec.record(step, _matrix(step), DEFINED)
        with rec._backlog:
            largest = max(largest, rec._backlog_steps)
            # What a SIGKILL now would lose: the device buffer plus the backlog.
            assert rec._filled + rec._backlog_steps <= rec.loss_bound_steps
    rec.close()
    assert largest <= rec.max_backlog_steps == 5
    assert rec.backlog_waits > 10 and rec.backlog_wait_seconds > 0.1
    meta = runs.read_run_json(run_path)
    assert meta["backlog_waits"] == rec.backlog_waits and meta["backlog_wait_seconds"] > 0.1
    assert meta["recorder"]["loss_bound_steps"] == 10 and meta["recorder"]["max_backlog_steps"] == 5
    _assert_exactly_once(run_path, 200)


def test_a_larger_backlog_is_coalesced_into_fewer_files(tmp_path, monkeypatch):
    run_path = _run(tmp_path, "coalesced")
    monkeypatch.setattr(recorder_module.pq, "write_table", SlowWrites(0.02))
    rec = Recorder(run_path, TASKS, flush_every=5, max_backlog_steps=50, compact=False)
    _record(rec, range(400))
    rec.close()
    meta = runs.read_run_json(run_path)
    assert meta["batches_coalesced"] > 0
    assert meta["part_files_written"] + meta["batches_coalesced"] == 400 // 5
    assert len(scenarios.live_parts(run_path)) == meta["part_files_written"] < 80
    assert meta["recorder"]["loss_bound_steps"] == 55
    _assert_exactly_once(run_path, 400)


def test_the_byte_bound_holds_too(tmp_path, monkeypatch):
    run_path = _run(tmp_path, "bytes")
    monkeypatch.setattr(recorder_module.pq, "write_table", SlowWrites(0.01))
    rec = Recorder(run_path, TASKS, flush_every=4, max_backlog_steps=1000, max_backlog_bytes=2000, compact=False)
    batch_bytes = recorder_module._Batch([0] * 4, [None] * 4, [0.0] * 4, torch.zeros(4, 3, 9, dtype=torch.float64), DEFINED).num_bytes()
    for step in range(120):
        rec.record(step, _matrix(step), DEFINED)
        with rec._backlog:
            # One batch always fits; beyond it the bytes bound applies.
            assert rec._backlog_bytes <= max(2000, batch_bytes)
    rec.close()
    assert rec.backlog_waits > 0
    _assert_exactly_once(run_path, 120)


def test_backlog_arguments_are_checked(tmp_path):
    run_path = _run(tmp_path, "args")
    with pytest.raises(ValueError, match=r"max_backlog_steps must be >= flush_every \(10\), got 5"):
        Recorder(run_path, TASKS, flush_every=10, max_backlog_steps=5)
    with pytest.raises(ValueError, match=r"max_backlog_bytes must be >= 1"):
        Recorder(run_path, TASKS, max_backlog_bytes=0)
    with pytest.raises(ValueError, match=r"compaction needs"):
        Recorder(run_path, TASKS, compact_fanout=1)


def test_failed_writes_never_block_training(tmp_path):
    """A full disk keeps batches pending (bounded by max_pending_rows), outside the backlog."""
    run_path = _run(tmp_path, "failing")
    injector = scenarios.FailingWrites()
    restore = injector.install()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rec = Recorder(run_path, TASKS, flush_every=5, compact=False)
            injector.failing = True
            # training goes on while every write fails: the 300 steps are recorded before the disk recovers
            # (a generous deadline, so that only a training thread that waits for the disk fails, not a slow machine)
            training = threading.Thread(target=_record, args=(rec, range(300)), daemon=True)
            training.start()
            training.join(waiting.PATIENCE)
            assert not training.is_alive(), f"recording still blocked after {waiting.PATIENCE:g} s of failing writes"
            injector.failing = False
            rec.close()
    finally:
        restore()
    _assert_exactly_once(run_path, 300)
    assert runs.read_run_json(run_path)["rows_lost"] == 0


# -- what a row costs -----------------------------------------------------------------------------------
def test_part_files_use_the_chosen_encodings_and_keep_the_schema(tmp_path):
    run_path = _run(tmp_path, "encoded")
    rec = Recorder(run_path, TASKS, flush_every=50)
    _record(rec, range(100))
    rec.record_validation(99, {"a": 1.5})
    rec.close()
    [first, *_] = scenarios.live_parts(run_path)
    metadata = pq.read_metadata(first)
    assert metadata.schema.to_arrow_schema().remove_metadata().equals(schema.METRICS_SCHEMA)
    group = metadata.row_group(0)
    encodings = {group.column(i).path_in_schema: set(group.column(i).encodings) for i in range(group.num_columns)}
    assert {group.column(i).compression for i in range(group.num_columns)} == {"ZSTD"}
    for name in ("loss", "weight", "wall_time", "step_grad_loss"):
        assert "BYTE_STREAM_SPLIT" in encodings[name], (name, encodings[name])
    assert "DELTA_BINARY_PACKED" in encodings["step"]
    assert "RLE_DICTIONARY" in encodings["task"] and "RLE_DICTIONARY" in encodings["split"]
    # The values are the recorded ones, bit for bit (float64 kept).
    table = scenarios.read_back(run_path)
    train = table.filter(pa.compute.equal(table["split"], "train"))
    assert train["loss"].to_pylist() == [float(s) for s in range(100) for _ in TASKS]
    assert table.filter(pa.compute.equal(table["split"], "val"))["loss"].to_pylist() == [1.5]


def test_float32_values_cost_about_half_of_float64_ones(tmp_path):
    """Byte-stream-split: a float32 value stored as float64 leaves four zero bytes that compress away."""
    sizes = {}
    for dtype in (torch.float32, torch.float64):
        run_path = _run(tmp_path, f"width-{str(dtype)[6:]}", tasks=[f"t{i}" for i in range(10)])
        rec = Recorder(run_path, [f"t{i}" for i in range(10)], flush_every=1000, compact=False)
        generator = torch.Generator().manual_seed(0)
        for step in range(2000):
            rec.record(step, torch.rand(10, len(schema.RECORDED_FIELDS), generator=generator, dtype=torch.float64).to(dtype), DEFINED)
        rec.close()
        sizes[dtype] = sum(p.stat().st_size for p in scenarios.live_parts(run_path)) / 20_000
    assert sizes[torch.float32] < 0.6 * sizes[torch.float64]
    assert sizes[torch.float64] < 75  # 7 random float64 metrics and one per step: about 64 bytes of entropy


# -- compaction -------------------------------------------------------------------------------------
def test_a_run_is_compacted_in_the_background_and_at_close_and_reads_the_same(tmp_path):
    run_path = _run(tmp_path, "compacted")
    rec = Recorder(run_path, TASKS, flush_every=2, compact_above=8, compact_fanout=4, compact_target_rows=120, compact_grace=0.0)
    _record(rec, range(400))
    rec.wait()
    waiting.wait_until(lambda: rec.compactions > 0, "a background compaction")  # in the background, while the run is open
    _assert_exactly_once(run_path, 400)
    rec.close()
    meta = runs.read_run_json(run_path)
    live = scenarios.live_parts(run_path)
    rows = [pq.read_metadata(p).num_rows for p in live]
    # Packed at close into files of up to 120 rows (greedily: two neighbours together hold more than 120).
    assert sum(rows) == 1200 and all(r <= 120 for r in rows) and len(live) <= 2 * 1200 // 120 + 1
    assert all(a + b > 120 for a, b in zip(rows, rows[1:]))
    assert sorted(os.listdir(_rank_dir(run_path))) == sorted([p.name for p in live] + [runs.WriterLock.FILE_NAME])
    assert meta["compactions"] == rec.compactions and meta["files_compacted"] == rec.files_compacted
    assert meta["recorder"]["compaction"]["above_files"] == 8
    _assert_exactly_once(run_path, 400)
    # The analysis reads the compacted layout (no covered file is left for it to count twice).
    assert analysis.list_runs(tmp_path).set_index("run_id").loc["compacted", "rows"] == 1200
    frame = analysis.metric_series(tmp_path, "compacted", "loss", max_points=100_000)
    assert int(frame.n.sum()) == 1200


def test_a_reader_sees_every_row_once_at_every_moment_of_a_live_compaction(tmp_path):
    run_path = _run(tmp_path, "watched")
    rec = Recorder(run_path, TASKS, flush_every=1, compact_above=6, compact_fanout=3, compact_target_rows=60, compact_grace=0.0)
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def read_forever():
        while not stop.is_set():
            try:
                figures = scenarios.check_read_back(run_path, len(TASKS))
                assert figures["steps_contiguous"] and figures["each_step_once"] and figures["values_match_steps"], figures
                seen.append(figures["steps_read_back"])
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    reader = threading.Thread(target=read_forever)
    reader.start()
    try:
        for start in range(0, 300, 50):
            _record(rec, range(start, start + 50))
            # the next 50 steps once the reader has read once more, so reads overlap the writes and the
            # compactions however the threads are scheduled
            waiting.at_least(lambda: len(seen) + len(errors), start // 50 + 1, "the reader's next read", alive=reader.is_alive)
        rec.close()
    finally:
        stop.set()
        reader.join()
    assert errors == []
    assert len(seen) > 5 and seen == sorted(seen)
    assert rec.compactions > 0
    _assert_exactly_once(run_path, 300)


def test_small_runs_are_left_as_written(tmp_path):
    run_path = _run(tmp_path, "small")
    rec = Recorder(run_path, TASKS, flush_every=1)
    _record(rec, range(150))
    rec.close()
    assert len(scenarios.live_parts(run_path)) == 150 and rec.compactions == 0


def test_a_new_part_after_compaction_is_numbered_above_every_covered_one(tmp_path):
    figures = scenarios.kill_scenario(tmp_path, flush_every=5, min_parts=6)
    run_path = tmp_path / "killed-run"
    outcome = compact_run(run_path)
    [live] = schema.live_part_files(os.listdir(_rank_dir(run_path)))[0]
    first, last = schema.part_file_range(live)
    assert first == 1 and last >= 6 and isinstance(outcome["rank=0"], recorder_module.CompactionResult)
    # The interrupted run is still "running": a new writer may append to it, numbered after the merged range.
    rec = Recorder(run_path, ["a", "b"], flush_every=5)
    start = figures["steps_read_back"]
    _record(rec, range(start, start + 10), tasks=2)
    rec.close()
    names = sorted(schema.live_part_files(os.listdir(_rank_dir(run_path)))[0])
    # (two flushes: two files, or one when the writer coalesced them)
    assert names[0] == live and [schema.part_file_range(n) for n in names[1:]] in ([(last + 1, last + 1), (last + 2, last + 2)], [(last + 1, last + 1)])
    steps = sorted(set(scenarios.read_back(run_path)["step"].to_pylist()))
    assert steps == list(range(start + 10))


def test_last_sequence_reads_compacted_names(tmp_path):
    for name in ["part-000001-000040.parquet", "part-000041.parquet", "part-000003.parquet", ".part-000001-000099.parquet.tmp", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert recorder_module._last_sequence(tmp_path) == 41
    (tmp_path / "part-000042-000050.parquet").write_bytes(b"")
    assert recorder_module._last_sequence(tmp_path) == 50


def test_compaction_keeps_damaged_and_foreign_files_out_and_in_place(tmp_path):
    run_path = _run(tmp_path, "mixed")
    rec = Recorder(run_path, TASKS, flush_every=2, compact=False)
    _record(rec, range(40))
    rec.close()
    parts = scenarios.live_parts(run_path)
    damaged, foreign = parts[5], parts[12]
    cut = damaged.read_bytes()[:50]
    damaged.write_bytes(cut)
    table = pq.read_table(foreign)
    pq.write_table(table.append_column("extra", pa.array([1] * table.num_rows)), foreign)
    outcome = compact_run(run_path)["rank=0"]
    assert not isinstance(outcome, str)
    assert any(str(damaged) in line for line in outcome.left_out) and any(str(foreign) in line for line in outcome.left_out)
    names = sorted(schema.live_part_files(os.listdir(_rank_dir(run_path)))[0])
    assert damaged.name in names and foreign.name in names and len(names) == 5  # 1-5, 6, 7-12, 13, 14-20
    assert damaged.read_bytes() == cut
    merged = [n for n in names if n not in (damaged.name, foreign.name)]
    assert [schema.part_file_range(n) for n in merged] == [(1, 5), (7, 12), (14, 20)]
    for name in merged:
        assert pq.read_metadata(_rank_dir(run_path) / name).schema.to_arrow_schema().remove_metadata().equals(schema.METRICS_SCHEMA)


def test_compaction_never_touches_a_rank_a_live_process_writes(tmp_path):
    run_path = _run(tmp_path, "held")
    rec = Recorder(run_path, TASKS, flush_every=1, compact=False)
    _record(rec, range(30))
    rec.wait()
    before = sorted(os.listdir(_rank_dir(run_path)))
    outcome = compact_run(run_path)
    assert isinstance(outcome["rank=0"], str) and "a live process is writing it" in outcome["rank=0"]
    assert sorted(os.listdir(_rank_dir(run_path))) == before
    rec.close()
    assert len(compact_run(run_path)["rank=0"].merged) == 1  # type: ignore[union-attr]
    _assert_exactly_once(run_path, 30)


def test_merged_files_have_large_row_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(recorder_module, "ROW_GROUP_ROWS", 64)
    run_path = _run(tmp_path, "groups")
    rec = Recorder(run_path, TASKS, flush_every=7, compact=False)
    _record(rec, range(100))
    rec.close()
    compact_run(run_path)
    [merged] = scenarios.live_parts(run_path)
    metadata = pq.read_metadata(merged)
    assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [64, 64, 64, 64, 44]
    _assert_exactly_once(run_path, 100)


# -- the merge plan ---------------------------------------------------------------------------------
def _parts(rows: list[int], mergeable: list[bool] | None = None) -> list[PartFile]:
    flags = mergeable or [True] * len(rows)
    return [PartFile(schema.part_file_name(i + 1), i + 1, i + 1, r, m) for i, (r, m) in enumerate(zip(rows, flags))]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 400), min_size=0, max_size=60),
    st.lists(st.integers(0, 59), max_size=4),
    st.integers(50, 1000),
    st.integers(2, 6),
    st.booleans(),
)
def test_merge_groups_are_adjacent_whole_ranges_of_mergeable_small_files(files, broken, target_rows, fanout, final):
    mergeable = [i not in broken for i in range(len(files))]
    live = _parts(files, mergeable)
    groups = plan_merges(live, target_rows=target_rows, fanout=fanout, final=final)
    used = list(itertools.chain.from_iterable(groups))
    assert len(used) == len(set(p.name for p in used))  # no file in two groups
    for group in groups:
        assert len(group) >= 2
        assert all(p.mergeable and p.rows < target_rows for p in group)
        assert sum(p.rows for p in group) <= target_rows or len(group) == 1
        indices = [live.index(p) for p in group]
        assert indices == list(range(indices[0], indices[0] + len(group)))  # adjacent: the range holds nothing else
    if final:
        # Packed: two adjacent small files that fit together are never both left alone.
        for a, b in zip(live, live[1:]):
            if a.mergeable and b.mergeable and a.rows + b.rows <= target_rows and a.rows < target_rows and b.rows < target_rows:
                assert a in used or b in used


def test_background_merges_take_fanout_files_of_one_size_class():
    live = _parts([1000] * 25 + [10_000] * 3 + [1000] * 4)
    groups = plan_merges(live, target_rows=1_000_000, fanout=10, final=False)
    assert [len(g) for g in groups] == [10, 10]
    assert groups[0][0].name == schema.part_file_name(1) and groups[1][-1].name == schema.part_file_name(20)
    # Nothing of one class to merge: pack rather than leave too many files.
    assert [len(g) for g in plan_merges(_parts([5, 50, 500, 5000]), target_rows=1_000_000, fanout=10, final=False)] == [4]


def test_rows_are_rewritten_a_few_times_not_once_per_pass(tmp_path):
    """Size-tiered: 600 files of 10 rows, compacted whenever more than 20 are live, fanout 3."""
    directory = tmp_path / "rank=0"
    directory.mkdir()
    footers: dict[str, PartFile] = {}
    rewritten = 0
    table = pa.Table.from_pylist([{"step": i, "wall_time": 0.0, "split": "train", "task": "a"} for i in range(10)], schema=schema.METRICS_SCHEMA)
    most_live = live = 0
    for sequence in range(1, 601):
        pq.write_table(table, directory / schema.part_file_name(sequence))
        live += 1
        most_live = max(most_live, live)
        if live > 20:  # as the recorder does: compact once a write takes the rank past the threshold
            result = compact_part_directory(directory, final=False, above=20, target_rows=100_000, fanout=3, footers=footers)
            rewritten += result.rows_merged
            live = result.live_files
            assert live == len(schema.live_part_files(os.listdir(directory))[0]) <= 20
    assert most_live == 21
    assert rewritten / 6_000 < 5.8  # log_3(6,000 / 10) is about 5.8 size classes
    steps = np.concatenate([pq.read_table(directory / n)["step"].to_numpy() for n in schema.live_part_files(os.listdir(directory))[0]])
    assert np.array_equal(np.bincount(steps), np.full(10, 600))
