"""Engine label maps as Slicer segmentations: LV_endo, LV_epi and LA with standard terminology.

Label maps (0 background, 1 LV cavity, 2 LV myocardium, 3 LA) become three segments:
``LV_endo`` = {1} (inside the endocardial border), ``LV_epi`` = {1, 2} (inside the epicardial
border, so it overlaps LV_endo) and ``LA`` = {3}. Masks lie on the frame's voxel grid (the
cine's proxy volume): voxel (i, j) is column i, row j, so arrays come back exactly as the engine
gave them. The model's output ("AI") is kept in its own hidden node; the user edits a copy
("corrected"); :func:`mask_provenance` tells them apart.
"""
from __future__ import annotations

import json
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import unquote
from xml.etree import ElementTree

import numpy as np
import slicer
import vtk
from EchoFMEngine.tasks import LABELS, STRUCTURE_LABELS
from vtk.util import numpy_support

from .scene import Logics, add_node, all_or_nothing, logics_for, write_node

_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
_REGION_CONTEXT = "Anatomic codes - DICOM master list"
_ANATOMY = ("123037004", "SCT", "Anatomical Structure")
SOURCE_ATTR = "EchoFM.maskSource"
PHASE_ATTR = "EchoFM.phase"
FRAME_ATTR = "EchoFM.frame"
AI_ROLE = "EchoFM.aiMask"
SOURCES = ("AI", "corrected")


def _terminology(type_code: tuple, region: tuple = ("", "", "")) -> str:
    """Slicer's serialized terminology entry (category Anatomical Structure, SNOMED-CT type)."""
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        _CONTEXT, *_ANATOMY, *type_code, "", "", "", _REGION_CONTEXT, *region, "", "", "")


@dataclass(frozen=True)
class SegmentSpec:
    """One segment: id/name, the label values it covers, colour (0-1 RGB), terminology, description."""

    name: str
    labels: tuple
    color: tuple
    terminology: str
    description: str


_LV = ("87878005", "SCT", "Left ventricle")
SEGMENTS = {
    "LV_endo": SegmentSpec("LV_endo", STRUCTURE_LABELS["lv_endo"], (152 / 255, 55 / 255, 13 / 255), _terminology(_LV),
                           "LV cavity inside the endocardial border"),
    "LV_epi": SegmentSpec("LV_epi", STRUCTURE_LABELS["lv_epi"], (128 / 255, 174 / 255, 128 / 255),
                          _terminology(("74281007", "SCT", "Myocardium"), _LV),
                          "LV inside the epicardial border (cavity + myocardium)"),
    "LA": SegmentSpec("LA", STRUCTURE_LABELS["la"], (203 / 255, 108 / 255, 81 / 255),
                      _terminology(("82471001", "SCT", "Left atrium")), "Left atrium"),
}
MAX_LABEL = LABELS[-1].value        # the engine's label vocabulary (EchoFMEngine.tasks)


# ----------------------------------------------------------------------------- geometry
def _geometry(reference):
    """Empty oriented image with the voxel grid of a volume node or of a segmentation's reference geometry."""
    out = slicer.vtkOrientedImageData()
    if reference is not None and reference.IsA("vtkMRMLVolumeNode"):
        img = reference.GetImageData()
        if img is None:
            raise ValueError(f"reference volume {reference.GetName()!r} has no image data")
        out.SetExtent(img.GetExtent())
        m = vtk.vtkMatrix4x4()
        reference.GetIJKToRASMatrix(m)
        out.SetImageToWorldMatrix(m)
        return out
    if reference is not None and reference.IsA("vtkMRMLSegmentationNode"):
        name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
        text = reference.GetSegmentation().GetConversionParameter(name)
        if text and slicer.vtkSegmentationConverter.DeserializeImageGeometry(text, out, False):
            return out
        raise ValueError(f"segmentation {reference.GetName()!r} has no reference geometry; pass the frame volume")
    raise ValueError(f"reference must be a volume or segmentation node, got {reference!r}")


def frame_shape(reference) -> tuple:
    """(H, W) of the voxel grid of ``reference`` (a single-slice volume or segmentation)."""
    ext = _geometry(reference).GetExtent()
    if ext[5] != ext[4]:
        raise ValueError(f"{reference.GetName()!r} has {ext[5] - ext[4] + 1} slices; masks are per 2D frame")
    return ext[3] - ext[2] + 1, ext[1] - ext[0] + 1


def _oriented(mask: np.ndarray, geometry) -> object:
    """A uint8 oriented image of ``mask`` [H, W] on ``geometry``'s grid."""
    out = slicer.vtkOrientedImageData()
    out.SetExtent(geometry.GetExtent())
    m = vtk.vtkMatrix4x4()
    geometry.GetImageToWorldMatrix(m)
    out.SetImageToWorldMatrix(m)
    data = numpy_support.numpy_to_vtk(np.ascontiguousarray(mask, dtype=np.uint8).ravel(), deep=True,
                                      array_type=vtk.VTK_UNSIGNED_CHAR)
    out.GetPointData().SetScalars(data)
    return out


def _check_labels(label_map, shape: tuple, what: str) -> np.ndarray:
    lab = np.asarray(label_map)
    if lab.shape != tuple(shape):
        raise ValueError(f"{what}: mask of size {lab.shape} does not match the frames {tuple(shape)} (H, W)")
    if not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool):
        if not np.all(np.mod(lab, 1) == 0):
            raise ValueError(f"{what}: mask holds non-integer values (dtype {lab.dtype})")
    bad = sorted(set(np.unique(lab).tolist()) - set(range(MAX_LABEL + 1)))
    if bad:
        raise ValueError(f"{what}: unexpected label value(s) {bad[:5]}; expected 0 background, 1 LV cavity, "
                         "2 LV myocardium, 3 LA")
    return lab.astype(np.uint8)


# ----------------------------------------------------------------------------- segments
def _fill(seg, lab: np.ndarray, geometry, source: str) -> None:
    segmentation = seg.GetSegmentation()
    for spec in SEGMENTS.values():
        if segmentation.GetSegment(spec.name) is None:
            segmentation.AddEmptySegment(spec.name, spec.name, spec.color)
        segment = segmentation.GetSegment(spec.name)
        segment.SetTerminology(spec.terminology)
        segment.SetTag("EchoFM.source", source)
        segment.SetTag("EchoFM.description", spec.description)
        set_segment_mask(seg, spec.name, np.isin(lab, spec.labels), geometry=geometry)


def _mark(seg, source: str, phase: Optional[str], frame: Optional[int]) -> None:
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    seg.SetAttribute(SOURCE_ATTR, source)
    if phase is not None:
        seg.SetAttribute(PHASE_ATTR, phase)
    if frame is not None:
        seg.SetAttribute(FRAME_ATTR, str(int(frame)))


def labels_to_segmentation(scene, label_map_2d, reference_volume, name: str, source: str = "AI",
                           phase: Optional[str] = None, frame: Optional[int] = None):
    """Segmentation node (LV_endo, LV_epi, LA) from one label map [H, W] on the frame volume's grid."""
    lab = _check_labels(label_map_2d, frame_shape(reference_volume), name)
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    with all_or_nothing(scene):
        seg = add_node(scene, "vtkMRMLSegmentationNode", name)
        seg.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        seg.CreateDefaultDisplayNodes()
        _fill(seg, lab, _geometry(reference_volume), source)
        _mark(seg, source, phase, frame)
        apply_source_style(seg)
    return seg


def apply_source_style(seg) -> None:
    """AI output as outlines only (thick, lighter colours), clinician-corrected masks filled and
    outlined: the two can be shown together and told apart ("Show the AI masks")."""
    display = seg.GetDisplayNode()
    if display is None:
        return
    ai = seg.GetAttribute(SOURCE_ATTR) == "AI"
    display.SetVisibility2DFill(not ai)
    display.SetVisibility2DOutline(True)
    display.SetOpacity2DFill(0.0 if ai else 0.4)
    display.SetOpacity2DOutline(1.0)
    display.SetSliceIntersectionThickness(3 if ai else 2)
    segmentation = seg.GetSegmentation()
    for spec in SEGMENTS.values():
        segment = segmentation.GetSegment(spec.name)
        if segment is not None:
            colour = np.asarray(spec.color, dtype=float)
            segment.SetColor(*(0.5 * colour + 0.5 if ai else colour))     # AI: halfway to white


def segment_mask(seg, segment_id: str, reference=None) -> np.ndarray:
    """bool [H, W] of one segment on the grid of ``reference`` (default: the segmentation's own)."""
    geometry = _geometry(reference if reference is not None else seg)
    if seg.GetSegmentation().GetSegment(segment_id) is None:
        raise KeyError(f"segmentation {seg.GetName()!r} has no segment {segment_id!r}")
    ext = geometry.GetExtent()
    shape = (ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
    raw = slicer.vtkOrientedImageData()
    seg.GetBinaryLabelmapRepresentation(segment_id, raw)
    r = raw.GetExtent()
    if r[0] > r[1] or r[2] > r[3] or r[4] > r[5] or raw.GetPointData().GetScalars() is None:
        return np.zeros(shape, dtype=bool)
    out = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(raw, _oriented(
        np.zeros(shape, np.uint8), geometry), out, False, False)
    d = out.GetDimensions()
    arr = numpy_support.vtk_to_numpy(out.GetPointData().GetScalars()).reshape(d[2], d[1], d[0])
    return arr[0] > 0


def set_segment_mask(seg, segment_id: str, mask, reference=None, geometry=None) -> None:
    """Replace one segment by ``mask`` [H, W] (bool), as an editor effect does (SetBinaryLabelmapToSegment)."""
    geometry = geometry if geometry is not None else _geometry(reference if reference is not None else seg)
    ext = geometry.GetExtent()
    m = np.asarray(mask)
    shape = (ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
    if m.shape != shape:
        raise ValueError(f"{seg.GetName()!r}/{segment_id}: mask of size {m.shape} does not match the frames {shape}")
    if seg.GetSegmentation().GetSegment(segment_id) is None:
        raise KeyError(f"segmentation {seg.GetName()!r} has no segment {segment_id!r}")
    ok = slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        _oriented(m > 0, geometry), seg, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE, ext)
    if not ok:
        raise RuntimeError(f"could not write segment {segment_id!r} of {seg.GetName()!r}")


def segmentation_to_labels(seg, reference=None) -> np.ndarray:
    """uint8 label map [H, W] (0 bg, 1 LV cavity, 2 myocardium, 3 LA) from the segments.

    Overlaps resolve as the anatomy nests: LV_endo over LV_epi over LA (LA drawn over the LV
    wall stays wall)."""
    geometry_ref = reference if reference is not None else seg
    masks = {name: segment_mask(seg, name, geometry_ref) if seg.GetSegmentation().GetSegment(name) else None
             for name in SEGMENTS}
    shape = next((m.shape for m in masks.values() if m is not None), None)
    if shape is None:
        raise ValueError(f"segmentation {seg.GetName()!r} has none of the segments {list(SEGMENTS)}")
    lab = np.zeros(shape, dtype=np.uint8)
    for name, value in (("LA", 3), ("LV_epi", 2), ("LV_endo", 1)):
        if masks[name] is not None:
            lab[masks[name]] = value
    return lab


# ----------------------------------------------------------------------------- sequences
def _frame_list(frames, n_frames: int) -> list:
    out = [int(f) for f in frames]
    if not out:
        raise ValueError("no frames given: list the frames that have masks")
    bad = [f for f in out if not 0 <= f < n_frames]
    if bad:
        raise ValueError(f"frame(s) {bad} outside the cine's {n_frames} frames")
    if len(set(out)) != len(out):
        raise ValueError(f"frames listed twice: {sorted(f for f in set(out) if out.count(f) > 1)}")
    return out


def _stack(labels, frames: list, n_frames: int, shape: tuple) -> list:
    lab = np.asarray(labels)
    if lab.ndim != 3:
        raise ValueError(f"label maps must be [T, H, W], got shape {lab.shape}")
    if lab.shape[0] == n_frames:
        picked = [lab[f] for f in frames]
    elif lab.shape[0] == len(frames):
        picked = list(lab)
    else:
        raise ValueError(f"label maps of shape {lab.shape}: expected {n_frames} frames (one per cine frame) "
                         f"or {len(frames)} (one per listed frame)")
    return [_check_labels(m, shape, f"mask of frame {f}") for m, f in zip(picked, frames)]


def masks_to_segmentation_sequence(scene, cine_nodes, labels, frames: Sequence[int],
                                   logics: Optional[Logics] = None, name: Optional[str] = None,
                                   source: str = "AI"):
    """Segmentation sequence in the cine's browser, one item per listed frame (sparse ED/ES or all).

    ``labels`` is [T, H, W] for the whole cine (or one map per listed frame). Frames without a
    mask show an empty segmentation. Returns the sequence node; its proxy is
    ``cine_nodes.browser.GetProxyNode(sequence)``."""
    logics = logics_for(scene, logics)
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    n = cine_nodes.num_frames
    frames = _frame_list(frames, n)
    shape = frame_shape(cine_nodes.proxy)
    maps = _stack(labels, frames, n, shape)
    frames, maps = zip(*sorted(zip(frames, maps), key=lambda p: p[0]))  # items are kept in time order
    frames = list(frames)
    geometry = _geometry(cine_nodes.proxy)
    name = name or f"{cine_nodes.sequence.GetName()} masks ({source})"
    with all_or_nothing(scene):
        seq = add_node(scene, "vtkMRMLSequenceNode", name)
        seq.SetIndexName(cine_nodes.sequence.GetIndexName())
        seq.SetIndexUnit(cine_nodes.sequence.GetIndexUnit())
        seq.SetIndexType(cine_nodes.sequence.GetIndexType())
        work = add_node(scene, "vtkMRMLSegmentationNode", f"{name} item")
        work.SetReferenceImageGeometryParameterFromVolumeNode(cine_nodes.proxy)
        for f, lab in zip(frames, maps):
            work.GetSegmentation().RemoveAllSegments()
            _fill(work, lab, geometry, source)
            seq.SetDataNodeAtValue(work, cine_nodes.sequence.GetNthIndexValue(f))
        scene.RemoveNode(work)
        seq.SetAttribute("EchoFM.role", "segmentation")
        seq.SetAttribute(SOURCE_ATTR, source)
        seq.SetAttribute("EchoFM.frames", json.dumps(frames))
        storage = add_node(scene, "vtkMRMLSequenceStorageNode", f"{name} storage")
        seq.SetAndObserveStorageNodeID(storage.GetID())
        browser = cine_nodes.browser
        browser.AddSynchronizedSequenceNode(seq)
        browser.SetSaveChanges(seq, False)
        browser.SetMissingItemMode(seq, slicer.vtkMRMLSequenceBrowserNode.MissingItemSetToDefault)
        logics.update_proxies(browser)
        proxy = browser.GetProxyNode(seq)
        if proxy is not None:
            proxy.SetName(name)
            proxy.SetAttribute(SOURCE_ATTR, source)
    return seq


def sequence_frames(seq) -> list:
    """Cine frame indices of the items of a segmentation sequence made here."""
    return json.loads(seq.GetAttribute("EchoFM.frames") or "[]")


def ed_es_segmentations(scene, cine_nodes, labels, ed_frame: int, es_frame: int,
                        logics: Optional[Logics] = None) -> tuple:
    """Editable ED and ES segmentation nodes ("corrected", shown) and hidden AI copies behind them.

    ``labels`` is [T, H, W] (the engine's masks). Each corrected node references its AI copy
    (:func:`ai_copy`). Returns ``(ed_node, es_node)``."""
    n = cine_nodes.num_frames
    shape = frame_shape(cine_nodes.proxy)
    lab = np.asarray(labels)
    if lab.shape != (n, *shape):
        raise ValueError(f"label maps of shape {lab.shape} do not match the cine {(n, *shape)} [T, H, W]")
    _frame_list([ed_frame, es_frame], n)
    for f in (ed_frame, es_frame):
        _check_labels(lab[f], shape, f"mask of frame {f}")
    base = cine_nodes.sequence.GetName()
    out = []
    with all_or_nothing(scene):
        for phase, f in (("ED", int(ed_frame)), ("ES", int(es_frame))):
            ai = labels_to_segmentation(scene, lab[f], cine_nodes.proxy, f"{base} {phase} (AI)", "AI", phase, f)
            ai.GetDisplayNode().SetVisibility(False)
            fixed = labels_to_segmentation(scene, lab[f], cine_nodes.proxy, f"{base} {phase}", "corrected", phase, f)
            fixed.SetNodeReferenceID(AI_ROLE, ai.GetID())
            out.append(fixed)
    return tuple(out)


def ai_copy(seg):
    """The hidden AI-output node behind an editable ED/ES segmentation (None if it has none)."""
    return seg.GetNodeReference(AI_ROLE)


def mask_provenance(seg, reference=None) -> dict:
    """Whether an ED/ES segmentation is still the model's output or was corrected, and how much.

    ``source`` is "corrected" when any segment differs from the AI copy, "AI" when none does (and
    for an AI node itself); ``changed_pixels`` per segment."""
    ai = ai_copy(seg)
    frame = seg.GetAttribute(FRAME_ATTR)
    info = {"phase": seg.GetAttribute(PHASE_ATTR), "frame": int(frame) if frame is not None else None}
    if ai is None:
        info.update(source=seg.GetAttribute(SOURCE_ATTR) or "AI", changed_pixels={})
        return info
    ref = reference if reference is not None else seg
    changed = {name: int(np.count_nonzero(segment_mask(seg, name, ref) != segment_mask(ai, name, ref)))
               for name in SEGMENTS if seg.GetSegmentation().GetSegment(name) is not None}
    info.update(source="corrected" if any(changed.values()) else "AI", changed_pixels=changed)
    return info


def configure_segment_editor(editor_node) -> None:
    """Editor settings for these masks: segments may overlap (LV_epi contains LV_endo), so painting
    one segment must not erase the others."""
    editor_node.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)


# ----------------------------------------------------------------------------- files
def save_segmentation(seg, path) -> Path:
    """Write a segmentation node as ``.seg.nrrd`` (readable with slicerio)."""
    return write_node(seg, path, ".seg.nrrd", "vtkMRMLSegmentationStorageNode", "segmentation")


def save_segmentation_sequence(seq, path) -> Path:
    """Write a segmentation sequence as ``.seq.mrb`` (Slicer's sequence bundle: one .seg.nrrd per item)."""
    return write_node(seq, path, ".seq.mrb", "vtkMRMLSequenceStorageNode", "segmentation sequence")


def read_segmentation_sequence_mrb(path) -> list:
    """``[(index value, slicerio segmentation dict), ...]`` from a ``.seq.mrb``, without Slicer."""
    import slicerio  # deferred: slicerio is optional (the test extra); only reading .seq.mrb without Slicer needs it

    with zipfile.ZipFile(path) as z, tempfile.TemporaryDirectory() as tmp:
        z.extractall(tmp)
        mrml = Path(tmp) / next(n for n in z.namelist() if n.endswith(".mrml"))
        root = ElementTree.parse(mrml).getroot()
        nodes = {el.get("id"): el for el in root if el.get("id")}
        seq = next((el for el in root if el.tag == "Sequence"), None)
        if seq is None:
            raise ValueError(f"{path}: no sequence in the bundle")
        out = []
        for entry in filter(None, (seq.get("indexValues") or "").split(";")):
            node_id, _, index = entry.partition(":")
            refs = dict(r.split(":", 1) for r in filter(None, (nodes[node_id].get("references") or "").split(";")))
            storage = nodes[refs["storage"]]
            seg_file = mrml.parent / unquote(storage.get("fileName"))
            out.append((unquote(index), slicerio.read_segmentation(str(seg_file))))
    return out
