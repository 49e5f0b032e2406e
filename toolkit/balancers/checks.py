"""Input checks shared by the methods that divide by a loss or take its logarithm."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

#: Divisions by a loss use max(L, LOSS_FLOOR): a task fitted exactly (a saturated cross-entropy reads 0.0
#: in float32) must not turn a weight into inf or NaN.
LOSS_FLOOR = 1e-8


def require_non_negative_losses(tasks: Sequence[str], losses: Tensor, method: str) -> None:
    """Fail, naming the task, when a loss is negative or non-finite.

    Loss ratios, 1/L and log L are only meaningful for non-negative losses; a negative loss (a
    log-likelihood with a constant dropped, a reward) would flip the sign of a weight and train the task
    backwards. This is one host synchronisation per step, the price of failing at the step where it happens.
    """
    bad = ~(torch.isfinite(losses) & (losses >= 0))
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{method}: loss of task {tasks[index]!r} is {float(losses[index])!r}; this method needs finite, "
            "non-negative losses (it divides by the loss or takes its logarithm). Shift or rescale that loss"
        )


def require_choice(option: str, value: object, choices: Sequence[object], method: str) -> None:
    """An unsupported option is an error, never a silent default."""
    if value not in choices:
        raise ValueError(f"{method}: {option}={value!r} is not supported; choose one of {list(choices)}")
