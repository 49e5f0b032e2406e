"""GradNorm's asymmetry alpha on QM9: does a tuned alpha fix GradNorm's last place in the QM9 comparison?

Paper section 3.2 (eq. 2): alpha sets how strongly a task's relative inverse training rate r_i(t) moves its
target gradient norm, G_W^(i) -> mean_j G_W^(j) x r_i(t)^alpha; alpha = 0 pulls every task to the same
gradient norm, larger alpha holds back the tasks that train fastest. The paper uses 0.12 on its toy problem
(section 4) and 1.5 on NYUv2 (section 5.4); ``gradnorm compare --dataset qm9`` runs 1.5, untuned.

This driver trains, per seed, equal weights once and GradNorm at each alpha, and (unless ``--no-static``)
retrains each GradNorm run's time-averaged weights E_t[w_i] as static weights (paper 5.3, Table 1's idea),
on the set-up of the committed QM9 table (``compare.train_qm9``: Adam lr 1e-3, batch 128, the fixed
subset of :func:`qm9.load_qm9`). Delta_m% is against the same seed's equal-weights run. Run it as
``python -m gradnorm.experiments.alpha_sweep --help``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

from . import compare, qm9

#: alpha = 0 (equal gradient norms), the toy's 0.12 (paper 4), then up to NYUv2's 1.5 (paper 5.4).
DEFAULT_ALPHAS = (0.0, 0.12, 0.5, 1.0, 1.5)
RESULTS_FILE = "alpha-results.jsonl"


def label(kind: str, alpha: Optional[float]) -> str:
    """Row name: ``equal``, ``gradnorm a=0.5`` or ``static a=0.5`` (static: that GradNorm run's E_t[w_i])."""
    return kind if alpha is None else f"{kind} a={alpha:g}"


def _job(kind: str, alpha: Optional[float], seed: int, steps: int, root: str, train_size: int, test_size: int, static: bool, threads: int) -> list[dict]:
    """One seed's equal-weights run, or one seed's GradNorm run at ``alpha`` followed by its static retraining;
    in a worker process (one torch thread) or in this one. Each result is appended to the results file as it
    ends, so an interrupted sweep keeps what it finished."""
    import torch

    torch.set_num_threads(threads)
    data = qm9.load_qm9(seed, train_size, test_size)
    priors = [1.0] * len(qm9.TASKS)
    out: list[dict] = []

    def train(method: str, run_alpha: float, weights: Optional[list[float]]) -> compare.MethodResult:
        balancer = compare.make_balancer(method, run_alpha, priors, seed, weights)
        name = f"qm9-{method}" + ("" if method == "equal" else f"-a{run_alpha:g}") + f"-s{seed}"
        result = compare.train_qm9(data, balancer, steps, name, Path(root))
        result.method = label(method, None if method == "equal" else run_alpha)
        record = asdict(result)
        record["alpha"] = None if method == "equal" else run_alpha
        record["time_averaged_weights"] = compare.time_average(result.weights)
        del record["weights"]  # w(t) per step is in the recorded run; the summary needs only E_t[w_i]
        with open(Path(root) / RESULTS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        out.append(record)
        return result

    if kind == "equal":
        train("equal", 0.0, None)
    else:
        assert alpha is not None
        gradnorm = train("gradnorm", alpha, None)
        if static:
            train("static", alpha, compare.time_average(gradnorm.weights))
    return out


def _results(records: Sequence[dict]) -> list[compare.MethodResult]:
    fields = ("method", "seed", "task_errors", "normalized_test_loss", "seconds", "run_name", "step_cpu_seconds")
    return [compare.MethodResult(**{k: r[k] for k in fields}) for r in records]


def report(records: Sequence[dict], args: argparse.Namespace, seconds: float) -> str:
    """The markdown summary: the MAE/Delta_m% table, Delta_m% per seed, and E_t[w_i] per alpha."""
    order = ["equal"] + [label(kind, a) for a in args.alphas for kind in (("gradnorm", "static") if not args.no_static else ("gradnorm",))]
    rank = {name: i for i, name in enumerate(order)}
    records = sorted(records, key=lambda r: (rank[r["method"]], r["seed"]))
    results = _results(records)
    title = (
        f"QM9, GradNorm's alpha: {args.steps} steps of batch {compare.QM9_BATCH} on {args.train_size} training molecules, "
        f"test MAE per target ({args.test_size} test molecules), Δm% against equal weights"
    )
    deltas = compare.qm9_delta_m(results)
    lines = [
        f"## GradNorm's alpha on QM9 (`python -m gradnorm.experiments.alpha_sweep`), {time.strftime('%Y-%m-%d')}",
        "",
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, {args.threads} torch thread per process, "
        f"{args.jobs} processes; {seconds:.0f} s in all. Mean ± standard deviation over seeds. `static a=x`: retrained with the "
        f"E_t[w_i] (after {compare.BURN_IN:.0%} burn-in) of the same seed's `gradnorm a=x` run.",
        "",
        compare.format_table(title, results, compare.qm9_columns(results)),
        "",
        "### Δm% per seed (against that seed's equal-weights run)",
        "",
        "| method | " + " | ".join(f"seed {s}" for s in sorted({r.seed for r in results})) + " |",
        "|---" * (1 + len({r.seed for r in results})) + "|",
    ]
    for method in dict.fromkeys(r.method for r in results):
        cells = [f"{deltas[(method, r.seed)]:.2f}" for r in results if r.method == method]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "### GradNorm's E_t[w_i] per alpha (mean over seeds)", "", "| alpha | " + " | ".join(qm9.TASKS) + " |", "|---" * (1 + len(qm9.TASKS)) + "|"]
    for alpha in args.alphas:
        runs = [r["time_averaged_weights"] for r in records if r["method"] == label("gradnorm", alpha)]
        if runs:
            means = [statistics.fmean(w[i] for w in runs) for i in range(len(qm9.TASKS))]
            lines.append(f"| {alpha:g} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    out = argparse.ArgumentParser(prog="python -m gradnorm.experiments.alpha_sweep", description=__doc__.splitlines()[0])
    out.add_argument("--alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS), help="GradNorm asymmetries (default: 0 0.12 0.5 1 1.5)")
    out.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default: 3)")
    out.add_argument("--steps", type=int, default=300, help="training steps per run (default: 300, the committed QM9 table's)")
    out.add_argument("--train-size", type=int, default=20_000, help="training molecules (default: 20000)")
    out.add_argument("--test-size", type=int, default=5_000, help="test molecules (default: 5000)")
    out.add_argument("--no-static", action="store_true", help="skip retraining each alpha's E_t[w_i] as static weights")
    out.add_argument("--jobs", type=int, default=1, help="worker processes (default: 1)")
    out.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    out.add_argument("--runs-root", type=Path, default=None, help="where to record the runs (default: runs/alpha-qm9-<time>)")
    out.add_argument("--out", type=Path, default=None, help="also write the markdown summary here")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    problems = [f"--{name} must be at least 1, got {getattr(args, name)}" for name in ("seeds", "steps", "jobs", "threads") if getattr(args, name) < 1]
    problems += [f"--alphas must be >= 0, got {a:g}" for a in args.alphas if a < 0]
    if problems:
        print("; ".join(problems), file=sys.stderr)
        return 2
    args.alphas = list(dict.fromkeys(args.alphas))
    qm9.data_folder()  # a missing qm9pack is an error here, before any process starts
    qm9.load_arrays(args.train_size, args.test_size)  # builds the descriptor cache once, for every worker
    root = args.runs_root or Path("runs") / time.strftime("alpha-qm9-%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    (root / RESULTS_FILE).unlink(missing_ok=True)
    work = [("equal", None, s) for s in range(args.seeds)] + [("gradnorm", a, s) for a in args.alphas for s in range(args.seeds)]
    common = (args.steps, str(root), args.train_size, args.test_size, not args.no_static, args.threads)
    started = time.perf_counter()
    records: list[dict] = []
    if args.jobs == 1:
        for kind, alpha, seed in work:
            records += _job(kind, alpha, seed, *common)
    else:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for done in pool.map(_job, *zip(*[(k, a, s, *common) for k, a, s in work])):
                records += done
    text = report(records, args, time.perf_counter() - started)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    print(f"runs: {root}; per-run results: {root / RESULTS_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
