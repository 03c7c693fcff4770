"""ECG: R-peak detection and quality (neurokit2), heart rate, peaks on the cine's frames.

The file readers (WFDB, CSV, DICOM ``WaveformSequence``) live in :mod:`EchoFMEngine.io.ecg`.
"""
from __future__ import annotations

import numpy as np

from EchoFMEngine.cine import Ecg
# the readers moved to io.ecg; re-exported so `from EchoFMEngine.clinical.ecg import read_wfdb` keeps working
from EchoFMEngine.io.ecg import clean_signal, ecg_from_dicom, is_lead_ii, read_ecg_csv, read_wfdb  # noqa: F401


def _is_inverted(cleaned: np.ndarray, fs: float) -> bool:
    """Main QRS deflection negative? Sign of the largest |value| in each 2 s window, by median.

    The first and last 0.5 s are left out: the cleaning filter's start-up transient there can
    outweigh a QRS (short recordings that begin on an R peak were read as inverted)."""
    edge = int(round(0.5 * fs))
    if cleaned.size > 4 * edge:
        cleaned = cleaned[edge:-edge]
    win = max(int(round(2.0 * fs)), 1)
    n = cleaned.size // win
    if n == 0:
        return bool(cleaned[np.argmax(np.abs(cleaned))] < 0)
    x = cleaned[: n * win].reshape(n, win)
    x = x - np.median(x, axis=1, keepdims=True)
    extreme = x[np.arange(n), np.argmax(np.abs(x), axis=1)]
    return bool(np.median(extreme) < 0)


def _clean_and_peaks(signal, fs: float) -> tuple[np.ndarray, np.ndarray]:
    import neurokit2 as nk  # deferred: neurokit2 takes seconds to import; only R-peak detection needs it

    if not fs > 0:
        raise ValueError(f"sampling frequency must be positive, got {fs}")
    x = clean_signal(signal)
    if x.size < int(2 * fs) or np.ptp(x) == 0:
        return x, np.zeros(0, dtype=np.int64)  # under 2 s or flat: no trustworthy beat
    cleaned = np.asarray(nk.ecg_clean(x, sampling_rate=fs, method="neurokit"), dtype=np.float64)
    if _is_inverted(cleaned, fs):
        cleaned = -cleaned
    try:
        _, info = nk.ecg_peaks(cleaned, sampling_rate=fs, method="neurokit")
    except (ValueError, IndexError):  # neurokit fails on signals without any QRS-like event
        return cleaned, np.zeros(0, dtype=np.int64)
    peaks = np.asarray(info["ECG_R_Peaks"], dtype=np.int64)
    return cleaned, np.unique(peaks)


def detect_r_peaks(signal: np.ndarray, fs: float) -> np.ndarray:
    """R-peak sample indices (neurokit2 ``ecg_clean`` + ``ecg_peaks``), for either lead polarity."""
    return _clean_and_peaks(signal, fs)[1]


def _template_correlation(cleaned: np.ndarray, peaks: np.ndarray, fs: float) -> float:
    """Mean Pearson correlation of each beat (-0.25 s..+0.40 s around R) with the average beat."""
    pre, post = int(round(0.25 * fs)), int(round(0.40 * fs))
    p = peaks[(peaks >= pre) & (peaks + post < cleaned.size)]
    if p.size < 3:
        return 0.0
    beats = cleaned[p[:, None] + np.arange(-pre, post)[None, :]]
    beats = beats - beats.mean(axis=1, keepdims=True)
    tmpl = beats.mean(axis=0)
    denom = np.linalg.norm(beats, axis=1) * np.linalg.norm(tmpl)
    r = np.divide(beats @ tmpl, denom, out=np.zeros(p.size), where=denom > 0)
    return float(np.clip(r.mean(), 0.0, 1.0))


def ecg_quality(signal: np.ndarray, fs: float, method: str = "template") -> float:
    """Signal quality in [0, 1]; 0 when fewer than 3 beats or a heart rate outside 25-250 bpm.

    ``template``: mean correlation of each beat with the average beat (absolute: clean ECG
    ~0.99, white noise ~0.4). ``averageQRS``: neurokit2's ``ecg_quality`` mean, which is
    rescaled within each recording (its worst beat is 0), so it ranks beats, not recordings."""
    cleaned, peaks = _clean_and_peaks(signal, fs)
    hr = heart_rate_bpm(peaks, fs)
    if peaks.size < 3 or not 25.0 <= hr <= 250.0:
        return 0.0
    if method == "template":
        return _template_correlation(cleaned, peaks, fs)
    if method == "averageQRS":
        import neurokit2 as nk  # deferred: neurokit2, as above

        q = np.asarray(nk.ecg_quality(cleaned, rpeaks=peaks, sampling_rate=fs, method="averageQRS"), dtype=np.float64)
        q = q[np.isfinite(q)]
        return float(np.clip(q.mean(), 0.0, 1.0)) if q.size else 0.0
    raise ValueError(f"unknown ECG quality method {method!r} (template, averageQRS)")


def heart_rate_bpm(peaks: np.ndarray, fs: float) -> float:
    """Heart rate from the median R-R interval; NaN with fewer than two peaks."""
    p = np.sort(np.asarray(peaks, dtype=np.float64).reshape(-1))
    if p.size < 2:
        return float("nan")
    rr = np.diff(p)
    rr = rr[rr > 0]
    return float(60.0 * fs / np.median(rr)) if rr.size else float("nan")


def peaks_to_frames(peak_samples: np.ndarray, ecg: Ecg, frame_times_s: np.ndarray) -> np.ndarray:
    """Nearest frame index of each R peak; peaks more than half a frame outside the clip are dropped."""
    ft = np.asarray(frame_times_s, dtype=np.float64).reshape(-1)
    p = np.asarray(peak_samples, dtype=np.float64).reshape(-1)
    if ft.size == 0 or p.size == 0:
        return np.zeros(0, dtype=np.int64)
    t = ecg.t0_s + p / ecg.fs
    half = 0.5 * (float(np.median(np.diff(ft))) if ft.size > 1 else 0.0)
    t = t[(t >= ft[0] - half) & (t <= ft[-1] + half)]
    if t.size == 0:
        return np.zeros(0, dtype=np.int64)
    j = np.clip(np.searchsorted(ft, t), 1, max(ft.size - 1, 1))
    if ft.size == 1:
        return np.zeros(1, dtype=np.int64)
    nearest = np.where(np.abs(t - ft[j - 1]) <= np.abs(ft[j] - t), j - 1, j)
    return np.unique(nearest.astype(np.int64))


def compare_peaks(detected: np.ndarray, reference: np.ndarray, fs: float, tolerance_s: float = 0.05) -> dict:
    """One-to-one match of detected vs reference beats within ``tolerance_s``: sensitivity, PPV, counts."""
    d = np.sort(np.asarray(detected, dtype=np.int64).reshape(-1))
    r = np.sort(np.asarray(reference, dtype=np.int64).reshape(-1))
    tol = tolerance_s * fs
    used = np.zeros(r.size, dtype=bool)
    tp = 0
    for x in d:
        k = np.searchsorted(r, x)
        best = None
        for c in (k - 1, k):
            if 0 <= c < r.size and not used[c] and abs(r[c] - x) <= tol:
                if best is None or abs(r[c] - x) < abs(r[best] - x):
                    best = c
        if best is not None:
            used[best] = True
            tp += 1
    return {
        "tp": tp, "fp": int(d.size - tp), "fn": int(r.size - tp),
        "sensitivity": tp / r.size if r.size else float("nan"),
        "ppv": tp / d.size if d.size else float("nan"),
    }
