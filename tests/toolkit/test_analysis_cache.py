"""The per-file partial aggregates (toolkit/analysis/partials.py) never change a figure.

A live run is queried while its recorder appends and compacts, after new parts, after its close (the final
packing replaces every file), and after a resume attempt; each time E_t[w_i], the summary's per-task
figures and the balance summary's last ratios are checked against pyarrow reading the live part files
directly (an independent computation), and against the same query with the cache off.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradnorm.toolkit import analysis, runs, schema
from gradnorm.toolkit.analysis import partials
from gradnorm.toolkit.analysis import series as series_module
from gradnorm.toolkit.recorder import Recorder
from tests.helpers import faults as scenarios

TASKS = ["a", "b", "c"]
RUN = "live"
#: Small blocks, so that a run of a few hundred steps has blocks inside batches and blocks across edges.
BLOCK = 16


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(partials, "BLOCK_STEPS", BLOCK)
    partials._cache.clear()
    yield
    partials._cache.clear()


def recorder(run_path: Path, attempt: int = 1) -> Recorder:
    # Compaction after a few files, merging pairs at once (no grace): files are replaced while queried.
    return Recorder(run_path, TASKS, flush_every=10, compact_above=3, compact_fanout=2, compact_target_rows=400, compact_grace=0.0, attempt=attempt)


def finished_run(root: Path, steps: int) -> Path:
    """A closed run of ``steps`` steps under ``root``, one part file per 50 steps, not compacted."""
    run_path = runs.create_run(root, RUN, {"tasks": TASKS, "balancer": {"name": "gradnorm"}, "mode": "balance"})
    rec = Recorder(run_path, TASKS, flush_every=50, compact=False)
    scenarios._record_steps(rec, range(0, steps), TASKS)
    rec.close()
    return run_path


def live_rows(run_path: Path) -> dict[str, np.ndarray]:
    """Train rows each (task, step) once, the latest attempt's, from the live part files (pyarrow)."""
    folder = run_path / schema.METRICS_DIR / "rank=0"
    for _ in range(50):  # the background compaction may delete a file this listing named: list again
        live, _ = schema.live_part_files(sorted(p.name for p in folder.iterdir()))
        try:
            table = pa.concat_tables([pq.read_table(folder / name) for name in live]).to_pydict()
            break
        except FileNotFoundError:
            continue
    kept: dict[tuple[str, int], dict] = {}
    for row in (dict(zip(table, values)) for values in zip(*table.values())):
        if row["split"] != schema.TRAIN:
            continue
        key = (row["task"], row["step"])
        if key not in kept or (row["attempt"] or 1) >= (kept[key]["attempt"] or 1):
            kept[key] = row
    rows = list(kept.values())
    return {name: np.array([r[name] for r in rows]) for name in ("task", "step", "weight", "balancer_weight", "loss_ratio", "present", "grad_norm")}


def expected_weights(rows: dict[str, np.ndarray]) -> tuple[int, int, dict[str, dict[str, float]]]:
    """E_t[w_i] as docs/design.md defines it: the default window, 20 batches, the halves' drift."""
    first, last = int(rows["step"].min()), int(rows["step"].max())
    start, end = first + math.ceil(0.1 * (last - first)), last
    w = np.where([b is None for b in rows["balancer_weight"]], rows["weight"], rows["balancer_weight"]).astype(float)
    present = np.array([p is None or bool(p) for p in rows["present"]])
    figures = {}
    for task in TASKS:
        mask = (rows["task"] == task) & (rows["step"] >= start) & (rows["step"] <= end) & present
        steps, values = rows["step"][mask].astype(int), w[mask]
        batch = np.minimum((steps - start) * 20 // (end - start + 1), 19)
        means = np.array([values[batch == b].mean() for b in np.unique(batch)])
        halves = [values[batch < 10].mean(), values[batch >= 10].mean()]
        figures[task] = {
            "mean": values.mean(),
            "std": values.std(ddof=1),
            "n": len(values),
            "stderr": means.std(ddof=1) / math.sqrt(len(means)),
            "half_drift": abs(halves[1] - halves[0]) / abs(values.mean()),
        }
    return start, end, figures


def check_against_files(root: Path, run_path: Path) -> None:
    rows = live_rows(run_path)
    start, end, figures = expected_weights(rows)
    average = analysis.weight_average(root, RUN)
    assert (average.start_step, average.end_step) == (start, end)
    table = average.table.set_index("task")
    for task, want in figures.items():
        assert int(table.loc[task, "n"]) == want["n"]
        for column in ("mean", "stderr", "half_drift"):
            assert table.loc[task, column] == pytest.approx(want[column], rel=1e-9, abs=1e-14), (task, column)
        assert table.loc[task, "std"] == pytest.approx(want["std"], rel=1e-6)
    # The summary's per-task figures over the same window, and the last loss ratio of each task.
    summary = analysis.summary(root, RUN).set_index("task")
    tail = end - int(0.05 * (end - start))
    for task in TASKS:
        inside = (rows["task"] == task) & (rows["step"] >= start) & (rows["step"] <= end)
        assert summary.loc[task, "applied_weight_mean"] == pytest.approx(rows["weight"][inside].astype(float).mean(), rel=1e-9)
        ratios = rows["loss_ratio"][inside & (rows["step"] >= tail)].astype(float)
        assert summary.loc[task, "final_loss_ratio"] == pytest.approx(ratios.mean(), rel=1e-9)
    last = analysis.balance_summary(root, RUN)["final_loss_ratio"]
    for task in TASKS:
        mine = rows["task"] == task
        assert last[task] == pytest.approx(float(rows["loss_ratio"][mine][np.argmax(rows["step"][mine])]), rel=1e-12)
    # The balance summary's spreads over the first and last tenth of 20 buckets (the cache reads only those).
    calls = []
    real = series_module._balance
    series_module._balance = lambda runs, points, only=None: calls.append(only) or real(runs, points, only)
    try:
        figures = analysis.balance_summary(root, RUN, buckets=20)
    finally:
        series_module._balance = real
    if partials.usable(analysis.catalog.load_run_files(root, RUN)) and (rows["step"].max() - rows["step"].min()) / 20 > 2 * BLOCK:
        assert calls[0] is not None  # buckets wider than blocks: only the two ends' buckets were queried
    steps = rows["step"].astype(float)
    low, high = steps.min(), steps.max()  # (the run has no validation rows: the x range is the training steps')
    bucket = np.minimum(np.floor((steps - low) / (high - low) * 20), 19)
    filled = np.unique(bucket)
    assert figures["buckets"] == len(filled)
    count = max(1, round(0.1 * len(filled)))
    for name, column in (("grad_norm_cv", "grad_norm"), ("loss_ratio_cv", "loss_ratio")):
        spreads = []
        for b in filled:
            means = np.array([rows[column][(bucket == b) & (rows["task"] == t)].astype(float).mean() for t in TASKS])
            spreads.append(means.std() / means.mean())
        assert figures[f"{name}_start"] == pytest.approx(np.mean(spreads[:count]), rel=1e-9)
        assert figures[f"{name}_end"] == pytest.approx(np.mean(spreads[-count:]), rel=1e-9)
    # And the same figures with the cache off (the plain queries over every file).
    partials.ENABLED = False
    try:
        plain = analysis.weight_average(root, RUN).table
    finally:
        partials.ENABLED = True
    assert plain["n"].tolist() == average.table["n"].tolist()
    np.testing.assert_allclose(plain["mean"], average.table["mean"], rtol=1e-12)
    np.testing.assert_allclose(plain["stderr"], average.table["stderr"], rtol=1e-9)


def test_live_queries_after_new_parts_compaction_close_and_a_resume_equal_the_files(tmp_path):
    run_path = runs.create_run(tmp_path, RUN, {"tasks": TASKS, "balancer": {"name": "gradnorm"}, "mode": "balance"})
    rec = recorder(run_path)
    scenarios._record_steps(rec, range(0, 300), TASKS)
    rec.wait()
    check_against_files(tmp_path, run_path)
    cached = {key for key in partials._cache if key[1] == partials.WEIGHTS.name}
    assert cached, "the cache was not used"

    # New parts (and the background compaction merging the small ones): only the new files are scanned.
    scenarios._record_steps(rec, range(300, 650), TASKS)
    rec.wait()
    check_against_files(tmp_path, run_path)
    assert partials._cache.keys() - cached, "the new files were not added to the cache"

    # The close packs the files again: every file is new (new names, new inodes).
    rec.close()
    check_against_files(tmp_path, run_path)

    # A second process resumes from the checkpoint at step 500: its rows from 500 on supersede the first's.
    path, attempt = runs.resume_run(tmp_path, RUN, 500, {})
    assert attempt == 2
    again = recorder(path, attempt=attempt)
    scenarios._record_steps(again, range(500, 700), TASKS)
    again.wait()
    assert not partials.usable(analysis.catalog.load_run_files(tmp_path, RUN))  # resumed: the plain queries answer
    check_against_files(tmp_path, run_path)
    again.close()


def test_a_file_replaced_under_the_same_name_is_a_new_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(partials, "FILES_PER_SCAN", 2)  # the files of one layout share a scan (file-name column)
    run_path = finished_run(tmp_path, 200)
    before = analysis.weight_average(tmp_path, RUN).table.set_index("task")["mean"]
    # Rewrite one file with every weight doubled, under its own name (a new inode, as a copy tool leaves it).
    [first, *_] = sorted((run_path / schema.METRICS_DIR / "rank=0").glob("part-*.parquet"))
    table = pq.read_table(first)
    for name in ("weight", "balancer_weight"):
        table = table.set_column(table.schema.get_field_index(name), name, pa.compute.multiply(table[name], 2.0))
    replacement = first.with_name(".replacement")
    pq.write_table(table, replacement)
    replacement.replace(first)
    check_against_files(tmp_path, run_path)
    assert (analysis.weight_average(tmp_path, RUN).table.set_index("task")["mean"] != before).all()


def test_a_run_without_validation_rows_gives_the_empty_overfitting_table_and_one_with_them_does_not(tmp_path):
    run_path = runs.create_run(tmp_path, RUN, {"tasks": TASKS, "balancer": {"name": "gradnorm"}, "mode": "balance"})
    rec = Recorder(run_path, TASKS, flush_every=20)
    scenarios._record_steps(rec, range(0, 100), TASKS)
    rec.wait()
    assert analysis.overfitting(tmp_path, RUN).empty
    rec.record_validation(99, {task: 0.5 for task in TASKS})
    scenarios._record_steps(rec, range(100, 120), TASKS)
    rec.close()
    frame = analysis.overfitting(tmp_path, RUN)
    assert sorted(frame["task"]) == TASKS and (frame["val_loss"] == 0.5).all()


def test_a_damaged_data_page_behind_an_intact_footer_is_left_out_by_the_cached_queries_too(tmp_path):
    run_path = runs.create_run(tmp_path, RUN, {"tasks": TASKS, "balancer": {"name": "gradnorm"}, "mode": "balance"})
    rec = Recorder(run_path, TASKS, flush_every=40, compact=False)
    scenarios._record_steps(rec, range(0, 200), TASKS)
    rec.close()
    parts = sorted((run_path / schema.METRICS_DIR / "rank=0").glob("part-*.parquet"))
    data = bytearray(parts[2].read_bytes())
    for i in range(8, len(data) // 2):  # the column chunks scribbled over, the footer kept: only reading fails
        data[i] = 0xAB
    parts[2].write_bytes(bytes(data))
    average = analysis.weight_average(tmp_path, RUN)
    assert any(str(parts[2]) in p for p in analysis.problems(tmp_path))
    # Asked again, the damaged file is known and the cached path answers over the others: the same figures.
    again = analysis.weight_average(tmp_path, RUN)
    assert again.table["n"].tolist() == average.table["n"].tolist()
    np.testing.assert_allclose(again.table["mean"], average.table["mean"], rtol=1e-12)
    parts[2].unlink()  # the intact files alone, read by pyarrow
    check_against_files(tmp_path, run_path)
    assert (average.start_step, average.end_step) == (analysis.weight_average(tmp_path, RUN).start_step, analysis.weight_average(tmp_path, RUN).end_step)
    np.testing.assert_allclose(analysis.weight_average(tmp_path, RUN).table["mean"], average.table["mean"], rtol=1e-12)


def test_in_background_mode_a_cold_call_answers_with_the_plain_query_and_the_next_one_from_the_sums(tmp_path, monkeypatch):
    # The app's mode: a call that meets more unsummed rows than SYNC_FILL_ROWS answers without the cache
    # and the files are summed on the background thread; a call after that is answered from the sums.
    monkeypatch.setattr(partials, "SYNC_FILL_ROWS", 100)
    monkeypatch.setattr(partials, "_background", False)
    run_path = finished_run(tmp_path, 400)
    computed: list[tuple[int, str]] = []
    real_compute = partials._compute

    def counting_compute(parts, family, cursor=None):
        computed.append((len(parts), threading.current_thread().name))
        return real_compute(parts, family, cursor)

    monkeypatch.setattr(partials, "_compute", counting_compute)
    partials.fill_in_background(True)
    try:
        cold = analysis.weight_average(tmp_path, RUN).table
        cold_summary = analysis.summary(tmp_path, RUN)
        assert partials.wait_for_background(60)
        # Summed once, on the background thread, though two calls met the files unsummed.
        assert [name.startswith("gradnorm-partials") for _, name in computed] == [True]
        assert computed[0][0] == len(list((run_path / schema.METRICS_DIR / "rank=0").glob("part-*.parquet")))
        computed.clear()
        warm = analysis.weight_average(tmp_path, RUN).table
        warm_summary = analysis.summary(tmp_path, RUN)
        assert computed == []  # answered from the sums
    finally:
        partials.fill_in_background(False)
    assert warm["n"].tolist() == cold["n"].tolist()
    np.testing.assert_allclose(warm["mean"], cold["mean"], rtol=1e-12)
    np.testing.assert_allclose(warm_summary["applied_weight_mean"], cold_summary["applied_weight_mean"], rtol=1e-12)
    check_against_files(tmp_path, run_path)  # and both equal pyarrow's reading of the files


def test_the_background_summing_waits_until_the_readers_own_queries_have_been_idle(tmp_path, monkeypatch):
    # A page's first view queries in a burst: the summing its first call queued must not take the cores
    # from the queries after it, so it starts only once no query has run for BACKGROUND_QUIET_SECONDS.
    from gradnorm.toolkit.analysis import source

    monkeypatch.setattr(partials, "SYNC_FILL_ROWS", 100)
    monkeypatch.setattr(partials, "BACKGROUND_QUIET_SECONDS", 0.3)
    monkeypatch.setattr(partials, "_background", False)
    finished_run(tmp_path, 400)
    started: list[float] = []
    real_compute = partials._compute

    def noting_compute(parts, family, cursor=None):
        if threading.current_thread().name.startswith("gradnorm-partials"):
            started.append(time.monotonic())
        return real_compute(parts, family, cursor)

    monkeypatch.setattr(partials, "_compute", noting_compute)
    partials.fill_in_background(True)
    try:
        with source.reading():  # a page still being drawn
            analysis.weight_average(tmp_path, RUN)  # queues the summing, answers with the plain query
            time.sleep(1.0)
            assert started == []  # not while a query runs
            ended = time.monotonic()
        assert partials.wait_for_background(60)
    finally:
        partials.fill_in_background(False)
    assert len(started) == 1 and started[0] >= ended + 0.3 - 0.05


def test_without_background_mode_the_first_call_sums_the_files_itself(tmp_path, monkeypatch):
    monkeypatch.setattr(partials, "SYNC_FILL_ROWS", 100)
    finished_run(tmp_path, 200)
    monkeypatch.setattr(partials, "_background", False)  # a one-shot command's default (the app's pages, run earlier in this process, turn it on)
    analysis.weight_average(tmp_path, RUN)
    assert any(key[1] == partials.WEIGHTS.name for key in partials._cache)


def test_a_merged_files_sums_come_from_the_files_it_replaced_and_equal_a_scan_of_it(tmp_path, monkeypatch):
    # A live run is compacted while it is read: each merged file the reader has not seen is summed from the
    # cached sums of the files it replaced (no scan), and those sums equal a scan of the merged file.
    run_path = runs.create_run(tmp_path, RUN, {"tasks": TASKS, "balancer": {"name": "gradnorm"}, "mode": "balance"})
    rec = recorder(run_path)
    composed: list[tuple[object, pd.DataFrame]] = []
    real = partials._composed

    def watching(part, family, cached):
        frame = real(part, family, cached)
        if frame is not None:
            composed.append((part, frame))
        return frame

    monkeypatch.setattr(partials, "_composed", watching)
    step = 0
    for _ in range(12):
        scenarios._record_steps(rec, range(step, step + 40), TASKS)
        step += 40
        rec.wait()
        check_against_files(tmp_path, run_path)
    rec.close()
    check_against_files(tmp_path, run_path)
    assert len(composed) >= 3, "no merged file was summed from its originals"
    keys = ["split", "task", "block"]
    compared: list[object] = []
    for part, frame in composed:
        if not Path(part.path).exists():
            continue  # merged again since, and deleted
        compared.append(part)
        (scanned,) = partials._compute([part], partials.ALL).values()
        mine, theirs = frame.sort_values(keys).reset_index(drop=True), scanned.sort_values(keys).reset_index(drop=True)
        assert mine[keys].equals(theirs[keys])
        for column in mine.columns.difference(keys):
            np.testing.assert_allclose(mine[column].to_numpy(dtype=float), theirs[column].to_numpy(dtype=float), rtol=1e-12, equal_nan=True, err_msg=column)
    assert compared, "every merged file was merged again: nothing compared"
