"""Property-based fuzzing of what a runs root may hold: run.json documents and part files.

Whatever the input, every reader (``list_runs``, ``problems``, each analysis function, the summary, the
export and the HTML report) either answers or raises the toolkit's own error (``AnalysisError`` or
``RunError``, both ``ValueError``s, with a message), within a time limit per example: never a
``RecursionError``, a DuckDB error, any other exception, or a hang. A run beside the fuzzed one always
answers as it does alone.

Example counts are modest under the default (derandomised) profile; ``HYPOTHESIS_PROFILE=explore`` scales
them up with its ``max_examples`` and draws fresh examples.
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from gradnorm.toolkit import analysis, schema
from tests.helpers.synthetic_runs import metrics_table, run_json, write_run

#: A reader that takes longer than this on one tiny example is taken to hang.
HANG_SECONDS = 60.0
ALLOWED = (ValueError, FileNotFoundError)  # AnalysisError and RunError are ValueErrors


def examples(default: int) -> int:
    """``default`` examples under the default profile; proportionally more under ``explore``."""
    configured = settings().max_examples
    return default if configured <= 100 else max(default, configured * default // 100)


def fuzz_settings(default: int) -> settings:
    return settings(
        max_examples=examples(default),
        deadline=None,  # a hang is what within_time bounds (HANG_SECONDS); how long an example takes is not the subject
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


def within_time(call: Callable[[], Any], what: str) -> Any:
    """``call()``, failing the example if it has not returned within ``HANG_SECONDS``."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - judged by the caller
            outcome["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(HANG_SECONDS)
    if worker.is_alive():
        pytest.fail(f"{what} still running after {HANG_SECONDS} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def answers_or_refuses(call: Callable[[], Any], what: str) -> Any:
    """The value of ``call()``, or None when it raised one of the toolkit's own errors with a message."""
    try:
        value = within_time(call, what)
    except ALLOWED as exc:
        assert str(exc).strip(), f"{what} raised {type(exc).__name__} without a message"
        assert type(exc).__module__.split(".")[0] not in ("duckdb", "_duckdb"), f"{what} let a DuckDB error through: {exc!r}"
        event(f"{what}: refused")
        return None
    event(f"{what}: answered")
    return value


def every_reader(root: Path, run_id: str, report: bool = False) -> None:
    """Call every reader on ``run_id``; each must answer or refuse (see :func:`answers_or_refuses`)."""
    from gradnorm.app.report import write_report

    listing = answers_or_refuses(lambda: analysis.list_runs(root), "list_runs")
    assert listing is not None and run_id in set(listing["run_id"]), "list_runs must list every run"
    answers_or_refuses(lambda: analysis.problems(root), "problems")
    for metric in ("loss", "weight", "balancer_weight"):
        answers_or_refuses(lambda metric=metric: analysis.metric_series(root, run_id, metric, max_points=50), f"metric_series {metric}")
    answers_or_refuses(lambda: analysis.metric_series(root, [run_id, "good"], "grad_norm", x="wall_time", max_points=7), "metric_series wall_time")
    answers_or_refuses(lambda: analysis.metric_series(root, run_id, "loss", step_range=(3, 12), tasks=["a", "b"]), "metric_series filtered")
    answers_or_refuses(lambda: analysis.weight_average(root, run_id), "weight_average")
    answers_or_refuses(lambda: analysis.weight_average(root, run_id, window=(0, 5)), "weight_average window")
    answers_or_refuses(lambda: analysis.overfitting(root, run_id), "overfitting")
    answers_or_refuses(lambda: analysis.overfitting_onsets(root, run_id), "overfitting_onsets")
    answers_or_refuses(lambda: analysis.balance_series(root, [run_id]), "balance_series")
    answers_or_refuses(lambda: analysis.balance_summary(root, run_id), "balance_summary")
    answers_or_refuses(lambda: analysis.summary(root, run_id), "summary")
    answers_or_refuses(lambda: analysis.export_weights(root, run_id), "export_weights")
    if report:
        answers_or_refuses(lambda: write_report(root, [run_id], root / "report.html"), "write_report")


_GOOD: dict[str, Any] = {}


def good_answer(root: Path) -> Any:
    return analysis.weight_average(root, "good").table.round(12).to_dict("records")


def fresh_root() -> tuple[tempfile.TemporaryDirectory, Path]:
    holder = tempfile.TemporaryDirectory(prefix="gradnorm-fuzz-")
    root = Path(holder.name)
    write_run(root, "good", steps=20)
    if "good" not in _GOOD:
        _GOOD["good"] = good_answer(root)
    return holder, root


# -- run.json ----------------------------------------------------------------------------------------
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(["finished", "running", "failed", "interrupted", "invalid", "", "FINISHED"])
)
json_values = st.recursive(
    scalars, lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4), max_leaves=25
)
KNOWN_KEYS = ["tasks", "status", "balancer", "mode", "created", "updated", "heartbeat", "rows_lost", "write_errors", "rows_written", "schema_version", "config"]


@st.composite
def run_documents(draw) -> bytes:
    """Bytes for a run.json: a mutated plausible document, any JSON value, or text that is not JSON."""
    kind = draw(st.sampled_from(["mutated", "any", "nested", "raw"]))
    if kind == "mutated":
        document: dict[str, Any] = run_json("fuzzed", tasks=draw(st.lists(st.text(max_size=20), min_size=0, max_size=4)))
        for key in draw(st.lists(st.sampled_from(KNOWN_KEYS), max_size=5, unique=True)):
            if draw(st.booleans()):
                document.pop(key, None)
            else:
                document[key] = draw(json_values)
        return json.dumps(document, allow_nan=True).encode()
    if kind == "any":
        return json.dumps(draw(json_values), allow_nan=True).encode()
    if kind == "nested":
        depth = draw(st.integers(1, 3000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        inner = json.dumps(run_json("fuzzed"))
        return (opener * depth + inner + closer * depth).encode()
    return draw(
        st.sampled_from([b"", b"{", b"\xff\xfe{}", b'{"tasks": ["a"], "status": "finished", "created": ' + b"9" * 5000 + b"}", b"NaN", b"\x00" * 64])
        | st.binary(max_size=200)
    )


@fuzz_settings(40)
@given(run_documents())
@example(b"[" * 1000 + b"]" * 1000)
@example(json.dumps(run_json("fuzzed", rows_lost=10**30, write_errors=float("inf"), created=1e308, balancer={"name": ["x"] * 3})).encode())
def test_any_run_json_is_answered_or_refused(document):
    holder, root = fresh_root()
    with holder:
        path = write_run(root, "fuzzed", steps=15)
        (path / schema.RUN_FILE).write_bytes(document)
        every_reader(root, "fuzzed")
        assert good_answer(root) == _GOOD["good"]


# -- part files ------------------------------------------------------------------------------------
COLUMN_KINDS = {
    "int64": pa.int64(),
    "int32": pa.int32(),
    "int8": pa.int8(),
    "uint64": pa.uint64(),
    "float64": pa.float64(),
    "float32": pa.float32(),
    "bool": pa.bool_(),
    "string": pa.string(),
    "large_string": pa.large_string(),
    "dictionary": pa.dictionary(pa.int32(), pa.string()),
    "null": pa.null(),
    "timestamp": pa.timestamp("s"),
    "list": pa.list_(pa.int64()),
}
EXTRA_NAMES = ["run_id", "rank", "x_lo", "bucket", "STEP", "Loss", "zzz", "metrics", "w", "\"'; DROP TABLE metrics; --"]


def _value(kind: str, number: float, text: str) -> Any:
    """A value of column kind ``kind`` made from a drawn number and text (the number may be NaN/inf)."""
    finite = math.isfinite(number)
    if kind in ("int64", "int32", "int8", "uint64", "timestamp"):
        if not finite:
            return None
        bounds = {
            "int64": (-(2**63), 2**63 - 1),
            "int32": (-(2**31), 2**31 - 1),
            "int8": (-128, 127),
            "uint64": (0, 2**64 - 1),
            "timestamp": (-(2**40), 2**40),
        }[kind]
        return min(max(int(number), bounds[0]), bounds[1])
    if kind in ("float64", "float32"):
        return number
    if kind == "bool":
        return number > 0 if finite else None
    if kind in ("string", "large_string", "dictionary"):
        return text
    if kind == "list":
        return [int(number)] if finite and abs(number) < 2**62 else []
    return None


numbers = st.one_of(
    st.integers(-5, 40).map(float),
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([2.0**53, 2.0**53 + 2, -(2.0**53) - 2, 2.0**63, 2.0**64 - 1, -1.0, 0.0]),
)
texts = st.one_of(st.sampled_from(["train", "val", "a", "b", ""]), st.text(max_size=12))


def chance(numerator: int, denominator: int) -> st.SearchStrategy[bool]:
    """True with probability ``numerator / denominator`` (integer draws lean towards their bounds)."""
    return st.sampled_from([True] * numerator + [False] * (denominator - numerator))


@st.composite
def part_tables(draw) -> pa.Table:
    """A table shaped like a part file: some of the record's columns, in any of several types, with
    nulls, NaN, infinities, huge or negative steps, text where numbers belong, and stray columns."""
    rows = draw(st.sampled_from([0, 1, 2, 3, 5, 8, 12, 20]))
    first = draw(st.sampled_from([0, 1, 7, 30]))
    base = metrics_table(range(first, first + 20), validate_every=draw(st.sampled_from([0, 3, 10]))).slice(0, rows)
    columns: dict[str, pa.Array] = {}
    for name in schema.COLUMNS:
        required = name in ("step", "split", "task")
        if not draw(chance(15, 16) if required else chance(4, 5)):
            continue  # a column left out
        if draw(chance(11, 12)):
            columns[name] = base[name].combine_chunks()  # as the recorder writes it
            continue
        kind = draw(st.sampled_from(sorted(COLUMN_KINDS)))
        values = [None if draw(chance(1, 6)) else _value(kind, draw(numbers), draw(texts)) for _ in range(rows)]
        columns[name] = pa.array(values, type=COLUMN_KINDS[kind]) if kind != "dictionary" else pa.array(values, pa.string()).dictionary_encode()
    for name in draw(st.lists(st.sampled_from(EXTRA_NAMES), max_size=2, unique=True)):
        if name.lower() in {c.lower() for c in columns}:
            continue  # (pyarrow allows the duplicate; the reader refuses it, tested elsewhere)
        kind = draw(st.sampled_from(sorted(COLUMN_KINDS)))
        values = [_value(kind, draw(numbers), draw(texts)) for _ in range(rows)]
        columns[name] = pa.array(values, type=COLUMN_KINDS[kind]) if kind != "dictionary" else pa.array(values, pa.string()).dictionary_encode()
    return pa.table(columns) if columns else pa.table({"nothing": pa.array([], pa.int64())})


@st.composite
def part_layouts(draw) -> list[tuple[str, str, pa.Table, dict[str, Any]]]:
    """(rank folder, file name, table, writer options) of one to three part files."""
    names = draw(
        st.lists(
            st.sampled_from(
                [
                    "part-000001.parquet",
                    "part-000002.parquet",
                    "part-000003.parquet",
                    "part-000001-000002.parquet",
                    "part-000002-000003.parquet",
                    "part-0.parquet",
                ]
            ),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    found = []
    for name in names:
        options = {
            "write_statistics": draw(st.booleans()),
            "row_group_size": draw(st.sampled_from([None, 1, 5])),
            # bytes damaged after writing: none, the file cut at a fraction, or bytes overwritten at fractions
            "damage": draw(st.sampled_from(["none"] * 8 + ["cut", "scribble"])),
            "at": draw(st.lists(st.floats(0, 1), min_size=1, max_size=4)),
        }
        found.append((draw(st.sampled_from(["rank=0"] * 4 + ["rank=1", "rank=x"])), name, draw(part_tables()), options))
    return found


def write_parts(run_path: Path, layout) -> None:
    for rank, name, table, options in layout:
        folder = run_path / schema.METRICS_DIR / rank
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, folder / name, write_statistics=options["write_statistics"], row_group_size=options["row_group_size"])
        damage = options.get("damage", "none")
        if damage != "none":
            data = bytearray((folder / name).read_bytes())
            if damage == "cut":
                data = data[: int(options["at"][0] * len(data))]
            else:
                for fraction in options["at"]:
                    start = int(fraction * (len(data) - 1))
                    data[start : start + 16] = b"\xa5" * len(data[start : start + 16])
            (folder / name).write_bytes(bytes(data))
        event(f"part file damage: {damage}")


def _steps_as(kind: pa.DataType, values: list) -> list[tuple[str, str, pa.Table, dict[str, Any]]]:
    table = metrics_table(range(10))
    index = table.schema.get_field_index("step")
    steps = pa.array(values[: table.num_rows] + [values[-1]] * (table.num_rows - len(values)), kind)
    return [("rank=0", "part-000001.parquet", table.set_column(index, pa.field("step", kind), steps), {"write_statistics": True, "row_group_size": None})]


def _text_flag(table: pa.Table) -> pa.Table:
    return table.drop(["step_update_skipped"]).append_column("step_update_skipped", pa.array(["yes"] * table.num_rows))


@fuzz_settings(40)
@given(part_layouts())
@example(_steps_as(pa.uint64(), [2**64 - 1, 2**63]))
@example(_steps_as(pa.int64(), [-(2**62), 2**62]))
@example([("rank=0", "part-000001.parquet", _text_flag(metrics_table(range(12))), {"write_statistics": True, "row_group_size": None})])
def test_any_part_files_are_answered_or_left_out(layout):
    holder, root = fresh_root()
    with holder:
        path = write_run(root, "fuzzed", steps=0)
        write_parts(path, layout)
        every_reader(root, "fuzzed")
        assert good_answer(root) == _GOOD["good"]


@fuzz_settings(6)
@given(part_layouts(), st.lists(st.text(min_size=1, max_size=16), min_size=1, max_size=3, unique=True))
def test_the_report_of_any_part_files_is_written_or_refused(layout, tasks):
    holder, root = fresh_root()
    with holder:
        path = write_run(root, "fuzzed", steps=12, tasks=tasks)
        write_parts(path, layout)
        every_reader(root, "fuzzed", report=True)
