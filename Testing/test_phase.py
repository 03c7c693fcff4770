"""ED/ES detection: ECG, masks and image-only paths on phantoms with known frames, the event rules
(alternation, physiological gaps, nothing invented at the clip ends), bad input, a real cine."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from EchoFMEngine.cine import Cine
from EchoFMEngine.clinical.phase import MIN_SAME_KIND_S, Phase, detect_ed_es, event_accuracy, lv_area_curve
from EchoFMEngine.clinical.phantoms import make_study


@pytest.fixture(scope="module")
def sinus():
    return make_study("A4C", n_frames=60, size=(96, 96), fps=30, heart_rate_bpm=72, ef=55, seed=21)


@pytest.fixture(scope="module")
def afib():
    return make_study("A2C", n_frames=90, size=(96, 96), fps=50, heart_rate_bpm=85, ef=35, afib=True, seed=22)


def no_ecg(study):
    return dataclasses.replace(study.cine, ecg=None)


def assert_rules(ph: Phase, fps: float, T: int):
    """Events alternate, same-kind events are >= MIN_SAME_KIND_S apart, all inside the clip."""
    events = sorted([(f, "ed") for f in ph.ed_frames] + [(f, "es") for f in ph.es_frames])
    assert all(0 <= f < T for f, _ in events)
    assert all(a[1] != b[1] for a, b in zip(events[:-1], events[1:])), events
    for frames in (ph.ed_frames, ph.es_frames):
        assert np.all(np.diff(frames) >= np.floor(MIN_SAME_KIND_S * fps))
    json.dumps(ph.to_dict())


def assert_found(found, truth, tol):
    r = event_accuracy(found, truth, tol)
    assert r["hits"] == r["truth"] and r["false"] == 0, (list(found), list(truth))


def test_ecg_path(sinus, afib):
    # AF: a 1.8 s clip shows 3 irregular R-R intervals, the truth averages 4 (one before the clip)
    for st, es_tol, hr_tol in ((sinus, 2, 0.03), (afib, 3, 0.15)):
        ph = detect_ed_es(st.cine)
        assert ph.method == "ecg" and "R peaks" in ph.notes[0]
        assert_found(ph.ed_frames, st.ed_frames, 1)
        assert_found(ph.es_frames, st.es_frames, es_tol)  # ES from the images in each R-R interval
        assert ph.heart_rate_bpm == pytest.approx(st.heart_rate_bpm, rel=hr_tol)
        assert_rules(ph, st.cine.fps, st.cine.num_frames)
    with_masks = detect_ed_es(sinus.cine, masks=sinus.masks)
    assert with_masks.method == "ecg" and "masks" in with_masks.notes[0]
    assert_found(with_masks.es_frames, sinus.es_frames, 1)


def test_masks_path(sinus, afib):
    for st in (sinus, afib):
        ph = detect_ed_es(no_ecg(st), masks=st.masks)
        assert ph.method == "masks"
        assert_found(ph.ed_frames, st.ed_frames, 1)
        assert_found(ph.es_frames, st.es_frames, 1)
        shown = 60.0 * st.cine.fps / np.mean(np.diff(st.ed_frames))  # the beats the clip shows
        assert ph.heart_rate_bpm == pytest.approx(shown, rel=0.05)
        assert_rules(ph, st.cine.fps, st.cine.num_frames)


def test_image_path(sinus, afib):
    for st in (sinus, afib):
        ph = detect_ed_es(no_ecg(st))
        assert ph.method == "image"
        assert_found(ph.ed_frames, st.ed_frames, 3)
        assert_found(ph.es_frames, st.es_frames, 3)
        assert_rules(ph, st.cine.fps, st.cine.num_frames)


def test_sparse_masks_give_one_ed_and_one_es(sinus):
    labels = np.zeros_like(sinus.masks)
    ed, es = int(sinus.ed_frames[0]), int(sinus.es_frames[0])
    labels[[ed, es]] = sinus.masks[[ed, es]]
    ph = detect_ed_es(no_ecg(sinus), masks=labels)
    assert ph.method == "masks" and ph.ed_frames == [ed] and ph.es_frames == [es]
    assert any("largest" in n for n in ph.notes)


def test_short_clip_reports_only_what_it_shows():
    """Less than one cycle, no ECG: whatever is reported is a real event (within 3 frames),
    never the clip's first or last frame, with a note that no full cycle was seen."""
    st = make_study("A4C", n_frames=20, size=(96, 96), fps=30, heart_rate_bpm=60, ef=50, seed=5)
    ph = detect_ed_es(no_ecg(st))
    assert ph.method == "image" and any("no full cycle" in n for n in ph.notes)
    for found, truth in ((ph.ed_frames, st.ed_frames), (ph.es_frames, st.es_frames)):
        assert event_accuracy(found, truth, 3)["false"] == 0
        assert not set(found) & {0, 19}
    assert_rules(ph, 30.0, 20)


def test_area_curve_events_keep_alternation_and_gaps():
    """A beating disk (period 20 frames at 30 fps) with a one-frame glitch at the ES of the second
    beat and a dip 3 frames after the first ED: one ED per maximum, one ES per minimum."""
    T, fps = 60, 30.0
    t = np.arange(T)
    radius = 12 + 4 * np.cos(2 * np.pi * (t - 5) / 20)  # maxima at 5, 25, 45; minima at 15, 35, 55
    radius[35] += 2.5   # glitch at an ES
    radius[8] -= 3.0    # a dip too soon after an ED to be an ES
    yy, xx = np.mgrid[:40, :40]
    masks = ((yy - 20) ** 2 + (xx - 20) ** 2 <= radius[:, None, None] ** 2).astype(np.uint8)
    ph = detect_ed_es(Cine(frames=np.zeros((T, 40, 40), np.uint8), fps=fps), masks=masks)
    assert ph.method == "masks"
    assert_found(ph.ed_frames, [5, 25, 45], 1)
    assert_found(ph.es_frames, [15, 35, 55], 2)
    assert_rules(ph, fps, T)


def test_event_cleaning_rules():
    from EchoFMEngine.clinical.phase import _clean_events

    ev = [(0, "ed", 10.0), (3, "ed", 12.0), (10, "es", 2.0), (11, "ed", 9.0), (20, "es", 1.0),
          (22, "es", 3.0), (30, "ed", 11.0)]
    # two EDs in a row: the larger stays; an ED 1 frame after an ES: dropped; ES 10/20/22 in a
    # row: the smallest stays
    assert [e[:2] for e in _clean_events(ev, 8, 2)] == [(3, "ed"), (20, "es"), (30, "ed")]
    # ECG R peaks are kept in a row (no ES between), but not closer than min_same
    fixed = _clean_events([(0, "ed", np.inf), (3, "ed", np.inf), (12, "ed", np.inf), (16, "es", 1.0)], 8, 2,
                          fixed="ed")
    assert [e[:2] for e in fixed] == [(0, "ed"), (12, "ed"), (16, "es")]


def test_noise_has_no_events():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(40, 48, 48), dtype=np.uint8)
    ph = detect_ed_es(Cine(frames=frames, fps=30.0))
    assert ph.ed_frames == [] and ph.es_frames == [] and ph.heart_rate_bpm is None


def test_bad_input(sinus):
    with pytest.raises(ValueError, match="at least two frames"):
        detect_ed_es(Cine(frames=sinus.cine.frames[:1], fps=30.0))
    with pytest.raises(ValueError, match=r"\(59, 96, 96\).*\(60, 96, 96\)"):
        detect_ed_es(sinus.cine, masks=sinus.masks[:-1])


def test_area_curve_and_event_accuracy():
    masks = np.zeros((3, 4, 4), np.uint8)
    masks[0, :2] = 1
    masks[2, 0, 0] = 1
    assert np.array_equal(np.isnan(lv_area_curve(masks)), [False, True, False])
    assert lv_area_curve(masks)[0] == 8
    assert event_accuracy([3, 10, 30], [2, 14, 29], 3) == {"truth": 3, "hits": 2, "false": 1}


def test_real_a4c_cine(shared_data):
    """A real 20-frame A4C loop without ECG or labels (about one diastole: mitral valve closed in
    frames 0-1 and 19, open in 2-17): no full cycle, nothing at the clip's ends, at most one
    event of each kind."""
    from EchoFMEngine.io import load_cine

    cine = load_cine(shared_data / "echo" / "a4c_sequence.nii.gz")
    ph = detect_ed_es(cine)
    assert ph.method == "image" and any("no full cycle" in n for n in ph.notes)
    assert len(ph.ed_frames) <= 1 and len(ph.es_frames) <= 1
    assert not set(ph.ed_frames + ph.es_frames) & {0, cine.num_frames - 1}
    assert_rules(ph, cine.fps, cine.num_frames)
