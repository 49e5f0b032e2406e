"""Step time and peak memory of GradNorm on model code from ``transformers``, with many tasks.

Models (from configurations, nothing is downloaded):

- a ResNet-18 trunk (``ResNetModel``, ``ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2],
  hidden_sizes=[64, 128, 256, 512])``, 11.2 M parameters), batch 32 of 64x64 images, T binary heads
  (``nn.Linear(512, 1)``, BCE) on the pooled output; W is the last convolution of the last stage
  (``encoder.stages[-1].layers[-1].layer[-1].convolution``, 512 -> 512, 3x3, on 2x2 pixels), behind
  batch norm, the residual add, ReLU and pooling;
- a small BERT-style encoder (``BertModel``, 4 layers, hidden 256, 4 attention heads, intermediate 1024)
  with a sequence head on the pooler output and a token head on the sequence output; W is the last
  layer's output dense (``encoder.layer[-1].output.dense``, a Linear on tokens), behind dropout, the
  residual add and LayerNorm.

GradNorm needs only the norms ||grad_W L_i|| at W (paper section 3), and for a Linear or Conv2d W they
follow from the tasks' gradients D_i at W's output and W's input X by the Gram identity
||D_i^T X||^2 = <D_i D_i^T, X X^T> (the "ghost norm" of per-example clipping: Goodfellow 2015; Li et al.
2022; Opacus), ``hooks/gram_norms.py``. Variants, each on its own copy of the model with the same batches,
timed in interleaved rounds (``interleaved.py``), Adam:

- ``equal``: ``sum(losses).backward()``, the denominator;
- ``floor: equal + Gram norms``: equal weights plus the Gram-identity norms from the captured X and
  stand-in D of the true shapes (the arithmetic any exact n_i by this identity needs, without D's cost);
- ``floor: equal + T weight gradients``: the same with the T weight gradients formed (the direct route);
- ``gradnorm: attach default``: ``gradnorm.attach(W, gradnorm.GradNorm())`` as the README shows (the
  heads found at the first step, the norms tapped from the user's backward by the route ``run.json``
  names: ``gram-vjp`` on these models where the cost model says so);
- ``gradnorm: general path``: ``attach(..., heads=None)``, the separate measurement (``gram-loop`` where
  the cost model says so);
- ``gradnorm: heads="auto"``: the same as the default, spelled out;
- ``gradnorm-pytorch`` (``GradNormLossWeighter``, its own double backward) and ``TorchJD mtl_backward +
  UPGrad`` (a Jacobian of every shared parameter), where installed, at ``--external-tasks`` task counts
  only (TorchJD took 337 s for one step at T = 40 in the issue's run); LibMTL's GradNorm is not adapted.

Peak memory: each variant in a fresh process (glibc told to serve every block of 16 KiB or more by mmap,
as ``bench_memory.py`` does), VmHWM over its steps less VmRSS right after the model and the batches were
built. Threads: ``torch.set_num_threads(1)`` unless ``--threads`` says otherwise.

Needs ``transformers`` (the ``bench`` extra to add to pyproject.toml: ``bench = ["transformers>=4.40"]``).
Usage::

    python benchmarks/bench_real_models.py --markdown benchmarks/results/real_models.md
    python benchmarks/bench_real_models.py --rounds 2 --block 1 --warmup 1 --memory-steps 1 --label "smoke run"
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from interleaved import BatchStep, summarize, time_interleaved  # noqa: E402
from machine_info import describe, publish  # noqa: E402

import gradnorm  # noqa: E402
from gradnorm.hooks import gram_norms  # noqa: E402

EQUAL = "equal"
FLOOR_GRAM = "floor: equal + Gram norms"
FLOOR_DIRECT = "floor: equal + T weight gradients"
ATTACH = "gradnorm: attach default"
GENERAL = "gradnorm: general path"
AUTO = 'gradnorm: heads="auto"'
GRADNORM_PYTORCH = "gradnorm-pytorch"
TORCHJD = "TorchJD mtl_backward + UPGrad"
VARIANTS = (EQUAL, FLOOR_GRAM, FLOOR_DIRECT, ATTACH, GENERAL, AUTO, GRADNORM_PYTORCH, TORCHJD)
EXTERNAL = {"torchjd": TORCHJD, "LibMTL": "LibMTL GradNorm", "gradnorm_pytorch": GRADNORM_PYTORCH}
NUM_BATCHES = 4


@dataclass
class Setup:
    model: nn.Module
    shared: nn.Module  # W's module, in ``model``
    losses_of: Callable[..., list[torch.Tensor]]  # (a copy of the model, batch index[, its features]) -> T losses
    description: str
    features_of: Callable[[nn.Module, int], tuple[torch.Tensor, ...]]  # the tensors the heads read


class ResNetTasks(nn.Module):
    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        from transformers import ResNetConfig, ResNetModel

        config = ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512])
        self.trunk = ResNetModel(config)
        self.heads = nn.ModuleList(nn.Linear(config.hidden_sizes[-1], 1) for _ in range(num_tasks))

    def shared(self, layer: str = "conv") -> nn.Module:
        last = self.trunk.encoder.stages[-1].layers[-1].layer[-1]
        return last.convolution if layer == "conv" else last.normalization  # (its affine weight)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.trunk(pixel_values=images).pooler_output.flatten(1),)

    def outputs(self, features: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        return [head(features[0]).squeeze(1) for head in self.heads]

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.outputs(self.features(images))


class BertTasks(nn.Module):
    TOKEN_CLASSES = 9

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
        from transformers.models.bert.modeling_bert import BertPooler

        # The pooler as its own module, so that the sequence task's head (pooler + classifier) runs once a step.
        self.trunk = BertModel(config, add_pooling_layer=False)
        self.pooler = BertPooler(config)
        self.sequence_head = nn.Linear(256, 2)
        self.token_head = nn.Linear(256, self.TOKEN_CLASSES)
        self.heads = nn.ModuleList([self.sequence_head, self.token_head])

    def shared(self) -> nn.Module:
        return self.trunk.encoder.layer[-1].output.dense

    def features(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.trunk(input_ids=ids).last_hidden_state,)

    def outputs(self, features: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        # The pooler reads the sequence output, as BertModel's own forward does (it is the sequence task's).
        return [self.sequence_head(self.pooler(features[0])), self.token_head(features[0])]

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())

    def forward(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return self.outputs(self.features(ids))


def build(model_name: str, num_tasks: int, args: argparse.Namespace) -> Setup:
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    if model_name == "resnet":
        model: nn.Module = ResNetTasks(num_tasks)
        images = [torch.randn(args.batch, 3, args.size, args.size, generator=generator) for _ in range(NUM_BATCHES)]
        labels = [torch.randint(0, 2, (args.batch, num_tasks), generator=generator).float() for _ in range(NUM_BATCHES)]

        def resnet_losses(net: nn.Module, i: int, features=None) -> list[torch.Tensor]:
            logits = net(images[i % NUM_BATCHES]) if features is None else net.outputs(features)
            target = labels[i % NUM_BATCHES]
            return [F.binary_cross_entropy_with_logits(logit, target[:, t]) for t, logit in enumerate(logits)]

        description = (
            f"ResNet-18 trunk (transformers ResNetModel), batch {args.batch} of {args.size}x{args.size}, {num_tasks} binary heads on the pooled output"
        )
        if args.resnet_layer != "conv":
            description += "; W: the last batch norm's affine weight"
        return Setup(model, model.shared(args.resnet_layer), resnet_losses, description, lambda net, i: net.features(images[i % NUM_BATCHES]))
    model = BertTasks()
    vocab = model.trunk.config.vocab_size
    ids = [torch.randint(0, vocab, (args.bert_batch, args.bert_seq), generator=generator) for _ in range(NUM_BATCHES)]
    sequence_labels = [torch.randint(0, 2, (args.bert_batch,), generator=generator) for _ in range(NUM_BATCHES)]
    token_labels = [torch.randint(0, BertTasks.TOKEN_CLASSES, (args.bert_batch, args.bert_seq), generator=generator) for _ in range(NUM_BATCHES)]

    def bert_losses(net: nn.Module, i: int, features=None) -> list[torch.Tensor]:
        sequence_logits, token_logits = net(ids[i % NUM_BATCHES]) if features is None else net.outputs(features)
        return [
            F.cross_entropy(sequence_logits, sequence_labels[i % NUM_BATCHES]),
            F.cross_entropy(token_logits.flatten(0, 1), token_labels[i % NUM_BATCHES].flatten()),
        ]

    description = (
        f"BERT-style encoder (transformers BertModel, 4 layers, hidden 256), batch {args.bert_batch} x {args.bert_seq} tokens, "
        "a sequence head on the pooler and a token head on the sequence"
    )
    return Setup(model, model.shared(), bert_losses, description, lambda net, i: net.features(ids[i % NUM_BATCHES]))


def _module_path(root: nn.Module, module: nn.Module) -> str:
    return next(name for name, candidate in root.named_modules() if candidate is module)


def make_step(variant: str, setup: Setup, notes: dict[str, str], closers: list[Callable[[], None]]) -> BatchStep:
    """One training step of ``variant`` on its own copy of the model."""
    model = copy.deepcopy(setup.model)
    shared: nn.Module = model.get_submodule(_module_path(setup.model, setup.shared))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def finish(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if variant == EQUAL:
        return lambda i: finish(torch.stack(setup.losses_of(model, i)).sum())

    if variant in (FLOOR_GRAM, FLOOR_DIRECT):
        capture = gram_norms.capture(shared)
        closers.append(capture.remove)
        stand_in: dict[str, torch.Tensor] = {}

        def floor_step(i: int) -> None:
            losses = setup.losses_of(model, i)
            call = capture.calls[-1]
            if "d" not in stand_in:
                stand_in["d"] = torch.randn(len(losses), *call.output_shape)
            d = stand_in["d"]
            if variant == FLOOR_GRAM:
                # As the sketch runs it: one X X^T, the tasks' gradients in chunks of DEFAULT_TASK_CHUNK.
                gram = gram_norms.GramOfInput(gram_norms.input_rows(shared, call.input))
                step = gram_norms.DEFAULT_TASK_CHUNK
                norms = torch.cat([gram.sq_norms(gram_norms.output_rows(shared, d[s : s + step])) for s in range(0, len(losses), step)])
            else:
                norms = gram_norms.direct_sq_norms(shared, call.input, d)
            norms.sqrt()
            capture.clear()
            finish(torch.stack(losses).sum())

        return floor_step

    if variant in (ATTACH, GENERAL, AUTO):
        options = {GENERAL: {"heads": None}, AUTO: {"heads": "auto"}}.get(variant, {})
        session = gradnorm.attach(shared, gradnorm.GradNorm(), **options)
        closers.append(session.close)

        def session_step(i: int) -> None:
            finish(session.loss(setup.losses_of(model, i)))
            # The route of the latest step (the first is measured the general way), as run.json words it.
            if variant == ATTACH and session.taps is not None:
                notes["default route"] = f"head-taps/{session.taps.path}: {session.taps.reason or ''}; heads: {session._heads_search}"
            elif variant == GENERAL and session.meter.choice is not None:
                notes["general route"] = f"{session.meter.choice.route}: {session.meter.choice.reason}"

        return session_step

    if variant == GRADNORM_PYTORCH:
        from gradnorm_pytorch import GradNormLossWeighter

        weighter: Optional[nn.Module] = None

        def gradnorm_pytorch_step(i: int) -> None:
            nonlocal weighter
            losses = setup.losses_of(model, i)
            if weighter is None:
                weighter = GradNormLossWeighter(num_losses=len(losses), learning_rate=1e-4, restoring_force_alpha=1.5, grad_norm_parameters=shared.weight)
            optimizer.zero_grad(set_to_none=True)
            weighter(losses)  # its own backward, the weights' double backward included
            optimizer.step()

        return gradnorm_pytorch_step

    if variant == TORCHJD:
        from torchjd.aggregation import UPGrad
        from torchjd.autojac import jac_to_grad, mtl_backward

        aggregator = UPGrad()
        trunk = model.shared_parameters()  # type: ignore[operator]

        def torchjd_step(i: int) -> None:
            features = setup.features_of(model, i)
            losses = setup.losses_of(model, i, features)
            optimizer.zero_grad(set_to_none=True)
            mtl_backward(losses, features=list(features))
            jac_to_grad(trunk, aggregator)
            optimizer.step()

        return torchjd_step
    raise ValueError(f"unknown variant {variant!r}")


# -- peak memory, one process per variant ---------------------------------------------------------------
def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure_memory(variant: str, model_name: str, num_tasks: int, args: argparse.Namespace) -> dict[str, float]:
    setup = build(model_name, num_tasks, args)
    closers: list[Callable[[], None]] = []
    step = make_step(variant, setup, {}, closers)
    baseline = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here on
    for i in range(args.memory_steps):
        step(i)
    peak = _status_bytes("VmHWM") - baseline
    for close in closers:
        close()
    return {"peak_growth_bytes": peak}


def memory_in_subprocess(variant: str, model_name: str, num_tasks: int, args: argparse.Namespace) -> Optional[float]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="16384", MALLOC_TRIM_THRESHOLD_="0")
    command = [sys.executable, __file__, "--child", variant, "--child-model", model_name, "--tasks", str(num_tasks), *_shared_args(args)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"memory of {variant} ({model_name}, T={num_tasks}) failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_growth_bytes"]


def _shared_args(args: argparse.Namespace) -> list[str]:
    return [
        "--threads", str(args.threads), "--seed", str(args.seed), "--batch", str(args.batch), "--size", str(args.size),
        "--bert-batch", str(args.bert_batch), "--bert-seq", str(args.bert_seq), "--memory-steps", str(args.memory_steps),
        "--external-tasks", *[str(t) for t in args.external_tasks], "--resnet-layer", args.resnet_layer,
    ]  # fmt: skip


# -- report --------------------------------------------------------------------------------------------------
def run_config(model_name: str, num_tasks: int, args: argparse.Namespace) -> dict:
    setup = build(model_name, num_tasks, args)
    notes: dict[str, str] = {}
    closers: list[Callable[[], None]] = []
    names = [name for name in args.variants if _runs(name, model_name, num_tasks, args)]
    variants = {name: make_step(name, setup, notes, closers) for name in names}
    # The training thread's CPU time: what other jobs on a shared machine take is not counted.
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    summary = summarize(time_interleaved(variants, torch.device("cpu"), args.rounds, args.block, args.warmup, args.seed, clock=clock), baseline=EQUAL)
    for close in closers:
        close()
    if args.memory_steps > 0:
        memory = {name: memory_in_subprocess(name, model_name, num_tasks, args) for name in names}
        equal = memory.get(EQUAL)
        for name, peak in memory.items():
            summary[name]["peak_mb"] = None if peak is None else peak / 1e6
            summary[name]["peak_ratio"] = None if peak is None or not equal else peak / equal
    return {"model": model_name, "tasks": num_tasks, "description": setup.description, "summary": summary, "notes": notes}


def _runs(variant: str, model_name: str, num_tasks: int, args: argparse.Namespace) -> bool:
    """Whether ``variant`` runs at this configuration (the other libraries: installed, and at the task counts asked)."""
    module = {GRADNORM_PYTORCH: "gradnorm_pytorch", TORCHJD: "torchjd"}.get(variant)
    if module is None:
        return True
    if importlib.util.find_spec(module) is None:
        return False
    return model_name == "bert" or num_tasks in args.external_tasks


def _cell(value: Optional[float], pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def to_markdown(results: list[dict], args: argparse.Namespace) -> str:
    machine = describe(f"{torch.get_num_threads()} torch threads", f"torch {torch.__version__}", f"transformers {_version('transformers')}")
    load = os.getloadavg()
    lines = [
        f"### {time.strftime('%Y-%m-%d')}, cpu: {machine}" + (f" ({args.label})" if args.label else ""),
        "",
        f"{args.rounds} rounds x {args.block} steps per variant, interleaved, after {args.warmup} warm-up steps; median step time, "
        f"ratio to `equal` from the same run ({'the training thread' + chr(39) + 's CPU time' if args.clock == 'thread' else 'wall time'}). Peak: VmHWM over {args.memory_steps} steps less VmRSS after building the model, one "
        f"process per variant. Load average at the end: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} on {os.cpu_count()} cores.",
    ]
    if args.label:
        lines += ["", f"**{args.label}.** {args.note}".rstrip()]
    missing = [label for module, label in EXTERNAL.items() if importlib.util.find_spec(module) is None]
    if missing:
        lines += ["", f"Not run (not installed): {', '.join(missing)}."]
    for result in results:
        lines += ["", f"#### {result['description']}", "", "| variant | ms | time ratio | peak growth MB | peak ratio |", "|---|---|---|---|---|"]
        for name, entry in result["summary"].items():
            lines.append(
                f"| {name} | {entry['median_ms']:.1f} | {entry['ratio']:.2f}x | {_cell(entry.get('peak_mb'), '{:.0f}')} | {_cell(entry.get('peak_ratio'), '{:.2f}x')} |"
            )
        for key in ("default route", "general route"):
            if key in result["notes"]:
                lines += ["", f"{key}: {_shorten(result['notes'][key])}"]
    resnet = [r for r in results if r["model"] == "resnet"]
    if len(resnet) > 1:
        lines += ["", "#### How the cost grows with T (ResNet-18, time ratio to `equal`)", ""]
        names = [n for n in VARIANTS if any(n in r["summary"] for r in resnet)]
        lines += ["| T | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for result in resnet:
            cells = [f"{result['summary'][n]['ratio']:.2f}x" if n in result["summary"] else "not run" for n in names]
            lines.append(f"| {result['tasks']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _shorten(note: str) -> str:
    """A note with runs of one name (the 40 heads' class names) written once with their count."""
    return re.sub(r"\b(\w+)(?:, \1\b){2,}", lambda run: f"{run.group(1)} x {run.group(0).count(run.group(1))}", note)


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=["resnet", "bert"], default=["resnet", "bert"])
    parser.add_argument("--tasks", type=int, nargs="+", default=[3, 40, 100], help="ResNet-18 head counts (the encoder has 2 tasks)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--bert-batch", type=int, default=16)
    parser.add_argument("--bert-seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--block", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--memory-steps", type=int, default=5, help="steps per memory process (0: no memory figures)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--resnet-layer", choices=["conv", "norm"], default="conv", help="W: the last convolution, or the batch norm after it")
    parser.add_argument("--clock", choices=["thread", "wall"], default="thread", help="the training thread's CPU time (default) or wall time")
    parser.add_argument("--external-tasks", type=int, nargs="*", default=[3], help="ResNet-18 head counts at which the other libraries run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="", help="a label for the results section, e.g. 'smoke run'")
    parser.add_argument("--note", default="", help="a sentence shown under the label")
    parser.add_argument("--markdown", type=Path, default=None, help="append a results section to this file")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child is not None:
        print(json.dumps(measure_memory(args.child, args.child_model, args.tasks[0], args)))
        return 0
    results = []
    for model_name in args.models:
        for num_tasks in args.tasks if model_name == "resnet" else [2]:
            result = run_config(model_name, num_tasks, args)
            print(json.dumps(result, indent=1), flush=True)
            results.append(result)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    publish(to_markdown(results, args), args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
