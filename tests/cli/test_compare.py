"""``gradnorm compare``: every method's runs carry the same per-task rows, and the table's figures are the
ones the runs' own records imply."""

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest

from gradnorm import cli
from gradnorm.experiments import compare, qm9

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
            "--cost-rounds",  # the interleaved cost table: one round keeps the fixture fast; tests/experiments checks it
            "1",
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
        for method in compare.default_methods():
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
            if method in ("pcgrad", "mgda", "mgda-ub", "famo", "db-mtl") + compare.TORCHJD_METHODS:
                assert meta["balancer"]["recorded_weight"].startswith("effective")


def test_table_matches_the_records(small_compare):
    runs, text = small_compare
    for title, problem, tasks in (("Toy", "toy-T2", ["task0", "task1"]), ("Palmer", "penguins", ["species", "sex", "body_mass"])):
        rows = table_rows(text, title)
        assert set(rows) == set(compare.default_methods())
        for method, cells in rows.items():
            run = runs / f"{problem}-{method}-s0"
            initial = json.loads((run / "run.json").read_text())["config"]["initial_test_losses"]
            val = read_rows(run).filter(pc.field("split") == "val").to_pandas()
            final = val[val.step == val.step.max()].set_index("task")["loss"]
            normalized = sum(final[t] / initial[t] for t in tasks)
            assert float(cells[-2]) == pytest.approx(normalized, abs=2e-4), (problem, method)
            if problem == "toy-T2":
                assert [float(c) for c in cells[:2]] == pytest.approx([final[t] / initial[t] for t in tasks], abs=2e-4)


def test_same_initialisation_for_every_method(small_compare):
    runs, _ = small_compare
    first_losses = {
        method: read_rows(runs / f"penguins-{method}-s0").filter((pc.field("split") == "train") & (pc.field("step") == 0)).column("loss").to_pylist()
        for method in compare.default_methods()
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


def test_every_table_lists_the_step_cost_next_to_the_quality(small_compare):
    _, text = small_compare
    for title in ("Toy", "Palmer"):
        section = text.split(f"### {title}", 1)[1].split("###", 1)[0]
        header = next(line for line in section.splitlines() if line.startswith("| method"))
        assert header.rstrip(" |").endswith(compare.COST_COLUMN)
        rows = table_rows(text, title)
        assert rows["equal"][-1] == "1.00"  # one seed: the reference itself, no spread
        for method, cells in rows.items():
            assert float(cells[-1]) > 0, method


def test_cost_ratio_and_delta_m_against_the_same_seeds_equal_run():
    def result(method, seed, cpu, errors):
        return compare.MethodResult(method, seed, errors, 0.0, 0.0, f"{method}-{seed}", [], cpu)

    base = {t: 1.0 for t in qm9.TASKS}
    worse = dict(base, mu=1.5, cv=0.5, homo=2.0)  # (+50 - 50 + 100) / 11 tasks
    results = [
        result("equal", 0, 0.01, base),
        result("equal", 1, 0.02, dict(base, mu=2.0)),
        result("famo", 0, 0.03, worse),
        result("famo", 1, 0.02, dict(worse, mu=2.0)),
    ]
    ratios = compare.step_cost_ratios(results)
    assert ratios[("famo", 0)] == pytest.approx(3.0) and ratios[("famo", 1)] == pytest.approx(1.0)
    deltas = compare.qm9_delta_m(results)
    assert deltas[("famo", 0)] == pytest.approx(100.0 / 11)
    assert deltas[("famo", 1)] == pytest.approx(100.0 * (-0.5 + 1.0) / 11)
    table = compare.format_table("QM9", results, compare.qm9_columns(results))
    famo = [line for line in table.splitlines() if line.startswith("| famo")][0]
    assert famo.rstrip(" |").endswith("2.00 ± 1.41")


def test_methods_run_in_a_fixed_order_and_unknown_ones_are_named():
    assert compare.ordered(["famo", "static", "gradnorm", "equal"]) == ["equal", "famo", "gradnorm", "static"]
    with pytest.raises(ValueError, match="'sgdr'"):
        compare.ordered(["sgdr"])
    assert set(compare.METHODS) <= set(compare.default_methods()) <= set(compare.ALL_METHODS)


needs_qm9 = pytest.mark.skipif(importlib.util.find_spec("qm9pack") is None, reason="qm9pack is not installed (the 'qm9' extra; never in CI)")


@needs_qm9
def test_qm9_loader_reads_the_first_molecules():
    """Methane, ammonia and water from qm9pack's files: atomisation energies from QM9's atomref by hand, the
    Coulomb matrix of water by hand, atom counts."""
    frame = qm9.read_molecules(rows=3)
    features, targets = qm9.features_and_targets(frame)
    # methane: U0 = -40.47893 Ha, free atoms C -37.846772 and 4 x H -0.500273
    assert targets[0, qm9.TASKS.index("u0")] == pytest.approx((-40.47893 + 37.846772 + 4 * 0.500273) * 27.211386, abs=1e-4)
    assert targets[0, qm9.TASKS.index("homo")] == pytest.approx(-0.3877 * 27.211386, abs=1e-4)
    assert targets[2, qm9.TASKS.index("cv")] == pytest.approx(frame["Heatcapacity_Cv_cal_mol_K"][2])
    np.testing.assert_array_equal(features[:, qm9.MAX_ATOMS :], [[4, 1, 0, 0, 0], [3, 0, 1, 0, 0], [2, 0, 0, 1, 0]])
    positions = qm9.parse_positions(frame["XYZ_Ang"][2], 3, 2)
    charges = np.array([8.0, 1.0, 1.0])
    matrix = np.array(
        [[0.5 * charges[i] ** 2.4 if i == j else charges[i] * charges[j] / np.linalg.norm(positions[i] - positions[j]) for j in range(3)] for i in range(3)]
    )
    np.testing.assert_allclose(features[2, :3], sorted(np.linalg.eigvalsh(matrix), reverse=True), rtol=1e-10)
    assert (features[2, 3 : qm9.MAX_ATOMS] == 0).all()


@needs_qm9
@pytest.mark.slow
def test_compare_on_qm9_writes_delta_m_and_cost(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "t.md"
    args = ["compare", "--dataset", "qm9", "--methods", "equal", "famo", "--qm9-steps", "3", "--qm9-train-size", "40", "--qm9-test-size", "20"]
    assert cli.main(args + ["--seeds", "1", "--runs-root", str(tmp_path / "runs"), "--out", str(out), "--no-progress"]) == 0
    rows = table_rows(out.read_text(), "QM9")
    assert set(rows) == {"equal", "famo"} and rows["equal"][-2:] == ["0.0", "1.00"]
    partial = [json.loads(line) for line in (tmp_path / "runs" / "qm9-results.jsonl").read_text().splitlines()]
    assert [p["method"] for p in partial] == ["equal", "famo"]
    assert rows["famo"][0] == f"{partial[1]['task_errors']['mu']:.3f}"
