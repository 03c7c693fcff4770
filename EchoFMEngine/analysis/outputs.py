"""Files an analysis writes: ``result.json``, ``masks.nrrd``, ``summary.png`` and a CSV row per study."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Optional

import numpy as np

CSV_COLUMNS = ["study_id", "input", "view", "view_probability", "phase_method", "heart_rate_bpm",
               "ed_frames", "es_frames", "unit", "edv", "esv", "ef_percent", "la_volume",
               "ef_regression_percent", "as_label", "flags", "needs"]


def study_id(name: str, taken: set) -> str:
    """A folder name from the input's file name (no directories), unique within one run."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name)
    for suffix in (".nii.gz", ".seq.nrrd"):
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    else:
        base = base.rsplit(".", 1)[0] if "." in base[1:] else base
    base = base.strip("._") or "study"
    out, k = base, 2
    while out in taken:
        out, k = f"{base}_{k}", k + 1
    taken.add(out)
    return out


def write_masks_nrrd(masks: np.ndarray, spacing_mm: Optional[tuple], path: Path) -> Path:
    """Label maps ``[T, H, W]`` as a 3D NRRD (axes col, row, frame; spacing in mm when known)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(masks, dtype=np.uint8))
    if spacing_mm and all(np.isfinite(float(s)) and float(s) > 0 for s in spacing_mm[:2]):
        img.SetSpacing((float(spacing_mm[1]), float(spacing_mm[0]), 1.0))
    img.SetMetaData("echofm_labels", "0 background, 1 LV cavity, 2 LV myocardium, 3 LA")
    img.SetMetaData("echofm_axes", "col,row,frame")
    sitk.WriteImage(img, str(path), useCompression=True)
    return path


def read_masks_nrrd(path) -> np.ndarray:
    """Inverse of :func:`write_masks_nrrd`: ``[T, H, W]`` uint8."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.uint8)


def csv_row(sid: str, result: dict) -> dict:
    m = result.get("measurements") or {}
    view = result.get("view") or {}
    phase = result.get("phase") or {}
    scores = result.get("scores") or {}

    def num(v):
        return "" if v is None else round(float(v), 3)
    return {
        "study_id": sid, "input": result["input"], "view": view.get("label", ""),
        "view_probability": num(max(view["probabilities"].values())) if view else "",
        "phase_method": phase.get("method", ""), "heart_rate_bpm": num(phase.get("heart_rate_bpm")),
        "ed_frames": " ".join(map(str, phase.get("ed_frames", []))),
        "es_frames": " ".join(map(str, phase.get("es_frames", []))),
        "unit": m.get("unit", ""), "edv": num(m.get("edv")), "esv": num(m.get("esv")),
        "ef_percent": num(m.get("ef_percent")), "la_volume": num(m.get("la_volume")),
        "ef_regression_percent": num((scores.get("ef_regression") or {}).get("ef_percent")),
        "as_label": (scores.get("as") or {}).get("label", ""),
        "flags": "; ".join(result.get("flags", [])), "needs": "; ".join(sorted(result.get("needs", {}))),
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
    import os

    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())


def write_study(result, out: Path, sid: str, cine=None, summary: bool = True) -> Path:
    """Write one study's folder ``out/sid`` and return it: complete or absent, never half written
    (everything goes to a hidden staging folder that is renamed onto ``out/sid`` at the end)."""
    import os
    import shutil

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folder = out / sid
    stage = out / f".{sid}.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        d = result.to_dict()
        d["study_id"] = sid
        if result.masks is not None:
            write_masks_nrrd(result.masks, (cine.spacing_mm if cine is not None else None), stage / "masks.nrrd")
            d["segmentation"]["file"] = "masks.nrrd"
        if summary and cine is not None:
            from .summary import summary_figure

            summary_figure(cine, result, stage / "summary.png")
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
    import io

    from ..atomic import atomic_write_text

    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())
    return Path(path)
