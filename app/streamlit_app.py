"""The GradNorm runs app: balance and overfitting, live and after the fact, and the weights to take home.

    streamlit run app                      (from a checkout; Streamlit runs a folder's streamlit_app.py)
    streamlit run app -- --root runs/
    gradnorm app [--root runs/]            (the same file, from the installed package)

The runs root is resolved as everywhere else (``gradnorm.toolkit.analysis.resolve_runs_root``): ``--root``,
then ``$GRADNORM_RUNS_ROOT``, then ``./runs`` when it exists, then the bundled sample runs; the page says
which one it shows and why. Runs are read only through ``gradnorm.toolkit.analysis``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, TypeVar

import altair as alt
import pandas as pd
import streamlit as st

from gradnorm.app import _charts as charts
from gradnorm.app import _data as data
from gradnorm.app import _grouping as grouping
from gradnorm.app import _state as url
from gradnorm.app import _verdicts as verdicts
from gradnorm.app._smoothing import smooth_series
from gradnorm.toolkit import analysis
from gradnorm.toolkit.analysis import catalog

LIVE_REFRESH_SECONDS = 5.0
#: How often a finished or empty root is looked at for a new run (a directory listing, nothing read).
WATCH_SECONDS = 5.0
USER_ERRORS = (analysis.AnalysisError, analysis.RunError, FileNotFoundError, PermissionError, ValueError)
TYPED_IN_SIDEBAR = "typed in the sidebar"

T = TypeVar("T")


def _or(value: Optional[T], default: T) -> T:
    """A widget's value; Streamlit types single-choice widgets as optional although one with options and an
    index always holds one."""
    return default if value is None else value


def _text(text: str) -> str:
    """``text`` shown literally in Streamlit Markdown, where a pair of ``$`` would start LaTeX."""
    return text.replace("$", "\\$")


def _code(text: object) -> str:
    """A path or command as a Markdown code span (where ``$`` is literal already)."""
    return "`" + str(text).replace("`", "'") + "`"


VIEWS = ["Weights", "Compare runs", "Gradient norms & loss ratios", "Overfitting", "Balance", "Export weights"]
#: Which sidebar controls each view uses; the others are shown disabled there, with the reason.
USES = {
    "Weights": {"smoothing", "x", "log", "steps", "tasks", "points", "group"},
    "Compare runs": {"tasks", "group"},
    "Gradient norms & loss ratios": {"smoothing", "x", "log", "steps", "tasks", "points", "group"},
    "Overfitting": {"smoothing", "log", "steps", "tasks", "points"},
    "Balance": {"smoothing", "log", "steps", "points", "group"},
    "Export weights": set(),
}
#: Keeps the page at full opacity while Streamlit reruns it (live refreshes would dim it every 5 s).
NO_DIMMING = "<style>[data-stale='true']{opacity:1 !important;transition:none !important}</style>"


@dataclass
class Controls:
    smoothing: float
    x: str
    log: bool
    step_range: Optional[tuple[int, int]]
    tasks: Optional[tuple[str, ...]]
    max_points: int
    group: str = grouping.NONE
    band: str = "minmax"
    #: group name -> its runs (empty without grouping)
    members: dict[str, list[str]] = field(default_factory=dict)

    def grouped(self, view: str) -> bool:
        return self.group != grouping.NONE and "group" in USES.get(view, set()) and bool(self.members)

    def shown(self, selected: list[str], view: str) -> list[str]:
        """What the view draws as lines: the groups, or the runs themselves."""
        return list(self.members) if self.grouped(view) else selected


def root_from_arguments(argv: Sequence[str]) -> analysis.RunsRoot:
    """The root named after ``--`` (``streamlit run app -- --root runs/``), else the shared fallbacks."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--root", default=None)
    known, _ = parser.parse_known_args(list(argv))
    return analysis.resolve_runs_root(known.root)


def url_state() -> url.UrlState:
    """The state the page was opened with (read once per browser session, so widgets own it after)."""
    if "_url_state" not in st.session_state:
        st.session_state["_url_state"] = url.parse({key: st.query_params.get_all(key) for key in st.query_params.keys()})
    return st.session_state["_url_state"]


def choose_root(argv: Sequence[str], opened: url.UrlState) -> analysis.RunsRoot:
    """The resolved root, or another one typed in the sidebar (or given in the URL)."""
    resolved = root_from_arguments(argv)
    shown = str(resolved.path.absolute())
    typed = st.sidebar.text_input(
        "Runs root", value=opened.root or shown, key="root", help="A folder of run directories (each with run.json and metrics/)"
    ).strip()
    if typed and typed != shown:
        return analysis.RunsRoot(Path(typed).expanduser(), TYPED_IN_SIDEBAR)
    return analysis.RunsRoot(Path(shown), resolved.reason)


def show_root(root: analysis.RunsRoot) -> None:
    st.caption(f"Runs root: {_code(root.path)} — {_text(root.reason)}")


def watch_root(folder: str, known: tuple[str, ...]) -> None:
    """Rerun the page when a run directory appears under ``folder`` or one goes (a listing, every few
    seconds; nothing on the page is redrawn until then)."""

    @st.fragment(run_every=WATCH_SECONDS)
    def watcher() -> None:
        if data.root_entries(folder) != known:
            st.rerun(scope="app")

    watcher()


def live_tick() -> int:
    """The live refresh's period number: a listing with a running run is taken again once per period."""
    return int(time.time() // LIVE_REFRESH_SECONDS)


def run_table(root: analysis.RunsRoot) -> Optional[pd.DataFrame]:
    folder = str(root.path)
    if not root.path.is_dir():
        how = (
            "Type another folder in the sidebar."
            if root.reason == TYPED_IN_SIDEBAR
            else "Pass another with `--root`, set $GRADNORM_RUNS_ROOT, or type one in the sidebar."
        )
        st.error(f"Runs root {_code(folder)} does not exist or is not a folder ({_text(root.reason)}). {_text(how)}")
        return None
    try:
        listing = data.list_runs(folder, data.listing_signature(folder))
        if bool((listing["status"] == analysis.RUNNING).any()):  # as the live refresh does (see live())
            listing = data.list_runs(folder, data.listing_signature(folder) + (live_tick(),))
    except USER_ERRORS as exc:
        st.error(f"Cannot list the runs under {_code(folder)}: {_text(str(exc))}")
        return None
    if listing.empty:
        st.info(
            f"No runs under {_code(folder)} yet. Record one with `gradnorm.attach(..., runs_root=...)` or {_code(f'gradnorm demo --runs-root {folder}')}; "
            "it shows up here on its own."
        )
        watch_root(folder, data.root_entries(folder))
        return None
    return listing


def default_selection(listing: pd.DataFrame) -> list[str]:
    """The runs that share the tasks of the first GradNorm run (e.g. equal vs GradNorm vs retrained)."""
    usable = listing[listing["status"] != analysis.INVALID]
    if usable.empty:
        return []
    gradnorm = usable[usable["balancer"] == "gradnorm"]
    anchor = (gradnorm if len(gradnorm) else usable).iloc[0]
    same = usable[usable["tasks"].map(lambda t: list(t) == list(anchor["tasks"]))]
    chosen = list(same["run_id"])[: charts.RUNS_PER_CHART]
    if anchor["run_id"] not in chosen:  # never hide the GradNorm run itself
        chosen = [anchor["run_id"], *chosen[: charts.RUNS_PER_CHART - 1]]
    return chosen


@st.cache_data(show_spinner=False, max_entries=512)
def run_meta(root: str, run_id: str, signature: str) -> dict:
    """A run's run.json as the analysis reads it (``signature``: its files' digest, so an edit is seen)."""
    return dict(catalog.load_run_files(root, run_id).meta)


def group_controls(root: str, listing: pd.DataFrame, selected: list[str], opened: url.UrlState, view: str) -> tuple[str, str, dict[str, list[str]]]:
    """Group runs by a key (W&B's grouping): a selectbox of the keys, the band, and the groups."""
    metas = {r: run_meta(root, r, data.run_signature(Path(root) / r)) for r in selected}
    keys = [grouping.NONE, grouping.BALANCER, grouping.NAME, *(grouping.CONFIG_PREFIX + f for f in grouping.config_fields(metas))]
    wanted = opened.group if opened.group in keys else grouping.NONE
    sidebar = st.sidebar
    key = _or(
        sidebar.selectbox(
            "Group runs by",
            keys,
            index=keys.index(wanted),
            format_func=grouping.label,
            key="group",
            disabled=_unused(view, "group"),
            help=_why(view, "group", "One line per group: the mean across its runs, with a band (name: the run name without a seed suffix such as -s0)"),
        ),
        grouping.NONE,
    )
    band = _or(
        sidebar.radio(
            "Group band",
            list(grouping.BANDS),
            index=list(grouping.BANDS).index(opened.band) if opened.band in grouping.BANDS else 0,
            format_func=lambda b: grouping.BAND_TITLES[b],
            horizontal=True,
            key="band",
            disabled=_unused(view, "group") or key == grouping.NONE,
            help=_why(view, "group", "Across the group's runs, at each x"),
        ),
        "minmax",
    )
    if key == grouping.NONE:
        return key, band, {}
    balancers = dict(zip(listing["run_id"], listing["balancer"]))
    return key, band, grouping.groups(selected, key, balancers, metas)


def _unused(view: str, control: str) -> bool:
    return control not in USES.get(view, set())


def _why(view: str, control: str, help_text: str) -> str:
    return f"Not used by {view}." if _unused(view, control) else help_text


def sidebar_controls(root: str, listing: pd.DataFrame, opened: url.UrlState, view: str) -> tuple[list[str], Controls]:
    sidebar = st.sidebar
    options = list(listing["run_id"])
    wanted = [r for r in (opened.runs or []) if r in options]
    selected = sidebar.multiselect(
        "Runs", options, default=wanted or default_selection(listing), key="runs", help="Overlaid on shared axes: colour = task, dash = run"
    )
    smoothing = sidebar.slider(
        "Smoothing (TensorBoard EMA)",
        0.0,
        0.99,
        opened.smoothing if opened.smoothing is not None else 0.6,
        0.01,
        key="smoothing",
        disabled=_unused(view, "smoothing"),
        help=_why(view, "smoothing", "Debiased exponential moving average; tooltips show the raw value"),
    )
    x_options = ["step", "wall_time"]
    x = _or(
        sidebar.radio(
            "x axis",
            x_options,
            index=x_options.index(opened.x) if opened.x in x_options else 0,
            format_func=lambda v: charts.X_TITLES[v],
            horizontal=True,
            key="x",
            disabled=_unused(view, "x"),
            help=_why(view, "x", "Wall time: seconds since the run's first record"),
        ),
        "step",
    )
    log = sidebar.checkbox(
        "Log scale", value=bool(opened.log), key="log", disabled=_unused(view, "log"), help=_why(view, "log", "A log y axis on every chart of the view")
    )
    chosen = listing[listing["run_id"].isin(selected)]
    last = int(chosen["last_step"].dropna().max()) if len(chosen) and chosen["last_step"].notna().any() else 0
    step_range = None
    if last > 0:
        initial = opened.step_range if opened.step_range and opened.step_range[1] <= last else (0, last)
        low, high = sidebar.slider(
            "Step range", 0, last, initial, key=f"steps-{last}", disabled=_unused(view, "steps"), help=_why(view, "steps", "Steps drawn and queried")
        )
        step_range = None if (low, high) == (0, last) else (int(low), int(high))
    all_tasks = sorted({t for tasks in chosen["tasks"] for t in tasks}, key=charts.natural_key)
    wanted_tasks = [t for t in (opened.tasks or []) if t in all_tasks]
    tasks = sidebar.multiselect(
        "Tasks",
        all_tasks,
        default=wanted_tasks or all_tasks,
        key="tasks",
        disabled=_unused(view, "tasks"),
        help=_why(view, "tasks", "Tasks drawn and compared"),
    )
    point_options = [250, 500, 1000, 2000, 4000]
    max_points = sidebar.select_slider(
        "Points per series",
        point_options,
        value=opened.max_points if opened.max_points in point_options else 500,
        key="points",
        disabled=_unused(view, "points"),
        help=_why(view, "points", "Buckets along x; each keeps its mean, min/max and last value"),
    )
    task_filter = None if set(tasks) == set(all_tasks) else tuple(tasks)
    usable = [r for r in selected if r in set(listing[listing["status"] != analysis.INVALID]["run_id"])]
    group, band, members = group_controls(root, listing, usable, opened, view)
    return selected, Controls(smoothing, x, log, step_range, task_filter, max_points, group, band, members)


def show_problems(listing: pd.DataFrame, selected: list[str]) -> None:
    """What the figures leave out: damaged, mistyped or refused files, unusable run.json, lost rows."""
    rows = listing[listing["run_id"].isin(selected)]
    found = [problem for problems in rows["problems"] for problem in problems]
    invalid = rows[rows["status"] == analysis.INVALID]["run_id"].tolist()
    lossy = rows[rows["rows_lost"].fillna(0) > 0]
    for record in lossy.to_dict("records"):
        st.warning(
            f"Run {_text(str(record['run_id']))} lost {int(record['rows_lost'])} row(s) that its recorder could not write "
            f"({0 if pd.isna(record['write_errors']) else int(record['write_errors'])} failed write(s)): its charts and figures leave them out."
        )
    if found:
        with st.expander(f"{len(found)} problem(s): files left out as damaged, unreadable or refused, rows lost", expanded=bool(invalid) or len(lossy) > 0):
            for problem in found:
                st.text(problem)


def series(root: str, selected: list[str], metric: str, controls: Controls, signature: tuple, split: str = "train", grouped: bool = False) -> pd.DataFrame:
    """A metric per run and task, smoothed; with ``grouped``, per group: the mean of its runs' smoothed
    series and the band across them."""
    frame = data.metric_series(root, tuple(selected), metric, split, controls.tasks, controls.step_range, controls.max_points, controls.x, signature)
    frame = smooth_series(frame, controls.smoothing)
    if grouped:
        frame = grouping.with_band(grouping.group_series(frame, controls.members, points=controls.max_points), controls.band)
    return frame


def _int_or_none(value: object) -> Optional[int]:
    return None if value is None or pd.isna(value) else int(value)  # type: ignore[call-overload]


def headline(root: str, listing: pd.DataFrame, selected: list[str], signature: tuple, groups: Optional[dict[str, str]] = None) -> None:
    rows = []
    for run_id in selected:
        meta = listing[listing["run_id"] == run_id].iloc[0]
        figures: dict = {}
        row: dict[str, object] = {"run": run_id, "status": meta["status"], "balancer": meta["balancer"]}
        if groups:
            row["group"] = groups.get(run_id)
        try:
            figures = data.balance_summary(root, run_id, signature)
            average = data.weight_average(root, run_id, None, signature)
            drift = average["convergence"]
            state, change = verdicts.balance_state(figures.get("grad_norm_cv_start"), figures.get("grad_norm_cv_end"))
            converged = verdicts.converged(drift)
            row.update(
                {
                    "balance": state,
                    "G_i spread end": figures.get("grad_norm_cv_end"),
                    "G_i spread change (%)": None if change is None else 100.0 * change,
                    "E_t[w]": "unknown" if converged is None else "converged" if converged else "not converged",
                    "E_t[w] drift (%)": None if drift is None or pd.isna(drift) else 100.0 * float(drift),
                }
            )
        except USER_ERRORS as exc:
            row["note"] = str(exc)
        row.update(
            {
                "last step": _int_or_none(meta["last_step"]),
                "tasks": meta["num_tasks"],
                "rows lost": _int_or_none(meta["rows_lost"]) or 0,
                "write errors": _int_or_none(meta["write_errors"]) or 0,
                "skipped updates": _int_or_none(figures.get("skipped_updates")) or 0,
                "loss-ratio spread end": figures.get("loss_ratio_cv_end"),
            }
        )
        rows.append(row)
    st.dataframe(
        pd.DataFrame(rows),
        hide_index=True,
        width="stretch",
        column_config={
            "E_t[w] drift (%)": st.column_config.NumberColumn(format="%.1f%%", help="Largest relative change of E_t[w_i] between the window's halves"),
            "loss-ratio spread end": st.column_config.NumberColumn(format="%.3f", help="CV of the loss ratios across tasks at the end"),
            "G_i spread end": st.column_config.NumberColumn(format="%.3f", help="CV of the gradient norms across tasks at the end"),
            "G_i spread change (%)": st.column_config.NumberColumn(format="%+.0f%%", help="Relative change of the G_i spread from the start"),
            "last step": st.column_config.NumberColumn(format="%d"),
        },
    )
    st.caption(
        f"Balance: the spread (coefficient of variation across tasks, 0 = equal) of the gradient norms G_i at the end of the run; balanced at or below "
        f"{verdicts.BALANCED_CV}. E_t[w]: converged when the time-averaged weights drift by at most {verdicts.CONVERGED_DRIFT:.0%} between the two halves "
        "of the averaging window (paper 5.2)."
    )


def _chart(chart: alt.LayerChart) -> None:
    """A chart at the container's width; its title as Markdown above it (Vega's own title is cut at the
    top of a container-width chart in Streamlit)."""
    title = getattr(chart, "title", alt.Undefined)
    if isinstance(title, str) and title:
        chart = chart.copy()
        chart.title = alt.Undefined
        st.markdown(f"**{_text(title)}**")
    st.altair_chart(chart, width="stretch")


def weights_tab(root: str, selected: list[str], controls: Controls, signature: tuple, task_names: list[str]) -> None:
    grouped = controls.grouped("Weights")
    frame = series(root, selected, "balancer_weight", controls, signature, grouped=grouped)
    if frame.empty:
        frame = series(root, selected, "weight", controls, signature, grouped=grouped)
    averages, windows = {}, {}
    for run_id in [] if grouped else selected:  # (E_t[w_i] is a run's: not drawn for a group)
        try:
            average = data.weight_average(root, run_id, None, signature)
        except USER_ERRORS:
            continue
        table = average["table"]
        start, end = average["window"]
        if controls.step_range is not None:  # the segments stay inside the steps drawn
            start, end = max(start, controls.step_range[0]), min(end, controls.step_range[1])
            if start > end:
                continue
        averages[run_id] = table if controls.tasks is None else table[table["task"].isin(controls.tasks)]
        windows[run_id] = (start, end)
    for chart in charts.weights_charts(frame, averages, windows, x=controls.x, log=controls.log, tasks=task_names, runs=controls.shown(selected, "Weights")):
        _chart(chart)
    if grouped:
        group_caption(controls)
    elif controls.x == "step":
        st.caption(
            "Faint thick segments: E_t[w_i] over its averaging window (after the first 10% of steps). In shadow mode, what the balancer would have set. "
            "Drag or scroll to zoom the x axis, double-click to reset."
        )
    else:
        st.caption("On wall time the averaging windows (in steps) are not drawn; choose step for E_t[w_i]. Drag or scroll to zoom, double-click to reset.")


def group_caption(controls: Controls) -> None:
    parts = [f"{_text(name)} ({len(runs)} run{'s' if len(runs) != 1 else ''})" for name, runs in controls.members.items()]
    st.caption(
        f"Grouped by {_text(grouping.label(controls.group))}: each line is the mean across a group's runs at each x, the band their "
        f"{grouping.BAND_TITLES[controls.band]}; runs are put on one grid of {controls.max_points} buckets per group first. Groups: {'; '.join(parts)}. "
        "The E_t[w_i] segments are a run's and are not drawn for groups."
    )


def norms_tab(root: str, selected: list[str], controls: Controls, signature: tuple, task_names: list[str]) -> None:
    grouped = controls.grouped("Gradient norms & loss ratios")
    shown = controls.shown(selected, "Gradient norms & loss ratios")
    norms = series(root, selected, "grad_norm", controls, signature, grouped=grouped)
    targets = series(root, selected, "target_norm", controls, signature, grouped=grouped)
    each = "group" if grouped else "run"
    st.markdown(f"**Gradient norms G_i at the shared layer against GradNorm's target** (one chart per {each}, same y axis)")
    for chart in charts.grad_norm_charts(norms, targets, x=controls.x, log=controls.log, tasks=task_names, runs=shown):
        _chart(chart)
    if targets.empty:
        st.caption("No run here recorded a target norm (only GradNorm has one).")
    st.markdown("**Loss ratios L_i(t) / L_i(0)**")
    ratios = series(root, selected, "loss_ratio", controls, signature, grouped=grouped)
    for chart in charts.metric_charts(ratios, "loss ratio L_i/L_i(0)", x=controls.x, log=controls.log, tasks=task_names, runs=shown, name="ratio"):
        _chart(chart)
    st.markdown("**Inverse training rates r_i = L~_i / mean_j L~_j** (above 1: the task trains slower than the others)")
    rates = series(root, selected, "inverse_rate", controls, signature, grouped=grouped)
    for chart in charts.metric_charts(rates, "inverse training rate r_i", x=controls.x, log=controls.log, tasks=task_names, runs=shown, name="rate"):
        _chart(chart)
    if grouped:
        group_caption(controls)


def _smooth_overfitting(frame: pd.DataFrame, weight: float) -> pd.DataFrame:
    if weight == 0 or frame.empty:
        return frame
    out = frame.sort_values(["task", "step"]).copy()
    for column in ("train_loss", "val_loss"):
        out[column] = smooth_series(out.rename(columns={column: "value", "step": "x"})[["task", "x", "value"]], weight, by=("task",)).sort_index()["value"]
    out["gap"] = out["val_loss"] - out["train_loss"]
    return out


def overfitting_tab(root: str, selected: list[str], controls: Controls, signature: tuple, task_names: list[str]) -> None:
    chosen = st.multiselect(
        "Runs shown",
        selected,
        default=selected[:3],
        key="overfitting_runs",
        help="One losses chart per run on one y axis, then the relative gap of every run overlaid (dash = run)",
    )
    shown: dict[str, tuple[pd.DataFrame, pd.DataFrame]] = {}
    tables, without = [], []
    for run_id in chosen:
        frame, onsets = data.overfitting(root, run_id, controls.max_points, signature)
        if controls.tasks is not None:
            frame = frame[frame["task"].isin(controls.tasks)]
            onsets = onsets[onsets["task"].isin(controls.tasks)]
        if controls.step_range is not None and len(frame):
            frame = frame[frame["step"].between(*controls.step_range)]
        if frame.empty:
            without.append(run_id)
            continue
        shown[run_id] = (_smooth_overfitting(frame, controls.smoothing), onsets)
        tables.append(onsets.assign(run=run_id))
    if without:
        names = ", ".join(without)
        st.info(f"Run(s) {_text(names)} have no validation losses here. Log them with session.log_validation({{task: loss}}) to see the overfitting trend.")
    if not shown:
        if not chosen:
            st.info("Choose one or more runs above.")
        return
    # One steps axis for every chart (the runs' losses and the gaps), so that onsets line up down the page:
    # the step range asked for, else the steps of all the runs shown.
    domain = controls.step_range or charts.steps_domain([frame for frame, _ in shown.values()])
    for chart in charts.with_x_domain(charts.overfitting_runs_charts(shown, log=controls.log, tasks=task_names), domain):
        _chart(chart)
    onsets = pd.concat(tables, ignore_index=True)
    table = onsets[["run", *[c for c in onsets.columns if c != "run"]]].rename(
        columns={"gap_slope": "gap slope (loss/step)", "onset_step": "overfitting starts at step", "final_gap": "final gap"}
    )
    st.dataframe(table, hide_index=True)
    overfit = [f"{t} ({r})" if len(shown) > 1 else str(t) for r, t, s in zip(onsets["run"], onsets["task"], onsets["onset_step"]) if not pd.isna(s)]
    st.caption(
        (f"Overfitting: {_text(', '.join(overfit))}. " if overfit else "No task overfits by this rule. ")
        + "Onset (dotted rule in the task's colour): the validation minimum, when the validation loss ends more than 2% above it and the gap has "
        "widened since. Slope: per step, over the second half of the validation points. The onsets are taken over the whole run, unsmoothed. "
        "The x axis is steps here (validation points), one steps range for every chart so that onsets line up; drag or scroll zooms one chart."
    )


def balance_tab(root: str, selected: list[str], controls: Controls, signature: tuple) -> None:
    frame = data.balance(root, tuple(selected), controls.max_points, signature)
    if controls.step_range is not None and len(frame):
        frame = frame[frame["step"].between(*controls.step_range)]
    if frame.empty:
        st.info("No gradient norms recorded for these runs.")
        return
    frame = frame.copy()
    for column in charts.BALANCE_TITLES:
        smoothed = smooth_series(frame.rename(columns={"step": "x", column: "value"})[["run_id", "x", "value"]], controls.smoothing, by=("run_id",))
        frame[f"{column}_raw"] = frame[column]
        frame[column] = smoothed.sort_index()["value"]
    if controls.grouped("Balance"):
        frame = group_balance(frame, controls)
    for chart in charts.balance_charts(frame, log=controls.log, runs=controls.shown(selected, "Balance")):
        _chart(chart)
    if controls.grouped("Balance"):
        group_caption(controls)
    st.caption("Spread across all tasks of each run (the task filter does not apply: a spread needs every task). 0 = every task the same.")


def group_balance(frame: pd.DataFrame, controls: Controls) -> pd.DataFrame:
    """The spreads per group: for each spread, the mean across the group's runs and its band
    (``<spread>_low``/``_high``/``_runs``), as balance_charts draws them."""
    merged: Optional[pd.DataFrame] = None
    for column in charts.BALANCE_TITLES:
        long = frame.rename(columns={"step": "x", column: "value", f"{column}_raw": "value_raw"})[["run_id", "x", "value", "value_raw"]]
        grouped = grouping.with_band(grouping.group_series(long, controls.members, points=controls.max_points, by=()), controls.band)
        grouped = grouped.rename(
            columns={"value": column, "value_raw": f"{column}_raw", "band_low": f"{column}_low", "band_high": f"{column}_high", "runs": f"{column}_runs"}
        ).drop(columns=["std"])
        merged = grouped if merged is None else merged.merge(grouped, on=["run_id", "x"], how="outer")
    assert merged is not None
    return merged.rename(columns={"x": "step"}).sort_values(["run_id", "step"], kind="stable").reset_index(drop=True)


def _default_baseline(listing: pd.DataFrame, selected: list[str], wanted: Optional[str]) -> int:
    if wanted in selected:
        return selected.index(str(wanted))
    balancers = dict(zip(listing["run_id"], listing["balancer"]))
    for index, run_id in enumerate(selected):
        if balancers.get(run_id) == "equal":
            return index
    return 0


def _mark_lowest(table: pd.DataFrame) -> pd.DataFrame:
    """Styles for a task x run table: the lowest value of each row marked."""
    styles = pd.DataFrame("", index=table.index, columns=table.columns)
    lowest = table.min(axis=1)
    for column in table.columns:
        styles[column] = [
            "background-color: rgba(46, 160, 67, 0.28); font-weight: bold" if pd.notna(v) and v == low else "" for v, low in zip(table[column], lowest)
        ]
    return styles


def compare_tab(root: str, listing: pd.DataFrame, selected: list[str], controls: Controls, signature: tuple, opened: url.UrlState) -> None:
    if len(selected) < 2:
        st.info("Choose two or more runs in the sidebar to compare them (for example equal weights and GradNorm).")
    left, right = st.columns(2)
    grouped = controls.grouped("Compare runs")
    default = selected[_default_baseline(listing, selected, opened.baseline)]
    baseline_group = ""
    if grouped:  # the baseline becomes a group: by default the one of the default baseline run
        names = list(controls.members)
        home = next((name for name, runs in controls.members.items() if default in runs), names[0])
        wanted = opened.baseline if opened.baseline in names else home
        baseline_group = _or(
            left.selectbox(
                "Baseline group",
                names,
                index=names.index(wanted),
                key="baseline_group",
                help="Delta_m% is against this group's mean validation losses",
            ),
            home,
        )
        baseline = default  # (the per-run figures are taken against it, then regrouped)
    else:
        baseline = _or(
            left.selectbox("Baseline run", selected, index=selected.index(default), key="baseline", help="Delta_m% is against this run"),
            selected[0],
        )
    metric = _or(
        right.radio("Validation loss", ["final", "best"], horizontal=True, key="compare_metric", help="The last validation point, or the lowest"), "final"
    )
    per_task, per_run = data.comparison(root, tuple(selected), baseline, metric, signature)
    if controls.tasks is not None:
        per_task = per_task[per_task["task"].isin(controls.tasks)]
        per_run = _per_run_over(per_task, selected)
    if per_task.empty:
        st.info("None of these runs logged validation losses: nothing to compare. Log them with session.log_validation({task: loss}).")
        return
    if grouped:
        _compare_groups(per_task, baseline_group, metric, controls)
        return
    balancers = dict(zip(listing["run_id"], listing["balancer"]))
    summary = per_run.assign(balancer=per_run["run_id"].map(balancers))[["run_id", "balancer", "delta_m_pct", "task_normalised_loss", "tasks_compared"]]
    summary = summary.rename(
        columns={"run_id": "run", "delta_m_pct": f"Delta_m% vs {baseline}", "task_normalised_loss": "task-normalised loss", "tasks_compared": "tasks compared"}
    )
    best_delta = summary[f"Delta_m% vs {baseline}"].min()
    best_norm = summary["task-normalised loss"].min()

    def marks(row: pd.Series) -> list[str]:
        good = "background-color: rgba(46, 160, 67, 0.28); font-weight: bold"
        return [
            good if (name == f"Delta_m% vs {baseline}" and row[name] == best_delta) or (name == "task-normalised loss" and row[name] == best_norm) else ""
            for name in row.index
        ]

    st.markdown(f"**Did balancing help?** Each run against **{_text(baseline)}**, on the {metric} validation loss of each task")
    st.dataframe(
        summary.style.apply(marks, axis=1).format({f"Delta_m% vs {baseline}": "{:+.2f}", "task-normalised loss": "{:.4f}"}, na_rep="–"),
        hide_index=True,
        width="stretch",
    )
    winner = per_run.dropna(subset=["delta_m_pct"]).sort_values("delta_m_pct")
    if len(winner) and len(selected) > 1:
        st.markdown(_best_against(winner, "run_id", baseline, "run"))
    column = "final_val_loss" if metric == "final" else "best_val_loss"
    wide = per_task.pivot(index="task", columns="run_id", values=column).reindex(columns=[r for r in selected if r in set(per_task["run_id"])])
    wide = wide.reindex(sorted(wide.index, key=charts.natural_key))
    st.markdown(f"**{metric.capitalize()} validation loss per task** (lowest marked)")
    st.dataframe(wide.style.apply(_mark_lowest, axis=None).format("{:.5g}", na_rep="–"), width="stretch")
    if len(selected) > 1:
        _chart(charts.delta_chart(per_task, baseline, runs=selected))
    st.caption(
        "Delta_m% = (1/T) sum_i (M_run,i - M_baseline,i) / M_baseline,i x 100 over the tasks both runs validated (losses: lower is better, so negative "
        "beats the baseline). Task-normalised loss: sum over tasks of the final validation loss divided by the initial test loss (paper section 4; "
        "the run's recorded initial test losses, else its first validation loss)."
    )


def _best_against(ranked: pd.DataFrame, name_column: str, baseline: str, noun: str) -> str:
    """The verdict line under a comparison: the first of ``ranked`` (sorted by Delta_m%) if it beats ``baseline``."""
    top = ranked.iloc[0]
    if top[name_column] != baseline and top["delta_m_pct"] < 0:
        return f"Best: **{_text(str(top[name_column]))}**, {top['delta_m_pct']:+.2f}% against {_text(baseline)} over {int(top['tasks_compared'])} task(s)."
    return f"No {noun} beats **{_text(baseline)}** on average."


GOOD_CELL = "background-color: rgba(46, 160, 67, 0.28); font-weight: bold"


def _marked(best: pd.DataFrame) -> pd.DataFrame:
    """Styles from a boolean frame of the better cells."""
    return best.apply(lambda column: [GOOD_CELL if flag else "" for flag in column])


def _compare_groups(per_task: pd.DataFrame, baseline: str, metric: str, controls: Controls) -> None:
    """The comparison per group (seeds of one configuration together) against the ``baseline`` group: the
    figures are the library's (``analysis.grouped_comparison``), the page only draws them."""
    names = list(controls.members)
    result = analysis.grouped_comparison(per_task, controls.members, baseline=baseline, metric=metric)
    band = controls.band
    summary, summary_best, table, table_best = grouping.comparison_tables(result, band)
    spread = {"std": "mean ± std (population) across the group's runs", "minmax": "mean [min, max] across the group's runs", "none": "mean"}[band]
    st.markdown(
        f"**Did balancing help?** Each group against **{_text(baseline)}**, on the {metric} validation loss of each task "
        f"(grouped by {_text(grouping.label(controls.group))}; each cell: {spread}, n = runs)"
    )
    st.dataframe(summary.style.apply(lambda _: _marked(summary_best), axis=None), hide_index=True, width="stretch")
    winner = result.per_group.dropna(subset=["delta_m_pct"]).sort_values("delta_m_pct")
    if len(winner) > 1:
        st.markdown(_best_against(winner, "group", baseline, "group"))
    st.markdown(f"**{metric.capitalize()} validation loss per task and group** (lowest mean marked)")
    st.dataframe(table.style.apply(lambda _: _marked(table_best), axis=None), width="stretch")
    for note in result.notes:
        st.info(_text(note))
    if len(names) > 1:
        _chart(charts.group_delta_chart(result.per_task, baseline, groups=names))
    st.caption(
        "Delta_m% of a group = (1/T) sum_i (mean_group,i - mean_baseline,i) / mean_baseline,i x 100 over the tasks both groups validated; its spread is "
        "across the group's runs, each against the baseline group's means. Task-normalised loss: each run's sum over tasks of the final validation "
        "loss over the initial test loss (paper section 4), then across the group's runs that validated every task. The bars: each group's mean against "
        "the baseline group's."
    )


def _per_run_over(per_task: pd.DataFrame, selected: list[str]) -> pd.DataFrame:
    rows = []
    for run_id in selected:
        mine = per_task[per_task["run_id"] == run_id]
        deltas = mine["delta_pct"].dropna()
        rows.append(
            {
                "run_id": run_id,
                "delta_m_pct": float(deltas.mean()) if len(deltas) else float("nan"),
                "task_normalised_loss": float(mine["normalised_final"].sum()) if len(mine) else float("nan"),
                "tasks_compared": len(deltas),
                "tasks_with_validation": len(mine),
            }
        )
    return pd.DataFrame(rows)


def export_tab(root: str, selected: list[str], signature: tuple) -> None:
    run_id = _or(st.selectbox("Run to export", selected, index=_first_gradnorm(selected), key="export_run"), selected[0])
    average = data.weight_average(root, run_id, None, signature)
    start, end = average["window"]
    low, high = st.slider("Averaging window (steps)", start if start == end else 0, end, (start, end), key="export_window")
    document = data.export_document(root, run_id, (int(low), int(high)), signature)
    drift = document["convergence"]
    st.markdown(
        f"E_t[w_i] of **{run_id}** ({document['method']}) over steps **{document['window'][0]}-{document['window'][1]}**; "
        f"drift between the window's halves: **{(drift or 0):.2%}**."
    )
    state = verdicts.converged(drift)
    if state is False:
        st.warning(
            f"These weights have not converged: E_t[w_i] drifts by {drift:.1%} between the window's halves (more than {verdicts.CONVERGED_DRIFT:.0%}). "
            "Retraining with them may not reproduce the run; average over a later window or train longer."
        )
    elif state is None:
        st.warning("The drift of these weights is unknown (too few steps in the window): check them before retraining.")
    st.dataframe(pd.DataFrame({"task": list(document["weights"]), "weight": list(document["weights"].values())}), hide_index=True)
    st.download_button("Download weights JSON", json.dumps(document, indent=2, sort_keys=True), file_name=f"{run_id}-weights.json", mime="application/json")
    st.code(
        f"gradnorm export {run_id} --window {document['window'][0]} {document['window'][1]}\ngradnorm.StaticWeights.from_file('{run_id}-weights.json')",
        language="python",
    )


def _first_gradnorm(selected: list[str]) -> int:
    for index, run_id in enumerate(selected):
        if "gradnorm" in run_id:
            return index
    return 0


def render(root: str, listing: pd.DataFrame, selected: list[str], controls: Controls, opened: url.UrlState, view: str) -> None:
    signature = data.runs_signature(root, selected)
    task_names = sorted({t for tasks in listing[listing["run_id"].isin(selected)]["tasks"] for t in tasks}, key=charts.natural_key)
    # The headline's table sits above the view but is filled after it: Streamlit sends each element as the
    # script reaches it, so the view's first chart is drawn before the balance figures of every run are queried.
    headline_slot = st.container()
    sections = {
        "Weights": lambda: weights_tab(root, selected, controls, signature, task_names),
        "Compare runs": lambda: compare_tab(root, listing, selected, controls, signature, opened),
        "Gradient norms & loss ratios": lambda: norms_tab(root, selected, controls, signature, task_names),
        "Overfitting": lambda: overfitting_tab(root, selected, controls, signature, task_names),
        "Balance": lambda: balance_tab(root, selected, controls, signature),
        "Export weights": lambda: export_tab(root, selected, signature),
    }
    # One view at a time: only what is on screen is queried (tabs would run every view on each rerun).
    chosen = _or(st.radio("View", VIEWS, index=VIEWS.index(view), horizontal=True, key="view", label_visibility="collapsed"), view)
    if chosen != view:  # (inside a live refresh: the sidebar's disabled controls follow the view)
        st.rerun(scope="app")
    try:
        sections[chosen]()
    except USER_ERRORS as exc:
        st.warning(str(exc))
    except Exception as exc:  # a page, never a traceback; the tests fail on any st.error they did not expect
        st.error(f"The {chosen} view could not be drawn: {type(exc).__name__}: {_text(str(exc))}")
    with headline_slot:
        headline(root, listing, selected, signature, {r: name for name, runs in controls.members.items() for r in runs})


def current_view(opened: url.UrlState) -> str:
    view = st.session_state.get("view") or opened.view
    return view if view in VIEWS else VIEWS[0]


def write_url(root: str, selected: list[str], view: str, controls: Controls) -> None:
    params = url.encode(
        root=root,
        runs=selected,
        view=view,
        smoothing=controls.smoothing,
        x=controls.x,
        log=controls.log,
        step_range=controls.step_range,
        tasks=controls.tasks,
        max_points=controls.max_points,
        baseline=st.session_state.get("baseline"),
        group=controls.group,
        band=controls.band,
    )
    current = {key: st.query_params.get_all(key) for key in st.query_params.keys()}
    wanted = {key: value if isinstance(value, list) else [value] for key, value in params.items()}
    if current != wanted:
        st.query_params.from_dict(params)


def main(argv: Sequence[str]) -> None:
    st.set_page_config(page_title="GradNorm runs", layout="wide")
    data.sum_long_runs_in_background()
    # The page is one read: the per-file sums of a long run are computed in the background after it is drawn.
    with analysis.reading():
        page(argv)


def page(argv: Sequence[str]) -> None:
    st.html(NO_DIMMING)
    opened = url_state()
    st.title("GradNorm runs")
    chosen = choose_root(argv, opened)
    show_root(chosen)
    listing = run_table(chosen)
    if listing is None:
        return
    root = str(chosen.path)
    view = current_view(opened)
    selected, controls = sidebar_controls(root, listing, opened, view)
    write_url(str(st.session_state.get("root") or root), selected, view, controls)
    if not selected:
        st.info("Choose one or more runs in the sidebar.")
        watch_root(root, data.root_entries(root))
        return
    show_problems(listing, selected)
    invalid = set(listing[listing["status"] == analysis.INVALID]["run_id"])
    usable = [r for r in selected if r not in invalid]
    for run_id in sorted(set(selected) & invalid):
        st.error(f"Run {run_id} cannot be read: {'; '.join(listing[listing['run_id'] == run_id]['problems'].iloc[0])}")
    if not usable:
        return
    known = data.root_entries(root)
    if bool((listing[listing["run_id"].isin(usable)]["status"] == analysis.RUNNING).any()):
        live(root, listing, usable, controls, opened, view, known)
    else:
        render(root, listing, usable, controls, opened, view)
        watch_root(root, known)


def live(root: str, listing: pd.DataFrame, usable: list[str], controls: Controls, opened: url.UrlState, view: str, known: tuple[str, ...]) -> None:
    """Every LIVE_REFRESH_SECONDS: the listing again (status, last step, lost rows), then the headline
    and the view, all in one fragment, so they refresh together. When the runs shown have all ended, or a
    run appeared in the root, the whole page reruns once (the sidebar's ranges and runs follow); a page
    whose runs have ended polls no more."""

    @st.fragment(run_every=LIVE_REFRESH_SECONDS)
    def refresh() -> None:
        # Listed again each tick, not only when files change: a writer that died stops beating and its run
        # turns "interrupted" with no file changed (the heartbeat's age is time, not files).
        fresh = data.list_runs(root, data.listing_signature(root) + (live_tick(),))
        still = bool((fresh[fresh["run_id"].isin(usable)]["status"] == analysis.RUNNING).any())
        if not still or data.root_entries(root) != known:
            st.rerun(scope="app")
        st.caption(f"A run is still being written: refreshing every {LIVE_REFRESH_SECONDS:.0f} s.")
        with analysis.reading():
            render(root, fresh, usable, controls, opened, view)

    refresh()


# Streamlit runs this file as a script, with the arguments after `--` in sys.argv[1:].
main(sys.argv[1:])
