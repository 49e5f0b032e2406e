"""The analysis at scale, on runs the real Recorder writes: 1,000,000 steps x 10 tasks (10 M rows).

Every run is written through ``toolkit.recorder.Recorder`` from synthetic GradNorm-like records (weights
drifting to their targets, noisy decaying losses, float32 as on a device), as fast as the recorder takes
them. Layouts queried:

- live: default settings, in a child process that is still appending while the queries run (the
  background compaction keeps the rank at most ~200 part files);
- closed: default settings, closed (packed at close into files of up to 1 M rows);
- no compaction: ``compact=False``, one part file per flush (10,000 files), as runs were written before
  compaction; then the same run after ``gradnorm compact``.

Each query is timed cold (first call in the process for that run: part-file footers checked) and warm
(median of repeats). Targets: E_t[w_i] and one series < 1 s warm, list_runs < 0.5 s cold. With
``--records FILE`` the writer's own figures go there too: throughput, bytes per row before and after the
encoding and the compaction, the backlog bound under a slow writer, and SIGKILL after 1 M steps. Usage::

    python benchmarks/bench_analysis.py [--steps 1000000] [--tasks 10] [--markdown FILE] [--records FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine_info import describe, publish  # noqa: E402

from gradnorm.toolkit import analysis, runs, schema
from gradnorm.toolkit.analysis import partials
from gradnorm.toolkit.recorder import COMPACT_ABOVE_FILES

BENCHMARKS = Path(__file__).resolve().parent
RUN_ID = "recorded"


# -- the records ------------------------------------------------------------------------------------------
def synthetic_block(start: int, n: int, total_steps: int, tasks: int, rng: np.random.Generator) -> Any:
    """(n, T, fields) float32 records of steps start..start+n-1 in schema.RECORDED_FIELDS order."""
    import torch

    step = np.arange(start, start + n)[:, None]
    progress = step / max(total_steps, 1)
    target = np.linspace(0.3, 1.7, tasks)
    weight = 1 + (target - 1) * (1 - np.exp(-progress * 20)) + rng.normal(0, 0.01, (n, tasks))
    loss = (np.exp(-progress * 3) + rng.normal(0, 0.01, (n, tasks))) * np.linspace(1, 100, tasks)
    ratio = loss / np.linspace(1, 100, tasks)
    rate = ratio / ratio.mean(axis=1, keepdims=True)
    norm = weight * rng.uniform(0.9, 1.1, (n, tasks))
    target_norm = norm.mean(axis=1, keepdims=True) * rate**0.12
    fields = {
        "loss": loss,
        "loss_ratio": ratio,
        "inverse_rate": rate,
        "weight": weight,
        "grad_norm": norm,
        "target_norm": target_norm,
        "balancer_weight": weight,
        "step_grad_loss": np.repeat(np.abs(norm - target_norm).sum(axis=1, keepdims=True), tasks, axis=1),
        "step_update_skipped": np.zeros((n, tasks)),
        "present": np.ones((n, tasks)),
        "step_measured": np.ones((n, tasks)),
    }
    block = np.stack([fields[name] for name in schema.RECORDED_FIELDS], axis=2).astype(np.float32)
    return torch.from_numpy(block)


def task_names(tasks: int) -> list[str]:
    return [f"task{i}" for i in range(tasks)]


def new_run(root: Path, tasks: int) -> Path:
    return runs.create_run(root, RUN_ID, {"tasks": task_names(tasks), "balancer": {"name": "gradnorm", "alpha": 0.12}, "mode": "balance"})


class PeakRSS:
    """The largest resident set size of this process, sampled every 0.1 s."""

    def __init__(self) -> None:
        self.peak = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, rss_mib())

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


def rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def record_in_process(root: Path, steps: int, tasks: int, **recorder_options: Any) -> dict[str, Any]:
    """Write a run through the Recorder in this process, as fast as it takes the records; close it."""
    from gradnorm.toolkit.recorder import Recorder

    path = new_run(root, tasks)
    rng = np.random.default_rng(0)
    defined = frozenset(schema.RECORDED_FIELDS)
    generating = 0.0
    with PeakRSS() as peak:
        rss_before = rss_mib()
        rec = Recorder(path, task_names(tasks), **recorder_options)
        started = time.perf_counter()
        for start in range(0, steps, 1000):
            tick = time.perf_counter()
            block = synthetic_block(start, min(1000, steps - start), steps, tasks, rng)
            generating += time.perf_counter() - tick
            for offset in range(len(block)):
                rec.record(start + offset, block[offset], defined)
        recorded = time.perf_counter() - started
        rec.close()
        closed = time.perf_counter() - started - recorded
    meta = runs.read_run_json(path)
    files = sorted((path / schema.METRICS_DIR).glob("rank=0/part-*.parquet"))
    return {
        "path": path,
        "seconds_recording": recorded - generating,
        "seconds_generating": generating,
        "seconds_closing": closed,
        "steps_per_second": steps / (recorded - generating),
        "rss_before_mib": rss_before,
        "rss_peak_mib": peak.peak,
        "files": len(files),
        "bytes": sum(f.stat().st_size for f in files),
        "meta": meta,
    }


# A child that records ``steps`` steps as fast as it can, then (``then`` = "append") appends ``rate`` steps
# a second until the control file asks for a burst: then it records that many steps as fast as it can and
# kills itself with SIGKILL right after the last one; with ``then`` = "kill" it does so right after the fast
# steps. Progress lines: "<step> <rss KiB> <seconds>" every 10,000 steps.
LIVE_CHILD = r"""
import json, os, signal, sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[2])
from bench_analysis import synthetic_block
from gradnorm.toolkit import recorder as recorder_module, schema
config = json.loads(sys.argv[1])
if config["delay"] > 0:
    real = recorder_module.pq.write_table
    def slow_write(*args, **kwargs):
        time.sleep(config["delay"])
        return real(*args, **kwargs)
    recorder_module.pq.write_table = slow_write
tasks, steps = config["tasks"], config["steps"]
rec = recorder_module.Recorder(config["run_path"], [f"task{i}" for i in range(tasks)], **config["recorder"])
defined = frozenset(schema.RECORDED_FIELDS)
rng = np.random.default_rng(1)
progress = open(config["progress"], "a", buffering=1)
control = Path(config["control"])
def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
started = time.perf_counter()
step = 0
def record(count, pace=None):
    global step
    for start in range(step, step + count, 1000):
        block = synthetic_block(start, min(1000, step + count - start), steps, tasks, rng)
        for offset in range(len(block)):
            rec.record(start + offset, block[offset], defined)
            if pace:
                time.sleep(pace)
            if (start + offset + 1) % 10_000 == 0:
                progress.write(f"{start + offset} {rss()} {time.perf_counter() - started:.3f}\n")
    step += count
record(steps)
progress.write(f"fast-done {step - 1} {rss()} {time.perf_counter() - started:.3f}\n")
if config["then"] == "kill":
    control.write_text("0")
while True:
    if control.exists():
        burst = int(control.read_text())
        record(burst)
        progress.write(f"kill {step - 1} {rss()} {time.perf_counter() - started:.3f}\n")
        progress.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    record(100, pace=1.0 / config["rate"])
"""


class LiveWriter:
    """A child process writing a run through the Recorder (see ``LIVE_CHILD``)."""

    def __init__(
        self, root: Path, steps: int, tasks: int, *, rate: float = 2000.0, delay: float = 0.0, recorder: Optional[dict] = None, then: str = "append"
    ) -> None:
        self.path = new_run(root, tasks)
        self.progress = root / "progress.txt"
        self.control = root / "control.txt"
        self.steps = steps
        config = {
            "run_path": str(self.path),
            "progress": str(self.progress),
            "control": str(self.control),
            "steps": steps,
            "tasks": tasks,
            "rate": rate,
            "delay": delay,
            "recorder": recorder or {},
            "then": then,
        }
        self.child = subprocess.Popen([sys.executable, "-c", LIVE_CHILD, json.dumps(config), str(BENCHMARKS)], stderr=subprocess.PIPE, text=True)

    def lines(self) -> list[list[str]]:
        if not self.progress.exists():
            return []
        return [line.split() for line in self.progress.read_text().splitlines() if line.strip()]

    def wait_for(self, word: str, timeout: float = 1800.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for fields in self.lines():
                if fields[0] == word:
                    return fields
            if self.child.poll() is not None and word != "kill":
                raise RuntimeError(f"writer child exited with {self.child.returncode}: {self.child.stderr.read()[-2000:] if self.child.stderr else ''}")
            time.sleep(0.2)
        raise TimeoutError(f"no {word!r} from the writer child after {timeout} s")

    def wait_compacted(self, limit: int, timeout: float = 300.0) -> tuple[float, int]:
        """Wait until the background compaction has brought the rank to at most ``limit`` live part files
        (it lags behind a writer going at full speed); returns (seconds waited, live files)."""
        started = time.monotonic()
        while True:
            count = live_files(self.path)
            if count <= limit or time.monotonic() - started > timeout:
                return time.monotonic() - started, count
            time.sleep(0.5)

    def burst_and_kill(self, steps: Optional[int]) -> dict[str, Any]:
        """Record ``steps`` more steps at full speed, SIGKILL right after the last (None: the child was
        started with then="kill" and does so right after its fast steps); what reads back."""
        if steps is not None:
            self.control.write_text(str(steps))
        fields = self.wait_for("kill")
        self.child.wait(timeout=600)
        last = int(fields[1])
        return {"last_step_recorded": last, "return_code": self.child.returncode, "rss_kib_at_kill": int(fields[2]), "seconds": float(fields[3])}

    def stop(self) -> None:
        if self.child.poll() is None:
            self.child.send_signal(signal.SIGKILL)
            self.child.wait(timeout=60)


def steps_read_back(path: Path) -> dict[str, Any]:
    """Train steps in the live part files (schema.live_part_files + pyarrow), and whether each is whole and once."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    tables = []
    for rank_dir in sorted((path / schema.METRICS_DIR).glob("rank=*")):
        live, _ = schema.live_part_files(os.listdir(rank_dir))
        tables += [pq.read_table(rank_dir / name, columns=["step", "split"]) for name in live]
    steps = np.concatenate([t.filter(pc.equal(t["split"], schema.TRAIN))["step"].to_numpy() for t in tables]) if tables else np.array([], np.int64)
    unique, counts = np.unique(steps, return_counts=True)
    return {
        "steps": len(unique),
        "contiguous_from_0": bool(len(unique) == 0 or (unique[0] == 0 and unique[-1] == len(unique) - 1)),
        "rows_per_step": sorted(set(counts.tolist())),
    }


# -- the queries ------------------------------------------------------------------------------------------
def queries(root: Path) -> dict[str, Callable[[], object]]:
    return {
        "list_runs": lambda: analysis.list_runs(root),
        "weight_average (E_t[w_i], default window)": lambda: analysis.weight_average(root, RUN_ID),
        "metric_series, one task, 2000 points": lambda: analysis.metric_series(root, RUN_ID, "weight", tasks=["task3"]),
        "metric_series, all tasks, 2000 points each": lambda: analysis.metric_series(root, RUN_ID, "weight"),
        "metric_series, all tasks, x = wall time": lambda: analysis.metric_series(root, RUN_ID, "loss", x="wall_time"),
        "balance_series, 2000 points": lambda: analysis.balance_series(root, RUN_ID),
        "summary (E_t[w_i], final ratios, gaps)": lambda: analysis.summary(root, RUN_ID),
        "balance_summary (the app's headline)": lambda: analysis.balance_summary(root, RUN_ID),
    }


def timed(call: Callable[[], object], repeats: int) -> tuple[float, ...]:
    """(cold, warm, warm without the partial-aggregate cache) wall seconds, then the two warm figures in
    CPU seconds of the process (DuckDB's threads included); warm = median of ``repeats``, the cached and
    the uncached call interleaved, their order alternating, so that the machine's load hits both alike."""
    started = time.perf_counter()
    call()
    cold = time.perf_counter() - started
    figures: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for index in range(repeats):
        for enabled in (True, False) if index % 2 == 0 else (False, True):
            partials.ENABLED = enabled
            try:
                wall, cpu = time.perf_counter(), time.process_time()
                call()
                figures[enabled].append((time.perf_counter() - wall, time.process_time() - cpu))
            finally:
                partials.ENABLED = True

    def median(enabled: bool, which: int) -> float:
        return statistics.median(f[which] for f in figures[enabled]) if figures[enabled] else float("nan")

    return cold, median(True, 0), median(False, 0), median(True, 1), median(False, 1)


def time_queries(root: Path, repeats: int) -> dict[str, tuple[float, ...]]:
    return {name: timed(call, repeats) for name, call in queries(root).items()}


APP = BENCHMARKS.parent / "app" / "streamlit_app.py"
#: The app's live refresh (app/streamlit_app.py LIVE_REFRESH_SECONDS): the pause before the rerun measured.
LIVE_REFRESH_SECONDS = 5.0


def app_views(root: Path, rounds: int) -> dict[bool, dict[str, float]]:
    """The app's first view (AppTest, nothing cached: Streamlit's cache, the catalog's verdicts and the
    partial aggregates cleared) and a rerun of the same page, with and without the partial aggregates,
    interleaved (their order alternating each round): medians of wall and process CPU seconds. The
    writer of a live run is another process, so the CPU figures leave it out."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    os.environ[analysis.catalog.RUNS_ROOT_ENV] = str(root)
    # A new AppTest scans every installed package's metadata for Streamlit components at its first run (913
    # metadata files here, seconds of CPU); a server does that once, when it starts. One scan, reused by
    # every page measured (a private attribute of AppTest), so that the figures are the page's own.
    warm = AppTest.from_file(str(APP), default_timeout=600)
    warm.run()
    components = getattr(warm, "_bidi_component_manager", None)
    samples: dict[bool, dict[str, list[float]]] = {True: {}, False: {}}
    for index in range(rounds):
        for enabled in (True, False) if index % 2 == 0 else (False, True):
            partials.ENABLED = enabled
            try:
                partials.wait_for_background(600)  # a summing left from the round before must not fill this round's cache
                st.cache_data.clear()
                analysis.catalog._cache.clear()
                partials._cache.clear()
                page = AppTest.from_file(str(APP), default_timeout=600)
                if components is not None:
                    page._bidi_component_manager = components
                for label in ("first view", "rerun"):
                    if label == "rerun":
                        # A live page reruns every LIVE_REFRESH_SECONDS; meanwhile the app sums the files its first
                        # view met in the background (partials.fill_in_background), as it does between refreshes.
                        time.sleep(LIVE_REFRESH_SECONDS)
                    wall, cpu = time.perf_counter(), time.process_time()
                    page.run()
                    if page.exception:
                        raise RuntimeError([e.value for e in page.exception])
                    samples[enabled].setdefault(f"{label} wall", []).append(time.perf_counter() - wall)
                    samples[enabled].setdefault(f"{label} cpu", []).append(time.process_time() - cpu)
            finally:
                partials.ENABLED = True
    # The app's pages turned the background summing on in this process: off again for the queries timed after.
    partials.wait_for_background(600)
    partials.fill_in_background(False)
    return {enabled: {name: statistics.median(values) for name, values in figures.items()} for enabled, figures in samples.items()}


def live_files(path: Path) -> int:
    return sum(len(schema.live_part_files(os.listdir(d))[0]) for d in (path / schema.METRICS_DIR).glob("rank=*"))


def machine() -> str:
    import duckdb
    import pyarrow
    import torch

    return describe(f"duckdb {duckdb.__version__}", f"pyarrow {pyarrow.__version__}", f"torch {torch.__version__}")


# -- bytes per row ------------------------------------------------------------------------------------------
def bytes_per_row(files: list[Path], **options: Any) -> float:
    """Bytes per row of ``files`` rewritten one for one with ``options`` (in memory)."""
    import pyarrow.parquet as pq

    total = rows = 0
    for file in files:
        table = pq.read_table(file)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, **options)
        total += len(buffer.getvalue())
        rows += table.num_rows
    return total / rows


def column_costs(files: list[Path]) -> dict[str, float]:
    """Compressed bytes per row of each column, from the footers."""
    import pyarrow.parquet as pq

    sizes: dict[str, int] = {}
    rows = 0
    for file in files:
        metadata = pq.read_metadata(file)
        rows += metadata.num_rows
        for group in range(metadata.num_row_groups):
            row_group = metadata.row_group(group)
            for index in range(row_group.num_columns):
                column = row_group.column(index)
                sizes[column.path_in_schema] = sizes.get(column.path_in_schema, 0) + column.total_compressed_size
    return {name: size / rows for name, size in sizes.items()}


def float_width_costs(steps: int, tasks: int) -> dict[str, float]:
    """Bytes per row of the same records computed in float32 and in float64, both stored as the schema's float64."""
    import pyarrow.parquet as pq
    import torch

    from gradnorm.toolkit.recorder import Recorder

    costs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in (torch.float32, torch.float64):
            root = Path(tmp) / str(dtype)
            path = new_run(root, tasks)
            rec = Recorder(path, task_names(tasks), flush_every=steps, compact=False)
            generator = np.random.default_rng(3)
            block = synthetic_block(0, steps, steps, tasks, generator).double()
            # float64 records: the float32 values plus noise below float32's resolution, as a float64 balancer computes.
            values = block + torch.from_numpy(generator.normal(0, 1e-9, block.shape)) if dtype == torch.float64 else block.float()
            for step in range(steps):
                rec.record(step, values[step], frozenset(schema.RECORDED_FIELDS))
            rec.close()
            [file] = sorted((path / schema.METRICS_DIR / "rank=0").glob("part-*.parquet"))
            costs[str(dtype).replace("torch.", "")] = file.stat().st_size / pq.read_metadata(file).num_rows
            costs[f"{str(dtype).replace('torch.', '')}, pyarrow defaults"] = bytes_per_row([file], compression="zstd")
    return costs


# -- the benchmark -----------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slow-steps", type=int, default=100_000, help="steps of the slow-writer runs (backlog bound, and without it)")
    parser.add_argument("--skip-raw", action="store_true", help="leave out the run without compaction (its queries are the slow ones)")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--app-rounds", type=int, default=0, help="also time the app's first view and a rerun, with and without the cache (AppTest)")
    parser.add_argument("--records", type=Path, default=None, help="where the writer's figures go (default: printed only)")
    args = parser.parse_args(argv)
    started_all = time.perf_counter()
    rows = args.steps * args.tasks
    query_tables: list[tuple[str, dict[str, tuple[float, ...]], str]] = []
    records: dict[str, Any] = {}
    app_tables: list[tuple[str, dict[bool, dict[str, float]], str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        # 1. live: a child writes at default settings and goes on appending while the queries run.
        live_root = base / "live"
        live_root.mkdir()
        writer = LiveWriter(live_root, args.steps, args.tasks)
        try:
            fast = writer.wait_for("fast-done")
            samples = writer.lines()
            at_fast_done = live_files(writer.path)
            # Appending at 2,000 steps/s now; the background compaction catches up with the full-speed phase.
            caught_up, _ = writer.wait_compacted(COMPACT_ABOVE_FILES)
            files_before = live_files(writer.path)
            figures = time_queries(live_root, args.repeats)
            if args.app_rounds:
                app_tables.append(("live", app_views(live_root, args.app_rounds), f"{live_files(writer.path)} live part files at the end"))
            files_after = live_files(writer.path)
            query_tables.append(
                (
                    "live (default settings, a writer still appending)",
                    figures,
                    f"{files_before} to {files_after} live part files while queried, the writer appending 2,000 steps/s; before: {int(fast[1]) + 1:,} "
                    f"steps at full speed in {float(fast[3]):.1f} s, which left {at_fast_done:,} live part files (the background compaction "
                    f"lags behind a writer at full speed) and {caught_up:.0f} s later {COMPACT_ABOVE_FILES} or fewer",
                )
            )
            kill = writer.burst_and_kill(10_000)
        finally:
            writer.stop()
        back = steps_read_back(writer.path)
        records["kill"] = {**kill, **back, "fast": fast, "rss_samples": [(int(s[0]), int(s[1])) for s in samples if s[0].isdigit()]}
        records["live_meta"] = runs.read_run_json(writer.path)

        # 2. closed: default settings, closed (packed at close).
        closed_root = base / "closed"
        closed = record_in_process(closed_root, args.steps, args.tasks)
        query_tables.append(("closed (default settings)", time_queries(closed_root, args.repeats), f"{closed['files']} part files"))
        if args.app_rounds:
            app_tables.append(("closed", app_views(closed_root, args.app_rounds), f"{closed['files']} part files"))
        records["closed"] = closed

        # 3. no compaction, then gradnorm compact.
        if not args.skip_raw:
            raw_root = base / "raw"
            raw = record_in_process(raw_root, args.steps, args.tasks, compact=False)
            raw_files = sorted((raw["path"] / schema.METRICS_DIR / "rank=0").glob("part-*.parquet"))
            records["raw"] = raw
            records["bytes_old_encoding"] = bytes_per_row(raw_files[:: max(1, len(raw_files) // 200)], compression="zstd")
            records["columns_raw"] = column_costs(raw_files[:: max(1, len(raw_files) // 200)])
            query_tables.append(("no compaction (one file per flush)", time_queries(raw_root, 1), f"{raw['files']:,} part files; warm = 1 repeat"))
            from gradnorm.toolkit.recorder import compact_run

            tick = time.perf_counter()
            compact_run(raw["path"])
            records["compact_seconds"] = time.perf_counter() - tick
            after = sorted((raw["path"] / schema.METRICS_DIR / "rank=0").glob("part-*.parquet"))
            records["compacted_files"] = len(after)
            records["compacted_bytes"] = sum(f.stat().st_size for f in after)
            analysis.catalog._cache.clear()
            query_tables.append(
                (
                    "no compaction, then `gradnorm compact`",
                    time_queries(raw_root, args.repeats),
                    f"{len(after)} part files; compacted in {records['compact_seconds']:.1f} s",
                )
            )
        closed_files = sorted((closed["path"] / schema.METRICS_DIR / "rank=0").glob("part-*.parquet"))
        records["columns_compacted"] = column_costs(closed_files)

        # 4. the backlog bound under a slow writer (20 ms a part file), and the same without a bound.
        slow = {}
        for label, options in (
            ("bounded (default)", {}),
            ("unbounded (this writer still coalesces what queued)", {"max_backlog_steps": 10**12, "max_backlog_bytes": 2**62}),
        ):
            slow_root = base / f"slow-{len(slow)}"
            slow_root.mkdir()
            child = LiveWriter(slow_root, args.slow_steps, args.tasks, delay=0.02, recorder=options, then="kill")
            try:
                first = child.wait_for("fast-done")
                result = child.burst_and_kill(None)
            finally:
                child.stop()
            start_rss = next((int(f[1]) for f in child.lines() if f[0].isdigit()), None)
            slow[label] = {**result, "fast": first, "rss_kib_start": start_rss, **steps_read_back(child.path), "meta": runs.read_run_json(child.path)}
        records["slow"] = slow
        records["float_widths"] = float_width_costs(20_000, args.tasks)
    records["total_seconds"] = time.perf_counter() - started_all
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    publish(query_report(when, args, rows, query_tables) + app_report(args, app_tables), args.markdown)
    publish(records_report(when, args, rows, records), args.records)
    return 0


def query_report(when: str, args: argparse.Namespace, rows: int, tables: list[tuple[str, dict[str, tuple[float, ...]], str]]) -> str:
    lines = [
        f"### {when}: {machine()}",
        "",
        f"Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (the machine is shared; timings vary by 2x between rounds). "
        f"Runs of {args.steps:,} steps x {args.tasks} tasks = {rows:,} rows, written through the Recorder (flush_every=100). "
        f"Cold = first call in the process for that run (part-file footers checked, the per-file sums computed; the files are in the page cache, "
        f"just written); warm = median of {args.repeats} repeats; uncached = the same query with the per-file partial aggregates off "
        "(`partials.ENABLED = False`: every file scanned), its repeats interleaved with the cached ones; CPU = the process's CPU seconds "
        "(DuckDB's threads included) of the warm calls, which other jobs on the shared cores do not inflate. "
        "Targets: E_t[w_i] and one series < 1 s warm, list_runs < 0.5 s cold.",
        "",
    ]
    names = list(tables[0][1])
    header = "| query | " + " | ".join(f"{label}: cold / warm / uncached warm (s); CPU warm / uncached" for label, _, _ in tables) + " |"
    lines += [header, "|---|" + "---|" * len(tables)]
    for name in names:
        lines.append(
            f"| {name} | "
            + " | ".join(f"{f[name][0]:.2f} / **{f[name][1]:.2f}** / {f[name][2]:.2f}; {f[name][3]:.2f} / {f[name][4]:.2f}" for _, f, _ in tables)
            + " |"
        )
    lines += ["", *[f"- {label}: {note}" for label, _, note in tables]]
    return "\n".join(lines) + "\n"


def app_report(args: argparse.Namespace, tables: list[tuple[str, dict[bool, dict[str, float]], str]]) -> str:
    if not tables:
        return ""
    lines = [
        "",
        f"The app's first view (AppTest, Streamlit's cache, the catalog's verdicts and the partial aggregates cleared; Streamlit's "
        "scan of the installed packages for components done once beforehand, as a server does at its start) and a rerun of the "
        f"same page {LIVE_REFRESH_SECONDS:.0f} s later (the live refresh), with the partial aggregates and without, interleaved; medians of "
        f"{args.app_rounds} rounds. Seconds: wall / CPU of this process (the background summing is counted where it overlaps a "
        "measured page). With the partial aggregates, the app answers a fresh process's first view by the "
        "plain queries and sums the files in the background (`partials.fill_in_background`). A live run's files change between the two "
        "runs, so the rerun misses Streamlit's cache and queries again. Target: the first view < 3 s.",
        "",
        "| run | cached: first view | cached: rerun | uncached: first view | uncached: rerun | files |",
        "|---|---|---|---|---|---|",
    ]
    for label, figures, note in tables:
        cells = [f"{figures[e][f'{v} wall']:.2f} / {figures[e][f'{v} cpu']:.2f}" for e in (True, False) for v in ("first view", "rerun")]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {note} |")
    return "\n".join(lines) + "\n"


def records_report(when: str, args: argparse.Namespace, rows: int, r: dict[str, Any]) -> str:
    closed, kill, live = r["closed"], r["kill"], r["live_meta"]
    bound = live["recorder"]["loss_bound_steps"]
    lines = [
        f"### {when}: {machine()}",
        "",
        f"`python benchmarks/bench_analysis.py --steps {args.steps} --tasks {args.tasks} --records benchmarks/results/records.md` "
        f"(the whole script took {r['total_seconds'] / 60:.1f} min). Synthetic GradNorm-like records in float32, {args.tasks} tasks, "
        "recorded as fast as the recorder takes them (no training in between: the writer is the bottleneck).",
        "",
        "#### Write throughput (default settings: flush_every=100, backlog bound = one flush, compaction on)",
        "",
        "| run | steps/s | rows/s | flushes that waited for the writer | time waiting | part files written | coalesced | merges | files at the end | close | RSS of the process: peak while writing (before) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def row(label: str, run: dict[str, Any], files: int) -> str:
        meta = run["meta"]
        return (
            f"| {label} | {run['steps_per_second']:,.0f} | {run['steps_per_second'] * args.tasks:,.0f} | {meta['backlog_waits']:,} | "
            f"{meta['backlog_wait_seconds']:.1f} s | {meta['part_files_written']:,} | {meta['batches_coalesced']:,} | {meta['compactions']:,} | "
            f"{files:,} | {run['seconds_closing']:.1f} s | {run['rss_peak_mib']:.0f} MiB (from {run['rss_before_mib']:.0f}) |"
        )

    lines.append(row("default, closed", closed, closed["files"]))
    if "raw" in r:
        lines.append(row("compact=False", r["raw"], r["raw"]["files"]))
    lines += [""]
    lines += [
        "#### What a row costs",
        "",
        "| layout | bytes per row | total for the run |",
        "|---|---|---|",
    ]
    if "raw" in r:
        lines += [
            f"| before: pyarrow defaults (zstd, dictionary on every column), one file per flush (1,000 rows) | {r['bytes_old_encoding']:.1f} | {r['bytes_old_encoding'] * rows / 1e6:.0f} MB |",
            f"| now: the recorder's encoding, one file per flush | {r['raw']['bytes'] / rows:.1f} | {r['raw']['bytes'] / 1e6:.0f} MB |",
            f"| now, after `gradnorm compact` ({r['compacted_files']} files) | {r['compacted_bytes'] / rows:.1f} | {r['compacted_bytes'] / 1e6:.0f} MB |",
        ]
    lines += [f"| now, default settings, closed ({closed['files']} files) | {closed['bytes'] / rows:.1f} | {closed['bytes'] / 1e6:.0f} MB |", ""]
    lines += ["Bytes per row by column, closed run (compressed, from the footers):", ""]
    lines += ["| " + " | ".join(r["columns_compacted"]) + " |", "|" + "---|" * len(r["columns_compacted"])]
    lines += ["| " + " | ".join(f"{v:.2f}" for v in r["columns_compacted"].values()) + " |", ""]
    widths = r["float_widths"]
    lines += [
        "Float widths (20,000 steps, one file; the schema stores float64 either way): records computed in float32 cost "
        f"{widths['float32']:.1f} B/row (pyarrow defaults: {widths['float32, pyarrow defaults']:.1f}), in float64 {widths['float64']:.1f} B/row "
        f"(pyarrow defaults: {widths['float64, pyarrow defaults']:.1f}). Byte-stream-split keeps each byte position of a value in its own "
        "stream, so the four zero bytes of a float32 value widened to float64 compress to almost nothing: float64 columns cost "
        "float32 runs nothing and keep float64 balancers exact.",
        "",
    ]
    lines += [
        "#### The backlog bound under a slow writer",
        "",
        f"A child records {args.slow_steps:,} steps as fast as it can while every part-file write takes 20 ms more (a slow disk), "
        "and kills itself with SIGKILL right after the last step.",
        "",
        "| backlog | steps/s | RSS at step 10,000 -> at the kill | flushes that waited | steps recorded | steps read back | steps lost | contiguous, each step whole |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, s in r["slow"].items():
        recorded = s["last_step_recorded"] + 1
        lines.append(
            f"| {label} | {recorded / float(s['fast'][3]):,.0f} | {(s['rss_kib_start'] or 0) / 1024:.0f} -> {s['rss_kib_at_kill'] / 1024:.0f} MiB | "
            f"{s['meta'].get('backlog_waits', 0):,} (at the last heartbeat) | "
            f"{recorded:,} | {s['steps']:,} | {recorded - s['steps']:,} | {s['contiguous_from_0'] and s['rows_per_step'] == [args.tasks]} |"
        )
    lost = kill["last_step_recorded"] + 1 - kill["steps"]
    lines += [
        "",
        "#### SIGKILL after 1 M steps",
        "",
        f"The live run above (default settings, stated bound: {bound} steps = flush_every + max_backlog_steps): {int(kill['fast'][1]) + 1:,} steps "
        f"at full speed, then appending at 2,000 steps/s while the queries ran, then 10,000 more at full speed and SIGKILL right after step "
        f"{kill['last_step_recorded']:,}: {kill['steps']:,} steps read back (contiguous from 0: {kill['contiguous_from_0']}, rows per step: "
        f"{kill['rows_per_step']}), **{lost} steps lost** (bound {bound}). RSS of the writing process: "
        + ", ".join(f"{kib / 1024:.0f} MiB at step {step + 1:,}" for step, kib in kill["rss_samples"][:: max(1, len(kill["rss_samples"]) // 5)])
        + f"; {kill['rss_kib_at_kill'] / 1024:.0f} MiB at the kill. At its last heartbeat: {live.get('backlog_waits', 0):,} flushes had waited "
        f"({live.get('backlog_wait_seconds', 0):.0f} s), {live.get('compactions', 0):,} merges.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
