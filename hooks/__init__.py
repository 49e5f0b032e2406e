"""The hook layer: attach GradNorm (or any balancer) and the recorder to an existing model or trainer."""

from .grad_norms import GradNormMeter
from .session import Session, attach
from .shared_layer import resolve_shared_layer

__all__ = ["GradNormMeter", "Session", "attach", "resolve_shared_layer"]
