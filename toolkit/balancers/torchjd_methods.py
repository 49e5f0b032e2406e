"""The gradient-aggregation methods of TorchJD (SimplexLab/TorchJD, ``pip install "gradnorm-toolkit[methods]"``),
as balancers whose effective weights are recorded.

Each of these methods turns the per-task gradients g_1..g_T of a step into one update direction
d = sum_i w_i g_i. TorchJD exposes the coefficients w as a :class:`torchjd.aggregation.Weighting` of the Gram
matrix G_ij = g_i . g_j (or, for Nash-MTL and RLW, of the matrix of gradients itself); the aggregator is
that weighting followed by the combination. This module takes the per-task gradients the hooks capture
(at the shared layer W, or at its output Z), asks TorchJD's weighting for w and trains on sum_i w_i L_i.
Since grad (sum_i w_i L_i) = sum_i w_i grad L_i for detached w, the parameters below the capture point
receive exactly TorchJD's aggregated gradient of the captured block; the effective weights w_i(t) go to
the ``weight`` column, so E_t[w_i] and every view of the app work for them as for GradNorm.

The methods (their papers):

- ``upgrad``: UPGrad, Quinton and Rey, "Jacobian descent for multi-objective optimization", 2024.
- ``imtl-g``: IMTL-G, Liu et al., "Towards impartial multi-task learning", ICLR 2021, section 3.2: d has equal
  projections on every task's unit gradient.
- ``cagrad``: CAGrad, Liu et al., "Conflict-averse gradient descent", NeurIPS 2021, eq. 4 (its dual).
- ``nash-mtl``: Nash-MTL, Navon et al., "Multi-task learning as a bargaining game", ICML 2022, Algorithm 1.
- ``aligned-mtl``: Aligned-MTL, Senushkin et al., "Independent component alignment", CVPR 2023.
- ``rlw``: random loss weighting, Lin et al., "Reasonable effectiveness of random weighting", TMLR 2022:
  w = softmax(z), z ~ N(0, I), drawn afresh every step (no gradients needed).
- ``gradvac``: GradVac, Wang et al., "Gradient vaccine", ICLR 2021.
- ``dualproj``: DualProj, Quinton and Rey 2024 (projection of the mean gradient on the dual cone).
- ``fairgrad``: FairGrad, Ban and Ji, "Fair resource allocation in multi-task learning", ICML 2024, eq. 4:
  G w = w^(-1/alpha).

TorchJD is imported when a balancer is constructed, never at import of this module. Random draws (RLW,
GradVac's order) come from the balancer's own seeded generator state, so a run repeats and the training
loop's global random stream is left as it was.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

from .base import Balancer, StepStats, TaskGradients
from .checks import require_choice
from .state import expect_mapping

SPACES = ("shared_layer", "representation")
INSTALL_HINT = 'pip install "gradnorm-toolkit[methods]" (TorchJD with the solvers of CAGrad, Nash-MTL and FairGrad)'


@dataclass(frozen=True)
class TorchJDMethod:
    """How one TorchJD weighting is built and what it reads."""

    weighting: str  # the class name in torchjd.aggregation
    reads: str  # "gramian": the (T, T) Gram matrix; "matrix": the (T, D) gradients; "nothing": only T
    defaults: Mapping[str, Any]
    stateful: bool  # the weighting keeps state across steps (not in state_dict())
    paper: str


METHODS: dict[str, TorchJDMethod] = {
    "upgrad": TorchJDMethod("UPGradWeighting", "gramian", {}, False, "Quinton and Rey 2024, UPGrad"),
    "imtl-g": TorchJDMethod("IMTLGWeighting", "gramian", {}, False, "Liu et al. ICLR 2021, section 3.2"),
    # c = 0.4: the CAGrad paper's value for its multitask experiments (section 5)
    "cagrad": TorchJDMethod("CAGradWeighting", "gramian", {"c": 0.4}, False, "Liu et al. NeurIPS 2021, eq. 4"),
    "nash-mtl": TorchJDMethod(
        "NashMTL", "matrix", {"max_norm": 1.0, "update_weights_every": 1, "optim_niter": 20}, True, "Navon et al. ICML 2022, Algorithm 1"
    ),
    "aligned-mtl": TorchJDMethod("AlignedMTLWeighting", "gramian", {}, False, "Senushkin et al. CVPR 2023"),
    "rlw": TorchJDMethod("RandomWeighting", "nothing", {}, False, "Lin et al. TMLR 2022, Algorithm 2"),
    "gradvac": TorchJDMethod("GradVacWeighting", "gramian", {"beta": 0.5}, True, "Wang et al. ICLR 2021, Algorithm 2"),
    "dualproj": TorchJDMethod("DualProjWeighting", "gramian", {}, False, "Quinton and Rey 2024, DualProj"),
    # alpha = 1: proportional fairness (FairGrad section 3), the setting the paper relates to Nash-MTL
    "fairgrad": TorchJDMethod("FairGradWeighting", "gramian", {"alpha": 1.0}, False, "Ban and Ji ICML 2024, eq. 4"),
}


def torchjd_aggregation() -> Any:
    """The ``torchjd.aggregation`` module, or an ImportError that says how to install it."""
    try:
        return importlib.import_module("torchjd.aggregation")
    except ImportError as exc:
        raise ImportError(f"the TorchJD methods need TorchJD: {INSTALL_HINT}") from exc


class TorchJDWeighting(Balancer):
    """A TorchJD weighting as a balancer: this step's effective weights w_i from the per-task gradients.

    Args:
        method: one of :data:`METHODS` (``"upgrad"``, ``"imtl-g"``, ``"cagrad"``, ``"nash-mtl"``,
            ``"aligned-mtl"``, ``"rlw"``, ``"gradvac"``, ``"dualproj"``, ``"fairgrad"``).
        space: where the gradients are taken: ``"shared_layer"`` (grad_W L_i at the shared layer W, the
            default) or ``"representation"`` (grad_Z L_i at W's output Z; cheaper where Z is small, MGDA-UB's
            idea, Sener and Koltun 2018, section 3.3). Ignored by ``rlw``, which reads no gradient.
        seed: seed of the random draws (RLW's weights, GradVac's task order).
        **options: the TorchJD weighting's own arguments, over the defaults in :data:`METHODS`
            (e.g. ``c=0.5`` for CAGrad, ``alpha=2.0`` for FairGrad).

    The recorded ``weight`` is the effective weight: the coefficient of g_i in TorchJD's aggregated
    gradient, applied to L_i. The weights keep TorchJD's scale (UPGrad's are 1/T each where no gradients
    conflict, RLW's sum to 1). ``state_dict()`` holds the random state; Nash-MTL and GradVac keep
    internal state across steps that TorchJD does not expose, so their ``state_dict()`` is an error.
    """

    uses_current_step = True
    repr_omits = ("name", "recorded_weight", "source", "paper")

    def __init__(self, method: str, space: str = "shared_layer", seed: int = 0, **options: Any) -> None:
        super().__init__()
        require_choice("method", method, list(METHODS), "torchjd")
        require_choice("space", space, SPACES, method)
        self.method = method
        self.spec = METHODS[method]
        self.name = method
        self.space = space
        self.seed = seed
        self.options = {**self.spec.defaults, **options}
        self.task_gradients: Optional[TaskGradients] = (
            None if self.spec.reads == "nothing" else ("representation" if space == "representation" else "shared_layer")
        )
        self._aggregation = torchjd_aggregation()
        if not hasattr(self._aggregation, self.spec.weighting):
            raise ImportError(f"{method}: this TorchJD has no {self.spec.weighting}; {INSTALL_HINT} (torchjd>=0.18)")
        self._weighting: Optional[Callable[[Tensor], Tensor]] = None
        if method != "nash-mtl":  # Nash-MTL needs T, known at bind()
            self._weighting = self._make_weighting(2)
        self._rng_state = torch.Generator().manual_seed(seed).get_state()

    def _make_weighting(self, num_tasks: int) -> Callable[[Tensor], Tensor]:
        cls = getattr(self._aggregation, self.spec.weighting)
        try:
            if self.method == "nash-mtl":
                # TorchJD exposes Nash-MTL's weighting through its aggregator only
                return cls(n_tasks=num_tasks, **self.options).weighting
            return cls(**self.options)
        except ImportError as exc:  # a solver TorchJD needs for this method (cvxpy, ecos, scipy)
            raise ImportError(f"{self.method}: {exc}; {INSTALL_HINT}") from exc

    def initial_weights(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        if self.method == "nash-mtl":
            self._weighting = self._make_weighting(len(self.tasks))
        return super().initial_weights(device, dtype)

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.update(method=self.method, space=self.space, seed=self.seed, **self.options)
        cfg["source"] = f"torchjd.aggregation.{self.spec.weighting}"
        cfg["paper"] = self.spec.paper
        cfg["recorded_weight"] = "effective: the coefficients w_i of TorchJD's aggregated gradient sum_i w_i g_i, applied to the losses"
        return cfg

    def effective_weights(self, task_grads: Optional[Tensor], num_tasks: int) -> Tensor:
        """TorchJD's weights for these (T, D) gradients, in float64 on the host."""
        assert self._weighting is not None
        if self.spec.reads == "nothing":
            stat = torch.zeros(num_tasks, 1, dtype=torch.float64)
        else:
            if task_grads is None:
                raise RuntimeError(f"{self.name} needs this step's per-task gradients ({self.space})")
            grads = task_grads.detach().flatten(1).double().cpu()
            stat = grads if self.spec.reads == "matrix" else grads @ grads.T
        # The weighting draws from torch's global generator (RLW, GradVac): give it this balancer's own stream.
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._rng_state)
            with torch.no_grad():
                weights = self._weighting(stat)
            self._rng_state = torch.get_rng_state()
        return weights.detach().double().flatten()

    def step_weights(self, losses: Tensor, grad_norms: Optional[Tensor], task_grads: Optional[Tensor]) -> Tensor:
        weights = self.effective_weights(task_grads, losses.numel())
        if not bool(torch.isfinite(weights).all()):
            raise FloatingPointError(f"{self.name}: TorchJD's {self.spec.weighting} returned non-finite weights {weights.tolist()}")
        self._weights = weights.to(device=losses.device, dtype=losses.dtype)
        return self._weights

    def _update(self, losses: Tensor, loss_ratio: Tensor, inverse_rate: Tensor, weights: Tensor, grad_norms: Optional[Tensor]) -> StepStats:
        return StepStats(loss=losses, loss_ratio=loss_ratio, inverse_rate=inverse_rate, weight=weights)

    def _method_state(self) -> dict[str, Any]:
        if self.spec.stateful:
            raise NotImplementedError(
                f"{self.name}: TorchJD's {self.spec.weighting} keeps state across steps that it does not expose, so this balancer cannot be checkpointed"
            )
        return {"rng": self._rng_state.clone()}

    def _check_method_state(self, state: Any, num_tasks: int) -> None:
        state = expect_mapping(state, "'method'", ("rng",))
        rng = state["rng"]
        if not isinstance(rng, Tensor) or rng.dtype != torch.uint8 or rng.shape != self._rng_state.shape:
            raise ValueError(f"balancer state: 'method.rng' must be the uint8 tensor of torch.get_rng_state(), got {rng!r}")

    def _load_method_state(self, state: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> None:
        self._rng_state = state["rng"].to("cpu", copy=True)


def UPGrad(**options: Any) -> TorchJDWeighting:
    """UPGrad (Quinton and Rey 2024) through TorchJD."""
    return TorchJDWeighting("upgrad", **options)


def IMTLG(**options: Any) -> TorchJDWeighting:
    """IMTL-G (Liu et al. ICLR 2021, section 3.2) through TorchJD."""
    return TorchJDWeighting("imtl-g", **options)


def CAGrad(**options: Any) -> TorchJDWeighting:
    """CAGrad (Liu et al. NeurIPS 2021) through TorchJD; ``c`` (default 0.4) bounds the distance to the mean gradient."""
    return TorchJDWeighting("cagrad", **options)


def NashMTL(**options: Any) -> TorchJDWeighting:
    """Nash-MTL (Navon et al. ICML 2022) through TorchJD."""
    return TorchJDWeighting("nash-mtl", **options)


def AlignedMTL(**options: Any) -> TorchJDWeighting:
    """Aligned-MTL (Senushkin et al. CVPR 2023) through TorchJD."""
    return TorchJDWeighting("aligned-mtl", **options)


def RandomLossWeighting(**options: Any) -> TorchJDWeighting:
    """RLW (Lin et al. TMLR 2022): w = softmax(z), z ~ N(0, I) each step, through TorchJD's RandomWeighting."""
    return TorchJDWeighting("rlw", **options)


def GradVac(**options: Any) -> TorchJDWeighting:
    """GradVac (Wang et al. ICLR 2021) through TorchJD."""
    return TorchJDWeighting("gradvac", **options)


def DualProj(**options: Any) -> TorchJDWeighting:
    """DualProj (Quinton and Rey 2024) through TorchJD."""
    return TorchJDWeighting("dualproj", **options)


def FairGrad(**options: Any) -> TorchJDWeighting:
    """FairGrad (Ban and Ji ICML 2024) through TorchJD; ``alpha`` (default 1) is the fairness parameter."""
    return TorchJDWeighting("fairgrad", **options)
