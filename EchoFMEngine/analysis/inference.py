"""Run fine-tuned models over a whole cine: windows of the model's frame count, at the model's size.

Every model sees frames prepared the way it was trained (scan sector blanked, cropped and fitted
into ``size x size`` by :func:`EchoFMEngine.geometry.prepare_frames`), in windows that span about
one cardiac cycle (:func:`EchoFMEngine.cycles.clip_windows`). Segmentations come back in the
original pixel geometry through the inverse sector transform.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..cine import Cine
from ..cycles import clip_windows
from ..geometry import SectorTransform, prepare_frames


@dataclass
class Prepared:
    """The cine at one model size: frames ``[T, S, S, 3]`` uint8 and the transform back."""

    frames: np.ndarray
    transform: SectorTransform


def input_size(model) -> tuple[int, int]:
    """(frames, size) a fine-tuned model expects, from its self-description."""
    inp = model.description["input"]
    return int(inp["frames"]), int(inp["height"])


def prepare(cine: Cine, size: int, cache: dict) -> Prepared:
    if size not in cache:
        frames, tf = prepare_frames(cine.frames, size)
        cache[size] = Prepared(frames, tf)
    return cache[size]


def to_video(frames: np.ndarray, device) -> torch.Tensor:
    """``[K, T, S, S, 3]`` uint8 -> float ``[K, 3, T, S, S]`` in [0, 1] on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
    return x.permute(0, 4, 1, 2, 3).float().div_(255.0)


def cycle_windows(cine: Cine, n_frames: int, cycles: Optional[list]) -> list:
    """One window per cardiac cycle when cycles are known, else consecutive windows."""
    return clip_windows(cine, n_frames, cycles=cycles or [])


@torch.no_grad()
def clip_outputs(model, cine: Cine, prepared: Prepared, cycles: Optional[list], device,
                 batch_size: int = 4) -> np.ndarray:
    """Per-window outputs of a classifier (probabilities ``[W, C]``) or regressor (``[W]``)."""
    n, _ = input_size(model)
    windows = cycle_windows(cine, n, cycles)
    outs = []
    for i in range(0, len(windows), batch_size):
        clips = np.stack([w.take(prepared.frames) for w in windows[i:i + batch_size]])
        video = to_video(clips, device)
        y = model.predict_proba(video) if hasattr(model, "predict_proba") else model.predict(video)
        outs.append(y.float().cpu().numpy())
    return np.concatenate(outs)


def covering_windows(targets: Sequence[int], T: int, n: int, step: float) -> list[np.ndarray]:
    """Frame-index windows (``n`` samples ``step`` apart) until every target frame is in one.

    Each window starts at the first uncovered target (shifted back when it would run past the
    end), so every target is predicted with temporal context of about one cycle."""
    todo = sorted(set(int(t) for t in targets))
    span = (n - 1) * step
    out = []
    while todo:
        start = max(0, min(todo[0], int(np.floor(T - 1 - span))))
        idx = np.minimum(start + np.floor(np.arange(n) * step + 1e-9).astype(int), T - 1)
        if todo[0] not in idx:          # step > 1 can jump over the target: start exactly on it
            idx = np.minimum(todo[0] + np.floor(np.arange(n) * step + 1e-9).astype(int), T - 1)
        out.append(idx)
        done = set(idx.tolist())
        todo = [t for t in todo if t not in done]
    return out


@torch.no_grad()
def segment_frames(model, cine: Cine, prepared: Prepared, frames: Sequence[int], period_frames: Optional[float],
                   device, batch_size: int = 2) -> np.ndarray:
    """Label maps ``[T, H, W]`` uint8 in the original geometry, filled at ``frames`` (0 elsewhere).

    Windows are spread so that the model's ``n`` frames span about 1.25 cardiac cycles, as in
    training; when a frame lies in several windows, the window where it is most central wins,
    and only the winning frames are decoded."""
    n, _ = input_size(model)
    T = cine.num_frames
    step = max(1.0, 1.25 * period_frames / n) if period_frames else 1.0
    windows = covering_windows(frames, T, n, step)
    wanted = set(int(f) for f in frames)
    owner: dict = {}                  # frame -> (distance from its window's centre, window, position)
    for w, idx in enumerate(windows):
        for k, f in enumerate(idx.tolist()):
            d = abs(k - (n - 1) / 2)
            if f in wanted and (f not in owner or d < owner[f][0]):
                owner[f] = (d, w, k)
    H, W = cine.frames.shape[1:3]
    out = np.zeros((T, H, W), dtype=np.uint8)
    for i in range(0, len(windows), batch_size):
        group = list(range(i, min(i + batch_size, len(windows))))
        sel = torch.zeros(len(group), n, dtype=torch.bool)
        for f, (_, w, k) in owner.items():
            if w in group:
                sel[group.index(w), k] = True
        if not sel.any():
            continue
        video = to_video(np.stack([prepared.frames[windows[w]] for w in group]), device)
        pred = model(video, frames=sel.to(device)).argmax(1).cpu().numpy()     # [K, S, S], row-major
        rows, cols = np.nonzero(sel.numpy())
        for p, r, k in zip(pred, rows, cols):
            f = int(windows[group[r]][k])
            out[f] = prepared.transform.to_original(p.astype(np.uint8), order=0, inside_sector=True)
    return out
