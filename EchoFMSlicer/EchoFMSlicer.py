"""EchoFM: the 3D Slicer module for echocardiography cine loops (view, ED/ES, masks, volumes, scores).

A thin shell over two Qt-free packages: ``EchoFMEngine`` (models, analysis, training) and
``EchoFMSlicerLib`` (cine/segmentation/table nodes, export, the background process runner).
Long work runs in a child process (``python -m EchoFMEngine analyze``, ``train.py``) polled by a
``qt.QTimer``, so the application never freezes and Cancel kills the whole process tree.
"""
import datetime
import json
import logging
import os
import pathlib
import sys
import tempfile
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer import vtkMRMLSegmentationNode, vtkMRMLSequenceBrowserNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

# Loaded from a source checkout ("Additional module paths" = <repo>/EchoFMSlicer): the engine lives
# one folder up. An installed extension has it beside the module already.
_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_DIR = os.path.dirname(_MODULE_DIR)
try:
    import EchoFMEngine
except ImportError:
    if os.path.isfile(os.path.join(_REPO_DIR, "EchoFMEngine", "__init__.py")):
        sys.path.insert(0, _REPO_DIR)
    import EchoFMEngine

from EchoFMSlicerLib import dependencies
from EchoFMSlicerLib.runner import BackgroundProcess, engine_environment, python_command

TASKS = ["segment", "view", "as", "ar", "ef"]
DEVICES = ["auto", "cuda", "cpu"]
FINETUNE_CONFIG = os.path.join("Resources", "configs", "finetune_segment.yaml")
SOURCE_ATTRIBUTE = "EchoFM.SourceFile"      # browser attribute: the file a cine was loaded from


#
# EchoFMSlicer
#

class EchoFMSlicer(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "EchoFM"
        self.parent.categories = ["Cardiac"]
        self.parent.dependencies = []
        self.parent.contributors = ["EchoFM for 3D Slicer contributors"]
        self.parent.helpText = """
Echocardiography cine loops with the EchoFM foundation model: load a cine (DICOM, AVI/MP4, NRRD,
NIfTI), identify the view, find end-diastole and end-systole, segment the LV and LA, correct the
masks with the Segment Editor, measure EDV/ESV/EF and LA volume, score aortic stenosis, export
the corrected masks as training data and fine-tune on them. Results that need fine-tuned weights
say which weights are missing; nothing is guessed. Not for clinical use.
See <a href="https://github.com/echofm-slicer/EchoFM/blob/main/docs/slicer.md">docs/slicer.md</a>.
"""
        self.parent.acknowledgementText = """
EchoFM is the work of Kim et al. (EchoFM: Foundation Model for Generalizable Echocardiogram
Analysis); this extension re-implements it from the paper. The module layout follows Slicer's
scripted-module template and the split of SlicerNNUNet (thin widget over a testable library).
"""


#
# Parameter node
#

@parameterNodeWrapper
class EchoFMSlicerParameterNode:
    """The panel's state, saved with the scene; widgets bind to it through SlicerParameterName."""

    inputBrowser: vtkMRMLSequenceBrowserNode
    segmentAllFrames: bool = False
    edFrame: Annotated[int, WithinRange(0, 100000)] = 0
    esFrame: Annotated[int, WithinRange(0, 100000)] = 0
    edSegmentation: vtkMRMLSegmentationNode
    esSegmentation: vtkMRMLSegmentationNode
    showAIMasks: bool = True
    exportFolder: pathlib.Path = pathlib.Path()      # empty: filled in by the widget
    finetuneSteps: Annotated[int, WithinRange(1, 100000)] = 300
    finetuneImportResult: bool = False   # replace the segment model only when asked
    modelsFolder: pathlib.Path = pathlib.Path()
    importWeightsFile: pathlib.Path = pathlib.Path()
    importTask: Annotated[str, Choice(TASKS)] = "segment"
    device: Annotated[str, Choice(DEVICES)] = "auto"
    analysisFolder: str = ""          # OUT folder of the last analysis of inputBrowser


#
# Widget
#

class EchoFMSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: binds the .ui to the parameter node and turns button clicks into logic calls."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None                  # (BackgroundProcess, on_success, title)
        self._timer = None
        self._lastMeasurements = None
        self._observedBrowser = None
        self._editing = "ED"              # which mask the Segment Editor shows

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/EchoFMSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = EchoFMSlicerLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.timeout.connect(self.onPollJob)

        editorNode = self.logic.segmentEditorNode()
        self.ui.segmentEditorWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(editorNode)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.loadFileButton.connect("clicked(bool)", self.onLoadFile)
        self.ui.loadFolderButton.connect("clicked(bool)", self.onLoadFolder)
        self.ui.dicomDatabaseButton.connect("clicked(bool)", lambda: slicer.util.selectModule("DICOM"))
        self.ui.analyzeButton.connect("clicked(bool)", self.onAnalyze)
        self.ui.detectPhaseButton.connect("clicked(bool)", self.onDetectPhase)
        self.ui.goToEDButton.connect("clicked(bool)", lambda: self.onGoToFrame(self._parameterNode.edFrame))
        self.ui.goToESButton.connect("clicked(bool)", lambda: self.onGoToFrame(self._parameterNode.esFrame))
        self.ui.correctEDButton.connect("clicked(bool)", lambda: self.onCorrect("ED"))
        self.ui.correctESButton.connect("clicked(bool)", lambda: self.onCorrect("ES"))
        self.ui.resetCorrectionButton.connect("clicked(bool)", self.onResetCorrection)
        self.ui.createMasksButton.connect("clicked(bool)", self.onCreateMasks)
        self.ui.showAICheckBox.connect("toggled(bool)", self.onShowAI)
        self.ui.measureButton.connect("clicked(bool)", self.onMeasure)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetune)
        self.ui.importWeightsButton.connect("clicked(bool)", self.onImportWeights)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.modelsFolderPathLineEdit.connect("currentPathChanged(QString)", self.onModelsFolderChanged)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelJob)

        self.initializeParameterNode()
        self.updateDependenciesStatus()

    def cleanup(self) -> None:
        if self._job is not None:
            self._job[0].cancel()
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.ui.segmentEditorWidget.setActiveEffect(None)
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:
            self._job[0].cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if not p.inputBrowser:
            browser = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSequenceBrowserNode")
            if browser:
                p.inputBrowser = browser
        if str(p.modelsFolder) in ("", "."):
            p.modelsFolder = self.logic.defaultModelsFolder()
        if str(p.exportFolder) in ("", "."):
            p.exportFolder = pathlib.Path.home() / "EchoFM" / "corrections"

    def setParameterNode(self, inputParameterNode: Optional[EchoFMSlicerParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    # ------------------------------------------------------------------ GUI state
    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        """Enable what the current state allows, and describe the selected cine."""
        p = self._parameterNode
        if p is None:
            return
        busy = self._job is not None
        hasCine = p.inputBrowser is not None
        hasMasks = p.edSegmentation is not None and p.esSegmentation is not None
        self.ui.analyzeButton.enabled = hasCine and not busy
        self.ui.detectPhaseButton.enabled = hasCine
        self.ui.goToEDButton.enabled = hasCine
        self.ui.goToESButton.enabled = hasCine
        self.ui.correctEDButton.enabled = p.edSegmentation is not None and hasCine
        self.ui.correctESButton.enabled = p.esSegmentation is not None and hasCine
        self.ui.resetCorrectionButton.enabled = hasMasks
        self.ui.createMasksButton.enabled = hasCine
        self.ui.measureButton.enabled = hasMasks and hasCine
        self.ui.exportButton.enabled = hasMasks and hasCine
        self.ui.finetuneButton.enabled = not busy
        self.ui.importWeightsButton.enabled = not busy and str(p.importWeightsFile) not in ("", ".")
        self.ui.cancelButton.enabled = busy
        if hasCine:
            n = self.logic.frameCount(p.inputBrowser)
            self.ui.edFrameSpinBox.maximum = max(n - 1, 0)
            self.ui.esFrameSpinBox.maximum = max(n - 1, 0)
        if p.inputBrowser is not self._observedBrowser:
            self._observeBrowser(p.inputBrowser)
            self.ui.inputInfoLabel.text = (self.logic.describeCine(p.inputBrowser) if hasCine
                                           else "No cine loop selected.")

    def _observeBrowser(self, browser) -> None:
        """Keep the ECG frame marker on the current frame."""
        if self._observedBrowser is not None:
            self.removeObserver(self._observedBrowser, vtk.vtkCommand.ModifiedEvent, self.onBrowserModified)
        self._observedBrowser = browser
        if browser is not None:
            self.addObserver(browser, vtk.vtkCommand.ModifiedEvent, self.onBrowserModified)

    def onBrowserModified(self, caller, event) -> None:
        try:
            self.logic.updateFrameMarker(caller)
        except Exception as e:          # a marker is cosmetic: never interrupt playback for it
            logging.debug(f"EchoFM: frame marker not updated: {e}")

    def updateDependenciesStatus(self) -> None:
        missing = self.logic.missingPackages()
        self.ui.dependenciesLabel.text = ("Python packages: all present." if not missing else
                                          "Missing Python packages: " + ", ".join(missing))
        self.ui.installDependenciesButton.enabled = bool(missing)
        self.onModelsFolderChanged()

    def onModelsFolderChanged(self, _path=None) -> None:
        if self._parameterNode is not None:
            self.ui.modelsStatusLabel.text = self.logic.modelsStatus(self._parameterNode.modelsFolder)

    def _requirePackages(self) -> bool:
        """True when the engine's packages are present; otherwise offers to install them."""
        if not self.logic.missingPackages():
            return True
        self.onInstallDependencies()
        return not self.logic.missingPackages()

    # ------------------------------------------------------------------ input
    def onLoadFile(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), "Load an echo cine loop", "",
            "Cine loops (*.dcm *.avi *.mp4 *.mov *.nrrd *.nii *.nii.gz *.mha *.mhd *.npz *.npy);;All files (*)")
        if path:
            self._loadInput(path)

    def onLoadFolder(self) -> None:
        path = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Load a DICOM folder")
        if path:
            self._loadInput(path)

    def _loadInput(self, path: str) -> None:
        if not self._requirePackages():
            return
        with slicer.util.tryWithErrorDisplay(f"Failed to load {os.path.basename(path)}.", waitCursor=True):
            cineNodes = self.logic.loadCine(path)
            self._parameterNode.inputBrowser = cineNodes.browser
            self._parameterNode.analysisFolder = ""
            self.ui.inputInfoLabel.text = self.logic.describeCine(cineNodes.browser)
            self.logic.showCine(cineNodes)

    # ------------------------------------------------------------------ analysis
    def onAnalyze(self) -> None:
        if not self._requirePackages():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to start the analysis.", waitCursor=True):
            notes = self.logic.checkAnalysable(p.inputBrowser)
            self.ui.analysisLabel.text = "\n".join(notes)
            outDir = self.logic.newWorkFolder("analysis")
            inputPath = self.logic.analysisInput(p.inputBrowser, outDir)
            cmd = self.logic.analysisCommand(inputPath, outDir / "out", p.modelsFolder, p.device, p.segmentAllFrames)
            browser = p.inputBrowser
            self._startJob(cmd, "Analysis", lambda: self._onAnalysisDone(browser, outDir / "out"))

    def _onAnalysisDone(self, browser, outDir) -> None:
        p = self._parameterNode
        summary = self.logic.applyAnalysis(browser, outDir)
        p.analysisFolder = str(outDir)
        result = summary["result"]
        self.ui.viewLabel.text, self.ui.viewProbabilitiesLabel.text = self.logic.describeView(result)
        self.ui.scoreLabel.text = self.logic.describeScores(result)
        self._showPhase(result.get("phase"))
        if summary.get("ed_segmentation") is not None:
            p.edSegmentation = summary["ed_segmentation"]
            p.esSegmentation = summary["es_segmentation"]
            p.edFrame = self.logic.maskFrame(p.edSegmentation, default=p.edFrame)
            p.esFrame = self.logic.maskFrame(p.esSegmentation, default=p.esFrame)
        if result.get("measurements"):
            self._showMeasurements(summary.get("measurements_table"), result["measurements"])
        self.ui.analysisLabel.text = self.logic.describeAnalysis(result)

    def onDetectPhase(self) -> None:
        if not self._requirePackages():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to detect ED/ES.", waitCursor=True):
            phase = self.logic.detectPhase(p.inputBrowser)
            self._showPhase(phase)

    def _showPhase(self, phase) -> None:
        if not phase:
            self.ui.phaseLabel.text = "ED/ES not found."
            return
        p = self._parameterNode
        self.ui.phaseLabel.text = self.logic.describePhase(phase)
        if phase.get("ed_frames"):
            p.edFrame = int(phase["ed_frames"][0])
        es = [f for f in phase.get("es_frames", []) if f > p.edFrame] or phase.get("es_frames", [])
        if es:
            p.esFrame = int(es[0])

    def onGoToFrame(self, frame: int) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to change the frame."):
            self.logic.goToFrame(self._parameterNode.inputBrowser, frame)

    # ------------------------------------------------------------------ correction
    def onCorrect(self, which: str) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(f"Failed to start editing the {which} masks."):
            frame = p.edFrame if which == "ED" else p.esFrame
            seg = p.edSegmentation if which == "ED" else p.esSegmentation
            if seg is None:
                raise ValueError(f"no {which} masks yet: run Analyze with a segment model, or create empty masks")
            frame = self.logic.maskFrame(seg, default=frame)     # the frame these masks were made for
            reference = self.logic.goToFrame(p.inputBrowser, frame)
            self._editing = which
            editor = self.ui.segmentEditorWidget
            editor.setSegmentationNode(seg)
            if hasattr(editor, "setSourceVolumeNode"):
                editor.setSourceVolumeNode(reference)
            else:                                   # Slicer < 5.2
                editor.setMasterVolumeNode(reference)
            self.logic.showSegmentations(seg, p.edSegmentation if which == "ES" else p.esSegmentation,
                                         p.showAIMasks)

    def onCreateMasks(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to create the masks."):
            p.edSegmentation, p.esSegmentation = self.logic.createEmptyMasks(p.inputBrowser, p.edFrame, p.esFrame)
        self.onCorrect("ED")

    def onResetCorrection(self) -> None:
        p = self._parameterNode
        which = self._editing
        seg = p.edSegmentation if which == "ED" else p.esSegmentation
        if not slicer.util.confirmOkCancelDisplay(f"Replace the corrected {which} masks with the model's output?"):
            return
        with slicer.util.tryWithErrorDisplay(f"Failed to reset the {which} masks."):
            self.logic.resetToAI(seg)

    def onShowAI(self, show: bool) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to change the display of the AI masks."):
            for seg in (p.edSegmentation, p.esSegmentation):
                if seg is not None:
                    self.logic.setAIVisible(seg, show)

    # ------------------------------------------------------------------ measure, export
    def onMeasure(self) -> None:
        if not self._requirePackages():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to measure.", waitCursor=True):
            m, table = self.logic.measure(p.inputBrowser, p.edSegmentation, p.esSegmentation, p.analysisFolder)
            self._showMeasurements(table, m)

    def _showMeasurements(self, table, m: dict) -> None:
        self._lastMeasurements = m
        if table is not None:
            self.ui.measurementsTableView.setMRMLTableNode(table)
        self.ui.measureLabel.text = self.logic.describeMeasurements(m)

    def onExport(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to export.", waitCursor=True):
            written = self.logic.export(p.exportFolder, p.inputBrowser, p.edSegmentation, p.esSegmentation,
                                        p.analysisFolder)
            self.ui.exportLabel.text = "Written: " + ", ".join(str(w) for w in written)

    # ------------------------------------------------------------------ fine-tune, settings
    def onFinetune(self) -> None:
        if not self._requirePackages():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to start fine-tuning.", waitCursor=True):
            runDir = self.logic.newWorkFolder("finetune", base=p.exportFolder / "runs")
            cmd = self.logic.finetuneCommand(p.exportFolder, runDir, p.finetuneSteps, p.device, p.modelsFolder)
            importAfter, models = p.finetuneImportResult, p.modelsFolder
            self._startJob(cmd, "Fine-tuning", lambda: self._onFinetuneDone(runDir, importAfter, models),
                           cwd=self.logic.engineRoot())

    def _onFinetuneDone(self, runDir, importAfter: bool, modelsFolder) -> None:
        model = self.logic.finetunedModel(runDir)
        self.ui.finetuneLabel.text = f"Fine-tuned model: {model}"
        if importAfter:
            cmd = self.logic.importWeightsCommand(model, "segment", modelsFolder)
            self._startJob(cmd, "Importing the fine-tuned model", self.onModelsFolderChanged)

    def onImportWeights(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to import the weights."):
            cmd = self.logic.importWeightsCommand(p.importWeightsFile, p.importTask, p.modelsFolder)
            self._startJob(cmd, "Importing weights", self.onModelsFolderChanged)

    def onInstallDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to install the Python packages.", waitCursor=True):
            self.logic.installMissingPackages(ask=True)
        self.updateDependenciesStatus()

    # ------------------------------------------------------------------ background jobs
    def _startJob(self, cmd, title: str, onSuccess, cwd=None) -> None:
        """Start ``cmd`` in a child process; its progress drives the bar until it ends."""
        if self._job is not None:
            raise RuntimeError(f"{self._job[2]} is still running; wait for it or cancel it first")
        process = BackgroundProcess(cmd, cwd=cwd, env=self.logic.childEnvironment(), name=title)
        logging.info(f"EchoFM: {title} started")      # not the command: its paths may name a patient
        process.start()
        self._job = (process, onSuccess, title)
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = f"{title}: started"
        self.ui.logTextEdit.clear()
        self._timer.start()
        self.updateGUIFromParameterNode()

    def onPollJob(self) -> None:
        if self._job is None:
            self._timer.stop()
            return
        process, onSuccess, title = self._job
        ended = process.finished          # read first: once ended, poll() hands out every last line
        for e in process.poll():
            if e.kind == "progress":
                self.ui.progressBar.value = int(round(100 * e.fraction))
                self.ui.statusLabel.text = f"{title}: {e.done}/{e.total} {e.text}".rstrip()
            elif e.kind in ("stdout", "stderr"):
                self.ui.logTextEdit.appendPlainText(e.text)
        if not ended:
            return
        self._timer.stop()
        self._job = None
        self.updateGUIFromParameterNode()
        if process.cancelled:
            self.ui.statusLabel.text = f"{title}: cancelled"
        elif process.returncode != 0:
            self.ui.statusLabel.text = f"{title}: failed"
            slicer.util.errorDisplay(f"{title} failed.", detailedText=process.error_message)
        else:
            self.ui.progressBar.value = 100
            self.ui.statusLabel.text = f"{title}: done"
            with slicer.util.tryWithErrorDisplay(f"{title} finished, but its result could not be shown.",
                                                 waitCursor=True):
                onSuccess()

    def onCancelJob(self) -> None:
        if self._job is not None:
            with slicer.util.tryWithErrorDisplay("Failed to cancel."):
                self.ui.statusLabel.text = f"{self._job[2]}: cancelling..."
                self._job[0].cancel(grace_s=1.0)


#
# Logic
#

class EchoFMSlicerLogic(ScriptedLoadableModuleLogic):
    """Everything the panel does, without widgets: composes EchoFMSlicerLib and the engine.

    ``scene`` defaults to ``slicer.mrmlScene``; the library functions get it explicitly."""

    def __init__(self, scene=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.scene = scene if scene is not None else slicer.mrmlScene
        self._logics = None
        self._cineNodes = {}              # browser ID -> CineNodes made by this logic
        self._measureNodes = {}           # browser ID -> table/plot of the last "measure" (replaced next time)

    def getParameterNode(self):
        return EchoFMSlicerParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ plumbing
    @property
    def logics(self):
        """Module logics the library needs (sequences, segmentations, ...): Slicer's own inside the
        application, created once for a headless scene."""
        if self._logics is None:
            from EchoFMSlicerLib import scene as libscene
            app = getattr(slicer, "app", None)
            appLogic = app.applicationLogic() if app is not None and self.scene is slicer.mrmlScene else None
            self._logics = libscene.register_modules(self.scene, appLogic)
        return self._logics

    def sceneGuard(self):
        """Every node added inside the block is removed when it raises: an error leaves the scene as it was."""
        from EchoFMSlicerLib import scene as libscene
        return libscene.all_or_nothing(self.scene)

    @staticmethod
    def engineRoot() -> pathlib.Path:
        """The folder holding EchoFMEngine, train.py and Resources/configs."""
        return pathlib.Path(EchoFMEngine.__file__).resolve().parent.parent

    def childEnvironment(self) -> dict:
        return engine_environment([str(self.engineRoot())])

    def newWorkFolder(self, kind: str, base=None) -> pathlib.Path:
        if base is None:
            temp = slicer.app.temporaryPath if hasattr(slicer, "app") else tempfile.gettempdir()
            base = pathlib.Path(temp) / "EchoFM"
        folder = pathlib.Path(base) / f"{kind}-{datetime.datetime.now():%Y%m%d-%H%M%S-%f}"
        folder.mkdir(parents=True, exist_ok=False)
        return folder

    # ------------------------------------------------------------------ dependencies, models
    @staticmethod
    def missingPackages() -> list:
        try:
            return dependencies.missing_requirements()
        except (OSError, ValueError) as e:
            logging.warning(f"EchoFM: cannot check the Python packages: {e}")
            return []

    def installMissingPackages(self, ask: bool = True) -> bool:
        """Install what the engine lacks after the user agreed; torch through PyTorchUtils when present."""
        missing = self.missingPackages()
        if not missing:
            return True
        plan = dependencies.install_plan(missing)
        packaging = getattr(slicer, "packaging", None)
        if plan.torch and plan.use_pytorch_utils:
            if ask and not slicer.util.confirmOkCancelDisplay(plan.describe()):
                return False
            import PyTorchUtils
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, torchVersionRequirement=plan.torch_version_requirement)
            if torch is None:
                raise RuntimeError("PyTorch was not installed; install it from the PyTorch module")
            ask = False
        pipReqs = plan.pip + ([] if plan.use_pytorch_utils else plan.torch)
        if not pipReqs:
            return True
        if packaging is not None and hasattr(packaging, "pip_ensure"):      # Slicer >= 5.12: asks itself
            packaging.pip_ensure(pipReqs, requester="EchoFM")
        else:
            if ask and not slicer.util.confirmOkCancelDisplay(plan.describe()):
                return False
            slicer.util.pip_install(pipReqs)
        return not self.missingPackages()

    @staticmethod
    def defaultModelsFolder() -> pathlib.Path:
        env = os.environ.get("ECHOFM_MODELS", "").strip()
        return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".echofm" / "models"

    @staticmethod
    def modelsStatus(folder) -> str:
        """Which tasks the models folder serves, read from its manifest (no weights loaded)."""
        folder = pathlib.Path(folder)
        manifest = folder / "manifest.json"
        if not folder.is_dir():
            return f"{folder} does not exist yet: no fine-tuned weights (import some below)."
        if not manifest.is_file():
            return f"No manifest.json in {folder}: no fine-tuned weights imported yet."
        try:
            tasks = json.loads(manifest.read_text()).get("tasks", {})
        except (OSError, ValueError) as e:
            return f"Unreadable {manifest}: {e}"
        have = [t for t in TASKS if t in tasks]
        lacking = [t for t in TASKS if t not in tasks]
        return ("Weights for: " + (", ".join(have) or "none") +
                (". Missing: " + ", ".join(lacking) if lacking else ""))

    def importWeightsCommand(self, weightsFile, task: str, modelsFolder) -> list:
        """``python -m EchoFMEngine models --folder F import FILE --task T`` (contract E)."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; one of {TASKS}")
        path = pathlib.Path(weightsFile)
        if str(weightsFile) in ("", ".") or not path.exists():
            raise ValueError(f"weights file {weightsFile} does not exist")
        return [*python_command(), "-m", "EchoFMEngine", "models", "--folder", str(modelsFolder),
                "import", str(path), "--task", task]

    # ------------------------------------------------------------------ input
    def loadCine(self, path):
        """Read a file or DICOM folder with the engine's reader into a sequence + browser (+ ECG)."""
        from EchoFMSlicerLib import cine_nodes
        nodes = cine_nodes.load_cine_file(self.scene, path, logics=self.logics)   # all or nothing
        nodes.browser.SetAttribute(SOURCE_ATTRIBUTE, str(pathlib.Path(path).resolve()))
        self._cineNodes[nodes.browser.GetID()] = nodes
        return nodes

    def cineNodes(self, browser):
        """The CineNodes of a browser: the ones this logic made, or rebuilt from the browser."""
        if browser is None:
            raise ValueError("no cine loop selected: pick a sequence browser or load a file")
        nodes = self._cineNodes.get(browser.GetID())
        if nodes is None or nodes.browser is not browser:      # IDs are reused after a scene close
            from EchoFMSlicerLib import cine_nodes
            nodes = cine_nodes.cine_nodes_from_browser(browser, self.logics)
            self._cineNodes[browser.GetID()] = nodes
        return nodes

    def cine(self, browser):
        from EchoFMSlicerLib import cine_nodes
        return cine_nodes.nodes_to_cine(browser)

    def checkAnalysable(self, browser) -> list:
        """ValueError naming why the cine cannot be analysed; else its caveats (e.g. no spacing)."""
        from EchoFMSlicerLib import cine_nodes
        return cine_nodes.check_analysable(self.cine(browser))

    def frameCount(self, browser) -> int:
        seq = browser.GetMasterSequenceNode() if browser is not None else None
        return seq.GetNumberOfDataNodes() if seq is not None else 0

    def describeCine(self, browser) -> str:
        """Frames, frame rate, spacing and ECG of a cine, for the Input section."""
        try:
            meta = self.cineNodes(browser).cine_meta
        except ImportError as e:
            return f"Cannot read the cine yet: the engine's Python packages are missing ({e.name})"
        except Exception as e:         # not a cine (a 3D volume sequence, ...): say why
            return f"Not usable as a cine loop: {e}"
        sp = meta.get("spacing_mm")
        text = (f"{meta.get('frames')} frames of {meta.get('height')}x{meta.get('width')} px, "
                f"{meta.get('fps', 0):.1f} frames/s" + (" (assumed)" if meta.get("fps_assumed") else "") +
                (f", {sp[0]:.3g} x {sp[1]:.3g} mm/px" if sp else ", spacing unknown (volumes in px^3)") +
                (", ECG present" if meta.get("has_ecg") else ", no ECG"))
        return "\n".join([text, *meta.get("notes", [])])

    def showCine(self, nodes) -> None:
        """Show the cine in the slice views, its browser in the toolbar, the ECG chart in a plot view."""
        if not hasattr(slicer, "app"):
            return
        slicer.util.setSliceViewerLayers(background=nodes.proxy, fit=True)
        slicer.modules.sequences.setToolBarActiveBrowserNode(nodes.browser)
        if nodes.ecg_chart is not None:
            self.logics.plots.ShowChartInLayout(nodes.ecg_chart)

    def updateFrameMarker(self, browser) -> None:
        """Move the ECG chart's current-frame marker to the browser's frame."""
        from EchoFMSlicerLib import ecg_nodes
        nodes = self._cineNodes.get(browser.GetID())
        if nodes is not None and nodes.browser is browser and nodes.ecg_chart is not None:
            ecg_nodes.update_frame_marker(nodes.ecg_chart, browser)

    def goToFrame(self, browser, frame: int):
        """Show ``frame`` and return the proxy volume (the Segment Editor's source volume)."""
        from EchoFMSlicerLib import cine_nodes
        nodes = self.cineNodes(browser)
        cine_nodes.go_to_frame(nodes, int(frame), self.logics)
        return nodes.proxy

    # ------------------------------------------------------------------ analysis
    def analysisInput(self, browser, workFolder) -> pathlib.Path:
        """The file the analysis reads: the cine's own file when it came from one (keeps its ECG),
        else the browser's frames written as an npz (frames, fps, spacing, frame times)."""
        source = browser.GetAttribute(SOURCE_ATTRIBUTE)
        if source and pathlib.Path(source).exists():
            return pathlib.Path(source)
        import numpy as np
        cine = self.cine(browser)
        path = pathlib.Path(workFolder) / "cine.npz"
        arrays = {"frames": cine.frames, "fps": np.float64(cine.fps)}
        if cine.spacing_mm is not None:
            arrays["spacing_mm"] = np.asarray(cine.spacing_mm, dtype=np.float64)
        if cine.frame_times_s is not None:
            arrays["frame_times_s"] = np.asarray(cine.frame_times_s, dtype=np.float64)
        np.savez(path, **arrays)
        return path

    def analysisCommand(self, inputPath, outFolder, modelsFolder, device: str, segmentAll: bool) -> list:
        """``python -m EchoFMEngine analyze INPUT --out DIR --models M --device D --segment S`` (contract D)."""
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        return [*python_command(), "-m", "EchoFMEngine", "analyze", str(inputPath), "--out", str(outFolder),
                "--models", str(modelsFolder), "--device", device, "--segment", "all" if segmentAll else "ed_es",
                "--no-summary"]

    @staticmethod
    def studyFolder(outFolder) -> pathlib.Path:
        """The one ``<study_id>`` folder the analysis of a single input wrote."""
        found = sorted(pathlib.Path(outFolder).glob("*/result.json"))
        if not found:
            failed = pathlib.Path(outFolder) / "failed.csv"
            why = failed.read_text().strip() if failed.is_file() else "no result.json was written"
            raise RuntimeError(f"the analysis produced no result in {outFolder}: {why}")
        if len(found) > 1:
            raise RuntimeError(f"expected one study in {outFolder}, found {len(found)}")
        return found[0].parent

    def applyAnalysis(self, browser, outFolder) -> dict:
        """Result files (contract D) -> segmentation sequence, ED/ES masks, table, plot (all or nothing)."""
        from EchoFMSlicerLib import results
        folder = self.studyFolder(outFolder)
        return results.apply_analysis_result(self.scene, self.cineNodes(browser), folder, self.logics)

    def detectPhase(self, browser) -> dict:
        """ED/ES from the ECG, else the images (in-process: no model needed, fast)."""
        from EchoFMEngine.phase import detect_ed_es
        return detect_ed_es(self.cine(browser)).to_dict()

    # ------------------------------------------------------------------ masks
    def segmentEditorNode(self):
        """The module's own Segment Editor node, set so that segments may overlap (LV_epi holds LV_endo)."""
        from EchoFMSlicerLib import segmentation_nodes
        node = self.scene.GetSingletonNode("EchoFM", "vtkMRMLSegmentEditorNode")
        if node is None:
            node = self.scene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            node.UnRegister(None)
            node.SetSingletonTag("EchoFM")
            node = self.scene.AddNode(node)
        segmentation_nodes.configure_segment_editor(node)
        return node

    def edEsSegmentations(self, browser, labels, edFrame: int, esFrame: int):
        """ED and ES segmentation nodes (AI copy + editable corrected copy) from label maps [T,H,W]."""
        from EchoFMSlicerLib import segmentation_nodes
        with self.sceneGuard():
            return segmentation_nodes.ed_es_segmentations(self.scene, self.cineNodes(browser), labels,
                                                          int(edFrame), int(esFrame))

    def createEmptyMasks(self, browser, edFrame: int, esFrame: int):
        """Empty editable ED and ES segmentations (LV_endo, LV_epi, LA) to draw by hand when no
        segmentation model is available; they count as "corrected" (made by a person)."""
        import numpy as np
        from EchoFMSlicerLib import segmentation_nodes
        nodes = self.cineNodes(browser)
        empty = np.zeros(nodes.frame_shape, dtype=np.uint8)
        if int(edFrame) == int(esFrame):
            raise ValueError(f"ED and ES are the same frame ({edFrame}): set them apart first (Detect ED/ES)")
        made = []
        with self.sceneGuard():
            for phase, frame in (("ED", int(edFrame)), ("ES", int(esFrame))):
                if not 0 <= frame < nodes.num_frames:
                    raise ValueError(f"{phase} frame {frame} is outside the cine's {nodes.num_frames} frames")
                made.append(segmentation_nodes.labels_to_segmentation(
                    self.scene, empty, nodes.proxy, f"{nodes.sequence.GetName()} {phase}", source="corrected",
                    phase=phase, frame=frame))
        return tuple(made)

    def labels(self, seg, browser):
        from EchoFMSlicerLib import segmentation_nodes
        return segmentation_nodes.segmentation_to_labels(seg, self.cineNodes(browser).proxy)

    def aiSegmentation(self, seg):
        """The hidden model-output node kept behind an editable ED/ES segmentation."""
        from EchoFMSlicerLib import segmentation_nodes
        return segmentation_nodes.ai_copy(seg)

    def resetToAI(self, seg) -> None:
        """Undo all corrections of an ED/ES segmentation: its segments become the AI copy's again."""
        import numpy as np
        from EchoFMSlicerLib import segmentation_nodes
        ai = self.aiSegmentation(seg)
        if ai is None:
            raise ValueError(f"{seg.GetName()!r} has no AI copy to reset to")
        labels = segmentation_nodes.segmentation_to_labels(ai, seg)
        for name, spec in segmentation_nodes.SEGMENTS.items():
            segmentation_nodes.set_segment_mask(seg, name, np.isin(labels, spec.labels), reference=seg)

    @staticmethod
    def maskFrame(seg, default=None):
        """The cine frame an ED/ES segmentation belongs to (its EchoFM.frame attribute), else ``default``."""
        from EchoFMSlicerLib import segmentation_nodes
        value = seg.GetAttribute(segmentation_nodes.FRAME_ATTR) if seg is not None else None
        return int(value) if value not in (None, "") else default

    def provenance(self, seg) -> dict:
        """Whether a mask is still the model's output or was corrected (changed pixels per segment)."""
        from EchoFMSlicerLib import segmentation_nodes
        return segmentation_nodes.mask_provenance(seg)

    def setAIVisible(self, seg, visible: bool) -> None:
        ai = self.aiSegmentation(seg)
        if ai is not None and ai.GetDisplayNode() is not None:
            ai.GetDisplayNode().SetVisibility(bool(visible))

    def showSegmentations(self, editing, other, showAI: bool) -> None:
        """Show the mask being edited (and its AI original when asked), hide the other frame's."""
        for seg, visible in ((editing, True), (other, False)):
            if seg is not None and seg.GetDisplayNode() is not None:
                seg.GetDisplayNode().SetVisibility(visible)
            if seg is not None:
                self.setAIVisible(seg, visible and showAI)

    # ------------------------------------------------------------------ measure, export
    def measure(self, browser, edSeg, esSeg, analysisFolder: str = ""):
        """EDV, ESV, EF, LA volume from the current (corrected) masks -> a table node, and the LV volume
        curve of the analysis with its ED/ES points replaced by the corrected volumes."""
        from EchoFMSlicerLib import measurements
        if edSeg is None or esSeg is None:
            raise ValueError("ED and ES masks are needed: run Analyze (with a segment model) or load masks")
        nodes = self.cineNodes(browser)
        with self.sceneGuard():
            m = measurements.measure_from_segmentations(edSeg, esSeg, nodes.proxy, nodes.spacing_mm)
            for old in (self._measureNodes.pop(browser.GetID(), None) or []):
                self.removeWithParts(old)
            name = f"{nodes.sequence.GetName()} measurements (current masks)"
            table = measurements.measurements_table(self.scene, m, name)
            made = [table]
            curve = self.volumeCurve(analysisFolder, nodes, m)
            if curve is not None:
                made.append(measurements.volume_curve_plot(self.scene, *curve, name=f"{nodes.sequence.GetName()} "
                                                           "LV volume (current masks)", unit=m["unit"]))
            self._measureNodes[browser.GetID()] = made
        return m, table

    def removeWithParts(self, node) -> None:
        """Remove a table, or a chart with its series and their tables."""
        if node is None or node.GetScene() is not self.scene:
            return
        if node.IsA("vtkMRMLPlotChartNode"):
            for i in reversed(range(node.GetNumberOfPlotSeriesNodes())):
                series = node.GetNthPlotSeriesNode(i)
                if series is not None:
                    self.removeWithParts(series.GetTableNode())
                    self.scene.RemoveNode(series)
        self.scene.RemoveNode(node)

    def volumeCurve(self, analysisFolder: str, nodes, m: dict):
        """(times, volumes) over all frames from the analysis, ED/ES replaced by ``m``; None without one."""
        from EchoFMSlicerLib import ecg_nodes
        if not analysisFolder:
            return None
        try:
            result = json.loads((self.studyFolder(analysisFolder) / "result.json").read_text())
        except (OSError, RuntimeError, ValueError):
            return None
        vols = list((result.get("measurements") or {}).get("lv_volume") or [])
        if len(vols) != nodes.num_frames:
            return None
        for frame, key in ((m.get("ed_frame"), "edv"), (m.get("es_frame"), "esv")):
            if frame is not None and 0 <= frame < len(vols):
                vols[frame] = m.get(key)
        if sum(v is not None for v in vols) < 2:
            return None
        times = [ecg_nodes.frame_marker_time(nodes.browser, i) for i in range(nodes.num_frames)]
        return times, vols

    def export(self, folder, browser, edSeg, esSeg, analysisFolder: str = "") -> list:
        """The ED/ES masks (marked "corrected" or "AI" by whether they differ from the model's output),
        their cine and a report (JSON + CSV) in the fine-tuning dataset layout. Returns the paths."""
        from EchoFMSlicerLib import export, measurements, segmentation_nodes
        if str(folder) in ("", "."):
            raise ValueError("choose an export folder first")
        if edSeg is None or esSeg is None:
            raise ValueError("ED and ES masks are needed for an export")
        nodes = self.cineNodes(browser)
        cine = self.cine(browser)
        prov = {"ED": self.provenance(edSeg), "ES": self.provenance(esSeg)}
        for phase, info in prov.items():
            if info["frame"] is None:
                raise ValueError(f"the {phase} segmentation does not say which frame it belongs to "
                                 f"(attribute {segmentation_nodes.FRAME_ATTR})")
        view = None
        if analysisFolder:
            try:
                view = (json.loads((self.studyFolder(analysisFolder) / "result.json").read_text()).get("view")
                        or {}).get("label")
            except (OSError, RuntimeError, ValueError):
                view = None
        edLabels = segmentation_nodes.segmentation_to_labels(edSeg, nodes.proxy)
        esLabels = segmentation_nodes.segmentation_to_labels(esSeg, nodes.proxy)
        m = measurements.measure_from_segmentations(edSeg, esSeg, nodes.proxy, nodes.spacing_mm)
        csvPath = export.export_training_folder(folder, cine, edLabels, esLabels, prov["ED"]["frame"],
                                                prov["ES"]["frame"], view=view,
                                                source={k: v["source"] for k, v in prov.items()}, measurements=m)
        study = pathlib.Path(folder) / "studies" / export.study_key(cine)
        return [csvPath, study / "report.json", study / "report.csv"]

    # ------------------------------------------------------------------ fine-tuning
    def finetuneCommand(self, exportFolder, runFolder, steps: int, device: str = "auto", modelsFolder=None) -> list:
        """``python train.py --config Resources/configs/finetune_segment.yaml data.kind=csv data.root=...``.

        Starts from the models folder's current segmentation model when it has one (its input size and
        frames then set the data's); every exported study trains, a share is held out for validation."""
        root = self.engineRoot()
        config = root / FINETUNE_CONFIG
        if not config.is_file():
            raise FileNotFoundError(f"fine-tuning config {config} is missing from this installation")
        exportFolder = pathlib.Path(exportFolder)
        if not (exportFolder / "dataset.csv").is_file():
            raise ValueError(f"{exportFolder} holds no exported corrections (dataset.csv): use Export first")
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        overrides = ["data.kind=csv", f"data.root={exportFolder}", "data.csv_file=dataset.csv",
                     "data.val_split=null", "data.test_split=null",
                     f"run.out={runFolder}", f"run.steps={int(steps)}", f"run.device={device}"]
        start = self.currentModel("segment", modelsFolder) if modelsFolder else None
        if start is not None:
            from EchoFMEngine.models.task_checkpoint import read_task_description
            size = read_task_description(start).get("input") or {}
            overrides += [f"init_from={start}", f"model.img_size={int(size['height'])}",
                          f"data.frames={int(size['frames'])}"]
        return [*python_command(), str(root / "train.py"), "--config", str(config), *overrides]

    @staticmethod
    def currentModel(task: str, modelsFolder):
        """The weights file the models folder serves for ``task`` (from its manifest), or None."""
        manifest = pathlib.Path(modelsFolder) / "manifest.json"
        try:
            entry = json.loads(manifest.read_text()).get("tasks", {}).get(task)
        except (OSError, ValueError):
            return None
        path = pathlib.Path(modelsFolder) / entry["file"] if entry else None
        return path if path is not None and path.is_file() else None

    @staticmethod
    def finetunedModel(runFolder) -> pathlib.Path:
        """The model folder a fine-tuning run wrote (``run.out/model``)."""
        model = pathlib.Path(runFolder) / "model"
        if not (model / "model.safetensors").is_file():
            raise RuntimeError(f"the fine-tuning run wrote no model.safetensors in {model}")
        return model

    # ------------------------------------------------------------------ text for the panel
    @staticmethod
    def describeView(result: dict):
        view = result.get("view")
        if not view:
            why = (result.get("needs") or {}).get("view", "no view model")
            return "not identified", why
        probs = sorted(view.get("probabilities", {}).items(), key=lambda kv: -kv[1])
        return view["label"], ", ".join(f"{k} {v:.2f}" for k, v in probs)

    @staticmethod
    def describeScores(result: dict) -> str:
        scores, needs = result.get("scores") or {}, result.get("needs") or {}
        lines = []
        for key, name in (("as", "Aortic stenosis"), ("ar", "Aortic regurgitation")):
            s = scores.get(key)
            if s:
                p = s.get("probabilities", {})
                lines.append(f"{name}: {s.get('label')}" + (f" (p={max(p.values()):.2f})" if p else ""))
            else:
                lines.append(f"{name}: not scored - {needs.get(key, 'no model')}")
        ef = scores.get("ef_regression")
        if ef:
            lines.append(f"EF (regression head): {ef['ef_percent']:.1f} %")
        return "\n".join(lines)

    @staticmethod
    def describePhase(phase: dict) -> str:
        text = f"ED frames {phase.get('ed_frames')}, ES frames {phase.get('es_frames')} (from {phase.get('method')})"
        if phase.get("heart_rate_bpm"):
            text += f", heart rate {phase['heart_rate_bpm']:.0f} bpm"
        return text

    @staticmethod
    def describeMeasurements(m: dict) -> str:
        unit = m.get("unit", "")
        parts = []
        for key, name in (("edv", "EDV"), ("esv", "ESV"), ("la_volume", "LA")):
            if m.get(key) is not None:
                parts.append(f"{name} {m[key]:.1f} {unit}")
        if m.get("ef_percent") is not None:
            parts.append(f"EF {m['ef_percent']:.1f} %")
        return ", ".join(parts) + ("\n" + "; ".join(m["notes"]) if m.get("notes") else "")

    @staticmethod
    def describeAnalysis(result: dict) -> str:
        lines = []
        if result.get("flags"):
            lines.append("Flags: " + "; ".join(result["flags"]))
        needs = {k: v for k, v in (result.get("needs") or {}).items() if k not in ("as", "ar")}
        if needs:
            lines.append("Not computed: " + "; ".join(f"{k} ({v})" for k, v in needs.items()))
        return "\n".join(lines) or "Analysis complete."


#
# Self-test
#

class EchoFMSlicerTest(ScriptedLoadableModuleTest):
    """The workflow on a phantom with known truth: load, ED/ES, masks, measure, correct, export."""

    def setUp(self):
        slicer.mrmlScene.Clear()
        self.tmp = tempfile.mkdtemp(prefix="echofm_selftest_")

    def runTest(self):
        self.setUp()
        self.test_EchoFMSlicer_workflow()

    def test_EchoFMSlicer_workflow(self):
        missing = EchoFMSlicerLogic.missingPackages()
        if missing:
            self.skipTest("EchoFM's Python packages are not installed: " + ", ".join(missing))
        import numpy as np
        from EchoFMEngine.measure import lv_volume_ml
        from EchoFMEngine.synthetic import make_study, write_dicom

        self.delayDisplay("Phantom DICOM with ECG")
        study = make_study("A4C", n_frames=32, size=(96, 112), fps=30.0, heart_rate_bpm=75, ef=55, seed=5)
        path = write_dicom(study, os.path.join(self.tmp, "phantom.dcm"))
        logic = EchoFMSlicerLogic()

        self.delayDisplay("Load")
        nodes = logic.loadCine(path)
        self.assertEqual(logic.frameCount(nodes.browser), study.cine.num_frames)
        self.assertIsNotNone(nodes.ecg_table)

        self.delayDisplay("ED/ES")
        phase = logic.detectPhase(nodes.browser)
        self.assertTrue(phase["ed_frames"] and phase["es_frames"])
        ed = int(phase["ed_frames"][0])
        es = int(next((f for f in phase["es_frames"] if f > ed), phase["es_frames"][0]))
        self.assertIs(logic.goToFrame(nodes.browser, ed), nodes.proxy)

        self.delayDisplay("Masks from the phantom's truth")
        edSeg, esSeg = logic.edEsSegmentations(nodes.browser, study.masks, ed, es)
        self.assertTrue(np.array_equal(logic.labels(edSeg, nodes.browser), study.masks[ed]))

        self.delayDisplay("Measure")
        spacing = study.cine.spacing_mm
        m, table = logic.measure(nodes.browser, edSeg, esSeg)
        truth = study.masks[ed]
        self.assertAlmostEqual(m["edv"], lv_volume_ml(truth == 1, spacing, myo_mask=truth == 2, la_mask=truth == 3),
                               places=6)
        self.assertGreater(table.GetNumberOfRows(), 0)

        self.delayDisplay("Correct the ED mask as an editor effect would: LV cavity shrunk by its apical rows")
        from EchoFMSlicerLib import segmentation_nodes
        edited = study.masks[ed].copy()
        rows = np.flatnonzero((edited == 1).any(1))
        for r in rows[: max(2, len(rows) // 5)]:
            edited[r][edited[r] == 1] = 2
        segmentation_nodes.set_segment_mask(edSeg, "LV_endo", edited == 1, reference=nodes.proxy)
        self.assertEqual(logic.provenance(edSeg)["source"], "corrected")
        m2, _ = logic.measure(nodes.browser, edSeg, esSeg)
        self.assertAlmostEqual(m2["edv"], lv_volume_ml(edited == 1, spacing, myo_mask=edited == 2,
                                                       la_mask=edited == 3), places=6)
        self.assertLess(m2["edv"], m["edv"])

        self.delayDisplay("Reset to the AI masks")
        logic.resetToAI(edSeg)
        self.assertEqual(logic.provenance(edSeg)["source"], "AI")

        self.delayDisplay("Export: the folder is a fine-tuning dataset")
        from EchoFMEngine.data import build_dataset
        folder = os.path.join(self.tmp, "export")
        written = logic.export(folder, nodes.browser, edSeg, esSeg)
        for w in written:
            self.assertTrue(os.path.exists(w), w)
        report = json.loads(pathlib.Path(written[1]).read_text())
        self.assertEqual((report["masks"]["ED"]["frame"], report["masks"]["ED"]["source"]), (ed, "AI"))
        self.assertEqual(len(build_dataset("csv", folder, split="train", csv_file="dataset.csv")), 1)
        cmd = logic.finetuneCommand(folder, os.path.join(self.tmp, "run"), 2)
        self.assertIn(f"data.root={pathlib.Path(folder)}", cmd)
        self.delayDisplay("Test passed")
