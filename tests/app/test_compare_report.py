"""``gradnorm report --group``: the report's comparison per group (the library's grouped comparison, as the
Compare runs view), a group name from run.json carried as text, and bad groupings refused with a message."""

from __future__ import annotations

import html.parser
import statistics
from pathlib import Path

import pytest

from tests.helpers.synthetic_runs import final_validation_losses, run_json, write_run

#: A config value that would end the page's script element or open markup if pasted in unescaped.
HOSTILE = '</script><script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
RUNS = {"cfg-a-s0": (40, "plain"), "cfg-a-s1": (60, "plain"), "cfg-b-s0": (50, HOSTILE), "cfg-b-s1": (70, HOSTILE)}


class Page(html.parser.HTMLParser):
    """The tags and the text (outside scripts) of a page, and each table's rows of cell texts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.text: list[str] = []
        self.tables: list[list[list[tuple[str, str]]]] = []
        self._script = False
        self._cell: list[str] | None = None
        self._class = ""

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._script = tag == "script"
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell, self._class = [], dict(attrs).get("class") or ""

    def handle_endtag(self, tag):
        self._script = False
        if tag in ("td", "th") and self._cell is not None and self.tables:
            self.tables[-1][-1].append(("".join(self._cell), self._class))
            self._cell = None

    def handle_data(self, data):
        if self._script:
            return
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _root(root: Path) -> Path:
    for name, (steps, tag) in RUNS.items():
        meta = run_json(name, balancer={"name": "equal" if name.startswith("cfg-a") else "gradnorm"}, config={"tag": tag, "seed": int(name[-1])})
        write_run(root, name, steps=steps, meta=meta)
    return root


def _final(root: Path) -> dict[tuple[str, str], float]:
    return final_validation_losses(root, list(RUNS))


def test_the_report_compares_groups_and_carries_a_hostile_group_name_as_text(tmp_path):
    from gradnorm import cli

    root = _root(tmp_path / "runs")
    out = tmp_path / "report.html"
    assert cli.main(["report", "--root", str(root), *RUNS, "--group", "config:config.tag", "--band", "minmax", "--out", str(out)]) == 0
    page = Page()
    page.feed(out.read_text(encoding="utf-8"))
    assert page.tags.count("script") == 3 and "img" not in page.tags  # the name opened no element
    hostile, plain = f"config.tag={HOSTILE}", "config.tag=plain"
    assert hostile in "".join(page.text)
    summary, per_task = page.tables[-2], page.tables[-1]
    assert [cell for cell, _ in summary[0]] == ["group", "runs", f"Delta_m% vs {plain}", "task-normalised loss", "tasks compared"]
    assert [row[0][0] for row in summary[1:]] == [plain, hostile]
    final = _final(root)
    members = {plain: ["cfg-a-s0", "cfg-a-s1"], hostile: ["cfg-b-s0", "cfg-b-s1"]}
    means = {(g, t): statistics.fmean(final[(r, t)] for r in runs) for g, runs in members.items() for t in ("a", "b")}
    assert [cell for cell, _ in per_task[0]] == ["group", "a", "b"]
    for row in per_task[1:]:
        group = row[0][0]
        for (cell, css), task in zip(row[1:], ("a", "b")):
            values = [final[(r, task)] for r in members[group]]
            assert cell == f"{statistics.fmean(values):.5g} [{min(values):.5g}, {max(values):.5g}] (n=2)"
            assert (css == "best") == (means[(group, task)] == min(means[(g, task)] for g in members))
    delta = statistics.fmean((means[(hostile, t)] - means[(plain, t)]) / means[(plain, t)] * 100 for t in ("a", "b"))
    assert summary[2][2][0].startswith(f"{delta:+.2f} [")


def test_bad_groupings_are_refused_with_a_message(tmp_path, capsys):
    from gradnorm import cli

    root = _root(tmp_path / "runs")
    with pytest.raises(SystemExit) as stopped:
        cli.main(["report", "--root", str(root), "cfg-a-s0", "--group", "colour"])
    assert stopped.value.code == 2
    assert "unknown grouping 'colour': expected none, balancer, name or config:<field>" in capsys.readouterr().err
    code = cli.main(["report", "--root", str(root), "cfg-a-s0", "cfg-b-s0", "--group", "config:config.lr", "--out", str(tmp_path / "r.html")])
    assert code == 2
    error = capsys.readouterr().err
    assert "no run has the config field 'config.lr' to group by (fields that differ between these runs: config.tag)" in error
    assert not (tmp_path / "r.html").exists()


def test_a_chart_past_altairs_row_limit_is_embedded_whole():
    """Nine runs x three tasks of downsampled series pass Altair's default 5,000 rows per dataset (a
    notebook guard): the report embeds them all, as the app does."""
    import altair as alt
    import pandas as pd

    from gradnorm.app.report import _titled

    spec = _titled(alt.Chart(pd.DataFrame({"x": range(6000)})).mark_point().encode(x="x:Q"), "many points")
    (values,) = spec["datasets"].values()
    assert len(values) == 6000 and spec["title"] == "many points"
    with pytest.raises(alt.MaxRowsError):  # the process's own setting is left as it was
        alt.Chart(pd.DataFrame({"x": range(6000)})).mark_point().encode(x="x:Q").to_dict()
