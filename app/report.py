"""A self-contained HTML report of runs: the app's charts and tables in one file to share.

The Vega, Vega-Lite and Vega-Embed scripts are inlined (``vl-convert``), so the file opens offline.

Task names, run names and everything else read from the runs are data: every string that enters the page
is HTML-escaped, and the chart specification is embedded as JSON in a ``<script type="application/json">``
element with ``<``, ``>`` and ``&`` written as ``\\u`` escapes, read with ``JSON.parse``. A name such as
``</script><script>...`` therefore never ends an element or runs, and is drawn as text.
"""

from __future__ import annotations

import functools
import html
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import altair as alt
import pandas as pd

from gradnorm.toolkit import analysis

from . import _charts as charts

MAX_POINTS = 500

#: What the chart builders return: one panel per run side by side, or the overfitting view's rows.
Chart = Union[alt.HConcatChart, alt.VConcatChart]
PathLike = Union[str, os.PathLike]

STYLE = (
    "body{font-family:sans-serif;margin:24px} table{border-collapse:collapse} td,th{padding:2px 10px;text-align:right}"
    " .problems{color:#8a1c1c} #charts.vega-embed{width:100%;display:flex}"
)


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


def script_json(value: Any) -> str:
    """``value`` as JSON that can stand inside an HTML ``<script>`` element: no ``<``, ``>`` or ``&``
    (so no ``</script>`` or ``<!--``), non-ASCII characters and U+2028/2029 as ``\\u`` escapes."""
    text = json.dumps(_finite(value), ensure_ascii=True, separators=(",", ":"), default=str, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as null, which JSON has no words for."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


@functools.lru_cache(maxsize=1)
def _vega_scripts() -> str:
    """Vega, Vega-Lite and Vega-Embed in one script, for the Vega-Lite version Altair writes."""
    import vl_convert
    from altair.utils._importers import vl_version_for_vl_convert

    # The stub makes the snippet required; without one the bundle sets vegaEmbed, vegaLite and vega globally.
    bundle_of: Callable[..., str] = vl_convert.javascript_bundle
    bundle = bundle_of(vl_version=vl_version_for_vl_convert())
    return re.sub(r"</(script)", r"<\\/\1", bundle, flags=re.IGNORECASE)  # (it has none; never let one close our element)


def _run_section(root: PathLike, run_id: str, row: dict[str, Any]) -> str:
    average = analysis.weight_average(root, run_id)
    table = analysis.summary(root, run_id, window=(average.start_step, average.end_step))
    status = str(row.get("status", ""))
    counts = []
    for key, words in (("rows_lost", "rows lost"), ("write_errors", "failed writes")):
        value = row.get(key)
        if value is not None and not pd.isna(value):
            counts.append(f"{words}: {int(value)}")
    problems = "".join(f"<li>{html.escape(str(problem))}</li>" for problem in row.get("problems", []))
    return (
        f"<h3>{html.escape(run_id)} ({html.escape(average.method)}) &mdash; {html.escape(status)}</h3>"
        + (f"<p>{html.escape('; '.join(counts))}</p>" if counts else "")
        + (f'<ul class="problems">{problems}</ul>' if problems else "")
        + f"<p>E_t[w_i] over steps {average.start_step}-{average.end_step}; largest drift between the window's halves "
        f"{average.convergence:.2%}.</p>" + table.to_html(index=False, float_format=lambda v: f"{v:.4f}", border=0, escape=True)
    )


def write_report(root: PathLike, run_ids: Sequence[str], out_path: PathLike) -> Path:
    """Write the report for ``run_ids`` under ``root`` to ``out_path``."""
    run_ids = [str(r) for r in run_ids]
    if not run_ids:
        raise ValueError("name at least one run to report on")
    for run_id in run_ids:
        analysis.weight_average(root, run_id)  # an unknown or empty run is refused before anything is built
    built = build_charts(root, run_ids)
    listing = {row["run_id"]: row for row in analysis.list_runs(root, only=run_ids).to_dict("records")}
    sections = "".join(_run_section(root, run_id, listing.get(run_id, {})) for run_id in run_ids)
    # Independent colours: tasks in most charts, runs in the balance chart.
    combined = alt.vconcat(*[chart.properties(title=title) for title, chart in built]).resolve_scale(color="independent").configure_title(anchor="start")
    spec = combined.to_dict()
    title = html.escape("GradNorm report: " + ", ".join(run_ids))
    document = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="UTF-8">\n'
        f"<title>{title}</title>\n<style>{STYLE}</style>\n"
        f'<script type="text/javascript">\n{_vega_scripts()}\n</script>\n</head>\n<body>\n'
        f"<h1>{title}</h1>\n<h2>Summary</h2>\n{sections}\n<h2>Charts</h2>\n"
        '<div class="vega-visualization" id="charts"></div>\n'
        f'<script type="application/json" id="gradnorm-spec">{script_json(spec)}</script>\n'
        '<script type="text/javascript">\n'
        '  const spec = JSON.parse(document.getElementById("gradnorm-spec").textContent);\n'
        '  vegaEmbed("#charts", spec, {"mode": "vega-lite"}).catch(console.error);\n'
        "</script>\n</body>\n</html>\n"
    )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(document, encoding="utf-8")
    return out
