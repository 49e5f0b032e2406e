"""``gradnorm compare --dataset scenes``: the encoder-decoder's generated scenes, every method from one
initialisation; the NYUv2-style metrics, Delta_m% and the interleaved step cost, each checked against an
independent computation."""

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest
import torch

from gradnorm import cli
from gradnorm.experiments import compare, dense_model

METHODS = ["equal", "gradnorm", "static", "famo", "mgda"]


def hand_metrics(outputs, scenes, classes):
    """The four metrics by plain loops and numpy, not by the library's code."""
    seg, depth, normals = (o.detach().double().numpy() for o in outputs)
    true_seg = scenes.segmentation.numpy()
    predicted = seg.argmax(1)
    ious = []
    for c in range(classes):
        truth, guess = true_seg == c, predicted == c
        union = np.logical_or(truth, guess).sum()
        if union:
            ious.append(np.logical_and(truth, guess).sum() / union)
    pred_n = normals / np.linalg.norm(normals, axis=1, keepdims=True)
    cos = np.clip((pred_n * scenes.normals.double().numpy()).sum(1), -1, 1)
    return {
        "depth_abs_err": float(np.abs(depth - scenes.depth.double().numpy()).mean()),
        "normal_angle_deg": float(np.degrees(np.arccos(cos)).mean()),
        "miou": float(np.mean(ious)),
        "pixel_acc": float((predicted == true_seg).mean()),
    }


def test_scene_metrics_match_a_hand_computation_over_chunks():
    classes = 4
    scenes = dense_model.make_scenes(6, size=8, classes=classes, seed=3, noise=0.3)
    generator = torch.Generator().manual_seed(0)
    outputs = [
        torch.randn(6, classes, 8, 8, generator=generator),
        1 + 3 * torch.rand(6, 1, 8, 8, generator=generator),
        torch.randn(6, 3, 8, 8, generator=generator),
    ]
    outputs[0][:, 3] -= 10.0  # class 3 never predicted: its IoU is 0 where it is true, and it still counts
    parts = [
        compare.scene_metrics([o[rows] for o in outputs], dense_model.batch(scenes, rows, torch.device("cpu")), classes)
        for rows in (torch.arange(0, 4), torch.arange(4, 6))
    ]
    library = compare.summarize_scene_metrics(parts)
    expected = hand_metrics(outputs, scenes, classes)
    assert library == pytest.approx(expected, rel=1e-6)  # torch's cosine_similarity clamps the norms at 1e-8
    assert bool((scenes.segmentation == 3).any())  # the never-predicted class is in the truth: an IoU of 0 in the mean


def test_delta_m_flips_the_sign_of_higher_is_better_metrics():
    base = {"depth_abs_err": 0.5, "normal_angle_deg": 20.0, "miou": 0.5, "pixel_acc": 0.8}
    other = {"depth_abs_err": 0.25, "normal_angle_deg": 30.0, "miou": 0.6, "pixel_acc": 0.8}
    # depth -50%, normals +50%, mIoU +20% (better: -20), pixel accuracy 0
    assert compare.delta_m(other, base, compare.SCENE_HIGHER_BETTER) == pytest.approx(100 * (-0.5 + 0.5 - 0.2 + 0.0) / 4)


@pytest.fixture(scope="module")
def tiny_scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    out = root / "table.md"
    code = cli.main(
        ["compare", "--dataset", "scenes", "--methods", *METHODS, "--seeds", "1", "--scenes-steps", "4", "--scenes-train", "12", "--scenes-test", "6"]
        + ["--scenes-size", "8", "--cost-rounds", "2", "--cost-block", "1", "--runs-root", str(root / "runs"), "--out", str(out), "--no-progress"]
    )
    assert code == 0
    return root / "runs", out.read_text()


def rows_of(text, title):
    section = text.split(f"### {title}", 1)[1].split("###", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "method":
            rows[cells[0]] = cells[1:]
    return rows


def test_the_table_holds_every_method_and_the_single_task_baseline(tiny_scenes):
    runs, text = tiny_scenes
    rows = rows_of(text, "Generated scenes")
    assert list(rows) == METHODS + ["single-task"]
    results = [json.loads(line) for line in (runs / "scenes-results.jsonl").read_text().splitlines()]
    by_method = {r["method"]: r for r in results}
    assert set(by_method) == set(METHODS) | {"single-segmentation", "single-depth", "single-normals"}
    equal = by_method["equal"]["task_errors"]
    single = {
        "depth_abs_err": by_method["single-depth"]["task_errors"]["depth_abs_err"],
        "normal_angle_deg": by_method["single-normals"]["task_errors"]["normal_angle_deg"],
        "miou": by_method["single-segmentation"]["task_errors"]["miou"],
        "pixel_acc": by_method["single-segmentation"]["task_errors"]["pixel_acc"],
    }
    sign = {"depth_abs_err": 1, "normal_angle_deg": 1, "miou": -1, "pixel_acc": -1}
    for method, cells in rows.items():
        errors = single if method == "single-task" else by_method[method]["task_errors"]
        assert [float(c) for c in cells[:4]] == pytest.approx([errors[m] for m in sign], abs=1e-2)
        by_hand_equal = 100 * sum(sign[m] * (errors[m] - equal[m]) / equal[m] for m in sign) / 4
        by_hand_single = 100 * sum(sign[m] * (errors[m] - single[m]) / single[m] for m in sign) / 4
        assert float(cells[4]) == pytest.approx(by_hand_equal, abs=6e-3), method
        assert float(cells[5]) == pytest.approx(by_hand_single, abs=6e-3), method
        assert float(cells[6]) > 0
    assert rows["equal"][4] == "0.00" and rows["single-task"][5] == "0.00"


def test_runs_are_recorded_from_one_initialisation(tiny_scenes):
    runs, _ = tiny_scenes
    data = compare.make_scene_data(0, train=12, test=6, size=8)
    torch.manual_seed(1)  # the seed's initialisation (seed + 1), rebuilt here by hand
    model = dense_model.DenseMultiTaskNet(classes=compare.SCENES_CLASSES, width=compare.SCENES_WIDTH).eval()
    with torch.no_grad():
        initial = [float(v) for v in dense_model.task_losses(model(data.test.images), data.test)]
    first = None
    for method in METHODS:
        run = runs / f"scenes-{method}-s0"
        meta = json.loads((run / "run.json").read_text())
        assert meta["status"] == "finished"
        assert [meta["config"]["initial_test_losses"][t] for t in dense_model.TASKS] == pytest.approx(initial, rel=1e-5)
        rows = ds.dataset(run / "metrics", format="parquet", partitioning="hive").to_table()
        train = rows.filter(pc.field("split") == "train")
        assert train.num_rows == 4 * 3
        step0 = rows.filter((pc.field("split") == "train") & (pc.field("step") == 0)).column("loss").to_pylist()
        first = first or step0
        assert step0 == pytest.approx(first, rel=1e-6), method
        assert rows.filter(pc.field("split") == "val").num_rows > 0
    assert not any(p.name.startswith("scenes-single-") for p in runs.iterdir())  # single-task runs are not recorded


def test_the_interleaved_cost_table_is_there_with_the_load(tiny_scenes):
    _, text = tiny_scenes
    rows = rows_of(text, "Step cost, interleaved")
    assert list(rows) == METHODS
    assert rows["equal"][1] == "1.00"
    assert all(float(cells[1]) > 0 for cells in rows.values())
    assert "load average" in text.split("### Step cost, interleaved", 1)[1]


def test_interleaved_costs_feed_every_method_the_same_batches_in_each_round():
    data = compare.make_scene_data(0, train=10, test=2, size=8)
    problem = compare.scene_problem(data)
    seen: dict[int, list[tuple[int, ...]]] = {}
    losses = problem.losses

    def recording(model, index):
        seen.setdefault(id(model), []).append(tuple(index.tolist()))
        return losses(model, index)

    problem.losses = recording
    costs = compare.interleaved_step_costs(problem, ["equal", "gradnorm", "uncertainty"], rounds=3, block=2, warmup=1)
    assert [c.method for c in costs] == ["equal", "gradnorm", "uncertainty"]
    sequences = list(seen.values())
    assert len(sequences) == 3 and all(s == sequences[0] for s in sequences)
    assert len(sequences[0]) == 1 + 3 * 2 and len(set(sequences[0])) > 1
    for cost in costs:
        assert len(cost.step_seconds) == 6 and len(cost.round_ratios) == 3
        assert cost.ratio > 0 and not math.isnan(cost.ratio)
    assert costs[0].ratio == 1.0


def test_bad_scene_options_are_errors_naming_the_option(capsys):
    with pytest.raises(ValueError, match="multiple of 4"):
        compare.make_scene_data(0, size=10)
    assert cli.main(["compare", "--dataset", "scenes", "--scenes-steps", "0", "--no-progress"]) == 2
    assert "--scenes-steps" in capsys.readouterr().err
    with pytest.raises(ValueError, match="include 'equal'"):
        compare.interleaved_step_costs(compare.scene_problem(compare.make_scene_data(0, train=2, test=1, size=8)), ["famo"])
    with pytest.raises(ValueError, match="missing"):
        compare.merge_single_task([compare.MethodResult("single-depth", 0, {"depth_abs_err": 1.0}, 0.0, 0.0, "", [], 0.0)])


def test_the_refactored_loop_keeps_the_penguins_trajectory(tmp_path: Path):
    """The shared loop reproduces the penguins' own loop: the same seed gives the same weights and errors
    whether the balancer is trained through ``train_penguins`` or a hand-written copy of the old loop."""
    from gradnorm.experiments import penguins
    from gradnorm.hooks.session import attach
    from gradnorm.toolkit.balancers import GradNorm

    data = penguins.load_penguins(0)
    result = compare.train_penguins(data, GradNorm(alpha=1.5), 12, "lib", tmp_path)
    model = penguins.make_model(data)
    optimizer = torch.optim.Adam(model.parameters(), lr=compare.PENGUIN_LR)
    batches = torch.Generator().manual_seed(data.seed + 2)
    size = data.x_train.shape[0]
    per_epoch = size // compare.PENGUIN_BATCH
    weights = []
    with attach(model.shared_layer, GradNorm(alpha=1.5), runs_root=tmp_path, run_name="hand") as session:
        for step in range(12):
            if step % per_epoch == 0:
                order = torch.randperm(size, generator=batches)
            index = order[(step % per_epoch) * compare.PENGUIN_BATCH : (step % per_epoch + 1) * compare.PENGUIN_BATCH]
            loss = session.loss(penguins.task_losses(model(data.x_train[index]), {k: v[index] for k, v in data.y_train.items()}))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            weights.append(session.balancer.weights().tolist())
    np.testing.assert_allclose(np.array(result.weights), np.array(weights), rtol=1e-6)
    assert result.task_errors == pytest.approx(penguins.test_errors(model, data), rel=1e-6)
