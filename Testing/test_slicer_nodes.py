"""Cine loops and ECGs as Slicer nodes (slicer-core, no Slicer application): load, browse, save, read back."""
from __future__ import annotations

import numpy as np
import pytest

from slicer_support import node_count, phantom, write_phantom_dicom

pytest.importorskip("slicer", reason="PyPI slicer-core is needed for the Slicer library tests")

from EchoFMSlicer.EchoFMSlicerLib import (check_analysable, cine_nodes_from_browser, cine_to_nodes,  # noqa: E402
                                          frame_marker_time, go_to_frame, load_cine_file, new_scene, nodes_to_cine,
                                          r_peak_times, register_modules, save_cine_sequence, update_frame_marker)
from EchoFMSlicer.EchoFMSlicerLib.cine_nodes import volume_to_array  # noqa: E402
from EchoFMSlicer.EchoFMSlicerLib.ecg_nodes import ECG_ROLE, table_column  # noqa: E402

REAL_FILES = ["dicom/ATL-cardiac-YBR-jpeg.dcm", "dicom/US-PAL-8-10x-echo.dcm", "dicom/US-RGB-8-esopecho-TEE.dcm",
              "dicom/US1-UNCR-noncardiac.dcm", "echo/a4c_sequence.nii.gz"]


@pytest.fixture(scope="module")
def env():
    scene, logics = new_scene()
    return scene, logics


@pytest.fixture(scope="module")
def study():
    return phantom(n_frames=40)


@pytest.fixture(scope="module")
def phantom_files(study, tmp_path_factory):
    d = tmp_path_factory.mktemp("phantom")
    return {"rgb": write_phantom_dicom(study, d / "phantom_rgb.dcm"),
            "grey": write_phantom_dicom(study, d / "phantom_grey.dcm", photometric="MONOCHROME2")}


def check_nodes_match_cine(cn, cine):
    """Frames, voxel layout, spacing and times of the nodes are those of the cine."""
    T, H, W = cine.shape
    seq = cn.sequence
    assert seq.GetNumberOfDataNodes() == T
    assert (seq.GetIndexName(), seq.GetIndexUnit()) == ("time", "s")
    times = np.array([float(seq.GetNthIndexValue(i)) for i in range(T)])
    np.testing.assert_allclose(times, cine.frame_times_s, atol=1e-9)
    f = cine.frames
    grey = bool((f[..., 0] == f[..., 1]).all() and (f[..., 1] == f[..., 2]).all())
    for t in sorted({0, T // 2, T - 1}):
        node = seq.GetNthDataNode(t)
        assert node.GetClassName() == ("vtkMRMLScalarVolumeNode" if grey else "vtkMRMLVectorVolumeNode")
        assert node.GetImageData().GetDimensions() == (W, H, 1)  # i = column, j = row
        arr = volume_to_array(node)[0]
        np.testing.assert_array_equal(arr, cine.frames[t, ..., 0] if grey else cine.frames[t])
    sx, sy, _ = seq.GetNthDataNode(0).GetSpacing()
    if cine.spacing_mm is None:
        assert (sx, sy) == (1.0, 1.0) and cn.cine_meta["spacing_mm"] is None
    else:
        assert (sy, sx) == pytest.approx(cine.spacing_mm)
    assert cn.proxy is not None and cn.proxy.GetImageData().GetDimensions() == (W, H, 1)


def check_round_trip(a, b):
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_allclose(a.frame_times_s, b.frame_times_s, atol=1e-9)
    assert (a.spacing_mm is None) == (b.spacing_mm is None)
    if a.spacing_mm is not None:
        assert a.spacing_mm == pytest.approx(b.spacing_mm)


def test_phantom_dicom_with_ecg(env, study, phantom_files):
    from EchoFMEngine import load_cine

    scene, logics = env
    cine = load_cine(phantom_files["rgb"])
    cn = load_cine_file(scene, phantom_files["rgb"], logics)
    assert cn.sequence.GetName() == "phantom_rgb"
    check_nodes_match_cine(cn, cine)
    assert cn.cine_meta["spacing_mm"] == pytest.approx(study.cine.spacing_mm)
    assert cn.browser.GetPlaybackRateFps() == pytest.approx(study.cine.fps, rel=1e-6)

    # ECG table: time on the cine clock, values, R-peak flags at the true beats
    table = cn.ecg_table
    assert table is not None and cn.browser.GetNodeReference(ECG_ROLE) is table
    np.testing.assert_allclose(table_column(table, "time"), cine.ecg.times_s, atol=1e-9)
    np.testing.assert_allclose(table_column(table, "ecg"), cine.ecg.signal, atol=1e-6)
    peaks = r_peak_times(table)
    truth = study.r_peak_times_s
    assert len(peaks) == len(truth)
    assert np.abs(peaks - truth).max() < 0.02  # neurokit2 on the phantom ECG, 20 ms
    assert cn.ecg_chart is not None and cn.ecg_chart.GetNumberOfPlotSeriesNodes() == 3

    # the marker follows the current frame
    go_to_frame(cn, 17, logics)
    assert frame_marker_time(cn.browser) == pytest.approx(cine.frame_times_s[17], abs=1e-9)
    assert update_frame_marker(cn.ecg_chart, cn.browser) == pytest.approx(cine.frame_times_s[17], abs=1e-9)
    marker = cn.ecg_chart.GetNodeReference("EchoFM.frameMarker")
    assert table_column(marker, "time") == pytest.approx([cine.frame_times_s[17]] * 2)
    np.testing.assert_array_equal(volume_to_array(cn.proxy)[0], cine.frames[17])

    back = nodes_to_cine(cn.browser)
    check_round_trip(cine, back)
    again = cine_nodes_from_browser(cn.browser, logics)  # e.g. the user picks the browser in the panel
    assert (again.sequence, again.proxy, again.ecg_table, again.ecg_chart) == \
        (cn.sequence, cn.proxy, cn.ecg_table, cn.ecg_chart)
    assert register_modules(scene) is logics  # idempotent
    assert back.ecg is not None and back.ecg.fs == cine.ecg.fs
    np.testing.assert_allclose(back.ecg.times_s, cine.ecg.times_s, atol=1e-9)
    assert check_analysable(back) == []


def test_grey_dicom_becomes_scalar_volumes(env, phantom_files):
    from EchoFMEngine import load_cine

    scene, logics = env
    cine = load_cine(phantom_files["grey"])
    cn = load_cine_file(scene, phantom_files["grey"], logics)
    assert cn.proxy.GetClassName() == "vtkMRMLScalarVolumeNode"
    check_nodes_match_cine(cn, cine)
    check_round_trip(cine, nodes_to_cine(cn))


@pytest.mark.parametrize("kind", ["rgb", "grey"])
def test_seq_nrrd_written_by_slicer_reads_back(env, phantom_files, kind, tmp_path):
    import nrrd
    import slicerio

    from EchoFMEngine import load_cine

    scene, logics = env
    cine = load_cine(phantom_files[kind])
    cn = cine_to_nodes(scene, cine, f"saved {kind}", logics)
    path = save_cine_sequence(cn, tmp_path / "cine.seq.nrrd")
    T, H, W = cine.shape

    data, header = nrrd.read(str(path))  # pynrrd: axes ([RGB,] col, row, slice, time)
    if kind == "rgb":
        assert data.shape == (3, W, H, 1, T)
        np.testing.assert_array_equal(np.transpose(data[..., 0, :], (3, 2, 1, 0)), cine.frames)
    else:
        assert data.shape == (W, H, 1, T)
        np.testing.assert_array_equal(np.transpose(data[:, :, 0, :], (2, 1, 0)), cine.frames[..., 0])
    assert header["kinds"][-1] == "list" and header["labels"][-1] == "time" and header["units"][-1] == "s"
    sp = np.asarray(header["space directions"][-4:-2], dtype=float)
    np.testing.assert_allclose(np.diag(sp[:, :2]), [cine.spacing_mm[1], cine.spacing_mm[0]])  # LPS: +col, +row
    values = header["axis 3 index values"].split()  # Slicer numbers the list axis without the RGB axis
    np.testing.assert_allclose([float(v) for v in values], cine.frame_times_s, atol=1e-9)
    if kind == "grey":  # slicerio 1.4 looks for the RGB case's times under "axis 4", so only grey here
        vol = slicerio.read_volume(str(path))
        np.testing.assert_allclose([float(v) for v in vol["sequence"]["indexValues"]], cine.frame_times_s, atol=1e-9)
        np.testing.assert_allclose(np.diag(vol["ijkToLPS"])[:2], [cine.spacing_mm[1], cine.spacing_mm[0]])

    again = load_cine(path)  # the engine's reader
    check_round_trip(cine, again)


@pytest.mark.parametrize("rel", REAL_FILES)
def test_real_files_load_and_round_trip(env, shared_data, rel, tmp_path):
    from EchoFMEngine import load_cine

    scene, logics = env
    cine = load_cine(shared_data / rel)
    before = node_count(scene)
    cn = load_cine_file(scene, shared_data / rel, logics)
    assert node_count(scene) > before
    check_nodes_match_cine(cn, cine)
    assert cn.ecg_table is None and cn.cine_meta["has_ecg"] is False
    check_round_trip(cine, nodes_to_cine(cn.browser))
    if cine.num_frames == 1:
        with pytest.raises(ValueError, match="single frame"):
            check_analysable(cine)
    else:
        notes = check_analysable(cine)
        assert any("spacing unknown" in n for n in notes) == (cine.spacing_mm is None)
    path = save_cine_sequence(cn, tmp_path / "x.seq.nrrd")
    again = load_cine(path)
    if cine.spacing_mm is None:  # NRRD voxels always have a size: the header says it is not known
        import nrrd

        assert nrrd.read_header(str(path))["EchoFM.spacingMm"] == "unknown"
        assert again.spacing_mm is None  # the engine's reader honours the field
    check_round_trip(cine, again)


def test_a4c_nifti_geometry(env, shared_data):
    """The real A4C cine: 20 frames of 480 x 560 at 0.4 mm, grey -> scalar volumes."""
    scene, logics = env
    cn = load_cine_file(scene, shared_data / "echo" / "a4c_sequence.nii.gz", logics)
    assert cn.sequence.GetName().startswith("a4c_sequence")
    assert cn.num_frames == 20 and cn.frame_shape == (480, 560)
    assert cn.proxy.GetClassName() == "vtkMRMLScalarVolumeNode"
    assert cn.proxy.GetSpacing()[:2] == pytest.approx((0.4, 0.4))


def test_browser_made_like_slicers_dicom_plugin(env, shared_data):
    """A cine loaded by Slicer's DICOMImageSequencePlugin (no EchoFM metadata): frames and times come
    back; its 1 mm default spacing is not taken for a calibration."""
    import slicer

    from EchoFMEngine import load_cine
    from EchoFMSlicer.EchoFMSlicerLib.cine_nodes import _frame_volume

    scene, logics = env
    cine = load_cine(shared_data / "dicom" / "US-PAL-8-10x-echo.dcm")  # FrameTime 76 ms, no regions
    seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "US-PAL")
    seq.SetIndexName("time")
    seq.SetIndexUnit("s")
    for t in range(cine.num_frames):
        seq.SetDataNodeAtValue(_frame_volume(cine.frames[t], None, False), f"{t * 0.076:.3f}")  # as the plugin
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "US-PAL browser")
    browser.SetAndObserveMasterSequenceNodeID(seq.GetID())
    browser.SetPlaybackRateFps(1 / 0.076)
    back = nodes_to_cine(browser)
    np.testing.assert_array_equal(back.frames, cine.frames)
    np.testing.assert_allclose(back.frame_times_s, cine.frame_times_s, atol=1e-9)
    assert back.spacing_mm is None and back.fps == pytest.approx(cine.fps)
    cn = cine_nodes_from_browser(browser, logics)
    assert cn.frame_shape == (430, 600) and cn.proxy.IsA("vtkMRMLVectorVolumeNode")
    assert isinstance(cn.proxy, slicer.vtkMRMLVectorVolumeNode)


# ----------------------------------------------------------------------------- bad input
def test_not_a_cine_is_refused_cleanly(env, tmp_path):
    import slicer
    import vtk

    from EchoFMEngine.cine import Cine, SourceInfo

    scene, logics = env

    # a CT-like 3D volume selected instead of a cine
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT chest")
    img = vtk.vtkImageData()
    img.SetDimensions(40, 40, 12)
    img.AllocateScalars(vtk.VTK_SHORT, 1)
    ct.SetAndObserveImageData(img)
    n1 = node_count(scene)
    with pytest.raises(ValueError, match="3D volume"):
        nodes_to_cine(ct)
    # ... or the same voxels as a sequence of CT slices with negative Hounsfield units
    seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "CT slices")
    for k in range(3):
        v = slicer.vtkMRMLScalarVolumeNode()
        im = vtk.vtkImageData()
        im.SetDimensions(40, 40, 1)
        im.AllocateScalars(vtk.VTK_SHORT, 1)
        im.GetPointData().GetScalars().Fill(-1000)
        v.SetAndObserveImageData(im)
        seq.SetDataNodeAtValue(v, str(k))
    br = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "CT browser")
    br.SetAndObserveMasterSequenceNodeID(seq.GetID())
    n1 = node_count(scene)
    with pytest.raises(ValueError, match="CT/MR-like"):
        nodes_to_cine(br)
    assert node_count(scene) == n1

    # a still image and a repeated still
    rng = np.random.default_rng(0)
    still = Cine(frames=rng.integers(0, 255, (1, 64, 64, 3), dtype=np.uint8), fps=30)
    with pytest.raises(ValueError, match="single frame"):
        check_analysable(still)
    frozen = Cine(frames=np.repeat(still.frames, 5, axis=0), fps=30)
    with pytest.raises(ValueError, match="identical"):
        check_analysable(frozen)
    ct_cine = Cine(frames=rng.integers(0, 255, (5, 64, 64, 3), dtype=np.uint8), fps=30,
                   source=SourceInfo(format="dicom", extra={"modality": "CT"}))
    with pytest.raises(ValueError, match="modality CT"):
        check_analysable(ct_cine)

    # broken timing: nothing half-made in the scene
    bad = Cine(frames=rng.integers(0, 255, (4, 40, 40, 3), dtype=np.uint8), fps=30,
               frame_times_s=np.array([0.0, 0.1, 0.1, 0.2]))
    with pytest.raises(ValueError, match="strictly increasing"):
        cine_to_nodes(scene, bad, "bad", logics)
    assert node_count(scene) == n1

    # an unreadable file
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"DICM" + b"\0" * 100)
    with pytest.raises(ValueError, match="broken.dcm"):
        load_cine_file(scene, broken, logics)
    assert node_count(scene) == n1


def test_failure_midway_leaves_scene_unchanged(env, study, monkeypatch):
    """An error after some nodes exist (here: the ECG plot) rolls all of them back."""
    from EchoFMSlicer.EchoFMSlicerLib import cine_nodes

    scene, logics = env
    n0 = node_count(scene)

    def boom(*a, **k):
        raise RuntimeError("plot failed")
    monkeypatch.setattr(cine_nodes, "ecg_plot", boom)
    with pytest.raises(RuntimeError, match="plot failed"):
        cine_to_nodes(scene, study.cine, "midway", logics)
    assert node_count(scene) == n0
    names = [scene.GetNthNode(i).GetName() or "" for i in range(scene.GetNumberOfNodes())]
    assert not [n for n in names if n.startswith("midway")]

