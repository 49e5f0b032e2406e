"""A self-contained HTML report of runs: the app's charts and tables in one file to share.

The Vega, Vega-Lite and Vega-Embed scripts are inlined (``vl-convert``), so the file opens offline.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Sequence, Union

import altair as alt
import pandas as pd

from gradnorm.toolkit import analysis

from . import _charts as charts

MAX_POINTS = 500

#: What the chart builders return: one panel per run side by side, or the overfitting view's rows.
Chart = Union[alt.HConcatChart, alt.VConcatChart]
PathLike = Union[str, os.PathLike]


def build_charts(root: PathLike, run_ids: Sequence[str]) -> list[tuple[str, Chart]]:
    """(title, chart) in the app's order: weights, gradient norms, loss ratios, balance, overfitting."""
    run_ids = list(run_ids)
    averages: dict[str, pd.DataFrame] = {}
    windows: dict[str, tuple[int, int]] = {}
    for run_id in run_ids:
        average = analysis.weight_average(root, run_id)
        averages[run_id], windows[run_id] = average.table, (average.start_step, average.end_step)
    # E_t[w_i]'s table has one row per recorded task, in the run's order.
    tasks = sorted({str(t) for table in averages.values() for t in table["task"]}, key=charts.natural_key)
    weights = analysis.metric_series(root, run_ids, "balancer_weight", max_points=MAX_POINTS)
    found: list[tuple[str, Chart]] = [("Task weights w_i(t) and E_t[w_i]", charts.weights_chart(weights, averages, windows, tasks=tasks))]
    norms = analysis.metric_series(root, run_ids, "grad_norm", max_points=MAX_POINTS)
    targets = analysis.metric_series(root, run_ids, "target_norm", max_points=MAX_POINTS)
    if len(norms):
        found.append(("Gradient norms G_i at the shared layer vs GradNorm targets", charts.grad_norm_chart(norms, targets, log=True, tasks=tasks)))
    ratios = analysis.metric_series(root, run_ids, "loss_ratio", max_points=MAX_POINTS)
    found.append(("Loss ratios L_i/L_i(0)", charts.metric_chart(ratios, "loss ratio", tasks=tasks)))
    balance = analysis.balance_series(root, run_ids, max_points=MAX_POINTS)
    if len(balance):
        found.append(("Balance across tasks", charts.balance_chart(balance)))
    for run_id in run_ids:
        frame = analysis.overfitting(root, run_id)
        if len(frame):
            found.append((f"Overfitting: {run_id}", charts.overfitting_chart(frame, analysis.overfitting_onsets(root, run_id), run_id=run_id, tasks=tasks)))
    return found


def write_report(root: PathLike, run_ids: Sequence[str], out_path: PathLike) -> Path:
    """Write the report for ``run_ids`` under ``root`` to ``out_path``."""
    if not run_ids:
        raise ValueError("name at least one run to report on")
    sections = []
    for run_id in run_ids:
        average = analysis.weight_average(root, run_id)
        table = analysis.summary(root, run_id, window=(average.start_step, average.end_step))
        sections.append(
            f"<h3>{html.escape(run_id)} ({html.escape(average.method)})</h3>"
            f"<p>E_t[w_i] over steps {average.start_step}-{average.end_step}; largest drift between the window's halves "
            f"{average.convergence:.2%}.</p>" + table.to_html(index=False, float_format=lambda v: f"{v:.4f}", border=0)
        )
    built = build_charts(root, run_ids)
    # Independent colours: tasks in most charts, runs in the balance chart.
    combined = alt.vconcat(*[chart.properties(title=title) for title, chart in built]).resolve_scale(color="independent").configure_title(anchor="start")
    chart_html = combined.to_html(inline=True)
    # The inlined scripts in <head> contain "<body>" strings of their own; the document's tag follows </head>.
    body_start = chart_html.index("<body>", chart_html.rindex("</head>")) + len("<body>")
    tables = "<h2>Summary</h2>" + "".join(sections) + "<h2>Charts</h2>"
    style = "<style>body{font-family:sans-serif;margin:24px} table{border-collapse:collapse} td,th{padding:2px 10px;text-align:right}</style>"
    document = chart_html[:body_start] + style + f"<h1>GradNorm report: {html.escape(', '.join(run_ids))}</h1>" + tables + chart_html[body_start:]
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(document, encoding="utf-8")
    return out
