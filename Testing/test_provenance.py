"""Provenance in every output (issue 15): the model that made each output (task, checksum, training
data, phantoms yes/no, date), the ED/ES and segmentation methods; `models list` shows the same; a
phantom-trained model on a real cine is flagged; timings are measured around their own work."""
import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from EchoFMEngine.analysis import analyze, analyze_paths
from EchoFMEngine.models.provenance import model_provenance, trained_on_phantoms
from EchoFMEngine.cine import SourceInfo
from EchoFMEngine.models import build_echofm
from EchoFMEngine.models.heads import EchoFMSegmenter
from EchoFMEngine.models.registry import ModelStore
from EchoFMEngine.models.task_checkpoint import save_task_model
from EchoFMEngine.clinical.phantoms import make_study, write_dicom

REPO = Path(__file__).resolve().parents[1]
LABELS = ["background", "lv_cavity", "lv_myocardium", "la"]


def _segment_folder(tmp, trained_on):
    torch.manual_seed(0)
    model = EchoFMSegmenter(build_echofm("tiny", img_size=64, num_frames=16))
    desc = {"task": "segment", "labels": LABELS,
            "input": {"frames": 16, "height": 64, "width": 64, "channels": 3, "value_range": [0.0, 1.0],
                      "layout": "[B, C, T, H, W]"},
            "preprocessing": {"sector_crop": True, "size": 64, "frames_policy": "cycle"},
            "trained_on": trained_on, "created": "2026-11-30"}
    return save_task_model(model, tmp / "ckpt", desc)


@pytest.fixture(scope="module")
def phantom_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prov")
    store = ModelStore(tmp / "models")
    store.import_file(_segment_folder(tmp, "EchoFM phantoms (synthetic A4C/A2C, 200 studies)"), "segment")
    return store


@pytest.fixture(scope="module")
def study():
    return make_study("A4C", n_frames=40, size=(96, 112), fps=30.0, heart_rate_bpm=75, ef=55, seed=4)


def test_phantom_words_decide_trained_on_phantoms():
    assert trained_on_phantoms("phantom") is True and trained_on_phantoms("EchoNet-Dynamic train") is False
    assert trained_on_phantoms("unknown") is None and trained_on_phantoms(None) is None
    p = model_provenance("view", {"trained_on": "CAMUS", "created": "2026-01-02"}, {"sha256": "ab" * 32})
    assert p["trained_on_phantoms"] is False and p["sha256"] == "ab" * 32 and p["created"] == "2026-01-02"


def test_every_output_names_its_model_and_methods(phantom_store, study):
    res = analyze(study.cine, models=phantom_store.folder, device="cpu")
    prov = res.provenance
    seg = prov["models"]["segment"]
    assert seg["sha256"] == phantom_store.entries()["segment"]["sha256"]
    assert seg["trained_on_phantoms"] is True and seg["task"] == "segment" and seg["created"] == "2026-11-30"
    assert seg["imported_at"]
    assert prov["ed_es_method"]["method"] == res.phase["method"]
    assert prov["segmentation_method"]["source"] == "model" and prov["segmentation_method"]["sha256"] == seg["sha256"]
    # the phantom cine itself: no phantom-on-real flag
    assert "phantom_model_on_real_cine" not in {f["name"] for f in res.flags}


def test_a_phantom_model_on_a_real_cine_is_flagged_and_its_numbers_unreliable(phantom_store, study):
    real = dataclasses.replace(study.cine, source=SourceInfo(format="avi"))      # not marked as a phantom
    res = analyze(real, models=phantom_store.folder, device="cpu", view="A4C")
    names = {f["name"] for f in res.flags}
    assert "phantom_model_on_real_cine" in names
    if res.measurements is not None:
        assert res.measurements["reliable"]["ef_percent"] is False


def test_provenance_reaches_result_json_csv_and_models_list(tmp_path, phantom_store, study):
    (tmp_path / "in").mkdir()
    write_dicom(study, tmp_path / "in" / "a.dcm")
    analyze_paths([tmp_path / "in"], tmp_path / "out", models=phantom_store.folder, device="cpu", progress=False,
                  summary=False)
    sid = next(p for p in (tmp_path / "out").iterdir() if p.is_dir() and not p.name.startswith(".")).name
    d = json.loads((tmp_path / "out" / sid / "result.json").read_text())
    sha = phantom_store.entries()["segment"]["sha256"]
    assert d["provenance"]["models"]["segment"]["sha256"] == sha and d["input"] == sid
    row = next(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert row["models"].startswith(f"segment:{sha[:12]}") and "phantom-trained" in row["models"]
    proc = subprocess.run([sys.executable, "-m", "EchoFMEngine", "models", "list", "--folder",
                           str(phantom_store.folder)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sha in proc.stdout and "trained_on_phantoms=yes" in proc.stdout and "created=2026-11-30" in proc.stdout


def test_the_read_is_timed_around_the_read(tmp_path, study):
    path = write_dicom(study, tmp_path / "a.dcm")
    res = analyze(path, models=tmp_path / "none")
    t = res.timing_s
    assert t["read"] > 0.001 and t["total"] >= t["read"] + t["phase"] - 1e-3
    assert {"check_input", "load_models", "phase", "checks"} <= set(t)
