"""Cine loops as Slicer nodes: a sequence of single-slice volumes browsed by a sequence browser.

The layout is the one of Slicer's ``DICOMImageSequencePlugin``: one volume per frame, voxel
(i, j) = (column, row) of the frame, IJK-to-RAS ``diag(-col_mm, -row_mm, 1)`` (LPS-aligned,
image upright), index name ``time`` in seconds. Grey cines (all channels equal) become scalar
volumes, colour ones RGB vector volumes. Frames, times and spacing go back to a
:class:`~EchoFMEngine.cine.Cine` unchanged (:func:`nodes_to_cine`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from EchoFMEngine.cine import Cine, SourceInfo

from .ecg_nodes import CHART_ROLE, ECG_ROLE, ecg_plot, ecg_to_table, table_to_ecg
from .scene import Logics, add_node, all_or_nothing, logics_for, write_node
from EchoFMEngine import load_cine
from EchoFMEngine.clinical.ecg import detect_r_peaks
from EchoFMEngine.io.arrays import to_uint8

ROLE = "EchoFM.role"
META = "EchoFM.cineMeta"
SPACING_ATTR = "EchoFM.spacingMm"
MIN_SIZE = 32


@dataclass
class CineNodes:
    """The nodes showing one cine: browser, its master sequence and proxy volume, ECG table/chart."""

    browser: object
    sequence: object
    proxy: object
    ecg_table: Optional[object] = None
    cine_meta: dict = field(default_factory=dict)
    ecg_chart: Optional[object] = None

    @property
    def frame_shape(self) -> tuple:
        """(H, W) of one frame."""
        return int(self.cine_meta["height"]), int(self.cine_meta["width"])

    @property
    def num_frames(self) -> int:
        return int(self.sequence.GetNumberOfDataNodes())

    @property
    def spacing_mm(self) -> Optional[tuple]:
        s = self.cine_meta.get("spacing_mm")
        return tuple(s) if s else None


def format_time(t: float) -> str:
    """Index value of a frame time: seconds, up to 9 decimals, no trailing zeros."""
    return np.format_float_positional(round(float(t), 9), trim="-")


def _frame_volume(frame: np.ndarray, spacing_mm: Optional[tuple], grey: bool):
    """A (scene-less) volume node holding one frame [H, W, 3] uint8."""
    H, W = frame.shape[:2]
    node = slicer.vtkMRMLScalarVolumeNode() if grey else slicer.vtkMRMLVectorVolumeNode()
    pixels = frame[..., 0] if grey else frame
    comps = 1 if grey else 3
    img = vtk.vtkImageData()
    img.SetDimensions(W, H, 1)
    data = numpy_support.numpy_to_vtk(np.ascontiguousarray(pixels).reshape(H * W, comps), deep=True,
                                      array_type=vtk.VTK_UNSIGNED_CHAR)
    data.SetNumberOfComponents(comps)
    img.GetPointData().SetScalars(data)
    node.SetAndObserveImageData(img)
    row_mm, col_mm = spacing_mm if spacing_mm else (1.0, 1.0)
    node.SetIJKToRASDirections(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    node.SetSpacing(col_mm, row_mm, 1.0)
    node.SetOrigin(0.0, 0.0, 0.0)
    return node


def volume_to_array(node) -> np.ndarray:
    """Voxels of a volume node as ``[K, J, I(, C)]`` (k slices of rows x columns), a copy."""
    img = node.GetImageData() if node is not None else None
    if img is None or img.GetPointData().GetScalars() is None:
        name = node.GetName() if node is not None else "None"
        raise ValueError(f"volume {name!r} has no image data")
    i, j, k = img.GetDimensions()
    scalars = img.GetPointData().GetScalars()
    comps = scalars.GetNumberOfComponents()
    arr = numpy_support.vtk_to_numpy(scalars).reshape((k, j, i) + ((comps,) if comps > 1 else ()))
    return arr.copy()


def _checked_times(cine: Cine) -> np.ndarray:
    t = np.asarray(cine.frame_times_s, dtype=np.float64)
    if t.size > 1 and not np.all(np.diff(t) > 0):
        raise ValueError("frame times are not strictly increasing: cannot index the cine by time")
    keys = [format_time(x) for x in t]
    if len(set(keys)) != len(keys):
        raise ValueError("two frames have the same time to 1 ns: cannot index the cine by time")
    return t


def _meta(cine: Cine, grey: bool, r_peaks: Optional[np.ndarray], notes: list) -> dict:
    T, H, W = cine.shape
    src = cine.source
    return {"frames": T, "height": H, "width": W, "fps": float(cine.fps),
            "spacing_mm": list(cine.spacing_mm) if cine.spacing_mm else None,
            "has_ecg": cine.ecg is not None, "grey": grey,
            "fps_assumed": bool(src.extra.get("fps_assumed", False)),
            "format": src.format, "photometric": src.photometric,
            "modality": src.extra.get("modality"),
            "r_peak_times_s": [float(x) for x in r_peaks] if r_peaks is not None else None,
            "notes": notes}


def _r_peaks(cine: Cine, notes: list) -> Optional[np.ndarray]:
    try:
        peaks = detect_r_peaks(cine.ecg.signal, cine.ecg.fs)
    except Exception as exc:  # a poor ECG must not stop the images from loading
        notes.append(f"R-peak detection failed: {exc}")
        return None
    return cine.ecg.t0_s + np.asarray(peaks, dtype=np.float64) / cine.ecg.fs


def cine_to_nodes(scene, cine: Cine, name: str, logics: Optional[Logics] = None) -> CineNodes:
    """Volume sequence (index ``time`` in s) + browser + proxy, and ECG table/plot when the cine has an ECG.

    On any error nothing stays in the scene."""
    logics = logics_for(scene, logics)
    if not isinstance(cine, Cine):
        raise ValueError(f"cine_to_nodes needs an EchoFMEngine Cine, got {type(cine).__name__}")
    times = _checked_times(cine)
    frames = cine.frames
    grey = bool(np.array_equal(frames[..., 0], frames[..., 1]) and np.array_equal(frames[..., 1], frames[..., 2]))
    notes: list = []
    with all_or_nothing(scene):
        seq = add_node(scene, "vtkMRMLSequenceNode", name)
        seq.SetIndexName("time")
        seq.SetIndexUnit("s")
        seq.SetIndexType(slicer.vtkMRMLSequenceNode.NumericIndex)
        for t in range(cine.num_frames):
            seq.SetDataNodeAtValue(_frame_volume(frames[t], cine.spacing_mm, grey), format_time(times[t]))
        seq.SetAttribute(ROLE, "cine")
        # written into the .seq.nrrd header: a file with 1 mm voxels cannot say "spacing unknown" otherwise
        seq.SetAttribute(SPACING_ATTR, ",".join(f"{v:.9g}" for v in cine.spacing_mm) if cine.spacing_mm else "unknown")
        storage = add_node(scene, "vtkMRMLVolumeSequenceStorageNode", f"{name} storage")
        seq.SetAndObserveStorageNodeID(storage.GetID())

        browser = add_node(scene, "vtkMRMLSequenceBrowserNode", f"{name} browser")
        browser.SetAndObserveMasterSequenceNodeID(seq.GetID())
        browser.SetPlaybackRateFps(float(cine.fps))
        browser.SetSaveChanges(seq, False)
        browser.SetAttribute(ROLE, "cine")
        logics.update_proxies(browser)
        proxy = browser.GetProxyNode(seq)
        if proxy is None:
            raise RuntimeError(f"the sequence browser made no proxy volume for {name!r}")
        proxy.SetName(name)

        table = chart = None
        r_peaks = None
        if cine.ecg is not None:
            r_peaks = _r_peaks(cine, notes)
            table = ecg_to_table(scene, cine.ecg, r_peaks if r_peaks is not None else [], f"{name} ECG")
            chart = ecg_plot(scene, table, f"{name} ECG")
            for holder in (browser, seq, proxy):     # where SlicerHeart's readers reference it
                holder.SetNodeReferenceID(ECG_ROLE, table.GetID())
            browser.SetNodeReferenceID(CHART_ROLE, chart.GetID())
        meta = _meta(cine, grey, r_peaks, notes)
        browser.SetAttribute(META, json.dumps(meta))
    return CineNodes(browser, seq, proxy, table, meta, chart)


def load_cine_file(scene, path, logics: Optional[Logics] = None, name: Optional[str] = None) -> CineNodes:
    """Read a file with the engine's reader (DICOM, AVI/MP4, NRRD, NIfTI, ...) into cine nodes."""
    path = Path(path)
    cine = load_cine(path)  # CineReadError (a ValueError) names the file and the reason
    if name is None:
        name = path.name
        for suffix in (".seq.nrrd", ".nii.gz", path.suffix):
            if suffix and name.lower().endswith(suffix.lower()):
                name = name[: -len(suffix)]
                break
    return cine_to_nodes(scene, cine, name or "cine", logics)


def _browser_of(obj):
    """The browser of CineNodes (duck-typed: the library may be imported under two names) or a browser node."""
    if hasattr(obj, "browser") and hasattr(obj, "sequence"):
        return obj.browser
    if obj is not None and hasattr(obj, "IsA") and obj.IsA("vtkMRMLSequenceBrowserNode"):
        return obj
    return None


def _not_a_cine(node) -> ValueError:
    what = node.GetClassName() if node is not None else "None"
    name = node.GetName() if node is not None else ""
    detail = ""
    if node is not None and node.IsA("vtkMRMLVolumeNode") and node.GetImageData() is not None:
        dims = node.GetImageData().GetDimensions()
        detail = (f" of {dims[0]}x{dims[1]}x{dims[2]} voxels" +
                  (": a 3D volume (CT/MR-like), not a 2D cine loop" if dims[2] > 1 else ": a single image"))
    return ValueError(f"{name!r} is a {what}{detail}. Select a cine loop (a sequence browser of 2D frames), "
                      "or load the file with load_cine_file so that time becomes the sequence axis")


def _frames_from_items(seq) -> tuple:
    """uint8 RGB frames [T, H, W, 3] and the first item's spacing (col_mm, row_mm) from a volume sequence."""
    n = seq.GetNumberOfDataNodes()
    if n == 0:
        raise ValueError(f"sequence {seq.GetName()!r} is empty")
    first = seq.GetNthDataNode(0)
    if first is None or not first.IsA("vtkMRMLVolumeNode") or first.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(f"sequence {seq.GetName()!r} holds {first.GetClassName() if first else 'nothing'} items, "
                         "not image volumes")
    arrays = []
    for i in range(n):
        node = seq.GetNthDataNode(i)
        a = volume_to_array(node)
        if a.shape[0] != 1:
            raise ValueError(f"sequence {seq.GetName()!r} item {i} is a 3D volume with {a.shape[0]} slices "
                             "(CT/MR-like), not a 2D ultrasound frame")
        a = a[0]
        if a.ndim == 3 and a.shape[-1] not in (3, 4):
            raise ValueError(f"sequence {seq.GetName()!r} item {i} has {a.shape[-1]} components per pixel, "
                             "expected grey, RGB or RGBA")
        arrays.append(a[..., :3] if a.ndim == 3 else a)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"sequence {seq.GetName()!r} has frames of different sizes {sorted(shapes)}")
    stack = np.stack(arrays)
    if np.issubdtype(stack.dtype, np.signedinteger) and stack.min() < 0:
        raise ValueError(f"sequence {seq.GetName()!r} holds signed intensities down to {int(stack.min())} "
                         "(CT/MR-like), not ultrasound pixel values")
    if stack.dtype != np.uint8:
        stack = to_uint8(stack)
    if stack.ndim == 3:
        stack = np.repeat(stack[..., None], 3, axis=-1)
    return stack, first.GetSpacing()


def _browser_and_sequence(browser) -> tuple:
    """The browser (given it or one of its nodes) and its master sequence; ValueError if not a cine."""
    br = _browser_of(browser)
    if br is None:
        raise _not_a_cine(browser)
    seq = br.GetMasterSequenceNode()
    if seq is None:
        raise ValueError(f"browser {br.GetName()!r} has no sequence")
    return br, seq


def nodes_to_cine(browser) -> Cine:
    """The :class:`Cine` shown by a browser (ours, or one made by Slicer's DICOM image-sequence plugin).

    ValueError with the reason for anything that is not a cine loop of 2D frames."""
    br, seq = _browser_and_sequence(browser)
    frames, spacing = _frames_from_items(seq)
    meta = json.loads(br.GetAttribute(META) or "{}")
    unit = (seq.GetIndexUnit() or "").strip().lower()
    values = [seq.GetNthIndexValue(i) for i in range(seq.GetNumberOfDataNodes())]
    times = None
    try:
        numbers = np.asarray([float(v) for v in values])
        if unit in ("s", "ms") and (numbers.size == 1 or np.all(np.diff(numbers) > 0)):
            times = numbers / (1000.0 if unit == "ms" else 1.0)
    except ValueError:
        pass
    fps = meta.get("fps") or None
    if fps is None:
        fps = 1.0 / float(np.median(np.diff(times))) if times is not None and times.size > 1 else \
            (br.GetPlaybackRateFps() or 30.0)
    if "spacing_mm" in meta:
        spacing_mm = tuple(meta["spacing_mm"]) if meta["spacing_mm"] else None
    elif seq.GetAttribute(SPACING_ATTR):
        text = seq.GetAttribute(SPACING_ATTR)
        spacing_mm = None if text == "unknown" else tuple(float(v) for v in text.split(","))
    else:  # Slicer gives 1 mm when the file has no calibration: treat it as unknown
        spacing_mm = None if tuple(spacing[:2]) == (1.0, 1.0) else (float(spacing[1]), float(spacing[0]))
    table = br.GetNodeReference(ECG_ROLE)
    ecg = table_to_ecg(table) if table is not None else None
    extra = {k: meta[k] for k in ("fps_assumed", "modality") if meta.get(k) is not None}
    if times is None and not meta:
        extra["fps_assumed"] = True  # no time axis: the browser's playback rate stands in
    source = SourceInfo(format=meta.get("format") or "slicer-sequence", photometric=meta.get("photometric"),
                        extra=extra)
    return Cine(frames=frames, fps=float(fps), frame_times_s=times, spacing_mm=spacing_mm, ecg=ecg, source=source)


def cine_nodes_from_browser(browser, logics: Optional[Logics] = None) -> CineNodes:
    """:class:`CineNodes` for an existing browser (e.g. picked by the user); ValueError if not a cine."""
    br, seq = _browser_and_sequence(browser)
    meta = json.loads(br.GetAttribute(META) or "null")
    if meta is None:
        cine = nodes_to_cine(br)
        meta = _meta(cine, False, None, [])
    proxy = br.GetProxyNode(seq)
    if proxy is None and br.GetScene() is not None:
        logics_for(br.GetScene(), logics).update_proxies(br)
        proxy = br.GetProxyNode(seq)
    return CineNodes(br, seq, proxy, br.GetNodeReference(ECG_ROLE), meta, br.GetNodeReference(CHART_ROLE))


def check_analysable(cine: Cine) -> list:
    """ValueError when a cine cannot be analysed (still image, not ultrasound, blank, too small);
    otherwise the list of caveats (no spacing, assumed frame rate)."""
    T, H, W = cine.shape
    modality = cine.source.extra.get("modality")
    if modality and str(modality).upper() not in ("US", "OT", "SC", ""):
        raise ValueError(f"modality {modality}: not an ultrasound (echo) image")
    if T < 2:
        raise ValueError("a single frame (still image): ED/ES detection, cycles and volumes need a cine loop "
                         "of at least 2 frames")
    if H < MIN_SIZE or W < MIN_SIZE:
        raise ValueError(f"frames of {H}x{W} pixels are too small for echo analysis (minimum {MIN_SIZE}x{MIN_SIZE})")
    lit = (cine.frames.max(axis=-1) > 8).mean()
    if lit < 0.01:
        raise ValueError(f"the frames are blank ({lit:.1%} of pixels above the noise floor)")
    if all(np.array_equal(cine.frames[0], cine.frames[t]) for t in range(1, T)):
        raise ValueError(f"all {T} frames are identical: a still image repeated, not a moving echo cine")
    notes = []
    if cine.spacing_mm is None:
        notes.append("pixel spacing unknown: volumes in px^3, not ml")
    if cine.source.extra.get("fps_assumed"):
        notes.append(f"frame rate not in the file: {cine.fps:g} fps assumed")
    return notes


def go_to_frame(cine_nodes: CineNodes, frame: int, logics: Optional[Logics] = None) -> None:
    """Show ``frame`` (0-based) in the browser and its proxies ("go to ED / ES")."""
    n = cine_nodes.num_frames
    if not 0 <= int(frame) < n:
        raise ValueError(f"frame {frame} outside the cine's {n} frames")
    cine_nodes.browser.SetSelectedItemNumber(int(frame))
    logics_for(cine_nodes.browser.GetScene(), logics).update_proxies(cine_nodes.browser)


FIXED_FRAME_ROLE = "EchoFM.fixedFrame"
FIXED_FRAME_ATTR = "EchoFM.fixedFrameIndex"


def fixed_frame_volume(cine_nodes: CineNodes, frame: int):
    """A volume node holding a copy of one frame (the Segment Editor's source volume while an ED/ES
    mask is corrected): unlike the browser's proxy it does not change when the cine is scrubbed or
    played, so paint, threshold and grow-from-seeds always read the frame the mask belongs to.

    One such node per browser, referenced from it and reused (its content replaced) for the next frame."""
    n = cine_nodes.num_frames
    if not 0 <= int(frame) < n:
        raise ValueError(f"frame {frame} outside the cine's {n} frames")
    browser, scene = cine_nodes.browser, cine_nodes.browser.GetScene()
    source = cine_nodes.sequence.GetNthDataNode(int(frame))
    if source is None:
        raise RuntimeError(f"the sequence {cine_nodes.sequence.GetName()!r} has no frame {frame}")
    volume = browser.GetNodeReference(FIXED_FRAME_ROLE)
    if volume is not None and volume.GetClassName() != source.GetClassName():
        scene.RemoveNode(volume)
        volume = None
    if volume is None:
        volume = add_node(scene, source.GetClassName(), f"{cine_nodes.sequence.GetName()} frame")
        browser.SetNodeReferenceID(FIXED_FRAME_ROLE, volume.GetID())
    image = vtk.vtkImageData()
    image.DeepCopy(source.GetImageData())
    matrix = vtk.vtkMatrix4x4()
    source.GetIJKToRASMatrix(matrix)
    volume.SetAndObserveImageData(image)
    volume.SetIJKToRASMatrix(matrix)
    volume.SetName(f"{cine_nodes.sequence.GetName()} frame {int(frame)}")
    volume.SetAttribute(FIXED_FRAME_ATTR, str(int(frame)))
    if volume.GetDisplayNode() is None:
        volume.CreateDefaultDisplayNodes()
    proxy_display = cine_nodes.proxy.GetDisplayNode() if cine_nodes.proxy is not None else None
    if proxy_display is not None and hasattr(proxy_display, "GetWindow"):
        display = volume.GetDisplayNode()
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(proxy_display.GetWindow(), proxy_display.GetLevel())
    return volume


def save_cine_sequence(cine_nodes: CineNodes, path) -> Path:
    """Write the cine's volume sequence as ``.seq.nrrd`` (Slicer's volume-sequence format)."""
    return write_node(cine_nodes.sequence, path, ".seq.nrrd", "vtkMRMLVolumeSequenceStorageNode", "volume sequence")
