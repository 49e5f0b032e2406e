"""``gradnorm summary RUN``: per task E_t[w_i], its spread, the final loss ratio and the overfitting gap."""

from __future__ import annotations

import argparse

from ._common import add_root_and_window, window_of


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("summary", help="print a run's per-task table: E_t[w_i], spread, final loss ratio, overfitting gap")
    parser.add_argument("run", help="run id (a directory under the runs root)")
    add_root_and_window(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from gradnorm.toolkit.analysis import list_runs, resolve_runs_root, summary, weight_average

    root = resolve_runs_root(args.root).path
    average = weight_average(root, args.run, window=window_of(args), burn_in=args.burn_in)
    table = summary(root, args.run, window=(average.start_step, average.end_step))
    table = table.merge(average.table[["task", "stderr"]].rename(columns={"stderr": "weight_stderr"}), on="task")
    listing = list_runs(root)
    mode = next((str(row.get("mode")) for row in listing.to_dict("records") if row.get("run_id") == args.run), "balance")
    print(
        f"run {args.run} ({average.method}{', shadow' if mode == 'shadow' else ''}), steps {average.start_step}-{average.end_step}; "
        f"convergence (largest drift of E_t[w_i] between the window's halves): {average.convergence:.2%}"
    )
    shadow = mode == "shadow"
    rows = []
    for record in table.to_dict("records"):
        gap = record["overfitting_gap"]
        row = {
            "task": record["task"],
            f"E_t[w_i] ({average.method} would set)" if shadow else "E_t[w_i]": f"{record['weight_mean']:.4f}",
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
        print(f"Shadow run: the network trained with your weights; the {average.method} column is what it would have set.")
    return 0


def format_table(rows: list[dict[str, str]]) -> str:
    columns = list(rows[0]) if rows else []
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) if c == "task" else c.rjust(widths[c]) for c in columns)]
    lines += ["  ".join(r[c].ljust(widths[c]) if c == "task" else r[c].rjust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)
