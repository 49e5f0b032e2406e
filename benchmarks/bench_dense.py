"""Step time of GradNorm on a dense-prediction network: a small ResNet-style encoder-decoder with three
pixel-wise tasks (segmentation, depth, normals; ``toolkit/dense_model.py``), against equal weights.

Variants, each with its own copy of the same network and the same batches, timed interleaved
(``interleaved.py``): ``equal`` (a plain loop, the denominator), ``gradnorm`` (the general path: one
batched backward from the losses to W), ``gradnorm, heads=`` (norms tapped from the user's backward;
W is a convolution, so the ``batched-vjp`` route), and the same recording every step to Parquet.

On a GPU, ``--amp`` runs every variant under float16 autocast with a ``GradScaler`` (passed to the
session as ``grad_scaler=``), and ``--check-sync`` then runs steps of the ``heads=`` variant under
``torch.cuda.set_sync_debug_mode("error")`` and reports whether any synchronised with the host. Usage::

    python benchmarks/bench_dense.py --markdown benchmarks/results/dense.md
    python benchmarks/bench_dense.py --device cuda --batch 32 --size 128 --amp --check-sync --markdown benchmarks/results/dense.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from interleaved import BatchStep, summarize, time_interleaved  # noqa: E402
from machine_info import describe, publish  # noqa: E402

from gradnorm import hooks  # noqa: E402
from gradnorm.experiments import dense_model  # noqa: E402
from gradnorm.toolkit.balancers import GradNorm

ALPHA = 1.5  # the paper's NYUv2 value (section 5)


def make_variants(args: argparse.Namespace, device: torch.device, runs_root: Path) -> tuple[dict[str, BatchStep], list[Callable[[], None]]]:
    torch.manual_seed(args.seed)
    base = dense_model.DenseMultiTaskNet().to(device)
    scenes = dense_model.make_scenes(args.scenes, args.size, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    batches = [dense_model.batch(scenes, torch.randint(0, args.scenes, (args.batch,), generator=generator), device) for _ in range(16)]
    amp = args.amp and device.type == "cuda"
    closers: list[Callable[[], None]] = []

    def variant(balancer: Optional[GradNorm], heads: bool, record: Optional[str], floor: bool = False) -> BatchStep:
        model = copy.deepcopy(base)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        session = None
        if balancer is not None:
            session = hooks.attach(
                model.shared,
                balancer,
                heads=list(model.heads) if heads else None,
                runs_root=runs_root if record else None,
                run_name=record,
                grad_scaler=scaler if amp else None,
            )
            closers.append(session.close)

        def step(i: int) -> None:
            scenes_i = batches[i % len(batches)]
            context = torch.autocast("cuda", dtype=torch.float16) if amp else contextlib.nullcontext()
            with context:
                losses = dense_model.task_losses(model(scenes_i.images), scenes_i)
            loss = session.loss(losses) if session is not None else torch.stack(losses).sum()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if floor:
                # Only the arithmetic any exact G_i at W needs: the T tasks' weight gradients of W (one
                # weight-gradient convolution with T x C channels, stand-in tensors of the same shapes).
                product = torch.nn.grad.conv2d_weight(floor_input, floor_shape, floor_grads, padding=model.shared.padding)
                torch.linalg.vector_norm(product.view(len(dense_model.TASKS), -1), dim=1)
            scaler.step(optimizer)
            scaler.update()

        return step

    width = base.shared.weight.shape[0]
    floor_dtype = torch.float16 if amp else torch.float32
    floor_input = torch.randn(args.batch, width, args.size, args.size, device=device, dtype=floor_dtype)
    floor_grads = torch.randn(args.batch, len(dense_model.TASKS) * width, args.size, args.size, device=device, dtype=floor_dtype)
    floor_shape = (len(dense_model.TASKS) * width, *base.shared.weight.shape[1:])
    variants = {
        "equal": variant(None, False, None),
        "floor: equal + T products at W": variant(None, False, None, floor=True),
        "gradnorm": variant(GradNorm(alpha=ALPHA), False, None),
        "gradnorm, heads=": variant(GradNorm(alpha=ALPHA), True, None),
        "gradnorm+record, heads=": variant(GradNorm(alpha=ALPHA), True, "dense-gradnorm-taps"),
    }
    return variants, closers


def check_sync(step: BatchStep, steps: int) -> str:
    """Run ``steps`` steps with host synchronisation turned into an error; say what happened."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(steps):
            step(10_000 + i)
    except RuntimeError as exc:
        return f"a step synchronised with the host: {exc}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return f"no host synchronisation in {steps} steps (set_sync_debug_mode('error') stayed silent)"


def to_markdown(summary: dict, device: torch.device, args: argparse.Namespace, sync_note: Optional[str]) -> str:
    machine = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else describe(f"{torch.get_num_threads()} torch threads", f"torch {torch.__version__}")
    )
    precision = "float16 autocast + GradScaler" if args.amp and device.type == "cuda" else "float32"
    lines = [
        f"### {time.strftime('%Y-%m-%d')}, {device.type}: {machine}",
        "",
        f"Encoder-decoder, 3 pixel-wise tasks, batch {args.batch} of {args.size}x{args.size}, {precision}, Adam; "
        f"{args.rounds} rounds x {args.block} steps per variant, interleaved, after {args.warmup} warm-up steps. "
        "Median step time; ratio to `equal` from the same run.",
        "",
        "| variant | ms | ratio |",
        "|---|---|---|",
    ]
    for name, entry in summary.items():
        lines.append(f"| {name} | {entry['median_ms']:.2f} | {entry['ratio']:.3f}x |")
    if sync_note:
        lines += ["", f"Host synchronisation (`gradnorm, heads=`): {sync_note}."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--scenes", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--amp", action="store_true", help="float16 autocast and a GradScaler (GPU only)")
    parser.add_argument("--check-sync", action="store_true", help="run heads= steps under set_sync_debug_mode('error') (GPU only)")
    parser.add_argument("--markdown", type=Path, default=None, help="append a results section to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        variants, closers = make_variants(args, device, Path(tmp))
        summary = summarize(time_interleaved(variants, device, args.rounds, args.block, args.warmup, args.seed))
        sync_note = check_sync(variants["gradnorm, heads="], 20) if args.check_sync and device.type == "cuda" else None
        for close in closers:
            close()
    print(json.dumps(summary, indent=1))
    publish(to_markdown(summary, device, args, sync_note), args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
