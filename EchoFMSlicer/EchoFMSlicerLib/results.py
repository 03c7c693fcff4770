"""An analysis result folder (``python -m EchoFMEngine analyze``) shown in the scene.

Reads ``result.json`` and ``masks.nrrd`` of one study (contract: label maps [T, H, W] in the
cine's own pixel geometry) and makes the segmentation sequence, the ED/ES segmentation nodes
(AI copy + editable copy), the measurements table and the LV volume plot. All or nothing: a
result that does not fit the cine leaves the scene untouched.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
from EchoFMEngine.clinical.propagate import read_label_volume

from .cine_nodes import CineNodes
from .ecg_nodes import frame_marker_time
from .measurements import measurements_table, volume_curve_plot
from .scene import Logics, all_or_nothing, logics_for
from .segmentation_nodes import ed_es_segmentations, masks_to_segmentation_sequence


def read_analysis_result(result_folder) -> dict:
    """``result.json`` of one study folder (ValueError naming the file when missing or not JSON)."""
    path = Path(result_folder) / "result.json"
    if not path.is_file():
        raise ValueError(f"{path}: no result.json (not an analysis result folder)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(d, dict) or "cine" not in d:
        raise ValueError(f"{path}: missing the 'cine' section of an analysis result")
    return d


def read_masks(path) -> np.ndarray:
    """Label maps [T, H, W] uint8 of a ``masks.nrrd`` (the engine's reader: labels checked, errors
    name the file)."""
    return read_label_volume(path)


def flag_lines(d: dict) -> list:
    """The result's flags as ``"name: reason"`` lines (the checks that failed; show them first, in red)."""
    out = []
    for f in d.get("flags") or []:
        out.append(f"{f.get('name', 'flag')}: {f.get('reason', '')}" if isinstance(f, dict) else str(f))
    return out


def unreliable_measurements(d: dict) -> dict:
    """``{measurement: [flag names]}`` for each number a failed check makes unreliable."""
    m = d.get("measurements") or {}
    rel, why = m.get("reliable") or {}, m.get("unreliable_because") or {}
    out = {k: list(why.get(k, [])) for k, ok in rel.items() if ok is False}
    if (d.get("phase") or {}).get("heart_rate_reliable") is False:
        out["heart_rate_bpm"] = [f.get("name") for f in d.get("flags") or [] if isinstance(f, dict)][:3]
    return out


def _check_cine(d: dict, cine_nodes: CineNodes, where: Path) -> None:
    c = d.get("cine") or {}
    want = (c.get("frames"), c.get("height"), c.get("width"))
    have = (cine_nodes.num_frames, *cine_nodes.frame_shape)
    if tuple(want) != tuple(have):
        raise ValueError(f"{where}: result is for a cine of {want} (frames, height, width) but the selected "
                         f"cine is {have}: pick the cine that was analysed")


def _pair(d: dict, segmented: list) -> Optional[tuple]:
    """The ED/ES frames to correct: the first measured cycle, else the first segmented ED and ES."""
    cycles = (d.get("measurements") or {}).get("cycles") or []
    for c in cycles:
        if c.get("ed_frame") in segmented and c.get("es_frame") in segmented:
            return int(c["ed_frame"]), int(c["es_frame"])
    phase = d.get("phase") or {}
    ed = [f for f in phase.get("ed_frames", []) if f in segmented]
    es = [f for f in phase.get("es_frames", []) if f in segmented]
    return (int(ed[0]), int(es[0])) if ed and es else None


def apply_analysis_result(scene, cine_nodes: CineNodes, result_folder, logics: Optional[Logics] = None) -> dict:
    """Nodes for one analysed study. Returns ``result`` (the JSON), ``view``, ``phase``, ``scores``,
    ``flags``, ``needs``, ``segmentation_sequence``, ``ed_segmentation``, ``es_segmentation``,
    ``measurements_table``, ``volume_plot`` (None where the result has nothing for it), ``notes``;
    ``flags`` are ``"name: reason"`` lines, ``unreliable`` maps each unreliable number to its flags and
    ``provenance`` says which models and methods made the result."""
    logics = logics_for(scene, logics)
    folder = Path(result_folder)
    d = read_analysis_result(folder)
    _check_cine(d, cine_nodes, folder / "result.json")
    out = {"result": d, "view": d.get("view"), "phase": d.get("phase"), "scores": d.get("scores"),
           "flags": flag_lines(d), "unreliable": unreliable_measurements(d), "provenance": d.get("provenance") or {},
           "needs": d.get("needs", {}), "segmentation_sequence": None,
           "ed_segmentation": None, "es_segmentation": None, "measurements_table": None, "volume_plot": None,
           "notes": []}
    seg = d.get("segmentation")
    labels = None
    if seg:
        mask_path = folder / seg.get("file", "masks.nrrd")
        labels = read_masks(mask_path)
        expected = (cine_nodes.num_frames, *cine_nodes.frame_shape)
        if labels.shape != expected:
            raise ValueError(f"{mask_path}: masks of shape {labels.shape} do not match the cine {expected} "
                             "(frames, height, width)")
        segmented = [int(f) for f in seg.get("frames", [])] or \
            [t for t in range(labels.shape[0]) if labels[t].any()]
    name = cine_nodes.sequence.GetName()
    with all_or_nothing(scene):
        if labels is not None and segmented:
            seq = masks_to_segmentation_sequence(scene, cine_nodes, labels, segmented, logics)
            seq.SetAttribute("EchoFM.resultSource", str(seg.get("source", "model")))
            out["segmentation_sequence"] = seq
            pair = _pair(d, segmented)
            if pair:
                out["ed_segmentation"], out["es_segmentation"] = ed_es_segmentations(
                    scene, cine_nodes, labels, pair[0], pair[1], logics)
            else:
                out["notes"].append("no segmented ED and ES frame pair in the result: no ED/ES masks to correct")
        m = d.get("measurements")
        if m:
            out["measurements_table"] = measurements_table(scene, m, f"{name} measurements (AI)")
            note = out["measurements_table"].GetTable().GetColumnByName("note")
            rows = {"edv": 0, "esv": 1, "ef_percent": 2, "la_volume": 3}
            for key, why in out["unreliable"].items():     # the table says which numbers not to trust
                out["measurements_table"].SetAttribute(f"EchoFM.unreliable.{key}", ", ".join(why) or "failed check")
                if key in rows and note is not None and rows[key] < note.GetNumberOfValues():
                    note.SetValue(rows[key], "UNRELIABLE: " + (", ".join(why) or "failed check"))
            if out["flags"]:
                out["measurements_table"].SetAttribute("EchoFM.flags", "\n".join(out["flags"]))
            vols = m.get("lv_volume") or []
            if len(vols) == cine_nodes.num_frames and any(v is not None for v in vols):
                times = np.asarray([frame_marker_time(cine_nodes.browser, i) for i in range(cine_nodes.num_frames)])
                out["volume_plot"] = volume_curve_plot(scene, times, vols, f"{name} LV volume",
                                                       m.get("unit", "ml"))
    return out
