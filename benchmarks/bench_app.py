"""The app's first view of a 1,000,000-step run the real Recorder wrote: time for Streamlit's AppTest to run
the page once.

Layouts (see ``bench_analysis.py``): ``live``, default settings, a child process still appending while the
page runs (background compaction); ``closed``, default settings, packed at close; with ``--raw`` also
``compact=False`` (one part file per flush, 10,000 files). The run is the only one under its root; the first
run of the page is cold (nothing cached), the second shows the cache keyed by the files on disk. Also
reports the largest number of points any chart sends to the browser. Target: under 3 s, while a writer is
still appending. Usage: ``python benchmarks/bench_app.py [--steps 1000000] [--raw] [--markdown FILE]``

``--browser``: the time a person waits, in Chromium (playwright, /usr/bin/chromium): from navigation to the
first chart's canvas drawn, on a ``streamlit run app`` server bound to 127.0.0.1. "cold" is the first page of
a fresh server (nothing cached, the script's imports included), "warm" a new page on the same server; each
is repeated ``--repeats`` times, interleaved between the layouts, on the bundled sample runs and on the
1,000,000-step runs (closed, and live with a writer appending). Targets: < 2 s on the bundled runs, < 3 s
on a 1 M-step run. The load average is printed with each figure: on a shared machine, read the spread.

The floor (``--floor``, on by default): the same harness on a minimal ``streamlit run`` app, a title and one
Altair line chart of 50 points, served and opened in the same rounds, interleaved with ours, so a figure
reads against what Streamlit itself takes on this machine at this load. Times are taken in the page, from
the navigation's start (``performance.now()``): the title and the chart's element as they appear (a
MutationObserver), and "settled", the end of the last long task (over 50 ms) once the chart is there,
that is when Vega has drawn it and the page answers input again.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_analysis import LiveWriter, live_files, machine, record_in_process  # noqa: E402
from machine_info import publish  # noqa: E402

from gradnorm.toolkit.recorder import COMPACT_ABOVE_FILES

APP = Path(__file__).resolve().parent.parent / "app" / "streamlit_app.py"


def first_view(root: Path) -> tuple[float, float, int, int]:
    from streamlit.testing.v1 import AppTest

    os.environ["GRADNORM_RUNS_ROOT"] = str(root)
    started = time.perf_counter()
    at = AppTest.from_file(str(APP), default_timeout=300).run()
    cold = time.perf_counter() - started
    if at.exception:
        raise RuntimeError([e.value for e in at.exception])
    started = time.perf_counter()
    at.run()
    warm = time.perf_counter() - started
    points = [sum(len(ds.data.data) > 0 and _rows(ds) for ds in chart.proto.datasets) for chart in at.get("vega_lite_chart")]
    return cold, warm, max(points, default=0), len(points)


def _rows(dataset) -> int:
    from streamlit import dataframe_util

    return len(dataframe_util.convert_arrow_bytes_to_pandas_df(dataset.data.data))


CHROMIUM = "/usr/bin/chromium"
CHART = "[data-testid='stVegaLiteChart'] canvas, [data-testid='stVegaLiteChart'] svg"  # (SVG for small data)


#: The floor: what Streamlit takes to show a title and one small Altair chart.
FLOOR_APP = """import altair as alt
import pandas as pd
import streamlit as st

st.set_page_config(page_title="floor", layout="wide")
st.title("Floor")
frame = pd.DataFrame({"x": range(50), "y": [i * i for i in range(50)]})
st.altair_chart(alt.Chart(frame).mark_line().encode(x="x:Q", y="y:Q"), width="stretch")
"""
#: Injected before the page's own scripts: when the title and the chart appear, and the long tasks.
TIMING_JS = """
window.__lt = []; window.__chart = null; window.__title = null;
try { new PerformanceObserver(l => { for (const e of l.getEntries()) window.__lt.push(e.startTime + e.duration); })
        .observe({type: 'longtask', buffered: true}); } catch (e) {}
new MutationObserver(() => {
  if (window.__title === null && document.querySelector('h1')) window.__title = performance.now();
  if (window.__chart === null && document.querySelector("%s")) window.__chart = performance.now();
}).observe(document, {subtree: true, childList: true});
"""
SETTLED_JS = "() => performance.now() - Math.max(window.__chart || 0, ...window.__lt) > 1000"


def _serve(root: Path, port: int, app: Optional[Path] = None):
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "GRADNORM_RUNS_ROOT": str(root),
        "STREAMLIT_SERVER_HEADLESS": "true",
        "STREAMLIT_SERVER_ADDRESS": "127.0.0.1",
        "STREAMLIT_SERVER_PORT": str(port),
        "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
    }
    streamlit = Path(sys.executable).with_name("streamlit")
    target, cwd = ("app", APP.parent.parent) if app is None else (app.name, app.parent)
    return subprocess.Popen([str(streamlit), "run", target], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _wait_healthy(port: int, timeout: float = 120.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"the app did not answer on port {port}")


def _first_chart(browser, port: int) -> tuple[float, float, float]:
    """(title, first chart's element, first chart settled) in seconds from the navigation's start."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        page.add_init_script(TIMING_JS % CHART.replace('"', '\\"'))
        page.goto(f"http://127.0.0.1:{port}", wait_until="commit")
        page.wait_for_selector(CHART, timeout=180_000)
        page.wait_for_function(SETTLED_JS, timeout=180_000, polling=100)
        title, chart, tasks = page.evaluate("() => [window.__title, window.__chart, window.__lt]")
        settled = max([chart, *[end for end in tasks if end > chart]])
        return title / 1000, chart / 1000, settled / 1000
    finally:
        page.close()


def browser_first_views(roots: dict[str, Path], repeats: int, apps: Optional[dict[str, Path]] = None) -> dict[str, dict[str, list[tuple[float, ...]]]]:
    """Per layout: cold and warm (title s, first chart s, settled s, load average) over ``repeats``
    interleaved rounds; ``apps[label]`` serves another app file on that root (the floor)."""
    import signal
    import socket

    from playwright.sync_api import sync_playwright

    found: dict[str, dict[str, list[tuple[float, ...]]]] = {label: {"cold": [], "warm": []} for label in roots}
    with sync_playwright() as play:
        browser = play.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            for _ in range(repeats):
                for label, root in roots.items():
                    with socket.socket() as probe:
                        probe.bind(("127.0.0.1", 0))
                        port = int(probe.getsockname()[1])
                    server = _serve(root, port, (apps or {}).get(label))
                    try:
                        _wait_healthy(port)
                        for kind in ("cold", "warm"):
                            found[label][kind].append((*_first_chart(browser, port), os.getloadavg()[0]))
                    finally:
                        os.killpg(server.pid, signal.SIGTERM)
                        server.wait(timeout=30)
        finally:
            browser.close()
    return found


def browser_main(args: argparse.Namespace) -> int:
    from gradnorm.toolkit import analysis

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        roots: dict[str, Path] = {"bundled sample runs (6 runs, 2,000 steps)": analysis.bundled_runs_root()}
        apps: dict[str, Path] = {}
        if args.floor:
            floor = base / "floor" / "floor_app.py"
            floor.parent.mkdir()
            floor.write_text(FLOOR_APP, encoding="utf-8")
            roots["floor: a minimal Streamlit app, a title and one 50-point Altair chart"] = analysis.bundled_runs_root()
            apps["floor: a minimal Streamlit app, a title and one 50-point Altair chart"] = floor
        writer = None
        if args.steps:
            record_in_process(base / "closed", args.steps, args.tasks)
            roots[f"{args.steps:,} steps x {args.tasks} tasks, closed"] = base / "closed"
            (base / "live").mkdir()
            writer = LiveWriter(base / "live", args.steps, args.tasks)
            writer.wait_for("fast-done")
            writer.wait_compacted(COMPACT_ABOVE_FILES)
            roots[f"{args.steps:,} steps x {args.tasks} tasks, live (a writer appending)"] = base / "live"
        try:
            found = browser_first_views(roots, args.repeats, apps)
        finally:
            if writer is not None:
                writer.stop()
    lines = [
        f"### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: first chart in Chromium, {machine()}",
        "",
        f"From the navigation's start, in the page: the heading (title), the first chart's element, and the chart settled (the end of the last "
        f"long task once it is there: drawn and answering input); 1400x900, {args.repeats} interleaved round(s); cold = the first page of a fresh "
        "`streamlit run` server, warm = a second page on it. Each cell: median (min-max) s; load = 1-min load average.",
        "",
        "| runs | cold: title | cold: first chart | cold: settled | warm: title | warm: first chart | warm: settled | load |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(values: list[float]) -> str:
        ordered = sorted(values)
        return f"{ordered[len(ordered) // 2]:.2f} ({ordered[0]:.2f}-{ordered[-1]:.2f})"

    for label, kinds in found.items():
        loads = [row[-1] for kind in kinds.values() for row in kind]
        cells = [cell([row[i] for row in kinds[kind]]) for kind in ("cold", "warm") for i in range(3)]
        cells[1], cells[4] = f"**{cells[1]}**", f"**{cells[4]}**"
        lines.append(f"| {label} | {' | '.join(cells)} | {min(loads):.1f}-{max(loads):.1f} |")
    publish("\n".join(lines) + "\n", args.markdown)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--raw", action="store_true", help="also the layout without compaction (10,000 files at 1 M steps)")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--browser", action="store_true", help="time the first chart in Chromium instead (bundled runs, then --steps runs; 0 skips them)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-floor", dest="floor", action="store_false", help="without the minimal Streamlit app interleaved (--browser)")
    args = parser.parse_args(argv)
    if args.browser:
        return browser_main(args)
    views: list[tuple[str, tuple[float, float, int, int], str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        live_root = base / "live"
        live_root.mkdir()
        writer = LiveWriter(live_root, args.steps, args.tasks)
        try:
            writer.wait_for("fast-done")
            writer.wait_compacted(COMPACT_ABOVE_FILES)  # (the compaction lags behind the full-speed phase)
            files = live_files(writer.path)
            view = first_view(live_root)
            views.append(("live (default settings, a writer appending 2,000 steps/s)", view, f"{files} to {live_files(writer.path)} live part files"))
        finally:
            writer.stop()
        closed = record_in_process(base / "closed", args.steps, args.tasks)
        views.append(("closed (default settings)", first_view(base / "closed"), f"{closed['files']} part files"))
        if args.raw:
            raw = record_in_process(base / "raw", args.steps, args.tasks, compact=False)
            views.append(("no compaction (one file per flush)", first_view(base / "raw"), f"{raw['files']:,} part files"))
    lines = [
        f"### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {machine()}",
        "",
        f"One run of {args.steps:,} steps x {args.tasks} tasks ({args.steps * args.tasks:,} rows), written through the Recorder "
        "(flush_every=100). First view = AppTest running the page once with nothing cached; rerun = the same page again (cache keyed by the files).",
        "",
        "| layout | first view (s) | rerun (s) | charts | largest chart (rows sent) | files |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {label} | **{cold:.2f}** | {warm:.2f} | {charts} | {points:,} | {note} |" for label, (cold, warm, points, charts), note in views]
    publish("\n".join(lines) + "\n", args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
