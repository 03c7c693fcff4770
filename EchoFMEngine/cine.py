"""The in-memory cine loop: every reader produces one, every later step consumes one."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


class CineReadError(ValueError):
    """A file could not be read as a cine loop; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def luma(frames: np.ndarray) -> np.ndarray:
    """Luma of uint8 RGB frames ``[..., 3]`` as float32 in [0, 1] (ITU-R BT.601 weights)."""
    f = frames.astype(np.float32)
    return (0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]) / 255.0


@dataclass
class Ecg:
    """One ECG lead sampled at ``fs`` Hz; ``t0_s`` is the time of sample 0 relative to frame 0."""

    signal: np.ndarray
    fs: float
    lead: str = "unknown"
    t0_s: float = 0.0

    def __post_init__(self):
        self.signal = np.asarray(self.signal, dtype=np.float32).reshape(-1)
        self.fs = float(self.fs)
        if self.fs <= 0:
            raise ValueError(f"ECG sampling frequency must be positive, got {self.fs}")

    @property
    def times_s(self) -> np.ndarray:
        """Sample times on the cine's clock (seconds from the first frame)."""
        return self.t0_s + np.arange(self.signal.size, dtype=np.float64) / self.fs

    @property
    def duration_s(self) -> float:
        return self.signal.size / self.fs


@dataclass
class SourceInfo:
    """Where a cine came from. Technical facts only: never names, IDs or dates of a patient."""

    format: str
    sop_class: Optional[str] = None
    photometric: Optional[str] = None
    transfer_syntax: Optional[str] = None
    scanner_model: Optional[str] = None
    series_description: Optional[str] = None
    file_name: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "extra" and v is not None}
        d.update(self.extra)
        return d


@dataclass
class Cine:
    """A cine loop: ``frames`` uint8 ``[T, H, W, 3]`` RGB with its timing, spacing and ECG."""

    frames: np.ndarray
    fps: float
    frame_times_s: Optional[np.ndarray] = None
    spacing_mm: Optional[tuple] = None
    ecg: Optional[Ecg] = None
    source: SourceInfo = field(default_factory=lambda: SourceInfo(format="array"))

    def __post_init__(self):
        f = np.asarray(self.frames)
        if f.ndim == 3:  # grey [T, H, W]
            f = np.repeat(f[..., None], 3, axis=-1)
        if f.ndim != 4 or f.shape[-1] != 3:
            raise ValueError(f"Cine frames must be [T, H, W, 3] RGB, got shape {f.shape}")
        if f.shape[0] == 0:
            raise ValueError("Cine has zero frames")
        if f.dtype != np.uint8:
            raise ValueError(f"Cine frames must be uint8, got {f.dtype}")
        self.frames = f
        self.fps = float(self.fps)
        if not np.isfinite(self.fps) or self.fps <= 0:
            raise ValueError(f"Cine fps must be positive, got {self.fps}")
        if self.frame_times_s is None:
            self.frame_times_s = np.arange(f.shape[0], dtype=np.float64) / self.fps
        self.frame_times_s = np.asarray(self.frame_times_s, dtype=np.float64)
        if self.frame_times_s.shape != (f.shape[0],):
            raise ValueError(
                f"frame_times_s has shape {self.frame_times_s.shape}, expected ({f.shape[0]},)"
            )
        if self.spacing_mm is not None:
            self.spacing_mm = (float(self.spacing_mm[0]), float(self.spacing_mm[1]))

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def shape(self) -> tuple:
        """(T, H, W)."""
        return tuple(self.frames.shape[:3])

    @property
    def duration_s(self) -> float:
        return float(self.frame_times_s[-1] - self.frame_times_s[0]) + 1.0 / self.fps

    def grey(self) -> np.ndarray:
        """Luma ``[T, H, W]`` float32 in [0, 1] (ITU-R BT.601 weights)."""
        return luma(self.frames)
