"""``gradnorm compare``: every method's runs carry the same per-task rows, and the table's figures are the
ones the runs' own records imply."""

import json
import re
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest

from gradnorm import cli
from gradnorm.experiments import compare

PER_TASK = ("loss", "loss_ratio", "weight", "grad_norm")


@pytest.fixture(scope="module")
def small_compare(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    out = root / "table.md"
    code = cli.main(
        [
            "compare",
            "--tasks",
            "2",
            "--toy-steps",
            "4",
            "--toy-train-size",
            "200",
            "--penguin-steps",
            "4",
            "--seeds",
            "1",
            "--runs-root",
            str(root / "runs"),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    return root / "runs", out.read_text()


def read_rows(run: Path):
    return ds.dataset(run / "metrics", format="parquet", partitioning="hive").to_table()


def table_rows(text: str, title_start: str) -> dict[str, list[str]]:
    section = text.split(f"### {title_start}", 1)[1].split("###", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("method",):
            rows[cells[0]] = cells[1:]
    return rows


def test_every_method_records_the_same_per_task_rows(small_compare):
    runs, _ = small_compare
    for problem, tasks in (("toy-T2", {"task0", "task1"}), ("penguins", {"species", "sex", "body_mass"})):
        for method in compare.METHODS:
            run = runs / f"{problem}-{method}-s0"
            meta = json.loads((run / "run.json").read_text())
            assert meta["status"] == "finished"
            train = read_rows(run).filter(pc.field("split") == "train")
            assert set(train.column("task").to_pylist()) == tasks
            assert train.num_rows == 4 * len(tasks)
            for column in PER_TASK:
                assert train.column(column).null_count == 0, (run.name, column)
            if method in ("uncertainty", "uncertainty-log1p"):
                assert "trainable_state" in meta["balancer"]
            if method in ("pcgrad", "mgda", "mgda-ub"):
                assert meta["balancer"]["recorded_weight"].startswith("effective")


def test_table_matches_the_records(small_compare):
    runs, text = small_compare
    for title, problem, tasks in (("Toy", "toy-T2", ["task0", "task1"]), ("Palmer", "penguins", ["species", "sex", "body_mass"])):
        rows = table_rows(text, title)
        assert set(rows) == set(compare.METHODS)
        for method, cells in rows.items():
            run = runs / f"{problem}-{method}-s0"
            initial = json.loads((run / "run.json").read_text())["config"]["initial_test_losses"]
            val = read_rows(run).filter(pc.field("split") == "val").to_pandas()
            final = val[val.step == val.step.max()].set_index("task")["loss"]
            normalized = sum(final[t] / initial[t] for t in tasks)
            assert float(cells[-1]) == pytest.approx(normalized, abs=2e-4), (problem, method)
            if problem == "toy-T2":
                assert [float(c) for c in cells[:2]] == pytest.approx([final[t] / initial[t] for t in tasks], abs=2e-4)


def test_same_initialisation_for_every_method(small_compare):
    runs, _ = small_compare
    first_losses = {
        method: read_rows(runs / f"penguins-{method}-s0").filter((pc.field("split") == "train") & (pc.field("step") == 0)).column("loss").to_pylist()
        for method in compare.METHODS
    }
    reference = first_losses["equal"]
    for method, losses in first_losses.items():
        assert losses == pytest.approx(reference, rel=1e-6), method


def test_bad_method_names_and_options_are_errors(tmp_path, capsys):
    assert cli.main(["compare", "--methods", "equal", "sgdr", "--runs-root", str(tmp_path), "--no-progress"]) == 2
    assert "sgdr" in capsys.readouterr().err
    assert cli.main(["compare", "--methods", "static", "--runs-root", str(tmp_path), "--no-progress"]) == 2
    assert "gradnorm" in capsys.readouterr().err
    assert cli.main(["compare", "--seeds", "0", "--runs-root", str(tmp_path), "--no-progress"]) == 2
    assert re.search("seeds", capsys.readouterr().err)
