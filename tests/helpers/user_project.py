"""What a user's training script already has before it meets the toolkit, and the README's code blocks.

``TRAINER_SETUP`` defines the names the README's example and ``docs/integrations.md``'s snippets use
(``model`` with a ``trunk`` and ``depth``/``normals``/``seg`` heads, ``opt``, ``loader``, ``task_losses``,
``val_x``/``val_y``); the tests run each documented block after it, unchanged, so the front door cannot rot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

TRAINER_SETUP = """
import torch
from torch import nn

torch.manual_seed(0)


class MultiTaskNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
        self.depth, self.normals, self.seg = nn.Linear(16, 1), nn.Linear(16, 3), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        return {"depth": self.depth(h), "normals": self.normals(h), "seg": self.seg(h)}


def task_losses(outputs, y):
    return {
        "depth": (outputs["depth"].squeeze(-1) - y["depth"]).abs().mean(),
        "normals": 1 - torch.cosine_similarity(outputs["normals"], y["normals"], dim=-1).mean(),
        "seg": nn.functional.cross_entropy(outputs["seg"], y["seg"]),
    }


def make_batch(size):
    x = torch.randn(size, 8)
    return x, {"depth": 10 * x[:, 0], "normals": x[:, 1:4], "seg": (x[:, 4] > 0).long() + 2 * (x[:, 5] > 0).long()}


class Samples(torch.utils.data.Dataset):
    def __init__(self, size):
        self.x, self.y = make_batch(size)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], {task: target[i] for task, target in self.y.items()}


model = MultiTaskNet()
opt = torch.optim.SGD(model.parameters(), lr=1e-2)
loader = torch.utils.data.DataLoader(Samples(320), batch_size=16, shuffle=True)
val_x, val_y = make_batch(64)
"""


@dataclass(frozen=True)
class CodeBlock:
    path: Path
    line: int
    code: str
    needs: tuple[str, ...]  # from a preceding ``<!-- example: needs NAME ... -->``; "skip" is never run

    @property
    def label(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_NEEDS = re.compile(r"<!-- example: needs ([^>]*?) -->\s*$")


def python_blocks(path: Path) -> list[CodeBlock]:
    """Every fenced ``python`` block of a Markdown file, with the line it starts on."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        needs = _NEEDS.search(before)
        blocks.append(CodeBlock(path, text.count("\n", 0, match.start()) + 2, match.group(1), tuple(needs.group(1).split()) if needs else ()))
    return blocks
