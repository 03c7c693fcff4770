"""The trame application: one slice view of the cine plus a side panel running ``EchoFMLogic``.

trame-slicer owns the scene, the slice view and the Segment Editor effects; ``EchoFMLogic`` (the
Qt panel's logic) does loading, ED/ES, masks, measuring, exporting and the background jobs. Plots
are matplotlib PNGs; the ECG's current-frame marker is a thin overlay moved without redrawing.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for _p in (REPO, REPO / "EchoFMSlicer"):           # EchoFMSlicerLib is imported as the module does
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from trame.app import get_server                                   # noqa: E402
from trame.ui.vuetify3 import VAppLayout                           # noqa: E402
from trame.widgets import client, html, vuetify3 as v3             # noqa: E402
from trame_slicer.core import LayoutManager, SlicerApp             # noqa: E402
from trame_slicer.rca_view.rca_view_factory import RemoteViewFactory  # noqa: E402
from trame_slicer.segmentation import (SegmentationEffectDraw, SegmentationEffectErase,  # noqa: E402
                                       SegmentationEffectNoTool, SegmentationEffectPaint,
                                       SegmentationEffectScissors, SegmentationEffectThreshold)
from trame_slicer.segmentation.segmentation_overwrite_mode import SegmentationOverwriteMode  # noqa: E402
from trame_slicer.views import (Layout, LayoutDirection, NoScheduleRendering, SliceView,  # noqa: E402
                                ViewLayoutDefinition, ViewType)
import numpy as np                                                 # noqa: E402
from undo_stack import UndoStack                                   # noqa: E402

from EchoFMEngine.clinical.propagate import PropagationCancelled   # noqa: E402
from EchoFMSlicerLib import ecg_nodes, propagation, segmentation_nodes  # noqa: E402
from EchoFMSlicerLib.logic import EchoFMLogic                      # noqa: E402

log = logging.getLogger("EchoFM.web")
EFFECTS = {"none": SegmentationEffectNoTool, "paint": SegmentationEffectPaint, "erase": SegmentationEffectErase,
           "draw": SegmentationEffectDraw, "scissors": SegmentationEffectScissors,
           "threshold": SegmentationEffectThreshold}
# key (as the page's keydown names it, "ctrl+" for Ctrl/Cmd) -> (method, arguments)
KEYS = {"ArrowLeft": ("step", -1), "ArrowRight": ("step", 1), " ": ("toggle_play",), "e": ("jump", "ED"),
        "s": ("jump", "ES"), "ctrl+z": ("undo",), "ctrl+y": ("redo",), "ctrl+Z": ("redo",)}
KEY_SCRIPT = """document.addEventListener('keydown', (e) => {
  const t = e.target;
  if (t && (t.tagName === 'INPUT' || t.tagName === 'TEXTAREA' || t.isContentEditable)) return;
  const k = (e.ctrlKey || e.metaKey ? 'ctrl+' : '') + e.key;
  if (window.trame && %s.includes(k)) { e.preventDefault(); window.trame.trigger('echofm_key', [k]); }
});""" % json.dumps(sorted(KEYS))
PLOT_BOX = (0.09, 0.22, 0.97, 0.9)        # axes [left, bottom, right, top] as figure fractions
# How the slice view streams (measured, docs/web.md): llvmpipe rasterizes when the image is read back,
# so a frame costs in proportion to its pixels: the view renders at most 420x420 px (EchoNet's 112 px
# loses nothing; larger cines are shown at that resolution) and the page scales it up. One JPEG
# quality: trame-rca otherwise renders each change twice (interactive, then still). 60 frames/s in
# and out of focus: trame-slicer's 10 frames/s out of focus would show a 50 frames/s cine at a fifth.
VIEW_STREAM = dict(target_fps=60.0, blur_fps=60.0, interactive_quality=90)
VIEW_MAX_PIXELS = 420 * 420
PLAY_STATE_S = 0.1          # while playing, the page's frame number follows this often (the view every frame)
VIEW_MAX_PENDING = 2        # images on the way to the page beyond which trame-rca drops new ones


def _slice_view(**kw):
    """trame-slicer's slice view without its ~60 renders while it is built (the stream renders once the
    page says its size) and without multisampling (8x on llvmpipe; a 2D slice is a texture: the same
    pixels at a third of the cost per streamed frame, measured in docs/web.md)."""
    view = SliceView(scheduled_render_strategy=NoScheduleRendering(), **kw)
    view.render_window().SetMultiSamples(0)
    return view


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    import matplotlib.pyplot as plt  # deferred: matplotlib, loaded when a plot is drawn
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _volume_rows(m: dict, label: str = "") -> list:
    """Table rows (name, value, unit) of EDV, ESV, EF and LA volume of a measurements dict."""
    unit = m.get("unit", "")
    return [{"name": n + label, "value": "-" if m.get(k) is None else f"{m[k]:.2f}", "unit": u}
            for n, k, u in (("EDV", "edv", unit), ("ESV", "esv", unit), ("EF", "ef_percent", "%"),
                            ("LA volume", "la_volume", unit))]


def _beat_rows(cycles) -> list:
    return [{"name": f"beat {i + 1} EF", "value": f"{b['ef_percent']:.1f}", "unit": "%"}
            for i, b in enumerate(cycles or []) if isinstance(b, dict) and b.get("ef_percent") is not None]


def _figure():
    import matplotlib  # deferred: matplotlib, as above
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: as above
    fig = plt.figure(figsize=(5.0, 1.6))
    ax = fig.add_axes([PLOT_BOX[0], PLOT_BOX[1], PLOT_BOX[2] - PLOT_BOX[0], PLOT_BOX[3] - PLOT_BOX[1]])
    ax.tick_params(labelsize=7)
    return fig, ax


class EchoFMWebApp:
    """Server state <-> EchoFMLogic. One cine is "current"; ED/ES masks belong to it."""

    def __init__(self, server=None, models_folder=None, export_folder=None) -> None:
        self.server = server or get_server(client_type="vue3")
        self.state, self.ctrl = self.server.state, self.server.controller
        self.slicer_app = SlicerApp()
        self.logic = EchoFMLogic(self.slicer_app.scene, app_logic=self.slicer_app.app_logic)
        self.view_factory = RemoteViewFactory(self.server, _slice_view, ViewType.SLICE_VIEW, **VIEW_STREAM)
        self.slicer_app.view_manager.register_factory(self.view_factory)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        # only the one layout used: every registered layout builds its views at once (3 slice views and
        # a 3D view for the default grid, about 2 s of start-up spent on views never shown)
        axial = ViewLayoutDefinition.axial_view()
        self.layout_manager.register_layout("Axial Only", Layout(LayoutDirection.Vertical, [axial]))
        self.layout_manager.set_layout("Axial Only")
        adapter = self.view_factory.get_factory_view(axial.singleton_tag).view_adapter
        adapter.max_pixel_count = VIEW_MAX_PIXELS
        # a browser that cannot keep up gets the newest frame, not a growing queue of old ones
        self.ctrl.on_server_ready.add(lambda **_: self.server.protocol_call("trame.rca.drop", adapter.area_name,
                                                                            VIEW_MAX_PENDING))
        self.editor = self.slicer_app.segmentation_editor
        self.editor.set_undo_stack(UndoStack(undo_limit=50))
        self.editor.segmentation_modified.connect(self._on_mask_edited)
        self.models_folder = Path(models_folder) if models_folder else self.logic.default_models_folder()
        self.browser = self.nodes = self.cine = None
        self.ed_seg = self.es_seg = None
        self.analysis_folder = ""
        self.job = None
        self.propagation = None                       # the shown PropagationResult of this cine
        self._fixed_frame = None                      # frame of the fixed copy shown while correcting
        self._shown_frame = None                      # frame the view shows (may be ahead of state.frame)
        self._prop_task, self._prop_cancel, self._prop_report = None, False, (0.0, "")
        self._play_task = None
        self._t_frame = {}
        s = self.state
        s.trame__title = "EchoFM"                       # never a file or patient name
        s.update(dict(path="", cines=[], cine_id=None, info="No cine loaded.", n_frames=1, frame=0,
                      playing=False, fps=30.0, ed=None, es=None, phase_text="", editing="", effect="none",
                      ecg_img="", ecg_marker=-1.0, vol_img="", rows=[], measure_text="", view_text="",
                      scores_text="", models_text=self.logic.models_status(self.models_folder),
                      export_folder=str(Path(export_folder) if export_folder else
                                        Path.home() / "EchoFM" / "corrections"),
                      export_text="", job_text="", job_progress=0, job_busy=False, steps=300,
                      error="", show_ai=True, last_render_ms=0.0, edits=0, prop_busy=False,
                      prop_progress=0, prop_text="", frame_mask="", play_clock=[]))
        s.change("frame")(self._on_frame)
        s.change("cine_id")(self._on_pick_cine)
        s.change("effect")(self._on_effect)
        s.change("show_ai")(self._on_show_ai)
        self.ctrl.trigger("echofm_key")(self.on_key)
        self._build_ui()

    # ------------------------------------------------------------------ helpers
    def _guard(self, what: str, fn, *a):
        """Run ``fn``; a failure is shown in the page (message only: no traceback, no paths logged)."""
        try:
            self.state.error = ""
            return fn(*a)
        except Exception as e:                          # shown to the user, who can act on it
            self.state.error = f"{what}: {e}"
            log.warning(f"{what} failed: {type(e).__name__}")
            log.debug("details", exc_info=True)
            return None

    def _refresh_cines(self):
        scene = self.slicer_app.scene
        browsers = [scene.GetNthNodeByClass(i, "vtkMRMLSequenceBrowserNode")
                    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode"))]
        self.state.cines = [{"title": b.GetName(), "value": b.GetID()} for b in browsers]

    # ------------------------------------------------------------------ input
    def load(self, path=None):
        path = path or self.state.path.strip()
        if not path:
            self.state.error = "type the path of a cine file or DICOM folder first"
            return
        nodes = self._guard("Load", self.logic.load_cine, path)
        if nodes is not None:
            self._refresh_cines()
            self.state.cine_id = nodes.browser.GetID()
            self._select(nodes.browser)

    def _on_pick_cine(self, cine_id=None, **_):
        b = self.slicer_app.scene.GetNodeByID(cine_id) if cine_id else None
        if b is not None and b is not self.browser:
            self._select(b)

    def _select(self, browser):
        self.stop()
        self.browser = browser
        self.nodes = self.logic.cine_nodes(browser)
        self.cine = self.logic.cine(browser)
        self.ed_seg = self.es_seg = None
        self.propagation = self._fixed_frame = None
        self.analysis_folder = ""
        self.logic.show_cine(self.nodes)
        s = self.state
        s.n_frames, s.fps = self.nodes.num_frames, float(self.cine.fps)
        s.info = self.logic.describe_cine(browser)
        s.ed = s.es = None
        s.phase_text = s.measure_text = s.view_text = s.scores_text = s.editing = s.frame_mask = s.prop_text = ""
        s.rows, s.vol_img = [], ""
        s.frame = 0
        self._draw_ecg()
        self._show_frame(0)

    # ------------------------------------------------------------------ frames
    def _show_frame(self, frame: int):
        if self.browser is None:
            return
        t0 = time.perf_counter()
        proxy = self.logic.go_to_frame(self.browser, int(frame))    # the view's stream renders and sends it
        if self._fixed_frame is not None and int(frame) != self._fixed_frame:
            self.logic.show_volume(proxy)                 # back to the live cine (the editor keeps its copy)
            self._fixed_frame = None
        self._shown_frame = int(frame)
        self.state.last_render_ms = round(1000 * (time.perf_counter() - t0), 1)
        self.state.ecg_marker = self._marker_fraction(int(frame))
        result = self.propagation
        if result is not None and 0 <= int(frame) < len(result.frame_sources):
            area = int((result.labels[int(frame)] == 1).sum())
            self.state.frame_mask = f"frame {int(frame)}: {result.frame_sources[int(frame)]} mask, LV_endo {area} px"

    def _on_frame(self, frame=0, **_):
        if self._play_task is not None and int(frame or 0) == self._shown_frame:
            return                                      # the play loop's own frame, already shown
        self._show_frame(int(frame or 0))

    def step(self, d: int):
        if self.browser is not None:
            self.state.frame = (int(self.state.frame) + int(d)) % self.state.n_frames

    def jump(self, which: str):
        frame = self.state.ed if which == "ED" else self.state.es
        if frame is None:
            self.state.error = f"no {which} frame yet: Detect ED/ES first"
            return
        self.stop()
        self.state.frame = int(frame)

    def play(self):
        if self.browser is None or self._play_task is not None:
            return
        self.state.playing = True
        self._play_task = asyncio.ensure_future(self._play_loop())

    def stop(self):
        if self._play_task is not None:
            self._play_task.cancel()
            self._play_task = None
            if self._shown_frame is not None:
                self.state.frame = self._shown_frame      # the page's number catches up with the view
        self.state.playing = False

    async def _play_loop(self):
        """Frames advance by the clock at the cine's own frame rate (frames are skipped, not slowed). The
        view streams every frame; the page's frame number, slider and ECG marker follow every PLAY_STATE_S
        (each state change re-renders the page's whole panel: at 50 per second a loaded browser fell
        seconds behind)."""
        start, fps, n = time.perf_counter(), float(self.state.fps), int(self.state.n_frames)
        first, told = int(self.state.frame), -PLAY_STATE_S
        try:
            while True:
                elapsed = time.perf_counter() - start
                frame = (first + int(elapsed * fps)) % n
                if frame != self._shown_frame:
                    self._show_frame(frame)
                if elapsed - told >= PLAY_STATE_S and frame != self.state.frame:
                    told = elapsed
                    with self.state:
                        self.state.frame = frame
                        self.state.play_clock = [first, frame, round(elapsed, 3)]   # what the page can check
                await asyncio.sleep(max(0.2 / fps, 0.005))
        except asyncio.CancelledError:
            pass

    # ------------------------------------------------------------------ plots
    def _times(self):
        return [ecg_nodes.frame_marker_time(self.browser, i) for i in range(self.nodes.num_frames)]

    def _marker_fraction(self, frame: int) -> float:
        """Horizontal position (0-1 of the image) of the frame's time on the ECG plot; -1 without ECG."""
        lim = getattr(self, "_ecg_xlim", None)
        if not lim or self.browser is None:
            return -1.0
        t = ecg_nodes.frame_marker_time(self.browser, frame)
        frac = (t - lim[0]) / max(lim[1] - lim[0], 1e-9)
        return round(PLOT_BOX[0] + frac * (PLOT_BOX[2] - PLOT_BOX[0]), 4)

    def _draw_ecg(self):
        self._ecg_xlim = None
        ecg = self.cine.ecg if self.cine is not None else None
        if ecg is None:
            self.state.ecg_img, self.state.ecg_marker = "", -1.0
            return
        t = ecg.t0_s + np.arange(ecg.signal.size) / ecg.fs
        fig, ax = _figure()
        ax.plot(t, ecg.signal, lw=0.8, color="#2e7d32")
        if self.nodes.ecg_table is not None:
            r = ecg_nodes.r_peak_times(self.nodes.ecg_table)
            ax.plot(r, np.interp(r, t, ecg.signal), "v", color="#c62828", ms=5, label="R peak")
        times = self._times()
        lo, hi = min(times[0], t[0]), max(times[-1], t[-1])
        ax.set_xlim(lo, hi)
        ax.set_xlabel("time (s)", fontsize=7)
        ax.set_title(f"ECG ({ecg.lead})", fontsize=8)
        self._ecg_xlim = (lo, hi)
        self.state.ecg_img = _png(fig)

    def _draw_volume(self, m: dict, curve=None, title="current masks"):
        """LV volume over time (the analysis' or a propagation's curve) with the ED/ES points of ``m``."""
        times = self._times()
        curve = curve or self.logic.volume_curve(self.analysis_folder, self.nodes, m)
        fig, ax = _figure()
        if curve is not None:
            ct, cv = curve
            keep = [i for i, v in enumerate(cv) if v is not None]
            ax.plot([ct[i] for i in keep], [cv[i] for i in keep], color="#1565c0", lw=1.2)
        for key, fk, col in (("edv", "ed_frame", "#c62828"), ("esv", "es_frame", "#6a1b9a")):
            if m.get(key) is not None and m.get(fk) is not None:
                ax.plot([times[m[fk]]], [m[key]], "o", color=col)
                ax.annotate(key.upper(), (times[m[fk]], m[key]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xlim(times[0], times[-1])
        ax.set_xlabel("time (s)", fontsize=7)
        ax.set_title(f"LV volume ({m.get('unit', '')}, {title})", fontsize=8)
        self.state.vol_img = _png(fig)

    # ------------------------------------------------------------------ ED/ES, analysis
    def detect(self):
        if self.browser is None:
            self.state.error = "load a cine first"
            return
        phase = self._guard("Detect ED/ES", self.logic.detect_phase, self.browser)
        if phase:
            self._show_phase(phase)

    def _show_phase(self, phase):
        ed, es = self.logic.first_ed_es(phase)
        self.state.update(dict(ed=ed, es=es, phase_text=self.logic.describe_phase(phase)))

    def analyze(self):
        if self.browser is None:
            self.state.error = "load a cine first"
            return

        def start():
            out = self.logic.new_work_folder("analysis")
            inp = self.logic.analysis_input(self.browser, out)
            cmd = self.logic.analysis_command(inp, out / "out", self.models_folder, "auto", False)
            browser = self.browser
            self._start_job(cmd, "Analysis", lambda: self._analysis_done(browser, out / "out"))
        self._guard("Analyze", start)

    def _analysis_done(self, browser, out):
        summary = self.logic.apply_analysis(browser, out)
        self.analysis_folder = str(out)
        result = summary["result"]
        label, probs = self.logic.describe_view(result)
        self.state.view_text = f"View: {label} ({probs})"
        self.state.scores_text = self.logic.describe_scores(result) + "\n" + self.logic.describe_analysis(result)
        if result.get("phase"):
            self._show_phase(result["phase"])
        if summary.get("ed_segmentation") is not None:
            self.ed_seg, self.es_seg = summary["ed_segmentation"], summary["es_segmentation"]
            self.edit("ED")

    # ------------------------------------------------------------------ masks
    def create_masks(self):
        s = self.state
        if s.ed is None or s.es is None:
            s.error = "Detect ED/ES first (the masks belong to those frames)"
            return
        made = self._guard("Create masks", self.logic.create_empty_masks, self.browser, s.ed, s.es)
        if made:
            self.ed_seg, self.es_seg = made
            self.edit("ED")
        log.info(f"masks: {bool(made)} editing={self.state.editing!r} error={self.state.error!r} rows={len(self.state.rows)}")

    def edit(self, which: str):
        self._guard(f"Edit {which}", self._edit, which)

    def _edit(self, which: str):
        seg = self.ed_seg if which == "ED" else self.es_seg
        if seg is None:
            self.state.error = f"no {which} masks: Analyze with a segment model, or Create empty masks"
            return
        self.stop()
        frame = self.logic.mask_frame(seg, default=self.state.ed if which == "ED" else self.state.es)
        self.state.frame = frame
        # as the panel: the editor works on a fixed copy of the mask's frame, so playing or scrubbing
        # meanwhile never puts another frame under the mask (threshold reads the source volume)
        self.editor.set_active_segmentation(seg, self.logic.correction_volume(self.browser, frame))
        self._fixed_frame = frame
        segmentation_nodes.configure_segment_editor(self.editor.editor_node)   # the panel's settings
        self.editor.set_overwrite_mode(SegmentationOverwriteMode.ALLOW_OVERLAP)
        self.logic.show_segmentations(seg, self.es_seg if which == "ED" else self.ed_seg, self.state.show_ai)
        self._show_propagated(False)
        self.state.editing = which
        self._on_effect(self.state.effect)
        self.measure()

    def _on_effect(self, effect="none", **_):
        if self.editor.active_segmentation is not None and effect in EFFECTS:
            self.editor.set_active_effect_type(EFFECTS[effect])

    def set_segment(self, name: str):
        seg = self.ed_seg if self.state.editing == "ED" else self.es_seg
        if seg is not None:
            sid = seg.GetSegmentation().GetSegmentIdBySegmentName(name)
            if sid:
                self.editor.set_active_segment_id(sid)

    def _on_show_ai(self, show_ai=True, **_):
        for seg in (self.ed_seg, self.es_seg):
            if seg is not None:
                self.logic.set_ai_visible(seg, show_ai)

    def undo(self):
        if self.editor.undo_stack is not None and self.editor.undo_stack.can_undo():
            self.editor.undo_stack.undo()
            self.measure()

    def redo(self):
        if self.editor.undo_stack is not None and self.editor.undo_stack.can_redo():
            self.editor.undo_stack.redo()
            self.measure()

    def _on_mask_edited(self, *_):
        self.state.edits += 1
        self.measure()

    def measure(self):
        if self.browser is None or self.ed_seg is None or self.es_seg is None:
            return
        m = self._guard("Measure", lambda: self.logic.measure(self.browser, self.ed_seg, self.es_seg,
                                                              self.analysis_folder)[0])
        if m is None:
            return
        rows = _volume_rows(m)
        for phase, seg in (("ED", self.ed_seg), ("ES", self.es_seg)):
            prov = self.logic.provenance(seg)
            area = int((self.logic.labels(seg, self.browser) == 1).sum())
            rows.append({"name": f"{phase} LV_endo area (frame {prov['frame']})", "value": str(area),
                         "unit": f"px, {prov['source']}"})
        result = self.logic.analysis_result(self.analysis_folder) or {}
        self.state.rows = rows + _beat_rows((result.get("measurements") or {}).get("cycles"))
        self.state.measure_text = self.logic.describe_measurements(m)
        self._draw_volume(m)

    # ------------------------------------------------------------------ propagation
    def propagate(self):
        self._guard("Propagate", self._start_propagation)

    def _start_propagation(self):
        """Track the drawn ED/ES masks through every frame: the scene is read and written here, the
        tracking itself (EchoFMSlicerLib.propagation.compute_propagation, no scene) runs in a worker
        thread so that the page keeps playing and Cancel is heard."""
        if self.browser is None:
            raise ValueError("load a cine first")
        if self._prop_task is not None:
            raise RuntimeError("a propagation is running: wait for it or cancel it")
        segs = [s for s in (self.ed_seg, self.es_seg) if s is not None]
        if not segs:
            raise ValueError("no masks: Create empty masks and draw the LV on ED (or ES) first")
        known = self.logic.propagation_input(self.browser, segs)
        self._prop_cancel, self._prop_report = False, (0.0, "started")
        self.state.update(dict(prop_busy=True, prop_progress=0, prop_text="Propagate: started"))
        self._prop_task = asyncio.ensure_future(self._propagation(self.browser, self.logic.cine(self.browser), known))

    async def _propagation(self, browser, cine, known):
        def progress(fraction, message):              # worker thread: only a plain attribute
            self._prop_report = (fraction, message)
        job = asyncio.get_running_loop().run_in_executor(
            None, propagation.compute_propagation, cine, known, progress, lambda: self._prop_cancel)
        while not job.done():
            await asyncio.wait([job], timeout=0.25)
            with self.state:
                fraction, message = self._prop_report
                self.state.prop_progress, self.state.prop_text = int(round(100 * fraction)), f"Propagate: {message}"
        with self.state:
            self._prop_task = None
            self.state.prop_busy = False
            try:
                labels, m = job.result()
            except PropagationCancelled:
                self.state.prop_text = "Propagate: cancelled (nothing changed)"
                return
            except Exception as e:                  # bad input: shown in the page
                self.state.prop_text, self.state.error = "", f"Propagate: {e}"
                log.warning(f"propagation failed: {type(e).__name__}")
                return
            if browser is not self.browser:           # another cine was picked meanwhile
                return
            result = self._guard("Propagate", self.logic.add_propagation, browser, known, labels, m)
            if result is not None:
                self._show_propagation(result)

    def _show_propagation(self, result):
        """The propagated masks over the cine (the hand-drawn ones hidden), their curve and measurements."""
        self.propagation = result
        for seg in (self.ed_seg, self.es_seg):
            self.logic.show_segmentations(None, seg, False)
        self._show_propagated(True)
        self.state.update(dict(editing="", effect="none", prop_progress=100,
                               prop_text=f"Propagate: done, masks on {len(result.frame_sources)} frames "
                                         f"({result.frame_sources.count('corrected')} drawn)"))
        m = result.measurements
        self.state.rows = _volume_rows(m, " (propagated)") + _beat_rows(m.get("cycles"))
        self.state.measure_text = self.logic.describe_measurements(m)
        self._draw_volume(m, (self._times(), list(m["lv_volume"])), "propagated masks")
        self._show_frame(int(self.state.frame))

    def _show_propagated(self, visible: bool):
        result = self.propagation
        proxy = self.browser.GetProxyNode(result.sequence) if result is not None and self.browser else None
        if proxy is not None and proxy.GetDisplayNode() is not None:
            proxy.GetDisplayNode().SetVisibility(visible)

    def cancel_propagation(self):
        if self._prop_task is not None:
            self._prop_cancel = True
            self.state.prop_text = "Propagate: cancelling..."

    def undo_propagation(self):
        if self.browser is not None and self.logic.undo_propagation(self.browser):
            self.propagation = None
            self.state.update(dict(frame_mask="", prop_text="Propagate: undone"))
            self.edit("ED")

    # ------------------------------------------------------------------ keys
    def on_key(self, key: str):
        """The page's keyboard (keys typed into a text box stay there): see KEYS."""
        action = KEYS.get(key)
        if action is not None and self.browser is not None:
            getattr(self, action[0])(*action[1:])

    def toggle_play(self):
        (self.stop if self.state.playing else self.play)()

    # ------------------------------------------------------------------ export, fine-tune
    def export(self):
        written = self._guard("Export", self.logic.export, Path(self.state.export_folder), self.browser,
                              self.ed_seg, self.es_seg, self.analysis_folder)
        if written:
            self.state.export_text = f"Exported {len(written)} files to the export folder (study {Path(written[1]).parent.name})"

    def finetune(self):
        def start():
            folder = Path(self.state.export_folder)
            run = self.logic.new_work_folder("finetune", base=folder / "runs")
            cmd = self.logic.finetune_command(folder, run, int(self.state.steps), "auto", self.models_folder)
            self._start_job(cmd, "Fine-tuning", lambda: self._finetune_done(run), cwd=self.logic.engine_root())
        self._guard("Fine-tune", start)

    def _finetune_done(self, run):
        model = self.logic.finetuned_model(run)
        cmd = self.logic.import_weights_command(model, "segment", self.models_folder)
        self.job = None
        self._start_job(cmd, "Importing the fine-tuned model",
                        lambda: setattr(self.state, "models_text", self.logic.models_status(self.models_folder)))

    def _start_job(self, cmd, title, on_success, cwd=None):
        if self.job is not None:
            raise RuntimeError(f"{self.job[1]} is still running; wait for it or cancel it")
        self.job = (self.logic.start_process(cmd, title, cwd=cwd), title, on_success)
        self.state.update(dict(job_busy=True, job_progress=0, job_text=f"{title}: started"))
        asyncio.ensure_future(self._poll_job(self.job))

    async def _poll_job(self, job):
        process, title, on_success = job
        while True:
            ended = process.finished
            with self.state:
                for e in process.poll():
                    if e.kind == "progress":
                        self.state.job_progress = int(round(100 * e.fraction))
                        self.state.job_text = f"{title}: {e.done}/{e.total} {e.text}".rstrip()
            if ended:
                break
            await asyncio.sleep(0.3)
        with self.state:
            if self.job is job:
                self.job = None
            self.state.job_busy = self.job is not None
            if process.cancelled:
                self.state.job_text = f"{title}: cancelled"
            elif process.returncode != 0:
                self.state.job_text = f"{title}: failed - {process.error_message}"[:600]
            else:
                self.state.job_progress, self.state.job_text = 100, f"{title}: done"
                self._guard(title, on_success)

    def cancel(self):
        if self.job is not None:
            self.state.job_text = f"{self.job[1]}: cancelling..."
            self.job[0].cancel(grace_s=1.0)

    # ------------------------------------------------------------------ page
    def _build_ui(self):
        s = "font-size:12px"
        with VAppLayout(self.server, fill_height=True) as layout:
            self.ui = layout
            client.Script(KEY_SCRIPT)
            with html.Div(style="display:flex;height:100vh;width:100vw;overflow:hidden"):
                with html.Div(style=f"width:470px;min-width:470px;overflow-y:auto;padding:6px;{s}",
                              classes="bg-grey-lighten-4"):
                    html.Div("EchoFM", classes="text-h6")
                    html.Div("{{ error }}", v_if="error", id="error", classes="text-red", style=s)
                    with html.Div(classes="d-flex"):
                        v3.VTextField(v_model=("path",), label="cine file or DICOM folder", density="compact",
                                      hide_details=True, id="path")
                        v3.VBtn("Open", click=self.load, size="small", id="open", classes="ml-1 mt-2")
                    v3.VSelect(v_model=("cine_id",), items=("cines",), label="loaded cines", density="compact",
                               hide_details=True, classes="mt-1")
                    html.Pre("{{ info }}", id="info", style="white-space:pre-wrap;font-size:11px")
                    with html.Div(classes="d-flex align-center"):
                        v3.VBtn("Play", click=self.play, size="small", id="play", disabled=("playing",))
                        v3.VBtn("Pause", click=self.stop, size="small", id="pause", classes="ml-1")
                        v3.VBtn("<", click=(self.step, "[-1]"), size="small", id="prev", classes="ml-1")
                        v3.VBtn(">", click=(self.step, "[1]"), size="small", id="next", classes="ml-1")
                        v3.VBtn("ED", click=(self.jump, "['ED']"), size="small", id="go_ed", classes="ml-1")
                        v3.VBtn("ES", click=(self.jump, "['ES']"), size="small", id="go_es", classes="ml-1")
                        html.Span("frame {{ frame }} / {{ n_frames - 1 }}", id="frame_label", classes="ml-2",
                                  title="keys: left/right step, space play/pause, E / S jump to ED / ES, "
                                        "Ctrl+Z / Ctrl+Y undo / redo")
                    with html.Div(id="scrub"):
                        v3.VSlider(v_model_number=("frame",), min=0, max=("n_frames - 1",), step=1,
                                   density="compact", hide_details=True)
                    with html.Div(style="position:relative", v_if="ecg_img"):
                        html.Img(src=("ecg_img",), style="width:100%;display:block", id="ecg")
                        html.Div(v_if="ecg_marker >= 0", id="ecg_marker",
                                 style=("{position:'absolute',top:'8%',height:'72%',width:'2px',"
                                        "background:'#ff6f00',left:(ecg_marker*100)+'%'}",))
                    html.Div("No ECG in this cine.", v_if="!ecg_img && cines.length", style=s)
                    with html.Div(classes="d-flex mt-1"):
                        v3.VBtn("Detect ED/ES", click=self.detect, size="small", id="detect")
                        v3.VBtn("Analyze (models)", click=self.analyze, size="small", id="analyze",
                                classes="ml-1", disabled=("job_busy",))
                    html.Div("{{ phase_text }}", id="phase", style=s)
                    html.Div("{{ models_text }}", style="font-size:11px;color:#555")
                    html.Pre("{{ view_text }}\n{{ scores_text }}", v_if="view_text || scores_text", id="scores",
                             style="white-space:pre-wrap;font-size:11px")
                    html.Div("Masks", classes="text-subtitle-2 mt-1")
                    with html.Div(classes="d-flex flex-wrap"):
                        v3.VBtn("Create empty masks", click=self.create_masks, size="small", id="create_masks")
                        v3.VBtn("Edit ED", click=(self.edit, "['ED']"), size="small", id="edit_ed", classes="ml-1")
                        v3.VBtn("Edit ES", click=(self.edit, "['ES']"), size="small", id="edit_es", classes="ml-1")
                        v3.VCheckbox(v_model=("show_ai",), label="show AI", density="compact", hide_details=True,
                                     classes="ml-1")
                    html.Div("Editing {{ editing }} (corrections drawn filled; AI output as outline)",
                             v_if="editing", id="editing", style=s)
                    with html.Div(classes="d-flex flex-wrap"):
                        for seg in ("LV_endo", "LV_epi", "LA"):
                            v3.VBtn(seg, click=(self.set_segment, f"['{seg}']"), size="x-small", id=f"seg_{seg}",
                                    classes="mr-1 mt-1")
                    with v3.VBtnToggle(v_model=("effect",), density="compact", mandatory=True, classes="mt-1"):
                        for name in EFFECTS:
                            v3.VBtn(name, value=name, size="x-small", id=f"fx_{name}")
                    with html.Div(classes="d-flex mt-1"):
                        v3.VBtn("Undo", click=self.undo, size="small", id="undo")
                        v3.VBtn("Redo", click=self.redo, size="small", id="redo", classes="ml-1")
                    with html.Div(classes="d-flex mt-1"):
                        v3.VBtn("Propagate", click=self.propagate, size="small", id="propagate",
                                disabled=("prop_busy",), title="track the drawn masks through every frame")
                        v3.VBtn("Cancel", click=self.cancel_propagation, size="small", id="prop_cancel",
                                classes="ml-1", disabled=("!prop_busy",))
                        v3.VBtn("Undo propagation", click=self.undo_propagation, size="small", id="prop_undo",
                                classes="ml-1", disabled=("prop_busy",))
                    v3.VProgressLinear(model_value=("prop_progress",), v_if="prop_busy", height=6, id="prop_bar")
                    html.Div("{{ prop_text }}", id="prop_text", style=s)
                    html.Div("{{ frame_mask }}", v_if="frame_mask", id="frame_mask", style=s)
                    with html.Table(v_if="rows.length", classes="measurements",
                                    style="font-size:12px;width:100%;border-collapse:collapse"):
                        with html.Tbody():
                            with html.Tr(v_for="r in rows", key="r.name"):
                                html.Td("{{ r.name }}")
                                html.Td("{{ r.value }}", classes="text-right")
                                html.Td("{{ r.unit }}")
                    html.Img(src=("vol_img",), v_if="vol_img", style="width:100%", id="volume")
                    with html.Div(classes="d-flex mt-1"):
                        v3.VTextField(v_model=("export_folder",), label="export folder", density="compact",
                                      hide_details=True, id="export_folder")
                        v3.VBtn("Export", click=self.export, size="small", id="export", classes="ml-1 mt-2")
                    html.Div("{{ export_text }}", id="export_text", style=s)
                    with html.Div(classes="d-flex mt-1 align-center"):
                        v3.VTextField(v_model_number=("steps",), label="steps", density="compact",
                                      hide_details=True, style="max-width:90px")
                        v3.VBtn("Fine-tune", click=self.finetune, size="small", id="finetune", classes="ml-1",
                                disabled=("job_busy",))
                        v3.VBtn("Cancel", click=self.cancel, size="small", id="cancel", classes="ml-1",
                                disabled=("!job_busy",))
                    v3.VProgressLinear(model_value=("job_progress",), v_if="job_busy", height=6)
                    html.Div("{{ job_text }}", id="job_text", style="font-size:11px")
                    html.Div("last frame change re-rendered in {{ last_render_ms }} ms", id="render_ms",
                             style="font-size:10px;color:#777")
                with html.Div(style="flex:1;position:relative;background:black", id="view"):
                    self.layout_manager.initialize_layout_grid(layout)

    def start(self, paths=(), host="127.0.0.1", port=8080, token=None, started=None, **kw):
        """Serve; ``paths`` load once the server listens. ``started``: perf_counter() at the command's
        start, for the start-up times in the log (seconds only, no paths)."""
        paths = [str(p) for p in paths]
        t0 = time.perf_counter() if started is None else started

        def load_given(**_):
            ready = time.perf_counter() - t0
            with self.state:
                for p in paths:
                    self.load(p)
            log.info(f"start-up: listening at {ready:.2f} s, {len(paths)} cine(s) loaded at "
                     f"{time.perf_counter() - t0:.2f} s after the command started")
        # loaded once the server listens: the browser fetches the page meanwhile (start-up, docs/web.md)
        self.ctrl.on_server_ready.add(load_given)
        if token:      # wslink refuses a connection without this secret; the page reads ?secret=
            sys.argv[1:] = ["--authKey", token]
        else:
            sys.argv[1:] = []
        print(f"EchoFM web: serving on http://{host}:{port}/" + ("?secret=<token>" if token else ""), flush=True)
        self.server.start(host=host, port=port, open_browser=False, **kw)
