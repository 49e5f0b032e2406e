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
that is when Vega has drawn it and the page answers input again. Each page also reports the CPU seconds of
Chromium's processes from its opening to settled: on a shared machine, what the page costs apart from its
waits for a core.

``--first-chart REF``: the first view's Weights chart alone in a minimal page, built by ``app/_charts.py``
as it is now and as it was at git ``REF``, with a 50-point line as the floor, interleaved on one warm
server: a before/after of a chart change in one run, without the rest of the page.
"""

from __future__ import annotations

import argparse
import json
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


def chromium_cpu() -> float:
    """User + system CPU seconds of this process's Chromium processes (browser, renderers, GPU, utility):
    on a shared machine, what a page costs, apart from the time it waits for a core."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            if "chrom" in child.name():
                times = child.cpu_times()
                total += times.user + times.system
        except psutil.Error:  # (a process that ended in between)
            continue
    return total


def _first_chart(browser, port: int, query: str = "") -> tuple[float, float, float, float]:
    """(title, first chart's element, first chart settled) in seconds from the navigation's start, and
    the CPU seconds Chromium spent from opening the page to settled (the second of quiet included)."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    spent = chromium_cpu()
    try:
        page.add_init_script(TIMING_JS % CHART.replace('"', '\\"'))
        page.goto(f"http://127.0.0.1:{port}/{query}", wait_until="commit")
        page.wait_for_selector(CHART, timeout=180_000)
        page.wait_for_function(SETTLED_JS, timeout=180_000, polling=100)
        title, chart, tasks = page.evaluate("() => [window.__title, window.__chart, window.__lt]")
        settled = max([chart, *[end for end in tasks if end > chart]])
        return title / 1000, chart / 1000, settled / 1000, chromium_cpu() - spent
    finally:
        page.close()


def browser_first_views(roots: dict[str, Path], repeats: int, apps: Optional[dict[str, Path]] = None) -> dict[str, dict[str, list[tuple[float, ...]]]]:
    """Per layout: cold and warm (title s, first chart s, settled s, Chromium CPU s, load average) over ``repeats``
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


#: The first chart alone: one spec (``?v=<version>``) from the files beside this page, nothing else drawn.
FIRST_CHART_APP = """import json
import pickle
from pathlib import Path

import streamlit as st

st.set_page_config(page_title="first chart", layout="wide")
st.title("First chart")
here = Path(__file__).parent
version = st.query_params.get("v", "floor")
spec = json.loads((here / f"{version}.json").read_text(encoding="utf-8"))
spec["datasets"] = pickle.loads((here / f"{version}.pkl").read_bytes())
st.vega_lite_chart(spec, width="stretch")
"""


def first_chart_inputs(root: Path, points: Optional[int] = None) -> tuple[tuple, dict]:
    """The arguments the app's first view (default controls, ``root``; ``points`` per series through the
    URL's ``points`` where given) gives ``weights_charts``."""
    from streamlit.testing.v1 import AppTest

    from gradnorm.app import _charts

    captured: list[tuple[tuple, dict]] = []
    original = _charts.weights_charts

    def capture(*args, **kwargs):
        captured.append((args, kwargs))
        return original(*args, **kwargs)

    os.environ["GRADNORM_RUNS_ROOT"] = str(root)
    _charts.weights_charts = capture  # type: ignore[assignment]
    try:
        at = AppTest.from_file(str(APP), default_timeout=300)
        if points is not None:
            at.query_params["points"] = str(points)
        at.run()
    finally:
        _charts.weights_charts = original  # type: ignore[assignment]
    if at.exception or not captured:
        raise RuntimeError(f"the first view drew no weights chart: {[e.value for e in at.exception]}")
    return captured[0]


def charts_at(ref: str):
    """``app/_charts.py`` as it is at git ``ref``, as a module (it imports nothing of the package)."""
    import subprocess
    import types

    source = subprocess.run(["git", "show", f"{ref}:app/_charts.py"], cwd=APP.parent.parent, capture_output=True, text=True, check=True).stdout
    module = types.ModuleType(f"charts_at_{ref}")
    exec(compile(source, f"{ref}:app/_charts.py", "exec"), module.__dict__)
    return module


def _spec_and_data(charts_module, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """The first chart's Vega-Lite spec and its datasets (DataFrames by name, each frame once, as the app
    sends them)."""
    import altair as alt

    frames: dict[str, object] = {}

    def keep(data):
        name = f"data{id(data)}"
        frames[name] = data
        return {"name": name}

    alt.data_transformers.register("bench_app_keep", keep)
    with alt.data_transformers.enable("bench_app_keep"):
        spec = charts_module.weights_charts(*args, **kwargs)[0].to_dict()
    spec.pop("datasets", None)
    return spec, frames


def cell(values: list[float]) -> str:
    """A results-table cell: the median (the upper of the two middle values) and the range."""
    ordered = sorted(values)
    return f"{ordered[len(ordered) // 2]:.2f} ({ordered[0]:.2f}-{ordered[-1]:.2f})"


def first_chart_main(args: argparse.Namespace) -> int:
    """The first chart alone in a minimal page, as ``app/_charts.py`` builds it now and at ``--first-chart
    REF``, and a 50-point line (the floor), interleaved on one warm server."""
    import pickle
    import signal
    import socket

    import pandas as pd
    from playwright.sync_api import sync_playwright

    from gradnorm.app import _charts
    from gradnorm.toolkit import analysis

    inputs = first_chart_inputs(analysis.bundled_runs_root())
    versions = {"floor": "a 50-point line (floor)", "ref": f"first chart, app/_charts.py at {args.first_chart}", "now": "first chart, app/_charts.py now"}
    versions |= {f"now{n}": f"first chart, app/_charts.py now, {n} points per series" for n in args.points}
    found: dict[str, list[tuple[float, ...]]] = {v: [] for v in versions}
    with tempfile.TemporaryDirectory() as tmp:
        page_dir = Path(tmp)
        (page_dir / "first_chart_app.py").write_text(FIRST_CHART_APP, encoding="utf-8")
        floor = {
            "mark": "line",
            "data": {"name": "floor"},
            "encoding": {"x": {"field": "x", "type": "quantitative"}, "y": {"field": "y", "type": "quantitative"}},
        }
        built = {
            "floor": (floor, {"floor": pd.DataFrame({"x": range(50), "y": [i * i for i in range(50)]})}),
            "ref": _spec_and_data(charts_at(args.first_chart), *inputs),
            "now": _spec_and_data(_charts, *inputs),
            **{f"now{n}": _spec_and_data(_charts, *first_chart_inputs(analysis.bundled_runs_root(), n)) for n in args.points},
        }
        for version, (spec, frames) in built.items():
            (page_dir / f"{version}.json").write_text(json.dumps(spec), encoding="utf-8")
            (page_dir / f"{version}.pkl").write_bytes(pickle.dumps(frames))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        server = _serve(analysis.bundled_runs_root(), port, page_dir / "first_chart_app.py")
        try:
            _wait_healthy(port)
            with sync_playwright() as play:
                browser = play.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
                try:
                    _first_chart(browser, port, "?v=now")  # (the server's first page: imports, caches)
                    for _ in range(args.repeats):
                        for version in versions:
                            found[version].append((*_first_chart(browser, port, f"?v={version}"), os.getloadavg()[0]))
                finally:
                    browser.close()
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    rows = {v: sum(len(frame) for frame in built[v][1].values()) for v in versions}  # type: ignore[arg-type]
    lines = [
        f"### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: the first chart alone in Chromium, {machine()}",
        "",
        f"`python benchmarks/bench_app.py --first-chart {args.first_chart}{''.join(f' --points {n}' for n in args.points)} --repeats {args.repeats}`: the Weights chart of the app's first view on the "
        "bundled runs (default controls), alone in a minimal `streamlit run` page (a title and `st.vega_lite_chart`), warm pages on one server, "
        f"{args.repeats} interleaved round(s), 1400x900. Times from the navigation's start; after the title = settled - title; Chromium CPU = its "
        "processes' CPU seconds from opening the page to settled (one second of quiet included). Each cell: median (min-max); load = 1-min load average.",
        "",
        "| chart | rows sent | first chart (s) | settled (s) | settled after the title (s) | Chromium CPU (s) | load |",
        "|---|---|---|---|---|---|---|",
    ]

    for version, label in versions.items():
        got = found[version]
        loads = [row[-1] for row in got]
        figures = [cell([row[1] for row in got]), cell([row[2] for row in got]), cell([row[2] - row[0] for row in got]), cell([row[3] for row in got])]
        lines.append(f"| {label} | {rows[version]:,} | {' | '.join(figures)} | {min(loads):.1f}-{max(loads):.1f} |")
    publish("\n".join(lines) + "\n", args.markdown)
    return 0


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
        f"long task once it is there: drawn and answering input), and the CPU seconds of Chromium's processes from opening the page to settled (one second of quiet included); 1400x900, {args.repeats} interleaved round(s); cold = the first page of a fresh "
        "`streamlit run` server, warm = a second page on it. Each cell: median (min-max) s; load = 1-min load average.",
        "",
        "| runs | cold: title | cold: first chart | cold: settled | cold: Chromium CPU | warm: title | warm: first chart | warm: settled | warm: Chromium CPU | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    for label, kinds in found.items():
        loads = [row[-1] for kind in kinds.values() for row in kind]
        cells = [cell([row[i] for row in kinds[kind]]) for kind in ("cold", "warm") for i in range(4)]
        cells[1], cells[5] = f"**{cells[1]}**", f"**{cells[5]}**"
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
    parser.add_argument("--first-chart", metavar="REF", default=None, help="the first chart alone, app/_charts.py now against git REF, and a 50-point floor")
    parser.add_argument("--points", type=int, action="append", default=[], help="with --first-chart: also the chart at this many points per series")
    args = parser.parse_args(argv)
    if args.first_chart:
        return first_chart_main(args)
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
