"""Altair chart builders: plain functions from the analysis' DataFrames to charts.

They know nothing of Streamlit, so the app, ``gradnorm report`` and the tests share them.

Every chart is a single (layered) view, so it takes the width of its container (``width="container"``:
Vega's autosize "fit" works only for single and layered views) and never the page's width plus a
horizontal scroll, whatever the number of runs. Runs are overlaid on shared axes: colour is the task,
stroke dash the run (``RUN_DASHES``); where dashes are taken by another meaning (G_i against its target)
there is one chart per run, stacked, on a shared y domain. Every chart with more than one series has a
legend, the x axis zooms and pans (drag, wheel; double click resets) and a hover rule shows the values of
every series at the nearest x.

Colours: one palette for tasks (``TASK_COLOURS``, 40 distinct colours in a fixed order: a task's colour
is its place among the tasks shown, sorted naturally), one for runs (``RUN_COLOURS``, dark hues for the
charts where the run is the colour). Both are explicit ranges, so a light or a dark theme, the app and the
report draw the same colours.

Task names are data and are drawn as text, whatever they hold, with one exception: Vega-Lite compiles an
explicit sort order into a Vega expression with the names as string literals, and Vega's expression
parser rejects the line and paragraph separators U+2028/U+2029 there (the chart would not draw at all),
so those two are drawn as their escapes ``\\u2028``/``\\u2029``.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence, Union

import altair as alt
import numpy as np
import pandas as pd

PANEL_HEIGHT = 260
X_TITLES = {"step": "step", "wall_time": "wall time (s)"}

#: Tableau 20 (pairs of a strong and a light hue) then d3's category20b: 40 colours, none repeated.
TASK_COLOURS = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
    "#a0cbe8", "#ffbe7d", "#ff9d9a", "#86bcb6", "#8cd17d", "#f1ce63", "#d4a6c8", "#fabfd2", "#d7b5a6", "#79706e",
    "#393b79", "#5254a3", "#6b6ecf", "#9c9ede", "#637939", "#8ca252", "#b5cf6b", "#cedb9c", "#8c6d31", "#bd9e39",
    "#e7ba52", "#e7cb94", "#843c39", "#ad494a", "#d6616b", "#e7969c", "#7b4173", "#a55194", "#ce6dbd", "#de9ed6",
]  # fmt: skip
#: Runs where the run is the colour (balance): dark, saturated hues that read on white and on black.
RUN_COLOURS = [
    "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#1f78b4", "#b2182b", "#5e3c99",
    "#01665e", "#8c510a", "#c51b7d", "#4d9221", "#2166ac", "#d6604d", "#762a83", "#35978f", "#bf812d", "#878787",
]  # fmt: skip
#: Stroke dash of each run in an overlay (solid first): eight patterns that stay apart at 1.6 px.
RUN_DASHES = [[1, 0], [7, 3], [2, 2], [10, 3, 2, 3], [4, 5], [12, 2], [1, 4], [6, 2, 1, 2, 1, 2]]
#: Runs one overlay shows at most; more are drawn as further charts below, on the same y domain.
RUNS_PER_CHART = len(RUN_DASHES)

_UNDRAWABLE = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029"})

Width = Union[int, str]


def drawable(name: object) -> str:
    """``name`` as a chart may show it (see the module's docstring)."""
    return str(name).translate(_UNDRAWABLE)


def _drawable(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its task and run names made :func:`drawable`."""
    changes = {column: frame[column].map(drawable) for column in ("task", "run_id") if column in frame.columns and len(frame)}
    return frame.assign(**changes) if changes else frame


def _drawable_names(names: Optional[Sequence[str]]) -> Optional[list[str]]:
    return None if names is None else [drawable(t) for t in names]


def natural_key(name: str) -> list:
    """task2 before task10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(name))]


def _cycle(colours: Sequence, count: int) -> list:
    return [colours[i % len(colours)] for i in range(count)]


def task_domain(tasks: Sequence[str]) -> list[str]:
    return sorted(set(map(str, tasks)), key=natural_key)


def task_scale(tasks: Sequence[str]) -> alt.Scale:
    """The task colours: the i-th task (natural order) takes ``TASK_COLOURS[i]``."""
    domain = task_domain(tasks)
    return alt.Scale(domain=domain, range=_cycle(TASK_COLOURS, len(domain)))


def run_colour_scale(runs: Sequence[str]) -> alt.Scale:
    domain = list(dict.fromkeys(map(str, runs)))
    return alt.Scale(domain=domain, range=_cycle(RUN_COLOURS, len(domain)))


def run_dash_scale(runs: Sequence[str]) -> alt.Scale:
    domain = list(dict.fromkeys(map(str, runs)))
    return alt.Scale(domain=domain, range=_cycle(RUN_DASHES, len(domain)))


def _legend(title: str, count: int, **extra) -> alt.Legend:
    """A compact legend on the right, inside the chart's width: two columns past 16 entries (the chart's
    height follows the entries, :func:`legend_height`, so none is cut off)."""
    # (symbolOpacity: a faint band layer, drawn first, would otherwise lend the symbols its opacity)
    settings: dict[str, Any] = {
        "symbolSize": 80,
        "labelFontSize": 11,
        "labelLimit": 150,
        "rowPadding": 1,
        "symbolLimit": 0,
        "orient": "right",
        "symbolOpacity": 1,
    } | extra
    return alt.Legend(title=title, columns=2 if count > 16 else 1, **settings)


def legend_height(*counts: int) -> int:
    """A plot height that holds legends of ``counts`` entries stacked on the right."""
    rows = sum((count + 1) // 2 if count > 16 else count for count in counts)
    return max(PANEL_HEIGHT, 26 * rows + 40 * len(counts))


def _task_colour(colour: alt.Scale) -> alt.Color:
    """The task colour channel; every layer of a chart uses the same one, so Vega merges one legend."""
    count = len(colour.domain) if isinstance(colour.domain, list) else 0
    return alt.Color("task:N", scale=colour, legend=_legend("task", count))


def _count(colour: alt.Scale) -> int:
    return len(colour.domain) if isinstance(colour.domain, list) else 0


def _run_dash(runs: Sequence[str], legend: bool = True, title: str = "run (dash)") -> alt.StrokeDash:
    return alt.StrokeDash(
        "run_id:N",
        scale=run_dash_scale(runs),
        legend=_legend(title, len(runs), symbolType="stroke", symbolStrokeColor="gray", symbolStrokeWidth=2, symbolSize=300) if legend else None,
    )


def _x(x: str, field: str = "x", largest: float = 0.0) -> alt.X:
    """Steps as integers (SI prefixes past 100,000: 200k, 1M), wall time in seconds without float noise."""
    fmt = ("~s" if largest >= 1e5 else ",d") if x == "step" else ",.4~g"
    return alt.X(f"{field}:Q", title=X_TITLES.get(x, x), axis=alt.Axis(format=fmt, labelFlush=True), scale=alt.Scale(nice=False))


def _y(field: str, title: str, log: bool, zero: bool = False, domain: Optional[Sequence[float]] = None) -> alt.Y:
    if domain is not None:
        scale = alt.Scale(type="log", domain=list(domain)) if log else alt.Scale(domain=list(domain))
    else:
        scale = alt.Scale(type="log") if log else alt.Scale(zero=zero)
    return alt.Y(f"{field}:Q", title=title, scale=scale, axis=alt.Axis(format=",.4~g"))


def _tooltip(value_title: str, x: str, extra: Sequence[alt.Tooltip] = ()) -> list:
    return [
        alt.Tooltip("run_id:N", title="run"),
        alt.Tooltip("task:N"),
        *extra,
        alt.Tooltip("x:Q", title=X_TITLES.get(x, x), format=",.6~g"),
        alt.Tooltip("value_raw:Q", title=value_title, format=".6~g"),
        alt.Tooltip("value:Q", title=f"{value_title} (smoothed)", format=".6~g"),
        alt.Tooltip("n:Q", title="points in bucket"),
    ]


def _with_raw(frame: pd.DataFrame) -> pd.DataFrame:
    if "value_raw" not in frame.columns:
        frame = frame.assign(value_raw=frame["value"])
    return frame


#: What a line chart sends to the browser: the band and last-value columns are not drawn, and every byte
#: of the page's data is decoded and laid out by the browser before the first chart shows.
DRAWN = ["run_id", "task", "x", "value", "value_raw", "n", "kind", "start", "end", "average", "band_low", "band_high", "runs"]


def _lean(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with only the drawn columns, names as categories (Arrow dictionaries: each name sent once)."""
    frame = frame[[c for c in DRAWN if c in frame.columns]]
    names = {c: frame[c].astype("category") for c in ("run_id", "task", "kind") if c in frame.columns and len(frame)}
    return frame.assign(**names) if names else frame


def _interactive(base: alt.Chart, encoding: dict, tooltip: list, name: str) -> list[alt.Chart]:
    """Zoom/pan on x and a hover rule with the value of every series at the nearest x.

    What the browser builds is what the first chart waits for, so the hover costs marks only where it
    shows: the nearest-x selection lives on the rule layer, one mark per distinct x (Vega finds the nearest
    mark through a Voronoi diagram of the layer's marks: over every point of every series, runs x tasks x
    steps, that diagram was most of the time to the first drawn chart), and the points layer keeps only the
    points at the hovered x. It also keeps those at the first x, hidden by opacity, so that it is never
    empty (Vega warns of an infinite extent for an empty layer on a shared scale): tens of marks instead of
    one per point (15,000 on the bundled runs' first chart, 3 runs x 10 tasks x 500 points)."""
    zoom = alt.selection_interval(bind="scales", encodings=["x"], name=f"{name}_zoom")
    hover = alt.selection_point(name=f"{name}_hover", fields=["x"], nearest=True, on="pointerover", clear="pointerout", empty=False)
    data = base.data if isinstance(base.data, pd.DataFrame) else pd.DataFrame()
    lines = base.mark_line(**_per_point_lean(data, encoding)).encode(**encoding, order=alt.value(0)).add_params(zoom)
    first = _first_x(data)
    store = f"{name}_hover_store"
    shown = f"(length(data('{store}')) && vlSelectionTest('{store}', datum))"
    points = base.transform_filter(f"datum.x === {first!r} || {shown}" if first is not None else shown).mark_point(filled=True, size=36, clip=True)
    points = points.encode(
        x=encoding["x"], y=encoding["y"], color=encoding["color"], opacity=alt.condition(hover, alt.value(1.0), alt.value(0.0)), tooltip=tooltip
    )
    rule = (
        base.transform_aggregate(groupby=["x"])
        .mark_rule(color="gray", strokeWidth=1)
        .encode(x=encoding["x"], opacity=alt.condition(hover, alt.value(0.7), alt.value(0.0)))
        .add_params(hover)
    )
    return [lines, points, rule]


def _per_point_lean(frame: pd.DataFrame, encoding: dict) -> dict[str, Any]:
    """The line mark's settings, with no per-point test that the frame shows it does not need.

    Streamlit embeds Vega without ``eval``: every expression Vega evaluates per point runs through its
    expression interpreter, and a line has one point per row (15,000 on the bundled runs' first chart).
    Vega-Lite gives each line point a ``defined`` test (x and y valid and finite, so that a gap breaks the
    line); where pandas finds every x and y finite there is nothing for it to find (``invalid=None``: no
    test). The ``order`` channel the caller sets to a constant does the same for the ``toNumber(x)`` that
    Vega-Lite otherwise computes for every row of a line's data before sorting it by x (the x column is
    already numbers; the line is still drawn in x order)."""
    settings: dict[str, Any] = {"strokeWidth": 1.6, "clip": True}
    y = encoding["y"].to_dict().get("field")
    columns = [c for c in ("x", y) if isinstance(c, str)]
    if len(frame) and all(c in frame.columns for c in columns):
        values = frame[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
        if np.isfinite(values).all():
            settings["invalid"] = None
    return settings


def _first_x(frame: pd.DataFrame) -> Optional[float]:
    """The smallest finite x of ``frame``, as the number the browser compares (None where there is none)."""
    if "x" not in frame.columns or frame.empty:
        return None
    values = pd.to_numeric(frame["x"], errors="coerce")
    values = values[values.notna() & (values.abs() != float("inf"))]
    return float(values.min()) if len(values) else None


def _band(base: alt.Chart, encoding: dict, title: str, log: bool, detail: Optional[str] = None) -> list[alt.Chart]:
    """A group's band (``band_low`` to ``band_high`` across its runs, :mod:`gradnorm.app._grouping`) as a
    faint area in the series' colour, under the lines; nothing where the frame has no band."""
    fields = set(base.data.columns) if isinstance(base.data, pd.DataFrame) else set()
    if not {"band_low", "band_high"} <= fields:
        return []
    shared = {k: v for k, v in encoding["y"].to_dict().items() if k in ("scale", "axis")}  # the lines' y scale and axis
    y = alt.Y("band_low:Q", title=title, **shared)
    channels: dict[str, Any] = dict(x=encoding["x"], y=y, y2=alt.Y2("band_high:Q"), color=encoding["color"])
    if detail:
        channels["detail"] = detail
    # (on a log axis a mean - std below zero has no place: that side of the band stops at the mean)
    low = "datum.band_low > 0 ? datum.band_low : datum.value" if log else "datum.band_low"
    return [base.transform_calculate(band_low=low).mark_area(opacity=0.16, clip=True, interpolate="linear").encode(**channels)]


def _largest(frame: pd.DataFrame, column: str = "x") -> float:
    values = pd.to_numeric(frame[column], errors="coerce") if column in frame.columns and len(frame) else pd.Series(dtype=float)
    return float(values.max()) if values.notna().any() else 0.0


def _chunks(runs: Sequence[str]) -> list[list[str]]:
    runs = list(runs)
    return [runs[i : i + RUNS_PER_CHART] for i in range(0, len(runs), RUNS_PER_CHART)] or [[]]


def _finite_domain(values: pd.Series, log: bool, zero: bool) -> Optional[list[float]]:
    values = pd.to_numeric(values, errors="coerce")
    values = values[values.notna() & (values.abs() != float("inf"))]
    if log:
        values = values[values > 0]
    if values.empty:
        return None
    low, high = float(values.min()), float(values.max())
    if zero and not log:
        low = min(0.0, low)
    return [low, high] if high > low else None


def metric_charts(
    series: pd.DataFrame,
    y_title: str,
    *,
    x: str = "step",
    log: bool = False,
    tasks: Optional[Sequence[str]] = None,
    runs: Optional[Sequence[str]] = None,
    zero: bool = False,
    width: Width = "container",
    name: str = "metric",
    extra_layers: Optional[Mapping[str, Sequence[alt.Chart]]] = None,
) -> list[alt.LayerChart]:
    """A metric per task over x, runs overlaid (colour = task, dash = run), ``RUNS_PER_CHART`` runs per chart
    and the charts on one y domain. ``extra_layers[run]`` are drawn with that run's chart."""
    series, tasks, runs = _with_raw(_drawable(series)), _drawable_names(tasks), _drawable_names(runs)
    tasks = tasks if tasks is not None else list(series["task"].unique()) if len(series) else []
    runs = runs if runs is not None else sorted(series["run_id"].unique(), key=natural_key) if len(series) else []
    colour = task_scale(tasks)
    groups = _chunks(runs)
    domain = _finite_domain(series["value"], log, zero) if len(groups) > 1 and len(series) else None
    charts = []
    for index, group in enumerate(groups):
        frame = _lean(series[series["run_id"].isin(group)] if len(series) else series)
        dash = _run_dash(group, title="group (dash)" if "runs" in series.columns else "run (dash)")
        encoding = dict(x=_x(x, largest=_largest(series)), y=_y("value", y_title, log, zero, domain), color=_task_colour(colour), strokeDash=dash)
        base = alt.Chart(frame)
        grouped = "runs" in frame.columns
        tooltip = _tooltip(y_title, x, [alt.Tooltip("runs:Q", title="runs in group")] if grouped else ())
        layers = [*_band(base, encoding, y_title, log, detail="run_id:N"), *_interactive(base, encoding, tooltip, f"{name}{index}")]
        for run_id in group:
            layers.extend((extra_layers or {}).get(run_id, ()))
        title = None if len(groups) == 1 else f"runs {index * RUNS_PER_CHART + 1}-{index * RUNS_PER_CHART + len(group)} of {len(runs)}"
        chart = alt.layer(*layers).properties(width=width, height=legend_height(len(colour.domain), len(group)))
        charts.append(chart.properties(title=title) if title else chart)
    return charts


def weights_charts(
    series: pd.DataFrame,
    averages: Mapping[str, pd.DataFrame],
    windows: Mapping[str, tuple[int, int]],
    *,
    x: str = "step",
    log: bool = False,
    tasks: Optional[Sequence[str]] = None,
    runs: Optional[Sequence[str]] = None,
    width: Width = "container",
) -> list[alt.LayerChart]:
    """w_i(t) of every run (paper Figures 2 and 5) with E_t[w_i] drawn over its averaging window as a
    thick, faint segment in the task's colour (on a wall-time axis the windows, in steps, are not drawn).
    ``averages[run]`` has columns task, mean; ``windows[run]`` = (start, end)."""
    tasks = _drawable_names(tasks)
    runs = _drawable_names(runs) if runs is not None else sorted({drawable(r) for r in series["run_id"].unique()}, key=natural_key)
    colour = task_scale(tasks if tasks is not None else series["task"].map(drawable).unique())
    extra: dict[str, list[alt.Chart]] = {}
    if x == "step":
        for run_id, table in averages.items():
            key = drawable(run_id)
            if key not in windows and run_id not in windows or table is None or not len(table):
                continue
            start, end = windows.get(run_id, windows.get(key, (0, 0)))
            rules = _drawable(table)[["task", "mean"]].rename(columns={"mean": "average"}).assign(run_id=key, start=float(start), end=float(end))
            extra[key] = [
                alt.Chart(rules)
                .mark_rule(strokeWidth=4, opacity=0.4, clip=True)
                .encode(
                    x=alt.X("start:Q"),
                    x2="end:Q",
                    y=alt.Y("average:Q"),
                    color=_task_colour(colour),
                    tooltip=[
                        alt.Tooltip("run_id:N", title="run"),
                        alt.Tooltip("task:N"),
                        alt.Tooltip("average:Q", title="E_t[w_i]", format=".4f"),
                        alt.Tooltip("start:Q", title="window from step", format="d"),
                        alt.Tooltip("end:Q", title="window to step", format="d"),
                    ],
                )
            ]
    # From zero: weights are positive and sum to T, and equal weights must not zoom into rounding.
    return metric_charts(series, "weight w_i(t)", x=x, log=log, tasks=tasks, runs=runs, zero=True, width=width, name="weights", extra_layers=extra)


def grad_norm_charts(
    norms: pd.DataFrame,
    targets: Optional[pd.DataFrame],
    *,
    x: str = "step",
    log: bool = True,
    tasks: Optional[Sequence[str]] = None,
    runs: Optional[Sequence[str]] = None,
    width: Width = "container",
) -> list[alt.LayerChart]:
    """One chart per run, on one y domain: G_i(t) (solid) against the GradNorm target
    mean_j G_j * r_i^alpha (dashed) of each task, the legend naming both."""
    frames = [norms.assign(kind="G_i (solid)")]
    if targets is not None and len(targets):
        frames.append(targets.assign(kind="target (dashed)"))
    combined = _with_raw(_drawable(pd.concat(frames, ignore_index=True)))
    tasks = _drawable_names(tasks)
    colour = task_scale(tasks if tasks is not None else combined["task"].unique())
    runs = [drawable(r) for r in runs] if runs is not None else sorted(combined["run_id"].unique(), key=natural_key) if len(combined) else []
    domain = _finite_domain(combined["value"], log, False) if len(combined) else None
    kinds = ["G_i (solid)", "target (dashed)"]
    dash = alt.StrokeDash(
        "kind:N",
        scale=alt.Scale(domain=kinds, range=[[1, 0], [5, 3]]),
        legend=alt.Legend(title="series", orient="right", symbolType="stroke", symbolStrokeColor="gray", symbolStrokeWidth=2, symbolSize=300, labelFontSize=11),
    )
    charts = []
    for index, run_id in enumerate(runs):
        frame = _lean(combined[combined["run_id"] == run_id])
        if frame.empty:
            continue
        encoding = dict(
            x=_x(x, largest=_largest(combined)),
            y=_y("value", "gradient norm at W", log, False, domain),
            color=_task_colour(colour),
            strokeDash=dash,
            detail="kind:N",
        )
        grouped = "runs" in frame.columns
        tooltip = _tooltip("norm", x, [alt.Tooltip("kind:N", title="series"), *([alt.Tooltip("runs:Q", title="runs in group")] if grouped else [])])
        base = alt.Chart(frame)
        layers = [*_band(base, encoding, "gradient norm at W", log, detail="kind:N"), *_interactive(base, encoding, tooltip, f"norms{index}")]
        charts.append(alt.layer(*layers).properties(title=run_id, width=width, height=legend_height(_count(colour), 2)))
    return charts


def overfitting_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Training and validation loss of each task in long form (``split``, ``loss``), each divided by the
    task's first validation loss (``normalised``: the paper's task-normalised loss, section 4, so every
    task reads on one axis)."""
    long = frame.melt(id_vars=["task", "step"], value_vars=["train_loss", "val_loss"], var_name="split", value_name="loss")
    long["split"] = long["split"].map({"train_loss": "train", "val_loss": "validation"})
    first = frame.sort_values("step").dropna(subset=["val_loss"]).groupby("task")["val_loss"].first()
    long["initial"] = long["task"].map(first)
    long["normalised"] = long["loss"] / long["initial"].where(long["initial"] != 0)
    return long


def overfitting_charts(
    frame: pd.DataFrame,
    onsets: pd.DataFrame,
    *,
    run_id: str = "",
    log: bool = False,
    tasks: Optional[Sequence[str]] = None,
    width: Width = "container",
    domain: Optional[Sequence[float]] = None,
) -> list[alt.LayerChart]:
    """Top: every task's training (solid) and validation (dashed) loss divided by its first validation
    loss, with a rule in the task's colour where its overfitting starts (``overfitting_onsets``). Bottom:
    the relative gap (validation - training) / validation of every task. ``domain``: the y domain of the
    top chart (shared by several runs' charts)."""
    frame, onsets, tasks, run_id = _drawable(frame), _drawable(onsets), _drawable_names(tasks), drawable(run_id)
    colour = task_scale(tasks if tasks is not None else frame["task"].unique())
    long = overfitting_frame(frame).assign(run_id=run_id)
    split_dash = alt.StrokeDash(
        "split:N",
        scale=alt.Scale(domain=["train", "validation"], range=[[1, 0], [5, 3]]),
        legend=alt.Legend(title="split", orient="right", symbolType="stroke", symbolStrokeColor="gray", symbolStrokeWidth=2, symbolSize=300, labelFontSize=11),
    )
    y_title = "loss / first validation loss"
    long = long.rename(columns={"step": "x"})
    encoding = dict(
        x=_x("step", largest=_largest(long)),
        y=_y("normalised", y_title, log, domain=domain),
        color=_task_colour(colour),
        strokeDash=split_dash,
        detail="split:N",
    )
    tooltip = [
        alt.Tooltip("task:N"),
        alt.Tooltip("split:N"),
        alt.Tooltip("x:Q", title="step", format=",d"),
        alt.Tooltip("loss:Q", format=".6~g"),
        alt.Tooltip("normalised:Q", title=y_title, format=".4~g"),
    ]
    layers = _interactive(alt.Chart(long), encoding, tooltip, "overfit")
    found = onsets.dropna(subset=["onset_step"]) if len(onsets) else onsets
    if len(found):
        rules = pd.DataFrame({"task": found["task"].astype(str), "x": found["onset_step"].astype(float)})
        layers.append(
            alt.Chart(rules)
            .mark_rule(strokeDash=[3, 2], strokeWidth=2, clip=True)
            .encode(
                x=alt.X("x:Q"),
                color=_task_colour(colour),
                tooltip=[alt.Tooltip("task:N"), alt.Tooltip("x:Q", title="overfitting starts at step", format=",d")],
            )
        )
    losses = alt.layer(*layers).properties(title=f"{run_id}: training vs validation loss per task", width=width, height=legend_height(_count(colour), 2))
    relative = relative_gap(frame)
    gap_zoom = alt.selection_interval(bind="scales", encodings=["x"], name="gap_zoom")
    gaps = (
        alt.Chart(relative)
        .mark_line(point=alt.OverlayMarkDef(size=12), clip=True)
        .encode(
            x=_x("step", "step", largest=_largest(frame, "step")),
            y=alt.Y("relative_gap:Q", title="(validation - training) / validation", axis=alt.Axis(format="~%")),
            color=_task_colour(colour),
            tooltip=[
                "task:N",
                alt.Tooltip("step:Q", format=",d"),
                alt.Tooltip("gap:Q", format=".6~g"),
                alt.Tooltip("relative_gap:Q", title="relative gap", format=".2%"),
            ],
        )
        .add_params(gap_zoom)
    )
    return [losses, alt.layer(gaps).properties(title=f"{run_id}: generalisation gap, relative", width=width, height=legend_height(_count(colour)))]


def relative_gap(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` (``analysis.overfitting``) with the relative gap (validation - training) / validation."""
    return frame.assign(relative_gap=frame["gap"] / frame["val_loss"].where(frame["val_loss"] != 0))


def overfitting_runs_charts(
    runs: Mapping[str, tuple[pd.DataFrame, pd.DataFrame]],
    *,
    log: bool = False,
    tasks: Optional[Sequence[str]] = None,
    width: Width = "container",
) -> list[alt.LayerChart]:
    """Several runs' overfitting at once: ``runs[run] = (analysis.overfitting frame, its onsets)``. One
    losses chart per run (small multiples, one y domain, each with its onset rules), then one chart of the
    relative gap with every run overlaid (colour = task, dash = run). One run: :func:`overfitting_charts`."""
    if len(runs) == 1:
        ((run_id, (frame, onsets)),) = runs.items()
        return overfitting_charts(frame, onsets, run_id=run_id, log=log, tasks=tasks, width=width)
    normalised = [overfitting_frame(frame)["normalised"] for frame, _ in runs.values() if len(frame)]
    domain = _finite_domain(pd.concat(normalised, ignore_index=True), log, False) if normalised else None
    charts = [overfitting_charts(frame, onsets, run_id=run_id, log=log, tasks=tasks, width=width, domain=domain)[0] for run_id, (frame, onsets) in runs.items()]
    names = [drawable(r) for r in runs]
    gaps = pd.concat([_drawable(relative_gap(frame)).assign(run_id=drawable(run_id)) for run_id, (frame, _) in runs.items()], ignore_index=True)
    named = _drawable_names(tasks)
    colour = task_scale(named if named is not None else list(gaps["task"].unique()))
    zoom = alt.selection_interval(bind="scales", encodings=["x"], name="gaps_zoom")
    lines = (
        alt.Chart(gaps[["run_id", "task", "step", "gap", "relative_gap"]])
        .mark_line(strokeWidth=1.6, clip=True)
        .encode(
            x=_x("step", "step", largest=_largest(gaps, "step")),
            y=alt.Y("relative_gap:Q", title="(validation - training) / validation", axis=alt.Axis(format="~%")),
            color=_task_colour(colour),
            strokeDash=_run_dash(names),
            tooltip=[
                alt.Tooltip("run_id:N", title="run"),
                "task:N",
                alt.Tooltip("step:Q", format=",d"),
                alt.Tooltip("gap:Q", format=".6~g"),
                alt.Tooltip("relative_gap:Q", title="relative gap", format=".2%"),
            ],
        )
        .add_params(zoom)
    )
    title = f"generalisation gap, relative: {len(names)} runs (dash = run)"
    charts.append(alt.layer(lines).properties(title=title, width=width, height=legend_height(_count(colour), len(names))))
    return charts


BALANCE_TITLES = {"grad_norm_cv": "spread of G_i (CV across tasks)", "loss_ratio_cv": "spread of loss ratios (CV across tasks)"}


def balance_charts(balance: pd.DataFrame, *, log: bool = False, runs: Optional[Sequence[str]] = None, width: Width = "container") -> list[alt.LayerChart]:
    """Spread across tasks over time, one line per run (colour and dash = run): CV of the G_i and CV of
    the loss ratios."""
    balance = _drawable(balance)
    runs = [drawable(r) for r in runs] if runs is not None else sorted(balance["run_id"].unique(), key=natural_key) if len(balance) else []
    charts = []
    for column, title in BALANCE_TITLES.items():
        frame = balance.rename(columns={"step": "x"}).assign(value=balance[column])
        frame = frame.assign(value_raw=balance[f"{column}_raw"]) if f"{column}_raw" in balance.columns else frame.assign(value_raw=frame["value"])
        legend = _legend("run", len(runs), symbolType="stroke", symbolStrokeWidth=2, symbolSize=300)
        encoding = dict(
            x=_x("step", largest=_largest(frame)),
            y=_y("value", title, log),
            color=alt.Color("run_id:N", scale=run_colour_scale(runs), legend=legend),
            strokeDash=alt.StrokeDash("run_id:N", scale=run_dash_scale(runs), legend=legend),
        )
        tooltip = [alt.Tooltip("run_id:N", title="run"), alt.Tooltip("x:Q", title="step", format=",d"), alt.Tooltip("value_raw:Q", title=title, format=".4~g")]
        kept = ["run_id", "x", "value", "value_raw"]
        if f"{column}_low" in balance.columns:  # a group's band across its runs
            frame = frame.assign(band_low=balance[f"{column}_low"], band_high=balance[f"{column}_high"], runs=balance[f"{column}_runs"])
            kept += ["band_low", "band_high", "runs"]
            tooltip.append(alt.Tooltip("runs:Q", title="runs in group"))
        base = alt.Chart(frame[kept])
        band_encoding = encoding | {"color": alt.Color("run_id:N", scale=run_colour_scale(runs), legend=legend)}
        layers = [*_band(base, band_encoding, title, log), *_interactive(base, encoding, tooltip, f"balance_{column}")]
        charts.append(alt.layer(*layers).properties(title=title, width=width, height=legend_height(len(runs))))
    return charts


def delta_chart(per_task: pd.DataFrame, baseline: str, *, runs: Sequence[str], width: Width = "container") -> alt.LayerChart:
    """Per task, each run's relative change of the validation loss against the baseline, in percent
    (negative: better than the baseline)."""
    frame = _drawable(per_task[per_task["run_id"] != baseline].dropna(subset=["delta_pct"]))
    others = [drawable(r) for r in runs if r != baseline]
    bars = (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            x=alt.X("delta_pct:Q", title=f"change of the validation loss vs {drawable(baseline)} (%), lower is better", axis=alt.Axis(format=",.4~g")),
            y=alt.Y("task:N", sort=task_domain(frame["task"]) if len(frame) else None, title=None),
            yOffset=alt.YOffset("run_id:N", sort=others),
            color=alt.Color("run_id:N", scale=run_colour_scale(list(runs)), legend=_legend("run", len(others), values=others)),
            tooltip=[alt.Tooltip("run_id:N", title="run"), alt.Tooltip("task:N"), alt.Tooltip("delta_pct:Q", title="change (%)", format="+.2f")],
        )
    )
    zero = alt.Chart(pd.DataFrame({"zero": [0.0]})).mark_rule(color="gray").encode(x="zero:Q")
    rows = max(1, frame["task"].nunique() if len(frame) else 1)
    return alt.layer(bars, zero).properties(width=width, height=min(900, max(120, rows * max(1, len(others)) * 14 + 40)))


def steps_domain(frames: Sequence[pd.DataFrame], field: str = "step") -> Optional[tuple[float, float]]:
    """The smallest and largest finite ``field`` over ``frames``: one x domain for several runs' charts
    (None where there is no range to share)."""
    values = [pd.to_numeric(frame[field], errors="coerce") for frame in frames if field in frame.columns and len(frame)]
    if not values:
        return None
    joined = pd.concat(values, ignore_index=True)
    joined = joined[joined.notna() & (joined.abs() != float("inf"))]
    if joined.empty or not float(joined.max()) > float(joined.min()):
        return None
    return float(joined.min()), float(joined.max())


def with_x_domain(built: Sequence[Any], domain: Optional[Sequence[float]]) -> list[Any]:
    """Copies of ``built`` (charts, layered or not) with ``domain`` as the x scale's domain of every layer
    that encodes x, so that charts drawn one under the other share their steps axis (each is its own Vega
    view, in Streamlit and in the report, so their zooms cannot be bound together: the domain is what they
    share; a zoom still works in each). ``None``: the charts as they are."""
    if domain is None:
        return list(built)
    low, high = (float(v) for v in domain)

    def fix(chart: Any) -> None:
        if isinstance(chart, alt.LayerChart):
            for layer in chart.layer:
                fix(layer)
            return
        encoding = getattr(chart, "encoding", alt.Undefined)
        x = getattr(encoding, "x", alt.Undefined) if encoding is not alt.Undefined else alt.Undefined
        if x is alt.Undefined:
            return
        if isinstance(x, alt.X) and isinstance(x.scale, alt.Scale):
            x.scale.domain = [low, high]
        else:
            x.scale = alt.Scale(domain=[low, high], nice=False)

    found = []
    for chart in built:
        copied = chart.copy(deep=True)
        fix(copied)
        found.append(copied)
    return found


def group_delta_chart(per_task: pd.DataFrame, baseline: str, *, groups: Sequence[str], width: Width = "container") -> alt.LayerChart:
    """:func:`delta_chart` of groups (``analysis.grouped_comparison``'s ``per_task``: each group's mean
    change against the baseline group), its legend titled "group" and at least 24 px per bar, so that every
    task's label has room when there are only a few groups."""
    chart = delta_chart(per_task.rename(columns={"group": "run_id"}), baseline, runs=groups, width=width)
    colour = chart.layer[0].encoding.color
    legend = colour["legend"]  # (the attribute is Altair's setter; the item is the value)
    if isinstance(legend, alt.Legend):
        legend["title"] = "group"
    tasks = int(per_task["task"].nunique()) if len(per_task) else 1
    others = max(1, len([g for g in groups if g != baseline]))
    chart.height = min(900, max(int(chart.height), tasks * others * 24 + 50))
    return chart
