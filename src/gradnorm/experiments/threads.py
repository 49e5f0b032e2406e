"""Thread counts for the worked problems.

The toy problem's and the penguins' matrices are tiny (100 x 100 layers, batches of 100): a second
intra-op thread buys nothing and, on a machine whose cores are shared (the recorder's writer thread, a
data loader, anything else running), turns every small operation into a wait for a busy core. Measured
on a 2-core machine with a competing CPU-bound process, ``benchmarks/results/demo.md``. Only the
commands set this, for their own process; ``gradnorm.attach`` never touches a user's thread settings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

#: Intra-op threads the small worked problems run with unless told otherwise.
SMALL_MODEL_THREADS = 1


@contextlib.contextmanager
def intra_op_threads(count: int | None) -> Iterator[int]:
    """Run the block with ``count`` intra-op threads (None: leave torch's setting), then restore it."""
    import torch  # here, so the command line reads SMALL_MODEL_THREADS without importing torch

    before = torch.get_num_threads()
    if count is not None:
        if count < 1:
            raise ValueError(f"--threads must be at least 1, got {count}")
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
