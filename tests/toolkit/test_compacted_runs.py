"""The analysis reads every row once at every moment of a compaction, and its caches follow the files.

A compaction writes ``part-<first>-<last>.parquet`` (temporary name, then a rename) and deletes the
originals only afterwards, so a reader finds both for a while (``schema.live_part_files``). The expected
answers are those of the same run before any compaction.
"""

from __future__ import annotations

import os
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradnorm.toolkit import analysis, schema
from gradnorm.toolkit.analysis import source
from tests.helpers.synthetic_runs import TASKS, compact, every_answer, metrics_table, part_files, write_run


def rows_and_problems(root, run_id="run"):
    row = analysis.list_runs(root).set_index("run_id").loc[run_id]
    return int(row["rows"]), row["problems"]


@pytest.fixture
def run(tmp_path):
    path = write_run(tmp_path, "run", steps=80, per_part=10)
    return path, path / schema.METRICS_DIR / "rank=0"


def test_originals_and_their_compacted_file_count_every_row_once(tmp_path, run):
    path, rank_dir = run
    expected = every_answer(tmp_path, "run")
    total = sum(pq.read_metadata(p).num_rows for p in part_files(path))
    assert rows_and_problems(tmp_path) == (total, [])

    def check(stage):
        assert rows_and_problems(tmp_path) == (total, []), stage
        assert every_answer(tmp_path, "run") == expected, stage

    compact(rank_dir, 1, 4)  # between the rename and the delete
    check("merged 1-4 beside its originals")
    for i in range(1, 5):
        (rank_dir / schema.part_file_name(i)).unlink()
    check("originals 1-4 deleted")
    compact(rank_dir, 5, 8)
    check("merged 5-8 beside its originals")
    merged = pa.concat_tables(
        [pq.read_table(rank_dir / schema.compacted_part_file_name(1, 4)), pq.read_table(rank_dir / schema.compacted_part_file_name(5, 8))]
    )
    pq.write_table(merged, rank_dir / schema.compacted_part_file_name(1, 8))
    check("a second level: 1-8 over 1-4, 5-8 and 5..8")


def test_a_partial_overlap_is_left_out_and_reported(tmp_path, run):
    path, rank_dir = run
    expected = every_answer(tmp_path, "run")
    total = sum(pq.read_metadata(p).num_rows for p in part_files(path))
    compact(rank_dir, 1, 4, delete=True)
    stray = rank_dir / schema.compacted_part_file_name(3, 6)
    pq.write_table(metrics_table(range(20, 60)), stray)
    rows, problems = rows_and_problems(tmp_path)
    assert rows == total
    (problem,) = problems
    assert str(stray) in problem and "overlap" in problem
    assert every_answer(tmp_path, "run") == expected


def test_a_damaged_compacted_file_gives_way_to_its_originals(tmp_path, run):
    path, rank_dir = run
    expected = every_answer(tmp_path, "run")
    total = sum(pq.read_metadata(p).num_rows for p in part_files(path))
    merged = compact(rank_dir, 1, 4)
    merged.write_bytes(merged.read_bytes()[:300])
    rows, problems = rows_and_problems(tmp_path)
    assert rows == total
    assert [str(merged) in p for p in problems] == [True]
    assert every_answer(tmp_path, "run") == expected
    for i in range(1, 5):  # once the originals are gone, their rows are lost, and said so
        (rank_dir / schema.part_file_name(i)).unlink()
    rows, problems = rows_and_problems(tmp_path)
    assert rows == total - 40 * len(TASKS) - 4 * len(TASKS)  # 40 training steps and 4 validation steps
    assert [str(merged) in p for p in problems] == [True]


def test_the_verdict_cache_follows_files_replaced_under_the_same_name(tmp_path, run):
    path, rank_dir = run
    total = sum(pq.read_metadata(p).num_rows for p in part_files(path))
    merged = compact(rank_dir, 1, 8, delete=True)
    assert rows_and_problems(tmp_path) == (total, [])
    stat = merged.stat()
    # Another file renamed over it, same size and mtime: the inode tells them apart.
    other = rank_dir / ".other.tmp"
    other.write_bytes(merged.read_bytes()[:-4] + b"XXXX")  # no Parquet magic at the end, same length
    os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(other, merged)
    assert merged.stat().st_size == stat.st_size and merged.stat().st_mtime_ns == stat.st_mtime_ns
    rows, problems = rows_and_problems(tmp_path)
    assert rows == 0 and [str(merged) in p for p in problems] == [True]
    # And back to a readable file of fewer rows.
    pq.write_table(metrics_table(range(0, 30)), merged)
    assert rows_and_problems(tmp_path) == (pq.read_metadata(merged).num_rows, [])


def test_files_deleted_between_the_listing_and_the_query_are_found_again(tmp_path, run):
    path, rank_dir = run
    (listed,) = source.resolve_runs(tmp_path, ["run"])  # lists part-000001..8
    compact(rank_dir, 1, 8, delete=True)  # the merge and the delete happen before DuckDB opens them
    frame = source.query([listed], "SELECT count(*) AS n, count(DISTINCT step) AS steps FROM metrics WHERE split = 'train'")
    assert (int(frame["n"].iloc[0]), int(frame["steps"].iloc[0])) == (80 * len(TASKS), 80)
    assert listed.problems == []


def test_a_reader_during_repeated_compactions_sees_every_row_once(tmp_path):
    path = write_run(tmp_path, "run", steps=256, per_part=4)
    rank_dir = path / schema.METRICS_DIR / "rank=0"
    files = [(i, i) for i in range(1, 65)]
    stop = threading.Event()
    seen: list[tuple[int, int, list[str]]] = []
    errors: list[BaseException] = []

    def read():
        while not stop.is_set():
            try:
                frame = analysis.metric_series(tmp_path, "run", "loss", max_points=100_000)
                rows, problems = rows_and_problems(tmp_path)
                seen.append((int(frame["n"].sum()), rows, problems))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        while len(files) > 1:  # merge neighbours pairwise, level by level, as a compaction does
            merged = []
            for (a, _), (_, d) in zip(files[::2], files[1::2]):
                table = pa.concat_tables(
                    [pq.read_table(rank_dir / n) for n in schema.live_part_files(os.listdir(rank_dir))[0] if a <= schema.part_file_range(n)[0] <= d]
                )
                target = rank_dir / schema.compacted_part_file_name(a, d)
                pq.write_table(table, rank_dir / ".merge.tmp")
                os.replace(rank_dir / ".merge.tmp", target)
                for name in os.listdir(rank_dir):
                    bounds = schema.part_file_range(name)
                    if bounds and a <= bounds[0] and bounds[1] <= d and name != target.name:
                        (rank_dir / name).unlink()
                merged.append((a, d))
                done = len(seen) + len(errors)
                while len(seen) + len(errors) == done and reader.is_alive():  # the reader keeps pace, so reads overlap merges
                    time.sleep(0.001)
            files = merged
    finally:
        stop.set()
        reader.join()
    assert errors == []
    assert len(seen) >= 63  # one read at least per merge
    total = 256 * len(TASKS) + 25 * len(TASKS)  # training rows, and validation rows every 10 steps
    assert all(n == 256 * len(TASKS) and rows == total and problems == [] for n, rows, problems in seen), [s for s in seen if s[0] != 256 * len(TASKS)][:3]
