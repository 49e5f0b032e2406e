"""Loss-balancing methods, all with the interface of :class:`~toolkit.balancers.base.Balancer`."""

from .base import Balancer, InitialLoss, StepStats, stats_matrix
from .db_mtl import DBMTL, db_mtl_weights
from .direct_gradnorm import DirectGradNorm
from .dwa import DynamicWeightAverage, dwa_weights
from .famo import FAMO, famo_logit_grad, famo_weights
from .gradnorm import GradNorm, gradnorm_terms
from .imtl import IMTLL, imtl_l_state_grad
from .loss_normalisation import InitialLossWeights, PriorLossWeights, RealTimeLossWeights, prior_cross_entropy, prior_l2
from .mgda import MGDA, min_norm_coefficients
from .pcgrad import PCGrad, pcgrad_coefficients
from .static import EqualWeights, StaticWeights
from .torchjd_methods import (
    IMTLG,
    AlignedMTL,
    CAGrad,
    DualProj,
    FairGrad,
    GradVac,
    NashMTL,
    RandomLossWeighting,
    TorchJDWeighting,
    UPGrad,
)
from .uncertainty import UncertaintyWeighting

__all__ = [
    "Balancer",
    "InitialLoss",
    "StepStats",
    "stats_matrix",
    "GradNorm",
    "gradnorm_terms",
    "EqualWeights",
    "StaticWeights",
    "DirectGradNorm",
    "DynamicWeightAverage",
    "dwa_weights",
    "InitialLossWeights",
    "PriorLossWeights",
    "RealTimeLossWeights",
    "prior_cross_entropy",
    "prior_l2",
    "MGDA",
    "min_norm_coefficients",
    "PCGrad",
    "pcgrad_coefficients",
    "UncertaintyWeighting",
    "FAMO",
    "famo_weights",
    "famo_logit_grad",
    "IMTLL",
    "imtl_l_state_grad",
    "DBMTL",
    "db_mtl_weights",
    "TorchJDWeighting",
    "UPGrad",
    "IMTLG",
    "CAGrad",
    "NashMTL",
    "AlignedMTL",
    "RandomLossWeighting",
    "GradVac",
    "DualProj",
    "FairGrad",
]
