"""Heartbeats of a cine without ECG, from the images alone: the period, every ED and ES, each with
a confidence.

Two volume-like signals of the upper scan sector (where apical views show the ventricles), both
largest at ED and smallest at ES: the blood-pool size (its dark share) and the principal motion
(the frames' first principal component); the one that repeats better per cine is used. Its
strongest, sharpest feature on real cines is the systolic downstroke (rapid ejection), so beats are found as
downstrokes about one period apart (period from the signal's autocorrelation, its fundamental
rather than a multiple); ED is the top of the signal just before each downstroke, ES its bottom
just after. A beat cut by the start or end of the clip is reported only where the clip shows
the extremum. Checked on real EchoNet-Dynamic cines (see docs/measurements.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import cv2
import numpy as np
from scipy import ndimage
from scipy.signal import detrend, find_peaks
from skimage.filters import threshold_otsu
from skimage.transform import resize

from EchoFMEngine.cine import Cine, luma
from EchoFMEngine.clinical.geometry import find_sector

SIGNAL_SIZE = 96          # the signal is computed at this many pixels (long side)
VENTRICLE_DEPTH = 0.6     # apical views: ventricles in the upper 60 % of the sector
MIN_HR_BPM, MAX_HR_BPM = 30.0, 220.0
MIN_SNR = 6.0             # swing of the signal over its frame-to-frame noise: white noise gives ~3
MIN_REPEAT = 0.2          # autocorrelation at the period below this: no heartbeat (noise repeats less)
MIN_QUALITY = 0.35        # autocorrelation at the period below this: the signal barely repeats
LOW_CONFIDENCE = 0.5      # an event whose stroke is under half the usual one is uncertain
BLOOD_POOL = "blood pool (dark share of the upper scan sector)"
PRINCIPAL_MOTION = "principal motion (first principal component of the upper scan sector)"


@dataclass
class ImageBeats:
    """ED/ES frames found from the images, a confidence in [0, 1] per event, the period (frames)
    and the repeat quality of the signal (its autocorrelation at the period)."""

    ed: list = field(default_factory=list)
    es: list = field(default_factory=list)
    ed_confidence: list = field(default_factory=list)
    es_confidence: list = field(default_factory=list)
    period_frames: Optional[float] = None
    quality: float = 0.0
    signal: Optional[np.ndarray] = None
    signal_name: str = ""
    signals: dict = field(default_factory=dict)  # every image signal by name (the ECG path reads the blood pool)
    reason: str = ""  # why nothing (or little) was found


def _upper_sector(cine: Cine) -> tuple[np.ndarray, np.ndarray]:
    """The frames cropped to the scan sector (``geometry.find_sector``), reduced to ~96 px and
    smoothed against speckle, and the mask of the sector's upper part where apical views show the
    ventricles: ``([T, h, w] float32, [h, w] bool)``. Frames are cropped and reduced before the
    conversion to float, so an 800x600 cine costs little more than a small one."""
    T, H, W = cine.shape
    sector = find_sector(cine.frames)
    if sector is None or not sector.any():
        sector = np.ones((H, W), dtype=bool)
    rows, cols = np.flatnonzero(sector.any(1)), np.flatnonzero(sector.any(0))
    frames = cine.frames[:, rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    sector = sector[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    if max(sector.shape) > 2 * SIGNAL_SIZE:  # a large cine: a cheap area reduction first, to twice the size
        f = 2 * SIGNAL_SIZE / max(sector.shape)
        h, w = int(round(sector.shape[0] * f)), int(round(sector.shape[1] * f))
        frames = np.stack([cv2.resize(x, (w, h), interpolation=cv2.INTER_AREA) for x in frames])
        sector = cv2.resize(sector.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    grey = luma(frames)
    scale = min(1.0, SIGNAL_SIZE / max(grey.shape[1:]))
    if scale < 1.0:
        shape = (max(8, int(round(grey.shape[1] * scale))), max(8, int(round(grey.shape[2] * scale))))
        grey = resize(grey, (T,) + shape, order=1, anti_aliasing=True, preserve_range=True)
        sector = resize(sector.astype(np.float32), shape, order=0) > 0.5
    grey = ndimage.gaussian_filter(grey.astype(np.float32), sigma=(0, 2.0, 2.0))
    region = sector.copy()
    region[int(np.ceil(VENTRICLE_DEPTH * region.shape[0])):] = False
    eroded = ndimage.binary_erosion(region, iterations=2)
    return grey, (eroded if eroded.any() else region)


def _blood_pool(values: np.ndarray) -> np.ndarray:
    """Share of dark (blood) pixels per frame of ``values`` ([T, N] sector pixels), graded around
    an Otsu threshold: speckle crossing the threshold moves it a little instead of flipping pixels."""
    T = values.shape[0]
    if values.size == 0 or np.ptp(values) == 0:
        return np.zeros(T)
    thr = float(threshold_otsu(values[:: max(1, T // 16)].ravel()))
    return np.clip(1.0 - values / (2.0 * thr), 0.0, 1.0).mean(axis=1) if thr > 0 else np.zeros(T)


def principal_motion(values: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """The frames' first principal component over the sector pixels: the strongest coherent change
    of the image (walls, valves and cavity together), signed to rise with the blood pool so that it
    too is largest at ED. It holds where drop-out or gain leaves the blood-pool share flat."""
    x = (values - values.mean(axis=0)).astype(np.float64)
    if not np.any(x):
        return np.zeros(values.shape[0])
    w, u = np.linalg.eigh(x @ x.T)  # the frames' Gram matrix: [T, T], far cheaper than an SVD of [T, pixels]
    pc = u[:, -1] * np.sqrt(max(float(w[-1]), 0.0))
    return -pc if np.ptp(pool) > 0 and np.corrcoef(pc, pool)[0, 1] < 0 else pc


def image_signals(cine: Cine) -> dict[str, np.ndarray]:
    """The volume-like signals the images give, by name: the blood-pool share and the principal
    motion of the upper sector (see :func:`blood_pool_signal`, :func:`principal_motion`)."""
    grey, region = _upper_sector(cine)
    values = grey[:, region]
    pool = _blood_pool(values)
    return {BLOOD_POOL: pool, PRINCIPAL_MOTION: principal_motion(values, pool)}


def blood_pool_signal(cine: Cine) -> np.ndarray:
    """Share of dark (blood) pixels per frame in the upper part of the scan sector: a cavity-size
    proxy for apical views, highest at ED and lowest at ES."""
    grey, region = _upper_sector(cine)
    return _blood_pool(grey[:, region])


def noise_level(v: np.ndarray) -> float:
    """Robust frame-to-frame noise of a 1-D signal (MAD of its residual from a 3-frame median)."""
    if v.size < 3:
        return 0.0
    med = np.median(np.stack([v[:-2], v[1:-1], v[2:]]), axis=0)
    return float(1.4826 * np.median(np.abs(v[1:-1] - med)))


def _autocorrelation(v: np.ndarray, max_lag: int) -> np.ndarray:
    v = v - v.mean()
    n = v.size
    out = np.zeros(max_lag + 1)
    for k in range(min(max_lag, n - 2) + 1):
        a, b = v[: n - k], v[k:]
        out[k] = float(a @ b) / max(float(np.sqrt((a @ a) * (b @ b))), 1e-12)
    return out


def signal_period(v: np.ndarray, fps: float, min_hr_bpm: float = MIN_HR_BPM,
                  max_hr_bpm: float = MAX_HR_BPM) -> tuple[Optional[float], float]:
    """(period in frames, autocorrelation there) of a 1-D signal; (None, 0) if the clip holds
    under ~1.3 periods or nothing repeats. Of the autocorrelation peaks, a sub-multiple of the
    strongest that repeats at least half as well is the fundamental (skipped beats are the
    failure that matters on real cines)."""
    n = v.size
    lo = max(2, int(np.floor(fps * 60.0 / max_hr_bpm)))
    hi = min(int(np.ceil(fps * 60.0 / min_hr_bpm)), int(n / 1.3))
    if hi <= lo + 1 or np.ptp(v) == 0:
        return None, 0.0
    a = _autocorrelation(detrend(v), hi + 1)
    peaks = [int(k) for k in find_peaks(a)[0] if lo <= k <= hi]
    if not peaks:
        return None, 0.0
    best = max(peaks, key=lambda k: a[k])
    for div in (4, 3, 2):
        near = [k for k in peaks if abs(k * div - best) <= max(2.0, 0.12 * best)]
        if near:
            k = max(near, key=lambda k: a[k])
            if a[k] >= 0.5 * a[best] and a[k] > 0.2:
                best = k
                break
    k = best
    if a[k] < MIN_REPEAT:
        return None, float(a[k])
    den = a[k - 1] - 2 * a[k] + a[k + 1]
    return float(k + (0.5 * (a[k - 1] - a[k + 1]) / den if den < 0 else 0.0)), float(a[k])


def _strokes(s: np.ndarray, period: float) -> list[dict]:
    """Systolic downstrokes of the smoothed volume-like signal ``s``: steepest descents about a
    period apart, each with the height of the top before it and the bottom after it."""
    T = s.size
    d = -np.gradient(s)
    peaks = find_peaks(d, distance=max(2, int(0.5 * period)), prominence=0.25 * np.percentile(d, 95))[0]
    reach = int(round(0.6 * period))
    out = []
    for i, p in enumerate(peaks):
        lo = max(0, p - reach, peaks[i - 1] + 1 if i else 0)
        hi = min(T - 1, p + reach, peaks[i + 1] - 1 if i + 1 < len(peaks) else T - 1)
        out.append({"p": int(p), "amp": float(s[lo: p + 1].max() - s[p: hi + 1].min())})
    if not out:
        return out
    usual = float(np.median([b["amp"] for b in out]))
    out = [b for b in out if b["amp"] >= 0.35 * usual]  # ripples, not strokes
    while len(out) > 1:  # two strokes in one period: the weaker is not a beat
        close = [i for i in range(len(out) - 1) if out[i + 1]["p"] - out[i]["p"] < 0.6 * period]
        if not close:
            break
        i = close[0]
        out.pop(i if out[i]["amp"] < out[i + 1]["amp"] else i + 1)
    return out


def _without_drift(v: np.ndarray, period: float) -> np.ndarray:
    """``v`` less a linear drift (a gain or depth ramp over the clip) where the drift over the clip
    exceeds half the signal's swing, else ``v`` itself. The drift is the median change between
    frames one period apart, which a periodic signal leaves at zero wherever the clip starts or
    ends (a straight-line fit would tilt with a partial beat)."""
    k = int(round(period))
    if v.size <= k:
        return v
    slope = float(np.median(v[k:] - v[:-k])) / k
    swing = float(np.percentile(v, 95) - np.percentile(v, 5))
    return v - slope * np.arange(v.size) if abs(slope) * v.size > 0.5 * swing else v


def _half_if_skipped(v: np.ndarray, s: np.ndarray, period: float, fps: float) -> float:
    """Half the ``period`` where every other beat was skipped: the signal also repeats at half of
    it, and strokes searched at half the period are at least 1.5x as many, each at least half the
    usual stroke, evenly spaced (CV under 0.2). Beats that alternate in size repeat better at two
    beats than at one, which the autocorrelation alone reads as one slow beat."""
    lo = max(2, int(np.floor(fps * 60.0 / MAX_HR_BPM)))
    a = _autocorrelation(detrend(v), int(period) + 2)
    if not any(lo <= k and abs(2 * k - period) <= max(2.0, 0.12 * period) and a[k] >= MIN_REPEAT
               for k in find_peaks(a)[0]):
        return period
    whole, half = _strokes(s, period), _strokes(s, period / 2)
    if len(half) < max(3, 1.5 * len(whole)):
        return period
    usual = float(np.median([b["amp"] for b in whole]))
    gaps = np.diff([b["p"] for b in half])
    if min(b["amp"] for b in half) < 0.5 * usual or gaps.std() > 0.2 * gaps.mean():
        return period
    return period / 2


def _top_before(s: np.ndarray, lo: int, p: int, tol: float) -> int:
    """ED: between the highest frame and the last frame near the top before the stroke at ``p``
    (the top of a slowly rising diastasis is flat within noise)."""
    w = s[lo: p + 1]
    near = np.flatnonzero(w >= w.max() - tol)
    return lo + int(round(0.4 * int(np.argmax(w)) + 0.6 * near[-1]))


def _bottom_after(s: np.ndarray, p: int, hi: int) -> int:
    """ES: the lowest frame of the smoothed signal after the stroke at ``p`` (up to ``hi``). Placing it
    earlier, toward the first frame near the bottom, put ES early on the traced cines and by ~3
    frames at 120 fps on phantoms warped from real frames."""
    return p + int(np.argmin(s[p: hi + 1]))


def beats_from_signal(v: np.ndarray, fps: float, period: Optional[float] = None) -> ImageBeats:
    """ED/ES of every beat from a volume-like signal (largest at ED): one systolic downstroke per
    beat; see the module docstring. Confidence = the beat's stroke relative to the usual one,
    times how well the signal repeats."""
    v = np.asarray(v, dtype=np.float64)
    T = v.size
    quality = 1.0
    s = ndimage.gaussian_filter1d(v, max(1.0, 0.02 * fps))
    swing = float(np.percentile(s, 95) - np.percentile(s, 5))
    if swing < MIN_SNR * max(noise_level(v), 1e-6):
        return ImageBeats(signal=v, quality=0.0, reason="the image signal is noise-like (its swing is within a "
                                                        "few times its frame-to-frame noise): no heartbeat")
    raw = v
    if period is None:
        period, quality = signal_period(v, fps)
        if period is not None:
            v = _without_drift(v, period)
            if v is not raw:
                s = ndimage.gaussian_filter1d(v, max(1.0, 0.02 * fps))
            period = _half_if_skipped(v, s, period, fps)
    if period is None:
        return ImageBeats(signal=v, quality=quality,
                          reason="no repeating heartbeat in the images (clip shorter than ~1.3 beats, "
                                 "no motion, or not a cardiac cine)")
    strokes = _strokes(s, period)
    found = ImageBeats(period_frames=float(period), quality=float(quality), signal=raw)
    if not strokes:
        found.reason = "no systolic downstroke found in the images"
        return found
    usual = float(np.median([b["amp"] for b in strokes]))
    reach = int(round(0.6 * period))
    noise = noise_level(v)
    pending = None  # an ES after the last stroke that the clip may cut
    end_bottom = None  # an ES the clip may end on
    for i, b in enumerate(strokes):
        p, amp = b["p"], b["amp"]
        conf = float(np.clip(amp / usual, 0.0, 1.0) * np.clip(quality / 0.6, 0.0, 1.0))
        lo = min(p, max(0, p - reach, found.es[-1] + 1 if found.es else 0))
        w = s[lo: p + 1]
        cut = lo == 0 and p - reach < 0  # the clip may start after this beat's ED
        if not (cut and (int(np.argmax(w)) < 1 or amp < 0.5 * usual)):
            found.ed.append(_top_before(s, lo, p, 0.1 * amp))
            found.ed_confidence.append(round(conf, 3))
        hi = min(T - 1, p + reach, strokes[i + 1]["p"] if i + 1 < len(strokes) else T - 1)
        g = _bottom_after(s, p, hi)
        refill = float(s[g:].max() - s[g]) if g < T - 1 else 0.0
        if g < T - 2 and (refill >= 0.3 * amp or i + 1 < len(strokes)):  # the clip shows the bottom
            found.es.append(g)
            found.es_confidence.append(round(conf, 3))
        elif g < T - 1 and refill > 2 * noise:
            pending = (g, conf)
        elif i + 1 == len(strokes) and T - 1 - p >= 0.1 * period:
            end_bottom = g
    _edge_events(s, v, found, usual, quality, noise, pending, end_bottom, max(1, int(round(0.08 * fps))),
                 int(round(0.12 * period)))
    return found


def _levels_off(v: np.ndarray, k: int) -> bool:
    """Whether the raw signal ``v`` has its bottom at frame 0: a parabola fitted to its first
    ``k`` frames opens upwards with its vertex nearest frame 0 or later. A clip cut at ES starts
    at the bottom; one cut in a refill starts on a slope whose bottom lies before the clip."""
    k = min(max(4, k), v.size)
    if k < 4:
        return False
    a, b, _ = np.polyfit(np.arange(k, dtype=np.float64), v[:k], 2)
    return bool(a > 0 and -b / (2 * a) >= -0.5)


def _edge_events(s: np.ndarray, v: np.ndarray, found: ImageBeats, usual: float, quality: float, noise: float,
                 pending, end_bottom, min_gap: int, edge_frames: int) -> None:
    """Events the clip's ends cut from their strokes, kept at half confidence where the clip shows
    the extremum at the usual level: an ES before the first ED (the clip starts in systole), an ES
    whose refilling the clip's end cuts (or that the clip ends on, flat), and an ED after the last
    ES whose stroke it cuts."""
    T = s.size
    half = round(0.5 * float(np.clip(quality / 0.6, 0.0, 1.0)), 3)
    ed_level = float(np.median(s[found.ed])) if found.ed else float(s.max())
    es_level = float(np.median(s[found.es])) if found.es else ed_level - usual
    if pending is not None and s[pending[0]] <= es_level + 0.1 * usual:
        found.es.append(int(pending[0]))
        found.es_confidence.append(half)
    elif end_bottom is not None and s[end_bottom] <= es_level + 0.05 * usual \
            and _levels_off(v[::-1], edge_frames):  # the clip ends at a bottom
        found.es.append(int(end_bottom))
        found.es_confidence.append(half)
    if found.ed and (not found.es or found.es[0] > found.ed[0]) and found.ed[0] >= 3:
        g = int(np.argmin(s[: found.ed[0]]))
        # at frame 0 only a bottom the signal leaves slowly: a steep rise there is a refill already under way
        bottom = g >= 1 or (_levels_off(v, edge_frames) and s[0] <= es_level + 0.05 * usual)
        if bottom and g <= found.ed[0] - min_gap and s[g] <= es_level + 0.15 * usual \
                and s[found.ed[0]] - s[g] >= 0.5 * usual:
            found.es.insert(0, g)
            found.es_confidence.insert(0, half)
    if found.es and found.ed and found.es[0] < found.ed[0] and found.es[0] >= min_gap:
        m = int(np.argmax(s[: found.es[0]]))  # the clip starts at the top of the first stroke
        top = s[m] >= ed_level - 0.05 * usual if m == 1 else s[m] >= ed_level  # frame 0 may be mid-stroke
        if m <= 1 and top and s[m] - s[found.es[0]] >= 0.5 * usual \
                and found.ed[0] - m >= 0.8 * (found.period_frames or 0):
            found.ed.insert(0, m)
            found.ed_confidence.insert(0, half)
    if found.es and found.ed and found.ed[-1] < found.es[-1] and T - found.es[-1] > 3:
        m = found.es[-1] + 1 + int(np.argmax(s[found.es[-1] + 1:]))
        reached = s[m] >= ed_level - 0.05 * usual or (s[m] >= ed_level - 0.15 * usual and s[m] - s[-1] >= 2 * noise)
        flat_end = m < T - 1  # the last frame is a top, not a rise the clip cuts
        if flat_end and reached \
                and m - found.ed[-1] >= 0.8 * (found.period_frames or 0) and m - found.es[-1] >= min_gap:
            found.ed.append(m)
            found.ed_confidence.append(half)


def detect_image_beats(cine: Cine, extra_signals: Optional[dict] = None) -> ImageBeats:
    """ED/ES of every beat of ``cine`` from its images (no ECG, no masks): each image signal gives
    a beat train, and the one whose signal repeats best (autocorrelation at its period) is kept.
    ``extra_signals`` ({name: [T] signal, largest at ED}) join the candidates, e.g. an encoder's."""
    if cine.num_frames < 4:
        return ImageBeats(reason=f"a cine of {cine.num_frames} frame(s) shows no heartbeat")
    best, signals = None, image_signals(cine)
    for name, v in (extra_signals or {}).items():
        v = np.asarray(v, dtype=np.float64)
        if v.shape != (cine.num_frames,):
            raise ValueError(f"extra image signal {name!r}: shape {v.shape}, expected ({cine.num_frames},)")
        signals[name] = v
    for name, v in signals.items():
        if np.ptp(v) < 1e-6:
            continue
        found = beats_from_signal(v, cine.fps)
        found.signal_name = name
        if best is None or (found.period_frames is not None, found.quality) > (best.period_frames is not None,
                                                                                best.quality):
            best = found
    if best is None:
        best = ImageBeats(signal=np.zeros(cine.num_frames), signal_name=BLOOD_POOL,
                          reason="the images do not change: no motion to find beats in")
    best.signals = signals
    return best
