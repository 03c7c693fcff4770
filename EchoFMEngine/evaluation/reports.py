"""Metric reports with 95 % percentile-bootstrap intervals, built on :mod:`EchoFMEngine.metrics`.

Every number is reported as ``{"value", "ci95": [lo, hi], "n"}``: the point estimate on all
cases and the 2.5 / 97.5 percentiles of the metric over ``n_boot`` resamples of the cases
(with replacement, all arrays of a case resampled together; undefined resamples skipped, see
:func:`EchoFMEngine.metrics.bootstrap_ci`). Same seed -> same interval.
"""
from __future__ import annotations

import warnings
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
from sklearn import metrics as skm

from ..metrics import auroc, bootstrap_ci, classification_report, regression_report

SEG_METRICS = ("dice", "iou", "hd95", "assd")


def _safe(fn: Callable[..., float], *arrays) -> float:
    """``fn(*arrays)``, or nan where it is undefined (ValueError, e.g. AUROC with one class)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(fn(*arrays))
    except ValueError:
        return float("nan")


def with_ci(fn: Callable[..., float], *arrays, n_boot: int = 1000, seed: int = 0) -> dict:
    """``{"value", "ci95", "n"}`` of ``fn(*arrays)`` with a percentile-bootstrap 95 % interval."""
    value = _safe(fn, *arrays)
    lo, hi = bootstrap_ci(fn, *arrays, n=n_boot, seed=seed) if n_boot > 0 else (float("nan"),) * 2
    return {"value": value, "ci95": [lo, hi], "n": int(len(arrays[0]))}


def _values(fns: Mapping[str, Callable], arrays) -> dict:
    """Every metric of ``fns`` on ``arrays``; a function may return a dict of several metrics
    (computed once). Undefined metrics (ValueError, non-finite) are left out."""
    out = {}
    for name, fn in fns.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                v = fn(*arrays)
        except ValueError:
            continue
        for k, x in (v.items() if isinstance(v, dict) else [(name, v)]):
            if np.isfinite(float(x)):
                out[k] = float(x)
    return out


def with_cis(fns: Mapping[str, Callable], *arrays, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """:func:`with_ci` for several metrics of the same cases in one pass over the resamples.

    Same resampling as :func:`EchoFMEngine.metrics.bootstrap_ci` with this ``seed``, so each
    interval equals what it gives for that metric alone; a metric undefined on a resample
    skips that resample for this metric only. A function returning a dict (e.g.
    :func:`metrics.classification_report`) reports each of its keys."""
    arrays = [np.asarray(a) for a in arrays]
    m = len(arrays[0])
    if any(len(a) != m for a in arrays):
        raise ValueError("all arrays must have the same length")
    point = _values(fns, arrays)
    samples: dict = {k: [] for k in point}
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        idx = rng.integers(0, m, m)
        for k, v in _values(fns, [a[idx] for a in arrays]).items():
            samples.setdefault(k, []).append(v)
    out = {}
    for k, v in samples.items():
        ci = np.percentile(v, [100 * alpha / 2, 100 * (1 - alpha / 2)]).tolist() if v else [float("nan")] * 2
        out[k] = {"value": point.get(k, float("nan")), "ci95": [float(c) for c in ci], "n": int(m)}
    return out


# ---------------------------------------------------------------- classification
def _check_proba(y_true, proba, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(int)
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"proba must be [N, C] with N = len(y_true) = {len(y)}, got {p.shape}")
    if p.shape[1] != len(class_names):
        raise ValueError(f"proba has {p.shape[1]} columns but there are {len(class_names)} class names")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"y_true holds class indices outside [0, {p.shape[1]})")
    return y, p


def one_vs_rest_auroc(y, proba, *_) -> dict:
    """``{"auroc:c": AUROC of class c vs the rest}`` for every class, and their mean ``"auroc"``
    (= scikit-learn's macro one-vs-rest AUROC) only when every class is defined."""
    out = {}
    for c in range(proba.shape[1]):
        try:
            out[f"auroc:{c}"] = auroc((y == c).astype(int), proba[:, c])
        except ValueError:               # class absent (or alone) in this sample
            out[f"auroc:{c}"] = float("nan")
    per_class = list(out.values())
    out["auroc"] = float(np.mean(per_class)) if np.isfinite(per_class).all() else float("nan")
    return out


def classification_metrics(y_true, proba, class_names: Sequence[str], n_boot: int = 1000,
                           seed: int = 0) -> dict:
    """Accuracy, macro precision / recall / F1 (of the arg-max class), AUROC (binary: of the
    positive class; multi-class: macro one-vs-rest) and one-vs-rest AUROC per class, each with
    a bootstrap CI; the confusion matrix (rows truth, columns prediction) and class supports."""
    y, p = _check_proba(y_true, proba, class_names)
    pred = p.argmax(1)
    out: dict = {"n": int(len(y)), "class_names": list(class_names)}
    fns = {"report": lambda a, q, b: classification_report(a, b)}     # accuracy, precision, recall, f1
    fns["auroc"] = (lambda a, q, b: auroc(a, q[:, 1])) if p.shape[1] == 2 else one_vs_rest_auroc
    res = with_cis(fns, y, p, pred, n_boot=n_boot, seed=seed)
    out.update({k: v for k, v in res.items() if not k.startswith("auroc:")})
    if p.shape[1] > 2:
        out["auroc_per_class"] = {name: res[f"auroc:{c}"] for c, name in enumerate(class_names)}
    out["confusion_matrix"] = skm.confusion_matrix(y, pred, labels=np.arange(p.shape[1])).tolist()
    out["support"] = {name: int((y == c).sum()) for c, name in enumerate(class_names)}
    return out


# -------------------------------------------------------------------- regression
def bland_altman(y, yhat) -> dict:
    """Bias (mean of ``yhat - y``), SD of the differences and the 95 % limits of agreement."""
    d = np.asarray(yhat, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    bias, sd = float(d.mean()), float(d.std(ddof=1)) if d.size > 1 else float("nan")
    return {"bias": bias, "sd": sd, "loa_low": bias - 1.96 * sd, "loa_high": bias + 1.96 * sd}


def regression_metrics(y, yhat, n_boot: int = 1000, seed: int = 0) -> dict:
    """MAE, RMSE, R^2 (of :func:`metrics.regression_report`) and the Bland-Altman bias, each with
    a bootstrap CI, plus the limits of agreement."""
    y, yhat = np.asarray(y, dtype=np.float64), np.asarray(yhat, dtype=np.float64)
    if y.shape != yhat.shape or y.ndim != 1:
        raise ValueError(f"y and yhat must be 1-D of the same length, got {y.shape} and {yhat.shape}")
    out: dict = {"n": int(len(y))}
    fns = {"report": lambda a, b: regression_report(a, b)}              # r2, mae, rmse
    fns["bias"] = lambda a, b: float(np.mean(b - a))
    out.update(with_cis(fns, y, yhat, n_boot=n_boot, seed=seed))
    ba = bland_altman(y, yhat)
    out["sd_diff"], out["loa"] = ba["sd"], [ba["loa_low"], ba["loa_high"]]
    return out


# ------------------------------------------------------------------ segmentation
def segmentation_summary(rows: Mapping[str, Mapping[str, Sequence[float]]], n_boot: int = 1000,
                         seed: int = 0, unit: str = "mm") -> dict:
    """Summary of per-case scores ``rows[structure][metric] -> list`` (cases = labelled frames).

    Per structure: mean of Dice / IoU / HD95 / ASSD with CIs (distances: ``nanmean``, the cases
    where a structure is missing from exactly one mask are undefined and counted in
    ``n_undefined``), plus Dice SD. ``mean_dice``: the mean over structures of each case
    (the paper's mDice), its CI from resampling cases. Distances are in ``unit``.
    """
    out: dict = {"unit": unit, "structures": {}}
    for s, r in rows.items():
        d = np.asarray(r["dice"], dtype=np.float64)
        entry = {"n": int(d.size), "dice": with_ci(np.mean, d, n_boot=n_boot, seed=seed),
                 "dice_sd": float(d.std()), "iou": with_ci(np.mean, np.asarray(r["iou"]), n_boot=n_boot, seed=seed)}
        for key in ("hd95", "assd"):
            v = np.asarray(r[key], dtype=np.float64)
            entry[key] = with_ci(np.nanmean, v, n_boot=n_boot, seed=seed) if np.isfinite(v).any() else \
                {"value": float("nan"), "ci95": [float("nan")] * 2, "n": int(v.size)}
        entry["n_undefined"] = int(np.isnan(np.asarray(r["hd95"], dtype=np.float64)).sum())
        out["structures"][s] = entry
    per_case = np.mean([np.asarray(r["dice"], dtype=np.float64) for r in rows.values()], axis=0)
    out["mean_dice"] = with_ci(np.mean, per_case, n_boot=n_boot, seed=seed)
    for key in ("iou", "hd95", "assd"):
        out[f"mean_{key}"] = float(np.nanmean([e[key]["value"] for e in out["structures"].values()]))
    return out


def structure_scores(pred: np.ndarray, ref: np.ndarray, spacing: Optional[Sequence[float]],
                     structures: Mapping[str, Sequence[int]]) -> dict:
    """Dice / IoU / HD95 / ASSD of each structure (name -> the labels it unites, e.g.
    ``training.segment.STRUCTURES``) for one label-map pair (one frame)."""
    from ..metrics import segmentation_scores

    return {s: segmentation_scores(np.isin(pred, labels), np.isin(ref, labels), spacing)
            for s, labels in structures.items()}
