"""The norms of the rank-averaged gradient from one small exchange per step (hooks/distributed_norms.py):
2 and 4 gloo processes on 127.0.0.1 against one process on the whole batch, every route; the sketch's
error against its stated bound (8/k relative variance, Chebyshev's tail) over 200 steps of the toy and of
a small conv trunk, and over many seeds at fixed gradients; FSDP2 with W sharded; a rank killed mid-run.
From the second step the heads' taps feed the exchange from the user's backward (hooks/taps.py): its
collective is issued before the trunk's backward runs and waited for after it."""

from __future__ import annotations

import datetime
import math
import os
import signal
import time
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn

from gradnorm.hooks import distributed_norms as dn
from tests.helpers.process_group import rank_results, start_ranks
from tests.hooks.test_no_host_sync import OperatorLog

BATCH = 16  # global batch, split into equal shards across the ranks
#: gloo's limit on a collective (and the rendezvous): ranks spawned on a loaded machine can reach one far
#: apart; a killed rank is still seen at once (its connections close), well within it
GROUP_TIMEOUT_S = 60
K = 64  # sketch pairs in the bound tests: a small k makes the error visible against the bound
torch.set_num_threads(1)  # two shared cores: one thread per process


# -- the models ---------------------------------------------------------------------------------------------
class ConvTrunk(nn.Module):
    """Two 3x3 convolutions (the second is W) and one 1x1 convolution head per task."""

    def __init__(self, tasks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU())
        self.shared_layer = nn.Conv2d(6, 8, 3, padding=1)
        self.heads = nn.ModuleList(nn.Conv2d(8, 1, 1) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = torch.relu(self.shared_layer(self.stem(x)))
        return [head(z) for head in self.heads]


class NormTrunk(nn.Module):
    """W (a Linear) under a LayerNorm and tanh before the heads: the taps carry the heads' gradients to W's
    output by vector-Jacobian products (``output-vjp``), not through a ReLU mask."""

    def __init__(self, tasks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(6, 10), nn.ReLU())
        self.shared_layer = nn.Linear(10, 12)
        self.norm = nn.LayerNorm(12)
        self.heads = nn.ModuleList(nn.Linear(12, 2) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = torch.tanh(self.norm(self.shared_layer(self.stem(x))))
        return [head(z) for head in self.heads]


def problem(kind: str):
    """(model, inputs, targets, losses(outputs, targets)): float64, the same on every rank."""
    torch.manual_seed(3)
    if kind == "toy":
        from gradnorm.experiments import toy

        config = toy.ToyConfig(num_tasks=3, train_size=128, test_size=8)
        data = toy.make_data(config)
        return toy.make_model(config).double(), data.x_train.double(), data.y_train.double(), toy.task_losses
    if kind == "norm":
        x = torch.randn(128, 6, dtype=torch.float64)
        y = torch.randn(128, 3, 2, dtype=torch.float64) * torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64).view(1, 3, 1)
        return NormTrunk().double(), x, y, lambda outputs, targets: [((out - targets[:, i]) ** 2).mean() for i, out in enumerate(outputs)]
    model = ConvTrunk().double()
    x = torch.randn(128, 2, 4, 4, dtype=torch.float64)
    y = torch.randn(128, 3, 4, 4, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.3], dtype=torch.float64).view(1, 3, 1, 1)

    def losses(outputs, targets):
        return [((out[:, 0] - targets[:, i]) ** 2).mean() for i, out in enumerate(outputs)]

    return model, x, y, losses


def batches(num: int):
    generator = torch.Generator().manual_seed(11)
    return [torch.randint(0, 128, (BATCH,), generator=generator) for _ in range(num)]


def exact_global_norms(losses, parameter, world: int) -> torch.Tensor:
    """The test's own reference: autograd's per-task gradients at W, averaged over ranks, then their norms."""
    import torch.distributed as dist

    grads = torch.stack([torch.autograd.grad(loss, parameter, retain_graph=True)[0] for loss in losses])
    if world > 1:
        dist.all_reduce(grads)
        grads = grads / world
    return grads.flatten(1).norm(dim=1)


class RecordedWork:
    """A collective's work whose wait is noted in ``events``."""

    def __init__(self, work, events: list) -> None:
        self.work, self.events = work, events

    def wait(self, *args, **kwargs):
        self.events.append("wait")
        return self.work.wait(*args, **kwargs)


def record_order(model: nn.Module, events: list):
    """Note in ``events`` each asynchronous collective GradNorm issues, each wait on one, and the moment the
    backward reaches the trunk's first layer (its weight's gradient: the last the backward forms).
    DDP's reducer calls its collectives from C++, unseen here. Returns the function that undoes it."""
    import torch.distributed as dist

    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather_single", "all_gather_into_tensor") if hasattr(dist, name)}
    depth = [0]

    def wrap(function):
        def recorded(*args, **kwargs):
            depth[0] += 1
            try:
                work = function(*args, **kwargs)
            finally:
                depth[0] -= 1
            if kwargs.get("async_op") and depth[0] == 0:
                events.append("issue")
                return RecordedWork(work, events)
            return work

        return recorded

    for name, function in originals.items():
        setattr(dist, name, wrap(function))
    handle = next(model.parameters()).register_hook(lambda grad: events.append("trunk-bottom"))

    def undo() -> None:
        handle.remove()
        for name, function in originals.items():
            setattr(dist, name, function)

    return undo


def train(
    kind: str, route: str, steps: int, rank: int, world: int, *, shards: int, root=None, wrap=None, reference_norms=False, sketch_size=K, name=None, order=False
):
    """``steps`` of GradNorm; ``world`` > 1: this rank's shard under DDP (or ``wrap``); else the mean of
    ``shards`` shard losses in one process (DDP's objective). ``order``: note, per step, when the exchange
    is issued and waited for against the backward's reaching the trunk's first layer (``record_order``)."""
    from torch.nn.parallel import DistributedDataParallel

    from gradnorm import hooks
    from gradnorm.toolkit.balancers import GradNorm

    model, x, y, task_losses = problem(kind)
    layer = model.shared_layer
    net = model
    if world > 1:
        net = wrap(model) if wrap is not None else DistributedDataParallel(model)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    kwargs = {"distributed_norms": route, "sketch_size": sketch_size}
    if world == 1 and route in ("exact", "gradients"):
        kwargs = {"heads": None}  # one process: the default general path, exact
    session = hooks.attach(layer, GradNorm(alpha=0.12), runs_root=root, run_name=(name or f"{kind}-{route}") if root else None, flush_every=5, **kwargs)
    measured, exact, weights = [], [], []
    update = session.balancer.update

    def keep(losses, norms, **kw):
        measured.append(norms.detach().clone())
        return update(losses, norms, **kw)

    session.balancer.update = keep  # type: ignore[method-assign]
    events: list = []
    undo = record_order(model, events) if order else None
    with session:
        for index in batches(steps):
            events.append("step")
            if world > 1:
                shard = index[rank::world]
                losses = task_losses(net(x[shard]), y[shard])
            else:
                parts = [task_losses(net(x[index[r::shards]]), y[index[r::shards]]) for r in range(shards)]
                losses = [sum(p) / shards for p in zip(*parts)]
            if reference_norms:
                exact.append(exact_global_norms(losses, layer.weight, world))
            loss = session.loss(losses)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            weights.append(session.balancer.weights().clone())
    if undo is not None:
        undo()
    out = {
        "weights": torch.stack(weights),
        "norms": torch.stack(measured),
        "route": session.meter.route,
        "taps": session.taps.path if session.taps is not None else None,
        "heads_search": session._heads_search,
        "events": events,
    }
    if reference_norms:
        out["exact"] = torch.stack(exact)
    if isinstance(session.meter, dn.DistributedNormMeter):
        out["describe"] = session.meter.describe()
    return out


def fsdp_wrap(model):
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.shared_layer)
    fully_shard(model)
    return model


def worker(rank: int, world: int, port: int, root: str, plan: list, out: str) -> None:
    try:
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
        results = {}
        for kind, route, steps, options in plan:
            wrap = fsdp_wrap if options.get("fsdp") else None
            key = f"{kind}-{route}" + ("-fsdp" if wrap else "") + ("-order" if options.get("order") else "")
            results[key] = train(
                kind,
                route,
                steps,
                rank,
                world,
                shards=world,
                root=root,
                wrap=wrap,
                reference_norms=options.get("reference", False),
                name=key,
                order=options.get("order", False),
            )
        torch.save(results, out)
        dist.destroy_process_group()
    except BaseException:
        Path(out + ".error").write_text(traceback.format_exc())
        raise


def run_group(tmp_path: Path, world: int, plan: list, target=worker, timeout: float = 300.0) -> list:
    return rank_results(*start_ranks(target, world, tmp_path, (str(tmp_path / "runs"), plan), timeout))


def check_bound(result: dict, k: int) -> None:
    """Every step's sketched norms against the exact global norms: Chebyshev's tail and the variance bound."""
    ratio = (result["norms"] / result["exact"]) ** 2 - 1  # relative error of the squared norm, (steps, T)
    assert ratio.numel() >= 600
    bound = 8.0 / k
    assert ratio.square().mean().item() <= 1.25 * bound, (ratio.square().mean().item(), bound)
    for eps in (0.5, 0.75):
        assert (ratio.abs() >= eps).double().mean().item() <= 8.0 / (k * eps * eps)
    assert ratio.abs().max().item() > 0  # an estimate, not the exact value


# -- the tests ----------------------------------------------------------------------------------------------
@pytest.mark.slow  # spawns gloo processes: about 20 s of CPU
def test_two_ranks_every_route_matches_one_process_and_the_sketch_keeps_its_bound(tmp_path):
    plan = [
        ("toy", "rows", 12, {}),
        ("toy", "gradients", 12, {}),
        ("conv", "rows", 12, {}),
        ("toy", "sketch", 200, {"reference": True}),
        ("conv", "sketch", 200, {"reference": True}),
        ("toy", "rows", 8, {"fsdp": True}),
        ("norm", "rows", 10, {"order": True}),
        ("conv", "sketch", 6, {"order": True}),
    ]
    ranks = run_group(tmp_path, 2, plan)
    for key in ranks[0]:
        torch.testing.assert_close(ranks[0][key]["weights"], ranks[1][key]["weights"], rtol=0, atol=0)  # identical on every rank
    for kind, _route, steps, key in [(*entry[:3], f"{entry[0]}-{entry[1]}") for entry in plan[:3]] + [("norm", "rows", 10, "norm-rows-order")]:
        got = ranks[0][key]
        want = train(kind, "exact", steps, 0, 1, shards=2)  # one process, the general path
        torch.testing.assert_close(got["norms"], want["norms"], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got["weights"], want["weights"], rtol=1e-9, atol=1e-12)
        assert not torch.allclose(got["weights"][-1], torch.ones(3, dtype=torch.float64))
    assert ranks[0]["toy-rows"]["route"] == "distributed-rows"
    # From step 1 the heads' taps feed the exchange: D through the ReLU mask (toy, conv), by vector-Jacobian
    # products through the LayerNorm (norm).
    assert ranks[0]["toy-rows"]["taps"] == "output-mask" and ranks[0]["conv-sketch"]["taps"] == "output-mask"
    assert ranks[0]["norm-rows-order"]["taps"] == "output-vjp"
    for key in ("norm-rows-order", "conv-sketch-order"):
        steps = "".join(" " if event == "step" else event[0] for event in ranks[0][key]["events"]).split()
        # Step 0, the per-task path in session.loss(): issued and waited for before the backward. Then, the
        # taps: issued before the backward reaches the trunk's first layer, waited for after it.
        assert steps[0] == "iwt", (key, steps)
        assert steps[1:] == ["itw"] * (len(steps) - 1), (key, steps)
    assert ranks[0]["toy-gradients"]["route"] != "distributed-rows"  # the taps or the general path, all-reducing gradients
    for kind in ("toy", "conv"):
        got = ranks[0][f"{kind}-sketch"]
        # The sketch is linear in the ranks' contributions: one process with the same seeds draws the same estimate.
        same_seeds = train(kind, "sketch", 200, 0, 1, shards=2)
        torch.testing.assert_close(got["norms"], same_seeds["norms"], rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(got["weights"], same_seeds["weights"], rtol=1e-8, atol=1e-12)
        check_bound(got, K)
        assert got["describe"]["error_bound"]["relative_variance_bound"] == pytest.approx(8.0 / K)
        assert got["describe"]["exact_alternative"]["exact"] is True
    # FSDP2 with W sharded across the two ranks: the rows need W's input and output gradients only.
    fsdp = ranks[0]["toy-rows-fsdp"]
    want = train("toy", "exact", 8, 0, 1, shards=2)
    torch.testing.assert_close(fsdp["norms"].double(), want["norms"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fsdp["weights"].double(), want["weights"], rtol=1e-9, atol=1e-12)

    from gradnorm.toolkit import runs

    meta = runs.read_run_json(tmp_path / "runs" / "toy-sketch")
    record = meta["distributed_norms"]
    assert record["route"] == "sketch" and record["world_size"] == 2 and record["collectives_per_step"] == 1
    assert record["exchange"]["numbers"] == 3 + 3 * K  # the losses and the (T, k) sketch
    assert record["exact_alternative"]["route"] in ("rows", "gradients")
    assert meta["grad_norm_path"] == "head-taps/output-mask+distributed-sketch (step 0: distributed-sketch)"
    assert record["fed_by"].startswith("the heads' taps in your backward from step 1 (output-mask")
    # FSDP: the sharded weight is no leaf of the graph, so no heads are found above it; the per-task path serves.
    fsdp_meta = runs.read_run_json(tmp_path / "runs" / "toy-rows-fsdp")
    assert ranks[0]["toy-rows-fsdp"]["taps"] is None
    assert fsdp_meta["distributed_norms"]["fed_by"].startswith("one backward per task from the losses to W's output in session.loss()")
    rows_meta = runs.read_run_json(tmp_path / "runs" / "toy-rows")["distributed_norms"]
    # 8 positions per rank: the losses, X (8 x 100) and D (3 x 8 x 100).
    assert rows_meta["exchange"]["numbers"] == 3 + 8 * 100 + 3 * 8 * 100
    assert rows_meta["exchange"]["wire_bytes"] == rows_meta["exchange"]["numbers"] * 8  # float64, (R - 1) = 1 copy


@pytest.mark.slow  # spawns gloo processes: about 20 s of CPU
def test_four_ranks_rows_and_sketch_match_one_process(tmp_path):
    plan = [("toy", "rows", 8, {}), ("conv", "sketch", 8, {}), ("toy", "auto", 8, {})]
    ranks = run_group(tmp_path, 4, plan)
    for key in ranks[0]:
        for other in ranks[1:]:
            torch.testing.assert_close(ranks[0][key]["weights"], other[key]["weights"], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["toy-rows"]["weights"], train("toy", "exact", 8, 0, 1, shards=4)["weights"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ranks[0]["conv-sketch"]["weights"], train("conv", "sketch", 8, 0, 1, shards=4)["weights"], rtol=1e-8, atol=1e-12)
    auto = ranks[0]["toy-auto"]
    assert auto["describe"]["route"] in ("rows", "gradients")  # the toy's exact exchange is small: no estimate
    torch.testing.assert_close(auto["weights"], train("toy", "exact", 8, 0, 1, shards=4)["weights"], rtol=1e-9, atol=1e-12)


def test_sketch_error_over_many_seeds_within_the_stated_variance():
    """Fixed gradients G (one of rank 1, where Var is largest, one of full rank): 400 seeds of the sketch."""
    torch.manual_seed(0)
    positions, fan_in, fan_out, tasks = 12, 10, 7, 2
    x = torch.randn(positions, 1, fan_in, dtype=torch.float64)
    d = torch.randn(tasks, positions, 1, fan_out, dtype=torch.float64)
    d[1] = d[1, :1] * torch.randn(positions, 1, 1, dtype=torch.float64)  # task 1: rank-one D, G = d x'^T
    grads = dn.local_gradients(x, d).view(tasks, fan_out, fan_in)
    exact = grads.square().sum((1, 2))
    gram = grads.transpose(1, 2) @ grads
    predicted = (2 + 6 * gram.square().sum((1, 2)) / exact**2) / K  # the stated relative variance
    estimates = []
    generator = torch.Generator()
    for seed in range(400):
        generator.manual_seed(seed)
        u, v = dn.sketch_pairs(generator, K, 1, fan_in, fan_out, torch.float64, torch.device("cpu"))
        estimates.append(dn.sketch_sq_norms(dn.local_sketch(x, d, u, v)))
    relative = torch.stack(estimates) / exact - 1
    assert relative.mean(0).abs().max().item() < 4 * math.sqrt(8 / K / 400)  # unbiased, within 4 standard errors
    variance = relative.square().mean(0)
    assert torch.all(predicted <= 8 / K)
    torch.testing.assert_close(variance, predicted, rtol=0.25, atol=0)
    sketch_from_grads = torch.stack([torch.einsum("tba,jb,ja->tj", grads, u[:, 0], v[:, 0])]).squeeze(0)
    torch.testing.assert_close(dn.local_sketch(x, d, u, v), sketch_from_grads)  # u^T (D^T X) v, never forming D^T X


def test_route_choice_by_bytes_and_forced_exact():
    from gradnorm.hooks import gram_norms

    # ResNet-18's last convolution (512 -> 512, 3x3, 7x7 outputs), 8 images per rank, T = 40, 4 ranks.
    shape = gram_norms.Geometry(8 * 49, 1, 512 * 9, 512)
    options = dn.exchanges(40, 512 * 512 * 9, 4, shape=shape, sketch_size=512)
    assert options["gradients"].numbers == 40 + 40 * 2359296
    assert options["rows"].numbers == 40 + 392 * (4608 + 40 * 512)
    assert options["rows"].wire_bytes == 3 * options["rows"].numbers * 4
    assert options["sketch"].wire_bytes == int(2 * 3 * (40 + 40 * 512) * 4 / 4)
    route, reason = dn.choose("auto", options)
    assert route == "sketch" and "fewer bytes" in reason
    assert dn.choose("exact", options)[0] == "rows"
    assert dn.choose("auto", options, per_channel=True)[0] == "rows"
    small = dn.exchanges(3, 100 * 100, 2, shape=gram_norms.Geometry(8, 1, 100, 100), sketch_size=512)
    assert dn.choose("auto", small)[0] == "rows"  # a few kB: exact
    # The toy at 100 rows per rank, T = 10: the sketch would send 20x fewer bytes than the gradients (400 kB),
    # but its products (k = 512 pairs against a 100-wide layer) cost 5.7x the T local weight gradients'.
    toy = dn.exchanges(10, 100 * 100, 2, shape=gram_norms.Geometry(100, 1, 100, 100), sketch_size=512)
    assert toy["gradients"].multiply_adds == 10 * 100 * 100 * 100
    assert toy["sketch"].multiply_adds == 100 * 100 * 512 + 10 * 100 * 100 * 512 + 10 * 100 * 512
    # rows: every rank forms the norms from both ranks' 200 positions, here the T products (cheaper than the Gram).
    assert toy["rows"].multiply_adds == 10 * 200 * 100 * 100 + 10 * 100 * 100
    route, reason = dn.choose("auto", toy)  # on CPU a byte weighs 20 multiply-adds: 1.8e7 in all against the sketch's 5.7e7
    assert dn.byte_multiply_adds(torch.device("cpu")) == 20
    assert route == "gradients" and "costs 5.7x its multiply-adds, 3.2x in all at 20 multiply-adds a byte" in reason, reason
    # Where a byte weighs 2000 multiply-adds (an accelerator's rate against NCCL's between nodes), the sketch's bytes win.
    assert dn.choose("auto", toy, byte_weight=2000)[0] == "sketch"
    assert options["sketch"].multiply_adds < options["rows"].multiply_adds  # ResNet-18 at 224 x 224: the sketch is also the cheaper work
    with pytest.raises(ValueError, match="per-channel"):
        dn.choose("sketch", options, per_channel=True)
    with pytest.raises(ValueError, match="distributed_norms must be one of"):
        dn.choose("approximate", options)


def test_attach_refuses_the_rows_routes_where_w_is_not_a_stock_layer():
    import gradnorm

    weight = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="needs a stock nn.Linear or nn.Conv2d"):
        gradnorm.attach(weight, distributed_norms="sketch")
    with pytest.raises(ValueError, match="distributed_norms must be one of"):
        gradnorm.attach(nn.Linear(4, 4), distributed_norms="fast")
    with pytest.raises(ValueError, match="sketch_size"):
        gradnorm.attach(nn.Linear(4, 4), distributed_norms="sketch", sketch_size=0)


KILL_AFTER = 6  # rank 1 dies after this many steps


def kill_worker(rank: int, world: int, port: int, root: str, plan: list, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from gradnorm import hooks
    from gradnorm.toolkit.balancers import GradNorm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    model, x, y, task_losses = problem("toy")
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
    session = hooks.attach(model.shared_layer, GradNorm(alpha=0.12), runs_root=root, run_name="killed", flush_every=2, distributed_norms=plan[0])
    started = None
    try:
        with session:
            for step, index in enumerate(batches(20)):
                if rank == 1 and step == KILL_AFTER:
                    assert session.recorder is not None
                    session.recorder.flush()
                    session.recorder.wait()  # its steps confirmed on disk, then gone without a word
                    os.kill(os.getpid(), signal.SIGKILL)
                if step == KILL_AFTER:
                    time.sleep(1.0)  # rank 1 is gone before rank 0's next collective
                    started = time.monotonic()
                shard = index[rank::world]
                loss = session.loss(task_losses(ddp(x[shard]), y[shard]))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        Path(out + ".error").write_text("the step after the kill did not fail")
    except Exception as exc:
        elapsed = time.monotonic() - started if started is not None else -1.0
        Path(out + ".failed").write_text(f"{elapsed}\n{type(exc).__name__}: {exc}")


def test_a_killed_rank_fails_the_others_clearly_within_the_timeout_with_every_confirmed_record(tmp_path):
    route = "rows"
    processes, outs = start_ranks(kill_worker, 2, tmp_path, (str(tmp_path / "runs"), [route]), timeout=2 * (GROUP_TIMEOUT_S + 60))
    assert processes[1].exitcode == -signal.SIGKILL
    assert not Path(outs[0] + ".error").exists(), Path(outs[0] + ".error").read_text()
    elapsed, message = Path(outs[0] + ".failed").read_text().split("\n", 1)
    assert 0 <= float(elapsed) < GROUP_TIMEOUT_S
    assert "DistributedNormsError" in message and f"rank 0 of 2: the {route} exchange of step {KILL_AFTER} failed" in message
    assert "another rank has probably stopped" in message

    from gradnorm.toolkit import analysis, runs

    run = tmp_path / "runs" / "killed"
    assert runs.read_run_json(run)["status"] == runs.FAILED
    listing = analysis.list_runs(tmp_path / "runs")
    assert listing["rows"].iloc[0] == 2 * KILL_AFTER * 3  # both ranks' KILL_AFTER steps, T = 3 rows each


@pytest.mark.parametrize("heads", ["auto", None])
@pytest.mark.parametrize("route", ["rows", "sketch"])
def test_the_routes_never_wait_for_the_device(route, heads, tmp_path):
    """As tests/hooks/test_no_host_sync.py: no operator that reads a tensor's value on the host, steps 2-5,
    fed by the heads' taps (the default) and by the per-task path (one process: no collective is issued;
    under NCCL its wait is a stream dependency)."""
    from gradnorm import hooks
    from gradnorm.experiments import toy
    from gradnorm.toolkit.balancers import GradNorm

    config = toy.ToyConfig(num_tasks=3, train_size=64, test_size=8)
    data = toy.make_data(config)
    model = toy.make_model(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    session = hooks.attach(model.shared_layer, GradNorm(alpha=0.12), runs_root=tmp_path, run_name="run", flush_every=1000, distributed_norms=route, heads=heads)

    def step(index: int) -> None:
        x, y = data.x_train[index * 8 : index * 8 + 8], data.y_train[index * 8 : index * 8 + 8]
        loss = session.loss(toy.task_losses(model(x), y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step(0)
    step(1)
    log = OperatorLog()
    with log:
        for index in range(2, 6):
            step(index)
    session.close()
    assert session.meter.route == f"distributed-{route}"
    assert (session.taps is not None and session.taps.path == "output-mask") == (heads == "auto")
    assert any("randn" in name for name in log.names) == (route == "sketch")
    syncing = log.syncing()
    assert syncing == [], f"operators that wait for the device inside the step: {syncing}"


def test_steps_the_meter_does_not_measure_hold_no_forward_pass():
    """A step whose norms are not measured never calls the meter: its captured calls go at the next forward."""
    import gradnorm
    from gradnorm.experiments import toy

    config = toy.ToyConfig(num_tasks=3, train_size=64, test_size=8)
    data = toy.make_data(config)
    model = toy.make_model(config)
    session = gradnorm.attach(model.shared_layer, gradnorm.GradNorm(alpha=0.12), distributed_norms="rows")
    meter = session.meter
    assert isinstance(meter, dn.DistributedNormMeter)
    for index in range(5):
        x, y = data.x_train[index * 8 : index * 8 + 8], data.y_train[index * 8 : index * 8 + 8]
        losses = toy.task_losses(model(x), y)
        session.step_index += 1  # as a step between updates does: counted, not measured
        assert len(meter.capture.calls) == 1
        del losses
    session.close()
    assert meter.capture.calls == [] and meter._pre_hook is None


def _toy_steps(session, model, optimizer, data, steps):
    from gradnorm.experiments import toy

    for index in steps:
        x, y = data.x_train[index * 8 : index * 8 + 8], data.y_train[index * 8 : index * 8 + 8]
        loss = session.loss(toy.task_losses(model(x), y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_update_every_exchanges_on_measured_steps_only():
    import gradnorm
    from gradnorm.experiments import toy

    config = toy.ToyConfig(num_tasks=3, train_size=128, test_size=8)
    data = toy.make_data(config)
    model = toy.make_model(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    session = gradnorm.attach(model.shared_layer, gradnorm.GradNorm(alpha=0.12), distributed_norms="sketch", update_every=3)
    _toy_steps(session, model, optimizer, data, range(9))
    assert session.meter._calls == 3  # steps 0, 3, 6: the exchange, and its bytes, divided by 3
    session.close()


def test_the_sketch_resumes_exactly_from_a_checkpoint():
    """The pairs are seeded by the step index, which the session's state restores: a resumed run draws what an
    uninterrupted one would, and its weights follow bit for bit."""
    import gradnorm
    from gradnorm.experiments import toy

    config = toy.ToyConfig(num_tasks=3, train_size=128, test_size=8)
    data = toy.make_data(config)

    def fresh():
        torch.manual_seed(0)
        model = toy.make_model(config)
        return model, torch.optim.SGD(model.parameters(), lr=0.01)

    model, optimizer = fresh()
    whole = gradnorm.attach(model.shared_layer, gradnorm.GradNorm(alpha=0.12), distributed_norms="sketch", heads=None)
    _toy_steps(whole, model, optimizer, data, range(10))
    uninterrupted = whole.balancer.weights().clone()
    whole.close()

    model, optimizer = fresh()
    first = gradnorm.attach(model.shared_layer, gradnorm.GradNorm(alpha=0.12), distributed_norms="sketch", heads=None)
    _toy_steps(first, model, optimizer, data, range(5))
    state, model_state, optimizer_state = first.state_dict(), model.state_dict(), optimizer.state_dict()
    first.close()
    model, optimizer = fresh()
    model.load_state_dict(model_state)
    optimizer.load_state_dict(optimizer_state)
    second = gradnorm.attach(model.shared_layer, gradnorm.GradNorm(alpha=0.12), distributed_norms="sketch", heads=None)
    second.load_state_dict(state)
    _toy_steps(second, model, optimizer, data, range(5, 10))
    torch.testing.assert_close(second.balancer.weights(), uninterrupted, rtol=0, atol=0)
    second.close()


def test_a_step_the_taps_never_see_falls_back_to_the_per_task_path(monkeypatch):
    """A loss never backpropagated (step 2): that step and the rest are measured by the meter's own per-task
    path (its capture of W's calls, paused while the taps fed it, resumes), with the norms of the general
    path run alongside; run.json's fed_by says from when and why."""
    import gradnorm

    def run(heads, skip: int = 2, steps: int = 6):
        model, x, y, task_losses = problem("toy")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        session = gradnorm.attach(model.shared_layer, gradnorm.GradNorm(alpha=0.12), distributed_norms="rows", heads=heads)
        norms = []
        update = session.balancer.update

        def keep(losses, n, **kw):
            norms.append(n.detach().clone())
            return update(losses, n, **kw)

        session.balancer.update = keep  # type: ignore[method-assign]
        for step, index in enumerate(batches(steps)):
            loss = session.loss(task_losses(model(x[index]), y[index]))
            if step == skip:
                continue  # this step's loss is never backpropagated
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        taps = session.taps
        fed_by = session._owned.meta_updates.get("distributed_norms", {}).get("fed_by")
        session.close()
        return torch.stack(norms), taps, fed_by

    once = []
    gradients_once = dn.DistributedNormMeter._gradients_once
    monkeypatch.setattr(dn.DistributedNormMeter, "_gradients_once", lambda self, *args: once.append(args[-1]) or gradients_once(self, *args))
    tapped, taps, fed_by = run("auto")
    # Steps 2 and 3, whose calls of W went unkept while the taps served: the per-task weight gradients, once each.
    assert len(once) == 2 and "not kept" in once[0], once
    general, _, _ = run(None)
    assert taps is None  # dropped at step 3
    torch.testing.assert_close(tapped, general, rtol=1e-9, atol=1e-12)
    assert fed_by.startswith("one backward per task") and "the loss of step 2 was never backpropagated" in fed_by


def test_run_json_says_what_feeds_the_exchange(tmp_path):
    """The taps from step 1 by default; the per-task path with heads=None; nothing of it under accumulate=2."""
    import gradnorm
    from gradnorm.toolkit import runs

    feeds = {}
    for name, options in {"taps": {}, "general": {"heads": None}, "accumulate": {"accumulate": 2}}.items():
        model, x, y, task_losses = problem("toy")
        session = gradnorm.attach(model.shared_layer, gradnorm.GradNorm(alpha=0.12), distributed_norms="rows", runs_root=tmp_path, run_name=name, **options)
        for index in batches(4):
            session.loss(task_losses(model(x[index]), y[index])).backward()
        session.close()
        feeds[name] = runs.read_run_json(tmp_path / name)["distributed_norms"]["fed_by"]
    assert feeds["taps"].startswith("the heads' taps in your backward from step 1 (output-mask")
    assert feeds["general"].startswith("one backward per task from the losses to W's output") and "heads=None" in feeds["general"]
    assert feeds["accumulate"].startswith("not used: accumulate=2")
