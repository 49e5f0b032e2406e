"""DuckDB analysis over recorded runs: listing, downsampled series, E_t[w_i], overfitting, balance.

Every function takes a runs root (a folder of run directories) first; ``default_runs_root()`` is
``$GRADNORM_RUNS_ROOT``, else ``./runs`` when it exists, else the bundled sample runs (see
``resolve_runs_root``). Damaged part files are left out and reported by
``problems()`` (and in ``list_runs()``), never fail a query. User values reach SQL only as parameters.

``RunError`` (a bad run id or run.json), ``RUNNING``, ``INVALID`` and ``FINISHED_ROWS_LOST`` (values of
``list_runs()``'s ``status``) are re-exported so that readers of runs, such as the app, need nothing below this API.
"""

from gradnorm.toolkit.runs import RUNNING, RunError

from .catalog import FINISHED_ROWS_LOST, INVALID, RunsRoot, bundled_runs_root, default_runs_root, list_runs, problems, resolve_runs_root, run_ids
from .comparison import Comparison, GroupedComparison, compare_runs, grouped_comparison, validation_losses
from .export import export_weights
from .overfitting import overfitting, overfitting_onsets
from .series import balance_series, balance_summary, metric_series
from .source import AnalysisError, reading
from .summary import summary
from .weights import WeightAverage, weight_average

__all__ = [
    "AnalysisError",
    "Comparison",
    "GroupedComparison",
    "grouped_comparison",
    "FINISHED_ROWS_LOST",
    "INVALID",
    "RUNNING",
    "RunError",
    "RunsRoot",
    "bundled_runs_root",
    "resolve_runs_root",
    "WeightAverage",
    "balance_series",
    "balance_summary",
    "compare_runs",
    "default_runs_root",
    "export_weights",
    "list_runs",
    "metric_series",
    "overfitting",
    "overfitting_onsets",
    "problems",
    "reading",
    "run_ids",
    "summary",
    "validation_losses",
    "weight_average",
]
