"""A session owns every hook it registers and leaves none behind: after close(), after an exception in
its ``with`` block, and after it is dropped without either (garbage collection).

The hooks in question: the heads' forward pre-hooks and the shared layer's forward hook of ``heads=``
(``hooks/taps.py``), the global module forward hook of ``heads="auto"`` (``hooks/head_finder.py``), the
forward hook that captures the shared representation Z for PCGrad/MGDA (``hooks/task_gradients.py``), and
the tensor hooks the streaming taps and the gradient surgery put on one step's graph.
"""

from __future__ import annotations

import gc
import threading
import warnings
import weakref

import pytest
import torch
from torch import nn

from gradnorm import hooks
from gradnorm.hooks import taps as taps_module
from gradnorm.toolkit import runs
from gradnorm.toolkit.balancers import GradNorm, PCGrad
from tests.helpers import faults as scenarios
from tests.helpers import waiting

MODULE_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)
GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_hooks_with_kwargs",
    "_global_forward_hooks_always_called",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)
MODES = ["none", "heads", "auto", "representation"]


class Net(nn.Module):
    """A ReLU trunk and two linear heads: ``heads=`` takes the linear-product route, so every hook kind is used."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.bottom = nn.Linear(5, 8)
        self.shared = nn.Linear(8, 6)
        self.heads = nn.ModuleList([nn.Linear(6, 1), nn.Linear(6, 1)])
        self.features: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.features = torch.relu(self.shared(torch.tanh(self.bottom(x))))
        return [head(self.features).squeeze(-1) for head in self.heads]


def losses(model: Net, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 5, generator=generator), torch.randn(16, 2, generator=generator) * torch.tensor([1.0, 10.0])
    return {f"t{i}": ((out - y[:, i]) ** 2).mean() for i, out in enumerate(model(x))}


def global_hooks() -> dict[str, list]:
    return {name: list(getattr(nn.modules.module, name, {}).values()) for name in GLOBAL_HOOK_DICTS}


def hooks_left(model: nn.Module, globals_before: dict[str, list]) -> list[str]:
    """Every hook on the model's modules and parameters, and every global module hook added since ``globals_before``."""
    left = []
    for name, module in model.named_modules():
        for attribute in MODULE_HOOK_DICTS:
            if getattr(module, attribute, None):
                left.append(f"{name or 'model'}.{attribute}: {list(getattr(module, attribute).values())}")
    for name, parameter in model.named_parameters():
        if parameter._backward_hooks:
            left.append(f"{name} tensor hooks: {list(parameter._backward_hooks.values())}")
    for attribute, before in globals_before.items():
        added = [hook for hook in getattr(nn.modules.module, attribute, {}).values() if hook not in before]
        if added:
            left.append(f"torch.nn.modules.module.{attribute}: {added}")
    return left


def attach(model: Net, mode: str, **options):
    balancer = PCGrad(seed=0) if mode == "representation" else GradNorm(alpha=0.5)
    heads = {"none": None, "heads": list(model.heads), "auto": "auto", "representation": None}[mode]
    return hooks.attach(model.shared, balancer, heads=heads, **options)


def train_step(session, model: Net, seed: int = 1) -> None:
    model.zero_grad()
    session.loss(losses(model, seed)).backward()


def two_steps_with_given_heads(model: Net) -> tuple[dict[str, float], list[torch.Tensor]]:
    """w(2) and the parameters' gradients of the second step, with heads= on ``model``."""
    session = hooks.attach(model.shared, GradNorm(alpha=0.5), heads=list(model.heads))
    with session:
        train_step(session, model, seed=1)
        train_step(session, model, seed=2)
    assert session.taps is not None and session.taps.path == taps_module.LINEAR_PRODUCT
    return session.weights(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", MODES)
def test_attach_and_close_a_hundred_times_leaves_no_hook_and_a_fresh_attach_works(mode):
    model = Net()
    before = global_hooks()
    for attempt in range(100):
        session = attach(model, mode)
        if attempt % 10 == 0:
            # Attached hooks are really there (so the check below can see them), and a step uses them.
            assert hooks_left(model, before) != [] or mode == "none"
            train_step(session, model)
        session.close()
        assert hooks_left(model, before) == [], f"attempt {attempt}"
    # The same model, worn by a hundred sessions, trains exactly like a fresh copy of it.
    fresh = Net()
    fresh.load_state_dict(model.state_dict())
    worn_weights, worn_grads = two_steps_with_given_heads(model)
    fresh_weights, fresh_grads = two_steps_with_given_heads(fresh)
    assert worn_weights == pytest.approx(fresh_weights, rel=0, abs=0)
    for worn, new in zip(worn_grads, fresh_grads):
        torch.testing.assert_close(worn, new, rtol=0, atol=0)
    assert hooks_left(model, before) == [] and hooks_left(fresh, before) == []


@pytest.mark.parametrize("mode", MODES)
def test_an_exception_in_the_with_block_removes_every_hook_and_marks_the_run_failed(mode, tmp_path):
    model = Net()
    before = global_hooks()
    with pytest.raises(RuntimeError, match="user bug"):
        with attach(model, mode, runs_root=tmp_path, run_name="boom", flush_every=2) as session:
            for step in range(3):
                train_step(session, model, seed=step)
            losses(model)  # a forward pass of a step that never finishes
            raise RuntimeError("user bug")
    assert hooks_left(model, before) == []
    meta = runs.read_run_json(tmp_path / "boom")
    assert meta["status"] == runs.FAILED and meta["rows_written"] == 3 * 2


@pytest.mark.parametrize("mode", MODES)
def test_a_session_dropped_without_close_removes_its_hooks_and_closes_its_run(mode, tmp_path):
    model = Net()
    before = global_hooks()
    session = attach(model, mode, runs_root=tmp_path, run_name="dropped", flush_every=4)
    for step in range(5):
        train_step(session, model, seed=step)
    collected = weakref.ref(session)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del session
        gc.collect()
    # Nothing the session registered keeps it alive: it is collected, and its finalizer ran.
    assert collected() is None
    assert hooks_left(model, before) == []
    meta = runs.read_run_json(tmp_path / "dropped")
    # Everything recorded is on disk; the run did not say it finished, so it reads as interrupted.
    assert meta["status"] == runs.INTERRUPTED and meta["closed_by"] == "garbage collection"
    assert meta["rows_written"] == 5 * 2 and scenarios.read_back(tmp_path / "dropped").num_rows == 10
    assert [w.category for w in caught if "without close()" in str(w.message)] == [ResourceWarning]
    # The model trains on without it.
    model.zero_grad()
    sum(losses(model).values()).backward()


def test_a_session_dropped_before_its_first_step_removes_the_head_search():
    model = Net()
    before = global_hooks()
    session = attach(model, "auto")
    assert hooks_left(model, before) != []
    del session
    gc.collect()
    assert hooks_left(model, before) == []


@pytest.mark.parametrize("mode", MODES)
def test_close_is_idempotent_and_keeps_the_first_status(mode, tmp_path):
    model = Net()
    session = attach(model, mode, runs_root=tmp_path, run_name="twice")
    train_step(session, model)
    session.close(status=runs.INTERRUPTED)
    first = runs.read_run_json(tmp_path / "twice")
    session.close()
    session.close(status=runs.FAILED)
    with session:
        pass
    assert runs.read_run_json(tmp_path / "twice") == first and first["status"] == runs.INTERRUPTED
    with pytest.raises(RuntimeError, match="closed"):
        session.loss(losses(model))


@pytest.mark.parametrize("stream", [False, True], ids=["fan-out", "stream"])
def test_closing_between_loss_and_backward_leaves_a_plain_backward(stream, monkeypatch):
    """The step's graph was built with the taps in it; after close its backward is the user's, unmeasured."""
    if stream:
        monkeypatch.setattr(taps_module, "STREAM_ABOVE_BYTES", 0)
    model, reference = Net(), Net()
    session = attach(model, "heads")
    train_step(session, model, seed=1)
    weights = session.balancer.weights().clone()
    total = session.loss(losses(model, seed=2))
    assert session.taps is not None and session.taps.mode == ("stream" if stream else "fan-out")
    features = model.features
    session.close()
    assert features is not None and not features._backward_hooks
    model.zero_grad()
    total.backward()
    # The gradient is that of sum_i w_i L_i with the weights the step applied, and nothing was measured.
    reference.load_state_dict(model.state_dict())
    expected = sum(w * loss for w, loss in zip(weights.tolist(), losses(reference, seed=2).values()))
    expected.backward()
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad)
    assert session.step_index == 1


def test_a_session_finalised_on_its_recorders_writer_thread_still_closes_its_run(tmp_path):
    """A garbage collection can run on any thread, the recorder's own writer included, which cannot wait for itself."""
    model = Net()
    before = global_hooks()
    session = attach(model, "heads", runs_root=tmp_path, run_name="on-writer", flush_every=2)
    for step in range(4):
        train_step(session, model, seed=step)
    recorder, finalizer = session.recorder, session._finalizer
    assert recorder is not None
    ran_on: list[str] = []
    beat = recorder._beat

    def beat_then_finalise(force: bool) -> None:
        beat(force)
        if not ran_on:
            ran_on.append(threading.current_thread().name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                finalizer()  # what collecting the session on this thread runs

    recorder._beat = beat_then_finalise
    recorder.flush()  # the writer wakes, writes, beats
    waiting.wait_until(lambda: runs.read_run_json(tmp_path / "on-writer")["status"] != runs.RUNNING, "the run closed from its writer thread")
    assert ran_on == [recorder._thread.name]
    meta = runs.read_run_json(tmp_path / "on-writer")
    assert meta["status"] == runs.INTERRUPTED and meta["rows_written"] == 4 * 2
    assert recorder.closed and not recorder._thread.is_alive()
    assert hooks_left(model, before) == []


def test_a_session_whose_arguments_are_refused_leaves_no_hook():
    """PCGrad's capture of Z is registered before heads= is found unusable with it; the refused session removes it."""
    model = Net()
    before = global_hooks()
    message = ""
    try:
        hooks.attach(model.shared, PCGrad(seed=0), heads=list(model.heads))
    except ValueError as exc:
        message = str(exc)
    gc.collect()
    assert "leave heads= out" in message
    assert hooks_left(model, before) == []
