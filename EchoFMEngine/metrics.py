"""Evaluation metrics of the paper (Sec. IV): overlap and surface distances for segmentation,
AUROC and the usual scores for classification, R^2 / MAE / RMSE for regression, and
percentile-bootstrap confidence intervals for any of them.

Segmentation metrics take binary masks of any dimension (2D frames or 3D volumes / clips).
Surface distances follow ``medpy.metric.binary`` (same border definition, same pooling of both
directions) and are in millimetres when ``spacing`` (per axis, or one number) is given,
otherwise in pixels.

Empty masks (documented, tested):

============================  =======  =======  ========  ========
case                          dice     iou      hd95      assd
============================  =======  =======  ========  ========
both empty                    1.0      1.0      0.0       0.0
exactly one empty             0.0      0.0      nan       nan
============================  =======  =======  ========  ========

A distance to a structure that is not there is undefined, hence ``nan`` (not ``inf``): summaries
over cases use ``nanmean`` and report how many were undefined, and the miss itself is already
penalised by Dice = 0.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence, Union

import numpy as np
from scipy import ndimage
from sklearn import metrics as skm

Spacing = Optional[Union[float, Sequence[float]]]


# ------------------------------------------------------------------ segmentation
def _pair(pred, ref) -> tuple[np.ndarray, np.ndarray]:
    p, r = np.asarray(pred).astype(bool), np.asarray(ref).astype(bool)
    if p.shape != r.shape:
        raise ValueError(f"pred and ref shapes differ: {p.shape} vs {r.shape}")
    return p, r


def dice(pred, ref) -> float:
    """Dice coefficient ``2|A&B| / (|A|+|B|)``; 1.0 when both masks are empty."""
    p, r = _pair(pred, ref)
    total = int(p.sum()) + int(r.sum())
    return 1.0 if total == 0 else 2.0 * int((p & r).sum()) / total


def iou(pred, ref) -> float:
    """Intersection over union (Jaccard); 1.0 when both masks are empty."""
    p, r = _pair(pred, ref)
    union = int((p | r).sum())
    return 1.0 if union == 0 else int((p & r).sum()) / union


def _border(mask: np.ndarray) -> np.ndarray:
    """One-pixel inner border (face connectivity), as medpy."""
    footprint = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=footprint, iterations=1)


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing: Spacing) -> np.ndarray:
    """Distances from every border pixel of ``a`` to the nearest border pixel of ``b``."""
    sampling = None
    if spacing is not None:
        sampling = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (a.ndim,)).copy()
    dt = ndimage.distance_transform_edt(~_border(b), sampling=sampling)
    return dt[_border(a)]


def _both_directions(pred, ref, spacing: Spacing) -> Optional[np.ndarray]:
    """Pooled surface distances in both directions; None when exactly one mask is empty,
    an empty array when both are."""
    p, r = _pair(pred, ref)
    p, r = np.atleast_1d(p), np.atleast_1d(r)
    has_p, has_r = bool(p.any()), bool(r.any())
    if not has_p and not has_r:
        return np.zeros(0)
    if has_p != has_r:
        return None
    return np.concatenate([_surface_distances(p, r, spacing), _surface_distances(r, p, spacing)])


def hd95(pred, ref, spacing: Spacing = None) -> float:
    """95th percentile of the symmetric surface distances (0 both empty, nan one empty)."""
    d = _both_directions(pred, ref, spacing)
    if d is None:
        return float("nan")
    return float(np.percentile(d, 95)) if d.size else 0.0


def assd(pred, ref, spacing: Spacing = None) -> float:
    """Average symmetric surface distance (0 both empty, nan one empty)."""
    d = _both_directions(pred, ref, spacing)
    if d is None:
        return float("nan")
    return float(d.mean()) if d.size else 0.0


def segmentation_scores(pred, ref, spacing: Spacing = None) -> dict:
    """Dice, IoU, HD95 and ASSD of one binary pair."""
    return {"dice": dice(pred, ref), "iou": iou(pred, ref), "hd95": hd95(pred, ref, spacing),
            "assd": assd(pred, ref, spacing)}


# ---------------------------------------------------------------- classification
def auroc(y_true, scores) -> float:
    """Area under the ROC curve.

    Binary: ``scores`` is ``[N]`` (score of the positive class) or ``[N, 2]``. Multi-class:
    ``scores`` is ``[N, C]`` probabilities (rows summing to 1) and the result is the macro
    one-vs-rest AUROC, as ``sklearn.metrics.roc_auc_score(multi_class="ovr")``.
    """
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 2 and s.shape[1] == 2:
        s = s[:, 1]
    if s.ndim == 1:
        return float(skm.roc_auc_score(y, s))
    return float(skm.roc_auc_score(y, s, multi_class="ovr", average="macro",
                                   labels=np.arange(s.shape[1])))


def classification_report(y_true, y_pred, average: str = "macro") -> dict:
    """Accuracy, precision, recall and F1 (``average`` over classes, macro by default)."""
    y, p = np.asarray(y_true), np.asarray(y_pred)
    prec, rec, f1, _ = skm.precision_recall_fscore_support(y, p, average=average, zero_division=0)
    return {"accuracy": float(skm.accuracy_score(y, p)), "precision": float(prec), "recall": float(rec),
            "f1": float(f1)}


def regression_report(y, yhat) -> dict:
    """R^2, mean absolute error and root-mean-square error."""
    y, yhat = np.asarray(y, dtype=np.float64), np.asarray(yhat, dtype=np.float64)
    return {"r2": float(skm.r2_score(y, yhat)), "mae": float(np.mean(np.abs(y - yhat))),
            "rmse": float(np.sqrt(np.mean((y - yhat) ** 2)))}


# --------------------------------------------------------------------- bootstrap
def bootstrap_ci(metric_fn: Callable[..., float], *arrays, n: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap ``(lo, hi)`` (95 % by default) of ``metric_fn(*arrays)``.

    The arrays are resampled together along their first axis (cases). Resamples on which the
    metric is undefined (raises ``ValueError``, e.g. AUROC with one class, or gives nan) are
    skipped; ``(nan, nan)`` if none is defined.
    """
    arrays = [np.asarray(a) for a in arrays]
    m = len(arrays[0])
    if any(len(a) != m for a in arrays):
        raise ValueError("all arrays must have the same length")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, m, m)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                v = float(metric_fn(*(a[idx] for a in arrays)))
        except ValueError:
            continue
        if np.isfinite(v):
            values.append(v)
    if not values:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)
