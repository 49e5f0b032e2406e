"""``gradnorm summary`` of a shadow run: the weights used and what GradNorm would have set, labelled; the
overfitting gap is relative and says so, or says that no validation was logged."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from torch import nn

from gradnorm import cli, hooks
from gradnorm.toolkit import analysis
from gradnorm.toolkit.balancers import GradNorm

USER_WEIGHTS = {"a": 0.5, "b": 2.0}


@pytest.fixture(scope="module")
def shadow_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shadow")
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(2))
    optimizer = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.05)
    x, targets = torch.randn(64, 5), [torch.randn(64, 1), 5 * torch.randn(64, 1)]
    with hooks.attach(trunk[2], GradNorm(alpha=0.5), runs_root=root, run_name="shadow", shadow=True, weights=USER_WEIGHTS, flush_every=9) as session:
        for step in range(60):
            features = trunk(x)
            losses = {name: ((head(features) - y) ** 2).mean() for name, head, y in zip("ab", heads, targets)}
            loss = session.loss(losses)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if (step + 1) % 10 == 0:  # validation for task a only
                session.log_validation({"a": float(losses["a"].detach()) * 1.25}, step=step)
    return root


def read_train(root):
    table = ds.dataset(str(root / "shadow" / "metrics"), format="parquet", partitioning="hive").to_table().to_pandas()
    return table[table["split"] == "train"]


def test_summary_separates_the_weights_used_from_the_balancers(shadow_root):
    table = analysis.summary(shadow_root, "shadow", window=(10, 59)).set_index("task")
    train = read_train(shadow_root)
    window = train[(train["step"] >= 10) & (train["step"] <= 59)]
    for task, used in USER_WEIGHTS.items():
        rows = window[window["task"] == task]
        assert table.loc[task, "applied_weight_mean"] == pytest.approx(used)
        assert table.loc[task, "weight_mean"] == pytest.approx(rows["balancer_weight"].mean(), rel=1e-12)
        assert table.loc[task, "weight_mean"] != pytest.approx(used)  # GradNorm moved away from the user's weights


def test_overfitting_gap_is_relative_and_missing_without_validation(shadow_root):
    table = analysis.summary(shadow_root, "shadow").set_index("task")
    pairs = analysis.overfitting(shadow_root, "shadow", max_points=0)
    last = pairs[pairs["task"] == "a"].iloc[-1]
    assert table.loc["a", "overfitting_gap"] == pytest.approx((last["val_loss"] - last["train_loss"]) / last["train_loss"], rel=1e-12)
    assert np.isnan(table.loc["b", "overfitting_gap"])


def test_summary_command_labels_both_weights_and_the_gap(shadow_root, capsys):
    assert cli.main(["summary", "shadow", "--root", str(shadow_root)]) == 0
    printed = capsys.readouterr().out
    assert "shadow" in printed and "gradnorm would set" in printed and "weights used (yours)" in printed
    assert "0.5000" in printed and "2.0000" in printed
    assert "no validation logged" in printed and "nan" not in printed.lower()
    assert "(validation - training loss) / training loss" in printed
    assert "%" in printed.split("\n")[2]  # task a's gap, as a percentage
