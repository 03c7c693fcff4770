"""ECG: R-peak accuracy on MIT-BIH record 100, DICOM waveform extraction, readers, helpers."""
from __future__ import annotations

import numpy as np
import pytest

from EchoFMEngine.cine import CineReadError, Ecg
from EchoFMEngine.clinical import ecg as clinical_ecg
from EchoFMEngine.clinical.ecg import compare_peaks, detect_r_peaks, ecg_quality, heart_rate_bpm, peaks_to_frames
from EchoFMEngine.io.ecg import ecg_from_dicom, is_lead_ii, read_ecg_csv, read_wfdb

BEAT_SYMBOLS = set("NLRBAaJSVrFejnE/fQ?")  # PhysioNet beat annotation codes (not rhythm/noise marks)


@pytest.fixture(scope="session")
def mitbih_100(shared_data):
    wfdb = pytest.importorskip("wfdb")
    rec = str(shared_data / "ecg" / "100")
    ann = wfdb.rdann(rec, "atr")
    ref = np.array([s for s, sym in zip(ann.sample, ann.symbol) if sym in BEAT_SYMBOLS])
    return read_wfdb(rec), ref


def test_mitbih_100_r_peaks(mitbih_100):
    ecg, ref = mitbih_100
    assert ecg.lead == "MLII" and ecg.fs == 360.0 and ecg.signal.size == 650000
    assert ref.size == 2273
    m = compare_peaks(detect_r_peaks(ecg.signal, ecg.fs), ref, ecg.fs, tolerance_s=0.05)
    print(f"MIT-BIH 100 (30 min, MLII): sensitivity {m['sensitivity']:.4f}, PPV {m['ppv']:.4f}, "
          f"TP {m['tp']} FP {m['fp']} FN {m['fn']}")
    assert m["sensitivity"] >= 0.995 and m["ppv"] >= 0.995


def test_r_peaks_polarity_robust(mitbih_100):
    ecg, ref = mitbih_100
    n = 360 * 300  # 5 minutes of the inverted lead
    m = compare_peaks(detect_r_peaks(-ecg.signal[:n], ecg.fs), ref[ref < n - 18], ecg.fs)
    assert m["sensitivity"] >= 0.995 and m["ppv"] >= 0.995


def test_heart_rate_and_quality(mitbih_100):
    ecg, _ = mitbih_100
    x = ecg.signal[: 360 * 60]
    hr = heart_rate_bpm(detect_r_peaks(x, ecg.fs), ecg.fs)
    assert 70 < hr < 80  # record 100 runs at about 75 bpm
    good = ecg_quality(x, ecg.fs)
    noise = ecg_quality(np.random.default_rng(0).standard_normal(x.size), ecg.fs)
    assert good > 0.95 and noise < 0.6 and 0.0 <= noise <= 1.0
    assert ecg_quality(np.zeros(5000), 360.0) == 0.0
    assert 0.0 <= ecg_quality(x, ecg.fs, method="averageQRS") <= 1.0


def test_pydicom_waveform_ecg():
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("waveform_ecg.dcm"))
    ecg = ecg_from_dicom(ds)
    assert ecg is not None and ecg.lead == "Lead II"
    assert ecg.fs == 1000.0 and ecg.signal.size == 10000  # the 10 s rhythm group, not the median beat
    raw_uv = ds.waveform_array(0)[:, 1]
    np.testing.assert_allclose(ecg.signal, raw_uv / 1000.0, rtol=1e-6)  # uV -> mV
    hr = heart_rate_bpm(detect_r_peaks(ecg.signal, ecg.fs), ecg.fs)
    print(f"waveform_ecg.dcm lead II heart rate: {hr:.2f} bpm")
    assert abs(hr - 61) <= 2


def test_ecg_from_dicom_without_waveform():
    pydicom = pytest.importorskip("pydicom")
    assert ecg_from_dicom(pydicom.Dataset()) is None


def test_simulated_heart_rate():
    nk = pytest.importorskip("neurokit2")
    sig = nk.ecg_simulate(duration=20, sampling_rate=250, heart_rate=90, random_state=3)
    assert abs(heart_rate_bpm(detect_r_peaks(sig, 250), 250) - 90) <= 2


def test_detect_edge_cases():
    assert detect_r_peaks(np.zeros(3000), 500).size == 0
    assert detect_r_peaks(np.ones(100), 500).size == 0  # < 2 s
    with pytest.raises(ValueError):
        detect_r_peaks(np.zeros(3000), 0)
    assert np.isnan(heart_rate_bpm(np.array([10]), 500))
    assert heart_rate_bpm(np.array([0, 500, 1000, 1600]), 500) == pytest.approx(60.0)


def test_peaks_to_frames():
    ecg = Ecg(signal=np.zeros(2000), fs=500.0, t0_s=-0.5)  # ECG starts 0.5 s before frame 0
    frame_times = np.arange(10) * 0.1  # 10 frames at 10 fps: 0.0 .. 0.9 s
    # samples -> times: 0 -> -0.5 (out), 260 -> 0.02 (frame 0), 480 -> 0.46 (frame 5),
    # 970 -> 1.44 (out: beyond the last frame + half a frame), 720 -> 0.94 (frame 9)
    np.testing.assert_array_equal(peaks_to_frames(np.array([0, 260, 480, 970, 720]), ecg, frame_times), [0, 5, 9])
    assert peaks_to_frames(np.array([], dtype=int), ecg, frame_times).size == 0


def test_is_lead_ii():
    assert all(is_lead_ii(n) for n in ("II", "Lead II", "MLII", "ECG II", "ii"))
    assert not any(is_lead_ii(n) for n in ("III", "Lead III", "aVR", "V2", "I", ""))


def test_read_wfdb_lead_choice(shared_data):
    pytest.importorskip("wfdb")
    v5 = read_wfdb(shared_data / "ecg" / "100.hea", lead="V5")
    assert v5.lead == "V5" and v5.fs == 360.0
    with pytest.raises(CineReadError, match="no lead 'aVF'"):
        read_wfdb(shared_data / "ecg" / "100", lead="aVF")
    with pytest.raises(CineReadError, match="WFDB"):
        read_wfdb(shared_data / "ecg" / "does_not_exist")


def test_read_ecg_csv(tmp_path):
    fs = 250.0
    t = np.arange(500) / fs + 0.2
    v = np.sin(2 * np.pi * t)
    np.savetxt(tmp_path / "a.csv", np.c_[t, v], delimiter=",", header="time,ecg_II", comments="")
    e = read_ecg_csv(tmp_path / "a.csv")
    assert e.fs == pytest.approx(fs) and e.t0_s == pytest.approx(0.2) and e.lead == "ecg_ii"
    np.testing.assert_allclose(e.signal, v, atol=1e-6)

    np.savetxt(tmp_path / "ms.csv", np.c_[t * 1000, v], delimiter=",", header="time_ms,value", comments="")
    assert read_ecg_csv(tmp_path / "ms.csv").fs == pytest.approx(fs)

    np.savetxt(tmp_path / "one.csv", v)
    e = read_ecg_csv(tmp_path / "one.csv", fs=fs)
    assert e.fs == fs and e.signal.size == 500 and e.t0_s == 0.0
    with pytest.raises(CineReadError, match="pass fs"):
        read_ecg_csv(tmp_path / "one.csv")

    jitter = t + np.random.default_rng(0).uniform(-0.2, 0.2, t.size) / fs  # irregular: resampled
    np.savetxt(tmp_path / "j.csv", np.c_[jitter, np.sin(2 * np.pi * jitter)], delimiter=",")
    e = read_ecg_csv(tmp_path / "j.csv")
    np.testing.assert_allclose(e.signal, np.sin(2 * np.pi * e.times_s), atol=0.02)

    (tmp_path / "bad.csv").write_text("time,value\n1,2\n0,3\n")
    with pytest.raises(CineReadError, match="increase"):
        read_ecg_csv(tmp_path / "bad.csv")


def test_short_recording_starting_on_an_r_peak_keeps_its_polarity():
    """The cleaning filter's start-up transient must not flip the lead (R peaks read as S waves)."""
    import neurokit2 as nk
    for sign in (1, -1):
        x = sign * nk.ecg_simulate(duration=10, sampling_rate=500, heart_rate=70, random_state=3, method="ecgsyn")
        full = detect_r_peaks(x, 500)
        start = full[1]
        got = detect_r_peaks(x[start:start + 2000], 500)           # 4 s beginning exactly on an R peak
        ref = full[(full >= start) & (full < start + 2000)] - start
        assert len(got) >= len(ref) - 1
        assert np.max(np.min(np.abs(got[:, None] - ref[None]), axis=1)) <= 5   # within 10 ms


def test_readers_still_import_from_clinical_ecg():
    """The readers moved to io.ecg; users' ``from EchoFMEngine.clinical.ecg import read_wfdb`` keeps working."""
    assert (clinical_ecg.read_wfdb, clinical_ecg.read_ecg_csv, clinical_ecg.ecg_from_dicom, clinical_ecg.is_lead_ii) \
        == (read_wfdb, read_ecg_csv, ecg_from_dicom, is_lead_ii)
