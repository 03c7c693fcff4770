"""EchoFMEngine.metrics against medpy / scikit-learn, and the documented empty-mask results."""
from __future__ import annotations

import math

import numpy as np
import pytest
from medpy.metric import binary as mp
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from EchoFMEngine import metrics as M


def random_blob(shape, rng, p=0.3):
    """A blobby random mask: thresholded smoothed noise (several components, holes)."""
    from scipy import ndimage
    noise = ndimage.gaussian_filter(rng.random(shape), 2.0)
    return noise > np.quantile(noise, 1 - p)


@pytest.mark.parametrize("shape", [(48, 40), (10, 24, 20)])
@pytest.mark.parametrize("spacing", [None, "aniso"])
def test_surface_distances_match_medpy(shape, spacing):
    rng = np.random.default_rng(len(shape))
    sp = None if spacing is None else tuple(0.4 + 0.3 * i for i in range(len(shape)))
    for _ in range(5):
        a, b = random_blob(shape, rng), random_blob(shape, rng)
        assert M.hd95(a, b, sp) == pytest.approx(mp.hd95(a, b, voxelspacing=sp), abs=1e-6)
        assert M.assd(a, b, sp) == pytest.approx(mp.assd(a, b, voxelspacing=sp), abs=1e-6)
        assert M.dice(a, b) == pytest.approx(mp.dc(a, b), abs=1e-12)
        assert M.iou(a, b) == pytest.approx(mp.jc(a, b), abs=1e-12)


def test_scalar_spacing_equals_isotropic_tuple():
    rng = np.random.default_rng(5)
    a, b = random_blob((30, 30), rng), random_blob((30, 30), rng)
    assert M.hd95(a, b, 0.7) == pytest.approx(M.hd95(a, b, (0.7, 0.7)))
    assert M.assd(a, b, 0.7) == pytest.approx(0.7 * M.assd(a, b))


def test_identical_masks():
    a = np.zeros((20, 20), bool)
    a[5:12, 4:15] = True
    assert M.segmentation_scores(a, a) == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "assd": 0.0}


def test_empty_masks_give_the_documented_values():
    empty = np.zeros((16, 16), bool)
    full = empty.copy()
    full[4:9, 4:9] = True
    assert M.segmentation_scores(empty, empty) == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "assd": 0.0}
    for pred, ref in ((empty, full), (full, empty)):
        s = M.segmentation_scores(pred, ref, spacing=(0.5, 0.5))
        assert s["dice"] == 0.0 and s["iou"] == 0.0
        assert math.isnan(s["hd95"]) and math.isnan(s["assd"])


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shapes differ"):
        M.dice(np.zeros((3, 3)), np.zeros((3, 4)))


def test_auroc_binary_and_one_vs_rest_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = y * 0.5 + rng.random(200)
    assert M.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert M.auroc(y, np.stack([1 - s, s], 1)) == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    y3 = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)) + np.eye(3)[y3]
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert M.auroc(y3, prob) == pytest.approx(roc_auc_score(y3, prob, multi_class="ovr"), abs=1e-6)


def test_classification_and_regression_reports():
    r = M.classification_report([0, 1, 1, 0, 1], [0, 1, 0, 0, 1])
    assert r["accuracy"] == pytest.approx(0.8)
    assert set(r) == {"accuracy", "balanced_accuracy", "precision", "recall", "f1"}
    assert r["balanced_accuracy"] == pytest.approx(balanced_accuracy_score([0, 1, 1, 0, 1], [0, 1, 0, 0, 1]))
    assert M.classification_report([0, 1, 2], [0, 1, 2]) == {"accuracy": 1.0, "balanced_accuracy": 1.0,
                                                             "precision": 1.0, "recall": 1.0, "f1": 1.0}
    y = np.array([1.0, 2.0, 3.0, 4.0])
    g = M.regression_report(y, y + np.array([0.5, -0.5, 0.5, -0.5]))
    assert g["mae"] == pytest.approx(0.5) and g["rmse"] == pytest.approx(0.5)
    assert g["r2"] == pytest.approx(1 - 1.0 / 5.0)


def test_bootstrap_ci_brackets_the_estimate_and_is_reproducible():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 1.0, 200)
    lo, hi = M.bootstrap_ci(np.mean, x, n=500, seed=3)
    assert lo < x.mean() < hi and hi - lo < 0.5
    assert M.bootstrap_ci(np.mean, x, n=500, seed=3) == (lo, hi)
    y = rng.integers(0, 2, 60)
    s = y + rng.random(60)
    lo, hi = M.bootstrap_ci(M.auroc, y, s, n=200)   # paired resampling, one-class resamples skipped
    assert 0.5 < lo <= M.auroc(y, s) <= hi <= 1.0
    assert all(map(math.isnan, M.bootstrap_ci(M.auroc, np.ones(5), np.ones(5), n=20)))


# ------------------------------------------------------------ the one AUROC rule
def test_auroc_single_class_target_is_nan_without_warning():
    """Documented: AUROC of a target holding one class is undefined -> nan (no exception, no warning)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(M.auroc(np.ones(6, int), np.linspace(0, 1, 6)))
        assert math.isnan(M.auroc(np.zeros(6, int), np.stack([np.ones(6) / 2] * 2, 1)))
        three = np.full((6, 3), 1 / 3)
        assert math.isnan(M.auroc(np.full(6, 2), three))
        s = M.classification_summary(np.ones(4, int), np.tile([0.3, 0.7], (4, 1)), n_boot=20)
    assert math.isnan(s["auroc"]["value"]) and all(map(math.isnan, s["auroc"]["ci95"]))
    assert s["accuracy"]["value"] == 1.0        # the other metrics stay defined


def test_auroc_multiclass_missing_class_and_unnormalised_scores():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 90)
    scores = rng.random((90, 3)) + np.eye(3)[y]           # rows do not sum to 1
    per = M.auroc_per_class(y, scores)
    assert per == pytest.approx([roc_auc_score(y == c, scores[:, c]) for c in range(3)])
    assert M.auroc(y, scores) == pytest.approx(per.mean())
    proba = scores / scores.sum(1, keepdims=True)         # sklearn's ovr needs rows summing to 1
    assert M.auroc(y, proba) == pytest.approx(roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    # a class absent from the truth: its one-vs-rest AUROC does not exist, so neither does the macro mean
    y2 = np.where(y == 2, 0, y)
    per2 = M.auroc_per_class(y2, scores)
    assert math.isnan(per2[2]) and np.isfinite(per2[:2]).all() and math.isnan(M.auroc(y2, scores))
    with pytest.raises(ValueError, match="outside"):
        M.auroc(y + 3, scores)
    with pytest.raises(ValueError, match="0, 1"):
        M.auroc(np.array([0, 2, 2]), np.array([0.1, 0.5, 0.9]))


def test_with_cis_equals_bootstrap_ci_metric_by_metric():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 40)
    s = y * 0.4 + rng.random(40)
    fns = {"auroc": M.auroc, "mean": lambda a, b: float(np.mean(b))}
    res = M.with_cis(fns, y, s, n_boot=60, seed=7)
    assert res["auroc"]["ci95"] == list(M.bootstrap_ci(M.auroc, y, s, n=60, seed=7))
    assert res["mean"]["ci95"] == list(M.bootstrap_ci(lambda a, b: np.mean(b), y, s, n=60, seed=7))
    assert res["auroc"]["value"] == M.auroc(y, s) and res["auroc"]["n"] == 40
    assert all(map(math.isnan, M.with_cis(fns, y, s, n_boot=0)["auroc"]["ci95"]))    # no resamples: no interval


def test_regression_report_and_summary():
    y = np.array([40.0, 50.0, 60.0, 55.0])
    yhat = y + np.array([2.0, -1.0, 3.0, 0.0])
    r = M.regression_report(y, yhat)
    assert r["bias"] == pytest.approx(1.0) and r["mae"] == pytest.approx(1.5)
    assert math.isnan(M.regression_report(y[:1], yhat[:1])["r2"])
    s = M.summarize("regression", {"y": y, "pred": yhat}, n_boot=30)
    assert s["mae"]["value"] == r["mae"] and s["loa"][0] < 1.0 < s["loa"][1] and s["n"] == 4
    with pytest.raises(ValueError, match="unknown kind"):
        M.summarize("ranking", {})


def test_point_values_and_json_safe():
    s = M.classification_summary([0, 1, 0, 1], [[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.4, 0.6]], ["a", "b"],
                                 n_boot=10)
    v = M.point_values(s)
    assert v["accuracy"] == 1.0 and v["auroc"] == 1.0 and v["n"] == 4 and "accuracy_ci95" in v
    assert M.point_values(M.classification_summary([0, 1], [[0.9, 0.1], [0.2, 0.8]]))["auroc"] == 1.0
    assert "auroc_ci95" not in M.point_values(M.classification_summary([0, 1], [[0.9, 0.1], [0.2, 0.8]]))
    assert M.json_safe({"a": float("nan"), "b": (np.float32(1.5), 2)}) == {"a": None, "b": [1.5, 2]}
    assert not M.higher_is_better("mae") and M.higher_is_better("severe.auroc")


def test_auroc_with_tied_scores_equals_sklearn():
    rng = np.random.default_rng(9)
    for n in (3, 10, 57):
        y = np.r_[0, 1, rng.integers(0, 2, n - 2)]
        s = np.round(rng.random(n) + 0.3 * y, 1)                 # many ties
        assert M.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
