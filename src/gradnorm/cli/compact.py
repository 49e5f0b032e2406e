"""``gradnorm compact [RUN ...]``: merge a run's small part files into large ones (runs written before the
recorder compacted, or killed before it could). Crash-safe, and never touches a rank that a live process
is writing."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("compact", help="merge the small part files of runs into large ones (crash-safe; skips ranks being written)")
    parser.add_argument("runs", nargs="*", metavar="RUN", help="run ids under the runs root (default with --all: every run there)")
    parser.add_argument("--all", action="store_true", help="compact every run under the runs root")
    parser.add_argument(
        "--root", type=Path, default=None, help="runs root (default: $GRADNORM_RUNS_ROOT, else ./runs if it exists, else the bundled sample runs)"
    )
    parser.add_argument("--target-rows", type=int, default=None, help="rows per merged file (default: 1,000,000)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from gradnorm.toolkit import schema
    from gradnorm.toolkit.analysis import bundled_runs_root, resolve_runs_root, run_ids
    from gradnorm.toolkit.recorder import COMPACT_TARGET_ROWS, compact_run
    from gradnorm.toolkit.runs import RunError, validate_run_id

    if bool(args.runs) == bool(args.all):
        raise ValueError("name the runs to compact, or pass --all (not both)")
    target_rows = COMPACT_TARGET_ROWS if args.target_rows is None else args.target_rows
    if target_rows < 1:
        raise ValueError(f"--target-rows must be >= 1, got {target_rows}")
    root = resolve_runs_root(args.root).path
    if root.resolve() == bundled_runs_root().resolve():
        raise ValueError(f"the bundled sample runs ({root}) are not compacted; give --root or set $GRADNORM_RUNS_ROOT")
    if not root.is_dir():
        raise FileNotFoundError(f"runs root {root} does not exist or is not a directory")
    selected = run_ids(root) if args.all else [validate_run_id(r) for r in args.runs]
    failed = False
    for run_id in selected:
        path = root / run_id
        if not path.is_dir() or path.is_symlink():
            print(f"{run_id}: no run directory {path}", file=sys.stderr)
            failed = True
            continue
        try:
            outcome = compact_run(path, target_rows=target_rows)
        except RunError as exc:
            print(f"{run_id}: {exc}", file=sys.stderr)
            failed = True
            continue
        for rank, result in outcome.items():
            if isinstance(result, str):
                print(f"{run_id} {rank}: {result}")
                continue
            files = sorted(schema.live_part_files([p.name for p in (path / schema.METRICS_DIR / rank).iterdir()])[0])
            merged = sum(len(originals) for _, originals in result.merged)
            print(f"{run_id} {rank}: {merged} part files merged into {len(result.merged)}; {len(files)} part files now ({result.rows_merged:,} rows rewritten)")
            for problem in result.left_out:
                print(f"  {problem}")
    return 1 if failed else 0
