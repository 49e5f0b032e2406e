"""``attach`` on a ``torch.compile``d model (docs/many-tasks.md, "torch.compile").

The heads' taps hook module calls (forward pre-hooks, the shared layer's forward hook) and autograd nodes
(the fan-out node, the losses' factor hooks); a compiled graph replaces both, so the taps would never see
the backward. The head search notices the compiled module at the first step (``torch.compile(model)``'s
wrapper or ``model.compile()``), says so in a warning and in run.json's ``heads_search``, and the general
path measures the norms from the first step: every update is made (none skipped), and the weights are the
eager model's within float tolerance. Each backend the machine can run: ``eager`` and ``aot_eager``
always, ``inductor`` where it can compile here (it needs a C++ compiler on a CPU).
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch

from gradnorm import hooks
from gradnorm.experiments import toy
from gradnorm.hooks.head_finder import COMPILED_REASON
from gradnorm.toolkit import analysis, runs
from gradnorm.toolkit.balancers import GradNorm

STEPS, BATCH, TASKS = 6, 25, 3


@functools.cache
def inductor_unavailable() -> str | None:
    """Why inductor cannot compile on this machine, or None where it can."""
    try:
        compiled = torch.compile(lambda x: torch.relu(x) * 2, backend="inductor")
        compiled(torch.randn(4))
    except Exception as exc:  # a missing C++ compiler, an unsupported platform: inductor's own errors
        return f"torch.compile's inductor backend cannot compile here: {type(exc).__name__}: {str(exc)[:200]}"
    finally:
        torch._dynamo.reset()
    return None


def backend(name: str):
    # inductor's first compile takes seconds to tens of seconds (its C++ toolchain check included)
    return pytest.param(name, marks=[pytest.mark.slow] if name == "inductor" else [], id=name)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def setup():
    config = toy.ToyConfig(num_tasks=TASKS, train_size=STEPS * BATCH, test_size=8)
    return toy.make_model(config), toy.make_data(config)


def train(base, data, root=None, compile_with=None, style="wrap"):
    model = copy.deepcopy(base)
    net = model
    if compile_with is not None and style == "wrap":
        net = torch.compile(model, backend=compile_with)
    elif compile_with is not None:
        model.compile(backend=compile_with)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    session = hooks.attach(model.shared_layer, GradNorm(alpha=0.12), runs_root=root, run_name="run" if root else None)
    trajectory = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            x, y = data.x_train[step * BATCH : (step + 1) * BATCH], data.y_train[step * BATCH : (step + 1) * BATCH]
            loss = session.loss(toy.task_losses(net(x), y))
            opt.zero_grad()
            loss.backward()
            opt.step()
            trajectory.append(session.balancer.weights().clone())
    session.close()
    ours = [str(w.message) for w in caught if str(w.message).startswith("gradnorm:")]
    return torch.stack(trajectory), ours, session


@pytest.mark.parametrize("compile_with", [backend("eager"), backend("aot_eager"), backend("inductor")])
def test_a_compiled_model_gets_the_general_path_with_a_warning_and_the_eager_weights(setup, tmp_path, compile_with):
    if compile_with == "inductor" and inductor_unavailable() is not None:
        pytest.skip(inductor_unavailable() or "")
    base, data = setup
    expected, eager_warnings, eager = train(base, data)
    assert eager.taps is not None and eager_warnings == []  # eager: the taps serve
    weights, caught, session = train(base, data, tmp_path, compile_with)
    assert session.taps is None
    assert any("torch.compile" in message and "general path" in message for message in caught), caught
    assert not any("skipped" in message for message in caught), caught  # every step measured and updated
    meta = runs.read_run_json(tmp_path / "run")
    assert meta["heads_search"] == COMPILED_REASON
    assert not meta["grad_norm_path"].startswith("head-taps"), meta["grad_norm_path"]
    assert (weights[-1] - 1).abs().max() > 1e-3  # the weights moved, so the comparison says something
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
    assert meta["skipped_updates"] == 0
    assert analysis.list_runs(tmp_path)["rows"].iloc[0] == STEPS * TASKS


def test_module_compile_in_place_is_noticed_as_well(setup, tmp_path):
    base, data = setup
    expected, _, _ = train(base, data)
    weights, caught, session = train(base, data, tmp_path, "aot_eager", style="in place")
    assert session.taps is None and any("torch.compile" in message for message in caught)
    assert runs.read_run_json(tmp_path / "run")["heads_search"] == COMPILED_REASON
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)


def test_heads_given_with_a_compiled_model_are_an_error_at_the_second_step(setup):
    """heads= given: the taps armed for the first step never see its compiled backward (docs/many-tasks.md says so)."""
    base, data = setup
    model = copy.deepcopy(base)
    net = torch.compile(model, backend="aot_eager")
    session = hooks.attach(model.shared_layer, GradNorm(alpha=0.12), heads=list(model.heads))
    x, y = data.x_train[:BATCH], data.y_train[:BATCH]
    session.loss(toy.task_losses(net(x), y)).backward()
    with pytest.raises(RuntimeError, match="never backpropagated"):
        session.loss(toy.task_losses(net(x), y))
    session.close()
