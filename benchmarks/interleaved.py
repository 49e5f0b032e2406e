"""Side-by-side step timing shared by the step-time benchmarks.

Variants run interleaved in short blocks, their order shuffled each round, so that drift of the machine
(other jobs, frequency, caches) hits all of them alike; each figure is the median of per-step times.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Callable

import torch

BatchStep = Callable[[int], None]  # runs one training step on batch number i


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(variants: dict[str, BatchStep], device: torch.device, rounds: int, block: int, warmup: int, seed: int) -> dict[str, list[float]]:
    """Per-step wall times of every variant, after ``warmup`` untimed steps each."""
    for step in variants.values():
        for i in range(warmup):
            step(i)
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    shuffler = random.Random(seed)
    cursor = 0
    for _ in range(rounds):
        shuffler.shuffle(order)
        for name in order:
            step = variants[name]
            for _ in range(block):
                synchronize(device)
                started = time.perf_counter()
                step(cursor)
                synchronize(device)
                times[name].append(time.perf_counter() - started)
                cursor += 1
    return times


def summarize(times: dict[str, list[float]], baseline: str = "equal") -> dict[str, dict[str, float]]:
    """Median ms per variant and its ratio to ``baseline`` from the same run."""
    reference = statistics.median(times[baseline])
    return {
        name: {"median_ms": 1e3 * statistics.median(values), "ratio": statistics.median(values) / reference, "steps": len(values)}
        for name, values in times.items()
    }
