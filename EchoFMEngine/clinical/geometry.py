"""Ultrasound scan geometry: find the sector (fan), blank what lies outside, and map
frames and masks between the original image and the square model input.

The sector is the region that holds the live image: pixels lit in the temporal-median frame,
cleaned of thin strokes (text, calibration marks, a burned-in ECG trace), as the connected
blob that changes most over time (for a single frame: the largest), joined with nearby live
pieces and made convex (skimage.morphology / measure). Frames are cropped to the
sector's bounding box, scaled to fit ``size x size`` keeping the aspect ratio and padded.
:class:`SectorTransform` keeps that mapping so model outputs can be put back on the
original pixels (and saved with results via ``to_dict``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import ndimage
from skimage import draw, measure, morphology, transform

_MAX_FRAMES_FOR_SECTOR = 48


def _luma_stack(frames: np.ndarray) -> np.ndarray:
    """Grey ``[T, H, W]`` float32 (0..255) of up to _MAX_FRAMES_FOR_SECTOR evenly spaced frames."""
    f = np.asarray(frames)
    if f.ndim == 2:
        f = f[None]
    if f.shape[0] > _MAX_FRAMES_FOR_SECTOR:
        f = f[np.linspace(0, f.shape[0] - 1, _MAX_FRAMES_FOR_SECTOR).round().astype(int)]
    f = f.astype(np.float32)
    if f.ndim == 4:
        f = 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]
    return f


def find_sector(frames: np.ndarray, min_fraction: float = 0.02) -> Optional[np.ndarray]:
    """Boolean ``[H, W]`` mask of the scan sector, or None when nothing plausible is found."""
    g = _luma_stack(frames)
    H, W = g.shape[1:]
    # Temporal median: a sweeping ECG cursor or blinking marker is lit in few frames only.
    # Spatial median: fills speckled dark tissue, erases one- or two-pixel lines.
    if g.shape[0] > 1:
        q25, base, q75 = np.percentile(g, [25, 50, 75], axis=0)
        spread = q75 - q25  # live image varies in most frames; a passing cursor does not count
    else:
        base, spread = g[0], np.zeros_like(g[0])
    k = max(3, int(round(min(H, W) / 100)) | 1)
    base = ndimage.median_filter(base, size=k)
    border = np.concatenate([base[0], base[-1], base[:, 0], base[:, -1]])
    lit = base > float(np.median(border)) + max(2.0, 0.02 * float(np.percentile(base, 99.5)))
    radius = max(1, int(round(min(H, W) / 150)))
    lit = morphology.opening(lit, morphology.disk(radius))
    labels = measure.label(lit, connectivity=2)
    if labels.max() == 0:
        return None
    # Score blobs by how much they change over time (static overlays score ~0); one frame: by size.
    live = spread.max() > 0.5
    weight = spread if live else np.ones_like(base)
    index = np.arange(1, labels.max() + 1)
    score = ndimage.sum_labels(weight, labels, index=index)
    area = ndimage.sum_labels(np.ones_like(base), labels, index=index)
    best = int(np.argmax(score))
    blob = labels == index[best]
    if blob.sum() < min_fraction * H * W:
        return None
    if live:  # add nearby pieces of live image cut off by dark bands (e.g. the near field)
        dist = ndimage.distance_transform_edt(~blob)
        near = ndimage.minimum(dist, labels, index=index) <= 0.1 * max(H, W)
        alive = score / area >= 0.25 * score[best] / area[best]
        big = area >= 1e-3 * H * W
        for lab in index[near & alive & big]:
            blob |= labels == lab
    return morphology.convex_hull_image(ndimage.binary_fill_holes(blob))


def blank_outside(frames: np.ndarray, sector: np.ndarray) -> np.ndarray:
    """Copy of ``frames`` ``[T, H, W(, C)]`` with every pixel outside ``sector`` set to 0."""
    out = np.array(frames, copy=True)
    out[:, ~sector] = 0
    return out


def _bbox(mask: np.ndarray) -> tuple:
    r0, c0, r1, c1 = measure.regionprops(mask.astype(np.uint8))[0].bbox
    return int(r0), int(c0), int(r1), int(c1)


def _polygon(mask: np.ndarray) -> list:
    """Outline of a (convex) mask as [[row, col], ...] for saving."""
    contours = measure.find_contours(np.pad(mask.astype(float), 1), 0.5)
    if not contours:
        return []
    c = max(contours, key=len) - 1.0
    return np.round(measure.approximate_polygon(c, tolerance=0.5), 2).tolist()


@dataclass
class SectorTransform:
    """Original image <-> model input: crop to ``bbox``, scale by ``scale``, pad by ``offset``."""

    original_shape: tuple  # (H, W)
    size: int
    bbox: tuple  # (row0, col0, row1, col1), end exclusive
    scale: float  # model pixels per original pixel
    offset: tuple  # (pad_top, pad_left) in model pixels
    sector_polygon: Optional[list] = None  # [[row, col], ...] in original pixels
    sector_found: bool = True

    @classmethod
    def fit(cls, original_shape: tuple, bbox: tuple, size: int, sector_polygon=None,
            sector_found: bool = True) -> "SectorTransform":
        """The transform that fits ``bbox`` into ``size x size``, centred, aspect kept."""
        h, w = bbox[2] - bbox[0], bbox[3] - bbox[1]
        scale = size / max(h, w)
        nh, nw = min(size, int(round(h * scale))), min(size, int(round(w * scale)))
        return cls(tuple(int(v) for v in original_shape), int(size), tuple(int(v) for v in bbox),
                   float(scale), ((size - nh) // 2, (size - nw) // 2), sector_polygon, sector_found)

    @property
    def content_shape(self) -> tuple:
        """(rows, cols) of the scaled image inside the padded model frame."""
        h, w = self.bbox[2] - self.bbox[0], self.bbox[3] - self.bbox[1]
        return min(self.size, int(round(h * self.scale))), min(self.size, int(round(w * self.scale)))

    def affine(self) -> transform.AffineTransform:
        """Original (x=col, y=row) -> model coordinates, pixel centres at integers."""
        s = self.scale
        tx = s * (0.5 - self.bbox[1]) - 0.5 + self.offset[1]
        ty = s * (0.5 - self.bbox[0]) - 0.5 + self.offset[0]
        return transform.AffineTransform(scale=(s, s), translation=(tx, ty))

    def sector_mask(self) -> np.ndarray:
        """Boolean sector at the original size (all True if no sector was found)."""
        if not self.sector_polygon:
            return np.ones(self.original_shape, dtype=bool)
        return draw.polygon2mask(self.original_shape, np.asarray(self.sector_polygon))

    def _warp(self, arr: np.ndarray, inverse_map, shape: tuple, order: int) -> np.ndarray:
        arr = np.asarray(arr)
        lead = arr.shape[:-2]
        flat = arr.reshape((-1,) + arr.shape[-2:])
        out = np.empty((flat.shape[0],) + tuple(shape), dtype=np.float64)
        for i, a in enumerate(flat):
            out[i] = transform.warp(a.astype(np.float64), inverse_map, output_shape=shape, order=order,
                                    mode="constant", cval=0.0, preserve_range=True)
        if arr.dtype == bool:
            out = out > 0.5
        elif np.issubdtype(arr.dtype, np.integer):
            out = np.round(out)
        return out.astype(arr.dtype).reshape(lead + tuple(shape))

    def to_model(self, mask_original: np.ndarray, order: int = 0) -> np.ndarray:
        """``[..., H, W]`` on the original grid -> ``[..., size, size]`` (nearest by default)."""
        if tuple(np.shape(mask_original)[-2:]) != self.original_shape:
            raise ValueError(f"expected [..., {self.original_shape[0]}, {self.original_shape[1]}], "
                             f"got {np.shape(mask_original)}")
        return self._warp(mask_original, self.affine().inverse, (self.size, self.size), order)

    def to_original(self, mask_model: np.ndarray, order: int = 0, inside_sector: bool = False) -> np.ndarray:
        """``[..., size, size]`` model output -> ``[..., H, W]``: zero outside the crop (and sector)."""
        if tuple(np.shape(mask_model)[-2:]) != (self.size, self.size):
            raise ValueError(f"expected [..., {self.size}, {self.size}], got {np.shape(mask_model)}")
        out = self._warp(mask_model, self.affine(), self.original_shape, order)
        keep = np.zeros(self.original_shape, dtype=bool)
        r0, c0, r1, c1 = self.bbox
        keep[r0:r1, c0:c1] = True
        if inside_sector:
            keep &= self.sector_mask()
        out[..., ~keep] = 0
        return out

    def frames_to_model(self, frames: np.ndarray) -> np.ndarray:
        """Resample ``[T, H, W(, C)]`` uint8 frames to the model grid (bilinear, anti-aliased)."""
        f = np.asarray(frames)
        r0, c0, r1, c1 = self.bbox
        local = SectorTransform.fit((r1 - r0, c1 - c0), (0, 0, r1 - r0, c1 - c0), self.size)
        inv = local.affine().inverse
        sigma = (1.0 / self.scale - 1.0) / 2.0  # Gaussian pre-filter as skimage's resize when shrinking
        out = np.empty((f.shape[0], self.size, self.size) + f.shape[3:], dtype=np.uint8)
        for i in range(f.shape[0]):  # frame by frame: a long cine in float would not fit in memory
            crop = f[i, r0:r1, c0:c1].astype(np.float32)
            if sigma > 0:
                crop = ndimage.gaussian_filter(crop, sigma=(sigma, sigma) + (0,) * (crop.ndim - 2))
            warped = transform.warp(crop, inv, output_shape=(self.size, self.size), order=1,
                                    mode="constant", cval=0.0, preserve_range=True)
            out[i] = np.clip(np.round(warped), 0, 255).astype(np.uint8)
        return out

    def to_dict(self) -> dict:
        """JSON-ready description (for checkpoints and result files)."""
        return {"original_shape": list(self.original_shape), "size": self.size, "bbox": list(self.bbox),
                "scale": self.scale, "offset": list(self.offset), "sector_polygon": self.sector_polygon,
                "sector_found": self.sector_found}

    @classmethod
    def from_dict(cls, d: dict) -> "SectorTransform":
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(d["original_shape"]), int(d["size"]), tuple(d["bbox"]), float(d["scale"]),
                   tuple(d["offset"]), d.get("sector_polygon"), bool(d.get("sector_found", True)))


def prepare_frames(frames: np.ndarray, size: int = 112, sector: Optional[np.ndarray] = None):
    """Blank outside the sector, crop to it, fit into ``size x size``: (model_frames, SectorTransform)."""
    if hasattr(frames, "frames"):  # a Cine
        frames = frames.frames
    f = np.asarray(frames)
    if f.ndim == 3:
        f = np.repeat(f[..., None], 3, axis=-1)
    if f.ndim != 4 or f.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {f.dtype} {f.shape}")
    H, W = f.shape[1:3]
    found = True
    if sector is None:
        sector = find_sector(f)
    if sector is None or not sector.any():
        sector, found = np.ones((H, W), dtype=bool), False
    sector = np.asarray(sector, dtype=bool)
    tf = SectorTransform.fit((H, W), _bbox(sector), size,
                             sector_polygon=_polygon(sector) if found else None, sector_found=found)
    return tf.frames_to_model(blank_outside(f, sector)), tf


# ---------------------------------------------------------------------- identifiers, panels, colour
def blank_outside_sector(frames: np.ndarray, sector: Optional[np.ndarray] = None) -> np.ndarray:
    """Copy of ``frames`` with everything outside the scan sector set to 0 (burned-in names, dates and
    institution text lie outside it). When no sector is found, every pixel is blanked: an image that may
    carry identifiers is never written as it is. Use this for every picture the project writes."""
    f = np.asarray(frames)
    if sector is None:
        sector = find_sector(f)
    if sector is None or not np.asarray(sector).any():
        return np.zeros_like(f)
    return blank_outside(f if f.ndim >= 3 else f[None], np.asarray(sector, dtype=bool))


COLOUR_SATURATION = 60      # max - min over R, G, B: grey B-mode (and JPEG chroma noise) stays far below
COLOUR_SHARE = 0.015        # share of the sector's pixels in colour on a frame to call the frame colour Doppler


def colour_fraction(frames: np.ndarray, region: Optional[np.ndarray] = None) -> np.ndarray:
    """Per frame, the share of ``region`` (default: all) pixels that are strongly coloured."""
    f = np.asarray(frames)
    if f.ndim != 4 or f.shape[-1] < 3:
        return np.zeros(f.shape[0] if f.ndim >= 3 else 1)
    c = f[..., :3].astype(np.int16)
    sat = (c.max(-1) - c.min(-1) > COLOUR_SATURATION) & (c.max(-1) > 80)
    if region is not None:
        region = np.asarray(region, dtype=bool)
        return sat[:, region].mean(1) if region.any() else np.zeros(f.shape[0])
    return sat.reshape(f.shape[0], -1).mean(1)


TINT_SHARE = 0.35           # colour over more than this share of the sector in one hue: a tinted B-mode map


def _warm_cold(frames: np.ndarray, region: np.ndarray) -> tuple:
    """Per frame, the shares of coloured sector pixels that are warm (red/orange) and cold (blue)."""
    c = np.asarray(frames)[..., :3].astype(np.int16)[:, region]
    col = (c.max(-1) - c.min(-1) > COLOUR_SATURATION) & (c.max(-1) > 80)
    n = np.maximum(col.sum(1), 1)
    warm = (col & (c[..., 0] > c[..., 2] + 40)).sum(1) / n
    cold = (col & (c[..., 2] > c[..., 0] + 40)).sum(1) / n
    return warm, cold


def colour_doppler_frames(frames: np.ndarray, sector: Optional[np.ndarray] = None) -> list:
    """Frames that hold a colour (or power) Doppler box inside the scan sector. Colour overlays
    outside the sector (a green ECG trace) do not count, nor does a B-mode shown in one tint (colour
    over most of the sector in a single hue, e.g. a blue grey-map)."""
    f = np.asarray(frames)
    if sector is None:
        sector = find_sector(f)
    share = colour_fraction(f, sector)
    if f.ndim != 4 or not (share >= COLOUR_SHARE).any():
        return []
    region = np.ones(f.shape[1:3], bool) if sector is None or not np.asarray(sector).any() else np.asarray(sector)
    warm, cold = _warm_cold(f, region)
    doppler = (share >= COLOUR_SHARE) & ((share < TINT_SHARE) | ((warm >= 0.1) & (cold >= 0.1)))
    return [int(i) for i in np.flatnonzero(doppler)]


def find_panels(frames: np.ndarray, min_width: float = 0.15) -> list:
    """Column ranges ``[(c0, c1), ...]`` of image panels placed side by side (dual-screen exports, two
    views in one file); one range covering the width for an ordinary cine. Panels are found as runs of
    columns holding lit image in the upper 40 % of rows (where fans are narrow), separated by dark
    columns (the dark corners between two fans)."""
    g = _luma_stack(frames)
    H, W = g.shape[1:]
    bright = np.percentile(g, 95, axis=0) if g.shape[0] > 1 else g[0]
    bright = ndimage.median_filter(bright, size=3)       # speckle of the near field counts, single dots do not
    live = ndimage.binary_opening(bright > 20.0, iterations=1)
    lab, _ = ndimage.label(live)                          # drop markers and dots (tiny pieces)
    sizes = np.bincount(lab.ravel())
    live &= sizes[lab] >= max(4, int(0.002 * H * W))
    top = live[: max(1, int(0.4 * H))]
    occupied = top.mean(0) > 0.02
    runs, c = [], 0
    while c < W:
        if occupied[c]:
            s = c
            while c < W and occupied[c]:
                c += 1
            runs.append((s, c))
        c += 1
    runs = [r for r in runs if r[1] - r[0] >= min_width * W * 0.5]
    if len(runs) < 2:
        return [(0, W)]
    gaps = [(a[1], b[0]) for a, b in zip(runs, runs[1:])]
    if min(b - a for a, b in gaps) < 0.03 * W:
        return [(0, W)]
    cuts = [0] + [int(round((a + b) / 2)) for a, b in gaps] + [W]
    k = len(cuts) - 1                        # equal panels (the usual export) when the gaps allow it
    equal = [int(round(i * W / k)) for i in range(k + 1)]
    if all(a <= e <= b for (a, b), e in zip(gaps, equal[1:-1])):
        cuts = equal
    panels = [(a, b) for a, b in zip(cuts, cuts[1:])]
    if min(b - a for a, b in panels) < min_width * W or g.shape[0] < 2:
        return [(0, W)]         # a still image is never split (text columns beside a frame look like a panel)
    for i, (a, b) in enumerate(panels):
        # each panel's fan starts (its topmost lit rows) away from the cuts; one fan cut in two does not
        rows = np.flatnonzero(live[:, a:b].any(1))
        if rows.size == 0:
            return [(0, W)]
        head = live[rows[0]: rows[0] + max(2, int(0.1 * (rows[-1] - rows[0] + 1))), a:b]
        centre = a + float(np.nonzero(head)[1].mean())
        inner = [c for c in (a, b) if 0 < c < W]
        if any(abs(centre - c) < 0.25 * (b - a) for c in inner):
            return [(0, W)]
    return panels


def choose_bmode_panel(frames: np.ndarray, panels: list) -> tuple:
    """(index, reason) of the panel with the greyscale B-mode sector (most motion among grey panels);
    index None with the reason when no panel is B-mode."""
    f = np.asarray(frames)
    stats = []
    for c0, c1 in panels:
        sub = f[:, :, c0:c1]
        colour = float(np.median(colour_fraction(sub, find_sector(sub))))   # overlays outside the fan ignored
        g = _luma_stack(sub)
        motion = float((np.percentile(g, 90, axis=0) - np.percentile(g, 10, axis=0)).sum()) if g.shape[0] > 1 else 0.0
        stats.append((colour, motion))
    grey = [i for i, (colour, _) in enumerate(stats) if colour < COLOUR_SHARE * 0.5]
    if not grey:
        return None, (f"{len(panels)} panels side by side and none is a greyscale B-mode image "
                      f"(colour in every panel)")
    best = max(grey, key=lambda i: stats[i][1])
    c0, c1 = panels[best]
    return best, (f"{len(panels)} panels side by side; panel {best + 1} (columns {c0}-{c1 - 1}, greyscale, most "
                  f"motion) analysed")
