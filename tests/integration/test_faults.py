"""Faults lose nothing but the unflushed tail (at most ``loss_bound_steps`` recorded steps), and explain themselves.

The scenarios live in ``benchmarks/reliability_figures.py`` (which also writes their figures to
``benchmarks/results/reliability.md``); here they run again and every figure is checked against what
the part files independently read back with pyarrow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch
from torch import nn

from gradnorm import hooks
from gradnorm.toolkit import runs, schema
from gradnorm.toolkit.balancers import EqualWeights, GradNorm
from gradnorm.toolkit.recorder import Recorder
from tests.helpers import faults as scenarios
from tests.helpers import waiting


def _two_task_model(seed: int = 0):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12))
    heads = nn.ModuleList([nn.Linear(12, 1) for _ in range(2)])
    return trunk, heads


def _losses(trunk, heads):
    h = trunk(torch.randn(16, 6))
    return {"a": heads[0](h).pow(2).mean() + 1.0, "b": (heads[1](h) - 2).pow(2).mean() + 1.0}


# -- SIGKILL -------------------------------------------------------------------------------------------
def test_sigkill_keeps_every_flushed_batch_and_reads_as_interrupted_once_stale(tmp_path):
    figures = scenarios.kill_scenario(tmp_path, flush_every=10, min_parts=4)
    assert figures["return_code"] == -9
    # Every flushed batch reads back, in order, with no gap; only the unflushed tail is missing.
    assert figures["steps_read_back"] >= 4 * 10
    assert figures["steps_read_back"] % 10 == 0
    assert figures["steps_contiguous"]
    assert figures["rows_read_back"] == figures["steps_read_back"] * figures["rows_per_step"]
    # Everything the writer had confirmed before the kill is there; what is missing never reached the disk.
    # (How many the child had seen confirmed depends on scheduling: the writer thread can land several
    # part files before the training thread prints again, so no lower bound is asserted on it.)
    assert figures["steps_read_back"] >= figures["steps_confirmed_written"] >= 0
    assert 0 <= figures["steps_lost"] == figures["steps_done"] - figures["steps_read_back"]
    # run.json cannot know about the kill; the heartbeat rule tells.
    assert figures["status_in_run_json"] == runs.RUNNING
    assert figures["status_while_fresh"] == runs.RUNNING
    assert figures["status_once_stale"] == runs.INTERRUPTED
    # The dead writer's lock went with it: the run can be inspected and is not wedged.
    lock = runs.WriterLock(tmp_path / "killed-run" / schema.METRICS_DIR / "rank=0")
    lock.acquire()
    lock.release()


# -- exceptions in the user's loop --------------------------------------------------------------------
def test_exception_in_the_loop_marks_the_run_failed_and_writes_every_buffered_row(tmp_path):
    trunk, heads = _two_task_model()
    with pytest.raises(RuntimeError, match="user bug"):
        with hooks.attach(trunk[-1], GradNorm(alpha=0.5), runs_root=tmp_path, run_name="boom", flush_every=10) as session:
            for step in range(25):
                session.loss(_losses(trunk, heads)).backward()
                if step == 24:
                    session.log_validation({"a": 0.5, "b": 0.25})
                    raise RuntimeError("user bug")
    meta = runs.read_run_json(tmp_path / "boom")
    assert meta["status"] == runs.FAILED
    table = scenarios.read_back(tmp_path / "boom")
    train_steps = [s for s, split in zip(table.column("step").to_pylist(), table.column("split").to_pylist()) if split == "train"]
    assert sorted(set(train_steps)) == list(range(25))  # the 5 unflushed steps were written at the failure
    assert table.num_rows == 25 * 2 + 2
    assert meta["rows_written"] == table.num_rows and meta["rows_lost"] == 0


UNCAUGHT_CHILD = r"""
import sys, torch
from torch import nn
from gradnorm import hooks
from gradnorm.toolkit.balancers import GradNorm
torch.manual_seed(0)
trunk = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(2)])
session = hooks.attach(trunk[-1], GradNorm(alpha=0.5), runs_root=sys.argv[1], run_name="uncaught", flush_every=10)
for step in range(17):
    h = trunk(torch.randn(8, 4))
    session.loss({"a": heads[0](h).pow(2).mean() + 1, "b": heads[1](h).pow(2).mean() + 1}).backward()
raise KeyError("no close, no with: the process dies of an uncaught exception")
"""


@pytest.mark.parametrize("error, status", [("KeyError('bug')", runs.FAILED), ("KeyboardInterrupt()", runs.INTERRUPTED)])
def test_uncaught_exception_without_close_still_writes_everything(tmp_path, error, status):
    env = dict(os.environ)
    child = UNCAUGHT_CHILD.replace('KeyError("no close, no with: the process dies of an uncaught exception")', error)
    done = subprocess.run([sys.executable, "-c", child, str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0 and error.split("(")[0] in done.stderr
    meta = runs.read_run_json(tmp_path / "uncaught")
    assert meta["status"] == status
    table = scenarios.read_back(tmp_path / "uncaught")
    assert sorted(set(table.column("step").to_pylist())) == list(range(17))
    assert table.num_rows == 34


# -- disk full / unwritable -----------------------------------------------------------------------------
def test_disk_full_training_goes_on_warns_once_and_loses_nothing_once_writes_work_again(tmp_path):
    figures = scenarios.disk_full_scenario(tmp_path, steps=200, flush_every=10, fail_from=50, fail_until=120)
    assert figures["failed_writes"] >= 7  # one per flush while failing, at least
    assert figures["write_errors_in_run_json"] == figures["failed_writes"]
    assert figures["rows_read_back"] == figures["rows_recorded"] == 600
    assert figures["steps_read_back"] == list(range(200))
    assert figures["rows_lost"] == 0
    assert figures["rows_written_in_run_json"] == 600
    assert figures["status"] == runs.FINISHED
    [message] = figures["write_warnings"]  # once, however many writes failed
    assert "No space left on device" in message
    assert str(tmp_path / "disk-full" / "metrics" / "rank=0") in message


def test_writes_failing_to_the_end_count_every_row_they_could_not_keep(tmp_path):
    figures = scenarios.overflow_scenario(tmp_path, steps=100, flush_every=10, max_pending_rows=60)
    assert figures["rows_read_back"] == 0
    assert figures["rows_lost"] == figures["rows_recorded"] == 200
    assert figures["rows_written_in_run_json"] == 0
    closing = [m for m in figures["warnings"] if "before the run closed" in m]
    assert len(closing) == 1 and "rows_lost" in closing[0]


def test_a_real_full_tmpfs_recovers_after_space_is_freed(tmp_path):
    figures = scenarios.tmpfs_scenario(tmp_path / "mnt", steps=400, flush_every=20)
    if figures is None:
        pytest.skip("mounting a tmpfs is not permitted here; the injected-ENOSPC test covers the same path")
    assert figures["rows_written_while_full"] == 0 and figures["write_errors_while_full"] >= 1
    assert figures["rows_read_back"] == figures["rows_recorded"]
    assert figures["rows_lost"] == 0
    assert len(figures["write_warnings"]) == 1


def test_unwritable_run_json_does_not_stop_training_and_the_close_still_lands(tmp_path, monkeypatch):
    """The heartbeat's run.json write fails too on a full disk: warned once, training unaffected; the final
    run.json goes into the space reserved at start, so status and counts are saved anyway."""
    run_path = runs.create_run(tmp_path, "no-json", {"tasks": ["a", "b"]})

    def refuse(path, payload):
        raise OSError(28, "No space left on device", str(path))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = Recorder(run_path, ["a", "b"], flush_every=5, heartbeat_interval=0.02)
        monkeypatch.setattr(runs, "write_json_atomic", refuse)
        scenarios._record_steps(rec, range(20), ["a", "b"])
        rec.wait()
        # the idle writer beats every 0.02 s; a loaded machine may take a while to run it
        waiting.wait_until(lambda: rec.heartbeat_errors >= 1, "a heartbeat that fails to write run.json")
        rec.close()
    monkeypatch.undo()
    assert rec.heartbeat_errors >= 1
    assert scenarios.read_back(run_path).num_rows == 40
    messages = [str(w.message) for w in caught if "cannot write" in str(w.message)]
    assert len(messages) == 1 and "run.json" in messages[0]
    assert not [w for w in caught if "could not update" in str(w.message)]
    meta = runs.read_run_json(run_path)
    assert meta["status"] == runs.FINISHED and meta["rows_written"] == 40 and meta["rows_lost"] == 0
    assert not (run_path / ".run.json.reserve").exists()  # used up, nothing left behind


# -- two writers --------------------------------------------------------------------------------------
def test_two_runs_with_the_same_name_are_refused_and_nothing_is_overwritten(tmp_path):
    trunk, heads = _two_task_model()
    first = hooks.attach(trunk[-1], EqualWeights(), runs_root=tmp_path, run_name="same", flush_every=5)
    for _ in range(10):
        first.loss(_losses(trunk, heads))
    first.close()
    before = {p: p.read_bytes() for p in (tmp_path / "same").rglob("*") if p.is_file()}
    with pytest.raises(runs.RunError, match=r"run 'same' already exists under .*choose another name"):
        # (refused at attach once the session claims its run there; at the first step before that)
        second = hooks.attach(trunk[-1], EqualWeights(), runs_root=tmp_path, run_name="same", flush_every=5)
        second.loss(_losses(trunk, heads))
    after = {p: p.read_bytes() for p in (tmp_path / "same").rglob("*") if p.is_file()}
    assert after == before


def test_a_recorder_on_a_finished_run_is_refused_and_nothing_is_overwritten(tmp_path):
    run_path = runs.create_run(tmp_path, "done", {"tasks": ["a", "b"]})
    rec = Recorder(run_path, ["a", "b"], flush_every=5)
    scenarios._record_steps(rec, range(10), ["a", "b"])
    rec.close()
    before = {p: p.read_bytes() for p in run_path.rglob("*") if p.is_file()}
    with pytest.raises(runs.RunError, match=r"run 'done' .* has status 'finished'.*start a new run"):
        Recorder(run_path, ["a", "b"], flush_every=5)
    assert {p: p.read_bytes() for p in run_path.rglob("*") if p.is_file()} == before


LOCK_HOLDER = r"""
import sys, time
from gradnorm.toolkit.recorder import Recorder
rec = Recorder(sys.argv[1], ["a", "b"], flush_every=5)
print("holding", flush=True)
time.sleep(60)
"""


def test_a_second_live_process_writing_the_same_run_is_refused(tmp_path):
    run_path = runs.create_run(tmp_path, "shared", {"tasks": ["a", "b"]})
    env = dict(os.environ)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(runs.RunError, match=r"another process is writing records to .*rank=0"):
            Recorder(run_path, ["a", "b"], flush_every=5)
        # A different rank of the same run is a different writer and is allowed.
        other = Recorder(run_path, ["a", "b"], flush_every=5, rank=1)
        other.close()
    finally:
        holder.kill()
        holder.wait()


# -- heartbeat ----------------------------------------------------------------------------------------
def test_the_heartbeat_advances_while_the_writer_lives_and_stops_at_close(tmp_path):
    run_path = runs.create_run(tmp_path, "beat", {"tasks": ["a", "b"]})
    rec = Recorder(run_path, ["a", "b"], flush_every=5, heartbeat_interval=0.05)
    deadline = time.monotonic() + waiting.PATIENCE
    first = None
    while time.monotonic() < deadline:
        beat = runs.read_run_json(run_path).get("heartbeat")
        if beat is not None and first is None:
            first = beat
        if first is not None and beat > first:
            break
        time.sleep(0.02)
    assert first is not None and beat > first
    rec.close()
    final = runs.read_run_json(run_path)
    time.sleep(0.2)
    assert runs.read_run_json(run_path) == final
    assert final["status"] == runs.FINISHED
    assert runs.effective_status(final, now=final["heartbeat"] + 1e6) == runs.FINISHED


@pytest.mark.parametrize(
    "meta, now, expected",
    [
        ({"status": "running", "heartbeat": 1000.0, "updated": 10.0}, 1100.0, "running"),
        ({"status": "running", "heartbeat": 1000.0}, 1121.0, "interrupted"),
        ({"status": "running", "updated": 1000.0}, 1050.0, "running"),  # older runs: no heartbeat field
        ({"status": "running", "created": 1000.0}, 2000.0, "interrupted"),
        ({"status": "running"}, 0.0, "interrupted"),  # nothing shows it alive
        ({"status": "running", "heartbeat": "yesterday"}, 0.0, "interrupted"),
        ({"status": "running", "heartbeat": True}, 1.0, "interrupted"),
        ({"status": "running", "heartbeat": float("inf")}, 1000.0, "interrupted"),
        ({"status": "running", "heartbeat": float("nan"), "updated": 990.0}, 1000.0, "running"),
        ({"status": "running", "heartbeat": 1e300}, 1000.0, "interrupted"),  # far future: no evidence
        ({"status": "running", "heartbeat": 1060.0}, 1000.0, "running"),  # clock skew within the threshold
        ({"status": "finished", "heartbeat": 0.0}, 1e9, "finished"),
        ({"status": "failed"}, 1e9, "failed"),
    ],
)
def test_effective_status_rule(meta, now, expected):
    assert runs.effective_status(meta, now=now, stale_after=120.0) == expected


def test_stale_threshold_from_the_environment(monkeypatch):
    meta = {"status": "running", "heartbeat": 1000.0}
    monkeypatch.setenv(runs.STALE_AFTER_ENV, "5")
    assert runs.effective_status(meta, now=1006.0) == runs.INTERRUPTED
    assert runs.effective_status(meta, now=1004.0) == runs.RUNNING
    for bad in ("soon", "-3", "inf", "nan"):
        monkeypatch.setenv(runs.STALE_AFTER_ENV, bad)
        with pytest.raises(runs.RunError, match=rf"GRADNORM_STALE_AFTER={bad!r}"):
            runs.effective_status(meta, now=1004.0)


# -- readers during writes ----------------------------------------------------------------------------
def test_a_reader_never_sees_half_a_part_file(tmp_path):
    tasks = ["a", "b", "c"]
    run_path = runs.create_run(tmp_path, "live", {"tasks": tasks})
    # A tiny heartbeat interval: run.json is replaced many times while it is being read.
    rec = Recorder(run_path, tasks, flush_every=1, heartbeat_interval=0.001)
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def read_forever():
        while not stop.is_set():
            try:
                assert runs.read_run_json(run_path)["tasks"] == tasks
                seen.append(scenarios.read_back(run_path).num_rows)
            except BaseException as exc:  # noqa: BLE001 - the assertion below reports it
                errors.append(exc)

    def keep_pace(step: int) -> None:
        # the writing goes on past every 50th step once the reader has read once more, so reads overlap the writes
        # however the threads are scheduled
        if step % 50 == 49:
            waiting.at_least(lambda: len(seen) + len(errors), (step + 1) // 50, "the reader's next read", alive=reader.is_alive)

    reader = threading.Thread(target=read_forever)
    reader.start()
    try:
        scenarios._record_steps(rec, range(300), tasks, after=keep_pace)
        rec.close()
    finally:
        stop.set()
        reader.join()
    assert errors == []
    assert len(seen) > 5
    assert all(n % 3 == 0 for n in seen)  # whole steps only: a part file is all there or absent
    assert seen == sorted(seen)
    assert scenarios.read_back(run_path).num_rows == 900


def test_every_bad_input_of_the_results_file_is_refused_with_a_message(tmp_path):
    outcomes = scenarios.bad_input_scenario(tmp_path)
    assert len(outcomes) == len(scenarios.HOSTILE_RUN_JSON) + len(scenarios.HOSTILE_RUN_NAMES) + len(scenarios.HOSTILE_WEIGHTS) + 1
    for kind, value, outcome in outcomes:
        assert outcome != "ACCEPTED", (kind, value)
        if kind == "run.json":
            assert "run.json" in outcome
        elif kind == "run name":
            assert outcome.startswith("invalid run name")
        elif value.startswith("tasks of another run"):
            assert "unknown tasks ['z'], missing tasks ['b']" in outcome
        else:
            assert outcome.startswith("weights file <file>"), outcome
    # Refused names created nothing at all.
    assert not (tmp_path / "names").exists() or list((tmp_path / "names").iterdir()) == []


def test_a_rank_other_than_0_that_stops_beating_marks_the_run_interrupted(tmp_path):
    from gradnorm.toolkit import analysis

    run_path = runs.create_run(tmp_path, "ddp", {"tasks": ["a", "b"]})
    started = time.time()
    rank0 = Recorder(run_path, ["a", "b"], rank=0, heartbeat_interval=0.05)
    rank1 = Recorder(run_path, ["a", "b"], rank=1, heartbeat_interval=0.05)
    rank_file = run_path / schema.METRICS_DIR / schema.rank_dir_name(1) / runs.RANK_FILE
    waiting.wait_until(rank_file.exists, "rank 1's first beat")
    beat = json.loads(rank_file.read_text())
    assert beat["status"] == "running" and beat["rank"] == 1 and started <= beat["heartbeat"] <= time.time()
    listed = analysis.list_runs(tmp_path)
    assert listed["status"].iloc[0] == "running" and listed["problems"].iloc[0] == []
    # An hour later rank 0 still beats but rank 1's last beat is an hour old: rank 1 died.
    later = time.time() + 3600
    runs.beat(run_path, later)
    listed = analysis.list_runs(tmp_path, now=later + 1)
    assert listed["status"].iloc[0] == "interrupted"
    assert "rank(s) [1] stopped beating" in listed["problems"].iloc[0][0]
    rank1.close()
    rank0.close()
    assert json.loads(rank_file.read_text())["status"] == "finished"
    assert analysis.list_runs(tmp_path)["status"].iloc[0] == "finished"


# -- long runs: SIGKILL at any moment loses at most the stated bound ----------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_sigkill_at_a_random_moment_of_a_fast_run_with_a_slow_writer_loses_at_most_the_bound(tmp_path, seed):
    figures = scenarios.high_rate_kill_scenario(tmp_path, flush_every=10, delay=0.005, compact_above=12, seed=seed)
    assert figures["return_code"] == -9, figures["stderr"]
    assert figures["loss_bound_steps"] == 20  # flush_every + max_backlog_steps (default: flush_every)
    # Every step read back is whole, once, and in order from step 0; the values are the recorded ones.
    assert figures["steps_contiguous"] and figures["each_step_once"] and figures["values_match_steps"], figures
    # The writer is ~10x slower than the training loop, yet what is lost stays within the bound.
    assert figures["steps_recorded"] > 200
    assert 0 <= figures["steps_lost"] <= figures["loss_bound_steps"], figures
    # (a step recorded just before the kill may be on disk before its progress line is)
    assert figures["steps_read_back"] <= figures["steps_recorded"] + 1


def test_sigkill_right_after_a_step_at_default_settings_loses_at_most_two_flushes(tmp_path):
    figures = scenarios.high_rate_kill_scenario(tmp_path, flush_every=100, delay=0.0, compact_above=200, kill_at=29_999, seed=7)
    assert figures["return_code"] == -9, figures["stderr"]
    assert figures["steps_recorded"] == 30_000 and figures["loss_bound_steps"] == 200
    assert figures["steps_contiguous"] and figures["each_step_once"] and figures["values_match_steps"], figures
    assert 0 <= figures["steps_lost"] <= 200, figures


# -- SIGKILL during a compaction: nothing lost, nothing twice ----------------------------------------------
@pytest.mark.parametrize("stage", scenarios.COMPACTION_STAGES)
def test_sigkill_during_compaction_loses_and_duplicates_nothing(tmp_path, stage):
    figures = scenarios.compaction_kill_scenario(tmp_path, stage)
    assert figures["return_code"] == -9
    # (the validation row goes into a file of its own, or into the last one when the writer coalesced them)
    assert figures["rows_before"] == 120 * 3 + 1 and figures["files_before"] in (24, 25)
    # What a reader takes right after the kill is exactly what was there before: every row once.
    assert figures["same_rows_after_kill"], figures
    assert figures["overlapping_after_kill"] == []
    on_disk = figures["files_on_disk_at_kill"]
    if stage in ("writing", "written"):
        assert any(n.startswith(".part-") and n.endswith(".tmp") for n in on_disk)  # the half-made file, never read
    if stage == "renamed":
        # The merged file and the files it replaces are both there; the reader takes the merged one only.
        live, _ = schema.live_part_files(on_disk)
        assert len([n for n in on_disk if schema.part_file_range(n)]) > len(live)
    # Compacting again finishes the job: temporary and covered files gone, same rows, files of <= 200 rows.
    assert figures["same_rows_after_resume"], figures
    assert not [n for n in figures["files_after_resume"] if n.endswith(".tmp")]
    assert figures["live_files_after_resume"] == len([n for n in figures["files_after_resume"] if schema.part_file_range(n)])
    assert sum(figures["rows_per_file_after_resume"]) == 361 and max(figures["rows_per_file_after_resume"]) <= 200


# -- a disk exactly full at close ------------------------------------------------------------------------
def test_a_disk_exactly_full_at_close_still_gets_the_final_status_and_counts(tmp_path):
    figures = scenarios.full_at_close_scenario(tmp_path / "mnt")
    if figures is None:
        pytest.skip("mounting a tmpfs is not permitted here; test_unwritable_run_json_does_not_stop_training_and_the_close_still_lands covers the reserve")
    assert figures["free_bytes_at_close"] == 0
    assert figures["status"] == runs.FINISHED
    assert figures["rows_written"] == figures["rows_read_back"] == figures["rows_written_before_full"] == 1000
    assert figures["rows_lost"] == figures["rows_recorded"] - figures["rows_written"] == 600
    assert figures["write_errors"] >= 1 and not figures["reserve_left"]
    closing = [m for m in figures["warnings"] if "before the run closed" in m]
    assert len(closing) == 1 and "rows_lost" in closing[0]
    assert not [m for m in figures["warnings"] if "could not update" in m]


# -- runs roots that cannot take records, and run names --------------------------------------------------
def test_unusable_runs_roots_are_refused_with_the_path_and_the_cause(tmp_path):
    results = {r["case"]: r for r in scenarios.unusable_root_scenario(tmp_path / "roots")}
    expected = {
        "a file": "is a file, not a directory",
        "a folder under a file": "on its path, is a file, not a directory",
        "no write permission": "permission denied",
        "a read-only file system": "read-only file system",
        "a full file system": "no space left on the device",
        "200 KiB free (under the 1 MiB a run needs)": "no space left for records",
    }
    assert {"a file", "a folder under a file"} <= set(results)
    for case, result in results.items():
        assert result["message"].startswith(f"runs root {result['root']} "), result
        assert expected[case] in result["message"], result
        assert result["left_behind"] == [], result


def test_a_taken_explicit_name_is_refused_when_claimed_and_a_claim_is_filled_by_its_own_process(tmp_path):
    run_id, path = runs.reserve_run(tmp_path, "mine", "gradnorm")
    assert (run_id, path) == ("mine", tmp_path / "mine") and path.is_dir()
    from gradnorm.toolkit import analysis

    assert analysis.run_ids(tmp_path) == []  # a claim is not a run yet
    with pytest.raises(runs.RunError, match=r"run 'mine' already exists under .*another session \(process \d+ on .*\) has claimed it"):
        runs.reserve_run(tmp_path, "mine", "gradnorm")
    runs.create_run(tmp_path, "mine", {"tasks": ["a", "b"]})
    assert sorted(os.listdir(path)) == sorted([schema.RUN_FILE, schema.METRICS_DIR])
    with pytest.raises(runs.RunError, match=r"run 'mine' already exists under .*choose another name or remove it first"):
        runs.reserve_run(tmp_path, "mine", "gradnorm")
    with pytest.raises(runs.RunError, match=r"invalid run name '\.\./x'"):
        runs.reserve_run(tmp_path, "../x", "gradnorm")
    # A session closed before its first step gives the name back.
    _, unused = runs.reserve_run(tmp_path, "unused", "gradnorm")
    assert runs.release_run(unused) and not unused.exists()
    assert not runs.release_run(path)  # a real run is never removed


def test_a_claim_of_another_process_is_not_filled_and_a_dead_ones_says_how_to_free_it(tmp_path):
    claimer = subprocess.run(
        [sys.executable, "-c", "import sys; from gradnorm.toolkit import runs; print(runs.reserve_run(sys.argv[1], 'theirs', 'x')[0])", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert claimer.stdout.strip() == "theirs"
    with pytest.raises(runs.RunError, match=r"claimed by process \d+, which is no longer running, and holds no records; remove the folder .*theirs"):
        runs.create_run(tmp_path, "theirs", {"tasks": ["a", "b"]})
    with pytest.raises(runs.RunError, match=r"no longer running"):
        runs.reserve_run(tmp_path, "theirs", "x")
    assert not (tmp_path / "theirs" / schema.RUN_FILE).exists()


def test_jobs_started_in_the_same_second_get_different_default_names(tmp_path):
    figures = scenarios.same_second_scenario(tmp_path / "root", jobs=6)
    assert figures["errors"] == []
    names = figures["names"]
    assert len(names) == len(set(names)) == 6 == len(figures["directories"])
    stamp = min(names, key=len)
    assert re.fullmatch(r"gradnorm-\d{8}-\d{6}", stamp)
    assert sorted(names) == sorted([stamp] + [f"{stamp}-{i}" for i in range(2, 7)])
    for name in names:
        runs.validate_run_id(name)


def test_a_runs_root_that_takes_records_is_returned_and_created(tmp_path):
    root = runs.check_runs_root(tmp_path / "new" / "runs")
    assert root == tmp_path / "new" / "runs" and root.is_dir() and os.listdir(root) == []
    assert runs.check_runs_root(root) == root  # and again: it is left as it was
    with pytest.raises(runs.RunError, match=r"runs root .* has only [\d,]+ bytes free"):
        runs.check_runs_root(root, min_free_bytes=1 << 62)


def test_create_run_on_an_unwritable_root_is_a_clear_error_and_leaves_no_folder(tmp_path):
    a_file = tmp_path / "runs"
    a_file.write_text("x")
    with pytest.raises(runs.RunError, match=r"runs root .*runs cannot be used: .* is a file, not a directory"):
        runs.create_run(a_file, "r", {"tasks": ["a"]})
    mount = tmp_path / "ro"
    if not scenarios._mount_tmpfs(mount, "ro,size=1m"):
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        with pytest.raises(runs.RunError, match=r"cannot create run 'r' under .*read-only file system"):
            runs.create_run(mount, "r", {"tasks": ["a"]})
    finally:
        scenarios._umount(mount)
