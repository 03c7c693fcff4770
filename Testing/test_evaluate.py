"""`evaluate`: reports agree with scikit-learn and the metrics module, bootstrap CIs behave,
figures are real PNGs, and the command runs end to end on tiny checkpoints and phantoms."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from EchoFMEngine import metrics as M
from EchoFMEngine.data import build_dataset
from EchoFMEngine.evaluation import figures, reports
from EchoFMEngine.evaluation.cases import HELD_OUT_SEED, parse_data_spec
from EchoFMEngine.evaluation.evaluate import cli, evaluate, load_checkpoint
from EchoFMEngine.models import build_echofm
from EchoFMEngine.models.checkpoint import CheckpointError
from EchoFMEngine.tasks import SEG_LABELS, STRUCTURE_LABELS
from EchoFMEngine.training.task_eval import evaluate_task

IMG, FRAMES = 32, 8
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def held_out_phantoms(task, n, classes=None):
    """The cases ``--data phantom:N`` evaluates: the registry's held-out phantom split."""
    return build_dataset("phantom", None, split="held_out", task=task, n=n, frames=FRAMES, size=IMG,
                         classes=classes).items


def assert_png(path):
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        a = np.asarray(im.convert("L"))
        assert im.width > 100 and im.height > 100 and a.std() > 5, f"{path.name} looks blank"


def noisy_classes(n, k, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    p = rng.dirichlet(np.ones(k), n)
    p[np.arange(n), y] += 0.4
    return y, p / p.sum(1, keepdims=True)


# ------------------------------------------------------------------ reports
@pytest.mark.parametrize("k", [2, 4])
def test_classification_report_agrees_with_sklearn(k):
    y, p = noisy_classes(80, k, seed=k)
    names = [f"c{i}" for i in range(k)]
    r = reports.classification_metrics(y, p, names, n_boot=10)
    pred = p.argmax(1)
    assert r["accuracy"]["value"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    assert r["f1"]["value"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-12)
    assert r["precision"]["value"] == pytest.approx(skm.precision_score(y, pred, average="macro"), abs=1e-12)
    assert r["recall"]["value"] == pytest.approx(skm.recall_score(y, pred, average="macro"), abs=1e-12)
    want = skm.roc_auc_score(y, p[:, 1]) if k == 2 else skm.roc_auc_score(y, p, multi_class="ovr")
    assert r["auroc"]["value"] == pytest.approx(want, abs=1e-9)
    assert r["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    if k > 2:
        for c in range(k):
            assert r["auroc_per_class"][f"c{c}"]["value"] == pytest.approx(skm.roc_auc_score(y == c, p[:, c]))
    assert r["n"] == 80 and sum(r["support"].values()) == 80


def test_classification_report_rejects_mismatched_inputs():
    y, p = noisy_classes(10, 3, 0)
    with pytest.raises(ValueError, match="class names"):
        reports.classification_metrics(y, p, ["a", "b"])
    with pytest.raises(ValueError, match="outside"):
        reports.classification_metrics(y + 3, p, ["a", "b", "c"])


def test_regression_report_agrees_with_sklearn_and_metrics_module():
    rng = np.random.default_rng(1)
    y = rng.uniform(25, 70, 60)
    yhat = y + rng.normal(2, 5, 60)
    r = reports.regression_metrics(y, yhat, n_boot=50)
    base = M.regression_report(y, yhat)
    assert r["mae"]["value"] == pytest.approx(skm.mean_absolute_error(y, yhat)) == base["mae"]
    assert r["rmse"]["value"] == pytest.approx(np.sqrt(skm.mean_squared_error(y, yhat)))
    assert r["r2"]["value"] == pytest.approx(skm.r2_score(y, yhat))
    d = yhat - y
    assert r["bias"]["value"] == pytest.approx(d.mean())
    assert r["loa"] == pytest.approx([d.mean() - 1.96 * d.std(ddof=1), d.mean() + 1.96 * d.std(ddof=1)])


def test_bootstrap_ci_brackets_the_estimate_and_is_reproducible():
    y, p = noisy_classes(60, 3, seed=5)
    a = reports.classification_metrics(y, p, ["a", "b", "c"], n_boot=40, seed=3)
    b = reports.classification_metrics(y, p, ["a", "b", "c"], n_boot=40, seed=3)
    for key in ("accuracy", "f1", "auroc"):
        lo, hi = a[key]["ci95"]
        assert lo < a[key]["value"] < hi and hi - lo < 0.4, (key, a[key])
        assert a[key]["ci95"] == b[key]["ci95"]
    # the intervals are the metrics module's percentile bootstrap, metric by metric
    acc = lambda t, q: M.classification_report(t, q)["accuracy"]
    assert a["accuracy"]["ci95"] == list(M.bootstrap_ci(acc, y, p.argmax(1), n=40, seed=3))
    assert a["auroc"]["ci95"] == pytest.approx(list(M.bootstrap_ci(M.auroc, y, p, n=40, seed=3)), abs=1e-12)
    other = reports.with_ci(acc, y, p.argmax(1), n_boot=40, seed=4)
    assert other["ci95"] != a["accuracy"]["ci95"] and other["value"] == a["accuracy"]["value"]


def test_segmentation_summary_matches_metrics_module_and_counts_undefined():
    rng = np.random.default_rng(2)
    rows = {s: {k: [] for k in reports.SEG_METRICS} for s in STRUCTURE_LABELS}
    pairs = []
    for i in range(6):
        ref = np.zeros((32, 32), np.uint8)
        ref[8:20, 10:22] = 1
        ref[6:22, 8:24][ref[6:22, 8:24] == 0] = 2
        ref[22:28, 12:20] = 3
        pred = np.roll(ref, int(rng.integers(-2, 3)), axis=1)
        if i == 0:
            pred[pred == 3] = 0               # LA missed: Dice 0, distances undefined
        pairs.append((pred, ref))
        for s, sc in reports.structure_scores(pred, ref, (0.5, 0.5), STRUCTURE_LABELS).items():
            for k, v in sc.items():
                rows[s][k].append(v)
    out = reports.segmentation_summary(rows, n_boot=100)
    la = out["structures"]["la"]
    assert la["n_undefined"] == 1 and la["n"] == 6
    want = np.nanmean([M.hd95(p == 3, r == 3, 0.5) for p, r in pairs])
    assert la["hd95"]["value"] == pytest.approx(want)
    epi = [M.dice(np.isin(p, (1, 2)), np.isin(r, (1, 2))) for p, r in pairs]
    assert out["structures"]["lv_epi"]["dice"]["value"] == pytest.approx(np.mean(epi))
    lo, hi = out["mean_dice"]["ci95"]
    assert lo <= out["mean_dice"]["value"] <= hi


# ------------------------------------------------------------------ figures
def test_figures_are_valid_pngs(tmp_path):
    y, p = noisy_classes(40, 3, 0)
    names = ["A2C", "A4C", "PLAX"]
    cm = skm.confusion_matrix(y, p.argmax(1)).tolist()
    ef = np.linspace(30, 70, 20)
    paths = [figures.confusion_matrix_figure(cm, names, tmp_path / "cm.png"),
             figures.roc_figure(y, p, names, tmp_path / "roc_ovr.png"),
             figures.roc_figure(y == 1, p[:, 1], ["other", "A4C"], tmp_path / "roc_bin.png"),
             figures.dice_boxplot({"lv_endo": [0.9, 0.92, 0.95], "la": [0.7, np.nan, 0.8]}, tmp_path / "box.png"),
             figures.bland_altman_figure(ef, ef + np.sin(ef), tmp_path / "ba.png"),
             figures.scatter_figure(ef, ef + np.sin(ef), tmp_path / "sc.png", scores={"MAE": 0.6}),
             figures.label_efficiency_figure([0.1, 0.5, 1.0], [0.6, 0.8, 0.9], tmp_path / "sub" / "le.png",
                                             "mean Dice", ci95=[[0.5, 0.7], [0.75, 0.85], [0.88, 0.92]])]
    for path in paths:
        assert_png(path)


# --------------------------------------------------------------- data specs
def test_data_spec_parsing_errors():
    assert parse_data_spec("phantom:3").n == 3
    assert parse_data_spec("camus:/x:y").root == "/x:y"
    for bad, msg in [("phantom:0", "positive"), ("phantom", "expected"), ("nosuch:/x", "unknown dataset")]:
        with pytest.raises(ValueError, match=msg):
            parse_data_spec(bad)


# ------------------------------------------------------ segmenter end to end
@pytest.fixture(scope="module")
def segmenter_dir(tmp_path_factory):
    """An untrained tiny segmenter in the task-checkpoint format (the pipeline, not the accuracy, is tested)."""
    from EchoFMEngine.models.heads import EchoFMSegmenter
    from EchoFMEngine.models.task_checkpoint import save_task_model

    torch.manual_seed(0)
    model = EchoFMSegmenter(build_echofm("tiny", img_size=IMG, num_frames=FRAMES), len(SEG_LABELS))
    return save_task_model(model, tmp_path_factory.mktemp("ckpt") / "seg", _description("segment", list(SEG_LABELS)))


def test_cli_segment_end_to_end_on_phantoms(segmenter_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli(["--task", "segment", "--checkpoint", str(segmenter_dir), "--data", "phantom:4",
                "--out", str(out), "--bootstrap", "100", "--device", "cpu"]) == 0
    res = json.loads((out / "metrics.json").read_text())
    assert res["task"] == "segment" and res["n_cases"] == 4 and res["skipped"] == []
    assert res["data"] == {"kind": "phantom", "n_studies": 4, "seed": HELD_OUT_SEED}
    m = res["metrics"]
    assert m["unit"] == "mm" and set(m["structures"]) == {"lv_endo", "lv_epi", "la"}
    for s in m["structures"].values():
        for key in ("dice", "iou", "hd95", "assd"):
            assert len(s[key]["ci95"]) == 2 and s[key]["n"] == m["n_frames"]
    # same numbers as training-time validation (task_eval) of the same held-out phantoms
    ref = evaluate_task(load_checkpoint(segmenter_dir, "segment"), "segment",
                        held_out_phantoms("segment", 4), n_boot=100, device="cpu")
    assert m["mean_dice"]["value"] == pytest.approx(ref["mean_dice"])
    assert m["mean_dice"]["ci95"] == pytest.approx(list(ref["mean_dice_ci95"]))
    assert m["structures"]["la"]["hd95"]["value"] == pytest.approx(ref["structures"]["la"]["hd95"], nan_ok=True)
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == m["n_frames"] == ref["n_frames"]
    assert {"case", "frame", "lv_endo_dice", "la_hd95"} <= set(rows[0])
    assert not any("path" in k or "seed" in k for k in rows[0])
    assert_png(out / "dice_boxplot.png")
    assert "mean_dice" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["headline"]


def test_task_mismatch_is_a_clear_error(segmenter_dir, tmp_path, capsys):
    with pytest.raises(CheckpointError, match=r"task 'segment'.*--task is 'view'"):
        load_checkpoint(segmenter_dir, "view")
    assert cli(["--task", "ef", "--checkpoint", str(segmenter_dir), "--data", "phantom:2",
                "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "segment" in err and "'ef'" in err and str(segmenter_dir) in err
    assert not (tmp_path / "x" / "metrics.json").exists()


@pytest.fixture(scope="module")
def csv_root(tmp_path_factory):
    """A CSV dataset: two phantom clips (.npy, no spacing) with ED/ES masks and views, one broken file."""
    from EchoFMEngine.clinical.phantoms import make_study

    root = tmp_path_factory.mktemp("csvdata")
    lines = ["path,split,view,mask_path,mask_frames"]
    for i, view in enumerate(("A4C", "A2C")):
        st = make_study(view=view, n_frames=12, size=(64, 64), fps=12, heart_rate_bpm=60, seed=i)
        fr = [int(st.ed_frames[0]), int(st.es_frames[0])]
        np.save(root / f"clip{i}.npy", st.cine.frames)
        np.save(root / f"mask{i}.npy", st.masks[fr])
        lines.append(f"clip{i}.npy,test,{view},mask{i}.npy,{fr[0]};{fr[1]}")
    (root / "broken.npy").write_bytes(b"not an array")
    lines.append("broken.npy,test,A4C,,")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_dataset_with_an_unreadable_file_is_reported_and_skipped(segmenter_dir, csv_root, tmp_path):
    res = evaluate("segment", segmenter_dir, f"csv:{csv_root}", tmp_path / "out", n_boot=20, log=lambda *a: None)
    assert res["n_cases"] == 2
    assert [s["file"] for s in res["skipped"]] == ["broken.npy"] and res["skipped"][0]["reason"]
    assert res["metrics"]["unit"] == "px"          # .npy clips carry no spacing
    assert str(csv_root) not in (tmp_path / "out" / "metrics.json").read_text()


# ------------------------------------------------ pooled heads end to end
def _description(task, labels):
    return {"task": task, "labels": labels,
            "input": {"frames": FRAMES, "height": IMG, "width": IMG, "channels": 3, "value_range": [0.0, 1.0],
                      "layout": "[B, C, T, H, W]"},
            "preprocessing": {"sector_crop": True, "size": IMG, "frames_policy": "cycle"}, "trained_on": "phantom"}


@pytest.fixture(scope="module")
def task_checkpoints(tmp_path_factory):
    """Untrained tiny task models in the task-checkpoint format (the pipeline, not the accuracy, is tested)."""
    from EchoFMEngine.models.heads import EchoFMClassifier, EchoFMMultiView, EchoFMRegressor
    from EchoFMEngine.models.task_checkpoint import save_task_model

    root = tmp_path_factory.mktemp("tasks")
    torch.manual_seed(1)
    enc = lambda: build_echofm("tiny", img_size=IMG, num_frames=FRAMES)
    return {
        "view": save_task_model(EchoFMClassifier(enc(), 2), root / "view", _description("view", ["A2C", "A4C"])),
        "ef": save_task_model(EchoFMRegressor(enc(), target_mean=50.0, target_std=10.0), root / "ef",
                              _description("ef", ["ef_percent"])),
        "ar": save_task_model(EchoFMMultiView(enc()), root / "ar",
                              _description("ar", ["proxy_non_severe", "proxy_severe"])),
        "as_tmed": save_task_model(EchoFMClassifier(enc(), 2), root / "as_tmed",
                                   _description("as", ["no_as", "as"])),
    }


def read_rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_view_classifier_end_to_end(task_checkpoints, tmp_path):
    from EchoFMEngine.models.task_checkpoint import load_task_model

    res = evaluate("view", task_checkpoints["view"], "phantom:4", tmp_path, n_boot=50, device="cpu",
                   log=lambda *a: None)
    m = res["metrics"]
    assert res["class_names"] == ["A2C", "A4C"] and m["support"] == {"A2C": 2, "A4C": 2}
    rows = read_rows(tmp_path / "predictions.csv")
    cases = held_out_phantoms("view", 4, ["A2C", "A4C"])
    with torch.no_grad():
        want = load_task_model(task_checkpoints["view"]).predict_proba(torch.stack([c["video"] for c in cases]))
    got = np.array([[float(r["p_A2C"]), float(r["p_A4C"])] for r in rows])
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    assert [r["true"] for r in rows] == [c["view"] for c in cases]
    assert m["accuracy"]["value"] == pytest.approx(np.mean([r["true"] == r["predicted"] for r in rows]))
    assert res["figures"] == ["confusion_matrix.png", "roc.png"]
    for name in res["figures"]:
        assert_png(tmp_path / name)


def test_ef_regressor_end_to_end(task_checkpoints, tmp_path):
    res = evaluate("ef", task_checkpoints["ef"], "phantom:4", tmp_path, n_boot=50, device="cpu", log=lambda *a: None)
    m = res["metrics"]
    rows = read_rows(tmp_path / "predictions.csv")
    truth = [c["ef"] for c in held_out_phantoms("ef", 4)]
    assert [float(r["true_ef"]) for r in rows] == pytest.approx(truth)
    diff = np.array([float(r["predicted_ef"]) - float(r["true_ef"]) for r in rows])
    assert m["mae"]["value"] == pytest.approx(np.abs(diff).mean()) and m["bias"]["value"] == pytest.approx(diff.mean())
    assert m["unit"] == "%" and {"r2", "rmse", "loa"} <= set(m)
    for name in ("bland_altman.png", "scatter.png"):
        assert_png(tmp_path / name)


def test_ar_multiview_reports_classes_and_severity(task_checkpoints, tmp_path):
    res = evaluate("ar", task_checkpoints["ar"], "phantom:3", tmp_path, n_boot=20, device="cpu", log=lambda *a: None)
    m = res["metrics"]
    assert set(m) == {"severe", "severity"} and m["severity"]["n"] == 3
    assert {"confusion_matrix.png", "roc.png", "severity_scatter.png"} == set(res["figures"])
    rows = read_rows(tmp_path / "predictions.csv")
    assert len(rows) == 3 and {"p_proxy_severe", "true_severity", "predicted_severity"} <= set(rows[0])
    assert all(0.0 <= float(r["predicted_severity"]) <= 4.0 for r in rows)


def test_phantom_proxy_labels_need_a_proxy_checkpoint(task_checkpoints, tmp_path):
    with pytest.raises(ValueError, match="proxy labels"):
        evaluate("as", task_checkpoints["as_tmed"], "phantom:2", tmp_path, n_boot=0, log=lambda *a: None)


def test_dataset_labels_are_matched_to_the_checkpoint_classes_by_name(task_checkpoints, csv_root, tmp_path):
    # the CSV lists its classes in the other order: labels are re-indexed by name, not taken as indices
    res = evaluate("view", task_checkpoints["view"], f"csv:{csv_root}", tmp_path / "a", n_boot=0,
                   data_options={"classes": {"view": ["A4C", "A2C"]}}, log=lambda *a: None)
    assert [r["true"] for r in read_rows(tmp_path / "a" / "predictions.csv")] == ["A4C", "A2C"]
    assert res["metrics"]["support"] == {"A2C": 1, "A4C": 1}
    with pytest.raises(ValueError, match="PLAX"):
        evaluate("view", task_checkpoints["view"], f"csv:{csv_root}", tmp_path / "b", n_boot=0,
                 data_options={"classes": {"view": ["A2C", "A4C", "PLAX"]}}, log=lambda *a: None)
