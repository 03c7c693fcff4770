"""The engine's one metrics module (paper Sec. IV): per-case metrics, summaries with bootstrap
confidence intervals, used by training-time validation (:mod:`training.task_eval`, which picks the
best model) and by ``evaluate``'s test reports (:mod:`evaluation.tasks`), so that both compute every
number, AUROC included, the same way (:func:`summarize`).

- Segmentation: Dice, IoU, HD95, ASSD of binary masks of any dimension (2D frames or 3D volumes /
  clips); per structure of label maps (:func:`structure_scores`, :func:`score_label_maps`).
- Classification: :func:`auroc` (one rule: binary; macro one-vs-rest for more classes; nan when a
  class is absent from the truth), accuracy, balanced accuracy, macro precision / recall / F1
  (scikit-learn), cross-entropy.
- Regression: R^2, MAE, RMSE, bias, Bland-Altman limits of agreement.
- Bootstrap: percentile intervals resampling cases (:func:`with_cis`, :func:`bootstrap_ci`); every
  summarised number is ``{"value", "ci95": [lo, hi], "n"}``.

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

import math
import warnings
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
from scipy import ndimage, stats
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


SEG_METRICS = ("dice", "iou", "hd95", "assd")


def structure_scores(pred, ref, spacing: Spacing, structures: Mapping[str, Sequence[int]]) -> dict:
    """Dice / IoU / HD95 / ASSD of each structure (name -> the labels it unites) for one pair of
    label maps (one frame)."""
    p, r = np.asarray(pred), np.asarray(ref)
    return {s: segmentation_scores(np.isin(p, labels), np.isin(r, labels), spacing) for s, labels in structures.items()}


def score_label_maps(preds: Sequence, refs: Sequence, spacings: Sequence,
                     structures: Mapping[str, Sequence[int]]) -> list[dict]:
    """Per labelled frame: ``{"clip", "frame", "scores": {structure: {dice, iou, hd95, assd}}}`` for
    one ``[K,H,W]`` predicted / reference pair and one spacing (or None: pixels) per clip; ``frame``
    counts the clip's labelled frames."""
    if not structures:
        raise ValueError("no structure to score")
    out = []
    for clip, (pred, ref, spacing) in enumerate(zip(preds, refs, spacings)):
        for k, (p, r) in enumerate(zip(np.asarray(pred), np.asarray(ref))):
            out.append({"clip": clip, "frame": k, "scores": structure_scores(p, r, spacing, structures)})
    return out


def distance_unit(spacings: Sequence) -> str:
    """Unit of the surface distances of cases with these spacings (None: no spacing, pixels)."""
    known = sum(s is not None for s in spacings)
    if known == len(spacings):
        return "mm"
    return "px" if known == 0 else "mixed: mm where spacing is known, px otherwise"


# ---------------------------------------------------------------- classification
def _binary_auroc(positive, score) -> float:
    """AUROC of ``score`` for the boolean ``positive``; nan when only one class is present.

    The Mann-Whitney form (ties count one half, through average ranks), which equals
    ``sklearn.metrics.roc_auc_score`` (tested) at a fraction of its cost: bootstrap intervals call
    it thousands of times."""
    pos = np.asarray(positive).astype(bool)
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(np.asarray(score, dtype=np.float64))
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _classes(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    """``y`` as class indices and ``scores`` as ``[N, C]``, checked against each other."""
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != y.shape[0] or y.ndim != 1:
        raise ValueError(f"scores must be [N, C] with N = len(y_true) = {len(y)}, got {s.shape}")
    if y.size and (not np.all(np.equal(np.mod(y, 1), 0)) or y.min() < 0 or y.max() >= s.shape[1]):
        raise ValueError(f"y_true holds class indices outside [0, {s.shape[1]})")
    return y.astype(int), s


def auroc_per_class(y_true, scores) -> np.ndarray:
    """One-vs-rest AUROC of every column ``c`` of ``scores [N, C]`` (class ``c`` against all
    others); nan for a class absent from ``y_true`` (or the only one present)."""
    y, s = _classes(y_true, scores)
    return np.array([_binary_auroc(y == c, s[:, c]) for c in range(s.shape[1])])


def _macro(per_class: np.ndarray) -> float:
    return float(np.mean(per_class)) if np.isfinite(per_class).all() else float("nan")


def auroc(y_true, scores) -> float:
    """Area under the ROC curve: the one AUROC rule of the engine (validation, model selection and
    the test reports of ``evaluate`` all call this).

    - Binary: ``scores`` is ``[N]`` (score of class 1) or ``[N, 2]`` (column 1 is used); ``y_true``
      in {0, 1}.
    - ``C > 2`` classes: ``scores`` is ``[N, C]``; the macro mean of the C one-vs-rest AUROCs
      (:func:`auroc_per_class`), which is ``sklearn.metrics.roc_auc_score(multi_class="ovr",
      average="macro")`` wherever scikit-learn accepts the input. Rows need not sum to 1: each
      column is ranked on its own.
    - Undefined -> ``nan``, never an exception: a single-class ``y_true`` (binary), or any of the C
      classes absent from ``y_true`` (its one-vs-rest AUROC does not exist, and a mean over fewer
      classes would not be comparable between data sets); the per-class values still say which.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 2 and s.shape[1] == 2:
        s = s[:, 1]
    if s.ndim == 1:
        y = np.asarray(y_true)
        if y.shape != s.shape:
            raise ValueError(f"y_true and scores differ in length: {y.shape} vs {s.shape}")
        if not np.isin(y, (0, 1)).all():
            raise ValueError("binary AUROC needs y_true in {0, 1}")
        return _binary_auroc(y == 1, s)
    return _macro(auroc_per_class(y_true, s))


def _auroc_parts(y, proba) -> dict:
    """``{"auroc"}`` and, for more than two classes, ``{"auroc:c"}`` per class (computed once)."""
    if proba.shape[1] == 2:
        return {"auroc": auroc(y, proba)}
    per = auroc_per_class(y, proba)
    return {"auroc": _macro(per), **{f"auroc:{c}": float(v) for c, v in enumerate(per)}}


def classification_report(y_true, y_pred, average: str = "macro") -> dict:
    """Accuracy, balanced accuracy, and precision / recall / F1 (``average`` over the classes present
    in truth or prediction, macro by default), all scikit-learn."""
    y, p = np.asarray(y_true), np.asarray(y_pred)
    prec, rec, f1, _ = skm.precision_recall_fscore_support(y, p, average=average, zero_division=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # a predicted class absent from the truth
        balanced = skm.balanced_accuracy_score(y, p)
    return {"accuracy": float(skm.accuracy_score(y, p)), "balanced_accuracy": float(balanced),
            "precision": float(prec), "recall": float(rec), "f1": float(f1)}


def cross_entropy(y_true, proba) -> float:
    """Mean negative log-probability of the true class (the validation loss of classifiers)."""
    y, p = _classes(y_true, proba)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())


# -------------------------------------------------------------------- regression
def regression_report(y, yhat) -> dict:
    """R^2 (nan under two cases), mean absolute error, root-mean-square error and the bias
    (mean of ``yhat - y``)."""
    y, yhat = np.asarray(y, dtype=np.float64), np.asarray(yhat, dtype=np.float64)
    d = yhat - y
    return {"r2": float(skm.r2_score(y, yhat)) if len(y) > 1 else float("nan"), "mae": float(np.mean(np.abs(d))),
            "rmse": float(np.sqrt(np.mean(d ** 2))), "bias": float(np.mean(d))}


def bland_altman(y, yhat) -> dict:
    """Bias (mean of ``yhat - y``), SD of the differences (ddof 1) and the 95 % limits of agreement."""
    d = np.asarray(yhat, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    bias, sd = float(d.mean()), float(d.std(ddof=1)) if d.size > 1 else float("nan")
    return {"bias": bias, "sd": sd, "loa_low": bias - 1.96 * sd, "loa_high": bias + 1.96 * sd}


# --------------------------------------------------------------------- bootstrap
def _same_length(arrays) -> list[np.ndarray]:
    arrays = [np.asarray(a) for a in arrays]
    if any(len(a) != len(arrays[0]) for a in arrays):
        raise ValueError("all arrays must have the same length")
    return arrays


def _point(fns: Mapping[str, Callable], arrays) -> dict:
    """Every metric of ``fns`` on ``arrays`` as floats (a function may return a dict of several);
    nan where undefined (ValueError or non-finite)."""
    out = {}
    for name, fn in fns.items():
        try:
            v = fn(*arrays)
        except ValueError:
            v = float("nan")
        for k, x in (v.items() if isinstance(v, dict) else [(name, v)]):
            out[k] = float(x)
    return out


def with_cis(fns: Mapping[str, Callable], *arrays, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """``{name: {"value", "ci95": [lo, hi], "n"}}`` for several metrics of the same cases.

    ``value`` is the metric on all cases (nan where undefined); ``ci95`` the percentile bootstrap:
    the cases are resampled ``n_boot`` times with replacement (all arrays together, along their
    first axis, ``numpy.random.default_rng(seed)``), and resamples on which a metric is undefined are
    skipped for that metric only (``[nan, nan]`` when none is defined, or ``n_boot`` is 0)."""
    arrays = _same_length(arrays)
    m = len(arrays[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # nanmean of all-nan and friends: undefined -> nan
        point = _point(fns, arrays)
        samples: dict = {k: [] for k in point}
        rng = np.random.default_rng(seed)
        for _ in range(n_boot):
            idx = rng.integers(0, m, m)
            for k, v in _point(fns, [a[idx] for a in arrays]).items():
                if np.isfinite(v):
                    samples.setdefault(k, []).append(v)
    out = {}
    for k, v in samples.items():
        ci = np.percentile(v, [100 * alpha / 2, 100 * (1 - alpha / 2)]).tolist() if v else [float("nan")] * 2
        out[k] = {"value": point.get(k, float("nan")), "ci95": [float(c) for c in ci], "n": int(m)}
    return out


def with_ci(fn: Callable[..., float], *arrays, n_boot: int = 1000, seed: int = 0) -> dict:
    """:func:`with_cis` of one metric."""
    return with_cis({"metric": fn}, *arrays, n_boot=n_boot, seed=seed)["metric"]


def bootstrap_ci(metric_fn: Callable[..., float], *arrays, n: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap ``(lo, hi)`` (95 % by default) of ``metric_fn(*arrays)``, as in
    :func:`with_cis` (undefined resamples skipped; ``(nan, nan)`` if none is defined)."""
    lo, hi = with_cis({"metric": metric_fn}, *arrays, n_boot=n, seed=seed, alpha=alpha)["metric"]["ci95"]
    return lo, hi


# --------------------------------------------------------------------- summaries
def classification_summary(y_true, proba, class_names: Optional[Sequence[str]] = None, n_boot: int = 0,
                           seed: int = 0) -> dict:
    """Accuracy, balanced accuracy, macro precision / recall / F1 (of the arg-max class), AUROC
    (:func:`auroc`), per-class one-vs-rest AUROC (more than two classes) and the cross-entropy
    ``loss``, each ``{"value", "ci95", "n"}``; the confusion matrix (rows truth), class supports."""
    y, p = _classes(y_true, proba)
    names = [str(c) for c in class_names] if class_names is not None else [str(c) for c in range(p.shape[1])]
    if p.shape[1] != len(names):
        raise ValueError(f"proba has {p.shape[1]} columns but there are {len(names)} class names")
    if p.shape[1] < 2:
        raise ValueError("a classification needs at least two classes")
    pred = p.argmax(1)
    fns = {"report": lambda a, q, b: classification_report(a, b), "auroc": lambda a, q, b: _auroc_parts(a, q),
           "loss": lambda a, q, b: cross_entropy(a, q)}
    res = with_cis(fns, y, p, pred, n_boot=n_boot, seed=seed)
    out: dict = {"n": int(len(y)), "class_names": names}
    out.update({k: v for k, v in res.items() if not k.startswith("auroc:")})
    if p.shape[1] > 2:
        out["auroc_per_class"] = {name: res[f"auroc:{c}"] for c, name in enumerate(names)}
    out["confusion_matrix"] = skm.confusion_matrix(y, pred, labels=np.arange(p.shape[1])).tolist()
    out["support"] = {name: int((y == c).sum()) for c, name in enumerate(names)}
    return out


def regression_summary(y, yhat, n_boot: int = 0, seed: int = 0) -> dict:
    """MAE, RMSE, R^2 and bias (:func:`regression_report`), each ``{"value", "ci95", "n"}``, plus
    the SD of the differences and the 95 % limits of agreement (Bland-Altman)."""
    y, yhat = np.asarray(y, dtype=np.float64), np.asarray(yhat, dtype=np.float64)
    if y.shape != yhat.shape or y.ndim != 1:
        raise ValueError(f"y and yhat must be 1-D of the same length, got {y.shape} and {yhat.shape}")
    out: dict = {"n": int(len(y))}
    out.update(with_cis({"report": regression_report}, y, yhat, n_boot=n_boot, seed=seed))
    ba = bland_altman(y, yhat)
    out["sd_diff"], out["loa"] = ba["sd"], [ba["loa_low"], ba["loa_high"]]
    return out


def segmentation_rows(frames: Sequence[dict]) -> dict:
    """``rows[structure][metric] -> per-frame list`` from :func:`score_label_maps` records."""
    if not frames:
        raise ValueError("no labelled frame to score (mask_valid is False everywhere)")
    rows = {s: {k: [] for k in SEG_METRICS} for s in frames[0]["scores"]}
    for f in frames:
        for s, sc in f["scores"].items():
            for k in SEG_METRICS:
                rows[s][k].append(sc[k])
    return rows


def segmentation_summary(rows: Mapping[str, Mapping[str, Sequence[float]]], n_boot: int = 0,
                         seed: int = 0, unit: str = "mm") -> dict:
    """Summary of per-case scores ``rows[structure][metric] -> list`` (cases = labelled frames).

    Per structure: mean Dice / IoU and ``nanmean`` HD95 / ASSD over the cases, each with a CI (a case
    where the structure is missing from exactly one mask has undefined distances: left out and
    counted in ``n_undefined``), plus the Dice SD. ``mean_dice``: the mean over cases of the mean
    over structures (the paper's mDice) with its CI; ``mean_iou`` / ``mean_hd95`` / ``mean_assd``:
    ``nanmean`` over structures. Distances are in ``unit``."""
    if not rows or not len(next(iter(rows.values()))["dice"]):
        raise ValueError("no labelled frame to score (mask_valid is False everywhere)")
    fns = {"dice": lambda d, i, h, a: np.mean(d), "iou": lambda d, i, h, a: np.mean(i),
           "hd95": lambda d, i, h, a: np.nanmean(h), "assd": lambda d, i, h, a: np.nanmean(a)}
    out: dict = {"unit": unit, "structures": {}}
    for s, r in rows.items():
        cols = [np.asarray(r[k], dtype=np.float64) for k in SEG_METRICS]
        entry = {"n": int(cols[0].size), **with_cis(fns, *cols, n_boot=n_boot, seed=seed)}
        entry["dice_sd"] = float(cols[0].std())
        entry["n_undefined"] = int(np.isnan(cols[2]).sum())
        out["structures"][s] = entry
    per_case = np.mean([np.asarray(r["dice"], dtype=np.float64) for r in rows.values()], axis=0)
    out["mean_dice"] = with_ci(np.mean, per_case, n_boot=n_boot, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)          # every structure undefined: nan
        for key in ("iou", "hd95", "assd"):
            out[f"mean_{key}"] = float(np.nanmean([e[key]["value"] for e in out["structures"].values()]))
    out["n_frames"] = int(per_case.size)
    return out


def summarize(kind: str, pred: Mapping, n_boot: int = 0, seed: int = 0,
              class_names: Optional[Sequence[str]] = None,
              structures: Optional[Mapping[str, Sequence[int]]] = None) -> dict:
    """The metric summary of one kind of task output, the same for training-time validation
    (:mod:`training.task_eval`, which picks the best model on it) and for ``evaluate``'s test
    reports (:mod:`evaluation.tasks`).

    ``kind`` "classification": ``pred["y"]`` [N] and ``pred["proba"]`` [N, C]; "regression":
    ``pred["y"]``, ``pred["pred"]`` [N]; "segmentation": ``pred["pred"]`` / ``pred["ref"]`` (one
    ``[K,H,W]`` label-map stack per clip) and ``pred["spacing"]`` (per clip), scored over
    ``structures``, or already scored ``pred["frames"]`` (:func:`score_label_maps`)."""
    if kind == "classification":
        return classification_summary(pred["y"], pred["proba"], class_names, n_boot=n_boot, seed=seed)
    if kind == "regression":
        return regression_summary(pred["y"], pred["pred"], n_boot=n_boot, seed=seed)
    if kind == "segmentation":
        frames = pred.get("frames")
        if frames is None:
            if structures is None:
                raise ValueError("segmentation needs the structures to score")
            frames = score_label_maps(pred["pred"], pred["ref"], pred["spacing"], structures)
        out = segmentation_summary(segmentation_rows(frames), n_boot=n_boot, seed=seed,
                                   unit=distance_unit(pred["spacing"]))
        out["n_clips"] = len(pred["spacing"])
        return out
    raise ValueError(f"unknown kind of metric summary {kind!r}: expected classification, regression or segmentation")


# ------------------------------------------------------------------- model choice
LOWER_IS_BETTER = ("loss", "mae", "rmse", "hd95", "assd", "bias")


def higher_is_better(name: str) -> bool:
    """Whether a larger value of metric ``name`` (e.g. 'auroc', 'severe.auroc', 'mae') is better."""
    return not any(k in name for k in LOWER_IS_BETTER)


def point_values(summary):
    """A summary with every ``{"value", "ci95", "n"}`` replaced by its value (and ``<name>_ci95``
    where an interval was computed): the plain numbers validation compares."""
    if not isinstance(summary, dict):
        return summary
    out = {}
    for k, v in summary.items():
        if isinstance(v, dict) and "value" in v and "ci95" in v:
            out[k] = v["value"]
            if np.isfinite(v["ci95"]).any():
                out[f"{k}_ci95"] = list(v["ci95"])
        else:
            out[k] = point_values(v)
    return out


def json_safe(x):
    """NaN / inf -> None, tuples -> lists, numpy scalars -> Python numbers (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
