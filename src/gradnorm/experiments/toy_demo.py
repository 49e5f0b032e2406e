"""The demo behind ``gradnorm demo``: the paper's toy problem (section 4, Figure 2) and its Table 1 rows.

For each task count, three runs from the same initialisation and batches: equal weights, GradNorm, and
a network retrained with GradNorm's converged weights E_t[w_i] (section 5.2, "GradNorm Converged
Weights"), read back from the GradNorm run's records through the analysis and its weights file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from gradnorm.experiments import toy
from gradnorm.toolkit.analysis import export_weights
from gradnorm.toolkit.balancers import Balancer, EqualWeights, GradNorm, StaticWeights

from .toy_training import ToyResult, train_toy

BURN_IN = 0.1
METHODS = ("equal", "gradnorm", "static-converged")


def run_demo(root: Path, task_counts: Sequence[int] = (2, 10), steps: int = 2000, alpha: float = 0.12, seed: int = 0, progress: bool = True) -> list[ToyResult]:
    """Train the three runs per task count under ``root``; print the comparison table."""
    root = Path(root)
    results: list[ToyResult] = []
    with tqdm(total=steps * len(METHODS) * len(task_counts), desc="toy demo", unit="step", disable=not progress) as bar:
        for num_tasks in task_counts:
            config = toy.ToyConfig(num_tasks=num_tasks, data_seed=seed, init_seed=seed + 1)
            data = toy.make_data(config)
            for method in METHODS:
                bar.set_postfix_str(f"T={num_tasks} {method}")
                name = f"toy-T{num_tasks}-{method}"
                balancer: Balancer
                if method == "equal":
                    balancer = EqualWeights()
                elif method == "gradnorm":
                    balancer = GradNorm(alpha=alpha)
                else:
                    weights_file = root / f"toy-T{num_tasks}-gradnorm-weights.json"
                    export_weights(root, f"toy-T{num_tasks}-gradnorm", weights_file, burn_in=BURN_IN)
                    balancer = StaticWeights.from_file(weights_file)
                results.append(train_toy(config, balancer, steps, name, runs_root=root, data=data, progress=bar.update))
    print(format_results(results))
    print(f"\nruns written under {root.resolve()}")
    return results


def format_results(results: Sequence[ToyResult]) -> str:
    """Table 1 style: task-normalised test loss sum_i L_i/L_i(0) per run, and the weights it trained with."""
    lines = [f"{'run':<26} {'test sum_i L_i/L_i(0)':>22}  E_t[w_i] (after the first {int(BURN_IN * 100)}% of steps)"]
    for result in results:
        weights = " ".join(f"{w:.3f}" for w in result.time_averaged_weights(BURN_IN))
        lines.append(f"{result.run_name:<26} {result.normalized_test_loss:>22.4f}  {weights}")
    return "\n".join(lines)
