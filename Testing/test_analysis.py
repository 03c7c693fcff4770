"""The clinical analysis pipeline: what it computes without weights, with the user's masks, with
(in-memory) models, and what it writes; plus the models folder."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from EchoFMEngine.analysis import analyze, analyze_paths
from EchoFMEngine.analysis.outputs import read_masks_nrrd
from EchoFMEngine.models import build_echofm
from EchoFMEngine.models.checkpoint import CheckpointError
from EchoFMEngine.models.heads import EchoFMSegmenter
from EchoFMEngine.models.registry import ModelStore, sha256_of
from EchoFMEngine.clinical.phantoms import make_study, write_dicom
from EchoFMEngine.models.task_checkpoint import save_task_model
from EchoFMEngine.training.finetune import model_description

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    return make_study("A4C", n_frames=48, size=(96, 112), fps=30.0, heart_rate_bpm=75, ef=55, seed=3)


@pytest.fixture(scope="module")
def dicom_folder(tmp_path_factory, study):
    folder = tmp_path_factory.mktemp("studies")
    write_dicom(study, folder / "a4c.dcm")
    (folder / "broken.dcm").write_bytes(b"DICM" + b"\0" * 64)
    return folder


@pytest.fixture(scope="module")
def empty_models(tmp_path_factory):
    return tmp_path_factory.mktemp("no_models")


def save_segmenter(model: EchoFMSegmenter, folder):
    """``model`` written as a task checkpoint (the one format segmenters are saved in)."""
    return save_task_model(model, folder, model_description(model, "segment", model.description["labels"], "test"))


def tiny_segmenter() -> EchoFMSegmenter:
    torch.manual_seed(0)
    m = EchoFMSegmenter(build_echofm("tiny"))
    m.description = {"task": "segment", "labels": ["background", "lv_cavity", "lv_myocardium", "la"],
                     "input": {"frames": 16, "height": 64, "width": 64}}
    return m.eval()


def test_without_weights_it_finds_ed_es_from_the_ecg_and_names_what_is_missing(study, empty_models):
    res = analyze(study.cine, models=empty_models)
    assert res.phase["method"] == "ecg"
    truth = list(study.ed_frames)
    assert len(res.phase["ed_frames"]) == len(truth)
    assert max(abs(a - b) for a, b in zip(res.phase["ed_frames"], truth)) <= 1
    assert res.view is None and res.measurements is None and res.segmentation is None
    assert {"view", "segment", "as", "ef", "ar", "measurements"} <= set(res.needs)
    assert "models import" in res.needs["view"]
    assert res.scores == {"as": None, "ar": None, "ef_regression": None}


def test_user_masks_give_volumes_and_ef_close_to_the_phantom_truth(study, empty_models):
    res = analyze(study.cine, models=empty_models, masks=study.masks)
    m = res.measurements
    assert m["unit"] == "ml"
    assert res.segmentation["source"] == "user"
    assert m["edv"] == pytest.approx(study.edv_ml, rel=0.03)
    assert m["esv"] == pytest.approx(study.esv_ml, rel=0.05)
    assert abs(m["ef_percent"] - study.ef) < 2.0
    assert "measurements" not in res.needs


def test_masks_that_do_not_match_the_frames_are_refused(study, empty_models):
    with pytest.raises(ValueError, match=r"masks have shape \(48, 90, 112\)"):
        analyze(study.cine, models=empty_models, masks=study.masks[:, :90])
    bad = study.masks.copy()
    bad[0, 0, 0] = 7
    with pytest.raises(ValueError, match="labels must lie in 0-3"):
        analyze(study.cine, models=empty_models, masks=bad)


def test_a_single_frame_and_unknown_spacing_are_flagged_not_guessed(study, empty_models):
    from EchoFMEngine import Cine

    still = Cine(study.cine.frames[:1], fps=30.0)
    res = analyze(still, models=empty_models)
    names = [f["name"] for f in res.flags]          # flags are {"name", "reason"} (issue 15)
    assert "single_frame" in names and "unknown_spacing" in names
    assert res.phase is None and res.measurements is None and "phase" in res.needs


def test_a_non_ultrasound_dicom_is_flagged(tmp_path, study, empty_models):
    path = write_dicom(study, tmp_path / "ct.dcm")
    ds = pydicom.dcmread(path)
    ds.Modality = "CT"
    ds.save_as(path)
    res = analyze(path, models=empty_models)
    assert {"name": "not_echo", "reason": "DICOM modality CT, not ultrasound"} in res.flags


def test_a_segmenter_gives_masks_in_the_original_geometry_at_ed_and_es(study):
    res = analyze(study.cine, models={"segment": tiny_segmenter()})
    assert res.masks.shape == study.cine.shape and res.masks.dtype == np.uint8
    wanted = set(res.phase["ed_frames"]) | set(res.phase["es_frames"])
    assert set(np.flatnonzero(res.masks.reshape(len(res.masks), -1).any(1))) <= wanted
    assert res.segmentation["source"] == "model"
    assert "segment" not in res.needs and "view" in res.needs


def test_max_cycles_limits_the_model_work_to_the_first_cycles(study):
    res = analyze(study.cine, models={"segment": tiny_segmenter()}, max_cycles=1)
    (a, b), = res.phase["analysed_cycles"]
    assert (a, b) == tuple(res.phase["ed_frames"][:2])
    assert res.segmentation["frames"] and all(a <= f <= b for f in res.segmentation["frames"])


def test_batch_writes_results_continues_past_a_bad_file_and_keeps_identifiers_out(tmp_path, dicom_folder,
                                                                                  empty_models):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "EchoFMEngine", "analyze", str(dicom_folder), "--out", str(out),
           "--models", str(empty_models)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 1, proc.stderr        # 1: some studies failed (docs/analysis.md)
    assert "PROGRESS 2/2" in proc.stdout and "broken.dcm" in proc.stdout
    rows = list(csv.DictReader(open(out / "results.csv")))
    sid = rows[0]["study_id"]                       # derived id (counter + content hash), no file name
    assert len(rows) == 1 and "a4c" not in sid
    result = json.loads((out / sid / "result.json").read_text())
    assert result["phase"]["method"] == "ecg" and result["input"] == sid
    assert (out / sid / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    failed = list(csv.DictReader(open(out / "failed.csv")))
    assert failed[0]["input"] == "broken.dcm" and failed[0]["reason"]
    text = "".join(p.read_text(errors="ignore") for p in out.rglob("*") if p.suffix in (".json", ".csv"))
    assert "PHANTOM" not in text and str(dicom_folder) not in text + proc.stdout


def test_masks_nrrd_round_trip(tmp_path, study):
    from EchoFMEngine.analysis.outputs import write_study

    res = analyze(study.cine, models={}, masks=study.masks)
    folder = write_study(res, tmp_path, "s1", cine=study.cine, summary=False)
    back = read_masks_nrrd(folder / "masks.nrrd")
    assert np.array_equal(back, study.masks.astype(np.uint8))
    assert json.loads((folder / "result.json").read_text())["segmentation"]["file"] == "masks.nrrd"


# ---------------------------------------------------------------------- models folder
def test_models_folder_imports_verifies_and_refuses_the_wrong_task(tmp_path, monkeypatch):
    ckpt = save_segmenter(tiny_segmenter(), tmp_path / "seg")
    monkeypatch.setenv("ECHOFM_MODELS", str(tmp_path / "models"))
    store = ModelStore()
    assert store.folder == tmp_path / "models" and store.get("segment") is None
    with pytest.raises(CheckpointError, match="cannot be imported as task 'view'"):
        store.import_file(ckpt, task="view")
    entry = store.import_file(ckpt, task="segment")
    path = ModelStore().get("segment")
    assert sha256_of(path) == entry["sha256"] and entry["labels"]
    assert set(ModelStore().missing()) == {"view", "as", "ar", "ef"}
    with open(path, "r+b") as f:   # corrupt one byte in the tensor data
        f.seek(-1, 2)
        b = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        ModelStore().get("segment")


def test_models_cli_import_and_list(tmp_path, capsys):
    from EchoFMEngine.cli import main

    ckpt = save_segmenter(tiny_segmenter(), tmp_path / "seg")
    base = ["models", "--folder", str(tmp_path / "m")]
    assert main(base + ["import", str(ckpt), "--task", "segment"]) == 0
    assert main(base + ["list"]) == 0
    out = capsys.readouterr().out
    assert "imported segment" in out and "segment  segment-" in out and "view     (none)" in out
    assert main(base + ["import", str(tmp_path / "nothing.safetensors")]) == 1
    assert "no weights file" in capsys.readouterr().err


def test_an_ecg_only_dicom_is_reported_as_not_an_image(tmp_path, empty_models):
    from pydicom.data import get_testdata_file

    from EchoFMEngine import CineReadError

    ecg = get_testdata_file("waveform_ecg.dcm")
    with pytest.raises(CineReadError, match="ECG/waveform-only"):
        analyze(ecg, models=empty_models)
    report = analyze_paths([ecg], tmp_path / "out", models=empty_models, progress=False)
    assert report["done"] == [] and "ECG/waveform-only" in report["failed"][0][1]
