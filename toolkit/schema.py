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
#: 2: ``present``, ``step_measured`` and ``attempt`` (resumed runs, tasks missing from a step, update_every).
SCHEMA_VERSION = 2

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

#: Flags recorded with the metrics (booleans in the file; null in files of schema version 1 reads as True).
FLAG_FIELDS: tuple[str, ...] = (
    "present",  # the task's loss was handed in at this step; False: absent (its loss and norms are null, its weight frozen)
    "step_measured",  # the gradient norms were measured at this step (False between updates with update_every=k)
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
        pa.field("present", pa.bool_()),
        pa.field("step_measured", pa.bool_()),
        # The process that wrote the row: 1 for a run's first process, n for its n-th (run.json's
        # ``attempts``); of two rows of the same step the later attempt's wins (see ``superseded_bounds``).
        pa.field("attempt", pa.int64()),
    ]
)

COLUMNS: tuple[str, ...] = tuple(METRICS_SCHEMA.names)

#: Metrics a user may ask the analysis for (numeric columns).
#: The per-task fields a balancer reports each step, in the order the recorder packs them.
RECORDED_FIELDS: tuple[str, ...] = TASK_METRICS + STEP_METRICS + FLAG_FIELDS

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


def compacted_part_file_name(first: int, last: int) -> str:
    """Name of a part file that holds, merged, the rows of part files ``first`` to ``last`` (inclusive)."""
    if not 0 < int(first) <= int(last):
        raise ValueError(f"a compacted part file covers sequences first <= last, got {first}..{last}")
    return f"{PART_PREFIX}{int(first):06d}-{int(last):06d}{PART_SUFFIX}"


def part_file_range(name: str) -> tuple[int, int] | None:
    """The sequences a part file's name says it holds: ``part-000007.parquet`` -> (7, 7),
    ``part-000001-000050.parquet`` -> (1, 50); None for any other name."""
    if not (name.startswith(PART_PREFIX) and name.endswith(PART_SUFFIX)):
        return None
    fields = name[len(PART_PREFIX) : -len(PART_SUFFIX)].split("-")
    if not 1 <= len(fields) <= 2 or not all(f.isascii() and f.isdigit() for f in fields):
        return None
    first, last = int(fields[0]), int(fields[-1])
    return (first, last) if 0 < first <= last else None


def live_part_files(names: list[str]) -> tuple[list[str], list[str]]:
    """The part files a reader must read, each row exactly once, in sequence order, and the part files
    that overlap them partially (left out; the caller reports them).

    Compaction writes the merged file under its covering name (temporary name, then an atomic rename)
    and only then deletes the files it merged. A file whose range lies inside another file's range is
    therefore already counted there and is left out, so a reader at any moment of a compaction, or after
    a crash in the middle of one, sees every row once: the originals until the rename, the merged file
    after it. A file that overlaps another without lying inside it is never written by the recorder;
    it is left out rather than counted twice. Names that are not part files are ignored.
    """
    ranged = sorted(((r, n) for n in names if (r := part_file_range(n)) is not None), key=lambda item: (item[0][0], -item[0][1], item[1]))
    live: list[str] = []
    overlapping: list[str] = []
    covered_to = 0
    for (first, last), name in ranged:
        if last <= covered_to:
            continue  # inside a file already taken: its rows are read there
        if first <= covered_to:
            overlapping.append(name)
            continue
        live.append(name)
        covered_to = last
    return live, overlapping


def superseded_bounds(attempts: object) -> dict[int, int]:
    """For a resumed run: attempt n -> the first step from which a later attempt recorded again.

    ``attempts`` is ``run.json``'s list of attempts (``{"attempt": n, "first_step": s, ...}``, the first
    attempt without ``first_step``). A row of attempt n at step >= its bound was recorded again by a
    later process that resumed from a checkpoint (the killed process had gone on past the checkpoint),
    so the latest attempt wins: readers leave such rows out. Attempts with no later resume have no bound.
    Entries that are not of that form are ignored (a hostile or hand-edited run.json answers, unfiltered).
    """
    if not isinstance(attempts, list):
        return {}
    starts: list[tuple[int, int]] = []
    found: set[int] = set()
    for entry in attempts:
        if not isinstance(entry, dict):
            continue
        number, first = entry.get("attempt"), entry.get("first_step")
        if isinstance(number, int) and _count(number):
            found.add(number)
            if isinstance(first, int) and _count(first):
                starts.append((number, first))
    numbers = sorted(found)
    bounds: dict[int, int] = {}
    for number in numbers:
        later = [first for other, first in starts if other > number]
        if later:
            bounds[number] = min(later)
    return bounds


def _count(value: object) -> bool:
    """An int a reader can compare steps with exactly (|value| <= 2**53), not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= 2**53
