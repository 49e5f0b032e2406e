"""``gradnorm demo``: the paper's toy problem (section 4), equal weights vs GradNorm, same seeds."""

from __future__ import annotations

import argparse
from pathlib import Path

from gradnorm.experiments.threads import SMALL_MODEL_THREADS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="train the paper's toy problem with equal weights and with GradNorm")
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 10], help="task counts to run (default: 2 10)")
    parser.add_argument("--steps", type=int, default=2000, help="training steps per run (default: 2000)")
    parser.add_argument("--alpha", type=float, default=0.12, help="GradNorm asymmetry (paper: 0.12 on the toy)")
    parser.add_argument(
        "--runs-root", type=Path, default=Path("runs"), help="where to write the runs (default: ./runs, where the app and the other commands look)"
    )
    parser.add_argument("--seed", type=int, default=0, help="data seed (the network's initialisation uses seed+1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=SMALL_MODEL_THREADS,
        help=f"intra-op threads (default: {SMALL_MODEL_THREADS}: the toy's small matrices gain nothing from more)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from gradnorm.experiments.threads import intra_op_threads
    from gradnorm.experiments.toy_demo import run_demo

    bad_tasks = [t for t in args.tasks if t < 2]
    if bad_tasks:
        raise ValueError(f"--tasks: a multitask problem needs at least 2 tasks, got {bad_tasks}")
    if args.steps < 10:
        raise ValueError(f"--steps must be at least 10 (E_t[w_i] is averaged after a 10% burn-in), got {args.steps}")
    with intra_op_threads(args.threads):
        run_demo(args.runs_root, task_counts=args.tasks, steps=args.steps, alpha=args.alpha, seed=args.seed, progress=not args.no_progress)
    return 0
