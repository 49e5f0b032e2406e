"""Every Python block of the README and of every page under ``docs/`` runs, unchanged, after the set-up a
user's training script already has (``tests/helpers/user_project.py``), so the documentation cannot rot.

A block preceded by ``<!-- example: needs NAME -->`` runs only where NAME is available: ``cuda``, an
importable package, or ``weights.json`` (a weights file exported from the bundled sample runs first).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.helpers.user_project import REPO, TRAINER_SETUP, CodeBlock, python_blocks

BLOCKS = python_blocks(REPO / "README.md") + [block for page in sorted((REPO / "docs").glob("*.md")) for block in python_blocks(page)]


def missing_requirement(block: CodeBlock) -> str | None:
    for need in block.needs:
        if need == "cuda" and not torch.cuda.is_available():
            return "needs a CUDA device"
        if need not in ("cuda", "weights.json") and importlib.util.find_spec(need) is None:
            return f"needs the {need} package"
    return None


def test_the_documents_have_examples() -> None:
    assert any(block.path.name == "README.md" for block in BLOCKS)
    assert sum(block.path.name == "integrations.md" for block in BLOCKS) >= 5


@pytest.mark.parametrize("block", BLOCKS, ids=[block.label for block in BLOCKS])
def test_documented_example_runs(block: CodeBlock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reason = missing_requirement(block)
    if reason:
        pytest.skip(f"{block.label}: {reason}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GRADNORM_RUNS_ROOT", raising=False)
    if "weights.json" in block.needs:
        from gradnorm.toolkit.analysis import bundled_runs_root, export_weights

        export_weights(bundled_runs_root(), "toy-T2-gradnorm", tmp_path / "weights.json")
    namespace: dict[str, object] = {"__name__": "__docs_example__"}
    exec(compile(TRAINER_SETUP + "\nimport gradnorm\n", "<user training script>", "exec"), namespace)
    exec(compile(block.code, block.label, "exec"), namespace)
    # whatever the example attached was closed, and any run it recorded finished
    for run_json in tmp_path.glob("runs/*/run.json"):
        assert json.loads(run_json.read_text())["status"] == "finished", run_json
