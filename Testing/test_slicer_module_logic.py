"""EchoFMSlicer.py's Logic and its Slicer self-test, run against slicer-core (real MRML scene).

Only the parts of the Slicer application that slicer-core lacks are stood in for: the base
classes of ``slicer.ScriptedLoadableModule`` (plain classes; the test base is unittest.TestCase),
``slicer.parameterNodeWrapper`` (the decorator returns the class) and empty ``qt``/``ctk``
modules (the widget is not exercised). Everything the Logic does -- loading, ED/ES, masks,
measurements, correction, export, the engine's CLI in a child process -- runs for real.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import types
import time
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
    mp.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, *a, **kw: True)
    spec = importlib.util.spec_from_file_location("EchoFMSlicer_under_test", REPO / "EchoFMSlicer" / "EchoFMSlicer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.shown_messages = shown
    yield mod
    mp.undo()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from EchoFMEngine.synthetic import make_study, write_dicom

    study = make_study("A4C", n_frames=24, size=(72, 80), fps=30.0, heart_rate_bpm=75, ef=55, seed=11)
    return study, write_dicom(study, tmp_path_factory.mktemp("phantom") / "a4c.dcm")


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


def test_the_slicer_self_test_passes_on_slicer_core(module):
    """EchoFMSlicerTest (what ctest runs inside Slicer): phantom -> load, ED/ES, masks, measure,
    correction, reset, export, fine-tune command."""
    case = module.EchoFMSlicerTest("test_EchoFMSlicer_workflow")
    result = unittest.TestResult()
    case.run(result)
    problems = [tb for _, tb in result.errors + result.failures]
    assert not problems, problems[0]
    assert result.testsRun == 1 and not result.skipped


def make_widget(module, tmp_path):
    w = module.EchoFMSlicerWidget()
    w.logic, w.ui, w._timer = module.EchoFMSlicerLogic(), FakeUI(), FakeWidget("timer")
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
    w._loadInput(str(path))
    assert p.inputBrowser is not None and "24 frames" in w.ui.inputInfoLabel.text
    assert "ECG present" in w.ui.inputInfoLabel.text

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


def test_a_browser_without_a_file_is_written_for_the_analysis(module, phantom, tmp_path):
    """A cine that came from elsewhere (e.g. Slicer's DICOM module) is written as an npz the engine reads."""
    from EchoFMEngine import load_cine
    from EchoFMSlicerLib import cine_nodes

    study, _ = phantom
    logic = module.EchoFMSlicerLogic()
    nodes = cine_nodes.cine_to_nodes(logic.scene, study.cine, "from_dicom_module", logics=logic.logics)
    path = logic.analysisInput(nodes.browser, tmp_path)
    assert path.suffix == ".npz"
    back = load_cine(path)
    assert np.array_equal(back.frames, study.cine.frames)
    assert back.spacing_mm == pytest.approx(study.cine.spacing_mm)
    assert np.allclose(back.frame_times_s, study.cine.frame_times_s)


def test_bad_input_is_refused_and_leaves_the_scene_as_it_was(module, phantom, tmp_path):
    from EchoFMSlicerLib import cine_nodes

    study, path = phantom
    logic = module.EchoFMSlicerLogic()
    scene = logic.scene
    # a still image (one frame) loads, but is not analysable: a clear message
    still = cine_nodes.cine_to_nodes(scene, type(study.cine)(frames=study.cine.frames[:1], fps=30.0), "still",
                                     logics=logic.logics)
    with pytest.raises(ValueError, match="single frame"):
        logic.checkAnalysable(still.browser)
    # an unreadable file: the reader's message, nothing added to the scene
    bad = tmp_path / "broken.avi"
    bad.write_bytes(b"not a video")
    before = node_count(scene)
    with pytest.raises(ValueError, match="broken.avi"):
        logic.loadCine(bad)
    assert node_count(scene) == before
    # a result folder for another cine: refused, nothing half-made
    nodes = logic.loadCine(path)
    other = tmp_path / "out" / "other"
    other.mkdir(parents=True)
    (other / "result.json").write_text(json.dumps({"cine": {"frames": 99, "height": 10, "width": 10}}))
    before = node_count(scene)
    with pytest.raises(ValueError, match="pick the cine that was analysed"):
        logic.applyAnalysis(nodes.browser, tmp_path / "out")
    assert node_count(scene) == before
    with pytest.raises(RuntimeError, match="no result"):
        logic.studyFolder(tmp_path / "empty")
    # frames outside the cine, ED == ES, weights that do not exist, unknown tasks/devices
    with pytest.raises(ValueError, match="outside"):
        logic.goToFrame(nodes.browser, 10_000)
    with pytest.raises(ValueError, match="same frame"):
        logic.createEmptyMasks(nodes.browser, 3, 3)
    assert node_count(scene) == before
    with pytest.raises(ValueError, match="does not exist"):
        logic.importWeightsCommand(tmp_path / "nothing.safetensors", "segment", tmp_path / "models")
    with pytest.raises(ValueError, match="unknown task"):
        logic.importWeightsCommand(path, "lvef", tmp_path / "models")
    with pytest.raises(ValueError, match="device"):
        logic.analysisCommand(path, tmp_path, tmp_path, "gpu", False)
    with pytest.raises(ValueError, match="use Export first"):
        logic.finetuneCommand(tmp_path, tmp_path / "run", 10)


def test_a_weights_file_that_is_not_a_checkpoint_fails_with_its_reason(module, tmp_path):
    """Settings > Import weights: the registry's refusal reaches the panel through the runner."""
    from EchoFMSlicerLib.runner import BackgroundProcess

    logic = module.EchoFMSlicerLogic()
    fake = tmp_path / "downloaded.safetensors"
    fake.write_bytes(b"\x00" * 64)
    job = BackgroundProcess(logic.importWeightsCommand(fake, "segment", tmp_path / "models"),
                            env=logic.childEnvironment(), name="Importing weights").start()
    assert job.wait(timeout=120) == 1
    assert "Importing weights failed with exit code 1" in job.error_message
    assert "downloaded.safetensors" in job.error_message and "safetensors" in job.error_message
    assert "Missing: segment" in logic.modelsStatus(tmp_path / "models") or \
        "does not exist" in logic.modelsStatus(tmp_path / "models")


def test_hand_drawn_masks_measure_and_export_as_corrected(module, phantom, tmp_path):
    """No segmentation model: empty ED/ES masks are drawn (here: written as an editor would), measured
    and exported as "corrected"; the fine-tuning command's overrides are keys the config accepts."""
    from EchoFMEngine.measure import cardiac_measurements
    from EchoFMEngine.training.config import load_config
    from EchoFMSlicerLib import segmentation_nodes as sn

    study, path = phantom
    logic = module.EchoFMSlicerLogic()
    nodes = logic.loadCine(path)
    phase = logic.detectPhase(nodes.browser)
    ed = phase["ed_frames"][0]
    es = next(f for f in phase["es_frames"] if f != ed)
    edSeg, esSeg = logic.createEmptyMasks(nodes.browser, ed, es)
    assert logic.aiSegmentation(edSeg) is None
    for seg, frame in ((edSeg, ed), (esSeg, es)):
        for name, spec in sn.SEGMENTS.items():
            sn.set_segment_mask(seg, name, np.isin(study.masks[frame], spec.labels), reference=nodes.proxy)
    scene = logic.scene
    m, table = logic.measure(nodes.browser, edSeg, esSeg)
    expected = cardiac_measurements(study.masks[[ed, es]], study.cine.spacing_mm, [0], [1])
    assert m["edv"] == pytest.approx(expected["lv_volume"][0]) and m["esv"] == pytest.approx(expected["lv_volume"][1])
    assert (m["masks"]["ED"]["source"], m["masks"]["ED"]["frame"]) == ("corrected", ed)
    assert "EDV" in logic.describeMeasurements(m)
    count = node_count(scene)
    logic.measure(nodes.browser, edSeg, esSeg)                 # measuring again replaces, never piles up
    assert node_count(scene) == count
    written = logic.export(tmp_path / "export", nodes.browser, edSeg, esSeg)
    assert all(Path(w).is_file() for w in written)
    rows = (tmp_path / "export" / "dataset.csv").read_text().splitlines()
    assert len(rows) == 2 and f"{ed};{es}" in rows[1] and "corrected,corrected" in rows[1]
    cmd = logic.finetuneCommand(tmp_path / "export", tmp_path / "run", 7, "cpu", tmp_path / "no_models")
    i = cmd.index("--config")
    assert Path(cmd[i - 1]).name == "train.py" and Path(cmd[i + 1]).name == "finetune_segment.yaml"
    cfg = load_config(cmd[i + 1], cmd[i + 2:])               # every override is a known key
    assert (cfg["data"]["kind"], cfg["data"]["root"], cfg["run"]["steps"]) == ("csv", str(tmp_path / "export"), 7)
    assert cfg["data"]["val_split"] is None and cfg["run"]["out"] == str(tmp_path / "run")
