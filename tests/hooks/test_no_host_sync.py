"""No host-device synchronisation inside the training step (a CPU stand-in for the GPU check).

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` catches a step that waits for the device. On the
CPU the same waits show up as the operators behind them: ``_local_scalar_dense`` (``.item()``, ``bool()``,
``float()`` and Python ``if`` on a tensor), ``nonzero`` and other operators whose output size depends on
the data. A dispatch mode records every operator of a few steps after the first (the first step reads
L_i(0) on the host once, on purpose) and none of those may appear, on every measurement path, with the
recorder writing every step to memory (its flush to Parquet is where the host copy belongs).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gradnorm import hooks
from gradnorm.experiments import toy
from gradnorm.hooks import taps
from gradnorm.toolkit.balancers import GradNorm

SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique", "aten.unique", "aten.equal", "aten.is_nonzero")


class OperatorLog(TorchDispatchMode):
    """Every operator dispatched while it is active, by name (also used by tests/hooks/test_distributed_norms.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))

    def syncing(self) -> list[str]:
        """The logged operators that wait for the device (``SYNCING``), each once."""
        return sorted({name for name in self.names if name.rsplit(".", 1)[0] in SYNCING or name in SYNCING})


@pytest.mark.parametrize("heads", [None, "given", "given-stream", "auto"])
def test_steps_after_the_first_never_wait_for_the_device(heads, tmp_path, monkeypatch):
    if heads == "given-stream":  # the taps' other way of collecting the heads' gradients
        monkeypatch.setattr(taps, "STREAM_ABOVE_BYTES", 0)
    config = toy.ToyConfig(num_tasks=3, train_size=64, test_size=8)
    data = toy.make_data(config)
    model = toy.make_model(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    head_option = {None: None, "given": list(model.heads), "given-stream": list(model.heads), "auto": "auto"}[heads]
    session = hooks.attach(model.shared_layer, GradNorm(alpha=0.12), runs_root=tmp_path, run_name="run", heads=head_option, flush_every=1000)

    def step(index: int) -> None:
        x, y = data.x_train[index * 8 : index * 8 + 8], data.y_train[index * 8 : index * 8 + 8]
        loss = session.loss(toy.task_losses(model(x), y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step(0)
    step(1)
    log = OperatorLog()
    with log:
        for index in range(2, 6):
            step(index)
    if heads == "given-stream":
        assert session.taps.mode == "stream"
    session.close()
    assert len(log.names) > 100  # the mode saw the steps, backward included
    assert any("mm" in name for name in log.names)
    syncing = log.syncing()
    assert syncing == [], f"operators that wait for the device inside the step: {syncing}"
