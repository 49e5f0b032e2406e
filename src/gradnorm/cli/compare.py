"""``gradnorm compare``: every balancing method on the paper's toy problem (T=2, T=10) and on the Palmer
penguins, or (``--dataset qm9``) on QM9's 11 regression targets, or (``--dataset scenes``) on the
encoder-decoder's generated scenes (3 dense tasks), same initialisation and data per seed; writes a
Table-1-style markdown table (paper Table 1) with each method's per-step cost next to its quality, and a
table of the step costs measured interleaved on the same batches (``--cost-rounds``)."""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradnorm.experiments.compare import SceneData

from gradnorm.experiments.threads import SMALL_MODEL_THREADS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("compare", help="run every loss-balancing method on the toy problem and the penguins; write a table")
    parser.add_argument(
        "--dataset",
        choices=("toy+penguins", "qm9", "scenes"),
        default="toy+penguins",
        help="toy+penguins (default): the paper's toy problem and the Palmer penguins; qm9: QM9's 11 targets (needs the qm9 extra); "
        "scenes: the encoder-decoder's generated scenes (segmentation, depth, normals)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="methods to run (default: every installed method; with --dataset qm9 or scenes the QM9 set: the baselines and the recent methods)",
    )
    parser.add_argument("--tasks", type=int, nargs="*", default=[2, 10], help="toy task counts (default: 2 10; none: skip the toy)")
    parser.add_argument("--toy-steps", type=int, default=300, help="training steps per toy run (default: 300)")
    parser.add_argument("--toy-train-size", type=int, default=10_000, help="toy training points (default: 10000)")
    parser.add_argument("--penguin-steps", type=int, default=600, help="training steps per penguins run (default: 600; 0: skip)")
    parser.add_argument("--qm9-steps", type=int, default=600, help="training steps per QM9 run (default: 600, batch 128)")
    parser.add_argument("--qm9-train-size", type=int, default=20_000, help="QM9 training molecules (default: 20000; 2000 validate)")
    parser.add_argument("--qm9-test-size", type=int, default=5_000, help="QM9 test molecules (default: 5000)")
    parser.add_argument("--scenes-steps", type=int, default=200, help="training steps per scenes run (default: 200, batch 16)")
    parser.add_argument("--scenes-train", type=int, default=256, help="generated training scenes per seed (default: 256)")
    parser.add_argument("--scenes-test", type=int, default=64, help="generated test scenes per seed (default: 64)")
    parser.add_argument("--scenes-size", type=int, default=16, help="scene image side in pixels, a multiple of 4 (default: 16)")
    parser.add_argument("--scenes-width", type=int, default=8, help="the encoder-decoder's base width (default: 8)")
    parser.add_argument("--no-single-task", action="store_true", help="scenes: no single-task baselines (Δm%% against equal weights only)")
    parser.add_argument(
        "--cost-rounds",
        type=int,
        default=12,
        help="rounds of the interleaved step-cost measurement, every method taking --cost-block steps on the same batches per round (default: 12; 0: skip it)",
    )
    parser.add_argument("--cost-only", action="store_true", help="only the interleaved step-cost tables, no training runs")
    parser.add_argument("--cost-block", type=int, default=4, help="steps per method and round of the interleaved cost (default: 4)")
    parser.add_argument("--jobs", type=int, default=1, help="QM9, scenes: seeds run in this many processes at once, one thread each (default: 1)")
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

    check_cost_options(args)
    if args.dataset in ("qm9", "scenes"):
        return run_seeds(args)
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
    toy_tasks = args.tasks if args.toy_steps else []
    total = 0 if args.cost_only else len(methods) * len(seeds) * (args.toy_steps * len(toy_tasks) + args.penguin_steps)
    sections = []
    started = time.perf_counter()
    with intra_op_threads(args.threads), tqdm(total=total, desc="compare", unit="step", disable=args.no_progress) as bar:
        for num_tasks in toy_tasks if not args.cost_only else []:
            results = []
            for seed in seeds:
                bar.set_postfix_str(f"toy T={num_tasks} seed {seed}")
                results += compare.run_toy(num_tasks, seed, methods, args.toy_steps, root, args.toy_train_size, bar.update)
            title = f"Toy problem (paper section 4), T={num_tasks}, {args.toy_steps} steps: test-loss ratio L_i/L_i(0)"
            sections.append(compare.format_table(title, results, compare.toy_columns(num_tasks)))
        if args.penguin_steps and not args.cost_only:
            results = []
            for seed in seeds:
                bar.set_postfix_str(f"penguins seed {seed}")
                results += compare.run_penguins(seed, methods, args.penguin_steps, root, bar.update)
            title = f"Palmer penguins, {args.penguin_steps} steps: test error rates, body-mass RMSE"
            sections.append(compare.format_table(title, results, compare.PENGUIN_COLUMNS))
        if args.cost_rounds:
            from gradnorm.experiments import penguins

            for num_tasks in toy_tasks:
                problem = compare.toy_problem(num_tasks, 0, args.toy_train_size)
                sections.append(cost_section(args, f"toy T={num_tasks}", problem, methods))
            if args.penguin_steps:
                sections.append(cost_section(args, "Palmer penguins", compare.penguin_problem(penguins.load_penguins(0)), methods))
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
    "step) over the equal-weights run's of the same seed, measured in the same invocation, one run after another."
)


def check_cost_options(args: argparse.Namespace) -> None:
    if args.cost_rounds < 0 or args.cost_block < 1:
        raise ValueError(f"--cost-rounds must be non-negative and --cost-block at least 1, got {args.cost_rounds} and {args.cost_block}")
    if args.cost_only and not args.cost_rounds:
        raise ValueError("--cost-only measures the interleaved step costs: --cost-rounds must be at least 1")


def load_line() -> str:
    try:
        return "load average " + " / ".join(f"{v:.1f}" for v in os.getloadavg()) + " (1/5/15 min)"
    except OSError:  # pragma: no cover - platforms without getloadavg
        return "load average unknown"


def cost_section(args: argparse.Namespace, label: str, problem: object, methods: list[str]) -> str:
    """The interleaved step-cost table of one problem (seed 0), with the load before and after."""
    from gradnorm.experiments import compare
    from gradnorm.experiments.threads import intra_op_threads

    assert isinstance(problem, compare.Problem)
    before = load_line()
    started = time.perf_counter()
    with intra_op_threads(args.threads):
        costs = compare.interleaved_step_costs(problem, methods, rounds=args.cost_rounds, block=args.cost_block)
    note = (
        f"Seed 0, {args.cost_rounds} rounds × {args.cost_block} steps per method on the same batches, the methods' order shuffled "
        f"each round, after 3 untimed steps; the training thread's CPU time, {args.threads} torch thread; {time.perf_counter() - started:.0f} s; "
        f"{before} at the start, {load_line()} at the end ({os.cpu_count()} cores). "
        "`× equal`: median step over equal weights' median step; the last column: the quartiles of that ratio over the rounds."
    )
    return compare.format_interleaved(f"Step cost, interleaved: {label}", costs, note)


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


def _seed_worker(dataset: str, seed: int, methods: list[str], root: str, options: dict, threads: int, partial: str) -> list:
    """One seed's QM9 or scenes runs, in a worker process (or in this one with --jobs 1); each result is
    appended to ``partial`` (JSON lines) as soon as its run ends."""
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
        if dataset == "qm9":
            data = qm9.load_qm9(seed, options["train_size"], options["test_size"])
            results = compare.run_qm9(seed, methods, options["steps"], Path(root), data=data, on_result=keep)
        else:
            scenes = scene_data(seed, options)
            results = compare.run_scenes(seed, methods, options["steps"], Path(root), data=scenes, on_result=keep, single_task=options["single_task"])
    for result in results:
        result.weights = []  # not needed by the table; keeps the transfer from a worker small
    return results


def scene_data(seed: int, options: dict) -> SceneData:
    from gradnorm.experiments import compare

    return compare.make_scene_data(seed, train=options["train"], test=options["test"], size=options["size"], width=options["width"])


def run_seeds(args: argparse.Namespace) -> int:
    """``--dataset qm9`` or ``--dataset scenes``: the seeds in ``--jobs`` processes, one table, the interleaved costs."""
    from concurrent.futures import ProcessPoolExecutor

    from gradnorm.experiments import compare, qm9

    qm9_run = args.dataset == "qm9"
    methods = compare.ordered(args.methods or compare.qm9_default_methods())
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    steps_option = "qm9_steps" if qm9_run else "scenes_steps"
    for option in (steps_option, "jobs") + (() if qm9_run else ("scenes_train", "scenes_test", "scenes_width")):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    if qm9_run:
        qm9.data_folder()  # a missing qm9pack is an error here, before any process starts
        qm9.load_arrays(args.qm9_train_size, args.qm9_test_size)  # builds the descriptor cache once, for every worker
        options: dict = {"steps": args.qm9_steps, "train_size": args.qm9_train_size, "test_size": args.qm9_test_size}
    else:
        options = {
            "steps": args.scenes_steps,
            "train": args.scenes_train,
            "test": args.scenes_test,
            "size": args.scenes_size,
            "width": args.scenes_width,
            "single_task": not args.no_single_task,
        }
        scene_data(0, dict(options, train=1, test=1))  # bad sizes are an error here, before any process starts
    root = args.runs_root or Path("runs") / time.strftime(f"compare-{args.dataset}-%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f"{args.dataset}-results.jsonl"
    seeds = list(range(args.seeds))
    started = time.perf_counter()
    load_start = load_line()
    results: list = []
    if not args.cost_only:
        work = [(args.dataset, seed, methods, str(root), options, args.threads, str(partial)) for seed in seeds]
        if args.jobs == 1:
            for item in work:
                results += _seed_worker(*item)
        else:
            import multiprocessing

            with ProcessPoolExecutor(max_workers=min(args.jobs, len(seeds)), mp_context=multiprocessing.get_context("spawn")) as pool:
                for seed_results in pool.map(_seed_worker, *zip(*work)):
                    results += seed_results
    train_seconds = time.perf_counter() - started
    load_end = load_line()
    sections = []
    if qm9_run:
        if results:
            title = (
                f"QM9, 11 targets, {args.qm9_steps} steps of batch {compare.QM9_BATCH} on {args.qm9_train_size} training molecules: "
                f"test MAE per target ({args.qm9_test_size} test molecules), Δm% against equal weights"
            )
            sections.append(compare.format_table(title, results, compare.qm9_columns(results)))
        if args.cost_rounds:
            problem = compare.qm9_problem(qm9.load_qm9(0, args.qm9_train_size, args.qm9_test_size))
            sections.append(cost_section(args, f"QM9 ({args.qm9_train_size} training molecules, batch {compare.QM9_BATCH})", problem, methods))
        header = [
            f"## QM9 (`gradnorm compare --dataset qm9`), {time.strftime('%Y-%m-%d')}",
            "",
            f"Written by `gradnorm compare --dataset qm9` ({platform.machine()}, {platform.system()}, torch CPU, {args.threads} thread per process, "
            f"{min(args.jobs, len(seeds))} processes), {train_seconds:.0f} s of training in all ({load_start} at the start, {load_end} at the end). "
            "Mean ± standard deviation over seeds; per seed, every method starts from the same initial network and sees the same batches. Lower is "
            "better everywhere. Δm% is against the equal-weights run of the same seed (single-task baselines would need 11 more runs per seed). "
            f"`static` retrains with the same seed's GradNorm E_t[w_i] (after 10% burn-in). {COST_NOTE}",
            "",
        ]
    else:
        size = f"{args.scenes_size}×{args.scenes_size}"
        if results:
            merged = compare.merge_single_task(results)
            title = (
                f"Generated scenes, {size} pixels, encoder-decoder of width {args.scenes_width}, {args.scenes_steps} steps of batch "
                f"{compare.SCENES_BATCH} on {args.scenes_train} training scenes: test metrics ({args.scenes_test} test scenes), Δm%"
            )
            sections.append(compare.format_table(title, merged, compare.scene_columns(merged)))
        if args.cost_rounds:
            problem = compare.scene_problem(scene_data(0, options))
            sections.append(cost_section(args, f"generated scenes ({size} pixels, width {args.scenes_width}, batch {compare.SCENES_BATCH})", problem, methods))
        header = [
            f"## Generated scenes (`gradnorm compare --dataset scenes`), {time.strftime('%Y-%m-%d')}",
            "",
            f"Written by `gradnorm compare --dataset scenes` ({platform.machine()}, {platform.system()}, torch CPU, {args.threads} thread per process, "
            f"{min(args.jobs, len(seeds))} processes), {train_seconds:.0f} s of training in all ({load_start} at the start, {load_end} at the end). "
            "Mean ± standard deviation over seeds; per seed, every method starts from the same initial network and sees the same scenes and batches. "
            "Lower is better except where marked ↑. Δm% (over the four metrics, the sign flipped for ↑) is against the same seed's equal-weights "
            "run and against its single-task runs (`single-task`: each task's metrics from a network trained on that task alone). "
            f"GradNorm runs with α = {compare.SCENES_ALPHA} (paper 5.4, NYUv2); `static` retrains with the same seed's GradNorm E_t[w_i] "
            f"(after 10% burn-in). {COST_NOTE}",
            "",
        ]
    write_table(args, root, "\n".join(header) + "\n" + "\n\n".join(sections) + "\n")
    return 0
