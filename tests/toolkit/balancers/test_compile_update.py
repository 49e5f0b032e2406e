"""GradNorm(compile_update=True): the torch.compile-fused weight update follows the eager one, skips what
the eager one skips, and falls back to it, with a warning, when compiling fails."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from gradnorm.toolkit.balancers import GradNorm

TASKS = [f"t{i}" for i in range(4)]


def run(balancer: GradNorm, steps: list[tuple[torch.Tensor, torch.Tensor]]):
    balancer.bind(TASKS, torch.device("cpu"), torch.float64)
    weights, skipped = [], []
    for losses, norms in steps:
        stats = balancer.update(losses, norms)
        weights.append(balancer.weights().clone())
        skipped.append(bool(stats.step_update_skipped))
    return torch.stack(weights), skipped


def steps_with_a_bad_one():
    generator = torch.Generator().manual_seed(3)
    steps = [(torch.rand(4, generator=generator, dtype=torch.float64) + 0.2, torch.rand(4, generator=generator, dtype=torch.float64) * 3) for _ in range(12)]
    steps[6] = (steps[6][0], torch.tensor([1.0, float("nan"), 1.0, 1.0], dtype=torch.float64))
    return steps


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_update_follows_the_eager_update_and_skips_the_same_steps():
    steps = steps_with_a_bad_one()
    eager, eager_skipped = run(GradNorm(alpha=1.5, lr=0.1), steps)
    fused = GradNorm(alpha=1.5, lr=0.1, compile_update=True)
    compiled, compiled_skipped = run(fused, steps)
    assert fused.compile_update, "the compiled update fell back to eager"
    assert compiled_skipped == eager_skipped and compiled_skipped[6] is True and sum(compiled_skipped) == 1
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)
    assert not torch.equal(compiled[0], compiled[-1])  # the weights did move
    assert fused.config()["compile_update"] is True


def test_a_failing_compile_falls_back_to_the_eager_update_with_a_warning(monkeypatch):
    def broken_compile(*args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("no compiler here")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    steps = steps_with_a_bad_one()
    eager, _ = run(GradNorm(alpha=1.5, lr=0.1), steps)
    fused = GradNorm(alpha=1.5, lr=0.1, compile_update=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback, _ = run(fused, steps)
    assert any("compile_update failed" in str(w.message) and "no compiler here" in str(w.message) for w in caught)
    assert fused.compile_update is False
    torch.testing.assert_close(fallback, eager, rtol=0, atol=0)
