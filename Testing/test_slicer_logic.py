"""EchoFMLogic (EchoFMSlicerLib/logic.py), the panel's work without widgets, on a real slicer-core scene.

No stand-ins: a scene from ``new_scene()``, phantom DICOM files with an ECG, the engine's own
measurement and analysis code, a real child process for the models CLI.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (PyPI) provides the MRML classes")

from slicer_support import grow_into_myocardium, logic, node_count, phantom, study_file  # noqa: E402,F401

from EchoFMSlicer.EchoFMSlicerLib import ecg_nodes, segmentation_nodes as sn  # noqa: E402
from EchoFMSlicer.EchoFMSlicerLib.cine_nodes import cine_to_nodes  # noqa: E402
from EchoFMSlicer.EchoFMSlicerLib.logic import EchoFMLogic  # noqa: E402
from EchoFMSlicer.EchoFMSlicerLib.scene import new_scene  # noqa: E402


def edv_of(labels, spacing):
    """The engine's LV volume of one label map (how measure() must compute EDV)."""
    from EchoFMEngine.clinical.measure import lv_volume_ml

    return lv_volume_ml(labels == 1, spacing, myo_mask=labels == 2, la_mask=labels == 3)


def widen_cavity(labels):
    """A correction as a paint stroke would make it: the myocardium just apical of the cavity becomes cavity."""
    edited = labels.copy()
    edited[grow_into_myocardium(labels, rows=2)] = 1
    return edited


def test_load_phase_masks_correct_measure_reset_export(logic, study_file, tmp_path):
    """The panel's workflow on a phantom: every number checked against the engine or the phantom's truth."""
    from EchoFMEngine.data import build_dataset
    from EchoFMEngine.clinical.measure import ejection_fraction

    study, path = study_file
    scene, spacing = logic.scene, study.cine.spacing_mm
    nodes = logic.load_cine(path)
    assert logic.frame_count(nodes.browser) == 24 and nodes.ecg_table is not None
    info = logic.describe_cine(nodes.browser)
    assert info.startswith("24 frames of 72x80 px, 30.0 frames/s") and "ECG present" in info
    assert f"{spacing[0]:.3g} x {spacing[1]:.3g} mm/px" in info

    slice_view = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    logic.show_cine(nodes)
    assert slice_view.GetBackgroundVolumeID() == nodes.proxy.GetID()

    phase = logic.detect_phase(nodes.browser)
    ed, es = logic.first_ed_es(phase)
    assert phase["method"] == "ecg" and ed in phase["ed_frames"] and es in phase["es_frames"] and es > ed
    assert logic.go_to_frame(nodes.browser, es) is nodes.proxy and nodes.browser.GetSelectedItemNumber() == es
    logic.update_frame_marker(nodes.browser)                        # the ECG marker follows the frame
    marker = nodes.ecg_chart.GetNodeReference(ecg_nodes.MARKER_ROLE)
    assert ecg_nodes.table_column(marker, ecg_nodes.TIME) == pytest.approx([study.cine.frame_times_s[es]] * 2)

    ed_seg, es_seg = logic.ed_es_segmentations(nodes.browser, study.masks, ed, es)
    assert np.array_equal(logic.labels(ed_seg, nodes.browser), study.masks[ed])
    assert (logic.mask_frame(ed_seg), logic.mask_frame(es_seg)) == (ed, es)
    assert logic.provenance(ed_seg)["source"] == "AI" and logic.ai_segmentation(ed_seg) is not None
    logic.show_segmentations(ed_seg, es_seg, show_ai=True)
    shown = [s.GetDisplayNode().GetVisibility() for s in
             (ed_seg, logic.ai_segmentation(ed_seg), es_seg, logic.ai_segmentation(es_seg))]
    assert shown == [1, 1, 0, 0]

    m, table = logic.measure(nodes.browser, ed_seg, es_seg)
    assert m["edv"] == pytest.approx(edv_of(study.masks[ed], spacing), rel=1e-9)
    assert m["esv"] == pytest.approx(edv_of(study.masks[es], spacing), rel=1e-9)
    assert table.GetNumberOfRows() > 0 and "EDV" in logic.describe_measurements(m)

    edited = widen_cavity(study.masks[ed])
    sn.set_segment_mask(ed_seg, "LV_endo", edited == 1, reference=nodes.proxy)
    assert logic.provenance(ed_seg)["source"] == "corrected"
    count = node_count(scene)
    m2, _ = logic.measure(nodes.browser, ed_seg, es_seg)
    assert node_count(scene) == count                                # measuring again replaces its nodes
    assert m2["edv"] == pytest.approx(edv_of(edited, spacing), rel=1e-9) and m2["edv"] > m["edv"]
    assert m2["ef_percent"] == pytest.approx(ejection_fraction(m2["edv"], m2["esv"]))

    written = logic.export(tmp_path / "export", nodes.browser, ed_seg, es_seg)
    report = json.loads(Path(written[1]).read_text())
    assert (report["masks"]["ED"]["source"], report["masks"]["ES"]["source"]) == ("corrected", "AI")
    logic.reset_to_ai(ed_seg)
    assert logic.provenance(ed_seg)["source"] == "AI"
    assert np.array_equal(logic.labels(ed_seg, nodes.browser), study.masks[ed])
    logic.export(tmp_path / "export", nodes.browser, ed_seg, es_seg)  # same cine: its row is replaced
    ds = build_dataset("csv", tmp_path / "export", split="train", csv_file="dataset.csv")
    assert len(ds) == 1
    report = json.loads(Path(written[1]).read_text())
    assert (report["masks"]["ED"]["frame"], report["masks"]["ED"]["source"]) == (ed, "AI")


def test_analysis_command_runs_and_its_result_fills_the_scene(logic, study_file, tmp_path):
    """A cine without a file (e.g. from Slicer's DICOM module) is written as an npz; the command the
    logic builds is accepted by the engine's CLI (run in-process here) and its result reaches the scene."""
    from EchoFMEngine import load_cine
    from EchoFMEngine.cli import main as engine_cli

    study, _ = study_file
    nodes = cine_to_nodes(logic.scene, study.cine, "from_dicom_module", logics=logic.logics)
    work = logic.new_work_folder("analysis")
    assert work.parent == logic.work_folder and work.is_dir()
    path = logic.analysis_input(nodes.browser, work)
    back = load_cine(path)
    assert path.suffix == ".npz" and np.array_equal(back.frames, study.cine.frames)
    assert back.spacing_mm == pytest.approx(study.cine.spacing_mm)
    assert np.allclose(back.frame_times_s, study.cine.frame_times_s)

    cmd = logic.analysis_command(path, work / "out", tmp_path / "no_models", "cpu", False)
    assert engine_cli(cmd[cmd.index("EchoFMEngine") + 1:]) == 0
    result = logic.analysis_result(work / "out")
    assert result["cine"]["frames"] == 24 and result["segmentation"] is None
    shown = logic.apply_analysis(nodes.browser, work / "out")
    assert shown["ed_segmentation"] is None                        # no segment model: no masks, said why
    assert logic.describe_view(result)[0] == "not identified"
    assert "view" in logic.describe_view(result)[1] and "segment" in logic.describe_analysis(result)
    assert "Aortic stenosis: not scored" in logic.describe_scores(result)
    assert logic.describe_phase(result["phase"]).startswith(f"ED frames {result['phase']['ed_frames']}")


def test_corrected_masks_replace_the_analysis_volumes_in_the_curve(logic, study_file, tmp_path):
    """An analysis with masks (the phantom's, through the engine's writer of contract D): the ED/ES nodes
    come from it, and after a correction the LV volume curve carries the corrected EDV at the ED frame."""
    from EchoFMEngine.analysis import analyze
    from EchoFMEngine.analysis.outputs import write_study

    study, path = study_file
    nodes = logic.load_cine(path)
    result = analyze(study.cine, models=tmp_path / "no_models", device="cpu", masks=study.masks)
    write_study(result, tmp_path / "out", "a4c", cine=study.cine, summary=False)
    shown = logic.apply_analysis(nodes.browser, tmp_path / "out")
    ed_seg, es_seg = shown["ed_segmentation"], shown["es_segmentation"]
    ed, es = logic.mask_frame(ed_seg), logic.mask_frame(es_seg)
    analysed = logic.analysis_result(tmp_path / "out")["measurements"]["lv_volume"]
    assert ed != es and len(analysed) == 24 and analysed[ed] == pytest.approx(edv_of(study.masks[ed],
                                                                                   study.cine.spacing_mm))
    edited = widen_cavity(study.masks[ed])
    sn.set_segment_mask(ed_seg, "LV_endo", edited == 1, reference=nodes.proxy)
    m, _ = logic.measure(nodes.browser, ed_seg, es_seg, str(tmp_path / "out"))
    times, vols = logic.volume_curve(str(tmp_path / "out"), nodes, m)
    assert vols[ed] == pytest.approx(edv_of(edited, study.cine.spacing_mm)) and vols[ed] > analysed[ed]
    assert [v for i, v in enumerate(vols) if i not in (ed, es)] == [v for i, v in enumerate(analysed)
                                                                    if i not in (ed, es)]
    assert times == pytest.approx(list(study.cine.frame_times_s))
    charts = [n for n in logic._measure_nodes[nodes.browser.GetID()] if n.IsA("vtkMRMLPlotChartNode")]
    curve = charts[0].GetNthPlotSeriesNode(0).GetTableNode()
    frames = list(ecg_nodes.table_column(curve, "frame"))
    assert ecg_nodes.table_column(curve, "volume")[frames.index(ed)] == pytest.approx(m["edv"])
    assert logic.volume_curve("", nodes, m) is None                # no analysis: no curve


def test_hand_drawn_masks_measure_export_as_corrected_and_feed_fine_tuning(logic, study_file, tmp_path):
    """No segmentation model: empty ED/ES masks drawn by hand (written here as an editor would) are
    measured and exported as "corrected"; every fine-tuning override is a key the config accepts."""
    from EchoFMEngine.clinical.measure import cardiac_measurements
    from EchoFMEngine.training.config import load_config

    study, path = study_file
    nodes = logic.load_cine(path)
    ed, es = logic.first_ed_es(logic.detect_phase(nodes.browser))
    ed_seg, es_seg = logic.create_empty_masks(nodes.browser, ed, es)
    assert logic.ai_segmentation(ed_seg) is None and not logic.labels(ed_seg, nodes.browser).any()
    for seg, frame in ((ed_seg, ed), (es_seg, es)):
        for name, spec in sn.SEGMENTS.items():
            sn.set_segment_mask(seg, name, np.isin(study.masks[frame], spec.labels), reference=nodes.proxy)
    m, _ = logic.measure(nodes.browser, ed_seg, es_seg)
    expected = cardiac_measurements(study.masks[[ed, es]], study.cine.spacing_mm, [0], [1])
    assert m["edv"] == pytest.approx(expected["lv_volume"][0]) and m["esv"] == pytest.approx(expected["lv_volume"][1])
    assert (m["masks"]["ED"]["source"], m["masks"]["ED"]["frame"]) == ("corrected", ed)
    logic.export(tmp_path / "export", nodes.browser, ed_seg, es_seg)
    rows = (tmp_path / "export" / "dataset.csv").read_text().splitlines()
    assert len(rows) == 2 and f"{ed};{es}" in rows[1] and "corrected,corrected" in rows[1]
    cmd = logic.finetune_command(tmp_path / "export", tmp_path / "run", 7, "cpu", tmp_path / "no_models")
    i = cmd.index("--config")
    assert Path(cmd[i - 1]).name == "train.py" and Path(cmd[i + 1]).name == "finetune_segment.yaml"
    cfg = load_config(cmd[i + 1], cmd[i + 2:])
    assert (cfg["data"]["kind"], cfg["data"]["root"], cfg["run"]["steps"]) == ("csv", str(tmp_path / "export"), 7)
    assert cfg["data"]["val_split"] is None and cfg["run"]["out"] == str(tmp_path / "run")
    assert not any(a.startswith("init_from=") for a in cmd)       # no segment model to start from


def test_bad_input_is_refused_and_leaves_the_scene_as_it_was(logic, study_file, tmp_path):
    study, path = study_file
    scene = logic.scene
    still = cine_to_nodes(scene, type(study.cine)(frames=study.cine.frames[:1], fps=30.0), "still",
                          logics=logic.logics)
    with pytest.raises(ValueError, match="single frame"):
        logic.check_analysable(still.browser)
    bad = tmp_path / "broken.avi"
    bad.write_bytes(b"not a video")
    before = node_count(scene)
    with pytest.raises(ValueError, match="broken.avi"):
        logic.load_cine(bad)
    assert node_count(scene) == before
    nodes = logic.load_cine(path)
    other = tmp_path / "out" / "other"
    other.mkdir(parents=True)
    (other / "result.json").write_text(json.dumps({"cine": {"frames": 99, "height": 10, "width": 10}}))
    before = node_count(scene)
    with pytest.raises(ValueError, match="pick the cine that was analysed"):
        logic.apply_analysis(nodes.browser, tmp_path / "out")
    assert node_count(scene) == before
    with pytest.raises(RuntimeError, match="no result"):
        logic.study_folder(tmp_path / "empty")
    with pytest.raises(ValueError, match="outside"):
        logic.go_to_frame(nodes.browser, 10_000)
    with pytest.raises(ValueError, match="same frame"):
        logic.create_empty_masks(nodes.browser, 3, 3)
    with pytest.raises(ValueError, match="outside"):
        logic.create_empty_masks(nodes.browser, 3, 99)
    assert node_count(scene) == before                              # the ED mask made first was removed
    with pytest.raises(ValueError, match="no cine loop selected"):
        logic.go_to_frame(None, 0)
    with pytest.raises(ValueError, match="masks are needed"):
        logic.export(tmp_path / "x", nodes.browser, None, None)
    with pytest.raises(ValueError, match="no AI copy"):
        logic.reset_to_ai(logic.create_empty_masks(nodes.browser, 1, 5)[0])
    with pytest.raises(ValueError, match="does not exist"):
        logic.import_weights_command(tmp_path / "nothing.safetensors", "segment", tmp_path / "models")
    with pytest.raises(ValueError, match="unknown task"):
        logic.import_weights_command(path, "lvef", tmp_path / "models")
    with pytest.raises(ValueError, match="device"):
        logic.analysis_command(path, tmp_path, tmp_path, "gpu", False)
    with pytest.raises(ValueError, match="use Export first"):
        logic.finetune_command(tmp_path, tmp_path / "run", 10)
    with pytest.raises(RuntimeError, match="no model.safetensors"):
        logic.finetuned_model(tmp_path / "run")
    with pytest.raises(ValueError, match="needs a MRML scene"):
        EchoFMLogic(None)


def test_models_folder_settings_and_a_weights_file_that_is_not_a_checkpoint(logic, tmp_path, monkeypatch, capsys):
    """Settings: the default folder follows the engine's rule; the status and the current model come
    from the manifest; the import command, run by the engine's CLI, refuses a file that is no checkpoint."""
    from EchoFMEngine.cli import main as engine_cli
    from EchoFMEngine.models.registry import default_folder

    monkeypatch.setenv("ECHOFM_MODELS", str(tmp_path / "env_models"))
    assert logic.default_models_folder() == default_folder() == tmp_path / "env_models"
    models = tmp_path / "models"
    assert "does not exist yet" in logic.models_status(models)
    models.mkdir()
    (models / "seg.safetensors").write_bytes(b"weights")
    (models / "manifest.json").write_text(json.dumps({"tasks": {"segment": {"file": "seg.safetensors"},
                                                                "view": {"file": "gone.safetensors"}}}))
    assert logic.models_status(models) == "Weights for: segment, view. Missing: as, ar, ef"
    assert logic.current_model("segment", models) == models / "seg.safetensors"
    assert logic.current_model("view", models) is None and logic.current_model("as", models) is None

    fake = tmp_path / "downloaded.safetensors"
    fake.write_bytes(b"\x00" * 64)
    cmd = logic.import_weights_command(fake, "segment", tmp_path / "new_models")
    capsys.readouterr()
    assert engine_cli(cmd[cmd.index("EchoFMEngine") + 1:]) == 1
    assert "downloaded.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "new_models" / "manifest.json").exists()


def test_child_processes_find_the_engine(logic, tmp_path):
    """What the panel starts runs in a child that imports this EchoFMEngine, wherever its working folder."""
    from EchoFMSlicer.EchoFMSlicerLib.runner import python_command

    code = "import EchoFMEngine, pathlib; print(pathlib.Path(EchoFMEngine.__file__).resolve().parent.parent)"
    job = logic.start_process([*python_command(), "-c", code], "probe", cwd=tmp_path)
    assert job.wait(timeout=60) == 0
    out = [e.text for e in job.poll() if e.kind == "stdout"]
    assert out == [str(logic.engine_root())]


def test_segment_editor_node_is_one_per_scene_and_allows_overlap(logic):
    import slicer

    node = logic.segment_editor_node()
    assert logic.segment_editor_node() is node
    assert node.GetOverwriteMode() == slicer.vtkMRMLSegmentEditorNode.OverwriteNone
    assert logic.scene.GetNumberOfNodesByClass("vtkMRMLSegmentEditorNode") == 1
