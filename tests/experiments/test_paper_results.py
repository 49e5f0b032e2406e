"""The report generator's parsers for the newer results (gradnorm.experiments.paper): the scenes table,
GradNorm's alpha on QM9, the interleaved step costs and the section 5.3 sweep split by sampling
component, each read from a small synthetic results folder and checked against figures computed here."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from gradnorm.experiments import paper

SCENES = """# Compared

## Generated scenes: the encoder-decoder's 3 dense tasks, 2026-12-01

GradNorm runs at α = 1.5, the paper's NYUv2 value.

### Generated scenes, 16×16 pixels, 200 steps of batch 16: test metrics, Δm%

Seeds: [0, 1, 2].

| method | depth abs. error | seg. mIoU ↑ | Δm% vs equal | Δm% vs single-task |
|---|---|---|---|---|
| equal | 0.2286 ± 0.05 | 0.6266 ± 0.1 | 0.00 ± 0.00 | 39.78 ± 21.23 |
| gradnorm | 0.3533 ± 0.02 | 0.7476 ± 0.01 | 6.78 ± 2.95 | 51.30 ± 28.10 |
| db-mtl | 0.2775 ± 0.04 | 0.7029 ± 0.04 | -10.32 ± 2.16 | 17.24 ± 18.58 |
| pcgrad | 0.2269 ± 0.05 | 0.6387 ± 0.1 | -1.15 ± 4.30 | 38.60 ± 26.23 |
| mgda | 0.7372 ± 0.2 | 0.2904 ± 0.06 | 66.85 ± 27.63 | 103.82 ± 14.84 |
| single-task | 0.1777 ± 0.03 | 0.6764 ± 0.1 | -22.01 ± 13.33 | 0.00 ± 0.00 |

### Step cost, interleaved: generated scenes (16×16 pixels, width 8, batch 16)

| method | median step (ms CPU) | × equal | per-round × equal, 25%–75% |
|---|---|---|---|
| equal | 33.34 | 1.00 | 1.00–1.00 |
| gradnorm | 33.94 | 1.02 | 0.97–1.23 |
| nash-mtl | 91.01 | 2.73 | 2.28–3.09 |

## QM9: the methods compared

### QM9, 11 targets, 300 steps: Δm% against equal weights

| method | mu (D) | Δm% vs equal |
|---|---|---|
| equal | 0.883 | 0.0 ± 0.0 |
| gradnorm | 0.872 | 22.4 ± 3.8 |
| fairgrad | 0.876 | -12.4 ± 3.5 |
| pcgrad | 0.885 | -4.1 ± 2.8 |
| rlw | 0.900 | 12.0 ± 8.8 |
"""

ALPHA = """# GradNorm's alpha on QM9

### QM9, GradNorm's alpha: 300 steps

| method | mu (D) | Δm% vs equal |
|---|---|---|
| equal | 0.883 | 0.0 ± 0.0 |
| gradnorm a=0 | 0.895 | -2.2 ± 2.9 |
| static a=0 | 0.890 | -5.8 ± 3.7 |
| gradnorm a=0.5 | 0.875 | -7.0 ± 3.3 |
| static a=0.5 | 0.874 | 0.3 ± 1.0 |
| gradnorm a=1.5 | 0.872 | 22.4 ± 3.8 |
| static a=1.5 | 0.869 | 18.7 ± 4.2 |
"""


def _results(tmp_path: Path) -> paper.Results:
    (tmp_path / "compare.md").write_text(SCENES, encoding="utf-8")
    (tmp_path / "gradnorm_alpha.md").write_text(ALPHA, encoding="utf-8")
    return paper.Results(tmp_path)


def test_scenes_rank_best_worst_and_single_task(tmp_path: Path) -> None:
    report = paper.Report()
    paper.scenes(report, _results(tmp_path))
    # Delta_m% vs equal without the single-task row: db-mtl -10.32, pcgrad -1.15, equal 0, gradnorm 6.78, mgda 66.85.
    assert report.numbers["scenes.rank"] == "4th"
    assert report.numbers["scenes.methods"] == "5"
    assert report.numbers["scenes.bestname"] == "DB-MTL" and report.numbers["scenes.best"] == r"$-$10.3\,\%"
    assert report.numbers["scenes.worstname"] == "MGDA"
    assert report.numbers["scenes.gradnorm"] == r"+6.8\,\%"
    assert report.numbers["scenes.single"] == r"$-$22.0\,\%"
    assert report.numbers["scenes.vssingle.min"] == r"+17\,\%"  # db-mtl's 17.24, the smallest but single-task's own 0
    assert report.numbers["scenes.alpha"] == "1.5" and report.numbers["scenes.seeds"] == "3"
    table = report.fragments["tab_scenes.tex"]
    assert r"$\uparrow$" in table and "DB-MTL" in table and "?" not in table.split("\\caption")[1].split("\\end{tabular}")[0]


def test_alpha_best_and_its_rank_among_the_qm9_methods(tmp_path: Path) -> None:
    report = paper.Report()
    paper.gradnorm_alpha(report, _results(tmp_path))
    assert report.numbers["alpha.best.alpha"] == "0.5" and report.numbers["alpha.best"] == r"$-$7.0\,\%"
    assert report.numbers["alpha.best.static"] == r"+0.3\,\%"
    assert report.numbers["alpha.max.alpha"] == "1.5" and report.numbers["alpha.max"] == r"+22.4\,\%"
    # Among equal 0.0, fairgrad -12.4, pcgrad -4.1, rlw 12.0 (gradnorm's own row replaced): second.
    assert report.numbers["alpha.rank"] == "2nd" and report.numbers["alpha.methods"] == "5"
    assert report.numbers["alpha.values"] == "0, 0.5, 1.5"
    assert "tab:qm9-alpha" in report.fragments["tab_qm9_alpha.tex"]


def test_interleaved_costs_name_the_dearest_method(tmp_path: Path) -> None:
    report = paper.Report()
    paper.compare_costs(report, _results(tmp_path))
    assert report.numbers["cost.scenes.gradnorm"] == r"1.02$\times$"
    assert report.numbers["cost.scenes.maxname"] == "Nash-MTL" and report.numbers["cost.scenes.max"] == r"2.73$\times$"
    assert report.numbers["cost.toy2.gradnorm"] == paper.NOT_MEASURED  # no toy cost table in this folder
    assert report.numbers["cost.dearest"] == r"Nash-MTL 2.73$\times$"


def test_sweep_split_by_component_against_an_independent_pearson(tmp_path: Path) -> None:
    (tmp_path / "sweep").mkdir()
    gradnorm_loss = 1.0
    draws = [
        ("dirichlet-3000", 0.10, 0.95),
        ("dirichlet-3000", 0.20, 0.97),
        ("dirichlet-30", 1.50, 0.90),
        ("dirichlet-30", 1.10, 1.05),
        ("dirichlet-30", 2.00, 0.99),
        ("uniform", 2.50, 1.20),
        ("uniform", 3.00, 1.10),
    ]
    points = [{"run": f"r{i}", "weights": [1.0] * 10, "distance": d, "test_loss": loss, "draw": draw} for i, (draw, d, loss) in enumerate(draws)]
    data = {
        "num_tasks": 10,
        "steps": 50,
        "gradnorm_weights": [1.0] * 10,
        "gradnorm_test_loss": gradnorm_loss,
        "points": points,
        "seed": 0,
        "pearson": 0.5,
        "spearman": 0.4,
        "beaten_by": 4,
        "pearson_ci95": [-0.051, 0.62],
    }
    (tmp_path / "sweep" / "sweep-T10.json").write_text(json.dumps(data), encoding="utf-8")
    report = paper.Report()
    paper.sweep(report, paper.Results(tmp_path))
    dirichlet = [(d, loss) for draw, d, loss in draws if draw != "uniform"]
    expected = statistics.correlation([d for d, _ in dirichlet], [loss for _, loss in dirichlet])
    assert report.numbers["sweep.T10.dirichlet.pearson"] == f"{expected:.2f}"
    assert report.numbers["sweep.T10.dirichlet.networks"] == "5"
    assert report.numbers["sweep.T10.near.networks"] == "2" and report.numbers["sweep.T10.near.beaten"] == "2"
    assert report.numbers["sweep.T10.near.maxdist"] == "0.20"
    assert report.numbers["sweep.T10.uniform.beaten"] == "0" and report.numbers["sweep.T10.uniform.networks"] == "2"
    assert report.numbers["sweep.T10.pearson.ci"] == "[$-$0.05, 0.62]"
    assert report.numbers["sweep.T10.beaten.maxdist"] == "2.00"  # the farthest of the four better than GradNorm
    assert report.numbers["sweep.T10.best.draw"] == r"a Dirichlet draw of concentration $\kappa=30$"
    assert report.numbers["sweep.T3.networks"] == paper.NOT_MEASURED
