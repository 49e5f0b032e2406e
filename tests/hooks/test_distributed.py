"""GradNorm under DDP (two processes, gloo on 127.0.0.1): the weights agree on every rank and equal a
single-process run on the whole batch; each rank writes its own part files into one run."""

from __future__ import annotations

import datetime
import traceback
from pathlib import Path

import pytest
import torch

from tests.helpers.process_group import rank_results, start_ranks

STEPS = 12
BATCH = 16  # global batch; each of the 2 ranks trains on half of it


def batches(num: int):
    generator = torch.Generator().manual_seed(11)
    return [torch.randint(0, 128, (BATCH,), generator=generator) for _ in range(num)]


def model_and_data(num_tasks: int):
    from gradnorm.experiments import toy

    config = toy.ToyConfig(num_tasks=num_tasks, train_size=128, test_size=8)
    data = toy.make_data(config)
    return toy.make_model(config).double(), data.x_train.double(), data.y_train.double()


def worker(rank: int, world: int, port: int, root: str, heads, out: str) -> None:
    try:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        from gradnorm import hooks
        from gradnorm.experiments import toy
        from gradnorm.hooks import taps
        from gradnorm.toolkit.balancers import GradNorm

        if heads == "stream":  # the taps' other way of collecting the heads' gradients
            taps.STREAM_ABOVE_BYTES = 0
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
        model, x, y = model_and_data(3)
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
        # The taps form and all-reduce the T per-task gradients: distributed_norms="gradients". Without heads,
        # the default ("auto") exchanges W's rows (hooks/distributed_norms.py).
        route = "gradients" if heads else "auto"
        session = hooks.attach(
            model.shared_layer,
            GradNorm(alpha=0.12),
            runs_root=root,
            run_name="ddp",
            flush_every=5,
            heads=list(model.heads) if heads else None,
            distributed_norms=route,
        )
        trajectory = []
        with session:
            for index in batches(STEPS):
                shard = index[rank::world]
                losses = toy.task_losses(ddp(x[shard]), y[shard])
                loss = session.loss(losses)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                trajectory.append(session.balancer.weights().clone())
        if heads == "stream":
            assert session.taps.mode == "stream", session.taps.mode
        if heads:
            assert session.taps is not None
        else:
            assert session.meter.route == "distributed-rows", session.meter.route
        torch.save({"weights": torch.stack(trajectory), "params": [p.detach().clone() for p in model.parameters()]}, out)
        dist.destroy_process_group()
    except BaseException:
        Path(out + ".error").write_text(traceback.format_exc())
        raise


def single_process_reference():
    from gradnorm import hooks
    from gradnorm.experiments import toy
    from gradnorm.toolkit.balancers import GradNorm

    model, x, y = model_and_data(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    session = hooks.attach(model.shared_layer, GradNorm(alpha=0.12))
    trajectory = []
    for index in batches(STEPS):
        # The mean over the two equal shards of each shard's mean loss: DDP's objective.
        halves = [toy.task_losses(model(x[index[r::2]]), y[index[r::2]]) for r in range(2)]
        losses = [(a + b) / 2 for a, b in zip(*halves)]
        loss = session.loss(losses)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        trajectory.append(session.balancer.weights().clone())
    return torch.stack(trajectory)


@pytest.mark.parametrize("heads", [False, True, "stream"], ids=["auto-rows", "heads-gradients", "heads-stream-gradients"])
def test_ddp_weights_agree_across_ranks_and_with_one_process(tmp_path, heads):
    results = rank_results(*start_ranks(worker, 2, tmp_path, (str(tmp_path / "runs"), heads), timeout=2 * 120))
    torch.testing.assert_close(results[0]["weights"], results[1]["weights"], rtol=0, atol=0)
    torch.testing.assert_close(results[0]["weights"], single_process_reference(), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(results[0]["weights"][-1], torch.ones(3, dtype=torch.float64))  # the weights did move

    from gradnorm.toolkit import analysis, runs

    run = tmp_path / "runs" / "ddp"
    assert runs.read_run_json(run)["status"] == "finished"
    assert {p.name for p in (run / "metrics").iterdir()} == {"rank=0", "rank=1"}
    listing = analysis.list_runs(tmp_path / "runs")
    assert listing["rows"].iloc[0] == 2 * STEPS * 3
    average = analysis.weight_average(tmp_path / "runs", "ddp", window=(0, STEPS - 1))
    expected = results[0]["weights"]  # record holds w(t) before each update: the first row is w(0) = 1
    expected = torch.cat([torch.ones(1, 3, dtype=torch.float64), expected[:-1]]).mean(0)
    assert list(average.weights.values()) == pytest.approx(expected.tolist(), rel=1e-9)
