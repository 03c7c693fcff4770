"""Run fine-tuned models over a whole cine: windows of the model's frame count, at the model's size.

Every model sees frames prepared the way it was trained (scan sector blanked, cropped and fitted
into ``size x size`` by :func:`EchoFMEngine.clinical.geometry.prepare_frames`), in windows that span about
one cardiac cycle (:func:`EchoFMEngine.clinical.cycles.clip_windows`). Segmentations come back in the
original pixel geometry through the inverse sector transform.

Speed (CPU): all of a clip's windows go through one batched forward under ``inference_mode``;
clip-level heads whose encoders hold identical weights (heads fine-tuned on one frozen encoder)
are grouped by :func:`encoder_groups` and served by one encoder pass per window
(:func:`shared_clip_outputs`); :func:`quantize_int8` optionally quantises the linear layers.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.ao.quantization import quantize_dynamic

from ..cine import Cine
from ..clinical.cycles import clip_windows
from ..clinical.geometry import SectorTransform, prepare_frames
from ..models.heads import ENCODER_UNUSED


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


POOLED_KINDS = ("classifier", "regressor")     # heads that read only the mean encoder token


def _encoder_tensors(model) -> dict:
    return {k: v for k, v in model.encoder.state_dict().items() if not k.startswith(ENCODER_UNUSED)}


def same_encoder(a, b) -> bool:
    """True when two task models run the same encoder weights (the same module, or equal tensors)."""
    if a.encoder is b.encoder:
        return True
    if a.cfg.to_dict() != b.cfg.to_dict():
        return False
    ta, tb = _encoder_tensors(a), _encoder_tensors(b)
    if ta.keys() != tb.keys():
        return False
    first = "patch_embed.proj.weight"           # cheap rejection before comparing everything
    if first in ta and not torch.equal(ta[first], tb[first]):
        return False
    return all(torch.equal(v, tb[k]) for k, v in ta.items())


def encoder_groups(models: Mapping[str, nn.Module]) -> list[list[str]]:
    """Tasks grouped so that each group's clip-level heads share one encoder pass per window.

    A group holds classifier/regressor models with identical encoder weights and the same input
    (frames, size); every other model (segmenters, or a head with its own fine-tuned encoder) is
    a group of its own. Sharing is exact: the encoder output is the same tensor either way."""
    groups: list[list[str]] = []
    for task, model in models.items():
        kind = model.head_config()["kind"] if hasattr(model, "head_config") else None
        for g in groups:
            lead = models[g[0]]
            if (kind in POOLED_KINDS and lead.head_config()["kind"] in POOLED_KINDS
                    and input_size(lead) == input_size(model) and same_encoder(lead, model)):
                g.append(task)
                break
        else:
            groups.append([task])
    return groups


def share_encoders(models: Mapping[str, nn.Module]) -> list[list[str]]:
    """Point every model of an :func:`encoder_groups` group at one encoder module (memory once);
    returns the groups."""
    groups = encoder_groups(models)
    for g in groups:
        for task in g[1:]:
            models[task].encoder = models[g[0]].encoder
    return groups


def _from_pooled(model, pooled: torch.Tensor) -> torch.Tensor:
    """What ``predict_proba`` (classifier) or ``predict`` (regressor) returns, from pooled tokens."""
    y = model.head(pooled)
    if model.head_config()["kind"] == "classifier":
        return y.float().softmax(-1)
    return y[:, 0].float() * model.target_std + model.target_mean


@torch.inference_mode()
def shared_clip_outputs(models: Sequence[nn.Module], cine: Cine, prepared: Prepared, cycles: Optional[list],
                        device, batch_size: int = 8) -> list[np.ndarray]:
    """Per-window outputs of several clip-level heads on one encoder (one pass per window batch).

    ``models`` must share encoder weights and input (see :func:`encoder_groups`); one model alone
    may be any classifier or regressor. Classifiers give probabilities ``[W, C]``, regressors ``[W]``."""
    lead = models[0]
    n, _ = input_size(lead)
    windows = cycle_windows(cine, n, cycles)
    outs: list[list] = [[] for _ in models]
    for i in range(0, len(windows), batch_size):
        clips = np.stack([w.take(prepared.frames) for w in windows[i:i + batch_size]])
        video = to_video(clips, device)
        if len(models) == 1:
            m = lead
            ys = [m.predict_proba(video) if hasattr(m, "predict_proba") else m.predict(video)]
        else:
            pooled = lead.pooled(video)
            ys = [_from_pooled(m, pooled) for m in models]
        for o, y in zip(outs, ys):
            o.append(y.float().cpu().numpy())
    return [np.concatenate(o) for o in outs]


def clip_outputs(model, cine: Cine, prepared: Prepared, cycles: Optional[list], device,
                 batch_size: int = 8) -> np.ndarray:
    """Per-window outputs of a classifier (probabilities ``[W, C]``) or regressor (``[W]``)."""
    return shared_clip_outputs([model], cine, prepared, cycles, device, batch_size)[0]


def quantize_int8(models: Mapping[str, nn.Module], inplace: bool = False) -> dict:
    """CPU models with dynamic int8 linear layers in their encoders (``torch.ao.quantization``);
    models sharing one encoder module still share its quantised version. ``inplace`` converts the
    given encoders instead of copies (no second copy in memory; the fp32 models are then gone).
    Outputs move by a stated tolerance (docs/analysis.md), so this is an option, never the default."""
    done: dict = {}
    out = {}
    for task, model in models.items():
        enc = model.encoder
        if id(enc) not in done:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                src = enc.cpu().eval() if inplace else copy.deepcopy(enc).cpu().eval()
                done[id(enc)] = quantize_dynamic(src, {nn.Linear}, dtype=torch.qint8, inplace=inplace)
        shell = copy.copy(model)                 # shallow: new module object, same children...
        shell._modules = dict(model._modules)    # ...except the encoder, swapped for the int8 one
        shell._modules["encoder"] = done[id(enc)]
        for attr in ("description",):
            if hasattr(model, attr):
                setattr(shell, attr, getattr(model, attr))
        out[task] = shell.eval()
    return out


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


@torch.inference_mode()
def segment_frames(model, cine: Cine, prepared: Prepared, frames: Sequence[int], period_frames: Optional[float],
                   device, batch_size: int = 4) -> np.ndarray:
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
