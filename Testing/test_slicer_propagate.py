"""Propagate (issue 12) on a real slicer-core scene: one edited frame becomes masks on every frame."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (PyPI) provides the MRML classes")

from slicer_support import grow_into_myocardium, logic, node_count, phantom, study_file  # noqa: E402,F401

from EchoFMSlicer.EchoFMSlicerLib import propagation, segmentation_nodes as sn  # noqa: E402


def _item_labels(seq, i, reference):
    return sn.segmentation_to_labels(seq.GetNthDataNode(i), reference)


def test_edit_one_frame_propagate_measure_undo(logic, study_file):
    study, path = study_file
    nodes = logic.load_cine(path)
    ed, es = int(study.ed_frames[0]), int(study.es_frames[0])
    ed_seg, es_seg = logic.ed_es_segmentations(nodes.browser, study.masks, ed, es)

    first = logic.propagate(nodes.browser, [ed_seg])
    from EchoFMEngine.clinical.measure import cardiac_measurements

    ef_before = first.measurements["ef_percent"]
    truth = cardiac_measurements(study.masks, study.cine.spacing_mm, first.measurements["ed_frames"],
                                 first.measurements["es_frames"])
    assert abs(ef_before - truth["ef_percent"]) <= 6.0          # the phantom's masks, same ED/ES (issue: 6)
    area = (first.labels == 1).sum(axis=(1, 2))
    assert np.corrcoef(area, (study.masks == 1).sum(axis=(1, 2)))[0, 1] >= 0.95
    # disc volumes of a 72x80 px cavity are noisier than its area
    assert np.corrcoef(first.measurements["lv_volume"], truth["lv_volume"])[0, 1] >= 0.9
    logic.undo_propagation(nodes.browser)

    # the user corrects the ED frame: cavity grows into the apical myocardium
    edited = study.masks[ed].copy()
    edited[grow_into_myocardium(edited, rows=2)] = 1
    sn.set_segment_mask(ed_seg, "LV_endo", edited == 1, reference=nodes.proxy)
    sn.set_segment_mask(ed_seg, "LV_epi", np.isin(edited, (1, 2)), reference=nodes.proxy)
    user_before = logic.labels(ed_seg, nodes.browser).copy()
    count = node_count(logic.scene)
    seen = []
    res = logic.propagate(nodes.browser, [ed_seg], progress=lambda f, msg: seen.append(f))
    assert seen and seen[-1] == pytest.approx(1.0)
    seq = res.sequence
    assert seq.GetNumberOfDataNodes() == study.cine.num_frames
    assert seq.GetAttribute(sn.SOURCE_ATTR) == "propagated"
    sources = propagation.frame_sources(seq)
    assert sources[ed] == "corrected" and sources.count("corrected") == 1
    assert np.array_equal(_item_labels(seq, ed, nodes.proxy), user_before)   # the edited frame is unchanged
    assert np.array_equal(logic.labels(ed_seg, nodes.browser), user_before)  # the user's node is not touched
    changed = [t for t in range(study.cine.num_frames)
               if not np.array_equal(_item_labels(seq, t, nodes.proxy), user_before)]
    assert len(changed) >= study.cine.num_frames - 3                        # the others follow the heart
    truth_es = study.masks[es] == 1
    got_es = _item_labels(seq, es, nodes.proxy) == 1
    assert 2 * (got_es & truth_es).sum() / (got_es.sum() + truth_es.sum()) >= 0.85
    m = res.measurements
    assert len(m["lv_volume"]) == study.cine.num_frames and m["ef_percent"] != pytest.approx(ef_before)
    assert m["edv"] > first.measurements["edv"]                             # the bigger ED cavity counts
    assert node_count(logic.scene) > count

    assert logic.undo_propagation(nodes.browser) is True                    # undo: scene as before
    assert node_count(logic.scene) == count
    assert seq.GetScene() is None
    assert logic.undo_propagation(nodes.browser) is False


def test_bad_input_leaves_the_scene_unchanged(logic, study_file):
    study, path = study_file
    nodes = logic.load_cine(path)
    ed, es = int(study.ed_frames[0]), int(study.es_frames[0])
    empty_ed, _ = logic.create_empty_masks(nodes.browser, ed, es)
    count = node_count(logic.scene)
    with pytest.raises(ValueError, match="empty"):
        logic.propagate(nodes.browser, [empty_ed])
    with pytest.raises(ValueError, match="no drawn or corrected segmentation"):
        logic.propagate(nodes.browser, [])
    assert node_count(logic.scene) == count
    from EchoFMEngine.clinical.propagate import PropagationCancelled

    ed_seg, _ = logic.ed_es_segmentations(nodes.browser, study.masks, ed, es)
    count = node_count(logic.scene)
    with pytest.raises(PropagationCancelled):
        logic.propagate(nodes.browser, [ed_seg], cancel=lambda: True)
    assert node_count(logic.scene) == count


def test_propagated_export_marks_each_frame_and_can_leave_propagated_out(logic, study_file, tmp_path):
    import csv

    from EchoFMEngine.data import build_dataset
    from EchoFMSlicer.EchoFMSlicerLib import export

    study, path = study_file
    nodes = logic.load_cine(path)
    ed, es = int(study.ed_frames[0]), int(study.es_frames[0])
    ed_seg, _ = logic.ed_es_segmentations(nodes.browser, study.masks, ed, es)
    res = logic.propagate(nodes.browser, [ed_seg])
    cine = logic.cine(nodes.browser)
    out = tmp_path / "train"
    csv_path = export.export_propagated_study(out, cine, res.labels, res.frame_sources, view="A4C", ed_frame=ed)
    row = next(csv.DictReader(open(csv_path)))
    sources = row["mask_sources"].split(";")
    assert len(sources) == cine.num_frames and sources[ed] == "corrected" and sources.count("propagated") == 23
    ds = build_dataset("csv", out, split="train", frames=8, size=32)
    item = ds[0]
    assert item["masks"].shape[-2:] == (32, 32) and bool(np.asarray(item["mask_valid"]).all())
    only = tmp_path / "corrected_only"
    csv2 = export.export_propagated_study(only, cine, res.labels, res.frame_sources, propagated="exclude")
    row2 = next(csv.DictReader(open(csv2)))
    assert row2["mask_frames"] == str(ed) and row2["mask_sources"] == "corrected"
    with pytest.raises(ValueError, match="frame sources"):
        export.export_propagated_study(tmp_path / "bad", cine, res.labels, res.frame_sources[:3])
