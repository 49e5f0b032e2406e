"""The README's attach on model code nobody here wrote: a ResNet-style trunk and a BERT-style encoder from
``transformers`` (small configurations, built from configs, nothing downloaded). Batch norm, the residual
add, ReLU and pooling (LayerNorm, dropout and the pooler in the encoder) stand between the shared layer W
and the heads, so no product route applies; the taps take the Gram route (``gram-vjp``) and the general
path ``gram-loop``. In float64 both give the weight trajectory and the norms of an independent
double-backward implementation of the paper's equations (``tests/helpers/reference.py``) and of the
per-task loop, and ``run.json`` names the route and why.
"""

from __future__ import annotations

import copy
import json

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradnorm
from tests.helpers.reference import reference_gradnorm

transformers = pytest.importorskip("transformers", reason="the real-architecture tests build their models with transformers (the bench extra)")

STEPS = 5
ALPHA = 1.5


class ResNetTasks(nn.Module):
    """transformers' ResNetModel (basic blocks, depths [1, 1], 8 and 16 channels) and T binary heads."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        config = transformers.ResNetConfig(layer_type="basic", depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8)
        self.trunk = transformers.ResNetModel(config)
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(num_tasks))

    def last_conv(self) -> nn.Conv2d:
        return self.trunk.encoder.stages[-1].layers[-1].layer[-1].convolution

    def last_norm(self) -> nn.BatchNorm2d:
        return self.trunk.encoder.stages[-1].layers[-1].layer[-1].normalization

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        pooled = self.trunk(pixel_values=images).pooler_output.flatten(1)
        return [head(pooled).squeeze(1) for head in self.heads]


class BertTasks(nn.Module):
    """A one-layer BertModel (hidden 32, intermediate 128), a sequence head on the pooler, a token head."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        config = transformers.BertConfig(
            vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
            max_position_embeddings=16, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        )  # fmt: skip
        self.trunk = transformers.BertModel(config)
        self.sequence_head = nn.Linear(32, 2)
        self.token_head = nn.Linear(32, 5)

    def last_dense(self) -> nn.Linear:
        return self.trunk.encoder.layer[-1].output.dense

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.trunk(input_ids=ids)
        return self.sequence_head(out.pooler_output), self.token_head(out.last_hidden_state)


def resnet_batches(num_tasks: int, steps: int = STEPS) -> list[tuple]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 2, (4, num_tasks), generator=g).double()) for _ in range(steps)]


def resnet_losses(model: nn.Module, batch: tuple) -> list[torch.Tensor]:
    images, labels = batch
    return [F.binary_cross_entropy_with_logits(logit, labels[:, t]) for t, logit in enumerate(model(images))]


def bert_batches(steps: int = STEPS) -> list[tuple]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randint(0, 40, (2, 4), generator=g), torch.randint(0, 2, (2,), generator=g), torch.randint(0, 5, (2, 4), generator=g)) for _ in range(steps)]


def bert_losses(model: nn.Module, batch: tuple) -> list[torch.Tensor]:
    ids, sequence_labels, token_labels = batch
    torch.manual_seed(7)  # the same dropout masks in every variant's forward pass of this batch
    sequence_logits, token_logits = model(ids)
    return [F.cross_entropy(sequence_logits, sequence_labels), F.cross_entropy(token_logits.flatten(0, 1), token_labels.flatten())]


def train(model: nn.Module, layer, batches, loss_fn, root, name: str, **options):
    session = gradnorm.attach(layer(model), gradnorm.GradNorm(alpha=ALPHA, lr=0.025), runs_root=root, run_name=name, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    weights = []
    with session:
        for batch in batches:
            loss = session.loss(loss_fn(model, batch))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            weights.append(session.balancer.weights().clone())
    table = pq.read_table(root / name / "metrics").to_pandas()
    table = table[table["split"] == "train"]
    table = table.assign(order=table["task"].map({task: i for i, task in enumerate(session.tasks)})).sort_values(["step", "order"])
    meta = json.loads((root / name / "run.json").read_text())
    return torch.stack(weights), torch.tensor(table["grad_norm"].to_numpy()), meta, session


def double(make):
    torch.manual_seed(0)
    return make().double()


def check_against_reference(model, layer, batches, loss_fn, tmp_path, expected_taps: str, expected_general: str) -> dict:
    """Default attach, the forced general path and the per-task loop against double backward, in float64."""
    num_tasks = len(loss_fn(copy.deepcopy(model), batches[0]))
    twin = copy.deepcopy(model)
    reference = reference_gradnorm(twin, layer(twin).weight, batches, loss_fn, alpha=ALPHA)
    expected_norms = torch.tensor([n for step in reference.steps for n in step.grad_norms], dtype=torch.float64)
    expected_weights = torch.tensor([step.weights_before for step in reference.steps[1:]] + [reference.final_weights], dtype=torch.float64)
    assert (expected_weights[-1] - 1).abs().max() > 1e-3, "the weights did not move: the comparison would prove nothing"
    metas = {}
    for name, options in {"default": {}, "general": {"heads": None}}.items():
        weights, norms, meta, session = train(copy.deepcopy(model), layer, batches, loss_fn, tmp_path, name, **options)
        assert norms.shape == (STEPS * num_tasks,)
        torch.testing.assert_close(norms, expected_norms, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(weights.double(), expected_weights, rtol=1e-9, atol=1e-12)
        metas[name] = (meta, session)
    meta, session = metas["default"]
    assert session.taps is not None and session.taps.path == expected_taps
    assert meta["grad_norm_path"] == f"head-taps/{expected_taps} (step 0: {expected_general})"
    if expected_taps == "gram-vjp":
        assert meta["head_taps_route"].startswith(f"{expected_taps}: ")
    else:  # a layer the Gram identity does not cover: no cost model ran, no reason recorded
        assert "head_taps_route" not in meta
    general_meta, general_session = metas["general"]
    assert general_session.taps is None and general_meta["grad_norm_path"] == expected_general
    assert general_meta["grad_norm_route"].startswith(f"{expected_general}: ")
    return {name: meta for name, (meta, _) in metas.items()}


@pytest.mark.parametrize("num_tasks", [3, 12])
def test_resnet_trunk_default_attach_takes_the_gram_route_and_matches_double_backward(num_tasks, tmp_path):
    model = double(lambda: ResNetTasks(num_tasks))
    metas = check_against_reference(model, ResNetTasks.last_conv, resnet_batches(num_tasks), resnet_losses, tmp_path, "gram-vjp", "gram-loop")
    # The reason states the shapes and both estimates (last conv: 16 -> 16 channels, 3x3, on 2x2 pixels of 4 images).
    reason = metas["default"]["head_taps_route"]
    assert f"P=16 positions, d_in=144, d_out=16, T={num_tasks}" in reason and "by the Gram identity" in reason


def test_bert_encoder_default_attach_takes_the_gram_route_and_matches_double_backward(tmp_path):
    model = double(BertTasks)
    metas = check_against_reference(model, BertTasks.last_dense, bert_batches(), bert_losses, tmp_path, "gram-vjp", "gram-loop")
    assert "heads reading one tensor: BertPooler, Linear" in metas["default"]["heads_search"]


def test_bert_encoder_with_dropout_gets_the_same_trajectory_on_every_path(tmp_path):
    """Dropout between W and the heads: the Gram route's batched product reuses the forward pass's masks."""
    model = double(lambda: BertTasks(dropout=0.2))
    check_against_reference(model, BertTasks.last_dense, bert_batches(), bert_losses, tmp_path, "gram-vjp", "gram-loop")


def test_attach_on_the_last_batch_norms_affine_weight(tmp_path):
    """A norm layer's affine weight (C,) is a supported W: no product or Gram route (it is no Linear or
    Conv2d), so the taps take the batched product and the general path the per-task loop; both match the
    double-backward reference."""
    model = double(lambda: ResNetTasks(3))
    check_against_reference(model, ResNetTasks.last_norm, resnet_batches(3), resnet_losses, tmp_path, "batched-vjp", "autograd-loop")


def test_heads_given_that_read_different_tensors_are_refused_naming_both_tensors():
    model = BertTasks()
    session = gradnorm.attach(model.last_dense(), gradnorm.GradNorm(), heads=[model.sequence_head, model.token_head])
    with session, pytest.raises(ValueError) as caught:
        bert_losses(model, bert_batches(1)[0])
    message = str(caught.value)
    assert "head 0 (Linear) read a (2, 32) float32 tensor from TanhBackward0" in message
    assert "head 1 (Linear) reads a (2, 4, 32) float32 tensor from NativeLayerNormBackward0" in message
    assert 'heads="auto"' in message and "heads=None" in message


def test_the_benchmarks_encoder_takes_the_direct_route_and_resnet18_the_gram_route():
    """The cost model at the benchmark's shapes (benchmarks/bench_real_models.py): the encoder's output dense
    on 2048 tokens forms its two weight gradients; ResNet-18's last convolution on 2x2 pixels uses the Gram identity."""
    from gradnorm.hooks import gram_norms

    dense = nn.Linear(1024, 256)
    route, _ = gram_norms.choose_route(dense, (16, 128, 1024), (16, 128, 256), 2)
    assert route == gram_norms.DIRECT
    conv = nn.Conv2d(512, 512, 3, padding=1, bias=False)
    for tasks in (3, 40, 100):
        route, reason = gram_norms.choose_route(conv, (32, 512, 2, 2), (32, 512, 2, 2), tasks)
        assert route == gram_norms.GRAM, reason
