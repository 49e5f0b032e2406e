"""Side-by-side step timing shared by the step-time benchmarks.

Variants run interleaved in short blocks, their order shuffled each round, so that drift of the machine
(other jobs, frequency, caches) hits all of them alike; each figure is the median of per-step times.

The clock is wall time by default. On a CPU shared with other jobs, ``clock=time.thread_time`` (the CPU
time of the training thread) leaves out the time other jobs hold the cores, which wall time counts
against whichever variant happened to be running; it also leaves out the recorder's writer thread, which
works in the background and, with several variants in one process, would be charged to whichever ran.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Callable, Mapping, Optional

import torch

BatchStep = Callable[[int], None]  # runs one training step on batch number i


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    variants: dict[str, BatchStep],
    device: torch.device,
    rounds: int,
    block: int,
    warmup: int,
    seed: int,
    blocks: Optional[Mapping[str, int]] = None,
    clock: Callable[[], float] = time.perf_counter,
    every: Optional[Mapping[str, int]] = None,
) -> dict[str, list[float]]:
    """Per-step times of every variant on ``clock``, after ``warmup`` untimed steps each.

    ``blocks`` sets a variant's own number of steps per round (a slow one can take fewer), ``block`` the
    rest; ``every`` runs a variant only in every k-th round (a very slow one, still spread over the run).
    """
    for step in variants.values():
        for i in range(warmup):
            step(i)
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    shuffler = random.Random(seed)
    cursor = 0
    for round_index in range(rounds):
        shuffler.shuffle(order)
        for name in order:
            if round_index % (every or {}).get(name, 1):
                continue
            step = variants[name]
            for _ in range((blocks or {}).get(name, block)):
                synchronize(device)
                started = clock()
                step(cursor)
                synchronize(device)
                times[name].append(clock() - started)
                cursor += 1
    return times


def time_one_step(step: BatchStep, device: torch.device, repeats: int = 3, clock: Callable[[], float] = time.perf_counter) -> float:
    """The fastest of ``repeats`` timed steps (to size a variant's block before the interleaved rounds)."""
    best = float("inf")
    for i in range(repeats):
        synchronize(device)
        started = clock()
        step(i)
        synchronize(device)
        best = min(best, clock() - started)
    return best


def summarize(times: dict[str, list[float]], baseline: str = "equal") -> dict[str, dict[str, float]]:
    """Median ms per variant and its ratio to ``baseline`` from the same run."""
    reference = statistics.median(times[baseline])
    return {
        name: {"median_ms": 1e3 * statistics.median(values), "ratio": statistics.median(values) / reference, "steps": len(values)}
        for name, values in times.items()
    }
