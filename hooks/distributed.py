"""Multi-process training (DDP): one run directory, one writer per rank, the same weights on every rank.

DDP averages the gradient over ranks, so the gradient that reaches the shared layer W is the mean of the
ranks' gradients and the loss is the mean of the ranks' losses (equal shards). GradNorm must see those
global quantities (paper eq. 2 is about the gradient the network is trained with): the per-task losses
are averaged across ranks, and the norms are those of the rank-averaged gradients at W, so every rank runs
the same update on the same numbers and the weights stay identical without being broadcast. How those
norms are formed with little communication (W's rows, a sketch, or the gradients averaged here) is
``hooks/distributed_norms.py``. Rank 0 creates the run and owns ``run.json``; each rank writes its own
``metrics/rank=<r>/`` part files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from gradnorm.toolkit import runs, schema


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class CollectiveError(RuntimeError):
    """A collective of GradNorm's failed: another rank stopped, or the ranks handed different shapes."""


def mean_across_ranks(tensor: Tensor) -> Tensor:
    """The mean over ranks (a collective every rank must call); SUM then divide, as gloo has no AVG."""
    if world_size() == 1:
        return tensor
    reduced = tensor.detach().clone()
    try:
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    except RuntimeError as exc:  # gloo: a peer's closed connection or the group's timeout
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
        raise CollectiveError(
            f"gradnorm: rank {rank()} of {world_size()}: averaging {tuple(tensor.shape)} across ranks failed ({type(exc).__name__}: {detail}); "
            "another rank has probably stopped (crashed, killed or stuck), or the ranks handed different shapes"
        ) from exc
    return reduced / world_size()


def create_or_join_run(root: Path, run_id: str, meta: Mapping[str, Any]) -> Path:
    """Rank 0 creates the run; the others wait for it at a barrier and join it."""
    if world_size() == 1:
        return runs.create_run(root, run_id, meta)
    path = None
    error: Exception | None = None
    if rank() == 0:
        try:
            path = runs.create_run(root, run_id, meta)
        except Exception as exc:  # every rank must reach the barrier, then all fail alike
            error = exc
    failed = torch.tensor([1 if error is not None else 0])
    dist.broadcast(failed, src=0)
    if error is not None:
        raise error
    if failed.item():
        raise runs.RunError(f"rank 0 could not create run {run_id!r} under {root}")
    path = Path(root) / run_id
    if not (path / schema.RUN_FILE).exists():
        raise runs.RunError(f"rank {rank()} cannot see run {run_id!r} under {root}: the runs root must be on a file system every rank shares")
    return path
