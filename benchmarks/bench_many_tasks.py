"""Many tasks: the README-default GradNorm step against the equal-weights step at T = 2, 10, 40, 100.

Two models, each with one head per task:

- ``toy``: the paper's toy problem (section 4, ``experiments/toy.py``): a 4x100 ReLU trunk, W its last
  Linear, one 100x100 affine head per task, batch 100;
- ``dense``: a many-head variant of the encoder-decoder (``experiments/dense_model.py``): its encoder,
  decoder and shared convolution W unchanged (width 16), and T light pixel-wise heads (3x3 conv to 8
  channels, ReLU, 1x1 conv to one logit), task i a binary mask (depth above its i-th quantile), batch 4
  of 32x32 scenes.

Variants, each with its own copy of the same network and the same batches: ``equal`` (a plain loop,
``sum_i L_i``, no toolkit) and ``README default`` (``gradnorm.attach(W, gradnorm.GradNorm(alpha),
runs_root=...)``: the heads found at the first step, the norms tapped from the second, every step recorded
to Parquet); which path ran is read back from each run's ``run.json`` (``grad_norm_path``).

Step time: interleaved short blocks (``interleaved.py``), the CPU time of the training thread, one torch
thread; medians and ratios to ``equal`` from the same run. Peak memory: each variant in its own process,
as ``bench_memory.py`` measures it (glibc serving blocks of 16 KiB or more by mmap, the kernel's VmHWM
over 10 steps after 5 warm-up steps, less the resident size before them; ``total`` adds the bytes of the
tensors that live across steps).

``--compile``: the toy at T = ``--compile-tasks``, eager against ``torch.compile(model)`` (inductor where it
compiles here, else aot_eager), equal weights and the README default, all four interleaved.

Usage::

    python benchmarks/bench_many_tasks.py --markdown benchmarks/results/many_tasks.md
    python benchmarks/bench_many_tasks.py --tasks 2 10 --models toy --no-memory --no-compile   # a quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_memory import _status_bytes, _tensor_bytes  # noqa: E402
from interleaved import BatchStep, summarize, time_interleaved, time_one_step  # noqa: E402
from machine_info import describe, publish  # noqa: E402

import gradnorm  # noqa: E402
from gradnorm.experiments import dense_model, toy  # noqa: E402
from gradnorm.toolkit import runs  # noqa: E402

ALPHA = 0.12  # the toy's (paper section 4 uses 0.12 for T = 2)
EQUAL, DEFAULT = "equal", "README default"
COMPILED_EQUAL, COMPILED_DEFAULT = "compiled equal", "compiled README default"
DENSE_WIDTH, DENSE_SIZE, DENSE_BATCH, DENSE_SCENES = 16, 32, 4, 32
TOY_BATCH = 100


class ManyHeadDenseNet(dense_model.DenseMultiTaskNet):
    """The encoder-decoder with T light pixel-wise heads on the shared convolution's ReLU output."""

    def __init__(self, num_tasks: int, width: int = DENSE_WIDTH) -> None:
        super().__init__(width=width)
        self.heads = nn.ModuleList(nn.Sequential(nn.Conv2d(width, 8, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(8, 1, 1)) for _ in range(num_tasks))


def dense_targets(depth: Tensor, num_tasks: int) -> Tensor:
    """(N, T, S, S) binary masks: depth above its i-th of T quantiles (1 <= depth <= 4)."""
    thresholds = torch.linspace(1.0, 4.0, num_tasks + 2)[1:-1].view(1, -1, 1, 1)
    return (depth > thresholds).float()


def dense_losses(outputs: list[Tensor], targets: Tensor) -> list[Tensor]:
    return [F.binary_cross_entropy_with_logits(out[:, 0], targets[:, i]) for i, out in enumerate(outputs)]


Problem = tuple[nn.Module, nn.Module, list[tuple[Tensor, Tensor]], Callable[[list[Tensor], Tensor], list[Tensor]]]


def problem(model_name: str, num_tasks: int, seed: int = 0) -> Problem:
    """(model, its shared layer W's module, 16 batches, task_losses) for ``model_name`` at T tasks."""
    generator = torch.Generator().manual_seed(seed)
    if model_name == "toy":
        config = toy.ToyConfig(num_tasks=num_tasks, train_size=4 * TOY_BATCH, test_size=8, data_seed=seed, init_seed=seed + 1)
        data = toy.make_data(config)
        model = toy.make_model(config)
        picks = [torch.randint(0, len(data.x_train), (TOY_BATCH,), generator=generator) for _ in range(16)]
        return model, model.shared_layer, [(data.x_train[p], data.y_train[p]) for p in picks], toy.task_losses
    scenes = dense_model.make_scenes(DENSE_SCENES, DENSE_SIZE, seed=seed)
    targets = dense_targets(scenes.depth, num_tasks)
    torch.manual_seed(seed)
    model = ManyHeadDenseNet(num_tasks)
    picks = [torch.randint(0, DENSE_SCENES, (DENSE_BATCH,), generator=generator) for _ in range(16)]
    return model, model.shared, [(scenes.images[p], targets[p]) for p in picks], dense_losses


def compile_backend() -> str:
    """inductor where it compiles here (a C++ compiler on a CPU), else aot_eager."""
    try:
        torch.compile(lambda x: torch.relu(x) + 1, backend="inductor")(torch.randn(4))
        return "inductor"
    except Exception:  # inductor's own errors: no compiler, unsupported platform
        return "aot_eager"
    finally:
        torch._dynamo.reset()


def make_variants(model_name: str, num_tasks: int, runs_root: Path, names: list[str], backend: str = "inductor"):
    """The variants' step functions (on batch i), the sessions to close and their run names."""
    base, _, batches, task_losses = problem(model_name, num_tasks)
    variants: dict[str, BatchStep] = {}
    closers: list[Callable[[], None]] = []
    run_names: dict[str, str] = {}
    for name in names:
        model = copy.deepcopy(base)
        net = torch.compile(model, backend=backend) if name.startswith("compiled") else model
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        session = None
        if name.endswith(DEFAULT):
            layer = model.shared_layer if model_name == "toy" else model.shared
            run_name = f"{model_name}-T{num_tasks}-{'compiled-' if name.startswith('compiled') else ''}default"
            session = gradnorm.attach(layer, gradnorm.GradNorm(alpha=ALPHA), runs_root=runs_root, run_name=run_name)
            closers.append(session.close)
            run_names[name] = run_name

        def step(i: int, net=net, optimizer=optimizer, session=session) -> None:
            x, y = batches[i % len(batches)]
            losses = task_losses(net(x), y)
            loss = session.loss(losses) if session is not None else torch.stack(losses).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        variants[name] = step
    return variants, closers, run_names


def time_variants(model_name: str, num_tasks: int, names: list[str], args: argparse.Namespace, backend: str = "inductor") -> tuple[dict, dict[str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        variants, closers, run_names = make_variants(model_name, num_tasks, Path(tmp), names, backend)
        clock = time.thread_time
        # The warm-up covers the head search (step 0), the first tapped step and, compiled, the compilation.
        for step in variants.values():
            for i in range(args.warmup):
                step(i)
        one = {name: time_one_step(step, torch.device("cpu"), clock=clock) for name, step in variants.items()}
        blocks = {name: max(1, min(args.block, round(args.block_seconds / max(seconds, 1e-6)))) for name, seconds in one.items()}
        rounds = max(4, min(args.rounds, round(args.seconds_per_config / max(sum(one[n] * blocks[n] for n in one), 1e-6))))
        times = time_interleaved(variants, torch.device("cpu"), rounds, args.block, 0, args.seed, blocks=blocks, clock=clock)
        for close in closers:
            close()
        paths = {name: str(runs.read_run_json(Path(tmp) / run_name).get("grad_norm_path")) for name, run_name in run_names.items()}
    return summarize(times), paths


def measure_memory(model_name: str, num_tasks: int, variant: str) -> dict[str, float]:
    """One variant's working and total peak bytes, in this process (run as a child, see main)."""
    model, layer, batches, task_losses = problem(model_name, num_tasks)
    x, y = batches[0]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    session = gradnorm.attach(layer, gradnorm.GradNorm(alpha=ALPHA)) if variant == DEFAULT else None
    del batches

    def step() -> None:
        losses = task_losses(model(x), y)
        loss = session.loss(losses) if session is not None else torch.stack(losses).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    persistent = _tensor_bytes(
        [*model.parameters(), *(p.grad for p in model.parameters()), x, y, *model.buffers()]
        + [value for state in optimizer.state.values() for value in state.values() if isinstance(value, torch.Tensor)]
    )
    before = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    for _ in range(10):
        step()
    working = _status_bytes("VmHWM") - before
    return {"working_bytes": working, "total_bytes": working + persistent}


def memory_in_child(model_name: str, num_tasks: int, variant: str) -> dict[str, float]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="16384", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--models", model_name, "--tasks", str(num_tasks)], env=env, check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def markdown(entries: list[dict], args: argparse.Namespace) -> str:
    """The results section from the log's entries (one per configuration, one for --compile)."""
    configs = [entry for entry in entries if "compile" not in entry]
    compiled = [entry for entry in entries if "compile" in entry]
    machines = sorted({entry["machine"] for entry in entries})
    dates = sorted({entry["date"] for entry in entries})
    lines = [
        f"### {', '.join(dates)}, cpu: {'; '.join(machines)}",
        "",
        f"Step time: median CPU time of the training thread per step, one torch thread, variants interleaved in blocks of up to {args.block} steps "
        f"(about {args.block_seconds:.2f} s) after {args.warmup} warm-up steps each, `steps` timed per variant; "
        "ratio to `equal` from the same run. Peak memory: each variant in its own process, 10 steps after 5 warm-up steps; "
        "`working` is the step's transient memory, `total` adds parameters, gradients, Adam's state and the batch. "
        "`load` is the machine's 1-minute load average when the configuration finished (2 cores, shared).",
        "",
        "| model | T | equal ms | README default ms | time ratio | extra ms per task | equal working MB | default working MB | equal total MB | default total MB | total ratio | steps | load | path (run.json) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in configs:
        summary, mem, num_tasks = entry["time"], entry.get("memory"), entry["tasks"]
        cells = [
            entry["model"],
            str(num_tasks),
            f"{summary[EQUAL]['median_ms']:.2f}",
            f"{summary[DEFAULT]['median_ms']:.2f}",
            f"{summary[DEFAULT]['ratio']:.2f}x",
            f"{(summary[DEFAULT]['median_ms'] - summary[EQUAL]['median_ms']) / num_tasks:.3f}",
        ]
        if mem:
            equal, default = mem[EQUAL], mem[DEFAULT]
            cells += [
                f"{equal['working_bytes'] / 1e6:.2f}",
                f"{default['working_bytes'] / 1e6:.2f}",
                f"{equal['total_bytes'] / 1e6:.2f}",
                f"{default['total_bytes'] / 1e6:.2f}",
                f"{default['total_bytes'] / equal['total_bytes']:.2f}x",
            ]
        else:
            cells += ["-"] * 5
        cells += [str(summary[DEFAULT]["steps"]), entry["load"], f"`{entry['path'].get(DEFAULT, '?')}`"]
        lines.append("| " + " | ".join(cells) + " |")
    for entry in compiled:
        summary, compiled_paths = entry["compile"], entry["path"]
        lines += [
            "",
            f"torch.compile on the toy, T={entry['tasks']}, batch {TOY_BATCH}: `torch.compile(model, backend={entry['backend']!r})` against the eager model, "
            "all four interleaved as above (the compilation happens in the warm-up steps); ratio to eager `equal`; "
            f"load {entry['load']}.",
            "",
            "| variant | median ms | ratio | path (run.json) |",
            "|---|---|---|---|",
        ]
        for name in (EQUAL, DEFAULT, COMPILED_EQUAL, COMPILED_DEFAULT):
            item = summary[name]
            lines.append(
                f"| {name} | {item['median_ms']:.2f} | {item['ratio']:.2f}x | {('`' + compiled_paths[name] + '`') if name in compiled_paths else '-'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40, 100])
    parser.add_argument("--models", nargs="+", choices=["toy", "dense"], default=["toy", "dense"])
    parser.add_argument("--rounds", type=int, default=60, help="most interleaved rounds per configuration")
    parser.add_argument("--block", type=int, default=3, help="most steps per variant and round")
    parser.add_argument("--block-seconds", type=float, default=0.05, help="a round's block of one variant lasts about this long")
    parser.add_argument("--seconds-per-config", type=float, default=12.0, help="timed seconds per configuration, about")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--only-compile", action="store_true", help="only the --compile comparison")
    parser.add_argument("--compile-tasks", type=int, default=10)
    parser.add_argument("--log", type=Path, default=None, help="append each configuration's figures to this JSON-lines file as it finishes")
    parser.add_argument("--render", type=Path, default=None, help="write the results section from this log instead of measuring")
    parser.add_argument("--markdown", type=Path, default=None, help="append a results section to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.child is not None:
        print(json.dumps(measure_memory(args.models[0], args.tasks[0], args.child)))
        return 0
    if args.render is not None:
        entries = [json.loads(line) for line in args.render.read_text().splitlines() if line.strip()]
        publish(markdown(entries, args), args.markdown)
        return 0
    machine = describe("1 torch thread", f"torch {torch.__version__}")
    entries: list[dict] = []

    def keep(entry: dict) -> None:
        entry.update(machine=machine, date=time.strftime("%Y-%m-%d"), load=f"{os.getloadavg()[0]:.1f}")
        entries.append(entry)
        print(json.dumps(entry), flush=True)
        if args.log is not None:
            with args.log.open("a") as handle:
                handle.write(json.dumps(entry) + "\n")

    for model_name in [] if args.only_compile else args.models:
        for num_tasks in args.tasks:
            summary, paths = time_variants(model_name, num_tasks, [EQUAL, DEFAULT], args)
            memory = None if args.no_memory else {variant: memory_in_child(model_name, num_tasks, variant) for variant in (EQUAL, DEFAULT)}
            keep({"model": model_name, "tasks": num_tasks, "time": summary, "memory": memory, "path": paths})
    if not args.no_compile:
        backend = compile_backend()
        summary, paths = time_variants("toy", args.compile_tasks, [EQUAL, DEFAULT, COMPILED_EQUAL, COMPILED_DEFAULT], args, backend)
        keep({"model": "toy", "tasks": args.compile_tasks, "compile": summary, "path": paths, "backend": backend})
    publish(markdown(entries, args), args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
