"""Resume from a checkpoint: a job killed with SIGKILL after its checkpoint at step 100 and restarted from it
continues the weight trajectory of an uninterrupted run exactly, and records into the same run, where every
analysis reads each step once (the restarted attempt's rows win over the killed one's)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import gradnorm
from gradnorm.toolkit import analysis, runs, schema
from tests.helpers.process_group import rank_results, start_ranks

STEPS, CHECKPOINT, KILL_AT, T = 200, 100, 150, 3

# One job: train STEPS steps of a small T-task network with GradNorm (Adam for the network); the batch of
# step s comes from a generator seeded with s, so a restarted job sees the same data. Modes:
#   full: STEPS steps uninterrupted;  kill: checkpoint at CHECKPOINT, wait at KILL_AT for the parent's SIGKILL;
#   resume: load the checkpoint, continue to STEPS in the same run. The weights after each step go to a file.
CHILD = r"""
import json, sys, time, torch
from torch import nn
import gradnorm
root, name, mode, dtype, heads, ckpt, out = sys.argv[1:8]
STEPS, CHECKPOINT, KILL_AT, T = 200, 100, 150, 3
dtype = getattr(torch, dtype)
torch.manual_seed(0)
trunk = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU()).to(dtype)
heads_list = nn.ModuleList([nn.Linear(16, 1) for _ in range(T)]).to(dtype)
params = list(trunk.parameters()) + list(heads_list.parameters())
opt = torch.optim.Adam(params, lr=1e-2)
session = gradnorm.attach(trunk[2], gradnorm.GradNorm(alpha=1.5), runs_root=root, run_name=name, flush_every=10,
                          heads=None if heads == "none" else "auto", resume=(mode == "resume"))
start = 0
if mode == "resume":
    state = torch.load(ckpt, weights_only=True)
    trunk.load_state_dict(state["trunk"]); heads_list.load_state_dict(state["heads"]); opt.load_state_dict(state["opt"])
    session.load_state_dict(state["gradnorm"])
    start = state["gradnorm"]["step"]
weights = {}
for step in range(start, STEPS):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(32, 6, generator=g).to(dtype)
    scale = torch.tensor([1.0, 10.0, 0.1], dtype=dtype)
    y = torch.randn(32, T, generator=g).to(dtype) * scale
    z = trunk(x)
    losses = {f"t{i}": ((heads_list[i](z)[:, 0] - y[:, i]) ** 2).mean() for i in range(T)}
    loss = session.loss(losses)
    opt.zero_grad(); loss.backward(); opt.step()
    weights[step + 1] = session.balancer.weights().tolist()  # w after step `step`
    if step % 20 == 19:
        session.log_validation({k: float(v) * 1.1 for k, v in losses.items()})
    if mode == "kill" and step + 1 == CHECKPOINT:
        torch.save({"trunk": trunk.state_dict(), "heads": heads_list.state_dict(), "opt": opt.state_dict(),
                    "gradnorm": session.state_dict()}, ckpt)
    if mode == "kill" and step + 1 == KILL_AT:
        session.recorder.wait()  # the killed attempt's rows past the checkpoint are on disk
        with open(out, "w") as f: json.dump({str(k): v for k, v in weights.items()}, f)
        print("waiting", flush=True)
        time.sleep(600)
with open(out, "w") as f: json.dump({str(k): v for k, v in weights.items()}, f)
session.close()
"""


def _job(tmp_path: Path, root: Path, name: str, mode: str, dtype: str, heads: str) -> dict[int, list[float]]:
    out = tmp_path / f"{name}-{mode}.json"
    args = [sys.executable, "-c", CHILD, str(root), name, mode, dtype, heads, str(tmp_path / f"{name}.pt"), str(out)]
    if mode != "kill":
        subprocess.run(args, check=True, timeout=300, capture_output=True)
    else:
        child = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "waiting"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=60)
        assert child.returncode == -signal.SIGKILL
    return {int(k): v for k, v in json.loads(out.read_text()).items()}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_sigkill_and_resume_continues_bit_for_bit_and_reads_each_step_once(tmp_path: Path, dtype: str) -> None:
    root = tmp_path / "runs"
    full = _job(tmp_path, root, "full", "full", dtype, "none")
    killed = _job(tmp_path, root, "job", "kill", dtype, "none")
    assert runs.read_run_json(root / "job")["status"] == runs.RUNNING  # SIGKILL: nobody marked it
    resumed = _job(tmp_path, root, "job", "resume", dtype, "none")
    # The killed attempt ran to KILL_AT on the same trajectory; the resumed one continues it from CHECKPOINT exactly.
    assert sorted(resumed) == list(range(CHECKPOINT + 1, STEPS + 1))
    for step in range(1, KILL_AT + 1):
        assert killed[step] == full[step]
    for step in range(CHECKPOINT + 1, STEPS + 1):
        assert resumed[step] == full[step], f"step {step}: {resumed[step]} vs {full[step]}"

    meta = runs.read_run_json(root / "job")
    assert meta["status"] == runs.FINISHED
    attempts = meta["attempts"]
    assert [a["attempt"] for a in attempts] == [1, 2]
    assert attempts[1]["first_step"] == CHECKPOINT and attempts[1]["previous_status"] == runs.RUNNING
    assert schema.superseded_bounds(attempts) == {1: CHECKPOINT}
    # The files do hold steps 100-149 twice: the killed attempt's and the resumed one's.
    import pyarrow.parquet as pq

    table = pq.read_table(root / "job" / "metrics" / "rank=0").to_pandas()
    train = table[table["split"] == schema.TRAIN]
    assert (train.groupby("step").size().loc[CHECKPOINT : KILL_AT - 1] == 2 * T).all()
    assert set(train["attempt"]) == {1, 2}

    # Every analysis function sees each step once, and what the uninterrupted run shows.
    listing = analysis.list_runs(root).set_index("run_id")
    assert listing.loc["job", "rows"] == listing.loc["full", "rows"] == STEPS * T + (STEPS // 20) * T
    assert listing.loc["job", "last_step"] == listing.loc["full", "last_step"] == STEPS  # (the last validation)
    for a, b in [(analysis.weight_average(root, "job").table, analysis.weight_average(root, "full").table)]:
        assert a["n"].tolist() == b["n"].tolist()
        assert a["mean"].tolist() == pytest.approx(b["mean"].tolist(), rel=1e-12)
    series_job = analysis.metric_series(root, "job", "weight", max_points=STEPS)
    series_full = analysis.metric_series(root, "full", "weight", max_points=STEPS)
    assert series_job["n"].sum() == series_full["n"].sum() == STEPS * T
    assert series_job["value"].tolist() == pytest.approx(series_full["value"].tolist(), rel=1e-12)
    over_job, over_full = analysis.overfitting(root, "job"), analysis.overfitting(root, "full")
    assert len(over_job) == len(over_full) == (STEPS // 20) * T
    assert over_job["gap"].tolist() == pytest.approx(over_full["gap"].tolist(), rel=1e-9)
    sum_job, sum_full = analysis.summary(root, "job"), analysis.summary(root, "full")
    assert sum_job["weight_mean"].tolist() == pytest.approx(sum_full["weight_mean"].tolist(), rel=1e-12)


@pytest.mark.slow
def test_resume_with_the_default_taps(tmp_path: Path) -> None:
    """The default path: the first step after loading is measured the general way (the taps are found at
    a session's first step), whose norms agree with the taps' to rounding; the steps after follow."""
    root = tmp_path / "runs"
    full = _job(tmp_path, root, "full", "full", "float64", "auto")
    _job(tmp_path, root, "job", "kill", "float64", "auto")
    resumed = _job(tmp_path, root, "job", "resume", "float64", "auto")
    for step in range(CHECKPOINT + 1, STEPS + 1):
        assert resumed[step] == pytest.approx(full[step], rel=1e-9, abs=1e-12)
    assert analysis.list_runs(root).set_index("run_id").loc["job", "rows"] == STEPS * T + (STEPS // 20) * T


def _model() -> tuple[nn.Module, nn.ModuleList]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8)), nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 1)])


def _steps(session: gradnorm.Session, trunk: nn.Module, heads: nn.ModuleList, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x = torch.randn(16, 4, generator=g)
        z = trunk(x)
        loss = session.loss({"a": heads[0](z).pow(2).mean(), "b": heads[1](z).abs().mean() * 5})
        loss.backward()


def test_state_dict_round_trip_and_refusals(tmp_path: Path) -> None:
    trunk, heads = _model()
    session = gradnorm.attach(trunk[2], gradnorm.GradNorm(), runs_root=tmp_path, run_name="a", heads=None)
    _steps(session, trunk, heads, range(5))
    state = session.state_dict()
    assert state["step"] == 5 and state["tasks"] == ["a", "b"] and state["run_id"] == "a" and state["attempt"] == 1
    # weights_only loading reads it
    torch.save(state, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    session.close()

    # A session that has taken a step refuses a state; a state of other tasks or another run name is refused.
    with pytest.raises(RuntimeError, match="before its first step"):
        session2 = gradnorm.attach(trunk[2], gradnorm.GradNorm(), heads=None)
        _steps(session2, trunk, heads, range(1))
        session2.load_state_dict(loaded)
    session2.close()
    other = gradnorm.attach(trunk[2], gradnorm.GradNorm(), tasks=["x", "y"], heads=None)
    with pytest.raises(ValueError, match=r"tasks \['a', 'b'\]"):
        other.load_state_dict(loaded)
    other.close()
    named = gradnorm.attach(trunk[2], gradnorm.GradNorm(), runs_root=tmp_path, run_name="b", heads=None)
    with pytest.raises(ValueError, match="same_run=False"):
        named.load_state_dict(loaded)
    named.close()
    with pytest.raises(ValueError, match="lacks"):
        gradnorm.attach(trunk[2], gradnorm.GradNorm(), heads=None).load_state_dict({"step": 3})
    with pytest.raises(ValueError, match="give both"):
        gradnorm.attach(trunk[2], gradnorm.GradNorm(), runs_root=tmp_path, resume=True)
    elsewhere = gradnorm.attach(trunk[2], gradnorm.GradNorm(), runs_root=tmp_path / "other", heads=None)
    with pytest.raises(runs.RunError, match="not under"):
        elsewhere.load_state_dict(loaded)
    elsewhere.close()


def test_loaded_state_continues_its_run_in_process(tmp_path: Path) -> None:
    """Loading a state into a session attached without a name records into the state's run (the claim attach
    made for a new run is released); same_run=False records into the new run."""
    trunk, heads = _model()
    first = gradnorm.attach(trunk[2], gradnorm.GradNorm(), runs_root=tmp_path, run_name="job", heads=None, flush_every=4)
    _steps(first, trunk, heads, range(10))
    state = first.state_dict()
    _steps(first, trunk, heads, range(10, 14))
    first.close(status=runs.INTERRUPTED)
    second = gradnorm.attach(trunk[2], gradnorm.GradNorm(), runs_root=tmp_path, heads=None, flush_every=4)
    second.load_state_dict(state)
    _steps(second, trunk, heads, range(10, 20))
    second.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job"]
    meta = runs.read_run_json(tmp_path / "job")
    assert [a["attempt"] for a in meta["attempts"]] == [1, 2] and meta["attempts"][1]["previous_status"] == runs.INTERRUPTED
    assert meta["attempts"][0]["status"] == runs.INTERRUPTED and meta["attempts"][1]["status"] == runs.FINISHED
    listing = analysis.list_runs(tmp_path).set_index("run_id")
    assert listing.loc["job", "rows"] == 20 * 2 and listing.loc["job", "last_step"] == 19
    frame = analysis.metric_series(tmp_path, "job", "loss", max_points=100)
    assert frame["n"].sum() == 40

    third = gradnorm.attach(trunk[2], gradnorm.GradNorm(), runs_root=tmp_path, run_name="fresh", heads=None)
    third.load_state_dict(state, same_run=False)
    _steps(third, trunk, heads, range(10, 12))
    third.close()
    assert "attempts" in runs.read_run_json(tmp_path / "fresh") and len(runs.read_run_json(tmp_path / "fresh")["attempts"]) == 1


def test_resume_true_without_a_state_starts_the_run_over(tmp_path: Path) -> None:
    """resume=True on an existing run without a loaded state: the job started again from step 0, so every
    earlier row is superseded; on a run that does not exist yet it creates it."""
    trunk, heads = _model()
    s1 = gradnorm.attach(trunk[2], gradnorm.GradNorm(), runs_root=tmp_path, run_name="job", heads=None, resume=True)
    _steps(s1, trunk, heads, range(6))
    s1.close()
    s2 = gradnorm.attach(trunk[2], gradnorm.GradNorm(), runs_root=tmp_path, run_name="job", heads=None, resume=True)
    _steps(s2, trunk, heads, range(3))
    s2.close()
    assert schema.superseded_bounds(runs.read_run_json(tmp_path / "job")["attempts"]) == {1: 0}
    assert analysis.list_runs(tmp_path).set_index("run_id").loc["job", "rows"] == 3 * 2


def test_superseded_bounds() -> None:
    attempts = [{"attempt": 1}, {"attempt": 2, "first_step": 100}, {"attempt": 3, "first_step": 120}, "junk", {"attempt": True, "first_step": 5}]
    assert schema.superseded_bounds(attempts) == {1: 100, 2: 120}
    assert schema.superseded_bounds([{"attempt": 1}, {"attempt": 2, "first_step": 50}, {"attempt": 3, "first_step": 80}]) == {1: 50, 2: 80}
    assert schema.superseded_bounds([{"attempt": 1}, {"attempt": 2, "first_step": 2**60}]) == {}
    assert schema.superseded_bounds("nonsense") == {} and schema.superseded_bounds(None) == {}


def test_lightning_checkpoint_carries_the_session(tmp_path: Path) -> None:
    """Lightning's own checkpoint (on_save_checkpoint / on_load_checkpoint): a fit resumed from the
    checkpoint at the end of epoch 1 gives epoch 2 the uninterrupted fit's weights, in the same run."""
    pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed")
    from gradnorm.hooks.lightning import GradNormCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.trunk, self.heads = _model()
            self.trajectory: dict[int, list[float]] = {}

        def training_step(self, batch, batch_idx):
            (x,) = batch
            z = self.trunk(x)
            return self.gradnorm.loss({"a": self.heads[0](z).pow(2).mean(), "b": self.heads[1](z).abs().mean() * 5})

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.trajectory[self.global_step] = self.gradnorm.balancer.weights().tolist()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(80, 4, generator=torch.Generator().manual_seed(3))), batch_size=8)

    def fit(epochs: int, root: Path, name: str, ckpt: Path | None = None) -> Module:
        module = Module()
        callback = GradNormCallback(lambda m: m.trunk[2], gradnorm.GradNorm(alpha=1.5), heads=None, runs_root=root, run_name=name, flush_every=5)
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            callbacks=[callback],
        )
        trainer.fit(module, data, ckpt_path=ckpt)
        if ckpt is None:
            trainer.save_checkpoint(tmp_path / f"{name}-{epochs}.ckpt")
        return module

    full = fit(2, tmp_path / "runs", "full")
    fit(1, tmp_path / "runs", "job")
    resumed = fit(2, tmp_path / "runs", "job", ckpt=tmp_path / "job-1.ckpt")
    assert sorted(resumed.trajectory) == list(range(11, 21))
    for step in range(11, 21):
        assert resumed.trajectory[step] == full.trajectory[step]
    meta = runs.read_run_json(tmp_path / "runs" / "job")
    assert [a["attempt"] for a in meta["attempts"]] == [1, 2] and meta["attempts"][1]["first_step"] == 10
    assert analysis.list_runs(tmp_path / "runs").set_index("run_id").loc["job", "rows"] == 20 * 2


def _ddp_worker(rank: int, world: int, port: int, root: str, mode: str, ckpt: str, out: str) -> None:
    """Two ranks train the toy with GradNorm under DDP; "first" checkpoints after step 6 and stops at 9
    without closing its run, "resume" continues from the checkpoint to 12, "full" runs 12 steps."""
    import datetime
    import traceback

    try:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        from gradnorm.experiments import toy

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
        config = toy.ToyConfig(num_tasks=3, train_size=128, test_size=8)
        data = toy.make_data(config)
        model, x, y = toy.make_model(config).double(), data.x_train.double(), data.y_train.double()
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
        session = gradnorm.attach(
            model.shared_layer, gradnorm.GradNorm(alpha=0.12), runs_root=root, run_name=mode if mode == "full" else "ddp", flush_every=2, resume=mode != "full"
        )
        start, stop = 0, 12
        if mode == "resume":
            state = torch.load(ckpt, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["opt"])
            session.load_state_dict(state["gradnorm"])
            start = state["gradnorm"]["step"]
        if mode == "first":
            stop = 9
        generator = torch.Generator().manual_seed(11)
        order = [torch.randint(0, 128, (16,), generator=generator) for _ in range(12)]
        trajectory = {}
        for step in range(start, stop):
            shard = order[step][rank::world]
            loss = session.loss(toy.task_losses(ddp(x[shard]), y[shard]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            trajectory[step + 1] = session.balancer.weights().tolist()
            if mode == "first" and step + 1 == 6:
                state = {"model": model.state_dict(), "opt": optimizer.state_dict(), "gradnorm": session.state_dict()}
                if rank == 0:
                    torch.save(state, ckpt)
        if mode == "first":
            session.recorder.wait()  # the rows of steps 6-8 are on disk; the run is left 'running', as a killed job's
        else:
            session.close()
        torch.save(trajectory, out)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        Path(out + ".error").write_text(traceback.format_exc())
        raise


@pytest.mark.slow
def test_ddp_ranks_resume_their_partitions_in_the_same_run(tmp_path: Path) -> None:
    def launch(mode: str) -> list[dict[int, list[float]]]:
        args = (str(tmp_path / "runs"), mode, str(tmp_path / "ddp.pt"))
        return rank_results(*start_ranks(_ddp_worker, 2, tmp_path, args, timeout=2 * 120, prefix=f"{mode}-"))

    full = launch("full")
    launch("first")
    resumed = launch("resume")
    for rank in range(2):
        assert sorted(resumed[rank]) == list(range(7, 13))
        for step in range(7, 13):
            assert resumed[rank][step] == full[0][step]
    meta = runs.read_run_json(tmp_path / "runs" / "ddp")
    assert [a["attempt"] for a in meta["attempts"]] == [1, 2] and meta["attempts"][1]["first_step"] == 6
    assert {p.name for p in (tmp_path / "runs" / "ddp" / "metrics").iterdir()} == {"rank=0", "rank=1"}
    # Each rank wrote steps 6-8 twice; every step is read once per rank.
    assert analysis.list_runs(tmp_path / "runs").set_index("run_id").loc["ddp", "rows"] == 2 * 12 * 3
    assert analysis.metric_series(tmp_path / "runs", "ddp", "weight", max_points=100)["n"].sum() == 2 * 12 * 3
