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
    COMPACTION_STAGES,
    bad_input_scenario,
    compaction_kill_scenario,
    damaged_part_scenario,
    disk_full_scenario,
    full_at_close_scenario,
    high_rate_kill_scenario,
    kill_scenario,
    overflow_scenario,
    same_second_scenario,
    tmpfs_scenario,
    unusable_root_scenario,
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
        fast = [high_rate_kill_scenario(tmp / f"fast-{seed}", seed=seed) for seed in range(6)]
        compaction = [compaction_kill_scenario(tmp / f"compaction-{stage}", stage) for stage in COMPACTION_STAGES]
        at_close = full_at_close_scenario(tmp / "full-at-close")
        roots = unusable_root_scenario(tmp / "roots")
        names = same_second_scenario(tmp / "names")
    lines = [
        "# Reliability figures",
        "",
        f"Machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}), "
        f"Python {platform.python_version()}, torch {torch.__version__}.",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Written by `python -m benchmarks.reliability_figures`; "
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
        f"- steps lost (the unflushed tail: the device buffer plus the writer's backlog, at most flush_every + max_backlog_steps): {kill['steps_lost']}",
        f"- temporary files left by the kill: {kill['temporary_files_left']} (never read: readers take the files `schema.live_part_files` names; the next writer of the rank removes them)",
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
        "## SIGKILL at a random moment of a fast run with a slow, compacting writer",
        f"A child records {fast[0]['flush_every']}-step flushes of 10 tasks as fast as it can while every part-file write takes "
        f"{fast[0]['writer_delay'] * 1000:.0f} ms more, compacting in the background (above 12 files, fanout 4), and is killed with SIGKILL "
        "at a random moment. The recorder's stated bound: a SIGKILL loses at most flush_every + max_backlog_steps recorded steps "
        f"(here {fast[0]['loss_bound_steps']}). Read back through `schema.live_part_files` and pyarrow.",
        "",
        "| killed after (s) | steps recorded | steps read back | steps lost | bound | contiguous, each step once, values right | flushes that waited | live part files (compacted) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {f['killed_after_seconds']:.2f} | {f['steps_recorded']:,} | {f['steps_read_back']:,} | {f['steps_lost']} | {f['loss_bound_steps']} | "
        f"{f['steps_contiguous'] and f['each_step_once'] and f['values_match_steps']} | {f['backlog_waits_at_last_beat']} (at the last heartbeat) | "
        f"{f['live_part_files']} ({f['compacted_files']}) |"
        for f in fast
    ]
    lines += [
        "",
        "## SIGKILL in the middle of a compaction",
        f"A finished run of {compaction[0]['rows_before']} rows in {compaction[0]['files_before']} part files; `compact_run` (as `gradnorm compact`) "
        "merges them into files of at most 200 rows and is killed with SIGKILL at a point of its second merge. A reader takes the files "
        "`schema.live_part_files` names; then the compaction is run again.",
        "",
        "| killed | files on disk at the kill | rows read back = rows before | compacted again: rows = rows before | files after |",
        "|---|---|---|---|---|",
    ]
    for c in compaction:
        on_disk = c["files_on_disk_at_kill"]
        parts = [n for n in on_disk if n.startswith("part-")]
        temporary = [n for n in on_disk if n.endswith(".tmp")]
        lines.append(
            f"| {c['stage']} | {len(parts)} part files ({c['live_files_after_kill']} live, {len(parts) - c['live_files_after_kill']} covered by a merged one), "
            f"{len(temporary)} temporary | {c['same_rows_after_kill']} | {c['same_rows_after_resume']} | {c['live_files_after_resume']} "
            f"(rows {c['rows_per_file_after_resume']}) |"
        )
    lines += ["", "## A disk exactly full at close (1 MiB tmpfs)"]
    if at_close is None:
        lines.append("- not run: mounting a tmpfs needs privileges this machine does not grant")
    else:
        lines += [
            f"- {at_close['rows_written_before_full']} rows written, then the file system filled to the last byte ({at_close['free_bytes_at_close']} bytes free), "
            f"{at_close['rows_recorded'] - at_close['rows_written_before_full']} more rows recorded, then the run closed",
            f"- run.json on the full disk: status `{at_close['status']}`, rows_written {at_close['rows_written']}, rows_lost {at_close['rows_lost']}, "
            f"write_errors {at_close['write_errors']} ({at_close['run_json_bytes']} bytes, written into the 64 KiB reserved when the recorder started); "
            f"rows read back: {at_close['rows_read_back']}",
        ]
    lines += [
        "",
        "## Runs roots that cannot take records (`runs.check_runs_root`, called at attach)",
        "",
        "| root | refused with | left behind |",
        "|---|---|---|",
    ]
    lines += [f"| {r['case']} | {r['message'].replace(str(tmp), '<tmp>')} | {r['left_behind'] or 'nothing'} |" for r in roots]
    lines += [
        "",
        "## Jobs started in the same second (`runs.reserve_run`)",
        f"- {names['jobs']} processes claim a default run name at the same instant: {', '.join(f'`{n}`' for n in names['names'])}; errors: {len(names['errors'])}",
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
