"""``gradnorm compare``: every balancing method on the paper's toy problem (T=2, T=10) and on the Palmer
penguins, same initialisation and data per seed; writes a Table-1-style markdown table (paper Table 1)."""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from gradnorm.experiments.threads import SMALL_MODEL_THREADS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("compare", help="run every loss-balancing method on the toy problem and the penguins; write a table")
    parser.add_argument("--methods", nargs="+", default=None, help="methods to run (default: all)")
    parser.add_argument("--tasks", type=int, nargs="*", default=[2, 10], help="toy task counts (default: 2 10; none: skip the toy)")
    parser.add_argument("--toy-steps", type=int, default=300, help="training steps per toy run (default: 300)")
    parser.add_argument("--toy-train-size", type=int, default=10_000, help="toy training points (default: 10000)")
    parser.add_argument("--penguin-steps", type=int, default=600, help="training steps per penguins run (default: 600; 0: skip)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per problem (default: 3)")
    parser.add_argument("--runs-root", type=Path, default=None, help="where to write the runs (default: runs/compare-<time>)")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here (default: <runs-root>/compare.md)")
    parser.add_argument(
        "--threads", type=int, default=SMALL_MODEL_THREADS, help=f"intra-op threads (default: {SMALL_MODEL_THREADS}: these small models gain nothing from more)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from gradnorm.experiments import compare
    from gradnorm.experiments.threads import intra_op_threads

    methods = compare.ordered(args.methods or compare.METHODS)
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    for option in ("toy_steps", "penguin_steps"):
        if getattr(args, option) < 0:
            raise ValueError(f"--{option.replace('_', '-')} must be non-negative, got {getattr(args, option)}")
    bad_tasks = [t for t in args.tasks if t < 2]
    if bad_tasks:
        raise ValueError(f"--tasks: a multitask problem needs at least 2 tasks, got {bad_tasks}")
    root = args.runs_root or Path("runs") / time.strftime("compare-%Y%m%d-%H%M%S")
    seeds = list(range(args.seeds))
    total = len(methods) * len(seeds) * (args.toy_steps * len(args.tasks) + args.penguin_steps)
    sections = []
    started = time.perf_counter()
    with intra_op_threads(args.threads), tqdm(total=total, desc="compare", unit="step", disable=args.no_progress) as bar:
        for num_tasks in args.tasks if args.toy_steps else []:
            results = []
            for seed in seeds:
                bar.set_postfix_str(f"toy T={num_tasks} seed {seed}")
                results += compare.run_toy(num_tasks, seed, methods, args.toy_steps, root, args.toy_train_size, bar.update)
            title = f"Toy problem (paper section 4), T={num_tasks}, {args.toy_steps} steps: test-loss ratio L_i/L_i(0)"
            sections.append(compare.format_table(title, results, compare.toy_columns(num_tasks)))
        if args.penguin_steps:
            results = []
            for seed in seeds:
                bar.set_postfix_str(f"penguins seed {seed}")
                results += compare.run_penguins(seed, methods, args.penguin_steps, root, bar.update)
            title = f"Palmer penguins, {args.penguin_steps} steps: test error rates, body-mass RMSE"
            sections.append(compare.format_table(title, results, compare.PENGUIN_COLUMNS))
    header = [
        "# Loss-balancing methods compared (paper Table 1 style)",
        "",
        f"Written by `gradnorm compare` on {time.strftime('%Y-%m-%d')} ({platform.machine()}, {platform.system()}, "
        f"torch CPU), {time.perf_counter() - started:.0f} s in all. Mean ± standard deviation over seeds; per seed, every "
        "method starts from the same initial network and sees the same data and batches. Lower is better everywhere. "
        "`static` retrains with the same seed's GradNorm E_t[w_i] (after 10% burn-in). MGDA and PCGrad weights are "
        "effective weights (see each balancer's docstring).",
        "",
    ]
    text = "\n".join(header) + "\n\n".join(sections) + "\n"
    out = args.out or root / "compare.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"runs written under {Path(root).resolve()}; table in {out}")
    return 0
