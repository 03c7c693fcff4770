"""Test reports of ``evaluate``: :func:`EchoFMEngine.metrics.summarize` with 1,000 bootstrap
resamples by default, so a reported test number is computed exactly as the validation number that
picked the model (:mod:`training.task_eval` calls the same function, without intervals).

Every number is reported as ``{"value", "ci95": [lo, hi], "n"}``: the point estimate on all
cases and the 2.5 / 97.5 percentiles of the metric over ``n_boot`` resamples of the cases
(with replacement, all arrays of a case resampled together; undefined resamples skipped, see
:func:`EchoFMEngine.metrics.with_cis`). Same seed -> same interval.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from ..metrics import (SEG_METRICS, auroc, bland_altman, structure_scores, summarize,  # noqa: F401 (public here)
                       with_ci, with_cis)
from ..metrics import segmentation_summary as _segmentation_summary

N_BOOT = 1000


def classification_metrics(y_true, proba, class_names: Sequence[str], n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Accuracy, balanced accuracy, macro precision / recall / F1, AUROC (:func:`metrics.auroc`),
    per-class AUROC, loss, each with a CI; confusion matrix and supports."""
    return summarize("classification", {"y": y_true, "proba": proba}, n_boot, seed, class_names=class_names)


def regression_metrics(y, yhat, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """MAE, RMSE, R^2 and bias with CIs, plus the SD of the differences and the limits of agreement."""
    return summarize("regression", {"y": y, "pred": yhat}, n_boot, seed)


def segmentation_summary(rows: Mapping[str, Mapping[str, Sequence[float]]], n_boot: int = N_BOOT, seed: int = 0,
                         unit: str = "mm") -> dict:
    """:func:`metrics.segmentation_summary` of per-frame ``rows[structure][metric]`` with CIs."""
    return _segmentation_summary(rows, n_boot=n_boot, seed=seed, unit=unit)
