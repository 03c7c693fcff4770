"""The engine's import graph, read statically (ast) from every EchoFMEngine/**/*.py, with imports at the top of
a file and inside functions alike: each subpackage imports only lower layers (docs/architecture.md draws them),
no two modules import each other in a circle, the engine never imports Slicer, Qt or VTK and the Slicer library
never imports Qt, and the torch-free parts (models folder, clinical core) load without torch.

Edges other work is still removing are listed in KNOWN_UPWARD / KNOWN_CYCLES with why; when one goes, its line
must go too (a listed edge that no longer exists fails), so the lists only shrink."""
from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENGINE = REPO / "EchoFMEngine"
SLICER_LIB = REPO / "EchoFMSlicer" / "EchoFMSlicerLib"

# Lowest first. A unit is a subpackage or a module at the engine's root; it may import units of lower layers
# only; units of one layer do not import each other. Same order as docs/architecture.md.
LAYERS = [
    {"cine", "configs", "tasks", "atomic", "runtime"},   # data types, shipped configs, task declarations, plumbing
    {"io"},                                              # files -> Cine
    {"clinical", "metrics"},                             # ECG, cycles, phase, geometry, measure; metric math
    {"data"},                                            # datasets, labels, clips -> model inputs
    {"models"},                                          # EchoFM, heads, checkpoints, models folder
    {"training"},                                        # pretraining, fine-tuning
    {"evaluation"},                                      # metrics reports of trained checkpoints
    {"analysis"},                                        # cine -> results (the Slicer module's engine call)
    {"demo"},                                            # the top-level job: pretrain -> fine-tune -> analyse
    {"bench", "cli", "train", "__init__"},               # entry points and the package facade
    {"__main__"},                                        # python -m EchoFMEngine: runs cli
]

# (from, to): where: upward edges being removed, each naming the import that still makes it. Empty now: fix an
# upward import (move the code to the layer it belongs to) rather than listing it here.
KNOWN_UPWARD: dict = {}
# evaluation still borrows helpers from training (helper "metrics" is moving them into one metrics module):
# evaluation -> training is a legal downward edge, so it needs no entry here.

# frozenset(modules): why: module-level circles being removed. Empty now, as above.
KNOWN_CYCLES: dict = {}

FORBIDDEN_IN_ENGINE = {"slicer", "qt", "ctk", "vtk", "vtkmodules", "PythonQt", "PyQt5", "PyQt6", "PySide2",
                       "PySide6", "mrml", "teem"}
FORBIDDEN_IN_SLICER_LIB = {"qt", "ctk", "PythonQt", "PyQt5", "PyQt6", "PySide2", "PySide6"}


def _module_name(path: Path, root: Path) -> tuple[str, str]:
    """(module name, package its relative imports start from) of a source file under ``root``'s parent."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def imports_of(path: Path, root: Path, known: set) -> list[tuple[str, int]]:
    """Every module ``path`` imports (absolute names, top level and inside functions), with its line.
    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module, else ``pkg``."""
    _, package = _module_name(path, root)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for a in node.names:
                sub = f"{module}.{a.name}"
                found.append((sub if sub in known else module, node.lineno))
    return found


def engine_graph() -> dict:
    """{module: {imported engine module: first line}} over the engine's sources."""
    files = [p for p in ENGINE.rglob("*.py") if "__pycache__" not in p.parts]
    names = {_module_name(p, ENGINE)[0]: p for p in files}
    graph = defaultdict(dict)
    for name, path in names.items():
        for target, line in imports_of(path, ENGINE, set(names)):
            while target not in names and "." in target:      # EchoFMEngine.io.load_cine -> EchoFMEngine.io
                target = target.rsplit(".", 1)[0]
            if target in names and target != name:
                graph[name].setdefault(target, line)
    return graph


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


LAYER_OF = {u: i for i, layer in enumerate(LAYERS) for u in layer}


def test_every_unit_has_a_layer():
    units = {unit(m) for m in engine_graph()} | {
        p.stem if p.is_file() else p.name for p in ENGINE.iterdir()
        if (p.suffix == ".py" or (p / "__init__.py").is_file()) and p.name != "__pycache__"}
    assert not units - set(LAYER_OF), f"give these a layer in LAYERS (and docs/architecture.md): {units - set(LAYER_OF)}"


def test_each_layer_imports_only_lower_layers():
    bad, seen = [], set()
    for module, targets in sorted(engine_graph().items()):
        for target, line in sorted(targets.items()):
            a, b = unit(module), unit(target)
            if a == b or LAYER_OF[b] < LAYER_OF[a]:
                continue
            seen.add((a, b))
            if (a, b) not in KNOWN_UPWARD:
                bad.append(f"{module} (line {line}) imports {target}: {a} (layer {LAYER_OF[a]}) may not import "
                           f"{b} (layer {LAYER_OF[b]})")
    assert not bad, "upward or sideways imports:\n  " + "\n  ".join(bad)
    gone = set(KNOWN_UPWARD) - seen
    assert not gone, f"these edges are gone: delete them from KNOWN_UPWARD: {sorted(gone)}"


def _cycles(graph: dict) -> list[frozenset]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in list(graph):
        if root in index:
            continue
        work = [(root, iter(graph.get(root, ())))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(graph.get(w, ()))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.add(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(frozenset(comp))
    return out


def test_no_module_imports_itself_through_a_circle():
    graph = engine_graph()
    # a package's __init__ re-exporting its own modules is not a circle of dependencies
    graph = {m: {t: l for t, l in ts.items() if not (unit(t) == unit(m) and t == m.rsplit(".", 1)[0])}
             for m, ts in graph.items()}
    cycles = set(_cycles(graph))
    new = cycles - set(KNOWN_CYCLES)
    assert not new, "import circles:\n  " + "\n  ".join(" <-> ".join(sorted(c)) for c in new)
    gone = set(KNOWN_CYCLES) - cycles
    assert not gone, f"these circles are gone: delete them from KNOWN_CYCLES: {gone}"


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [frozenset("abc")]


def _foreign_imports(root: Path, forbidden: set) -> list[str]:
    bad = []
    for path in sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts):
        for name, line in imports_of(path, root, set()):
            if name and name.split(".")[0] in forbidden:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    return bad


def test_engine_never_imports_slicer_qt_or_vtk():
    assert not _foreign_imports(ENGINE, FORBIDDEN_IN_ENGINE)


def test_slicer_library_never_imports_qt():
    assert not _foreign_imports(SLICER_LIB, FORBIDDEN_IN_SLICER_LIB)


@pytest.mark.parametrize("modules", [("EchoFMEngine.models.registry", "EchoFMEngine.clinical.phase"),
                                     ("EchoFMEngine.configs", "EchoFMEngine.tasks")])
def test_torch_free_parts_load_without_torch(modules):
    code = (f"import sys\nimport {', '.join(modules)}\n"
            "heavy = sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
