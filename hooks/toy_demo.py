"""The demo behind ``gradnorm demo``: equal weights vs GradNorm on the toy problem (paper Figure 2)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from toolkit import EqualWeights, GradNorm, toy

from .toy_training import ToyResult, train_toy

BURN_IN = 0.1


def run_demo(root: Path, task_counts: Sequence[int] = (2, 10), steps: int = 2000, alpha: float = 0.12, seed: int = 0, progress: bool = True) -> list[ToyResult]:
    """Train both methods for each task count from the same initialisation and batches; print a table."""
    root = Path(root)
    results: list[ToyResult] = []
    total = steps * 2 * len(task_counts)
    with tqdm(total=total, desc="toy demo", unit="step", disable=not progress) as bar:
        for num_tasks in task_counts:
            config = toy.ToyConfig(num_tasks=num_tasks, data_seed=seed, init_seed=seed + 1)
            data = toy.make_data(config)
            for method, balancer in (("equal", EqualWeights()), ("gradnorm", GradNorm(alpha=alpha))):
                bar.set_postfix_str(f"T={num_tasks} {method}")
                results.append(
                    train_toy(config, balancer, steps, f"toy-T{num_tasks}-{method}", runs_root=root, data=data, progress=bar.update)
                )
    print(format_results(results))
    print(f"\nruns written under {root.resolve()}")
    return results


def format_results(results: Sequence[ToyResult]) -> str:
    lines = [f"{'run':<20} {'test sum_i L_i/L_i(0)':>22}  E_t[w_i] (after the first {int(BURN_IN * 100)}% of steps)"]
    for result in results:
        weights = " ".join(f"{w:.3f}" for w in result.time_averaged_weights(BURN_IN))
        lines.append(f"{result.run_name:<20} {result.normalized_test_loss:>22.4f}  {weights}")
    return "\n".join(lines)
