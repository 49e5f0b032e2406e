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
    from gradnorm.toolkit.analysis import default_runs_root, summary, weight_average

    root = args.root or default_runs_root()
    average = weight_average(root, args.run, window=window_of(args), burn_in=args.burn_in)
    table = summary(root, args.run, window=(average.start_step, average.end_step))
    table = table.merge(average.table[["task", "stderr"]].rename(columns={"stderr": "weight_stderr"}), on="task")
    print(
        f"run {args.run} ({average.method}), steps {average.start_step}-{average.end_step}; "
        f"convergence (largest drift between the window's halves): {average.convergence:.2%}"
    )
    columns = ["task", "weight_mean", "weight_std", "weight_stderr", "final_loss_ratio", "overfitting_gap"]
    print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0
