"""Step time of ``attach(..., update_every=k)`` at k = 1, 4, 16 against equal weights, side by side.

On the paper's toy problem (section 4), each variant with its own copy of the same network and batches:

- ``equal``: a plain loop, ``sum_i L_i``, no toolkit at all (the denominator of every ratio);
- ``equal weights, monitored``: ``attach`` with the toolkit's ``EqualWeights`` and its defaults (the
  heads' taps measure the norms at every step, for the records), every step recorded;
- ``default, k=1/4/16``: the README's ``attach(shared, GradNorm(alpha), runs_root=...)`` (the heads' taps)
  with ``update_every=k``;
- ``general path, k=1/4/16``: the same with ``heads=None`` (separate backward passes for the norms).

Each figure is the median of per-step times over interleaved rounds (``benchmarks/interleaved.py``); the
steps are also split into the measured ones (every k-th) and the ones between, whose cost should be the
plain loop's plus the recording and the heads' forward hooks. The clock is the training thread's CPU time with one torch thread (a shared
machine: other jobs' time is not counted against whichever variant ran). Usage::

    python benchmarks/bench_update_every.py --markdown benchmarks/results/update_every.md
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from interleaved import BatchStep, time_interleaved  # noqa: E402
from machine_info import describe, publish  # noqa: E402

import gradnorm  # noqa: E402
from gradnorm.experiments import toy  # noqa: E402

ALPHA = 0.12
NETWORK_LR = 1e-3
EVERY = (1, 4, 16)
EQUAL = "equal"
RECORDED_EQUAL = "equal weights, monitored"


def make_variants(config: toy.ToyConfig, root: Path) -> tuple[dict[str, Callable[[Tensor, Tensor], None]], dict[str, list[bool]], list[Callable[[], None]]]:
    """Step functions, each one's per-step 'measured' flags (None-free: True for steps that measure), closers."""
    base = toy.make_model(config)
    variants: dict[str, Callable[[Tensor, Tensor], None]] = {}
    flags: dict[str, list[bool]] = {}
    closers: list[Callable[[], None]] = []

    model = copy.deepcopy(base)
    plain_opt = torch.optim.Adam(model.parameters(), lr=NETWORK_LR)

    def plain(x: Tensor, y: Tensor, model=model, optimizer=plain_opt) -> None:
        loss = torch.stack(toy.task_losses(model(x), y)).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    variants[EQUAL] = plain

    def session_step(name: str, balancer: gradnorm.Balancer, every: int, **options) -> None:
        net = copy.deepcopy(base)
        optimizer = torch.optim.Adam(net.parameters(), lr=NETWORK_LR)
        session = gradnorm.attach(net.shared_layer, balancer, runs_root=root, update_every=every, **options)
        closers.append(session.close)
        measured: list[bool] = []
        flags[name] = measured

        def step(x: Tensor, y: Tensor) -> None:
            measured.append(session.step_index % every == 0)
            loss = session.loss(toy.task_losses(net(x), y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        variants[name] = step

    session_step(RECORDED_EQUAL, gradnorm.EqualWeights(), 1)
    for every in EVERY:
        session_step(f"default, k={every}", gradnorm.GradNorm(alpha=ALPHA), every)
    for every in EVERY:
        session_step(f"general path, k={every}", gradnorm.GradNorm(alpha=ALPHA), every, heads=None)
    return variants, flags, closers


def measure(num_tasks: int, batch: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    config = toy.ToyConfig(num_tasks=num_tasks, train_size=max(4 * batch, 2000), test_size=8, data_seed=args.seed, init_seed=args.seed + 1)
    data = toy.make_data(config)
    generator = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, len(data.x_train), (batch,), generator=generator) for _ in range(16)]
    with tempfile.TemporaryDirectory() as tmp:
        variants, flags, closers = make_variants(config, Path(tmp))

        def on_batch(step: Callable[[Tensor, Tensor], None]) -> BatchStep:
            return lambda i: step(data.x_train[batches[i % 16]], data.y_train[batches[i % 16]])

        # Blocks of 16 steps, so that every variant's block holds its measured steps at the same share.
        times = time_interleaved(
            {n: on_batch(s) for n, s in variants.items()}, torch.device("cpu"), args.rounds, 16, args.warmup, args.seed, clock=time.thread_time
        )
        for close in closers:
            close()
    reference = statistics.median(times[EQUAL])
    summary: dict[str, dict[str, float]] = {}
    for name, values in times.items():
        entry = {
            "median_ms": 1e3 * statistics.median(values),
            "ratio": statistics.median(values) / reference,
            "mean_ratio": statistics.fmean(values) / reference,
        }
        if name in flags:
            kinds = flags[name][args.warmup :]
            assert len(kinds) == len(values)
            between = [t for t, measured in zip(values, kinds) if not measured]
            at = [t for t, measured in zip(values, kinds) if measured]
            entry["measured_ratio"] = statistics.median(at) / reference
            entry["between_ratio"] = statistics.median(between) / reference if between else float("nan")
        summary[name] = entry
    return summary


def to_markdown(results: dict[tuple[int, int], dict[str, dict[str, float]]], args: argparse.Namespace, wall: float, load: str) -> str:
    keys = list(results)
    lines = [
        f"### {time.strftime('%Y-%m-%d')}, cpu: {describe('1 torch thread', f'torch {torch.__version__}')}; load average {load} at the start",
        "",
        f"Toy problem (paper section 4), 4x100 ReLU trunk, one 100-unit head per task; {args.rounds} rounds, interleaved, each round a "
        f"block of 16 steps per variant, after {args.warmup} warm-up steps; {wall / 60:.1f} min in all. CPU time of the training "
        "thread; ratios to `equal` from the same run. Per cell: the mean step over the run (what a job pays per step), then the "
        "median of the measured steps (every k-th) and of the steps between.",
        "",
        "| variant | " + " | ".join(f"T={t}, b={b}: mean / measured / between" for t, b in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for name in results[keys[0]]:
        cells = []
        for key in keys:
            entry = results[key][name]
            if "measured_ratio" in entry:
                between = entry["between_ratio"]
                cells.append(f"{entry['mean_ratio']:.2f}x / {entry['measured_ratio']:.2f}x / " + ("-" if between != between else f"{between:.2f}x"))
            else:
                cells.append(f"{entry['mean_ratio']:.2f}x ({entry['median_ms']:.2f} ms median)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[10])
    parser.add_argument("--batches", type=int, nargs="+", default=[100, 1024])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", type=Path, default=None, help="append a results section to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    started = time.time()
    results = {(t, b): measure(t, b, args) for t in args.tasks for b in args.batches}
    publish(to_markdown(results, args, time.time() - started, load), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
