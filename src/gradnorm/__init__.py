"""GradNorm toolkit: balance and monitor multitask PyTorch training (Chen et al., 2018).

    import gradnorm
    session = gradnorm.attach(model.trunk[-1], gradnorm.GradNorm(alpha=1.5), runs_root="runs")
    ...
    session.close()

This module is the public API. Its names load on first use (PEP 562), so ``import gradnorm`` and the
``gradnorm`` command line start without importing torch. The layers behind it are internal:
``gradnorm.toolkit`` (balancers, schema, recorder, analysis, weights files), ``gradnorm.hooks`` (the
session that attaches to a model) and ``gradnorm.app`` (the Streamlit app); ``gradnorm.cli`` and
``gradnorm.experiments`` sit on top. ``gradnorm.toolkit.analysis`` is the documented analysis API;
``TensorBoard``, ``WandB`` and ``MLflow`` forward the records to those trackers (``attach(..., trackers=...)``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gradnorm.toolkit import __version__

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "attach": "gradnorm.hooks.session",
    "Session": "gradnorm.hooks.session",
    "Balancer": "gradnorm.toolkit.balancers",
    "StepStats": "gradnorm.toolkit.balancers",
    "GradNorm": "gradnorm.toolkit.balancers",
    "EqualWeights": "gradnorm.toolkit.balancers",
    "StaticWeights": "gradnorm.toolkit.balancers",
    "DirectGradNorm": "gradnorm.toolkit.balancers",
    "DynamicWeightAverage": "gradnorm.toolkit.balancers",
    "InitialLossWeights": "gradnorm.toolkit.balancers",
    "PriorLossWeights": "gradnorm.toolkit.balancers",
    "RealTimeLossWeights": "gradnorm.toolkit.balancers",
    "UncertaintyWeighting": "gradnorm.toolkit.balancers",
    "MGDA": "gradnorm.toolkit.balancers",
    "PCGrad": "gradnorm.toolkit.balancers",
    "FAMO": "gradnorm.toolkit.balancers",
    "IMTLL": "gradnorm.toolkit.balancers",
    "DBMTL": "gradnorm.toolkit.balancers",
    "TorchJDWeighting": "gradnorm.toolkit.balancers",
    "UPGrad": "gradnorm.toolkit.balancers",
    "IMTLG": "gradnorm.toolkit.balancers",
    "CAGrad": "gradnorm.toolkit.balancers",
    "NashMTL": "gradnorm.toolkit.balancers",
    "AlignedMTL": "gradnorm.toolkit.balancers",
    "RandomLossWeighting": "gradnorm.toolkit.balancers",
    "GradVac": "gradnorm.toolkit.balancers",
    "DualProj": "gradnorm.toolkit.balancers",
    "FairGrad": "gradnorm.toolkit.balancers",
    "load_weights": "gradnorm.toolkit.weights_file",
    "export_weights": "gradnorm.toolkit.analysis",
    "Tracker": "gradnorm.toolkit.forwarding",
    "TensorBoard": "gradnorm.toolkit.trackers",
    "WandB": "gradnorm.toolkit.trackers",
    "MLflow": "gradnorm.toolkit.trackers",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # the same names, eagerly, for type checkers and IDEs
    from gradnorm.hooks.session import Session, attach
    from gradnorm.toolkit.analysis import export_weights
    from gradnorm.toolkit.balancers import (
        DBMTL,
        FAMO,
        IMTLG,
        IMTLL,
        MGDA,
        AlignedMTL,
        Balancer,
        CAGrad,
        DirectGradNorm,
        DualProj,
        DynamicWeightAverage,
        EqualWeights,
        FairGrad,
        GradNorm,
        GradVac,
        InitialLossWeights,
        NashMTL,
        PCGrad,
        PriorLossWeights,
        RandomLossWeighting,
        RealTimeLossWeights,
        StaticWeights,
        StepStats,
        TorchJDWeighting,
        UncertaintyWeighting,
        UPGrad,
    )
    from gradnorm.toolkit.forwarding import Tracker
    from gradnorm.toolkit.trackers import MLflow, TensorBoard, WandB
    from gradnorm.toolkit.weights_file import load_weights


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gradnorm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
