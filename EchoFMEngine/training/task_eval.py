"""Losses, predictions and metrics of the downstream tasks (what validation and the final test use).

``predict_dataset`` runs a task model over a dataset of items (the dataset layer's keys) and keeps
targets and outputs; ``task_metrics`` turns them into numbers with :mod:`EchoFMEngine.metrics`.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..metrics import auroc, classification_report, regression_report
from .segment import batch_loss as segmentation_batch_loss
from .segment import score_label_maps, structures_for

CLASSIFICATION = ("view", "as")
# metric -> better when higher (True) or lower (False); the default selection metric per task
SELECT = {"view": "accuracy", "as": "auroc", "ar": "auroc", "ef": "mae", "segment": "mean_dice"}
LOWER_IS_BETTER = ("loss", "mae", "rmse", "hd95", "assd", "bias")


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


def task_loss(model, task: str, batch: dict, severity_weight: float = 1.0,
              forward=None) -> Optional[torch.Tensor]:
    """The training loss of one batch (None for a segmentation batch without any labelled frame).
    ``forward`` runs the model (a DDP or compiled wrapper of ``model``); ``model`` gives the
    attributes (target statistics, severity scale)."""
    fwd = forward if forward is not None else model
    video = batch["video"]
    if task in CLASSIFICATION:
        return F.cross_entropy(fwd(video).float(), batch["label"])
    if task == "ef":
        target = (batch["ef"] - model.target_mean) / model.target_std
        return F.mse_loss(fwd(video).float(), target)
    if task == "ar":
        out = fwd(video, batch["view_valid"]).float()
        sev = F.mse_loss(out[:, 0], batch["severity"] / model.severity_max)
        return F.binary_cross_entropy_with_logits(out[:, 1], batch["label"].float()) + severity_weight * sev
    if task == "segment":
        if not bool(batch["mask_valid"].any()):
            return None
        return segmentation_batch_loss(fwd, batch)
    raise ValueError(f"unknown task {task!r}")


@torch.no_grad()
def predict_dataset(model, task: str, dataset, batch_size: int = 8, device=None, autocast=None) -> dict:
    """Targets and outputs for every item of ``dataset`` (in order), as numpy arrays / lists.

    view/as: ``y`` [N], ``proba`` [N,C]; ef: ``y``, ``pred`` [N]; ar: ``y``, ``proba`` [N,2],
    ``severity``, ``severity_pred`` [N]; segment: ``pred`` / ``ref`` lists of ``[K,H,W]`` label maps
    on the labelled frames, ``spacing`` list."""
    import contextlib

    device = device or next(model.parameters()).device
    ctx = autocast or contextlib.nullcontext()
    was_training = model.training
    model.eval()
    out: dict = {"y": [], "proba": [], "pred": [], "ref": [], "spacing": [], "severity": [], "severity_pred": []}
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        batch = collate(items, device)
        video = batch["video"]
        with ctx:
            if task in CLASSIFICATION:
                out["proba"].append(model.predict_proba(video).float().cpu())
                out["y"].append(batch["label"].cpu())
            elif task == "ef":
                out["pred"].append(model.predict(video).float().cpu())
                out["y"].append(batch["ef"].cpu())
            elif task == "ar":
                out["proba"].append(model.predict_proba(video, batch["view_valid"]).float().cpu())
                out["severity_pred"].append(model.predict(video, batch["view_valid"]).float().cpu())
                out["y"].append(batch["label"].cpu())
                out["severity"].append(batch["severity"].cpu())
            else:
                valid = batch["mask_valid"]
                pred = model(video, frames=valid).argmax(1).cpu() if valid.any() else None
                counts = valid.sum(1).tolist()
                parts = pred.split(counts) if pred is not None else [None] * len(items)
                for it, p in zip(items, parts):
                    if p is None or not len(p):
                        continue
                    out["pred"].append(p.numpy())
                    out["ref"].append(it["masks"][it["mask_valid"]].numpy())
                    out["spacing"].append(it.get("spacing_mm"))
    model.train(was_training)
    if task == "segment":
        return {k: out[k] for k in ("pred", "ref", "spacing")}
    return {k: torch.cat(v).numpy() for k, v in out.items() if v and k not in ("ref", "spacing")}


def _safe(fn, *args) -> float:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(fn(*args))
    except ValueError:
        return math.nan


def classification_metrics(y: np.ndarray, proba: np.ndarray) -> dict:
    """Accuracy / precision / recall / F1 (macro), AUROC (nan when a class is absent), CE loss,
    the confusion matrix (rows: true class) and the number of cases."""
    from sklearn.metrics import confusion_matrix

    y = np.asarray(y, dtype=int)
    pred = proba.argmax(1)
    m = classification_report(y, pred)
    present = np.unique(y)
    m["auroc"] = _safe(auroc, y, proba) if len(present) == proba.shape[1] else math.nan
    m["loss"] = float(-np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, None)).mean())
    m["confusion_matrix"] = confusion_matrix(y, pred, labels=list(range(proba.shape[1]))).tolist()
    m["n"] = int(len(y))
    return m


def task_metrics(task: str, pred: dict, n_boot: int = 0, seed: int = 0, n_classes: int = 4) -> dict:
    """Metrics of :func:`predict_dataset`'s output for ``task``."""
    if task in CLASSIFICATION:
        return classification_metrics(pred["y"], pred["proba"])
    if task == "ef":
        y, yhat = pred["y"], pred["pred"]
        m = regression_report(y, yhat) if len(y) > 1 else {"r2": math.nan,
                                                          "mae": float(np.abs(y - yhat).mean()),
                                                          "rmse": float(np.sqrt(((y - yhat) ** 2).mean()))}
        m["bias"] = float(np.mean(yhat - y))
        m["n"] = int(len(y))
        return m
    if task == "ar":
        m = classification_metrics(pred["y"], pred["proba"])
        sev, sev_hat = pred["severity"], pred["severity_pred"]
        m["severity_mae"] = float(np.abs(sev - sev_hat).mean())
        m["severity_rmse"] = float(np.sqrt(((sev - sev_hat) ** 2).mean()))
        return m
    if task == "segment":
        if not pred["pred"]:
            raise ValueError("no labelled frame in the evaluation data (mask_valid is False everywhere)")
        return score_label_maps(pred["pred"], pred["ref"], pred["spacing"], structures_for(n_classes),
                                n_boot=n_boot, seed=seed)
    raise ValueError(f"unknown task {task!r}")


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
    from torch.utils.data import Subset

    n_classes = getattr(getattr(model, "head", None), "n_classes", 4)
    if info is None or not info.enabled:
        preds = predict_dataset(model, task, dataset, batch_size, device, autocast)
        return task_metrics(task, preds, n_boot=n_boot, seed=seed, n_classes=n_classes)
    from ..runtime.distributed import gather_objects, shard_range

    block = list(shard_range(len(dataset), info))
    mine = predict_dataset(model, task, Subset(dataset, block), batch_size, device, autocast) if block else {}
    preds = merge_predictions(gather_objects(mine, info))
    if main_only and not info.is_main:
        return None
    return task_metrics(task, preds, n_boot=n_boot, seed=seed, n_classes=n_classes)


def select_metric(task: str, name: str = "auto") -> tuple[str, bool]:
    """(metric name, higher is better) used to pick the best model on the validation split."""
    name = SELECT[task] if name in (None, "auto") else name
    return name, not any(k in name for k in LOWER_IS_BETTER)


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
