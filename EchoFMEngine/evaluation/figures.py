"""Evaluation figures as PNG files: confusion matrix, ROC curves, per-structure Dice box plots,
Bland-Altman and scatter plots, the label-efficiency curve.

Figures are built with matplotlib's object API on an Agg canvas (no pyplot, no global backend
change, no display needed), so they work headless, in threads and inside Slicer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import auc, roc_curve

from ..metrics import bland_altman


def _figure(w: float = 4.5, h: float = 4.0) -> Figure:
    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def confusion_matrix_figure(cm, class_names: Sequence[str], path, title: str = "Confusion matrix") -> Path:
    """Row-normalised colours (recall per true class) with the raw counts written in each cell."""
    cm = np.asarray(cm, dtype=np.int64)
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    k = len(class_names)
    fig = _figure(2.2 + 0.8 * k, 1.6 + 0.7 * k)
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    return _save(fig, path)


def roc_figure(y_true, proba, class_names: Sequence[str], path, title: str = "ROC") -> Path:
    """Binary: the ROC of the positive class (column 1, or a 1-D score). Multi-class: one
    one-vs-rest curve per class present in ``y_true``; AUROC in the legend."""
    y = np.asarray(y_true).astype(int)
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim == 1:
        p = np.stack([1 - p, p], 1)
    fig = _figure()
    ax = fig.subplots()
    classes = [1] if p.shape[1] == 2 else range(p.shape[1])
    for c in classes:
        pos = (y == c).astype(int)
        if pos.min() == pos.max():      # class absent (or only class): no curve is defined
            continue
        fpr, tpr, _ = roc_curve(pos, p[:, c])
        name = class_names[c] if p.shape[1] > 2 else f"{class_names[1]} vs {class_names[0]}"
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="0.6", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def dice_boxplot(values: Mapping[str, Sequence[float]], path, metric: str = "Dice",
                 title: str = "Per-structure Dice (labelled frames)") -> Path:
    """One box per structure (``values[structure] -> per-case scores``), the cases as dots."""
    names = list(values)
    data = [np.asarray(values[n], dtype=np.float64) for n in names]
    data = [d[np.isfinite(d)] for d in data]
    fig = _figure(1.5 + 1.1 * len(names), 4.0)
    ax = fig.subplots()
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), names)
    rng = np.random.default_rng(0)
    for i, d in enumerate(data, 1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, d.size), d, s=8, alpha=0.5, c="tab:blue")
    ax.set_ylabel(metric)
    ax.set_title(title)
    return _save(fig, path)


def bland_altman_figure(y, yhat, path, quantity: str = "EF", unit: str = "%") -> Path:
    """Difference (predicted - reference) against the mean, with bias and 95 % limits of agreement."""
    y, yhat = np.asarray(y, dtype=np.float64), np.asarray(yhat, dtype=np.float64)
    ba = bland_altman(y, yhat)
    fig = _figure()
    ax = fig.subplots()
    ax.scatter((y + yhat) / 2, yhat - y, s=14, alpha=0.7)
    ax.axhline(ba["bias"], c="tab:red", label=f"bias {ba['bias']:.2f}")
    if np.isfinite(ba["sd"]):
        for v in (ba["loa_low"], ba["loa_high"]):
            ax.axhline(v, c="tab:red", ls="--", lw=1)
        ax.plot([], [], c="tab:red", ls="--", label=f"LoA {ba['loa_low']:.2f} to {ba['loa_high']:.2f}")
    ax.set_xlabel(f"mean of reference and predicted {quantity} ({unit})")
    ax.set_ylabel(f"predicted - reference {quantity} ({unit})")
    ax.set_title(f"Bland-Altman, {quantity}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def scatter_figure(y, yhat, path, quantity: str = "EF", unit: str = "%",
                   scores: Optional[Mapping[str, float]] = None) -> Path:
    """Predicted against reference with the identity line; ``scores`` (e.g. MAE, RMSE, R^2) in the title."""
    y, yhat = np.asarray(y, dtype=np.float64), np.asarray(yhat, dtype=np.float64)
    fig = _figure()
    ax = fig.subplots()
    ax.scatter(y, yhat, s=14, alpha=0.7)
    lo, hi = float(min(y.min(), yhat.min())), float(max(y.max(), yhat.max()))
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], ls="--", c="0.5", lw=1)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_aspect("equal")
    ax.set_xlabel(f"reference {quantity} ({unit})")
    ax.set_ylabel(f"predicted {quantity} ({unit})")
    ax.set_title(", ".join(f"{k} {v:.2f}" for k, v in (scores or {}).items()) or quantity, fontsize=9)
    return _save(fig, path)


def label_efficiency_figure(fractions: Sequence[float], values: Sequence[float], path, metric: str,
                            ci95: Optional[Sequence[Sequence[float]]] = None, title: str = "",
                            n_train: Optional[Sequence[int]] = None) -> Path:
    """Metric against the fraction of training labels (log x), with the 95 % CIs as error bars and
    the number of labelled training cases (``n_train``) written at each point."""
    f = np.asarray(fractions, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(f)
    f, v = f[order], v[order]
    fig = _figure(5.0, 3.8)
    ax = fig.subplots()
    if ci95 is not None:
        ci = np.asarray(ci95, dtype=np.float64)[order]
        err = np.abs(np.stack([v - ci[:, 0], ci[:, 1] - v]))
        ax.errorbar(f, v, yerr=np.nan_to_num(err), marker="o", capsize=3)
    else:
        ax.plot(f, v, marker="o")
    if n_train is not None:
        for x, y, n in zip(f, v, np.asarray(n_train, dtype=object)[order]):
            if n is not None:
                ax.annotate(f"n={n}", (x, y), textcoords="offset points", xytext=(4, 6), fontsize=7)
    ax.set_xscale("log")
    ax.set_xticks(f, [f"{x * 100:g} %" for x in f])
    ax.minorticks_off()
    ax.set_xlabel("fraction of training labels")
    ax.set_ylabel(metric)
    ax.set_title(title or f"Label efficiency: {metric}", fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)
