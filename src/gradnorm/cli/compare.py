"""``gradnorm compare``: every balancing method on the paper's toy problem (T=2, T=10) and on the Palmer
penguins, or (``--dataset qm9``) on QM9's 11 regression targets, same initialisation and data per seed;
writes a Table-1-style markdown table (paper Table 1) with each method's per-step cost next to its quality."""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from gradnorm.experiments.threads import SMALL_MODEL_THREADS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("compare", help="run every loss-balancing method on the toy problem and the penguins; write a table")
    parser.add_argument(
        "--dataset",
        choices=("toy+penguins", "qm9"),
        default="toy+penguins",
        help="toy+penguins (default): the paper's toy problem and the Palmer penguins; qm9: QM9's 11 targets (needs the qm9 extra)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="methods to run (default: every installed method; with --dataset qm9 the QM9 set: the baselines and the recent methods)",
    )
    parser.add_argument("--tasks", type=int, nargs="*", default=[2, 10], help="toy task counts (default: 2 10; none: skip the toy)")
    parser.add_argument("--toy-steps", type=int, default=300, help="training steps per toy run (default: 300)")
    parser.add_argument("--toy-train-size", type=int, default=10_000, help="toy training points (default: 10000)")
    parser.add_argument("--penguin-steps", type=int, default=600, help="training steps per penguins run (default: 600; 0: skip)")
    parser.add_argument("--qm9-steps", type=int, default=600, help="training steps per QM9 run (default: 600, batch 128)")
    parser.add_argument("--qm9-train-size", type=int, default=20_000, help="QM9 training molecules (default: 20000; 2000 validate)")
    parser.add_argument("--qm9-test-size", type=int, default=5_000, help="QM9 test molecules (default: 5000)")
    parser.add_argument("--jobs", type=int, default=1, help="QM9: seeds run in this many processes at once, one thread each (default: 1)")
    parser.add_argument("--append", action="store_true", help="append the table to --out instead of replacing it")
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

    if args.dataset == "qm9":
        return run_qm9(args)
    methods = compare.ordered(args.methods or compare.default_methods())
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
        "`static` retrains with the same seed's GradNorm E_t[w_i] (after 10% burn-in). MGDA, PCGrad, FAMO, DB-MTL and "
        "the TorchJD methods' weights are effective weights (see each balancer's docstring). "
        f"{COST_NOTE}",
        "",
    ]
    text = "\n".join(header) + "\n\n".join(sections) + "\n"
    write_table(args, root, text)
    return 0


COST_NOTE = (
    "`step cost (× equal)`: the training thread's CPU time per step (forward, session.loss, backward, optimiser "
    "step) over the equal-weights run's of the same seed, measured in the same invocation."
)


def write_table(args: argparse.Namespace, root: Path, text: str) -> None:
    out = args.out or root / "compare.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and out.exists():
        with out.open("a") as handle:
            handle.write("\n" + text)
    else:
        out.write_text(text)
    print(text)
    print(f"runs written under {Path(root).resolve()}; table in {out}")


def _qm9_seed(seed: int, methods: list[str], steps: int, root: str, train_size: int, test_size: int, threads: int, partial: str) -> list:
    """One seed's QM9 runs, in a worker process (or in this one with --jobs 1); each result is appended to
    ``partial`` (JSON lines) as soon as its run ends."""
    import dataclasses
    import json

    from gradnorm.experiments import compare, qm9
    from gradnorm.experiments.threads import intra_op_threads

    def keep(result: object) -> None:
        record = dataclasses.asdict(result)  # type: ignore[call-overload]
        record.pop("weights")
        with open(partial, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    with intra_op_threads(threads):
        data = qm9.load_qm9(seed, train_size, test_size)
        results = compare.run_qm9(seed, methods, steps, Path(root), data=data, on_result=keep)
    for result in results:
        result.weights = []  # not needed by the table; keeps the transfer from a worker small
    return results


def run_qm9(args: argparse.Namespace) -> int:
    from concurrent.futures import ProcessPoolExecutor

    from gradnorm.experiments import compare, qm9

    methods = compare.ordered(args.methods or compare.qm9_default_methods())
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    for option in ("qm9_steps", "jobs"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    qm9.data_folder()  # a missing qm9pack is an error here, before any process starts
    qm9.load_arrays(args.qm9_train_size, args.qm9_test_size)  # builds the descriptor cache once, for every worker
    root = args.runs_root or Path("runs") / time.strftime("compare-qm9-%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    partial = root / "qm9-results.jsonl"
    seeds = list(range(args.seeds))
    started = time.perf_counter()
    work = [(seed, methods, args.qm9_steps, str(root), args.qm9_train_size, args.qm9_test_size, args.threads, str(partial)) for seed in seeds]
    results = []
    if args.jobs == 1:
        for item in work:
            results += _qm9_seed(*item)
    else:
        import multiprocessing

        with ProcessPoolExecutor(max_workers=min(args.jobs, len(seeds)), mp_context=multiprocessing.get_context("spawn")) as pool:
            for seed_results in pool.map(_qm9_seed, *zip(*work)):
                results += seed_results
    title = (
        f"QM9, 11 targets, {args.qm9_steps} steps of batch {compare.QM9_BATCH} on {args.qm9_train_size} training molecules: "
        f"test MAE per target ({args.qm9_test_size} test molecules), Δm% against equal weights"
    )
    table = compare.format_table(title, results, compare.qm9_columns(results))
    header = [
        f"## QM9 (`gradnorm compare --dataset qm9`), {time.strftime('%Y-%m-%d')}",
        "",
        f"Written by `gradnorm compare --dataset qm9` ({platform.machine()}, {platform.system()}, torch CPU, {args.threads} thread per process, "
        f"{min(args.jobs, len(seeds))} processes), {time.perf_counter() - started:.0f} s in all. Mean ± standard deviation over seeds; per seed, every "
        "method starts from the same initial network and sees the same batches. Lower is better everywhere. Δm% is against the "
        "equal-weights run of the same seed (single-task baselines would need 11 more runs per seed). `static` retrains with "
        f"the same seed's GradNorm E_t[w_i] (after 10% burn-in). {COST_NOTE}",
        "",
    ]
    write_table(args, root, "\n".join(header) + "\n" + table + "\n")
    return 0
