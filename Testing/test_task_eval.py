"""Validation (training.task_eval, which picks the best model) and evaluate's test reports compute
every metric with the one function EchoFMEngine.metrics.summarize: the same predictions give the
same numbers, including the cases where the two former rules differed."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from EchoFMEngine import metrics as M
from EchoFMEngine.evaluation import reports
from EchoFMEngine.evaluation.tasks import ClassificationEval, MultiEval, RegressionEval, SegmentationEval
from EchoFMEngine.models import build_echofm
from EchoFMEngine.models.heads import EchoFMClassifier, EchoFMMultiView, EchoFMSegmenter
from EchoFMEngine.tasks import structures_for
from EchoFMEngine.training.task_eval import evaluate_task, is_better, select_metric, task_metrics

IMG, FRAMES = 32, 8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


# ------------------------------------------------------------ same predictions, same numbers
def test_multiclass_auroc_agrees_where_the_old_rules_differed():
    """Probabilities stored to 2 decimals (rows sum to 1 only within 0.02): the old validation rule
    (scikit-learn's ``multi_class="ovr"``, which refuses such rows) gave nan and left model selection
    to the loss, while the old report averaged the per-class AUROCs. One rule now: the per-class mean."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    p = rng.dirichlet(np.ones(3), 60) + 0.5 * np.eye(3)[y]
    p = np.round(p / p.sum(1, keepdims=True), 2)
    assert not np.allclose(p.sum(1), 1.0)
    with pytest.raises(ValueError, match="sum up to 1"):
        roc_auc_score(y, p, multi_class="ovr")                  # what validation used to call
    want = np.mean([roc_auc_score(y == c, p[:, c]) for c in range(3)])
    val = task_metrics("view", {"y": y, "proba": p})
    test = reports.classification_metrics(y, p, ["a", "b", "c"], n_boot=0)
    assert val["auroc"] == pytest.approx(want) and test["auroc"]["value"] == val["auroc"]
    for k in ("accuracy", "balanced_accuracy", "f1", "precision", "recall", "loss"):
        assert test[k]["value"] == val[k], k
    assert val["confusion_matrix"] == test["confusion_matrix"]


def test_single_class_and_missing_class_are_nan_in_both_and_selection_falls_back_to_the_loss():
    y = np.zeros(5, int)                                       # a validation split with one class
    p = np.tile([0.6, 0.4], (5, 1))
    val = task_metrics("as", {"y": y, "proba": p})
    test = reports.classification_metrics(y, p, ["no", "yes"], n_boot=50)
    assert math.isnan(val["auroc"]) and math.isnan(test["auroc"]["value"])
    assert all(map(math.isnan, test["auroc"]["ci95"]))
    metric, higher = select_metric("as")
    assert (metric, higher) == ("auroc", True)
    assert is_better(val["auroc"], float("nan"), higher, loss=0.4, best_loss=0.5)       # lower loss wins
    assert not is_better(val["auroc"], float("nan"), higher, loss=0.6, best_loss=0.5)
    # three classes, one absent from the truth: nan in both, per-class AUROC of the others reported
    y3 = np.array([0, 1, 0, 1, 0, 1])
    p3 = np.array([[.7, .2, .1], [.2, .7, .1], [.5, .3, .2], [.1, .8, .1], [.6, .2, .2], [.3, .6, .1]])
    val3 = task_metrics("view", {"y": y3, "proba": p3})
    test3 = reports.classification_metrics(y3, p3, ["A2C", "A4C", "PLAX"], n_boot=0)
    assert math.isnan(val3["auroc"]) and math.isnan(test3["auroc"]["value"])
    assert val3["auroc_per_class"]["0"] == test3["auroc_per_class"]["A2C"]["value"] == 1.0
    assert math.isnan(test3["auroc_per_class"]["PLAX"]["value"])


def test_segmentation_validation_equals_report_with_a_structure_never_found():
    """LA missed on every frame: its distances are undefined everywhere. The old validation
    averaged HD95 over structures with ``mean`` (-> nan), the report with ``nanmean``."""
    rng = np.random.default_rng(1)
    preds, refs, spacings = [], [], []
    for i in range(3):
        ref = np.zeros((2, 32, 32), np.uint8)
        ref[:, 8:20, 10:22] = 1
        ref[:, 6:22, 8:24][ref[:, 6:22, 8:24] == 0] = 2
        ref[:, 22:28, 12:20] = 3
        pred = np.roll(ref, int(rng.integers(-2, 3)), axis=2)
        pred[pred == 3] = 0
        preds.append(pred), refs.append(ref), spacings.append((0.5, 0.5))
    pred = {"pred": preds, "ref": refs, "spacing": spacings}
    val = task_metrics("segment", pred, n_boot=40, seed=2)
    scored = M.score_label_maps(preds, refs, spacings, structures_for(4))
    test = reports.summarize("segmentation", {"frames": scored, "spacing": spacings}, 40, 2)
    assert val["mean_dice"] == test["mean_dice"]["value"] and val["mean_dice_ci95"] == test["mean_dice"]["ci95"]
    assert math.isfinite(val["mean_hd95"]) and val["mean_hd95"] == test["mean_hd95"]
    assert val["structures"]["la"]["n_undefined"] == 6 and math.isnan(val["structures"]["la"]["hd95"])
    for s in ("lv_endo", "lv_epi", "la"):
        for k in M.SEG_METRICS:
            assert _same(val["structures"][s][k], test["structures"][s][k]["value"]), (s, k)
    assert val["unit"] == "mm" and val["n_frames"] == 6 and val["n_clips"] == 3


# ------------------------------------------------------------ a model: validation vs evaluate
def _encoder():
    return build_echofm("tiny", img_size=IMG, num_frames=FRAMES)


def test_classifier_validation_and_evaluate_agree(tmp_path):
    torch.manual_seed(0)
    model = EchoFMClassifier(_encoder(), 3).eval()
    g = torch.Generator().manual_seed(1)
    items = [{"video": torch.rand(3, FRAMES, IMG, IMG, generator=g), "label": i % 3} for i in range(9)]
    val = evaluate_task(model, "view", items, batch_size=4, device="cpu")
    ev = ClassificationEval(["A2C", "A4C", "PLAX"])
    for i in range(0, 9, 2):                          # other batches than validation: same numbers
        ev.add(model, items[i:i + 2], "cpu")
    m, _, _ = ev.finish(tmp_path, n_boot=0, seed=0)
    for k in ("auroc", "accuracy", "f1", "balanced_accuracy"):
        assert m[k]["value"] == pytest.approx(val[k], abs=1e-6), k
    assert m["loss"]["value"] == pytest.approx(val["loss"], rel=1e-5)


def test_ar_multiview_validation_and_evaluate_agree(tmp_path):
    torch.manual_seed(0)
    model = EchoFMMultiView(_encoder()).eval()
    g = torch.Generator().manual_seed(2)
    items = [{"video": torch.rand(4, 3, FRAMES, IMG, IMG, generator=g), "view_valid": torch.tensor([1, 1, i % 2, 1]).bool(),
              "label": int(i >= 3), "severity": float(i % 5)} for i in range(6)]
    val = evaluate_task(model, "ar", items, batch_size=3, device="cpu")
    ev = MultiEval({"severe": ClassificationEval(["non_severe", "severe"]),
                    "severity": RegressionEval("severity", "AR severity", "grade", prefix="severity_", plots=())})
    ev.add(model, items, "cpu")
    m, _, _ = ev.finish(tmp_path, n_boot=0, seed=0)
    assert m["severe"]["auroc"]["value"] == pytest.approx(val["auroc"], abs=1e-6)
    assert m["severity"]["mae"]["value"] == pytest.approx(val["severity_mae"], abs=1e-5)


def test_segmenter_validation_and_evaluate_agree(tmp_path):
    torch.manual_seed(0)
    model = EchoFMSegmenter(_encoder(), 4).eval()
    g = torch.Generator().manual_seed(3)
    items = []
    for i in range(3):
        valid = torch.zeros(FRAMES, dtype=torch.bool)
        valid[[1, 5]] = True
        items.append({"video": torch.rand(3, FRAMES, IMG, IMG, generator=g),
                      "masks": torch.randint(0, 4, (FRAMES, IMG, IMG), generator=g), "mask_valid": valid,
                      "spacing_mm": (0.4, 0.4)})
    val = evaluate_task(model, "segment", items, batch_size=2, device="cpu", n_boot=20, seed=1)
    ev = SegmentationEval(structures_for(4))
    ev.add(model, items, "cpu")
    m, _, rows = ev.finish(tmp_path, n_boot=20, seed=1)
    assert m["mean_dice"]["value"] == val["mean_dice"] and m["mean_dice"]["ci95"] == val["mean_dice_ci95"]
    assert m["n_frames"] == val["n_frames"] == len(rows) == 6 and [r["frame"] for r in rows[:2]] == [1, 5]
    for s in ("lv_endo", "lv_epi", "la"):
        assert _same(m["structures"][s]["hd95"]["value"], val["structures"][s]["hd95"])


def test_every_metric_the_registry_declares_is_in_validation():
    """tasks.py declares each task's metrics and selection metric; validation gives them all."""
    from EchoFMEngine.tasks import TASKS

    rng = np.random.default_rng(5)
    y2 = np.array([0, 1, 0, 1, 1, 0])
    p2 = np.stack([1 - rng.random(6), rng.random(6)], 1)
    p2 /= p2.sum(1, keepdims=True)
    ref = np.zeros((2, 16, 16), np.uint8)
    ref[:, 4:10, 4:10] = 1
    ref[:, 3:11, 3:11][ref[:, 3:11, 3:11] == 0] = 2
    ref[:, 11:14, 5:9] = 3
    preds = {"classification": {"y": y2, "proba": p2}, "regression": {"y": rng.uniform(30, 70, 6), "pred": rng.uniform(30, 70, 6)},
             "segmentation": {"pred": [ref, np.roll(ref, 1, 2)], "ref": [ref, ref], "spacing": [(0.3, 0.3), None]}}
    for spec in TASKS:
        pred = dict(preds[spec.kind])
        if spec.name == "ar":
            pred.update(severity=rng.uniform(0, 4, 6), severity_pred=rng.uniform(0, 4, 6))
        m = task_metrics(spec.name, pred, n_boot=5)
        assert set(spec.metrics) <= set(m) and spec.select_metric in m, (spec.name, set(spec.metrics) - set(m))
        assert select_metric(spec.name) == (spec.select_metric, spec.higher_is_better)
