"""Phantoms built from a real frame: one echo frame warped by a known periodic deformation.

The drawn phantoms (``phantoms.py``) carry the features the detector was once tuned on; these keep
a real image's texture, anatomy, artefacts and sector and move only what a heartbeat moves: the
dark cavity of the upper scan sector (apical views: the LV) contracts toward its centre in
systole and relaxes in diastole, on a volume curve whose ED (largest) and ES (smallest) frames
are known exactly. The warp is a smooth radial displacement field (skimage.transform.warp);
options add irregular R-R, speckle re-drawn per frame, gain drift, a drop-out wedge and a clip
that starts mid-beat. ``python -m EchoFMEngine.clinical.warped_phantoms --data DIR`` measures
``detect_ed_es`` on phantoms made from the real cines in an EchoNet-layout folder.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage
from skimage import measure
from skimage.filters import threshold_otsu
from skimage.transform import resize, warp

from EchoFMEngine.cine import Cine, SourceInfo
from EchoFMEngine.clinical.geometry import find_sector
from EchoFMEngine.clinical.phase import detect_ed_es, event_accuracy
from EchoFMEngine.io import load_cine

VENTRICLE_DEPTH = 0.6   # the cavity is looked for in the upper 60 % of the sector (apical views)
SYSTOLE_SHARE = 0.37    # ED to ES as a share of the mean R-R (diastole absorbs irregular beats)
LONGITUDINAL = 0.6      # the long axis (depth) shortens less than the short axis
MAX_CAVITY_SHARE = 0.35  # a cavity covers at most this share of the upper sector
DROPOUT_HALF_ANGLE_DEG = 7.0
DROPOUT_DEPTH = 0.85    # the wedge keeps 15 % of its brightness


@dataclass
class WarpedPhantom:
    """A cine from a warped real frame and its truth: ED / ES frames of every beat whose event
    lies inside the clip, the mean beat length, and the applied normalised volume per frame
    (1 at ED, 0 at ES)."""

    cine: Cine
    ed_frames: list
    es_frames: list
    period_frames: float
    volume: np.ndarray
    centre: tuple            # (row, col) of the contraction, output pixels
    params: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- timing
def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _volume(u: np.ndarray, systole: np.ndarray, irregular: bool) -> np.ndarray:
    """Normalised volume at beat phase ``u`` in [0, 1): 1 at ED (u = 0), a cosine ejection down
    to 0 at ES (u = ``systole``), then strictly rising filling: rapid filling, diastasis and an
    atrial kick in sinus rhythm; rapid then slow filling up to ED without a kick when irregular."""
    ej = 0.5 * (1.0 + np.cos(np.pi * np.clip(u / systole, 0.0, 1.0)))
    w = np.clip((u - systole) / (1.0 - systole), 0.0, 1.0)
    if irregular:
        fill = 0.8 * _smoothstep(w / 0.4) + 0.2 * np.clip((w - 0.3) / 0.7, 0.0, 1.0)
    else:
        fill = 0.7 * _smoothstep(w / 0.35) + 0.1 * np.clip((w - 0.35) / 0.45, 0.0, 1.0) \
            + 0.2 * _smoothstep((w - 0.8) / 0.2)
    return np.where(u < systole, ej, fill)


def _beats(duration_s: float, rr_s: float, jitter: float, rng: np.random.Generator) -> np.ndarray:
    """ED times (s) from 0 to past ``duration_s``; each R-R is the mean times exp(jitter * N(0, 1)),
    kept within 0.6-1.6x the mean (AF-like when ``jitter`` ~0.2)."""
    t = [0.0]
    while t[-1] <= duration_s + rr_s:
        rr = rr_s * math.exp(jitter * rng.standard_normal()) if jitter else rr_s
        t.append(t[-1] + float(np.clip(rr, 0.6 * rr_s, 1.6 * rr_s)))
    return np.asarray(t)


def _extreme_frame(v: np.ndarray, t_s: float, fps: float, largest: bool) -> Optional[int]:
    """The frame of an event at time ``t_s`` (clip clock): of the frames next to it, the one with
    the most extreme sampled volume; None when the event lies outside the clip."""
    x = t_s * fps
    if x < -0.5 or x > v.size - 0.5:
        return None
    k = int(np.clip(round(x), 0, v.size - 1))
    idx = np.arange(max(0, k - 1), min(v.size, k + 2))
    return int(idx[np.argmax(v[idx]) if largest else np.argmin(v[idx])])


# ----------------------------------------------------------------------------- image
def _as_grey_or_rgb(frame, size: Optional[int]) -> np.ndarray:
    """``[H, W, C]`` float32 in [0, 1] (C = 1 for a grey or grey-in-RGB frame), resized so that
    its long side is ``size``."""
    f = np.asarray(frame)
    if f.ndim == 3 and f.shape[-1] in (3, 4):
        f = f[..., :3]
    elif f.ndim == 2:
        f = f[..., None]
    else:
        raise ValueError(f"the frame must be [H, W] grey or [H, W, 3] RGB, got shape {f.shape}")
    if min(f.shape[:2]) < 16:
        raise ValueError(f"the frame is too small to warp ({f.shape[0]}x{f.shape[1]} px)")
    f = f.astype(np.float32)
    if not np.isfinite(f).all():
        raise ValueError("the frame holds NaN or infinite values")
    f /= 255.0 if np.asarray(frame).dtype == np.uint8 or f.max() > 1.0 else 1.0
    if f.shape[-1] == 3 and np.abs(f - f.mean(-1, keepdims=True)).max() < 2.0 / 255:
        f = f[..., :1]  # grey stored as RGB (EchoNet AVIs): warp one channel
    if size is not None:
        scale = size / max(f.shape[:2])
        shape = (max(16, int(round(f.shape[0] * scale))), max(16, int(round(f.shape[1] * scale))))
        f = resize(f, shape + (f.shape[2],), order=1, anti_aliasing=scale < 1, preserve_range=True)
    return np.clip(f, 0.0, 1.0).astype(np.float32)


def find_cavity(grey: np.ndarray, sector: np.ndarray) -> tuple:
    """(mask, centre (row, col), spread (row, col) in px) of the darkest large blob of the upper
    sector, the LV cavity of an apical view: Otsu-dark pixels of the smoothed frame, scored by area
    times darkness; spread is its half extent (2 std). ValueError when the upper sector holds none."""
    rows = np.flatnonzero(sector.any(1))
    upper = sector.copy()
    upper[int(rows[0] + VENTRICLE_DEPTH * (rows[-1] - rows[0] + 1)):] = False
    upper = ndimage.binary_erosion(upper, iterations=max(1, int(0.03 * max(grey.shape))))
    if upper.sum() < 50:
        raise ValueError("the scan sector is too small to hold a cavity")
    smooth = ndimage.gaussian_filter(grey, 0.02 * max(grey.shape))
    thr = float(threshold_otsu(smooth[upper]))
    for _ in range(6):  # a dark (low-gain) frame is all "dark": lower the threshold until a cavity stands out
        labels = measure.label((smooth < thr) & upper)
        blobs = [r for r in measure.regionprops(labels, intensity_image=smooth) if r.area >= 0.01 * upper.sum()]
        if not blobs:
            raise ValueError("no dark cavity in the upper scan sector (not an apical echo frame?)")
        best = max(blobs, key=lambda r: r.area * (thr - r.intensity_mean))
        if best.area <= MAX_CAVITY_SHARE * upper.sum():
            break
        thr = float(np.percentile(smooth[labels == best.label], 50))
    else:
        raise ValueError("no cavity stands out in the upper scan sector (the frame is uniformly dark)")
    rr, cc = best.coords[:, 0], best.coords[:, 1]
    mask = ndimage.binary_fill_holes(labels == best.label)
    return mask, (float(rr.mean()), float(cc.mean())), (float(2 * rr.std()) + 1.0, float(2 * cc.std()) + 1.0)


def _profile(sector: np.ndarray, cavity: np.ndarray) -> tuple:
    """How much each pixel moves (0-1): 1 in the cavity, falling off over a wall's thickness
    (~8 % of the image) outside it, so the wall thickens while the chambers beyond stay put, and
    to 0 toward the sector's edge (nothing outside the fan is pulled in); cropped to its support
    ``(r0, r1, c0, c1)``. Gentle enough that the map does not fold for squeezes up to 0.4."""
    H, W = sector.shape
    wall = 0.08 * max(H, W)
    h = np.clip(2.0 * ndimage.gaussian_filter(cavity.astype(np.float32), wall / 2), 0.0, 1.0)
    h *= _smoothstep(ndimage.distance_transform_edt(sector) / wall)
    rows, cols = np.flatnonzero((h > 1e-3).any(1)), np.flatnonzero((h > 1e-3).any(0))
    box = (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)
    return h[box[0]:box[1], box[2]:box[3]], box


def _dropout(shape: tuple, sector: np.ndarray, centre: tuple, spread: tuple) -> np.ndarray:
    """Gain ``[H, W]`` with a dark wedge from the fan's apex through the cavity's wall farther
    from the fan axis (lateral drop-out), soft-edged over 2 degrees."""
    rows = np.flatnonzero(sector.any(1))
    apex = (float(rows[0]), float(np.flatnonzero(sector[rows[0]: rows[0] + 3].any(0)).mean()))
    side = 1.0 if centre[1] >= apex[1] else -1.0
    target = (centre[0], centre[1] + side * 1.2 * spread[1])
    aim = math.atan2(target[1] - apex[1], target[0] - apex[0])
    r, c = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    off = np.degrees(np.abs(np.angle(np.exp(1j * (np.arctan2(c - apex[1], r - apex[0]) - aim)))))
    wedge = 1.0 - _smoothstep((off - DROPOUT_HALF_ANGLE_DEG) / 2.0)
    return (1.0 - DROPOUT_DEPTH * wedge).astype(np.float32)


def _speckle(shape: tuple, grain: float, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative noise of mean 1 and a Rayleigh amplitude's spread (0.52), grained by ``grain`` px."""
    z = ndimage.gaussian_filter(rng.rayleigh(math.sqrt(2 / math.pi), shape).astype(np.float32) - 1.0, grain)
    return 1.0 + z * (0.52 / max(float(z.std()), 1e-6))


def make_warped_phantom(frame, fps: float = 50.0, heart_rate_bpm: float = 72.0, n_beats: float = 4.0,
                        n_frames: Optional[int] = None, rr_jitter: float = 0.0, size: Optional[int] = None,
                        squeeze: float = 0.25, speckle: float = 0.0, gain_drift: float = 0.0,
                        dropout: bool = False, start_phase: float = 0.0, seed: int = 0) -> WarpedPhantom:
    """A cine whose frames are ``frame`` (grey or RGB, uint8 or float in [0, 1]) warped by a
    heartbeat: the cavity wall moves in by ``squeeze`` of its radius at ES (less along the long
    axis), the rest of the image stays put. ``n_frames`` (else ``n_beats`` mean beats) at ``fps``;
    ``rr_jitter`` (0: sinus; ~0.2: AF-like) spreads the R-R per beat; ``size`` resizes the frame to
    that long side (px); ``speckle`` (0-1) is the share of multiplicative noise re-drawn per frame;
    ``gain_drift`` ramps the gain from 1 - drift to 1 + drift; ``dropout`` darkens a wedge through
    the lateral wall; ``start_phase`` (0-1) starts the clip that far into the first beat.
    Deterministic by ``seed``. ValueError for a frame without a sector or cavity, or a bad option."""
    checks = [(0 < fps <= 1000, f"fps {fps}"), (30 <= heart_rate_bpm <= 220, f"heart rate {heart_rate_bpm} bpm"),
              (0 <= rr_jitter <= 0.5, f"rr_jitter {rr_jitter}"), (size is None or 64 <= size <= 1024, f"size {size}"),
              (0 < squeeze <= 0.4, f"squeeze {squeeze}"), (0 <= speckle <= 1, f"speckle {speckle}"),
              (0 <= gain_drift < 1, f"gain_drift {gain_drift}"), (0 <= start_phase < 1, f"start_phase {start_phase}"),
              (n_frames is None or n_frames >= 2, f"n_frames {n_frames}"), (n_beats > 0, f"n_beats {n_beats}")]
    bad = [what for ok, what in checks if not ok]
    if bad:
        raise ValueError("warped phantom: out of range: " + ", ".join(bad) + " (fps > 0, 30-220 bpm, rr_jitter 0-0.5, "
                         "size 64-1024, squeeze 0-0.4, speckle 0-1, gain_drift 0-1, start_phase 0-1, n_frames >= 2)")
    img = _as_grey_or_rgb(frame, size)
    H, W, C = img.shape
    if np.ptp(img) < 0.05:
        raise ValueError("the frame is (nearly) uniform: nothing to warp")
    grey = img.mean(-1)
    sector = find_sector((grey * 255).astype(np.uint8))
    if sector is None:
        raise ValueError("no scan sector found in the frame")
    cavity, centre, spread = find_cavity(grey, sector)
    rng = np.random.default_rng(seed)

    rr_s = 60.0 / heart_rate_bpm
    T = int(n_frames) if n_frames is not None else max(2, int(math.ceil(n_beats * rr_s * fps)))
    t0 = start_phase * rr_s
    ed_t = _beats(t0 + T / fps, rr_s, rr_jitter, rng)
    rr = np.diff(ed_t)
    es_t = ed_t[:-1] + np.minimum(SYSTOLE_SHARE * rr_s, 0.6 * rr)
    t = t0 + np.arange(T) / fps
    k = np.clip(np.searchsorted(ed_t, t, side="right") - 1, 0, rr.size - 1)
    vol = _volume((t - ed_t[k]) / rr[k], (es_t[k] - ed_t[k]) / rr[k], rr_jitter >= 0.1)
    ed = [f for x in ed_t if (f := _extreme_frame(vol, x - t0, fps, True)) is not None]
    es = [f for x in es_t if (f := _extreme_frame(vol, x - t0, fps, False)) is not None]

    h, box = _profile(sector, cavity)
    rows, cols = np.mgrid[box[0]:box[1], box[2]:box[3]].astype(np.float32)
    patch = img[box[0]:box[1], box[2]:box[3]]
    grey_box = bool(np.percentile(np.abs(patch - patch.mean(-1, keepdims=True)).max(-1)[h > 0.01], 99) < 6 / 255)
    source = img.mean(-1) if grey_box else img  # a grey region (codec chroma noise aside) is warped once
    a_max = 1.0 / (1.0 - squeeze) - 1.0  # the wall (r = 1) moves in by `squeeze` of its distance
    gain = _dropout((H, W), sector, centre, spread) if dropout else np.ones((H, W), np.float32)
    grain = max(0.6, max(H, W) / 180.0)
    out = np.empty((T, H, W, C), dtype=np.uint8)
    for i in range(T):
        a = a_max * (1.0 - vol[i]) * h
        coords = np.stack([centre[0] + (rows - centre[0]) * (1 + LONGITUDINAL * a),
                           centre[1] + (cols - centre[1]) * (1 + a)])
        f = img.copy()
        region = f[box[0]:box[1], box[2]:box[3]]
        if grey_box:
            region[:] = warp(source, coords, order=1, mode="edge", preserve_range=True)[..., None]
        else:
            for ch in range(C):
                region[..., ch] = warp(source[..., ch], coords, order=1, mode="edge", preserve_range=True)
        scale = gain * (1.0 + gain_drift * (2.0 * i / max(T - 1, 1) - 1.0))
        if speckle:
            scale = scale * ((1.0 - speckle) + speckle * _speckle((H, W), grain, rng))
        out[i] = np.clip(f * scale[..., None] * 255.0 + 0.5, 0, 255).astype(np.uint8)
    params = dict(fps=float(fps), heart_rate_bpm=float(heart_rate_bpm), n_frames=T, rr_jitter=float(rr_jitter),
                  size=[H, W], squeeze=float(squeeze), speckle=float(speckle), gain_drift=float(gain_drift),
                  dropout=bool(dropout), start_phase=float(start_phase), seed=int(seed))
    cine = Cine(out[..., 0] if C == 1 else out, fps=fps,
                source=SourceInfo(format="warped phantom", extra={"phantom": params}))
    return WarpedPhantom(cine, ed, es, float(rr.mean() * fps), vol, centre, params)


# ----------------------------------------------------------------------------- evaluation
GRID = {"rhythm": ("sinus", "irregular"), "fps": (20, 50, 120), "size": (112, 600), "dropout": (False, True)}


def _inner(frames: list, T: int, margin: int) -> list:
    """Truth events the clip shows with room around them (not within ``margin`` of its ends)."""
    return [f for f in frames if margin <= f <= T - 1 - margin]


def evaluate_warped(cines_folder, n: int = 40, seed: int = 0, grid: Optional[dict] = None,
                    tolerance: int = 3, max_gain_drift: float = 0.2) -> list:
    """``detect_ed_es`` (images only) on phantoms from one random frame of each of ``n`` cines of an
    EchoNet-layout folder (``Videos/*.avi``), for every setting of ``grid`` (default :data:`GRID`),
    with a random heart rate (55-100 bpm), squeeze, start phase, speckle and gain drift (up to
    ``max_gain_drift``) per phantom.
    One dict per phantom; truth events within ``tolerance`` frames of the clip's ends are not
    counted (no detector can tell whether their extremum lies beyond)."""
    paths = sorted(Path(cines_folder, "Videos").glob("*.avi"))
    if not paths:
        raise FileNotFoundError(f"{cines_folder}: no Videos/*.avi (an EchoNet-Dynamic layout folder)")
    grid = grid or GRID
    picks = np.random.default_rng(seed).permutation(len(paths))[:n]
    rows = []
    for j in picks:
        rng = np.random.default_rng([seed, int(j)])  # per cine: a larger n adds cines, keeps the first ones
        src = load_cine(paths[j])
        index = int(rng.integers(src.num_frames))
        frame = src.frames[index]
        for setting in itertools.product(*grid.values()):
            s = dict(zip(grid.keys(), setting))
            try:
                ph = make_warped_phantom(frame, fps=s["fps"], heart_rate_bpm=float(rng.uniform(55, 100)),
                                         n_beats=4.0, rr_jitter=0.2 if s["rhythm"] == "irregular" else 0.02,
                                         size=s["size"], squeeze=float(rng.uniform(0.18, 0.3)),
                                         speckle=float(rng.uniform(0.2, 0.5)),
                                         gain_drift=float(rng.uniform(0.0, max_gain_drift)), dropout=s["dropout"],
                                         start_phase=float(rng.uniform(0, 1)), seed=int(rng.integers(2 ** 31)))
            except ValueError as err:  # a frame without a sector or cavity: the cine is left out, the run goes on
                print(f"cine #{j} frame {index}: skipped ({err})", file=sys.stderr)
                break
            found = detect_ed_es(ph.cine)
            T = ph.cine.num_frames
            row = {**s, "cine": int(j), "frame": index, "params": ph.params, "signal": found.signal_name}
            for kind, det, truth in (("ed", found.ed_frames, ph.ed_frames), ("es", found.es_frames, ph.es_frames)):
                inner = _inner(truth, T, tolerance)
                acc = event_accuracy(det, inner, tolerance)
                edges = [f for f in det if not tolerance <= f <= T - 1 - tolerance]  # not counted as false
                row[kind] = {"truth": len(inner), "hits": acc["hits"],
                             "false": max(0, acc["false"] - len(edges)), "detected": [int(f) for f in det],
                             "true": inner}
            rows.append(row)
        print(f"cine {len(rows) // max(1, len(list(itertools.product(*grid.values()))))}/{len(picks)} done",
              file=sys.stderr, flush=True)
    return rows


def summarise(rows: list, keys: Sequence[str]) -> list:
    """Per group of ``keys`` (and overall): ED and ES hits / truth and false events."""
    groups = {}
    for r in rows:
        for key in (tuple(r[k] for k in keys), ("all",)):
            g = groups.setdefault(key, {"n": 0, "ed": [0, 0, 0], "es": [0, 0, 0]})
            g["n"] += 1
            for kind in ("ed", "es"):
                g[kind] = [a + b for a, b in zip(g[kind], (r[kind]["hits"], r[kind]["truth"], r[kind]["false"]))]
    return sorted(({"setting": k, **v} for k, v in groups.items()), key=lambda g: g["setting"] == ("all",))


def _pct(h, t):
    return f"{100.0 * h / t:5.1f} %" if t else "   -   "


def cli(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m EchoFMEngine.clinical.warped_phantoms",
                                 description="ED/ES accuracy of detect_ed_es (images only) on phantoms warped from "
                                             "real frames, per setting (rhythm, fps, size, drop-out) and overall.")
    ap.add_argument("--data", required=True, help="EchoNet-layout folder with Videos/*.avi (e.g. dev100)")
    ap.add_argument("--n", type=int, default=40, help="cines to take one frame from (default 40)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sizes", type=int, nargs="+", default=list(GRID["size"]), help="output long sides (px)")
    ap.add_argument("--fps", type=int, nargs="+", default=list(GRID["fps"]))
    ap.add_argument("--worst", type=int, default=8, help="list this many worst phantoms")
    ap.add_argument("--max-gain-drift", type=float, default=0.2,
                    help="gain drift per phantom is drawn from 0 to this (default 0.2: +-20 %% over the clip)")
    ap.add_argument("--json", help="also write every phantom's row to this JSON file")
    args = ap.parse_args(argv)
    grid = {**GRID, "size": tuple(args.sizes), "fps": tuple(args.fps)}
    rows = evaluate_warped(args.data, args.n, args.seed, grid, max_gain_drift=args.max_gain_drift)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"{'rhythm':<10}{'fps':>4}{'px':>5} {'dropout':<8}{'clips':>6}  {'ED<=3':>8}  {'ES<=3':>8}  false ED/ES")
    for g in summarise(rows, ("rhythm", "fps", "size", "dropout")):
        label = "overall" + " " * 20 if g["setting"] == ("all",) else \
            "{:<10}{:>4}{:>5} {:<8}".format(g["setting"][0], g["setting"][1], g["setting"][2], str(g["setting"][3]))
        print(f"{label}{g['n']:>6}  {_pct(*g['ed'][:2])}  {_pct(*g['es'][:2])}  {g['ed'][2]} / {g['es'][2]}")
    worst = sorted(rows, key=lambda r: (r["ed"]["hits"] + r["es"]["hits"]) - (r["ed"]["truth"] + r["es"]["truth"]))
    print("\nworst phantoms (cine index in the sorted folder, settings, truth vs detected):")
    for r in worst[: args.worst]:
        p = r["params"]
        print(f"  cine #{r['cine']} frame {r['frame']} {r['rhythm']} {r['fps']} fps {r['size']} px dropout={r['dropout']} "
              f"hr={p['heart_rate_bpm']:.0f} start={p['start_phase']:.2f} gain={p['gain_drift']:.2f} seed={p['seed']} [{r['signal'][:12]}]\n"
              f"    ED true {r['ed']['true']} found {r['ed']['detected']}\n"
              f"    ES true {r['es']['true']} found {r['es']['detected']}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
