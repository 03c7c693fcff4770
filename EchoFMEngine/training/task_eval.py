"""Losses, predictions and metrics of the downstream tasks (what validation and the final test use).

``predict_dataset`` runs a task model over a dataset of items (the dataset layer's keys) and keeps
targets and outputs; ``task_metrics`` turns them into numbers with
:func:`EchoFMEngine.metrics.summarize`, the function ``evaluate``'s test reports call too, so the
model picked on validation is picked by the definition it is reported by. The per-batch
predictors (:func:`predict_proba`, :func:`predict_value`, :func:`predict_label_maps`) are shared
with :mod:`EchoFMEngine.evaluation.tasks`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from ..metrics import higher_is_better, point_values, summarize
from ..runtime.distributed import gather_objects, shard_range
from ..tasks import CLASSIFICATION, SEGMENTATION, Task, get_task, structures_for
from .segment import batch_loss as segmentation_batch_loss


def collate(items: Sequence[dict], device=None) -> dict:
    """Stack the tensors and numbers of a list of items (keys present in every item)."""
    out = {}
    for key in items[0]:
        if not all(key in it for it in items):
            continue
        values = [it[key] for it in items]
        if torch.is_tensor(values[0]):
            out[key] = torch.stack(values)
        elif isinstance(values[0], bool) or isinstance(values[0], (int, np.integer)):
            out[key] = torch.tensor([int(v) for v in values])
        elif isinstance(values[0], (float, np.floating)):
            out[key] = torch.tensor([float(v) for v in values], dtype=torch.float32)
        else:
            continue                                  # spacing tuples, names: not model inputs
        if device is not None:
            out[key] = out[key].to(device, non_blocking=True)
    return out


# ------------------------------------------------------------------ losses (Task.loss names one)
def _cross_entropy(spec: Task, model, fwd, batch: dict, severity_weight: float):
    """Class logits against the integer class target."""
    (label,) = spec.targets
    return F.cross_entropy(fwd(batch["video"]).float(), batch[label])


def _mse(spec: Task, model, fwd, batch: dict, severity_weight: float):
    """A value against its target, standardised by the training targets' mean and SD (the head's)."""
    (value,) = spec.targets
    return F.mse_loss(fwd(batch["video"]).float(), (batch[value] - model.target_mean) / model.target_std)


def _bce_severity(spec: Task, model, fwd, batch: dict, severity_weight: float):
    """Multi-view: severe-vs-not logit (binary cross-entropy) plus ``severity_weight`` x the MSE of the
    severity score scaled to 0-1; outputs ``[:, 0]`` severity, ``[:, 1]`` logit."""
    label, severity, views = spec.targets
    out = fwd(batch["video"], batch[views]).float()
    sev = F.mse_loss(out[:, 0], batch[severity] / model.severity_max)
    return F.binary_cross_entropy_with_logits(out[:, 1], batch[label].float()) + severity_weight * sev


def _ce_dice(spec: Task, model, fwd, batch: dict, severity_weight: float):
    """Label maps on the labelled frames (cross-entropy + Dice); None when the batch has none."""
    _, valid = spec.targets
    if not bool(batch[valid].any()):
        return None
    return segmentation_batch_loss(fwd, batch)


LOSSES = {"cross_entropy": _cross_entropy, "mse": _mse, "binary_cross_entropy+severity_mse": _bce_severity,
          "cross_entropy+dice": _ce_dice}


def task_loss(model, task: str, batch: dict, severity_weight: float = 1.0,
              forward=None) -> Optional[torch.Tensor]:
    """The training loss of one batch, the one the task declares (``Task.loss``, on ``Task.targets``);
    None for a segmentation batch without any labelled frame. ``forward`` runs the model (a DDP or
    compiled wrapper of ``model``); ``model`` gives the attributes (target statistics, severity scale)."""
    spec = get_task(task)
    if spec.loss not in LOSSES:
        raise ValueError(f"task {task!r} declares loss {spec.loss!r}; known losses: {sorted(LOSSES)}")
    return LOSSES[spec.loss](spec, model, forward if forward is not None else model, batch, severity_weight)


def _video_args(batch: dict) -> tuple:
    """The model's inputs: the clip, plus ``view_valid`` for multi-view studies ``[B,V,3,T,H,W]``."""
    video = batch["video"]
    return (video, batch["view_valid"]) if video.dim() == 6 else (video,)


@torch.no_grad()
def predict_proba(model, batch: dict) -> torch.Tensor:
    """Class probabilities ``[B, C]`` (float32, on the CPU) of a collated batch."""
    return model.predict_proba(*_video_args(batch)).float().cpu()


@torch.no_grad()
def predict_value(model, batch: dict) -> torch.Tensor:
    """One number per case ``[B]`` (EF, AR severity; float32, on the CPU) of a collated batch."""
    return model.predict(*_video_args(batch)).float().reshape(len(batch["video"])).cpu()


@torch.no_grad()
def predict_label_maps(model, batch: dict) -> list[torch.Tensor]:
    """Per case, the label maps ``[K,H,W]`` (on the CPU) of its K labelled frames (``mask_valid``);
    only those frames are decoded, K may be 0."""
    valid = batch["mask_valid"]
    if not bool(valid.any()):
        return [valid.new_zeros((0,) + tuple(batch["masks"].shape[-2:]), dtype=torch.long).cpu()] * len(valid)
    pred = model(batch["video"], frames=valid).argmax(1).cpu()
    return list(pred.split(valid.sum(1).tolist()))


@torch.no_grad()
def predict_dataset(model, task: str, dataset, batch_size: int = 8, device=None, autocast=None) -> dict:
    """Targets and outputs for every item of ``dataset`` (in order), as numpy arrays / lists.

    view/as: ``y`` [N], ``proba`` [N,C]; ef: ``y``, ``pred`` [N]; ar: ``y``, ``proba`` [N,2],
    ``severity``, ``severity_pred`` [N]; segment: ``pred`` / ``ref`` lists of ``[K,H,W]`` label maps
    on the labelled frames, ``spacing`` list."""
    spec = get_task(task)
    target, severity = spec.targets[0], "severity" in spec.targets
    device = device or next(model.parameters()).device
    ctx = autocast or contextlib.nullcontext()
    was_training = model.training
    model.eval()
    out: dict = {"y": [], "proba": [], "pred": [], "ref": [], "spacing": [], "severity": [], "severity_pred": []}
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        batch = collate(items, device)
        with ctx:
            if spec.kind != SEGMENTATION:
                if spec.kind == CLASSIFICATION:
                    out["proba"].append(predict_proba(model, batch))
                if spec.kind != CLASSIFICATION or severity:        # regression value, or the severity score
                    out["severity_pred" if severity else "pred"].append(predict_value(model, batch))
                out["y"].append(batch[target].cpu())
                if severity:
                    out["severity"].append(batch["severity"].cpu())
            else:
                for it, p in zip(items, predict_label_maps(model, batch)):
                    if not len(p):
                        continue
                    out["pred"].append(p.numpy())
                    out["ref"].append(it["masks"][it["mask_valid"]].numpy())
                    out["spacing"].append(it.get("spacing_mm"))
    model.train(was_training)
    if spec.kind == SEGMENTATION:
        return {k: out[k] for k in ("pred", "ref", "spacing")}
    return {k: torch.cat(v).numpy() for k, v in out.items() if v and k not in ("ref", "spacing")}


def task_metrics(task: str, pred: dict, n_boot: int = 0, seed: int = 0, n_classes: int = 4) -> dict:
    """Metrics of :func:`predict_dataset`'s output for ``task``: :func:`metrics.summarize` of the
    task's kind (the numbers of ``evaluate``'s reports), as plain values (``<name>_ci95`` where
    ``n_boot`` > 0). AR adds the severity score's ``severity_mae`` / ``severity_rmse``."""
    spec = get_task(task)
    kind = spec.kind
    if kind == SEGMENTATION:
        if not pred["pred"]:
            raise ValueError("no labelled frame in the evaluation data (mask_valid is False everywhere)")
        return point_values(summarize(kind, pred, n_boot, seed, structures=structures_for(n_classes)))
    m = point_values(summarize(kind, pred, n_boot, seed))
    extra = [name for name in spec.metrics if name.startswith("severity_")]   # AR: severity_mae, severity_rmse
    if extra:
        sev = point_values(summarize("regression", {"y": pred["severity"], "pred": pred["severity_pred"]}, n_boot, seed))
        m.update({name: sev[name[len("severity_"):]] for name in extra})
    return m


def merge_predictions(parts: Sequence[dict]) -> dict:
    """One :func:`predict_dataset` result from those of consecutive blocks of a dataset (in order)."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    out = {}
    for key in parts[0]:
        values = [p[key] for p in parts if key in p]
        out[key] = [x for v in values for x in v] if isinstance(values[0], list) else np.concatenate(values)
    return out


def evaluate_task(model, task: str, dataset, batch_size: int = 8, device=None, autocast=None,
                  n_boot: int = 0, seed: int = 0, info=None, main_only: bool = False) -> Optional[dict]:
    """``task_metrics(predict_dataset(...))`` for one task model and dataset.

    ``info`` (a :class:`~EchoFMEngine.runtime.distributed.DistInfo` of several processes): each rank
    predicts its block of ``dataset``, the blocks are gathered in order and the metrics are computed
    over the whole dataset, the same numbers as one process (on every rank, or with ``main_only`` on
    rank 0 only, the others get None)."""
    n_classes = getattr(getattr(model, "head", None), "n_classes", 4)
    if info is None or not info.enabled:
        preds = predict_dataset(model, task, dataset, batch_size, device, autocast)
        return task_metrics(task, preds, n_boot=n_boot, seed=seed, n_classes=n_classes)
    block = list(shard_range(len(dataset), info))
    mine = predict_dataset(model, task, Subset(dataset, block), batch_size, device, autocast) if block else {}
    preds = merge_predictions(gather_objects(mine, info))
    if main_only and not info.is_main:
        return None
    return task_metrics(task, preds, n_boot=n_boot, seed=seed, n_classes=n_classes)


def select_metric(task: str, name: str = "auto") -> tuple[str, bool]:
    """(metric name, higher is better) used to pick the best model on the validation split: the
    task's ``select_metric`` (:mod:`EchoFMEngine.tasks`) unless ``name`` is given."""
    if name in (None, "auto"):
        t = get_task(task)
        return t.select_metric, t.higher_is_better
    return name, higher_is_better(name)


def is_better(value: float, best: Optional[float], higher: bool, loss: Optional[float] = None,
              best_loss: Optional[float] = None) -> bool:
    """True when ``value`` beats ``best`` (None: nothing yet). Ties, and a metric undefined on both
    (e.g. AUROC of a validation set holding one class), are broken by the lower validation ``loss``;
    an undefined value never beats a defined one."""
    def nan(x):
        return x is None or (isinstance(x, float) and math.isnan(x))
    if best is None:
        return True
    lower_loss = not nan(loss) and (nan(best_loss) or loss < best_loss)
    if nan(value) or nan(best):
        return nan(best) and (not nan(value) or lower_loss)
    if value == best:
        return lower_loss
    return value > best if higher else value < best
