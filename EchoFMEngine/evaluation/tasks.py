"""Per-task evaluators: run the model on batches of cases, keep targets and predictions (never
the videos), then report metrics with CIs, figures and the per-case prediction rows.

- :class:`ClassificationEval` (view, AS, AR severe-vs-not): ``model.predict_proba``; accuracy,
  precision, recall, F1, AUROC; confusion matrix + ROC figures.
- :class:`RegressionEval` (EF, AR severity score): ``model.predict``; MAE, RMSE, R^2, bias;
  Bland-Altman + scatter; optionally a "severe vs not" AUROC of the score (AR) with its ROC.
- :class:`SegmentationEval`: label maps on the labelled frames (``training.segment.predict_items``),
  per-structure Dice / IoU / HD95 / ASSD (mm when spacing is known); Dice box plot.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import figures, reports
from .cases import stack


def _to(items: list[dict], device, keys: Sequence[str]) -> list[dict]:
    """Shallow copies of ``items`` with the tensors under ``keys`` moved to ``device``."""
    return [{**it, **{k: it[k].to(device) for k in keys if torch.is_tensor(it.get(k))}} for it in items]


@torch.no_grad()
def predict_proba(model, items: list[dict], device) -> np.ndarray:
    """Class probabilities ``[B, C]``; multi-view cases (video ``[V,3,T,H,W]``) pass ``view_valid``."""
    video = stack(items, "video", device)
    if video.dim() == 6:
        return model.predict_proba(video, stack(items, "view_valid", device)).float().cpu().numpy()
    return model.predict_proba(video).float().cpu().numpy()


@torch.no_grad()
def predict_value(model, items: list[dict], device) -> np.ndarray:
    """One number per case ``[B]`` (EF, AR severity); multi-view cases pass ``view_valid``."""
    video = stack(items, "video", device)
    out = model.predict(video, stack(items, "view_valid", device)) if video.dim() == 6 else model.predict(video)
    return out.float().reshape(len(items)).cpu().numpy()


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
        p = predict_proba(model, items, device)
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
        self.yhat.append(predict_value(model, items, device))
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
            m["auroc_severe"] = reports.with_ci(reports.auroc, severe, yhat[keep], n_boot=n_boot, seed=seed)
            figs.append(figures.roc_figure(severe, yhat[keep], ["not severe", "severe"], out / f"{self.prefix}roc.png",
                                           title=f"ROC severe (>= {self.severe_from:g})"))
        rows = [{"case": i, f"true_{self.target}": float(a), f"predicted_{self.target}": float(b),
                 "difference": float(b - a)} for i, (a, b) in enumerate(zip(y, yhat))]
        return m, [f.name for f in figs], rows


class SegmentationEval:
    """Per labelled frame and structure: Dice / IoU / HD95 / ASSD (mm with ``spacing_mm``)."""

    def __init__(self, structures: dict):
        self.structures = dict(structures)
        self.rows = {s: {k: [] for k in reports.SEG_METRICS} for s in self.structures}
        self.case_rows: list[dict] = []
        self.n_cases = 0
        self.no_spacing = 0

    def add(self, model, items: list[dict], device) -> None:
        from ..training.segment import predict_items

        for key in ("masks", "mask_valid"):
            if any(key not in it for it in items):
                raise ValueError(f"the data has no {key!r} for segmentation (keys: {sorted(items[0])})")
        preds = predict_items(model, _to(items, device, ("video", "masks", "mask_valid")),
                              batch_size=len(items), labelled_only=True)
        for item, pred in zip(items, preds):
            spacing = item.get("spacing_mm") or (item.get("meta") or {}).get("spacing_mm")
            self.no_spacing += spacing is None
            frames = torch.nonzero(item["mask_valid"]).flatten().tolist()
            refs = item["masks"][item["mask_valid"]].numpy()
            for f, p, r in zip(frames, pred.cpu().numpy(), refs):
                scores = reports.structure_scores(p, r, spacing, self.structures)
                row = {"case": self.n_cases, "frame": f}
                for s, sc in scores.items():
                    for k, v in sc.items():
                        self.rows[s][k].append(v)
                        row[f"{s}_{k}"] = v
                self.case_rows.append(row)
            self.n_cases += 1

    def unit(self) -> str:
        if self.no_spacing == 0:
            return "mm"
        return "px" if self.no_spacing == self.n_cases else "mixed: mm where spacing is known, px otherwise"

    def finish(self, out: Path, n_boot: int, seed: int) -> tuple[dict, list[str], list[dict]]:
        if not self.case_rows:
            raise ValueError("no labelled frames in the evaluation data (mask_valid is False everywhere)")
        m = reports.segmentation_summary(self.rows, n_boot=n_boot, seed=seed, unit=self.unit())
        m["n_cases"], m["n_frames"] = self.n_cases, len(self.case_rows)
        m["structure_labels"] = {s: list(v) for s, v in self.structures.items()}
        fig = figures.dice_boxplot({s: r["dice"] for s, r in self.rows.items()}, out / "dice_boxplot.png")
        return m, [fig.name], self.case_rows


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
