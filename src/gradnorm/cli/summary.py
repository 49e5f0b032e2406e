"""``gradnorm summary RUN``: per task E_t[w_i], its spread, the final loss ratio and the overfitting gap.

The run's status says whether rows were lost; every file the figures leave out (damaged, mistyped, a link,
not a regular file) and every other problem found is printed on standard error, as the app shows them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from ._common import add_root_and_window, window_of


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("summary", help="print a run's per-task table: E_t[w_i], spread, final loss ratio, overfitting gap")
    parser.add_argument("run", help="run id (a directory under the runs root)")
    add_root_and_window(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from gradnorm.toolkit.analysis import resolve_runs_root, summary, weight_average

    root = resolve_runs_root(args.root).path
    average = weight_average(root, args.run, window=window_of(args), burn_in=args.burn_in)
    table = summary(root, args.run, window=(average.start_step, average.end_step))
    table = table.merge(average.table[["task", "stderr"]].rename(columns={"stderr": "weight_stderr"}), on="task")
    (listed,) = listing(root, [args.run])  # after the queries: files they found unreadable are listed too
    mode = str(listed.get("mode") or "balance")
    method = printable(average.method)  # from run.json: any text
    print(
        f"run {args.run} ({method}{', shadow' if mode == 'shadow' else ''}), {listed.get('status')}, steps {average.start_step}-{average.end_step}; "
        f"convergence (largest drift of E_t[w_i] between the window's halves): {average.convergence:.2%}"
    )
    lost = listed.get("rows_lost")
    if lost:
        print(f"{lost} row(s) could not be written ({listed.get('write_errors') or 0} failed write(s)): the figures below are over the rows that were.")
    shadow = mode == "shadow"
    rows = []
    for record in table.to_dict("records"):
        gap = record["overfitting_gap"]
        row = {
            "task": printable(record["task"]),
            f"E_t[w_i] ({method} would set)" if shadow else "E_t[w_i]": f"{record['weight_mean']:.4f}",
            "std": f"{record['weight_std']:.4f}",
            "stderr": f"{record['weight_stderr']:.4f}",
        }
        if shadow:
            row["weights used (yours)"] = f"{record['applied_weight_mean']:.4f}"
        row["final L_i/L_i(0)"] = f"{record['final_loss_ratio']:.4f}"
        row["val/train gap"] = "no validation logged" if gap != gap else f"{gap:+.1%}"
        rows.append(row)
    print(format_table(rows))
    print(
        "\nE_t[w_i]: the time-averaged weights `gradnorm export` writes (paper 5.2); std: their spread over the steps;"
        " stderr: the standard error of the mean by batch means; val/train gap: (validation - training loss) / training loss"
        " at the last validation point."
    )
    if shadow:
        print(f"Shadow run: the network trained with your weights; the {method} column is what it would have set.")
    print_problems("summary", [listed])
    return 0


def listing(root: Any, run_ids: Sequence[str]) -> list[dict[str, Any]]:
    """``list_runs`` rows of ``run_ids``, counts as ints or None."""
    import pandas as pd

    from gradnorm.toolkit.analysis import list_runs

    rows = list_runs(root, only=list(run_ids)).to_dict("records")
    for row in rows:
        for key in ("rows_lost", "write_errors", "last_step"):
            row[key] = None if row.get(key) is None or pd.isna(row[key]) else int(row[key])
    return rows


def print_problems(command: str, rows: Sequence[dict[str, Any]]) -> None:
    """What was left out of the runs (and why), on standard error."""
    for row in rows:
        for problem in row.get("problems", []):
            print(f"gradnorm {command}: warning: {printable(problem)}", file=sys.stderr)


def printable(text: object) -> str:
    """``text`` with control characters (a terminal's escape sequences, newlines) written as escapes, so a
    hostile task name or file name cannot rewrite the terminal or forge lines."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def format_table(rows: list[dict[str, str]]) -> str:
    columns = list(rows[0]) if rows else []
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) if c == "task" else c.rjust(widths[c]) for c in columns)]
    lines += ["  ".join(r[c].ljust(widths[c]) if c == "task" else r[c].rjust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)
