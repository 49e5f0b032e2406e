"""The Gram route on the README-default path: the heads' taps (``gram-vjp``: the T pieces crossed to W's
output in batched products, then ||grad_W L_i||^2 = <D_i D_i^T, X X^T>) and the general path
(``gram-loop``: one backward per task to W's output, then the same identity). In float64 both give the
norms of the per-task loop that forms every grad_W (``autograd-loop``) to 1e-10 relative, on every layer
kind and option they take (strided, grouped and biased convolutions, a Linear on tokens, a layer called
twice, a loss from two forward passes, a scaled backward, per-channel norms); a reduce over ranks leaves
the route out; the hooks are removed on close and no step's calls are kept once measured.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradnorm
from gradnorm.hooks import gram_norms
from gradnorm.hooks.grad_norms import AUTOGRAD_LOOP, GRAM_LOOP, GradNormMeter
from gradnorm.hooks.taps import BATCHED_VJP, GRAM_VJP, HeadTaps
from gradnorm.toolkit.balancers import GradNorm

STEPS = 4


class ConvNet(nn.Module):
    """A shared convolution behind batch norm, a residual add, ReLU and pooling, and T linear heads."""

    def __init__(self, num_tasks: int = 3, stride: int = 1, groups: int = 1, bias: bool = False, twice: bool = False) -> None:
        super().__init__()
        self.lower = nn.Conv2d(3, 16, 3, padding=1)
        self.shared = nn.Conv2d(16, 16, 3, stride=stride, padding=1, groups=groups, bias=bias)
        self.norm = nn.BatchNorm2d(16)
        self.skip = nn.AvgPool2d(stride, ceil_mode=True) if stride > 1 else nn.Identity()
        self.twice = twice
        self.heads = nn.ModuleList(nn.Linear(16, 2) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = torch.relu(self.lower(x))
        y = self.shared(z)
        if self.twice:  # the shared layer called twice in one forward pass
            y = y + self.shared(z.flip(-1))
        h = torch.relu(self.norm(y) + self.skip(z)).mean((2, 3))
        return [head(h) for head in self.heads]


class TokenNet(nn.Module):
    """A shared Linear on tokens behind dropout, a residual add and LayerNorm, and two heads on the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.lower = nn.Linear(6, 48)
        self.shared = nn.Linear(48, 16)
        self.norm = nn.LayerNorm(16)
        self.drop = nn.Dropout(0.25)
        self.skip = nn.Linear(6, 16)
        self.heads = nn.ModuleList([nn.Linear(16, 3), nn.Linear(16, 1)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.norm(self.drop(self.shared(torch.tanh(self.lower(x)))) + self.skip(x))
        return [head(h) for head in self.heads]


def make(kind: str, **options) -> nn.Module:
    torch.manual_seed(0)
    return (ConvNet(**options) if kind == "conv" else TokenNet()).double()


def batches(kind: str, steps: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (2, 3, 3, 3) if kind == "conv" else (2, 3, 6)  # few positions: the Gram identity is the cheaper route
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(steps)]


def losses_of(model: nn.Module, x: torch.Tensor, step: int, halves: bool = False) -> list[torch.Tensor]:
    torch.manual_seed(100 + step)  # the same dropout masks in every run
    parts = [x[: len(x) // 2], x[len(x) // 2 :]] if halves else [x]
    outputs = [model(part) for part in parts]  # a loss from two forward passes where halves
    num_tasks = len(outputs[0])
    return [sum((out[t] * (t + 1)).sin().square().mean() for out in outputs) for t in range(num_tasks)]


def run(model: nn.Module, kind: str, heads, halves: bool = False, scale: float = 1.0, per_channel: bool = False, loop: bool = False):
    """(norms (steps, T) or (steps, T, C), the session) of GradNorm on ``model``; ``loop``: the per-task loop forced."""
    session = gradnorm.attach(model.shared, GradNorm(alpha=1.5, per_channel=per_channel), heads=heads)
    if loop:
        session.meter.remove()
        session.meter = GradNormMeter(model.shared.weight, batched=False, per_channel=per_channel)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05 / scale)  # (a power of 2: the same steps exactly)
    recorded = []
    original = session.balancer.update

    def keep(losses, norms, **kw):
        recorded.append(norms.detach().clone())
        return original(losses, norms, **kw)

    session.balancer.update = keep
    with session:
        for step, x in enumerate(batches(kind)):
            loss = session.loss(losses_of(model, x, step, halves))
            optimizer.zero_grad()
            (loss * scale).backward()
            optimizer.step()
    return torch.stack(recorded), session


CASES = {
    "conv": ("conv", {}),
    "conv-stride-2": ("conv", {"stride": 2}),
    "conv-groups-bias": ("conv", {"groups": 2, "bias": True}),
    "conv-called-twice": ("conv", {"twice": True}),
    "conv-T12": ("conv", {"num_tasks": 12}),
    "tokens": ("tokens", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_default_and_general_gram_routes_give_the_loops_norms_in_float64(case):
    kind, options = CASES[case]
    expected, loop_session = run(make(kind, **options), kind, None, loop=True)
    assert loop_session.meter.route == AUTOGRAD_LOOP
    default, session = run(make(kind, **options), kind, "auto")
    general, general_session = run(make(kind, **options), kind, None)
    assert session.taps is not None and session.taps.path == GRAM_VJP, session.taps.reason if session.taps else None
    assert general_session.meter.route == GRAM_LOOP and session.meter.route == GRAM_LOOP  # (the default's step 0)
    torch.testing.assert_close(default, expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(general, expected, rtol=1e-10, atol=0)
    assert not torch.equal(expected[0], expected[-1])  # the steps differ: norms of a training run


@pytest.mark.parametrize("kind", ["conv", "tokens"])
def test_a_loss_from_two_forward_passes_and_a_scaled_backward_keep_the_loops_norms(kind):
    """Two forward passes: the norm of the summed gradient, cross terms included; a backward of 1024 x the
    loss (a loss scale) is divided out."""
    expected, _ = run(make(kind), kind, None, halves=True, loop=True)
    default, session = run(make(kind), kind, "auto", halves=True, scale=1024.0)
    assert session.taps is not None and session.taps.path == GRAM_VJP
    torch.testing.assert_close(default, expected, rtol=1e-10, atol=0)


def test_per_channel_norms_by_the_gram_identity():
    expected, _ = run(make("conv"), "conv", None, per_channel=True, loop=True)
    default, session = run(make("conv"), "conv", "auto", per_channel=True)
    general, general_session = run(make("conv"), "conv", None, per_channel=True)
    assert expected.shape == (STEPS, 3, 16) and session.taps.path == GRAM_VJP and general_session.meter.route == GRAM_LOOP
    torch.testing.assert_close(default, expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(general, expected, rtol=1e-10, atol=0)


def test_where_forming_the_weight_gradients_is_cheaper_the_taps_keep_the_batched_product():
    """A wide batch on a narrow layer: T P d_in d_out below g P^2 (d_in + T d_out)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).double()
    heads = [nn.Linear(4, 1).double() for _ in range(2)]
    session = gradnorm.attach(model[0], GradNorm(), heads="auto")
    with session:
        for _ in range(2):
            h = model(torch.randn(256, 4, dtype=torch.float64))
            session.loss([head(h).square().mean() for head in heads]).backward()
    assert session.taps.path == BATCHED_VJP and session.taps.reason.startswith("batched-vjp: direct: P=256")
    assert session.meter.route == AUTOGRAD_LOOP


def test_a_reduce_over_ranks_leaves_the_gram_route_out_and_says_so():
    model = make("conv")
    x = batches("conv")[0]
    meter = GradNormMeter(model.shared.weight, reduce=lambda grads: grads, module=model.shared)
    losses = losses_of(model, x, 0)
    meter(losses)
    assert meter.gram is None and meter.route == AUTOGRAD_LOOP
    assert "gram-loop not a candidate: the per-task gradients are averaged across ranks" in meter.choice.reason
    taps = HeadTaps(list(model.heads), model.shared.weight, lambda norms: None, reduce=lambda grads: grads, module=model.shared)
    try:
        assert taps._gram_layer is None
        losses = losses_of(model, x, 0)
        taps.arm()
        torch.stack(losses).sum().backward()
        assert taps.path == BATCHED_VJP
    finally:
        taps.remove()


def test_the_gram_hooks_keep_no_step_and_leave_with_the_session():
    model = make("conv")
    hooks_before = len(model.shared._forward_hooks)
    session = gradnorm.attach(model.shared, GradNorm(), heads="auto")
    other = make("conv")
    general = gradnorm.attach(other.shared, GradNorm(), heads=None)
    for step, x in enumerate(batches("conv")):
        session.loss(losses_of(model, x, step)).backward()
        # While the taps serve, the general path's Gram hook keeps no forward pass (nor its graph).
        assert session.meter.gram is not None and session.meter.gram.capture.calls == []
        assert session.taps is None or session.taps._calls == []  # the taps' calls went with their forward pass
        general.loss(losses_of(other, x, step)).backward()
        assert general.meter.route == GRAM_LOOP and general.meter.gram.capture.calls == []  # cleared once measured
    assert session.taps.path == GRAM_VJP
    session.close()
    general.close()
    assert len(model.shared._forward_hooks) == hooks_before == 0 and len(other.shared._forward_hooks) == 0


def test_the_capture_keeps_a_bounded_number_of_calls():
    layer = nn.Linear(3, 2)
    capture = gram_norms.capture(layer)
    capture.max_calls = 4
    for _ in range(10):
        layer(torch.randn(1, 3))
    assert len(capture.calls) == 4 and capture.dropped == 6 and "were not kept" in (capture.problem() or "")
    capture.clear()
    capture.pause()
    layer(torch.randn(1, 3))
    assert capture.calls == [] and capture.dropped == 1
    capture.remove()


def test_output_shape_matches_the_layers_output():
    cases = [
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.Conv2d(4, 6, (3, 5), stride=(1, 2), padding=(2, 0), dilation=(2, 1)),
        nn.Conv2d(4, 6, 3, padding="same"),
        nn.Conv2d(4, 6, 3, padding="valid"),
        nn.Linear(4, 6),
    ]
    for layer in cases:
        x = torch.randn(2, 4, 9, 11) if isinstance(layer, nn.Conv2d) else torch.randn(2, 5, 4)
        assert gram_norms.output_shape(layer, x.shape) == tuple(layer(x).shape), layer


@pytest.mark.parametrize("order", ["small-first", "large-first"])
def test_forward_passes_of_one_loss_on_different_routes_sum_their_gradients(order):
    """A loss from a 3-position forward pass (the Gram route) and a 192-position one (the batched product):
    the Gram part is turned into weight gradients and added, so the norm is that of the summed gradient."""
    g = torch.Generator().manual_seed(5)
    small, large = torch.randn(1, 3, 6, generator=g, dtype=torch.float64), torch.randn(64, 3, 6, generator=g, dtype=torch.float64)
    parts = [small, large] if order == "small-first" else [large, small]

    def norms(heads):
        model = make("tokens")
        model.drop.p = 0.0
        session = gradnorm.attach(model.shared, GradNorm(alpha=1.5), heads=heads)
        if heads is None:
            session.meter.remove()
            session.meter = GradNormMeter(model.shared.weight, batched=False)
        recorded = []
        original = session.balancer.update

        def keep(losses, grad_norms=None, applied=None, **options):
            recorded.append(grad_norms.detach().clone())
            return original(losses, grad_norms, applied, **options)

        session.balancer.update = keep
        with session:
            for _ in range(3):
                outputs = [model(part) for part in parts]
                losses = [sum((out[t] * (t + 1)).sin().square().mean() for out in outputs) for t in range(2)]
                session.loss(losses).backward()
        return torch.stack(recorded), session

    expected, _ = norms(None)
    tapped, session = norms("auto")
    assert session.taps._gram_choices and {route for route, _ in session.taps._gram_choices.values()} == {"gram", "direct"}
    torch.testing.assert_close(tapped, expected, rtol=1e-10, atol=0)
