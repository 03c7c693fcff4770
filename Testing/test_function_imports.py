"""Imports sit at the top of a file. One inside a function is allowed only when it is deferred on purpose (an
optional or slow dependency, a circle, a module that must load before the engine is installed) and says so: its
line, or the line right above it, carries a comment with the word "deferred" and why.

Read statically (ast) from the engine, the Slicer library and the web front end."""
from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = [REPO / "EchoFMEngine", REPO / "EchoFMSlicer" / "EchoFMSlicerLib", REPO / "EchoFMSlicer" / "web"]

# Files other work is still converting (repo-relative); empty once they carry their comments. Only shrinks.
ALLOWED_FILES: set = set()


def _comments(source: str) -> dict:
    """{line number: comment text} of a file's comments (tokenize, so a '#' inside a string is no comment)."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string
    return out


def function_imports(path: Path) -> list[tuple[int, str]]:
    """(line, source line) of every import inside a function or method of ``path`` that does not say it is
    deferred on that line or the line above."""
    source = path.read_text(encoding="utf-8")
    lines, comments = source.splitlines(), _comments(source)
    found = set()
    for fn in ast.walk(ast.parse(source, filename=str(path))):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                said = any("deferred" in comments.get(n, "").lower()
                           for n in range(node.lineno - 1, (node.end_lineno or node.lineno) + 1))
                if not said:
                    found.add((node.lineno, lines[node.lineno - 1].strip()))
    return sorted(found)


def _sources():
    for root in ROOTS:
        yield from sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def test_imports_inside_functions_say_why_they_are_deferred():
    bad = []
    for path in _sources():
        rel = path.relative_to(REPO).as_posix()
        if rel not in ALLOWED_FILES:
            bad += [f"{rel}:{line}: {text}" for line, text in function_imports(path)]
    assert not bad, ("imports inside functions: move them to the top of the file, or say why they are deferred "
                     "(a comment with 'deferred: why' on the line or the line above):\n  " + "\n  ".join(bad))


def test_allowed_files_still_need_it():
    gone = sorted(rel for rel in ALLOWED_FILES if not (REPO / rel).is_file() or not function_imports(REPO / rel))
    assert not gone, f"these files need no allowance any more: delete them from ALLOWED_FILES: {gone}"


def test_the_checker_finds_an_unexplained_import(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\n\ndef f():\n    import json\n    # deferred: slow\n    import csv\n"
                   "    s = '# deferred'; import re\n    import io  # deferred: demo\n", encoding="utf-8")
    assert [line for line, _ in function_imports(src)] == [4, 7]
