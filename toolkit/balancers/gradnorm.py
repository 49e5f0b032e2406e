"""GradNorm (Chen et al., 2018, section 3) with the closed-form gradient of L_grad.

With n_i = ||grad_W L_i||_2 at the shared layer W, G_i = ||grad_W (w_i L_i)||_2 = w_i n_i, and n_i does
not depend on w. The target c_i = mean_j G_j * r_i^alpha is a constant (paper 3.1: "treated as a
constant"), so for L_grad = (1/T) sum_i |G_i - c_i| (eq. 2, the mean over tasks)

    dL_grad / dw_i = (1/T) * sign(G_i - c_i) * n_i.

No second-order backward pass is needed; ``tests/toolkit/balancers/test_gradnorm_reference.py`` checks this against a
create_graph double-backward implementation of the paper's equations.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Optional

import torch
from torch import Tensor

from .base import Balancer, InitialLossSpec, StepStats
from .state import expect_mapping
from .weight_optim import OptimizerState, WeightOptimizer, keep_where

REDUCTIONS = ("mean", "sum")


@dataclass
class GradNormTerms:
    """The quantities of paper eq. 2 for one step."""

    grad_norm: Tensor  # G_i = w_i * n_i
    target_norm: Tensor  # c_i = mean_j G_j * r_i^alpha (constant)
    grad_loss: Tensor  # L_grad
    weight_grad: Tensor  # dL_grad / dw_i


#: What :func:`gradnorm_update` returns: new weights, new optimiser state, eq. 2 terms, whether applied.
UpdateResult = tuple[Tensor, OptimizerState, GradNormTerms, Tensor]


class UpdateConstants(NamedTuple):
    """The update's constants as 0-d tensors in the weights' dtype and device: an operator with a tensor
    operand costs about half one with a Python number, which it first converts to a tensor."""

    scale: Tensor  # 1/T for reduction="mean", else 1
    floor: Tensor  # min_weight
    tasks: Tensor  # T
    inf: Tensor

    @staticmethod
    def make(weights: Tensor, reduction: str, min_weight: float) -> UpdateConstants:
        def same(value: float) -> Tensor:
            return torch.full((), value, dtype=weights.dtype, device=weights.device)

        count = weights.numel()
        return UpdateConstants(same(1.0 / count if reduction == "mean" else 1.0), same(min_weight), same(float(count)), same(math.inf))


def gradnorm_terms(
    weights: Tensor, unweighted_norms: Tensor, inverse_rate: Tensor, alpha: float, reduction: str = "mean", constants: Optional[UpdateConstants] = None
) -> GradNormTerms:
    """Paper eq. 2 and its closed-form gradient with respect to the weights.

    ``unweighted_norms`` is (T,) for the norm of the whole weight of W, or (T, C) for the per-filter-channel
    norms the paper uses on convolutional layers (3.1): then eq. 2 holds channel by channel (the target is
    the mean over tasks of that channel's G times r_i^alpha) and L_grad is the mean over channels. The
    returned ``grad_norm`` and ``target_norm`` are then per task, the root sum of squares over channels
    (the whole-weight norm for G).
    """
    per_channel = unweighted_norms.dim() == 2
    column = weights[:, None] if per_channel else weights
    rate = inverse_rate.pow(alpha)
    grad_norm = column * unweighted_norms
    target_norm = grad_norm.mean(0) * (rate[:, None] if per_channel else rate)
    gap = grad_norm - target_norm
    # torch.sign(0) = 0 matches autograd's subgradient of |x| at 0.
    weight_grad = torch.sign(gap).mul_(unweighted_norms)
    grad_loss = torch.linalg.vector_norm(gap.flatten(), ord=1)  # sum_i |G_i - c_i|
    if reduction == "mean":
        scale = constants.scale if constants is not None else 1.0 / weights.numel()
        weight_grad.mul_(scale)
        grad_loss = grad_loss * scale
    if per_channel:
        channels = unweighted_norms.shape[1]
        grad_loss = grad_loss / channels
        weight_grad = weight_grad.sum(1) / channels
        grad_norm, target_norm = grad_norm.norm(dim=1), target_norm.norm(dim=1)
    return GradNormTerms(grad_norm, target_norm, grad_loss, weight_grad)


def renormalize(weights: Tensor, min_weight: float, constants: Optional[UpdateConstants] = None) -> Tensor:
    """Floor the weights, then rescale so that sum_i w_i = T (paper 3.1, end).

    Dividing by the largest weight first keeps the sum from overflowing when one weight has grown huge
    (a float32 sum of three 1e38 weights is inf, which would turn every weight into 0).
    """
    floored = weights.clamp_min(constants.floor if constants is not None else min_weight)
    scaled = floored / floored.max()
    return scaled.div(scaled.sum()).mul(constants.tasks if constants is not None else weights.numel())


def update_is_sound(losses: Tensor, grad_norms: Tensor, inverse_rate: Tensor, stepped: Tensor, inf: Optional[Tensor] = None) -> Tensor:
    """A 0-d bool tensor: every loss, norm and inverse rate is finite and every new weight finite and > 0.

    log(w) is finite exactly when w is finite and positive, and the largest magnitude of a set (NaN
    propagates through the max) is finite exactly when all are, so one concatenation decides it all:
    five operators, where each is a dispatch on a T-element tensor (the update's real cost) and
    ``torch.isfinite(...).all()`` alone is five. (Not x * 0 == 0: ``torch.compile`` folds x * 0 to 0.)
    """
    return torch.cat((losses, grad_norms.flatten(), inverse_rate, stepped.log())).abs().amax() < (math.inf if inf is None else inf)


def gradnorm_update(
    weights: Tensor,
    grad_norms: Tensor,
    inverse_rate: Tensor,
    losses: Tensor,
    state: OptimizerState,
    alpha: float,
    reduction: str,
    min_weight: float,
    optimizer: WeightOptimizer,
    constants: Optional[UpdateConstants] = None,
) -> UpdateResult:
    """One GradNorm step as a pure function: (new weights, new optimiser state, eq. 2 terms, applied).

    The update is kept only if every loss, norm and inverse rate is finite (the inverse rates are 0/0
    when every loss of the step is zero) and the new weights are finite and positive (an overflowing
    step: a huge norm with a large SGD rate, or a floored weight underflowing to 0 beside a weight
    beyond float range). Decided on the device, without a host sync. Pure, so that ``torch.compile`` can
    fuse it (``GradNorm(compile_update=True)``).
    """
    terms = gradnorm_terms(weights, grad_norms, inverse_rate, alpha, reduction, constants)
    candidate, proposed = optimizer.propose(state, weights, terms.weight_grad)
    stepped = renormalize(candidate, min_weight, constants)
    applied = update_is_sound(losses, grad_norms, inverse_rate, stepped, constants.inf if constants is not None else None)
    return torch.where(applied, stepped, weights), keep_where(applied, proposed, state), terms, applied


def gradnorm_update_present(
    weights: Tensor,
    grad_norms: Tensor,
    inverse_rate: Tensor,
    losses: Tensor,
    state: OptimizerState,
    alpha: float,
    reduction: str,
    min_weight: float,
    optimizer: WeightOptimizer,
    present: Tensor,
) -> UpdateResult:
    """:func:`gradnorm_update` over the present tasks of a step (``present``: (T,) bool).

    The paper's equations over the T_p present tasks: G_i = w_i n_i, c_i = mean_{j present} G_j r_i^alpha
    (the inverse rates are already over the present tasks), L_grad = (1/T_p) sum_{i present} |G_i - c_i|
    (``reduction="sum"``: without 1/T_p), the closed-form gradient for the present weights only, one
    optimiser step for them (an absent task's moments and step count stay), the floor, and the
    renormalisation that keeps the present weights' sum (their share of T), so the absent weights stay as
    they are and sum_i w_i = T still holds. A single present task has G_i = c_i: a zero gradient, and its
    weight, renormalised to its own share, stays. Values at absent positions are NaN in the terms.
    """
    per_channel = grad_norms.dim() == 2
    column = present[:, None] if per_channel else present
    zero = torch.zeros((), dtype=weights.dtype, device=weights.device)
    count = present.sum().to(weights.dtype)
    norms = torch.where(column, grad_norms, zero)
    rate = torch.where(present, inverse_rate, torch.ones_like(inverse_rate)).pow(alpha)
    w = weights[:, None] if per_channel else weights
    grad_norm = w * norms
    target_norm = grad_norm.sum(0) / count * (rate[:, None] if per_channel else rate)
    gap = torch.where(column, grad_norm - target_norm, zero)
    weight_grad = torch.sign(gap) * norms
    grad_loss = gap.abs().sum()
    if reduction == "mean":
        weight_grad = weight_grad / count
        grad_loss = grad_loss / count
    if per_channel:
        channels = grad_norms.shape[1]
        grad_loss = grad_loss / channels
        weight_grad = weight_grad.sum(1) / channels
        grad_norm, target_norm = grad_norm.norm(dim=1), target_norm.norm(dim=1)
    nan = torch.full_like(weights, math.nan)
    terms = GradNormTerms(torch.where(present, grad_norm, nan), torch.where(present, target_norm, nan), grad_loss, weight_grad)
    candidate, proposed = optimizer.propose_present(state, weights, weight_grad, present)
    share = torch.where(present, weights, zero).sum()
    floored = torch.where(present, candidate.clamp_min(min_weight), zero)
    scaled = floored / floored.max()
    stepped = torch.where(present, scaled / scaled.sum() * share, weights)
    one = torch.ones_like(weights)
    sound = update_is_sound(
        torch.where(present, losses, one),
        torch.where(column, grad_norms, zero + 1),
        torch.where(present, inverse_rate, one),
        torch.where(present, stepped, one),
    )
    return torch.where(sound, stepped, weights), keep_where(sound, proposed, state), terms, sound


class GradNorm(Balancer):
    """Adaptive loss balancing by gradient normalisation (Chen et al., 2018).

    Args:
        alpha: the asymmetry hyperparameter (paper 3.1; 0.12 on the toy problem, 1.5 on NYUv2).
        lr: learning rate of the weights' own optimiser (paper 5.5: 0.025).
        optimizer: ``"adam"`` (paper 5.5) or ``"sgd"``.
        reduction: ``"mean"`` over tasks as in paper eq. 2, or ``"sum"`` (common in reimplementations;
            it scales the weight gradient by T).
        min_weight: weights are floored at this value before the renormalisation. Why a floor and not a
            log parameterisation: the floor leaves the paper's update untouched whenever the weights are
            above it (so trajectories match the paper's equations), while exp(log w) would change the
            geometry of every step. The paper reports a weight suppressed below 0.02 without harm
            (5.4), so the default floor sits well under that.
        initial_loss: reference L_i(0) of the loss ratio: ``"first"`` (paper), an int k (mean of the
            first k steps) or explicit values per task.
        per_channel: balance the gradient norms of each output channel (filter) of W separately, as the
            paper does for convolutional layers (3.1); by default the norm of the whole weight (dense
            layers in the paper).
        compile_update: fuse the weight update (some 50 operations on T-element tensors) with
            ``torch.compile``. Where a step is short, their launch and dispatch overhead is a visible part
            of it (``benchmarks/results/step_time.md``); the first step then pays the compilation (tens
            of seconds on a CPU, which needs a C++ compiler). If compiling fails, a warning says so and
            the eager update runs.

    ``state_dict()`` adds the weight optimiser's step count and moments (paper 5.5) to the base state
    (see :class:`~toolkit.balancers.base.Balancer` for checkpoint and resume); ``compile_update`` may
    differ between the saved and the resumed run.
    """

    name = "gradnorm"
    needs_grad_norms = True
    supports_missing_tasks = True
    config_not_checked = ("compile_update",)

    def __init__(
        self,
        alpha: float = 1.5,
        lr: float = 0.025,
        optimizer: str = "adam",
        reduction: str = "mean",
        min_weight: float = 1e-4,
        initial_loss: InitialLossSpec = "first",
        per_channel: bool = False,
        compile_update: bool = False,
    ) -> None:
        super().__init__(initial_loss=initial_loss)
        self.compile_update = bool(compile_update)
        self._compiled: Optional[Callable[..., UpdateResult]] = None
        self._constants: Optional[UpdateConstants] = None
        self.per_channel = bool(per_channel)
        if not (alpha >= 0):
            raise ValueError(f"alpha must be a non-negative number, got {alpha!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not (min_weight > 0):
            raise ValueError(f"min_weight must be positive (weights must stay positive), got {min_weight!r}")
        self.alpha = float(alpha)
        self.reduction = reduction
        self.min_weight = float(min_weight)
        self.optimizer = WeightOptimizer(kind=optimizer, lr=lr)

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.update(alpha=self.alpha, reduction=self.reduction, min_weight=self.min_weight, per_channel=self.per_channel, **self.optimizer.config())
        if self.compile_update:
            cfg["compile_update"] = True
        return cfg

    def _run_update(self, *args: Any) -> UpdateResult:
        if not self.compile_update:
            return gradnorm_update(*args)
        if self._compiled is None:
            self._compiled = torch.compile(gradnorm_update, dynamic=False)
        try:
            return self._compiled(*args)
        except Exception as exc:  # a missing compiler or an unsupported backend: fall back, once
            warnings.warn(f"gradnorm: compile_update failed ({type(exc).__name__}: {exc}); using the eager update", RuntimeWarning)
            self.compile_update = False
            return gradnorm_update(*args)

    def _update(self, losses: Tensor, loss_ratio: Tensor, inverse_rate: Tensor, weights: Tensor, grad_norms: Optional[Tensor]) -> StepStats:
        norms = self._require_norms(grad_norms)
        constants = self._constants
        if constants is None or constants.tasks.device != weights.device or constants.tasks.dtype != weights.dtype:
            constants = self._constants = UpdateConstants.make(weights, self.reduction, self.min_weight)
        state = self.optimizer.state_for(weights)
        result = self._run_update(weights, norms, inverse_rate, losses, state, self.alpha, self.reduction, self.min_weight, self.optimizer, constants)
        return self._apply(result, losses, loss_ratio, inverse_rate, weights)

    def _update_present(
        self, losses: Tensor, loss_ratio: Tensor, inverse_rate: Tensor, weights: Tensor, grad_norms: Optional[Tensor], present: Tensor
    ) -> StepStats:
        norms = self._require_norms(grad_norms)
        state = self.optimizer.state_for(weights)
        result = gradnorm_update_present(weights, norms, inverse_rate, losses, state, self.alpha, self.reduction, self.min_weight, self.optimizer, present)
        return self._apply(result, losses, loss_ratio, inverse_rate, weights)

    @staticmethod
    def _require_norms(grad_norms: Optional[Tensor]) -> Tensor:
        if grad_norms is None:
            raise RuntimeError("GradNorm needs the per-task gradient norms at the shared layer")
        return grad_norms

    def _apply(self, result: UpdateResult, losses: Tensor, loss_ratio: Tensor, inverse_rate: Tensor, weights: Tensor) -> StepStats:
        """Keep an update's new weights and optimiser state; the step's record holds the weights it used."""
        self._weights, new_state, terms, applied_update = result
        self.optimizer.load(new_state)
        return StepStats(
            loss=losses,
            loss_ratio=loss_ratio,
            inverse_rate=inverse_rate,
            weight=weights,
            grad_norm=terms.grad_norm,
            target_norm=terms.target_norm,
            step_grad_loss=terms.grad_loss,
            step_update_skipped=~applied_update,
        )

    def _method_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def _check_method_state(self, state: Any, num_tasks: int) -> None:
        state = expect_mapping(state, "'method'", ("optimizer",))
        self.optimizer.check_state(state["optimizer"], num_tasks, "'method.optimizer'")

    def _load_method_state(self, state: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> None:
        self.optimizer.load_state_dict(state["optimizer"], device, dtype)
