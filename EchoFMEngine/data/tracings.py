"""EchoNet-Dynamic ``VolumeTracings.csv``: LV tracings -> masks, disc volumes, ED/ES frames.

Per traced frame the first row is the LV long axis and the following rows are
chords perpendicular to it (method of discs). The cavity outline runs along the
(X1, Y1) ends of the chords and back along the (X2, Y2) ends.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from skimage.draw import polygon as draw_polygon

COLUMNS = ("FileName", "X1", "Y1", "X2", "Y2", "Frame")


def video_key(name: str) -> str:
    """FileName as used for matching (EchoNet lists it with or without '.avi')."""
    name = str(name).strip()
    return name[:-4] if name.lower().endswith(".avi") else name


def read_volume_tracings(path) -> dict[str, dict[int, np.ndarray]]:
    """Parse the CSV into {video key: {frame: [K, 4] float (X1, Y1, X2, Y2)}} in file order."""
    path = Path(path)
    try:
        df = pd.read_csv(path)
    except Exception as exc:  # pandas raises several types for unreadable CSVs
        raise ValueError(f"{path}: cannot read tracings CSV ({exc})") from exc
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {list(COLUMNS)}")
    coords = df[["X1", "Y1", "X2", "Y2"]].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    frames = pd.to_numeric(df["Frame"], errors="coerce").to_numpy()
    bad = np.flatnonzero(~np.isfinite(coords).all(axis=1) | ~np.isfinite(frames))
    if bad.size:
        row = int(bad[0])
        raise ValueError(f"{path}: row {row + 2}: non-numeric coordinate or frame in {df.iloc[row].tolist()}")
    out: dict[str, dict[int, list]] = {}
    for name, frame, xy in zip(df["FileName"].astype(str), frames.astype(int), coords):
        out.setdefault(video_key(name), {}).setdefault(int(frame), []).append(xy)
    return {k: {f: np.asarray(v) for f, v in d.items()} for k, d in out.items()}


def tracing_polygon(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Outline (x, y) from the chord ends: X1/Y1 side in order, then X2/Y2 side reversed."""
    chords = np.asarray(rows, dtype=np.float64)[1:]
    x = np.concatenate([chords[:, 0], chords[::-1, 2]])
    y = np.concatenate([chords[:, 1], chords[::-1, 3]])
    return x, y


def rasterise_tracing(rows: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Filled LV cavity mask (bool [H, W]) from one frame's tracing rows."""
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[0] < 3:
        raise ValueError(f"a tracing needs a long axis and >= 2 chords, got {rows.shape[0]} row(s)")
    x, y = tracing_polygon(rows)
    mask = np.zeros(shape, dtype=bool)
    rr, cc = draw_polygon(y, x, shape)
    mask[rr, cc] = True
    return mask


def tracing_volume(rows: np.ndarray) -> float:
    """Single-plane method of discs in pixel units: sum(pi (d/2)^2) * L / N."""
    rows = np.asarray(rows, dtype=np.float64)
    axis, chords = rows[0], rows[1:]
    if len(chords) == 0:
        return 0.0
    length = float(np.hypot(axis[2] - axis[0], axis[3] - axis[1]))
    d = np.hypot(chords[:, 2] - chords[:, 0], chords[:, 3] - chords[:, 1])
    return float(np.sum(np.pi * (d / 2.0) ** 2) * length / len(chords))


def ed_es_frames(traced: dict[int, np.ndarray]) -> tuple[int, int]:
    """(ED, ES) among the traced frames: ED has the larger disc volume."""
    if len(traced) < 2:
        raise ValueError(f"need two traced frames for ED/ES, got {sorted(traced)}")
    vols = sorted(traced, key=lambda f: tracing_volume(traced[f]))
    return vols[-1], vols[0]
