"""Mask propagation: one or more labelled frames of a cine become label maps on every frame.

Contour tracking as in commercial echo tools, without trained weights: dense optical flow
(OpenCV DIS) between consecutive speckle-filtered frames inside the scan sector carries each
structure's signed distance map from a known frame to its neighbours; between two known frames
tracking runs from both sides and the two estimates are blended by temporal distance. A plain
flow chain lags the wall motion (the tracked cavity stays too big at end-systole), so after
every step the LV cavity outline is snapped to the blood/tissue edge of that frame: a two-class
threshold of the blood pool inside a narrow band around the tracked outline, kept close to the
tracked shape. Topology is enforced in every frame: no holes, one component per structure, the
LV cavity inside the LV epicardium, the LA outside the LV.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

import cv2
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..cine import Cine
from ..tasks import LABEL_VALUES
from .geometry import find_sector

# The project's label vocabulary (EchoFMEngine.tasks.LABELS).
LV_ENDO, LV_MYO, LA = (LABEL_VALUES[name] for name in ("lv_cavity", "lv_myocardium", "la"))
KNOWN_LABELS = (0, LV_ENDO, LV_MYO, LA)

_REF_SIZE = 112.0      # pixel sizes below are tuned at EchoNet's 112 px and scale with the frame
_WORK_SIDE = 256       # larger frames are tracked on a grid of this many pixels on the longer side
_FLOW_SIDE = 224       # flow is computed on frames resized to this many pixels on the longer side
_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


class PropagationCancelled(RuntimeError):
    """The caller's cancel() returned True; nothing was returned."""


@dataclass
class PropagationOptions:
    """Tuning knobs (defaults measured on EchoNet traced cines and the phantoms, docs/propagation.md)."""

    refine: bool = True          # snap the LV cavity to the blood/tissue edge in every frame
    band_px: float = 3.0         # half-width of the refinement band at 112 px
    prior_weight: float = 0.5    # share of the tracked shape in the refined outline (0: image only)
    smooth_sigma_px: float = 1.0  # speckle filter (Gaussian after a 3x3 median) at 112 px
    flow_preset: int = 2         # cv2.DISOPTICAL_FLOW_PRESET_* (2: MEDIUM)
    flow_side: int = _FLOW_SIDE   # frames are resized to this longer side for the flow
    flow_stride: int = 4
    flow_iters: int = 25
    flow_var_iters: int = 0      # variational refinement iterations (the flow's main cost)
    flow_finest: int = 0         # finest pyramid level DIS computes (0: the resized frame itself)
    blood_margin: Optional[float] = 18.0  # grey levels above the key frame's local blood level still blood
    outline_smooth_px: float = 1.0  # Gaussian smoothing of the refined outline's distance map (112 px)
    reanchor: bool = True        # drift correction: frames like the key frame are registered to it directly
    reanchor_min: float = 0.0    # below this blend weight the direct registration is skipped (saves a flow)
    grow_px: float = 1.0         # how far (112 px) the cavity may grow into dark pixels per frame ...
    grow_above: float = 0.03     # ... in frames where the flow widens it by more than this share
    flow_workers: int = 2        # threads computing consecutive-frame flows ahead of the chain (0: none)
    prefetch: int = 8            # how many flows ahead of the chain are queued


# ----------------------------------------------------------------------------- checks
def _grey_frames(cine) -> np.ndarray:
    """Luma [T, H, W] (uint8 for uint8 RGB, else float32) of a Cine or an array [T, H, W(, 3)]."""
    frames = cine.frames if isinstance(cine, Cine) else np.asarray(cine)
    if frames.ndim == 4:
        if frames.shape[-1] != 3:
            raise ValueError(f"cine frames must be [T, H, W] or [T, H, W, 3], got shape {frames.shape}")
        if frames.dtype == np.uint8:
            g = np.stack([cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames])
        else:
            f = frames.astype(np.float32)
            g = 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]
    elif frames.ndim == 3:
        g = frames.astype(np.float32)
    else:
        raise ValueError(f"cine frames must be [T, H, W] or [T, H, W, 3], got shape {frames.shape}")
    if g.shape[0] < 2:
        raise ValueError(f"propagation needs a cine of at least two frames, got {g.shape[0]} frame(s)")
    return g


def _checked_masks(masks, shape: tuple) -> dict[int, np.ndarray]:
    """{frame: uint8 [H, W]} after checking frames, shapes, labels and emptiness."""
    T, H, W = shape
    if not isinstance(masks, Mapping):
        raise ValueError(f"masks must be a dict {{frame_index: [H, W] label map}}, got {type(masks).__name__}")
    if not masks:
        raise ValueError("masks is empty: give at least one labelled frame {frame_index: [H, W] label map}")
    out = {}
    for key, m in masks.items():
        try:
            k = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"mask frame index {key!r} is not an integer") from None
        if k != key or not 0 <= k < T:
            raise ValueError(f"mask frame index {key!r} is outside the cine (frames 0..{T - 1})")
        a = np.asarray(m)
        if a.shape != (H, W):
            raise ValueError(f"mask for frame {k} has shape {a.shape} but the cine's frames are {H}x{W}")
        if not np.issubdtype(a.dtype, np.integer) and a.dtype != bool:
            if not np.all(np.equal(np.mod(a, 1), 0)):
                raise ValueError(f"mask for frame {k} holds non-integer values; expected a label map")
        a = a.astype(np.int64)
        bad = sorted(set(np.unique(a).tolist()) - set(KNOWN_LABELS))
        if bad:
            raise ValueError(f"mask for frame {k} holds unknown label(s) {bad}; expected "
                             f"{LV_ENDO} (LV endo), {LV_MYO} (LV myocardium), {LA} (LA) or 0")
        if not a.any():
            raise ValueError(f"mask for frame {k} is empty (no labelled pixel)")
        out[k] = a.astype(np.uint8)
    return out


def read_label_volume(path) -> np.ndarray:
    """``[T, H, W]`` uint8 labels (0 to 3) of a label volume file (NRRD, NIfTI, any SimpleITK
    format; one 2-D label map is one frame). The one reader of mask files for the engine and the
    Slicer library; ValueError names the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: masks file not found")
    try:
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as exc:
        raise ValueError(f"{path}: cannot read as a label volume ({str(exc).strip().splitlines()[-1]})") from None
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{path}: expected a [frames, rows, cols] label volume, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.mod(arr, 1) == 0):
            raise ValueError(f"{path}: holds non-integer values; expected labels 0-3")
    bad = sorted(set(np.unique(arr).astype(int).tolist()) - set(KNOWN_LABELS))
    if bad:
        raise ValueError(f"{path}: unexpected label value(s) {bad[:5]}; expected 0, {LV_ENDO} (LV endo), "
                         f"{LV_MYO} (LV myocardium), {LA} (LA)")
    return arr.astype(np.uint8)


def read_mask_frames(path) -> dict[int, np.ndarray]:
    """``{frame: [H, W] uint8}`` of the labelled frames of a ``[T, H, W]`` label volume
    (:func:`read_label_volume`): frames with no labelled pixel are left out."""
    arr = read_label_volume(path)
    frames = np.flatnonzero(arr.reshape(arr.shape[0], -1).any(1))
    if frames.size == 0:
        raise ValueError(f"{path}: no labelled frame (all zero)")
    return {int(f): arr[f] for f in frames}


# ----------------------------------------------------------------------------- image preparation
def _sector(grey: np.ndarray) -> np.ndarray:
    s = find_sector(grey)
    return np.ones(grey.shape[1:], dtype=bool) if s is None else s


def _prefilter(grey: np.ndarray, sector: np.ndarray, sigma_px: float) -> np.ndarray:
    """Speckle-filtered uint8 frames: 3x3 median then Gaussian, zero outside the sector."""
    out = np.empty(grey.shape, dtype=np.uint8)
    g8 = np.clip(grey, 0, 255).astype(np.uint8)
    k = 3 if sigma_px < 2.5 else 5
    for i in range(g8.shape[0]):
        f = cv2.medianBlur(g8[i], k)
        f = cv2.GaussianBlur(f, (0, 0), sigma_px)
        f[~sector] = 0
        out[i] = f
    return out


# ----------------------------------------------------------------------------- flow
class _Flow:
    """Backward flows between frames on a resized grid (DIS), each computed once and handed out
    once; ``warp(sdf, src, dst)`` moves a map from frame src to dst. ``prefetch`` queues the
    consecutive-frame flows a tracking chain will ask for on worker threads (OpenCV releases the
    GIL), so they are computed while the chain refines earlier frames; results are the same."""

    def __init__(self, images: np.ndarray, preset: int, side: int = _FLOW_SIDE, stride: int = 2,
                 iters: int = 50, var_iters: int = 10, finest: int = 0, workers: int = 0):
        self.images = images
        T, H, W = images.shape
        self.scale = side / max(H, W)
        if abs(self.scale - 1.0) > 0.05:
            size = (max(8, int(round(W * self.scale))), max(8, int(round(H * self.scale))))
            interp = cv2.INTER_AREA if self.scale < 1.0 else cv2.INTER_CUBIC
            self.small = np.stack([cv2.resize(f, size, interpolation=interp) for f in images])
        else:
            self.scale, self.small = 1.0, images
        self.params = (preset, stride, finest, iters, var_iters)
        self.local = threading.local()      # one DIS object per thread (they keep state)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="echofm-flow") if workers > 0 else None
        self.pending: dict = {}
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
        self.grid = (xx, yy)

    def _dis(self):
        dis = getattr(self.local, "dis", None)
        if dis is None:
            # Fine patches, dense stride: at echo resolution the stock presets smooth the wall
            # motion away (the tracked cavity lags the contraction).
            preset, stride, finest, iters, var_iters = self.params
            dis = cv2.DISOpticalFlow_create(preset)
            dis.setPatchSize(8)
            dis.setPatchStride(stride)
            dis.setFinestScale(finest)
            dis.setGradientDescentIterations(iters)
            dis.setVariationalRefinementIterations(var_iters)
            dis.setVariationalRefinementAlpha(10.0)
            self.local.dis = dis
        return dis

    def _compute(self, dst: int, src: int) -> np.ndarray:
        f = self._dis().calc(self.small[dst], self.small[src], None)
        if self.scale != 1.0:
            H, W = self.images.shape[1:]
            interp = cv2.INTER_AREA if self.scale > 1.0 else cv2.INTER_LINEAR
            f = cv2.resize(f, (W, H), interpolation=interp) / self.scale
        return f

    def prefetch(self, pairs: Iterable[tuple]) -> None:
        """Start computing the flows ``(dst, src)`` in the background (no-op without workers)."""
        if self.pool is None:
            return
        for key in pairs:
            if key not in self.pending:
                self.pending[key] = self.pool.submit(self._compute, *key)

    def field(self, dst: int, src: int) -> np.ndarray:
        """Flow f on dst's grid with I_dst(x) ~ I_src(x + f(x)) (full resolution, [H, W, 2])."""
        fut = self.pending.pop((dst, src), None)
        return fut.result() if fut is not None else self._compute(dst, src)

    def warp(self, maps: dict, src: int, dst: int) -> dict:
        """``{name: map}`` on frame src moved to frame dst (one flow for all of them)."""
        f = self.field(dst, src)
        mx, my = self.grid[0] + f[..., 0], self.grid[1] + f[..., 1]
        return {k: cv2.remap(v, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
                for k, v in maps.items()}

    def close(self) -> None:
        """Stop the workers; flows not yet started are dropped."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()


# ----------------------------------------------------------------------------- shapes
def _sdf(mask: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) of a bool mask, float32 (OpenCV's exact Euclidean
    transform: the same values as scipy's, several times faster)."""
    if not mask.any():
        return np.full(mask.shape, 1e3, dtype=np.float32)
    m8 = mask.astype(np.uint8)
    inside = cv2.distanceTransform(m8, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    outside = cv2.distanceTransform(1 - m8, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return outside - inside + np.where(mask, np.float32(0.5), np.float32(-0.5))


def _clean(mask: np.ndarray) -> np.ndarray:
    """One component (4-connected, the largest), no holes; worked on the mask's bounding box so
    that large frames stay fast."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return mask
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box = np.zeros((r1 - r0 + 2, c1 - c0 + 2), np.uint8)     # one px of background all round
    box[1:-1, 1:-1] = mask[r0:r1, c0:c1]
    n, lab, stats, _ = cv2.connectedComponentsWithStats(box, connectivity=4)
    if n > 2:
        box = (lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    outside = box.copy()
    cv2.floodFill(outside, None, (0, 0), 2, flags=4)           # background reached from the border
    out = np.zeros(mask.shape, dtype=bool)
    out[r0:r1, c0:c1] = (outside != 2)[1:-1, 1:-1]
    return out


def _blood_level(image: np.ndarray, cavity: np.ndarray, sigma: float) -> np.ndarray:
    """Local blood-pool brightness around a known cavity (normalised convolution of the cavity's
    pixels): near-field haze and side-lobe clutter inside the cavity raise it, so they are not
    mistaken for wall by the refinement. Static in image space, like the haze."""
    core = ndimage.binary_erosion(cavity, iterations=1)
    if core.sum() < 10:
        core = cavity
    w = core.astype(np.float32)
    num = cv2.GaussianBlur(image.astype(np.float32) * w, (0, 0), sigma)
    den = cv2.GaussianBlur(w, (0, 0), sigma)
    glob = float(np.median(image[core])) if core.any() else 0.0
    wt = np.clip(den / max(float(den.max()), 1e-6) * 4.0, 0.0, 1.0)
    return (wt * num / np.maximum(den, 1e-6) + (1 - wt) * glob).astype(np.float32)


def _refine_cavity(sdf: np.ndarray, image: np.ndarray, band: float, prior_weight: float,
                   sector: np.ndarray, grow: float = 1.0, blood_level=None,
                   margin: float = 10.0, smooth: float = 0.0, keep_out=None) -> np.ndarray:
    """Snap the tracked cavity (sdf < 0) to the dark blood pool of ``image`` within +-band px;
    it grows by at most ``grow`` px, never into ``keep_out`` (the tracked LA, when drawn)."""
    near = np.abs(sdf) <= 2.0 * band
    near &= sector
    vals = image[near]
    if vals.size < 20:
        return sdf
    thr, _ = cv2.threshold(vals.astype(np.uint8).reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    blood = image.astype(np.float32) < thr
    if blood_level is not None:
        blood |= image.astype(np.float32) < blood_level + margin
    core = sdf <= -band
    inner = (sdf < 0) & ~core
    grow_zone = (sdf >= 0) & (sdf < grow)
    if keep_out is not None:
        grow_zone &= ~keep_out
    # growth only into pixels as dark as the key frame's blood (Otsu's class leaks into the LA)
    dark = image.astype(np.float32) < (blood_level + 0.5 * margin if blood_level is not None else thr)
    cand = core | (inner & blood) | (grow_zone & dark)
    cand = cv2.morphologyEx(cand.astype(np.uint8), cv2.MORPH_OPEN, _CROSS, borderType=cv2.BORDER_CONSTANT,
                            borderValue=0).astype(bool) | core
    cand = _clean(cand)
    if not cand.any():
        return sdf
    s_img = _sdf(cand)
    out = (prior_weight * sdf + (1.0 - prior_weight) * s_img).astype(np.float32)
    if smooth > 0:      # experts draw smooth outlines; pixel-wise thresholds are ragged
        n = int((out < 0).sum())
        blur = cv2.GaussianBlur(out, (0, 0), smooth)
        if 0 < n < blur.size:   # same area as before smoothing: no shrinkage accumulates frame by frame
            flat = blur.ravel()
            part = np.partition(flat, (n - 1, n))
            level = 0.5 * (part[n - 1] + part[n])
            blur = blur - np.float32(level)
        out = blur
    return out


# ----------------------------------------------------------------------------- main
def _labels_present(known: dict) -> list:
    present = set()
    for m in known.values():
        present |= set(np.unique(m).tolist())
    return sorted(present - {0})


def _structures(mask: np.ndarray) -> dict[str, np.ndarray]:
    """Nested structures tracked separately: LV cavity, LV epicardium (cavity + myocardium), LA."""
    return {"endo": mask == LV_ENDO, "epi": (mask == LV_ENDO) | (mask == LV_MYO), "la": mask == LA}


def _compose(sdfs: dict, present: list, shape: tuple) -> np.ndarray:
    """Label map from per-structure sdfs with topology kept: endo inside epi, LA outside the LV."""
    out = np.zeros(shape, dtype=np.uint8)
    endo = _clean(sdfs["endo"] < 0) if LV_ENDO in present else np.zeros(shape, bool)
    epi = None
    if LV_MYO in present:
        epi = _clean((sdfs["epi"] < 0) | endo)
        out[epi] = LV_MYO
    out[endo] = LV_ENDO
    if LA in present:
        la = sdfs["la"] < 0
        la &= out == 0
        la = _clean(la) & (out == 0)
        out[la] = LA
    return out


def propagate_masks(cine, masks: Mapping[int, np.ndarray], frames: Optional[Iterable[int]] = None,
                    options: Optional[PropagationOptions] = None,
                    progress: Optional[Callable[[float, str], None]] = None,
                    cancel: Optional[Callable[[], bool]] = None) -> np.ndarray:
    """Label maps ``[T, H, W]`` uint8 for every frame of ``cine`` (or ``[len(frames), H, W]`` for
    ``frames``) from ``masks`` ``{frame: [H, W] label map}`` (labels 1 LV endo, 2 LV myocardium,
    3 LA). Known frames come back unchanged. ValueError names bad input."""
    opt = options or PropagationOptions()
    grey = _grey_frames(cine)
    T, H, W = grey.shape
    known = _checked_masks(masks, (T, H, W))
    wanted = list(range(T)) if frames is None else [int(f) for f in frames]
    for f in wanted:
        if not 0 <= f < T:
            raise ValueError(f"requested frame {f} is outside the cine (frames 0..{T - 1})")
    known_full, full = known, (H, W)
    shrink = min(1.0, _WORK_SIDE / max(H, W))
    if shrink < 1.0:   # large frames: track on a reduced grid, outlines scaled back smoothly at the end
        size = (max(16, int(round(W * shrink))), max(16, int(round(H * shrink))))
        grey = np.stack([cv2.resize(g, size, interpolation=cv2.INTER_AREA) for g in grey])
        known = {k: cv2.resize(m, size, interpolation=cv2.INTER_NEAREST) for k, m in known.items()}
        T, H, W = grey.shape
    scale = min(H, W) / _REF_SIZE
    sector = _sector(grey)
    images = _prefilter(grey, sector, max(0.6, opt.smooth_sigma_px * scale))
    flow = _Flow(images, opt.flow_preset, opt.flow_side, opt.flow_stride, opt.flow_iters,
                 opt.flow_var_iters, opt.flow_finest, opt.flow_workers)
    present = _labels_present(known)
    band = max(1.5, opt.band_px * scale)
    keys = sorted(known)
    todo = set(wanted) - set(keys)
    lo, hi = (min(todo), max(todo)) if todo else (0, -1)
    total = max(1, sum(1 for _ in _segments(keys, T, lo, hi)))
    done = [0]

    def tick(msg):
        done[0] += 1
        if progress is not None:
            progress(min(1.0, done[0] / total), msg)
        if cancel is not None and cancel():
            raise PropagationCancelled("mask propagation cancelled")

    flat = images[:, sector].astype(np.float32)
    flat -= flat.mean(axis=1, keepdims=True)
    flat /= np.linalg.norm(flat, axis=1, keepdims=True) + 1e-6
    ncc_cache: dict = {}

    def anchor_weight(key: int, t: int) -> float:
        """Drift correction: 0 for frames unlike the key frame, up to 1 for frames as alike as its
        neighbours (the same phase of a later beat), from normalised cross-correlation."""
        if key not in ncc_cache:
            ncc = flat @ flat[key]
            near = [ncc[i] for i in (key - 1, key + 1) if 0 <= i < T]
            ncc_cache[key] = (ncc, float(np.median(ncc)), float(np.mean(near)))
        ncc, mid, top = ncc_cache[key]
        if abs(t - key) <= 2 or top <= mid:
            return 0.0
        w = float(np.clip((ncc[t] - mid) / (top - mid), 0.0, 1.0) ** 2)
        return w if w >= opt.reanchor_min else 0.0

    def track(start: int, stop: int) -> dict[int, dict]:
        """Per-frame structure sdfs tracked from known frame ``start`` towards ``stop`` (exclusive)."""
        step = 1 if stop > start else -1
        cur = {k: _sdf(v) for k, v in _structures(known[start]).items()}
        key_sdf = dict(cur)
        level = _blood_level(images[start], known[start] == LV_ENDO, 4.0 * scale) \
            if opt.blood_margin is not None else None
        out = {}
        prev_area = float((cur["endo"] < 0).sum())
        for t in range(start + step, stop, step):
            ahead = [u for u in range(t, t + step * opt.prefetch, step) if (u - stop) * step < 0]
            flow.prefetch([(u, u - step) for u in ahead] +
                          [(u, start) for u in ahead if opt.reanchor and anchor_weight(start, u) > 0.0])
            cur = flow.warp(cur, t - step, t)
            w = anchor_weight(start, t) if opt.reanchor else 0.0
            if w > 0.0:   # a frame that looks like the key frame: register it to the key frame directly
                direct = flow.warp(key_sdf, start, t)
                cur = {k: w * direct[k] + (1.0 - w) * cur[k] for k in cur}
            if opt.refine and LV_ENDO in present:
                # The flow lags the wall both ways. Contracting, the outline is cut back to the
                # blood/tissue edge; expanding (the flow itself widens the cavity: diastole), it
                # may also grow into blood-dark pixels, else a chain from ES stays too small.
                area = float((cur["endo"] < 0).sum())
                grow = opt.grow_px * scale if area > prev_area * (1.0 + opt.grow_above) else 0.0
                cur["endo"] = _refine_cavity(cur["endo"], images[t], band, opt.prior_weight, sector,
                                              grow, level, opt.blood_margin or 0.0,
                                              opt.outline_smooth_px * scale,
                                              cur["la"] < 0 if LA in present else None)
                prev_area = float((cur["endo"] < 0).sum())
            out[t] = cur
            tick(f"tracking frame {t}")
        return out

    try:
        result = _track_segments(track, known, keys, present, T, lo, hi, (H, W))
    finally:
        flow.close()
    out = np.empty((len(wanted), *full), dtype=np.uint8)
    for i, f in enumerate(wanted):
        if f in known_full:
            out[i] = known_full[f]
        elif shrink < 1.0:
            sdfs = {k: cv2.resize(_sdf(v), (full[1], full[0]), interpolation=cv2.INTER_LINEAR)
                    for k, v in _structures(result[f]).items()}
            out[i] = _compose(sdfs, present, full)
        else:
            out[i] = result[f]
    return out


def _track_segments(track, known: dict, keys: list, present: list, T: int, lo: int, hi: int,
                    shape: tuple) -> dict[int, np.ndarray]:
    """Label maps of every tracked frame: before the first key frame and after the last one one
    way; between two key frames both ways, blended by temporal distance."""
    H, W = shape
    result: dict[int, np.ndarray] = {k: known[k].copy() for k in keys}
    if keys[0] > 0 and lo < keys[0]:
        for t, s in track(keys[0], max(-1, lo - 1)).items():
            result[t] = _compose(s, present, (H, W))
    for a, b in zip(keys[:-1], keys[1:]):
        if b - a < 2 or hi < a or lo > b:
            continue
        fwd, bwd = track(a, b), track(b, a)
        for t in range(a + 1, b):
            w = (t - a) / (b - a)
            s = {k: (1 - w) * fwd[t][k] + w * bwd[t][k] for k in fwd[t]}
            result[t] = _compose(s, present, (H, W))
    if keys[-1] < T - 1 and hi > keys[-1]:
        for t, s in track(keys[-1], hi + 1).items():
            result[t] = _compose(s, present, (H, W))
    return result


def _segments(keys: Sequence[int], T: int, lo: int, hi: int):
    """Frames that will be tracked (for progress), one yield per tracking step."""
    if keys[0] > 0 and lo < keys[0]:
        yield from range(max(0, lo), keys[0])
    for a, b in zip(keys[:-1], keys[1:]):
        if b - a >= 2 and not (hi < a or lo > b):
            yield from range(2 * (b - a - 1))
    if keys[-1] < T - 1 and hi > keys[-1]:
        yield from range(keys[-1] + 1, hi + 1)
