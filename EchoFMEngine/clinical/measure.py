"""Chamber volumes and ejection fraction from 2D masks (apical views).

The long axis runs from the apex to the midpoint of the mitral annulus, both found on the
cavity outline (``skimage.measure.find_contours``) in millimetres, so anisotropic pixels and
any rotation are handled. The annulus is taken, in this order, from: the side of the cavity
that the myocardium leaves open (label maps with myocardium, as CAMUS and the phantoms), the
longest straight stretch of the convex hull facing the apex (a truncated cavity), the
interface with the left atrium, or, for a cavity without a base (a full ellipse), the major
axis. Formulas (``../shared/spec/data-formats.md``): method of discs
``V = sum(pi (d_i/2)^2 L/N)``, area-length ``V = 8 A^2 / (3 pi L)``, biplane Simpson
``V = sum(pi/4 a_i b_i L/N)``, ``EF = (EDV - ESV) / EDV * 100``. Volumes are in ml when the
pixel spacing is known and in ``px^3`` otherwise (never presented as ml).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull
from skimage import measure

N_DISCS = 20
UNIT_ML, UNIT_PX = "ml", "px^3"
_FLAT_TOL_PX = 0.75        # a hull stretch is straight when no vertex strays further (pixels)
_MIN_BASE_FRACTION = 0.45  # a straight base spans at least this share of the cavity's width
_APEX_CAP_PX = 0.5         # outline points this close to the farthest distance form the apex cap
_MIN_AXIS_OF_DIAMETER = 0.8  # the long axis is at least this share of the longest chord
_TOUCH_PX = 0.8            # outline points this close to a myocardium pixel centre are covered
_LA_TOUCH_PX = 1.5         # ... and this close to an LA pixel centre touch the atrium


@dataclass
class LVVolume:
    """One cavity measured: volume with its unit, long axis (mm or px) and its end points
    (row, col in pixels), the annulus points, the disc diameters and how the base was found."""

    volume: float
    unit: str
    length: float
    area: float
    apex: tuple
    base_mid: tuple
    annulus: tuple = ()
    diameters: list = field(default_factory=list)
    method: str = "discs"
    axis_rule: str = ""
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready copy (plain floats)."""
        return {"volume": float(self.volume), "unit": self.unit, "length": float(self.length),
                "area": float(self.area), "apex": [float(v) for v in self.apex],
                "base_mid": [float(v) for v in self.base_mid],
                "annulus": [[float(v) for v in p] for p in self.annulus],
                "diameters": [float(d) for d in self.diameters], "method": self.method,
                "axis_rule": self.axis_rule, "notes": list(self.notes)}


# ----------------------------------------------------------------------------- inputs
def _spacing(spacing_mm, need: bool, what: str) -> tuple[float, float]:
    if spacing_mm is None:
        if need:
            raise ValueError(f"{what}: pixel spacing is unknown (spacing_mm=None), so a volume in ml cannot "
                             "be computed; use lv_volume(mask) for a volume in px^3")
        return 1.0, 1.0
    try:
        sy, sx = (float(s) for s in spacing_mm)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: spacing_mm must be (row_mm, col_mm), got {spacing_mm!r}") from exc
    if not (sy > 0 and sx > 0 and math.isfinite(sy) and math.isfinite(sx)):
        raise ValueError(f"{what}: spacing_mm must be two positive numbers, got {spacing_mm!r}")
    return sy, sx


def _cavity(mask, what: str) -> tuple[np.ndarray, list]:
    """The largest connected component of a 2D mask with its holes filled (and notes on what was dropped)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"{what}: expected a 2D mask [H, W], got shape {m.shape}")
    m = m.astype(bool)
    if not m.any():
        raise ValueError(f"{what}: the mask is empty (no cavity pixels), nothing to measure")
    notes = []
    lab, n = ndimage.label(m)
    if n > 1:
        sizes = np.bincount(lab.ravel())[1:]
        keep = int(np.argmax(sizes)) + 1
        notes.append(f"{what}: {n} separate regions, measured the largest ({int(sizes.max())} of "
                     f"{int(sizes.sum())} pixels)")
        m = lab == keep
    filled = ndimage.binary_fill_holes(m)
    if filled.sum() > m.sum():
        notes.append(f"{what}: filled {int(filled.sum() - m.sum())} hole pixel(s)")
    if filled.sum() < 3:
        raise ValueError(f"{what}: the mask has {int(filled.sum())} pixel(s), too small to measure")
    return filled, notes


def _outline_mm(mask: np.ndarray, sp: tuple) -> np.ndarray:
    """Closed outline of a filled mask (pixel-edge midpoints, first point repeated) as (row_mm, col_mm)."""
    contours = measure.find_contours(np.pad(mask.astype(np.float32), 1), 0.5)
    c = max(contours, key=len) - 1.0
    if not np.allclose(c[0], c[-1]):
        c = np.vstack([c, c[:1]])
    return c * np.asarray(sp)


def _optional(mask, shape, what: str) -> Optional[np.ndarray]:
    if mask is None:
        return None
    m = np.asarray(mask).astype(bool)
    if m.shape != tuple(shape):
        raise ValueError(f"{what} has shape {m.shape}, the cavity mask {tuple(shape)}")
    return m if m.any() else None


# ----------------------------------------------------------------------------- long axis
def _distance_to(region: np.ndarray, points_mm: np.ndarray, sp: tuple) -> np.ndarray:
    """Distance (mm) from outline points to the nearest pixel centre of ``region``."""
    d = ndimage.distance_transform_edt(~region, sampling=sp)
    rc = (points_mm / np.asarray(sp)).T
    return ndimage.map_coordinates(d, rc, order=1, mode="nearest")


def _longest_run(flags: np.ndarray) -> Optional[tuple[int, int]]:
    """(first, last) index of the longest run of True in a cyclic sequence, or None."""
    n = flags.size
    if not flags.any():
        return None
    if flags.all():
        return 0, n - 1
    start = int(np.flatnonzero(~flags)[0]) + 1  # begin just after a False: runs never wrap
    best, cur = None, None
    for k in range(n):
        i = (start + k) % n
        if flags[i]:
            cur = (cur[0], i, cur[2] + 1) if cur else (i, i, 1)
            if best is None or cur[2] > best[2]:
                best = cur
        else:
            cur = None
    return best[0], best[1]


def _apex_from(base_mid: np.ndarray, outline: np.ndarray, cap_mm: float) -> np.ndarray:
    """Farthest outline point from ``base_mid``, averaged over the cap of points within ``cap_mm`` of
    that distance around it (a rasterised apex is a short flat run, not a single point)."""
    pts = outline[:-1]
    d = np.hypot(*(pts - base_mid).T)
    k = int(np.argmax(d))
    near = d >= d[k] - cap_mm
    n = pts.shape[0]
    idx = [k]
    for step in (1, -1):  # grow the contiguous run around the farthest point
        j = (k + step) % n
        while near[j] and j != k and len(idx) < n:
            idx.append(j)
            j = (j + step) % n
    return pts[idx].mean(axis=0)


def _diameter(outline: np.ndarray) -> tuple[float, int, int]:
    """Longest chord of the outline (the convex hull's diameter) and its end indices."""
    pts = outline[:-1]
    try:
        idx = ConvexHull(pts).vertices
    except Exception:  # degenerate (all points on a line)
        idx = np.arange(pts.shape[0])
    h = pts[idx]
    d = np.hypot(h[:, None, 0] - h[None, :, 0], h[:, None, 1] - h[None, :, 1])
    i, j = np.unravel_index(int(np.argmax(d)), d.shape)
    return float(d[i, j]), int(idx[i]), int(idx[j])


def _plausible_base(a: np.ndarray, b: np.ndarray, outline: np.ndarray, cap_mm: float,
                    min_fraction: float, diameter: float) -> Optional[np.ndarray]:
    """Apex for annulus points ``a``, ``b`` if the pair looks like a base: the apex lies across
    it (>= 60 degrees from the annulus line), the base spans ``min_fraction`` of the cavity's
    extent along it and the axis is >= 0.8 of the longest chord (an LV or LA is not much wider
    than long, so a straight side is not taken for the base); else None."""
    w = float(np.hypot(*(b - a)))
    if w <= 0:
        return None
    u = (b - a) / w
    mid = (a + b) / 2
    apex = _apex_from(mid, outline, cap_mm)
    axis = apex - mid
    if np.hypot(*axis) <= 0 or abs(float(np.dot(axis, u))) > 0.5 * float(np.hypot(*axis)):
        return None
    proj = (outline - mid) @ u
    if w < min_fraction * float(proj.max() - proj.min()):
        return None
    if np.hypot(*axis) < _MIN_AXIS_OF_DIAMETER * diameter:
        return None
    return apex


def _open_side(outline, covered: np.ndarray) -> Optional[tuple]:
    """Annulus points: the ends of the longest run of outline points not covered by ``covered``."""
    run = _longest_run(~covered[:-1])
    if run is None or run[0] == run[1]:
        return None
    return outline[run[0]], outline[run[1]]


def _flat_hull_edges(outline: np.ndarray, tol_mm: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Maximal straight stretches of the convex hull: runs of hull vertices all within ``tol_mm``
    of the chord joining the run's ends (stretches inside a longer one are dropped), as end
    points on their outer supporting line."""
    pts = outline[:-1]
    try:
        hull = pts[ConvexHull(pts).vertices]
    except Exception:  # degenerate (all points on a line)
        return []
    n = hull.shape[0]
    ends = []
    for i in range(n):
        best, j = i + 1, i + 2
        while j <= i + n - 1:
            a, ab = hull[i], hull[j % n] - hull[i]
            mid = hull[np.arange(i + 1, j) % n]
            dist = np.abs(ab[0] * (mid[:, 1] - a[1]) - ab[1] * (mid[:, 0] - a[0])) / max(np.hypot(*ab), 1e-12)
            if dist.max() > tol_mm:
                break
            best, j = j, j + 1
        ends.append(best)
    out = []
    for i in range(n):
        prev_end = ends[i - 1] - (n if i == 0 else 0)  # in the same unwrapped numbering as ends[i]
        if prev_end >= ends[i]:
            continue  # the stretch from the previous vertex already covers this one
        out.append(_support_line(hull[np.arange(i, ends[i] + 1) % n], pts, tol_mm))
    return out


def _support_line(verts: np.ndarray, outline: np.ndarray, tol_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Ends of a nearly straight run of hull vertices, moved onto the line through the middle
    of the outline points along it (a rasterised edge zig-zags about the true one; the median
    offset of its points lies on it)."""
    a, b = verts[0], verts[-1]
    length = max(float(np.hypot(*(b - a))), 1e-12)
    u = (b - a) / length
    nrm = np.array([-u[1], u[0]])
    along, off = (outline - a) @ u, (outline - a) @ nrm
    on = (along >= 0) & (along <= length) & (np.abs(off) <= tol_mm)
    shift = float(np.median(off[on])) if on.any() else 0.0
    # ends: the outermost outline points on that line, a little past the run's ends (the
    # rasterised corners can stray further than the tolerance)
    near = (np.abs(off - shift) <= tol_mm) & (along >= -0.1 * length) & (along <= 1.1 * length)
    lo, hi = (float(along[near].min()), float(along[near].max())) if near.any() else (0.0, length)
    return a + u * lo + nrm * shift, a + u * hi + nrm * shift


def _major_axis(outline: np.ndarray, cap_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Both ends of the longest chord (the hull's diameter), each refined to the middle of its cap."""
    j = _diameter(outline)[2]
    p = _apex_from(outline[j], outline, cap_mm)
    q = _apex_from(p, outline, cap_mm)
    return p, q


def _long_axis(outline: np.ndarray, sp: tuple, myo: Optional[np.ndarray], la: Optional[np.ndarray]) -> tuple:
    """(apex, base_mid, annulus (a, b), rule) in mm for a cavity outline; ``myo`` / ``la`` are
    masks of the myocardium and the atrium (or None)."""
    px = max(sp)
    cap = _APEX_CAP_PX * min(sp)
    diameter = _diameter(outline)[0]
    if myo is not None:  # the myocardium wraps the cavity except at the mitral annulus
        ends = _open_side(outline, _distance_to(myo, outline, sp) <= _TOUCH_PX * px)
        if ends is not None:
            apex = _plausible_base(*ends, outline, cap, 0.25, diameter)
            if apex is not None:
                return apex, (ends[0] + ends[1]) / 2, ends, "myocardium opening"
    near_la = _distance_to(la, outline, sp) if la is not None else None
    candidates = []
    for a, b in _flat_hull_edges(outline, _FLAT_TOL_PX * px):
        apex = _plausible_base(a, b, outline, cap, _MIN_BASE_FRACTION, diameter)
        if apex is not None:
            candidates.append((a, b, apex))
    # of several straight stretches (overlapping pieces of one base, or distinct edges), the
    # longest one with the longest axis across from it
    candidates.sort(key=lambda c: -float(np.hypot(*(c[1] - c[0])) * np.hypot(*(c[2] - (c[0] + c[1]) / 2))))
    if candidates:
        if near_la is not None:  # only the straight bases next to the atrium
            d = _distance_to(la, np.array([(c[0] + c[1]) / 2 for c in candidates]), sp)
            candidates = [c for c, dc in zip(candidates, d) if dc <= d.min() + 3 * px]
        a, b, apex = candidates[0]
        return apex, (a + b) / 2, (a, b), "straight base"
    if near_la is not None:
        ends = _open_side(outline, ~(near_la <= _LA_TOUCH_PX * px))
        if ends is not None:
            apex = _plausible_base(*ends, outline, cap, 0.25, diameter)
            if apex is not None:
                return apex, (ends[0] + ends[1]) / 2, ends, "atrium interface"
    p, q = _major_axis(outline, cap)
    if la is not None:  # the base is the end nearer the atrium
        dp, dq = (_distance_to(la, np.stack([p, q]), sp))
        base_is_p = dp < dq
    elif myo is not None:  # ... or the end the myocardium leaves open
        dp, dq = (_distance_to(myo, np.stack([p, q]), sp))
        base_is_p = dp > dq
    else:  # apical views: the apex points to the transducer at the top of the image
        base_is_p = p[0] > q[0]
    apex, base = (q, p) if base_is_p else (p, q)
    return apex, base, (base, base), "major axis"


def _chord_lengths(outline: np.ndarray, origin: np.ndarray, axis: np.ndarray,
                   positions: np.ndarray) -> np.ndarray:
    """Length inside the outline polygon of each line perpendicular to ``axis`` at ``positions``
    (mm from ``origin`` along the axis): even-odd crossings, so concave outlines are handled."""
    normal = np.array([-axis[1], axis[0]])
    s = (outline - origin) @ axis
    t = (outline - origin) @ normal
    sa, sb, ta, tb = s[:-1], s[1:], t[:-1], t[1:]
    out = np.zeros(positions.size)
    for i, p in enumerate(positions):
        cross = (sa <= p) != (sb <= p)
        tc = np.sort(ta[cross] + (p - sa[cross]) * (tb[cross] - ta[cross]) / (sb[cross] - sa[cross]))
        out[i] = float(np.sum(tc[1::2] - tc[0::2])) if tc.size >= 2 else 0.0
    return out


@dataclass
class _Axis:
    outline: np.ndarray
    apex: np.ndarray
    base: np.ndarray
    annulus: tuple
    rule: str
    length: float
    area: float
    notes: list

    def diameters(self, n_discs: int) -> np.ndarray:
        axis = (self.apex - self.base) / self.length
        pos = (np.arange(n_discs) + 0.5) * self.length / n_discs
        return _chord_lengths(self.outline, self.base, axis, pos)


def _axis(mask, sp: tuple, what: str, myo=None, la=None) -> _Axis:
    cav, notes = _cavity(mask, what)
    myo = _optional(myo, cav.shape, f"{what}: myocardium mask")
    la = _optional(la, cav.shape, f"{what}: atrium mask")
    outline = _outline_mm(cav, sp)
    apex, base, annulus, rule = _long_axis(outline, sp, myo if myo is None else myo & ~cav,
                                           la if la is None else la & ~cav)
    length = float(np.hypot(*(apex - base)))
    if length <= 0:
        raise ValueError(f"{what}: no long axis could be found (degenerate mask)")
    return _Axis(outline, apex, base, annulus, rule, length, float(cav.sum()) * sp[0] * sp[1], notes)


def _px(p_mm: np.ndarray, sp: tuple) -> tuple:
    return float(p_mm[0] / sp[0]), float(p_mm[1] / sp[1])


# ----------------------------------------------------------------------------- public API
def lv_volume(mask, spacing_mm=None, method: str = "discs", n_discs: int = N_DISCS, myo_mask=None,
              la_mask=None) -> LVVolume:
    """LV volume of a 2D cavity mask by the method of discs (``n_discs`` discs perpendicular to the
    apex-annulus axis) or area-length; ml with ``spacing_mm`` (row_mm, col_mm), else px^3.
    ``myo_mask`` / ``la_mask`` (same shape) help find the mitral annulus."""
    if method not in ("discs", "area-length"):
        raise ValueError(f"method must be 'discs' or 'area-length', got {method!r}")
    if int(n_discs) < 1:
        raise ValueError(f"n_discs must be >= 1, got {n_discs}")
    known = spacing_mm is not None
    sp = _spacing(spacing_mm, False, "lv_volume")
    ax = _axis(mask, sp, "LV mask", myo_mask, la_mask)
    d = ax.diameters(int(n_discs))
    if method == "discs":
        v = float(np.sum(np.pi * (d / 2) ** 2) * ax.length / int(n_discs))
    else:
        v = 8.0 * ax.area ** 2 / (3.0 * math.pi * ax.length)
    return LVVolume(volume=v / 1000.0 if known else v, unit=UNIT_ML if known else UNIT_PX,
                    length=ax.length, area=ax.area, apex=_px(ax.apex, sp), base_mid=_px(ax.base, sp),
                    annulus=tuple(_px(p, sp) for p in ax.annulus), diameters=[float(x) for x in d],
                    method=method, axis_rule=ax.rule, notes=ax.notes)


def lv_volume_ml(mask, spacing_mm, method: str = "discs", n_discs: int = N_DISCS, myo_mask=None,
                 la_mask=None) -> float:
    """LV volume in ml (``spacing_mm`` required: ValueError when None)."""
    _spacing(spacing_mm, True, "lv_volume_ml")
    return lv_volume(mask, spacing_mm, method, n_discs, myo_mask, la_mask).volume


def area_length_volume_ml(mask, spacing_mm, myo_mask=None, la_mask=None) -> float:
    """Area-length volume ``8 A^2 / (3 pi L)`` in ml (A: mask area, L: apex-annulus length)."""
    return lv_volume_ml(mask, spacing_mm, "area-length", myo_mask=myo_mask, la_mask=la_mask)


def la_volume_ml(mask, spacing_mm, lv_mask=None) -> float:
    """LA volume by area-length in ml; L runs from the mitral annulus midpoint (the interface
    with ``lv_mask`` when given) to the far wall of the atrium."""
    sp = _spacing(spacing_mm, True, "la_volume_ml")
    ax = _axis(mask, sp, "LA mask", None, lv_mask)
    return 8.0 * ax.area ** 2 / (3.0 * math.pi * ax.length) / 1000.0


def biplane_volume_ml(mask_a4c, mask_a2c, spacing_a4c, spacing_a2c, n_discs: int = N_DISCS) -> float:
    """Simpson's biplane ``sum(pi/4 a_i b_i L/N)``: diameters a_i (A4C) and b_i (A2C) at the same
    fractions of each view's long axis, L the longer of the two axes; ml (both spacings required)."""
    sa = _spacing(spacing_a4c, True, "biplane_volume_ml (A4C)")
    sb = _spacing(spacing_a2c, True, "biplane_volume_ml (A2C)")
    n = int(n_discs)
    if n < 1:
        raise ValueError(f"n_discs must be >= 1, got {n_discs}")
    a4, a2 = _axis(mask_a4c, sa, "A4C mask"), _axis(mask_a2c, sb, "A2C mask")
    length = max(a4.length, a2.length)
    return float(np.sum(np.pi / 4 * a4.diameters(n) * a2.diameters(n)) * length / n) / 1000.0


def ejection_fraction(edv: float, esv: float) -> float:
    """``(EDV - ESV) / EDV * 100`` in percent. ValueError when a volume is not finite, EDV <= 0,
    ESV < 0 or ESV > EDV (a negative EF means swapped ED/ES frames or wrong masks)."""
    edv, esv = float(edv), float(esv)
    if not (math.isfinite(edv) and math.isfinite(esv)):
        raise ValueError(f"EDV and ESV must be finite numbers, got {edv}, {esv}")
    if edv <= 0:
        raise ValueError(f"EDV must be positive, got {edv}")
    if esv < 0:
        raise ValueError(f"ESV must not be negative, got {esv}")
    if esv > edv:
        raise ValueError(f"ESV ({esv:.4g}) is larger than EDV ({edv:.4g}): ED and ES frames swapped or "
                         "masks inconsistent")
    return (edv - esv) / edv * 100.0


# ----------------------------------------------------------------------------- label maps
def _pair_cycles(ed: list, es: list) -> tuple[list, list]:
    """(ED, ES) pairs: each ED with the first ES before the next ED; if none pairs that way, an
    ES with the ED after it (a clip that starts in systole). Returns pairs and notes."""
    events = sorted([(f, "ed") for f in ed] + [(f, "es") for f in es])
    pairs = [(a, b) for (a, ka), (b, kb) in zip(events[:-1], events[1:]) if ka == "ed" and kb == "es"]
    if pairs or not ed or not es:
        return pairs, []
    pairs = [(b, a) for (a, ka), (b, kb) in zip(events[:-1], events[1:]) if ka == "es" and kb == "ed"]
    return pairs, ["no ES follows an ED in the clip: each ES is paired with the ED after it"]


def cardiac_measurements(labels, spacing_mm, ed_frames: Sequence[int], es_frames: Sequence[int],
                         lv_labels: Sequence[int] = (1,), la_label: Optional[int] = 3, method: str = "discs",
                         myo_label: Optional[int] = 2, expected_shape: Optional[tuple] = None) -> dict:
    """Volumes and EF from label maps ``[T, H, W]``: LV volume and area per frame (None where a
    frame has no LV mask), EDV / ESV / EF per cycle and their means, and the largest LA volume
    (area-length). Units: ml and mm^2 with ``spacing_mm``, px^3 and px^2 without.
    ``expected_shape`` (the cine's (T, H, W)) is checked when given. JSON-serialisable."""
    lab = np.asarray(labels)
    if expected_shape is not None and tuple(lab.shape) != tuple(expected_shape):
        raise ValueError(f"label maps have shape {tuple(lab.shape)} but the frames are {tuple(expected_shape)} "
                         "[T, H, W]: masks do not match the cine")
    if lab.ndim != 3:
        raise ValueError(f"label maps must be [T, H, W], got shape {lab.shape}")
    if method not in ("discs", "area-length"):
        raise ValueError(f"method must be 'discs' or 'area-length', got {method!r}")
    T = lab.shape[0]
    ed = sorted({int(f) for f in ed_frames})
    es = sorted({int(f) for f in es_frames})
    bad = [f for f in ed + es if not 0 <= f < T]
    if bad:
        raise ValueError(f"ED/ES frame(s) {bad} outside the label maps' {T} frames")
    known = spacing_mm is not None
    sp = _spacing(spacing_mm, False, "cardiac_measurements")
    lv = np.isin(lab, list(lv_labels))
    notes: list = [] if known else ["pixel spacing unknown: volumes in px^3 and areas in px^2, not ml"]
    volumes: list = [None] * T
    areas: list = [None] * T
    la_vols: list = []
    for t in range(T):
        if not lv[t].any():
            continue
        myo = lab[t] == myo_label if myo_label is not None else None
        la = lab[t] == la_label if la_label is not None else None
        r = lv_volume(lv[t], spacing_mm, method=method, myo_mask=myo, la_mask=la)
        volumes[t], areas[t] = float(r.volume), float(r.area)
        notes += [f"frame {t}: {n}" for n in r.notes]
        if la is not None and la.any():
            try:
                ax = _axis(la, sp, f"LA mask (frame {t})", None, lv[t])
                v = 8.0 * ax.area ** 2 / (3.0 * math.pi * ax.length)
                la_vols.append(v / 1000.0 if known else v)
            except ValueError as exc:
                notes.append(str(exc))
    for kind, frames in (("ED", ed), ("ES", es)):
        missing = [f for f in frames if volumes[f] is None]
        if missing:
            notes.append(f"{kind} frame(s) {missing} have no LV mask: not measured")
    pairs, pair_notes = _pair_cycles([f for f in ed if volumes[f] is not None],
                                     [f for f in es if volumes[f] is not None])
    notes += pair_notes
    cycles = []
    for a, b in pairs:
        edv, esv = volumes[a], volumes[b]
        try:
            ef = ejection_fraction(edv, esv)
        except ValueError as exc:
            ef = None
            notes.append(f"cycle ED {a} / ES {b}: {exc}")
        cycles.append({"ed_frame": a, "es_frame": b, "edv": edv, "esv": esv, "ef_percent": ef})
    good = [c for c in cycles if c["ef_percent"] is not None]
    if not good:
        notes.append("no ED/ES pair with a valid EF in the clip")
    mean = (lambda key: float(np.mean([c[key] for c in good])) if good else None)
    return {"unit": UNIT_ML if known else UNIT_PX, "area_unit": "mm^2" if known else "px^2",
            "method": method, "n_discs": N_DISCS if method == "discs" else None,
            "lv_volume": volumes, "lv_area": areas, "ed_frames": ed, "es_frames": es,
            "edv": mean("edv"), "esv": mean("esv"), "ef_percent": mean("ef_percent"), "cycles": cycles,
            "la_volume": float(max(la_vols)) if la_vols else None, "notes": notes}
