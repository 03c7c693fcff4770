"""ECG file readers: WFDB records, CSV traces and DICOM ``WaveformSequence``, each into an
:class:`EchoFMEngine.cine.Ecg`.

Amplitudes are in mV where the source says its unit (DICOM uV is converted), otherwise in the source's own
unit. R peaks, heart rate and quality are :mod:`EchoFMEngine.clinical.ecg`'s.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from EchoFMEngine.cine import CineReadError, Ecg

_LEAD_II = re.compile(r"(?<![A-Za-z])(ML)?\s*II(?![A-Za-z])", re.IGNORECASE)
_SCPECG_LEAD_II = {"5.6.3-9-2", "2:2", "131074"}  # SCP-ECG and MDC codes of lead II
_UNIT_TO_MV = {"uv": 1e-3, "mv": 1.0, "v": 1e3}


def is_lead_ii(name: str) -> bool:
    """True for lead II labels ("II", "Lead II", "MLII", "ECG II"), False for "III", "aVR", ..."""
    return bool(_LEAD_II.search(name or ""))


def clean_signal(signal: np.ndarray) -> np.ndarray:
    """The trace as 1-D float64 with non-finite samples interpolated (all zeros when none is finite)."""
    x = np.asarray(signal, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(x)
    if bad.any():
        if bad.all():
            return np.zeros_like(x)
        idx = np.arange(x.size)
        x[bad] = np.interp(idx[bad], idx[~bad], x[~bad])
    return x


def read_wfdb(record_path, lead: str | None = None) -> Ecg:
    """One lead of a WFDB record (``.hea`` + ``.dat``): ``lead`` by name, else lead II/MLII, else the first."""
    # wfdb (heavy) is imported on first use, on purpose; its import calls pandas' deprecated
    # set_index(inplace=True), which is not the user's concern
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*inplace keyword.*")
        import wfdb  # deferred: wfdb (with pandas) is slow to import; only WFDB records need it

    path = Path(record_path)
    base = path.with_suffix("") if path.suffix in (".hea", ".dat", ".atr") else path
    try:
        rec = wfdb.rdrecord(str(base))
    except Exception as e:  # wfdb raises FileNotFoundError/ValueError/... on bad records
        raise CineReadError(base, f"not a readable WFDB record ({type(e).__name__}: {e})") from None
    names = list(rec.sig_name or [])
    if lead is not None:
        matches = [i for i, n in enumerate(names) if n.strip().lower() == lead.strip().lower()]
        if not matches:
            raise CineReadError(base, f"no lead {lead!r} (leads: {', '.join(names)})")
        idx = matches[0]
    else:
        idx = next((i for i, n in enumerate(names) if is_lead_ii(n)), 0)
    if rec.p_signal is None or rec.p_signal.shape[0] == 0:
        raise CineReadError(base, "record holds no samples")
    sig = clean_signal(rec.p_signal[:, idx])
    units = (rec.units or [""] * len(names))[idx] or ""
    sig = sig * _UNIT_TO_MV.get(units.strip().lower(), 1.0)
    return Ecg(signal=sig, fs=float(rec.fs), lead=names[idx] if names else "unknown", t0_s=0.0)


_TIME_COLUMNS = {"time": 1.0, "t": 1.0, "time_s": 1.0, "time[s]": 1.0, "time (s)": 1.0, "seconds": 1.0,
                 "s": 1.0, "sec": 1.0, "time_ms": 1e-3, "time[ms]": 1e-3, "time (ms)": 1e-3, "ms": 1e-3}


def read_ecg_csv(path, fs: float | None = None, t0_s: float = 0.0) -> Ecg:
    """ECG from a CSV: columns time (s; "time_ms" for ms) + value, or one value column with ``fs`` given."""
    import pandas as pd  # deferred on purpose: heavy, and only this reader needs it

    path = Path(path)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            first_line = next((ln for ln in f if ln.strip()), "")
        sep = next((d for d in (",", ";", "\t") if d in first_line), r"\s+" if len(first_line.split()) > 1 else ",")
        raw = pd.read_csv(path, sep=sep, engine="python", header=None, dtype=str, skip_blank_lines=True)
    except Exception as e:
        raise CineReadError(path, f"not a readable CSV ({type(e).__name__}: {e})") from None
    if raw.empty:
        raise CineReadError(path, "CSV holds no rows")
    first = raw.iloc[0]
    has_header = pd.to_numeric(first, errors="coerce").isna().any()
    header = [str(h).strip().lower() for h in first] if has_header else [""] * raw.shape[1]
    data = raw.iloc[1:] if has_header else raw
    num = data.apply(pd.to_numeric, errors="coerce")
    num = num.loc[:, ~num.isna().all()]
    header = [header[i] for i in num.columns]
    if num.shape[0] < 2 or num.shape[1] == 0:
        raise CineReadError(path, "CSV needs at least two numeric rows")
    time_idx = next((i for i, h in enumerate(header) if h in _TIME_COLUMNS), None)
    if time_idx is None and num.shape[1] >= 2 and fs is None:
        time_idx = 0
    lead = "unknown"
    if time_idx is None:
        if fs is None:
            raise CineReadError(path, "one value column and no time column: pass fs (Hz)")
        vidx = next((i for i, h in enumerate(header) if is_lead_ii(h)), 0)
        values = num.iloc[:, vidx].to_numpy(dtype=np.float64)
        lead = header[vidx] or lead
        return Ecg(signal=clean_signal(values), fs=fs, lead=lead, t0_s=t0_s)
    scale = _TIME_COLUMNS.get(header[time_idx], 1.0)
    others = [i for i in range(num.shape[1]) if i != time_idx]
    if not others:
        raise CineReadError(path, "CSV has a time column but no value column")
    vidx = next((i for i in others if is_lead_ii(header[i])), others[0])
    lead = header[vidx] or lead
    t = num.iloc[:, time_idx].to_numpy(dtype=np.float64) * scale
    v = num.iloc[:, vidx].to_numpy(dtype=np.float64)
    ok = np.isfinite(t)
    t, v = t[ok], clean_signal(v)[ok]
    dt = np.diff(t)
    if t.size < 2 or not np.all(dt > 0):
        raise CineReadError(path, "time column must increase strictly")
    step = float(np.median(dt))
    if np.max(np.abs(dt - step)) > 0.01 * step:  # irregular sampling: resample onto a uniform grid
        grid = np.arange(t[0], t[-1] + 0.5 * step, step)
        v, t = np.interp(grid, t, v), grid
    return Ecg(signal=v, fs=1.0 / step, lead=lead, t0_s=float(t[0]) + t0_s)


def _channel_name(ch) -> tuple[str, str]:
    src = ch.get("ChannelSourceSequence")
    code = ""
    meaning = ""
    if src:
        code = str(src[0].get("CodeValue", "") or "")
        meaning = str(src[0].get("CodeMeaning", "") or "")
    label = str(ch.get("ChannelLabel", "") or "")
    return (meaning or label or code or "unknown"), code


def _channel_unit(ch) -> str:
    units = ch.get("ChannelSensitivityUnitsSequence")
    return str(units[0].get("CodeValue", "") or "") if units else ""


def ecg_from_dicom(ds) -> Ecg | None:
    """ECG of a DICOM ``WaveformSequence``: lead II if present, else the first channel; None if absent.

    Prefers the longest multiplex group (a rhythm strip over a median beat). Channel sensitivity,
    correction factor and baseline are applied (pydicom), uV/V converted to mV. ``t0_s`` is
    ``MultiplexGroupTimeOffset`` minus the image's ``FrameDelay`` (both ms), i.e. relative to frame 0."""
    seq = ds.get("WaveformSequence")
    if not seq:
        return None
    candidates = []
    for gi, group in enumerate(seq):
        chans = group.get("ChannelDefinitionSequence") or []
        fs = group.get("SamplingFrequency")
        if not chans or not fs or not group.get("NumberOfWaveformSamples"):
            continue
        names = [_channel_name(c) for c in chans]
        ii = next((k for k, (n, code) in enumerate(names) if code in _SCPECG_LEAD_II or is_lead_ii(n)), None)
        label = str(group.get("MultiplexGroupLabel", "") or "").lower()
        score = (ii is not None, "median" not in label, int(group.NumberOfWaveformSamples))
        candidates.append((score, gi, ii if ii is not None else 0, names))
    if not candidates:
        return None
    _, gi, ci, names = max(candidates, key=lambda c: c[0])
    group = seq[gi]
    try:
        data = ds.waveform_array(gi)
    except Exception:
        return None  # a damaged waveform must not stop the images from loading
    sig = np.asarray(data[:, ci], dtype=np.float64)
    unit = _channel_unit(group.ChannelDefinitionSequence[ci]).strip().lower()
    sig = sig * _UNIT_TO_MV.get(unit, 1.0)
    offset_ms = float(group.get("MultiplexGroupTimeOffset", 0.0) or 0.0)
    frame_delay_ms = float(ds.get("FrameDelay", 0.0) or 0.0)
    return Ecg(signal=clean_signal(sig), fs=float(group.SamplingFrequency), lead=names[ci][0],
               t0_s=(offset_ms - frame_delay_ms) / 1000.0)
