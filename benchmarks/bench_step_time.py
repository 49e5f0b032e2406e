"""Step time of GradNorm against equal weights on the paper's toy problem (section 4), side by side.

Variants, each with its own copy of the same network and the same batches:

- ``equal``: a plain loop, ``sum_i L_i``, no toolkit at all (the denominator of every ratio);
- ``floor: ...``: the plain loop plus the T weight-gradient products at W alone, the least any exact
  per-task norm at W adds;
- ``equal+record``: the toolkit attached with equal weights, measuring G_i and recording every step;
- ``gradnorm``: the toolkit's GradNorm (closed-form dL_grad/dw), nothing recorded;
- ``gradnorm+record``: the same, recording every step to Parquet;
- ``..., heads=``: the same with the gradient norms tapped from the ordinary backward pass at the task
  heads' input (``hooks.attach(..., heads=model.heads)``, ``hooks/taps.py``) instead of a separate
  batched backward from the losses;
- ``..., compile_update``: the same with the weight update fused by ``torch.compile``;
- ``double-backward``: the paper's equations with create_graph double backward (the common
  implementation; the same code as ``tests/gradnorm_reference.py``);
- ``gradnorm-pytorch``: the ``gradnorm-pytorch`` package, where installed.

Variants run interleaved in short blocks (order shuffled each round) so that drift of the machine hits
all of them alike; each figure is the median of per-step times, and ratios are to ``equal`` from the same
run.  Usage::

    python benchmarks/bench_step_time.py                 # CPU, T=2 and T=10
    python benchmarks/bench_step_time.py --device cuda   # on a GPU
    python benchmarks/bench_step_time.py --markdown benchmarks/results/step_time.md
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from interleaved import BatchStep, summarize, time_interleaved  # noqa: E402
from machine_info import describe, publish  # noqa: E402

from gradnorm import hooks  # noqa: E402
from gradnorm.experiments import toy  # noqa: E402
from gradnorm.toolkit.balancers import EqualWeights, GradNorm

ALPHA = 0.12
WEIGHT_LR = 0.025
NETWORK_LR = 1e-3
BATCH = 100

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


def make_variants(config: toy.ToyConfig, device: torch.device, runs_root: Path) -> tuple[dict[str, StepFn], list[Callable[[], None]]]:
    base = toy.make_model(config).to(device)
    variants: dict[str, StepFn] = {}
    closers: list[Callable[[], None]] = []

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
        """The plain step plus only the arithmetic any exact G_i at W needs: T products of head gradients
        with W's input (the linear-product route's matmul and norms, on stand-in tensors of the same shapes)."""
        model, optimizer = fresh()
        width = model.shared_layer.weight.shape
        pieces = torch.randn(BATCH, config.num_tasks * width[0], device=device)
        layer_input = torch.randn(BATCH, width[1], device=device)

        def step(x: Tensor, y: Tensor) -> None:
            loss = torch.stack(toy.task_losses(model(x), y)).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.linalg.vector_norm(torch.mm(pieces.t(), layer_input).view(config.num_tasks, -1), dim=1)
            optimizer.step()

        return step

    def session_step(balancer, record: bool, name: str, taps: bool = False) -> StepFn:
        model, optimizer = fresh()
        heads = list(model.heads) if taps else None
        session = hooks.attach(model.shared_layer, balancer, runs_root=runs_root if record else None, run_name=name, heads=heads)
        closers.append(session.close)

        def step(x: Tensor, y: Tensor) -> None:
            loss = session.loss(toy.task_losses(model(x), y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    def double_backward_step() -> StepFn:
        model, optimizer = fresh()
        gradnorm = DoubleBackwardGradNorm(model.shared_layer.weight, config.num_tasks, device)

        def step(x: Tensor, y: Tensor) -> None:
            loss = gradnorm.weighted_loss(toy.task_losses(model(x), y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            gradnorm.after_step()

        return step

    variants["equal"] = plain_step()
    variants["floor: equal + T products at W"] = floor_step()
    variants["equal+record"] = session_step(EqualWeights(), True, f"bench-T{config.num_tasks}-equal")
    variants["gradnorm"] = session_step(GradNorm(alpha=ALPHA), False, "unused")
    variants["gradnorm+record"] = session_step(GradNorm(alpha=ALPHA), True, f"bench-T{config.num_tasks}-gradnorm")
    variants["equal+record, heads="] = session_step(EqualWeights(), True, f"bench-T{config.num_tasks}-equal-taps", taps=True)
    variants["gradnorm, heads="] = session_step(GradNorm(alpha=ALPHA), False, "unused", taps=True)
    variants["gradnorm+record, heads="] = session_step(GradNorm(alpha=ALPHA), True, f"bench-T{config.num_tasks}-gradnorm-taps", taps=True)
    variants["gradnorm+record, heads=, compile_update"] = session_step(
        GradNorm(alpha=ALPHA, compile_update=True), True, f"bench-T{config.num_tasks}-gradnorm-taps-compiled", taps=True
    )
    variants["double-backward"] = double_backward_step()
    library = gradnorm_pytorch_step(fresh, config, device)
    if library is not None:
        variants["gradnorm-pytorch"] = library
    return variants, closers


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


def measure(num_tasks: int, device: torch.device, rounds: int, block: int, warmup: int, seed: int) -> dict[str, list[float]]:
    config = toy.ToyConfig(num_tasks=num_tasks, data_seed=seed, init_seed=seed + 1)
    data = toy.make_data(config)
    x_all, y_all = data.x_train.to(device), data.y_train.to(device)
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, len(x_all), (BATCH,), generator=generator) for _ in range(64)]
    with tempfile.TemporaryDirectory() as tmp:
        variants, closers = make_variants(config, device, Path(tmp))

        def on_batch(step: StepFn) -> BatchStep:
            return lambda i: step(x_all[batches[i % 64]], y_all[batches[i % 64]])

        times = time_interleaved({name: on_batch(step) for name, step in variants.items()}, device, rounds, block, warmup, seed)
        for close in closers:
            close()
    return times


def machine() -> str:
    return describe(f"{torch.get_num_threads()} torch threads", f"torch {torch.__version__}")


def to_markdown(results: dict[int, dict[str, dict[str, float]]], device: torch.device, args: argparse.Namespace) -> str:
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    lines = [
        f"### {time.strftime('%Y-%m-%d')}, {device.type}: {device_name}",
        "",
        f"Toy problem (paper section 4), batch {BATCH}, 4x100 ReLU trunk; {args.rounds} rounds x {args.block} steps per variant, "
        f"interleaved, after {args.warmup} warm-up steps. Median step time; ratio to `equal` measured in the same run.",
        "",
        "| variant | " + " | ".join(f"T={t} ms | T={t} ratio" for t in results) + " |",
        "|---|" + "---|---|" * len(results),
    ]
    names = list(next(iter(results.values())))
    for name in names:
        cells = []
        for summary in results.values():
            entry = summary.get(name)
            cells += [f"{entry['median_ms']:.3f}", f"{entry['ratio']:.2f}x"] if entry else ["-", "-"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for t, summary in results.items():
        lines.append("")
        lines.append(
            f"T={t}: with heads=, GradNorm recording every step costs {summary['gradnorm+record, heads=']['ratio']:.2f}x equal weights "
            f"({summary['gradnorm+record, heads=, compile_update']['ratio']:.2f}x with compile_update); "
            f"recording every step costs {summary['gradnorm+record']['median_ms'] / summary['gradnorm']['median_ms']:.3f}x "
            f"the unrecorded GradNorm step; GradNorm is {summary['double-backward']['median_ms'] / summary['gradnorm']['median_ms']:.2f}x faster "
            "than double backward"
            + (
                f" and {summary['gradnorm-pytorch']['median_ms'] / summary['gradnorm']['median_ms']:.2f}x faster than gradnorm-pytorch."
                if "gradnorm-pytorch" in summary
                else "."
            )
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 10])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", type=Path, default=None, help="append a results section to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = {t: summarize(measure(t, device, args.rounds, args.block, args.warmup, args.seed)) for t in args.tasks}
    print(json.dumps({str(t): r for t, r in results.items()}, indent=1))
    report = to_markdown(results, device, args)
    publish(report, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
