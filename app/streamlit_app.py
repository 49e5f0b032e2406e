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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, TypeVar

import pandas as pd
import streamlit as st

from gradnorm.app import _charts as charts
from gradnorm.app import _data as data
from gradnorm.app._smoothing import smooth_series
from gradnorm.toolkit import analysis

LIVE_REFRESH_SECONDS = 5.0
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


@dataclass
class Controls:
    smoothing: float
    x: str
    log: bool
    step_range: Optional[tuple[int, int]]
    tasks: Optional[tuple[str, ...]]
    max_points: int


def root_from_arguments(argv: Sequence[str]) -> analysis.RunsRoot:
    """The root named after ``--`` (``streamlit run app -- --root runs/``), else the shared fallbacks."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--root", default=None)
    known, _ = parser.parse_known_args(list(argv))
    return analysis.resolve_runs_root(known.root)


def choose_root(argv: Sequence[str]) -> analysis.RunsRoot:
    """The resolved root, or another one typed in the sidebar."""
    resolved = root_from_arguments(argv)
    shown = str(resolved.path.absolute())
    typed = st.sidebar.text_input("Runs root", value=shown, help="A folder of run directories (each with run.json and metrics/)").strip()
    if typed and typed != shown:
        return analysis.RunsRoot(Path(typed).expanduser(), TYPED_IN_SIDEBAR)
    return analysis.RunsRoot(Path(shown), resolved.reason)


def show_root(root: analysis.RunsRoot) -> None:
    st.caption(f"Runs root: {_code(root.path)} — {_text(root.reason)}")


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
    except USER_ERRORS as exc:
        st.error(f"Cannot list the runs under {_code(folder)}: {_text(str(exc))}")
        return None
    if listing.empty:
        st.info(f"No runs under {_code(folder)} yet. Record one with `gradnorm.attach(..., runs_root=...)` or {_code(f'gradnorm demo --runs-root {folder}')}.")
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
    return list(same["run_id"])[:4]


def sidebar_controls(listing: pd.DataFrame) -> tuple[list[str], Controls]:
    sidebar = st.sidebar
    options = list(listing["run_id"])
    selected = sidebar.multiselect("Runs", options, default=default_selection(listing), help="Shown side by side")
    smoothing = sidebar.slider("Smoothing (TensorBoard EMA)", 0.0, 0.99, 0.6, 0.01)
    x = _or(sidebar.radio("x axis", ["step", "wall_time"], format_func=lambda v: charts.X_TITLES[v], horizontal=True), "step")
    log = sidebar.checkbox("Log scale", value=False)
    chosen = listing[listing["run_id"].isin(selected)]
    last = int(chosen["last_step"].dropna().max()) if len(chosen) and chosen["last_step"].notna().any() else 0
    step_range = None
    if last > 0:
        low, high = sidebar.slider("Step range", 0, last, (0, last))
        step_range = None if (low, high) == (0, last) else (int(low), int(high))
    all_tasks = sorted({t for tasks in chosen["tasks"] for t in tasks}, key=charts.natural_key)
    tasks = sidebar.multiselect("Tasks", all_tasks, default=all_tasks)
    max_points = sidebar.select_slider("Points per series", [250, 500, 1000, 2000, 4000], value=1000)
    task_filter = None if set(tasks) == set(all_tasks) else tuple(tasks)
    return selected, Controls(smoothing, x, log, step_range, task_filter, max_points)


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


def series(root: str, selected: list[str], metric: str, controls: Controls, signature: tuple, split: str = "train") -> pd.DataFrame:
    frame = data.metric_series(root, tuple(selected), metric, split, controls.tasks, controls.step_range, controls.max_points, controls.x, signature)
    return smooth_series(frame, controls.smoothing)


def headline(root: str, listing: pd.DataFrame, selected: list[str], signature: tuple) -> None:
    rows = []
    for run_id in selected:
        meta = listing[listing["run_id"] == run_id].iloc[0]
        row = {
            "run": run_id,
            "status": meta["status"],
            "balancer": meta["balancer"],
            "tasks": meta["num_tasks"],
            "last step": meta["last_step"],
            "rows lost": meta["rows_lost"],
            "write errors": meta["write_errors"],
        }
        try:
            figures = data.balance_summary(root, run_id, signature)
            average = data.weight_average(root, run_id, None, signature)
            row.update(
                {
                    "G_i spread start": figures.get("grad_norm_cv_start"),
                    "G_i spread end": figures.get("grad_norm_cv_end"),
                    "loss-ratio spread end": figures.get("loss_ratio_cv_end"),
                    "E_t[w] drift": average["convergence"],
                    "skipped updates": figures.get("skipped_updates"),
                }
            )
        except USER_ERRORS as exc:
            row["note"] = str(exc)
        rows.append(row)
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    st.caption(
        "Spread: coefficient of variation across tasks (0 = perfectly balanced). E_t[w] drift: largest relative change between the two halves of the averaging window."
    )


def weights_tab(root: str, selected: list[str], controls: Controls, signature: tuple, task_names: list[str]) -> None:
    frame = series(root, selected, "balancer_weight", controls, signature)
    if frame.empty:
        frame = series(root, selected, "weight", controls, signature)
    averages, windows = {}, {}
    for run_id in selected:
        try:
            average = data.weight_average(root, run_id, None, signature)
        except USER_ERRORS:
            continue
        table = average["table"]
        averages[run_id] = table if controls.tasks is None else table[table["task"].isin(controls.tasks)]
        windows[run_id] = average["window"]
    st.altair_chart(charts.weights_chart(frame, averages, windows, x=controls.x, log=controls.log, tasks=task_names), width="content")
    st.caption("Dashed rules: E_t[w_i] over the shaded window (after the first 10% of steps). In shadow mode, what the balancer would have set.")


def norms_tab(root: str, selected: list[str], controls: Controls, signature: tuple, task_names: list[str]) -> None:
    norms = series(root, selected, "grad_norm", controls, signature)
    targets = series(root, selected, "target_norm", controls, signature)
    st.altair_chart(charts.grad_norm_chart(norms, targets, x=controls.x, log=controls.log, tasks=task_names), width="content")
    ratios = series(root, selected, "loss_ratio", controls, signature)
    st.altair_chart(charts.metric_chart(ratios, "loss ratio L_i/L_i(0)", x=controls.x, log=controls.log, tasks=task_names), width="content")
    rates = series(root, selected, "inverse_rate", controls, signature)
    st.altair_chart(charts.metric_chart(rates, "inverse training rate r_i", x=controls.x, log=controls.log, tasks=task_names), width="content")


def overfitting_tab(root: str, selected: list[str], controls: Controls, signature: tuple, task_names: list[str]) -> None:
    run_id = _or(st.selectbox("Run", selected, key="overfitting_run"), selected[0])
    frame, onsets = data.overfitting(root, run_id, controls.max_points, signature)
    if controls.tasks is not None:
        frame = frame[frame["task"].isin(controls.tasks)]
        onsets = onsets[onsets["task"].isin(controls.tasks)]
    if frame.empty:
        st.info(f"Run {run_id} has no validation losses. Log them with session.log_validation({{task: loss}}) to see the overfitting trend.")
        return
    st.altair_chart(charts.overfitting_chart(frame, onsets, run_id=run_id, log=controls.log, tasks=task_names), width="content")
    st.dataframe(onsets, hide_index=True)
    st.caption(
        "Onset: the validation minimum, when the validation loss ends more than 2% above it and the gap has widened since. Slope: per step, over the second half of the validation points."
    )


def balance_tab(root: str, selected: list[str], controls: Controls, signature: tuple) -> None:
    frame = data.balance(root, tuple(selected), controls.max_points, signature)
    if frame.empty:
        st.info("No gradient norms recorded for these runs.")
        return
    st.altair_chart(charts.balance_chart(frame, log=controls.log), width="content")


def export_tab(root: str, selected: list[str], signature: tuple) -> None:
    run_id = _or(st.selectbox("Run to export", selected, index=_first_gradnorm(selected), key="export_run"), selected[0])
    average = data.weight_average(root, run_id, None, signature)
    start, end = average["window"]
    low, high = st.slider("Averaging window (steps)", start if start == end else 0, end, (start, end), key="export_window")
    document = data.export_document(root, run_id, (int(low), int(high)), signature)
    st.markdown(
        f"E_t[w_i] of **{run_id}** ({document['method']}) over steps **{document['window'][0]}-{document['window'][1]}**; "
        f"drift between the window's halves: **{(document['convergence'] or 0):.2%}**."
    )
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


def render(root: str, listing: pd.DataFrame, selected: list[str], controls: Controls) -> None:
    signature = data.runs_signature(root, selected)
    task_names = sorted({t for tasks in listing[listing["run_id"].isin(selected)]["tasks"] for t in tasks}, key=charts.natural_key)
    headline(root, listing, selected, signature)
    sections = {
        "Weights": lambda: weights_tab(root, selected, controls, signature, task_names),
        "Gradient norms & loss ratios": lambda: norms_tab(root, selected, controls, signature, task_names),
        "Overfitting": lambda: overfitting_tab(root, selected, controls, signature, task_names),
        "Balance": lambda: balance_tab(root, selected, controls, signature),
        "Export weights": lambda: export_tab(root, selected, signature),
    }
    # One view at a time: only what is on screen is queried (tabs would run every view on each rerun).
    views = list(sections)
    view = _or(st.radio("View", views, horizontal=True, key="view", label_visibility="collapsed"), views[0])
    try:
        sections[view]()
    except USER_ERRORS as exc:
        st.warning(str(exc))


def main(argv: Sequence[str]) -> None:
    st.set_page_config(page_title="GradNorm runs", layout="wide")
    st.title("GradNorm runs")
    chosen = choose_root(argv)
    show_root(chosen)
    listing = run_table(chosen)
    if listing is None:
        return
    root = str(chosen.path)
    selected, controls = sidebar_controls(listing)
    if not selected:
        st.info("Choose one or more runs in the sidebar.")
        return
    show_problems(listing, selected)
    invalid = set(listing[listing["status"] == analysis.INVALID]["run_id"])
    usable = [r for r in selected if r not in invalid]
    for run_id in sorted(set(selected) & invalid):
        st.error(f"Run {run_id} cannot be read: {'; '.join(listing[listing['run_id'] == run_id]['problems'].iloc[0])}")
    if not usable:
        return
    live = bool((listing[listing["run_id"].isin(usable)]["status"] == analysis.RUNNING).any())
    if live:
        st.caption(f"A run is still being written: refreshing every {LIVE_REFRESH_SECONDS:.0f} s.")
        st.fragment(run_every=LIVE_REFRESH_SECONDS)(render)(root, listing, usable, controls)
    else:
        render(root, listing, usable, controls)


# Streamlit runs this file as a script, with the arguments after `--` in sys.argv[1:].
main(sys.argv[1:])
