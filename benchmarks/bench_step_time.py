"""Step time of GradNorm against equal weights on the paper's toy problem (section 4), side by side.

Variants, each with its own copy of the same network and the same batches:

- ``equal``: a plain loop, ``sum_i L_i``, no toolkit at all (the denominator of every ratio);
- ``floor: equal + T products at W``: the plain loop plus the T weight-gradient products at W alone (the
  taps' matrix product and norms on stand-in tensors of the same shapes), the least any exact per-task
  norm at W adds;
- ``taps: equal weights``, ``taps: gradnorm``: the toolkit's taps (``hooks/taps.py``) with equal weights
  (measuring G_i, nothing else) and with GradNorm, nothing recorded: with ``floor`` and the next row they
  decompose the default's cost into the products, the taps' own work, the GradNorm update and recording;
- ``README default``: ``gradnorm.attach(model.shared_layer, gradnorm.GradNorm(alpha), runs_root=...)``
  exactly as the README's example: the heads are found at the first step, the norms tapped from the
  second, every step recorded to Parquet;
- ``general path (heads=None)``: the same with the heads' taps switched off, so the norms come from
  separate backward passes (``hooks/grad_norms.py``; its route is printed);
- ``double backward``: the paper's equations with create_graph double backward (the common
  implementation; the same code as ``tests/helpers/reference.py``);
- ``LibMTL GradNorm``, ``gradnorm-pytorch``, ``TorchJD mtl_backward + UPGrad``: other libraries, where
  installed. None is required; to run them::

      pip install gradnorm-pytorch "torchjd[quadprog-projector]" LibMTL

  LibMTL 1.1.5's top-level package imports ``torchvision.models.utils``, which torchvision removed in 0.13
  (torch 1.12); its weighting code (``LibMTL.weighting``) needs neither, so it is loaded on its own, and
  its GradNorm is driven the way LibMTL's trainer drives it (T backward passes over the shared
  parameters, the trunk).

Variants run interleaved in short blocks (order shuffled each round) so that drift of the machine hits
all of them alike; each figure is the median of per-step times, and ratios are to ``equal`` from the same
run. One intra-op thread by default (``--threads``): on a shared machine a second thread mostly waits. On
a CPU the clock is the training thread's CPU time (``--clock thread``), so that the time other jobs hold
the cores is not counted against whichever variant happened to be running (the recorder's writer thread,
which works in the background, is left out with it); ``--clock wall`` measures wall time (on a GPU,
always wall time with synchronisation). A variant slower than ``--slow-seconds`` a step (the slowest
peers at T=40) runs only in every k-th round, at most ``--slow-steps`` steps in all.
Usage::

    python benchmarks/bench_step_time.py                                   # CPU, T = 2, 10, 40; batch 100, 1024
    python benchmarks/bench_step_time.py --markdown benchmarks/results/step_time.md
    python benchmarks/bench_step_time.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from interleaved import BatchStep, summarize, time_interleaved, time_one_step  # noqa: E402
from machine_info import describe, publish  # noqa: E402

import gradnorm  # noqa: E402
from gradnorm.experiments import toy  # noqa: E402
from gradnorm.toolkit.balancers import EqualWeights, GradNorm  # noqa: E402

ALPHA = 0.12
WEIGHT_LR = 0.025
NETWORK_LR = 1e-3

EQUAL = "equal"
FLOOR = "floor: equal + T products at W"
TAPS_EQUAL = "taps: equal weights"
TAPS_GRADNORM = "taps: gradnorm"
DEFAULT = "README default"
GENERAL = "general path (heads=None)"
DOUBLE = "double backward"
LIBMTL = "LibMTL GradNorm"
GRADNORM_PYTORCH = "gradnorm-pytorch"
TORCHJD = "TorchJD mtl_backward + UPGrad"

StepFn = Callable[[Tensor, Tensor], None]


class DoubleBackwardGradNorm:
    """The paper's equations with create_graph double backward (what most implementations do)."""

    def __init__(self, shared: Tensor, num_tasks: int, device: torch.device) -> None:
        self.shared = shared
        self.weights = nn.Parameter(torch.ones(num_tasks, device=device))
        self.optimizer = torch.optim.Adam([self.weights], lr=WEIGHT_LR)
        self.initial: Optional[Tensor] = None

    def weighted_loss(self, losses: list[Tensor]) -> Tensor:
        stacked = torch.stack(losses)
        if self.initial is None:
            self.initial = stacked.detach()
        norms = torch.stack(
            [torch.autograd.grad(self.weights[i] * loss, self.shared, retain_graph=True, create_graph=True)[0].norm() for i, loss in enumerate(losses)]
        )
        ratio = stacked.detach() / self.initial
        target = (norms.mean() * (ratio / ratio.mean()) ** ALPHA).detach()
        grad_loss = (norms - target).abs().mean()
        (self.weights.grad,) = torch.autograd.grad(grad_loss, self.weights, retain_graph=True)
        return (self.weights.detach() * stacked).sum()

    def after_step(self) -> None:
        self.optimizer.step()
        with torch.no_grad():
            self.weights.clamp_(min=1e-4)
            self.weights.mul_(len(self.weights) / self.weights.sum())


def make_variants(config: toy.ToyConfig, batch: int, device: torch.device, runs_root: Path, only: Optional[set[str]] = None):
    """The variants' step functions, the sessions to close, and what each general path chose."""
    base = toy.make_model(config).to(device)
    variants: dict[str, StepFn] = {}
    closers: list[Callable[[], None]] = []
    notes: dict[str, str] = {}

    def fresh() -> tuple[toy.ToyNet, torch.optim.Optimizer]:
        model = copy.deepcopy(base)
        return model, torch.optim.Adam(model.parameters(), lr=NETWORK_LR)

    def plain_step() -> StepFn:
        model, optimizer = fresh()

        def step(x: Tensor, y: Tensor) -> None:
            loss = torch.stack(toy.task_losses(model(x), y)).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    def floor_step() -> StepFn:
        model, optimizer = fresh()
        width = model.shared_layer.weight.shape
        pieces = torch.randn(batch, config.num_tasks * width[0], device=device)
        layer_input = torch.randn(batch, width[1], device=device)

        def step(x: Tensor, y: Tensor) -> None:
            loss = torch.stack(toy.task_losses(model(x), y)).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.linalg.vector_norm(torch.mm(pieces.t(), layer_input).view(config.num_tasks, -1), dim=1)
            optimizer.step()

        return step

    def session_step(name: str, balancer, record: bool, **options) -> StepFn:
        model, optimizer = fresh()
        session = gradnorm.attach(
            model.shared_layer, balancer, runs_root=runs_root if record else None, run_name=f"{name}-T{config.num_tasks}-b{batch}", **options
        )
        closers.append(session.close)

        def step(x: Tensor, y: Tensor) -> None:
            loss = session.loss(toy.task_losses(model(x), y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if session.taps is not None and session.taps.path is not None:
                notes[name] = f"head-taps/{session.taps.path}"
            elif session.meter.choice is not None and name not in notes:
                notes[name] = session.meter.choice.route

        return step

    def double_backward_step() -> StepFn:
        model, optimizer = fresh()
        weighter = DoubleBackwardGradNorm(model.shared_layer.weight, config.num_tasks, device)

        def step(x: Tensor, y: Tensor) -> None:
            loss = weighter.weighted_loss(toy.task_losses(model(x), y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            weighter.after_step()

        return step

    makers: dict[str, Callable[[], Optional[StepFn]]] = {
        EQUAL: plain_step,
        FLOOR: floor_step,
        TAPS_EQUAL: lambda: session_step("taps-equal", EqualWeights(), False),
        TAPS_GRADNORM: lambda: session_step("taps-gradnorm", GradNorm(alpha=ALPHA), False),
        DEFAULT: lambda: session_step("default", GradNorm(alpha=ALPHA), True),
        GENERAL: lambda: session_step("general", GradNorm(alpha=ALPHA), True, heads=None),
        DOUBLE: double_backward_step,
        LIBMTL: lambda: libmtl_step(fresh, config, device),
        GRADNORM_PYTORCH: lambda: gradnorm_pytorch_step(fresh, config, device),
        TORCHJD: lambda: torchjd_step(fresh, config),
    }
    for name, make in makers.items():
        if only is not None and name not in only and name != EQUAL:
            continue
        made = make()
        if made is not None:
            variants[name] = made
    return variants, closers, notes


def gradnorm_pytorch_step(fresh, config: toy.ToyConfig, device: torch.device) -> Optional[StepFn]:
    try:
        from gradnorm_pytorch import GradNormLossWeighter
    except ImportError:
        return None
    model, optimizer = fresh()
    weighter = GradNormLossWeighter(
        num_losses=config.num_tasks, learning_rate=WEIGHT_LR, restoring_force_alpha=ALPHA, grad_norm_parameters=model.shared_layer.weight
    ).to(device)

    def step(x: Tensor, y: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        weighter(toy.task_losses(model(x), y))  # does the backward itself
        optimizer.step()

    return step


def torchjd_step(fresh, config: toy.ToyConfig) -> Optional[StepFn]:
    try:
        from torchjd.aggregation import UPGrad
        from torchjd.autojac import jac_to_grad, mtl_backward
    except ImportError:
        return None
    model, optimizer = fresh()
    aggregator = UPGrad()
    shared = list(model.trunk.parameters())

    def step(x: Tensor, y: Tensor) -> None:
        features = model.trunk(x)
        losses = toy.task_losses([head(features) for head in model.heads], y)
        optimizer.zero_grad(set_to_none=True)
        mtl_backward(losses, features=features)
        jac_to_grad(shared, aggregator)
        optimizer.step()

    return step


def _libmtl_weighting():
    """LibMTL's GradNorm class, from its weighting package alone (its model zoo needs torchvision < 0.13)."""
    if "LibMTL" not in sys.modules:
        try:
            spec = importlib.util.find_spec("LibMTL")
        except ValueError:
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        package = types.ModuleType("LibMTL")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["LibMTL"] = package
    try:
        return importlib.import_module("LibMTL.weighting.GradNorm").GradNorm
    except ImportError:
        return None


def libmtl_step(fresh, config: toy.ToyConfig, device: torch.device) -> Optional[StepFn]:
    libmtl_gradnorm = _libmtl_weighting()
    if libmtl_gradnorm is None:
        return None
    model, _ = fresh()

    class Weighted(libmtl_gradnorm):  # what LibMTL's trainer mixes into its model
        def __init__(self) -> None:
            super().__init__()
            self.task_num, self.device, self.rep_grad, self.epoch = config.num_tasks, device, False, 1
            self.init_param()
            self.train_loss_buffer = None

        def get_share_params(self):
            return model.trunk.parameters()

        def zero_grad_share_params(self):
            model.trunk.zero_grad(set_to_none=False)

    weighting = Weighted()
    optimizer = torch.optim.Adam([*model.parameters(), *weighting.parameters()], lr=NETWORK_LR)

    def step(x: Tensor, y: Tensor) -> None:
        losses = torch.stack(toy.task_losses(model(x), y))
        if weighting.train_loss_buffer is None:  # LibMTL's epoch-0 average of each loss, here the first batch's
            weighting.train_loss_buffer = losses.detach().cpu().numpy()[:, None]
        optimizer.zero_grad(set_to_none=False)
        weighting.backward(losses, alpha=ALPHA)
        optimizer.step()

    return step


def measure(num_tasks: int, batch: int, device: torch.device, args: argparse.Namespace, only: Optional[set[str]]) -> tuple[dict, dict[str, str]]:
    config = toy.ToyConfig(num_tasks=num_tasks, train_size=max(4 * batch, 2000), test_size=8, data_seed=args.seed, init_seed=args.seed + 1)
    data = toy.make_data(config)
    x_all, y_all = data.x_train.to(device), data.y_train.to(device)
    generator = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, len(x_all), (batch,), generator=generator) for _ in range(16)]
    with tempfile.TemporaryDirectory() as tmp:
        variants, closers, notes = make_variants(config, batch, device, Path(tmp), only)

        def on_batch(step: StepFn) -> BatchStep:
            return lambda i: step(x_all[batches[i % 16]], y_all[batches[i % 16]])

        steps = {name: on_batch(step) for name, step in variants.items()}
        # Each variant's block is sized to about --block-seconds (at least one step): the slow peers take fewer steps.
        clock = time.thread_time if args.clock == "thread" and device.type == "cpu" else time.perf_counter
        one = {name: time_one_step(step, device, clock=clock) for name, step in steps.items()}
        blocks = {name: max(1, min(args.block, round(args.block_seconds / seconds))) for name, seconds in one.items()}
        every = {name: max(1, -(-args.rounds // args.slow_steps)) for name, seconds in one.items() if seconds > args.slow_seconds}
        times = time_interleaved(steps, device, args.rounds, args.block, args.warmup, args.seed, blocks=blocks, clock=clock, every=every)
        for close in closers:
            close()
    return times, notes


def machine(threads: int) -> str:
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return describe(f"{threads} torch thread{'s' if threads != 1 else ''}", f"torch {torch.__version__}") + f"; load average {load} at the start"


def to_markdown(
    results: dict[tuple[int, int], dict],
    notes: dict[tuple[int, int], dict[str, str]],
    device: torch.device,
    args: argparse.Namespace,
    started: str,
    wall: float,
) -> str:
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else started
    keys = list(results)
    lines = [
        f"### {time.strftime('%Y-%m-%d')}, {device.type}: {device_name}",
        "",
        f"Toy problem (paper section 4), 4x100 ReLU trunk, one 100-unit head per task; {args.rounds} rounds per variant, interleaved, "
        f"each round a block of up to {args.block} steps (about {args.block_seconds:.2f} s), after {args.warmup} warm-up steps; "
        f"{wall / 60:.1f} min in all. Median step time ({'CPU time of the training thread' if args.clock == 'thread' and device.type == 'cpu' else 'wall time'}); "
        "ratio to `equal` measured in the same run.",
        "",
        "| variant | " + " | ".join(f"T={t}, b={b}" for t, b in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    names: list[str] = []
    for summary in results.values():
        names += [name for name in summary if name not in names]
    for name in names:
        cells = []
        for key in keys:
            entry = results[key].get(name)
            cells.append(f"{entry['ratio']:.2f}x ({entry['median_ms']:.2f} ms)" if entry else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    decomposition = [key for key in keys if all(name in results[key] for name in (FLOOR, TAPS_EQUAL, TAPS_GRADNORM, DEFAULT))]
    if decomposition:
        lines += [
            "",
            "Where the default's time goes, in units of the equal-weights step (differences of the rows above): the T "
            "weight-gradient products at W (`floor - equal`), the taps' own work (fan-out, factors, session bookkeeping, "
            "the norms: `taps: equal weights - floor`), the GradNorm update (`taps: gradnorm - taps: equal weights`) "
            "and recording (`README default - taps: gradnorm`).",
            "",
            "| part | " + " | ".join(f"T={t}, b={b}" for t, b in decomposition) + " |",
            "|---|" + "---|" * len(decomposition),
        ]
        parts = [
            ("products at W", EQUAL, FLOOR),
            ("taps", FLOOR, TAPS_EQUAL),
            ("GradNorm update", TAPS_EQUAL, TAPS_GRADNORM),
            ("recording", TAPS_GRADNORM, DEFAULT),
        ]
        for label, below, above in parts:
            lines.append(f"| {label} | " + " | ".join(f"{results[key][above]['ratio'] - results[key][below]['ratio']:+.2f}" for key in decomposition) + " |")
    routes = sorted({f"{variant}: {route}" for per_key in notes.values() for variant, route in per_key.items()})
    if routes:
        lines += ["", "Routes taken: " + "; ".join(routes) + "."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40])
    parser.add_argument("--batches", type=int, nargs="+", default=[100, 1024])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--clock", choices=["thread", "wall"], default="thread", help="on a CPU: the training thread's CPU time, or wall time")
    parser.add_argument("--slow-seconds", type=float, default=0.5, help="a variant slower than this a step runs in fewer rounds")
    parser.add_argument("--slow-steps", type=int, default=12, help="how many steps such a variant takes in all")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--block", type=int, default=3, help="most steps per variant and round")
    parser.add_argument("--block-seconds", type=float, default=0.05, help="a round's block of one variant lasts about this long")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", default=None, help="run only these variants (and equal)")
    parser.add_argument("--markdown", type=Path, default=None, help="append a results section to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started, begin = machine(args.threads), time.perf_counter()
    results, notes = {}, {}
    for num_tasks in args.tasks:
        for batch in args.batches:
            times, notes[(num_tasks, batch)] = measure(num_tasks, batch, device, args, set(args.only) if args.only else None)
            results[(num_tasks, batch)] = summarize(times)
            print(json.dumps({f"T={num_tasks}, batch={batch}": results[(num_tasks, batch)]}, indent=1), flush=True)
    publish(to_markdown(results, notes, device, args, started, time.perf_counter() - begin), args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
