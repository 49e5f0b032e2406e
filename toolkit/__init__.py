"""GradNorm toolkit: balance and monitor multitask PyTorch training (Chen et al., 2018).

The library half of the product: balancers, the recorder and its schema, the DuckDB analysis, weight
export and the command line. The hook layer that attaches to a model lives in the ``hooks`` package.
"""
__version__ = "0.1.0"

from .balancers import Balancer, EqualWeights, GradNorm, StaticWeights, StepStats  # noqa: E402
from .balancers import (  # noqa: E402
    MGDA,
    DirectGradNorm,
    DynamicWeightAverage,
    InitialLossWeights,
    PCGrad,
    PriorLossWeights,
    RealTimeLossWeights,
    UncertaintyWeighting,
)
from .recorder import Recorder  # noqa: E402

__all__ = ["Balancer", "EqualWeights", "GradNorm", "StaticWeights", "StepStats", "Recorder", "__version__",
    "MGDA", "DirectGradNorm", "DynamicWeightAverage", "InitialLossWeights", "PCGrad", "PriorLossWeights",
    "RealTimeLossWeights", "UncertaintyWeighting",
]
