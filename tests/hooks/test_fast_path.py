"""heads= (gradient norms tapped from the user's own backward) against the separate autograd measurement
and against the double-backward reference: same G_i, same weights, same network, step for step."""

from __future__ import annotations

import copy
import json
import warnings

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from gradnorm import hooks
from gradnorm.experiments import toy
from gradnorm.hooks import taps as taps_module
from gradnorm.toolkit.balancers import EqualWeights, GradNorm


def train(model: toy.ToyNet, data: toy.ToyData, balancer, steps: int, fast: bool, root=None, name="run"):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    session = hooks.attach(model.shared_layer, balancer, runs_root=root, run_name=name, heads=list(model.heads) if fast else None, flush_every=4)
    weights, generator = [], torch.Generator().manual_seed(5)
    with session:
        for _ in range(steps):
            index = torch.randint(0, len(data.x_train), (32,), generator=generator)
            losses = toy.task_losses(model(data.x_train[index]), data.y_train[index])
            loss = session.loss(losses)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            weights.append(session.balancer.weights().clone())
    return torch.stack(weights), session


@pytest.mark.parametrize("num_tasks, per_channel", [(2, False), (5, False), (3, True)])
def test_tapped_norms_and_weights_match_the_autograd_path(num_tasks, per_channel, tmp_path):
    config = toy.ToyConfig(num_tasks=num_tasks, train_size=256, test_size=16)
    data = toy.make_data(config)
    base = toy.make_model(config).double()
    data = toy.ToyData(data.x_train.double(), data.y_train.double(), data.x_test.double(), data.y_test.double(), data.sigmas)
    slow_model, fast_model = copy.deepcopy(base), copy.deepcopy(base)
    slow, _ = train(slow_model, data, GradNorm(alpha=0.12, per_channel=per_channel), 25, fast=False, root=tmp_path, name="slow")
    fast, session = train(fast_model, data, GradNorm(alpha=0.12, per_channel=per_channel), 25, fast=True, root=tmp_path, name="fast")
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-12)
    for a, b in zip(slow_model.parameters(), fast_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)  # training itself is unchanged
    slow_rows = pq.read_table(tmp_path / "slow" / "metrics").to_pandas().sort_values(["step", "task"])
    fast_rows = pq.read_table(tmp_path / "fast" / "metrics").to_pandas().sort_values(["step", "task"])
    for column in ("grad_norm", "target_norm", "weight", "step_grad_loss"):
        torch.testing.assert_close(torch.tensor(fast_rows[column].to_numpy()), torch.tensor(slow_rows[column].to_numpy()), rtol=1e-9, atol=1e-12)


def test_monitoring_equal_weights_through_taps_records_the_norms(tmp_path):
    config = toy.ToyConfig(num_tasks=3, train_size=128, test_size=16)
    data = toy.make_data(config)
    base = toy.make_model(config)
    train(copy.deepcopy(base), data, EqualWeights(), 6, fast=False, root=tmp_path, name="slow")
    train(copy.deepcopy(base), data, EqualWeights(), 6, fast=True, root=tmp_path, name="fast")
    slow = pq.read_table(tmp_path / "slow" / "metrics").to_pandas().sort_values(["step", "task"])["grad_norm"].to_numpy()
    fast = pq.read_table(tmp_path / "fast" / "metrics").to_pandas().sort_values(["step", "task"])["grad_norm"].to_numpy()
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(slow), rtol=1e-4, atol=1e-7)


def test_a_loss_never_backpropagated_is_an_error():
    config = toy.ToyConfig(num_tasks=2, train_size=64, test_size=8)
    data = toy.make_data(config)
    model = toy.make_model(config)
    session = hooks.attach(model.shared_layer, GradNorm(), heads=list(model.heads))
    session.loss(toy.task_losses(model(data.x_train[:8]), data.y_train[:8]))
    with pytest.raises(RuntimeError, match="never backpropagated"):
        session.loss(toy.task_losses(model(data.x_train[:8]), data.y_train[:8]))


def test_heads_that_do_not_share_one_input_are_refused():
    trunk = nn.Linear(4, 4)
    heads = nn.ModuleList([nn.Linear(4, 1), nn.Linear(4, 1)])
    session = hooks.attach(trunk, GradNorm(), heads=list(heads))
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="needs every head to read one tensor") as caught:
        session.loss([heads[0](trunk(x)).sum(), heads[1](trunk(x)).sum()])
    # Which head reads which tensor, and what to do instead.
    message = str(caught.value)
    assert "head 0 (Linear) read a (3, 4) float32 tensor from AddmmBackward0" in message and "head 1 (Linear) reads a (3, 4)" in message
    assert "the same shape: a different tensor" in message and 'heads="auto"' in message and "heads=None" in message


def test_heads_count_must_match_tasks():
    trunk = nn.Linear(4, 4)
    heads = nn.ModuleList([nn.Linear(4, 1) for _ in range(3)])
    session = hooks.attach(trunk, GradNorm(), heads=list(heads[:2]))
    features = trunk(torch.randn(3, 4))
    with pytest.raises(ValueError, match="2 modules for 3 tasks"):
        session.loss([head(features).sum() for head in heads])


class NormLog(EqualWeights):
    """Equal weights that keep every step's measured per-task norms."""

    def __init__(self) -> None:
        super().__init__()
        self.norms: list[torch.Tensor] = []

    def update(self, losses, grad_norms=None, applied=None, **options):
        self.norms.append(grad_norms.clone())
        return super().update(losses, grad_norms, applied, **options)


class TwoHeadNet(nn.Module):
    """A shared Linear W, a configurable segment between W and the heads, two heads."""

    def __init__(self, segment: str) -> None:
        super().__init__()
        self.lower = nn.Linear(6, 8)
        self.shared = nn.Linear(8, 8)
        self.segment = segment
        self.heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 3)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = torch.relu(self.lower(x))
        if self.segment == "tied":  # W used twice in one forward
            h = torch.relu(self.shared(h))
        y = self.shared(h)
        if self.segment in ("relu", "tied"):
            h = torch.relu(y)
        elif self.segment == "relu-relu":
            h = torch.relu(torch.relu(y) - 0.1)
        elif self.segment == "inplace-relu":
            h = nn.functional.relu(y, inplace=True)
        elif self.segment == "gelu":
            h = nn.functional.gelu(y)
        else:
            h = y
        return [head(h) for head in self.heads]


def measured_norms(model: nn.Module, shared, heads, x: torch.Tensor, steps: int = 3, **options):
    balancer = NormLog()
    session = hooks.attach(shared, balancer, heads=heads, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        outputs = model(x[step])
        loss = session.loss([outputs[0].pow(2).mean(), (outputs[1] - 1).abs().mean()])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return torch.stack(balancer.norms), session


@pytest.fixture(params=["fan-out", "stream"])
def taps_mode(request, monkeypatch):
    """Both ways the taps collect the heads' gradients: all at once, or one by one as they arrive."""
    monkeypatch.setattr(taps_module, "STREAM_ABOVE_BYTES", 0 if request.param == "stream" else 1 << 40)
    return request.param


@pytest.mark.parametrize(
    "segment, shape, expected_path",
    [
        ("relu", (5, 6), "linear-product"),
        ("identity", (5, 6), "linear-product"),
        ("relu-relu", (5, 6), "gram-vjp"),  # the subtraction between the ReLUs is not a mask; 15 positions: the Gram identity
        ("inplace-relu", (5, 6), "linear-product"),
        ("relu", (4, 7, 6), "linear-product"),  # a sequence: W sees (batch, time, features)
        ("gelu", (5, 6), "gram-vjp"),
        ("tied", (5, 6), "batched-vjp"),
    ],
)
def test_each_route_through_the_segment_matches_the_separate_autograd_measurement(segment, shape, expected_path, tmp_path, taps_mode):
    torch.manual_seed(0)
    base = TwoHeadNet(segment).double()
    x = torch.randn(3, *shape, dtype=torch.float64)
    reference_model, tapped_model = copy.deepcopy(base), copy.deepcopy(base)
    reference, _ = measured_norms(reference_model, reference_model.shared, None, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tapped, session = measured_norms(tapped_model, tapped_model.shared, list(tapped_model.heads), x, runs_root=tmp_path, run_name="tapped")
    assert session.taps.path == expected_path
    # Streaming needs a product route; without one the pieces are all held anyway.
    assert session.taps.mode == (taps_mode if expected_path not in ("batched-vjp", "gram-vjp") else "fan-out")
    torch.testing.assert_close(tapped, reference, rtol=1e-10, atol=1e-12)
    session.close()
    assert json.loads((tmp_path / "tapped" / "run.json").read_text())["grad_norm_path"] == f"head-taps/{expected_path}"
    fallback_warned = any("batched vector-Jacobian" in str(w.message) for w in caught)
    assert fallback_warned == (expected_path == "batched-vjp")


def test_a_shared_parameter_rather_than_a_module_takes_the_batched_route():
    torch.manual_seed(0)
    base = TwoHeadNet("relu").double()
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    reference_model, tapped_model = copy.deepcopy(base), copy.deepcopy(base)
    reference, _ = measured_norms(reference_model, reference_model.shared.weight, None, x)
    tapped, session = measured_norms(tapped_model, tapped_model.shared.weight, list(tapped_model.heads), x)
    assert session.taps.path == "batched-vjp"
    torch.testing.assert_close(tapped, reference, rtol=1e-10, atol=1e-12)


def test_a_forward_without_a_balanced_loss_leaves_the_gradient_unchanged():
    """An extra forward/backward outside session.loss (say, an auxiliary loss) passes through the taps."""
    torch.manual_seed(0)
    model = TwoHeadNet("relu")
    plain = copy.deepcopy(model)
    hooks.attach(model.shared, NormLog(), heads=list(model.heads))
    x = torch.randn(5, 6)
    sum(out.sum() for out in model(x)).backward()
    sum(out.sum() for out in plain(x)).backward()
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


class SplitHeadNet(nn.Module):
    """Heads are small MLPs (nested modules), or one shared output layer split by column (no heads)."""

    def __init__(self, split: bool) -> None:
        super().__init__()
        self.shared = nn.Linear(6, 8)
        self.split = split
        if split:
            self.out = nn.Linear(8, 2)
        else:
            self.heads = nn.ModuleList([nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 1)) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = torch.relu(self.shared(x))
        if self.split:
            out = self.out(h)
            return [out[:, :1], out[:, 1:]]
        return [head(h) for head in self.heads]


@pytest.mark.parametrize("split", [False, True])
def test_heads_auto_finds_the_heads_or_keeps_the_general_path(split, tmp_path):
    torch.manual_seed(1)
    base = SplitHeadNet(split).double()
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    reference_model, auto_model = copy.deepcopy(base), copy.deepcopy(base)
    reference, _ = measured_norms(reference_model, reference_model.shared, None, x, steps=4)
    auto, session = measured_norms(auto_model, auto_model.shared, "auto", x, steps=4, runs_root=tmp_path, run_name="auto")
    torch.testing.assert_close(auto, reference, rtol=1e-10, atol=1e-12)
    for a, b in zip(auto_model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    session.close()
    meta = json.loads((tmp_path / "auto" / "run.json").read_text())
    assert not nn.modules.module._global_forward_hooks  # the search ended with the first step
    if split:
        assert session.taps is None
        assert meta["grad_norm_path"] == "autograd-loop"
        assert meta["heads_search"].startswith("no tensor is the input of one module per task")
    else:
        assert session.taps.heads == list(auto_model.heads)  # the enclosing Sequentials, in task order
        assert session.taps.path == "linear-product"
        assert meta["grad_norm_path"] == "head-taps/linear-product (step 0: autograd-loop)"
        assert meta["heads_search"] == "found 2 heads reading one tensor: Sequential, Sequential"


def test_heads_auto_orders_the_heads_by_task_not_by_call():
    """Tasks handed in the reverse order of the heads' calls still get their own head."""
    torch.manual_seed(2)
    model = SplitHeadNet(False)
    session = hooks.attach(model.shared, NormLog(), heads="auto")
    x = torch.randn(5, 6)
    for _ in range(2):
        first, second = model(x)
        loss = session.loss({"b": second.pow(2).mean(), "a": first.abs().mean()})
        loss.backward()
    assert session.taps.heads == [model.heads[1], model.heads[0]]


def test_heads_must_be_modules_or_auto():
    with pytest.raises(ValueError, match="'auto'"):
        hooks.attach(nn.Linear(2, 2), GradNorm(), heads="automatic")


class ConvTwoHeadNet(nn.Module):
    """A shared Conv2d W (with a configurable geometry and segment) and two convolutional heads."""

    def __init__(self, segment: str, **conv) -> None:
        super().__init__()
        self.lower = nn.Conv2d(3, 4, 3, padding=1)
        self.shared = nn.Conv2d(4, 5, 3, **conv)
        self.segment = segment
        self.heads = nn.ModuleList([nn.Conv2d(5, 2, 1), nn.Sequential(nn.Conv2d(5, 5, 3, padding=1), nn.Tanh(), nn.Conv2d(5, 1, 1))])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.shared(torch.relu(self.lower(x)))
        h = torch.relu(y) if self.segment == "relu" else (nn.functional.silu(y) if self.segment == "silu" else y)
        return [head(h) for head in self.heads]


@pytest.mark.parametrize(
    "segment, conv, per_channel, expected_path",
    [
        ("relu", dict(padding=1), False, "conv-product"),
        ("relu", dict(padding=1), True, "conv-product"),
        ("identity", dict(stride=2, padding=2, dilation=2), False, "conv-product"),
        ("relu", dict(padding="same"), False, "batched-vjp"),  # string padding: not taken by the product
        ("silu", dict(padding=1), False, "batched-vjp"),
    ],
)
def test_a_shared_convolution_gets_the_same_norms_on_every_route(segment, conv, per_channel, expected_path, taps_mode):
    torch.manual_seed(3)
    base = ConvTwoHeadNet(segment, **conv).double()
    x = torch.randn(3, 2, 3, 9, 9, dtype=torch.float64)
    reference_model, tapped_model = copy.deepcopy(base), copy.deepcopy(base)

    def norms(model, heads):
        balancer = GradNorm(alpha=1.0, per_channel=per_channel)
        recorded = []
        original = balancer.update

        def keep(losses, grad_norms=None, applied=None, **options):
            recorded.append(grad_norms.clone())
            return original(losses, grad_norms, applied, **options)

        balancer.update = keep
        session = hooks.attach(model.shared, balancer, heads=heads)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(3):
            outputs = model(x[step])
            loss = session.loss([outputs[0].pow(2).mean(), (outputs[1] - 0.5).abs().mean()])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return torch.stack(recorded), session

    reference, _ = norms(reference_model, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tapped, session = norms(tapped_model, list(tapped_model.heads))
    assert session.taps.path == expected_path
    assert session.taps.mode == (taps_mode if expected_path not in ("batched-vjp", "gram-vjp") else "fan-out")
    assert reference.shape == ((3, 2, 5) if per_channel else (3, 2))
    torch.testing.assert_close(tapped, reference, rtol=1e-10, atol=1e-12)
    for a, b in zip(tapped_model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_dense_prediction_network_finds_its_heads_and_takes_the_conv_route(tmp_path, taps_mode):
    from gradnorm.experiments import dense_model

    torch.manual_seed(0)
    base = dense_model.DenseMultiTaskNet(width=8).double()
    scenes = dense_model.make_scenes(6, size=16)
    scenes = dense_model.Scenes(scenes.images.double(), scenes.segmentation, scenes.depth.double(), scenes.normals.double())
    reference_model, auto_model = copy.deepcopy(base), copy.deepcopy(base)

    def run(model, heads, name):
        balancer = NormLog()
        session = hooks.attach(model.shared, balancer, heads=heads, runs_root=tmp_path, run_name=name)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        for step in range(3):
            part = dense_model.batch(scenes, torch.arange(2 * step, 2 * step + 2), torch.device("cpu"))
            loss = session.loss(dict(zip(dense_model.TASKS, dense_model.task_losses(model(part.images), part))))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        session.close()
        return torch.stack(balancer.norms), session

    reference, _ = run(reference_model, None, "general")
    tapped, session = run(auto_model, "auto", "auto")
    torch.testing.assert_close(tapped, reference, rtol=1e-9, atol=1e-12)
    assert session.taps.heads == list(auto_model.heads) and session.taps.path == "conv-product"
    assert session.taps.mode == taps_mode
    assert json.loads((tmp_path / "auto" / "run.json").read_text())["grad_norm_path"] == "head-taps/conv-product (step 0: autograd-loop)"
