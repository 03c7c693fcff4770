"""Static checks of the Slicer module shell (no Slicer application, no qt: nothing of it is imported).

The .ui parses and holds every widget the code names; every SlicerParameterName is a field of the
parameter node, on a widget kind the parameterNodeWrapper can bind to that field's type; the
CMakeLists list every file of the module and only files that exist; the icon is a 128x128 PNG;
EchoFMSlicer.py (and the logic it loads) imports only what Slicer's Python has before the engine's
packages are installed; the module file is a thin shell over EchoFMSlicerLib.logic.EchoFMLogic, and
every logic method the widget calls and every library function the logic calls exists.
"""
from __future__ import annotations

import ast
import re
import struct
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "EchoFMSlicer"
SCRIPT = MODULE / "EchoFMSlicer.py"
UI = MODULE / "Resources" / "UI" / "EchoFMSlicer.ui"
ICON = MODULE / "Resources" / "Icons" / "EchoFMSlicer.png"
LIB = MODULE / "EchoFMSlicerLib"
LOGIC = LIB / "logic.py"

# Which widget classes the parameterNodeWrapper's GUI connectors bind to which field types.
NODE_WIDGETS = {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyComboBox", "qMRMLSubjectHierarchyTreeView"}
BINDABLE = {"bool": {"QCheckBox", "QPushButton"}, "int": {"QSpinBox", "QSlider", "QComboBox"},
            "float": {"QDoubleSpinBox", "ctkSliderWidget", "QComboBox"}, "str": {"QLineEdit", "QTextEdit", "QComboBox"},
            "Path": {"ctkPathLineEdit", "ctkDirectoryButton"}}


@pytest.fixture(scope="module")
def tree() -> ast.Module:
    return ast.parse(SCRIPT.read_text(), filename=str(SCRIPT))


@pytest.fixture(scope="module")
def ui() -> ET.Element:
    return ET.parse(UI).getroot()


def ui_widgets(root) -> dict:
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def parameter_fields(tree) -> dict:
    """``{field: annotation source}`` of the class decorated with parameterNodeWrapper."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") or
                (isinstance(d, ast.Attribute) and d.attr == "parameterNodeWrapper") for d in node.decorator_list):
            return {s.target.id: ast.unparse(s.annotation) for s in node.body
                    if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    raise AssertionError("no @parameterNodeWrapper class in EchoFMSlicer.py")


def base_type(annotation: str) -> str:
    m = re.match(r"Annotated\[\s*([\w.]+)", annotation)
    name = m.group(1) if m else annotation
    return name.rsplit(".", 1)[-1]


def top_level_imports(stmts):
    """Modules imported when a file loads (not inside functions): names, with '.' prefixes for relative ones."""
    for s in stmts:
        if isinstance(s, ast.Import):
            yield from (a.name for a in s.names)
        elif isinstance(s, ast.ImportFrom):
            if s.level and not s.module:
                yield from ("." * s.level + a.name for a in s.names)
            else:
                yield "." * s.level + (s.module or "")
        elif isinstance(s, (ast.Try, ast.If)):
            for block in (s.body, getattr(s, "orelse", []), *[h.body for h in getattr(s, "handlers", [])]):
                yield from top_level_imports(block)


def class_methods(tree, name: str) -> set:
    cls = next(c for c in tree.body if isinstance(c, ast.ClassDef) and c.name == name)
    return {f.name for f in cls.body if isinstance(f, ast.FunctionDef)}


def cmake_list(text: str, var: str) -> list[str]:
    m = re.search(rf"set\(\s*{var}\s+(.*?)\)", text, re.S)
    assert m, f"{var} not set"
    return m.group(1).split()


# ---------------------------------------------------------------------- .ui
def test_ui_is_qt_designer_xml(ui):
    assert ui.tag == "ui" and ui.findtext("class") == "EchoFMSlicer"
    top = ui.find("widget")
    assert top.get("class") == "qMRMLWidget", "the top widget must be a qMRMLWidget (setMRMLScene)"
    names = [w.get("name") for w in ui.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"
    declared = {c.findtext("class") for c in ui.iter("customwidget")}
    used = {w.get("class") for w in ui.iter("widget")}
    assert {c for c in used if c.startswith(("q", "ctk"))} <= declared, "custom widget classes not declared"
    sections = [w for w in ui.iter("widget") if w.get("class") == "ctkCollapsibleButton"]
    assert len(sections) >= 8


def test_every_widget_the_code_names_is_in_the_ui(tree, ui):
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
             and n.value.attr == "ui" and isinstance(n.value.value, ast.Name) and n.value.value.id == "self"}
    assert len(names) > 30                                    # the walk really found the panel's widgets
    missing = names - set(ui_widgets(ui))
    assert not missing, f"widgets used in EchoFMSlicer.py but absent from the .ui: {sorted(missing)}"


def test_every_parameter_name_is_a_field_on_a_bindable_widget(tree, ui):
    fields = parameter_fields(tree)
    bound = {}
    for w in ui.iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                assert p.get("stdset") == "0", f"{w.get('name')}: SlicerParameterName must be a dynamic property"
                bound[p.findtext("string")] = (w.get("name"), w.get("class"))
    assert len(bound) >= 10
    unknown = set(bound) - set(fields)
    assert not unknown, f"SlicerParameterName values that are not parameter-node fields: {sorted(unknown)}"
    for param, (name, cls) in bound.items():
        kind = base_type(fields[param])
        if kind.startswith("vtkMRML"):
            assert cls in NODE_WIDGETS, f"{name} ({cls}) cannot show the node field {param}"
            types = [s.text for s in next(p for p in ui.iter("widget") if p.get("name") == name).iter("string")]
            assert kind in types, f"{name} lists {types}, not {kind}"
        else:
            assert cls in BINDABLE[kind], f"{name} ({cls}) cannot bind the {kind} field {param}"
            if cls == "QComboBox":
                assert "Choice(" in fields[param], f"{param}: a QComboBox binding needs a Choice annotation"


def test_every_scene_widget_gets_the_scene(ui):
    receivers = {c.findtext("receiver") for c in ui.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    mrml = {n for n, c in ui_widgets(ui).items() if c.startswith("qMRML") and c != "qMRMLWidget"}
    assert mrml <= receivers, f"MRML widgets never given the scene: {sorted(mrml - receivers)}"


# ---------------------------------------------------------------------- python shell
def test_module_script_compiles_and_imports_only_what_slicer_has(tree):
    compile(SCRIPT.read_text(), str(SCRIPT), "exec")
    allowed = {"slicer", "qt", "ctk", "vtk", "EchoFMSlicerLib", "EchoFMEngine"} | set(sys.stdlib_module_names)
    found = set(top_level_imports(tree.body))
    assert not any(m.startswith(".") for m in found), "relative import in a Slicer module script"
    assert {"slicer", "qt", "EchoFMEngine"} <= {m.split(".")[0] for m in found}
    bad = {m for m in found if m.split(".")[0] not in allowed}
    assert not bad, f"top-level imports Slicer's Python may lack: {sorted(bad)}"
    lib_top = {m for m in found if m.startswith("EchoFMSlicerLib")}
    assert lib_top == {"EchoFMSlicerLib.logic"}, "the module reaches the library through EchoFMSlicerLib.logic"


def test_the_logic_loads_before_the_engines_packages_are_installed():
    """logic.py, and every library file it imports when it loads, need only the standard library,
    slicer and vtk (numpy, the engine and the MRML helpers load inside methods, on first use)."""
    allowed = {"slicer", "vtk"} | set(sys.stdlib_module_names)
    seen, todo = set(), ["logic"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for m in top_level_imports(ast.parse((LIB / f"{name}.py").read_text()).body):
            if m.startswith("."):
                todo.append(m.lstrip(".").split(".")[0])
            else:
                assert m.split(".")[0] in allowed, f"EchoFMSlicerLib/{name}.py loads {m} at import time"
    assert {"logic", "scene", "runner", "dependencies"} <= seen
    assert not seen & {"cine_nodes", "segmentation_nodes", "measurements", "export", "results", "ecg_nodes"}


def test_module_file_is_a_thin_shell_over_the_logic(tree):
    """EchoFMSlicerLogic only binds EchoFMLogic to the application and adds the parameter node; every
    ``self.logic.X`` the widget uses is a method or attribute of the two."""
    assert class_methods(tree, "EchoFMSlicerLogic") == {"__init__", "getParameterNode"}
    logic_tree = ast.parse(LOGIC.read_text())
    core = class_methods(logic_tree, "EchoFMLogic") | {
        t.attr for n in ast.walk(logic_tree) if isinstance(n, ast.Assign) for t in n.targets
        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    widget = next(c for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "EchoFMSlicerWidget")
    used = {n.attr for n in ast.walk(widget) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
            and n.value.attr == "logic" and isinstance(n.value.value, ast.Name) and n.value.value.id == "self"}
    assert len(used) > 25                                     # the walk really found the widget's calls
    unknown = used - core - {"getParameterNode"}
    assert not unknown, f"the widget calls logic members that do not exist: {sorted(unknown)}"


def test_module_classes_follow_the_slicer_template(tree):
    classes = {c.name: [ast.unparse(b) for b in c.bases] for c in tree.body if isinstance(c, ast.ClassDef)}
    assert classes["EchoFMSlicer"] == ["ScriptedLoadableModule"]
    assert classes["EchoFMSlicerWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert classes["EchoFMSlicerLogic"] == ["EchoFMLogic", "ScriptedLoadableModuleLogic"]
    assert classes["EchoFMSlicerTest"] == ["ScriptedLoadableModuleTest"]
    text = SCRIPT.read_text()
    assert 'self.parent.title = "EchoFM"' in text and 'self.parent.categories = ["Cardiac"]' in text
    assert 'slicer.util.loadUI(self.resourcePath("UI/EchoFMSlicer.ui"))' in text


def test_every_button_handler_shows_errors(tree):
    """Each connected handler runs its work inside slicer.util.tryWithErrorDisplay (itself or the
    widget method it delegates to), so an exception becomes a message box, never a silent failure."""
    widget = next(c for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "EchoFMSlicerWidget")
    methods = {f.name: f for f in widget.body if isinstance(f, ast.FunctionDef)}

    def guarded(fn, depth=0):
        for n in ast.walk(fn):
            if isinstance(n, ast.With) and any("tryWithErrorDisplay" in ast.unparse(i.context_expr) for i in n.items):
                return True
        if depth < 2:
            called = {n.func.attr for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                      and isinstance(n.func.value, ast.Name) and n.func.value.id == "self"}
            return any(guarded(methods[c], depth + 1) for c in called if c in methods)
        return False

    handlers = set()
    for n in ast.walk(widget):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "connect" and \
                len(n.args) == 2 and "clicked" in ast.unparse(n.args[0]):
            target = n.args[1]
            handlers |= {a.attr for a in ast.walk(target) if isinstance(a, ast.Attribute)
                         and isinstance(a.value, ast.Name) and a.value.id == "self" and a.attr in methods}
    assert len(handlers) >= 12
    unguarded = sorted(h for h in handlers if not guarded(methods[h]))
    assert not unguarded, f"button handlers without tryWithErrorDisplay: {unguarded}"


def test_library_functions_the_logic_and_the_module_call_exist():
    """``libmodule.function`` uses in logic.py and EchoFMSlicer.py name what EchoFMSlicerLib defines (contract F)."""
    tree = ast.Module(body=ast.parse(LOGIC.read_text()).body + ast.parse(SCRIPT.read_text()).body, type_ignores=[])
    aliases = {}
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and (n.module == "EchoFMSlicerLib" or (n.level == 1 and not n.module)):
            aliases.update({(a.asname or a.name): a.name for a in n.names})
    assert {"cine_nodes", "segmentation_nodes", "measurements", "export", "results", "ecg_nodes",
            "dependencies"} <= set(aliases.values())
    calls = {(aliases[n.value.id], n.attr) for n in ast.walk(tree)
             if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases}
    defined = {}
    for module in {m for m, _ in calls}:
        path = LIB / f"{module}.py"
        assert path.is_file(), f"EchoFMSlicerLib/{module}.py does not exist"
        body = ast.parse(path.read_text()).body
        defined[module] = {s.name for s in body if isinstance(s, (ast.FunctionDef, ast.ClassDef))} | \
            {t.id for s in body if isinstance(s, ast.Assign) for t in s.targets if isinstance(t, ast.Name)} | \
            {a.asname or a.name for s in body if isinstance(s, ast.ImportFrom) for a in s.names}
    missing = sorted(f"{m}.{f}" for m, f in calls if f not in defined[m])
    assert not missing, f"logic.py / EchoFMSlicer.py use library names that do not exist: {missing}"


def test_library_stays_qt_free():
    for path in sorted(LIB.glob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
            {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & {"qt", "ctk", "PythonQt"}, f"{path.name} imports Qt"
        used = {ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                and isinstance(n.value, ast.Name) and n.value.id == "slicer"}
        bad = used & {"slicer.app", "slicer.mrmlScene", "slicer.modules", "slicer.ScriptedLoadableModule"}
        assert not bad, f"{path.name} uses {sorted(bad)}: the library takes the scene and logics as arguments"
    assert "slicer.util" not in LOGIC.read_text(), "dialogs and other slicer.util calls stay in the widget"


# ---------------------------------------------------------------------- CMake, icon
def test_module_cmakelists_lists_every_file_and_only_existing_ones():
    text = (MODULE / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in text and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    scripts = [s.replace("${MODULE_NAME}", "EchoFMSlicer") for s in cmake_list(text, "MODULE_PYTHON_SCRIPTS")]
    resources = [s.replace("${MODULE_NAME}", "EchoFMSlicer") for s in cmake_list(text, "MODULE_PYTHON_RESOURCES")]
    for rel in scripts + resources:
        assert (MODULE / rel).is_file(), f"CMakeLists lists {rel}, which does not exist"
    on_disk = {p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts}
    assert on_disk == set(scripts), f"not listed: {sorted(on_disk - set(scripts))}"
    assert {"Resources/UI/EchoFMSlicer.ui", "Resources/Icons/EchoFMSlicer.png"} <= set(resources)


def test_extension_cmakelists_follows_the_template():
    text = (REPO / "CMakeLists.txt").read_text()
    for line in ('project(SlicerEchoFM)', 'set(EXTENSION_CATEGORY "Cardiac")', 'set(EXTENSION_DEPENDS "PyTorch")',
                 "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(EchoFMSlicer)",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text, line
    for var in ("HOMEPAGE", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert f"set(EXTENSION_{var} " in text, var
    icon_url = re.search(r'EXTENSION_ICONURL "([^"]+)"', text).group(1)
    assert icon_url.endswith("/" + ICON.relative_to(REPO).as_posix())
    # the engine, the configs and pyproject.toml go to the build tree and the install tree alike
    # (ctkMacroCompilePythonScript with DESTINATION_DIR and INSTALL_DIR), train.py into a subfolder
    assert "DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}" in text
    assert "INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}" in text
    for source in ("EchoFMEngine/*.py", "EchoFMEngine/*.yaml", "pyproject.toml", "train.py"):
        assert source in text, source


def test_no_python_file_is_installed_directly_into_a_module_path():
    """Slicer takes every ``*.py`` at the top of a module path as a module (qSlicerScriptedLoadableModuleFactory::
    isValidFile); one that does not define its module class fails at every start. So: every script the
    CMake files put there defines a class named after the file, everything else goes into a subfolder."""
    top = REPO / "CMakeLists.txt"
    text = top.read_text()
    # install(FILES|PROGRAMS ... *.py ... DESTINATION <module path>) and configure_file(... <module path>/x.py)
    for m in re.finditer(r"install\(\s*(?:FILES|PROGRAMS)(.*?)\)", text, re.S):
        body = m.group(1)
        dest = re.search(r"DESTINATION\s+(\S+)", body).group(1)
        pys = re.findall(r"(\S+\.py)\b", body.split("DESTINATION")[0])
        if pys:
            assert dest != "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}", f"{pys} installed into the module path"
    for m in re.finditer(r"configure_file\((.*?)\)", text, re.S):
        target = m.group(1).split()[1]
        if target.endswith(".py"):
            assert not re.fullmatch(r"\$\{CMAKE_BINARY_DIR\}/\$\{Slicer_QTSCRIPTEDMODULES_LIB_DIR\}/[^/]+\.py", target), target
    # ctkMacroCompilePythonScript / slicerMacroBuildScriptedModule keep the source-relative path:
    # a script without a folder lands at the top of the module path
    engine_globs = re.findall(r"GLOB_RECURSE\s+_echofm_engine_scripts.*?\$\{CMAKE_CURRENT_SOURCE_DIR\}/(\S+)\)", text, re.S)
    assert engine_globs and all("/" in g for g in engine_globs), engine_globs
    module_text = (MODULE / "CMakeLists.txt").read_text()
    scripts = [s.replace("${MODULE_NAME}", "EchoFMSlicer") for s in cmake_list(module_text, "MODULE_PYTHON_SCRIPTS")]
    top_level = [s for s in scripts if "/" not in s]
    assert top_level == ["EchoFMSlicer.py"]
    for s in top_level:
        classes = {n.name for n in ast.parse((MODULE / s).read_text()).body if isinstance(n, ast.ClassDef)}
        assert Path(s).stem in classes, f"{s} lands in the module path without its module class"


def test_icon_is_a_128_px_png():
    data = ICON.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (128, 128)
    from PIL import Image

    with Image.open(ICON) as im:
        im.load()
        assert im.size == (128, 128)
        pixels = {im.getpixel((x, y)) for x in range(128) for y in range(128)}
    assert len(pixels) > 100                 # a drawn glyph, not a blank square
