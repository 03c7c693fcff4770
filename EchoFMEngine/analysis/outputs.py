"""Files an analysis writes: ``result.json``, ``masks.nrrd``, ``summary.png`` and a CSV row per study.

No identifiers: study ids are derived (a counter and a short hash of the file's content, never its
name), ``input`` holds that id, DICOM tags are never copied, and the mapping from ids to input paths
is written only on request (``paths.csv``, ``--keep-paths``).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from ..tasks import LABEL_TEXT
from ..atomic import atomic_write_text
from .summary import summary_figure

CSV_COLUMNS = ["study_id", "input", "view", "view_probability", "phase_method", "heart_rate_bpm",
               "ed_frames", "es_frames", "unit", "edv", "esv", "ef_percent", "la_volume",
               "ef_regression_percent", "as_label", "flags", "unreliable", "needs", "models"]
PATHS_FILE = "paths.csv"


def _content_hash(path) -> str:
    """8 hex digits of SHA-256 over the file's size and first 1 MiB (its name plays no part)."""
    h = hashlib.sha256()
    p = Path(path)
    try:
        h.update(str(p.stat().st_size).encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
    except OSError:            # not a readable file: the id still must not show the name
        h.update(b"unreadable")
    return h.hexdigest()[:8]


def study_id(path, taken: set) -> str:
    """A derived study id ``sNNNN-hhhhhhhh``: a counter in input order and a short hash of the file's
    content. Unique within one run; the file name never appears in it."""
    k = len(taken) + 1
    out = f"s{k:04d}-{_content_hash(path)}"
    while out in taken:
        k += 1
        out = f"s{k:04d}-{_content_hash(path)}"
    taken.add(out)
    return out


def write_paths(items, out: Path) -> Path:
    """``paths.csv`` (study_id, input path) in ``out``: written only when the user asks (``--keep-paths``)."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["study_id", "input"])
    for path, sid in items:
        w.writerow([sid, str(Path(path).resolve())])
    path = Path(out) / PATHS_FILE
    atomic_write_text(path, buf.getvalue())
    return path


def write_masks_nrrd(masks: np.ndarray, spacing_mm: Optional[tuple], path: Path) -> Path:
    """Label maps ``[T, H, W]`` as a 3D NRRD (axes col, row, frame; spacing in mm when known)."""
    import SimpleITK as sitk  # deferred: SimpleITK is slow to import, needed only to write masks

    img = sitk.GetImageFromArray(np.ascontiguousarray(masks, dtype=np.uint8))
    if spacing_mm and all(np.isfinite(float(s)) and float(s) > 0 for s in spacing_mm[:2]):
        img.SetSpacing((float(spacing_mm[1]), float(spacing_mm[0]), 1.0))
    img.SetMetaData("echofm_labels", LABEL_TEXT)
    img.SetMetaData("echofm_axes", "col,row,frame")
    sitk.WriteImage(img, str(path), useCompression=True)
    return path


def read_masks_nrrd(path) -> np.ndarray:
    """Inverse of :func:`write_masks_nrrd`: ``[T, H, W]`` uint8."""
    import SimpleITK as sitk  # deferred: SimpleITK, as above

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.uint8)


def csv_row(sid: str, result: dict) -> dict:
    m = result.get("measurements") or {}
    view = result.get("view") or {}
    phase = result.get("phase") or {}
    scores = result.get("scores") or {}

    def num(v):
        return "" if v is None else round(float(v), 3)
    reliable = m.get("reliable") or {}
    unreliable = [k for k in ("edv", "esv", "ef_percent", "la_volume") if reliable.get(k) is False]
    if phase and phase.get("heart_rate_reliable") is False:
        unreliable.insert(0, "heart_rate_bpm")
    flags = [f"{f.get('name', '')}: {f.get('reason', '')}" if isinstance(f, dict) else str(f)
             for f in result.get("flags", [])]
    models = (result.get("provenance") or {}).get("models") or {}
    return {
        "study_id": sid, "input": sid, "view": view.get("label", ""),
        "view_probability": num(max(view["probabilities"].values())) if view else "",
        "phase_method": phase.get("method", ""), "heart_rate_bpm": num(phase.get("heart_rate_bpm")),
        "ed_frames": " ".join(map(str, phase.get("ed_frames", []))),
        "es_frames": " ".join(map(str, phase.get("es_frames", []))),
        "unit": m.get("unit", ""), "edv": num(m.get("edv")), "esv": num(m.get("esv")),
        "ef_percent": num(m.get("ef_percent")), "la_volume": num(m.get("la_volume")),
        "ef_regression_percent": num((scores.get("ef_regression") or {}).get("ef_percent")),
        "as_label": (scores.get("as") or {}).get("label", ""),
        "flags": "; ".join(flags), "unreliable": " ".join(unreliable),
        "needs": "; ".join(sorted(result.get("needs", {}))),
        "models": " ".join(f"{t}:{(p or {}).get('sha256') or 'unknown'}"[:len(t) + 13]
                           + (":phantom-trained" if (p or {}).get("trained_on_phantoms") else "")
                           for t, p in sorted(models.items())),
    }


def _finite(v):
    """JSON without bare NaN/Infinity (not valid JSON): non-finite numbers become null."""
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())


def write_study(result, out: Path, sid: str, cine=None, summary: bool = True) -> Path:
    """Write one study's folder ``out/sid`` and return it: complete or absent, never half written
    (everything goes to a hidden staging folder that is renamed onto ``out/sid`` at the end)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folder = out / sid
    stage = out / f".{sid}.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        result.study_id = result.input = sid
        d = result.to_dict()
        if result.masks is not None:
            write_masks_nrrd(result.masks, (cine.spacing_mm if cine is not None else None), stage / "masks.nrrd")
            d["segmentation"]["file"] = "masks.nrrd"
        if summary and cine is not None:
            summary_figure(cine, result, stage / "summary.png")
        if summary and result.phase_view is not None:
            from ..clinical.phase_strip import save_phase_strip  # deferred: phase_strip loads matplotlib

            save_phase_strip(*result.phase_view, stage / "phase.png", title=sid)
        (stage / "result.json").write_text(json.dumps(_finite(d), indent=2, allow_nan=False))
        _fsync_tree(stage)
        if folder.exists():
            old = out / f".{sid}.old.tmp-{os.getpid()}"
            os.replace(folder, old)
            os.replace(stage, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, folder)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return folder


def write_csv(rows: list, path: Path) -> Path:
    """``results.csv`` written whole, atomically (temporary name + rename)."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())
    return Path(path)
