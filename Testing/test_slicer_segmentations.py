"""Engine masks as Slicer segmentations: sequences, ED/ES nodes, files read back with slicerio, corrections."""
from __future__ import annotations

import numpy as np
import pytest

from slicer_support import grow_into_myocardium, node_count, phantom, segment_from_slicerio

pytest.importorskip("slicer", reason="PyPI slicer-core is needed for the Slicer library tests")

from EchoFMSlicer.EchoFMSlicerLib import (SEGMENTS, ai_copy, cine_to_nodes, configure_segment_editor,  # noqa: E402
                                          ed_es_segmentations, go_to_frame, labels_to_segmentation,
                                          mask_provenance, masks_to_segmentation_sequence,
                                          measure_from_segmentations, new_scene, read_segmentation_sequence_mrb,
                                          save_segmentation, save_segmentation_sequence, segment_mask,
                                          segmentation_to_labels, sequence_frames, set_segment_mask)
from EchoFMSlicer.EchoFMSlicerLib.segmentation_nodes import _geometry, _oriented  # noqa: E402

EXPECTED_TYPES = {"LV_endo": "87878005", "LV_epi": "74281007", "LA": "82471001"}


@pytest.fixture(scope="module")
def env():
    scene, logics = new_scene()
    study = phantom(n_frames=40)
    cn = cine_to_nodes(scene, study.cine, "phantom", logics)
    ed, es = int(study.ed_frames[0]), int(study.es_frames[0])
    assert ed != es
    return scene, logics, study, cn, ed, es


def proxy_labels(cn, seq, frame, logics):
    go_to_frame(cn, frame, logics)
    proxy = cn.browser.GetProxyNode(seq)
    if proxy.GetSegmentation().GetNumberOfSegments() == 0:
        return None
    return segmentation_to_labels(proxy, cn.proxy)


def test_sparse_segmentation_sequence(env):
    scene, logics, study, cn, ed, es = env
    seq = masks_to_segmentation_sequence(scene, cn, study.masks, [ed, es], logics)
    assert seq.GetNumberOfDataNodes() == 2 and sequence_frames(seq) == [ed, es]
    assert [seq.GetNthIndexValue(i) for i in range(2)] == [cn.sequence.GetNthIndexValue(f) for f in (ed, es)]
    assert cn.browser.IsSynchronizedSequenceNode(seq)
    np.testing.assert_array_equal(proxy_labels(cn, seq, ed, logics), study.masks[ed])
    np.testing.assert_array_equal(proxy_labels(cn, seq, es, logics), study.masks[es])
    other = next(f for f in range(cn.num_frames) if f not in (ed, es))
    assert proxy_labels(cn, seq, other, logics) is None  # no mask shown where there is none


def test_every_frame_segmentation_sequence(env):
    scene, logics, study, cn, ed, es = env
    frames = list(range(cn.num_frames))
    seq = masks_to_segmentation_sequence(scene, cn, study.masks, frames, logics, name="all frames")
    assert seq.GetNumberOfDataNodes() == cn.num_frames
    for f in (0, 7, ed, es, cn.num_frames - 1):
        np.testing.assert_array_equal(proxy_labels(cn, seq, f, logics), study.masks[f])


def test_ed_es_nodes_terminology_and_files(env, tmp_path):
    import slicerio

    scene, logics, study, cn, ed, es = env
    ed_node, es_node = ed_es_segmentations(scene, cn, study.masks, ed, es, logics)
    for node, f, phase in ((ed_node, ed, "ED"), (es_node, es, "ES")):
        ai = ai_copy(node)
        assert ai is not None and ai is not node
        assert ai.GetDisplayNode().GetVisibility() == 0 and node.GetDisplayNode().GetVisibility() == 1
        assert (node.GetAttribute("EchoFM.maskSource"), ai.GetAttribute("EchoFM.maskSource")) == ("corrected", "AI")
        assert mask_provenance(node) == {"phase": phase, "frame": f, "source": "AI",
                                         "changed_pixels": {"LV_endo": 0, "LV_epi": 0, "LA": 0}}
        np.testing.assert_array_equal(segmentation_to_labels(node, cn.proxy), study.masks[f])
        np.testing.assert_array_equal(segment_mask(node, "LV_epi"), np.isin(study.masks[f], (1, 2)))

        path = save_segmentation(node, tmp_path / f"{phase}.seg.nrrd")
        seg = slicerio.read_segmentation(str(path))
        assert [s["name"] for s in seg["segments"]] == ["LV_endo", "LV_epi", "LA"]
        for s in seg["segments"]:
            spec = SEGMENTS[s["name"]]
            assert s["terminology"]["type"][:2] == ["SCT", EXPECTED_TYPES[s["name"]]]
            assert s["terminology"]["category"] == ["SCT", "123037004", "Anatomical Structure"]
            np.testing.assert_allclose(s["color"], spec.color, atol=1e-4)
            truth = np.isin(study.masks[f], spec.labels)
            np.testing.assert_array_equal(segment_from_slicerio(seg, s["name"]), truth)
        # the voxel grid is the frame's: +column along LPS x, +row along LPS y, anisotropic spacing kept
        row_mm, col_mm = study.cine.spacing_mm
        np.testing.assert_allclose(seg["ijkToLPS"][:3, :3], np.diag([col_mm, row_mm, 1.0]), atol=1e-9)


def test_segmentation_sequence_bundle_reads_back(env, tmp_path):
    scene, logics, study, cn, ed, es = env
    seq = masks_to_segmentation_sequence(scene, cn, study.masks, [es, ed], logics, name="bundle")
    path = save_segmentation_sequence(seq, tmp_path / "masks.seq.mrb")
    items = read_segmentation_sequence_mrb(path)
    assert [v for v, _ in items] == [cn.sequence.GetNthIndexValue(f) for f in sorted((ed, es))]
    for (_, seg), f in zip(items, sorted((ed, es))):
        for name, spec in SEGMENTS.items():
            np.testing.assert_array_equal(segment_from_slicerio(seg, name), np.isin(study.masks[f], spec.labels))


def test_correction_in_the_segment_editor_changes_edv_and_ef_as_the_engine_says(env):
    import slicer

    from EchoFMEngine.clinical.measure import cardiac_measurements

    scene, logics, study, cn, ed, es = env
    ed_node, es_node = ed_es_segmentations(scene, cn, study.masks, ed, es, logics)
    sp = study.cine.spacing_mm
    before = measure_from_segmentations(ed_node, es_node, cn.proxy, sp)
    truth0 = cardiac_measurements(study.masks[[ed, es]], sp, [0], [1])
    assert before["edv"] == pytest.approx(truth0["edv"], rel=1e-12)
    assert before["ef_percent"] == pytest.approx(truth0["ef_percent"], rel=1e-12)

    # the clinician paints LV_endo over the apical wall, in Slicer's Segment Editor logic
    editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    configure_segment_editor(editor_node)
    editor = slicer.vtkSlicerSegmentEditorLogic()
    editor.SetMRMLScene(scene)
    editor.SetMRMLApplicationLogic(logics.app)
    editor.SetSegmentEditorNode(editor_node)
    editor.SetSegmentationNode(ed_node)
    editor.SetSourceVolumeNode(cn.proxy)
    editor.SetCurrentSegmentID("LV_endo")
    stroke = grow_into_myocardium(study.masks[ed], rows=3)
    editor.SaveStateForUndo()
    editor.ModifySegmentByLabelmap(ed_node, "LV_endo", _oriented(stroke, _geometry(cn.proxy)),
                                   editor.ModificationModeAdd, False, True)

    edited = study.masks[ed].copy()
    edited[stroke] = 1  # the same stroke on the engine's label map
    np.testing.assert_array_equal(segmentation_to_labels(ed_node, cn.proxy), edited)
    np.testing.assert_array_equal(segmentation_to_labels(ai_copy(ed_node), cn.proxy), study.masks[ed])

    after = measure_from_segmentations(ed_node, es_node, cn.proxy, sp)
    truth = cardiac_measurements(np.stack([edited, study.masks[es]]), sp, [0], [1])
    assert after["edv"] == pytest.approx(truth["edv"], rel=1e-12)
    assert after["esv"] == pytest.approx(truth["esv"], rel=1e-12)
    assert after["ef_percent"] == pytest.approx(truth["ef_percent"], rel=1e-12)
    assert after["edv"] > before["edv"] + 0.5 and after["ef_percent"] > before["ef_percent"]
    assert after["masks"]["ED"]["source"] == "corrected" and after["masks"]["ES"]["source"] == "AI"
    assert after["masks"]["ED"]["changed_pixels"] == {"LV_endo": int(stroke.sum()), "LV_epi": 0, "LA": 0}

    editor.Undo()  # the editor's undo restores the AI mask and the AI numbers
    assert measure_from_segmentations(ed_node, es_node, cn.proxy, sp)["edv"] == pytest.approx(before["edv"])


def test_measurement_caveats_are_said_not_hidden(env):
    from EchoFMEngine.clinical.measure import cardiac_measurements

    scene, logics, study, cn, ed, es = env
    ed_node, es_node = ed_es_segmentations(scene, cn, study.masks, ed, es, logics)
    px = measure_from_segmentations(ed_node, es_node, cn.proxy, None)  # spacing unknown: px^3, never ml
    truth = cardiac_measurements(study.masks[[ed, es]], None, [0], [1])
    assert px["unit"] == "px^3" and px["edv"] == pytest.approx(truth["edv"], rel=1e-12)
    set_segment_mask(es_node, "LV_endo", np.zeros(study.masks.shape[1:], bool))  # ES cavity erased
    m = measure_from_segmentations(ed_node, es_node, cn.proxy, study.cine.spacing_mm)
    assert m["esv"] is None and m["ef_percent"] is None and m["edv"] is not None
    assert f"ES frame(s) [{es}] have no LV mask: not measured" in m["notes"]


def test_bad_masks_leave_the_scene_unchanged(env):
    scene, logics, study, cn, ed, es = env
    n0 = node_count(scene)
    T, H, W = study.masks.shape
    with pytest.raises(ValueError, match=r"does not match the frames"):
        masks_to_segmentation_sequence(scene, cn, np.zeros((T, H + 1, W), np.uint8), [ed, es], logics)
    with pytest.raises(ValueError, match=r"does not match the frames"):
        masks_to_segmentation_sequence(scene, cn, np.zeros((T, W, H), np.uint8), [ed], logics)  # transposed
    with pytest.raises(ValueError, match="expected 40 frames"):
        masks_to_segmentation_sequence(scene, cn, study.masks[:7], [ed, es], logics)
    with pytest.raises(ValueError, match="outside the cine"):
        masks_to_segmentation_sequence(scene, cn, study.masks, [ed, T], logics)
    bad = study.masks.copy()
    bad[es, 0, 0] = 7
    with pytest.raises(ValueError, match="unexpected label"):
        masks_to_segmentation_sequence(scene, cn, bad, [ed, es], logics)
    with pytest.raises(ValueError, match="unexpected label"):
        ed_es_segmentations(scene, cn, bad, ed, es, logics)
    with pytest.raises(ValueError, match="do not match the cine"):
        ed_es_segmentations(scene, cn, study.masks[:, :, :-1], ed, es, logics)
    with pytest.raises(ValueError, match="does not match the frames"):
        labels_to_segmentation(scene, study.masks[ed, :-2], cn.proxy, "small")
    assert node_count(scene) == n0
