"""Configure, build and install the Slicer extension with CMake against a stub of Slicer's CMake API.

The stub (written by the test) gives what ``find_package(Slicer)`` gives an extension: the module
paths of the build and install trees, ``slicerMacroBuildScriptedModule`` and
``ctkMacroCompilePythonScript`` with the copy-to-build-tree / install-to-install-tree behaviour of
Slicer's and CTK's macros, and ``slicer_add_python_unittest`` recording the tests ctest would run.
Then the real build and install trees are checked: every runtime file is in both, the build tree
is what the generated tests give Slicer (``--additional-module-path``), ``import EchoFMEngine``
and ``find_pyproject()`` work from there, and no ``*.py`` sits at the top of a module path unless
it defines its module class (Slicer loads every such file as a module).
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIB_DIR = "lib/Slicer-5.8/qt-scripted-modules"

CMAKE = shutil.which("cmake")
pytestmark = pytest.mark.skipif(CMAKE is None, reason="cmake is not installed")

SLICER_CONFIG = f"""
# Stub of Slicer's SlicerConfig.cmake: the variables an extension reads.
set(Slicer_FOUND TRUE)
set(Slicer_USE_PYTHONQT ON)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "{LIB_DIR}")
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "{LIB_DIR}")
set(Slicer_USE_FILE "${{CMAKE_CURRENT_LIST_DIR}}/UseSlicer.cmake")
set(Slicer_EXTENSION_GENERATE_CONFIG "${{CMAKE_CURRENT_LIST_DIR}}/GenerateConfig.cmake")
set(Slicer_EXTENSION_CPACK "${{CMAKE_CURRENT_LIST_DIR}}/CPack.cmake")
set(BUILD_TESTING ON)
"""

USE_SLICER = r"""
# Stub of UseSlicer.cmake. ctkMacroCompilePythonScript: copy each script/resource to
# DESTINATION_DIR/<relative path> at build time, install it to INSTALL_DIR/<relative dir>
# (NO_INSTALL_SUBDIR), as CTK's macro does for Slicer.
set(_ECHOFM_TESTS "${CMAKE_BINARY_DIR}/recorded_tests.txt")
file(WRITE ${_ECHOFM_TESTS} "")

function(ctkMacroCompilePythonScript)
  cmake_parse_arguments(MY "NO_INSTALL_SUBDIR" "TARGET_NAME;DESTINATION_DIR;INSTALL_DIR;SOURCE_DIR"
    "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "ctkMacroCompilePythonScript: unknown arguments ${MY_UNPARSED_ARGUMENTS}")
  endif()
  if(NOT MY_NO_INSTALL_SUBDIR)
    message(FATAL_ERROR "ctkMacroCompilePythonScript: this stub models NO_INSTALL_SUBDIR only")
  endif()
  set(_outputs)
  foreach(file IN LISTS MY_SCRIPTS MY_RESOURCES)
    get_filename_component(_ext ${file} EXT)
    if(file IN_LIST MY_SCRIPTS AND NOT _ext MATCHES "py")
      set(file "${file}.py")
    endif()
    set(src "${CMAKE_CURRENT_SOURCE_DIR}/${file}")
    if(NOT EXISTS "${src}")
      message(FATAL_ERROR "ctkMacroCompilePythonScript(${MY_TARGET_NAME}): no file ${src}")
    endif()
    set(tgt "${MY_DESTINATION_DIR}/${file}")
    add_custom_command(OUTPUT ${tgt} DEPENDS ${src} COMMAND ${CMAKE_COMMAND} -E copy ${src} ${tgt})
    list(APPEND _outputs ${tgt})
    get_filename_component(_dir ${file} DIRECTORY)
    install(FILES ${src} DESTINATION "${MY_INSTALL_DIR}/${_dir}" COMPONENT RuntimeLibraries)
  endforeach()
  add_custom_target(Copy${MY_TARGET_NAME}PythonFiles ALL DEPENDS ${_outputs})
endfunction()

function(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT;TESTNAME_PREFIX" "SLICER_ARGS" ${ARGN})
  file(APPEND ${_ECHOFM_TESTS} "${MY_TESTNAME_PREFIX}${MY_SCRIPT}|${MY_SLICER_ARGS}\n")
endfunction()

# As Slicer's SlicerMacroBuildScriptedModule.cmake: the module's scripts and resources go to
# ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR} and are installed to
# ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}; the generic tests run Slicer on the build tree.
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY_SLICER "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_SLICER_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "Unknown keywords given to slicerMacroBuildScriptedModule(): ${MY_SLICER_UNPARSED_ARGUMENTS}")
  endif()
  foreach(value IN LISTS MY_SLICER_SCRIPTS MY_SLICER_RESOURCES)
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${value} AND NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${value}.py)
      message(FATAL_ERROR "slicerMacroBuildScriptedModule given nonexistent file '${value}'")
    endif()
  endforeach()
  ctkMacroCompilePythonScript(
    TARGET_NAME ${MY_SLICER_NAME}
    SCRIPTS "${MY_SLICER_SCRIPTS}"
    RESOURCES "${MY_SLICER_RESOURCES}"
    DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}
    INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}
    NO_INSTALL_SUBDIR)
  if(BUILD_TESTING AND MY_SLICER_WITH_GENERIC_TESTS)
    slicer_add_python_unittest(SCRIPT qSlicer${MY_SLICER_NAME}ModuleGenericTest.py
      SLICER_ARGS --no-main-window --disable-cli-modules
                  --additional-module-path ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}
      TESTNAME_PREFIX nomainwindow_)
  endif()
endmacro()
"""


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """(build module path, install module path, recorded tests) of a real configure/build/install."""
    root = tmp_path_factory.mktemp("extension")
    stub = root / "Slicer-build"
    stub.mkdir()
    (stub / "SlicerConfig.cmake").write_text(SLICER_CONFIG)
    (stub / "UseSlicer.cmake").write_text(USE_SLICER)
    (stub / "GenerateConfig.cmake").write_text("# stub\n")
    (stub / "CPack.cmake").write_text("# stub\n")
    build, prefix = root / "build", root / "install"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []

    def run(*args):
        r = subprocess.run([CMAKE, *args], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"cmake {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r

    run("-S", str(REPO), "-B", str(build), *generator, f"-DSlicer_DIR={stub}")
    run("--build", str(build))
    run("--install", str(build), "--prefix", str(prefix))
    tests = [line.split("|") for line in (build / "recorded_tests.txt").read_text().splitlines() if line]
    return build / LIB_DIR, prefix / LIB_DIR, tests


def runtime_files() -> set:
    """Every file the extension needs at run time, relative to the module path."""
    files = {"EchoFMSlicer.py", "Resources/UI/EchoFMSlicer.ui", "Resources/Icons/EchoFMSlicer.png",
             "pyproject.toml", "EchoFMScripts/train.py"}
    files |= {p.relative_to(REPO / "EchoFMSlicer").as_posix() for p in (REPO / "EchoFMSlicer/EchoFMSlicerLib").glob("*.py")}
    files |= {p.relative_to(REPO).as_posix() for p in (REPO / "EchoFMEngine").rglob("*.py") if "__pycache__" not in p.parts}
    files |= {p.relative_to(REPO).as_posix() for p in (REPO / "EchoFMEngine/configs").glob("*.yaml")}
    return files


def listing(folder: Path) -> set:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_every_runtime_file_is_in_the_build_tree_and_the_install_tree(trees):
    build, install, _ = trees
    needed = runtime_files()
    assert len(needed) > 60                                      # the engine really was enumerated
    for name, tree in (("build", build), ("install", install)):
        missing = needed - listing(tree)
        assert not missing, f"missing from the {name} tree: {sorted(missing)[:10]}"
    assert listing(build) == listing(install), "the build and install trees differ"
    assert (build / "EchoFMEngine/cli.py").read_bytes() == (REPO / "EchoFMEngine/cli.py").read_bytes()


def test_no_python_file_at_the_top_of_a_module_path_but_the_modules(trees):
    """Slicer's qSlicerScriptedLoadableModuleFactory takes every *.py of a module path as a module
    (isValidFile: suffix "py"); a file without its module class fails to load at every start."""
    for tree in trees[:2]:
        top = sorted(p for p in tree.glob("*.py"))
        assert [p.name for p in top] == ["EchoFMSlicer.py"]
        for p in top:
            classes = {n.name for n in ast.parse(p.read_text()).body if isinstance(n, ast.ClassDef)}
            assert p.stem in classes, f"{p.name} has no class {p.stem}"


def test_the_generic_tests_run_slicer_on_the_build_tree(trees):
    build, _, tests = trees
    generic = [args for name, args in tests if name == "nomainwindow_qSlicerEchoFMSlicerModuleGenericTest.py"]
    assert generic, tests
    assert f"--additional-module-path;{build}" in generic[0]
    assert any(name == "EchoFMSlicer.py" for name, _ in tests)          # the module's self-test


def test_the_engine_and_its_requirements_are_found_from_the_build_tree(trees):
    """What the generated tests' Slicer sees: the module path on sys.path, nothing of the source tree."""
    build, _, _ = trees
    code = ("import sys; sys.path[:] = [p for p in sys.path if not p.startswith(%r)]; sys.path.insert(0, %r);"
            "import EchoFMEngine, EchoFMSlicerLib.dependencies as d; print(EchoFMEngine.__file__);"
            "print(d.find_pyproject()); print(len(d.engine_requirements()))") % (str(REPO), str(build))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=build)
    assert r.returncode == 0, r.stderr[-2000:]
    engine, pyproject, n = r.stdout.split()
    assert Path(engine).is_relative_to(build) and Path(pyproject) == build / "pyproject.toml" and int(n) > 5
