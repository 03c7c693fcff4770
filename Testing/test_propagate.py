"""Mask propagation (issue 12): phantoms with known truth, the real EchoNet traced cines, bad input."""
from __future__ import annotations

import numpy as np
import pytest

import EchoFMEngine
from EchoFMEngine.clinical.measure import lv_volume
from EchoFMEngine.clinical.propagate import PropagationCancelled, propagate_masks
from EchoFMEngine.clinical.phantoms import make_study


def _dice(a, b) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * float((a & b).sum()) / s


@pytest.fixture(scope="module")
def sinus():
    return make_study("A4C", n_frames=40, size=(112, 112), fps=30.0, seed=3)


def test_top_level_export():
    assert EchoFMEngine.propagate_masks is propagate_masks


@pytest.mark.parametrize("kw", [dict(size=(112, 112), fps=30.0, n_frames=40),
                                dict(size=(112, 112), fps=50.0, afib=True, n_frames=60),
                                dict(size=(300, 240), fps=60.0, n_frames=40)],
                         ids=["sinus-112-30fps", "af-112-50fps", "sinus-300x240-60fps"])
def test_phantom_from_one_ed_mask(kw):
    st = make_study("A4C", seed=3, **kw)
    ed = int(st.ed_frames[0])
    out = propagate_masks(st.cine, {ed: st.masks[ed]})
    assert out.shape == st.masks.shape and out.dtype == np.uint8
    assert np.array_equal(out[ed], st.masks[ed])  # the known frame is returned unchanged
    dice = [_dice(out[t] == 1, st.masks[t] == 1) for t in range(len(out))]
    assert np.mean(dice) >= 0.9 and min(dice) >= 0.85, dice
    area, truth = (out == 1).sum((1, 2)), (st.masks == 1).sum((1, 2))
    assert np.corrcoef(area, truth)[0, 1] >= 0.95
    # the myocardium (LV epicardium) and the LA follow too (flow only, no image snapping)
    epi = [_dice(np.isin(out[t], (1, 2)), np.isin(st.masks[t], (1, 2))) for t in range(len(out))]
    la = [_dice(out[t] == 3, st.masks[t] == 3) for t in range(len(out))]
    assert np.mean(epi) >= 0.93 and min(epi) >= 0.88, epi
    assert np.mean(la) >= 0.9 and min(la) >= 0.8, la
    # topology: one component each, no holes, the cavity inside the epicardium
    from scipy import ndimage
    for m in out:
        epi = (m == 1) | (m == 2)
        for region in (m == 1, epi, m == 3):
            assert ndimage.label(region)[1] == 1
        assert np.array_equal(ndimage.binary_fill_holes(epi), epi)
        assert np.array_equal(ndimage.binary_fill_holes(m == 1), m == 1)
        assert (m == 2).sum() > 0.2 * (m == 1).sum()     # the myocardium is not squeezed away


def test_flow_workers_change_nothing(sinus):
    """Flows computed ahead on worker threads give the same masks as computed in line."""
    from EchoFMEngine.clinical.propagate import PropagationOptions

    cine, m = sinus.cine.frames[:16], {8: sinus.masks[8]}
    a = propagate_masks(cine, m, options=PropagationOptions(flow_workers=0))
    b = propagate_masks(cine, m, options=PropagationOptions(flow_workers=2, prefetch=4))
    assert np.array_equal(a, b)


def test_two_known_frames_blend_and_frames_subset(sinus):
    st = sinus
    a, b = 2, 30
    out = propagate_masks(st.cine, {a: st.masks[a], b: st.masks[b]}, frames=[a, 10, 20, b, 35])
    assert out.shape == (5, 112, 112)
    assert np.array_equal(out[0], st.masks[a]) and np.array_equal(out[3], st.masks[b])
    for i, t in ((1, 10), (2, 20), (4, 35)):
        assert _dice(out[i] == 1, st.masks[t] == 1) >= 0.9


def test_progress_and_cancel(sinus):
    seen = []
    propagate_masks(sinus.cine, {0: sinus.masks[0]}, frames=[0, 1, 2, 3],
                    progress=lambda f, msg: seen.append(f))
    assert seen and seen[-1] == pytest.approx(1.0) and all(0 < f <= 1 for f in seen)
    with pytest.raises(PropagationCancelled):
        propagate_masks(sinus.cine, {0: sinus.masks[0]}, cancel=lambda: True)


@pytest.mark.parametrize("masks, frames, match", [
    ({0: np.ones((50, 50), np.uint8)}, None, "shape"),
    ({0: np.zeros((112, 112), np.uint8)}, None, "empty"),
    ({0: np.full((112, 112), 7, np.uint8)}, None, r"unknown label\(s\) \[7\]"),
    ({99: None}, None, "outside the cine"),
    ({-1: None}, None, "outside the cine"),
    ({}, None, "masks is empty"),
    ({0: None}, [0, 500], "requested frame 500"),
])
def test_bad_input(sinus, masks, frames, match):
    good = sinus.masks[0]
    masks = {k: (good if v is None else v) for k, v in masks.items()}
    with pytest.raises(ValueError, match=match):
        propagate_masks(sinus.cine, masks, frames=frames)


def test_single_frame_cine(sinus):
    with pytest.raises(ValueError, match="at least two frames"):
        propagate_masks(sinus.cine.frames[:1], {0: sinus.masks[0]})


# ----------------------------------------------------------------------------- real EchoNet cines
def _traced_cases(root):
    import pandas as pd

    from EchoFMEngine.data.tracings import ed_es_frames, rasterise_tracing, read_volume_tracings
    from EchoFMEngine.io import load_cine

    rows = pd.read_csv(root / "FileList.csv")
    tracings = read_volume_tracings(root / "VolumeTracings.csv")
    for _, r in rows.iterrows():
        cine = load_cine(root / "Videos" / f"{r.FileName}.avi")
        t = tracings[r.FileName]
        ed, es = ed_es_frames(t)
        shape = cine.frames.shape[1:3]
        yield r.FileName, cine, ed, es, rasterise_tracing(t[ed], shape), rasterise_tracing(t[es], shape), float(r.EF)


def test_real_traced_cines_es_from_ed(shared_data):
    """From the experts' ED mask alone: ES Dice >= 0.88 against the experts' ES mask and EF within 6
    points of the list (issue 12's acceptance; measured values in docs/propagation.md). A plain flow
    chain (ES Dice ~0.85, EF 11-28 points low) fails. And from the ES mask alone back to ED."""
    root = shared_data / "echonet" / "traced3"
    if not root.is_dir():
        pytest.skip(f"EchoNet traced cines not found at {root}")
    for name, cine, ed, es, m_ed, m_es, ef in _traced_cases(root):
        out = propagate_masks(cine, {ed: m_ed.astype(np.uint8)}, frames=[ed, es])
        p = out[1] == 1
        d = _dice(p, m_es)
        pef = 100.0 * (1.0 - lv_volume(p).volume / lv_volume(m_ed).volume)
        assert d >= 0.88, f"{name}: ES Dice {d:.3f}"
        assert abs(pef - ef) <= 6.0, f"{name}: EF {pef:.1f} vs list {ef:.1f}"
        # the other way, from the ES mask alone back to ED: the cavity must grow with diastole
        # (without growth the ED cavity came out 13-19 % small, EF 8-13 points low)
        p = propagate_masks(cine, {es: m_es.astype(np.uint8)}, frames=[ed])[0] == 1
        d = _dice(p, m_ed)
        pef = 100.0 * (1.0 - lv_volume(m_es).volume / lv_volume(p).volume)
        assert d >= 0.9, f"{name}: ED Dice from ES {d:.3f}"
        assert abs(pef - ef) <= 6.0, f"{name}: EF from the ES mask {pef:.1f} vs list {ef:.1f}"


# ----------------------------------------------------------------------------- analysis
def test_analyze_with_drawn_frame_propagates():
    from EchoFMEngine.analysis import analyze

    st = make_study("A4C", n_frames=60, size=(112, 112), fps=30.0, seed=3, with_ecg=False)
    ed = int(st.ed_frames[0])
    res = analyze(st.cine, models={}, masks={ed: st.masks[ed]})
    assert res.segmentation["segmentation_method"] == "propagated"
    assert res.segmentation["known_frames"] == [ed]
    assert len(res.segmentation["frames"]) == st.cine.num_frames
    assert res.phase["method"] == "masks"          # ED/ES from the propagated volume curve
    assert np.array_equal(res.masks[ed], st.masks[ed])
    assert abs(res.measurements["ef_percent"] - st.ef) <= 6.0


def test_analyze_cli_masks_nrrd(tmp_path):
    import SimpleITK as sitk

    from EchoFMEngine.analysis.batch import cli
    from EchoFMEngine.clinical.propagate import read_mask_frames
    from EchoFMEngine.clinical.phantoms import write_dicom

    st = make_study("A4C", n_frames=24, size=(96, 96), fps=30.0, seed=5)
    dcm = write_dicom(st, tmp_path / "cine.dcm")
    vol = np.zeros_like(st.masks)
    ed = int(st.ed_frames[0])
    vol[ed] = st.masks[ed]
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / "drawn.nrrd"))
    assert list(read_mask_frames(tmp_path / "drawn.nrrd")) == [ed]
    assert cli([str(dcm), "--out", str(tmp_path / "out"), "--models", str(tmp_path / "none"),
                "--masks", str(tmp_path / "drawn.nrrd"), "--no-summary"]) == 0
    # bad masks files are refused by name, before anything runs
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros_like(vol)), str(tmp_path / "empty.nrrd"))
    with pytest.raises(ValueError, match="empty.nrrd: no labelled frame"):
        read_mask_frames(tmp_path / "empty.nrrd")
    assert cli([str(dcm), "--out", str(tmp_path / "out2"), "--masks", str(tmp_path / "empty.nrrd")]) == 2
