"""`python -m EchoFMEngine bench io`: decoded frames per second of the cine readers.

Writes small synthetic clips (moving speckle, so codecs do real work) as AVI (MJPEG),
MP4 (H.264) and multi-frame DICOM (uncompressed RGB, RLE, JPEG baseline) into a temporary
folder, then times :func:`EchoFMEngine.io.load_cine` on each.

Hook for more columns (e.g. the prepared clip cache): :func:`register_format` adds a
``(name, write, read)`` triple; :func:`bench_cache` registers the cache's column when
``EchoFMEngine.data.cache`` offers ``bench_io_format() -> (name, write, read)`` with
``write(frames, fps, folder) -> Path`` and ``read(path) -> int`` (frames decoded).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.tag import Tag
from pydicom.uid import (ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless, UltrasoundMultiFrameImageStorage,
                         generate_uid)

from EchoFMEngine.data import cache
from EchoFMEngine.io import load_cine
from EchoFMEngine.io.video import write_video

CLIPS = {"200x112x112": (200, 112, 112), "60x600x800": (60, 600, 800)}
QUICK_CLIPS = {"40x112x112": (40, 112, 112), "10x300x400": (10, 300, 400)}


def synthetic_clip(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 RGB ``[t,h,w,3]``: speckle with a slowly pulsing bright ring, grey like B-mode."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot(yy - h / 2, xx - w / 2) / (0.5 * min(h, w))
    out = np.empty((t, h, w, 3), dtype=np.uint8)
    for i in range(t):
        radius = 0.5 + 0.1 * np.sin(2 * np.pi * i / 25.0)
        ring = np.exp(-((r - radius) / 0.06) ** 2)
        speckle = rng.rayleigh(0.35, size=(h, w)).astype(np.float32)
        grey = np.clip(255 * (0.25 * speckle + 0.8 * ring * speckle), 0, 255).astype(np.uint8)
        out[i] = grey[..., None]
    return out


def _write_video(frames: np.ndarray, fps: float, folder: Path, ext: str) -> Path:
    return write_video(folder / f"clip{ext}", frames, fps)


def write_us_dicom(path: Path, frames: np.ndarray, fps: float, encoding: str = "raw") -> Path:
    """Minimal US multi-frame DICOM of RGB frames; ``encoding``: raw, rle or jpeg (baseline, YBR_FULL_422)."""
    t, h, w, _ = frames.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.SeriesInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.NumberOfFrames = h, w, t
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.FrameTime = 1000.0 / fps
    ds.FrameIncrementPointer = Tag(0x0018, 0x1063)
    if encoding == "jpeg":
        parts = []
        for f in frames:
            buf = io.BytesIO()
            Image.fromarray(f).save(buf, format="JPEG", quality=90, subsampling=1)  # 4:2:2
            parts.append(buf.getvalue())
        meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PixelData = encapsulate(parts)
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
    else:
        ds.PhotometricInterpretation = "RGB"
        ds.PixelData = np.ascontiguousarray(frames).tobytes()
        if encoding == "rle":
            ds.compress(RLELossless)
        elif encoding != "raw":
            raise ValueError(f"unknown DICOM encoding {encoding!r} (raw, rle, jpeg)")
    ds.save_as(path, enforce_file_format=True)
    return path


def _read_cine(path: Path) -> int:
    return load_cine(path).num_frames


Writer = Callable[[np.ndarray, float, Path], Path]
Reader = Callable[[Path], int]
FORMATS: list[tuple[str, Writer, Reader]] = [
    ("AVI mjpeg", lambda f, fps, d: _write_video(f, fps, d, ".avi"), _read_cine),
    ("MP4 h264", lambda f, fps, d: _write_video(f, fps, d, ".mp4"), _read_cine),
    ("DICOM raw", lambda f, fps, d: write_us_dicom(d / "raw.dcm", f, fps, "raw"), _read_cine),
    ("DICOM RLE", lambda f, fps, d: write_us_dicom(d / "rle.dcm", f, fps, "rle"), _read_cine),
    ("DICOM JPEG", lambda f, fps, d: write_us_dicom(d / "jpeg.dcm", f, fps, "jpeg"), _read_cine),
]


def register_format(name: str, write: Writer, read: Reader) -> None:
    """Add a column: ``write(frames, fps, folder) -> path`` once, then ``read(path) -> frames`` is timed."""
    if any(n == name for n, _, _ in FORMATS):
        raise ValueError(f"benchmark format {name!r} is already registered")
    FORMATS.append((name, write, read))


def bench_cache() -> bool:
    """Register the prepared-cache column if ``EchoFMEngine.data.cache.bench_io_format`` exists."""
    make = getattr(cache, "bench_io_format", None)
    if make is None:
        return False
    name, write, read = make()
    if not any(n == name for n, _, _ in FORMATS):
        register_format(name, write, read)
    return True


def run(clips: dict, repeat: int = 3, fps: float = 50.0) -> list[dict]:
    """Time every registered format on every clip; one result row per (clip, format)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="echofm-bench-io-") as tmp:
        for ci, (label, (t, h, w)) in enumerate(clips.items()):
            frames = synthetic_clip(t, h, w, seed=ci)
            for fi, (name, write, read) in enumerate(FORMATS):
                folder = Path(tmp) / f"{ci}_{fi}"
                folder.mkdir()
                try:
                    path = write(frames, fps, folder)
                    read(path)  # warm-up: imports, codec initialisation, file cache
                    best = float("inf")
                    for _ in range(repeat):
                        t0 = time.perf_counter()
                        n = read(path)
                        best = min(best, time.perf_counter() - t0)
                    if n != t:
                        raise RuntimeError(f"decoded {n} of {t} frames")
                    rows.append({"clip": label, "format": name, "frames": t, "seconds": best,
                                 "frames_per_s": t / best, "file_mb": path.stat().st_size / 1e6})
                except Exception as e:  # one broken codec must not hide the other columns
                    rows.append({"clip": label, "format": name, "error": f"{type(e).__name__}: {e}"})
    return rows


def format_table(rows: list[dict]) -> str:
    """Rows = clips, columns = formats, cells = decoded frames/s (file size in MB)."""
    clips = list(dict.fromkeys(r["clip"] for r in rows))
    names = list(dict.fromkeys(r["format"] for r in rows))
    cell = {(r["clip"], r["format"]): r for r in rows}
    widths = [max(12, len(n) + 2) for n in names]
    head = f"{'clip (TxHxW)':<14}" + "".join(f"{n:>{wd}}" for n, wd in zip(names, widths))
    lines = ["decoded frames/s via load_cine (file size MB)", head, "-" * len(head)]
    for c in clips:
        line = f"{c:<14}"
        for n, wd in zip(names, widths):
            r = cell.get((c, n))
            txt = "n/a" if r is None else ("error" if "error" in r else f"{r['frames_per_s']:.0f} ({r['file_mb']:.1f})")
            line += f"{txt:>{wd}}"
        lines.append(line)
    errors = [f"  {r['clip']} {r['format']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join(lines + (["errors:"] + errors if errors else []))


def cli(argv: list[str]) -> int:
    """Entry point of ``bench io``."""
    ap = argparse.ArgumentParser(prog="python -m EchoFMEngine bench io", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example:\n  python -m EchoFMEngine bench io --quick")
    ap.add_argument("--repeat", type=int, default=3, help="timed reads per file (best is reported)")
    ap.add_argument("--quick", action="store_true", help="small clips (a few seconds in all)")
    ap.add_argument("--json", type=Path, help="also write the result rows to this JSON file")
    args = ap.parse_args(argv)
    bench_cache()
    rows = run(QUICK_CLIPS if args.quick else CLIPS, repeat=max(1, args.repeat))
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
