"""Cine-loop readers: one entry point, :func:`load_cine`, for every supported format.

Formats: DICOM (file or folder), AVI/MP4/MOV, NRRD/.seq.nrrd/NIfTI/MetaImage, NumPy
``.npy``/``.npz`` and still images (PNG/JPEG/BMP). Every failure is a
:class:`~EchoFMEngine.cine.CineReadError` naming the file and the reason.
"""
from __future__ import annotations

from pathlib import Path

from EchoFMEngine.cine import Cine, CineReadError
from EchoFMEngine.io.arrays import IMAGE_EXTENSIONS, read_array, read_image
from EchoFMEngine.io.dicom import (DICOM_EXTENSIONS, is_dicom_file, load_clip, load_dicom_series, read_dicom,
                                   scan_dicom_folder)
from EchoFMEngine.io.video import VIDEO_EXTENSIONS, read_video
from EchoFMEngine.io.volume import VOLUME_SUFFIXES, read_volume

__all__ = ["load_cine", "load_dicom_series", "read_dicom", "read_video", "read_volume", "read_array",
           "read_image", "scan_dicom_folder", "supported_suffixes", "CineReadError"]

_ARRAY_SUFFIXES = (".npy", ".npz")


def supported_suffixes() -> tuple[str, ...]:
    """File name endings :func:`load_cine` understands (besides extension-less DICOM and folders)."""
    return DICOM_EXTENSIONS + VIDEO_EXTENSIONS + VOLUME_SUFFIXES + _ARRAY_SUFFIXES + IMAGE_EXTENSIONS


def _reader_for(path: Path):
    name = path.name.lower()
    for suffixes, reader in ((VOLUME_SUFFIXES, read_volume), (VIDEO_EXTENSIONS, read_video),
                             (_ARRAY_SUFFIXES, read_array), (IMAGE_EXTENSIONS, read_image),
                             (DICOM_EXTENSIONS, read_dicom)):
        if name.endswith(suffixes):
            return reader
    if is_dicom_file(path):
        return read_dicom
    return None


def load_cine(path) -> Cine:
    """Load a cine loop from any supported file, or from a folder holding exactly one DICOM clip."""
    path = Path(path)
    if path.is_dir():
        clips = scan_dicom_folder(path)
        if not clips:
            raise CineReadError(path, "no DICOM image files in this folder")
        if len(clips) > 1:
            listing = "; ".join(f"[{i}] {c.describe()}" for i, c in enumerate(clips))
            raise CineReadError(path, f"folder holds {len(clips)} clips, load them with load_dicom_series(): {listing}")
        return load_clip(clips[0])
    if not path.exists():
        raise CineReadError(path, "no such file")
    if path.stat().st_size == 0:
        raise CineReadError(path, "empty file (0 bytes)")
    reader = _reader_for(path)
    if reader is None:
        raise CineReadError(path, f"unsupported file type '{path.suffix or '(no extension)'}' "
                                  f"(supported: {' '.join(supported_suffixes())}, extension-less DICOM, folders)")
    return reader(path)
