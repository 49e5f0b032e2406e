"""Tasks missing from a step, on the Palmer penguins, where ``sex`` is genuinely unknown for some rows: the
present tasks are balanced among themselves (the paper's equations over the present tasks), the absent
task's weight and optimiser state stay, the records mark it absent, and L_i(0) of a task first seen late
is its first observed loss. The weights are checked against an independent computation: one scalar
weight per task with its own ``torch.optim.Adam``, L_grad formed with autograd over the present tasks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import pyarrow.parquet as pq
import pytest
import torch
from torch.nn import functional as F

import gradnorm
from gradnorm.experiments import penguins
from gradnorm.toolkit import analysis, schema

pytest.importorskip("palmerpenguins", reason="palmerpenguins is not installed")

ALPHA, LR = 1.5, 0.025


def _penguins_with_unknown_sex() -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Every penguin with its measurements, the ones whose sex is not recorded included (a mask says which)."""
    from palmerpenguins import load_penguins

    frame = load_penguins().dropna(subset=list(penguins.FEATURES) + ["island", "species", "body_mass_g"]).reset_index(drop=True)
    known = torch.tensor(frame["sex"].notna().to_numpy())
    species = sorted(frame["species"].unique())
    islands = sorted(frame["island"].unique())
    numeric = torch.tensor(frame[list(penguins.FEATURES)].to_numpy(), dtype=torch.float64)
    island = F.one_hot(torch.tensor(frame["island"].map(islands.index).to_numpy()), len(islands)).double()
    x = torch.cat([(numeric - numeric.mean(0)) / numeric.std(0), island], dim=1)
    labels = {
        "species": torch.tensor(frame["species"].map(species.index).to_numpy()),
        "sex": torch.tensor((frame["sex"] == "male").astype(int).to_numpy()),
        "body_mass": torch.tensor(frame["body_mass_g"].to_numpy() / 1000.0, dtype=torch.float64),
    }
    return x, labels, known


class Reference:
    """GradNorm over the present tasks, written from the paper's equations with autograd and torch.optim."""

    def __init__(self, tasks: list[str]) -> None:
        self.tasks = tasks
        self.w = {t: torch.ones((), dtype=torch.float64, requires_grad=True) for t in tasks}
        self.opt = {t: torch.optim.Adam([self.w[t]], lr=LR) for t in tasks}
        self.initial: dict[str, float] = {}

    def weights(self) -> list[float]:
        return [float(self.w[t]) for t in self.tasks]

    def step(self, losses: dict[str, float], norms: dict[str, float]) -> None:
        present = [t for t in self.tasks if t in losses]
        for t in present:
            self.initial.setdefault(t, losses[t])  # L_i(0): the first loss observed for the task
        if len(present) < 2:
            return
        ratio = {t: losses[t] / self.initial[t] for t in present}
        mean_ratio = sum(ratio.values()) / len(present)
        grads = {t: self.w[t] * norms[t] for t in present}  # G_i = w_i n_i
        mean_g = sum(float(g) for g in grads.values()) / len(present)
        grad_loss = sum((grads[t] - mean_g * (ratio[t] / mean_ratio) ** ALPHA).abs() for t in present) / len(present)
        for t in present:
            self.opt[t].zero_grad()
        grad_loss.backward()
        share = sum(float(self.w[t]) for t in present)
        for t in present:
            self.opt[t].step()
        with torch.no_grad():
            total = sum(float(self.w[t]) for t in present)
            for t in present:
                self.w[t].mul_(share / total)


def _train(tmp_path: Path, name: str, batches: list[tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, bool]]]) -> tuple[list, list, Reference]:
    torch.manual_seed(1)
    model = penguins.PenguinNet(batches[0][0].shape[1], 3).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    session = gradnorm.attach(
        model.shared_layer, gradnorm.GradNorm(alpha=ALPHA, lr=LR), runs_root=tmp_path, run_name=name, heads=None, flush_every=7, tasks=list(penguins.TASKS)
    )
    reference = Reference(list(penguins.TASKS))
    ours, theirs = [], []
    for x, y, present in batches:
        out = model(x)
        full = penguins.task_losses(out, y)
        losses = {t: full[t] for t in penguins.TASKS if present[t]}
        # n_i = ||grad_W L_i||, measured here on our own, for the reference.
        norms = {t: float(torch.autograd.grad(losses[t], model.shared_layer.weight, retain_graph=True)[0].norm()) for t in losses}
        loss = session.loss(losses)
        opt.zero_grad()
        loss.backward()
        opt.step()
        reference.step({t: float(v) for t, v in losses.items()}, norms)
        ours.append(list(session.weights().values()))
        theirs.append(reference.weights())
    session.close()
    return ours, theirs, reference


def _batches_without_sex_labels() -> list[tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, bool]]]:
    """Batches of 16 penguins whose sex is known, and every fourth batch the penguins whose sex is not recorded."""
    x, labels, known = _penguins_with_unknown_sex()
    unknown = (~known).nonzero().flatten()
    labelled = known.nonzero().flatten()
    assert len(unknown) == 9  # 11 lack sex, 2 of them lack every measurement as well
    batches = []
    for index, start in enumerate(range(0, 16 * 24, 16)):
        rows = labelled[start % len(labelled) : start % len(labelled) + 16]
        batches.append((x[rows], {k: v[rows] for k, v in labels.items()}, {"species": True, "sex": True, "body_mass": True}))
        if index % 4 == 3:
            batches.append((x[unknown], {k: v[unknown] for k, v in labels.items()}, {"species": True, "sex": False, "body_mass": True}))
    return batches


def test_batches_without_a_sex_label_balance_the_present_tasks(tmp_path: Path) -> None:
    batches = _batches_without_sex_labels()
    ours, theirs, _ = _train(tmp_path, "no-sex", batches)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert a == pytest.approx(b, rel=1e-9), f"step {step}"
        assert sum(a) == pytest.approx(3.0, rel=1e-12)
    # At a step without sex labels, the sex weight is exactly what it was, and the other two keep their sum.
    sex = penguins.TASKS.index("sex")
    for step, (_, _, present) in enumerate(batches):
        if not present["sex"]:
            assert ours[step][sex] == ours[step - 1][sex]
            assert sum(ours[step]) - ours[step][sex] == pytest.approx(sum(ours[step - 1]) - ours[step - 1][sex], rel=1e-12)

    table = pq.read_table(tmp_path / "no-sex" / "metrics" / "rank=0").to_pandas()
    rows = table[(table["split"] == schema.TRAIN) & (table["task"] == "sex")].sort_values("step")
    absent_steps = [s for s, (_, _, p) in enumerate(batches) if not p["sex"]]
    marked = rows[rows["present"] == False]  # noqa: E712 (a pandas column)
    assert marked["step"].tolist() == absent_steps
    assert marked["loss"].isna().all() and marked["grad_norm"].isna().all() and marked["loss_ratio"].isna().all()
    assert marked["weight"].notna().all()  # frozen, not unknown
    # E_t[w_i] of sex over the steps where it was present only.
    average = analysis.weight_average(tmp_path, "no-sex", window=(0, None)).table.set_index("task")
    assert average.loc["sex", "n"] == len(batches) - len(absent_steps) and average.loc["species", "n"] == len(batches)
    present_sex = [ours[s][sex] for s in range(len(batches)) if batches[s][2]["sex"]]
    # (the records hold the weight applied at each step, w(t); ours[s] is w(t+1))
    applied = [1.0] + [ours[s - 1][sex] for s in range(1, len(batches))]
    expected = sum(applied[s] for s in range(len(batches)) if batches[s][2]["sex"]) / len(present_sex)
    assert average.loc["sex", "mean"] == pytest.approx(expected, rel=1e-12)
    assert analysis.summary(tmp_path, "no-sex").set_index("task").loc["sex", "weight_mean"] == pytest.approx(
        analysis.weight_average(tmp_path, "no-sex").table.set_index("task").loc["sex", "mean"]
    )


def test_a_task_present_every_third_step_first_seen_late(tmp_path: Path) -> None:
    """body_mass is labelled at steps 2, 5, 8, ... only: its L_i(0) is its loss at step 2, its Adam state
    moves only at those steps, and the other two are balanced between themselves in between."""
    x, labels, known = _penguins_with_unknown_sex()
    rows = known.nonzero().flatten()
    batches = []
    for step in range(45):
        pick = rows[(step * 24) % (len(rows) - 24) :][:24]
        present = {"species": True, "sex": True, "body_mass": step % 3 == 2}
        batches.append((x[pick], {k: v[pick] for k, v in labels.items()}, present))
    ours, theirs, reference = _train(tmp_path, "thirds", batches)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert a == pytest.approx(b, rel=1e-9), f"step {step}"
    mass = penguins.TASKS.index("body_mass")
    assert ours[0][mass] == ours[1][mass] == 1.0  # untouched until it first appears
    table = pq.read_table(tmp_path / "thirds" / "metrics" / "rank=0").to_pandas()
    mass_rows = table[(table["split"] == schema.TRAIN) & (table["task"] == "body_mass")].set_index("step")
    assert mass_rows.loc[2, "loss_ratio"] == 1.0  # the first observed loss is the reference
    assert mass_rows.loc[5, "loss"] / mass_rows.loc[2, "loss"] == pytest.approx(mass_rows.loc[5, "loss_ratio"], rel=1e-12)
    assert math.isclose(reference.initial["body_mass"], mass_rows.loc[2, "loss"], rel_tol=1e-12)
    assert (mass_rows["present"] == [s % 3 == 2 for s in mass_rows.index]).all()


def test_missing_task_state_round_trip_and_refusals(tmp_path: Path) -> None:
    """The per-task L_i(0) counts and Adam step counts survive state_dict(); a balancer that balances all
    tasks at every step, a step with no loss at all, and an unknown task are refused with the reason."""
    torch.manual_seed(0)
    model = penguins.PenguinNet(7, 3)
    x = torch.randn(8, 7)
    y = {"species": torch.randint(0, 3, (8,)), "sex": torch.randint(0, 2, (8,)), "body_mass": torch.rand(8)}

    def losses(present: Optional[list[str]] = None) -> dict:
        full = penguins.task_losses(model(x), y)
        return {t: (full[t] if present is None or t in present else None) for t in penguins.TASKS}

    session = gradnorm.attach(model.shared_layer, gradnorm.GradNorm(), heads=None)
    session.loss(losses(["species", "sex"])).backward()
    session.loss(losses()).backward()
    state = session.state_dict()
    assert state["balancer"]["initial_loss"]["seen"] == [1, 1, 1]
    assert state["balancer"]["method"]["optimizer"]["steps"].tolist() == [2.0, 2.0, 1.0]
    other = gradnorm.attach(model.shared_layer, gradnorm.GradNorm(), heads=None)
    other.load_state_dict(state)
    a, b = session.loss(losses(["sex", "body_mass"])), other.loss(losses(["sex", "body_mass"]))
    a.backward()
    b.backward()
    assert session.weights() == other.weights()
    # ... and a step with every task after loading follows the same rule as in the uninterrupted session
    a, b = session.loss(losses()), other.loss(losses())
    a.backward()
    b.backward()
    assert session.weights() == other.weights()
    session.close()
    other.close()

    dwa = gradnorm.attach(model.shared_layer, gradnorm.DynamicWeightAverage(), heads=None)
    with pytest.raises(ValueError, match=r"lacks task\(s\) \['body_mass'\].*balances all tasks"):
        dwa.loss(losses(["species", "sex"]))
    dwa.close()
    s = gradnorm.attach(model.shared_layer, gradnorm.GradNorm(), heads=None)
    with pytest.raises(ValueError, match="no task's loss"):
        s.loss({t: None for t in penguins.TASKS})
    s.loss(losses()).backward()
    with pytest.raises(ValueError, match="unexpected"):
        s.loss({"species": losses()["species"], "colour": losses()["sex"]})
    s.close()
