"""The Compare runs view grouped: one row per group, each task's mean validation loss with its spread and
run count, Delta_m% against a baseline group; the figures checked against the validation rows read from the
part files with pyarrow and combined with the statistics module, the spread as the band control says."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import pytest

from gradnorm.app import _grouping as grouping
from tests.app.test_app import chart_specs, no_failure, opened_clean
from tests.helpers.synthetic_runs import final_validation_losses, run_json, write_run

#: run -> steps; qm9-gradnorm-s2 validates task a only.
SEEDS = {"qm9-equal-s0": 40, "qm9-equal-s1": 60, "qm9-gradnorm-s0": 50, "qm9-gradnorm-s1": 70, "qm9-gradnorm-s2": 90}


def _root(root: Path) -> Path:
    for name, steps in SEEDS.items():
        tasks = ("a",) if name == "qm9-gradnorm-s2" else ("a", "b")
        meta = run_json(name, tasks=tasks, balancer={"name": "gradnorm" if "gradnorm" in name else "equal"}, config={"seed": int(name[-1])})
        write_run(root, name, steps=steps, tasks=tasks, meta=meta)
    return root


def _final(root: Path) -> dict[tuple[str, str], float]:
    return final_validation_losses(root, list(SEEDS))


def test_the_grouped_comparison_has_one_row_per_group_with_mean_spread_and_n(monkeypatch, tmp_path):
    root = _root(tmp_path)
    at = opened_clean(monkeypatch, {"run": list(SEEDS), "view": "Compare runs", "group": "name", "band": "std"}, root)
    assert not at.selectbox(key="group").disabled and not at.radio(key="band").disabled
    assert at.selectbox(key="baseline_group").value == "qm9-equal"  # the group of the equal-weights run
    final = _final(root)
    groups = {"qm9-equal": ["qm9-equal-s0", "qm9-equal-s1"], "qm9-gradnorm": ["qm9-gradnorm-s0", "qm9-gradnorm-s1", "qm9-gradnorm-s2"]}
    means = {}
    summary, table = at.dataframe[1].value, at.dataframe[2].value
    assert list(table.index) == list(groups) and list(table.columns) == ["a", "b"]
    for group, runs in groups.items():
        for task in ("a", "b"):
            values = [final[(r, task)] for r in runs if (r, task) in final]
            means[(group, task)] = statistics.fmean(values)
            expected = f"{statistics.fmean(values):.5g} ± {statistics.pstdev(values):.2g} (n={len(values)})"
            assert table.loc[group, task] == expected
    delta = statistics.fmean((means[("qm9-gradnorm", t)] - means[("qm9-equal", t)]) / means[("qm9-equal", t)] * 100 for t in ("a", "b"))
    rows = summary.set_index("group")
    assert list(rows.index) == list(groups)
    assert rows.loc["qm9-gradnorm", "Delta_m% vs qm9-equal"].startswith(f"{delta:+.2f} ± ")
    assert rows.loc["qm9-gradnorm", "runs"] == "3" and rows.loc["qm9-gradnorm", "tasks compared"] == 2
    notes = [info.value for info in at.info]
    assert any(n.startswith("group qm9-gradnorm: only 2 of its 3 run(s) with validation losses validated task(s) b") for n in notes), notes
    # the bars are the groups' mean changes against the baseline group
    ((spec, datasets),) = chart_specs(at)
    assert spec["layer"][0]["encoding"]["color"]["legend"]["title"] == "group"
    (bars,) = [frame for frame in datasets.values() if "delta_pct" in frame.columns]
    drawn = bars.set_index(["run_id", "task"])["delta_pct"]
    for task in ("a", "b"):
        change = (means[("qm9-gradnorm", task)] - means[("qm9-equal", task)]) / means[("qm9-equal", task)] * 100
        assert drawn[("qm9-gradnorm", task)] == pytest.approx(change, rel=1e-9)
    # the band control: min-max, then the mean alone
    at.radio(key="band").set_value("minmax").run()
    no_failure(at)
    values = [final[(r, "a")] for r in groups["qm9-gradnorm"]]
    assert at.dataframe[2].value.loc["qm9-gradnorm", "a"] == f"{statistics.fmean(values):.5g} [{min(values):.5g}, {max(values):.5g}] (n=3)"
    at.radio(key="band").set_value("none").run()
    assert at.dataframe[2].value.loc["qm9-gradnorm", "a"] == f"{statistics.fmean(values):.5g} (n=3)"
    # another baseline group: Delta_m% against it
    at.selectbox(key="baseline_group").set_value("qm9-gradnorm").run()
    no_failure(at)
    rows = at.dataframe[1].value.set_index("group")
    back = statistics.fmean((means[("qm9-equal", t)] - means[("qm9-gradnorm", t)]) / means[("qm9-gradnorm", t)] * 100 for t in ("a", "b"))
    assert rows.loc["qm9-equal", "Delta_m% vs qm9-gradnorm"] == f"{back:+.2f} (n=2)"
    # no grouping: the per-run table again
    at.selectbox(key="group").set_value("none").run()
    no_failure(at)
    assert list(at.dataframe[1].value["run"]) == list(SEEDS)


def test_the_better_group_cells_are_marked(monkeypatch, tmp_path):
    """The page marks the cells the library flags: the lowest mean of each task, the lowest Delta_m%."""
    from gradnorm.toolkit import analysis

    root = _root(tmp_path)
    per_task = analysis.compare_runs(root, list(SEEDS)).per_task
    members = grouping.groups(list(SEEDS), grouping.NAME, {})
    result = analysis.grouped_comparison(per_task, members, baseline="qm9-equal")
    _, summary_best, table, table_best = grouping.comparison_tables(result, "std")
    final = _final(root)
    for task in ("a", "b"):
        means = {g: statistics.fmean(final[(r, task)] for r in runs if (r, task) in final) for g, runs in members.items()}
        assert table_best[task].to_dict() == {g: m == min(means.values()) for g, m in means.items()}
    assert summary_best["Delta_m% vs qm9-equal"].sum() == 1 and not summary_best["group"].any()
    # the page draws those marks (the Styler's cell styles travel with the dataframe element)
    at = opened_clean(monkeypatch, {"run": list(SEEDS), "view": "Compare runs", "group": "name"}, root)
    styles = at.dataframe[2].proto.arrow_data.styler.styles
    (marked,) = [rule.split("{")[0] for rule in styles.split("}") if "font-weight: bold" in rule]
    cells = {(int(row), int(col)) for row, col in re.findall(r"row(\d+)_col(\d+)", marked)}
    flagged = table_best.to_numpy()
    assert cells == {(i, j) for i in range(flagged.shape[0]) for j in range(flagged.shape[1]) if flagged[i, j]}
