"""GradNorm's communication under DDP against DDP's own gradient all-reduce, and the step time it costs.

Bytes: gloo processes on 127.0.0.1 (world sizes 2 to 4) train the toy (W its 100x100 shared Linear), the
encoder-decoder of ``src/gradnorm/experiments/dense_model.py`` (W its shared 3x3 conv) and a ResNet-18
trunk (``transformers.ResNetModel`` from the resnet-18 config, built from the config, W its last 3x3
convolution) with T = 3, 10, 40, 100 heads (one small head per task on W's side). Every
``torch.distributed`` collective GradNorm calls is counted by wrapping the module's functions; DDP's
reducer is counted apart, by a comm hook that all-reduces each bucket (so its traffic never passes the
wrappers). Each rank's payload (the numbers it hands to the collective) and the bytes it sends under
ring algorithms (all_reduce 2 (R-1)/R n, all_gather (R-1) n) are reported; world sizes 8 to 256 come from
the same formulas (``hooks/distributed_norms.exchanges``), checked against the measured ones.

Step time: 2 gloo processes on the toy, equal weights under DDP against GradNorm's default attach and
each forced route under DDP, interleaved in short blocks (the same shuffled order on both ranks), the
training thread's CPU time; and the same variants in one process (nothing exchanged; the default there
is the heads' taps alone, the single-process default), so that the ratio of ratios is what the exchange
and its route cost.

    python benchmarks/bench_distributed.py --markdown benchmarks/results/distributed.md
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.interleaved import time_interleaved  # noqa: E402
from benchmarks.machine_info import describe, publish  # noqa: E402

TASKS = (3, 10, 40, 100)
MODELS = ("toy", "encoder-decoder", "resnet18")
# Per-rank batch and input size of the measured runs (CPU): the payload of the sketch and of the
# gradients does not depend on them; the rows' does (P positions at W), and is also given at 224 x 224.
BATCH = {"toy": 32, "encoder-decoder": 2, "resnet18": 2}
IMAGE = {"encoder-decoder": 32, "resnet18": 64}


# -- the models -------------------------------------------------------------------------------------------
class Heads(nn.Module):
    def __init__(self, trunk: nn.Module, shared: nn.Module, heads: nn.ModuleList, pool: bool) -> None:
        super().__init__()
        self.trunk, self.heads, self.pool = trunk, heads, pool
        self.shared_layer = shared

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [head(z) for head in self.heads]


def build(kind: str, tasks: int) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(model with T heads, W's module, one batch of inputs)."""
    torch.manual_seed(0)
    if kind == "toy":
        from gradnorm.experiments import toy

        model = toy.make_model(toy.ToyConfig(num_tasks=tasks))
        return model, model.shared_layer, torch.randn(BATCH[kind], toy.INPUT_DIM)
    if kind == "encoder-decoder":
        from gradnorm.experiments.dense_model import DenseMultiTaskNet

        net = DenseMultiTaskNet()
        net.heads = nn.ModuleList(nn.Conv2d(32, 1, 1) for _ in range(tasks))
        return net, net.shared, torch.randn(BATCH[kind], 3, IMAGE[kind], IMAGE[kind])
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], embedding_size=64)
    resnet = ResNetModel(config)

    class Trunk(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.resnet = resnet

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.resnet(pixel_values=x).pooler_output.flatten(1)

    shared = resnet.encoder.stages[-1].layers[-1].layer[-1].convolution
    model = Heads(Trunk(), shared, nn.ModuleList(nn.Linear(512, 1) for _ in range(tasks)), pool=True)
    return model, shared, torch.randn(BATCH[kind], 3, IMAGE[kind], IMAGE[kind])


def losses_of(outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [(out - 0.1 * (i + 1)).square().mean() for i, out in enumerate(outputs)]


# -- counting ---------------------------------------------------------------------------------------------
class Counter:
    """Wraps torch.distributed's collectives; DDP's buckets are counted by its own comm hook."""

    NAMES = ("all_reduce", "all_gather_single", "all_gather_into_tensor", "all_gather", "broadcast", "reduce_scatter_tensor")

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        # (all_gather_into_tensor calls all_gather_single where both exist: the first call in a chain is counted.)
        self.original = {name: getattr(dist, name) for name in self.NAMES if hasattr(dist, name)}
        self._depth = 0
        self.gradnorm: list[tuple[str, int]] = []  # (collective, numbers handed) this step
        self.ddp_numbers = 0
        for name in self.original:
            setattr(dist, name, self._wrap(name))

    def _wrap(self, name: str):
        original = self.original[name]

        def counted(*args: Any, **kwargs: Any):
            tensor = args[1] if name in ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_tensor") else args[0]
            if isinstance(tensor, list):
                tensor = tensor[0]
            if self._depth == 0:
                self.gradnorm.append((name, tensor.numel()))
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def ddp_hook(self):
        """DDP's comm hook: count the bucket, then all-reduce it as DDP does (unannotated: DDP checks annotations)."""

        def hook(state, bucket):
            buffer = bucket.buffer()
            self.ddp_numbers += buffer.numel()
            buffer.div_(self.dist.get_world_size())
            return self.original["all_reduce"](buffer, async_op=True).get_future().then(lambda fut: fut.value()[0])

        return hook

    def reset(self) -> None:
        self.gradnorm, self.ddp_numbers = [], 0

    def restore(self) -> None:
        for name, function in self.original.items():
            setattr(self.dist, name, function)


def bytes_worker(rank: int, world: int, port: int, out: str, plan: list) -> None:
    try:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        import gradnorm
        from gradnorm.hooks import distributed_norms as dn

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
        counter = Counter()
        rows = []
        for kind, tasks, mode in plan:
            model, shared, x = build(kind, tasks)
            ddp = DistributedDataParallel(model)
            ddp.register_comm_hook(None, counter.ddp_hook())
            optimizer = torch.optim.SGD(ddp.parameters(), lr=1e-3)
            session = gradnorm.attach(shared, gradnorm.GradNorm(alpha=1.5), distributed_norms=mode)
            for _ in range(2):  # the second step is counted (the first also chooses the route)
                counter.reset()
                loss = session.loss(losses_of(ddp(x)))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            meter = session.meter
            record = meter.describe() if isinstance(meter, dn.DistributedNormMeter) else {"route": "gradients"}
            element = 4
            sent = sum(
                dn.ring_bytes("all_gather" if name.startswith("all_gather") else "all_reduce", numbers, world, element) for name, numbers in counter.gradnorm
            )
            rows.append(
                {
                    "model": kind,
                    "tasks": tasks,
                    "world": world,
                    "mode": mode,
                    "route": record.get("route"),
                    "collectives": len(counter.gradnorm),
                    "payload_numbers": sum(n for _, n in counter.gradnorm),
                    "wire_bytes": sent,
                    "formula_numbers": record.get("exchange", {}).get("numbers"),
                    "routes": record.get("routes", {}),
                    "weight_numel": shared.weight.numel(),
                    "ddp_numbers": counter.ddp_numbers,
                    "params": sum(p.numel() for p in model.parameters()),
                }
            )
            session.close()
            del ddp, model
        counter.restore()
        if rank == 0:
            torch.save(rows, out)
        dist.destroy_process_group()
    except BaseException:
        Path(out + f".error{rank}").write_text(traceback.format_exc())
        raise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(target, world: int, out: str, plan: list, timeout: float) -> None:
    context = multiprocessing.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=target, args=(r, world, port, out, plan)) for r in range(world)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(timeout=max(1.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
    errors = [p.read_text() for p in Path(out).parent.glob(Path(out).name + ".error*")]
    if errors:
        raise RuntimeError(errors[0])


# -- step time ----------------------------------------------------------------------------------------------
#: name -> attach's arguments past the balancer (None: equal weights, nothing measured). ``default`` is the
#: README's attach: ``distributed_norms="auto"`` under DDP, the heads' taps alone in one process.
VARIANTS: dict[str, Any] = {
    "equal": None,
    "default": {},
    "rows": {"distributed_norms": "rows"},
    "sketch": {"distributed_norms": "sketch"},
    "gradients": {"distributed_norms": "gradients"},
}


def time_worker(rank: int, world: int, port: int, out: str, plan: list) -> None:
    try:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        import gradnorm
        from gradnorm.experiments import toy

        torch.set_num_threads(1)
        tasks, batch, rounds, block = plan
        if world > 1:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
        config = toy.ToyConfig(num_tasks=tasks, train_size=4096, test_size=8)
        data = toy.make_data(config)
        steps, sessions = {}, {}
        for name, options in VARIANTS.items():
            if world == 1 and name == "gradients":
                continue  # one process: nothing to average
            torch.manual_seed(0)
            model = toy.make_model(config)
            net = DistributedDataParallel(model) if world > 1 else model
            optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
            if options is None:
                session = gradnorm.attach(model.shared_layer, gradnorm.EqualWeights(), measure_grad_norms=False)
            else:
                session = gradnorm.attach(model.shared_layer, gradnorm.GradNorm(alpha=0.12), **options)
            sessions[name] = session

            def step(i: int, net=net, optimizer=optimizer, session=session) -> None:
                start = (i * batch * world + rank * batch) % (4096 - batch)
                loss = session.loss(toy.task_losses(net(data.x_train[start : start + batch]), data.y_train[start : start + batch]))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

            steps[name] = step
        # The training thread's CPU time: gloo's collectives run on its own threads, and other jobs' time on the shared cores is left out.
        times = time_interleaved(steps, torch.device("cpu"), rounds=rounds, block=block, warmup=5, seed=7, clock=time.thread_time)
        results: dict[str, Any] = {
            "cpu": {name: 1e3 * statistics.median(values) for name, values in times.items()},
            "cpu_spread": {name: _spread(values) for name, values in times.items()},
            "paths": {name: _path(session) for name, session in sessions.items()},
        }
        for session in sessions.values():
            session.close()
        if rank == 0:
            results["load"] = os.getloadavg()
            torch.save(results, out)
        if world > 1:
            dist.destroy_process_group()
    except BaseException:
        Path(out + f".error{rank}").write_text(traceback.format_exc())
        raise


def _path(session: Any) -> str:
    """How the session measured the last steps: the taps' route and the meter's (the exchange's) route."""
    if not session.measure:
        return "-"
    meter = session.meter.route or "-"
    return f"head-taps/{session.taps.path}" + (f" + {meter}" if meter.startswith("distributed-") else "") if session.taps is not None else meter


def _spread(values: list[float]) -> float:
    """Half the interquartile range over the median, in per cent."""
    q = statistics.quantiles(values, n=4)
    return 100 * (q[2] - q[0]) / 2 / statistics.median(values)


# -- report ----------------------------------------------------------------------------------------------------
def formula_rows(weight_numel: int, shape, tasks: int, world: int, ddp_numbers: int, sketch_size: int) -> dict[str, float]:
    from gradnorm.hooks import distributed_norms as dn

    options = dn.exchanges(tasks, weight_numel, world, shape=shape, sketch_size=sketch_size)
    ddp = dn.ring_bytes("all_reduce", ddp_numbers, world, 4)
    # auto's choice with the rows on the CPU (gloo) and on an accelerator (NCCL): a byte weighs 20 or 2000 multiply-adds.
    cpu, _ = dn.choose("auto", options, byte_weight=dn.BYTE_MULTIPLY_ADDS["cpu"])
    accelerator, _ = dn.choose("auto", options, byte_weight=dn.BYTE_MULTIPLY_ADDS["accelerator"])
    return {"route": f"{cpu} / {accelerator}", **{name: e.wire_bytes / ddp for name, e in options.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--time-rounds", type=int, default=20)
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--only-time", action="store_true", help="the step-time section only")
    args = parser.parse_args()
    if args.only_time:
        work = Path("/tmp") / f"bench_distributed_{os.getpid()}"
        work.mkdir(exist_ok=True)
        publish(time_section(work, args.time_rounds), args.markdown)
        return
    from gradnorm.hooks import distributed_norms as dn

    load_before = os.getloadavg()
    started = time.time()
    work = Path("/tmp") / f"bench_distributed_{os.getpid()}"
    work.mkdir(exist_ok=True)
    measured = []
    plan = [(kind, tasks, "auto") for kind in MODELS for tasks in TASKS]
    plan += [("toy", 3, "gradients"), ("toy", 10, "gradients"), ("encoder-decoder", 3, "gradients")]
    for world in args.worlds:
        out = str(work / f"bytes{world}.pt")
        spawn(bytes_worker, world, out, plan, timeout=1800)
        measured += torch.load(out)
    lines = [
        f"## Communication per step under DDP ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {describe(f'torch {torch.__version__}')}; gloo on 127.0.0.1, one torch thread per process; load average "
        f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after (shared with other jobs).",
        "",
        "Measured: the second training step of each configuration, every collective GradNorm calls counted by wrapping "
        "`torch.distributed`'s functions, DDP's buckets by a counting comm hook. Payload: numbers each rank hands to "
        "GradNorm's collectives (float32). Sent: bytes each rank sends under ring algorithms (all_reduce 2 (R-1)/R n, "
        "all_gather (R-1) n), GradNorm's and DDP's alike. `auto` is the default `distributed_norms`; the sketch has "
        f"k = {dn.DEFAULT_SKETCH_SIZE} pairs. Per-rank batch: toy {BATCH['toy']} rows, encoder-decoder {BATCH['encoder-decoder']} "
        f"images of {IMAGE['encoder-decoder']}x{IMAGE['encoder-decoder']}, ResNet-18 {BATCH['resnet18']} images of {IMAGE['resnet18']}x{IMAGE['resnet18']}.",
        "",
        "| model | T | ranks | distributed_norms | route | collectives | payload (numbers) | formula | GradNorm sent (bytes) | DDP sent (bytes) | GradNorm / DDP |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in measured:
        ddp_sent = dn.ring_bytes("all_reduce", row["ddp_numbers"], row["world"], 4)
        formula = row["formula_numbers"] if row["formula_numbers"] is not None else row["tasks"] + row["tasks"] * row["weight_numel"]
        lines.append(
            f"| {row['model']} | {row['tasks']} | {row['world']} | {row['mode']} | {row['route']} | {row['collectives']} | {row['payload_numbers']:,} | "
            f"{formula:,} | {row['wire_bytes']:,} | {ddp_sent:,} | {100 * row['wire_bytes'] / ddp_sent:.3f}% |"
        )
    report = "\n".join(lines) + "\n" + computed_section(measured, args.worlds[0])
    if not args.skip_time:
        report += time_section(work, args.time_rounds)
    report += f"\n({time.time() - started:.0f} s in all.)\n"
    publish(report, args.markdown)


def computed_section(measured: list, world_measured: int) -> str:
    """World sizes 8 to 256 from the measured shapes (DDP's numbers as measured; W's positions per rank as
    measured, and for ResNet-18 also at 224 x 224: 7 x 7 outputs per image)."""
    from gradnorm.hooks import distributed_norms as dn
    from gradnorm.hooks import gram_norms

    lines = [
        "",
        "Computed from the same formulas (`hooks/distributed_norms.exchanges`, DDP: an all_reduce of its measured gradient numbers), "
        "bytes sent per rank as a share of DDP's, at T = 40 and T = 100; `rows` at the measured positions per rank "
        "(ResNet-18 also at 224 x 224 images, 8 per rank: P = 392).",
        "",
        "| model | T | ranks | auto's route (CPU / accelerator) | gradients | rows | sketch |",
        "|---|---|---|---|---|---|---|",
    ]
    by_model = {(r["model"], r["tasks"]): r for r in measured if r["mode"] == "auto" and r["world"] == world_measured}
    for (kind, tasks), row in sorted(by_model.items()):
        if tasks not in (40, 100):
            continue
        _, shared, _ = build(kind, 3)
        shape = _shape(kind, shared)
        variants = [(kind, shape)]
        if kind == "resnet18":
            variants.append(("resnet18 @224, 8/rank", gram_norms.Geometry(8 * 49, 1, 512 * 9, 512)))
        for label, geometry in variants:
            for world in (8, 32, 256):
                share = formula_rows(row["weight_numel"], geometry, tasks, world, row["ddp_numbers"], dn.DEFAULT_SKETCH_SIZE)
                lines.append(
                    f"| {label} | {tasks} | {world} | {share['route']} | {100 * share['gradients']:.2f}% | {100 * share['rows']:.2f}% | {100 * share['sketch']:.3f}% |"
                )
    return "\n".join(lines) + "\n"


def _shape(kind: str, shared: nn.Module):
    from gradnorm.hooks import gram_norms

    if kind == "toy":
        return gram_norms.Geometry(BATCH[kind], 1, shared.in_features, shared.out_features)
    side = IMAGE[kind] if kind == "encoder-decoder" else IMAGE[kind] // 32
    return gram_norms.Geometry(BATCH[kind] * side * side, 1, shared.in_channels * 9, shared.out_channels)


def time_section(work: Path, rounds: int) -> str:
    names = list(VARIANTS)
    lines = [
        "",
        f"## Step time on the toy, 2 gloo processes against one, the taps feeding the exchange ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {describe(f'torch {torch.__version__}')}; one torch thread per process. Median ms per step of the training "
        f"thread's CPU time (gloo's collectives run on its own threads; other jobs on the shared cores are left out); {rounds} "
        "rounds of blocks of 5 steps per variant after 5 warm-up steps, the variants' order shuffled each round, the same order "
        "on every rank. One process: the same sessions, nothing exchanged. `default` is the README's attach "
        '(`distributed_norms="auto"`); `rows`, `sketch` (k = 512), `gradients` force that route. Spread: half the '
        "interquartile range, per cent of the median.",
        "",
        "| T | batch / rank | processes | " + " | ".join(names) + " | " + " | ".join(f"{n} / equal" for n in names[1:]) + " | default extra (ms) | load |",
        "|" + "---|" * (4 + 2 * len(names)),
    ]
    paths: dict[tuple[int, int], dict[str, str]] = {}
    for tasks, batch in ((3, 100), (10, 100)):
        for world in (2, 1):
            out = str(work / f"time{tasks}-{world}.pt")
            spawn(time_worker, world, out, [tasks, batch, rounds, 5], timeout=1800)
            result = torch.load(out)
            ms, spread = result["cpu"], result["cpu_spread"]
            paths[(tasks, world)] = result["paths"]
            cells = [f"{ms[v]:.2f} (±{spread[v]:.0f}%)" if v in ms else "-" for v in names]
            ratios = [f"{ms[v] / ms['equal']:.2f}" if v in ms else "-" for v in names[1:]]
            extra = ms["default"] - ms["equal"]
            lines.append(f"| {tasks} | {batch} | {world} | " + " | ".join(cells) + " | " + " | ".join(ratios) + f" | {extra:+.2f} | {result['load'][0]:.1f} |")
    lines += ["", "How each variant measured (after the first step):", ""]
    for (tasks, world), by_name in paths.items():
        described = "; ".join(f"{name}: {path}" for name, path in by_name.items() if name != "equal")
        lines.append(f"- T = {tasks}, {world} process{'es' if world > 1 else ''}: {described}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
