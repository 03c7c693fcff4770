"""DICOM ultrasound cines: multi-frame, single-frame and secondary capture, every usual colour
model and codec (pydicom's decoders; MPEG/H.264/HEVC cine loops via PyAV), with frame timing,
physical spacing from the ultrasound regions and the ECG waveform.

Only technical attributes are read into the cine: never patient names, IDs or dates.
"""
from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import av
import cv2
import numpy as np

from EchoFMEngine.cine import Cine, CineReadError, SourceInfo
from EchoFMEngine.io.ecg import ecg_from_dicom
from EchoFMEngine.io.arrays import DEFAULT_FPS, to_uint8

DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic", ".ima")

_JPEG = "pylibjpeg and pylibjpeg-libjpeg (or python-gdcm)"
_J2K = "pylibjpeg and pylibjpeg-openjpeg (or python-gdcm)"
_CODEC_PACKAGES = {
    "1.2.840.10008.1.2.4.50": _JPEG + "; pillow also decodes it",
    "1.2.840.10008.1.2.4.51": _JPEG,
    "1.2.840.10008.1.2.4.57": _JPEG,
    "1.2.840.10008.1.2.4.70": _JPEG,
    "1.2.840.10008.1.2.4.80": "pyjpegls (or python-gdcm)",
    "1.2.840.10008.1.2.4.81": "pyjpegls (or python-gdcm)",
    "1.2.840.10008.1.2.4.90": _J2K,
    "1.2.840.10008.1.2.4.91": _J2K,
    "1.2.840.10008.1.2.4.201": _J2K,
    "1.2.840.10008.1.2.4.202": _J2K,
    "1.2.840.10008.1.2.4.203": _J2K,
    "1.2.840.10008.1.2.5": "pylibjpeg and pylibjpeg-rle",
}
# MPEG-2, MPEG-4 AVC/H.264, HEVC/H.265 transfer syntaxes: one video stream in the fragments.
_VIDEO_SYNTAXES = {f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109)}
_WAVEFORM_SOP_PREFIX = "1.2.840.10008.5.1.4.1.1.9."


def is_dicom_file(path) -> bool:
    """True if the file carries the DICOM Part 10 preamble magic ``DICM`` at byte 128."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _read_dataset(path: Path, **kwargs):
    import pydicom  # deferred: pydicom (0.4 s) loads when a DICOM file is read, not with every import of the io package
    from pydicom.errors import InvalidDicomError  # deferred: as above

    try:
        return pydicom.dcmread(str(path), force=not is_dicom_file(path), **kwargs)
    except InvalidDicomError as e:
        raise CineReadError(path, f"not a DICOM file ({e})") from None
    except (EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CineReadError(path, f"DICOM header is truncated or corrupt ({type(e).__name__}: {e})") from None


def _transfer_syntax(ds):
    from pydicom.uid import ImplicitVRLittleEndian  # deferred: pydicom, as above

    meta = getattr(ds, "file_meta", None)
    return meta.get("TransferSyntaxUID", ImplicitVRLittleEndian) if meta is not None else ImplicitVRLittleEndian


def _no_pixels_reason(ds) -> str:
    sop = ds.get("SOPClassUID")
    sop_name = getattr(sop, "name", str(sop)) if sop else "unknown SOP class"
    if "WaveformSequence" in ds or (sop and str(sop).startswith(_WAVEFORM_SOP_PREFIX)):
        return f"no pixel data: an ECG/waveform-only DICOM ({sop_name}), not an image"
    if "Rows" in ds and "Columns" in ds:
        return "no pixel data although the header describes an image: the file looks truncated"
    return f"no pixel data ({sop_name}); the file is truncated or not an image"


def _missing_codec(ts, path: Path) -> CineReadError:
    need = _CODEC_PACKAGES.get(str(ts), "a pydicom decoding plugin (pylibjpeg or python-gdcm)")
    return CineReadError(path, f"no decoder installed for '{ts.name}' pixel data: pip install {need}")


def _check_decoder(ds, path: Path) -> None:
    """Fail early, naming the package to install, when no plugin can decode this transfer syntax."""
    from pydicom.pixels import get_decoder  # deferred: pydicom, as above

    ts = _transfer_syntax(ds)
    if not ts.is_compressed or str(ts) in _VIDEO_SYNTAXES:
        return
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise CineReadError(path, f"pydicom cannot decode transfer syntax '{ts.name}' ({ts})") from None
    if not decoder.is_available:
        raise _missing_codec(ts, path)


def _decode_video_syntax(ds, path: Path) -> np.ndarray:
    """MPEG-2 / H.264 / HEVC encapsulated pixel data: the fragments form one stream; decode with PyAV."""
    from pydicom.encaps import generate_fragments  # deferred: pydicom, as above

    stream_bytes = b"".join(generate_fragments(ds.PixelData))
    frames = []
    errors = []
    for fmt in (None, "h264", "hevc", "mpegvideo", "mpeg"):
        try:
            with av.open(io.BytesIO(stream_bytes), format=fmt) as container:
                frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            if frames:
                break
        except Exception as e:  # av.error.* for a wrong format guess
            errors.append(f"{fmt or 'probe'}: {e}")
    if not frames:
        tried = "; ".join(errors)[:300]
        raise CineReadError(path, f"cannot decode the '{_transfer_syntax(ds).name}' stream with PyAV ({tried})")
    return np.stack(frames)


def _scale_monochrome(arr: np.ndarray, ds) -> np.ndarray:
    """Grey > 8 bit to uint8: the file's VOI window when present, else min-max over the clip."""
    if arr.dtype == np.uint8:
        return arr
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        from pydicom.pixels import apply_voi_lut  # deferred: pydicom, as above

        try:
            w = np.asarray(apply_voi_lut(arr, ds), dtype=np.float64)
            bits = int(ds.get("BitsStored", 16))
            signed = int(ds.get("PixelRepresentation", 0)) == 1
            lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
            if "VOILUTSequence" in ds and "WindowCenter" not in ds:
                lo, hi = float(w.min()), float(w.max())
            return np.clip(np.rint((w - lo) * (255.0 / max(hi - lo, 1))), 0, 255).astype(np.uint8)
        except (ValueError, TypeError, AttributeError, IndexError):
            pass  # a malformed window falls back to min-max
    a = arr.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    return (np.rint((a - lo) * (255.0 / (hi - lo))) if hi > lo else np.zeros_like(a)).astype(np.uint8)


# ITU-R BT.601 full-range YCbCr -> RGB (DICOM YBR_FULL), as an affine 3x4 matrix on (Y, Cb, Cr, 1).
_YBR_TO_RGB = np.array([[1.0, 0.0, 1.402, -1.402 * 128],
                        [1.0, -0.344136, -0.714136, (0.344136 + 0.714136) * 128],
                        [1.0, 1.772, 0.0, -1.772 * 128]], dtype=np.float32)


def ybr_full_to_rgb(arr: np.ndarray) -> np.ndarray:
    """uint8 YBR_FULL ``[..., 3]`` to RGB with OpenCV (~50x faster than pydicom's float path)."""
    flat = np.ascontiguousarray(arr).reshape(-1, arr.shape[-2], 3)
    return cv2.transform(flat, _YBR_TO_RGB).reshape(arr.shape)


def _decode_raw_colour(ds) -> tuple[np.ndarray, str]:
    """Decode without pydicom's colour conversion; returns the array and its actual photometric
    interpretation (JPEG decoders may already deliver RGB). Prefers the fastest plugin:
    Pillow (libjpeg-turbo) for JPEG baseline, pylibjpeg-rle for RLE."""
    from pydicom.pixels import get_decoder  # deferred: pydicom, as above
    from pydicom.uid import JPEGBaseline8Bit, RLELossless  # deferred: as above

    ts = _transfer_syntax(ds)
    decoder = get_decoder(ts)
    plugins = decoder.available_plugins if ts.is_encapsulated else ()
    fast = {JPEGBaseline8Bit: "pillow", RLELossless: "pylibjpeg"}.get(ts)
    if fast in plugins:
        try:
            arr, meta = decoder.as_array(ds, as_rgb=False, decoding_plugin=fast)
            return arr, str(meta.get("photometric_interpretation", "")).upper()
        except Exception:  # a plugin may reject an odd stream; the default plugin order may cope
            pass
    arr, meta = decoder.as_array(ds, as_rgb=False)
    return arr, str(meta.get("photometric_interpretation", "")).upper()


def decode_frames(ds, path) -> np.ndarray:
    """Pixel data of a dataset as uint8 RGB ``[T, H, W, 3]`` (palette applied, YBR converted)."""
    from pydicom.pixels import apply_color_lut  # deferred: pydicom, as above

    path = Path(path)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise CineReadError(path, _no_pixels_reason(ds))
    ts = _transfer_syntax(ds)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if str(ts) in _VIDEO_SYNTAXES:
        return _decode_video_syntax(ds, path)
    _check_decoder(ds, path)
    try:
        arr, out_photometric = _decode_raw_colour(ds)
    except RuntimeError as e:
        msg = str(e)
        if "missing dependencies" in msg or "plugin" in msg:
            raise _missing_codec(ts, path) from None
        raise CineReadError(path, f"pixel data cannot be decoded: {msg.splitlines()[0]}") from None
    except (ValueError, AttributeError, TypeError, KeyError, EOFError, OSError, NotImplementedError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise CineReadError(path, f"pixel data is truncated or corrupt ({type(e).__name__}: {first})") from None
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if arr.ndim == (2 if samples == 1 else 3):  # a single frame
        arr = arr[None]
    if samples == 1:
        if photometric == "PALETTE COLOR":
            try:
                rgb = apply_color_lut(arr, ds)
            except (ValueError, AttributeError, KeyError, IndexError) as e:
                raise CineReadError(path, f"palette colour lookup table is missing or invalid ({e})") from None
            if rgb.dtype != np.uint8:  # 16-bit LUT entries
                rgb = (rgb >> 8).astype(np.uint8) if rgb.max() > 255 else rgb.astype(np.uint8)
            return np.ascontiguousarray(rgb)
        grey = _scale_monochrome(arr, ds)
        if photometric == "MONOCHROME1":
            grey = 255 - grey
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1))
    if samples != 3:
        raise CineReadError(path, f"{samples} samples per pixel is not grey or colour")
    arr = to_uint8(arr)
    if out_photometric in ("YBR_FULL", "YBR_FULL_422"):
        arr = ybr_full_to_rgb(arr)
    return np.ascontiguousarray(arr)


def frame_timing(ds, n: int) -> tuple[float, np.ndarray | None, dict]:
    """(fps, frame times in s or None, notes) from FrameTimeVector / FrameTime / CineRate /
    RecommendedDisplayFrameRate, following FrameIncrementPointer first; 30 fps assumed otherwise."""
    order = ["FrameTimeVector", "FrameTime", "CineRate", "RecommendedDisplayFrameRate"]
    pointer = ds.get("FrameIncrementPointer")
    if pointer is not None:
        from pydicom.datadict import keyword_for_tag  # deferred: pydicom, as above
        from pydicom.multival import MultiValue  # deferred: as above

        pointers = list(pointer) if isinstance(pointer, (list, tuple, MultiValue)) else [pointer]
        for tag in pointers:
            kw = keyword_for_tag(tag)
            if kw in order:
                order.remove(kw)
                order.insert(0, kw)
                break
    for kw in order:
        v = ds.get(kw)
        if v is None or v == "":
            continue
        try:
            if kw == "FrameTimeVector":
                vec = np.asarray([float(x) for x in (v if hasattr(v, "__iter__") else [v])], dtype=np.float64)
                if n > 1 and vec.size == n and np.all(vec[1:] > 0):
                    t = np.cumsum(vec) / 1000.0
                    t -= t[0]
                    return 1.0 / float(np.median(np.diff(t))), t, {"fps_source": kw}
            elif kw == "FrameTime":
                if float(v) > 0:
                    return 1000.0 / float(v), None, {"fps_source": kw}
            elif float(v) > 0:
                return float(v), None, {"fps_source": kw}
        except (TypeError, ValueError):
            continue
    return DEFAULT_FPS, None, {"fps_assumed": True}


def ultrasound_spacing(ds) -> tuple[tuple[float, float] | None, dict]:
    """(row, col) mm from the largest 2D tissue region (RegionDataType 1, units cm), else
    PixelSpacing, else None; notes include the region's pixel box."""
    regions = ds.get("SequenceOfUltrasoundRegions") or []
    best = None
    for r in regions:
        try:
            if int(r.get("RegionDataType", -1)) != 1:
                continue
            if int(r.get("PhysicalUnitsXDirection", -1)) != 3 or int(r.get("PhysicalUnitsYDirection", -1)) != 3:
                continue
            dx, dy = abs(float(r.PhysicalDeltaX)), abs(float(r.PhysicalDeltaY))
            box = [int(r.get(k, 0)) for k in ("RegionLocationMinX0", "RegionLocationMinY0",
                                                 "RegionLocationMaxX1", "RegionLocationMaxY1")]
        except (AttributeError, TypeError, ValueError):
            continue
        if not (np.isfinite(dx) and np.isfinite(dy)) or dx <= 0 or dy <= 0:
            continue                      # NaN/inf/zero spacing: not usable (never NaN volumes)
        area = max(box[2] - box[0], 0) * max(box[3] - box[1], 0)
        if best is None or area > best[0]:
            best = (area, (dy * 10.0, dx * 10.0), box)
    if best is not None:
        return best[1], {"spacing_source": "SequenceOfUltrasoundRegions", "us_region_xyxy": best[2]}
    ps = ds.get("PixelSpacing")
    if ps is not None:
        try:
            row, col = float(ps[0]), float(ps[1])
            if np.isfinite(row) and np.isfinite(col) and row > 0 and col > 0:
                return (row, col), {"spacing_source": "PixelSpacing"}
        except (TypeError, ValueError, IndexError):
            pass
    return None, {}


def _name(uid) -> str | None:
    if uid is None:
        return None
    return getattr(uid, "name", None) or str(uid)


def _text(ds, keyword: str) -> str | None:
    v = ds.get(keyword)
    s = str(v).strip() if v is not None else ""
    return s or None


def source_info(ds, path: Path) -> SourceInfo:
    """Technical provenance of a dataset (SOP class, colour model, codec, scanner, series)."""
    extra = {}
    for kw, key in (("Modality", "modality"), ("Manufacturer", "manufacturer"), ("BitsStored", "bits_stored")):
        v = ds.get(kw)
        if v not in (None, ""):
            extra[key] = int(v) if isinstance(v, int) else str(v).strip()
    return SourceInfo(
        format="dicom",
        sop_class=_name(ds.get("SOPClassUID")),
        photometric=_text(ds, "PhotometricInterpretation"),
        transfer_syntax=_name(_transfer_syntax(ds)),
        scanner_model=_text(ds, "ManufacturerModelName"),
        series_description=_text(ds, "SeriesDescription"),
        file_name=path.name,
        extra=extra,
    )


def _frames_in_pixel_data(ds) -> int | None:
    """Whole frames the uncompressed pixel data holds (None for compressed data or odd headers)."""
    try:
        ts = _transfer_syntax(ds)
        if ts is None or ts.is_compressed or "PixelData" not in ds:
            return None
        per = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * (int(ds.BitsAllocated) // 8)
        return len(ds.PixelData) // per if per > 0 else None
    except (AttributeError, TypeError, ValueError):
        return None


def cine_from_dataset(ds, path) -> Cine:
    """Build a cine from an already read pydicom dataset (``path`` names it in errors)."""
    path = Path(path)
    frames = decode_frames(ds, path)
    if frames.shape[0] == 0:
        raise CineReadError(path, "zero frames")
    fps, times, notes = frame_timing(ds, frames.shape[0])
    spacing, sp_notes = ultrasound_spacing(ds)
    src = source_info(ds, path)
    src.extra.update(notes)
    src.extra.update(sp_notes)
    held, declared = _frames_in_pixel_data(ds), int(ds.get("NumberOfFrames", 1) or 1)
    if held is not None and held > declared:
        src.extra["frame_count_mismatch"] = (f"NumberOfFrames says {declared} but the pixel data holds "
                                             f"{held} frames; {frames.shape[0]} were read")
    if any((t.group >> 8) == 0x50 and t.element == 0x3000 for t in ds.keys()):
        src.extra["ecg_curve_data_unread"] = True  # retired curve module (group 50xx) not decoded
    return Cine(frames=frames, fps=fps, frame_times_s=times, spacing_mm=spacing,
                ecg=ecg_from_dicom(ds), source=src)


def read_dicom(path) -> Cine:
    """Read one DICOM file (multi- or single-frame) as a cine."""
    path = Path(path)
    return cine_from_dataset(_read_dataset(path), path)


@dataclass
class DicomClip:
    """One cine of a folder: a multi-frame file, or the single-frame files of one series."""

    series_key: str
    files: list = field(default_factory=list)
    series_number: int | None = None
    description: str | None = None
    frames: int = 0
    size: tuple = (0, 0)

    def describe(self) -> str:
        first = Path(self.files[0]).name
        what = f"{len(self.files)} files" if len(self.files) > 1 else first
        return (f"series {self.series_number if self.series_number is not None else '?'} "
                f"'{self.description or ''}': {self.frames} frames {self.size[0]}x{self.size[1]} ({what})")


def scan_dicom_folder(folder) -> list[DicomClip]:
    """Group the DICOM image files under ``folder`` into clips (headers only, no pixel decoding):
    each multi-frame file is a clip; single-frame files of one series with one size form one clip."""
    folder = Path(folder)
    clips: list[DicomClip] = []
    singles: dict = defaultdict(list)
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        if f.name.upper() == "DICOMDIR" or not (is_dicom_file(f) or f.suffix.lower() in DICOM_EXTENSIONS):
            continue
        try:
            ds = _read_dataset(f, defer_size="64 KB")
        except CineReadError:
            continue
        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            continue  # ECG-only or non-image objects of the study
        series = str(ds.get("SeriesInstanceUID", "") or f"file:{f}")
        nframes = int(ds.get("NumberOfFrames", 1) or 1)
        size = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
        number = ds.get("SeriesNumber")
        info = dict(series_number=int(number) if number not in (None, "") else None,
                    description=_text(ds, "SeriesDescription"), size=size)
        if nframes > 1:
            clips.append(DicomClip(series_key=series, files=[f], frames=nframes, **info))
        else:
            inst = ds.get("InstanceNumber")
            singles[(series, size)].append((int(inst) if inst not in (None, "") else 0, f, info))
    for (series, _), items in singles.items():
        items.sort(key=lambda x: (x[0], str(x[1])))
        files = [f for _, f, _ in items]
        clips.append(DicomClip(series_key=series, files=files, frames=len(items), **items[0][2]))
    clips.sort(key=lambda c: (c.series_number if c.series_number is not None else 1 << 30, str(c.files[0])))
    return clips


def load_clip(clip: DicomClip) -> Cine:
    """Decode one clip found by :func:`scan_dicom_folder`."""
    if len(clip.files) == 1:
        return read_dicom(clip.files[0])
    cines = [read_dicom(f) for f in clip.files]
    first = cines[0]
    frames = np.concatenate([c.frames for c in cines])
    src = first.source
    src.extra = dict(src.extra, files=len(clip.files))
    return Cine(frames=frames, fps=first.fps, spacing_mm=first.spacing_mm, ecg=first.ecg, source=src)


def load_dicom_series(folder, errors: str = "raise") -> list[Cine]:
    """Every cine in a folder of DICOM files (see :func:`scan_dicom_folder`); ``errors="skip"``
    leaves out clips that cannot be decoded instead of raising."""
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    folder = Path(folder)
    if not folder.is_dir():
        raise CineReadError(folder, "not a folder")
    clips = scan_dicom_folder(folder)
    if not clips:
        raise CineReadError(folder, "no DICOM image files in this folder")
    out = []
    for clip in clips:
        try:
            out.append(load_clip(clip))
        except CineReadError:
            if errors != "skip":
                raise
    return out
