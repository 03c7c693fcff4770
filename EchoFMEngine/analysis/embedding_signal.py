"""A volume-like heartbeat signal from an EchoFM encoder's frame embeddings (the paper's periodicity).

The encoder sees the cine as the model's clips (frames prepared as for the task models:
``geometry.prepare_frames`` at the model's size), windows of ``num_frames`` sliding over the cine
about half a window apart. Each temporal slot's tokens are mean-pooled over space; a slot covers
``tubelet`` frames, and the window step is chosen off the tubelet grid so that successive windows
cut the slots at other frames: a frame's embedding is the mean of every slot that holds it, finer
than one tubelet. A slot's learned temporal position adds the same to it in every window, so the
slots of a clip that does not move (the cine's mean frame repeated) are subtracted: otherwise the
window step itself repeats like a heartbeat (measured: on phantoms at 60-120 bpm the period found
was the step, not the beat, without it). The signal is the embeddings' first principal component,
signed to rise with the blood pool (largest at ED), and joins the image signals of
``detect_ed_es(cine, extra_signals=...)``; the detector keeps whichever repeats best.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np
import torch

from EchoFMEngine.analysis.inference import to_video
from EchoFMEngine.cine import Cine
from EchoFMEngine.clinical.geometry import prepare_frames
from EchoFMEngine.clinical.image_beats import principal_motion, blood_pool_signal
from EchoFMEngine.models.checkpoint import load_pretrained

EMBEDDING_SIGNAL = "EchoFM embeddings (first principal component)"


def encoder_of(model):
    """The EchoFM encoder of ``model``: a pretrained EchoFM itself, or a task model's ``.encoder``."""
    enc = getattr(model, "encoder", model)
    if not (hasattr(enc, "cfg") and hasattr(enc, "encode")):
        raise TypeError(f"expected an EchoFM encoder or a task model holding one, got {type(model).__name__}")
    return enc


def window_starts(n_frames: int, window: int, tubelet: int) -> list[int]:
    """First frames of the encoder's windows over a cine of ``n_frames``: about half a window apart,
    the step off the tubelet grid (slots cut at other frames), the last window ending on the last frame."""
    if n_frames <= window:
        return [0]
    step = max(1, window // 2)
    if tubelet > 1 and step % tubelet == 0:
        step -= 1
    starts = list(range(0, n_frames - window + 1, step))
    if starts[-1] != n_frames - window:
        starts.append(n_frames - window)
    return starts


def _slot_means(enc, clips: np.ndarray, dev) -> np.ndarray:
    """Encoder tokens of clips ``[B, n, S, S, 3]`` uint8 (no masking), mean over space: ``[B, t_grid, D]``."""
    cfg = enc.cfg
    tokens = enc.encode(to_video(clips, dev))                                     # [B, N, D]
    return tokens.reshape(clips.shape[0], cfg.t_grid, cfg.num_spatial, -1).mean(2).double().cpu().numpy()


def _still_slots(enc, frames: np.ndarray, dev) -> np.ndarray:
    """The slot means of a clip that does not move (the cine's mean frame repeated): what each slot's
    learned position adds whatever the heart does. Removing it keeps the window step (half a window,
    at times one heartbeat long) from repeating like a heartbeat."""
    still = np.repeat(frames.mean(0, dtype=np.float32).round().astype(np.uint8)[None], enc.cfg.num_frames, axis=0)
    return _slot_means(enc, still[None], dev)


@torch.no_grad()
def frame_embeddings(cine: Cine, model, device: Union[str, torch.device, None] = None, batch_size: int = 8,
                     frames: Optional[np.ndarray] = None) -> np.ndarray:
    """One embedding per frame ``[T, D]`` (float64): the spatial mean of the encoder tokens of every
    temporal slot holding the frame, averaged over the windows (see the module docstring).
    ``frames``: the cine already prepared at the model's size ``[T, S, S, 3]`` uint8 (else prepared here)."""
    enc = encoder_of(model)
    cfg = enc.cfg
    n, t, T = cfg.num_frames, cfg.tubelet, cine.num_frames
    if T < 1:
        raise ValueError("a cine without frames has no frame embeddings")
    if frames is None:
        frames, _ = prepare_frames(cine.frames, cfg.img_size)
    if frames.shape[:3] != (T, cfg.img_size, cfg.img_size):
        raise ValueError(f"prepared frames {frames.shape} do not fit the encoder "
                         f"[{T}, {cfg.img_size}, {cfg.img_size}, 3]")
    dev = torch.device(device) if device is not None else next(enc.parameters()).device
    was_training = enc.training
    enc.eval()
    starts = window_starts(T, n, t)
    index = np.minimum(np.asarray(starts)[:, None] + np.arange(n)[None, :], T - 1)  # [W, n]; short cines repeat the last frame
    try:
        per_slot = np.concatenate([_slot_means(enc, frames[index[i:i + batch_size]], dev)
                                   for i in range(0, len(starts), batch_size)])   # [W, t_grid, D]
        per_slot = per_slot - _still_slots(enc, frames, dev)                      # the slots' position, not the heart
    finally:
        enc.train(was_training)
    sums = np.zeros((T, per_slot.shape[-1]))
    counts = np.zeros(T)
    slot_of = np.arange(n) // t
    for w in range(len(starts)):
        np.add.at(sums, index[w], per_slot[w, slot_of])
        np.add.at(counts, index[w], 1.0)
    return sums / counts[:, None]


def embedding_signal(cine: Cine, model, reference: Optional[np.ndarray] = None,
                     device: Union[str, torch.device, None] = None, batch_size: int = 8,
                     frames: Optional[np.ndarray] = None) -> np.ndarray:
    """The volume-like signal ``[T]`` of ``model``'s frame embeddings (first principal component),
    signed to rise with ``reference`` (default: the cine's blood-pool signal)."""
    if reference is None:
        reference = blood_pool_signal(cine)
    # the first principal component, signed to rise with the reference: as the images' principal motion
    return principal_motion(frame_embeddings(cine, model, device, batch_size, frames), np.asarray(reference))


def phase_encoder(models: Mapping) -> tuple[Optional[object], str]:
    """(encoder, where it comes from) for the phase signal out of loaded models: the pretrained
    encoder that :func:`load_store_encoder` put on the model set, else the first task model's
    encoder; (None, "") when there is none."""
    enc = getattr(models, "phase_encoder", None)
    if enc is not None:
        return enc, getattr(models, "phase_encoder_source", "pretrained encoder")
    for task, model in models.items():
        if getattr(model, "encoder", None) is not None and hasattr(model.encoder, "encode"):
            return model.encoder, f"the '{task}' model's encoder"
    return None, ""


def load_store_encoder(store) -> tuple[Optional[object], str]:
    """(EchoFM, "pretrained encoder NAME") of the first encoder a models folder lists (checksum
    checked; nothing is downloaded), or (None, "") when it lists none."""
    names = sorted(store.encoders())
    if not names:
        return None, ""
    path = Path(store.get_encoder(names[0]))
    return load_pretrained(path, map_location="cpu").eval(), f"pretrained encoder {names[0]}"


def encoder_signals(cine: Cine, encoder, reference: Optional[np.ndarray] = None,
                    device: Union[str, torch.device, None] = None) -> dict:
    """``{EMBEDDING_SIGNAL: [T] signal}`` for ``detect_ed_es(extra_signals=...)``; empty without an
    encoder or for a cine shorter than one tubelet."""
    if encoder is None or cine.num_frames < max(4, encoder_of(encoder).cfg.tubelet):
        return {}
    return {EMBEDDING_SIGNAL: embedding_signal(cine, encoder, reference, device)}
