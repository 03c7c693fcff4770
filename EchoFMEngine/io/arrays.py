"""NumPy clips (``.npy`` / ``.npz``) and still images (PNG/JPEG/BMP) as cines, plus the shared uint8 scaling."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from EchoFMEngine.cine import Cine, CineReadError, SourceInfo

DEFAULT_FPS = 30.0
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale any numeric array to uint8 for display: kept when already in 0..255, x255 for
    floats in 0..1, otherwise min-max over the whole array (one scale for all frames)."""
    a = np.asarray(arr)
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if a.size == 0:
        return a.astype(np.uint8)
    af = a.astype(np.float32, copy=False)
    finite = np.isfinite(af)
    if not finite.all():
        af = np.where(finite, af, 0.0)
    lo, hi = float(af.min()), float(af.max())
    if np.issubdtype(a.dtype, np.floating) and lo >= 0.0 and hi <= 1.0 and hi > 0.0:
        af = af * 255.0
    elif not (lo >= 0.0 and hi <= 255.0):
        af = (af - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(af)
    return np.clip(np.rint(af), 0, 255).astype(np.uint8)


def frames_to_rgb(arr: np.ndarray, path, layout: str = "THW") -> np.ndarray:
    """Bring ``[T,H,W]``, ``[T,H,W,C]`` (C in 1, 3, 4) or one ``[H,W]`` frame to uint8 ``[T,H,W,3]``."""
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 3 and layout == "HWC":
        a = a[None]
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 4 and a.shape[-1] == 4:  # RGBA: drop alpha
        a = a[..., :3]
    if not (a.ndim == 3 or (a.ndim == 4 and a.shape[-1] == 3)):
        raise CineReadError(path, f"array of shape {tuple(np.shape(arr))} is not [T,H,W] or [T,H,W,3]")
    if a.shape[0] == 0 or 0 in a.shape[1:3]:
        raise CineReadError(path, f"zero frames or empty frames (shape {tuple(a.shape)})")
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise CineReadError(path, f"array dtype {a.dtype} is not numeric")
    if np.issubdtype(a.dtype, np.inexact):
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:     # never analysed as black pixels: the caller fixes the data
            raise CineReadError(path, f"{bad} of {a.size} pixel values are NaN or infinite")
    a = to_uint8(a)
    if a.ndim == 3:
        a = np.repeat(a[..., None], 3, axis=-1)
    return np.ascontiguousarray(a)


def _scalar(v, name: str, path) -> float:
    try:
        return float(np.asarray(v).reshape(-1)[0])
    except (TypeError, ValueError, IndexError) as e:
        raise CineReadError(path, f"'{name}' is not a number ({e})") from None


def read_array(path) -> Cine:
    """Read a ``.npy`` clip ([T,H,W] or [T,H,W,3]) or a ``.npz`` with ``frames`` and optional
    ``fps``, ``spacing_mm``, ``frame_times_s``."""
    path = Path(path)
    extra: dict = {}
    fps = None
    spacing = None
    times = None
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "frames" not in z.files:
                    raise CineReadError(path, f"npz has no 'frames' array (keys: {', '.join(z.files) or 'none'})")
                frames = z["frames"]
                if "fps" in z.files:
                    fps = _scalar(z["fps"], "fps", path)
                if "spacing_mm" in z.files:
                    s = np.asarray(z["spacing_mm"], dtype=np.float64).reshape(-1)
                    if s.size != 2 or not np.all(np.isfinite(s)) or np.any(s <= 0):
                        raise CineReadError(path, f"'spacing_mm' must be two positive numbers, got {s.tolist()}")
                    spacing = (float(s[0]), float(s[1]))
                if "frame_times_s" in z.files:
                    times = np.asarray(z["frame_times_s"], dtype=np.float64).reshape(-1)
        else:
            frames = np.load(path, allow_pickle=False)
    except CineReadError:
        raise
    except Exception as e:  # numpy raises ValueError/OSError/EOFError/BadZipFile on damaged files
        raise CineReadError(path, f"not a readable NumPy file ({type(e).__name__}: {e})") from None
    rgb = frames_to_rgb(frames, path)
    if fps is None or not np.isfinite(fps) or fps <= 0:
        if fps is not None:
            raise CineReadError(path, f"'fps' must be positive, got {fps}")
        fps = DEFAULT_FPS
        extra["fps_assumed"] = True
    if times is not None and times.shape != (rgb.shape[0],):
        raise CineReadError(path, f"'frame_times_s' has {times.size} values for {rgb.shape[0]} frames")
    src = SourceInfo(format=path.suffix.lower().lstrip("."), file_name=path.name, extra=extra)
    return Cine(frames=rgb, fps=fps, frame_times_s=times, spacing_mm=spacing, source=src)


def read_image(path) -> Cine:
    """Read a still image (PNG/JPEG/BMP) as a one-frame RGB cine; 16-bit grey is scaled to 8 bit."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = frames_to_rgb(np.asarray(im), path)
            else:
                arr = np.asarray(im.convert("RGB"))[None]
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CineReadError(path, f"not a readable image ({type(e).__name__}: {e})") from None
    src = SourceInfo(format=path.suffix.lower().lstrip(".").replace("jpeg", "jpg"), photometric=mode,
                     file_name=path.name, extra={"fps_assumed": True})
    return Cine(frames=np.ascontiguousarray(arr), fps=DEFAULT_FPS, source=src)
