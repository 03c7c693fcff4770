"""Every Python example in README.md and docs/ runs as written (in a scratch folder)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP_MARK = "# not run in tests"


def examples():
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)):
            yield pytest.param(block, id=f"{doc.name}#{i}",
                               marks=pytest.mark.skip("needs files a clone does not have")
                               if block.startswith(SKIP_MARK) else ())


@pytest.mark.parametrize("code", list(examples()))
def test_python_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "example", "exec"), {"__name__": "__example__"})
