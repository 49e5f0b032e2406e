"""E_t[w_i] of a recorded run as a weights document (paper 5.2: "GradNorm Converged Weights"), written with
:mod:`gradnorm.toolkit.weights_file` so that :meth:`StaticWeights.from_file` can retrain with it."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from gradnorm.toolkit import weights_file
from gradnorm.toolkit.weights_file import PathLike

from .weights import weight_average


def export_weights(
    root: PathLike, run_id: str, out_path: Optional[PathLike] = None, *, window: Optional[Sequence[Optional[int]]] = None, burn_in: float = 0.1
) -> dict[str, Any]:
    """E_t[w_i] of ``run_id`` over ``window`` (default: after the first ``burn_in`` of the run) as a
    weights document; written atomically to ``out_path`` when given."""
    average = weight_average(root, run_id, window=window, burn_in=burn_in)
    document = {
        "format": weights_file.FORMAT,
        "version": weights_file.VERSION,
        "weights": {task: float(value) for task, value in average.weights.items()},
        "run": run_id,
        "window": [average.start_step, average.end_step],
        "method": average.method,
        "convergence": None if math.isnan(average.convergence) else float(average.convergence),
    }
    weights_file.check_weights(document["weights"], f"run {run_id!r}")
    if out_path is not None:
        weights_file.write_weights(out_path, document)
    return document
