"""Per-step cost of forwarding the records to a tracker against recording alone, on the paper's toy problem.

Variants, each with its own copy of the same network and the same batches, GradNorm with the README's
``attach`` (heads found at the first step, norms tapped from the backward, every step recorded):

- ``recording``: ``gradnorm.attach(..., runs_root=...)``, the denominator;
- ``recording + TensorBoard (default)``: the same with ``trackers=[gradnorm.TensorBoard(...)]`` at its
  defaults (every 10th step; weight, grad_norm, target_norm, loss_ratio, inverse_rate, skipped);
- ``recording + TensorBoard every step``: ``every=1``, ten times the scalars, to show what forwarding
  could cost if it were on the training thread at all.

Variants run interleaved in short blocks, order shuffled each round (``benchmarks/interleaved.py``); the
clock is the training thread's CPU time (``time.thread_time``), one torch thread, so other jobs on the
shared cores and the background threads (the recorder's writer, the forwarding threads) are not
counted against whichever variant happened to be running. Training-thread time is the target: forwarding
is designed to add nothing there. What forwarding costs off the training thread is measured apart: the
CPU time of the recorder's writer inside the forwarder (picking and copying rows) and of the tracker's
own thread in ``send`` (TensorBoard's protobuf events), each per training step.

Usage::

    python benchmarks/bench_forwarding.py                     # T=10, batch 100
    python benchmarks/bench_forwarding.py --markdown benchmarks/results/forwarding.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from interleaved import summarize, time_interleaved  # noqa: E402
from machine_info import describe, publish  # noqa: E402

import gradnorm  # noqa: E402
from gradnorm.experiments import toy  # noqa: E402
from gradnorm.toolkit.forwarding import Rows  # noqa: E402

BASELINE = "recording"


class TimedTensorBoard(gradnorm.TensorBoard):
    """The TensorBoard tracker, counting the CPU time its thread spends in ``send``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.send_seconds = 0.0

    def send(self, rows: Rows) -> None:
        started = time.thread_time()
        super().send(rows)
        self.send_seconds += time.thread_time() - started


def measure(args: argparse.Namespace, root: Path) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
    config = toy.ToyConfig(num_tasks=args.tasks, train_size=max(4 * args.batch, 2000), test_size=8, data_seed=args.seed, init_seed=args.seed + 1)
    data = toy.make_data(config)
    base = toy.make_model(config)
    generator = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, len(data.x_train), (args.batch,), generator=generator) for _ in range(16)]
    sessions: dict[str, gradnorm.Session] = {}
    trackers: dict[str, TimedTensorBoard] = {}
    writer_seconds: dict[str, list[float]] = {}
    steps_run: dict[str, int] = {}

    def variant(name: str, tracker: Optional[TimedTensorBoard]) -> Callable[[int], None]:
        model = copy.deepcopy(base)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        session = gradnorm.attach(
            model.shared_layer, gradnorm.GradNorm(alpha=args.alpha), runs_root=root, run_name=f"v{len(sessions)}", trackers=[tracker] if tracker else None
        )
        sessions[name] = session
        steps_run[name] = 0
        if tracker is not None:
            trackers[name] = tracker
            (forwarder,) = session.listeners
            spent = writer_seconds.setdefault(name, [0.0])
            rows_written = forwarder.rows_written

            def timed(*a: Any) -> None:  # on the writer thread
                started = time.thread_time()
                rows_written(*a)
                spent[0] += time.thread_time() - started

            forwarder.rows_written = timed  # type: ignore[method-assign]

        def step(i: int) -> None:
            index = batches[i % 16]
            loss = session.loss(toy.task_losses(model(data.x_train[index]), data.y_train[index]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps_run[name] += 1

        return step

    variants = {
        BASELINE: variant(BASELINE, None),
        "recording + TensorBoard (default: every 10th step)": variant("recording + TensorBoard (default: every 10th step)", TimedTensorBoard(root / "tb")),
        "recording + TensorBoard every step": variant("recording + TensorBoard every step", TimedTensorBoard(root / "tb1", every=1)),
    }
    times = time_interleaved(variants, torch.device("cpu"), args.rounds, args.block, args.warmup, args.seed, clock=time.thread_time)
    for session in sessions.values():
        session.close()
    background: dict[str, dict[str, float]] = {}
    for name, tracker in trackers.items():
        forwarding = json.loads((root / sessions[name].run_name / "run.json").read_text())["forwarding"]["tensorboard"]
        background[name] = {
            "writer_us": 1e6 * writer_seconds[name][0] / steps_run[name],
            "tracker_us": 1e6 * tracker.send_seconds / steps_run[name],
            "sent": forwarding["sent"],
            "failed": forwarding["failed"],
            "dropped": forwarding["dropped"],
            "steps": steps_run[name],
        }
    return times, background


def paired_ratio(times: dict[str, list[float]], name: str, block: int, seed: int) -> tuple[float, float, float]:
    """Median over rounds of (the variant's block median / the baseline's block median in the same round),
    with a 95% bootstrap interval over rounds: the rounds pair the variants against the machine's drift."""
    rounds = len(times[BASELINE]) // block
    ratios = [
        statistics.median(times[name][r * block : (r + 1) * block]) / statistics.median(times[BASELINE][r * block : (r + 1) * block]) for r in range(rounds)
    ]
    rng = random.Random(seed)
    boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    return statistics.median(ratios), boot[int(0.025 * len(boot))], boot[int(0.975 * len(boot)) - 1]


def to_markdown(args: argparse.Namespace, machine: str, times: dict[str, list[float]], background: dict[str, dict[str, float]], seconds: float) -> str:
    summary = summarize(times, baseline=BASELINE)
    base = times[BASELINE]
    lines = [
        f"### {time.strftime('%Y-%m-%d')}, {machine}",
        "",
        f"Toy problem (paper section 4), T={args.tasks}, batch {args.batch}, GradNorm alpha={args.alpha}, README attach, every step recorded "
        f"(flush every 100); {args.rounds} rounds x {args.block} steps per variant, interleaved, after {args.warmup} warm-up steps; "
        f"{seconds:.0f} s in all. Median CPU time of the training thread per step; ratio to `recording` from the same run; the paired "
        "ratio is the median over rounds of the ratio of the two block medians of one round, with a bootstrap interval over the rounds.",
        "",
        "| variant | ms / step | ratio of medians | paired ratio (95% interval) | writer's forwarding µs / step | tracker thread µs / step "
        "| steps sent / failed / dropped |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, figures in summary.items():
        extra = background.get(name)
        cells = (
            f"{extra['writer_us']:.1f} | {extra['tracker_us']:.1f} | {int(extra['sent'])} / {int(extra['failed'])} / {int(extra['dropped'])}"
            if extra
            else "- | - | -"
        )
        middle, low, high = paired_ratio(times, name, args.block, args.seed)
        lines.append(f"| {name} | {figures['median_ms']:.3f} | {figures['ratio']:.3f}x | {middle:.3f}x ({low:.3f}-{high:.3f}) | {cells} |")
    lines.append("")
    quartiles = {name: statistics.quantiles(values, n=4) for name, values in times.items()}
    lines.append(
        "Spread of the training thread's step time (quartiles, ms): "
        + "; ".join(f"{name}: {1e3 * q[0]:.3f}-{1e3 * q[2]:.3f}" for name, q in quartiles.items())
        + f". Steps timed per variant: {len(base)}."
    )
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.12)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--block", type=int, default=25, help="steps per variant and round")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", type=Path, default=None, help="append a results section to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    machine = describe("1 torch thread", f"torch {torch.__version__}") + f"; load average {load} at the start"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        times, background = measure(args, Path(tmp))
    load_end = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    report = to_markdown(args, machine + f", {load_end} at the end", times, background, time.perf_counter() - started)
    publish(report, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
