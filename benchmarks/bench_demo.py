"""The README's first command on a busy machine: wall time of ``gradnorm demo`` with a competing CPU-bound
process, for each intra-op thread count, in alternating order.

    python benchmarks/bench_demo.py [--steps 2000] [--threads 1 2] [--repeats 2] [--markdown benchmarks/results/demo.md]

Each measurement runs the installed ``gradnorm demo`` in a fresh subprocess and a fresh runs folder while
``python -c "while True: pass"`` runs beside it (started before, stopped after), so the demo shares the
cores the way it does on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_info import describe, publish

BUSY = [sys.executable, "-c", "while True: pass"]


def time_demo(steps: int, threads: int, busy: bool) -> float:
    competitor = subprocess.Popen(BUSY) if busy else None
    try:
        with tempfile.TemporaryDirectory(prefix="gradnorm-demo-bench-") as folder:
            started = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "gradnorm",
                    "demo",
                    "--steps",
                    str(steps),
                    "--threads",
                    str(threads),
                    "--no-progress",
                    "--runs-root",
                    str(Path(folder) / "runs"),
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                timeout=3600,
            )
            return time.perf_counter() - started
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quiet-machine", action="store_true", help="also measure without the competing process")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    conditions = [(threads, True) for threads in args.threads] + ([(threads, False) for threads in args.threads] if args.quiet_machine else [])
    seconds: dict[tuple[int, bool], list[float]] = {c: [] for c in conditions}
    for repeat in range(args.repeats):
        order = conditions if repeat % 2 == 0 else conditions[::-1]
        for condition in order:
            seconds[condition].append(time_demo(args.steps, *condition))
            print(f"threads={condition[0]} busy={condition[1]}: {seconds[condition][-1]:.1f} s", file=sys.stderr)
    lines = [
        f"## `gradnorm demo` (T=2 and T=10, {args.steps} steps per run, 6 runs), {time.strftime('%Y-%m-%d')}",
        "",
        f"Machine: {describe()}. {args.repeats} repeats per condition, in alternating order.",
        "",
        "| intra-op threads | competing CPU-bound process | wall time (s), each repeat | best |",
        "|---|---|---|---|",
    ]
    for (threads, busy), values in seconds.items():
        lines.append(f"| {threads} | {'yes' if busy else 'no'} | {', '.join(f'{v:.0f}' for v in values)} | {min(values):.0f} |")
    publish("\n".join(lines) + "\n", args.markdown)


if __name__ == "__main__":
    main()
