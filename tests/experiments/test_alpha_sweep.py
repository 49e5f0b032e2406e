"""``python -m gradnorm.experiments.alpha_sweep``: GradNorm's alpha on QM9, on a handful of molecules."""

from __future__ import annotations

import importlib.util
import json
import re
import statistics

import numpy as np
import pytest

from gradnorm.experiments import alpha_sweep, qm9
from gradnorm.toolkit import analysis

# qm9pack's own `import qm9pack` fails without pkg_resources, so importorskip would skip an installed copy:
# the loader reads its files without importing it, and so does this check.
needs_qm9 = pytest.mark.skipif(importlib.util.find_spec("qm9pack") is None, reason="qm9pack is not installed (the 'qm9' extra; never in CI)")


def _table(text: str, heading: str) -> dict[str, list[str]]:
    section = text.split(f"### {heading}", 1)[1].split("###", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| method") and not line.startswith("| alpha"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@needs_qm9
@pytest.mark.slow
def test_alpha_sweep_prints_delta_m_from_the_maes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "runs"
    args = ["--alphas", "0", "1.5", "--seeds", "2", "--steps", "4", "--train-size", "40", "--test-size", "20"]
    assert alpha_sweep.main(args + ["--runs-root", str(root), "--out", str(tmp_path / "a.md")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith((tmp_path / "a.md").read_text())
    records = [json.loads(line) for line in (root / alpha_sweep.RESULTS_FILE).read_text().splitlines()]
    methods = ["equal", "gradnorm a=0", "static a=0", "gradnorm a=1.5", "static a=1.5"]
    assert sorted(r["method"] for r in records) == sorted(m for m in methods for _ in range(2))
    errors = {(r["method"], r["seed"]): r["task_errors"] for r in records}

    # Delta_m% by hand: mean over the 11 targets of (MAE - MAE_equal) / MAE_equal, in percent, per seed
    by_hand = {
        key: 100.0 * sum((errors[key][t] - errors[("equal", key[1])][t]) / errors[("equal", key[1])][t] for t in qm9.TASKS) / len(qm9.TASKS) for key in errors
    }
    per_seed = _table(printed, "Δm% per seed")
    assert list(per_seed) == methods
    main = _table(printed, "QM9, GradNorm's alpha")
    for method in methods:
        assert [float(v) for v in per_seed[method]] == pytest.approx([by_hand[(method, s)] for s in (0, 1)], abs=0.006)
        mean, spread = (float(v) for v in re.findall(r"-?\d+\.\d+", main[method][-2]))
        values = [by_hand[(method, s)] for s in (0, 1)]
        assert mean == pytest.approx(statistics.fmean(values), abs=0.051) and spread == pytest.approx(statistics.stdev(values), abs=0.051)
        assert (
            main[method][0]
            == f"{statistics.fmean(errors[(method, s)]['mu'] for s in (0, 1)):.3f} ± {statistics.stdev(errors[(method, s)]['mu'] for s in (0, 1)):.3f}"
        )
    assert per_seed["equal"] == ["0.00", "0.00"]

    # static a=x trains with the E_t[w_i] reported for the same seed's gradnorm a=x run: its recorded weights
    for alpha in ("0", "1.5"):
        for seed in (0, 1):
            reported = next(r["time_averaged_weights"] for r in records if r["method"] == f"gradnorm a={alpha}" and r["seed"] == seed)
            recorded = analysis.weight_average(root, f"qm9-static-a{alpha}-s{seed}", burn_in=0.0).weights
            static = [recorded[t] for t in qm9.TASKS]
            assert static == pytest.approx(reported, rel=1e-6)
            assert reported != pytest.approx([1.0] * len(qm9.TASKS), abs=1e-4)  # GradNorm moved them
    weights = _table(printed, "GradNorm's E_t[w_i] per alpha")
    for alpha in ("0", "1.5"):
        runs = [r["time_averaged_weights"] for r in records if r["method"] == f"gradnorm a={alpha}"]
        assert [float(v) for v in weights[alpha]] == pytest.approx(np.mean(runs, axis=0).tolist(), abs=6e-4)


def test_alpha_sweep_rejects_bad_options(capsys):
    assert alpha_sweep.main(["--alphas", "-1", "--seeds", "0"]) == 2
    err = capsys.readouterr().err
    assert "--seeds must be at least 1, got 0" in err and "--alphas must be >= 0, got -1" in err
