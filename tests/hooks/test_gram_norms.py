"""Per-task weight-gradient norms at a shared Linear/Conv2d by the Gram identity (``hooks/gram_norms.py``)
against an independent measurement: one ``torch.autograd.grad(L_i, W)`` per task, in float64, to 1e-10
relative, on every layer type, per channel, through the segments real models put between W and the heads,
with any chunking over tasks; and the route chooser on the shapes of the toy problem and of a ResNet-18."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gradnorm.hooks import gram_norms
from gradnorm.hooks.gram_norms import DIRECT, GRAM

RTOL = 1e-10


def reference_sq_norms(losses, parameter: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """One plain backward per task to the parameter itself: the norms the session measures today."""
    grads = torch.stack([torch.autograd.grad(loss, parameter, retain_graph=True)[0] for loss in losses])
    return grads.flatten(2).square().sum(2) if per_channel else grads.flatten(1).square().sum(1)


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    assert actual.shape == expected.shape
    scale = expected.abs().max()
    error = (actual - expected).abs().max()
    assert error <= rtol * scale, f"relative error {(error / scale).item():.3g} > {rtol:g}"


def task_losses(outputs: list[torch.Tensor], num_tasks: int, seed: int = 1) -> list[torch.Tensor]:
    """T different nonlinear losses; task i reads ``outputs[i % len(outputs)]`` through its own head."""
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for i in range(num_tasks):
        source = outputs[i % len(outputs)]
        flat = source.reshape(source.shape[0], -1) if source.dim() > 1 else source.reshape(1, -1)
        # drawn in float64 whatever the model's dtype, so a float32 copy of a model sees the same heads
        head = torch.randn(flat.shape[1], 3, generator=generator, dtype=torch.float64).to(source.dtype)
        target = torch.randn(flat.shape[0], 3, generator=generator, dtype=torch.float64).to(source.dtype)
        losses.append(((flat @ head).tanh() - target).square().mean() * (1 + i))
    return losses


def both_routes(layer, x, d, per_channel=False):
    return gram_norms.gram_sq_norms(layer, x, d, per_channel), gram_norms.direct_sq_norms(layer, x, d, per_channel)


def check_layer(layer: nn.Module, x: torch.Tensor, num_tasks: int = 4, per_channel: bool = False, post=lambda y: y.tanh()) -> None:
    """Both routes and the capture against per-task autograd, weight and bias."""
    with gram_norms.capture(layer) as cap:
        y = layer(x)
        losses = task_losses([post(y)], num_tasks)
        d = next(gram_norms.output_gradients(losses, y))[1][0]
        assert d is not None and d.shape == (num_tasks, *y.shape)
        expected = reference_sq_norms(losses, layer.weight, per_channel)
        for route_norms in both_routes(layer, x, d, per_channel):
            assert_relative(route_norms, expected)
        for route in (GRAM, DIRECT):
            assert_relative(cap.sq_norms(losses, per_channel=per_channel, route=route), expected)
        if layer.bias is not None:
            bias_grads = torch.stack([torch.autograd.grad(loss, layer.bias, retain_graph=True)[0] for loss in losses])
            assert_relative(gram_norms.bias_sq_norms(layer, d, per_channel), bias_grads.square() if per_channel else bias_grads.square().sum(1))


# -- every layer type ------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape", [(9, 7), (3, 5, 7), (2, 2, 3, 7), (7,)])
def test_linear_on_any_leading_dimensions(shape, per_channel):
    torch.manual_seed(0)
    layer = nn.Linear(7, 5).double()
    check_layer(layer, torch.randn(*shape, dtype=torch.float64), per_channel=per_channel)


def test_linear_without_bias():
    torch.manual_seed(0)
    check_layer(nn.Linear(6, 4, bias=False).double(), torch.randn(10, 6, dtype=torch.float64))


CONVS = {
    "plain": dict(in_channels=3, out_channels=5, kernel_size=3),
    "stride-padding": dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1, bias=False),
    "dilation": dict(in_channels=3, out_channels=4, kernel_size=3, padding=2, dilation=2),
    "non-square": dict(in_channels=2, out_channels=3, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    "groups-2": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2),
    "depthwise": dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, groups=4, bias=False),
    "same-odd": dict(in_channels=3, out_channels=4, kernel_size=3, padding="same", dilation=2),
    "same-even": dict(in_channels=3, out_channels=4, kernel_size=(4, 2), padding="same"),
    "valid": dict(in_channels=3, out_channels=4, kernel_size=3, padding="valid", bias=False),
    "reflect": dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
    "circular-groups": dict(in_channels=4, out_channels=4, kernel_size=3, padding=(1, 2), padding_mode="circular", groups=2),
    "replicate-same": dict(in_channels=3, out_channels=4, kernel_size=4, padding="same", padding_mode="replicate"),
    "1x1": dict(in_channels=6, out_channels=5, kernel_size=1),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("name", list(CONVS))
def test_conv2d_every_option(name, per_channel):
    torch.manual_seed(0)
    layer = nn.Conv2d(**CONVS[name]).double()
    check_layer(layer, torch.randn(2, layer.in_channels, 7, 6, dtype=torch.float64), per_channel=per_channel)


def test_conv2d_unbatched_input():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3, padding=1, groups=1).double()
    check_layer(layer, torch.randn(3, 6, 5, dtype=torch.float64), per_channel=True)


# -- through what real models put between W and the heads ----------------------------------------------------
def test_through_batch_norm_residual_relu_and_pooling():
    """A ResNet basic block's tail: conv -> BN (training) -> + shortcut -> ReLU -> average pool -> heads."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, padding=1, bias=False).double()
    norm = nn.BatchNorm2d(6).double().train()
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    with gram_norms.capture(conv) as cap:
        pooled = F.adaptive_avg_pool2d(F.relu(norm(conv(x)) + x), 1).flatten(1)
        losses = task_losses([pooled], 7)
        expected = reference_sq_norms(losses, conv.weight)
        for route in (GRAM, DIRECT):
            assert_relative(cap.sq_norms(losses, route=route), expected)
        assert_relative(cap.sq_norms(losses, per_channel=True, route=GRAM), reference_sq_norms(losses, conv.weight, per_channel=True))


def test_in_place_residual_add_after_the_layer():
    """The output itself changed in place (``y += shortcut; y.relu_()``): its gradient edge stays right."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 5).double()
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    with gram_norms.capture(layer) as cap:
        y = layer(x)
        y += x
        y.relu_()
        losses = task_losses([y], 4)
        assert_relative(cap.sq_norms(losses, route=GRAM), reference_sq_norms(losses, layer.weight))


def test_through_dropout_residual_and_layer_norm_with_two_heads_on_different_tensors():
    """A BERT output block (dense -> dropout -> + residual -> LayerNorm), a CLS head on a pooler (tanh of a
    Linear of token 0) and a token head on the sequence: the dropout mask is the forward pass's own."""
    torch.manual_seed(0)
    dense = nn.Linear(12, 8).double()
    norm = nn.LayerNorm(8).double()
    pooler = nn.Linear(8, 8).double()
    hidden, residual = torch.randn(3, 5, 12, dtype=torch.float64), torch.randn(3, 5, 8, dtype=torch.float64)
    with gram_norms.capture(dense) as cap:
        sequence = norm(F.dropout(dense(hidden), p=0.3, training=True) + residual)
        pooled = pooler(sequence[:, 0]).tanh()
        losses = task_losses([pooled, sequence], 6)
        expected = reference_sq_norms(losses, dense.weight)
        for route in (GRAM, DIRECT):
            assert_relative(cap.sq_norms(losses, route=route), expected)


def test_through_multihead_attention():
    torch.manual_seed(0)
    shared = nn.Linear(8, 8).double()
    attention = nn.MultiheadAttention(8, 2, batch_first=True, dropout=0.2).double().train()
    tokens = torch.randn(2, 5, 8, dtype=torch.float64)
    with gram_norms.capture(shared) as cap:
        h = shared(tokens)
        attended, _ = attention(h, h, h)
        sequence = F.layer_norm(attended + h, (8,))
        losses = task_losses([sequence[:, 0], sequence], 5)
        expected = reference_sq_norms(losses, shared.weight)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the batched product ran, no per-task fallback
            for route in (GRAM, DIRECT):
                assert_relative(cap.sq_norms(losses, route=route), expected)


def test_through_a_transformers_bert_layer():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, vocab_size=50, max_position_embeddings=16
    )
    model = transformers.BertModel(config).double().train()
    shared = model.encoder.layer[0].output.dense  # attention of layer 1 lies between W and the heads
    ids = torch.randint(0, 50, (2, 6))
    with gram_norms.capture(shared) as cap:
        out = model(input_ids=ids)
        losses = task_losses([out.pooler_output, out.last_hidden_state], 4)
        expected = reference_sq_norms(losses, shared.weight)
        for route in (GRAM, DIRECT):
            assert_relative(cap.sq_norms(losses, route=route), expected)


def test_through_a_transformers_resnet_stage():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ResNetConfig(layer_type="basic", depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8)
    model = transformers.ResNetModel(config).double().train()
    shared = model.encoder.stages[-1].layers[-1].layer[-1].convolution
    with gram_norms.capture(shared) as cap:
        pooled = model(torch.randn(3, 3, 32, 32, dtype=torch.float64)).pooler_output.flatten(1)
        losses = task_losses([pooled], 5)
        expected = reference_sq_norms(losses, shared.weight)
        assert cap.choose_route(5)[0] == GRAM
        for route in (GRAM, DIRECT, None):
            assert_relative(cap.sq_norms(losses, route=route), expected)
        assert_relative(cap.sq_norms(losses, per_channel=True), reference_sq_norms(losses, shared.weight, per_channel=True))


# -- tasks, chunks, calls ----------------------------------------------------------------------------------
@pytest.fixture()
def block_model():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    norm = nn.BatchNorm2d(6).double().train()
    return conv, norm


@pytest.mark.parametrize("num_tasks", [1, 2, 100])
def test_chunking_over_tasks_changes_nothing(block_model, num_tasks):
    conv, norm = block_model
    with gram_norms.capture(conv) as cap:
        pooled = F.avg_pool2d(F.relu(norm(conv(torch.randn(3, 4, 6, 6, dtype=torch.float64)))), 2)
        losses = task_losses([pooled], num_tasks)
        expected = reference_sq_norms(losses, conv.weight)
        for chunk in sorted({1, 3, 7, num_tasks}):
            for route in (GRAM, DIRECT):
                assert_relative(cap.sq_norms(losses, route=route, chunk=chunk), expected)
                # stacked into one (T,) tensor, every chunk runs through every head: the same norms
                assert_relative(cap.sq_norms(torch.stack(losses), route=route, chunk=chunk), expected)
        assert_relative(cap.sq_norms(losses), expected)  # the default chunk and route
        # yields cover every task once, in order
        slices = [part for part, _ in gram_norms.output_gradients(losses, cap.calls[0].output, chunk=7)]
        assert [(s.start, s.stop) for s in slices] == [(a, min(num_tasks, a + 7)) for a in range(0, num_tasks, 7)]


def test_gram_in_row_blocks_equals_the_whole_gram(block_model):
    conv, norm = block_model
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    with gram_norms.capture(conv) as cap:
        losses = task_losses([F.relu(norm(conv(x)))], 5)
        expected = reference_sq_norms(losses, conv.weight)
        positions = cap.positions()
        for gram_bytes in (8 * positions, 8 * positions * 7, 1):  # one row, 7 rows, still one row
            assert_relative(cap.sq_norms(losses, route=GRAM, gram_bytes=gram_bytes), expected)
            assert_relative(cap.sq_norms(losses, route=GRAM, gram_bytes=gram_bytes, per_channel=True), reference_sq_norms(losses, conv.weight, True))


def test_a_layer_called_twice_sums_its_calls():
    torch.manual_seed(0)
    layer = nn.Linear(6, 6).double()
    with gram_norms.capture(layer) as cap:
        first = layer(torch.randn(4, 6, dtype=torch.float64))
        second = layer(first.tanh())
        losses = task_losses([second, first], 4)
        assert len(cap.calls) == 2
        for route in (GRAM, DIRECT):
            assert_relative(cap.sq_norms(losses, route=route), reference_sq_norms(losses, layer.weight))


def test_capture_keeps_no_calls_without_grad_and_reports_in_place_changes_of_the_input():
    layer = nn.Linear(3, 2)
    cap = gram_norms.capture(layer)
    with torch.no_grad():
        layer(torch.randn(4, 3))
    assert cap.calls == [] and "no call" in cap.problem()
    x = torch.randn(4, 3)
    loss = layer(x).sum()
    x.add_(1.0)
    assert "changed in place" in cap.problem()
    with pytest.raises(RuntimeError, match="changed in place"):
        cap.sq_norms(torch.stack([loss, 2 * loss]))
    cap.clear()
    assert cap.calls == []
    cap.remove()
    layer(torch.randn(4, 3))
    assert cap.calls == []  # the hook is gone


def test_reduce_runs_the_direct_route_on_the_reduced_gradients():
    torch.manual_seed(0)
    layer = nn.Linear(5, 4).double()
    with gram_norms.capture(layer) as cap:
        losses = task_losses([layer(torch.randn(6, 5, dtype=torch.float64))], 3)
        halved = cap.sq_norms(losses, reduce=lambda grads: grads / 2)
        assert cap.route == DIRECT and "ranks" in cap.reason
        assert_relative(halved, reference_sq_norms(losses, layer.weight) / 4)


@pytest.mark.parametrize("batched", [True, False])
def test_a_task_that_does_not_reach_the_layer_has_norm_zero(batched):
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    elsewhere = nn.Parameter(torch.randn(3, dtype=torch.float64))
    with gram_norms.capture(layer) as cap:
        reaching = task_losses([layer(torch.randn(5, 4, dtype=torch.float64))], 3)
        losses = [reaching[0], elsewhere.square().sum(), *reaching[1:]]
        expected = reference_sq_norms(reaching, layer.weight)
        expected = torch.cat([expected[:1], expected.new_zeros(1), expected[1:]])
        cap.batched = batched
        for route in (GRAM, DIRECT):
            for chunk in (1, 2, 4):
                assert_relative(cap.sq_norms(losses, route=route, chunk=chunk), expected)


def test_the_loop_fallback_gives_the_same_norms():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3, groups=1).double()
    with gram_norms.capture(layer) as cap:
        losses = task_losses([layer(torch.randn(2, 3, 6, 6, dtype=torch.float64))], 5)
        cap.batched = False
        expected = reference_sq_norms(losses, layer.weight)
        assert_relative(cap.sq_norms(losses, route=GRAM, chunk=2), expected)
        assert_relative(cap.sq_norms(torch.stack(losses), route=DIRECT, chunk=2), expected)


def test_unsupported_layers_are_named():
    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    assert "overrides" in gram_norms.unsupported(Custom(2, 2))
    assert "neither" in gram_norms.unsupported(nn.Conv1d(2, 2, 1))
    assert gram_norms.unsupported(nn.Linear(2, 2)) is None
    with pytest.raises(TypeError, match="neither"):
        gram_norms.capture(nn.Conv1d(2, 2, 1))


# -- precision ------------------------------------------------------------------------------------------------
def test_float32_within_1e_5_of_the_float64_norms():
    torch.manual_seed(0)
    conv64 = nn.Conv2d(8, 8, 3, padding=1, bias=False).double()
    x64 = torch.randn(4, 8, 6, 6, dtype=torch.float64)
    conv32, x32 = nn.Conv2d(8, 8, 3, padding=1, bias=False), x64.float()
    conv32.weight.data.copy_(conv64.weight.data.float())
    with gram_norms.capture(conv64) as cap64, gram_norms.capture(conv32) as cap32:
        exact = reference_sq_norms(task_losses([conv64(x64).tanh()], 6), conv64.weight)
        losses32 = task_losses([conv32(x32).tanh()], 6)
        for route in (GRAM, DIRECT):
            measured = cap32.sq_norms(losses32, route=route)
            assert measured.dtype == torch.float32
            assert_relative(measured.double(), exact, rtol=1e-5)
        assert cap64 is not cap32


def test_half_precision_inputs_are_accumulated_in_float32():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), gram_norms.capture(layer) as cap:
        y = layer(torch.randn(32, 16))
        assert y.dtype == torch.bfloat16
        losses = task_losses([y.float()], 3)
        gram, direct = cap.sq_norms(losses, route=GRAM), cap.sq_norms(losses, route=DIRECT)
    assert gram.dtype == direct.dtype == torch.float32
    assert_relative(gram, direct, rtol=1e-5)  # the same bfloat16 X and D, both routes in float32


# -- no host synchronisation -------------------------------------------------------------------------------------
SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique", "aten.unique", "aten.equal", "aten.is_nonzero")


class OperatorLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("route", [GRAM, DIRECT])
def test_no_operator_that_waits_for_the_device(route):
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
    with gram_norms.capture(conv) as cap:
        losses = task_losses([F.relu(norm(conv(torch.randn(2, 4, 5, 5))))], 5)
        log = OperatorLog()
        with log:
            cap.sq_norms(losses, route=route, chunk=2, gram_bytes=4 * cap.positions() * 3)
    assert any("mm" in name or "convolution" in name for name in log.names)
    syncing = sorted({name for name in log.names if name.rsplit(".", 1)[0] in SYNCING})
    assert syncing == []


# -- the route chooser --------------------------------------------------------------------------------------------
def test_the_toy_problem_takes_the_direct_route():
    """Batch 1024 through 100x100 layers (paper section 4): P is ten times the layer's width."""
    layer = nn.Linear(100, 100)
    for num_tasks in (2, 10):
        route, reason = gram_norms.choose_route(layer, (1024, 100), (1024, 100), num_tasks)
        assert route == DIRECT and "P=1024" in reason


def test_a_resnet18_last_convolution_takes_the_gram_route():
    """ResNet-18's last 3x3 convolution (512 -> 512) at batch 32 of 64x64 images sees 2x2 pixels: P = 128."""
    layer = nn.Conv2d(512, 512, 3, padding=1, bias=False)
    for num_tasks in (3, 40, 100):
        route, reason = gram_norms.choose_route(layer, (32, 512, 2, 2), (32, 512, 2, 2), num_tasks)
        assert route == GRAM and "P=128" in reason


def test_the_cost_model_orders_the_routes_by_their_arithmetic():
    """An inverted model would pick the route with more multiply-adds: check the estimates themselves."""
    conv = gram_norms.route_costs(gram_norms.Geometry(positions=128, groups=1, fan_in=4608, fan_out=512), 40)
    assert conv.direct_flops == 40 * 128 * 4608 * 512 + 40 * 4608 * 512
    assert conv.gram_flops == 128**2 * 4608 + 40 * 128**2 * 512 + 40 * 128 * 512
    assert conv.direct_flops > 10 * conv.gram_flops
    toy = gram_norms.route_costs(gram_norms.Geometry(positions=1024, groups=1, fan_in=100, fan_out=100), 10)
    assert toy.gram_flops > 10 * toy.direct_flops
    # a Gram too large to keep is formed again per chunk of tasks, and costs that
    blocked = gram_norms.route_costs(gram_norms.Geometry(positions=4096, groups=1, fan_in=64, fan_out=64), 8, chunk=2, gram_bytes=1 << 20)
    assert blocked.gram_blocked and blocked.gram_flops == 4 * 4096**2 * 64 + 8 * 4096**2 * 64 + 8 * 4096 * 64
