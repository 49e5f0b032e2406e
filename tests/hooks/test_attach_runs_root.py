"""attach() refuses an unusable runs root and a taken run name at once, naming the cause, and sessions
started together get runs of their own."""

from __future__ import annotations

import pytest
from torch import nn

import gradnorm
from gradnorm.toolkit import runs


def test_a_runs_root_that_is_a_file_is_refused_at_attach(tmp_path):
    root = tmp_path / "runs"
    root.write_text("not a folder")
    with pytest.raises(runs.RunError, match=str(root)):
        gradnorm.attach(nn.Linear(4, 4), gradnorm.GradNorm(), runs_root=root)


def test_a_taken_name_is_refused_at_attach_and_default_names_do_not_collide(tmp_path):
    layer = nn.Linear(4, 4)
    first = gradnorm.attach(layer, gradnorm.GradNorm(), runs_root=tmp_path, run_name="job")
    with pytest.raises(runs.RunError, match="job"):
        gradnorm.attach(layer, gradnorm.GradNorm(), runs_root=tmp_path, run_name="job")
    first.close()
    together = [gradnorm.attach(nn.Linear(4, 4), gradnorm.GradNorm(), runs_root=tmp_path) for _ in range(3)]
    assert len({session.run_name for session in together}) == 3
    for session in together:
        session.close()


def test_a_session_closed_before_its_first_step_leaves_no_run(tmp_path):
    session = gradnorm.attach(nn.Linear(4, 4), gradnorm.GradNorm(), runs_root=tmp_path, run_name="never-stepped")
    assert (tmp_path / "never-stepped").is_dir()
    session.close()
    assert not (tmp_path / "never-stepped").exists()
    again = gradnorm.attach(nn.Linear(4, 4), gradnorm.GradNorm(), runs_root=tmp_path, run_name="never-stepped")
    again.close()
