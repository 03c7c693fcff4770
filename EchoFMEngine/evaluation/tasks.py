"""Per-task evaluators: run the model on batches of cases, keep targets and predictions (never
the videos), then report metrics with CIs, figures and the per-case prediction rows.

The model runs through the per-batch predictors of :mod:`training.task_eval` and the numbers come
from :func:`EchoFMEngine.metrics.summarize` (via :mod:`.reports`), both exactly what training-time
validation uses, so a test report and the validation score that picked the model agree.

- :class:`ClassificationEval` (view, AS, AR severe-vs-not): ``model.predict_proba``; accuracy,
  balanced accuracy, precision, recall, F1, AUROC, loss; confusion matrix + ROC figures.
- :class:`RegressionEval` (EF, AR severity score): ``model.predict``; MAE, RMSE, R^2, bias;
  Bland-Altman + scatter; optionally a "severe vs not" AUROC of the score (AR) with its ROC.
- :class:`SegmentationEval`: label maps on the labelled frames, per-structure Dice / IoU / HD95 /
  ASSD (mm when spacing is known); Dice box plot.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .. import metrics
from ..training.task_eval import collate, predict_label_maps, predict_proba, predict_value
from . import figures, reports


def _batch(items: list[dict], device, keys: Sequence[str]) -> dict:
    """The model inputs and targets of ``items`` stacked on ``device``; a clear error when the data
    lacks one of ``keys``."""
    for key in keys:
        if any(key not in it for it in items):
            raise ValueError(f"the data has no {key!r} for this task (keys: {sorted(items[0])})")
    return collate([{k: it[k] for k in keys} for it in items], device)


def _needs_views(items: list[dict]) -> tuple[str, ...]:
    return ("video", "view_valid") if torch.as_tensor(items[0]["video"]).dim() == 5 else ("video",)


class ClassificationEval:
    """Arg-max class and probabilities of every case against ``item["label"]``."""

    def __init__(self, class_names: Sequence[str], title: str = ""):
        self.class_names = [str(c) for c in class_names]
        self.title = title
        self.y: list[int] = []
        self.proba: list[np.ndarray] = []

    def add(self, model, items: list[dict], device) -> None:
        if any("label" not in it for it in items):
            raise ValueError(f"the data has no class 'label' for this task (keys: {sorted(items[0])})")
        p = predict_proba(model, _batch(items, device, _needs_views(items))).numpy()
        if p.shape[1] != len(self.class_names):
            raise ValueError(f"model gives {p.shape[1]} probabilities but the checkpoint names "
                             f"{len(self.class_names)} classes")
        self.proba.append(p)
        self.y += [int(it["label"]) for it in items]

    def finish(self, out: Path, n_boot: int, seed: int) -> tuple[dict, list[str], list[dict]]:
        y, p = np.asarray(self.y, dtype=int), np.concatenate(self.proba)
        m = reports.classification_metrics(y, p, self.class_names, n_boot=n_boot, seed=seed)
        figs = [figures.confusion_matrix_figure(m["confusion_matrix"], self.class_names, out / "confusion_matrix.png",
                                                title=f"Confusion matrix {self.title}".strip()),
                figures.roc_figure(y, p, self.class_names, out / "roc.png", title=f"ROC {self.title}".strip())]
        rows = [{"case": i, "true": self.class_names[t], "predicted": self.class_names[int(pi.argmax())],
                 **{f"p_{c}": float(v) for c, v in zip(self.class_names, pi)}} for i, (t, pi) in enumerate(zip(y, p))]
        return m, [f.name for f in figs], rows


class RegressionEval:
    """Predicted value of every case against ``item[target]``; ``severe_from`` adds a binary
    AUROC of the predicted score for ``target >= severe_from`` (AR: severe regurgitation)."""

    def __init__(self, target: str, quantity: str, unit: str, severe_from: Optional[float] = None,
                 prefix: str = "", plots: Sequence[str] = ("bland_altman", "scatter")):
        self.target, self.quantity, self.unit, self.severe_from = target, quantity, unit, severe_from
        self.prefix, self.plots = prefix, tuple(plots)
        self.y: list[float] = []
        self.yhat: list[np.ndarray] = []

    def add(self, model, items: list[dict], device) -> None:
        y = [float(it[self.target]) if self.target in it else None for it in items]
        if None in y:
            raise ValueError(f"the data has no {self.target!r} target for this task")
        self.yhat.append(predict_value(model, _batch(items, device, _needs_views(items))).numpy())
        self.y += y

    def finish(self, out: Path, n_boot: int, seed: int) -> tuple[dict, list[str], list[dict]]:
        y, yhat = np.asarray(self.y), np.concatenate(self.yhat)
        keep = np.isfinite(y)           # e.g. CAMUS cases without an EF in Info_*.cfg
        m = reports.regression_metrics(y[keep], yhat[keep], n_boot=n_boot, seed=seed)
        m["n_without_target"] = int((~keep).sum())
        m["unit"] = self.unit
        short = {"MAE": m["mae"]["value"], "RMSE": m["rmse"]["value"], "R2": m["r2"]["value"]}
        figs = []
        if "bland_altman" in self.plots:
            figs.append(figures.bland_altman_figure(y[keep], yhat[keep], out / f"{self.prefix}bland_altman.png",
                                                    self.quantity, self.unit))
        if "scatter" in self.plots:
            figs.append(figures.scatter_figure(y[keep], yhat[keep], out / f"{self.prefix}scatter.png", self.quantity,
                                               self.unit, short))
        if self.severe_from is not None:
            severe = (y[keep] >= self.severe_from).astype(int)
            m["severe_from"] = self.severe_from
            m["auroc_severe"] = reports.with_ci(metrics.auroc, severe, yhat[keep], n_boot=n_boot, seed=seed)
            figs.append(figures.roc_figure(severe, yhat[keep], ["not severe", "severe"], out / f"{self.prefix}roc.png",
                                           title=f"ROC severe (>= {self.severe_from:g})"))
        rows = [{"case": i, f"true_{self.target}": float(a), f"predicted_{self.target}": float(b),
                 "difference": float(b - a)} for i, (a, b) in enumerate(zip(y, yhat))]
        return m, [f.name for f in figs], rows


class SegmentationEval:
    """Per labelled frame and structure: Dice / IoU / HD95 / ASSD (mm with ``spacing_mm``)."""

    def __init__(self, structures: dict):
        self.structures = dict(structures)
        self.pred: list[np.ndarray] = []
        self.ref: list[np.ndarray] = []
        self.spacing: list = []
        self.frames: list[list[int]] = []

    def add(self, model, items: list[dict], device) -> None:
        batch = _batch(items, device, ("video", "masks", "mask_valid"))
        for item, pred in zip(items, predict_label_maps(model, batch)):
            self.pred.append(pred.numpy().astype(np.uint8))
            self.ref.append(item["masks"][item["mask_valid"]].numpy().astype(np.uint8))
            self.spacing.append(item.get("spacing_mm") or (item.get("meta") or {}).get("spacing_mm"))
            self.frames.append(torch.nonzero(item["mask_valid"]).flatten().tolist())

    def finish(self, out: Path, n_boot: int, seed: int) -> tuple[dict, list[str], list[dict]]:
        scored = metrics.score_label_maps(self.pred, self.ref, self.spacing, self.structures)
        if not scored:
            raise ValueError("no labelled frames in the evaluation data (mask_valid is False everywhere)")
        m = reports.summarize("segmentation", {"frames": scored, "spacing": self.spacing}, n_boot, seed)
        m["n_cases"] = m.pop("n_clips")
        m["structure_labels"] = {s: list(v) for s, v in self.structures.items()}
        rows = [{"case": f["clip"], "frame": self.frames[f["clip"]][f["frame"]],
                 **{f"{s}_{k}": v for s, sc in f["scores"].items() for k, v in sc.items()}} for f in scored]
        dice = {s: [f["scores"][s]["dice"] for f in scored] for s in self.structures}
        fig = figures.dice_boxplot(dice, out / "dice_boxplot.png")
        return m, [fig.name], rows


class MultiEval:
    """Several evaluators on the same cases (AR multi-view: severe-vs-not classes and the severity
    score); metrics under each part's name, per-case rows merged."""

    def __init__(self, parts: dict):
        self.parts = dict(parts)

    def add(self, model, items: list[dict], device) -> None:
        for part in self.parts.values():
            part.add(model, items, device)

    def finish(self, out: Path, n_boot: int, seed: int) -> tuple[dict, list[str], list[dict]]:
        metrics, figs, rows = {}, [], None
        for name, part in self.parts.items():
            m, f, r = part.finish(out, n_boot, seed)
            metrics[name], figs = m, figs + f
            rows = r if rows is None else [{**a, **b} for a, b in zip(rows, r)]
        return metrics, figs, rows
