"""Every example in README.md and docs/ runs as written: Python blocks in a scratch folder, shell
blocks page by page in the page's order (as a newcomer on a fresh clone would type them).

A shell block preceded by ``<!-- not run: REASON -->`` is skipped with that reason (GPU, Slicer, your
own data); ``<!-- slow: REASON -->`` marks a block that trains for minutes: it runs only with
ECHOFM_RUN_SLOW_DOCS=1 (and is skipped with its reason otherwise). A Python block starting with
``# not run in tests: REASON`` is skipped with that reason."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP_MARK = "# not run in tests"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_BLOCK = re.compile(r"(?:<!--\s*(not run|slow)\s*:\s*(.*?)\s*-->\s*\n)?```(?:bash|sh|shell|console)\n(.*?)```",
                         re.S)
RUN_SLOW = os.environ.get("ECHOFM_RUN_SLOW_DOCS") == "1"


def examples():
    for doc in DOCS:
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)):
            reason = block.splitlines()[0][len(SKIP_MARK):].lstrip(": ").strip() if block.startswith(SKIP_MARK) \
                else ""
            yield pytest.param(block, id=f"{doc.name}#{i}",
                               marks=pytest.mark.skip(reason or "marked not run") if block.startswith(SKIP_MARK)
                               else ())


def shell_blocks(doc: Path) -> list[tuple[str, str, str]]:
    """``(mark, reason, commands)`` of each shell block of ``doc`` in order (mark '' = runs)."""
    return [(m or "", r or "", body) for m, r, body in SHELL_BLOCK.findall(doc.read_text())]


@pytest.mark.parametrize("code", list(examples()))
def test_python_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "example", "exec"), {"__name__": "__example__"})


def _pages():
    for doc in DOCS:
        blocks = shell_blocks(doc)
        if blocks:
            slow = any(m == "slow" for m, _, _ in blocks)
            yield pytest.param(doc, id=doc.name, marks=(pytest.mark.slow,) if slow else ())


def _clone_like(folder: Path) -> None:
    """A scratch folder that looks like the root of a fresh clone (sources linked, outputs local)."""
    for name in ("Resources", "train.py", "EchoFMEngine", "EchoFMSlicer", "docs", "README.md", "pyproject.toml"):
        (folder / name).symlink_to(REPO / name)


SHARED = REPO.parent / "shared"


@pytest.mark.parametrize("doc", list(_pages()))
def test_shell_blocks_run_in_page_order(doc, tmp_path):
    clone = tmp_path / "clone"            # ../shared beside it, as beside a clone of the repository
    clone.mkdir()
    _clone_like(clone)
    if SHARED.is_dir():
        (tmp_path / "shared").symlink_to(SHARED)
    env = {**os.environ, "ECHOFM_MODELS": str(tmp_path / "home_models"), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    bin_dir = tmp_path / "bin"                          # `python` here is this test's interpreter
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    ran, skipped = 0, []
    for k, (mark, reason, body) in enumerate(shell_blocks(doc)):
        if mark == "not run" or (mark == "slow" and not RUN_SLOW):
            assert reason, f"{doc.name} block {k}: a skipped block must say why"
            skipped.append(f"block {k}: {reason}")
            continue
        if "../shared/data" in body and not SHARED.is_dir():
            skipped.append(f"block {k}: needs the real test files in ../shared/data")
            continue
        t0 = time.perf_counter()
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=clone, env=env, capture_output=True,
                           text=True, timeout=600)
        print(f"{doc.name} block {k}: {time.perf_counter() - t0:.1f} s")
        assert r.returncode == 0, (f"{doc.name} shell block {k} failed (exit {r.returncode}):\n{body}\n"
                                   f"--- stdout ---\n{r.stdout[-3000:]}\n--- stderr ---\n{r.stderr[-3000:]}")
        ran += 1
    if not ran:
        pytest.skip("; ".join(skipped))


def test_every_shell_block_is_run_or_says_why():
    """No shell block in another fence style sneaks past the runner; skipped ones name a reason."""
    for doc in DOCS:
        text = doc.read_text()
        n_fences = len(re.findall(r"```(?:bash|sh|shell|console)\n", text))
        assert n_fences == len(shell_blocks(doc)), doc.name
        for mark, reason, _ in shell_blocks(doc):
            assert not mark or reason, f"{doc.name}: <!-- {mark}: --> without a reason"
