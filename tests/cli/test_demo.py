"""``gradnorm demo`` as a new user meets it: where it writes, what it prints, its thread setting."""

from __future__ import annotations

import torch

from gradnorm import cli
from gradnorm.experiments.threads import intra_op_threads


def test_demo_writes_into_runs_and_says_what_to_do_next(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--tasks", "2", "--steps", "20", "--no-progress"]) == 0
    first = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()) == ["toy-T2-equal", "toy-T2-gradnorm", "toy-T2-static-converged"]
    assert "gradnorm app" in first and "--root" not in first  # ./runs is the default root: no --root needed
    assert "gradnorm export toy-T2-gradnorm" in first
    # a second demo keeps the first one's runs and takes new names together
    assert cli.main(["demo", "--tasks", "2", "--steps", "20", "--no-progress"]) == 0
    assert "gradnorm export toy-T2-gradnorm-2" in capsys.readouterr().out
    assert (tmp_path / "runs" / "toy-T2-static-converged-2" / "run.json").is_file()


def test_demo_elsewhere_names_its_root_in_the_next_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--tasks", "2", "--steps", "20", "--no-progress", "--runs-root", str(tmp_path / "elsewhere")]) == 0
    assert f"gradnorm app --root {(tmp_path / 'elsewhere').resolve()}" in capsys.readouterr().out


def test_demo_refuses_one_task_and_too_few_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--tasks", "1"]) == 2
    assert "at least 2 tasks" in capsys.readouterr().err
    assert cli.main(["demo", "--steps", "3"]) == 2
    assert not (tmp_path / "runs").exists()


def test_thread_setting_is_restored_after_the_block():
    before = torch.get_num_threads()
    with intra_op_threads(1) as inside:
        assert inside == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with intra_op_threads(None) as inside:
        assert inside == before
