"""Corrections become training data: an export folder the fine-tuning configs read, and a report.

Layout (``EchoFMEngine.data.build_dataset("csv", folder)`` reads it; ``dataset.csv`` is the
folder's only CSV)::

    folder/dataset.csv                       path,split,view,mask_path,mask_frames,ed_source,es_source,...
    folder/studies/<study_id>/cine.npz       frames [T,H,W,3] uint8, fps, frame_times_s, spacing_mm
    folder/studies/<study_id>/masks.nrrd     label maps [2,H,W] uint8 (ED then ES, as in mask_frames)
    folder/studies/<study_id>/report.json, report.csv   (when measurements are given)

Study IDs come from a hash of the pixels: no names, IDs, dates or file names of the patient.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from EchoFMEngine.cine import Cine

from .segmentation_nodes import MAX_LABEL, SOURCES
from EchoFMEngine import __version__

DATASET_CSV = "dataset.csv"
COLUMNS = ["path", "split", "view", "mask_path", "mask_frames", "ed_source", "es_source", "study_id",
           "ed_frame", "es_frame", "mask_sources"]
FRAME_SOURCES = ("corrected", "propagated", "model")   # per-frame source of a propagated export
REPORT_FORMAT = "echofm-slicer-report-v1"


def study_key(cine: Cine) -> str:
    """An anonymous, stable study ID: a hash of the frames (the same cine always gets the same ID)."""
    h = hashlib.sha1(np.ascontiguousarray(cine.frames).tobytes()).hexdigest()[:12]
    return f"study_{h}"


def _labels(lab, shape: tuple, what: str) -> np.ndarray:
    a = np.asarray(lab)
    if a.shape != tuple(shape):
        raise ValueError(f"{what} mask of size {a.shape} does not match the frames {tuple(shape)} (H, W)")
    if a.size and (a.min() < 0 or a.max() > MAX_LABEL or not np.all(np.mod(a, 1) == 0)):
        raise ValueError(f"{what} mask holds values outside the labels 0..{MAX_LABEL}")
    return a.astype(np.uint8)


def _sources(source) -> dict:
    src = dict(source) if isinstance(source, dict) else {"ED": source, "ES": source}
    for phase in ("ED", "ES"):
        if src.get(phase) not in SOURCES:
            raise ValueError(f"mask source of {phase} must be one of {SOURCES}, got {src.get(phase)!r}")
    return src


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_masks(path: Path, stack: np.ndarray, spacing_mm) -> None:
    import SimpleITK as sitk  # deferred: SimpleITK is slow to import; only writing label maps needs it

    img = sitk.GetImageFromArray(np.ascontiguousarray(stack, dtype=np.uint8))
    if spacing_mm:
        img.SetSpacing((float(spacing_mm[1]), float(spacing_mm[0]), 1.0))
    img.SetMetaData("echofm_labels", "0 background, 1 LV cavity, 2 LV myocardium, 3 LA")
    img.SetMetaData("echofm_axes", "col,row,mask (ED, ES)")
    tmp = path.with_name(path.name.replace(".nrrd", ".tmp.nrrd"))
    sitk.WriteImage(img, str(tmp), useCompression=True)
    os.replace(tmp, path)


def _write_cine(path: Path, cine: Cine) -> None:
    def write(tmp):
        arrays = {"frames": cine.frames, "fps": np.float64(cine.fps), "frame_times_s": cine.frame_times_s}
        if cine.spacing_mm:
            arrays["spacing_mm"] = np.asarray(cine.spacing_mm, dtype=np.float64)
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    _write_atomic(path, write)


def _read_rows(csv_path: Path) -> list:
    if not csv_path.exists():
        return []
    with open(csv_path, newline="") as fh:
        return list(csv.DictReader(fh))


def export_training_folder(folder, cine: Cine, ed_labels, es_labels, ed_frame: int, es_frame: int,
                           view: Optional[str] = None, source: Union[str, dict] = "corrected", *,
                           study_id: Optional[str] = None, split: str = "train",
                           measurements: Optional[dict] = None) -> Path:
    """Add (or replace) one study in the training folder; returns the path of ``dataset.csv``.

    ``source`` says whose masks these are: "corrected" / "AI", or ``{"ED": ..., "ES": ...}``.
    With ``measurements`` (from :func:`measure_from_segmentations`) the study's report is written too.
    Everything is checked before anything is written."""
    if not isinstance(cine, Cine):
        raise ValueError(f"export needs an EchoFMEngine Cine, got {type(cine).__name__}")
    T, H, W = cine.shape
    ed_frame, es_frame = int(ed_frame), int(es_frame)
    for what, f in (("ED", ed_frame), ("ES", es_frame)):
        if not 0 <= f < T:
            raise ValueError(f"{what} frame {f} outside the cine's {T} frames")
    if ed_frame == es_frame:
        raise ValueError(f"ED and ES are the same frame ({ed_frame})")
    stack = np.stack([_labels(ed_labels, (H, W), "ED"), _labels(es_labels, (H, W), "ES")])
    src = _sources(source)
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    sid = study_id or study_key(cine)
    if not sid.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"study_id {sid!r}: use letters, digits, '_' and '-' only")

    folder = Path(folder)
    study = folder / "studies" / sid
    study.mkdir(parents=True, exist_ok=True)
    _write_cine(study / "cine.npz", cine)
    _write_masks(study / "masks.nrrd", stack, cine.spacing_mm)
    row = {"path": f"studies/{sid}/cine.npz", "split": split, "view": view or "",
           "mask_path": f"studies/{sid}/masks.nrrd", "mask_frames": f"{ed_frame};{es_frame}",
           "ed_source": src["ED"], "es_source": src["ES"], "study_id": sid,
           "ed_frame": ed_frame, "es_frame": es_frame}
    csv_path = _put_row(folder, row)
    if measurements is not None:
        masks = measurements.get("masks") or {}
        masks = {p: {**masks.get(p, {}), "frame": f, "source": src[p]} for p, f in (("ED", ed_frame), ("ES", es_frame))}
        write_report(study, measurements, study_id=sid, cine=cine, view=view, masks=masks)
    return csv_path


def _put_row(folder, row: dict) -> Path:
    """Add (or replace, by path) one study's row in ``dataset.csv``, written atomically."""
    csv_path = Path(folder) / DATASET_CSV
    rows = [r for r in _read_rows(csv_path) if r.get("path") != row["path"]] + [row]

    def write(tmp):
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    _write_atomic(csv_path, write)
    return csv_path


def export_propagated_study(folder, cine: Cine, labels, frame_sources, view: Optional[str] = None, *,
                            propagated: str = "include", ed_frame: Optional[int] = None,
                            es_frame: Optional[int] = None, study_id: Optional[str] = None,
                            split: str = "train") -> Path:
    """Add (or replace) one study with masks on many frames (``labels`` [T, H, W]) and a per-frame
    source (``corrected`` / ``propagated`` / ``model``, "AI" counts as model) in the column
    ``mask_sources``; ``propagated="exclude"`` keeps only the corrected and model frames, so that
    fine-tuning learns from people's outlines alone. Returns the path of ``dataset.csv``."""
    if not isinstance(cine, Cine):
        raise ValueError(f"export needs an EchoFMEngine Cine, got {type(cine).__name__}")
    T, H, W = cine.shape
    lab = np.asarray(labels)
    if lab.shape != (T, H, W):
        raise ValueError(f"label maps of shape {lab.shape} do not match the cine {(T, H, W)} [T, H, W]")
    src = ["model" if s == "AI" else s for s in frame_sources]
    if len(src) != T:
        raise ValueError(f"{len(src)} frame sources for a cine of {T} frames")
    bad = sorted({s for s in src if s not in FRAME_SOURCES + ("",)})
    if bad:
        raise ValueError(f"unknown frame source(s) {bad}; expected one of {FRAME_SOURCES}")
    if propagated not in ("include", "exclude"):
        raise ValueError(f"propagated must be 'include' or 'exclude', got {propagated!r}")
    keep = [f for f in range(T) if src[f] and (propagated == "include" or src[f] != "propagated")]
    if not keep:
        raise ValueError("no frame left to export (every masked frame is propagated and propagated='exclude')")
    stack = np.stack([_labels(lab[f], (H, W), f"frame {f}") for f in keep])
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    sid = study_id or study_key(cine)
    if not sid.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"study_id {sid!r}: use letters, digits, '_' and '-' only")
    study = Path(folder) / "studies" / sid
    study.mkdir(parents=True, exist_ok=True)
    _write_cine(study / "cine.npz", cine)
    _write_masks(study / "masks.nrrd", stack, cine.spacing_mm)
    row = {"path": f"studies/{sid}/cine.npz", "split": split, "view": view or "",
           "mask_path": f"studies/{sid}/masks.nrrd", "mask_frames": ";".join(map(str, keep)),
           "ed_source": src[ed_frame] if ed_frame is not None else "",
           "es_source": src[es_frame] if es_frame is not None else "", "study_id": sid,
           "ed_frame": "" if ed_frame is None else int(ed_frame), "es_frame": "" if es_frame is None else int(es_frame),
           "mask_sources": ";".join(src[f] for f in keep)}
    csv_path = _put_row(folder, row)
    return csv_path


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def write_report(folder, measurements: dict, *, study_id: str = "study", cine: Optional[Cine] = None,
                 view: Optional[str] = None, phase: Optional[dict] = None, masks: Optional[dict] = None) -> tuple:
    """``report.json`` + ``report.csv`` in ``folder``: the measurements and, per ED/ES mask, whether it
    is the model's output ("AI") or "corrected". Technical facts only (no patient data, no file names)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    masks = masks if masks is not None else (measurements.get("masks") or {})
    for p, info in masks.items():
        if info.get("source") not in SOURCES:
            raise ValueError(f"mask {p}: source must be one of {SOURCES}, got {info.get('source')!r}")

    report = {"format": REPORT_FORMAT, "study_id": study_id, "engine_version": __version__,
              "view": view, "phase": phase, "masks": masks,
              "measurements": {k: v for k, v in measurements.items() if k != "masks"}}
    if cine is not None:
        T, H, W = cine.shape
        report["cine"] = {"frames": T, "height": H, "width": W, "fps": round(float(cine.fps), 6),
                          "spacing_mm": list(cine.spacing_mm) if cine.spacing_mm else None,
                          "has_ecg": cine.ecg is not None}
    json_path = folder / "report.json"
    _write_atomic(json_path, lambda tmp: tmp.write_text(json.dumps(report, indent=2, default=_json_value)))

    unit = measurements.get("unit", "")
    ed, es = masks.get("ED", {}), masks.get("ES", {})
    items = [("EDV", measurements.get("edv"), unit), ("ESV", measurements.get("esv"), unit),
             ("EF", measurements.get("ef_percent"), "%"), ("LA volume", measurements.get("la_volume"), unit)]
    csv_path = folder / "report.csv"

    def write(tmp):
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["study_id", "measurement", "value", "unit", "ed_frame", "es_frame",
                        "ed_mask_source", "es_mask_source"])
            for name, value, u in items:
                w.writerow([study_id, name, "" if value is None else f"{float(value):.6g}", u,
                            ed.get("frame", ""), es.get("frame", ""), ed.get("source", ""), es.get("source", "")])
    _write_atomic(csv_path, write)
    return json_path, csv_path
