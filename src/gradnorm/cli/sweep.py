"""``gradnorm sweep``: the paper's section 5.3 on the toy problem, at a small default size."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gradnorm.experiments.threads import SMALL_MODEL_THREADS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("sweep", help="random static weights vs GradNorm's E_t[w_i] on the toy problem (paper 5.3)")
    parser.add_argument("--tasks", type=int, default=2, help="task count (default: 2)")
    parser.add_argument("--networks", type=int, default=16, help="random static networks (default: 16)")
    parser.add_argument("--steps", type=int, default=500, help="training steps per network (default: 500)")
    parser.add_argument("--alpha", type=float, default=0.12, help="GradNorm asymmetry (default: 0.12)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sampling",
        choices=("uniform", "mixture"),
        default="uniform",
        help="static weights: uniform on (0, 1) renormalised to sum to T (default, the paper's), or mixture: Dirichlet draws centred on "
        "GradNorm's E_t[w_i] at each --concentrations value plus uniform ones, in turn, so distances span near to far",
    )
    parser.add_argument(
        "--concentrations",
        type=float,
        nargs="+",
        default=None,
        metavar="KAPPA",
        help="mixture: Dirichlet concentrations, larger is nearer E_t[w_i] (default: 3000 300 100 30 10)",
    )
    parser.add_argument("--runs-root", type=Path, default=None, help="where to record the runs (default: runs/sweep-<time>)")
    parser.add_argument("--out", type=Path, default=None, help="where to write sweep.md/.json/.html (default: the runs root)")
    parser.add_argument(
        "--threads", type=int, default=SMALL_MODEL_THREADS, help=f"intra-op threads (default: {SMALL_MODEL_THREADS}: these small models gain nothing from more)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="worker processes for the static networks, each with --threads (default: 1)")
    parser.add_argument(
        "--from-runs",
        type=Path,
        default=None,
        metavar="ROOT",
        help="train nothing: write the report from the finished runs of a sweep under ROOT (one stopped early too), "
        "given the --tasks, --sampling, --concentrations and --seed it ran with",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from gradnorm.experiments.grid_sweep import DEFAULT_CONCENTRATIONS, collect_sweep, run_sweep, write_report
    from gradnorm.experiments.threads import intra_op_threads

    if args.concentrations is not None and args.sampling != "mixture":
        raise ValueError("--concentrations applies to --sampling mixture only")
    concentrations = tuple(args.concentrations) if args.concentrations is not None else DEFAULT_CONCENTRATIONS
    bad = [c for c in concentrations if not c > 0]
    if bad:
        raise ValueError(f"--concentrations must be positive, got {bad}")
    if args.from_runs is not None:
        result = collect_sweep(args.from_runs, args.tasks, args.sampling, concentrations, args.seed)
        written = write_report(result, args.out or args.from_runs)
        print(written[0].read_text(encoding="utf-8"))
        print("written: " + ", ".join(str(p) for p in written))
        return 0
    root = args.runs_root or Path("runs") / time.strftime("sweep-%Y%m%d-%H%M%S")
    with intra_op_threads(args.threads), tqdm(total=args.steps * (args.networks + 1), desc="sweep", unit="step", disable=args.no_progress) as bar:
        result = run_sweep(
            root,
            args.tasks,
            args.networks,
            args.steps,
            args.alpha,
            args.seed,
            progress=bar.update,
            sampling=args.sampling,
            concentrations=concentrations,
            jobs=args.jobs,
        )
    written = write_report(result, args.out or root)
    print(written[0].read_text(encoding="utf-8"))
    print("written: " + ", ".join(str(p) for p in written))
    return 0
