"""The recorder's reliability figures: runs the fault scenarios of ``tests/helpers/faults.py`` once more and
writes ``benchmarks/results/reliability.md`` (machine, date, figures). Run from the repository root:

    python -m benchmarks.reliability_figures
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from tests.helpers.faults import (
    bad_input_scenario,
    damaged_part_scenario,
    disk_full_scenario,
    kill_scenario,
    overflow_scenario,
    tmpfs_scenario,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "reliability.md"


def write_results(path: Path = RESULTS) -> str:
    """Run every scenario in a temporary folder and write the figures as Markdown."""
    with tempfile.TemporaryDirectory(prefix="gradnorm-reliability-") as tmp:
        tmp = Path(tmp)
        kill = kill_scenario(tmp / "kill")
        repeats = [kill_scenario(tmp / f"kill-{parts}", min_parts=parts) for parts in (2, 6, 10, 15)]
        full = disk_full_scenario(tmp / "full")
        over = overflow_scenario(tmp / "overflow")
        fs = tmpfs_scenario(tmp / "tmpfs")
        bad = bad_input_scenario(tmp / "bad")
        damaged = damaged_part_scenario(tmp / "damaged")
    lines = [
        "# Reliability figures",
        "",
        f"Machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}), "
        f"Python {platform.python_version()}, torch {torch.__version__}.",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Written by `python benchmarks/reliability_figures.py`; "
        "`tests/integration/test_faults.py` and `tests/toolkit/test_reliability_analysis.py` run the same scenarios and assert on them.",
        "",
        "## SIGKILL in the middle of a run",
        f"A child process trains a two-task network through `hooks.attach` (GradNorm, flush every {kill['flush_every']} steps) "
        f"and is killed with SIGKILL as soon as the parent sees {kill['part_files_at_kill']} part files "
        f"({kill['part_files']} were on disk after the kill: the child runs on while the parent polls).",
        "",
        f"- steps started before the kill: {kill['steps_done']}",
        f"- steps read back: {kill['steps_read_back']} (steps 0..{kill['steps_read_back'] - 1}, contiguous: {kill['steps_contiguous']}), "
        f"{kill['rows_read_back']} train rows",
        f"- steps the recorder had confirmed written before the kill: {kill['steps_confirmed_written']} (all read back)",
        f"- steps lost (the unflushed tail: the device buffer plus batches still queued for the writer): {kill['steps_lost']}",
        f"- temporary files left by the kill: {kill['temporary_files_left']} (never read: readers take `part-*.parquet` only)",
        f"- status in run.json: `{kill['status_in_run_json']}`; shown as `{kill['status_while_fresh']}` while the heartbeat is fresh, "
        f"`{kill['status_once_stale']}` once it is older than the threshold",
        "",
        "The same kill at other moments:",
        "",
        "| killed once the parent saw this many part files | steps started | steps read back | confirmed written before the kill | steps lost | contiguous |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['part_files_at_kill']} | {r['steps_done']} | {r['steps_read_back']} | {r['steps_confirmed_written']} | {r['steps_lost']} | {r['steps_contiguous']} |"
        for r in repeats
    ]
    lines += [
        "",
        "## Disk full (injected ENOSPC on part-file writes)",
        f"- {full['steps']} steps x 3 tasks = {full['rows_recorded']} rows recorded; writes failed for {full['failing_steps']} steps "
        f"({full['failed_writes']} failed write attempts)",
        f"- rows read back: {full['rows_read_back']}; rows lost: {full['rows_lost']} (kept in memory and written once writes worked again)",
        f"- warnings: {len(full['write_warnings'])} (`{full['write_warnings'][0] if full['write_warnings'] else ''}`)",
        "",
        "## Writes failing until the close, with a small pending-rows cap",
        f"- rows recorded: {over['rows_recorded']}; rows read back: {over['rows_read_back']}; rows counted lost in run.json: "
        f"{over['rows_lost']} (recorded = read back + lost: {over['rows_recorded'] == over['rows_read_back'] + over['rows_lost']})",
        "",
        "## A real full file system (1 MiB tmpfs)",
    ]
    if fs is None:
        lines.append("- not run: mounting a tmpfs needs privileges this machine does not grant")
    else:
        lines += [
            f"- rows recorded: {fs['rows_recorded']}; written while the disk was full: {fs['rows_written_while_full']} "
            f"({fs['write_errors_while_full']} failed writes); rows read back after space was freed: {fs['rows_read_back']}; rows lost: {fs['rows_lost']}",
            f"- warnings: {len(fs['write_warnings'])}",
        ]
    lines += [
        "",
        "## Damaged part files read through the analysis",
        "Four part files of 10 steps each; the second one damaged as below, then `metric_series` and `problems` asked.",
        "",
        "| damage | query answered | steps read (intact: 30) | reported in problems() |",
        "|---|---|---|---|",
    ]
    lines += [f"| {d['damage']} | {d['query_answered']} | {d['steps_read']} | {d['reported']} |" for d in damaged]
    lines += [
        "",
        "## Bad inputs tried",
        "Besides these, `tests/toolkit/balancers/test_properties_balancers.py` draws (Hypothesis) task counts 2-12 and losses and gradient",
        "norms from 0 and 1e-300 to 1e300 (float32: 1e-37 to 1e37) for GradNorm, equal, static and six survey methods,",
        "and non-finite values (nan, inf, -inf) in any task's loss or norm; `tests/integration/test_errors.py` and",
        "`tests/integration/test_security.py` assert the message of each error path.",
        "",
        "| kind | input | outcome |",
        "|---|---|---|",
    ]

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines += [f"| {kind} | `{cell(value)}` | {cell(outcome)} |" for kind, value, outcome in bad]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return text


if __name__ == "__main__":
    print(write_results())
