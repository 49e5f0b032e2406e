"""One hostile file never takes down a runs root: deep or huge run.json, FIFOs, links, odd column types.

Each bad run is listed as invalid (or its bad file left out) with the reason, the other runs answer, and
nothing but regular files inside the root is opened. Expected values come from the same run written
plainly (pyarrow), never from the analysis on the hostile input itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from gradnorm import cli
from gradnorm.toolkit import analysis, runs, schema
from tests.helpers.synthetic_runs import TASKS, every_answer, part_files, rewrite_part, rounded, run_json, write_run

REPO = Path(__file__).resolve().parents[2]


def listed(root: Path) -> pd.DataFrame:
    return analysis.list_runs(root).set_index("run_id")


# -- run.json ----------------------------------------------------------------------------------------
NESTED_LISTS = ("[" * 1000 + "]" * 1000).encode()  # 2 KB


def test_a_deeply_nested_run_json_is_an_invalid_run_and_the_others_are_listed(tmp_path):
    write_run(tmp_path, "good")
    for name, content in {
        "nested-lists": NESTED_LISTS,
        "nested-inside": json.dumps(run_json("x", config=json.loads("[" * 200 + "]" * 200))).encode(),
        "too-large": json.dumps(run_json("x", notes=" " * (9 << 20))).encode(),
        "huge-integer": b'{"tasks": ["a"], "status": "finished", "created": ' + b"9" * 5000 + b"}",
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / schema.RUN_FILE).write_bytes(content)
    listing = listed(tmp_path)
    assert listing.loc["good", "status"] == runs.FINISHED and listing.loc["good", "rows"] > 0
    for name, reason in {
        "nested-lists": "nested deeper",
        "nested-inside": "nested deeper",
        "too-large": "larger than",
        "huge-integer": "not valid JSON",
    }.items():
        assert listing.loc[name, "status"] == analysis.INVALID
        assert any(reason in p and "run.json" in p for p in listing.loc[name, "problems"]), listing.loc[name, "problems"]
    assert len(analysis.problems(tmp_path)) == 4
    with pytest.raises(analysis.AnalysisError, match="no training rows"):
        analysis.weight_average(tmp_path, "nested-lists")


@pytest.mark.parametrize("command", ["summary", "export", "report"])
def test_the_commands_answer_for_a_good_run_beside_a_nested_run_json(tmp_path, capsys, command):
    write_run(tmp_path, "good")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / schema.RUN_FILE).write_bytes(NESTED_LISTS)
    extra = {"summary": [], "export": ["--out", str(tmp_path / "w.json")], "report": ["--out", str(tmp_path / "r.html")]}[command]
    assert cli.main([command, "--root", str(tmp_path), "good", *extra]) == 0
    capsys.readouterr()
    assert cli.main([command, "--root", str(tmp_path), "bad", *extra]) == 2
    assert "no training rows" in capsys.readouterr().err


# -- FIFOs: a reader that opens one waits forever, so the checks run in a child with a time limit ----
CHILD = textwrap.dedent(
    """
    import json, sys
    from gradnorm import cli
    from gradnorm.toolkit import analysis
    root = sys.argv[1]
    listing = analysis.list_runs(root)
    out = {row["run_id"]: {"status": row["status"], "rows": int(row["rows"]), "problems": row["problems"]} for row in listing.to_dict("records")}
    out["problems()"] = analysis.problems(root)
    out["series_n"] = int(analysis.metric_series(root, "fifo-part", "loss", max_points=10_000)["n"].sum())
    out["summary_exit"] = cli.main(["summary", "--root", root, "fifo-part"])
    print("RESULT " + json.dumps(out))
    """
)


def run_child(code: str, *args: str, timeout: float = 120) -> str:
    try:
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"still running after {timeout} s (a reader opened a FIFO?): {(exc.stderr or b'')[-2000:]!r}")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_fifos_named_like_run_files_are_refused_not_opened(tmp_path):
    write_run(tmp_path, "good")
    (tmp_path / "fifo-json" / schema.METRICS_DIR).mkdir(parents=True)
    os.mkfifo(tmp_path / "fifo-json" / schema.RUN_FILE)
    fifo_part = write_run(tmp_path, "fifo-part", steps=20)
    os.mkfifo(fifo_part / schema.METRICS_DIR / "rank=0" / "part-000003.parquet")
    (fifo_part / schema.METRICS_DIR / "rank=1").mkdir()
    os.mkfifo(fifo_part / schema.METRICS_DIR / "rank=1" / runs.RANK_FILE)
    output = run_child(CHILD, str(tmp_path))
    result = json.loads(output.split("RESULT ", 1)[1])
    assert result["good"]["status"] == runs.FINISHED
    assert result["fifo-json"]["status"] == analysis.INVALID
    assert any("not a regular file" in p for p in result["fifo-json"]["problems"])
    expected_rows = sum(pq.read_metadata(p).num_rows for p in part_files(fifo_part)[:2])
    assert result["fifo-part"]["rows"] == expected_rows
    assert sum("part-000003.parquet" in p and "not a regular file" in p for p in result["fifo-part"]["problems"]) == 1
    assert sum("rank.json" in p and "not a regular file" in p for p in result["fifo-part"]["problems"]) == 1
    assert result["series_n"] == 20 * len(TASKS)
    assert result["summary_exit"] == 0
    assert "part-000003.parquet" in output  # summary said what it left out


# -- links ---------------------------------------------------------------------------------------------
def test_links_inside_a_run_are_refused_and_reported(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    other = write_run(outside, "other", steps=30)
    write_run(root, "linked-metrics", steps=10)
    (root / "linked-metrics" / schema.METRICS_DIR / "rank=0" / "part-000001.parquet").unlink()
    (root / "linked-metrics" / schema.METRICS_DIR / "rank=0").rmdir()
    (root / "linked-metrics" / schema.METRICS_DIR).rmdir()
    os.symlink(other / schema.METRICS_DIR, root / "linked-metrics" / schema.METRICS_DIR)
    doubled = write_run(root, "linked-rank", steps=30)
    os.symlink(doubled / schema.METRICS_DIR / "rank=0", doubled / schema.METRICS_DIR / "rank=1")
    linked_part = write_run(root, "linked-part", steps=20)
    os.symlink(part_files(other)[2], linked_part / schema.METRICS_DIR / "rank=0" / "part-000003.parquet")
    linked_json = write_run(root, "linked-json", steps=10)
    (linked_json / schema.RUN_FILE).unlink()
    os.symlink(other / schema.RUN_FILE, linked_json / schema.RUN_FILE)

    listing = listed(root)
    rows_of = {run_id: sum(pq.read_metadata(p).num_rows for p in part_files(root / run_id)) for run_id in ("linked-rank", "linked-part")}
    assert listing.loc["linked-metrics", "rows"] == 0
    assert listing.loc["linked-rank", "rows"] == rows_of["linked-rank"]  # once, not twice
    assert listing.loc["linked-part", "rows"] == rows_of["linked-part"] - pq.read_metadata(part_files(other)[2]).num_rows
    assert listing.loc["linked-json", "status"] == analysis.INVALID
    for run_id, name in (("linked-metrics", "metrics"), ("linked-rank", "rank=1"), ("linked-part", "part-000003.parquet"), ("linked-json", "run.json")):
        assert sum(name in p and "symbolic link" in p for p in listing.loc[run_id, "problems"]) == 1, listing.loc[run_id, "problems"]
    assert int(analysis.metric_series(root, "linked-rank", "loss", max_points=10_000)["n"].sum()) == 30 * len(TASKS)
    assert analysis.metric_series(root, "linked-metrics", "loss").empty


# -- column types ----------------------------------------------------------------------------------
def cast_column(name: str, type_: pa.DataType):
    def change(table: pa.Table) -> pa.Table:
        index = table.schema.get_field_index(name)
        return table.set_column(index, pa.field(name, type_), pc.cast(table[name], type_))

    return change


def plain_and_changed(tmp_path: Path, change, parts=None) -> tuple[Path, Path]:
    plain, changed = tmp_path / "plain", tmp_path / "changed"
    write_run(plain, "run")
    path = write_run(changed, "run")
    for index, part in enumerate(part_files(path)):
        if parts is None or index in parts:
            rewrite_part(part, change)
    return plain, changed


@pytest.mark.parametrize(
    "label, change",
    [
        ("step-uint64", cast_column("step", pa.uint64())),
        ("step-int32", cast_column("step", pa.int32())),
        ("loss-float32", cast_column("loss", pa.float32())),
        ("task-large-string", cast_column("task", pa.large_string())),
        ("task-dictionary", cast_column("task", pa.dictionary(pa.int32(), pa.string()))),
        ("skipped-as-int8", cast_column("step_update_skipped", pa.int8())),
    ],
)
def test_other_encodings_of_the_schema_types_read_the_same(tmp_path, label, change):
    plain, changed = plain_and_changed(tmp_path, change, parts={1, 3})
    assert listed(changed).loc["run", "problems"] == []
    assert listed(changed).loc["run", "last_step"] == 59
    got, expected = every_answer(changed, "run"), every_answer(plain, "run")
    if label == "loss-float32":
        assert pd.DataFrame(got["series"])["value"].to_numpy() == pytest.approx(pd.DataFrame(expected["series"])["value"].to_numpy(), rel=1e-6)
        got.pop("series"), expected.pop("series"), got.pop("overfitting"), expected.pop("overfitting"), got.pop("onsets"), expected.pop("onsets")
        got.pop("summary"), expected.pop("summary")
    assert got == expected


def test_steps_beyond_the_exact_range_of_a_double_are_left_out(tmp_path):
    big = 2**64 - 100

    def huge_steps(table: pa.Table) -> pa.Table:
        steps = pc.add(pc.cast(table["step"], pa.uint64()), pa.scalar(big, pa.uint64()))
        return table.set_column(0, pa.field("step", pa.uint64()), steps)

    plain, changed = plain_and_changed(tmp_path, huge_steps, parts={5})
    listing = listed(changed)
    assert listing.loc["run", "last_step"] == 49
    (problem,) = listing.loc["run", "problems"]
    assert "part-000006.parquet" in problem and "'step'" in problem and "out of range" in problem
    average = analysis.weight_average(changed, "run")
    assert (average.start_step, average.end_step) == (5, 49)
    expected = every_answer(plain, "run")  # the same run cut at step 49
    for part in part_files(plain / "run")[5:]:
        part.unlink()
    assert every_answer(changed, "run") == every_answer(plain, "run") != expected


def test_a_text_update_flag_is_left_out_and_balance_summary_answers(tmp_path):
    plain, changed = plain_and_changed(tmp_path, cast_column("step_update_skipped", pa.string()), parts={2})
    (problem,) = listed(changed).loc["run", "problems"]
    assert "part-000003.parquet" in problem and "'step_update_skipped'" in problem
    figures = analysis.balance_summary(changed, "run")
    for part in part_files(plain / "run")[2:3]:
        part.unlink()
    assert rounded(figures) == rounded(analysis.balance_summary(plain, "run"))


def test_columns_missing_from_every_file_and_stray_columns_do_not_break_a_query(tmp_path):
    def strip(table: pa.Table) -> pa.Table:
        table = table.drop(["balancer_weight", "target_norm", "step_update_skipped", "epoch"])
        for name in ("run_id", "rank", "x_lo", "bucket"):
            table = table.append_column(name, pa.array(["stray"] * table.num_rows))
        return table

    plain, changed = plain_and_changed(tmp_path, strip)
    answers = every_answer(changed, "run")
    assert {row["run_id"] for row in answers["series"]} == {"run"}
    assert answers["weights"] == every_answer(plain, "run")["weights"]  # balancer_weight falls back to weight
    assert answers["balance_summary"]["skipped_updates"] == 0


def test_columns_whose_names_differ_only_in_case_are_left_out(tmp_path):
    def shout(table: pa.Table) -> pa.Table:
        return table.append_column("LOSS", pa.array(["x"] * table.num_rows))

    plain, changed = plain_and_changed(tmp_path, shout, parts={0})
    (problem,) = listed(changed).loc["run", "problems"]
    assert "part-000001.parquet" in problem and "case" in problem
    every_answer(changed, "run")


def test_a_duckdb_error_reaches_the_caller_as_an_analysis_error(tmp_path):
    from gradnorm.toolkit.analysis import source

    write_run(tmp_path, "run")
    run_list = source.resolve_runs(tmp_path, ["run"])
    with pytest.raises(analysis.AnalysisError, match="no_such_column"):
        source.query(run_list, "SELECT no_such_column FROM metrics")


# -- what a run lost -------------------------------------------------------------------------------
def test_a_run_that_lost_rows_says_so_in_the_listing(tmp_path):
    write_run(tmp_path, "clean")
    lossy = write_run(tmp_path, "lossy", meta=run_json("lossy", rows_lost=40, write_errors=3))
    (lossy / schema.METRICS_DIR / "rank=1").mkdir()
    (lossy / schema.METRICS_DIR / "rank=1" / runs.RANK_FILE).write_text(json.dumps({"rank": 1, "status": "finished", "rows_lost": 2, "write_errors": 1}))
    retried = write_run(tmp_path, "retried", meta=run_json("retried", rows_lost=0, write_errors=2))
    write_run(tmp_path, "odd-counts", meta=run_json("odd-counts", rows_lost="lots", write_errors=-1))
    listing = listed(tmp_path)
    assert listing.loc["clean", "status"] == runs.FINISHED
    assert (listing.loc["clean", "rows_lost"], listing.loc["clean", "write_errors"]) == (0, 0)
    assert listing.loc["lossy", "status"] == analysis.FINISHED_ROWS_LOST
    assert (listing.loc["lossy", "rows_lost"], listing.loc["lossy", "write_errors"]) == (42, 4)
    assert any("42 row(s) could not be written" in p for p in listing.loc["lossy", "problems"])
    assert listing.loc["retried", "status"] == runs.FINISHED and listing.loc["retried", "write_errors"] == 2
    assert retried.name in listing.index
    assert pd.isna(listing.loc["odd-counts", "rows_lost"]) and pd.isna(listing.loc["odd-counts", "write_errors"])
    assert any("rows_lost" in p and "'lots'" in p for p in listing.loc["odd-counts", "problems"])


def test_summary_prints_the_lost_rows_and_what_it_left_out(tmp_path, capsys):
    lossy = write_run(tmp_path, "lossy", meta=run_json("lossy", rows_lost=40, write_errors=3))
    damaged = part_files(lossy)[2]
    damaged.write_bytes(damaged.read_bytes()[:200])
    assert cli.main(["summary", "--root", str(tmp_path), "lossy"]) == 0
    out, err = capsys.readouterr()
    assert "finished, rows lost" in out and "40 row(s) could not be written" in out
    assert str(damaged) in err and "left out" in err
    assert cli.main(["export", "--root", str(tmp_path), "lossy", "--out", str(tmp_path / "w.json")]) == 0
    assert str(damaged) in capsys.readouterr().err
    assert cli.main(["report", "--root", str(tmp_path), "lossy", "--out", str(tmp_path / "r.html")]) == 0
    assert str(damaged) in capsys.readouterr().err
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "finished, rows lost" in page and "40 row(s) could not be written" in page and damaged.name in page


def test_summary_of_a_clean_run_prints_nothing_on_stderr(tmp_path, capsys):
    write_run(tmp_path, "clean")
    assert cli.main(["summary", "--root", str(tmp_path), "clean"]) == 0
    assert capsys.readouterr().err == ""


def test_summary_writes_control_characters_of_names_as_escapes(tmp_path, capsys):
    tasks = ["clear\x1b[2Jscreen", "forged\nline"]
    write_run(tmp_path, "odd", tasks=tasks, meta=run_json("odd", tasks=tasks, balancer={"name": "bell\x07"}))
    assert cli.main(["summary", "--root", str(tmp_path), "odd"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "clear\\x1b[2Jscreen" in out and "forged\\nline" in out and "bell\\x07" in out
