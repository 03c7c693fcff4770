"""AVI / MP4 / MOV cines: PyAV (FFmpeg) first, OpenCV as fallback; frames always RGB."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from EchoFMEngine.cine import Cine, CineReadError, SourceInfo

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mov", ".m4v", ".mkv", ".webm", ".wmv", ".mpg", ".mpeg")


def _read_pyav(path: Path) -> Cine:
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise CineReadError(path, "container has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        declared = int(stream.frames or 0)
        frames, times, broken = [], [], None
        try:
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                times.append(frame.time)
        except Exception as e:  # noqa: BLE001 - a decode error after some frames: keep them, flag it
            if not frames:
                raise
            broken = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        codec = stream.codec_context.name
    if not frames:
        raise CineReadError(path, "video holds zero decodable frames")
    fps = float(rate) if rate else 0.0
    extra = {"codec": codec, "decoder": "pyav"}
    if broken or (declared and len(frames) < declared):
        extra["truncated"] = (f"decoded {len(frames)} of {declared or '?'} frames"
                              + (f" (decoding stopped: {broken})" if broken else ""))
    if not fps > 0:
        fps, extra["fps_assumed"] = 30.0, True
    t = None
    if all(x is not None for x in times):
        t = np.asarray(times, dtype=np.float64)
        t -= t[0]
        if len(t) > 1 and not np.all(np.diff(t) > 0):
            t = None  # broken or duplicated timestamps: fall back to the constant rate
    if t is None:
        extra["frame_times_from_fps"] = True
    return Cine(frames=np.stack(frames), fps=fps, frame_times_s=t,
                source=SourceInfo(format=path.suffix.lower().lstrip("."), file_name=path.name, extra=extra))


def _read_opencv(path: Path) -> Cine:
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise CineReadError(path, "OpenCV cannot open the video")
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        frames, times = [], []
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            times.append(cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0)
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    finally:
        cap.release()
    if not frames:
        raise CineReadError(path, "video holds zero decodable frames")
    extra = {"decoder": "opencv", "frame_times_from_fps": True}
    if not fps > 0:
        fps, extra["fps_assumed"] = 30.0, True
    return Cine(frames=np.stack(frames), fps=fps,
                source=SourceInfo(format=path.suffix.lower().lstrip("."), file_name=path.name, extra=extra))


def read_video(path) -> Cine:
    """Decode every frame of a video file to RGB; fps from the container, frame times from pts."""
    path = Path(path)
    errors = []
    for name, reader in (("PyAV", _read_pyav), ("OpenCV", _read_opencv)):  # OpenCV is the fallback
        try:
            return reader(path)
        except ImportError as e:
            errors.append(f"{name} not installed ({e})")
        except CineReadError as e:
            errors.append(f"{name}: {e.reason}")
        except Exception as e:  # av.error.* (InvalidDataError, ...) and decoder failures
            errors.append(f"{name}: {type(e).__name__}: {e}")
    raise CineReadError(path, "cannot decode video (truncated, corrupt or unsupported codec): " + "; ".join(errors))


def write_video(path, frames: np.ndarray, fps: float, codec: str | None = None, quality: int | None = None) -> Path:
    """Write uint8 RGB frames ``[T,H,W,3]`` (or grey ``[T,H,W]``) with PyAV.

    Default codec: MJPEG in ``.avi`` (like EchoNet-Dynamic), H.264 (yuv420p) otherwise.
    ``quality``: for MJPEG the qscale (2 best), for H.264 the CRF (0 lossless)."""
    path = Path(path)
    f = np.asarray(frames)
    if f.ndim == 3:
        f = np.repeat(f[..., None], 3, axis=-1)
    if f.dtype != np.uint8 or f.ndim != 4 or f.shape[-1] != 3 or f.shape[0] == 0:
        raise ValueError(f"frames must be uint8 [T,H,W,3] with T > 0, got {f.dtype} {f.shape}")
    if codec is None:
        codec = "mjpeg" if path.suffix.lower() == ".avi" else "libx264"
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height = int(f.shape[2]), int(f.shape[1])
        if codec == "mjpeg":
            stream.pix_fmt = "yuvj444p"
            stream.codec_context.qmin = stream.codec_context.qmax = quality or 2
        else:
            odd = f.shape[1] % 2 or f.shape[2] % 2  # 4:2:0 needs even sizes
            stream.pix_fmt = "yuv444p" if codec in ("libx264", "h264") and (quality == 0 or odd) else "yuv420p"
            if codec in ("libx264", "h264"):
                stream.options = {"crf": str(18 if quality is None else quality)}
        for img in f:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
