"""The paper's augmentations as small composable callables on item dicts.

One random draw per clip is applied to every frame and (for geometric ops) to the
masks, so labels stay on the anatomy. Segmentation: rotation +-15 deg, translation
+-10 %, scale 0.9-1.4, 16x16 random erasing (frames only). Classification:
horizontal flips only.

Randomness: pass a ``torch.Generator``, a ``numpy.random.Generator`` or an int seed
for reproducible draws; ``None`` uses torch's global RNG, which a DataLoader seeds
differently in each worker (a shared explicit generator would repeat the same draws
in every worker).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

GeneratorLike = Union[None, int, torch.Generator, np.random.Generator]
MASK_KEYS = ("masks",)


class _Rng:
    """Uniform draws from torch or numpy generators behind one interface."""

    def __init__(self, generator: GeneratorLike = None):
        if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
            g = torch.Generator()
            g.manual_seed(int(generator))
            generator = g
        if generator is not None and not isinstance(generator, (torch.Generator, np.random.Generator)):
            raise TypeError(f"generator must be None, an int, a torch or numpy Generator, got {type(generator)}")
        self.g = generator

    def uniform(self, low: float, high: float) -> float:
        if isinstance(self.g, np.random.Generator):
            return float(self.g.uniform(low, high))
        u = torch.rand((), generator=self.g).item()
        return float(low + (high - low) * u)

    def integer(self, low: int, high: int) -> int:
        """An integer in [low, high)."""
        if high <= low:
            return int(low)
        if isinstance(self.g, np.random.Generator):
            return int(self.g.integers(low, high))
        return int(torch.randint(low, high, (), generator=self.g).item())

    def chance(self, p: float) -> bool:
        if p >= 1.0:
            return True
        if p <= 0.0:
            return False
        return self.uniform(0.0, 1.0) < p


def _spatial(item: dict) -> tuple[int, int]:
    video = item["video"]
    if video.dim() < 3:
        raise ValueError(f"item['video'] must be [..., H, W], got shape {tuple(video.shape)}")
    return int(video.shape[-2]), int(video.shape[-1])


def _warp(x: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    """Resample ``x`` [..., H, W] with one 2x3 affine ``theta`` (output -> input, normalised)."""
    shape = x.shape
    h, w = shape[-2:]
    flat = x.reshape(1, -1, h, w)
    src = flat if flat.is_floating_point() else flat.float()
    grid = F.affine_grid(theta[None].to(src), [1, src.shape[1], h, w], align_corners=False)
    out = F.grid_sample(src, grid, mode=mode, padding_mode="zeros", align_corners=False)
    if not x.is_floating_point():
        out = out.round().to(x.dtype)
    return out.reshape(shape)


def affine_theta(angle_deg: float, translate: Sequence[float], scale: float, size: tuple[int, int]) -> torch.Tensor:
    """The 2x3 ``affine_grid`` matrix for: point p (pixels from centre) -> scale*R(angle)*p + t.

    R turns counter-clockwise on screen (y axis pointing down); ``translate`` is
    (tx, ty) as fractions of width and height.
    """
    h, w = size
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    # Forward rotation on screen coordinates (x right, y down), counter-clockwise as seen.
    rot = torch.tensor([[c, s], [-s, c]], dtype=torch.float64)
    t_pix = torch.tensor([translate[0] * w, translate[1] * h], dtype=torch.float64)
    d = torch.diag(torch.tensor([w / 2.0, h / 2.0], dtype=torch.float64))
    d_inv = torch.diag(torch.tensor([2.0 / w, 2.0 / h], dtype=torch.float64))
    inv = rot.T / scale  # inverse of scale * rot
    lin = d_inv @ inv @ d
    off = -(d_inv @ inv @ t_pix)
    return torch.cat([lin, off[:, None]], dim=1).float()


def affine(item: dict, angle_deg: float = 0.0, translate: Sequence[float] = (0.0, 0.0),
           scale: float = 1.0) -> dict:
    """Rotate/translate/scale frames (bilinear) and masks (nearest) of one item identically."""
    out = dict(item)
    if angle_deg == 0.0 and tuple(translate) == (0.0, 0.0) and scale == 1.0:
        return out
    theta = affine_theta(angle_deg, translate, scale, _spatial(item))
    out["video"] = _warp(item["video"], theta, "bilinear").clamp_(0.0, 1.0)
    for key in MASK_KEYS:
        if key in item and item[key] is not None:
            out[key] = _warp(item[key], theta, "nearest")
    return out


def erase(item: dict, top: int, left: int, size: int = 16, value: float = 0.0) -> dict:
    """Fill a ``size`` x ``size`` box of every frame with ``value``; masks are left alone."""
    out = dict(item)
    video = item["video"].clone()
    video[..., top:top + size, left:left + size] = value
    out["video"] = video
    return out


def hflip(item: dict) -> dict:
    """Mirror frames and masks left-right."""
    out = dict(item)
    out["video"] = torch.flip(item["video"], dims=[-1])
    for key in MASK_KEYS:
        if key in item and item[key] is not None:
            out[key] = torch.flip(item[key], dims=[-1])
    return out


@dataclass
class AffineParams:
    angle_deg: float
    translate: tuple[float, float]
    scale: float


class RandomAffine:
    """Random rotation (+-degrees), translation (+-fraction) and scale, one draw per clip."""

    def __init__(self, degrees: float = 15.0, translate: float = 0.10,
                 scale: tuple[float, float] = (0.9, 1.4), p: float = 1.0,
                 generator: GeneratorLike = None):
        if degrees < 0 or translate < 0 or not (0 < scale[0] <= scale[1]):
            raise ValueError(f"bad RandomAffine ranges: degrees={degrees}, translate={translate}, scale={scale}")
        self.degrees, self.translate, self.scale, self.p = float(degrees), float(translate), tuple(scale), p
        self.rng = _Rng(generator)

    def sample(self) -> AffineParams:
        """Draw one set of parameters."""
        return AffineParams(
            angle_deg=self.rng.uniform(-self.degrees, self.degrees),
            translate=(self.rng.uniform(-self.translate, self.translate),
                       self.rng.uniform(-self.translate, self.translate)),
            scale=self.rng.uniform(*self.scale),
        )

    def __call__(self, item: dict) -> dict:
        if not self.rng.chance(self.p):
            return dict(item)
        prm = self.sample()
        return affine(item, prm.angle_deg, prm.translate, prm.scale)


class RandomErasing:
    """Blank one ``size`` x ``size`` box at the same place in every frame (frames only)."""

    def __init__(self, size: int = 16, p: float = 0.5, value: float = 0.0, generator: GeneratorLike = None):
        if size < 1:
            raise ValueError(f"erasing size must be >= 1, got {size}")
        self.size, self.p, self.value = int(size), p, float(value)
        self.rng = _Rng(generator)

    def __call__(self, item: dict) -> dict:
        if not self.rng.chance(self.p):
            return dict(item)
        h, w = _spatial(item)
        top = self.rng.integer(0, max(1, h - self.size + 1))
        left = self.rng.integer(0, max(1, w - self.size + 1))
        return erase(item, top, left, self.size, self.value)


class RandomHorizontalFlip:
    """Mirror the whole clip (and its masks) with probability ``p``."""

    def __init__(self, p: float = 0.5, generator: GeneratorLike = None):
        self.p = p
        self.rng = _Rng(generator)

    def __call__(self, item: dict) -> dict:
        return hflip(item) if self.rng.chance(self.p) else dict(item)


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Iterable[Callable[[dict], dict]]):
        self.transforms = list(transforms)

    def __call__(self, item: dict) -> dict:
        for t in self.transforms:
            item = t(item)
        return item


def _shared(generator: GeneratorLike) -> GeneratorLike:
    """One generator object for a whole preset, so a seed gives one reproducible stream."""
    return _Rng(generator).g


def segmentation_augment(generator: GeneratorLike = None, erase_p: float = 0.5) -> Compose:
    """Paper segmentation set: rotate +-15 deg, translate +-10 %, scale 0.9-1.4, 16x16 erasing."""
    g = _shared(generator)
    return Compose([RandomAffine(15.0, 0.10, (0.9, 1.4), generator=g),
                    RandomErasing(16, p=erase_p, generator=g)])


def classification_augment(generator: GeneratorLike = None, p: float = 0.5) -> Compose:
    """Paper classification set: horizontal flips only."""
    return Compose([RandomHorizontalFlip(p, generator=_shared(generator))])


def build_augment(task: str, generator: GeneratorLike = None) -> Optional[Compose]:
    """Preset by task name: 'segmentation', 'classification'/'regression', or 'none'."""
    if task in ("segmentation", "seg"):
        return segmentation_augment(generator)
    if task in ("classification", "cls", "regression"):
        return classification_augment(generator)
    if task in ("none", None, ""):
        return None
    raise ValueError(f"unknown augmentation preset {task!r} (segmentation, classification, none)")
