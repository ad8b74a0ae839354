"""The Python in README.md and docs/api.md runs as written: every ```python block of a file, in order, in one
namespace (as a notebook would run them), after a prelude that makes what the text assumes a reader has (a model
with dropout, its MNIST images and labels, a client's gradient). Only the budget is shrunk, `max_iterations=N` to 3
and a ViT's four victims to one, and torch.compile is off (TORCHDYNAMO_DISABLE): every documented call is made with
the documented arguments, so a signature that changes under the docs fails here. A block preceded by an HTML comment
`<!-- not run: why -->` is illustrative and skipped (none is, now)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHRINK = [  # (pattern, replacement): the budget only
    (r"max_iterations=\d[\d_]*", "max_iterations=3"),
    (r'"victims=\[0,1,2,3\]"', '"victims=[0]"'),
]
PRELUDE = """
import numpy as np, torch, torch.nn.functional as F
from importlib import resources
from torch import nn

class Net(nn.Module):  # "your model": an MNIST MLP with dropout
    def __init__(self):
        super().__init__()
        self.fc1, self.drop, self.head = nn.Linear(784, 64), nn.Dropout(0.25), nn.Linear(64, 10)
    def forward(self, x):
        return self.head(self.drop(F.gelu(self.fc1(x.flatten(1)))))

torch.manual_seed(0)
model = Net()
with resources.as_file(resources.files("dia.assets") / "mnist_128.npz") as f, np.load(f) as npz:
    images = torch.from_numpy(npz["images"][:1]).permute(0, 3, 1, 2).float() / 255  # one client, one image
    labels = torch.from_numpy(npz["labels"][:1]).long()
originals, y = images, labels
model.train()
loss = F.cross_entropy(model((images - 0.1307) / 0.3081), labels)
grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
"""
RUNNER = """
import json, sys, time, traceback
blocks = json.loads(open(sys.argv[1]).read())
ns = {"__name__": "__docs__"}
exec(compile(blocks["prelude"], "prelude", "exec"), ns)
for where, code in blocks["blocks"]:
    started = time.perf_counter()
    try:
        exec(compile(code, where, "exec"), ns)
        print(f"{where}: {time.perf_counter() - started:.1f} s")
    except BaseException:
        print(f"FAILED at {where}:", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
print("ran", len(blocks["blocks"]), "blocks")
"""


def python_blocks(path: Path) -> list[tuple[str, str]]:
    """(file:line, code) of every ```python block of a markdown file not marked `<!-- not run: ... -->`."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            if not before.strip().startswith("<!-- not run"):
                out.append((f"{path.name}:{start + 1}", "\n".join(lines[start:end])))
            i = end
        i += 1
    return out


def shrunk(code: str) -> str:
    for pattern, replacement in SHRINK:
        code = re.sub(pattern, replacement, code)
    return code


@pytest.mark.parametrize("doc", ["README.md", "docs/api.md"])
def test_the_documented_python_runs(doc, tmp_path):
    blocks = python_blocks(ROOT / doc)
    assert blocks, f"{doc} has no python block"
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps({"prelude": PRELUDE, "blocks": [(w, shrunk(c)) for w, c in blocks]}))
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", WANDB_MODE="disabled")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(spec)], cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"ran {len(blocks)} blocks" in proc.stdout


def test_the_extraction_finds_the_blocks_and_honours_the_marker(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("```python\na = 1\n```\n\n<!-- not run: illustrative -->\n```python\nboom()\n```\n```bash\nls\n```\n")
    assert python_blocks(md) == [("x.md:2", "a = 1")]
    assert shrunk("f(max_iterations=1500)") == "f(max_iterations=3)"
