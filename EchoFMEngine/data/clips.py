"""From a cine (and its labelled frames) to one model-ready clip, or to all clips for the cache.

Clips of T frames hold at least one full cardiac cycle where one can be found
(:func:`EchoFMEngine.clinical.cycles.clip_windows`); frames are fan-masked, cropped and fitted
to S x S (:func:`EchoFMEngine.clinical.geometry.prepare_frames`) and masks follow the same mapping.
Labelled frames inside a window are snapped into its sampled indices (moving the
nearest sample by less than one step) so masks are never lost to resampling.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from EchoFMEngine.cine import Cine
from EchoFMEngine.clinical.cycles import clip_windows, resample_cycle, reverse_pad
from EchoFMEngine.clinical.geometry import find_sector, prepare_frames


@dataclass
class Clip:
    """One model-ready clip: ``video`` float [3, T, S, S] in [0, 1], masks [T, S, S] long."""

    video: torch.Tensor
    indices: np.ndarray  # [T] source frame shown at each clip frame
    full_cycle: bool
    masks: torch.Tensor
    mask_valid: torch.Tensor
    sector_found: bool = True

    def meta(self) -> dict:
        """Frame bookkeeping for the item's ``meta`` (collates into batches)."""
        idx = self.indices
        return {"frames": torch.as_tensor(idx, dtype=torch.long), "start_frame": int(idx.min()),
                "end_frame": int(idx.max()) + 1, "full_cycle": bool(self.full_cycle),
                "sector_found": bool(self.sector_found)}


def _to_video(frames_uint8: np.ndarray) -> torch.Tensor:
    """uint8 [T, S, S, 3] -> float [3, T, S, S] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames_uint8)).permute(3, 0, 1, 2).contiguous().float().div_(255.0)


def _window_indices(window) -> np.ndarray:
    """Source frame indices of a cycles.ClipWindow."""
    return np.asarray(window.frame_indices, dtype=np.int64)


def snap_labelled(indices: np.ndarray, labelled) -> np.ndarray:
    """Move the nearest sample onto each labelled frame lying inside the (sorted) window."""
    out = np.array(indices, dtype=np.int64, copy=True)
    taken = set()
    for f in sorted(labelled):
        if not (out.min() <= f <= out.max()) or f in out:
            continue
        order = np.argsort(np.abs(out - f), kind="stable")
        for t in order:
            if int(out[t]) not in labelled and t not in taken:
                out[t] = f
                taken.add(t)
                break
    return out


def _labelled_masks(tf, masks: dict, indices: np.ndarray, size: int):
    """Masks [T, S, S] long and validity [T] for the clip frames that show a labelled frame."""
    t = len(indices)
    out = torch.zeros((t, size, size), dtype=torch.long)
    valid = torch.zeros(t, dtype=torch.bool)
    if masks:
        wanted = [k for k in range(t) if int(indices[k]) in masks]
        if wanted:
            stack = np.stack([np.asarray(masks[int(indices[k])]) for k in wanted]).astype(np.int64)
            mapped = tf.to_model(stack, order=0)
            for j, k in enumerate(wanted):
                out[k] = torch.from_numpy(np.ascontiguousarray(mapped[j]))
                valid[k] = True
    return out, valid


def choose_window(windows: list, labelled, mode: str = "best", generator: Optional[torch.Generator] = None):
    """The window holding most labelled frames (full-cycle ones first); 'random' draws among ties."""
    lab = list(labelled)

    def score(w):
        idx = _window_indices(w)
        n = sum(1 for f in lab if idx.min() <= f <= idx.max())
        return (n, bool(w.full_cycle))

    scores = [score(w) for w in windows]
    best = max(scores)
    ties = [w for w, s in zip(windows, scores) if s == best]
    if mode == "random" and len(ties) > 1:
        return ties[int(torch.randint(len(ties), (1,), generator=generator).item())]
    return ties[0]


MAX_LABEL_STRETCH = 4.0  # labelled frames further apart than 4x the window's own span cannot share a clip


def holding_labels(indices: np.ndarray, labelled, T: int, where: str = "") -> np.ndarray:
    """Window indices (sorted source frames) moved or stretched so that every labelled frame lies
    inside: a clip for training must show all the beat's labels (ED and ES), not only the ones the
    cycle detector's window happened to cover. ValueError when the labels cannot fit one clip."""
    lab = sorted(int(f) for f in labelled)
    idx = np.asarray(indices, dtype=np.int64)
    if not lab or (idx.min() <= lab[0] and lab[-1] <= idx.max()):
        return idx
    n = idx.size
    step = max(1.0, float(idx[-1] - idx[0]) / max(n - 1, 1))
    need = lab[-1] - lab[0]
    if need > MAX_LABEL_STRETCH * step * max(n - 1, 1):
        raise ValueError(f"{where}: labelled frames {lab[0]}..{lab[-1]} span {need + 1} frames, more than one "
                         f"clip of {n} frames can hold (at most {MAX_LABEL_STRETCH:g}x its span)")
    step = max(step, need / max(n - 1, 1))
    span = step * (n - 1)
    start = min(max(0.0, (lab[0] + lab[-1]) / 2 - span / 2), max(0.0, T - 1 - span))
    start = min(start, lab[0])
    out = np.clip(np.round(start + step * np.arange(n)), 0, T - 1).astype(np.int64)
    return snap_labelled(out, set(lab))


def cine_clip(cine: Cine, frames: int, size: int, masks: Optional[dict] = None, window: str = "best",
              where: str = "", generator: Optional[torch.Generator] = None) -> Clip:
    """One clip of ``frames`` x ``size`` from a cine; ``masks`` {source frame: [H, W] labels}."""
    masks = masks or {}
    windows = clip_windows(cine, frames)
    if windows:
        w = choose_window(windows, masks, window, generator)
        indices, full = _window_indices(w), bool(w.full_cycle)
    else:  # too short for any window: stretch the whole cine
        indices = np.linspace(0, cine.num_frames - 1, frames).round().astype(np.int64)
        full = False
    if len(indices) != frames:
        raise ValueError(f"{where}: clip window of {len(indices)} frames, expected {frames}")
    indices = snap_labelled(holding_labels(indices, set(masks), cine.num_frames, where), set(masks))
    sector = find_sector(cine.frames)
    video, tf = prepare_frames(cine.frames[indices], size, sector=sector)
    m, valid = _labelled_masks(tf, masks, indices, size)
    return Clip(_to_video(video), indices, full, m, valid, tf.sector_found)


def cycle_clip(frames_uint8: np.ndarray, frames: int, size: int, masks: Optional[dict] = None,
               reverse_pad_half: bool = True, where: str = "") -> Clip:
    """A clip from frames known to span one cycle (or, with ``reverse_pad_half``, ED->ES half of one).

    The half cycle ED..ES is followed by its reverse (ES..ED), the full cycle resampled to
    ``frames``; ``masks`` are keyed by index into ``frames_uint8``.
    """
    masks = masks or {}
    n = len(frames_uint8)
    if n < 2:
        raise ValueError(f"{where}: a cycle needs at least 2 frames, got {n}")
    seq = np.asarray(reverse_pad(np.arange(n)) if reverse_pad_half else np.arange(n), dtype=np.int64)
    length = len(seq)
    pos = np.arange(frames) * (length / frames)  # one period, periodic sampling (as resample_cycle)
    at = np.asarray(resample_cycle(np.arange(length), frames, mode="nearest", cyclic=True), dtype=np.int64)
    # Labelled frames: put each on the clip frame nearest to where it occurs in the cycle.
    for f in sorted(masks):
        where_f = np.flatnonzero(seq == f)
        if where_f.size == 0 or np.any(seq[at] == f):
            continue
        d = np.abs(pos[:, None] - where_f[None, :]).min(axis=1)
        for t in np.argsort(d, kind="stable"):
            if int(seq[at[t]]) not in masks:
                at[t] = where_f[np.argmin(np.abs(where_f - pos[t]))]
                break
    indices = seq[at]
    sector = find_sector(frames_uint8)
    video, tf = prepare_frames(frames_uint8[indices], size, sector=sector)
    m, valid = _labelled_masks(tf, masks, indices, size)
    return Clip(_to_video(video), indices, True, m, valid, tf.sector_found)


def still_clip(image: np.ndarray, frames: int, size: int, mask: Optional[np.ndarray] = None) -> Clip:
    """A still image [H, W, 3] fed as a clip by repeating it ``frames`` times."""
    img = np.asarray(image)
    video, tf = prepare_frames(img[None], size)
    indices = np.zeros(frames, dtype=np.int64)
    out = _to_video(np.repeat(video, frames, axis=0))
    if mask is not None:
        mapped = torch.from_numpy(np.ascontiguousarray(tf.to_model(np.asarray(mask, dtype=np.int64), order=0)))
        m = mapped[None].repeat(frames, 1, 1)
        valid = torch.ones(frames, dtype=torch.bool)
    else:
        m = torch.zeros((frames, size, size), dtype=torch.long)
        valid = torch.zeros(frames, dtype=torch.bool)
    return Clip(out, indices, False, m, valid, tf.sector_found)


def cut_clips(cine: Cine, frames: int, size: int, full_cycle_only: bool = True,
              stride: Optional[int] = None) -> tuple[np.ndarray, list[dict]]:
    """Every clip window of a cine for the cache: uint8 [n, T, S, S, 3] and one index row per clip."""
    windows = clip_windows(cine, frames, stride=stride)
    if full_cycle_only:
        windows = [w for w in windows if w.full_cycle]
    if not windows:
        return np.zeros((0, frames, size, size, 3), np.uint8), []
    sector = find_sector(cine.frames)
    clips, rows = [], []
    for w in windows:
        idx = _window_indices(w)
        video, _ = prepare_frames(cine.frames[idx], size, sector=sector)
        clips.append(video)
        span = float(cine.frame_times_s[idx[-1]] - cine.frame_times_s[idx[0]])
        fps = (len(idx) - 1) / span if span > 0 and len(idx) > 1 else cine.fps
        rows.append({"start_frame": int(idx.min()), "end_frame": int(idx.max()) + 1, "fps": round(fps, 4),
                     "full_cycle": bool(w.full_cycle)})
    return np.stack(clips), rows
