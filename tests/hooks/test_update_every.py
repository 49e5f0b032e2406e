"""update_every=k: the norms are measured and the weights updated at every k-th step only; the steps
between run no measurement (no extra backward, no taps armed) and keep the weights; the records say
which steps measured."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import gradnorm
from gradnorm.toolkit import analysis, schema

T, STEPS = 3, 24


def _model(dtype: torch.dtype = torch.float64) -> tuple[nn.Module, nn.ModuleList]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU()).to(dtype)
    return trunk, nn.ModuleList([nn.Linear(12, 1) for _ in range(T)]).to(dtype)


def _batch(step: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(20, 5, generator=g).to(dtype), (torch.randn(20, T, generator=g) * torch.tensor([1.0, 5.0, 0.2])).to(dtype)


def _run(tmp_path: Path | None, name: str, heads, **options) -> tuple[list[list[float]], list[int], list[tuple[list[float], list[float]]]]:
    """Train STEPS steps; returns w after each step, the gradient computations W saw per step, and each
    step's losses and norms ||grad_W L_i|| measured here independently (before the session sees them)."""
    trunk, head_list = _model()
    opt = torch.optim.Adam(list(trunk.parameters()) + list(head_list.parameters()), lr=1e-2)
    session = gradnorm.attach(
        trunk[2], gradnorm.GradNorm(alpha=1.5), runs_root=tmp_path, run_name=name if tmp_path else None, heads=heads, flush_every=5, **options
    )
    counts = [0]
    trunk[2].weight.register_hook(lambda grad: counts.__setitem__(0, counts[0] + 1))
    trajectory, passes, measured = [], [], []
    for step in range(STEPS):
        x, y = _batch(step)
        z = trunk(x)
        losses = {f"t{i}": ((head_list[i](z)[:, 0] - y[:, i]) ** 2).mean() for i in range(T)}
        # The independent measurement goes through W too: count the passes the session makes on its own.
        norms = [float(torch.linalg.vector_norm(torch.autograd.grad(v, trunk[2].weight, retain_graph=True)[0])) for v in losses.values()]
        before = counts[0]
        loss = session.loss(losses)
        opt.zero_grad()
        loss.backward()
        opt.step()
        passes.append(counts[0] - before)
        trajectory.append(session.balancer.weights().tolist())
        measured.append(([float(v.detach()) for v in losses.values()], norms))
    session.close()
    return trajectory, passes, measured


@pytest.mark.parametrize("heads", [None, "auto"], ids=["general", "taps"])
def test_updates_only_every_kth_step(tmp_path: Path, heads) -> None:
    k = 4
    trajectory, passes, measured = _run(tmp_path, "every4", heads, update_every=k)
    # Between updates the weights stay; an update happens at each measured step.
    for step in range(1, STEPS):
        if step % k:
            assert trajectory[step] == trajectory[step - 1]
        else:
            assert trajectory[step] != trajectory[step - 1]
    # The steps between cost what an equal-weights step costs: the user's backward is the only pass
    # through W. A measured step adds T passes on the general path and none with the taps (from step 1).
    for step in range(STEPS):
        if step % k:
            assert passes[step] == 1, f"step {step}: {passes[step]} passes"
        elif heads is None or step == 0:
            assert passes[step] == 1 + T
        else:
            assert passes[step] == 1
    # The updates are GradNorm's on the measured steps' own losses and norms, as if only those steps existed.
    balancer = gradnorm.GradNorm(alpha=1.5)
    balancer.bind([f"t{i}" for i in range(T)], torch.device("cpu"), torch.float64)
    for step in range(0, STEPS, k):
        losses, norms = measured[step]
        balancer.update(torch.tensor(losses, dtype=torch.float64), torch.tensor(norms, dtype=torch.float64))
        assert balancer.weights().tolist() == pytest.approx(trajectory[step], rel=1e-9)
    assert balancer.step_count == STEPS // k

    table = pq.read_table(tmp_path / "every4" / "metrics" / "rank=0").to_pandas()
    train = table[table["split"] == schema.TRAIN]
    assert len(train) == STEPS * T  # every step is recorded, measured or not
    flags = train.groupby("step")["step_measured"].agg(["all", "any"])
    assert (flags["all"] == (flags.index % k == 0)).all() and (flags["any"] == flags["all"]).all()
    between = train[~train["step_measured"].astype(bool)]
    assert between["grad_norm"].isna().all() and between["target_norm"].isna().all() and between["step_grad_loss"].isna().all()
    assert between["loss"].notna().all() and between["weight"].notna().all()
    # The analysis reads them as any step: E_t[w_i] over every step, grad_norm series over the measured ones.
    assert analysis.weight_average(tmp_path, "every4", window=(0, None)).table["n"].tolist() == [STEPS] * T
    assert analysis.metric_series(tmp_path, "every4", "grad_norm", max_points=STEPS)["n"].sum() == (STEPS // k) * T


def test_update_every_one_is_the_default_bit_for_bit() -> None:
    default, _, _ = _run(None, "", None)
    once, _, _ = _run(None, "", None, update_every=1)
    assert default == once


def test_update_every_refusals() -> None:
    trunk, _ = _model()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="update_every must be an int >= 1"):
            gradnorm.attach(trunk[2], gradnorm.GradNorm(), update_every=bad)
    with pytest.raises(ValueError, match="update_every and accumulate do not apply"):
        gradnorm.attach(trunk[2], gradnorm.MGDA(), update_every=4)


def test_resume_keeps_the_update_phase(tmp_path: Path) -> None:
    """The step counter travels in the state, so a resumed job measures at the same steps."""
    trunk, head_list = _model()
    session = gradnorm.attach(trunk[2], gradnorm.GradNorm(), heads=None, update_every=3)

    def step(s: gradnorm.Session, index: int) -> None:
        x, y = _batch(index)
        z = trunk(x)
        s.loss({f"t{i}": ((head_list[i](z)[:, 0] - y[:, i]) ** 2).mean() for i in range(T)}).backward()

    for index in range(5):
        step(session, index)
    state = session.state_dict()
    resumed = gradnorm.attach(trunk[2], gradnorm.GradNorm(), heads=None, update_every=3)
    resumed.load_state_dict(state)
    before = session.weights()  # (the resumed balancer binds at its first step)
    step(resumed, 5)  # step 5: between updates
    assert resumed.weights() == before
    step(resumed, 6)  # step 6: an update
    assert resumed.weights() != before
    session.close()
    resumed.close()
