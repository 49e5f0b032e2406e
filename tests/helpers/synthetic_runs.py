"""Runs written directly with pyarrow, in the recorder's layout, for tests that need exact control of the
files (types, names, links, compaction states) without training anything.

The values are smooth functions of the step, so every analysis function has something to answer.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from gradnorm.toolkit import analysis, schema

TASKS = ("a", "b")


def metrics_table(steps: Sequence[int], tasks: Sequence[str] = TASKS, validate_every: int = 10, start_time: float = 1.7e9) -> pa.Table:
    """Training rows for ``steps`` (one per task) and, every ``validate_every`` steps, validation rows."""
    columns: dict[str, list[Any]] = {name: [] for name in schema.COLUMNS}
    count = len(tasks)
    for step in steps:
        weights = [1.0 + 0.3 * math.sin(0.05 * step + i) for i in range(count)]
        total = sum(weights)
        weights = [w * count / total for w in weights]
        ratios = [1.0 / (1.0 + 0.01 * (i + 1) * step) for i in range(count)]
        mean_ratio = sum(ratios) / count
        for i, task in enumerate(tasks):
            values = {
                "step": step,
                "epoch": step // 20,
                "wall_time": start_time + 0.1 * step,
                "split": schema.TRAIN,
                "task": task,
                "loss": (i + 1) * ratios[i],
                "loss_ratio": ratios[i],
                "inverse_rate": ratios[i] / mean_ratio,
                "weight": weights[i],
                "grad_norm": weights[i] * (0.5 + i),
                "target_norm": 0.5 + 0.25 * count,
                "balancer_weight": weights[i],
                "step_grad_loss": 0.01 * (1 + math.cos(0.1 * step)),
                "step_update_skipped": step % 17 == 5,
            }
            for name in schema.COLUMNS:
                columns[name].append(values.get(name))  # (columns added later, e.g. attempt: null)
        if validate_every and step % validate_every == validate_every - 1:
            for i, task in enumerate(tasks):
                values = {name: None for name in schema.COLUMNS}
                values.update(step=step, epoch=step // 20, wall_time=start_time + 0.1 * step + 0.05, split=schema.VALIDATION, task=task)
                values["loss"] = (i + 1) * 1.1 / (1.0 + 0.008 * (i + 1) * step) + 0.0004 * step
                for name in schema.COLUMNS:
                    columns[name].append(values[name])
    return pa.table(columns, schema=schema.METRICS_SCHEMA)


def run_json(run_id: str, tasks: Sequence[str] = TASKS, status: str = "finished", **extra: Any) -> dict[str, Any]:
    now = time.time()
    meta: dict[str, Any] = {
        "run_id": run_id,
        "tasks": list(tasks),
        "balancer": {"name": "gradnorm", "alpha": 0.12},
        "mode": "balance",
        "schema_version": schema.SCHEMA_VERSION,
        "status": status,
        "created": now - 60,
        "updated": now,
        "heartbeat": now,
        "rows_written": 0,
        "rows_lost": 0,
        "write_errors": 0,
    }
    meta.update(extra)
    return meta


def write_run(
    root: Path,
    run_id: str,
    steps: int = 60,
    per_part: int = 10,
    tasks: Sequence[str] = TASKS,
    rank: int = 0,
    meta: Optional[dict[str, Any]] = None,
) -> Path:
    """``<root>/<run_id>`` with run.json and ``steps`` steps in part files of ``per_part`` steps each
    (``part-000001.parquet`` onwards)."""
    path = Path(root) / run_id
    rank_dir = path / schema.METRICS_DIR / schema.rank_dir_name(rank)
    rank_dir.mkdir(parents=True, exist_ok=True)
    sequence = 0
    for first in range(0, steps, per_part):
        sequence += 1
        pq.write_table(metrics_table(range(first, min(first + per_part, steps)), tasks), rank_dir / schema.part_file_name(sequence))
    document = run_json(run_id, tasks) if meta is None else meta
    document.setdefault("rows_written", sum(pq.read_metadata(p).num_rows for p in rank_dir.glob("part-*.parquet")))
    (path / schema.RUN_FILE).write_text(json.dumps(document), encoding="utf-8")
    return path


def part_files(run_path: Path, rank: int = 0) -> list[Path]:
    return sorted((run_path / schema.METRICS_DIR / schema.rank_dir_name(rank)).glob("part-*.parquet"))


def compact(rank_dir: Path, first: int, last: int, delete: bool = False) -> Path:
    """Merge part files ``first``..``last`` of ``rank_dir`` into ``part-<first>-<last>.parquet`` as the
    recorder's compaction does (the merged file complete under its final name before any original goes);
    the originals stay unless ``delete``."""
    names = [schema.part_file_name(i) for i in range(first, last + 1)]
    merged = pa.concat_tables([pq.read_table(rank_dir / n) for n in names])
    target = rank_dir / schema.compacted_part_file_name(first, last)
    temporary = rank_dir / f".{target.name}.tmp"
    pq.write_table(merged, temporary)
    temporary.rename(target)
    if delete:
        for name in names:
            (rank_dir / name).unlink()
    return target


def rewrite_part(path: Path, change) -> None:
    """Replace a part file by ``change(table)``."""
    pq.write_table(change(pq.read_table(path)), path)


def records(frame) -> list[dict[str, object]]:
    """A frame's rows, floats rounded to 12 digits (sums over a different file order may differ in the
    last bits) and missing values as None (NaN is not equal to itself)."""
    rounded = frame.round(12).astype(object)
    return rounded.where(rounded.notna(), None).to_dict("records")


def rounded(value: Any) -> Any:
    """``value`` with every float (in dicts and lists too) rounded to 12 digits."""
    if isinstance(value, float):
        return round(value, 12)
    if isinstance(value, dict):
        return {key: rounded(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(rounded(item) for item in value)
    return value


def every_answer(root: Path, run_id: str) -> dict[str, object]:
    """What every analysis function says about ``run_id``, in comparable form."""
    average = analysis.weight_average(root, run_id)
    figures = analysis.balance_summary(root, run_id)
    return {
        "series": records(analysis.metric_series(root, run_id, "loss", max_points=10_000)),
        "wall": records(analysis.metric_series(root, run_id, "weight", x="wall_time", max_points=7)),
        "window": (average.start_step, average.end_step),
        "weights": records(average.table),
        "summary": records(analysis.summary(root, run_id)),
        "balance": records(analysis.balance_series(root, [run_id], max_points=10_000)),
        "balance_summary": rounded({k: v for k, v in figures.items() if k != "run_id"}),
        "overfitting": records(analysis.overfitting(root, run_id)),
        "onsets": records(analysis.overfitting_onsets(root, run_id)),
    }


def final_validation_losses(root: Path, run_ids: Sequence[str]) -> dict[tuple[str, str], float]:
    """(run, task) -> its last validation loss, read from the part files with pyarrow."""
    last: dict[tuple[str, str], tuple[int, float]] = {}
    for name in run_ids:
        for part in sorted((root / name / schema.METRICS_DIR).glob("*/part-*.parquet")):
            for row in pq.read_table(part, columns=["step", "split", "task", "loss"]).to_pylist():
                key = (name, row["task"])
                if row["split"] == schema.VALIDATION and (key not in last or row["step"] > last[key][0]):
                    last[key] = (row["step"], row["loss"])
    return {key: loss for key, (_, loss) in last.items()}
