"""Run names cannot escape the runs root; task names are data, whatever characters they hold."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from gradnorm import hooks
from gradnorm.toolkit import runs, schema
from gradnorm.toolkit.balancers import EqualWeights

ESCAPING_NAMES = [
    "../../etc",
    "..",
    ".",
    "../x",
    "a/../../b",
    "/etc",
    "/tmp/x",
    "a/b",
    "a\\..\\b",
    ".hidden",
    "",
    "x" * 129,
    "run\x00name",
    "run\nname",
    "run\n",  # a trailing newline slips past a regex ending in $
    "name'; DROP TABLE runs; --",
    'quote"d',
    "space name",
    "~root",
    "$(whoami)",
]

#: Task names a user may legitimately pick, or a hostile file may carry: all must round-trip as data.
HOSTILE_TASK_NAMES = [
    "depth'; DROP TABLE metrics; --",
    'normals" OR 1=1 --',
    "semantic/../../etc",
    "ünïcödé ✓",
    "tab\tand\nnewline",
    "%s {0} $1 ?",
]


@pytest.mark.parametrize("name", ESCAPING_NAMES)
def test_run_names_that_could_escape_or_confuse_are_refused(tmp_path, name):
    with pytest.raises(runs.RunError, match=r"invalid run name .*use letters, digits"):
        runs.validate_run_id(name)
    with pytest.raises(runs.RunError, match=r"invalid run name"):
        runs.create_run(tmp_path / "root", name, {"tasks": ["a", "b"]})
    # Nothing was created anywhere: not even the root.
    assert not (tmp_path / "root").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", [None, 3, b"run", ["run"]])
def test_run_names_that_are_not_strings_are_refused(name):
    with pytest.raises(runs.RunError, match=r"invalid run name"):
        runs.validate_run_id(name)


@pytest.mark.parametrize("name", ["run-1", "gradnorm_alpha=0.12", "A.b-c_d=e", "x" * 128])
def test_plain_run_names_are_accepted(name):
    assert runs.validate_run_id(name) == name


def test_attach_refuses_an_escaping_run_name_before_writing_anything(tmp_path):
    torch.manual_seed(0)
    trunk = nn.Linear(3, 4)
    heads = [nn.Linear(4, 1), nn.Linear(4, 1)]
    session = hooks.attach(trunk, EqualWeights(), runs_root=tmp_path / "runs", run_name="../../etc")
    h = trunk(torch.randn(5, 3))
    with pytest.raises(runs.RunError, match=r"invalid run name '\.\./\.\./etc'"):
        session.loss({"a": heads[0](h).pow(2).mean() + 1, "b": heads[1](h).pow(2).mean() + 1})
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "etc").exists()


def test_hostile_task_names_are_recorded_as_data(tmp_path):
    torch.manual_seed(0)
    trunk = nn.Linear(3, 4)
    heads = [nn.Linear(4, 1) for _ in HOSTILE_TASK_NAMES]
    session = hooks.attach(trunk, EqualWeights(), runs_root=tmp_path, run_name="hostile-tasks", flush_every=2)
    for _ in range(3):
        h = trunk(torch.randn(5, 3))
        session.loss({name: head(h).pow(2).mean() + 1 for name, head in zip(HOSTILE_TASK_NAMES, heads)}).backward()
    session.log_validation({HOSTILE_TASK_NAMES[0]: 0.5})
    session.close()
    meta = runs.read_run_json(tmp_path / "hostile-tasks")
    assert meta["tasks"] == HOSTILE_TASK_NAMES
    table = pq.read_table(tmp_path / "hostile-tasks" / schema.METRICS_DIR)
    assert table.num_rows == 3 * len(HOSTILE_TASK_NAMES) + 1
    assert set(table.column("task").to_pylist()) == set(HOSTILE_TASK_NAMES)
    # Nothing was created outside the run directory by a task name that looks like a path.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile-tasks"]


@pytest.mark.parametrize("command", ["summary", "export"])
def test_the_command_line_refuses_escaping_run_names_with_a_message(tmp_path, capsys, command):
    from gradnorm import cli

    (tmp_path / "root").mkdir()
    code = cli.main([command, "--root", str(tmp_path / "root"), "../../etc"])
    assert code == 2
    assert f"gradnorm {command}: error: invalid run name '../../etc'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]
