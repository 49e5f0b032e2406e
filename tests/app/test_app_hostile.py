"""The app on hostile runs roots: a bad run is shown as invalid with its reason, the others draw, and no
file (a deep run.json, a FIFO, a mistyped part file, a link) becomes a traceback or a page that never
finishes. A run that lost rows says so. The caches' signatures follow every change a compaction makes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from gradnorm.toolkit import analysis, schema
from tests.app.test_app import APP, no_failure, start
from tests.helpers.synthetic_runs import compact, part_files, rewrite_part, run_json, write_run

REPO = Path(__file__).resolve().parents[2]


def hostile_root(root: Path) -> Path:
    write_run(root, "good")
    (root / "nested").mkdir()
    (root / "nested" / schema.RUN_FILE).write_bytes(("[" * 1000 + "]" * 1000).encode())
    huge = write_run(root, "huge-steps")

    def huge_steps(table: pa.Table) -> pa.Table:
        steps = pc.add(pc.cast(table["step"], pa.uint64()), pa.scalar(2**64 - 100, pa.uint64()))
        return table.set_column(0, pa.field("step", pa.uint64()), steps)

    rewrite_part(part_files(huge)[-1], huge_steps)
    text_flag = write_run(root, "text-flag")
    index = pq.read_schema(part_files(text_flag)[0]).get_field_index("step_update_skipped")
    rewrite_part(part_files(text_flag)[1], lambda t: t.set_column(index, "step_update_skipped", pc.cast(t["step_update_skipped"], pa.string())))
    linked = write_run(root, "linked-rank")
    os.symlink(linked / schema.METRICS_DIR / "rank=0", linked / schema.METRICS_DIR / "rank=1")
    return root


def test_a_hostile_root_shows_every_run_and_explains_the_bad_ones(monkeypatch, tmp_path):
    root = hostile_root(tmp_path)
    at = start(monkeypatch, root)
    no_failure(at)
    runs = ["good", "huge-steps", "linked-rank", "nested", "text-flag"]
    at.sidebar.multiselect[0].set_value(runs).run()
    no_failure(at)
    assert any("nested" in e.value and "nested deeper" in e.value for e in at.error)
    texts = [t.value for t in at.get("text")]
    assert any("out of range" in t for t in texts)
    assert any("step_update_skipped" in t for t in texts)
    assert any("rank=1" in t and "symbolic link" in t for t in texts)
    assert at.get("vega_lite_chart")
    for view in ("Gradient norms & loss ratios", "Overfitting", "Balance", "Export weights"):
        at.radio(key="view").set_value(view).run()
        no_failure(at)
    headline = at.dataframe[0].value
    assert set(headline["run"]) == set(runs) - {"nested"}


def test_a_run_that_lost_rows_says_so_on_the_page(monkeypatch, tmp_path):
    write_run(tmp_path, "lossy", meta=run_json("lossy", rows_lost=40, write_errors=3))
    at = start(monkeypatch, tmp_path)
    no_failure(at)
    assert any("lost 40 row(s)" in w.value and "3 failed write(s)" in w.value for w in at.warning)
    headline = at.dataframe[0].value.set_index("run")
    assert headline.loc["lossy", "status"] == analysis.FINISHED_ROWS_LOST
    assert (headline.loc["lossy", "rows lost"], headline.loc["lossy", "write errors"]) == (40, 3)


APP_CHILD = textwrap.dedent(
    """
    import json, os, sys
    from streamlit.testing.v1 import AppTest
    app, root = sys.argv[1], sys.argv[2]
    os.environ["GRADNORM_RUNS_ROOT"] = root
    sys.argv = [app]
    at = AppTest.from_file(app, default_timeout=120).run()
    at.sidebar.multiselect[0].set_value(["fifo-json", "fifo-part", "good"]).run()
    print("RESULT " + json.dumps({
        "exceptions": [e.value for e in at.exception],
        "errors": [e.value for e in at.error],
        "texts": [t.value for t in at.get("text")],
        "charts": len(at.get("vega_lite_chart")),
    }))
    """
)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_fifos_in_the_root_never_hang_the_page(tmp_path):
    write_run(tmp_path, "good")
    (tmp_path / "fifo-json").mkdir()
    os.mkfifo(tmp_path / "fifo-json" / schema.RUN_FILE)
    fifo_part = write_run(tmp_path, "fifo-part", steps=20)
    os.mkfifo(fifo_part / schema.METRICS_DIR / "rank=0" / "part-000003.parquet")
    try:
        done = subprocess.run([sys.executable, "-c", APP_CHILD, str(APP), str(tmp_path)], capture_output=True, text=True, timeout=240, cwd=REPO)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the page did not finish in 240 s (a FIFO was opened?): {(exc.stderr or b'')[-2000:]!r}")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["exceptions"] == []
    assert any("fifo-json" in e and "not a regular file" in e for e in result["errors"])
    assert any("part-000003.parquet" in t and "not a regular file" in t for t in result["texts"])
    assert result["charts"] >= 1


def test_the_cache_signatures_change_at_every_step_of_a_compaction(tmp_path):
    from gradnorm.app import _data as data

    path = write_run(tmp_path, "run", steps=40)
    rank_dir = path / schema.METRICS_DIR / "rank=0"
    seen_runs, seen_listings = [data.runs_signature(str(tmp_path), ["run"])], [data.listing_signature(str(tmp_path))]

    def step(label: str) -> None:
        runs_signature, listing_signature = data.runs_signature(str(tmp_path), ["run"]), data.listing_signature(str(tmp_path))
        assert runs_signature not in seen_runs, label
        assert listing_signature not in seen_listings, label
        seen_runs.append(runs_signature)
        seen_listings.append(listing_signature)

    merged = compact(rank_dir, 1, 4)
    step("merged file renamed into place")
    for i in range(1, 5):
        (rank_dir / schema.part_file_name(i)).unlink()
        step(f"original {i} deleted")
    replacement = rank_dir / ".replacement.tmp"
    pq.write_table(pq.read_table(merged).slice(0, 10), replacement)
    os.replace(replacement, merged)
    step("merged file replaced under the same name")
    assert data.runs_signature(str(tmp_path), ["run"]) == seen_runs[-1]  # and stable while nothing changes
    assert data.listing_signature(str(tmp_path)) == seen_listings[-1]
