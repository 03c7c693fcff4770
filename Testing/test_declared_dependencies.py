"""Every third-party package the engine imports is a declared dependency in pyproject.toml, so the
README's install works in a fresh environment (an undeclared import once broke the demo there while
this machine's shared environment hid it). Read statically (ast); imports of the Slicer application
(slicer, qt, vtk, ctk) are the host's, not ours."""
from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST = {"slicer", "qt", "vtk", "ctk", "mrml", "slicer_core"}   # provided by Slicer (or slicer-core in tests)


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _optional(tree: ast.AST) -> set:
    """Import nodes inside a ``try`` that catches ImportError / ModuleNotFoundError: optional by design."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def _imported_roots(folder: Path) -> dict:
    """{top-level module: first file:line importing it} of the non-stdlib, non-local, non-optional imports
    under ``folder``."""
    local = ({p.name for p in REPO.iterdir() if p.is_dir()} | {p.name for p in (REPO / "EchoFMSlicer").iterdir()}
             | {p.stem for p in folder.rglob("*.py")})
    found = {}
    for path in sorted(folder.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        optional = _optional(tree)
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for root in {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - local - HOST:
                found.setdefault(root, f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def _undeclared(folder: Path, declared: set) -> list:
    dists = metadata.packages_distributions()
    return [f"{where} imports {root} (distribution {dists.get(root, ['unknown'])})"
            for root, where in sorted(_imported_roots(folder).items())
            if not {d.lower().replace("_", "-") for d in dists.get(root, [])} & declared]


def test_the_engine_imports_only_core_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {_name(r) for r in project["dependencies"]}
    bad = _undeclared(REPO / "EchoFMEngine", core)
    assert not bad, "imports missing from [project].dependencies:\n  " + "\n  ".join(bad)


def test_the_slicer_library_and_web_front_end_import_declared_packages():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        declared |= {_name(r) for r in extra}
    # what trame-slicer[standalone] brings (its own dependencies): the web front end imports them directly
    for requirement in metadata.requires("trame-slicer") or []:
        declared.add(_name(requirement))
    bad = []
    for folder in ("EchoFMSlicer/EchoFMSlicerLib", "EchoFMSlicer/web"):
        bad += _undeclared(REPO / folder, declared)
    assert not bad, "imports missing from pyproject.toml:\n  " + "\n  ".join(bad)
