"""Peak memory of a GradNorm step against the equal-weights step on the paper's toy problem (section 4).

Variants: ``equal`` (a plain loop, sum_i L_i); ``README default`` (``gradnorm.attach(layer,
GradNorm(alpha))``: the heads found at the first step, the norms tapped from the second); ``general path
(heads=None)`` (the norms from separate backward passes, ``hooks/grad_norms.py``); ``double backward``
(the paper's equations with create_graph double backward, as ``bench_step_time.py``); on the
encoder-decoder also ``heads=`` given.

On a GPU the figure is ``torch.cuda.max_memory_allocated`` around the measured steps. On the CPU, where
PyTorch keeps no allocator statistics, each variant runs in its own process with glibc told to serve every
block of 16 KiB or more by its own mmap (``MALLOC_MMAP_THRESHOLD_``), so that freed tensors leave the
resident set at once; the kernel's peak resident size (VmHWM, reset through ``/proc/self/clear_refs``)
over the measured steps, less the resident size before them, is the step's working memory. Adding the
bytes of the tensors that live across steps (parameters, gradients, optimiser state, the batch) gives the
analogue of the GPU figure. Usage::

    python benchmarks/bench_memory.py --markdown benchmarks/results/memory.md
    python benchmarks/bench_memory.py --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine_info import describe, publish  # noqa: E402

from gradnorm import hooks  # noqa: E402
from gradnorm.experiments import dense_model, toy  # noqa: E402
from gradnorm.toolkit.balancers import GradNorm

EQUAL, DEFAULT, GENERAL, DOUBLE, GIVEN = "equal", "README default", "general path (heads=None)", "double backward", "gradnorm, heads="
VARIANTS = (EQUAL, DEFAULT, GENERAL, DOUBLE)
DENSE_VARIANTS = (EQUAL, DEFAULT, GIVEN, GENERAL)
STEPS = 20


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def measure_variant(variant: str, num_tasks: int, device: torch.device, model_name: str = "toy", batch: int = 100) -> dict[str, float]:
    """Run one variant in this process; return its working and total peak bytes."""
    if model_name == "dense":
        scenes = dense_model.make_scenes(8, 64)
        part = dense_model.batch(scenes, torch.arange(8), device)
        inputs = [part.images, part.segmentation, part.depth, part.normals]
        torch.manual_seed(0)
        model = dense_model.DenseMultiTaskNet().to(device)
        shared, heads = model.shared, list(model.heads)

        def losses_of() -> list:
            return dense_model.task_losses(model(part.images), part)
    else:
        config = toy.ToyConfig(num_tasks=num_tasks, train_size=batch, test_size=8)
        data = toy.make_data(config)
        x, y = data.x_train[:batch].to(device).clone(), data.y_train[:batch].to(device).clone()
        del data
        inputs = [x, y]
        model = toy.make_model(config).to(device)
        shared, heads = model.shared_layer, list(model.heads)

        def losses_of() -> list:
            return toy.task_losses(model(x), y)

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    session = None
    double = None
    if variant == DOUBLE:
        from bench_step_time import DoubleBackwardGradNorm

        double = DoubleBackwardGradNorm(shared.weight, len(heads), device)
    elif variant != EQUAL:
        options = {DEFAULT: {}, GENERAL: {"heads": None}, GIVEN: {"heads": heads}}[variant]
        session = hooks.attach(shared, GradNorm(alpha=0.12), **options)

    def step() -> None:
        losses = losses_of()
        if double is not None:
            loss = double.weighted_loss(losses)
        else:
            loss = session.loss(losses) if session is not None else torch.stack(losses).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if double is not None:
            double.after_step()

    for _ in range(10):
        step()
    gc.collect()
    persistent = _tensor_bytes(
        [*model.parameters(), *(p.grad for p in model.parameters()), *inputs, *model.buffers()]
        + [value for state in optimizer.state.values() for value in state.values() if isinstance(value, torch.Tensor)]
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize(device)
        peak_total = torch.cuda.max_memory_allocated(device)
        return {"working_bytes": peak_total - before, "total_bytes": peak_total}
    before = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    for _ in range(STEPS):
        step()
    working = _status_bytes("VmHWM") - before
    return {"working_bytes": working, "total_bytes": working + persistent}


def measure_in_subprocess(variant: str, num_tasks: int, device: str, model_name: str, batch: int = 100) -> dict[str, float]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="16384", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--tasks", str(num_tasks), "--device", device, "--model", model_name, "--batches", str(batch)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def to_markdown(results: dict[tuple[int, int], dict[str, dict[str, float]]], device: torch.device, repeats: int, model_name: str = "toy") -> str:
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else describe(f"torch {torch.__version__}")
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    lines = [
        f"### {time.strftime('%Y-%m-%d')}, {device.type}: {machine}; load average {load} at the end",
        "",
        (
            "Encoder-decoder with 3 pixel-wise tasks (`experiments/dense_model.py`), batch 8 of 64x64"
            if model_name == "dense"
            else "Toy problem (paper section 4), 4x100 ReLU trunk, one 100-unit head per task"
        )
        + f", Adam; peak over {STEPS} steps after 10 warm-up steps, each variant "
        f"in its own process, median of {repeats} processes. `working` is the step's transient memory, `total` adds "
        "parameters, gradients, optimiser state and the batch. Ratios to `equal` from the same run.",
        "",
        "| T | batch | variant | working MB | total MB | total ratio |",
        "|---|---|---|---|---|---|",
    ]
    for (num_tasks, batch), by_variant in results.items():
        equal_total = by_variant[EQUAL]["total_bytes"]
        for variant, figures in by_variant.items():
            lines.append(
                f"| {num_tasks} | {batch} | {variant} | {figures['working_bytes'] / 1e6:.2f} | {figures['total_bytes'] / 1e6:.2f} | "
                f"{figures['total_bytes'] / equal_total:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40])
    parser.add_argument("--batches", type=int, nargs="+", default=[100, 1024])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", type=Path, default=None, help="append a results section to this file")
    parser.add_argument(
        "--model", choices=["toy", "dense"], default="toy", help="the paper's toy, or the encoder-decoder of experiments/dense_model.py (3 tasks)"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.child is not None:
        print(json.dumps(measure_variant(args.child, args.tasks[0], torch.device(args.device), args.model, args.batches[0])))
        return 0
    results: dict[tuple[int, int], dict[str, dict[str, float]]] = {}
    configs = [(t, b) for t in args.tasks for b in args.batches] if args.model == "toy" else [(len(dense_model.TASKS), 8)]
    for num_tasks, batch in configs:
        results[(num_tasks, batch)] = {}
        for variant in VARIANTS if args.model == "toy" else DENSE_VARIANTS:
            runs = [measure_in_subprocess(variant, num_tasks, args.device, args.model, batch) for _ in range(args.repeats)]
            results[(num_tasks, batch)][variant] = {key: sorted(r[key] for r in runs)[len(runs) // 2] for key in runs[0]}
        print(json.dumps({f"T={num_tasks}, batch={batch}": results[(num_tasks, batch)]}), flush=True)
    publish(to_markdown(results, torch.device(args.device), args.repeats, args.model), args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
