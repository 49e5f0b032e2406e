"""``gradnorm demo``: the paper's toy problem (section 4), equal weights vs GradNorm, same seeds."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="train the paper's toy problem with equal weights and with GradNorm")
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 10], help="task counts to run (default: 2 10)")
    parser.add_argument("--steps", type=int, default=2000, help="training steps per run (default: 2000)")
    parser.add_argument("--alpha", type=float, default=0.12, help="GradNorm asymmetry (paper: 0.12 on the toy)")
    parser.add_argument("--runs-root", type=Path, default=None, help="where to write the runs (default: runs/demo-<time>)")
    parser.add_argument("--seed", type=int, default=0, help="data seed (the network's initialisation uses seed+1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from gradnorm.experiments.toy_demo import run_demo

    root = args.runs_root or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    run_demo(root, task_counts=args.tasks, steps=args.steps, alpha=args.alpha, seed=args.seed, progress=not args.no_progress)
    return 0
