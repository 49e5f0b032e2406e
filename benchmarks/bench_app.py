"""The app's first view of a 1,000,000-step run the real Recorder wrote: time for Streamlit's AppTest to run
the page once.

Layouts (see ``bench_analysis.py``): ``live``, default settings, a child process still appending while the
page runs (background compaction); ``closed``, default settings, packed at close; with ``--raw`` also
``compact=False`` (one part file per flush, 10,000 files). The run is the only one under its root; the first
run of the page is cold (nothing cached), the second shows the cache keyed by the files on disk. Also
reports the largest number of points any chart sends to the browser. Target: under 3 s, while a writer is
still appending. Usage: ``python benchmarks/bench_app.py [--steps 1000000] [--raw] [--markdown FILE]``
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


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--raw", action="store_true", help="also the layout without compaction (10,000 files at 1 M steps)")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
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
