"""NRRD / Slicer ``.seq.nrrd`` / NIfTI / MetaImage cines via SimpleITK.

Layouts understood (SimpleITK axis order x=column, y=row):
- 2D image: one frame.
- 3D image ``(x, y, t)``: time is the third axis, as in CAMUS sequences.
- Slicer ``.seq.nrrd`` of 2D frames: SimpleITK reports the NRRD ``list`` axis as pixel
  components (``NRRD_kinds[pixel] == list``), or, for RGB frames, as a 4th axis ``(x, y, 1, t)``.
- 4D image ``(x, y, 1, t)``: NIfTI/MetaImage time series of 2D frames.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from EchoFMEngine.cine import Cine, CineReadError, SourceInfo
from EchoFMEngine.io.arrays import DEFAULT_FPS, frames_to_rgb

VOLUME_SUFFIXES = (".seq.nrrd", ".nrrd", ".nhdr", ".nii.gz", ".nii", ".mhd", ".mha")
_TIME_UNIT_TO_S = {"s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0, "ms": 1e-3, "msec": 1e-3, "us": 1e-6}


def _meta(im, key: str):
    return im.GetMetaData(key).strip() if im.HasMetaDataKey(key) else None


def _index_values(im) -> np.ndarray | None:
    """Sequence index values of a Slicer ``.seq.nrrd`` (``axis N index values``), if numeric."""
    for key in im.GetMetaDataKeys():
        if key.startswith("axis ") and key.endswith(" index values"):
            try:
                return np.array([float(v) for v in im.GetMetaData(key).split()], dtype=np.float64)
            except ValueError:
                return None
    return None


def _time_unit_scale(im, axis: str) -> float | None:
    """Seconds per unit of the time axis (``axis`` "pixel", "2" or "3") when the header names
    it: NRRD units, or NIfTI xyzt_units (which only describe a 4th axis)."""
    unit = _meta(im, f"NRRD_units[{axis}]")
    if unit:
        return _TIME_UNIT_TO_S.get(unit.strip('"').lower())
    xyzt = _meta(im, "xyzt_units")
    if axis == "3" and xyzt and xyzt.isdigit():
        t = int(xyzt) & 0x38  # NIfTI: 8 = s, 16 = ms, 24 = us
        return {8: 1.0, 16: 1e-3, 24: 1e-6}.get(t)
    return None


def read_volume(path) -> Cine:
    """Read a 2D/3D/4D image file with SimpleITK as a cine ``[T, H, W, 3]`` (time = 3rd axis)."""
    import SimpleITK as sitk  # deferred: SimpleITK is slow to import; only volume files need it

    path = Path(path)
    try:
        im = sitk.ReadImage(str(path))
    except RuntimeError as e:
        msg = str(e).strip().splitlines()
        reason = next((m for m in msg if "Exception" not in m and m.strip()), msg[-1] if msg else "")
        raise CineReadError(path, "SimpleITK cannot read it (truncated, corrupt or unsupported): "
                                  + reason.strip()) from None
    dim = im.GetDimension()
    ncomp = im.GetNumberOfComponentsPerPixel()
    spacing = im.GetSpacing()
    arr = sitk.GetArrayFromImage(im)  # reversed axis order: (t, z, y, x[, c])
    extra: dict = {}
    list_axis = (_meta(im, "NRRD_kinds[pixel]") or "").lower() == "list"

    if list_axis:  # Slicer sequence of scalar frames: components are the frames
        if dim == 3:
            if arr.shape[0] != 1:
                raise CineReadError(path, f"sequence of 3D volumes (depth {arr.shape[0]}) is not a 2D cine")
            arr = arr[0]
        frames = np.moveaxis(arr, -1, 0)  # [T, H, W]
        time_spacing, time_axis = None, "pixel"
    elif dim == 2:
        frames = arr[None]
        time_spacing, time_axis = None, "pixel"
    elif dim == 3:
        frames = arr  # (t, y, x[, c])
        time_spacing, time_axis = spacing[2], "2"
    elif dim == 4:
        if arr.shape[1] != 1:
            raise CineReadError(path, f"4D image with depth {arr.shape[1]} is a 3D+t volume, not a 2D cine")
        frames = arr[:, 0]
        time_spacing, time_axis = spacing[3], "3"
    else:
        raise CineReadError(path, f"{dim}D image is not a 2D cine")

    if not list_axis and ncomp not in (1, 3, 4):
        raise CineReadError(path, f"{ncomp} components per pixel: expected grey or RGB(A)")
    rgb = frames_to_rgb(frames, path)

    fps, times = None, None
    index = _index_values(im)
    unit_scale = _time_unit_scale(im, time_axis)
    label = (_meta(im, f"NRRD_labels[{time_axis}]") or "").strip('"').lower()
    if unit_scale is None and label == "time":
        unit_scale = 1.0  # Slicer's default sequence index: "time" in seconds
    if index is not None and index.size == rgb.shape[0] and rgb.shape[0] > 1 and unit_scale is not None:
        scale = unit_scale
        t = (index - index[0]) * scale
        dt = np.diff(t)
        if np.all(dt > 0):
            times, fps = t, 1.0 / float(np.median(dt))
            extra["fps_source"] = "sequence index values"
    elif time_spacing is not None and unit_scale is not None and time_spacing > 0:
        fps = 1.0 / (time_spacing * unit_scale)
        extra["fps_source"] = "time axis spacing"
    if fps is None:
        fps = DEFAULT_FPS
        extra["fps_assumed"] = True

    name = path.name.lower()
    fmt = next((s.lstrip(".") for s in VOLUME_SUFFIXES if name.endswith(s)), path.suffix.lstrip("."))
    src = SourceInfo(format=fmt, file_name=path.name,
                     photometric="RGB" if ncomp in (3, 4) and not list_axis else "MONOCHROME",
                     extra=extra)
    # A writer that did not know the spacing says so (our Slicer module writes this field).
    known = (_meta(im, "EchoFM.spacingMm") or "").strip().lower() != "unknown"
    spacing_mm = (spacing[1], spacing[0]) if known else None
    return Cine(frames=rgb, fps=fps, frame_times_s=times, spacing_mm=spacing_mm, source=src)
