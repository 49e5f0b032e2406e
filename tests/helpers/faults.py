"""Fault scenarios of the recorder. Each returns a dict of figures: the tests
(``tests/integration/test_faults.py``, ``tests/toolkit/test_reliability_analysis.py``) assert on them, and
``python -m benchmarks.reliability_figures`` runs them again and writes ``benchmarks/results/reliability.md``.

- :func:`kill_scenario`: a child process trains through :func:`hooks.attach` and is killed with SIGKILL
  after a few flushes. Figures: steps the child finished vs steps read back from the part files.
- :func:`disk_full_scenario`: part-file writes fail with ENOSPC for a stretch of flushes, then work again.
  Figures: rows recorded, rows read back, rows lost, failed writes, warnings.
- :func:`overflow_scenario`: writes keep failing past ``max_pending_rows`` and through the close; every
  dropped row is counted in ``run.json``.
- :func:`tmpfs_scenario`: a real 1 MiB tmpfs fills up (needs the right to mount; skipped otherwise).
- :func:`high_rate_kill_scenario`: a child records as fast as it can through a slow writer (and compacts in
  the background) and is killed with SIGKILL at a random moment. Figures: steps recorded vs read back,
  each exactly once, against the recorder's stated bound.
- :func:`compaction_kill_scenario`: ``compact_run`` in a child is killed at a chosen point of a merge
  (while writing, after the temporary file is complete, after the rename, after the deletes).
- :func:`full_at_close_scenario`: a real tmpfs filled to the last byte before the run closes.
- :func:`unusable_root_scenario`: runs roots that are a file, under a file, read-only or full.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import pyarrow.parquet as pq
import torch

from gradnorm.toolkit import recorder as recorder_module
from gradnorm.toolkit import runs, schema
from gradnorm.toolkit.balancers import GradNorm, stats_matrix
from gradnorm.toolkit.recorder import Recorder

# The child of the kill scenario: a small two-task network trained through hooks.attach, one line on
# stdout per started step: the step and how many rows the recorder had confirmed written (renamed into
# place) by then, so the parent knows what ran and what was on disk before the kill.
KILL_CHILD = r"""
import sys, time, torch
from torch import nn
from gradnorm import hooks
from gradnorm.toolkit.balancers import GradNorm
root, name, flush_every = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
trunk = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
heads = nn.ModuleList([nn.Linear(16, 1) for _ in range(2)])
opt = torch.optim.SGD(list(trunk.parameters()) + list(heads.parameters()), lr=1e-2)
session = hooks.attach(trunk[-1], GradNorm(alpha=0.12), runs_root=root, run_name=name, flush_every=flush_every)
step = 0
while True:
    # Printed before the step is recorded: a step counted here may have died half-way, never the reverse.
    print(step, session.recorder.rows_written if session.recorder else 0, flush=True)
    x = torch.randn(32, 8)
    h = trunk(x)
    losses = {"a": heads[0](h).pow(2).mean() + 1.0, "b": (heads[1](h) - 3).pow(2).mean() + 1.0}
    loss = session.loss(losses)
    opt.zero_grad(); loss.backward(); opt.step()
    step += 1
    time.sleep(0.002)
"""


def live_parts(run_path: Path) -> list[Path]:
    """The part files a reader takes, by the naming rule alone (``schema.live_part_files``), every rank."""
    files = []
    for rank_dir in sorted((Path(run_path) / schema.METRICS_DIR).glob("rank=*")):
        live, _ = schema.live_part_files(os.listdir(rank_dir))
        files += [rank_dir / name for name in live]
    return files


def read_back(run_path: Path, attempts: int = 50) -> Any:
    """Every live part file of a run, read in full with pyarrow (a damaged one raises); one Arrow table.

    Independent of the analysis: the files come from ``schema.live_part_files``. A file deleted between
    the listing and the read was merged meanwhile (the merged file covers it), so the listing is taken
    again, as any reader of a run being compacted must.
    """
    import pyarrow as pa

    for _ in range(attempts):
        try:
            tables = [pq.read_table(p) for p in live_parts(Path(run_path))]
        except FileNotFoundError:
            continue
        return pa.concat_tables(tables) if tables else schema.METRICS_SCHEMA.empty_table()
    raise RuntimeError(f"the part files of {run_path} kept changing under {attempts} readings")


def kill_scenario(root: Path, flush_every: int = 10, min_parts: int = 4, timeout: float = 60.0) -> dict[str, Any]:
    """Kill a training child with SIGKILL once ``min_parts`` part files exist; compare what it did with what reads back."""
    root = Path(root)
    name = "killed-run"
    env = dict(os.environ)
    child = subprocess.Popen(
        [sys.executable, "-c", KILL_CHILD, str(root), name, str(flush_every)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    rank_dir = root / name / schema.METRICS_DIR / schema.rank_dir_name(0)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if child.poll() is not None:
                raise RuntimeError(f"training child exited early with {child.returncode}: {child.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {min_parts} part files under {rank_dir} after {timeout} s")
            if rank_dir.is_dir() and len(list(rank_dir.glob("part-*.parquet"))) >= min_parts:
                break
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        out, _ = child.communicate(timeout=30)
    lines = [line.split() for line in out.splitlines() if line.strip()]
    steps_done = len(lines)
    confirmed_rows = max((int(parts[1]) for parts in lines), default=0)
    run_path = root / name
    table = read_back(run_path)
    import pyarrow.compute as pc

    train = table.filter(pc.equal(table.column("split"), schema.TRAIN))
    steps_read = sorted(set(train.column("step").to_pylist()))
    meta = runs.read_run_json(run_path)
    heartbeat = float(meta.get("heartbeat", meta["updated"]))
    return {
        "flush_every": flush_every,
        "return_code": child.returncode,
        "steps_done": steps_done,
        "steps_read_back": len(steps_read),
        "steps_contiguous": steps_read == list(range(len(steps_read))),
        "part_files_at_kill": min_parts,
        "rows_read_back": train.num_rows,
        "rows_per_step": len(meta["tasks"]),
        "steps_lost": steps_done - len(steps_read),
        "steps_confirmed_written": confirmed_rows // len(meta["tasks"]),
        "part_files": len(list(rank_dir.glob("part-*.parquet"))),
        "temporary_files_left": len(list(rank_dir.glob(".*.tmp"))),
        "status_in_run_json": meta["status"],
        "status_while_fresh": runs.effective_status(meta, now=heartbeat + 1.0, stale_after=60.0),
        "status_once_stale": runs.effective_status(meta, now=heartbeat + 61.0, stale_after=60.0),
        "heartbeat": heartbeat,
    }


def _record_steps(rec: Recorder, steps: range, tasks: list[str], after: Optional[Callable[[int], None]] = None) -> None:
    """Feed ``rec`` real balancer records (GradNorm on synthetic losses and norms); ``after(step)`` is
    called once each step is recorded (a test paces the writing against a reader with it)."""
    balancer = GradNorm(alpha=0.5)
    balancer.bind(tasks, torch.device("cpu"), torch.float64)
    gen = torch.Generator().manual_seed(0)
    for step in steps:
        losses = torch.rand(len(tasks), generator=gen, dtype=torch.float64) + 0.5
        norms = torch.rand(len(tasks), generator=gen, dtype=torch.float64) + 0.1
        matrix, defined = stats_matrix(balancer.update(losses, norms), len(tasks))
        rec.record(step, matrix, defined)
        if after is not None:
            after(step)


class FailingWrites:
    """Makes the recorder's Parquet writes raise ``OSError(ENOSPC)`` while ``failing`` is true."""

    def __init__(self) -> None:
        self.failing = False
        self.failures = 0
        self._real = recorder_module.pq.write_table

    def __call__(self, table, where, *args, **kwargs):
        if self.failing:
            self.failures += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))
        return self._real(table, where, *args, **kwargs)

    def install(self) -> Callable[[], None]:
        recorder_module.pq.write_table = self

        def restore() -> None:
            recorder_module.pq.write_table = self._real

        return restore


def _new_run(root: Path, name: str, tasks: list[str]) -> Path:
    return runs.create_run(root, name, {"tasks": tasks, "balancer": {"name": "gradnorm"}, "mode": "balance"})


def disk_full_scenario(root: Path, steps: int = 200, flush_every: int = 10, fail_from: int = 50, fail_until: int = 120) -> dict[str, Any]:
    """Writes fail with ENOSPC for the steps in [fail_from, fail_until), then work again."""
    tasks = ["depth", "normals", "semantic"]
    run_path = _new_run(Path(root), "disk-full", tasks)
    injector = FailingWrites()
    restore = injector.install()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rec = Recorder(run_path, tasks, flush_every=flush_every)
            _record_steps(rec, range(0, fail_from), tasks)
            rec.wait()
            injector.failing = True
            _record_steps(rec, range(fail_from, fail_until), tasks)
            rec.wait()
            injector.failing = False
            _record_steps(rec, range(fail_until, steps), tasks)
            rec.close()
    finally:
        restore()
    table = read_back(run_path)
    meta = runs.read_run_json(run_path)
    messages = [str(w.message) for w in caught if "cannot write" in str(w.message)]
    return {
        "steps": steps,
        "failing_steps": fail_until - fail_from,
        "rows_recorded": steps * len(tasks),
        "rows_read_back": table.num_rows,
        "steps_read_back": sorted(set(table.column("step").to_pylist())),
        "rows_lost": meta["rows_lost"],
        "rows_written_in_run_json": meta["rows_written"],
        "failed_writes": injector.failures,
        "write_errors_in_run_json": meta["write_errors"],
        "write_warnings": messages,
        "status": meta["status"],
    }


def overflow_scenario(root: Path, steps: int = 100, flush_every: int = 10, max_pending_rows: int = 60) -> dict[str, Any]:
    """Writes fail from the start to the close; only ``max_pending_rows`` are kept, all are counted."""
    tasks = ["a", "b"]
    run_path = _new_run(Path(root), "overflow", tasks)
    injector = FailingWrites()
    restore = injector.install()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rec = Recorder(run_path, tasks, flush_every=flush_every, max_pending_rows=max_pending_rows)
            injector.failing = True
            _record_steps(rec, range(steps), tasks)
            rec.close()
    finally:
        restore()
    meta = runs.read_run_json(run_path)
    return {
        "rows_recorded": steps * len(tasks),
        "rows_read_back": read_back(run_path).num_rows,
        "rows_lost": meta["rows_lost"],
        "rows_written_in_run_json": meta["rows_written"],
        "warnings": [str(w.message) for w in caught if "gradnorm recorder" in str(w.message)],
    }


def tmpfs_scenario(mount_point: Path, steps: int = 400, flush_every: int = 20) -> Optional[dict[str, Any]]:
    """A real 1 MiB tmpfs: the run fills it, space is freed, writing resumes. None if mounting is not allowed."""
    mount_point = Path(mount_point)
    mount_point.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        return None
    try:
        tasks = [f"task{i}" for i in range(10)]
        run_path = _new_run(mount_point, "tmpfs-run", tasks)
        ballast = mount_point / "ballast"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rec = Recorder(run_path, tasks, flush_every=flush_every)
            try:
                # Fill the file system to the last byte so that the next part file cannot be written.
                with open(ballast, "wb", buffering=0) as handle:
                    try:
                        while True:
                            handle.write(b"\0" * 512)
                    except OSError:
                        pass
                _record_steps(rec, range(0, steps // 2), tasks)
                rec.wait()
                written_while_full = rec.rows_written
                errors_while_full = rec.write_errors
                ballast.unlink()
                _record_steps(rec, range(steps // 2, steps), tasks)
            finally:
                rec.close()
        table = read_back(run_path)
        meta = runs.read_run_json(run_path)
        return {
            "rows_recorded": steps * len(tasks),
            "rows_read_back": table.num_rows,
            "rows_written_while_full": written_while_full,
            "write_errors_while_full": errors_while_full,
            "rows_lost": meta["rows_lost"],
            "write_warnings": [str(w.message) for w in caught if "cannot write" in str(w.message)],
        }
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True)


# -- long runs: a slow writer, SIGKILL at a random moment ---------------------------------------------------
# The child records as fast as it can, every part-file write slowed down by ``delay`` seconds, and appends
# each step to a progress file once record() has returned for it. Column ``loss`` carries the step number
# and ``weight`` the task index, so every row read back says which step and task it belongs to. With
# ``kill_at`` >= 0 the child kills itself with SIGKILL right after recording that step.
HIGH_RATE_CHILD = r"""
import os, signal, sys, time, torch
from gradnorm.toolkit import recorder as recorder_module, schema
from gradnorm.toolkit.recorder import Recorder
run_path, progress, flush_every, delay, compact_above, kill_at, tasks = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
real = recorder_module.pq.write_table
def slow_write(*args, **kwargs):
    time.sleep(delay)  # a slow or busy disk
    return real(*args, **kwargs)
if delay > 0:
    recorder_module.pq.write_table = slow_write
names = [f"task{i}" for i in range(tasks)]
rec = Recorder(run_path, names, flush_every=flush_every, compact_above=compact_above, compact_fanout=4, compact_grace=0.05)
defined = frozenset(schema.RECORDED_FIELDS) - {"step_update_skipped", *schema.FLAG_FIELDS}  # (flags: not free values)
matrix = torch.rand(tasks, len(schema.RECORDED_FIELDS), dtype=torch.float64)
matrix[:, schema.RECORDED_FIELDS.index("weight")] = torch.arange(tasks, dtype=torch.float64)
loss = schema.RECORDED_FIELDS.index("loss")
out = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
step = 0
started = time.perf_counter()
while True:
    matrix[:, loss] = step
    rec.record(step, matrix, defined)
    if step % 1000 == 999 or step == kill_at:
        with open(f"/proc/self/status") as status:
            rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
        os.write(out, f"{step} {rss} {time.perf_counter() - started:.3f}\n".encode())
    else:
        os.write(out, f"{step}\n".encode())
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    step += 1
"""


def check_read_back(run_path: Path, tasks: int) -> dict[str, Any]:
    """Every row read back (live files, pyarrow) is one (step, task) of a contiguous run of steps from 0."""
    import numpy as np
    import pyarrow.compute as pc

    table = read_back(run_path)
    train = table.filter(pc.equal(table.column("split"), schema.TRAIN))
    steps = train.column("step").to_numpy()
    carried = train.column("loss").to_numpy()
    task_index = train.column("weight").to_numpy()
    unique, counts = np.unique(steps, return_counts=True)
    pairs = np.unique(steps * tasks + task_index.astype(np.int64))
    return {
        "rows_read_back": train.num_rows,
        "steps_read_back": int(len(unique)),
        "steps_contiguous": bool(len(unique) == 0 or (unique[0] == 0 and unique[-1] == len(unique) - 1)),
        "each_step_once": bool(len(unique) == 0 or (counts.min() == counts.max() == tasks and len(pairs) == train.num_rows)),
        "values_match_steps": bool(np.array_equal(carried, steps.astype(np.float64))),
    }


def high_rate_kill_scenario(
    root: Path,
    *,
    flush_every: int = 10,
    delay: float = 0.005,
    compact_above: int = 12,
    tasks: int = 10,
    kill_after: Optional[float] = None,
    kill_at: int = -1,
    min_steps: int = 500,
    seed: int = 0,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Record at full speed in a child through a slow writer; SIGKILL it ``kill_after`` seconds (random if
    None) after it has recorded ``min_steps`` steps, or let it kill itself right after step ``kill_at``; compare."""
    root = Path(root)
    name = f"fast-{seed}"
    run_path = runs.create_run(root, name, {"tasks": [f"task{i}" for i in range(tasks)], "balancer": {"name": "synthetic"}, "mode": "balance"})
    progress = root / f"{name}.progress"
    wait = random.Random(seed).uniform(0.0, 2.0) if kill_after is None else kill_after
    args = [str(run_path), str(progress), str(flush_every), str(delay), str(compact_above), str(kill_at), str(tasks)]
    child = subprocess.Popen([sys.executable, "-c", HIGH_RATE_CHILD, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        # Started, and past its first steps (the first write also warms pyarrow up): then the kill may come at any moment.
        while not (progress.exists() and progress.stat().st_size > (min_steps if kill_at < 0 else 0) * 4):
            if child.poll() is not None:
                raise RuntimeError(f"recording child exited early with {child.returncode}: {child.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the recording child did not start within {timeout} s")
            time.sleep(0.01)
        if kill_at < 0:
            time.sleep(wait)
            child.send_signal(signal.SIGKILL)
        child.wait(timeout=max(deadline - time.monotonic(), 1.0))
    finally:
        if child.poll() is None:
            child.kill()
        _, err = child.communicate(timeout=30)
    lines = progress.read_text().split("\n")
    complete = [line.split() for line in lines[:-1] if line]  # the last piece may be cut mid-write
    last_recorded = int(complete[-1][0]) if complete else -1
    samples = [(int(f[0]), int(f[1]), float(f[2])) for f in complete if len(f) == 3]
    meta = runs.read_run_json(run_path)
    settings = meta.get("recorder", {})
    figures = check_read_back(run_path, tasks)
    rank_dir = run_path / schema.METRICS_DIR / schema.rank_dir_name(0)
    names = os.listdir(rank_dir)
    figures.update(
        return_code=child.returncode,
        stderr=err[-2000:],
        killed_after_seconds=wait if kill_at < 0 else None,
        flush_every=flush_every,
        writer_delay=delay,
        steps_recorded=last_recorded + 1,
        steps_lost=last_recorded + 1 - figures["steps_read_back"],
        loss_bound_steps=settings.get("loss_bound_steps"),
        backlog_waits_at_last_beat=meta.get("backlog_waits"),
        compactions_at_last_beat=meta.get("compactions"),
        live_part_files=len(schema.live_part_files(names)[0]),
        compacted_files=sum(1 for n in schema.live_part_files(names)[0] if "-" in n[len(schema.PART_PREFIX) :]),
        rss_kib=[rss for _, rss, _ in samples],
        steps_per_second=(samples[-1][0] + 1) / samples[-1][2] if samples and samples[-1][2] > 0 else None,
        run_path=str(run_path),
    )
    return figures


# -- SIGKILL in the middle of a compaction ----------------------------------------------------------------
# The child compacts a run with small target files (several merges) and stops at ``stage`` of the second
# merge: "writing" (inside the temporary file), "written" (temporary file complete, not renamed), "renamed"
# (merged file in place, originals not deleted) or "deleted" (originals gone, next merge not started).
COMPACTION_CHILD = r"""
import sys, time
import pyarrow.parquet as pq
from gradnorm.toolkit import recorder
run_path, stage, target_rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
merges = {"n": 0}
def pause(name):
    print(name, flush=True)
    time.sleep(120)
real_write = pq.ParquetWriter.write_table
def write_table(self, *args, **kwargs):
    real_write(self, *args, **kwargs)
    if stage == "writing" and merges["n"] == 1:
        pause("writing")
pq.ParquetWriter.write_table = write_table
def on_stage(name, file):
    if name == stage and merges["n"] == 1:
        pause(name)
    if name == "deleted":
        merges["n"] += 1
recorder.compact_run(run_path, target_rows=target_rows, on_stage=on_stage)
print("done", flush=True)
"""

COMPACTION_STAGES = ("writing", "written", "renamed", "deleted")


def _sorted_rows(table: Any) -> Any:
    return table.sort_by([("step", "ascending"), ("split", "ascending"), ("task", "ascending")])


def compaction_kill_scenario(root: Path, stage: str, steps: int = 120, flush_every: int = 5, target_rows: int = 200, timeout: float = 120.0) -> dict[str, Any]:
    """Kill ``compact_run`` at ``stage`` of its second merge; what reads back then, and after compacting again."""
    tasks = ["a", "b", "c"]
    run_path = _new_run(Path(root), f"compact-{stage}", tasks)
    rec = Recorder(run_path, tasks, flush_every=flush_every, compact=False)
    _record_steps(rec, range(steps), tasks)
    rec.record_validation(steps - 1, {"a": 0.5})
    rec.close()
    before = _sorted_rows(read_back(run_path))
    rank_dir = run_path / schema.METRICS_DIR / schema.rank_dir_name(0)
    files_before = len(live_parts(run_path))
    child = subprocess.Popen(
        [sys.executable, "-c", COMPACTION_CHILD, str(run_path), stage, str(target_rows)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        if line != stage:
            raise RuntimeError(
                f"compaction child said {line!r} instead of pausing at {stage!r}: {child.stderr.read()[-2000:] if child.poll() is not None else ''}"
            )
        on_disk = sorted(os.listdir(rank_dir))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=timeout)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate(timeout=30)
    after_kill = _sorted_rows(read_back(run_path))
    live_after_kill, overlapping = schema.live_part_files(os.listdir(rank_dir))
    outcome = compact_run_in_process(run_path, target_rows)
    after_resume = _sorted_rows(read_back(run_path))
    names = os.listdir(rank_dir)
    return {
        "stage": stage,
        "return_code": child.returncode,
        "files_before": files_before,
        "files_on_disk_at_kill": on_disk,
        "live_files_after_kill": len(live_after_kill),
        "overlapping_after_kill": overlapping,
        "rows_before": before.num_rows,
        "same_rows_after_kill": after_kill.equals(before),
        "same_rows_after_resume": after_resume.equals(before),
        "live_files_after_resume": len(schema.live_part_files(names)[0]),
        "files_after_resume": sorted(names),
        "resume_outcome": outcome,
        "rows_per_file_after_resume": [pq.read_metadata(p).num_rows for p in live_parts(run_path)],
    }


def compact_run_in_process(run_path: Path, target_rows: int) -> dict[str, Any]:
    from gradnorm.toolkit import recorder as recorder_module

    result = recorder_module.compact_run(run_path, target_rows=target_rows)
    return {rank: (r if isinstance(r, str) else {"merged": len(r.merged), "deleted": len(r.deleted)}) for rank, r in result.items()}


# -- full disks and unusable roots --------------------------------------------------------------------------
def _mount_tmpfs(mount_point: Path, options: str = "size=1m") -> bool:
    mount_point.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)], capture_output=True).returncode == 0


def _umount(mount_point: Path) -> None:
    subprocess.run(["umount", str(mount_point)], capture_output=True)


def fill_to_the_last_byte(path: Path) -> int:
    """Write ``path`` until the file system refuses even one more byte; returns the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as handle:
        for chunk in (1 << 16, 4096, 512, 1):
            try:
                while True:
                    written += handle.write(b"\0" * chunk)
            except OSError:
                pass
    return written


def full_at_close_scenario(mount_point: Path, steps_before: int = 100, steps_after: int = 60, flush_every: int = 10) -> Optional[dict[str, Any]]:
    """A run on a 1 MiB tmpfs; the disk is filled to the last byte, more steps are recorded, the run
    closes on the full disk. None if mounting is not allowed."""
    mount_point = Path(mount_point)
    if not _mount_tmpfs(mount_point):
        return None
    try:
        tasks = [f"task{i}" for i in range(10)]
        run_path = _new_run(mount_point, "full-at-close", tasks)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rec = Recorder(run_path, tasks, flush_every=flush_every)
            _record_steps(rec, range(steps_before), tasks)
            rec.wait()
            ballast = fill_to_the_last_byte(mount_point / "ballast")
            stats = os.statvfs(mount_point)
            free_at_close = stats.f_bfree * stats.f_frsize
            _record_steps(rec, range(steps_before, steps_before + steps_after), tasks)
            rec.close()
        meta = runs.read_run_json(run_path)
        table = read_back(run_path)
        return {
            "rows_recorded": (steps_before + steps_after) * len(tasks),
            "rows_written_before_full": steps_before * len(tasks),
            "ballast_bytes": ballast,
            "free_bytes_at_close": free_at_close,
            "status": meta["status"],
            "rows_written": meta["rows_written"],
            "rows_lost": meta["rows_lost"],
            "write_errors": meta["write_errors"],
            "rows_read_back": table.num_rows,
            "run_json_bytes": (run_path / schema.RUN_FILE).stat().st_size,
            "reserve_left": (run_path / ".run.json.reserve").exists(),
            "warnings": [str(w.message) for w in caught if "gradnorm recorder" in str(w.message)],
        }
    finally:
        _umount(mount_point)


def unusable_root_scenario(base: Path) -> list[dict[str, Any]]:
    """``check_runs_root`` on roots that cannot take records; the message and what was left behind."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    cases: list[tuple[str, Path, Optional[Path]]] = []
    a_file = base / "a-file"
    a_file.write_text("not a folder")
    cases.append(("a file", a_file, None))
    cases.append(("a folder under a file", a_file / "runs", None))
    if os.geteuid() != 0:
        locked = base / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        cases.append(("no write permission", locked / "runs", locked))
    read_only = base / "read-only"
    if _mount_tmpfs(read_only, "ro,size=1m"):
        cases.append(("a read-only file system", read_only, read_only))
    full = base / "full"
    if _mount_tmpfs(full, "size=1m"):
        fill_to_the_last_byte(full / "ballast")
        cases.append(("a full file system", full / "runs", full))
    almost = base / "almost-full"
    if _mount_tmpfs(almost, "size=1m"):
        (almost / "ballast").write_bytes(b"\0" * (1024 - 200) * 1024)
        cases.append(("200 KiB free (under the 1 MiB a run needs)", almost, almost))
    results = []
    try:
        for label, root, watch in cases:
            before = sorted(os.listdir(watch)) if watch is not None and watch.is_dir() else None
            try:
                runs.check_runs_root(root)
                message = "ACCEPTED"
            except runs.RunError as exc:
                message = str(exc)
            after = sorted(os.listdir(watch)) if watch is not None and watch.is_dir() else None
            results.append({"case": label, "root": str(root), "message": message, "left_behind": sorted(set(after or []) - set(before or []))})
    finally:
        for mount in (read_only, full, almost):
            _umount(mount)
        if (base / "locked").exists():
            (base / "locked").chmod(0o755)
    return results


RESERVE_CHILD = r"""
import sys, time
from pathlib import Path
from gradnorm.toolkit import runs
root, go, now = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
while not go.exists():
    time.sleep(0.001)
run_id, path = runs.reserve_run(root, None, "gradnorm", now=now)
print(run_id, flush=True)
"""


def same_second_scenario(root: Path, jobs: int = 6, timeout: float = 120.0) -> dict[str, Any]:
    """``jobs`` processes claim a default run name at the same instant (the same second): the names they get."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    go = root / ".go"
    now = time.time()
    children = [
        subprocess.Popen([sys.executable, "-c", RESERVE_CHILD, str(root), str(go), repr(now)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(jobs)
    ]
    time.sleep(1.0)  # let them all import and wait at the line
    go.write_text("go")
    names, errors = [], []
    for child in children:
        out, err = child.communicate(timeout=timeout)
        if child.returncode == 0:
            names.append(out.strip())
        else:
            errors.append(err[-1000:])
    go.unlink()
    return {"jobs": jobs, "names": sorted(names), "errors": errors, "directories": sorted(p.name for p in root.iterdir() if p.is_dir())}


#: Hostile run.json contents: each must be refused with a RunError naming the file.
HOSTILE_RUN_JSON: dict[str, bytes] = {
    "not JSON": b"{not json",
    "empty file": b"",
    "cut off mid-write": b'{"tasks": ["a", "b"], "status": "running"',
    "a JSON list": b"[1, 2]",
    "no tasks": b'{"status": "running"}',
    "tasks not a list of names": b'{"status": "running", "tasks": [1, 2]}',
    "no status": b'{"tasks": ["a", "b"]}',
    "unknown status": b'{"tasks": ["a", "b"], "status": "exploded"}',
    "not UTF-8": b"\xff\xfe\x00garbage",
}

#: Run names that could escape the runs root or confuse a shell, a path or SQL.
HOSTILE_RUN_NAMES = ["../../etc", "..", "/etc", "a/b", ".hidden", "", "x" * 129, "run\n", "run\x00", "x'; DROP TABLE runs; --", 'q"uote']


#: Hostile exported-weights files (paper 5.2: the static weights a user retrains with).
HOSTILE_WEIGHTS: dict[str, str] = {
    "not JSON": "{not json",
    "another format": '{"format": "other", "version": 1, "weights": {"a": 1.0, "b": 1.0}}',
    "negative weight": '{"format": "gradnorm-weights", "version": 1, "weights": {"a": 1.0, "b": -1.0}}',
    "zero weight": '{"format": "gradnorm-weights", "version": 1, "weights": {"a": 0.0, "b": 2.0}}',
    "NaN weight": '{"format": "gradnorm-weights", "version": 1, "weights": {"a": NaN, "b": 2.0}}',
    "infinite weight": '{"format": "gradnorm-weights", "version": 1, "weights": {"a": Infinity, "b": 2.0}}',
    "weight as text": '{"format": "gradnorm-weights", "version": 1, "weights": {"a": "1.0", "b": 1.0}}',
    "weights as a list": '{"format": "gradnorm-weights", "version": 1, "weights": [1.0, 1.0]}',
    "unknown field": '{"format": "gradnorm-weights", "version": 1, "weights": {"a": 1.0, "b": 1.0}, "extra": 3}',
    "future version": '{"format": "gradnorm-weights", "version": 99, "weights": {"a": 1.0, "b": 1.0}}',
}


def bad_input_scenario(root: Path) -> list[tuple[str, str, str]]:
    """Try each hostile input; return (kind, input, outcome) where outcome is the error message or 'ACCEPTED'."""
    root = Path(root)
    results = []
    for label, content in HOSTILE_RUN_JSON.items():
        run_path = root / "hostile" / label.replace(" ", "-")
        run_path.mkdir(parents=True)
        (run_path / schema.RUN_FILE).write_bytes(content)
        try:
            runs.read_run_json(run_path)
            outcome = "ACCEPTED"
        except runs.RunError as exc:
            outcome = str(exc).replace(str(run_path), "<run>")
        results.append(("run.json", label, outcome))
    for name in HOSTILE_RUN_NAMES:
        try:
            runs.create_run(root / "names", name, {"tasks": ["a", "b"]})
            outcome = "ACCEPTED"
        except runs.RunError as exc:
            outcome = str(exc).split(":")[0]
        shown = repr(name) if len(name) <= 40 else f"{name[:1]!r} * {len(name)}"
        results.append(("run name", shown, outcome if len(outcome) <= 60 else "invalid run name (too long)"))
    from gradnorm.toolkit.balancers import StaticWeights
    from gradnorm.toolkit.weights_file import load_weights

    (root / "weights").mkdir(parents=True)
    for label, content in HOSTILE_WEIGHTS.items():
        path = root / "weights" / "w.json"
        path.write_text(content, encoding="utf-8")
        try:
            load_weights(path)
            outcome = "ACCEPTED"
        except ValueError as exc:
            outcome = str(exc).replace(str(path), "<file>")
        results.append(("weights file", label, outcome))
    path.write_text('{"format": "gradnorm-weights", "version": 1, "weights": {"a": 1.0, "z": 1.0}}', encoding="utf-8")
    try:
        StaticWeights(load_weights(path)).bind(["a", "b"], torch.device("cpu"))
        outcome = "ACCEPTED"
    except ValueError as exc:
        outcome = str(exc)
    results.append(("weights file", "tasks of another run, retrained on ['a', 'b']", outcome))
    return results


def _damage(kind: str, part: Path) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    if kind == "cut in half":
        data = part.read_bytes()
        part.write_bytes(data[: len(data) // 2])
    elif kind == "zero bytes":
        part.write_bytes(b"")
    elif kind == "data pages overwritten, footer intact":
        data = bytearray(part.read_bytes())
        data[8 : len(data) // 2] = b"\xab" * (len(data) // 2 - 8)
        part.write_bytes(bytes(data))
    elif kind == "step stored as text":
        table = pq.read_table(part)
        pq.write_table(table.set_column(0, "step", pc.cast(table["step"], pa.string())), part)
    elif kind == "loss stored as text":
        table = pq.read_table(part)
        index = table.schema.get_field_index("loss")
        pq.write_table(table.set_column(index, "loss", pc.cast(table["loss"], pa.string())), part)
    else:
        raise ValueError(kind)


PART_DAMAGE = ("cut in half", "zero bytes", "data pages overwritten, footer intact", "step stored as text", "loss stored as text")


def damaged_part_scenario(root: Path) -> list[dict[str, Any]]:
    """Damage one of four part files in each way; does the analysis answer, leave it out and report it?"""
    from gradnorm.toolkit import analysis

    results = []
    tasks = ["a", "b"]
    for index, kind in enumerate(PART_DAMAGE):
        name = f"damaged-{index}"
        run_path = _new_run(Path(root), name, tasks)
        rec = Recorder(run_path, tasks, flush_every=10)
        _record_steps(rec, range(40), tasks)
        rec.close()
        parts = sorted((run_path / schema.METRICS_DIR / "rank=0").glob("part-*.parquet"))
        _damage(kind, parts[1])
        try:
            frame = analysis.metric_series(root, name, "loss", max_points=100_000)
            answered, steps = True, int(frame.n.sum()) // len(tasks)
        except Exception as exc:  # a figure, not a crash: the test asserts this never happens
            answered, steps = False, f"{type(exc).__name__}: {exc}"
        reported = any(str(parts[1]) in problem for problem in analysis.problems(root))
        results.append({"damage": kind, "query_answered": answered, "steps_read": steps, "intact_steps": 30, "reported": reported})
    return results
