"""Run names cannot escape the runs root; task names are data, whatever characters they hold."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from gradnorm import hooks
from gradnorm.toolkit import runs, schema
from gradnorm.toolkit.balancers import EqualWeights

ESCAPING_NAMES = [
    "../../etc",
    "..",
    ".",
    "../x",
    "a/../../b",
    "/etc",
    "/tmp/x",
    "a/b",
    "a\\..\\b",
    ".hidden",
    "",
    "x" * 129,
    "run\x00name",
    "run\nname",
    "run\n",  # a trailing newline slips past a regex ending in $
    "name'; DROP TABLE runs; --",
    'quote"d',
    "space name",
    "~root",
    "$(whoami)",
]

#: Task names a user may legitimately pick, or a hostile file may carry: all must round-trip as data.
HOSTILE_TASK_NAMES = [
    "depth'; DROP TABLE metrics; --",
    'normals" OR 1=1 --',
    "semantic/../../etc",
    "ünïcödé ✓",
    "tab\tand\nnewline",
    "%s {0} $1 ?",
]


@pytest.mark.parametrize("name", ESCAPING_NAMES)
def test_run_names_that_could_escape_or_confuse_are_refused(tmp_path, name):
    with pytest.raises(runs.RunError, match=r"invalid run name .*use letters, digits"):
        runs.validate_run_id(name)
    with pytest.raises(runs.RunError, match=r"invalid run name"):
        runs.create_run(tmp_path / "root", name, {"tasks": ["a", "b"]})
    # Nothing was created anywhere: not even the root.
    assert not (tmp_path / "root").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", [None, 3, b"run", ["run"]])
def test_run_names_that_are_not_strings_are_refused(name):
    with pytest.raises(runs.RunError, match=r"invalid run name"):
        runs.validate_run_id(name)


@pytest.mark.parametrize("name", ["run-1", "gradnorm_alpha=0.12", "A.b-c_d=e", "x" * 128])
def test_plain_run_names_are_accepted(name):
    assert runs.validate_run_id(name) == name


def test_attach_refuses_an_escaping_run_name_before_writing_anything(tmp_path):
    torch.manual_seed(0)
    trunk = nn.Linear(3, 4)
    with pytest.raises(runs.RunError, match=r"invalid run name '\.\./\.\./etc'"):
        hooks.attach(trunk, EqualWeights(), runs_root=tmp_path / "runs", run_name="../../etc")
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "etc").exists()


def test_hostile_task_names_are_recorded_as_data(tmp_path):
    torch.manual_seed(0)
    trunk = nn.Linear(3, 4)
    heads = [nn.Linear(4, 1) for _ in HOSTILE_TASK_NAMES]
    session = hooks.attach(trunk, EqualWeights(), runs_root=tmp_path, run_name="hostile-tasks", flush_every=2)
    for _ in range(3):
        h = trunk(torch.randn(5, 3))
        session.loss({name: head(h).pow(2).mean() + 1 for name, head in zip(HOSTILE_TASK_NAMES, heads)}).backward()
    session.log_validation({HOSTILE_TASK_NAMES[0]: 0.5})
    session.close()
    meta = runs.read_run_json(tmp_path / "hostile-tasks")
    assert meta["tasks"] == HOSTILE_TASK_NAMES
    table = pq.read_table(tmp_path / "hostile-tasks" / schema.METRICS_DIR)
    assert table.num_rows == 3 * len(HOSTILE_TASK_NAMES) + 1
    assert set(table.column("task").to_pylist()) == set(HOSTILE_TASK_NAMES)
    # Nothing was created outside the run directory by a task name that looks like a path.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile-tasks"]


@pytest.mark.parametrize("command", ["summary", "export"])
def test_the_command_line_refuses_escaping_run_names_with_a_message(tmp_path, capsys, command):
    from gradnorm import cli

    (tmp_path / "root").mkdir()
    code = cli.main([command, "--root", str(tmp_path / "root"), "../../etc"])
    assert code == 2
    assert f"gradnorm {command}: error: invalid run name '../../etc'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


#: Names that would end a <script> element, open markup or a comment, or reorder text, if a page
#: pasted them in unescaped.
MARKUP_NAMES = [
    "</script><script>window.__pwned=1</script>",
    '<img src=x onerror="window.__pwned=2">',
    "\"quoted' & <b>bold</b> --><!--",
    "\u202eevil\u202c \u2028 line",
]


def test_the_report_carries_hostile_names_as_data_not_markup(tmp_path):
    """Every element of the report is one the report writes itself; the names come back intact from the
    chart spec's JSON and from the text of the summary table."""
    import html.parser
    import json

    from gradnorm.app.report import write_report
    from tests.helpers.synthetic_runs import run_json, write_run

    meta = run_json("hostile", tasks=MARKUP_NAMES, balancer={"name": MARKUP_NAMES[1]})
    write_run(tmp_path, "hostile", tasks=MARKUP_NAMES, meta=meta)
    page = write_report(tmp_path, ["hostile"], tmp_path / "report.html").read_text(encoding="utf-8")

    class Elements(html.parser.HTMLParser):
        def __init__(self) -> None:
            super().__init__(convert_charrefs=True)
            self.tags: list[str] = []
            self.text: list[str] = []
            self.script: dict[str, str] = {}
            self._in: str | None = None

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            self._in = dict(attrs).get("id") if tag == "script" else None

        def handle_data(self, data):
            if self._in:
                self.script[self._in] = self.script.get(self._in, "") + data
            else:
                self.text.append(data)

        def handle_endtag(self, tag):
            self._in = None

    parsed = Elements()
    parsed.feed(page)
    assert parsed.tags.count("script") == 3
    assert "img" not in parsed.tags and "b" not in parsed.tags
    assert set(parsed.tags) <= {
        "html",
        "head",
        "meta",
        "title",
        "style",
        "script",
        "body",
        "h1",
        "h2",
        "h3",
        "p",
        "ul",
        "li",
        "div",
        "table",
        "thead",
        "tbody",
        "tr",
        "th",
        "td",
    }
    spec = json.loads(parsed.script["gradnorm-spec"])
    values = json.dumps(spec, ensure_ascii=False)
    for name in MARKUP_NAMES[:3]:
        assert json.dumps(name, ensure_ascii=False)[1:-1] in values  # the chart data carries the name as it is
        assert name in "".join(parsed.text)  # and the summary table shows it as text
    assert "<" not in parsed.script["gradnorm-spec"] and "&" not in parsed.script["gradnorm-spec"]
