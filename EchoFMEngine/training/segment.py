"""Chamber segmentation: phantom data, fine-tuning, evaluation and a self-describing checkpoint.

As on CAMUS / EchoNet-Dynamic, only the ED and ES frames of a clip are labelled
(``mask_valid``); the loss (cross-entropy + soft Dice) sees those frames only and the
decoder runs on those frames only. Structures scored: LV endocardium (label 1),
LV epicardium (labels 1|2) and LA (label 3), as in the paper.
"""
from __future__ import annotations

import copy
import json
import math
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..metrics import assd, bootstrap_ci, dice, hd95, iou
from ..models import EchoFM
from ..models.heads import ENCODER_UNUSED, EchoFMSegmenter
from ..tasks import SEG_LABELS, STRUCTURE_LABELS, structures_for  # noqa: F401  (structures_for: public here too)
from .data import phantom_clip
from .layer_decay import layer_id, param_groups  # noqa: F401  (public here too)

LABEL_NAMES = dict(enumerate(SEG_LABELS))
STRUCTURES = STRUCTURE_LABELS      # structure -> labels it unites
FORMAT = "echofm-segmenter-v1"


# ------------------------------------------------------------------------ data
def phantom_segmentation_items(n: int, img_size: int, num_frames: int, seed: int = 0,
                               cycles: tuple[float, float] = (1.1, 1.4)) -> list[dict]:
    """``n`` phantom clips at the model size, each covering at least one full cardiac cycle.

    Item: ``video`` float ``[3,T,S,S]`` in [0,1], ``masks`` long ``[T,S,S]`` (labels 0-3, via
    ``transform.to_model``), ``mask_valid`` bool ``[T]`` (True at the ED and ES frames only),
    ``spacing_mm`` of a model pixel, and the study's view / EF / seed.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E6]))
    items = []
    for i in range(n):
        hr = float(rng.uniform(55, 95))
        video, study, tf = phantom_clip(("A4C", "A2C")[i % 2], num_frames, img_size, hr, float(rng.uniform(*cycles)),
                                        ef=float(rng.uniform(30, 70)), seed=seed * 1000 + i)
        valid = np.zeros(num_frames, dtype=bool)
        valid[np.concatenate([study.ed_frames, study.es_frames]).astype(int)] = True
        items.append({
            "video": video,
            "masks": torch.from_numpy(tf.to_model(study.masks)).long(),
            "mask_valid": torch.from_numpy(valid),
            "spacing_mm": tuple(float(s) / tf.scale for s in study.cine.spacing_mm),
            "view": study.view, "ef": study.ef, "seed": study.seed,
        })
    return items


def collate(items: Sequence[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in ("video", "masks", "mask_valid")}


# ------------------------------------------------------------------------ loss
def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0) -> torch.Tensor:
    """Cross-entropy + soft Dice (mean over foreground classes) for ``logits [K,C,H,W]``,
    ``target [K,H,W]``; Dice is computed over the whole batch of frames."""
    ce = F.cross_entropy(logits, target)
    prob = logits.float().softmax(1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    inter = (prob * onehot).sum((0, 2, 3))
    soft = 1 - (2 * inter + 1) / (prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1)
    return ce + dice_weight * soft.mean()


def batch_loss(model: EchoFMSegmenter, batch: dict) -> torch.Tensor:
    """Loss of one batch on its labelled frames only (unlabelled frames are never decoded)."""
    valid = batch["mask_valid"]
    return segmentation_loss(model(batch["video"], frames=valid), batch["masks"][valid])


# ---------------------------------------------------------------- optimisation
# layer_id / param_groups live in layer_decay.py (shared by every task); kept importable from here.


def finetune_segmentation(encoder: EchoFM, train_items: Sequence[dict], steps: int = 300, lr: float = 1e-3,
                          batch_size: int = 4, freeze_encoder: bool = False, seed: int = 0,
                          layer_decay: float = 0.75, weight_decay: float = 0.05, warmup: int = 20,
                          width: int = 16, augment: Union[bool, Callable] = True,
                          log_every: int = 0) -> EchoFMSegmenter:
    """Fine-tune a :class:`EchoFMSegmenter` on a copy of ``encoder`` (the argument is not modified).

    AdamW, linear warm-up then cosine; ``layer_decay`` scales encoder lrs block by block when the
    encoder is trained. ``augment``: True = the paper's segmentation set (rotation, translation,
    scale, erasing; one draw per clip, masks follow), False/None = none, or any callable on items.
    The loss of each step is kept in ``model.history``.
    """
    from ..data.augment import segmentation_augment

    torch.manual_seed(seed)
    model = EchoFMSegmenter(copy.deepcopy(encoder), freeze_encoder=freeze_encoder, width=width)
    opt = torch.optim.AdamW(param_groups(model, lr, weight_decay, layer_decay), betas=(0.9, 0.999))
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    aug = segmentation_augment(seed, erase_p=0.25) if augment is True else (augment or None)
    rng = np.random.default_rng(seed)
    bs = min(batch_size, len(train_items))
    model.train()
    model.history = []
    order: list = []
    t0 = time.perf_counter()
    for step in range(steps):
        if len(order) < bs:
            order += rng.permutation(len(train_items)).tolist()
        picked = [train_items[order.pop()] for _ in range(bs)]
        if aug is not None:
            picked = [{**it, **aug({"video": it["video"], "masks": it["masks"]})} for it in picked]
        scale = (step + 1) / warmup if step < warmup else \
            0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * scale
        loss = batch_loss(model, collate(picked))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        model.history.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"  seg step {step + 1}/{steps} loss {np.mean(model.history[-log_every:]):.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval()
    return model


# ------------------------------------------------------------------ evaluation
@torch.no_grad()
def predict_items(model: EchoFMSegmenter, items: Sequence[dict], batch_size: int = 4,
                  labelled_only: bool = False) -> list[torch.Tensor]:
    """Label maps for every item: ``[T,S,S]``, or ``[K,S,S]`` for its K labelled frames when
    ``labelled_only`` (only those frames are decoded)."""
    model.eval()
    out = []
    for i in range(0, len(items), batch_size):
        batch = collate(items[i:i + batch_size])
        if not labelled_only:
            out += list(model.predict(batch["video"]))
            continue
        pred = model(batch["video"], frames=batch["mask_valid"]).argmax(1)
        out += list(pred.split(batch["mask_valid"].sum(1).tolist()))
    return out


def evaluate_segmentation(model: EchoFMSegmenter, items: Sequence[dict], n_boot: int = 1000,
                          seed: int = 0) -> dict:
    """Per-structure Dice / IoU / HD95 / ASSD (mm) on the labelled frames of ``items``.

    Cases are labelled frames. Each structure gets the mean, SD and a 95 % bootstrap CI of its
    Dice; ``mean_dice`` averages the structures (the paper's mDice) with a CI from
    resampling frames jointly. Surface distances use ``nanmean`` (undefined when a structure is
    missing from one mask; ``n_undefined`` counts those)."""
    preds = predict_items(model, items, labelled_only=True)
    refs = [item["masks"][item["mask_valid"]] for item in items]
    return score_label_maps(preds, refs, [item.get("spacing_mm") for item in items],
                            structures_for(model.head.n_classes), n_boot=n_boot, seed=seed)


def score_label_maps(preds: Sequence, refs: Sequence, spacings: Sequence, structures: Optional[dict] = None,
                     n_boot: int = 1000, seed: int = 0) -> dict:
    """Scores of predicted vs reference label maps: one ``[K,H,W]`` pair and one spacing
    (``(row_mm, col_mm)`` or None: distances in pixels) per clip; see :func:`evaluate_segmentation`."""
    structures = dict(STRUCTURES if structures is None else structures)
    if not structures:
        raise ValueError("no structure to score")
    rows = {s: {"dice": [], "iou": [], "hd95": [], "assd": []} for s in structures}
    unit = set()
    for pred, ref, spacing in zip(preds, refs, spacings):
        unit.add("mm" if spacing is not None else "px")
        for p, r in zip(np.asarray(pred), np.asarray(ref)):
            for s, labels in structures.items():
                pm, rm = np.isin(p, labels), np.isin(r, labels)
                rows[s]["dice"].append(dice(pm, rm))
                rows[s]["iou"].append(iou(pm, rm))
                rows[s]["hd95"].append(hd95(pm, rm, spacing))
                rows[s]["assd"].append(assd(pm, rm, spacing))
    first = next(iter(structures))
    if not rows[first]["dice"]:
        raise ValueError("no labelled frame to score (mask_valid is False everywhere)")
    result: dict = {"n_clips": len(preds), "n_frames": len(rows[first]["dice"]),
                    "distance_unit": "/".join(sorted(unit)), "structures": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)          # nanmean of all-nan: reported as nan
        for s, r in rows.items():
            d = np.asarray(r["dice"])
            result["structures"][s] = {
                "dice": float(d.mean()), "dice_sd": float(d.std()),
                "dice_ci95": bootstrap_ci(np.mean, d, n=n_boot, seed=seed),
                "iou": float(np.mean(r["iou"])),
                "hd95_mm": float(np.nanmean(r["hd95"])), "assd_mm": float(np.nanmean(r["assd"])),
                "n_undefined": int(np.isnan(r["hd95"]).sum()),
            }
    per_frame = np.mean([rows[s]["dice"] for s in structures], axis=0)
    result["mean_dice"] = float(per_frame.mean())
    result["mean_dice_ci95"] = bootstrap_ci(np.mean, per_frame, n=n_boot, seed=seed)
    for key in ("iou", "hd95_mm", "assd_mm"):
        result[f"mean_{key}"] = float(np.mean([v[key] for v in result["structures"].values()]))
    return result


# ------------------------------------------------------------------ checkpoint
def save_segmenter(model: EchoFMSegmenter, folder: Union[str, Path], extra: Optional[dict] = None) -> Path:
    """Write ``model.safetensors`` (encoder keys as ``encoder.*`` without the unused MAE decoder and
    projector, head keys as ``head.*``) and ``config.json``; both carry the description
    (task, labels, input size, frames, encoder config, head layers / width)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    c = model.cfg
    desc = {"format": FORMAT, "task": "segment", "labels": {str(k): v for k, v in LABEL_NAMES.items()},
            "structures": {k: list(v) for k, v in STRUCTURES.items()},
            "input": {"frames": c.num_frames, "height": c.img_size, "width": c.img_size, "channels": c.in_chans,
                      "value_range": [0.0, 1.0], "layout": "[B, C, T, H, W]"},
            "n_classes": model.head.n_classes, "head": {"layers": model.head.layers, "width": model.head.width},
            "encoder_config": c.to_dict(), **(extra or {})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
               if not k.startswith(tuple(f"encoder.{u}" for u in ENCODER_UNUSED))}
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "description": json.dumps(desc)})
    tmp.replace(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(desc, indent=2))
    return out


def load_segmenter(folder: Union[str, Path], map_location="cpu") -> EchoFMSegmenter:
    """Inverse of :func:`save_segmenter`; the description is kept in ``model.description``."""
    from ..models import EchoFMConfig
    from ..models.checkpoint import CheckpointError, weights_file

    file = weights_file(folder)
    with safe_open(str(file), framework="pt", device=str(map_location)) as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{file}: not an EchoFM segmenter (format={meta.get('format')!r})")
        sd = {k: f.get_tensor(k) for k in f.keys()}
    desc = json.loads(meta["description"])
    encoder = EchoFM(EchoFMConfig.from_dict(desc["encoder_config"]))
    model = EchoFMSegmenter(encoder, desc["n_classes"], desc["head"]["layers"], width=desc["head"]["width"])
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(tuple(f"encoder.{u}" for u in ENCODER_UNUSED))]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{file}: missing keys {missing[:10]}, unexpected keys {result.unexpected_keys[:10]}")
    model.description = desc
    return model.eval()
