"""Loss-balancing methods, all with the interface of :class:`~toolkit.balancers.base.Balancer`."""

from .base import Balancer, InitialLoss, StepStats, stats_matrix
from .direct_gradnorm import DirectGradNorm
from .dwa import DynamicWeightAverage, dwa_weights
from .gradnorm import GradNorm, gradnorm_terms
from .loss_normalisation import InitialLossWeights, PriorLossWeights, RealTimeLossWeights, prior_cross_entropy, prior_l2
from .mgda import MGDA, min_norm_coefficients
from .pcgrad import PCGrad, pcgrad_coefficients
from .static import EqualWeights, StaticWeights
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
]
