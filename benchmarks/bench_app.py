"""The app's first view of a 1,000,000-step run: time for Streamlit's AppTest to run the page once.

The synthetic run of ``bench_analysis.py`` (10 M rows in 200 part files) is the only run under the root;
the first run is cold (nothing cached), the second shows the cache keyed by the files on disk. Also
reports the largest number of points any chart sends to the browser. Target: under 3 s.
Usage: ``python benchmarks/bench_app.py [--steps 1000000] [--markdown FILE]``
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

from bench_analysis import machine, write_synthetic_run  # noqa: E402
from machine_info import publish  # noqa: E402

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
    return cold, warm, max(points), len(points)


def _rows(dataset) -> int:
    from streamlit import dataframe_util

    return len(dataframe_util.convert_arrow_bytes_to_pandas_df(dataset.data.data))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_run(Path(tmp), steps=args.steps, tasks=args.tasks)
        cold, warm, points, charts = first_view(Path(tmp))
    report = (
        f"### {time.strftime('%Y-%m-%d')}: {machine()}\n\n"
        f"One run of {args.steps:,} steps x {args.tasks} tasks ({args.steps * args.tasks:,} rows, 200 part files). "
        f"First view (AppTest, cold cache): **{cold:.2f} s**; rerun with the cache: {warm:.2f} s. "
        f"{charts} charts; the largest sends {points:,} rows to the browser (1,000 points per series by default).\n"
    )
    publish(report, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
