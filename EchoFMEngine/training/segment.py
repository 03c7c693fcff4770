"""Chamber segmentation: the loss and the evaluation of the segmentation task (its phantom data:
:func:`EchoFMEngine.data.phantom.segmentation_items`).

As on CAMUS / EchoNet-Dynamic, only the ED and ES frames of a clip are labelled
(``mask_valid``); the loss (cross-entropy + soft Dice) sees those frames only and the
decoder runs on those frames only. Structures scored: LV endocardium (label 1),
LV epicardium (labels 1|2) and LA (label 3), as in the paper. Training is the general loop
(:func:`EchoFMEngine.training.finetune.run`, or ``finetune.fit`` on items in memory); models are
written as task checkpoints (``echofm-task-v1``), and older ``echofm-segmenter-v1`` folders load
with :func:`EchoFMEngine.models.task_checkpoint.load_task_model`.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..metrics import assd, bootstrap_ci, dice, hd95, iou
from ..models.heads import EchoFMSegmenter
from ..tasks import SEG_LABELS, STRUCTURE_LABELS, structures_for  # noqa: F401  (structures_for: public here too)
from .layer_decay import layer_id, param_groups  # noqa: F401  (public here too)

STRUCTURES = STRUCTURE_LABELS      # structure -> labels it unites


# ------------------------------------------------------------------------ data
def collate(items: Sequence[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in ("video", "masks", "mask_valid")}


# ------------------------------------------------------------------------ loss
def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0,
                      weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-entropy + soft Dice (mean over foreground classes) for ``logits [K,C,H,W]``,
    ``target [K,H,W]``; Dice is computed over the whole batch of frames.

    ``weight [K]`` (default 1 each): frame k counts ``weight[k]`` times, in the weighted mean of the
    cross-entropy and in the sums the Dice pools (weight 2 = the frame twice, 0 = the frame absent)."""
    w = torch.ones(len(target), device=logits.device) if weight is None else weight.to(logits.device).float()
    ce = (F.cross_entropy(logits, target, reduction="none").float().mean((1, 2)) * w).sum() / w.sum()
    prob = logits.float().softmax(1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    pooled = [(x.sum((2, 3)) * w[:, None]).sum(0) for x in (prob * onehot, prob, onehot)]
    soft = 1 - (2 * pooled[0] + 1) / (pooled[1] + pooled[2] + 1)
    return ce + dice_weight * soft.mean()


def batch_loss(model: EchoFMSegmenter, batch: dict) -> torch.Tensor:
    """Loss of one batch on its labelled frames only (unlabelled frames are never decoded), each
    frame weighted by ``mask_weight`` when the batch has it (propagated frames, ``data.propagated_weight``)."""
    valid = batch["mask_valid"]
    weight = batch["mask_weight"][valid] if "mask_weight" in batch else None
    return segmentation_loss(model(batch["video"], frames=valid), batch["masks"][valid], weight=weight)


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
