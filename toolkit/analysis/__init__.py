"""DuckDB analysis over recorded runs: listing, downsampled series, E_t[w_i], overfitting, balance.

Every function takes a runs root (a folder of run directories) first; ``default_runs_root()`` is
``$GRADNORM_RUNS_ROOT`` or the bundled ``sample_runs/``. Damaged part files are left out and reported by
``problems()`` (and in ``list_runs()``), never fail a query. User values reach SQL only as parameters.
"""
from .catalog import default_runs_root, list_runs, problems, run_ids
from .overfitting import overfitting, overfitting_onsets
from .series import balance_series, balance_summary, metric_series
from .source import AnalysisError
from .summary import summary
from .weights import WeightAverage, weight_average

__all__ = [
    "AnalysisError",
    "WeightAverage",
    "balance_series",
    "balance_summary",
    "default_runs_root",
    "list_runs",
    "metric_series",
    "overfitting",
    "overfitting_onsets",
    "problems",
    "run_ids",
    "summary",
    "weight_average",
]

try:  # the weights file lives beside the analysis; re-exported here for one import path
    from toolkit.weights_file import export_weights, load_weights  # noqa: F401

    __all__ += ["export_weights", "load_weights"]
except ImportError:  # pragma: no cover - only while the module is absent
    pass
