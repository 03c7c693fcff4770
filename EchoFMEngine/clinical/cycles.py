"""Cardiac cycles in a cine: split at R peaks (ECG) or, without an ECG, at the image phase
most like end-diastole; turn half cycles into full ones; cut fixed-length clip windows
that hold at least one full cycle.

A cycle is a pair ``(start, end)`` of frame indices: ``start`` (inclusive) at an R peak /
end-diastole, ``end`` (exclusive) at the next one.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union

import numpy as np
from scipy.signal import detrend, find_peaks
from skimage.transform import resize

from EchoFMEngine.cine import Cine
from EchoFMEngine.clinical.image_beats import detect_image_beats, noise_level
from EchoFMEngine.clinical.ecg import detect_r_peaks, peaks_to_frames
from EchoFMEngine.clinical.geometry import find_sector

_FEATURE_SIZE = 32
_MAX_RR_JUMP = 1.8  # an R-R interval this many times the median hides a missed beat


# ----------------------------------------------------------------------------- features
def frame_features(cine: Cine, size: int = _FEATURE_SIZE, blank_outside_sector: bool = True,
                   remove_trend: bool = True) -> np.ndarray:
    """Grey frames inside the scan sector, pooled to ``size x size``, minus their temporal mean
    (and linear trend): [T, size*size]."""
    grey = cine.grey()
    if blank_outside_sector:
        sector = find_sector(cine.frames)
        if sector is not None:  # burned-in cursors and clocks must not look like motion
            rows, cols = np.flatnonzero(sector.any(1)), np.flatnonzero(sector.any(0))
            grey = (grey * sector)[:, rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    small = resize(grey, (grey.shape[0], size, size), order=1, anti_aliasing=True, preserve_range=True)
    x = small.reshape(grey.shape[0], -1).astype(np.float64)
    if x.shape[0] < 3 or not remove_trend:
        return x - x.mean(axis=0, keepdims=True)
    return detrend(x, axis=0, type="linear")  # slow drift (probe, breathing) is not the heartbeat


def _lag_bounds(fps: float, n: int, min_hr_bpm: float, max_hr_bpm: float) -> tuple:
    lo = max(2, int(np.floor(fps * 60.0 / max_hr_bpm)))
    hi = min(int(np.ceil(fps * 60.0 / min_hr_bpm)), int(n / 1.5))  # >= 1.5 periods in the clip
    return lo, hi


def _autocorrelation(features: np.ndarray, max_lag: int) -> np.ndarray:
    """Normalised correlation of the frame sequence with itself shifted by 0..max_lag frames."""
    T = features.shape[0]
    a = np.zeros(max_lag + 1)
    for k in range(min(max_lag, T - 1) + 1):
        A, B = features[: T - k], features[k:]
        a[k] = np.sum(A * B) / max(np.sqrt(np.sum(A * A) * np.sum(B * B)), 1e-12)
    return a


def _period_from_features(features: np.ndarray, fps: float, min_hr_bpm: float,
                          max_hr_bpm: float) -> Optional[float]:
    """Dominant period (frames): the first strong peak of the autocorrelation in the heart-rate range."""
    n = features.shape[0]
    lo, hi = _lag_bounds(fps, n, min_hr_bpm, max_hr_bpm)
    if hi <= lo:
        return None
    a = _autocorrelation(features, hi + 1)
    peaks = [k for k in range(max(lo, 1), hi + 1) if a[k] >= a[k - 1] and a[k] >= a[k + 1]]
    if not peaks:
        return None
    best = max(a[k] for k in peaks)
    if best < 0.15:  # nothing repeats
        return None
    k = next(k for k in peaks if a[k] >= 0.8 * best)  # the fundamental, not a multiple of it
    den = a[k - 1] - 2 * a[k] + a[k + 1]
    return float(k + (0.5 * (a[k - 1] - a[k + 1]) / den if den < 0 else 0.0))


# ----------------------------------------------------------------------------- ECG
def ecg_peak_frames(cine: Cine) -> Optional[np.ndarray]:
    """Frames of the R peaks of the cine's ECG (``T`` for a peak just after the last frame, which
    closes the last cycle); None when there is no ECG covering the clip with at least two beats."""
    ecg = cine.ecg
    if ecg is None or ecg.signal.size == 0:
        return None
    ft = cine.frame_times_s
    dt = float(np.median(np.diff(ft))) if ft.size > 1 else 1.0 / cine.fps
    t_ecg = ecg.times_s
    if t_ecg[0] > ft[0] + dt or t_ecg[-1] < ft[-1] - dt:
        return None  # the ECG does not span the clip

    peaks = detect_r_peaks(ecg.signal, ecg.fs)
    if len(peaks) < 2:
        return None
    frames = peaks_to_frames(peaks, ecg, ft)
    t = ecg.t0_s + np.asarray(peaks, dtype=np.float64) / ecg.fs
    if np.any((t > ft[-1] + 0.5 * dt) & (t <= ft[-1] + 1.5 * dt)):
        frames = np.append(frames, cine.num_frames)
    return np.unique(frames).astype(int)


def _ecg_period_frames(cine: Cine) -> Optional[float]:
    if cine.ecg is None or cine.ecg.signal.size == 0:
        return None

    peaks = detect_r_peaks(cine.ecg.signal, cine.ecg.fs)
    if len(peaks) < 2:
        return None
    return float(np.median(np.diff(peaks)) / cine.ecg.fs * cine.fps)


# ----------------------------------------------------------------------------- images
def peak_runs(v: np.ndarray, min_dist: int, rel_prominence: float = 0.3) -> list:
    """Maxima of v as runs (lo, hi) of frames within noise of the peak value; ends of v allowed."""
    span = float(v.max() - v.min())
    if span <= 0:
        return []
    pad = v.min() - 1e-9 * span - 1e-12
    idx, _ = find_peaks(np.concatenate([[pad], v, [pad]]), distance=max(1, min_dist),
                        prominence=rel_prominence * span)
    tol = max(3.0 * noise_level(v), 0.03 * span)
    runs = []
    for i in idx - 1:
        lo = hi = int(i)
        while lo > 0 and v[lo - 1] >= v[i] - tol:
            lo -= 1
        while hi < v.size - 1 and v[hi + 1] >= v[i] - tol:
            hi += 1
        runs.append((lo, hi))
    return sorted(set(runs))


def image_cycle_starts(cine: Cine, min_hr_bpm: float = 30, max_hr_bpm: float = 200) -> np.ndarray:
    """End-diastolic frames from the images alone (no ECG): the ED of every beat that
    ``image_beats.detect_image_beats`` finds, kept when the beat lengths fit the heart-rate range."""
    ed = np.asarray(detect_image_beats(cine).ed, dtype=int)
    if ed.size >= 2:
        hr = 60.0 * cine.fps / np.diff(ed)
        if not np.all((hr >= min_hr_bpm) & (hr <= max_hr_bpm)):
            keep = np.concatenate([[True], (hr >= min_hr_bpm) & (hr <= max_hr_bpm)])
            ed = ed[keep]
    return ed


# ----------------------------------------------------------------------------- cycles
def _pairs(starts: np.ndarray, fps: float, min_hr_bpm: float, max_hr_bpm: float) -> list:
    starts = np.unique(np.asarray(starts, dtype=int))
    if starts.size < 2:
        return []
    d = np.diff(starts)
    lo, hi = fps * 60.0 / max_hr_bpm, fps * 60.0 / min_hr_bpm
    med = float(np.median(d))
    ok = (d >= lo) & (d <= hi) & (d <= _MAX_RR_JUMP * med)
    return [(int(a), int(b)) for a, b, good in zip(starts[:-1], starts[1:], ok) if good]


def cycle_starts(cine: Cine, min_hr_bpm: float = 30, max_hr_bpm: float = 200, use_ecg: bool = True) -> np.ndarray:
    """ED / R-peak frames: from the ECG when one spans the clip, else from the images."""
    if use_ecg:
        frames = ecg_peak_frames(cine)
        if frames is not None:  # a usable ECG is trusted even when the clip holds no full beat
            return frames
    return image_cycle_starts(cine, min_hr_bpm, max_hr_bpm)


def split_cycles(cine: Cine, min_hr_bpm: float = 30, max_hr_bpm: float = 200,
                 use_ecg: bool = True) -> list[tuple[int, int]]:
    """Full cycles as (start, end) frame pairs, start at ED (inclusive), end at the next ED (exclusive)."""
    starts = cycle_starts(cine, min_hr_bpm, max_hr_bpm, use_ecg)
    return _pairs(starts, cine.fps, min_hr_bpm, max_hr_bpm)


def estimate_period_frames(cine: Cine, min_hr_bpm: float = 30, max_hr_bpm: float = 200) -> Optional[float]:
    """Cardiac period in frames (ECG median R-R if present, else image autocorrelation); None if unknown."""
    p = _ecg_period_frames(cine)
    if p is not None and _hr_in_range(p, cine.fps, min_hr_bpm, max_hr_bpm):
        return p
    x = frame_features(cine)
    if x.shape[0] < 4:
        return None
    return _period_from_features(x, cine.fps, min_hr_bpm, max_hr_bpm)


def _hr_in_range(period_frames: float, fps: float, min_hr_bpm: float, max_hr_bpm: float) -> bool:
    hr = 60.0 * fps / period_frames if period_frames > 0 else np.inf
    return bool(min_hr_bpm <= hr <= max_hr_bpm)


# ----------------------------------------------------------------------------- transforms
ArrayOrCine = Union[np.ndarray, Cine]


def reverse_pad(frames_or_cine: ArrayOrCine, ed: int = 0, es: Optional[int] = None) -> ArrayOrCine:
    """ED..ES half cycle -> full cycle ED..ES..(ED+1): ES..ED reversed appended, no endpoint twice."""
    arr = frames_or_cine.frames if isinstance(frames_or_cine, Cine) else np.asarray(frames_or_cine)
    es = arr.shape[0] - 1 if es is None else int(es)
    if not 0 <= ed <= es < arr.shape[0]:
        raise ValueError(f"need 0 <= ed <= es < {arr.shape[0]}, got ed={ed}, es={es}")
    half = arr[ed: es + 1]
    full = np.concatenate([half, half[-2:0:-1]], axis=0) if half.shape[0] > 2 else half.copy()
    if not isinstance(frames_or_cine, Cine):
        return full
    c = frames_or_cine

    src = replace(c.source, extra={**c.source.extra, "reverse_padded": [int(ed), int(es)]})
    return Cine(frames=full, fps=c.fps, spacing_mm=c.spacing_mm, ecg=None, source=src)


def resample_cycle(frames: np.ndarray, n_frames: int, mode: str = "linear", cyclic: bool = True) -> np.ndarray:
    """Resample ``[T, ...]`` to ``n_frames`` along time (cyclic: end wraps to the start, like a cycle)."""
    x = np.asarray(frames)
    T = x.shape[0]
    if T == 0 or n_frames < 1:
        raise ValueError(f"cannot resample {T} frames to {n_frames}")
    pos = np.arange(n_frames) * (T / n_frames) if cyclic else np.linspace(0, T - 1, n_frames)
    if mode == "nearest":
        idx = np.round(pos).astype(int)
        return x[idx % T if cyclic else np.clip(idx, 0, T - 1)]
    if mode != "linear":
        raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    i0 = np.floor(pos).astype(int)
    w = (pos - i0).reshape((-1,) + (1,) * (x.ndim - 1))
    i1 = (i0 + 1) % T if cyclic else np.minimum(i0 + 1, T - 1)
    out = (1.0 - w) * x[i0 % T] + w * x[i1]
    if np.issubdtype(x.dtype, np.integer):
        info = np.iinfo(x.dtype)
        out = np.clip(np.round(out), info.min, info.max)
    return out.astype(x.dtype)


@dataclass
class ClipWindow:
    """Frames to take for one model clip: ``frame_indices`` (length n_frames) into the cine."""

    start: int
    stop: int  # one past the last frame the window spans (n_frames * step frames from start)
    frame_indices: np.ndarray
    step: float
    full_cycle: bool
    cycle: Optional[tuple] = None  # the (start, end) cycle this window was cut for

    def take(self, frames: np.ndarray) -> np.ndarray:
        """The window's frames from a ``[T, ...]`` array."""
        return np.asarray(frames)[self.frame_indices]


def _window(start: int, n: int, step: float, T: int) -> np.ndarray:
    return np.minimum(start + np.floor(np.arange(n) * step + 1e-9).astype(int), T - 1)


def _stop(start: int, n: int, step: float, T: int) -> int:
    """One past the last frame a window spans (its n samples stand for n * step frames)."""
    return int(min(T, np.ceil(start + n * step - 1e-9)))


def clip_windows(cine: Cine, n_frames: int, stride: Optional[int] = None,
                 cycles: Optional[list] = None) -> list[ClipWindow]:
    """Windows of ``n_frames`` frames each holding >= one full cycle when possible (flagged if not).

    With known cycles and no ``stride``: one window per cycle, starting at its ED; the frame
    step is 1 when n_frames consecutive frames already cover the cycle, else cycle/n_frames
    (frames picked evenly over exactly one cycle). With ``stride``: windows every ``stride``
    frames with the step the median cycle needs. Without any cycle: consecutive frames."""
    T = cine.num_frames
    n = int(n_frames)
    if cycles is None:
        cycles = split_cycles(cine)
    out: list[ClipWindow] = []
    if cycles and stride is None:
        for a, b in cycles:
            L = b - a
            step = max(1.0, L / n)
            start = a
            if start + (n - 1) * step > T - 1:
                if step == 1.0 and T >= n:  # keep n consecutive frames that still hold the cycle
                    start = max(0, min(a, T - n))
                else:  # too few frames after ED: spread n frames over this one cycle
                    step = L / n
            idx = _window(start, n, step, T)
            stop = _stop(start, n, step, T)
            full = start <= a and stop >= b
            out.append(ClipWindow(int(start), stop, idx, float(step), bool(full), (int(a), int(b))))
        return out

    period = float(np.median([b - a for a, b in cycles])) if cycles else estimate_period_frames(cine)
    step = max(1.0, period / n) if period else 1.0
    span = int(np.ceil(n * step))
    stride = int(stride or max(1, span))
    starts = list(range(0, max(T - span, 0) + 1, stride)) or [0]
    for s in starts:
        idx = _window(s, n, step, T)
        covered = s + n * step
        need = max([b - a for a, b in cycles if a < covered and b > s], default=period or np.inf)
        full = period is not None and covered <= T and n * step >= need
        out.append(ClipWindow(int(s), _stop(s, n, step, T), idx, float(step), bool(full), None))
    return out
