"""Corrections -> training folder the fine-tuning dataset reads, reports, and analysis results -> nodes."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from slicer_support import grow_into_myocardium, node_count, phantom, write_phantom_dicom

pytest.importorskip("slicer", reason="PyPI slicer-core is needed for the Slicer library tests")

from EchoFMSlicer.EchoFMSlicerLib import (apply_analysis_result, ed_es_segmentations,  # noqa: E402
                                          export_training_folder, load_cine_file, measure_from_segmentations,
                                          new_scene, nodes_to_cine,
                                          segment_mask, segmentation_to_labels, sequence_frames, set_segment_mask,
                                          table_rows)

IDENTIFIERS = [b"DOE", b"JOHN", b"19700101", b"PHANTOM^", b"PHANTOM-"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    scene, logics = new_scene()
    study = phantom(n_frames=40)
    d = tmp_path_factory.mktemp("in")
    path = write_phantom_dicom(study, d / "DOE^JOHN_19700101.dcm")  # identifiers in the name and the header
    cn = load_cine_file(scene, path, logics)
    ed, es = int(study.ed_frames[0]), int(study.es_frames[0])
    ed_node, es_node = ed_es_segmentations(scene, cn, study.masks, ed, es, logics)
    stroke = grow_into_myocardium(study.masks[ed])
    set_segment_mask(ed_node, "LV_endo", segment_mask(ed_node, "LV_endo") | stroke)  # a correction
    corrected = study.masks[ed].copy()
    corrected[stroke] = 1
    return scene, logics, study, cn, ed, es, ed_node, es_node, corrected


def test_export_loads_in_the_finetuning_dataset(env, tmp_path):
    from EchoFMEngine.data import build_dataset

    scene, logics, study, cn, ed, es, ed_node, es_node, corrected = env
    cine = nodes_to_cine(cn.browser)
    m = measure_from_segmentations(ed_node, es_node, cn.proxy, cine.spacing_mm)
    ed_lab, es_lab = segmentation_to_labels(ed_node, cn.proxy), segmentation_to_labels(es_node, cn.proxy)
    np.testing.assert_array_equal(ed_lab, corrected)
    sources = {p: m["masks"][p]["source"] for p in ("ED", "ES")}
    assert sources == {"ED": "corrected", "ES": "AI"}
    out = tmp_path / "export"
    csv_path = export_training_folder(out, cine, ed_lab, es_lab, ed, es, view="A4C", source=sources, measurements=m)
    assert csv_path == out / "dataset.csv"

    ds = build_dataset("csv", out, split="train", frames=16, size=32, classes={"view": ["A2C", "A4C"]})
    assert len(ds) == 1
    sample = ds.samples[0]
    masks = ds._masks(sample, cine.num_frames, cine.shape[1:])  # what training reads, at the source frames
    assert sorted(masks) == sorted([ed, es])
    np.testing.assert_array_equal(masks[ed], corrected)          # the corrected ED mask, not the AI one
    np.testing.assert_array_equal(masks[es], study.masks[es])
    assert not np.array_equal(masks[ed], study.masks[ed])
    item = ds[0]
    assert tuple(item["video"].shape) == (3, 16, 32, 32) and item["label"] == 1
    labelled = set(item["meta"]["frames"][item["mask_valid"]].tolist())
    assert labelled and labelled <= {ed, es}

    # the report says which mask is whose; numbers are the measured ones; no patient identifiers anywhere
    rep_dir = out / "studies" / sample["rel"].split("/")[1]
    report = json.loads((rep_dir / "report.json").read_text())
    assert report["masks"]["ED"]["source"] == "corrected" and report["masks"]["ES"]["source"] == "AI"
    assert report["masks"]["ED"]["frame"] == ed and report["masks"]["ES"]["frame"] == es
    assert report["measurements"]["edv"] == pytest.approx(m["edv"])
    with open(rep_dir / "report.csv", newline="") as fh:
        rows = {r["measurement"]: r for r in csv.DictReader(fh)}
    assert float(rows["EF"]["value"]) == pytest.approx(m["ef_percent"], rel=1e-5)
    assert rows["EDV"]["ed_mask_source"] == "corrected" and rows["EDV"]["es_mask_source"] == "AI"
    with open(csv_path, newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert (row["ed_source"], row["es_source"], row["mask_frames"]) == ("corrected", "AI", f"{ed};{es}")
    for f in out.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            found = [s for s in IDENTIFIERS if s in data or s in str(f.relative_to(out)).encode()]
            assert not found, f"{f.name} holds {found}"


def test_export_replaces_a_study_and_adds_others(env, tmp_path):
    from EchoFMEngine.data import build_dataset

    scene, logics, study, cn, ed, es, *_ = env
    cine = nodes_to_cine(cn)
    out = tmp_path / "export"
    export_training_folder(out, cine, study.masks[ed], study.masks[es], ed, es, source="AI")
    export_training_folder(out, cine, study.masks[ed], study.masks[es], ed, es, source="corrected")  # again
    other = phantom(n_frames=40, seed=5)
    oed, oes = int(other.ed_frames[0]), int(other.es_frames[0])
    export_training_folder(out, other.cine, other.masks[oed], other.masks[oes], oed, oes, split="val")
    with open(out / "dataset.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and rows[0]["ed_source"] == "corrected" and rows[1]["split"] == "val"
    assert len(build_dataset("csv", out, split="train", frames=8, size=32)) == 1
    assert len(build_dataset("csv", out, split="val", frames=8, size=32)) == 1


def test_bad_export_writes_nothing(env, tmp_path):
    scene, logics, study, cn, ed, es, *_ = env
    cine = nodes_to_cine(cn)
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match="ES mask of size"):
        export_training_folder(out, cine, study.masks[ed], study.masks[es][:-1], ed, es)
    with pytest.raises(ValueError, match="same frame"):
        export_training_folder(out, cine, study.masks[ed], study.masks[es], ed, ed)
    with pytest.raises(ValueError, match="outside the labels"):
        export_training_folder(out, cine, study.masks[ed] * 4, study.masks[es], ed, es)
    with pytest.raises(ValueError, match="source of ED"):
        export_training_folder(out, cine, study.masks[ed], study.masks[es], ed, es, source="model")
    assert not out.exists()


# ----------------------------------------------------------------------------- analysis results
def _sparse(study, frames):
    lab = np.zeros_like(study.masks)
    lab[frames] = study.masks[frames]
    return lab


def test_analysis_result_folder_from_the_engine(env, tmp_path):
    """`analyze` (with the user's masks, no models) + its writer -> nodes, exactly the engine's masks."""
    from EchoFMEngine.analysis.outputs import write_study
    from EchoFMEngine.analysis.pipeline import analyze

    scene, logics, study, cn, ed, es, *_ = env
    frames = sorted({*study.ed_frames.tolist(), *study.es_frames.tolist()})
    labels = _sparse(study, frames)
    result = analyze(nodes_to_cine(cn), models={}, masks=labels, device="cpu")
    folder = write_study(result, tmp_path, "study", cine=study.cine, summary=False)
    out = apply_analysis_result(scene, cn, folder, logics)

    seq = out["segmentation_sequence"]
    assert sequence_frames(seq) == frames
    ed_node, es_node = out["ed_segmentation"], out["es_segmentation"]
    phase = out["phase"]
    assert int(ed_node.GetAttribute("EchoFM.frame")) in phase["ed_frames"]
    for node in (ed_node, es_node):
        f = int(node.GetAttribute("EchoFM.frame"))
        np.testing.assert_array_equal(segmentation_to_labels(node, cn.proxy), study.masks[f])
    rows = table_rows(out["measurements_table"])
    assert rows["EDV"][0] == pytest.approx(result.measurements["edv"])
    assert rows["EF"][0] == pytest.approx(result.measurements["ef_percent"])
    assert out["volume_plot"] is not None
    assert "view" in out["needs"]  # no view model: said, not guessed
    assert out["view"] is None


def test_bad_result_folder_leaves_the_scene_unchanged(env, tmp_path):
    import SimpleITK as sitk

    scene, logics, study, cn, ed, es, *_ = env
    n0 = node_count(scene)
    T, H, W = study.masks.shape
    folder = tmp_path / "r"
    folder.mkdir()
    with pytest.raises(ValueError, match="no result.json"):
        apply_analysis_result(scene, cn, folder, logics)
    result = {"input": "x", "study_id": "r", "cine": {"frames": T, "height": H, "width": W},
              "phase": {"ed_frames": [ed], "es_frames": [es]},
              "segmentation": {"file": "masks.nrrd", "frames": [ed, es]}, "measurements": None}
    (folder / "result.json").write_text(json.dumps(result))
    sitk.WriteImage(sitk.GetImageFromArray(_sparse(study, [ed, es])[:, :, :-1]), str(folder / "masks.nrrd"))
    with pytest.raises(ValueError, match="do not match the cine"):
        apply_analysis_result(scene, cn, folder, logics)
    result["cine"]["frames"] = T + 1
    (folder / "result.json").write_text(json.dumps(result))
    with pytest.raises(ValueError, match="pick the cine that was analysed"):
        apply_analysis_result(scene, cn, folder, logics)
    result["cine"]["frames"] = T  # right cine and masks, but a label the model cannot give
    (folder / "result.json").write_text(json.dumps(result))
    bad = _sparse(study, [ed, es])
    bad[es, 0, 0] = 9
    sitk.WriteImage(sitk.GetImageFromArray(bad), str(folder / "masks.nrrd"))
    with pytest.raises(ValueError, match="unexpected label"):
        apply_analysis_result(scene, cn, folder, logics)
    assert node_count(scene) == n0
