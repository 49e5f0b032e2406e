"""The Transformers Trainer integration: the same weights as a plain PyTorch loop on the same batches, the
run read back through the analysis, every hook removed at the end of training, and gradient accumulation
as the session's ``accumulate=`` (the plain loop's accumulate=2, bit for bit).

The model is a one-layer BERT built from a config (nothing is downloaded) with two task heads on its
pooled output: a 2-class label and a regression target. W is the pooler's dense layer, the last layer
the two tasks share (paper 3.1).
"""

from __future__ import annotations

import copy

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'gradnorm-toolkit[huggingface]')")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install 'gradnorm-toolkit[huggingface]')")

from gradnorm import hooks  # noqa: E402  (after importorskip)
from gradnorm.hooks.head_finder import COMPILED_REASON  # noqa: E402
from gradnorm.hooks.hf_trainer import GradNormCallback, GradNormTrainer  # noqa: E402
from gradnorm.toolkit import analysis, runs, schema  # noqa: E402
from gradnorm.toolkit.balancers import GradNorm  # noqa: E402
from tests.hooks.test_lifecycle import global_hooks, hooks_left  # noqa: E402

SAMPLES, BATCH, EPOCHS, LENGTH, VOCAB = 48, 8, 2, 12, 40
STEPS = EPOCHS * SAMPLES // BATCH
TASKS = ["topic", "density"]


class TwoTaskBert(nn.Module):
    """A tiny BERT encoder (from a config) with a classification and a regression head on the pooled output."""

    def __init__(self) -> None:
        super().__init__()
        config = transformers.BertConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=LENGTH,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        torch.manual_seed(0)
        self.encoder = transformers.BertModel(config)
        self.topic = nn.Linear(16, 2)
        self.density = nn.Linear(16, 1)

    def forward(self, input_ids, attention_mask, topic=None, density=None):
        pooled = self.encoder(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return {"topic": self.topic(pooled), "density": self.density(pooled).squeeze(-1)}


def task_losses(outputs, inputs):
    return {
        "topic": nn.functional.cross_entropy(outputs["topic"], inputs["topic"]),
        "density": nn.functional.mse_loss(outputs["density"], inputs["density"]),
    }


class Sentences(torch.utils.data.Dataset):
    """Random token sequences; topic: whether token 1 occurs more than token 2; density: the share of tokens below 10."""

    def __init__(self, count: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (count, LENGTH), generator=generator)
        self.ids[:, 0] = 0
        self.ids[torch.rand(count, LENGTH, generator=generator) < 0.2] = 1
        self.ids[torch.rand(count, LENGTH, generator=generator) < 0.2] = 2
        self.topic = ((self.ids == 1).sum(1) > (self.ids == 2).sum(1)).long()
        self.density = 10 * (self.ids < 10).float().mean(1)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long), "topic": self.topic[i], "density": self.density[i]}


class Trajectory(transformers.TrainerCallback):
    """GradNorm's weights after each optimiser step (added after the GradNorm callback, so its session exists)."""

    def __init__(self, callback: GradNormCallback) -> None:
        self.callback = callback
        self.weights: list[torch.Tensor] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.weights.append(self.callback.session.balancer.weights().clone())


def arguments(tmp_path, **overrides):
    options = dict(
        output_dir=str(tmp_path / "trainer"),
        num_train_epochs=EPOCHS,
        per_device_train_batch_size=BATCH,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,  # the Trainer's default clipping, reproduced by the plain loop
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    options.update(overrides)
    return transformers.TrainingArguments(**options)


def recording(batches: list):
    """task_losses that also keeps each training batch the Trainer handed to compute_loss, in order."""

    def losses(outputs, inputs):
        if torch.is_grad_enabled():
            batches.append({key: value.clone() for key, value in inputs.items()})
        return task_losses(outputs, inputs)

    return losses


def train_with_trainer(base: TwoTaskBert, tmp_path, heads="auto", **argument_overrides):
    model = copy.deepcopy(base)
    callback = GradNormCallback(lambda m: m.encoder.pooler.dense, GradNorm(alpha=1.5), heads=heads, runs_root=tmp_path / "runs", run_name="trainer")
    trajectory = Trajectory(callback)
    batches: list = []
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    trainer = GradNormTrainer(
        model=model,
        args=arguments(tmp_path, **argument_overrides),
        train_dataset=Sentences(SAMPLES),
        gradnorm=callback,
        task_losses=recording(batches),
        callbacks=[trajectory],
        optimizers=(optimizer, None),
    )
    before = global_hooks()
    trainer.train()
    return model, callback, torch.stack(trajectory.weights), batches, hooks_left(model, before)


def plain_loop(base: TwoTaskBert, batches: list, tmp_path):
    """The README's loop on the same batches, in the same order, with the Trainer's clipping."""
    model = copy.deepcopy(base)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    session = hooks.attach(model.encoder.pooler.dense, GradNorm(alpha=1.5), runs_root=tmp_path / "runs", run_name="plain")
    trajectory = []
    model.train()
    for inputs in batches:
        loss = session.loss(task_losses(model(**inputs), inputs))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        trajectory.append(session.balancer.weights().clone())
    session.close()
    return model, torch.stack(trajectory)


@pytest.fixture(scope="module")
def base() -> TwoTaskBert:
    return TwoTaskBert()


@pytest.mark.parametrize("heads", ["auto", None])
def test_the_trainer_trains_as_the_plain_loop_and_records_the_run(base, tmp_path, heads):
    model, callback, weights, batches, left = train_with_trainer(base, tmp_path, heads=heads)
    assert len(batches) == STEPS and weights.shape == (STEPS, 2)
    # GradNorm moved the weights: equal weights would make the comparison below say little.
    assert (weights[-1] - 1).abs().max() > 1e-3
    plain, expected = plain_loop(base, batches, tmp_path)
    torch.testing.assert_close(weights, expected, rtol=0, atol=0)
    for (name, trained), (_, reference) in zip(model.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(trained, reference, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")

    session = callback.session
    assert session.closed and left == []  # closed at on_train_end, every hook removed
    meta = runs.read_run_json(tmp_path / "runs" / "trainer")
    assert meta["status"] == "finished" and meta["tasks"] == TASKS
    if heads == "auto":
        assert meta["grad_norm_path"].startswith("head-taps/"), meta["grad_norm_path"]
    else:
        assert not meta["grad_norm_path"].startswith("head-taps"), meta["grad_norm_path"]
    listing = analysis.list_runs(tmp_path / "runs").set_index("run_id")
    assert listing.loc["trainer", "rows"] == STEPS * 2
    # the recorded w_i(t) is the weight step t trained with: 1 at step 0, then the weights after step t - 1
    applied = torch.cat([torch.ones(1, 2), weights[:-1]]).double()
    series = analysis.metric_series(tmp_path / "runs", ["trainer", "plain"], "weight")
    for run in ("trainer", "plain"):
        frame = series[series["run_id"] == run]
        for index, task in enumerate(TASKS):
            rows = frame[frame["task"] == task].sort_values("x")
            assert rows["x"].tolist() == list(range(STEPS))
            torch.testing.assert_close(torch.tensor(rows["value"].tolist(), dtype=torch.float64), applied[:, index], rtol=0, atol=1e-7)
    average = analysis.weight_average(tmp_path / "runs", "trainer")
    window = applied[average.start_step : average.end_step + 1]
    for index, task in enumerate(TASKS):
        assert average.weights[task] == pytest.approx(float(window[:, index].mean()), rel=1e-6)
    # the epoch of each row comes from the Trainer's state: the first half of the steps is epoch 0
    table = pq.read_table(tmp_path / "runs" / "trainer" / "metrics").to_pandas()
    train = table[table["split"] == "train"]
    assert {int(step): int(epoch) for step, epoch in zip(train["step"], train["epoch"])} == {step: step * EPOCHS // STEPS for step in range(STEPS)}


def test_evaluation_records_validation_losses_and_leaves_the_weights(base, tmp_path):
    model = copy.deepcopy(base)
    callback = GradNormCallback(lambda m: m.encoder.pooler.dense, GradNorm(alpha=1.5), runs_root=tmp_path / "runs", run_name="eval")
    trainer = GradNormTrainer(
        model=model,
        args=arguments(tmp_path, num_train_epochs=1, eval_strategy="epoch", label_names=["topic", "density"], per_device_eval_batch_size=16),
        train_dataset=Sentences(SAMPLES),
        eval_dataset=Sentences(32, seed=1),
        gradnorm=callback,
        task_losses=task_losses,
    )
    trainer.train()
    steps = SAMPLES // BATCH
    assert callback.session.step_index == steps  # evaluation did not step the session
    model.eval()
    evaluation = Sentences(32, seed=1)
    with torch.no_grad():
        expected = {task: 0.0 for task in TASKS}
        for start in (0, 16):
            part = {key: torch.stack([evaluation[i][key] for i in range(start, start + 16)]) for key in ("input_ids", "attention_mask", "topic", "density")}
            for task, value in task_losses(model(**part), part).items():
                expected[task] += float(value) / 2
    validation = analysis.metric_series(tmp_path / "runs", "eval", "loss", split=schema.VALIDATION)
    assert set(validation["x"]) == {steps}
    for task in TASKS:
        assert validation.loc[validation["task"] == task, "value"].item() == pytest.approx(expected[task], rel=1e-5)
    # the balancer belongs to this run: a second train() with the same callback is refused, the run stays finished
    with pytest.raises(RuntimeError, match="already trained once"):
        trainer.train()
    assert runs.read_run_json(tmp_path / "runs" / "eval")["status"] == "finished"


def test_gradient_accumulation_is_the_sessions_accumulate(base, tmp_path):
    """gradient_accumulation_steps=2: the plain loop with accumulate=2, each micro-batch's loss halved, one update per optimiser step."""
    model, callback, weights, batches, left = train_with_trainer(base, tmp_path, gradient_accumulation_steps=2)
    assert len(batches) == STEPS and weights.shape == (STEPS // 2, 2) and left == []
    assert (weights[-1] - 1).abs().max() > 1e-3
    plain = copy.deepcopy(base)
    optimizer = torch.optim.Adam(plain.parameters(), lr=1e-3)
    session = hooks.attach(plain.encoder.pooler.dense, GradNorm(alpha=1.5), accumulate=2)
    expected = []
    plain.train()
    for first in range(0, STEPS, 2):
        for inputs in batches[first : first + 2]:
            (session.loss(task_losses(plain(**inputs), inputs)) / 2).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        expected.append(session.balancer.weights().clone())
    session.close()
    torch.testing.assert_close(weights, torch.stack(expected), rtol=0, atol=0)
    for trained, reference in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(trained, reference, rtol=0, atol=0)
    assert callback.session.accumulate == 2
    meta = runs.read_run_json(tmp_path / "runs" / "trainer")
    assert "accumulate=2" in meta["grad_norm_path"], meta["grad_norm_path"]
    assert analysis.list_runs(tmp_path / "runs").set_index("run_id").loc["trainer", "rows"] == STEPS // 2 * 2  # one row per task and optimiser step


def test_an_epoch_that_does_not_divide_into_the_accumulation_is_refused(base, tmp_path):
    callback = GradNormCallback(lambda m: m.encoder.pooler.dense, GradNorm(alpha=1.5))
    trainer = GradNormTrainer(
        model=copy.deepcopy(base),
        args=arguments(tmp_path, gradient_accumulation_steps=4),
        train_dataset=Sentences(SAMPLES),
        gradnorm=callback,
        task_losses=task_losses,
    )
    with pytest.raises(ValueError, match=r"6 batches, not a multiple of .*gradient_accumulation_steps=4"):
        trainer.train()


def test_a_failing_training_closes_the_run_as_failed_and_removes_the_hooks(base, tmp_path):
    model = copy.deepcopy(base)
    callback = GradNormCallback(lambda m: m.encoder.pooler.dense, GradNorm(alpha=1.5), runs_root=tmp_path / "runs", run_name="boom", flush_every=1)
    calls = []

    def failing(outputs, inputs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom")
        return task_losses(outputs, inputs)

    trainer = GradNormTrainer(model=model, args=arguments(tmp_path), train_dataset=Sentences(SAMPLES), gradnorm=callback, task_losses=failing)
    before = global_hooks()
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert callback.session.closed and hooks_left(model, before) == []
    assert runs.read_run_json(tmp_path / "runs" / "boom")["status"] == "failed"
    assert analysis.list_runs(tmp_path / "runs")["rows"].iloc[0] == 3 * 2


def test_outputs_without_losses_are_refused_clearly(base, tmp_path):
    callback = GradNormCallback(lambda m: m.encoder.pooler.dense, GradNorm(alpha=1.5))
    trainer = GradNormTrainer(model=copy.deepcopy(base), args=arguments(tmp_path), train_dataset=Sentences(SAMPLES), gradnorm=callback)
    with pytest.raises(ValueError, match="no 'losses' mapping"):
        trainer.train()


@pytest.mark.slow  # compiling the BERT encoder takes 15-30 s on 2 shared cores
def test_the_trainers_torch_compile_gets_the_general_path_and_the_eager_weights(base, tmp_path):
    """TrainingArguments(torch_compile=True): the head search sees the compiled model, warns and leaves the taps unused."""
    torch._dynamo.reset()
    try:
        with pytest.warns(RuntimeWarning, match="torch.compile"):
            _, callback, weights, batches, left = train_with_trainer(base, tmp_path, torch_compile=True, torch_compile_backend="aot_eager")
    finally:
        torch._dynamo.reset()
    assert callback.session.taps is None and left == []
    meta = runs.read_run_json(tmp_path / "runs" / "trainer")
    assert meta["heads_search"] == COMPILED_REASON and meta["skipped_updates"] == 0
    _, expected = plain_loop(base, batches, tmp_path)
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)


def test_the_trainers_logs_carry_the_recorded_weights_for_report_to(base, tmp_path):
    """GradNormCallback(log=True, the default): at the Trainer's logging steps its logs (what every report_to
    integration receives) hold the recorded per-task quantities, each row with its own gradnorm/step."""
    callback = GradNormCallback(lambda m: m.encoder.pooler.dense, GradNorm(alpha=1.5), runs_root=tmp_path / "runs", run_name="trainer")
    model = copy.deepcopy(base)
    trainer = GradNormTrainer(
        model=model,
        args=arguments(tmp_path, logging_strategy="steps", logging_steps=2),
        train_dataset=Sentences(SAMPLES),
        gradnorm=callback,
        task_losses=task_losses,
        optimizers=(torch.optim.Adam(model.parameters(), lr=1e-3), None),
    )
    trainer.train()
    trainer_logs = [entry for entry in trainer.state.log_history if "gradnorm/step" in entry]
    assert callback.logged_rows is not None and len(trainer_logs) >= 2
    recorded = analysis.metric_series(tmp_path / "runs", ["trainer"], "weight")
    by_step = {(int(x), task): value for x, task, value in zip(recorded["x"], recorded["task"], recorded["value"])}
    steps = [int(entry["gradnorm/step"]) for entry in trainer_logs]
    assert steps == sorted(steps) and all(step % 2 == 0 for step in steps), steps  # every 2nd recorded step, in order
    for entry in trainer_logs:
        assert "loss" in entry  # a training step's logs, not an evaluation's
        for task in TASKS:
            assert entry[f"gradnorm/weight/{task}"] == pytest.approx(by_step[(int(entry["gradnorm/step"]), task)], rel=1e-6)
    forwarding = runs.read_run_json(tmp_path / "runs" / "trainer")["forwarding"]["trainer"]
    assert forwarding["failed"] == 0 and forwarding["sent"] >= len(trainer_logs)
