"""Spawned ranks for the multi-process tests: torch.distributed with gloo on 127.0.0.1.

Each worker is called as ``target(rank, world, port, *args, out)`` and writes its result to ``out`` (a
``.pt`` file) or its traceback to ``out + ".error"``.
"""

from __future__ import annotations

import multiprocessing
import socket
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Callable, Sequence

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(
    target: Callable[..., None], world: int, directory: Path, args: Sequence[Any], timeout: float, prefix: str = "rank"
) -> tuple[list[BaseProcess], list[str]]:
    """Run ``world`` spawned ranks to their end or until ``timeout`` seconds in all (stragglers are
    killed); their processes and output paths."""
    context = multiprocessing.get_context("spawn")
    port = free_port()
    outs = [str(directory / f"{prefix}{r}.pt") for r in range(world)]
    processes = [context.Process(target=target, args=(r, world, port, *args, outs[r])) for r in range(world)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(timeout=max(1.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
    return processes, outs


def rank_results(processes: Sequence[BaseProcess], outs: Sequence[str]) -> list[Any]:
    """Every rank's saved result, after asserting that none wrote a traceback and each exited cleanly."""
    errors = [Path(o + ".error").read_text() for o in outs if Path(o + ".error").exists()]
    assert not errors, errors
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
    return [torch.load(o) for o in outs]
