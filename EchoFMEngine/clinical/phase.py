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
from EchoFMEngine.clinical.cycles import ecg_peak_frames, estimate_period_frames, peak_runs
from EchoFMEngine.clinical.ecg import detect_r_peaks, ecg_quality
from EchoFMEngine.clinical.image_beats import (BLOOD_POOL, LOW_CONFIDENCE, MIN_QUALITY, ImageBeats,
                                              blood_pool_signal, detect_image_beats, noise_level)

MAX_HR_BPM = 220.0
MIN_SAME_KIND_S = 60.0 / MAX_HR_BPM  # 0.273 s: two EDs (or two ESs) are at least one beat apart
MIN_OPPOSITE_S = 0.08                # shortest systole / diastole between an ED and an ES
ECG_MIN_QUALITY = 0.6                # template correlation: clean ECG ~0.99, white noise ~0.4
ECG_IMAGE_AGREEMENT = 0.25           # ECG and image heart rates differing by more: the ECG is not this cine's


@dataclass
class Phase:
    """ED and ES frames (sorted), heart rate, the method that found them and notes on limits."""

    ed_frames: list
    es_frames: list
    heart_rate_bpm: Optional[float]
    method: str  # "ecg" | "masks" | "image"
    notes: list = field(default_factory=list)
    ed_confidence: list = field(default_factory=list)  # one value in [0, 1] per ED frame
    es_confidence: list = field(default_factory=list)
    flags: list = field(default_factory=list)  # [{"name": ..., "reason": ...}]: results not to trust blindly
    signal: Optional[np.ndarray] = field(default=None, repr=False)  # what the events were read from
    signal_name: str = ""

    def flag(self, name: str, reason: str) -> None:
        if all(f["name"] != name for f in self.flags):
            self.flags.append({"name": name, "reason": reason})

    def to_dict(self) -> dict:
        """JSON-ready copy (without the signal)."""
        hr = self.heart_rate_bpm
        return {"ed_frames": [int(f) for f in self.ed_frames], "es_frames": [int(f) for f in self.es_frames],
                "heart_rate_bpm": None if hr is None else round(float(hr), 2), "method": self.method,
                "ed_confidence": [round(float(c), 3) for c in self.ed_confidence],
                "es_confidence": [round(float(c), 3) for c in self.es_confidence],
                "flags": [dict(f) for f in self.flags], "signal": self.signal_name, "notes": list(self.notes)}


# ----------------------------------------------------------------------------- signals
def lv_area_curve(masks, lv_labels: Sequence[int] = (1,)) -> np.ndarray:
    """LV pixel count per frame of label maps ``[T, H, W]``; NaN where a frame has no LV label."""
    m = np.asarray(masks)
    area = np.isin(m, list(lv_labels)).reshape(m.shape[0], -1).sum(axis=1).astype(np.float64)
    area[area == 0] = np.nan
    return area


# ----------------------------------------------------------------------------- events
def _frames(seconds: float, fps: float) -> int:
    return max(1, int(np.floor(seconds * fps)))


def _extrema(v: np.ndarray, kind: str, min_dist: int) -> list:
    """Events of one kind from a cavity-size signal (ED: maxima, ES: minima) as (frame, kind, value):
    the centre of each run of frames within noise of a peak (``cycles.peak_runs``). A run cut by
    the clip's start or end counts only if its top lies inside the clip and reaches the level of
    the inner peaks (so never without inner peaks); its centre is then placed as for a run of
    the usual length."""
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
    return estimate_period_frames(cine)


def _from_image(cine: Cine, phase: Phase, found: Optional[ImageBeats] = None) -> None:
    """ED/ES of every beat from the images (``image_beats``, or ``found`` already), with confidences and flags."""
    found = found if found is not None else detect_image_beats(cine)
    phase.ed_frames, phase.es_frames = list(found.ed), list(found.es)
    phase.ed_confidence, phase.es_confidence = list(found.ed_confidence), list(found.es_confidence)
    phase.signal, phase.signal_name = found.signal, found.signal_name
    phase.heart_rate_bpm = _hr_from_events(phase.ed_frames, cine.fps)
    if phase.heart_rate_bpm is None and found.period_frames:
        phase.heart_rate_bpm = 60.0 * cine.fps / found.period_frames
    if found.period_frames is None:
        phase.flag("no_heartbeat_found", found.reason)
        phase.notes.append(found.reason + ": no ED/ES reported")
        return
    if found.quality < MIN_QUALITY:
        phase.flag("phase_low_confidence", f"the image signal barely repeats (autocorrelation "
                                           f"{found.quality:.2f} at the period): ED/ES uncertain")
    weak = [f for f, c in zip(phase.ed_frames + phase.es_frames, phase.ed_confidence + phase.es_confidence)
            if c < LOW_CONFIDENCE]
    if weak:
        phase.flag("phase_low_confidence", f"{len(weak)} ED/ES event(s) with a weak systolic stroke "
                                           f"(frames {sorted(weak)}): check them")
    if not phase.ed_frames and not phase.es_frames:
        phase.flag("no_heartbeat_found", found.reason or "no ED or ES visible in the clip")


def ecg_usability(cine: Cine, found: Optional[ImageBeats] = None) -> tuple[bool, str]:
    """Whether the cine's ECG can place ED: it must have R peaks, a quality of a real ECG and a
    heart rate that the images (``found``, detected when not given) do not contradict.
    (usable, reason when not)."""
    ecg = cine.ecg
    if ecg is None or ecg.signal.size == 0:
        return False, "no ECG"
    sig = np.asarray(ecg.signal, dtype=np.float64)
    if not np.isfinite(sig).all() or np.ptp(sig) < 1e-9:
        return False, "the ECG is flat or not finite"
    q = ecg_quality(sig, ecg.fs)
    if q < ECG_MIN_QUALITY:
        return False, f"ECG quality {q:.2f} (under {ECG_MIN_QUALITY}: noise, not a usable trace)"
    hr_ecg = _ecg_heart_rate(cine)
    if not np.isfinite(hr_ecg) or not 30.0 <= hr_ecg <= MAX_HR_BPM:
        return False, f"ECG heart rate {hr_ecg:.0f} bpm is not physiological"
    found = found if found is not None else detect_image_beats(cine)
    if found.period_frames and found.quality >= 0.6:
        hr_img = 60.0 * cine.fps / found.period_frames
        if abs(hr_img - hr_ecg) > ECG_IMAGE_AGREEMENT * hr_ecg:
            return False, (f"ECG heart rate {hr_ecg:.0f} bpm disagrees with the images' "
                           f"{hr_img:.0f} bpm: the ECG does not belong to these frames")
    return True, ""


def detect_ed_es(cine: Cine, masks=None, lv_labels: Sequence[int] = (1,),
                 extra_signals: Optional[dict] = None) -> Phase:
    """ED and ES frames of every cycle in ``cine``: a usable ECG, else LV masks (label maps
    ``[T, H, W]``), else images (``extra_signals``: more image signals, see ``detect_image_beats``).
    ValueError for a single frame or masks that do not match."""
    T = cine.num_frames
    if T < 2:
        raise ValueError(f"ED/ES need a cine loop of at least two frames, got {T}")
    phase = Phase([], [], None, "image")
    notes = phase.notes
    fps = cine.fps
    area = None
    if masks is not None:
        area = lv_area_curve(_masks_checked(masks, cine), lv_labels)
    min_same, min_opp = _frames(MIN_SAME_KIND_S, fps), _frames(MIN_OPPOSITE_S, fps)

    r_frames, beats = None, None
    if cine.ecg is not None:
        beats = detect_image_beats(cine, extra_signals)  # judges the ECG and, if it is not usable, places the events
        usable, why = ecg_usability(cine, beats)
        if usable:
            r_frames = ecg_peak_frames(cine)
            if r_frames is None:
                why = "the ECG does not span the clip with two beats"
        if r_frames is None:
            phase.flag("ecg_unusable", f"{why}: ED/ES from the {'masks' if area is not None else 'images'}")
            notes.append(f"ECG not used: {why}")
    if r_frames is not None:
        hr = _ecg_heart_rate(cine)
        closing = [int(f) for f in r_frames if f >= T]  # an R peak just after the clip closes the last cycle
        ed = [int(f) for f in r_frames if f < T]
        bounds = ed + closing
        use_masks = area is not None and np.isfinite(area).sum() >= 0.8 * T
        if use_masks:
            v, src = np.where(np.isfinite(area), area, np.nan), "masks (LV area)"
        else:
            v, src = beats.signals.get(BLOOD_POOL), "images (blood pool)"  # computed once, with the beats
            if v is None:  # a clip too short for the image beats
                v = blood_pool_signal(cine)
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
        phase.ed_frames = [e[0] for e in events if e[1] == "ed"]
        phase.es_frames = [e[0] for e in events if e[1] == "es"]
        phase.ed_confidence, phase.es_confidence = [1.0] * len(phase.ed_frames), [1.0] * len(phase.es_frames)
        phase.heart_rate_bpm = None if not np.isfinite(hr) else float(hr)
        phase.method, phase.signal, phase.signal_name = "ecg", np.asarray(v, dtype=np.float64), src
        return phase

    if area is not None:
        found = _from_masks(area, fps, notes)
        if found is not None:
            phase.ed_frames, phase.es_frames = found
            phase.ed_confidence, phase.es_confidence = [1.0] * len(found[0]), [1.0] * len(found[1])
            notes.insert(0, "ED = largest and ES = smallest LV area per cycle (masks)")
            phase.heart_rate_bpm, phase.method = _hr_from_events(phase.ed_frames, fps), "masks"
            phase.signal, phase.signal_name = area, "LV area (masks, pixels)"
            return phase
        notes.append("masks unusable for ED/ES: falling back to the images")

    _from_image(cine, phase, beats if beats is not None else detect_image_beats(cine, extra_signals))
    notes.insert(0, "ED/ES from the images alone: ED at the top and ES at the bottom of each systolic "
                    "downstroke of the blood-pool signal (upper scan sector, apical views)")
    if len(phase.ed_frames) < 2:
        notes.append("fewer than two ED frames: the clip holds no full cycle")
    return phase


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
