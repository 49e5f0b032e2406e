"""Optimisers for the task-weight vector w, written as plain tensor algebra.

GradNorm updates w with its own optimiser (paper 5.5: Adam, learning rate 0.025). We do not use
``torch.optim`` here for one reason: a step whose inputs are non-finite must leave w *and the
optimiser's state* untouched, and deciding that with ``torch.where`` on the device keeps the training
step free of host-device synchronisation. The arithmetic follows ``torch.optim.Adam`` / ``SGD``
exactly (no weight decay, no amsgrad), so trajectories match a reference built on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from .state import expect_mapping, expect_tensor, restored, saved

OPTIMIZERS = ("adam", "sgd")

#: (steps taken, first moment or momentum buffer, second moment).
OptimizerState = tuple[Tensor, Tensor, Tensor]
OPTIMIZER_STATE = ("steps", "exp_avg", "exp_avg_sq")
#: The step count's dtype: exact for any count a run reaches, and the precision of Adam's bias corrections.
STEPS_DTYPE = torch.float64


@dataclass
class WeightOptimizer:
    """Masked Adam or SGD(momentum) over a 1-D weight vector."""

    kind: str = "adam"
    lr: float = 0.025
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in OPTIMIZERS:
            raise ValueError(f"unknown weight optimizer {self.kind!r}; choose one of {OPTIMIZERS}")
        if not (self.lr > 0):
            raise ValueError(f"weight learning rate must be positive, got {self.lr!r}")
        self._exp_avg: Optional[Tensor] = None
        self._exp_avg_sq: Optional[Tensor] = None
        self._steps: Optional[Tensor] = None
        self._constant_tensors: Optional[_AdamConstants] = None

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"optimizer": self.kind, "lr": self.lr}
        if self.kind == "adam":
            cfg.update(betas=list(self.betas), eps=self.eps)
        else:
            cfg.update(momentum=self.momentum)
        return cfg

    def state_for(self, weights: Tensor) -> OptimizerState:
        """(steps, first moment or momentum buffer, second moment), created at the first step."""
        if self._steps is None or self._exp_avg is None or self._exp_avg_sq is None:
            self._exp_avg = torch.zeros_like(weights)
            self._exp_avg_sq = torch.zeros_like(weights)
            self._steps = torch.zeros((), dtype=STEPS_DTYPE, device=weights.device)
        return (self._steps, self._exp_avg, self._exp_avg_sq)

    def _constants(self, weights: Tensor) -> _AdamConstants:
        """The step's constants as 0-d tensors on the weights' device, made once (see :meth:`propose`)."""
        constants = self._constant_tensors
        if constants is None or constants.one.device != weights.device or constants.beta2.dtype != weights.dtype:
            constants = self._constant_tensors = _AdamConstants.make(self, weights)
        return constants

    def load(self, state: OptimizerState) -> None:
        self._steps, self._exp_avg, self._exp_avg_sq = state

    # -- checkpoint -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Optional[Tensor]]:
        """The step count and the moments (Adam) or momentum buffer (SGD); all None before the first step."""
        return {"steps": saved(self._steps), "exp_avg": saved(self._exp_avg), "exp_avg_sq": saved(self._exp_avg_sq)}

    @staticmethod
    def check_state(state: Any, size: int, where: str) -> Mapping[str, Any]:
        state = expect_mapping(state, where, OPTIMIZER_STATE)
        absent = [key for key in OPTIMIZER_STATE if state[key] is None]
        if absent and len(absent) != len(OPTIMIZER_STATE):
            raise ValueError(f"balancer state: {where} lacks {absent} but holds the rest")
        steps = state["steps"]
        # () for the whole vector; (T,) per task, once a step lacked some task (see propose_present).
        expect_tensor(steps, f"{where}.steps", (size,) if isinstance(steps, Tensor) and steps.dim() == 1 else (), optional=True)
        expect_tensor(state["exp_avg"], f"{where}.exp_avg", (size,), optional=True)
        expect_tensor(state["exp_avg_sq"], f"{where}.exp_avg_sq", (size,), optional=True)
        return state

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> None:
        """Restore a state that :meth:`check_state` accepted (a step count saved in float32 is exact in float64)."""
        self._steps = restored(state["steps"], device, STEPS_DTYPE)
        self._exp_avg = restored(state["exp_avg"], device, dtype)
        self._exp_avg_sq = restored(state["exp_avg_sq"], device, dtype)

    def step(self, weights: Tensor, grad: Tensor, apply: Tensor) -> Tensor:
        """Return the updated weights; where ``apply`` (a 0-d bool tensor) is False, nothing changes."""
        state = self.state_for(weights)
        updated, proposed = self.propose(state, weights, grad)
        self.load(keep_where(apply, proposed, state))
        return torch.where(apply, updated, weights)

    def propose(self, state: OptimizerState, weights: Tensor, grad: Tensor) -> tuple[Tensor, OptimizerState]:
        """The updated weights and the state they imply, from ``state``: a pure function, nothing is kept.

        Splitting the step lets the caller decide whether to keep it from the step's result as well
        (GradNorm also refuses an update that leaves w non-finite) with one ``torch.where`` per state
        tensor (``keep_where``): NaN in a refused step never reaches the state.
        """
        steps, exp_avg, exp_avg_sq = state
        if self.kind == "sgd":
            steps = steps + 1
            if not self.momentum:
                return weights - self.lr * grad, (steps, exp_avg, exp_avg_sq)
            buf = torch.where(state[0] > 0, self.momentum * exp_avg + grad, grad)
            return weights - self.lr * buf, (steps, buf, exp_avg_sq)
        beta1, beta2 = self.betas
        # 0-d tensors of the operands' dtypes where torch.optim.Adam has Python numbers: the same values (a
        # number is converted to the tensor's dtype first either way), without a conversion per operator.
        c = self._constants(weights)
        steps = steps + c.one
        # The arithmetic of torch.optim.Adam's single-tensor step: lerp for the first moment, addcmul for
        # the second, bias corrections in float64, then addcdiv's (step_size * exp_avg) / denom.
        exp_avg = torch.lerp(exp_avg, grad, 1 - beta1)
        exp_avg_sq = torch.addcmul(exp_avg_sq * c.beta2, grad, grad, value=1 - beta2)
        bias_correction1 = c.one - c.beta1_64.pow(steps)
        bias_correction2 = c.one - c.beta2_64.pow(steps)
        # A tensor numerator: ``lr / tensor`` would be computed as lr * (1 / tensor), one rounding more.
        neg_step_size = c.neg_lr / bias_correction1  # -(lr / bc1), exactly
        # pow with a tensor exponent is libm's pow, as Python's ``bias_correction2 ** 0.5`` in torch.optim.Adam
        # (sqrt differs from it in the last bit of a few float64 values).
        root_bc2 = bias_correction2.pow(c.half)
        if steps.dim():
            # Per-task step counts: the (T,) float64 factors are rounded to the weights' dtype, which is what a
            # 0-d float64 operand of a float32 operation is rounded to, so each task's step is unchanged.
            neg_step_size, root_bc2 = neg_step_size.to(weights.dtype), root_bc2.to(weights.dtype)
        denom = exp_avg_sq.sqrt() / root_bc2 + c.eps
        if self.lr / (1 - beta1) <= 1 + 1e-9:
            # step_size <= lr / (1 - beta1), about 1 at most, so step_size * exp_avg cannot overflow.
            updated = weights + (neg_step_size * exp_avg) / denom
        else:
            # A large rate: exp_avg / denom first, bounded where step_size * exp_avg could overflow float32
            # for huge gradient norms and turn the step into inf / inf = NaN.
            updated = weights + (exp_avg / denom) * neg_step_size
        return updated, (steps, exp_avg, exp_avg_sq)

    def propose_present(self, state: OptimizerState, weights: Tensor, grad: Tensor, present: Tensor) -> tuple[Tensor, OptimizerState]:
        """:meth:`propose` for the present tasks only (``present``: (T,) bool): an absent task's weight,
        moments and step count stay as they are, so its Adam resumes where it left off when it returns
        (the step counts become per task)."""
        steps = state[0]
        if not steps.dim():
            steps = steps.expand(weights.shape).clone()
        updated, (new_steps, exp_avg, exp_avg_sq) = self.propose((steps, state[1], state[2]), weights, grad)
        return torch.where(present, updated, weights), (
            torch.where(present, new_steps, steps),
            torch.where(present, exp_avg, state[1]),
            torch.where(present, exp_avg_sq, state[2]),
        )


@dataclass(frozen=True)
class _AdamConstants:
    """Adam's constants: in float64 for the bias corrections, in the weights' dtype for the moments."""

    one: Tensor
    neg_lr: Tensor
    half: Tensor
    beta1_64: Tensor
    beta2_64: Tensor
    beta2: Tensor
    eps: Tensor

    @staticmethod
    def make(optimizer: WeightOptimizer, weights: Tensor) -> _AdamConstants:
        def f64(value: float) -> Tensor:
            return torch.full((), value, dtype=STEPS_DTYPE, device=weights.device)

        def same(value: float) -> Tensor:
            return torch.full((), value, dtype=weights.dtype, device=weights.device)

        beta1, beta2 = optimizer.betas
        return _AdamConstants(f64(1.0), f64(-optimizer.lr), f64(0.5), f64(beta1), f64(beta2), same(beta2), same(optimizer.eps))


def keep_where(apply: Tensor, proposed: OptimizerState, current: OptimizerState) -> OptimizerState:
    """The proposed state where ``apply`` (a 0-d bool tensor) is True, else the current one."""
    return (
        torch.where(apply, proposed[0], current[0]),
        torch.where(apply, proposed[1], current[1]),
        torch.where(apply, proposed[2], current[2]),
    )
