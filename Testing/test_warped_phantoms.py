"""Phantoms warped from a real frame (EchoFMEngine.clinical.warped_phantoms): the generator's truth
matches the deformation it applies (on a drawn test frame, no shared data needed), and
detect_ed_es finds ED/ES on phantoms made from real EchoNet frames (../shared/data/echonet)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage import draw

from EchoFMEngine import load_cine
from EchoFMEngine.clinical.geometry import find_sector
from EchoFMEngine.clinical.phase import detect_ed_es, event_accuracy
from EchoFMEngine.clinical.phantoms import make_study, write_avi
from EchoFMEngine.clinical.warped_phantoms import evaluate_warped, make_warped_phantom, summarise


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    """A grey 112 px apical-like frame: a fan of speckled tissue with a dark LV in its upper part
    and a dark atrium below (the generator needs a sector and a dark blob, not a real patient)."""
    rng = np.random.default_rng(3)
    img = np.zeros((112, 112), np.float32)
    fan = draw.polygon([2, 100, 110, 100], [56, 2, 56, 110], img.shape)
    tissue = ndimage.gaussian_filter(rng.random((112, 112)).astype(np.float32), 1.0)
    img[fan] = 0.45 + 0.5 * (tissue[fan] - 0.5)
    for (r, c, rr, rc) in ((42, 60, 24, 11), (88, 60, 10, 12)):
        img[draw.ellipse(r, c, rr, rc, img.shape)] = 0.05
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _dark_share(cine, frame0) -> np.ndarray:
    """Darkness of the upper sector per frame (share of dark pixels, graded so that sub-pixel
    motion counts: 1 for black, 0 from mid-grey up)."""
    sector = find_sector(frame0)
    rows = np.flatnonzero(sector.any(1))
    sector[int(rows[0] + 0.6 * (rows[-1] - rows[0])):] = False
    grey = cine.grey()
    return np.clip(1.0 - grey[:, sector] / 0.5, 0.0, 1.0).mean(axis=1)


def test_truth_is_the_applied_deformation(frame):
    """The dark share is largest at every true ED and smallest at every true ES (within a frame),
    and follows the stated volume curve."""
    for fps, jitter in ((20, 0.0), (50, 0.2)):
        ph = make_warped_phantom(frame, fps=fps, heart_rate_bpm=70, n_beats=4, rr_jitter=jitter, seed=5)
        dark = _dark_share(ph.cine, frame)
        assert np.corrcoef(dark, ph.volume)[0, 1] > 0.95
        half = max(2, int(0.25 * ph.period_frames))
        for kind, frames, pick in (("ED", ph.ed_frames, np.argmax), ("ES", ph.es_frames, np.argmin)):
            for f in frames:
                lo, hi = max(0, f - half), min(dark.size, f + half + 1)
                assert abs(lo + int(pick(dark[lo:hi])) - f) <= 1, (kind, fps, f, dark[lo:hi])
        assert dark[ph.ed_frames].min() > dark[ph.es_frames].max()
        assert ph.volume[ph.ed_frames].min() > 0.95 and ph.volume[ph.es_frames].max() < 0.05


def test_shapes_timing_and_options(frame):
    ph = make_warped_phantom(frame, fps=30, heart_rate_bpm=60, n_beats=3, seed=1)
    assert ph.cine.shape == (90, 112, 112) and ph.cine.fps == 30.0 and ph.cine.frames.dtype == np.uint8
    assert ph.period_frames == pytest.approx(30.0)
    assert ph.ed_frames == [0, 30, 60] and np.diff(ph.es_frames).tolist() == [30, 30]
    assert ph.es_frames[0] == pytest.approx(0.37 * 30, abs=1)
    late = make_warped_phantom(frame, fps=30, heart_rate_bpm=60, n_frames=40, start_phase=0.5, seed=1)
    assert late.cine.num_frames == 40 and late.ed_frames == [15]
    big = make_warped_phantom(np.repeat(frame[..., None], 3, -1), fps=120, size=300, n_beats=1, seed=1)
    assert big.cine.shape[1:] == (300, 300) and big.cine.fps == 120.0
    af = make_warped_phantom(frame, fps=50, n_beats=12, rr_jitter=0.25, seed=2)
    beats = np.diff(af.ed_frames)
    assert beats.std() / beats.mean() > 0.08
    plain = make_warped_phantom(frame, fps=20, n_beats=1, seed=1).cine.grey()
    wedge = make_warped_phantom(frame, fps=20, n_beats=1, dropout=True, seed=1).cine.grey()
    assert wedge.mean() < 0.9 * plain.mean() and (np.abs(wedge - plain) > 0.05).mean() > 0.01
    drift = make_warped_phantom(frame, fps=20, n_beats=2, gain_drift=0.3, seed=1).cine.grey()
    assert drift[-1].mean() > 1.5 * drift[0].mean()
    noisy = make_warped_phantom(frame, fps=20, n_beats=1, speckle=0.5, seed=1).cine.grey()
    assert np.abs(noisy[1] - noisy[0]).mean() > 5 * np.abs(plain[1] - plain[0]).mean()


def test_deterministic_by_seed(frame):
    kw = dict(fps=40, n_beats=4, rr_jitter=0.2, speckle=0.3)
    a, b = make_warped_phantom(frame, seed=7, **kw), make_warped_phantom(frame, seed=7, **kw)
    c = make_warped_phantom(frame, seed=8, **kw)
    assert np.array_equal(a.cine.frames, b.cine.frames) and a.ed_frames == b.ed_frames
    assert not np.array_equal(a.cine.frames, c.cine.frames)


@pytest.mark.parametrize("bad, kw, match", [
    (np.zeros((64, 64), np.uint8), {}, "uniform"),
    (np.zeros(64, np.uint8), {}, "shape"),
    (None, {"fps": 0}, "fps"),
    (None, {"squeeze": 0.6}, "squeeze"),
    (None, {"start_phase": 1.0}, "start_phase"),
    (None, {"size": 20}, "size"),
])
def test_bad_input_is_a_clear_error(frame, bad, kw, match):
    with pytest.raises(ValueError, match=match):
        make_warped_phantom(frame if bad is None else bad, **kw)


def test_detector_on_phantoms_from_real_frames(shared_data):
    """detect_ed_es (images only) on six phantoms from real dev100 frames (112 px, 20 and 50 fps,
    sinus and irregular, one with drop-out): ED and ES within 3 frames on most inner beats.
    Measured: 41 of 46 (89 %); the misses are the short beats of the 20 fps irregular clip (merged with
    their neighbours) and an ES three frames into a clip (see docs/measurements.md for the grid)."""
    folder = shared_data / "echonet" / "dev100" / "Videos"
    if not folder.is_dir():
        pytest.skip(f"real EchoNet cines not found at {folder}")
    paths = sorted(folder.glob("*.avi"))[:6]
    settings = [(50, 0.02, False), (20, 0.02, False), (50, 0.2, False), (20, 0.2, False), (50, 0.02, True),
                (50, 0.2, True)]
    hits = truth = 0
    for i, (path, (fps, jitter, dropout)) in enumerate(zip(paths, settings)):
        ph = make_warped_phantom(load_cine(path).frames[20], fps=fps, heart_rate_bpm=65 + 5 * i, n_beats=4,
                                 rr_jitter=jitter, speckle=0.3, gain_drift=0.03, dropout=dropout,
                                 start_phase=0.15 * i, seed=i)
        found = detect_ed_es(ph.cine)
        T = ph.cine.num_frames
        for det, true in ((found.ed_frames, ph.ed_frames), (found.es_frames, ph.es_frames)):
            inner = [f for f in true if 3 <= f <= T - 4]
            acc = event_accuracy(det, inner, 3)
            hits, truth = hits + acc["hits"], truth + acc["truth"]
    assert truth >= 30
    assert hits >= 0.8 * truth, f"{hits}/{truth} ED/ES within 3 frames"


def test_evaluate_warped_on_an_echonet_layout_folder(tmp_path):
    """The measurement runs end to end on a folder of the EchoNet layout (one drawn cine here) and
    says which folder lacks the layout."""
    (tmp_path / "Videos").mkdir()
    write_avi(make_study("A4C", n_frames=10, size=(112, 112), seed=0), tmp_path / "Videos" / "a.avi")
    grid = {"rhythm": ("sinus",), "fps": (20,), "size": (112,), "dropout": (False,)}
    rows = evaluate_warped(tmp_path, n=3, seed=0, grid=grid, max_gain_drift=0.0)
    assert len(rows) == 1 and rows[0]["ed"]["truth"] >= 2 and rows[0]["ed"]["hits"] <= rows[0]["ed"]["truth"]
    (overall,) = [g for g in summarise(rows, ("fps",)) if g["setting"] == ("all",)]
    assert overall["n"] == 1 and overall["ed"][1] == rows[0]["ed"]["truth"]
    with pytest.raises(FileNotFoundError, match="Videos"):
        evaluate_warped(tmp_path / "missing", n=1)
