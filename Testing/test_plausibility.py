"""Plausibility flags (issue 15): each one with an input that triggers it and one that does not; a
measurement behind a failed check is marked unreliable in result.json and results.csv; input gating
(multi-panel layouts, colour Doppler, view) on synthetic and real files."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from EchoFMEngine.clinical import geometry
from EchoFMEngine.analysis import analyze
from EchoFMEngine.analysis import plausibility as P
from EchoFMEngine.analysis.outputs import csv_row
from EchoFMEngine.clinical.phantoms import make_study

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def names(flags):
    return {f["name"] for f in flags}


@pytest.fixture(scope="module")
def study():
    return make_study("A4C", n_frames=48, size=(96, 112), fps=30.0, heart_rate_bpm=75, ef=55, seed=3)


@pytest.fixture(scope="module")
def empty_models(tmp_path_factory):
    return tmp_path_factory.mktemp("no_models")


# ------------------------------------------------------------------ rules on the numbers
def test_heart_rate_outside_30_220_is_flagged():
    assert "heart_rate_implausible" in names(P.check_heart_rate({"heart_rate_bpm": 21.0}, 50))
    assert "heart_rate_implausible" in names(P.check_heart_rate({"heart_rate_bpm": 240.0}, 50))
    assert not P.check_heart_rate({"heart_rate_bpm": 72.0, "ed_frames": [0, 40, 81, 121]}, 50)


def test_beat_lengths_that_disagree_are_flagged():
    skipped = {"heart_rate_bpm": 60.0, "ed_frames": [0, 40, 120, 160]}      # one beat skipped
    assert "beat_lengths_disagree" in names(P.check_heart_rate(skipped, 50))
    assert "beat_lengths_disagree" not in names(P.check_heart_rate({"ed_frames": [0, 40, 79, 120]}, 50))


def test_ed_es_order_and_spacing():
    assert "ed_es_order" in names(P.check_ed_es_timing({"ed_frames": [0, 10, 50], "es_frames": [25]}, 50))
    # systole of 700 ms at 75 bpm (period 0.8 s) is impossible; 300 ms is normal
    assert "ed_es_spacing" in names(P.check_ed_es_timing({"ed_frames": [0, 40], "es_frames": [35]}, 50))
    assert "ed_es_spacing" in names(P.check_ed_es_timing({"ed_frames": [0, 40], "es_frames": [2]}, 50))
    assert not P.check_ed_es_timing({"ed_frames": [0, 40, 80], "es_frames": [15, 55]}, 50)


def test_a_clip_shorter_than_one_beat():
    assert "too_short" in names(P.check_cine_length({"duration_s": 0.5}, {"heart_rate_bpm": 60.0}))
    assert "too_short" in names(P.check_cine_length({"duration_s": 0.76}, {}))         # no rate found
    assert not P.check_cine_length({"duration_s": 3.0}, {"heart_rate_bpm": 60.0})


def _m(edv, esv, unit="ml", **kw):
    ef = None if not edv else 100 * (edv - esv) / edv
    return {"edv": edv, "esv": esv, "ef_percent": ef, "unit": unit, "cycles": [], "notes": [], **kw}


def test_volume_rules():
    assert "esv_ge_edv" in names(P.check_volumes(_m(60, 80)))
    assert "ef_implausible" in names(P.check_volumes(_m(100, 98)))          # EF 2 %
    assert "ef_implausible" in names(P.check_volumes(_m(100, 5)))           # EF 95 %
    assert "volume_implausible" in names(P.check_volumes(_m(900, 400)))     # 900 ml
    assert not P.check_volumes(_m(120, 50))
    notes = _m(120, 50)
    notes["notes"] = ["ES frame(s) [12] have no LV mask: not measured"]
    assert "missing_lv_mask" in names(P.check_volumes(notes))


def test_volumes_in_pixels_are_judged_against_the_sector():
    big = _m(9e5, 4e5, unit="px^3", lv_area=[6000.0, 3000.0], ed_frames=[0])
    assert "volume_implausible" in names(P.check_volumes(big, sector_area_px=8000.0))      # LV = 75 % of sector
    fine = _m(9e5, 4e5, unit="px^3", lv_area=[1200.0, 800.0], ed_frames=[0])
    assert not P.check_volumes(fine, sector_area_px=8000.0)


def test_la_larger_than_lv_at_ed():
    m = np.zeros((2, 40, 40), np.uint8)
    m[0, 5:15, 5:15] = 1
    m[0, 20:38, 5:35] = 3
    assert "la_larger_than_lv" in names(P.check_la_vs_lv(m, [0]))
    m[0, 20:38, 5:35], m[0, 22:28, 10:16] = 0, 3
    assert not P.check_la_vs_lv(m, [0])


def test_masks_in_pieces_or_at_the_sector_edge():
    sector = np.zeros((60, 60), bool)
    sector[5:55, 5:55] = True
    m = np.zeros((1, 60, 60), np.uint8)
    m[0, 20:35, 20:35] = 1
    assert not P.check_mask_shape(m, [0], sector)
    two = m.copy()
    two[0, 40:48, 40:48] = 1
    assert "mask_fragmented" in names(P.check_mask_shape(two, [0], sector))
    edge = m.copy()
    edge[0, 5:35, 20:35] = 1
    assert "mask_touches_sector_edge" in names(P.check_mask_shape(edge, [0], sector))


def test_reliability_names_the_failed_checks():
    rel = P.reliability([P.flag("esv_ge_edv", "x"), P.flag("no_ecg", "y")])
    assert rel["ef_percent"] == {"reliable": False, "because": ["esv_ge_edv"]}
    assert rel["la_volume"]["reliable"] is True


# ------------------------------------------------------------------ end to end on phantoms
def test_swapped_ed_es_masks_give_a_flag_and_unreliable_numbers(study, empty_models):
    masks = study.masks.copy()
    ed, es = int(study.ed_frames[0]), int(study.es_frames[0])
    masks[ed], masks[es] = study.masks[es], study.masks[ed]     # the ED frame gets the small ventricle
    good = analyze(study.cine, models=empty_models, masks=study.masks)
    assert not {"esv_ge_edv", "ef_implausible", "volume_implausible"} & names(good.flags)
    assert all(good.measurements["reliable"].values())
    row = csv_row("s1", good.to_dict())
    assert row["unreliable"] == ""
    # every ED frame with ES-sized masks: EDV < ESV in every cycle
    bad_masks = study.masks.copy()
    for e in study.ed_frames:
        bad_masks[int(e)] = study.masks[es]
    bad = analyze(study.cine, models=empty_models, masks=bad_masks)
    assert "esv_ge_edv" in names(bad.flags)
    assert bad.measurements["reliable"]["ef_percent"] is False
    assert "esv_ge_edv" in bad.measurements["unreliable_because"]["ef_percent"]
    row = csv_row("s1", bad.to_dict())
    assert "ef_percent" in row["unreliable"].split() and "esv_ge_edv" in row["flags"]
    assert ed != es


def test_view_gating(study, empty_models):
    res = analyze(study.cine, models=empty_models)
    assert "view_unverified" in names(res.flags)
    res = analyze(study.cine, models=empty_models, view="A4C")
    assert "view_unverified" not in names(res.flags) and res.view["user_label"] == "A4C"
    res = analyze(study.cine, models=empty_models, view="PLAX", masks=study.masks)
    assert res.measurements is not None                   # the user's masks are measured...
    with pytest.raises(ValueError, match="view must be one of"):
        analyze(study.cine, models=empty_models, view="sideways")


# ------------------------------------------------------------------ input gating
def test_side_by_side_layout_is_cut_to_the_bmode_panel(study, empty_models):
    f = study.cine.frames
    double = dataclasses.replace(study.cine, frames=np.concatenate([f, f[:, :, ::-1]], axis=2))
    assert geometry.find_panels(f) == [(0, f.shape[2])]
    assert geometry.find_panels(double.frames) == [(0, f.shape[2]), (f.shape[2], 2 * f.shape[2])]
    res = analyze(double, models=empty_models)
    assert "multi_panel" in names(res.flags) and res.cine["width"] == f.shape[2]
    assert "multi_panel" not in names(analyze(study.cine, models=empty_models).flags)
    colour = f.copy()
    red = colour[..., 0]
    red[:, study.sector] = np.maximum(red[:, study.sector], 200)   # colour over both fans: no B-mode panel
    both = dataclasses.replace(study.cine, frames=np.concatenate([colour, colour[:, :, ::-1]], axis=2))
    with pytest.raises(ValueError, match="multi-panel layout refused"):
        analyze(both, models=empty_models)


def test_colour_doppler_is_flagged_on_the_real_file_and_not_on_bmode(study, empty_models):
    assert "colour_doppler" not in names(analyze(study.cine, models=empty_models).flags)
    path = DATA / "dicom" / "US-PAL-8-10x-echo.dcm"
    if not path.is_file():
        pytest.skip(f"real colour Doppler DICOM not found at {path} (../shared/data absent)")
    res = analyze(path, models=empty_models)
    assert "colour_doppler" in names(res.flags) and "too_short" in names(res.flags)


def test_real_echonet_cines_give_no_colour_or_panel_flags():
    videos = sorted((DATA / "echonet" / "dev100" / "Videos").glob("*.avi"))[:2]
    if not videos:
        pytest.skip("EchoNet dev100 not found under ../shared/data")
    from EchoFMEngine.io import load_cine

    for v in videos:
        c = load_cine(v)
        assert geometry.find_panels(c.frames) == [(0, c.shape[2])]
        assert not geometry.colour_doppler_frames(c.frames)
