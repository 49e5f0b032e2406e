"""Faults lose nothing but the unflushed tail, and explain themselves.

The scenarios live in ``benchmarks/reliability_figures.py`` (which also writes their figures to
``benchmarks/results/reliability.md``); here they run again and every figure is checked against what
the part files independently read back with pyarrow.
"""

from __future__ import annotations

import json
import os
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


def test_unwritable_run_json_does_not_stop_training(tmp_path, monkeypatch):
    """The heartbeat's run.json write fails too on a full disk: warned once, training unaffected."""
    run_path = runs.create_run(tmp_path, "no-json", {"tasks": ["a", "b"]})

    def refuse(path, payload):
        raise OSError(28, "No space left on device", str(path))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = Recorder(run_path, ["a", "b"], flush_every=5, heartbeat_interval=0.02)
        monkeypatch.setattr(runs, "write_json_atomic", refuse)
        scenarios._record_steps(rec, range(20), ["a", "b"])
        rec.wait()
        time.sleep(0.1)
        rec.close()
    monkeypatch.undo()
    assert rec.heartbeat_errors >= 1
    assert scenarios.read_back(run_path).num_rows == 40
    messages = [str(w.message) for w in caught if "cannot write" in str(w.message)]
    assert len(messages) == 1 and "run.json" in messages[0]
    closing = [str(w.message) for w in caught if "could not update" in str(w.message)]
    assert len(closing) == 1


# -- two writers --------------------------------------------------------------------------------------
def test_two_runs_with_the_same_name_are_refused_and_nothing_is_overwritten(tmp_path):
    trunk, heads = _two_task_model()
    first = hooks.attach(trunk[-1], EqualWeights(), runs_root=tmp_path, run_name="same", flush_every=5)
    for _ in range(10):
        first.loss(_losses(trunk, heads))
    first.close()
    before = {p: p.read_bytes() for p in (tmp_path / "same").rglob("*") if p.is_file()}
    second = hooks.attach(trunk[-1], EqualWeights(), runs_root=tmp_path, run_name="same", flush_every=5)
    with pytest.raises(runs.RunError, match=r"run 'same' already exists under .*choose another name"):
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
    deadline = time.monotonic() + 10
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

    reader = threading.Thread(target=read_forever)
    reader.start()
    try:
        scenarios._record_steps(rec, range(300), tasks)
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
    rank0 = Recorder(run_path, ["a", "b"], rank=0, heartbeat_interval=0.05)
    rank1 = Recorder(run_path, ["a", "b"], rank=1, heartbeat_interval=0.05)
    rank_file = run_path / schema.METRICS_DIR / schema.rank_dir_name(1) / runs.RANK_FILE
    deadline = time.time() + 5
    while not rank_file.exists() and time.time() < deadline:
        time.sleep(0.02)
    beat = json.loads(rank_file.read_text())
    assert beat["status"] == "running" and beat["rank"] == 1 and beat["heartbeat"] > time.time() - 5
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
