"""Loss-balancing methods, all with the interface of :class:`~toolkit.balancers.base.Balancer`."""
from .base import Balancer, InitialLoss, StepStats, stats_matrix
from .gradnorm import GradNorm, gradnorm_terms
from .static import EqualWeights, StaticWeights

__all__ = ["Balancer", "InitialLoss", "StepStats", "stats_matrix", "GradNorm", "gradnorm_terms", "EqualWeights", "StaticWeights"]
