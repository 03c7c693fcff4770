"""Everything the EchoFM panel does, without widgets: ``EchoFMLogic`` over one MRML scene.

It composes this library (cine, ECG, segmentation and table nodes, export) and the engine, and
builds the commands the panel runs in a child process. It never touches qt, ctk, ``slicer.app``
or ``slicer.mrmlScene``: Slicer's module passes the application's scene and application logic,
headless code (tests, scripts with PyPI slicer-core) passes ``new_scene()``'s. What needs a
dialog (asking before installing packages) stays in the widget.

Only the standard library, ``slicer`` and the std-lib-only parts of this package load with this
file; numpy, the engine and the MRML helpers load on first use, so Slicer can show the panel
before the engine's Python packages are installed.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional

from . import dependencies
from .runner import BackgroundProcess, engine_environment, python_command
from .scene import Logics, all_or_nothing, register_modules

DEVICES = ["auto", "cuda", "cpu"]
FINETUNE_CONFIG = os.path.join("EchoFMEngine", "configs", "finetune_segment.yaml")   # package data
# A 2D echo cine wants one large slice view (not three orthogonal views of one slice) and the ECG below it.
ECHO_LAYOUT_ID = 5801
ECHO_LAYOUT_XML = """<layout type="vertical" split="true">
 <item splitSize="700"><view class="vtkMRMLSliceNode" singletontag="Red">
  <property name="orientation" action="default">Axial</property>
  <property name="viewlabel" action="default">R</property>
  <property name="viewcolor" action="default">#F34A33</property></view></item>
 <item splitSize="300"><view class="vtkMRMLPlotViewNode" singletontag="PlotView1">
  <property name="viewlabel" action="default">P</property></view></item>
</layout>"""
SOURCE_ATTRIBUTE = "EchoFM.SourceFile"      # browser attribute: the file a cine was loaded from


def _tasks() -> list:
    """The engine's task names (EchoFMEngine.tasks), segmentation, the panel's main job, first. Read on
    first use: this file loads before the engine may be importable (see the module docstring)."""
    from EchoFMEngine.tasks import TASK_NAMES, get_task  # deferred: the module docstring says why

    return sorted(TASK_NAMES, key=lambda t: get_task(t).kind != "segmentation")


def __getattr__(name):
    if name == "TASKS":               # `from EchoFMSlicerLib.logic import TASKS` (the module's choices)
        return _tasks()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _unset(path) -> bool:
    """True for an empty path field (a parameter node's ``Path()`` reads as ".")."""
    return path is None or str(path) in ("", ".")


class EchoFMLogic:
    """The panel's work on ``scene``: load, analyse, correct, measure, export, fine-tune.

    ``logics``: the scene's module logics (``scene.register_modules``); made on first use from
    ``app_logic`` (Slicer's ``applicationLogic()``, whose module logics are reused) or, headless,
    from scratch. ``work_folder``: where analysis runs write (default: the system temp folder)."""

    def __init__(self, scene, logics: Optional[Logics] = None, app_logic=None, work_folder=None) -> None:
        if scene is None:
            raise ValueError("EchoFMLogic needs a MRML scene")
        self.scene = scene
        self._logics = logics
        self._app_logic = app_logic
        self.work_folder = Path(work_folder) if work_folder else Path(tempfile.gettempdir()) / "EchoFM"
        self._cine_nodes = {}             # browser ID -> CineNodes made by this logic
        self._measure_nodes = {}          # browser ID -> table/plot of the last measure (replaced next time)

    # ------------------------------------------------------------------ plumbing
    @property
    def logics(self) -> Logics:
        """Module logics the library needs (sequences, segmentations, ...), registered once."""
        if self._logics is None:
            self._logics = register_modules(self.scene, self._app_logic)
        return self._logics

    def scene_guard(self):
        """Every node added inside the block is removed when it raises: an error leaves the scene as it was."""
        return all_or_nothing(self.scene)

    @staticmethod
    def engine_root() -> Path:
        """The folder holding EchoFMEngine and Resources/configs (a source checkout, or the extension's
        module path)."""
        import EchoFMEngine  # deferred: the module docstring says why
        return Path(EchoFMEngine.__file__).resolve().parent.parent

    @classmethod
    def train_script(cls) -> Path:
        """train.py: at the root of a source checkout, in ``EchoFMScripts/`` of a built extension (a
        ``*.py`` at the top of a module path would be loaded by Slicer as a module)."""
        root = cls.engine_root()
        for candidate in (root / "train.py", root / "EchoFMScripts" / "train.py"):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"train.py is missing from this installation (looked in {root} and "
                                f"{root / 'EchoFMScripts'})")

    def child_environment(self) -> dict:
        return engine_environment([str(self.engine_root())])

    def start_process(self, cmd, name: str, cwd=None) -> BackgroundProcess:
        """Start ``cmd`` in a child process that finds the engine; the caller polls it."""
        logging.info(f"EchoFM: {name} started")      # not the command: its paths may name a patient
        return BackgroundProcess(cmd, cwd=cwd, env=self.child_environment(), name=name).start()

    def new_work_folder(self, kind: str, base=None) -> Path:
        """A new, empty ``<base>/<kind>-<timestamp>`` folder (base: the work folder)."""
        stamp = f"{datetime.datetime.now():%Y%m%d-%H%M%S-%f}"
        folder = Path(base if base is not None else self.work_folder) / f"{kind}-{stamp}"
        folder.mkdir(parents=True, exist_ok=False)
        return folder

    # ------------------------------------------------------------------ dependencies, models
    @staticmethod
    def missing_packages() -> list:
        """Requirements of the engine this Python lacks.

        Raises FileNotFoundError when neither pyproject.toml nor the installed package says what the
        engine needs, and ValueError for an unreadable pyproject.toml: "cannot tell" is never "all present"."""
        return dependencies.missing_requirements()

    @staticmethod
    def install_packages(requirements, pip_install=None) -> str:
        """Install requirements the user agreed to (dependencies.run_pip: Slicer's pip_ensure, else
        ``pip_install``, which the widget passes in: Slicer's own pip_install)."""
        return dependencies.run_pip(list(requirements), pip_install=pip_install)

    def install_plan(self) -> Optional[dependencies.InstallPlan]:
        """What to install (torch through PyTorchUtils when present), None when nothing is missing.
        The widget shows ``plan.describe()``, asks, and installs only when the user agrees."""
        missing = self.missing_packages()
        return dependencies.install_plan(missing) if missing else None

    @staticmethod
    def default_models_folder() -> Path:
        """``$ECHOFM_MODELS`` or ``~/.echofm/models``: the engine's rule (EchoFMEngine.models.registry)."""
        # deferred: the module docstring says why
        from EchoFMEngine.models.registry import default_folder   # std-lib only; engine loads on first use

        return default_folder()

    @staticmethod
    def models_status(folder) -> str:
        """Which tasks the models folder serves, read from its manifest (no weights loaded)."""
        # deferred: the module docstring says why
        from EchoFMEngine.models.registry import CheckpointError, ModelStore   # std-lib only, as above

        store = ModelStore(folder)
        if not store.folder.is_dir():
            return f"{store.folder} does not exist yet: no fine-tuned weights (import some below)."
        if not store.manifest_path.is_file():
            return f"No manifest.json in {store.folder}: no fine-tuned weights imported yet."
        try:
            tasks = store.entries()
        except CheckpointError as e:
            return f"Unreadable models folder: {e}"
        have = [t for t in _tasks() if t in tasks]
        lacking = [t for t in _tasks() if t not in tasks]
        return ("Weights for: " + (", ".join(have) or "none") +
                (". Missing: " + ", ".join(lacking) if lacking else ""))

    @staticmethod
    def import_weights_command(weights_file, task: str, models_folder) -> list:
        """``python -m EchoFMEngine models --folder F import FILE --task T`` (contract E)."""
        if task not in _tasks():
            raise ValueError(f"unknown task {task!r}; one of {_tasks()}")
        if _unset(weights_file) or not Path(weights_file).exists():
            raise ValueError(f"weights file {weights_file} does not exist")
        return [*python_command(), "-m", "EchoFMEngine", "models", "--folder", str(models_folder),
                "import", str(Path(weights_file)), "--task", task]

    # ------------------------------------------------------------------ released weights
    @staticmethod
    def released_weights_notice(name: str = "echofm-vitl") -> str:
        """Text for the confirmation dialog before downloading released weights (source + licence)."""
        from EchoFMEngine.models.hub import licence_notice  # deferred: the module docstring says why

        return licence_notice(name)

    @staticmethod
    def download_weights_command(models_folder, accepted: bool, name: str = "echofm-vitl",
                                 revision: Optional[str] = None) -> list:
        """``python -m EchoFMEngine models --folder F download NAME --accept-license [--revision R]``.

        Only after the user accepted the licence in the dialog (``accepted``); otherwise ValueError,
        and nothing is downloaded. The process prints ``PROGRESS k/n`` lines (KiB)."""
        if not accepted:
            raise ValueError(f"the licence of {name} was not accepted: nothing is downloaded")
        cmd = [*python_command(), "-m", "EchoFMEngine", "models", "--folder", str(models_folder),
               "download", name, "--accept-license"]
        return cmd + (["--revision", str(revision)] if revision else [])

    def start_download(self, models_folder, accepted: bool, name: str = "echofm-vitl",
                       revision: Optional[str] = None) -> BackgroundProcess:
        """Download, check and import the released weights in a background process (poll it for
        progress; cancel kills it and imports nothing)."""
        return self.start_process(self.download_weights_command(models_folder, accepted, name, revision),
                                  name=f"download {name}")

    @staticmethod
    def encoder_status(models_folder) -> str:
        """Pretrained encoders in the models folder with source, revision and licence."""
        # deferred: the module docstring says why
        from EchoFMEngine.models.registry import CheckpointError, ModelStore   # std-lib only, as above

        try:
            enc = ModelStore(models_folder).encoders()
        except CheckpointError:
            enc = {}
        if not enc:
            return "No released encoder weights downloaded."
        return "; ".join(f"{n}: {e.get('source')} @ {str(e.get('revision'))[:12]} ({e.get('licence')})"
                         for n, e in enc.items())

    @staticmethod
    def current_model(task: str, models_folder) -> Optional[Path]:
        """The weights file the models folder serves for ``task`` (from its manifest), or None. Not hashed
        here (the panel asks often); the analysis checks the SHA-256 before it loads the file."""
        # deferred: the module docstring says why
        from EchoFMEngine.models.registry import CheckpointError, ModelStore   # std-lib only, as above

        try:
            return ModelStore(models_folder).get(task, verify=False)
        except CheckpointError:          # unreadable manifest, listed file missing or outside the folder
            return None

    # ------------------------------------------------------------------ input
    def load_cine(self, path):
        """Read a file or DICOM folder with the engine's reader into a sequence + browser (+ ECG)."""
        from . import cine_nodes  # deferred: the module docstring says why
        nodes = cine_nodes.load_cine_file(self.scene, path, logics=self.logics)   # all or nothing
        nodes.browser.SetAttribute(SOURCE_ATTRIBUTE, str(Path(path).resolve()))
        self._cine_nodes[nodes.browser.GetID()] = nodes
        return nodes

    def cine_nodes(self, browser):
        """The CineNodes of a browser: the ones this logic made, or rebuilt from the browser."""
        if browser is None:
            raise ValueError("no cine loop selected: pick a sequence browser or load a file")
        nodes = self._cine_nodes.get(browser.GetID())
        if nodes is None or nodes.browser is not browser:      # IDs are reused after a scene close
            from . import cine_nodes  # deferred: the module docstring says why
            nodes = cine_nodes.cine_nodes_from_browser(browser, self.logics)
            self._cine_nodes[browser.GetID()] = nodes
        return nodes

    @staticmethod
    def cine(browser):
        """The engine's Cine (frames, times, spacing, ECG) of what a browser shows."""
        from . import cine_nodes  # deferred: the module docstring says why
        return cine_nodes.nodes_to_cine(browser)

    def check_analysable(self, browser) -> list:
        """ValueError naming why the cine cannot be analysed; else its caveats (e.g. no spacing)."""
        from . import cine_nodes  # deferred: the module docstring says why
        return cine_nodes.check_analysable(self.cine(browser))

    @staticmethod
    def frame_count(browser) -> int:
        seq = browser.GetMasterSequenceNode() if browser is not None else None
        return seq.GetNumberOfDataNodes() if seq is not None else 0

    def describe_cine(self, browser) -> str:
        """Frames, frame rate, spacing and ECG of a cine, for the Input section."""
        try:
            meta = self.cine_nodes(browser).cine_meta
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

    def show_cine(self, nodes) -> None:
        """The cine as background of the slice views (fitted) in a 2D-echo layout: one large slice view
        and, with an ECG, its chart below (not ShowChartInLayout, which turns Conventional into
        ConventionalPlot: two slice views across a 2D image and an empty 3D view)."""
        self.show_volume(nodes.proxy)
        self.show_echo_layout(nodes.ecg_chart)

    def show_volume(self, volume) -> None:
        """``volume`` as the background of every slice view."""
        selection = self.logics.app.GetSelectionNode()
        if selection is not None:
            selection.SetActiveVolumeID(volume.GetID())
            self.logics.app.PropagateBackgroundVolumeSelection(1)

    def show_echo_layout(self, chart=None) -> Optional[int]:
        """Switch the layout node (if the scene has one, as Slicer's has) to the red slice view alone, or
        above a plot view showing ``chart``; returns the view arrangement set (None without a layout node)."""
        layout = self.scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
        if layout is None:
            return None
        if chart is None:
            arrangement = layout.SlicerLayoutOneUpRedSliceView
        else:
            if not layout.IsLayoutDescription(ECHO_LAYOUT_ID):
                layout.AddLayoutDescription(ECHO_LAYOUT_ID, ECHO_LAYOUT_XML)
            arrangement = ECHO_LAYOUT_ID
        layout.SetViewArrangement(arrangement)
        selection = self.logics.app.GetSelectionNode()
        if chart is not None and selection is not None:
            selection.SetReferenceActivePlotChartID(chart.GetID())
            self.logics.app.PropagatePlotChartSelection()
        return arrangement

    def correction_volume(self, browser, frame: int):
        """A fixed copy of ``frame`` to correct its mask on (see cine_nodes.fixed_frame_volume), shown as
        the slice views' background; playback is stopped so the ECG marker stays on that frame."""
        from . import cine_nodes  # deferred: the module docstring says why
        nodes = self.cine_nodes(browser)
        volume = cine_nodes.fixed_frame_volume(nodes, int(frame))
        browser.SetPlaybackActive(False)
        cine_nodes.go_to_frame(nodes, int(frame), self.logics)
        self.show_volume(volume)
        return volume

    def update_frame_marker(self, browser) -> None:
        """Move the ECG chart's current-frame marker to the browser's frame."""
        from . import ecg_nodes  # deferred: the module docstring says why
        nodes = self._cine_nodes.get(browser.GetID())
        if nodes is not None and nodes.browser is browser and nodes.ecg_chart is not None:
            ecg_nodes.update_frame_marker(nodes.ecg_chart, browser)

    def go_to_frame(self, browser, frame: int):
        """Show ``frame`` and return the proxy volume (the Segment Editor's source volume)."""
        from . import cine_nodes  # deferred: the module docstring says why
        nodes = self.cine_nodes(browser)
        cine_nodes.go_to_frame(nodes, int(frame), self.logics)
        return nodes.proxy

    # ------------------------------------------------------------------ analysis
    def analysis_input(self, browser, work_folder) -> Path:
        """The file the analysis reads: the cine's own file when it came from one (keeps its ECG),
        else the browser's frames written as an npz (frames, fps, spacing, frame times)."""
        source = browser.GetAttribute(SOURCE_ATTRIBUTE)
        if source and Path(source).exists():
            return Path(source)
        import numpy as np  # deferred: the module docstring says why
        cine = self.cine(browser)
        path = Path(work_folder) / "cine.npz"
        arrays = {"frames": cine.frames, "fps": np.float64(cine.fps)}
        if cine.spacing_mm is not None:
            arrays["spacing_mm"] = np.asarray(cine.spacing_mm, dtype=np.float64)
        if cine.frame_times_s is not None:
            arrays["frame_times_s"] = np.asarray(cine.frame_times_s, dtype=np.float64)
        np.savez(path, **arrays)
        return path

    @staticmethod
    def analysis_command(input_path, out_folder, models_folder, device: str, segment_all: bool) -> list:
        """``python -m EchoFMEngine analyze INPUT --out DIR --models M --device D --segment S`` (contract D)."""
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        return [*python_command(), "-m", "EchoFMEngine", "analyze", str(input_path), "--out", str(out_folder),
                "--models", str(models_folder), "--device", device, "--segment", "all" if segment_all else "ed_es",
                "--no-summary"]

    @staticmethod
    def study_folder(out_folder) -> Path:
        """The one ``<study_id>`` folder the analysis of a single input wrote."""
        found = sorted(Path(out_folder).glob("*/result.json"))
        if not found:
            failed = Path(out_folder) / "failed.csv"
            why = failed.read_text().strip() if failed.is_file() else "no result.json was written"
            raise RuntimeError(f"the analysis produced no result in {out_folder}: {why}")
        if len(found) > 1:
            raise RuntimeError(f"expected one study in {out_folder}, found {len(found)}")
        return found[0].parent

    def apply_analysis(self, browser, out_folder) -> dict:
        """Result files (contract D) -> segmentation sequence, ED/ES masks, table, plot (all or nothing)."""
        from . import results  # deferred: the module docstring says why
        folder = self.study_folder(out_folder)
        return results.apply_analysis_result(self.scene, self.cine_nodes(browser), folder, self.logics)

    def analysis_result(self, out_folder) -> Optional[dict]:
        """result.json of the analysis in ``out_folder``; None when there is none or it is unreadable."""
        if _unset(out_folder):
            return None
        try:
            return json.loads((self.study_folder(out_folder) / "result.json").read_text())
        except (OSError, RuntimeError, ValueError):
            return None

    def detect_phase(self, browser) -> dict:
        """ED/ES from the ECG, else the images (in-process: no model needed, fast)."""
        from EchoFMEngine.clinical.phase import detect_ed_es  # deferred: the module docstring says why
        return detect_ed_es(self.cine(browser)).to_dict()

    @staticmethod
    def first_ed_es(phase: dict) -> tuple:
        """(first ED frame, first ES frame after it -- else the first ES), None where absent."""
        eds, ess = list(phase.get("ed_frames") or []), list(phase.get("es_frames") or [])
        ed = int(eds[0]) if eds else None
        later = [f for f in ess if ed is None or f > ed] or ess
        return ed, (int(later[0]) if later else None)

    # ------------------------------------------------------------------ masks
    def segment_editor_node(self):
        """The module's own Segment Editor node, set so that segments may overlap (LV_epi holds LV_endo)."""
        from . import segmentation_nodes  # deferred: the module docstring says why
        node = self.scene.GetSingletonNode("EchoFM", "vtkMRMLSegmentEditorNode")
        if node is None:
            node = self.scene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            node.UnRegister(None)
            node.SetSingletonTag("EchoFM")
            node = self.scene.AddNode(node)
        segmentation_nodes.configure_segment_editor(node)
        return node

    def ed_es_segmentations(self, browser, labels, ed_frame: int, es_frame: int):
        """ED and ES segmentation nodes (AI copy + editable corrected copy) from label maps [T,H,W]."""
        from . import segmentation_nodes  # deferred: the module docstring says why
        with self.scene_guard():
            return segmentation_nodes.ed_es_segmentations(self.scene, self.cine_nodes(browser), labels,
                                                          int(ed_frame), int(es_frame), logics=self.logics)

    def create_empty_masks(self, browser, ed_frame: int, es_frame: int):
        """Empty editable ED and ES segmentations (LV_endo, LV_epi, LA) to draw by hand when no
        segmentation model is available; they count as "corrected" (made by a person)."""
        import numpy as np  # deferred: the module docstring says why
        from . import segmentation_nodes  # deferred: the module docstring says why
        nodes = self.cine_nodes(browser)
        if int(ed_frame) == int(es_frame):
            raise ValueError(f"ED and ES are the same frame ({ed_frame}): set them apart first (Detect ED/ES)")
        empty = np.zeros(nodes.frame_shape, dtype=np.uint8)
        made = []
        with self.scene_guard():
            for phase, frame in (("ED", int(ed_frame)), ("ES", int(es_frame))):
                if not 0 <= frame < nodes.num_frames:
                    raise ValueError(f"{phase} frame {frame} is outside the cine's {nodes.num_frames} frames")
                made.append(segmentation_nodes.labels_to_segmentation(
                    self.scene, empty, nodes.proxy, f"{nodes.sequence.GetName()} {phase}", source="corrected",
                    phase=phase, frame=frame))
        return tuple(made)

    def labels(self, seg, browser):
        """uint8 label map [H, W] (0-3) of a segmentation on the cine's frame grid."""
        from . import segmentation_nodes  # deferred: the module docstring says why
        return segmentation_nodes.segmentation_to_labels(seg, self.cine_nodes(browser).proxy)

    @staticmethod
    def ai_segmentation(seg):
        """The hidden model-output node kept behind an editable ED/ES segmentation (None if none)."""
        from . import segmentation_nodes  # deferred: the module docstring says why
        return segmentation_nodes.ai_copy(seg)

    def reset_to_ai(self, seg) -> None:
        """Undo all corrections of an ED/ES segmentation: its segments become the AI copy's again."""
        import numpy as np  # deferred: the module docstring says why
        from . import segmentation_nodes  # deferred: the module docstring says why
        ai = self.ai_segmentation(seg)
        if ai is None:
            raise ValueError(f"{seg.GetName()!r} has no AI copy to reset to")
        labels = segmentation_nodes.segmentation_to_labels(ai, seg)
        for name, spec in segmentation_nodes.SEGMENTS.items():
            segmentation_nodes.set_segment_mask(seg, name, np.isin(labels, spec.labels), reference=seg)

    @staticmethod
    def mask_frame(seg, default=None):
        """The cine frame an ED/ES segmentation belongs to (its EchoFM.frame attribute), else ``default``."""
        from . import segmentation_nodes  # deferred: the module docstring says why
        value = seg.GetAttribute(segmentation_nodes.FRAME_ATTR) if seg is not None else None
        return int(value) if value not in (None, "") else default

    @staticmethod
    def provenance(seg) -> dict:
        """Whether a mask is still the model's output or was corrected (changed pixels per segment)."""
        from . import segmentation_nodes  # deferred: the module docstring says why
        return segmentation_nodes.mask_provenance(seg)

    def set_ai_visible(self, seg, visible: bool) -> None:
        ai = self.ai_segmentation(seg)
        if ai is not None and ai.GetDisplayNode() is not None:
            ai.GetDisplayNode().SetVisibility(bool(visible))

    def show_segmentations(self, editing, other, show_ai: bool) -> None:
        """Show the mask being edited (and its AI original when asked), hide the other frame's."""
        for seg, visible in ((editing, True), (other, False)):
            if seg is None:
                continue
            if seg.GetDisplayNode() is not None:
                seg.GetDisplayNode().SetVisibility(visible)
            self.set_ai_visible(seg, visible and show_ai)

    # ------------------------------------------------------------------ propagation (issue 12)
    def propagate(self, browser, segs, progress=None, cancel=None):
        """Masks on every frame from the drawn/corrected segmentations ``segs`` (any frames): a
        segmentation sequence with per-frame source corrected/propagated, the LV volume curve and
        EDV/ESV/EF. The user's nodes are not touched; bad input or Cancel leaves the scene as it was.
        Returns an EchoFMSlicerLib.propagation.PropagationResult (``undo_propagation`` removes it)."""
        from . import propagation  # deferred: the module docstring says why
        known = self.propagation_input(browser, segs)
        labels, m = propagation.compute_propagation(self.cine(browser), known, progress=progress, cancel=cancel)
        return self.add_propagation(browser, known, labels, m)

    def propagation_input(self, browser, segs) -> dict:
        """``{frame: label map}`` of the drawn segmentations ``segs``: what :meth:`propagate` tracks. With
        ``propagation.compute_propagation`` (no scene: a worker thread may run it) and
        :meth:`add_propagation`, the three steps of :meth:`propagate` for a caller that must stay live."""
        from . import propagation  # deferred: the module docstring says why
        return propagation.known_frames(list(segs), self.cine_nodes(browser).proxy)

    def add_propagation(self, browser, known: dict, labels, m: dict):
        """The computed propagation into the scene (undone by :meth:`undo_propagation`)."""
        from . import propagation  # deferred: the module docstring says why
        with self.scene_guard():
            result = propagation.add_propagation(self.scene, self.cine_nodes(browser), known, labels, m,
                                                 logics=self.logics)
        self.__dict__.setdefault("_propagations", {}).setdefault(browser.GetID(), []).append(result)
        return result

    def undo_propagation(self, browser) -> bool:
        """Remove the last propagation of this cine (its sequence, table and plot); False if none."""
        from . import propagation  # deferred: the module docstring says why
        stack = self.__dict__.get("_propagations", {}).get(browser.GetID()) if browser is not None else None
        if not stack:
            return False
        propagation.undo_propagation(self.scene, stack.pop(), browser)
        return True

    # ------------------------------------------------------------------ measure, export
    def measure(self, browser, ed_seg, es_seg, analysis_folder: str = ""):
        """EDV, ESV, EF, LA volume from the current (corrected) masks -> a table node, and the LV volume
        curve of the analysis with its ED/ES points replaced by the corrected volumes. Returns (dict, table)."""
        from . import measurements  # deferred: the module docstring says why
        if ed_seg is None or es_seg is None:
            raise ValueError("ED and ES masks are needed: run Analyze (with a segment model) or load masks")
        nodes = self.cine_nodes(browser)
        with self.scene_guard():
            m = measurements.measure_from_segmentations(ed_seg, es_seg, nodes.proxy, nodes.spacing_mm)
            for old in (self._measure_nodes.pop(browser.GetID(), None) or []):
                self.remove_with_parts(old)
            name = f"{nodes.sequence.GetName()} measurements (current masks)"
            table = measurements.measurements_table(self.scene, m, name)
            made = [table]
            curve = self.volume_curve(analysis_folder, nodes, m)
            if curve is not None:
                made.append(measurements.volume_curve_plot(self.scene, *curve, name=f"{nodes.sequence.GetName()} "
                                                           "LV volume (current masks)", unit=m["unit"]))
            self._measure_nodes[browser.GetID()] = made
        return m, table

    def remove_with_parts(self, node) -> None:
        """Remove a table, or a chart with its series and their tables."""
        if node is None or node.GetScene() is not self.scene:
            return
        if node.IsA("vtkMRMLPlotChartNode"):
            for i in reversed(range(node.GetNumberOfPlotSeriesNodes())):
                series = node.GetNthPlotSeriesNode(i)
                if series is not None:
                    self.remove_with_parts(series.GetTableNode())
                    self.scene.RemoveNode(series)
        self.scene.RemoveNode(node)

    def volume_curve(self, analysis_folder, nodes, m: dict):
        """(times, volumes) over all frames from the analysis, ED/ES replaced by ``m``; None without one."""
        from . import ecg_nodes  # deferred: the module docstring says why
        result = self.analysis_result(analysis_folder)
        vols = list(((result or {}).get("measurements") or {}).get("lv_volume") or [])
        if len(vols) != nodes.num_frames:
            return None
        for frame, key in ((m.get("ed_frame"), "edv"), (m.get("es_frame"), "esv")):
            if frame is not None and 0 <= frame < len(vols):
                vols[frame] = m.get(key)
        if sum(v is not None for v in vols) < 2:
            return None
        times = [ecg_nodes.frame_marker_time(nodes.browser, i) for i in range(nodes.num_frames)]
        return times, vols

    def export(self, folder, browser, ed_seg, es_seg, analysis_folder: str = "") -> list:
        """The ED/ES masks (marked "corrected" or "AI" by whether they differ from the model's output),
        their cine and a report (JSON + CSV) in the fine-tuning dataset layout. Returns the paths."""
        from . import export, measurements, segmentation_nodes  # deferred: the module docstring says why
        if _unset(folder):
            raise ValueError("choose an export folder first")
        if ed_seg is None or es_seg is None:
            raise ValueError("ED and ES masks are needed for an export")
        nodes = self.cine_nodes(browser)
        cine = self.cine(browser)
        prov = {"ED": self.provenance(ed_seg), "ES": self.provenance(es_seg)}
        for phase, info in prov.items():
            if info["frame"] is None:
                raise ValueError(f"the {phase} segmentation does not say which frame it belongs to "
                                 f"(attribute {segmentation_nodes.FRAME_ATTR})")
        view = ((self.analysis_result(analysis_folder) or {}).get("view") or {}).get("label")
        ed_labels = segmentation_nodes.segmentation_to_labels(ed_seg, nodes.proxy)
        es_labels = segmentation_nodes.segmentation_to_labels(es_seg, nodes.proxy)
        m = measurements.measure_from_segmentations(ed_seg, es_seg, nodes.proxy, nodes.spacing_mm)
        csv_path = export.export_training_folder(folder, cine, ed_labels, es_labels, prov["ED"]["frame"],
                                                 prov["ES"]["frame"], view=view,
                                                 source={k: v["source"] for k, v in prov.items()}, measurements=m)
        study = Path(folder) / "studies" / export.study_key(cine)
        return [csv_path, study / "report.json", study / "report.csv"]

    # ------------------------------------------------------------------ fine-tuning
    def finetune_command(self, export_folder, run_folder, steps: int, device: str = "auto",
                         models_folder=None) -> list:
        """``python train.py --config Resources/configs/finetune_segment.yaml data.kind=csv data.root=...``.

        Starts from the models folder's current segmentation model when it has one (its input size and
        frames then set the data's); every exported study trains, a share is held out for validation."""
        root = self.engine_root()
        config = root / FINETUNE_CONFIG
        if not config.is_file():
            raise FileNotFoundError(f"fine-tuning config {config} is missing from this installation")
        export_folder = Path(export_folder)
        if not (export_folder / "dataset.csv").is_file():
            raise ValueError(f"{export_folder} holds no exported corrections (dataset.csv): use Export first")
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        overrides = ["data.kind=csv", f"data.root={export_folder}", "data.csv_file=dataset.csv",
                     "data.val_split=null", "data.test_split=null",
                     f"run.out={run_folder}", f"run.steps={int(steps)}", f"run.device={device}"]
        start = self.current_model("segment", models_folder) if not _unset(models_folder) else None
        if start is not None:
            # deferred: the module docstring says why
            from EchoFMEngine.models.task_checkpoint import read_task_description
            size = read_task_description(start).get("input") or {}
            overrides += [f"init_from={start}", f"model.img_size={int(size['height'])}",
                          f"data.frames={int(size['frames'])}"]
        return [*python_command(), str(self.train_script()), "--config", str(config), *overrides]

    @staticmethod
    def finetuned_model(run_folder) -> Path:
        """The model folder a fine-tuning run wrote (``run.out/model``)."""
        model = Path(run_folder) / "model"
        if not (model / "model.safetensors").is_file():
            raise RuntimeError(f"the fine-tuning run wrote no model.safetensors in {model}")
        return model

    # ------------------------------------------------------------------ text for the panel
    @staticmethod
    def describe_view(result: dict) -> tuple:
        """(label, probabilities text), or ("not identified", which weights are missing)."""
        view = result.get("view")
        if not view:
            return "not identified", (result.get("needs") or {}).get("view", "no view model")
        probs = sorted(view.get("probabilities", {}).items(), key=lambda kv: -kv[1])
        return view["label"], ", ".join(f"{k} {v:.2f}" for k, v in probs)

    @staticmethod
    def describe_scores(result: dict) -> str:
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
    def describe_phase(phase: dict) -> str:
        text = f"ED frames {phase.get('ed_frames')}, ES frames {phase.get('es_frames')} (from {phase.get('method')})"
        if phase.get("heart_rate_bpm"):
            text += f", heart rate {phase['heart_rate_bpm']:.0f} bpm"
        return text

    @staticmethod
    def describe_measurements(m: dict) -> str:
        unit = m.get("unit", "")
        parts = [f"{name} {m[key]:.1f} {unit}" for key, name in (("edv", "EDV"), ("esv", "ESV"), ("la_volume", "LA"))
                 if m.get(key) is not None]
        if m.get("ef_percent") is not None:
            parts.append(f"EF {m['ef_percent']:.1f} %")
        return ", ".join(parts) + ("\n" + "; ".join(m["notes"]) if m.get("notes") else "")

    @staticmethod
    def describe_analysis(result: dict) -> str:
        lines = []
        if result.get("flags"):
            lines.append("Flags: " + "; ".join(                     # strings, or {"name", "reason"} records
                f if isinstance(f, str) else ": ".join(str(f[k]) for k in ("name", "reason") if f.get(k))
                for f in result["flags"]))
        needs = {k: v for k, v in (result.get("needs") or {}).items() if k not in ("as", "ar")}
        if needs:
            lines.append("Not computed: " + "; ".join(f"{k} ({v})" for k, v in needs.items()))
        return "\n".join(lines) or "Analysis complete."
