"""A self-contained HTML report of runs: the app's charts and tables in one file to share.

The Vega, Vega-Lite and Vega-Embed scripts are inlined (``vl-convert``), so the file opens offline.

Task names, run names and everything else read from the runs are data: every string that enters the page
is HTML-escaped, and the chart specification is embedded as JSON in a ``<script type="application/json">``
element with ``<``, ``>`` and ``&`` written as ``\\u`` escapes, read with ``JSON.parse``. A name such as
``</script><script>...`` therefore never ends an element or runs, and is drawn as text; so is a group
name (``--group config:<field>`` takes it from run.json).

With a grouping (``write_report(..., group="name")``, ``gradnorm report --group name``) the comparison is per
group (``analysis.grouped_comparison``, as the app's Compare runs view): each group's mean validation loss
per task with its spread and run count, and Delta_m% against the baseline group.
"""

from __future__ import annotations

import functools
import html
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import altair as alt
import pandas as pd

from gradnorm.toolkit import analysis
from gradnorm.toolkit.analysis import catalog

from . import _charts as charts
from . import _grouping as grouping
from . import _verdicts as verdicts

MAX_POINTS = 500

#: What the chart builders return: one panel per run side by side, or the overfitting view's rows.
Chart = Union[alt.LayerChart, alt.HConcatChart, alt.VConcatChart]
PathLike = Union[str, os.PathLike]

STYLE = (
    "body{font-family:sans-serif;margin:24px} table{border-collapse:collapse} td,th{padding:2px 10px;text-align:right}"
    " .problems{color:#8a1c1c} #charts.vega-embed{width:100%;display:flex} td.best{background:#d7efdc;font-weight:bold} #charts>div{margin-bottom:18px}"
)


#: Plot width in the report (a page, not a container): the charts stack in one column at this width.
WIDTH = 820


def build_charts(root: PathLike, run_ids: Sequence[str], groups: Optional[dict[str, list[str]]] = None) -> list[tuple[str, Chart]]:
    """(title, chart) in the app's order: weights, gradient norms, loss ratios, balance, overfitting (every
    run's charts on one steps axis), the change against the baseline (per group with ``groups``); the same
    builders, palettes and overlays as the app, at a fixed width."""
    run_ids = list(run_ids)
    averages: dict[str, pd.DataFrame] = {}
    windows: dict[str, tuple[int, int]] = {}
    for run_id in run_ids:
        average = analysis.weight_average(root, run_id)
        averages[run_id], windows[run_id] = average.table, (average.start_step, average.end_step)
    # E_t[w_i]'s table has one row per recorded task, in the run's order.
    tasks = sorted({str(t) for table in averages.values() for t in table["task"]}, key=charts.natural_key)
    found: list[tuple[str, Chart]] = []

    def add(title: str, built: Sequence[Chart]) -> None:
        for index, chart in enumerate(built):
            found.append((title if len(built) == 1 else f"{title} ({index + 1} of {len(built)})", chart))

    weights = analysis.metric_series(root, run_ids, "balancer_weight", max_points=MAX_POINTS)
    add("Task weights w_i(t) and E_t[w_i] over its window", charts.weights_charts(weights, averages, windows, tasks=tasks, runs=run_ids, width=WIDTH))
    norms = analysis.metric_series(root, run_ids, "grad_norm", max_points=MAX_POINTS)
    targets = analysis.metric_series(root, run_ids, "target_norm", max_points=MAX_POINTS)
    if len(norms):
        for chart in charts.grad_norm_charts(norms, targets, log=True, tasks=tasks, runs=run_ids, width=WIDTH):
            found.append((f"Gradient norms G_i at the shared layer vs GradNorm targets: {chart.title}", chart))
    ratios = analysis.metric_series(root, run_ids, "loss_ratio", max_points=MAX_POINTS)
    add("Loss ratios L_i/L_i(0)", charts.metric_charts(ratios, "loss ratio", tasks=tasks, runs=run_ids, width=WIDTH, name="ratio"))
    balance = analysis.balance_series(root, run_ids, max_points=MAX_POINTS)
    if len(balance):
        for chart in charts.balance_charts(balance, runs=run_ids, width=WIDTH):
            found.append((f"Balance across tasks: {chart.title}", chart))
    overfitting = {run_id: analysis.overfitting(root, run_id) for run_id in run_ids}
    built_overfitting: list[Chart] = []
    for run_id, frame in overfitting.items():
        if len(frame):
            built_overfitting.extend(charts.overfitting_charts(frame, analysis.overfitting_onsets(root, run_id), run_id=run_id, tasks=tasks, width=WIDTH))
    # One steps axis for every run's overfitting charts, so that their onsets line up down the page.
    domain = charts.steps_domain([frame for frame in overfitting.values() if len(frame)])
    found.extend((f"Overfitting: {chart.title}", chart) for chart in charts.with_x_domain(built_overfitting, domain))
    comparison = _comparison(root, run_ids)
    if comparison is not None and len(run_ids) > 1 and len(comparison.per_task):
        if groups:
            result = _grouped(comparison, groups)
            found.append(
                (
                    f"Change of each group's mean final validation loss against {result.baseline} (%)",
                    charts.group_delta_chart(result.per_task, result.baseline, groups=list(groups), width=WIDTH),
                )
            )
        else:
            found.append(
                (
                    f"Change of the final validation loss against {comparison.baseline} (%)",
                    charts.delta_chart(comparison.per_task, comparison.baseline, runs=run_ids, width=WIDTH),
                )
            )
    # Each builder's own title moves to the report's caption line above it.
    for index, (title, titled) in enumerate(found):
        untitled: Chart = titled.copy()
        untitled.title = alt.Undefined
        found[index] = (title, untitled)
    return found


def baseline_of(root: PathLike, run_ids: Sequence[str]) -> str:
    """The comparison's baseline: the first equal-weights run, else the first run."""
    listing = analysis.list_runs(root, only=list(run_ids))
    balancers = dict(zip(listing["run_id"], listing["balancer"]))
    return next((r for r in run_ids if balancers.get(r) == "equal"), run_ids[0])


def _comparison(root: PathLike, run_ids: Sequence[str]) -> Optional[analysis.Comparison]:
    try:
        return analysis.compare_runs(root, list(run_ids), baseline=baseline_of(root, run_ids))
    except analysis.AnalysisError:
        return None


def report_groups(root: PathLike, run_ids: Sequence[str], key: str) -> dict[str, list[str]]:
    """The groups of ``run_ids`` under the grouping ``key`` (``balancer``, ``name``, ``config:<field>``; see
    :mod:`gradnorm.app._grouping`), as the app forms them; empty for ``none``. A config field that no run
    has is refused, with the fields that do differ between these runs."""
    if key == grouping.NONE:
        return {}
    listing = analysis.list_runs(root, only=list(run_ids))
    balancers = dict(zip(listing["run_id"], listing["balancer"]))
    metas = {run_id: dict(catalog.load_run_files(root, run_id).meta) for run_id in run_ids}
    if key.startswith(grouping.CONFIG_PREFIX):
        field = key[len(grouping.CONFIG_PREFIX) :]
        known = {name for meta in metas.values() for name in grouping.flatten({"config": meta.get("config") or {}, "balancer": meta.get("balancer") or {}})}
        if field not in known:
            differing = ", ".join(grouping.config_fields(metas)) or "none"
            raise ValueError(f"no run has the config field {field!r} to group by (fields that differ between these runs: {differing})")
    return grouping.groups(list(run_ids), key, balancers, metas)


def _grouped(comparison: analysis.Comparison, groups: dict[str, list[str]]) -> analysis.GroupedComparison:
    """The comparison per group, against the group of the comparison's baseline run."""
    home = next(name for name, runs in groups.items() if comparison.baseline in runs)
    return analysis.grouped_comparison(comparison.per_task, groups, baseline=home, metric=comparison.metric)


def _table(frame: pd.DataFrame, best: pd.DataFrame, index: bool) -> str:
    """``frame`` (text cells) as an HTML table, every header and cell escaped, the ``best`` cells marked."""
    head = ("<th>" + html.escape(str(frame.index.name or "")) + "</th>" if index else "") + "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = ""
    for position, (label, row) in enumerate(frame.iterrows()):
        cells = "".join(
            f'<td class="best">{html.escape(str(value))}</td>' if bool(best.iloc[position, column]) else f"<td>{html.escape(str(value))}</td>"
            for column, value in enumerate(row)
        )
        body += "<tr>" + (f"<th>{html.escape(str(label))}</th>" if index else "") + cells + "</tr>"
    return f'<table class="comparison"><tr>{head}</tr>{body}</table>'


def grouped_comparison_section(comparison: analysis.Comparison, groups: dict[str, list[str]], band: str) -> str:
    """ "Did balancing help?" per group: Delta_m% against the baseline group and the task-normalised loss
    with their spread across each group's runs, and each group's mean final validation loss per task with
    its spread (``band``: ``std``, ``minmax`` or ``none``) and run count; the better cells in bold, the
    gaps (a task or validation split a group's runs lack) as notes."""
    result = _grouped(comparison, groups)
    summary, summary_best, table, table_best = grouping.comparison_tables(result, band)
    spread = {"std": "mean ± std (population) across the group's runs", "minmax": "mean [min, max] across the group's runs", "none": "mean"}[band]
    members = "; ".join(f"{html.escape(name)}: {html.escape(', '.join(runs))}" for name, runs in groups.items())
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in result.notes)
    return (
        f"<h2>Did balancing help?</h2><p>Per group against the group {html.escape(result.baseline)}, on each task's final validation loss; "
        f"each cell: {html.escape(spread)}, n = runs. Delta_m% = (1/T) sum_i (mean_group,i - mean_baseline,i) / mean_baseline,i x 100 "
        "(lower is better; negative beats the baseline), its spread across the group's runs, each against the baseline group's means. "
        "Task-normalised loss: each run's sum over tasks of the final validation loss over the initial test loss (paper section 4), across the group's "
        "runs that validated every task. Best cell in bold.</p>"
        f"<p>Groups: {members}.</p>"
        + _table(summary, summary_best, index=False)
        + "<p>Final validation loss per task and group:</p>"
        + _table(table, table_best, index=True)
        + (f'<ul class="problems">{notes}</ul>' if notes else "")
    )


def comparison_section(root: PathLike, run_ids: Sequence[str], groups: Optional[dict[str, list[str]]] = None, band: str = "std") -> str:
    """ "Did balancing help?": Delta_m% and the task-normalised loss per run, the final validation loss
    per task and run, the better (lowest) cell of each row in bold; per group with ``groups``
    (:func:`grouped_comparison_section`)."""
    comparison = _comparison(root, run_ids)
    if comparison is None or comparison.per_task.empty:
        return "<p>No validation losses were logged: no comparison.</p>"
    if groups:
        return grouped_comparison_section(comparison, groups, band)
    best_delta = comparison.per_run["delta_m_pct"].min()
    best_norm = comparison.per_run["task_normalised_loss"].min()

    def cell(value: float, best: float, text: str) -> str:
        if not math.isfinite(value):
            return "<td>&ndash;</td>"
        return f'<td class="best">{html.escape(text)}</td>' if value == best else f"<td>{html.escape(text)}</td>"

    rows = "".join(
        f"<tr><th>{html.escape(str(r['run_id']))}</th>"
        + cell(r["delta_m_pct"], best_delta, f"{r['delta_m_pct']:+.2f}")
        + cell(r["task_normalised_loss"], best_norm, f"{r['task_normalised_loss']:.4f}")
        + f"<td>{int(r['tasks_compared'])}</td></tr>"
        for r in comparison.per_run.to_dict("records")
    )
    runs = comparison.runs
    head = "".join(f"<th>{html.escape(r)}</th>" for r in runs)
    per_task = comparison.per_task
    body = ""
    for task in sorted(per_task["task"].unique(), key=charts.natural_key):
        mine = per_task[per_task["task"] == task].set_index("run_id")
        lowest = mine["final_val_loss"].min()
        cells = "".join(
            cell(float(mine.loc[r, "final_val_loss"]), lowest, f"{mine.loc[r, 'final_val_loss']:.5g}") if r in mine.index else "<td>&ndash;</td>" for r in runs
        )
        body += f"<tr><th>{html.escape(str(task))}</th>{cells}</tr>"
    return (
        f"<h2>Did balancing help?</h2><p>Against {html.escape(comparison.baseline)}, on each task's final validation loss. "
        "Delta_m% = (1/T) sum_i (M_run,i - M_baseline,i) / M_baseline,i x 100 (lower is better; negative beats the baseline). "
        "Task-normalised loss: sum over tasks of the final validation loss over the initial test loss (paper section 4). Best cell in bold.</p>"
        f'<table class="comparison"><tr><th>run</th><th>Delta_m% vs {html.escape(comparison.baseline)}</th><th>task-normalised loss</th>'
        f"<th>tasks compared</th></tr>{rows}</table>"
        f'<p>Final validation loss per task:</p><table class="comparison"><tr><th>task</th>{head}</tr>{body}</table>'
    )


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
        f"{average.convergence:.2%}: {html.escape(verdicts.convergence_verdict(average.convergence).split(' (')[0])}"
        + (
            f" (more than {verdicts.CONVERGED_DRIFT:.0%}: retraining with these weights may not reproduce the run).</p>"
            if verdicts.converged(average.convergence) is False
            else ".</p>"
        )
        + table.to_html(index=False, float_format=lambda v: f"{v:.4f}", border=0, escape=True)
    )


def _titled(chart: Chart, title: str) -> dict[str, Any]:
    # Altair refuses more than 5,000 rows per dataset by default, a guard for notebooks; the charts are
    # already downsampled (MAX_POINTS per series), and nine runs x three tasks go past it.
    with alt.data_transformers.enable("default", max_rows=None):
        return chart.properties(title=title).configure_title(anchor="start").to_dict()


def write_report(root: PathLike, run_ids: Sequence[str], out_path: PathLike, *, group: str = grouping.NONE, band: str = "std") -> Path:
    """Write the report for ``run_ids`` under ``root`` to ``out_path``; with ``group`` (a grouping key:
    ``balancer``, ``name``, ``config:<field>``) its comparison is per group, each figure's spread the
    ``band`` (``std``, ``minmax`` or ``none``) across the group's runs."""
    run_ids = [str(r) for r in run_ids]
    if not run_ids:
        raise ValueError("name at least one run to report on")
    if band not in grouping.BANDS:
        raise ValueError(f"unknown band {band!r}: expected one of {', '.join(grouping.BANDS)}")
    for run_id in run_ids:
        analysis.weight_average(root, run_id)  # an unknown or empty run is refused before anything is built
    groups = report_groups(root, run_ids, group)
    built = build_charts(root, run_ids, groups)
    listing = {row["run_id"]: row for row in analysis.list_runs(root, only=run_ids).to_dict("records")}
    sections = "".join(_run_section(root, run_id, listing.get(run_id, {})) for run_id in run_ids) + comparison_section(root, run_ids, groups, band)
    # One embed per chart (each chart's zoom and hover signals are its own; a concatenation would merge
    # them); the colours are the app's explicit palettes, so a task or a run keeps its colour throughout.
    spec = [_titled(chart, title) for title, chart in built]
    title = html.escape("GradNorm report: " + ", ".join(run_ids))
    document = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="UTF-8">\n'
        f"<title>{title}</title>\n<style>{STYLE}</style>\n"
        f'<script type="text/javascript">\n{_vega_scripts()}\n</script>\n</head>\n<body>\n'
        f"<h1>{title}</h1>\n<h2>Summary</h2>\n{sections}\n<h2>Charts</h2>\n"
        '<div class="vega-visualization" id="charts"></div>\n'
        f'<script type="application/json" id="gradnorm-spec">{script_json(spec)}</script>\n'
        '<script type="text/javascript">\n'
        '  const specs = JSON.parse(document.getElementById("gradnorm-spec").textContent);\n'
        '  const holder = document.getElementById("charts");\n'
        "  for (const spec of specs) {\n"
        '    const place = document.createElement("div");\n'
        "    holder.appendChild(place);\n"
        '    vegaEmbed(place, spec, {"mode": "vega-lite"}).catch(console.error);\n'
        "  }\n"
        "</script>\n</body>\n</html>\n"
    )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(document, encoding="utf-8")
    return out
