"""End-diastole (ED) and end-systole (ES) frames of a cine loop, every cycle in the clip.

Order of preference: the ECG (ED at each R peak; ES in each R-R interval from the masks when
given, else from the images), the LV area curve of segmentation masks (ED = largest,
ES = smallest per cycle), then the images alone (no weights needed): a blood-pool signal,
the dark area inside the scan sector's upper part where apical views show the ventricles,
largest at ED and smallest at ES. Events alternate ED, ES, ED, ...; two events of the same
kind are never closer than ``MIN_SAME_KIND_S`` (one beat at 220 bpm) and an ED and an ES
never closer than ``MIN_OPPOSITE_S``. Events are reported only where the clip shows them:
an extremum cut by the start or end of the clip counts only if it reaches the level of the
inner ones; nothing is extrapolated beyond the frames.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from EchoFMEngine.cine import Cine

MAX_HR_BPM = 220.0
MIN_SAME_KIND_S = 60.0 / MAX_HR_BPM  # 0.273 s: two EDs (or two ESs) are at least one beat apart
MIN_OPPOSITE_S = 0.08                # shortest systole / diastole between an ED and an ES
_SIGNAL_SIZE = 96                    # the image signal is computed at this many pixels (long side)
_VENTRICLE_DEPTH = 0.6               # apical views: ventricles in the upper 60 % of the sector


@dataclass
class Phase:
    """ED and ES frames (sorted), heart rate, the method that found them and notes on limits."""

    ed_frames: list
    es_frames: list
    heart_rate_bpm: Optional[float]
    method: str  # "ecg" | "masks" | "image"
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready copy."""
        hr = self.heart_rate_bpm
        return {"ed_frames": [int(f) for f in self.ed_frames], "es_frames": [int(f) for f in self.es_frames],
                "heart_rate_bpm": None if hr is None else round(float(hr), 2), "method": self.method,
                "notes": list(self.notes)}


# ----------------------------------------------------------------------------- signals
def lv_area_curve(masks, lv_labels: Sequence[int] = (1,)) -> np.ndarray:
    """LV pixel count per frame of label maps ``[T, H, W]``; NaN where a frame has no LV label."""
    m = np.asarray(masks)
    area = np.isin(m, list(lv_labels)).reshape(m.shape[0], -1).sum(axis=1).astype(np.float64)
    area[area == 0] = np.nan
    return area


def blood_pool_signal(cine: Cine) -> np.ndarray:
    """Share of dark (blood) pixels per frame in the upper part of the scan sector: a cavity-size
    proxy for apical views, highest at ED and lowest at ES.

    Frames are cropped to the sector (``geometry.find_sector``), reduced to ~96 px and smoothed
    against speckle; darkness is graded around an Otsu threshold of the sector's pixels."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu
    from skimage.transform import resize

    from EchoFMEngine.geometry import find_sector

    grey = cine.grey()
    T, H, W = grey.shape
    sector = find_sector(cine.frames)
    if sector is None or not sector.any():
        sector = np.ones((H, W), dtype=bool)
    rows, cols = np.flatnonzero(sector.any(1)), np.flatnonzero(sector.any(0))
    grey = grey[:, rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    sector = sector[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    scale = min(1.0, _SIGNAL_SIZE / max(grey.shape[1:]))
    if scale < 1.0:
        shape = (max(8, int(round(grey.shape[1] * scale))), max(8, int(round(grey.shape[2] * scale))))
        grey = resize(grey, (T,) + shape, order=1, anti_aliasing=True, preserve_range=True)
        sector = resize(sector.astype(np.float32), shape, order=0) > 0.5
    grey = ndimage.gaussian_filter(grey.astype(np.float32), sigma=(0, 2.0, 2.0))
    region = sector.copy()
    region[int(np.ceil(_VENTRICLE_DEPTH * region.shape[0])):] = False
    region = ndimage.binary_erosion(region, iterations=2) if ndimage.binary_erosion(region, iterations=2).any() \
        else region
    values = grey[:, region]
    if values.size == 0 or np.ptp(values) == 0:
        return np.zeros(T)
    thr = float(threshold_otsu(values[:: max(1, T // 16)].ravel()))
    # soft membership (1 at black, 0 at twice the threshold): speckle crossing the threshold
    # moves it a little instead of flipping pixels
    return np.clip(1.0 - values / (2.0 * thr), 0.0, 1.0).mean(axis=1) if thr > 0 else np.zeros(T)


# ----------------------------------------------------------------------------- events
def _frames(seconds: float, fps: float) -> int:
    return max(1, int(np.floor(seconds * fps)))


def _extrema(v: np.ndarray, kind: str, min_dist: int) -> list:
    """Events of one kind from a cavity-size signal (ED: maxima, ES: minima) as (frame, kind, value):
    the centre of each run of frames within noise of a peak (``cycles.peak_runs``). A run cut by
    the clip's start or end counts only if its top lies inside the clip and reaches the level of
    the inner peaks (so never without inner peaks); its centre is then placed as for a run of
    the usual length."""
    from EchoFMEngine.cycles import peak_runs

    n = v.size
    s = v if kind == "ed" else -v
    runs = peak_runs(s, min_dist)
    inner = [(lo, hi) for lo, hi in runs if lo > 0 and hi < n - 1]
    length = float(np.median([hi - lo + 1 for lo, hi in inner])) if inner else None
    height = float(np.median([s[lo: hi + 1].max() for lo, hi in inner])) if inner else None
    tol = 0.1 * float(np.ptp(s))
    out = []
    for lo, hi in runs:
        c = (lo + hi) / 2
        if lo == 0 or hi == n - 1:
            if lo == 0 and hi == n - 1:
                continue
            seg = s[lo: hi + 1]
            # top farthest from the cut end (a flat plateau has ties)
            top = lo + (int(np.flatnonzero(seg == seg.max())[-1]) if lo == 0 else int(np.argmax(seg)))
            if top in (0, n - 1) or height is None or s[top] < height - tol:
                continue  # the clip may end on the way to (or start on the way from) the extremum
            if length is not None and lo == 0 and hi + 1 < length:
                c = hi - (length - 1) / 2
            elif length is not None and hi == n - 1 and n - lo < length:
                c = lo + (length - 1) / 2
        f = int(np.floor(c + 0.5))
        if 0 <= f < n:
            out.append((f, kind, float(v[f])))
    return out


def _better(a: tuple, b: tuple) -> tuple:
    """Of two events of the same kind, the more extreme one (larger cavity for ED, smaller for ES)."""
    if a[1] == "ed":
        return a if a[2] >= b[2] else b
    return a if a[2] <= b[2] else b


def _clean_events(events: list, min_same: int, min_opposite: int, fixed: str = "") -> list:
    """Drop events until kinds alternate, same-kind events are >= ``min_same`` frames apart and an
    ED and an ES >= ``min_opposite``; of two competing events the more extreme one stays. Events of
    kind ``fixed`` (ECG R peaks) are facts: two in a row are kept (no ES found between them) and of
    two closer than ``min_same`` the first stays."""
    ev = sorted(events)
    while True:
        drop = None
        for a, b in zip(ev[:-1], ev[1:]):
            if a[1] == b[1] and a[1] != fixed:
                drop = b if _better(a, b) is a else a
            elif a[1] != b[1] and b[0] - a[0] < min_opposite:
                drop = a if b[1] == fixed else b
            if drop is not None:
                break
        if drop is None:
            for kind in ("ed", "es"):
                same = [e for e in ev if e[1] == kind]
                for a, b in zip(same[:-1], same[1:]):
                    if b[0] - a[0] < min_same:
                        drop = b if kind == fixed or _better(a, b) is a else a
                        break
                if drop is not None:
                    break
        if drop is None:
            return ev
        ev.remove(drop)


def _es_between(v: np.ndarray, lo: int, hi: int) -> Optional[int]:
    """Centre of the lowest run of ``v`` strictly inside (lo, hi); None if the window is empty."""
    from EchoFMEngine.cycles import noise_level

    lo, hi = max(lo + 1, 0), min(hi - 1, v.size - 1)
    if hi < lo:
        return None
    seg = v[lo: hi + 1]
    if not np.isfinite(seg).any():
        return None
    k = int(np.nanargmin(seg))
    tol = max(3.0 * noise_level(v[np.isfinite(v)]), 0.03 * float(np.nanmax(v) - np.nanmin(v)))
    a = b = k
    while a > 0 and seg[a - 1] <= seg[k] + tol:
        a -= 1
    while b < seg.size - 1 and seg[b + 1] <= seg[k] + tol:
        b += 1
    return lo + int(round((a + b) / 2))


def _es_in_partial(v: np.ndarray, lo: int, hi: int, level: Optional[float], span: float) -> Optional[int]:
    """ES in the part of the clip before the first or after the last ED: the lowest frame of
    ``[lo, hi]``, only if it is not the clip's first or last frame (the minimum could lie
    beyond) and reaches the usual ES level."""
    lo, hi = max(lo, 0), min(hi, v.size - 1)
    if hi - lo < 1:
        return None
    seg = v[lo: hi + 1]
    if not np.isfinite(seg).any():
        return None
    ties = np.flatnonzero(seg == np.nanmin(seg))
    f = lo + int(ties[-1] if lo == 0 else ties[0])  # of equal minima, the one farthest from the clip's end
    if f in (0, v.size - 1):
        return None
    if level is not None and v[f] > level + 0.25 * span:
        return None
    return f


def _es_per_cycle(v: np.ndarray, bounds: list, period: Optional[float]) -> list:
    """ES in every ED-ED interval of ``bounds`` (ED frames, ``T`` may close the last cycle) and,
    with a known ``period`` (frames), before the first and after the last ED."""
    T = v.size
    es = [f for a, b in zip(bounds[:-1], bounds[1:]) if (f := _es_between(v, a, b)) is not None]
    if not bounds or not period:
        return es
    finite = v[np.isfinite(v)]
    span = float(finite.max() - finite.min()) if finite.size else 0.0
    level = float(np.median(v[es])) if es else None
    first, last = bounds[0], bounds[-1]
    gap = max(1, int(round(0.15 * period)))
    before = _es_in_partial(v, 0, first - gap, level, span) if first - gap >= 1 else None
    after = _es_in_partial(v, last + gap, T - 1, level, span) if last < T else None
    return sorted(set(es + [f for f in (before, after) if f is not None]))


def _ecg_heart_rate(cine: Cine) -> float:
    """60 / mean R-R of the beats within 1 s of the clip (the mean, as irregular rhythms are
    reported); intervals over 1.8x the median hide a missed beat and are left out."""
    from EchoFMEngine.ecg import detect_r_peaks

    ecg, ft = cine.ecg, cine.frame_times_s
    t = ecg.t0_s + detect_r_peaks(ecg.signal, ecg.fs) / ecg.fs
    rr = np.diff(t[(t >= ft[0] - 1.0) & (t <= ft[-1] + 1.0)])
    rr = rr[(rr > 0) & (rr <= 1.8 * np.median(rr))] if rr.size else rr
    return float(60.0 / rr.mean()) if rr.size else float("nan")


def _hr_from_events(ed: list, fps: float) -> Optional[float]:
    if len(ed) < 2:
        return None
    return float(60.0 * fps / np.mean(np.diff(ed)))  # the mean: irregular rhythms are averaged


def _masks_checked(masks, cine: Cine) -> np.ndarray:
    m = np.asarray(masks)
    if m.shape != cine.shape:
        raise ValueError(f"masks have shape {m.shape} but the cine's frames are {cine.shape} [T, H, W]: "
                         "masks do not match the frames")
    return m


def _from_masks(area: np.ndarray, fps: float, notes: list) -> Optional[tuple[list, list]]:
    """ED/ES from an LV area curve; short gaps (<= 2 frames) are interpolated, sparse curves give
    one ED (largest) and one ES (smallest) among the segmented frames."""
    T = area.size
    have = np.isfinite(area)
    if have.sum() < 2:
        notes.append(f"masks: LV present in {int(have.sum())} frame(s), too few for ED/ES")
        return None
    if have.sum() < 0.8 * T:
        idx = np.flatnonzero(have)
        ed, es = int(idx[np.argmax(area[idx])]), int(idx[np.argmin(area[idx])])
        notes.append(f"masks cover {int(have.sum())} of {T} frames: ED = largest and ES = smallest LV "
                     "among them (one of each)")
        return ([ed], [es]) if ed != es else None
    v = area.copy()
    if not have.all():
        idx = np.arange(T)
        v[~have] = np.interp(idx[~have], idx[have], area[have])
        notes.append(f"masks: {int((~have).sum())} frame(s) without LV interpolated in the area curve")
    min_same, min_opp = _frames(MIN_SAME_KIND_S, fps), _frames(MIN_OPPOSITE_S, fps)
    events = _extrema(v, "ed", min_same) + _extrema(v, "es", min_same)
    events = _clean_events(events, min_same, min_opp)
    return [e[0] for e in events if e[1] == "ed"], [e[0] for e in events if e[1] == "es"]


def _period(cine: Cine, ed: list) -> Optional[float]:
    if len(ed) >= 2:
        return float(np.median(np.diff(ed)))
    from EchoFMEngine.cycles import estimate_period_frames

    return estimate_period_frames(cine)


def _from_image(cine: Cine, notes: list) -> tuple[list, list, Optional[float]]:
    """ED from the images' cycle starts (``cycles.image_cycle_starts``), ES as the blood-pool
    minimum of each cycle; without a detectable period, only clear extrema of the blood pool."""
    from EchoFMEngine.cycles import noise_level, image_cycle_starts

    T, fps = cine.num_frames, cine.fps
    v = blood_pool_signal(cine)
    starts = [int(f) for f in image_cycle_starts(cine, max_hr_bpm=MAX_HR_BPM)]
    min_same, min_opp = _frames(MIN_SAME_KIND_S, fps), _frames(MIN_OPPOSITE_S, fps)
    if starts:
        period = _period(cine, starts)
        es = [f for f in _es_per_cycle(v, starts, period) if f < T]
        events = [(f, "ed", float(v[f])) for f in starts if f < T] + [(f, "es", float(v[f])) for f in es]
    else:
        period = None
        notes.append("images: no repeating heartbeat found (clip shorter than ~1.5 cycles, or no motion): "
                     "only clear extrema of the blood-pool signal are reported")
        events = []
        span = float(np.ptp(v))
        if span > 8.0 * noise_level(v):
            # an ED is followed by ejection, an ES preceded by it or followed by filling: keep
            # extrema with a swing of half the signal's range next to them (a diastasis bump has none)
            ed = [e for e in _extrema(v, "ed", min_same) if v[e[0]] - v[e[0]:].min() >= 0.5 * span]
            es = [e for e in _extrema(v, "es", min_same)
                  if max(v[: e[0] + 1].max(), v[e[0]:].max()) - v[e[0]] >= 0.5 * span]
            events = ed + es
    events = _clean_events(events, min_same, min_opp)
    return [e[0] for e in events if e[1] == "ed"], [e[0] for e in events if e[1] == "es"], period


def detect_ed_es(cine: Cine, masks=None, lv_labels: Sequence[int] = (1,)) -> Phase:
    """ED and ES frames of every cycle in ``cine``: ECG, else LV masks (label maps ``[T, H, W]``),
    else images. ValueError for a single frame or masks that do not match the frames."""
    from EchoFMEngine.cycles import ecg_peak_frames

    T = cine.num_frames
    if T < 2:
        raise ValueError(f"ED/ES need a cine loop of at least two frames, got {T}")
    notes: list = []
    fps = cine.fps
    area = None
    if masks is not None:
        area = lv_area_curve(_masks_checked(masks, cine), lv_labels)
    min_same, min_opp = _frames(MIN_SAME_KIND_S, fps), _frames(MIN_OPPOSITE_S, fps)

    r_frames = ecg_peak_frames(cine)
    if r_frames is not None:
        hr = _ecg_heart_rate(cine)
        closing = [int(f) for f in r_frames if f >= T]  # an R peak just after the clip closes the last cycle
        ed = [int(f) for f in r_frames if f < T]
        bounds = ed + closing
        use_masks = area is not None and np.isfinite(area).sum() >= 0.8 * T
        if use_masks:
            v, src = np.where(np.isfinite(area), area, np.nan), "masks (LV area)"
        else:
            v, src = blood_pool_signal(cine), "images (blood pool)"
            if area is not None:
                notes.append("masks cover too few frames for the LV area curve: ES from the images")
        period = _period(cine, [int(f) for f in r_frames])
        es = _es_per_cycle(v, bounds, period)
        es = [f for f in es if f < T]
        events = [(f, "ed", np.inf) for f in ed] + [(f, "es", float(v[f])) for f in es]
        events = _clean_events(events, min_same, min_opp, fixed="ed")
        notes.insert(0, f"ED at the ECG R peaks; ES from the {src} in each R-R interval")
        if not ed:
            notes.append("no R peak inside the clip")
        return Phase([e[0] for e in events if e[1] == "ed"], [e[0] for e in events if e[1] == "es"],
                     None if not np.isfinite(hr) else float(hr), "ecg", notes)

    if area is not None:
        found = _from_masks(area, fps, notes)
        if found is not None:
            ed, es = found
            notes.insert(0, "ED = largest and ES = smallest LV area per cycle (masks)")
            return Phase(ed, es, _hr_from_events(ed, fps), "masks", notes)
        notes.append("masks unusable for ED/ES: falling back to the images")

    ed, es, period = _from_image(cine, notes)
    notes.insert(0, "ED/ES from the images alone (ED: cycle starts of the frame sequence; ES: smallest "
                    "blood-pool area in the upper scan sector, apical views)")
    if len(ed) < 2:
        notes.append("fewer than two ED frames: the clip holds no full cycle")
    hr = _hr_from_events(ed, fps)
    if hr is None and period:
        hr = 60.0 * fps / period
    return Phase(ed, es, hr, "image", notes)


# ----------------------------------------------------------------------------- evaluation
def event_accuracy(detected: Sequence[int], truth: Sequence[int], tolerance: int = 3) -> dict:
    """How many ``truth`` frames have a detected frame within ``tolerance`` frames (one-to-one,
    nearest first), and how many detections match nothing (false events)."""
    d = sorted(int(x) for x in detected)
    used = set()
    hits = 0
    for t in sorted(int(x) for x in truth):
        cand = [(abs(x - t), i) for i, x in enumerate(d) if i not in used and abs(x - t) <= tolerance]
        if cand:
            used.add(min(cand)[1])
            hits += 1
    return {"truth": len(truth), "hits": hits, "false": len(d) - len(used)}
