"""Plausibility checks on an analysis result: named flags with a one-line reason each.

A number that fails a check is still reported, but marked unreliable (``measurements["reliable"]``)
so that no impossible value reaches a reader as a plain number. Every check here is a plain
rule on the result (heart rate, ED/ES timing, volumes, masks), no model is involved.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage

from ..tasks import LABEL_VALUES

HR_RANGE_BPM = (30.0, 220.0)
EF_RANGE = (5.0, 90.0)
TYPICAL_BEAT_S = 1.0        # one beat at 60 bpm: the length test when no heart rate is known
BEAT_SPREAD = 0.35          # (longest - shortest) / median ED-ED interval above this: beats disagree
SYSTOLE_S = (0.08, 0.65)    # ED -> ES lasts about 0.2-0.45 s in adults; outside this band it is not systole
SYSTOLE_OF_PERIOD = 0.75    # nor can systole take more than 3/4 of the beat
# Physiological ranges in ml (adult and child LV, LA), used when the pixel spacing is known.
VOLUME_ML = {"edv": (10.0, 450.0), "esv": (2.0, 350.0), "la_volume": (3.0, 300.0)}
# Without spacing: the LV cavity at ED as a share of the scan sector (an apical view: a few to ~40 %).
LV_SECTOR_SHARE = (0.01, 0.5)
MIN_COMPONENT_SHARE = 0.05  # a second piece larger than 5 % of the main one makes a mask "fragmented"
MEASURED = ("edv", "esv", "ef_percent", "la_volume")


def flag(name: str, reason: str) -> dict:
    """One flag as written in ``result.json``: ``{"name": ..., "reason": ...}``."""
    return {"name": str(name), "reason": str(reason)}


def as_flag(f) -> dict:
    """A flag from a dict or a legacy ``"name: reason"`` string."""
    if isinstance(f, dict):
        return flag(f.get("name", "flag"), f.get("reason", ""))
    name, _, reason = str(f).partition(":")
    return flag(name.strip(), reason.strip())


def merge(flags: list, new) -> list:
    """``flags`` with ``new`` added (one entry per name: the first reason is kept)."""
    seen = {f["name"] for f in flags}
    for f in new or []:
        f = as_flag(f)
        if f["name"] not in seen:
            flags.append(f)
            seen.add(f["name"])
    return flags


def check_heart_rate(phase: dict, fps: float) -> list:
    """Heart rate outside 30-220 bpm; ED-ED intervals that disagree (skipped or doubled beats)."""
    out = []
    hr = phase.get("heart_rate_bpm")
    if hr is not None and np.isfinite(hr) and not HR_RANGE_BPM[0] <= hr <= HR_RANGE_BPM[1]:
        out.append(flag("heart_rate_implausible",
                        f"heart rate {hr:.0f} bpm lies outside {HR_RANGE_BPM[0]:.0f}-{HR_RANGE_BPM[1]:.0f} bpm"))
    ed = sorted(phase.get("ed_frames") or [])
    if len(ed) >= 3:
        d = np.diff(ed).astype(float)
        spread = (d.max() - d.min()) / float(np.median(d))
        if spread > BEAT_SPREAD:
            out.append(flag("beat_lengths_disagree",
                            f"ED-to-ED intervals of {int(d.min())}-{int(d.max())} frames differ by "
                            f"{100 * spread:.0f} % of the median (a beat skipped or split?)"))
    return out


def check_ed_es_timing(phase: dict, fps: float) -> list:
    """ED and ES must alternate, and systole (ED -> ES) must last a plausible time for the rate."""
    ed, es = list(phase.get("ed_frames") or []), list(phase.get("es_frames") or [])
    events = sorted([(f, "ed") for f in ed] + [(f, "es") for f in es])
    kinds = [k for _, k in events]
    if any(a == b for a, b in zip(kinds, kinds[1:])):
        run = next(f"{k.upper()} at frames {events[i][0]} and {events[i + 1][0]}"
                   for i, (k, k2) in enumerate(zip(kinds, kinds[1:])) if k == k2)
        return [flag("ed_es_order", f"ED and ES do not alternate: two {run} with no event between")]
    if not fps or len(ed) < 1:
        return []
    period = float(np.median(np.diff(sorted(ed)))) / fps if len(ed) > 1 else None
    hr = phase.get("heart_rate_bpm")
    if period is None and hr:
        period = 60.0 / float(hr)
    for (f0, k0), (f1, k1) in zip(events, events[1:]):
        if k0 == "ed" and k1 == "es":
            s = (f1 - f0) / fps
            top = SYSTOLE_S[1] if period is None else min(SYSTOLE_S[1], SYSTOLE_OF_PERIOD * period)
            if not SYSTOLE_S[0] <= s <= max(top, SYSTOLE_S[0]):
                return [flag("ed_es_spacing", f"ED frame {f0} to ES frame {f1} is {1000 * s:.0f} ms; systole lasts "
                                              f"{1000 * SYSTOLE_S[0]:.0f}-{1000 * top:.0f} ms at this heart rate")]
    return []


def check_cine_length(cine_facts: dict, phase: dict) -> list:
    """A clip shorter than one beat holds no full cycle: EF from it is a guess."""
    dur, hr = cine_facts.get("duration_s"), phase.get("heart_rate_bpm")
    if dur is None:
        return []
    if hr and np.isfinite(hr) and hr > 0:
        beat = 60.0 / float(hr)
        if dur < beat:
            return [flag("too_short", f"the clip lasts {dur:.2f} s, less than one beat ({beat:.2f} s at {hr:.0f} bpm)")]
    elif dur < TYPICAL_BEAT_S:                  # no rate known: shorter than a typical resting beat
        return [flag("too_short", f"the clip lasts {dur:.2f} s, less than a typical beat ({TYPICAL_BEAT_S:.1f} s at "
                                  f"60 bpm), and no heart rate was found")]
    return []


def check_volumes(m: dict, sector_area_px: Optional[float] = None) -> list:
    """ESV >= EDV, EF outside 5-90 %, volumes outside physiological ranges (ml, or sector share in px)."""
    out = []
    edv, esv, ef = m.get("edv"), m.get("esv"), m.get("ef_percent")
    cycles_bad = [c for c in m.get("cycles") or [] if c.get("edv") is not None and c.get("esv") is not None
                  and c["esv"] >= c["edv"]]
    if (edv is not None and esv is not None and esv >= edv) or cycles_bad:
        where = (f"ED {cycles_bad[0]['ed_frame']} / ES {cycles_bad[0]['es_frame']}" if cycles_bad else "mean")
        out.append(flag("esv_ge_edv", f"ESV is not smaller than EDV ({where}): ED and ES swapped or masks wrong"))
    if any("no LV mask" in str(n) for n in m.get("notes") or []):
        out.append(flag("missing_lv_mask", next(str(n) for n in m["notes"] if "no LV mask" in str(n))))
    if ef is not None and not EF_RANGE[0] <= ef <= EF_RANGE[1]:
        out.append(flag("ef_implausible", f"EF {ef:.1f} % lies outside {EF_RANGE[0]:.0f}-{EF_RANGE[1]:.0f} %"))
    if m.get("unit") == "ml":
        bad = [f"{k.upper() if k != 'la_volume' else 'LA'} {m[k]:.0f} ml (expected {lo:.0f}-{hi:.0f})"
               for k, (lo, hi) in VOLUME_ML.items() if m.get(k) is not None and not lo <= m[k] <= hi]
        if bad:
            out.append(flag("volume_implausible", "; ".join(bad)))
    elif sector_area_px:
        areas = m.get("lv_area") or []
        ed_areas = [areas[f] for f in m.get("ed_frames") or [] if f < len(areas) and areas[f]]
        if ed_areas:
            share = float(np.median(ed_areas)) / float(sector_area_px)
            if not LV_SECTOR_SHARE[0] <= share <= LV_SECTOR_SHARE[1]:
                out.append(flag("volume_implausible",
                                f"the LV cavity at ED covers {100 * share:.1f} % of the scan sector (spacing unknown; "
                                f"expected {100 * LV_SECTOR_SHARE[0]:.0f}-{100 * LV_SECTOR_SHARE[1]:.0f} %)"))
    return out


def check_la_vs_lv(masks: np.ndarray, ed_frames) -> list:
    """The LA should not be larger than the LV cavity at end-diastole."""
    for f in ed_frames or []:
        if 0 <= f < len(masks):
            lv, la = int((masks[f] == LABEL_VALUES["lv_cavity"]).sum()), int((masks[f] == LABEL_VALUES["la"]).sum())
            if lv and la > lv:
                return [flag("la_larger_than_lv", f"at ED frame {f} the LA ({la} px) is larger than the LV cavity "
                                                  f"({lv} px): labels swapped or the view is not apical")]
    return []


def check_mask_shape(masks: np.ndarray, frames, sector: Optional[np.ndarray]) -> list:
    """LV cavity in several pieces, or touching the edge of the scan sector (cut off, not measurable)."""
    out, pieces, edge = [], [], []
    ring = None
    if sector is not None and sector.any():
        ring = sector & ~ndimage.binary_erosion(sector, iterations=2)
    for f in frames or []:
        if not 0 <= f < len(masks):
            continue
        lv = masks[f] == 1
        if not lv.any():
            continue
        lab, n = ndimage.label(lv)
        if n > 1:
            sizes = np.sort(np.bincount(lab.ravel())[1:])[::-1]
            if sizes[1] >= MIN_COMPONENT_SHARE * sizes[0]:
                pieces.append(f)
        if ring is not None and (lv & ring).sum() > 0.02 * lv.sum():
            edge.append(f)
    if pieces:
        out.append(flag("mask_fragmented", f"the LV cavity mask falls into several pieces on frame(s) {pieces[:5]}"))
    if edge:
        out.append(flag("mask_touches_sector_edge", f"the LV cavity mask runs into the edge of the scan sector on "
                                                    f"frame(s) {edge[:5]}: the ventricle is cut off"))
    return out


# Which measurements each flag makes unreliable.
AFFECTS = {
    "heart_rate_implausible": ("heart_rate_bpm", "edv", "esv", "ef_percent"),
    "beat_lengths_disagree": ("heart_rate_bpm", "edv", "esv", "ef_percent"),
    "ed_es_order": ("heart_rate_bpm", "edv", "esv", "ef_percent"),
    "ed_es_spacing": ("edv", "esv", "ef_percent"),
    "too_short": ("heart_rate_bpm", "edv", "esv", "ef_percent", "la_volume"),
    "no_full_cycle": ("edv", "esv", "ef_percent"),
    "esv_ge_edv": ("edv", "esv", "ef_percent"),
    "missing_lv_mask": ("edv", "esv", "ef_percent"),
    "ef_implausible": ("ef_percent",),
    "volume_implausible": ("edv", "esv", "ef_percent", "la_volume"),
    "la_larger_than_lv": ("la_volume", "edv"),
    "mask_fragmented": ("edv", "esv", "ef_percent"),
    "mask_touches_sector_edge": ("edv", "esv", "ef_percent"),
    "phase_low_confidence": ("heart_rate_bpm", "edv", "esv", "ef_percent"),
    "no_heartbeat_found": ("heart_rate_bpm", "edv", "esv", "ef_percent"),
    "view_unverified": ("edv", "esv", "ef_percent", "la_volume"),
    "view_not_apical": ("edv", "esv", "ef_percent", "la_volume"),
    "colour_doppler": ("edv", "esv", "ef_percent", "la_volume"),
    "phantom_model_on_real_cine": ("edv", "esv", "ef_percent", "la_volume"),
    "multi_panel": (),
}


def reliability(flags: list, keys=("heart_rate_bpm",) + MEASURED) -> dict:
    """``{key: {"reliable": bool, "because": [flag names]}}`` for the reported numbers."""
    out = {}
    for k in keys:
        why = [f["name"] for f in flags if k in AFFECTS.get(f["name"], ())]
        out[k] = {"reliable": not why, "because": why}
    return out


def check_result(result_dict: dict, masks: Optional[np.ndarray] = None, sector: Optional[np.ndarray] = None,
                 fps: Optional[float] = None) -> list:
    """Every plausibility flag for one result (``StudyResult.to_dict()``, masks in original pixels)."""
    phase = result_dict.get("phase") or {}
    facts = result_dict.get("cine") or {}
    fps = fps or facts.get("fps")
    out = []
    if phase:
        out += check_heart_rate(phase, fps)
        out += check_ed_es_timing(phase, fps)
        out += check_cine_length(facts, phase)
    m = result_dict.get("measurements")
    if m:
        out += check_volumes(m, float(sector.sum()) if sector is not None and sector.any() else None)
    if masks is not None:
        ed = (m or {}).get("ed_frames") or phase.get("ed_frames") or []
        es = (m or {}).get("es_frames") or phase.get("es_frames") or []
        out += check_la_vs_lv(masks, ed)
        out += check_mask_shape(masks, sorted(set(ed) | set(es)), sector)
    return out
