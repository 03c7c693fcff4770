"""Scan-sector detection, blanking, crop/scale/pad to the model size and back: on phantoms with a
known fan and burned-in text/ECG, and on a real echo with a burned-in ECG trace."""
from __future__ import annotations

import json

import numpy as np
import pytest

from EchoFMEngine.clinical.geometry import SectorTransform, blank_outside, find_sector, prepare_frames
from EchoFMEngine.clinical.phantoms import make_study


@pytest.fixture(scope="session", params=[(128, 128), (112, 160)], ids=["square", "wide"])
def study(request):
    return make_study("A4C", seed=31, n_frames=32, size=request.param)


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_sector_found_and_overlay_blanked(study):
    assert study.overlay.sum() > 50  # the phantom does carry burned-in text and an ECG trace
    sector = find_sector(study.cine.frames)
    assert sector is not None and _iou(sector, study.sector) >= 0.95
    blanked = blank_outside(study.cine.frames, sector)
    assert blanked[:, study.overlay].max() == 0
    inside = study.sector & sector
    assert np.array_equal(blanked[:, inside], study.cine.frames[:, inside])


def test_prepare_frames_shapes_and_blanking(study):
    model, tf = prepare_frames(study.cine.frames, size=112)
    assert model.shape == (32, 112, 112, 3) and model.dtype == np.uint8
    assert tf.sector_found and tf.original_shape == study.cine.frames.shape[1:3]
    overlay_in_model = tf.to_model(study.overlay)
    assert model[:, overlay_in_model].max() == 0
    outside = ~tf.to_model(study.sector)
    assert model[:, outside].mean() < 1.0  # black outside the fan (a little bilinear bleed at its rim)
    r0, c0, r1, c1 = tf.bbox
    assert max(r1 - r0, c1 - c0) * tf.scale == pytest.approx(112)


def test_masks_round_trip(study):
    _, tf = prepare_frames(study.cine.frames, size=112)
    masks = study.masks[::4]
    back = tf.to_original(tf.to_model(masks))
    assert back.shape == masks.shape and back.dtype == masks.dtype
    for label in (1, 2, 3):
        assert _dice(back == label, masks == label) >= 0.98
    tf2 = SectorTransform.from_dict(json.loads(json.dumps(tf.to_dict())))
    assert np.array_equal(tf2.to_model(masks), tf.to_model(masks))
    assert _iou(tf2.sector_mask(), find_sector(study.cine.frames)) > 0.99


def test_model_mask_lands_on_original_geometry(study):
    """A mask drawn on the model grid maps back to the same place as the phantom's masks."""
    model, tf = prepare_frames(study.cine.frames, size=112)
    truth_model = tf.to_model(study.masks[0])
    back = tf.to_original(truth_model, inside_sector=True)
    assert _dice(back == 1, study.masks[0] == 1) >= 0.98
    assert back[~tf.sector_mask()].max() == 0
    with pytest.raises(ValueError):
        tf.to_original(study.masks[0])  # wrong grid


def test_no_sector_falls_back_to_whole_image():
    frames = np.zeros((3, 40, 60, 3), dtype=np.uint8)
    model, tf = prepare_frames(frames, size=32)
    assert not tf.sector_found and tf.bbox == (0, 0, 40, 60) and model.shape == (3, 32, 32, 3)


def test_real_echo_with_burned_in_ecg(shared_data, tmp_path):
    from EchoFMEngine.io import load_cine

    cine = load_cine(shared_data / "dicom" / "US-PAL-8-10x-echo.dcm")  # 430x600, ECG trace at the bottom
    model, tf = prepare_frames(cine.frames, size=112)
    sector = tf.sector_mask()
    assert tf.sector_found and model.shape == (10, 112, 112, 3)
    assert 0.2 < sector.mean() < 0.6
    assert sector[200, 300] and sector[120, 250]  # colour Doppler box and tissue inside the fan
    trace = np.zeros_like(sector)
    trace[380:, :] = True  # the green ECG trace runs along rows ~395-420
    assert cine.frames[:, trace].max() > 100, "the file should show its ECG trace there"
    assert not sector[trace].any()
    assert not sector[:80, :100].any()  # text block at the top left
    blanked = blank_outside(cine.frames, sector)
    assert blanked[:, trace].max() == 0 and blanked[:, :80, :100].max() == 0
    assert tf.bbox[2] <= 380  # the crop stops above the trace: the model never sees it

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].imshow(cine.frames[0])
    ax[0].contour(sector, colors="r", linewidths=0.8)
    ax[1].imshow(model[0])
    fig.savefig(tmp_path / "us_pal_sector.png", dpi=60)
    plt.close(fig)
