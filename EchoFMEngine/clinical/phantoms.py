"""Phantom echo studies with known truth.

A deterministic generator of apical (A4C / A2C) cine loops: a fan-shaped sector with a
beating left ventricle drawn as a truncated ellipse (so its method-of-discs volume is
well defined), myocardium, left atrium (and right heart in A4C), temporally correlated
speckle, depth attenuation, burned-in text and an ECG trace outside the fan, plus a
matching ECG built from neurokit2's ECGSYN beat. Everything the tests and demos need to
check against (masks, ED/ES frames, volumes, EF, R peaks) comes with the study.

Physical layout is in millimetres: ``x`` lateral from the fan axis, ``y`` depth from the
transducer (the fan apex at the top centre of the image).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence

import av
import cv2
import numpy as np
from scipy import ndimage
from scipy.signal import find_peaks

from EchoFMEngine.cine import Cine, Ecg, SourceInfo
from EchoFMEngine.tasks import LABEL_VALUES

VIEWS = ("A4C", "A2C")
LABELS = LABEL_VALUES    # name -> label value; the older names lv_endo / lv_myo still answer
ECG_FS = 500.0
N_DISCS = 20
ES_PHASE = 0.37  # ES sits at this fraction of the R-R interval after the R peak
SECTOR_HALF_ANGLE_DEG = 37.5
DEPTH_MM = 170.0
US_MULTIFRAME_SOP = "1.2.840.10008.5.1.4.1.1.3.1"

# Phases of one R-R interval (fractions of it): isovolumic contraction, ejection, the
# ES plateau (isovolumic relaxation), filling, and (sinus rhythm) the end of the atrial
# kick shortly before R. Volume is flat at EDV within +-0.04 R-R of each R peak in sinus
# rhythm; in atrial fibrillation it rises up to R and stays flat during contraction.
_IVC_END = 0.04
_EJECT_END = ES_PHASE - 0.04
_IVR_END = ES_PHASE + 0.04
_FILL_END = 0.96


@dataclass
class PhantomStudy:
    """A synthetic study with its truth; volumes are disc volumes of the drawn LV cavity."""

    cine: Cine
    masks: np.ndarray  # uint8 [T, H, W]: 0 bg, 1 LV cavity, 2 LV myocardium, 3 LA
    ed_frames: np.ndarray
    es_frames: np.ndarray
    edv_ml: float
    esv_ml: float
    ef: float
    view: str
    r_peak_times_s: np.ndarray  # on the cine clock, every R peak inside the ECG recording
    heart_rate_bpm: float
    lv_volume_ml: np.ndarray  # disc volume of the drawn cavity in every frame
    sector: np.ndarray  # bool [H, W]: the true scan sector
    overlay: np.ndarray  # bool [H, W]: pixels of burned-in text / ECG trace (any frame)
    seed: int = 0
    afib: bool = False
    params: dict = field(default_factory=dict)

    def truth_dict(self) -> dict:
        """JSON-ready truth (no image data)."""
        c = self.cine
        return {
            "view": self.view,
            "seed": int(self.seed),
            "afib": bool(self.afib),
            "n_frames": c.num_frames,
            "size": [int(c.frames.shape[1]), int(c.frames.shape[2])],
            "fps": c.fps,
            "spacing_mm": list(c.spacing_mm) if c.spacing_mm else None,
            "heart_rate_bpm": round(float(self.heart_rate_bpm), 3),
            "ed_frames": [int(i) for i in self.ed_frames],
            "es_frames": [int(i) for i in self.es_frames],
            "edv_ml": round(float(self.edv_ml), 4),
            "esv_ml": round(float(self.esv_ml), 4),
            "ef": round(float(self.ef), 4),
            "r_peak_times_s": [round(float(t), 6) for t in self.r_peak_times_s],
            "lv_volume_ml": [round(float(v), 4) for v in self.lv_volume_ml],
            "labels": LABELS,
            "params": self.params,
        }


# ----------------------------------------------------------------------------- timing
def _beat_times(duration_s: float, hr_bpm: float, afib: bool, rng: np.random.Generator) -> np.ndarray:
    """R-peak times from well before frame 0 to well after the clip; the clip starts at a random phase."""
    rr_mean = 60.0 / hr_bpm
    times = [-rng.uniform(0.0, 1.0) * rr_mean]
    while times[0] > -max(2.5 * rr_mean, 2.5):  # history before frame 0 (the ECG starts earlier)
        times.insert(0, times[0] - rr_mean)
    while times[-1] < duration_s + max(2.0 * rr_mean, 2.0):
        if afib:
            rr = rr_mean * math.exp(0.22 * rng.standard_normal())
            rr = float(np.clip(rr, 0.6 * rr_mean, 1.6 * rr_mean))
        else:
            rr = rr_mean * (1.0 + 0.015 * rng.standard_normal())
        rr = float(np.clip(rr, 60.0 / 190.0, 60.0 / 35.0))
        times.append(times[-1] + rr)
    return np.asarray(times)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _volume_fraction(t: np.ndarray, r_times: np.ndarray, f_es: float, afib: bool) -> np.ndarray:
    """LV volume / EDV at times ``t``: flat at ED around R, ejection, flat at ES, filling."""
    k = np.clip(np.searchsorted(r_times, t, side="right") - 1, 0, len(r_times) - 2)
    u = (t - r_times[k]) / (r_times[k + 1] - r_times[k])
    eject = f_es + (1 - f_es) * 0.5 * (1 + np.cos(np.pi * (u - _IVC_END) / (_EJECT_END - _IVC_END)))
    if afib:  # rapid filling, then slow filling right up to the R peak (no atrial kick)
        w = (u - _IVR_END) / (1.0 - _IVR_END)
        fill = 0.75 * _smoothstep(w / 0.45) + 0.25 * np.clip((w - 0.2) / 0.8, 0.0, 1.0)
    else:  # rapid filling, diastasis, atrial contraction ending just before R
        w = (u - _IVR_END) / (_FILL_END - _IVR_END)
        fill = 0.65 * _smoothstep(w / 0.4) + 0.12 * np.clip((w - 0.2) / 0.55, 0.0, 1.0) \
            + 0.23 * _smoothstep((w - 0.75) / 0.25)
    f = np.where(u < _IVC_END, 1.0, eject)
    f = np.where((u >= _EJECT_END) & (u < _IVR_END), f_es, f)
    f = np.where(u >= _IVR_END, f_es + (1 - f_es) * fill, f)
    return f


# ----------------------------------------------------------------------------- ECG
def _ecg_template(hr_bpm: float, seed: int, afib: bool) -> np.ndarray:
    """One R-to-R beat (R at sample 0 and at the last sample) from neurokit2's ECGSYN."""
    import neurokit2 as nk  # deferred: neurokit2 takes seconds to import; only the simulated ECG needs it

    rr = 60.0 / hr_bpm
    sig = np.asarray(
        nk.ecg_simulate(duration=5 * rr, sampling_rate=int(ECG_FS), heart_rate=hr_bpm,
                        heart_rate_std=0, method="ecgsyn", random_state=seed % (2**31)),
        dtype=np.float64,
    )
    peaks, _ = find_peaks(sig, height=0.5 * sig.max(), distance=int(0.5 * rr * ECG_FS))
    if len(peaks) < 3:
        raise RuntimeError("ECGSYN template has too few beats")
    beat = sig[peaks[1]: peaks[2] + 1].copy()
    if afib:  # no organised atrial activity: flatten the P wave region before R
        n = beat.size
        lo, hi = n - int(0.28 * ECG_FS), n - int(0.07 * ECG_FS)
        idx = np.arange(n)
        win = _smoothstep((idx - lo) / (0.03 * ECG_FS)) * _smoothstep((hi - idx) / (0.03 * ECG_FS))
        base = np.interp(idx, [lo, hi], [beat[lo], beat[hi]])
        beat = beat - win * (beat - base) * 0.9
    return beat


def _ecg_span(r_times: np.ndarray, duration_s: float) -> tuple:
    """Recording start/end: in diastole, >= 0.8 s before frame 0 and >= 0.4 s after the clip.

    Scanners record the ECG around the acquisition; starting and ending between beats also
    keeps filter edge effects of R-peak detectors away from the clip."""
    quiet = r_times[:-1] + 0.6 * np.diff(r_times)
    start = quiet[quiet <= -0.8][-1]
    end = quiet[quiet >= duration_s + 0.4][0]
    return float(start), float(end)


def _build_ecg(r_times: np.ndarray, t_start: float, t_end: float, hr_bpm: float, afib: bool,
               rng: np.random.Generator, seed: int) -> np.ndarray:
    """ECG (mV) at ECG_FS from t_start to t_end: template beats warped to each R-R interval."""
    beat = _ecg_template(hr_bpm, seed, afib)
    L0 = beat.size - 1
    n = int(math.ceil((t_end - t_start) * ECG_FS))
    t = t_start + np.arange(n) / ECG_FS
    k = np.clip(np.searchsorted(r_times, t, side="right") - 1, 0, len(r_times) - 2)
    s = (t - r_times[k]) * ECG_FS
    Lk = (r_times[k + 1] - r_times[k]) * ECG_FS
    q = 0.07 * ECG_FS  # keep the QRS complex around each R unwarped
    mid = q + (s - q) * (L0 - 2 * q) / np.maximum(Lk - 2 * q, 1.0)
    pos = np.where(s < q, s, np.where(s > Lk - q, L0 - (Lk - s), mid))
    sig = np.interp(pos, np.arange(beat.size), beat)
    sig += 0.01 * rng.standard_normal(n)
    sig += 0.03 * np.sin(2 * np.pi * 0.25 * t + rng.uniform(0, 2 * np.pi))  # baseline wander
    if afib:  # fibrillatory waves
        for f_hz in rng.uniform(4.5, 7.5, size=3):
            sig += 0.02 * np.sin(2 * np.pi * f_hz * t + rng.uniform(0, 2 * np.pi))
    return sig.astype(np.float32)


# ----------------------------------------------------------------------------- anatomy
def _anatomy(view: str, edv_ml: float, rng: np.random.Generator) -> dict:
    """Study-level shape parameters (mm) with a little seeded variety."""
    t_trunc = rng.uniform(0.5, 0.6)  # base cut at yc + t * a
    ld_ratio = rng.uniform(1.55, 1.8)  # long axis / widest diameter at ED
    k_t = (1 + t_trunc) - (1 + t_trunc**3) / 3
    # V = pi b^2 a k_t with a = L / (1 + t), b = L / (2 ld)  ->  solve for L
    L = (edv_ml * 1000.0 * 4 * ld_ratio**2 * (1 + t_trunc) / (math.pi * k_t)) ** (1 / 3)
    p = {
        "t_trunc": t_trunc,
        "a": L / (1 + t_trunc),
        "b": L / (2 * ld_ratio),
        "apex_y": rng.uniform(31.0, 36.0),
        "lv_x": (6.0 if view == "A4C" else 1.0) + rng.uniform(-2.0, 2.0),
        "myo_th": rng.uniform(8.0, 10.0),
        "la_a": rng.uniform(17.0, 21.0),
        "la_b": rng.uniform(15.0, 18.0),
        "la_dx": rng.uniform(-3.0, 3.0),
        "rv_a": rng.uniform(34.0, 40.0),
        "rv_b": rng.uniform(12.0, 15.0),
        "ra_a": rng.uniform(16.0, 20.0),
        "ra_b": rng.uniform(14.0, 17.0),
        "i_tissue": rng.uniform(0.24, 0.32),
        "i_myo": rng.uniform(0.68, 0.82),
        "i_blood": rng.uniform(0.025, 0.045),
    }
    return p


def _ellipse(X, Y, xc, yc, sa_x, sa_y):
    return ((X - xc) / sa_x) ** 2 + ((Y - yc) / sa_y) ** 2 <= 1.0


def _render_block(f: np.ndarray, f_es: float, p: dict, view: str, X: np.ndarray, Y: np.ndarray,
                  sector: np.ndarray):
    """Labels uint8 [t, H, W] and tissue echogenicity float32 [t, H, W] for volume fractions f."""
    f = f[:, None, None]
    a = p["a"] * f**0.15
    b = p["b"] * f**0.425
    th = p["myo_th"] * f**-0.35
    yc = p["apex_y"] + a
    y_base = yc + p["t_trunc"] * a
    x0 = p["lv_x"]
    atrial = (1 - f) / max(1 - f_es, 1e-6)  # 0 at ED, 1 at ES: atria fill while the LV ejects
    la_a, la_b = p["la_a"] * (1 + 0.12 * atrial), p["la_b"] * (1 + 0.12 * atrial)

    above_base = Y <= y_base
    cavity = _ellipse(X, Y, x0, yc, b, a) & above_base
    epi = _ellipse(X, Y, x0, yc, b + th, a + th) & above_base
    la_yc = y_base + 0.8 * la_a
    la = _ellipse(X, Y, x0 + p["la_dx"], la_yc, la_b, la_a) & ~above_base
    la_wall = _ellipse(X, Y, x0 + p["la_dx"], la_yc, la_b + 2.5, la_a + 2.5) & ~above_base

    echo = np.full(cavity.shape, p["i_tissue"], dtype=np.float32)
    if view == "A4C":
        s = f**0.3
        rv_a, rv_b = p["rv_a"] * s, p["rv_b"] * s
        rv_x = x0 - (p["b"] + p["myo_th"] + 3.0 + p["rv_b"])
        rv_yc = p["apex_y"] + 10.0 + rv_a
        rv_base = y_base + 4.0
        rv = _ellipse(X, Y, rv_x, rv_yc, rv_b, rv_a) & (Y <= rv_base)
        rv_wall = _ellipse(X, Y, rv_x, rv_yc, rv_b + 4.0, rv_a + 4.0) & (Y <= rv_base)
        ra_a, ra_b = p["ra_a"] * (1 + 0.12 * atrial), p["ra_b"] * (1 + 0.12 * atrial)
        ra_yc = rv_base + 0.8 * ra_a
        ra = _ellipse(X, Y, rv_x + 2.0, ra_yc, ra_b, ra_a) & (Y > rv_base)
        ra_wall = _ellipse(X, Y, rv_x + 2.0, ra_yc, ra_b + 2.5, ra_a + 2.5) & (Y > rv_base)
        echo[rv_wall | ra_wall] = 0.6
        echo[rv | ra] = p["i_blood"]
    echo[la_wall] = 0.5
    echo[la] = p["i_blood"]
    echo[epi] = p["i_myo"]
    echo[cavity] = p["i_blood"]

    labels = np.zeros(cavity.shape, dtype=np.uint8)
    labels[la] = LABELS["la"]
    labels[epi] = LABELS["lv_myo"]
    labels[cavity] = LABELS["lv_endo"]
    labels[:, ~sector] = 0
    return labels, echo


def _disc_volume_ml(cavity: np.ndarray, spacing_mm: tuple, n_discs: int = N_DISCS) -> float:
    """Method of discs along the image column axis (the phantom's LV long axis is vertical)."""
    rows = cavity.sum(axis=1).astype(np.float64)  # cavity width per row in pixels
    nz = np.flatnonzero(rows)
    if nz.size == 0:
        return 0.0
    sy, sx = spacing_mm
    top, bottom = nz[0], nz[-1]
    length = (bottom - top + 1) * sy
    centres = top - 0.5 + (np.arange(n_discs) + 0.5) * (bottom - top + 1) / n_discs
    d = np.interp(centres, np.arange(rows.size), rows) * sx
    return float(np.sum(np.pi * (d / 2) ** 2 * length / n_discs) / 1000.0)


# ----------------------------------------------------------------------------- image
def _speckle(shape: tuple, rng: np.random.Generator, static: float = 0.85, rho: float = 0.7) -> np.ndarray:
    """Rayleigh amplitude with mean 1, spatially grained, temporally correlated and stationary.

    The complex field is a fixed pattern (share ``static`` of the power, as tissue speckle
    persists while the probe is still) plus an AR(1) part with frame-to-frame correlation
    ``rho`` ("boiling"), so frames are alike without a slow random drift."""
    T, H, W = shape
    e = rng.standard_normal((T + 1, H, W, 2), dtype=np.float32)
    e = ndimage.gaussian_filter(e, sigma=(0, 0.6, 1.1, 0), mode="wrap")
    e /= e.std() + 1e-8
    fixed, e = math.sqrt(static) * e[0], e[1:]
    c = math.sqrt(1 - rho * rho)
    b = math.sqrt(1 - static)
    out = np.empty((T, H, W), dtype=np.float32)
    w = e[0]
    for i in range(T):
        if i:
            w = rho * w + c * e[i]
        z = fixed + b * w
        out[i] = np.sqrt(z[..., 0] ** 2 + z[..., 1] ** 2)
    return out / np.float32(math.sqrt(math.pi / 2))  # mean of a unit-variance Rayleigh


def _overlay_layers(H: int, W: int, sector: np.ndarray, ecg: Optional[np.ndarray], texts: list):
    """Static burned-in RGB layer + its mask, and the ECG strip box (for the moving cursor)."""
    layer = np.zeros((H, W, 3), dtype=np.uint8)
    scale = max(0.35, H / 320.0)
    line_h = int(round(14 * scale)) + 2
    for i, txt in enumerate(texts[:3]):
        cv2.putText(layer, txt, (2, line_h * (i + 1)), cv2.FONT_HERSHEY_PLAIN, scale,
                    (230, 230, 230), 1, cv2.LINE_AA)
    txt = texts[3] if len(texts) > 3 else ""
    (tw, _), _ = cv2.getTextSize(txt, cv2.FONT_HERSHEY_PLAIN, scale, 1)
    cv2.putText(layer, txt, (W - tw - 2, line_h), cv2.FONT_HERSHEY_PLAIN, scale,
                (230, 230, 230), 1, cv2.LINE_AA)
    strip = None
    if ecg is not None:
        r0, r1 = int(0.85 * H), int(0.97 * H)
        c0, c1 = int(0.05 * W), int(0.95 * W)
        x = np.linspace(c0, c1, c1 - c0 + 1)
        y = np.interp(np.linspace(0, ecg.size - 1, x.size), np.arange(ecg.size), ecg)
        y = (y - y.min()) / max(float(np.ptp(y)), 1e-6)
        pts = np.stack([x, r1 - y * (r1 - r0)], axis=1).round().astype(np.int32)
        cv2.polylines(layer, [pts], False, (40, 220, 60), 1, cv2.LINE_AA)
        strip = (r0, r1, c0, c1)
    keep_out = ndimage.binary_dilation(sector, iterations=3)
    layer[keep_out] = 0
    return layer, layer.max(axis=-1) > 0, strip


def make_study(view: str = "A4C", n_frames: int = 64, size: tuple = (128, 128), fps: float = 30.0,
               heart_rate_bpm: float = 75.0, ef: float = 60.0, edv_ml: float = 120.0,
               afib: bool = False, seed: int = 0, spacing_mm: Optional[tuple] = None,
               with_ecg: bool = True, overlay: bool = True) -> PhantomStudy:
    """Generate one deterministic phantom study (EF in percent, volumes in ml)."""
    view = view.upper()
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    if not 5.0 <= ef <= 90.0:
        raise ValueError(f"ef is in percent and must lie in [5, 90], got {ef}")
    if not 20.0 <= heart_rate_bpm <= 250.0:
        raise ValueError(f"heart_rate_bpm out of range: {heart_rate_bpm}")
    H, W = int(size[0]), int(size[1])
    T = int(n_frames)
    if T < 2 or H < 32 or W < 32:
        raise ValueError(f"need >= 2 frames of at least 32x32 pixels, got {T} x {H}x{W}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xEC40]))

    # Sector geometry in pixels, then the pixel spacing from a fixed physical depth.
    half = math.radians(SECTOR_HALF_ANGLE_DEG)
    apex_row, apex_col = 0.02 * H, (W - 1) / 2.0
    r_px = min(0.78 * H, 0.47 * W / math.sin(half))
    if spacing_mm is None:
        spacing_mm = (DEPTH_MM / r_px, DEPTH_MM / r_px)
    sy, sx = float(spacing_mm[0]), float(spacing_mm[1])
    depth_mm = r_px * sy
    rows = (np.arange(H, dtype=np.float32) - apex_row) * sy
    cols = (np.arange(W, dtype=np.float32) - apex_col) * sx
    Y, X = np.meshgrid(rows, cols, indexing="ij")
    R = np.hypot(X, Y)
    ang = np.arctan2(X, Y)
    sector = (R <= depth_mm) & (np.abs(ang) <= half) & (Y > 0)

    # Timing and volume curve.
    duration = T / fps
    r_times = _beat_times(duration, heart_rate_bpm, afib, rng)
    frame_t = np.arange(T) / fps
    f_es = 1.0 - ef / 100.0
    vol_f = _volume_fraction(frame_t, r_times, f_es, afib)
    anat = _anatomy(view, edv_ml, rng)

    # Labels and echogenicity, frame blocks bound the memory.
    masks = np.empty((T, H, W), dtype=np.uint8)
    echo = np.empty((T, H, W), dtype=np.float32)
    for s in range(0, T, 16):
        masks[s:s + 16], echo[s:s + 16] = _render_block(vol_f[s:s + 16], f_es, anat, view, X, Y, sector)

    # Intensity: blurred echogenicity x speckle x depth gain, near-field haze, compression.
    echo = ndimage.gaussian_filter(echo, sigma=(0, 0.7, 0.7))
    rn = R / depth_mm
    gain = np.exp(-1.1 * rn) * (1 + 0.9 * rn)
    edge = 0.7 + 0.3 * _smoothstep((half - np.abs(ang)) / math.radians(3.0))
    haze = 0.18 * np.exp(-R / 8.0)
    img = echo * _speckle((T, H, W), rng) * (gain * edge)[None] + haze[None]
    img += 0.015 * _speckle((T, H, W), rng, static=0.0, rho=0.3)  # electronic noise floor
    grey = (np.clip(img, 0, 1) ** 0.8 * 255.0 + 0.5).astype(np.uint8)
    grey[:, ~sector] = 0
    frames = np.repeat(grey[..., None], 3, axis=-1)

    # ECG, overlays.
    ecg_t0, ecg_t1 = _ecg_span(r_times, duration)
    ecg_sig = _build_ecg(r_times, ecg_t0, ecg_t1, heart_rate_bpm, afib, rng, int(seed)) if with_ecg else None
    in_ecg = (r_times >= ecg_t0) & (r_times < ecg_t1)
    rr_in = np.diff(r_times[(r_times >= -1.0) & (r_times < duration + 1.0)])
    hr_true = float(60.0 / rr_in.mean())
    overlay_mask = np.zeros((H, W), dtype=bool)
    if overlay:
        texts = ["EchoFM PHANTOM", f"{view} {fps:.0f} fps", f"HR {hr_true:.0f}",
                 f"{depth_mm / 10:.0f} cm"]
        shown = None
        if ecg_sig is not None:  # the trace on screen spans the clip
            i0 = int(round(-ecg_t0 * ECG_FS))
            shown = ecg_sig[i0: i0 + int(round(duration * ECG_FS))]
        layer, overlay_mask, strip = _overlay_layers(H, W, sector, shown, texts)
        frames[:, overlay_mask] = layer[overlay_mask]
        if strip is not None:
            r0, r1, c0, c1 = strip
            cur = np.round(c0 + frame_t / duration * (c1 - c0)).astype(int)
            for i, c in enumerate(cur):
                frames[i, r0:r1 + 1, c] = (250, 220, 40)
            overlay_mask[r0:r1 + 1, np.unique(cur)] = True

    # Truth: ED at the R peak (the frame before or after it with the larger volume, nearest on
    # a tie: "at or just after R"), ES at the frame nearest ES_PHASE of the R-R interval later.
    ed, es = [], []
    for k in range(len(r_times) - 1):
        pos = r_times[k] * fps
        pair = [i for i in (math.floor(pos), math.ceil(pos)) if 0 <= i < T]
        i_ed = max(pair, key=lambda i: (vol_f[i], -abs(i - pos))) if pair else -1
        i_es = int(round((r_times[k] + ES_PHASE * (r_times[k + 1] - r_times[k])) * fps))
        if 0 <= i_ed < T:
            ed.append(i_ed)
        if 0 <= i_es < T:
            es.append(i_es)
    vols = np.array([_disc_volume_ml(m == LABELS["lv_endo"], (sy, sx)) for m in masks])

    def drawn_volume(frac: float) -> float:  # for a clip too short to hold that phase
        lab, _ = _render_block(np.array([frac]), f_es, anat, view, X, Y, sector)
        return _disc_volume_ml(lab[0] == LABELS["lv_endo"], (sy, sx))

    edv = float(np.mean(vols[ed])) if ed else drawn_volume(1.0)
    esv = float(np.mean(vols[es])) if es else drawn_volume(f_es)

    ecg = Ecg(ecg_sig, fs=ECG_FS, lead="II", t0_s=ecg_t0) if with_ecg else None
    source = SourceInfo(format="phantom", sop_class=US_MULTIFRAME_SOP, photometric="RGB",
                        series_description=f"EchoFM phantom {view}",
                        scanner_model="EchoFM phantom", extra={"view": view, "seed": int(seed)})
    cine = Cine(frames=frames, fps=fps, spacing_mm=(sy, sx), ecg=ecg, source=source)
    params = {k: round(float(v), 4) for k, v in anat.items()}
    params.update({"depth_mm": round(depth_mm, 3), "apex_row": apex_row, "apex_col": apex_col,
                   "sector_half_angle_deg": SECTOR_HALF_ANGLE_DEG, "target_ef": ef,
                   "target_edv_ml": edv_ml})
    return PhantomStudy(
        cine=cine, masks=masks, ed_frames=np.asarray(ed, dtype=int), es_frames=np.asarray(es, dtype=int),
        edv_ml=edv, esv_ml=esv, ef=(edv - esv) / edv * 100.0, view=view,
        r_peak_times_s=r_times[in_ecg], heart_rate_bpm=hr_true, lv_volume_ml=vols,
        sector=sector, overlay=overlay_mask, seed=int(seed), afib=bool(afib), params=params,
    )


# ----------------------------------------------------------------------------- writers
def _uid(seed: int, what: str) -> str:
    from pydicom.uid import generate_uid  # deferred: pydicom, only to write DICOM files

    return generate_uid(entropy_srcs=[f"echofm-phantom-{seed}-{what}"])


def write_dicom(study: PhantomStudy, path, photometric: str = "RGB") -> Path:
    """Write a US Multi-frame Image (explicit VR little endian, uncompressed) with regions and ECG."""
    from pydicom.dataset import Dataset, FileMetaDataset  # deferred: pydicom, as above
    from pydicom.sequence import Sequence as Seq  # deferred: as above
    from pydicom.uid import ExplicitVRLittleEndian  # deferred: as above

    path = Path(path)
    c = study.cine
    T, H, W = c.shape
    photometric = photometric.upper()
    if photometric not in ("RGB", "MONOCHROME2"):
        raise ValueError(f"photometric must be RGB or MONOCHROME2, got {photometric}")
    sop_uid = _uid(study.seed, f"sop-{study.view}")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = US_MULTIFRAME_SOP
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SOPClassUID = US_MULTIFRAME_SOP
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = _uid(study.seed, "study")
    ds.SeriesInstanceUID = _uid(study.seed, f"series-{study.view}")
    ds.Modality = "US"
    ds.Manufacturer = "EchoFM"
    ds.ManufacturerModelName = "EchoFM phantom"
    ds.SeriesDescription = f"EchoFM phantom {study.view}"
    ds.PatientName = f"PHANTOM^{study.seed}"
    ds.PatientID = f"PHANTOM-{study.seed}"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.ContentDate = ""
    ds.ContentTime = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.HeartRate = int(round(study.heart_rate_bpm))

    ds.NumberOfFrames = T
    ds.FrameIncrementPointer = (0x0018, 0x1063)  # Frame Time
    ds.FrameTime = f"{1000.0 / c.fps:.10g}"[:16]
    ds.CineRate = int(round(c.fps))
    ds.RecommendedDisplayFrameRate = int(round(c.fps))
    ds.Rows, ds.Columns = H, W
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"
    if photometric == "RGB":
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        pixels = np.ascontiguousarray(c.frames)
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        pixels = np.ascontiguousarray(np.round(c.grey() * 255.0).astype(np.uint8))
    ds.PixelData = pixels.tobytes()

    if c.spacing_mm is not None:
        sy, sx = c.spacing_mm
        r0, c0, r1, c1 = _bbox(study.sector)
        region = Dataset()
        region.RegionSpatialFormat = 1  # 2D
        region.RegionDataType = 1  # tissue
        region.RegionFlags = 0
        region.RegionLocationMinX0 = c0
        region.RegionLocationMinY0 = r0
        region.RegionLocationMaxX1 = c1 - 1
        region.RegionLocationMaxY1 = r1 - 1
        region.PhysicalUnitsXDirection = 3  # cm
        region.PhysicalUnitsYDirection = 3
        region.PhysicalDeltaX = sx / 10.0
        region.PhysicalDeltaY = sy / 10.0
        region.ReferencePixelX0 = int(round(study.params.get("apex_col", W / 2)))
        region.ReferencePixelY0 = int(round(study.params.get("apex_row", 0)))
        region.ReferencePixelPhysicalValueX = 0.0
        region.ReferencePixelPhysicalValueY = 0.0
        ds.SequenceOfUltrasoundRegions = Seq([region])

    if c.ecg is not None:
        # Times are relative to Content Time: the ECG starts there, the first frame FrameDelay later.
        ds.FrameDelay = f"{max(-c.ecg.t0_s, 0.0) * 1000.0:.6f}"
        ds.WaveformSequence = Seq([_waveform_item(c.ecg)])
    ds.save_as(path, enforce_file_format=True)
    return path


def _waveform_item(ecg: Ecg):
    """One multiplex group: lead II, 16-bit signed, 1 uV per LSB."""
    from pydicom.dataset import Dataset  # deferred: pydicom, as above
    from pydicom.sequence import Sequence as Seq  # deferred: as above

    sens_mv = 0.001
    raw = np.clip(np.round(ecg.signal.astype(np.float64) / sens_mv), -32768, 32767).astype("<i2")
    src = Dataset()
    src.CodeValue = "5.6.3-9-2"
    src.CodingSchemeDesignator = "SCPECG"
    src.CodingSchemeVersion = "1.3"
    src.CodeMeaning = "Lead II"
    units = Dataset()
    units.CodeValue = "mV"
    units.CodingSchemeDesignator = "UCUM"
    units.CodeMeaning = "millivolt"
    ch = Dataset()
    ch.ChannelLabel = "II"
    ch.ChannelSourceSequence = Seq([src])
    ch.ChannelSensitivity = sens_mv
    ch.ChannelSensitivityUnitsSequence = Seq([units])
    ch.ChannelSensitivityCorrectionFactor = 1
    ch.ChannelBaseline = 0
    ch.ChannelSampleSkew = 0
    ch.WaveformBitsStored = 16
    item = Dataset()
    item.MultiplexGroupTimeOffset = max(ecg.t0_s, 0.0) * 1000.0
    item.WaveformOriginality = "ORIGINAL"
    item.NumberOfWaveformChannels = 1
    item.NumberOfWaveformSamples = int(raw.size)
    item.SamplingFrequency = ecg.fs
    item.MultiplexGroupLabel = "ECG"
    item.ChannelDefinitionSequence = Seq([ch])
    item.WaveformBitsAllocated = 16
    item.WaveformSampleInterpretation = "SS"
    item.WaveformData = raw.tobytes()
    return item


def _bbox(mask: np.ndarray) -> tuple:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def write_avi(study: PhantomStudy, path, codec: str = "ffv1") -> Path:
    """Write the cine as AVI with PyAV: 'ffv1' (lossless RGB) or 'mjpeg' (high quality)."""
    path = Path(path)
    c = study.cine
    T, H, W = c.shape
    rate = Fraction(c.fps).limit_denominator(1001)
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = W, H
        if codec == "ffv1":
            stream.pix_fmt = "bgr0"
        elif codec == "mjpeg":
            stream.pix_fmt = "yuvj444p"
            stream.codec_context.qmin = stream.codec_context.qmax = 1
        for frame in c.frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_truth(study: PhantomStudy, folder) -> Path:
    """Write masks.npy (uint8 [T, H, W]) and truth.json into ``folder``; returns the JSON path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "masks.npy", study.masks)
    path = folder / "truth.json"
    path.write_text(json.dumps(study.truth_dict(), indent=1))
    return path


# ----------------------------------------------------------------------------- CLI
def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m EchoFMEngine phantom", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write phantom echo studies with known truth: a beating LV/LA cine with an ECG "
                    "(DICOM and/or AVI), truth masks, volumes and ED/ES frames (truth/), and index.csv.\n"
                    "Heart rate (55-110 bpm), EF (25-75 %) and EDV (80-190 ml) are drawn per study from --seed.",
        epilog="example:\n  python -m EchoFMEngine phantom --out phantoms --n 4 --seed 0 --views A4C,A2C")
    p.add_argument("--out", required=True, help="output folder (created; existing studies are overwritten)")
    p.add_argument("--n", type=int, required=True, help="number of studies")
    p.add_argument("--seed", type=int, default=0, help="seed of the whole set: same seed, same studies (default 0)")
    p.add_argument("--frames", type=int, default=64, help="frames per cine loop (default 64)")
    p.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"),
                   help="image height and width in pixels (default 128 128)")
    p.add_argument("--fps", type=float, default=30.0, help="frame rate in frames per second (default 30)")
    p.add_argument("--format", choices=("dicom", "avi", "both"), default="dicom",
                   help="file type of each study: DICOM (with ECG) or AVI (no ECG); both writes the same "
                        "study twice, so a folder of 'both' holds every study twice (default dicom)")
    p.add_argument("--views", default="A4C,A2C",
                   help=f"comma-separated views cycled over the studies, from {','.join(VIEWS)} (default A4C,A2C)")
    p.add_argument("--afib-fraction", type=float, default=0.0,
                   help="share of studies (0-1) with atrial fibrillation: irregular R-R intervals (default 0)")
    return p.parse_args(list(argv))


def cli(argv: Sequence[str]) -> int:
    """Entry point of `python -m EchoFMEngine phantom`."""
    a = _parse(argv)
    views = [v.strip().upper() for v in a.views.split(",") if v.strip()]
    bad = [v for v in views if v not in VIEWS]
    if bad or not views:
        print(f"error: unknown view(s) {bad}; choose from {VIEWS}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(a.n):
        rng = np.random.default_rng(np.random.SeedSequence([a.seed, i]))
        study_seed = int(rng.integers(0, 2**31 - 1))
        sid = f"phantom_{i:04d}"
        st = make_study(view=views[i % len(views)], n_frames=a.frames, size=tuple(a.size), fps=a.fps,
                        heart_rate_bpm=float(rng.uniform(55, 110)), ef=float(rng.uniform(25, 75)),
                        edv_ml=float(rng.uniform(80, 190)), afib=bool(rng.random() < a.afib_fraction),
                        seed=study_seed)
        row = {"study_id": sid, "view": st.view, "dicom": "", "avi": "", "truth": f"truth/{sid}"}
        if a.format in ("dicom", "both"):
            write_dicom(st, out / f"{sid}.dcm")
            row["dicom"] = f"{sid}.dcm"
        if a.format in ("avi", "both"):
            write_avi(st, out / f"{sid}.avi")
            row["avi"] = f"{sid}.avi"
        write_truth(st, out / "truth" / sid)
        row.update({"ef": round(st.ef, 3), "edv_ml": round(st.edv_ml, 3), "esv_ml": round(st.esv_ml, 3),
                    "heart_rate_bpm": round(st.heart_rate_bpm, 2), "afib": int(st.afib),
                    "n_frames": st.cine.num_frames, "fps": st.cine.fps, "seed": study_seed,
                    "ed_frames": " ".join(map(str, st.ed_frames)),
                    "es_frames": " ".join(map(str, st.es_frames))})
        rows.append(row)
        print(f"{sid}: {st.view} EF {st.ef:.1f}% EDV {st.edv_ml:.0f} ml HR {st.heart_rate_bpm:.0f}"
              f"{' afib' if st.afib else ''}")
    with open(out / "index.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()) if rows else ["study_id"])
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {len(rows)} studies to {out}")
    return 0
