"""The README's Python example runs as written, on the quick demo's outputs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.detector]
README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(quick_demo, capsys):
    out, _ = quick_demo
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 1
    code = blocks[0].replace("runs/demo/", f"{out}/")
    exec(compile(code, str(README), "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 6 and printed[-1] == "torch.Size([8, 2])"
    ranks = [int(line.split()[0]) for line in printed[:5]]
    assert ranks == [1, 2, 3, 4, 5]
