"""Fault scenarios of the recorder. Each returns a dict of figures: the tests
(``tests/integration/test_faults.py``, ``tests/toolkit/test_reliability_analysis.py``) assert on them, and
``python -m benchmarks.reliability_figures`` runs them again and writes ``benchmarks/results/reliability.md``.

- :func:`kill_scenario`: a child process trains through :func:`hooks.attach` and is killed with SIGKILL
  after a few flushes. Figures: steps the child finished vs steps read back from the part files.
- :func:`disk_full_scenario`: part-file writes fail with ENOSPC for a stretch of flushes, then work again.
  Figures: rows recorded, rows read back, rows lost, failed writes, warnings.
- :func:`overflow_scenario`: writes keep failing past ``max_pending_rows`` and through the close; every
  dropped row is counted in ``run.json``.
- :func:`tmpfs_scenario`: a real 64 KiB tmpfs fills up (needs the right to mount; skipped otherwise).
"""

from __future__ import annotations

import errno
import os
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


def read_back(run_path: Path) -> Any:
    """Every complete part file of a run, read in full (a damaged one raises); returns one Arrow table."""
    import pyarrow as pa

    parts = sorted((run_path / schema.METRICS_DIR).glob(f"rank=*/{schema.PART_PREFIX}*{schema.PART_SUFFIX}"))
    tables = [pq.read_table(p) for p in parts]
    return pa.concat_tables(tables) if tables else schema.METRICS_SCHEMA.empty_table()


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


def _record_steps(rec: Recorder, steps: range, tasks: list[str]) -> None:
    """Feed ``rec`` real balancer records (GradNorm on synthetic losses and norms)."""
    balancer = GradNorm(alpha=0.5)
    balancer.bind(tasks, torch.device("cpu"), torch.float64)
    gen = torch.Generator().manual_seed(0)
    for step in steps:
        losses = torch.rand(len(tasks), generator=gen, dtype=torch.float64) + 0.5
        norms = torch.rand(len(tasks), generator=gen, dtype=torch.float64) + 0.1
        matrix, defined = stats_matrix(balancer.update(losses, norms), len(tasks))
        rec.record(step, matrix, defined)


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
