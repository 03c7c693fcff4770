"""EchoFMSlicer.py's widget wiring and its Slicer self-test, on a slicer-core scene.

The logic itself (EchoFMLogic) is tested without stand-ins in test_slicer_logic.py. Here only
what slicer-core lacks is stood in for, to drive the widget's own handlers: the base classes of
``slicer.ScriptedLoadableModule`` (the test base is unittest.TestCase), ``slicer.parameterNodeWrapper``
(the decorator returns the class), empty ``qt``/``ctk`` modules, a fake UI with one recording
object per widget of the .ui file, ``slicer.modules.sequences`` and the message boxes. The scene,
the logic and the engine's analysis in a child process (polled as the QTimer would) are real.
"""
from __future__ import annotations

import importlib.util
import sys
import time
import types
import unittest
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

slicer = pytest.importorskip("slicer", reason="slicer-core (PyPI) provides the MRML classes")


def _fake_framework() -> dict:
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self):
            pass

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    pnw = types.ModuleType("slicer.parameterNodeWrapper")

    def parameterNodeWrapper(cls):       # fields without a default (MRML nodes) start as None
        for name in cls.__annotations__:
            if not hasattr(cls, name):
                setattr(cls, name, None)
        return cls

    pnw.parameterNodeWrapper = parameterNodeWrapper

    class Choice:
        def __init__(self, choices):
            self.choices = list(choices)

    class WithinRange:
        def __init__(self, minimum, maximum):
            self.minimum, self.maximum = minimum, maximum

    pnw.Choice, pnw.WithinRange = Choice, WithinRange
    return {"qt": types.ModuleType("qt"), "ctk": types.ModuleType("ctk"),
            "slicer.ScriptedLoadableModule": slm, "slicer.parameterNodeWrapper": pnw}


def node_count(scene) -> int:
    return scene.GetNumberOfNodes()


class FakeWidget:
    """Stands in for one Qt widget: attributes set are kept, any method call is recorded."""

    def __init__(self, name):
        self.__dict__.update(name=name, calls=[])

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return lambda *args, **kwargs: self.calls.append((attr, args))


class FakeUI:
    """``self.ui``: one FakeWidget per widget name of the .ui file (an unknown name raises)."""

    def __init__(self):
        names = [w.get("name") for w in ET.parse(REPO / "EchoFMSlicer/Resources/UI/EchoFMSlicer.ui").iter("widget")]
        self.__dict__.update({n: FakeWidget(n) for n in names})



@pytest.fixture(scope="module")
def module():
    """EchoFMSlicer.py imported with the fake framework and ``slicer.mrmlScene`` = a slicer-core scene."""
    mp = pytest.MonkeyPatch()
    # As in Slicer, the module's folder is on sys.path (only while these tests run: it would hide
    # the repository's EchoFMSlicer/ folder from tests that import EchoFMSlicer.EchoFMSlicerLib).
    mp.syspath_prepend(str(REPO / "EchoFMSlicer"))
    from EchoFMSlicerLib.scene import new_scene

    fakes = _fake_framework()
    for name, mod in fakes.items():
        mp.setitem(sys.modules, name, mod)
    mp.setattr(slicer, "ScriptedLoadableModule", fakes["slicer.ScriptedLoadableModule"], raising=False)
    mp.setattr(slicer, "parameterNodeWrapper", fakes["slicer.parameterNodeWrapper"], raising=False)
    scene, _ = new_scene()
    mp.setattr(slicer, "mrmlScene", scene, raising=False)
    shown = []                         # what Slicer would show in message boxes

    @contextmanager
    def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
        try:
            yield
        except Exception as e:        # like Slicer's: show, then re-raise
            shown.append(f"{message}\n\n{e}")
            raise

    mp.setattr(slicer.util, "tryWithErrorDisplay", tryWithErrorDisplay)
    mp.setattr(slicer.util, "errorDisplay",
               lambda text, detailedText=None, **kw: shown.append(f"{text}\n{detailedText}"))
    answers = []                       # what the user answers to OK/Cancel questions (default: OK)
    mp.setattr(slicer.util, "confirmOkCancelDisplay",
               lambda text, *a, **kw: (shown.append(text), answers.pop(0) if answers else True)[1])
    mp.setattr(slicer, "modules", types.SimpleNamespace(sequences=FakeWidget("sequences")), raising=False)
    spec = importlib.util.spec_from_file_location("EchoFMSlicer_under_test", REPO / "EchoFMSlicer" / "EchoFMSlicer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.shown_messages, mod.answers = shown, answers
    yield mod
    mp.undo()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from EchoFMEngine.clinical.phantoms import make_study, write_dicom

    study = make_study("A4C", n_frames=24, size=(72, 80), fps=30.0, heart_rate_bpm=75, ef=55, seed=11)
    return study, write_dicom(study, tmp_path_factory.mktemp("phantom") / "a4c.dcm")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from EchoFMEngine.clinical.phantoms import make_study, write_dicom

    study = make_study("A4C", n_frames=24, size=(72, 80), fps=30.0, heart_rate_bpm=75, ef=55, seed=11)
    return study, write_dicom(study, tmp_path_factory.mktemp("phantom") / "a4c.dcm")


def test_the_slicer_self_test_passes_on_slicer_core(module):
    """EchoFMSlicerTest (what ctest runs inside Slicer) through the module's EchoFMSlicerLogic: phantom ->
    load, ED/ES, masks, measure, correction, reset, export, fine-tune command."""
    case = module.EchoFMSlicerTest("test_EchoFMSlicer_workflow")
    result = unittest.TestResult()
    case.run(result)
    problems = [tb for _, tb in result.errors + result.failures]
    assert not problems, problems[0]
    assert result.testsRun == 1 and not result.skipped


def make_widget(module, tmp_path):
    w = module.EchoFMSlicerWidget()
    w.logic, w.ui, w._timer = module.EchoFMSlicerLogic(), FakeUI(), FakeWidget("timer")
    w.logic.work_folder = tmp_path / "work"
    p = w._parameterNode = module.EchoFMSlicerParameterNode()
    p.modelsFolder, p.device, p.exportFolder = tmp_path / "no_models", "cpu", tmp_path / "export"
    return w, p


def run_job(w, timeout=240.0):
    end = time.monotonic() + timeout
    while w._job is not None:
        assert time.monotonic() < end, "background job did not end"
        w.onPollJob()
        time.sleep(0.05)


def test_the_panel_workflow_through_the_widget_handlers(module, phantom, tmp_path):
    """The widget's own handlers on a fake Qt UI: load, Analyze (the engine's CLI in a child process,
    polled as the QTimer would), the result in the panel, hand-drawn masks, measure, export, cancel."""
    from EchoFMSlicerLib import segmentation_nodes as sn

    study, path = phantom
    w, p = make_widget(module, tmp_path)
    scene = w.logic.scene
    assert scene is module.slicer.mrmlScene
    w._loadInput(str(path))
    assert p.inputBrowser is not None and "24 frames" in w.ui.inputInfoLabel.text
    assert "ECG present" in w.ui.inputInfoLabel.text
    assert module.slicer.modules.sequences.calls[-1] == ("setToolBarActiveBrowserNode", (p.inputBrowser,))

    w.onAnalyze()
    assert w._job is not None and ("start", ()) in w._timer.calls
    w.updateGUIFromParameterNode()
    assert w.ui.cancelButton.enabled and not w.ui.analyzeButton.enabled
    run_job(w)
    assert w.ui.statusLabel.text == "Analysis: done" and w.ui.progressBar.value == 100, module.shown_messages
    assert w.ui.viewLabel.text == "not identified" and "no fine-tuned 'view' model" in w.ui.viewProbabilitiesLabel.text
    assert "Aortic stenosis: not scored" in w.ui.scoreLabel.text
    assert w.ui.phaseLabel.text.startswith("ED frames") and "(from ecg)" in w.ui.phaseLabel.text
    assert "segment" in w.ui.analysisLabel.text and p.edSegmentation is None
    assert p.edFrame != p.esFrame and Path(p.analysisFolder).is_dir()
    assert Path(p.analysisFolder).parent.parent == tmp_path / "work"

    w.onGoToFrame(p.esFrame)
    assert p.inputBrowser.GetSelectedItemNumber() == p.esFrame
    w.onCreateMasks()
    assert p.edSegmentation is not None and p.esSegmentation is not None
    editor = w.ui.segmentEditorWidget.calls
    assert ("setSegmentationNode", (p.edSegmentation,)) in editor
    assert p.inputBrowser.GetSelectedItemNumber() == p.edFrame
    for seg, frame in ((p.edSegmentation, p.edFrame), (p.esSegmentation, p.esFrame)):
        for name, spec in sn.SEGMENTS.items():
            sn.set_segment_mask(seg, name, np.isin(study.masks[frame], spec.labels))
    w.onMeasure()
    assert "EDV" in w.ui.measureLabel.text and "EF" in w.ui.measureLabel.text
    assert w.ui.measurementsTableView.calls[-1][0] == "setMRMLTableNode"
    w.onExport()
    assert w.ui.exportLabel.text.startswith("Written: ") and (tmp_path / "export" / "dataset.csv").is_file()
    w.updateGUIFromParameterNode()
    assert w.ui.exportButton.enabled and w.ui.measureButton.enabled and not w.ui.cancelButton.enabled

    before = node_count(scene)
    w.onAnalyze()
    w.onCancelJob()
    run_job(w, timeout=30)
    assert w.ui.statusLabel.text == "Analysis: cancelled" and node_count(scene) == before

    with pytest.raises(ValueError, match="outside"):   # an error is shown (and re-raised, as in Slicer)
        w.onGoToFrame(999)
    assert "Failed to change the frame." in module.shown_messages[-1]


def test_missing_packages_are_installed_only_after_asking(module, tmp_path, monkeypatch):
    """The widget asks before installing (the logic only says what is missing); declining installs
    nothing and the action that needed the packages does not start."""
    from EchoFMSlicerLib import dependencies

    missing = ["timm>=0.9"]
    monkeypatch.setattr(dependencies, "missing_requirements", lambda requirements=None: list(missing))
    monkeypatch.setattr(dependencies, "pytorch_utils_available", lambda: False)
    installed = []
    monkeypatch.setattr(module.slicer.util, "pip_install", lambda reqs: installed.append(list(reqs)))
    w, p = make_widget(module, tmp_path)
    module.answers[:] = [False]
    w.onDetectPhase()                                   # needs the engine: asks, the user declines
    assert installed == [] and "timm>=0.9" in module.shown_messages[-1] and "text" not in vars(w.ui.phaseLabel)
    w.updateDependenciesStatus()
    assert w.ui.dependenciesLabel.text == "Missing Python packages: timm>=0.9"
    assert w.ui.installDependenciesButton.enabled
    module.answers[:] = [True]
    w.onInstallDependencies()
    assert installed == [["timm>=0.9"]]
    missing.clear()                                     # as after a successful pip install
    w.updateDependenciesStatus()
    assert w.ui.dependenciesLabel.text == "Python packages: all present."
    assert not w.ui.installDependenciesButton.enabled
