"""EchoFM: the 3D Slicer module for echocardiography cine loops (view, ED/ES, masks, volumes, scores).

A thin shell: module, parameter node, widget and self-test. Everything the panel does is
``EchoFMSlicerLib.logic.EchoFMLogic`` (Qt-free, tested headless against slicer-core); the widget
turns clicks into its calls, asks the user where needed, and polls long work -- a child process
(``python -m EchoFMEngine analyze``, ``train.py``) -- from a ``qt.QTimer``, so the application
never freezes and Cancel kills the whole process tree.
"""
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
    import EchoFMEngine  # noqa: F401  (only checks that the engine is importable)
except ImportError:
    if os.path.isfile(os.path.join(_REPO_DIR, "EchoFMEngine", "__init__.py")):
        sys.path.insert(0, _REPO_DIR)
    import EchoFMEngine  # noqa: F401

from EchoFMSlicerLib.logic import DEVICES, TASKS, EchoFMLogic


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
See <a href="https://github.com/echofm-slicer/SlicerEchoFM/blob/main/docs/slicer.md">docs/slicer.md</a>.
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
        self._job = None                  # (runner.BackgroundProcess, on_success, title)
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

        editorNode = self.logic.segment_editor_node()
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
        self.ui.propagateButton.connect("clicked(bool)", self.onPropagate)
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
        self.ui.segmentEditorWidget.removeViewObservations()
        self.removeObservers()

    # The embedded Segment Editor is wired as Slicer's own Segment Editor module wires it
    # (Modules/Scripted/SegmentEditor/SegmentEditor.py: enter/exit/onSceneStartClose/onSceneEndClose):
    # keyboard shortcuts (undo/redo, effect keys, Esc) and view observations only while the module
    # is shown, and no segmentation left on the editor when the scene closes.
    def enter(self) -> None:
        self.initializeParameterNode()
        editor = self.ui.segmentEditorWidget
        editor.installKeyboardShortcuts()
        editor.setupViewObservations()
        editor.updateWidgetFromMRML()

    def exit(self) -> None:
        editor = self.ui.segmentEditorWidget
        editor.setActiveEffect(None)
        editor.uninstallKeyboardShortcuts()
        editor.removeViewObservations()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:
            self._job[0].cancel()
        self.setParameterNode(None)
        self.ui.segmentEditorWidget.setSegmentationNode(None)
        self.ui.segmentEditorWidget.removeViewObservations()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()
            self.ui.segmentEditorWidget.setupViewObservations()
            self.ui.segmentEditorWidget.updateWidgetFromMRML()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if not p.inputBrowser:
            browser = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSequenceBrowserNode")
            if browser:
                p.inputBrowser = browser
        if str(p.modelsFolder) in ("", "."):
            p.modelsFolder = self.logic.default_models_folder()
        if str(p.exportFolder) in ("", "."):
            p.exportFolder = pathlib.Path.home() / "EchoFM" / "corrections"

    def setParameterNode(self, inputParameterNode: Optional[EchoFMSlicerParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self._updateFrameRange()          # connectGui resets the spin boxes to WithinRange's bounds
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
        self.ui.propagateButton.enabled = (hasCine and not busy and not getattr(self, "_propagating", False)
                                           and (p.edSegmentation is not None or p.esSegmentation is not None))
        self.ui.exportButton.enabled = hasMasks and hasCine
        self.ui.finetuneButton.enabled = not busy
        self.ui.importWeightsButton.enabled = not busy and str(p.importWeightsFile) not in ("", ".")
        self.ui.cancelButton.enabled = busy or getattr(self, "_propagating", False)
        self._updateFrameRange()
        if p.inputBrowser is not self._observedBrowser:
            self._observeBrowser(p.inputBrowser)
            self.ui.inputInfoLabel.text = (self.logic.describe_cine(p.inputBrowser) if hasCine
                                           else "No cine loop selected.")

    def _updateFrameRange(self) -> None:
        """ED/ES spin boxes span the selected cine's frames (0 when there is none)."""
        p = self._parameterNode
        n = self.logic.frame_count(p.inputBrowser) if p is not None and p.inputBrowser is not None else 0
        for box in (self.ui.edFrameSpinBox, self.ui.esFrameSpinBox):
            box.minimum = 0
            box.maximum = max(n - 1, 0)

    def _observeBrowser(self, browser) -> None:
        """Keep the ECG frame marker on the current frame."""
        if self._observedBrowser is not None:
            self.removeObserver(self._observedBrowser, vtk.vtkCommand.ModifiedEvent, self.onBrowserModified)
        self._observedBrowser = browser
        if browser is not None:
            self.addObserver(browser, vtk.vtkCommand.ModifiedEvent, self.onBrowserModified)

    def onBrowserModified(self, caller, event) -> None:
        try:
            self.logic.update_frame_marker(caller)
        except Exception as e:          # a marker is cosmetic: never interrupt playback for it
            logging.debug(f"EchoFM: frame marker not updated: {e}")

    def updateDependenciesStatus(self) -> None:
        try:
            missing = self.logic.missing_packages()
        except (OSError, ValueError) as e:          # no pyproject.toml / installed metadata: say so
            self.ui.dependenciesLabel.text = f"Cannot check the Python packages: {e}"
            self.ui.installDependenciesButton.enabled = False
        else:
            self.ui.dependenciesLabel.text = ("Python packages: all present." if not missing else
                                              "Missing Python packages: " + ", ".join(missing))
            self.ui.installDependenciesButton.enabled = bool(missing)
        self.onModelsFolderChanged()

    def onModelsFolderChanged(self, _path=None) -> None:
        if self._parameterNode is not None:
            self.ui.modelsStatusLabel.text = self.logic.models_status(self._parameterNode.modelsFolder)

    def _requirePackages(self) -> bool:
        """True when the engine's packages are present; otherwise offers to install them."""
        with slicer.util.tryWithErrorDisplay("Cannot check EchoFM's Python packages."):
            if not self.logic.missing_packages():
                return True
        self.onInstallDependencies()
        return not self.logic.missing_packages()

    def _installPackages(self, plan) -> bool:
        """Ask once (the whole plan), then install: torch through the PyTorch extension's PyTorchUtils
        when present (it picks the CPU or CUDA build, as in SlicerTotalSegmentator), the rest with
        Slicer's ``pip_ensure`` (slicer.pydeps / slicer.packaging, imported explicitly; without its
        own prompt) or ``slicer.util.pip_install``. Declining installs nothing and is no error."""
        if plan.empty or not slicer.util.confirmOkCancelDisplay(plan.describe()):
            return False
        if plan.torch and plan.use_pytorch_utils:
            import PyTorchUtils
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                torch = torchLogic.installTorch(askConfirmation=False,
                                                torchVersionRequirement=plan.torch_version_requirement)
                if torch is None:
                    raise RuntimeError("PyTorch was not installed; install it from the PyTorch module")
        pipReqs = plan.pip + ([] if plan.use_pytorch_utils else plan.torch)
        self.logic.install_packages(pipReqs, pip_install=slicer.util.pip_install)
        return True

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
            cineNodes = self.logic.load_cine(path)
            self._parameterNode.inputBrowser = cineNodes.browser
            self._parameterNode.analysisFolder = ""
            self.ui.inputInfoLabel.text = self.logic.describe_cine(cineNodes.browser)
            self.logic.show_cine(cineNodes)
            # play/scrub toolbar shown on this cine, as DICOMImageSequencePlugin does after loading
            slicer.modules.sequences.showSequenceBrowser(cineNodes.browser)
            slicer.modules.sequences.setToolBarActiveBrowserNode(cineNodes.browser)

    # ------------------------------------------------------------------ analysis
    def onAnalyze(self) -> None:
        if not self._requirePackages():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to start the analysis.", waitCursor=True):
            notes = self.logic.check_analysable(p.inputBrowser)
            self.ui.analysisLabel.text = "\n".join(notes)
            outDir = self.logic.new_work_folder("analysis")
            inputPath = self.logic.analysis_input(p.inputBrowser, outDir)
            cmd = self.logic.analysis_command(inputPath, outDir / "out", p.modelsFolder, p.device, p.segmentAllFrames)
            self.ui.modelsFolderPathLineEdit.addCurrentPathToHistory()
            browser = p.inputBrowser
            self._startJob(cmd, "Analysis", lambda: self._onAnalysisDone(browser, outDir / "out"))

    def _onAnalysisDone(self, browser, outDir) -> None:
        p = self._parameterNode
        summary = self.logic.apply_analysis(browser, outDir)
        p.analysisFolder = str(outDir)
        result = summary["result"]
        self.ui.viewLabel.text, self.ui.viewProbabilitiesLabel.text = self.logic.describe_view(result)
        self.ui.scoreLabel.text = self.logic.describe_scores(result)
        self._showPhase(result.get("phase"))
        if summary.get("ed_segmentation") is not None:
            p.edSegmentation = summary["ed_segmentation"]
            p.esSegmentation = summary["es_segmentation"]
            p.edFrame = self.logic.mask_frame(p.edSegmentation, default=p.edFrame)
            p.esFrame = self.logic.mask_frame(p.esSegmentation, default=p.esFrame)
        if result.get("measurements"):
            self._showMeasurements(summary.get("measurements_table"), result["measurements"])
        self.ui.analysisLabel.text = self.logic.describe_analysis(result)

    def onDetectPhase(self) -> None:
        if not self._requirePackages():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to detect ED/ES.", waitCursor=True):
            phase = self.logic.detect_phase(p.inputBrowser)
            self._showPhase(phase)

    def _showPhase(self, phase) -> None:
        if not phase:
            self.ui.phaseLabel.text = "ED/ES not found."
            return
        p = self._parameterNode
        self.ui.phaseLabel.text = self.logic.describe_phase(phase)
        ed, es = self.logic.first_ed_es(phase)
        if ed is not None:
            p.edFrame = ed
        if es is not None:
            p.esFrame = es

    def onGoToFrame(self, frame: int) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to change the frame."):
            proxy = self.logic.go_to_frame(self._parameterNode.inputBrowser, frame)
            self.logic.show_volume(proxy)            # back to the live cine after a correction

    # ------------------------------------------------------------------ correction
    def onCorrect(self, which: str) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(f"Failed to start editing the {which} masks."):
            frame = p.edFrame if which == "ED" else p.esFrame
            seg = p.edSegmentation if which == "ED" else p.esSegmentation
            if seg is None:
                raise ValueError(f"no {which} masks yet: run Analyze with a segment model, or create empty masks")
            frame = self.logic.mask_frame(seg, default=frame)     # the frame these masks were made for
            # a fixed copy of that frame, not the browser's proxy: scrubbing or playing while correcting
            # must not put another frame under the mask (threshold, grow-from-seeds read the source volume)
            reference = self.logic.correction_volume(p.inputBrowser, frame)
            self._editing = which
            editor = self.ui.segmentEditorWidget
            editor.setSegmentationNode(seg)
            if hasattr(editor, "setSourceVolumeNode"):
                editor.setSourceVolumeNode(reference)
            else:                                   # Slicer < 5.2
                editor.setMasterVolumeNode(reference)
            self.logic.show_segmentations(seg, p.edSegmentation if which == "ES" else p.esSegmentation,
                                         p.showAIMasks)

    def onCreateMasks(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to create the masks."):
            p.edSegmentation, p.esSegmentation = self.logic.create_empty_masks(p.inputBrowser, p.edFrame, p.esFrame)
        self.onCorrect("ED")

    def onResetCorrection(self) -> None:
        p = self._parameterNode
        which = self._editing
        seg = p.edSegmentation if which == "ED" else p.esSegmentation
        if not slicer.util.confirmOkCancelDisplay(f"Replace the corrected {which} masks with the model's output?"):
            return
        with slicer.util.tryWithErrorDisplay(f"Failed to reset the {which} masks."):
            self.logic.reset_to_ai(seg)

    def onShowAI(self, show: bool) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to change the display of the AI masks."):
            for seg in (p.edSegmentation, p.esSegmentation):
                if seg is not None:
                    self.logic.set_ai_visible(seg, show)

    # ------------------------------------------------------------------ measure, export
    def onMeasure(self) -> None:
        if not self._requirePackages():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to measure.", waitCursor=True):
            m, table = self.logic.measure(p.inputBrowser, p.edSegmentation, p.esSegmentation, p.analysisFolder)
            self._showMeasurements(table, m)

    def onPropagate(self) -> None:
        """Track the ED/ES masks through every frame (in this process: progress here, Cancel stops it)."""
        if not self._requirePackages():
            return
        from EchoFMEngine.clinical.propagate import PropagationCancelled
        p = self._parameterNode
        segs = [s for s in (p.edSegmentation, p.esSegmentation) if s is not None]
        self._propagating, self._propagateCancel = True, False
        self.updateGUIFromParameterNode()

        def progress(fraction, message):
            self.ui.progressBar.value = int(round(100 * fraction))
            self.ui.statusLabel.text = f"Propagate: {message}"
            slicer.app.processEvents()                  # keeps the panel live, Cancel clickable

        try:
            with slicer.util.tryWithErrorDisplay("Failed to propagate the masks."):
                try:
                    result = self.logic.propagate(p.inputBrowser, segs, progress=progress,
                                                  cancel=lambda: self._propagateCancel)
                except PropagationCancelled:
                    self.ui.statusLabel.text = "Propagate: cancelled (scene unchanged)"
                    return
                self.ui.statusLabel.text = "Propagate: done"
                self._showMeasurements(result.table, result.measurements)
        finally:
            self._propagating = False
            self.updateGUIFromParameterNode()

    def _showMeasurements(self, table, m: dict) -> None:
        self._lastMeasurements = m
        if table is not None:
            self.ui.measurementsTableView.setMRMLTableNode(table)
        self.ui.measureLabel.text = self.logic.describe_measurements(m)

    def onExport(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to export.", waitCursor=True):
            written = self.logic.export(p.exportFolder, p.inputBrowser, p.edSegmentation, p.esSegmentation,
                                        p.analysisFolder)
            self.ui.exportLabel.text = "Written: " + ", ".join(str(w) for w in written)
            self.ui.exportFolderPathLineEdit.addCurrentPathToHistory()

    # ------------------------------------------------------------------ fine-tune, settings
    def onFinetune(self) -> None:
        if not self._requirePackages():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to start fine-tuning.", waitCursor=True):
            runDir = self.logic.new_work_folder("finetune", base=p.exportFolder / "runs")
            cmd = self.logic.finetune_command(p.exportFolder, runDir, p.finetuneSteps, p.device, p.modelsFolder)
            importAfter, models = p.finetuneImportResult, p.modelsFolder
            self._startJob(cmd, "Fine-tuning", lambda: self._onFinetuneDone(runDir, importAfter, models),
                           cwd=self.logic.engine_root())

    def _onFinetuneDone(self, runDir, importAfter: bool, modelsFolder) -> None:
        model = self.logic.finetuned_model(runDir)
        self.ui.finetuneLabel.text = f"Fine-tuned model: {model}"
        if importAfter:
            cmd = self.logic.import_weights_command(model, "segment", modelsFolder)
            self._startJob(cmd, "Importing the fine-tuned model", self.onModelsFolderChanged)

    def onImportWeights(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to import the weights."):
            cmd = self.logic.import_weights_command(p.importWeightsFile, p.importTask, p.modelsFolder)
            self._startJob(cmd, "Importing weights", self.onModelsFolderChanged)
            self.ui.importWeightsPathLineEdit.addCurrentPathToHistory()
            self.ui.modelsFolderPathLineEdit.addCurrentPathToHistory()

    def onInstallDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to install the Python packages.", waitCursor=True):
            plan = self.logic.install_plan()
            if plan is not None:
                self._installPackages(plan)
        self.updateDependenciesStatus()

    # ------------------------------------------------------------------ background jobs
    def _startJob(self, cmd, title: str, onSuccess, cwd=None) -> None:
        """Start ``cmd`` in a child process; its progress drives the bar until it ends."""
        if self._job is not None:
            raise RuntimeError(f"{self._job[2]} is still running; wait for it or cancel it first")
        process = self.logic.start_process(cmd, title, cwd=cwd)
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
        self._propagateCancel = True                    # a running Propagate stops at its next frame
        if self._job is not None:
            with slicer.util.tryWithErrorDisplay("Failed to cancel."):
                self.ui.statusLabel.text = f"{self._job[2]}: cancelling..."
                self._job[0].cancel(grace_s=1.0)


#
# Logic
#

class EchoFMSlicerLogic(EchoFMLogic, ScriptedLoadableModuleLogic):
    """Slicer's module logic: ``EchoFMLogic`` (all the work, Qt-free, EchoFMSlicerLib/logic.py) on the
    application's scene and module logics, plus the module's parameter node."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        app = getattr(slicer, "app", None)           # absent only where this file is imported without Slicer
        EchoFMLogic.__init__(self, slicer.mrmlScene,
                             app_logic=app.applicationLogic() if app is not None else None,
                             work_folder=pathlib.Path(app.temporaryPath) / "EchoFM" if app is not None else None)

    def getParameterNode(self):
        return EchoFMSlicerParameterNode(ScriptedLoadableModuleLogic.getParameterNode(self))


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
        missing = EchoFMSlicerLogic.missing_packages()
        if missing:
            self.skipTest("EchoFM's Python packages are not installed: " + ", ".join(missing))
        import numpy as np
        from EchoFMEngine.clinical.measure import lv_volume_ml
        from EchoFMEngine.clinical.phantoms import make_study, write_dicom

        self.delayDisplay("Phantom DICOM with ECG")
        study = make_study("A4C", n_frames=32, size=(96, 112), fps=30.0, heart_rate_bpm=75, ef=55, seed=5)
        path = write_dicom(study, os.path.join(self.tmp, "phantom.dcm"))
        logic = EchoFMSlicerLogic()

        self.delayDisplay("Load")
        nodes = logic.load_cine(path)
        self.assertEqual(logic.frame_count(nodes.browser), study.cine.num_frames)
        self.assertIsNotNone(nodes.ecg_table)
        logic.show_cine(nodes)

        self.delayDisplay("ED/ES")
        phase = logic.detect_phase(nodes.browser)
        self.assertEqual(phase["method"], "ecg")
        ed, es = logic.first_ed_es(phase)
        self.assertIs(logic.go_to_frame(nodes.browser, ed), nodes.proxy)

        self.delayDisplay("Masks from the phantom's truth")
        edSeg, esSeg = logic.ed_es_segmentations(nodes.browser, study.masks, ed, es)
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
        logic.reset_to_ai(edSeg)
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
        cmd = logic.finetune_command(folder, os.path.join(self.tmp, "run"), 2)
        self.assertIn(f"data.root={pathlib.Path(folder)}", cmd)
        self.delayDisplay("Test passed")
