"""The analysis at scale: a synthetic run of 1,000,000 steps x 10 tasks (10 M rows) in many part files.

The run is written with the real schema (``toolkit.schema.METRICS_SCHEMA``), with weights that drift
and noisy losses so the files compress like real ones. Each query is timed cold (first call in the
process, footers not yet checked) and warm (median of repeats). Targets: E_t[w_i] < 1 s and one
downsampled series < 1 s. Usage::

    python benchmarks/bench_analysis.py [--steps 1000000] [--tasks 10] [--files 200] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine_info import describe, publish  # noqa: E402

from gradnorm.toolkit import analysis, runs, schema


def write_synthetic_run(root: Path, run_id: str = "synthetic", steps: int = 1_000_000, tasks: int = 10, files: int = 200, seed: int = 0) -> Path:
    """A finished GradNorm-like run; validation rows every 1000 steps."""
    names = [f"task{i}" for i in range(tasks)]
    path = runs.create_run(root, run_id, {"tasks": names, "balancer": {"name": "gradnorm", "alpha": 0.12}, "mode": "balance"})
    directory = path / schema.METRICS_DIR / schema.rank_dir_name(0)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_file = steps // files
    target = rng.uniform(0.2, 2.0, tasks)
    target *= tasks / target.sum()
    for index in range(files):
        step = np.arange(index * per_file, (index + 1) * per_file)
        n = len(step)
        progress = (step / steps)[:, None]
        weight = 1 + (target - 1) * (1 - np.exp(-progress * 20)) + rng.normal(0, 0.01, (n, tasks))
        loss = (np.exp(-progress * 3) + rng.normal(0, 0.01, (n, tasks))) * np.linspace(1, 100, tasks)
        columns = {
            "step": np.repeat(step, tasks),
            "epoch": np.repeat(step // 10_000, tasks),
            "wall_time": np.repeat(1.7e9 + step * 0.05, tasks),
            "split": np.full(n * tasks, schema.TRAIN),
            "task": np.tile(names, n),
            "loss": loss.ravel(),
            "loss_ratio": (loss / loss[:1]).ravel(),
            "inverse_rate": np.ones(n * tasks),
            "weight": weight.ravel(),
            "grad_norm": (weight * rng.uniform(0.9, 1.1, (n, tasks))).ravel(),
            "target_norm": np.ones(n * tasks),
            "balancer_weight": weight.ravel(),
            "step_grad_loss": np.repeat(rng.uniform(0, 0.1, n), tasks),
            "step_update_skipped": np.zeros(n * tasks, dtype=bool),
        }
        table = pa.table(columns, schema=schema.METRICS_SCHEMA)
        pq.write_table(table, directory / schema.part_file_name(index + 1), compression="zstd")
    runs.update_run_json(path, status=runs.FINISHED)
    return path


def timed(call: Callable[[], object], repeats: int) -> tuple[float, float]:
    started = time.perf_counter()
    call()
    cold = time.perf_counter() - started
    warm = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        warm.append(time.perf_counter() - started)
    return cold, statistics.median(warm)


def machine() -> str:
    import duckdb

    return describe(f"duckdb {duckdb.__version__}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        path = write_synthetic_run(root, steps=args.steps, tasks=args.tasks, files=args.files)
        written = time.perf_counter() - started
        size = sum(p.stat().st_size for p in path.rglob("*.parquet"))
        queries = {
            "list_runs": lambda: analysis.list_runs(root),
            "weight_average (E_t[w_i], default window)": lambda: analysis.weight_average(root, "synthetic"),
            "metric_series, one task, 2000 points": lambda: analysis.metric_series(root, "synthetic", "weight", tasks=["task3"]),
            "metric_series, all tasks, 2000 points each": lambda: analysis.metric_series(root, "synthetic", "weight"),
            "metric_series, all tasks, x = wall time": lambda: analysis.metric_series(root, "synthetic", "loss", x="wall_time"),
            "balance_series, 2000 points": lambda: analysis.balance_series(root, "synthetic"),
            "summary (E_t[w_i], final ratios, gaps)": lambda: analysis.summary(root, "synthetic"),
        }
        figures = {name: timed(call, args.repeats) for name, call in queries.items()}
    rows = args.steps * args.tasks
    lines = [
        f"### {time.strftime('%Y-%m-%d')}: {machine()}",
        "",
        f"Synthetic run: {args.steps:,} steps x {args.tasks} tasks = {rows:,} rows in {args.files} part files "
        f"({size / 1e6:.0f} MB, zstd; written in {written:.1f} s). Cold = first call in the process (part-file "
        f"footers checked); warm = median of {args.repeats} repeats.",
        "",
        "| query | cold (s) | warm (s) |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {cold:.3f} | {warm:.3f} |" for name, (cold, warm) in figures.items()]
    report = "\n".join(lines) + "\n"
    publish(report, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
