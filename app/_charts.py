"""Altair chart builders: plain functions from the analysis' DataFrames to charts.

They know nothing of Streamlit, so the app, ``gradnorm report`` and the tests share them. Colours are
fixed per task name (one scale over every task shown), so a task keeps its colour across runs and charts.
Each per-run panel is one chart of a horizontal concatenation, titled with the run id.

Task names are data and are drawn as text, whatever they hold, with one exception: Vega-Lite compiles an
explicit sort order into a Vega expression with the names as string literals, and Vega's expression
parser rejects the line and paragraph separators U+2028/U+2029 there (the chart would not draw at all),
so those two are drawn as their escapes ``\\u2028``/``\\u2029``.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence

import altair as alt
import pandas as pd

PANEL_WIDTH = 360
PANEL_HEIGHT = 240
X_TITLES = {"step": "step", "wall_time": "wall time (s)"}


_UNDRAWABLE = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029"})


def drawable(name: object) -> str:
    """``name`` as a chart may show it (see the module's docstring)."""
    return str(name).translate(_UNDRAWABLE)


def _drawable(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its task and run names made :func:`drawable`."""
    changes = {column: frame[column].map(drawable) for column in ("task", "run_id") if column in frame.columns and len(frame)}
    return frame.assign(**changes) if changes else frame


def _drawable_tasks(tasks: Optional[Sequence[str]]) -> Optional[list[str]]:
    return None if tasks is None else [drawable(t) for t in tasks]


def natural_key(name: str) -> list:
    """task2 before task10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(name))]


def task_scale(tasks: Sequence[str]) -> alt.Scale:
    domain = sorted(set(map(str, tasks)), key=natural_key)
    return alt.Scale(domain=domain, scheme="tableau20" if len(domain) > 10 else "tableau10")


def _y(field: str, title: str, log: bool, zero: bool = False) -> alt.Y:
    scale = alt.Scale(type="log") if log else alt.Scale(zero=zero)
    return alt.Y(f"{field}:Q", title=title, scale=scale)


#: Width of one row of panels, axes included: the main column of a wide page beside the sidebar in a
#: 1440-1500 px browser window, so that three runs side by side are not cut off.
ROW_WIDTH = 980
#: What a panel needs besides its plot: the y axis' labels and title, and the spacing to the next panel.
PANEL_CHROME = 75


def panel_width(panels: int) -> int:
    """The plot width of each of ``panels`` panels in one row."""
    return max(180, min(PANEL_WIDTH, ROW_WIDTH // max(panels, 1) - PANEL_CHROME))


def _tooltip(value_title: str) -> list:
    return [
        alt.Tooltip("run_id:N", title="run"),
        alt.Tooltip("task:N"),
        alt.Tooltip("x:Q", title="x", format=",.6g"),
        alt.Tooltip("value_raw:Q", title=value_title, format=".6g"),
        alt.Tooltip("value:Q", title=f"{value_title} (smoothed)", format=".6g"),
        alt.Tooltip("n:Q", title="points in bucket"),
    ]


def _with_raw(frame: pd.DataFrame) -> pd.DataFrame:
    if "value_raw" not in frame.columns:
        frame = frame.assign(value_raw=frame["value"])
    return frame


def line_layer(frame: pd.DataFrame, colour: alt.Scale, y_title: str, x: str, log: bool, dash: Optional[str] = None, zero: bool = False) -> alt.Chart:
    """Lines per task, a tooltip with the exact (unsmoothed) bucket mean."""
    encoding = dict(
        x=alt.X("x:Q", title=X_TITLES.get(x, x)),
        y=_y("value", y_title, log, zero),
        color=alt.Color("task:N", scale=colour, legend=alt.Legend(title="task")),
        tooltip=_tooltip(y_title),
    )
    if dash:
        encoding["strokeDash"] = alt.StrokeDash(f"{dash}:N", title=None)
        encoding["detail"] = alt.Detail(f"{dash}:N")
    return alt.Chart(_with_raw(frame)).mark_line(strokeWidth=1.6).encode(**encoding)


def band_layer(frame: pd.DataFrame, colour: alt.Scale, x: str, log: bool) -> alt.Chart:
    """The min/max band of each bucket (what downsampling averaged over)."""
    return (
        alt.Chart(frame)
        .mark_area(opacity=0.15)
        .encode(
            x=alt.X("x:Q", title=X_TITLES.get(x, x)),
            y=alt.Y("value_min:Q", scale=alt.Scale(type="log") if log else alt.Scale(zero=False)),
            y2="value_max:Q",
            color=alt.Color("task:N", scale=colour, legend=None),
        )
    )


def per_run(panels: Sequence[alt.Chart]) -> alt.HConcatChart:
    return alt.hconcat(*panels).resolve_scale(color="shared")


def metric_chart(
    series: pd.DataFrame, y_title: str, *, x: str = "step", log: bool = False, band: bool = True, tasks: Optional[Sequence[str]] = None
) -> alt.HConcatChart:
    """One panel per run: a metric per task over x, with its min/max band."""
    series, tasks = _drawable(series), _drawable_tasks(tasks)
    colour = task_scale(tasks if tasks is not None else series["task"].unique())
    panels = []
    for run_id, frame in _runs(series):
        layers = [band_layer(frame, colour, x, log)] if band else []
        layers.append(line_layer(frame, colour, y_title, x, log))
        panels.append(alt.layer(*layers).properties(title=run_id, width=panel_width(series["run_id"].nunique()), height=PANEL_HEIGHT))
    return per_run(panels)


def weights_chart(
    series: pd.DataFrame,
    averages: Mapping[str, pd.DataFrame],
    windows: Mapping[str, tuple[int, int]],
    *,
    x: str = "step",
    log: bool = False,
    tasks: Optional[Sequence[str]] = None,
) -> alt.HConcatChart:
    """w_i(t) per run with E_t[w_i] drawn as horizontal rules and the averaging window shaded
    (paper Figures 2 and 5). ``averages[run]`` has columns task, mean; ``windows[run]`` = (start, end)."""
    series, tasks = _drawable(series), _drawable_tasks(tasks)
    averages = {drawable(run_id): _drawable(table) for run_id, table in averages.items()}
    windows = {drawable(run_id): window for run_id, window in windows.items()}
    colour = task_scale(tasks if tasks is not None else series["task"].unique())
    panels = []
    for run_id, frame in _runs(series):
        layers = []
        if x == "step" and run_id in windows:
            start, end = windows[run_id]
            window = pd.DataFrame({"start": [start], "end": [end]})
            layers.append(
                alt.Chart(window)
                .mark_rect(opacity=0.08, color="gray")
                .encode(x="start:Q", x2="end:Q", tooltip=[alt.Tooltip("start:Q", title="window start"), alt.Tooltip("end:Q", title="window end")])
            )
        # From zero: weights are positive and sum to T, and equal weights must not zoom into rounding.
        layers.append(line_layer(frame, colour, "weight w_i(t)", x, log, zero=True))
        average = averages.get(run_id)
        if average is not None and len(average):
            rules = average[["task", "mean"]].rename(columns={"mean": "average"})
            layers.append(
                alt.Chart(rules)
                .mark_rule(strokeDash=[6, 3], strokeWidth=1.2)
                .encode(
                    y=alt.Y("average:Q"),
                    color=alt.Color("task:N", scale=colour, legend=None),
                    tooltip=[alt.Tooltip("task:N"), alt.Tooltip("average:Q", title="E_t[w_i]", format=".4f")],
                )
            )
        panels.append(alt.layer(*layers).properties(title=run_id, width=panel_width(series["run_id"].nunique()), height=PANEL_HEIGHT))
    return per_run(panels)


def grad_norm_chart(
    norms: pd.DataFrame, targets: pd.DataFrame, *, x: str = "step", log: bool = True, tasks: Optional[Sequence[str]] = None
) -> alt.HConcatChart:
    """G_i(t) (solid) against the GradNorm target mean_j G_j * r_i^alpha (dashed), per run."""
    frames = [norms.assign(kind="G_i")]
    if targets is not None and len(targets):
        frames.append(targets.assign(kind="target"))
    combined = _drawable(pd.concat(frames, ignore_index=True))
    tasks = _drawable_tasks(tasks)
    colour = task_scale(tasks if tasks is not None else combined["task"].unique())
    panels = [
        line_layer(frame, colour, "gradient norm at W", x, log, dash="kind").properties(
            title=run_id, width=panel_width(combined["run_id"].nunique()), height=PANEL_HEIGHT
        )
        for run_id, frame in _runs(combined)
    ]
    return per_run(panels)


def overfitting_chart(
    frame: pd.DataFrame, onsets: pd.DataFrame, *, run_id: str = "", log: bool = False, tasks: Optional[Sequence[str]] = None
) -> alt.VConcatChart:
    """Top: one small panel per task (own y scale: task losses differ by orders of magnitude) with the
    training (solid) and validation (dashed) loss and a rule where overfitting starts. Bottom: the
    relative gap (validation - training) / validation of every task on one axis."""
    frame, onsets, tasks, run_id = _drawable(frame), _drawable(onsets), _drawable_tasks(tasks), drawable(run_id)
    colour = task_scale(tasks if tasks is not None else frame["task"].unique())
    long = frame.melt(id_vars=["task", "step"], value_vars=["train_loss", "val_loss"], var_name="split", value_name="loss")
    long["split"] = long["split"].map({"train_loss": "train", "val_loss": "validation"})
    onset_by_task = {} if not len(onsets) else dict(zip(onsets["task"], onsets["onset_step"]))
    long["onset_step"] = long["task"].map(lambda t: None if pd.isna(onset_by_task.get(t, None)) else float(onset_by_task[t]))
    first = long.groupby("task")["step"].transform("min")
    long["marker_row"] = (long["step"] == first) & (long["split"] == "validation")
    lines = (
        alt.Chart()
        .mark_line(point=alt.OverlayMarkDef(size=10))
        .encode(
            x=alt.X("step:Q"),
            y=_y("loss", "loss", log),
            color=alt.Color("task:N", scale=colour),
            strokeDash=alt.StrokeDash("split:N", title=None),
            detail="split:N",
            tooltip=["task:N", "split:N", alt.Tooltip("step:Q"), alt.Tooltip("loss:Q", format=".6g")],
        )
    )
    rule = (
        alt.Chart()
        .transform_filter("datum.marker_row && isValid(datum.onset_step)")
        .mark_rule(strokeDash=[2, 2], color="black")
        .encode(x="onset_step:Q", tooltip=["task:N", alt.Tooltip("onset_step:Q", title="overfitting starts")])
    )
    panels = (
        alt.layer(lines, rule, data=long)
        .properties(width=170, height=120)
        .facet(facet=alt.Facet("task:N", sort=sorted(long["task"].unique(), key=natural_key), title=None), columns=5)
        .resolve_scale(y="independent")
        .properties(title=f"{run_id}: training vs validation loss per task")
    )
    relative = frame.assign(relative_gap=frame["gap"] / frame["val_loss"])
    gaps = (
        alt.Chart(relative)
        .mark_line(point=alt.OverlayMarkDef(size=12))
        .encode(
            x=alt.X("step:Q"),
            y=alt.Y("relative_gap:Q", title="(validation - training) / validation"),
            color=alt.Color("task:N", scale=colour),
            tooltip=["task:N", alt.Tooltip("step:Q"), alt.Tooltip("gap:Q", format=".6g"), alt.Tooltip("relative_gap:Q", format=".3%")],
        )
        .properties(title=f"{run_id}: generalisation gap, relative", width=2 * PANEL_WIDTH, height=PANEL_HEIGHT)
    )
    return alt.vconcat(panels, gaps).resolve_scale(color="shared")


def balance_chart(balance: pd.DataFrame, *, log: bool = False) -> alt.HConcatChart:
    """Spread across tasks over time, one line per run: CV of the G_i and CV of the loss ratios."""
    balance = _drawable(balance)
    panels = []
    for column, title in (("grad_norm_cv", "spread of G_i (CV across tasks)"), ("loss_ratio_cv", "spread of loss ratios (CV)")):
        panels.append(
            alt.Chart(balance)
            .mark_line()
            .encode(
                x=alt.X("step:Q"),
                y=_y(column, title, log),
                color=alt.Color("run_id:N", title="run"),
                tooltip=["run_id:N", alt.Tooltip("step:Q"), alt.Tooltip(f"{column}:Q", format=".4g")],
            )
            .properties(title=title, width=PANEL_WIDTH, height=PANEL_HEIGHT)
        )
    return alt.hconcat(*panels)


def _runs(series: pd.DataFrame):
    for run_id in sorted(series["run_id"].unique(), key=natural_key) if len(series) else []:
        yield run_id, series[series["run_id"] == run_id]
