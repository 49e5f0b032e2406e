"""MGDA: multitask learning as multi-objective optimisation (Sener and Koltun, NeurIPS 2018; survey section 3).

Each step solves min_{alpha in simplex} ||sum_i alpha_i g_i||^2 over the per-task gradients g_i with the
Frank-Wolfe solver (Sener and Koltun, Algorithm 2; survey section 3, steps 1-3) and trains on
sum_i alpha_i L_i, as the authors' code does. ``space="shared_layer"`` takes g_i = grad_W L_i at the
shared layer W; ``space="representation"`` takes g_i = grad_Z L_i at the shared layer's output Z, the
MGDA-UB upper bound (section 3.3) that needs no gradient over the shared parameters.

Recording: the min-norm coefficients alpha_i(t) are the effective weights; they are written in the
``weight`` column (they sum to 1, not T).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .base import Balancer, StepStats
from .checks import LOSS_FLOOR, require_choice, require_non_negative_losses

SPACES = ("shared_layer", "representation")
NORMALISATIONS = ("none", "l2", "loss", "loss+")


def _pair_min_norm(gram: Tensor, i: int, j: int) -> tuple[float, float]:
    """min over gamma in [0, 1] of ||gamma g_i + (1 - gamma) g_j||^2 (Sener and Koltun, Algorithm 1)."""
    denominator = gram[i, i] - 2 * gram[i, j] + gram[j, j]
    gamma = 0.5 if denominator <= 0 else float(((gram[j, j] - gram[i, j]) / denominator).clamp(0.0, 1.0))
    value = gamma**2 * gram[i, i] + 2 * gamma * (1 - gamma) * gram[i, j] + (1 - gamma) ** 2 * gram[j, j]
    return gamma, float(value)


def _polish_on_support(gram: Tensor, alpha: Tensor, threshold: float = 1e-4) -> Tensor:
    """Exact minimiser on the support Frank-Wolfe found, kept only if it satisfies the KKT conditions.

    Frank-Wolfe converges sublinearly when the optimum lies inside a face; on the right face the problem
    is an equality-constrained quadratic with a closed-form solution.
    """
    support = (alpha > threshold).nonzero().flatten()
    k = support.numel()
    system = torch.zeros(k + 1, k + 1, dtype=gram.dtype, device=gram.device)
    system[:k, :k] = gram[support][:, support]
    system[:k, k] = 1.0
    system[k, :k] = 1.0
    rhs = torch.zeros(k + 1, dtype=gram.dtype, device=gram.device)
    rhs[k] = 1.0
    # On a CPU, lstsq's default driver (gelsy) does not return the same bits for the same system from one
    # call to the next (seen with MKL's LAPACK), so a run could not be repeated or resumed exactly; the
    # SVD-based gelsd is repeatable and, like gelsy, solves rank-deficient systems. CUDA has only gels.
    driver = "gelsd" if gram.device.type == "cpu" else None
    solution = torch.linalg.lstsq(system, rhs.unsqueeze(1), driver=driver).solution.flatten()[:k]
    if not bool(torch.isfinite(solution).all()) or bool((solution < 0).any()):
        return alpha
    candidate = torch.zeros_like(alpha)
    candidate[support] = solution / solution.sum()
    value = candidate @ gram @ candidate
    scale = float(gram.diagonal().max()) or 1.0
    optimal = bool(((gram @ candidate) >= value - 1e-9 * scale).all())
    return candidate if optimal and value <= alpha @ gram @ alpha else alpha


def min_norm_coefficients(gram: Tensor, max_iter: int = 250, tol: float = 1e-7) -> Tensor:
    """Frank-Wolfe on the simplex for min_alpha alpha^T M alpha, M the Gram matrix g_i . g_j.

    As in the authors' solver, starts from the best pair of tasks (closed form) and moves, at each
    iteration, towards the vertex e_t with t = argmin_r (M alpha)_r by the exact line-search step (Sener
    and Koltun, Algorithm 2; survey section 3, steps 1-3); then polishes on the support it found. Works
    in float64 for stability.
    """
    gram = gram.double()
    count = gram.shape[0]
    alpha = torch.zeros(count, dtype=torch.float64, device=gram.device)
    best: Optional[tuple[float, int, int, float]] = None
    for i in range(count):
        for j in range(i + 1, count):
            gamma, value = _pair_min_norm(gram, i, j)
            if best is None or value < best[0]:
                best = (value, i, j, gamma)
    if best is None:
        raise ValueError(f"min_norm_coefficients needs the Gram matrix of two or more gradients, got shape {tuple(gram.shape)}")
    _, i, j, gamma = best
    alpha[i], alpha[j] = gamma, 1.0 - gamma
    for _ in range(max_iter):
        m_alpha = gram @ alpha
        t = int(torch.argmin(m_alpha))
        vv = alpha @ m_alpha
        ve = m_alpha[t]
        ee = gram[t, t]
        denominator = vv - 2 * ve + ee
        if denominator <= 0:
            break
        gamma = float(((vv - ve) / denominator).clamp(0.0, 1.0))
        step = -gamma * alpha
        step[t] += gamma
        alpha = alpha + step
        if float(step.abs().sum()) < tol:
            break
    return _polish_on_support(gram, alpha)


class MGDA(Balancer):
    """Min-norm (MGDA) effective weights from this step's per-task gradients.

    Args:
        space: ``"shared_layer"`` (gradients at W) or ``"representation"`` (MGDA-UB, gradients at Z).
        normalisation: how the gradients are scaled before the solve, as in the authors' code:
            ``"none"``, ``"l2"`` (g / ||g||), ``"loss"`` (g / L), ``"loss+"`` (g / (L ||g||)).
        max_iter: Frank-Wolfe iterations at most.
    """

    name = "mgda"
    uses_current_step = True
    repr_omits = ("name", "recorded_weight")

    def __init__(self, space: str = "shared_layer", normalisation: str = "none", max_iter: int = 250) -> None:
        super().__init__()
        require_choice("space", space, SPACES, self.name)
        require_choice("normalisation", normalisation, NORMALISATIONS, self.name)
        if max_iter < 1:
            raise ValueError(f"{self.name}: max_iter must be >= 1, got {max_iter}")
        self.space = space
        self.task_gradients = "representation" if space == "representation" else "shared_layer"
        self.normalisation = normalisation
        self.max_iter = max_iter
        self.name = "mgda-ub" if space == "representation" else "mgda"

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.update(space=self.space, normalisation=self.normalisation, max_iter=self.max_iter, solver="frank-wolfe")
        cfg["recorded_weight"] = "effective: the min-norm coefficients alpha_i (sum to 1) applied to the losses"
        return cfg

    def step_weights(self, losses: Tensor, grad_norms: Optional[Tensor], task_grads: Optional[Tensor]) -> Tensor:
        if task_grads is None:
            raise RuntimeError(f"{self.name} needs this step's per-task gradients ({self.space})")
        grads = task_grads.detach().flatten(1).double()
        if self.normalisation in ("loss", "loss+"):
            require_non_negative_losses(self.tasks, losses, f"{self.name} (normalisation={self.normalisation!r})")
            grads = grads / losses.double().clamp_min(LOSS_FLOOR).unsqueeze(1)
        if self.normalisation in ("l2", "loss+"):
            grads = grads / grads.norm(dim=1, keepdim=True).clamp_min(1e-30)
        gram = grads @ grads.T
        alpha = min_norm_coefficients(gram, self.max_iter)
        self._weights = alpha.to(losses.dtype)
        return self._weights

    def _update(self, losses: Tensor, loss_ratio: Tensor, inverse_rate: Tensor, weights: Tensor, grad_norms: Optional[Tensor]) -> StepStats:
        return StepStats(loss=losses, loss_ratio=loss_ratio, inverse_rate=inverse_rate, weight=weights)
