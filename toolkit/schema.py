"""The record format: the one place that spells the Parquet columns.

One row per (step, split, task), "tidy" so that DuckDB can group and pivot freely. Step-level values
(the GradNorm loss L_grad of paper eq. 2, whether the weight update was skipped) are repeated on each
task's row of that step under names that start with ``step_``, so a run is one table read with one glob.

Part files live at ``<run>/metrics/rank=<r>/part-<seq>.parquet`` (hive partitioning: DuckDB adds a
``rank`` column when it reads them).
"""

from __future__ import annotations

import pyarrow as pa

#: Bumped whenever a column is added, removed or changes meaning. Readers tolerate older versions.
SCHEMA_VERSION = 1

TRAIN = "train"
VALIDATION = "val"

#: Per-task values a balancer produces each training step, in this order, on the device.
TASK_METRICS: tuple[str, ...] = (
    "loss",  # L_i(t), unweighted
    "loss_ratio",  # L~_i(t) = L_i(t) / L_i(0)                           (paper eq. 1)
    "inverse_rate",  # r_i(t) = L~_i(t) / mean_j L~_j(t)                   (paper eq. 1)
    "weight",  # w_i(t) applied to the loss in this step
    "grad_norm",  # G_i(t) = ||grad_W (w_i(t) L_i(t))||_2 at the shared layer, w_i the applied weight (eq. 2)
    "target_norm",  # mean_j G_j(t) * r_i(t)^alpha, the constant the balancer pulls its G_i to (eq. 2)
    "balancer_weight",  # the balancer's own w_i(t); equals `weight` unless in shadow mode, where
    #                     training applies the user's weights and this is what GradNorm would have set
)

#: Step-level values, repeated on each task row of the step.
STEP_METRICS: tuple[str, ...] = (
    "step_grad_loss",  # L_grad(t)                                           (paper eq. 2)
    "step_update_skipped",  # 1.0 when the weight update was skipped (non-finite input), else 0.0
)

#: Columns written by the recorder, in file order.
METRICS_SCHEMA = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("epoch", pa.int64()),
        pa.field("wall_time", pa.float64(), nullable=False),  # seconds since the Unix epoch
        pa.field("split", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
    ]
    + [pa.field(name, pa.float64()) for name in TASK_METRICS]
    + [
        pa.field("step_grad_loss", pa.float64()),
        pa.field("step_update_skipped", pa.bool_()),
    ]
)

COLUMNS: tuple[str, ...] = tuple(METRICS_SCHEMA.names)

#: Metrics a user may ask the analysis for (numeric columns).
#: The per-task fields a balancer reports each step, in the order the recorder packs them.
RECORDED_FIELDS: tuple[str, ...] = TASK_METRICS + STEP_METRICS

NUMERIC_COLUMNS: tuple[str, ...] = TASK_METRICS + ("step_grad_loss",)

METRICS_DIR = "metrics"
RUN_FILE = "run.json"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"


def rank_dir_name(rank: int) -> str:
    """Hive partition folder of one process's part files."""
    return f"rank={int(rank)}"


def part_file_name(sequence: int) -> str:
    """Name of the ``sequence``-th part file of a rank; zero-padded so names sort in write order."""
    return f"{PART_PREFIX}{int(sequence):06d}{PART_SUFFIX}"
