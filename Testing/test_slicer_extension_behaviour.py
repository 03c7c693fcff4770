"""Issue-14 behaviour of the Slicer library on a real slicer-core scene (no Qt, no stand-ins for MRML).

Correction on a fixed copy of the ED/ES frame (scrubbing does not change it), AI masks as outlines
and corrections filled, the 2D-echo layout with the ECG plot, SlicerHeart's ECG table columns and
references, package checks that report a missing pyproject instead of "all present", Slicer's
pip_ensure called with Requirement objects and without a second prompt, and train.py found in a
built extension's EchoFMScripts/.
"""
from __future__ import annotations

import importlib.metadata
import inspect
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (PyPI) provides the MRML classes")

from vtk.util import numpy_support  # noqa: E402

from EchoFMSlicer.EchoFMSlicerLib import cine_nodes, dependencies, ecg_nodes, segmentation_nodes  # noqa: E402
from EchoFMSlicer.EchoFMSlicerLib.logic import ECHO_LAYOUT_ID, EchoFMLogic  # noqa: E402
from EchoFMSlicer.EchoFMSlicerLib.scene import new_scene  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    from EchoFMEngine.clinical.phantoms import make_study, write_dicom

    study = make_study("A4C", n_frames=16, size=(72, 80), fps=30.0, heart_rate_bpm=75, ef=55, seed=8)
    path = write_dicom(study, tmp_path_factory.mktemp("p14") / "a4c.dcm")
    scene, logics = new_scene()
    scene.AddNewNodeByClass("vtkMRMLLayoutNode")              # Slicer's scene has one
    logic = EchoFMLogic(scene, logics=logics)
    return study, logic, logic.load_cine(path)


def pixels(volume) -> np.ndarray:
    return numpy_support.vtk_to_numpy(volume.GetImageData().GetPointData().GetScalars()).copy()


def test_correction_uses_a_fixed_frame_that_scrubbing_does_not_change(loaded):
    study, logic, nodes = loaded
    nodes.browser.SetPlaybackActive(True)
    fixed = logic.correction_volume(nodes.browser, 5)
    frame5 = pixels(nodes.sequence.GetNthDataNode(5))
    assert fixed is not nodes.proxy and np.array_equal(pixels(fixed), frame5)
    assert not nodes.browser.GetPlaybackActive() and nodes.browser.GetSelectedItemNumber() == 5
    assert logic.logics.app.GetSelectionNode().GetActiveVolumeID() == fixed.GetID()
    logic.go_to_frame(nodes.browser, 11)                      # scrub while correcting
    assert not np.array_equal(pixels(nodes.proxy), frame5)   # the live proxy moved on ...
    assert np.array_equal(pixels(fixed), frame5)             # ... the editor's source volume did not
    again = logic.correction_volume(nodes.browser, 9)         # one node per browser, reused
    assert again is fixed and np.array_equal(pixels(fixed), pixels(nodes.sequence.GetNthDataNode(9)))
    with pytest.raises(ValueError, match="outside"):
        logic.correction_volume(nodes.browser, 99)


def test_ai_masks_are_outlines_and_corrections_are_filled(loaded):
    study, logic, nodes = loaded
    ed, es = logic.ed_es_segmentations(nodes.browser, study.masks, 2, 9)
    for seg in (ed, es):
        ai = segmentation_nodes.ai_copy(seg)
        d, dai = seg.GetDisplayNode(), ai.GetDisplayNode()
        assert d.GetVisibility2DFill() and d.GetVisibility2DOutline() and d.GetOpacity2DFill() > 0
        assert not dai.GetVisibility2DFill() and dai.GetVisibility2DOutline()
        for name in segmentation_nodes.SEGMENTS:
            c = np.array(seg.GetSegmentation().GetSegment(name).GetColor())
            cai = np.array(ai.GetSegmentation().GetSegment(name).GetColor())
            assert not np.allclose(c, cai) and np.all(cai >= c)          # same hue, lighter
    assert logic.provenance(ed)["source"] == "AI"                          # display is not a correction


def test_the_layout_is_one_slice_view_with_the_ecg_plot(loaded):
    _, logic, nodes = loaded
    logic.show_cine(nodes)
    layout = logic.scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    assert layout.GetViewArrangement() == ECHO_LAYOUT_ID and layout.IsLayoutDescription(ECHO_LAYOUT_ID)
    xml = layout.GetLayoutDescription(ECHO_LAYOUT_ID)
    assert xml.count("vtkMRMLSliceNode") == 1 and "vtkMRMLPlotViewNode" in xml and "vtkMRMLViewNode" not in xml
    assert logic.logics.app.GetSelectionNode().GetActivePlotChartID() == nodes.ecg_chart.GetID()
    assert logic.show_echo_layout(None) == layout.SlicerLayoutOneUpRedSliceView
    scene, logics = new_scene()
    assert EchoFMLogic(scene, logics=logics).show_echo_layout(None) is None   # no layout node: nothing to do


def test_the_ecg_table_has_slicerhearts_columns_and_references(loaded):
    study, _, nodes = loaded
    table = nodes.ecg_table
    names = [table.GetTable().GetColumnName(i) for i in range(table.GetNumberOfColumns())]
    assert names == ["time", "ecg", "triggerTimes"]
    for holder in (nodes.browser, nodes.sequence, nodes.proxy):
        assert holder.GetNodeReference(ecg_nodes.ECG_ROLE) is table
    peaks = ecg_nodes.r_peak_times(table)
    assert peaks.size == len(study.r_peak_times_s)
    np.testing.assert_allclose(peaks, study.r_peak_times_s, atol=0.02)


def test_a_missing_pyproject_is_reported_not_taken_for_all_present(monkeypatch):
    monkeypatch.setattr(dependencies, "find_pyproject", lambda start=None: None)

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(dependencies.importlib.metadata, "requires", not_installed)
    with pytest.raises(FileNotFoundError, match="pyproject.toml"):
        EchoFMLogic.missing_packages()


def test_pip_ensure_gets_requirement_objects_and_no_second_prompt():
    calls = []

    def pip_ensure(requirements, constraints=None, skip_packages=None, prompt_install=True, prompt_restart=True,
                   requester=None, skip_in_testing=True, show_progress=True):
        calls.append((requirements, skip_packages, prompt_install, requester))

    assert dependencies.run_pip(["timm>=0.9", "pydicom"], pip_ensure=pip_ensure) == "pip_ensure"
    reqs, skip, prompt, requester = calls[-1]
    assert [str(r) for r in reqs] == ["timm>=0.9", "pydicom"] and type(reqs[0]).__module__.startswith("packaging")
    assert prompt is False and requester == "EchoFM" and {"numpy", "SimpleITK", "torch"} <= set(skip)
    dependencies.run_pip(["torch>=2.1", "timm"], pip_ensure=pip_ensure)   # torch by pip: not skipped
    assert "torch" not in calls[-1][1]
    dependencies.run_pip(["timm"], pip_ensure=lambda requirements: calls.append(("old", requirements)))
    assert calls[-1][0] == "old"                                          # older signature: no extra kwargs
    installed = []
    assert dependencies.slicer_pip_ensure() is None                       # slicer-core has neither module
    assert dependencies.run_pip(["timm"], pip_install=installed.append) == "pip_install"
    assert installed == [["timm"]]
    assert dependencies.run_pip([], pip_install=installed.append) == "nothing" and len(installed) == 1
    assert "prompt_install" in inspect.signature(pip_ensure).parameters


def test_train_py_is_found_in_a_built_extensions_scripts_folder(tmp_path, monkeypatch):
    assert EchoFMLogic.train_script() == REPO / "train.py"               # source checkout
    (tmp_path / "EchoFMScripts").mkdir()
    (tmp_path / "EchoFMScripts" / "train.py").write_text("")
    monkeypatch.setattr(EchoFMLogic, "engine_root", staticmethod(lambda: tmp_path))
    assert EchoFMLogic.train_script() == tmp_path / "EchoFMScripts" / "train.py"
    (tmp_path / "EchoFMScripts" / "train.py").unlink()
    with pytest.raises(FileNotFoundError, match="train.py"):
        EchoFMLogic.train_script()
