"""Phantom studies: determinism, anatomy, truth volumes vs an independent disc measurement,
ED/ES timing, ECG R peaks, and DICOM / AVI / truth writers read back with the project's readers."""
from __future__ import annotations

import csv
import dataclasses
import json
import time

import numpy as np
import pydicom
import pytest

from EchoFMEngine.clinical import phantoms as synthetic
from EchoFMEngine.clinical.phantoms import LABELS, make_study, write_avi, write_dicom, write_truth


@pytest.fixture(scope="session")
def a4c():
    return make_study("A4C", seed=11)


@pytest.fixture(scope="session")
def a2c():
    return make_study("A2C", seed=12)


@pytest.fixture(scope="session")
def a4c_afib():
    return make_study("A4C", seed=13, afib=True, ef=35.0, heart_rate_bpm=90.0)


def _disc_volume_ml(cavity: np.ndarray, spacing_mm, n_discs: int = 20) -> float:
    """Method of discs written independently of the generator: L from the cavity's row extent
    (the phantom's long axis is vertical), each disc's diameter the overlap-weighted mean width
    of the rows in its slab, V = sum(pi (d/2)^2 L / n)."""
    sy, sx = spacing_mm
    rows = np.flatnonzero(cavity.any(axis=1))
    top, bottom = rows[0], rows[-1] + 1
    length = (bottom - top) * sy
    width = cavity.sum(axis=1) * sx
    edges = np.linspace(top, bottom, n_discs + 1)
    volume = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        r = np.arange(int(np.floor(lo)), int(np.ceil(hi)))
        overlap = np.clip(np.minimum(r + 1, hi) - np.maximum(r, lo), 0, None)
        d = np.sum(width[r] * overlap) / overlap.sum()
        volume += np.pi * (d / 2) ** 2 * length / n_discs
    return volume / 1000.0


def test_same_seed_same_study_and_different_seed_differs(a4c):
    again = make_study("A4C", seed=11)
    assert np.array_equal(again.cine.frames, a4c.cine.frames)
    assert np.array_equal(again.masks, a4c.masks)
    assert np.array_equal(again.cine.ecg.signal, a4c.cine.ecg.signal)
    assert np.array_equal(again.ed_frames, a4c.ed_frames) and again.ef == a4c.ef
    other = make_study("A4C", seed=99)
    assert not np.array_equal(other.cine.frames, a4c.cine.frames)


def test_shapes_labels_and_metadata(a4c):
    c = a4c.cine
    assert c.frames.shape == (64, 128, 128, 3) and c.frames.dtype == np.uint8
    assert a4c.masks.shape == (64, 128, 128) and a4c.masks.dtype == np.uint8
    assert set(np.unique(a4c.masks)) == {0, 1, 2, 3}
    for m in a4c.masks[:: 8]:  # every label in every frame, and the cavity wrapped in myocardium
        assert all((m == lab).any() for lab in (1, 2, 3))
        cavity = m == LABELS["lv_endo"]
        rows = np.flatnonzero(cavity.any(axis=1))
        mid = cavity[rows[len(rows) // 2]]
        left, right = np.flatnonzero(mid)[[0, -1]]
        row = m[rows[len(rows) // 2]]
        assert row[left - 1] == LABELS["lv_myo"] and row[right + 1] == LABELS["lv_myo"]
    assert c.spacing_mm is not None and c.spacing_mm[0] > 0
    assert c.fps == 30.0 and c.ecg is not None and c.ecg.fs == 500.0
    assert not (a4c.overlay & a4c.sector).any(), "burned-in overlay must stay outside the fan"
    assert (c.frames[:, ~a4c.sector & ~a4c.overlay] == 0).all(), "outside the fan is black"
    assert a4c.masks[:, ~a4c.sector].max() == 0


def test_a4c_has_right_heart_and_a2c_does_not(a4c, a2c):
    def dark_fraction_left_of_lv(st):
        ed = st.ed_frames[0]
        epi = st.masks[ed] > 0
        epi[st.masks[ed] == LABELS["la"]] = False
        rows = np.flatnonzero(epi.any(axis=1))
        band = slice(rows[0] + len(rows) // 4, rows[0] + 3 * len(rows) // 4)
        left_edge = min(np.flatnonzero(r)[0] for r in epi[band])
        region = np.zeros_like(epi)
        region[band, max(left_edge - 25, 0): left_edge - 3] = True
        region &= st.sector
        return float((st.cine.frames[ed, ..., 0][region] < 25).mean())

    assert dark_fraction_left_of_lv(a4c) > 0.3  # right ventricle beside the septum
    assert dark_fraction_left_of_lv(a2c) < 0.1  # tissue only
    assert a4c.view == "A4C" and a2c.view == "A2C"


@pytest.mark.parametrize("kwargs", [dict(view="A4C", ef=60.0, seed=1), dict(view="A2C", ef=30.0, seed=2),
                                    dict(view="A4C", ef=45.0, afib=True, seed=3, edv_ml=170.0)])
def test_truth_ef_matches_independent_disc_measurement(kwargs):
    st = make_study(n_frames=40, **kwargs)
    vols = np.array([_disc_volume_ml(m == LABELS["lv_endo"], st.cine.spacing_mm) for m in st.masks])
    edv, esv = vols[st.ed_frames].mean(), vols[st.es_frames].mean()
    ef = (edv - esv) / edv * 100
    assert abs(ef - st.ef) < 1.0
    assert edv == pytest.approx(st.edv_ml, rel=0.03) and esv == pytest.approx(st.esv_ml, rel=0.03)
    # and the drawn truth is close to what was asked for
    assert st.ef == pytest.approx(kwargs["ef"], abs=3.0)
    assert st.edv_ml == pytest.approx(kwargs.get("edv_ml", 120.0), rel=0.08)


@pytest.mark.parametrize("name", ["a4c", "a4c_afib"])
def test_ed_and_es_frames_are_max_and_min_cavity_area(name, request):
    st = request.getfixturevalue(name)
    area = (st.masks == LABELS["lv_endo"]).sum(axis=(1, 2))
    eds = list(st.ed_frames)
    assert len(eds) >= 2 and len(st.es_frames) >= 2
    for a, b in zip(eds[:-1], eds[1:]):
        seg = area[a:b]
        assert area[a] == seg.max()
        es = [e for e in st.es_frames if a <= e < b]
        assert len(es) == 1 and area[es[0]] == seg.min()
        # ES about 35-40 % of the R-R interval after ED
        assert 0.3 <= (es[0] - a) / (b - a) <= 0.45
    rr = np.diff(st.r_peak_times_s)
    if st.afib:
        assert rr.std() / rr.mean() > 0.08, "atrial fibrillation must have irregular R-R"
    else:
        assert rr.std() / rr.mean() < 0.05


@pytest.mark.parametrize("name", ["a4c", "a4c_afib"])
def test_detected_r_peaks_match_truth(name, request):
    from EchoFMEngine.clinical.ecg import detect_r_peaks

    st = request.getfixturevalue(name)
    ecg = st.cine.ecg
    detected = ecg.t0_s + detect_r_peaks(ecg.signal, ecg.fs) / ecg.fs
    lo, hi = ecg.t0_s + 0.3, ecg.t0_s + ecg.duration_s - 0.3  # detectors may skip a beat at an edge
    truth = st.r_peak_times_s[(st.r_peak_times_s > lo) & (st.r_peak_times_s < hi)]
    inner = detected[(detected > lo) & (detected < hi)]
    assert len(truth) >= 3 and len(inner) == len(truth)
    assert np.max(np.abs(inner - truth)) < 0.020
    # the recording covers the whole clip
    assert ecg.t0_s < 0 and ecg.t0_s + ecg.duration_s > st.cine.duration_s


def test_dicom_round_trip(a4c, tmp_path):
    from EchoFMEngine.io import load_cine

    path = write_dicom(a4c, tmp_path / "a4c.dcm")
    back = load_cine(path)
    c = a4c.cine
    assert np.array_equal(back.frames, c.frames)
    assert back.fps == pytest.approx(c.fps, rel=1e-6)
    assert back.spacing_mm == pytest.approx(c.spacing_mm, rel=1e-6)
    assert back.ecg is not None and back.ecg.fs == c.ecg.fs
    assert back.ecg.t0_s == pytest.approx(c.ecg.t0_s, abs=1e-6)
    assert np.allclose(back.ecg.signal, c.ecg.signal, atol=1e-3)  # 1 uV steps
    assert "II" in back.ecg.lead

    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == synthetic.US_MULTIFRAME_SOP and ds.Modality == "US"
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert int(ds.NumberOfFrames) == 64 and ds.PhotometricInterpretation == "RGB"
    region = ds.SequenceOfUltrasoundRegions[0]
    assert region.RegionDataType == 1 and region.PhysicalUnitsXDirection == 3
    assert float(region.PhysicalDeltaY) * 10 == pytest.approx(c.spacing_mm[0])
    wave = ds.WaveformSequence[0]
    assert wave.WaveformSampleInterpretation == "SS" and wave.WaveformBitsAllocated == 16
    assert str(ds.PatientName) == "PHANTOM^11"
    again = pydicom.dcmread(write_dicom(a4c, tmp_path / "again.dcm"))
    assert again.SOPInstanceUID == ds.SOPInstanceUID and again.StudyInstanceUID == ds.StudyInstanceUID
    assert pydicom.dcmread(write_dicom(make_study(n_frames=4, seed=5), tmp_path / "o.dcm")).SOPInstanceUID \
        != ds.SOPInstanceUID


def test_dicom_monochrome(tmp_path):
    from EchoFMEngine.io import load_cine

    st = make_study("A2C", n_frames=8, size=(64, 80), seed=4, overlay=False)
    back = load_cine(write_dicom(st, tmp_path / "mono.dcm", photometric="MONOCHROME2"))
    assert back.source.photometric == "MONOCHROME2"
    assert np.array_equal(back.frames, st.cine.frames)  # grey phantom: luma == every channel


def test_avi_round_trip(a2c, tmp_path):
    from EchoFMEngine.io import load_cine

    back = load_cine(write_avi(a2c, tmp_path / "a2c.avi"))
    assert back.num_frames == a2c.cine.num_frames
    assert back.fps == pytest.approx(a2c.cine.fps, rel=1e-6)
    assert np.array_equal(back.frames, a2c.cine.frames)  # ffv1 is lossless


def test_write_truth(a4c, tmp_path):
    path = write_truth(a4c, tmp_path / "t")
    truth = json.loads(path.read_text())
    assert truth["ed_frames"] == a4c.ed_frames.tolist() and truth["view"] == "A4C"
    assert truth["ef"] == pytest.approx(a4c.ef, abs=1e-3)
    assert np.array_equal(np.load(tmp_path / "t" / "masks.npy"), a4c.masks)


def test_cli_writes_studies_truth_and_index(tmp_path):
    from EchoFMEngine.cli import main

    out = tmp_path / "ph"
    rc = main(["phantom", "--out", str(out), "--n", "3", "--seed", "7", "--frames", "12",
               "--size", "64", "64", "--format", "both", "--afib-fraction", "0.5"])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "index.csv")))
    assert [r["view"] for r in rows] == ["A4C", "A2C", "A4C"]
    for r in rows:
        assert (out / r["dicom"]).is_file() and (out / r["avi"]).is_file()
        truth = json.loads((out / r["truth"] / "truth.json").read_text())
        assert truth["n_frames"] == 12 and truth["size"] == [64, 64]
        assert float(r["ef"]) == pytest.approx(truth["ef"], abs=1e-2)


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_study("PLAX")
    with pytest.raises(ValueError):
        make_study(ef=0.6)  # EF is in percent


def test_generation_is_fast():
    make_study(seed=0, n_frames=8)  # imports
    t = time.perf_counter()
    make_study(seed=21)
    assert time.perf_counter() - t < 2.0  # ~0.25 s on 2 cores for 64 frames of 128x128


def test_without_ecg():
    st = make_study(seed=3, n_frames=16, with_ecg=False, overlay=False)
    assert st.cine.ecg is None and not st.overlay.any()
    assert dataclasses.asdict(st.cine.source)["format"] == "phantom"
