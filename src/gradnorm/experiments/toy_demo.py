"""The demo behind ``gradnorm demo``: the paper's toy problem (section 4, Figure 2) and its Table 1 rows.

For each task count, three runs from the same initialisation and batches: equal weights, GradNorm, and
a network retrained with GradNorm's converged weights E_t[w_i] (section 5.2, "GradNorm Converged
Weights"), read back from the GradNorm run's records through the analysis and its weights file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from gradnorm.experiments import toy
from gradnorm.toolkit.analysis import export_weights
from gradnorm.toolkit.balancers import Balancer, EqualWeights, GradNorm, StaticWeights

from .toy_training import ToyResult, train_toy

BURN_IN = 0.1
METHODS = ("equal", "gradnorm", "static-converged")
LABELS = {"equal": "equal weights", "gradnorm": "GradNorm", "static-converged": "GradNorm's E_t[w_i], fixed"}


@dataclass(frozen=True)
class DemoRun:
    num_tasks: int
    method: str
    result: ToyResult


def run_names(root: Path, task_counts: Sequence[int]) -> dict[tuple[int, str], str]:
    """``toy-T<T>-<method>``, with one suffix for the whole demo when an earlier demo took those names."""
    for attempt in range(1, 10_000):
        suffix = "" if attempt == 1 else f"-{attempt}"
        names = {(t, m): f"toy-T{t}-{m}{suffix}" for t in task_counts for m in METHODS}
        if not any((root / name).exists() or (root / f"{name}-weights.json").exists() for name in names.values()):
            return names
    raise RuntimeError(f"no free demo run names under {root}")


def run_demo(root: Path, task_counts: Sequence[int] = (2, 10), steps: int = 2000, alpha: float = 0.12, seed: int = 0, progress: bool = True) -> list[DemoRun]:
    """Train the three runs per task count under ``root``, one progress bar (with its ETA) per run; print
    what the results mean and where to look next."""
    root = Path(root)
    names = run_names(root, task_counts)
    runs: list[DemoRun] = []
    for num_tasks in task_counts:
        config = toy.ToyConfig(num_tasks=num_tasks, data_seed=seed, init_seed=seed + 1)
        data = toy.make_data(config)
        for method in METHODS:
            name = names[num_tasks, method]
            balancer: Balancer
            if method == "equal":
                balancer = EqualWeights()
            elif method == "gradnorm":
                balancer = GradNorm(alpha=alpha)
            else:
                source = names[num_tasks, "gradnorm"]
                weights_file = root / f"{source}-weights.json"
                export_weights(root, source, weights_file, burn_in=BURN_IN)
                balancer = StaticWeights.from_file(weights_file)
            with tqdm(total=steps, desc=f"T={num_tasks:<2} {LABELS[method]:<26}", unit="step", disable=not progress, leave=True) as bar:
                result = train_toy(config, balancer, steps, name, runs_root=root, data=data, progress=bar.update)
            runs.append(DemoRun(num_tasks, method, result))
    print(format_results(runs, steps))
    print(next_steps(root, names, task_counts))
    return runs


def format_results(runs: Sequence[DemoRun], steps: int) -> str:
    """Table 1 style, with what the numbers mean: task-normalised test loss sum_i L_i/L_i(0) per run
    (lower is better; the network at initialisation scores T), the change against equal weights, and the
    weights each run trained with."""
    lines = [
        "",
        f"Task-normalised test loss after {steps} steps: sum over tasks of L_i(test) / L_i(test at initialisation).",
        "Lower is better; the untrained network scores T (one per task). Same initialisation and batches in each group.",
    ]
    for num_tasks in dict.fromkeys(run.num_tasks for run in runs):
        group = [run for run in runs if run.num_tasks == num_tasks]
        equal = next((run.result.normalized_test_loss for run in group if run.method == "equal"), None)
        lines += ["", f"T={num_tasks} tasks{'':<22} {'test loss':>9}  {'vs equal':>8}  E_t[w_i] (after the first {int(BURN_IN * 100)}% of steps)"]
        for run in group:
            loss = run.result.normalized_test_loss
            change = "" if equal is None or run.method == "equal" else f"{(loss - equal) / equal:+.1%}"
            weights = " ".join(f"{w:.3f}" for w in run.result.time_averaged_weights(BURN_IN))
            lines.append(f"  {LABELS[run.method]:<31} {loss:>9.3f}  {change:>8}  {weights}")
        best = min(group, key=lambda run: run.result.normalized_test_loss)
        if equal is not None and best.method != "equal":
            gain = (equal - best.result.normalized_test_loss) / equal
            lines.append(f"  best: {LABELS[best.method]}, {gain:.1%} below equal weights")
        else:
            lines.append(f"  best: {LABELS[best.method]}")
    return "\n".join(lines)


def next_steps(root: Path, names: dict[tuple[int, str], str], task_counts: Sequence[int]) -> str:
    shown = root.resolve()
    gradnorm_run = names[task_counts[0], "gradnorm"]
    root_option = "" if shown == (Path.cwd() / "runs").resolve() else f" --root {shown}"
    commands = [
        (f"gradnorm app{root_option}", "weights, gradient norms, loss ratios, overfitting in the browser"),
        (f"gradnorm summary {gradnorm_run}{root_option}", "per task: E_t[w_i], its spread, the final loss ratio"),
        (f"gradnorm export {gradnorm_run}{root_option}", "E_t[w_i] as a weights file, to retrain with fixed weights"),
    ]
    width = max(len(command) for command, _ in commands)
    return "\n".join(["", f"Runs written under {shown}.", "Next:"] + [f"  {command:<{width}}   # {what}" for command, what in commands])
