"""The technical report (docs/report/) cannot drift from the results: its generated .tex fragments are
regenerated from the committed results files and recorded runs and must equal the committed ones; every
number the text quotes must be one the generator wrote. No LaTeX is needed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gradnorm.experiments import paper

REPO = Path(__file__).resolve().parents[2]
REPORT = REPO / "docs" / "report"
COMMAND = "python -m gradnorm.experiments.paper --no-figures"


def test_committed_fragments_equal_a_fresh_generation(tmp_path: Path) -> None:
    written, _, _ = paper.write_fragments(tmp_path, REPO / "benchmarks" / "results", REPO / "sample_runs")
    fresh = {path.name: path.read_text(encoding="utf-8") for path in written}
    committed = {path.name: path.read_text(encoding="utf-8") for path in (REPORT / "generated").iterdir() if path.is_file()}
    assert sorted(committed) == sorted(fresh), f"docs/report/generated/ holds other files than the generator writes; run `{COMMAND}`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"docs/report/generated/{stale} differ from the results; run `{COMMAND}` and rebuild the PDF"


def test_every_number_the_text_quotes_is_generated() -> None:
    numbers = (REPORT / "generated" / "numbers.tex").read_text(encoding="utf-8")
    defined = set(re.findall(r"^\\gnset\{([^}]*)\}", numbers, re.MULTILINE))
    text = "\n".join(line for line in (REPORT / "report.tex").read_text(encoding="utf-8").splitlines() if not line.lstrip().startswith("%"))
    quoted = set(re.findall(r"\\gn\{([^}]*)\}", text))
    assert quoted, "report.tex quotes no generated number"
    assert not quoted - defined, f"report.tex quotes numbers the generator does not write: {sorted(quoted - defined)}"
    inputs = set(re.findall(r"\\input\{generated/([^}]*)\}", text))
    missing = [name for name in inputs if not (REPORT / "generated" / f"{name}.tex").is_file()]
    assert not missing, f"report.tex inputs fragments that are not generated: {missing}"
    figures = set(re.findall(r"\\gn(?:figure|panel)(?:\[[^\]]*\])?\{([^}]*)\}", text))
    assert figures, "report.tex draws no figure"
    absent = sorted(name for name in figures if not (REPORT / "figures" / f"{name}.pdf").is_file())
    assert not absent, f"figures the report draws are not in docs/report/figures: {absent}; run `python -m gradnorm.experiments.paper`"


def test_markdown_tables_are_read_by_heading_and_column() -> None:
    text = (
        "# Title\n\n### 2026-01-01, old\n\n| variant | T=2 | T=10 |\n|---|---|---|\n| equal | 1.00x (2.00 ms) | 1.00x |\n| gradnorm | 1.50x | 1.25x |\n\n"
        "### 2026-01-02, new\n\nSome text.\n\n| variant | T=2 | T=10 |\n|---|---|---|\n| equal | 1.00x (2.10 ms) | 1.00x |\n| gradnorm | 1.40x | 1,234.5 |\n"
    )
    sections = paper.parse_markdown(text)
    assert [s.title for s in sections if s.level == 3] == ["2026-01-01, old", "2026-01-02, new"]
    newest = sections[-1].tables[0]
    assert newest.cell("gradnorm", "T=2") == "1.40x"
    assert paper.number(newest.cell("gradnorm", "T=10")) == 1234.5
    assert paper.numbers_in(newest.cell("equal", "T=2")) == [1.00, 2.10]
    assert newest.cell("pcgrad", "T=2") is None and newest.cell("gradnorm", "T=40") is None
    assert paper.numbers_in("1.001x (0.983-1.052)") == [1.001, 0.983, 1.052]
    assert paper.numbers_in("-0.04 and +0.06, 1.01e+08") == [-0.04, 0.06, 1.01e8]


def test_absent_results_give_marked_fragments_not_failures(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    (tmp_path / "runs").mkdir()
    written, report, _ = paper.write_fragments(tmp_path / "out", tmp_path / "results", tmp_path / "runs")
    assert report.missing, "nothing was marked as not measured"
    assert all(report.numbers[key] == paper.NOT_MEASURED for key in report.missing)
    step_time = (tmp_path / "out" / "tab_step_time.tex").read_text(encoding="utf-8")
    assert "Not measured" in step_time and r"step\_time.md" in step_time
    assert {p.name for p in written} == {p.name for p in (REPORT / "generated").iterdir() if p.is_file()}


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("`heads=None` and Σ_i L_i/L_i(0)", r"\texttt{heads=None} and $\sum_i L_i/L_i(0)$"),
        ("50% of T_i & w_i", r"50\% of $T_i$ \& $w_i$"),
        ("~1.01e+08 **bold**", r"\textasciitilde{}$1.01\times 10^{8}$ \textbf{bold}"),
        ("flush_every=100", r"flush\_every=100"),
    ],
)
def test_cells_become_latex(cell: str, expected: str) -> None:
    assert paper.tex(cell) == expected
