"""The one-page PNG summary of a study: ED/ES frames with contours, volume curve over the ECG, numbers.

Flags come first, in red, at the top; a number behind a failed check is printed as UNRELIABLE
with the flags that make it so. Frames are drawn with everything outside the scan sector blanked
(:func:`EchoFMEngine.clinical.geometry.blank_outside_sector`: burned-in names, dates and institution text lie
there), and the title shows the derived study id, never the file name.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..tasks import DRAW_ORDER
from ..tasks import STRUCTURES as _STRUCTURES
from ..clinical.geometry import blank_outside_sector

# Contours drawn per structure (labels united), outer first so the endocardium stays visible.
STRUCTURES = [(s.title, s.labels, s.colour) for name in DRAW_ORDER for s in _STRUCTURES if s.name == name]


def _frame_panel(ax, frames, masks, frame, title):
    ax.imshow(frames[frame])
    if masks is not None and masks[frame].any():
        for _, labels, colour in STRUCTURES:
            region = np.isin(masks[frame], labels)
            if region.any():
                ax.contour(region, levels=[0.5], colors=colour, linewidths=1.0)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def _numbers(result) -> list[str]:
    lines = []
    if result.view:
        if result.view.get("probabilities"):
            p = max(result.view["probabilities"].values())
            lines.append(f"View: {result.view['label']} (p={p:.2f})")
        if result.view.get("user_label"):
            lines.append(f"View (user): {result.view['user_label']}")
    ph = result.phase or {}
    if ph:
        hr = ph.get("heart_rate_bpm")
        mark = "" if ph.get("heart_rate_reliable", True) else " UNRELIABLE"
        lines.append(f"ED/ES from {ph.get('method')}; HR " + (f"{hr:.0f} bpm{mark}" if hr else "unknown"))
    m = result.measurements
    if m:
        u = m.get("unit")
        reliable, why = m.get("reliable") or {}, m.get("unreliable_because") or {}
        for key, label in (("edv", "EDV"), ("esv", "ESV"), ("ef_percent", "EF %"), ("la_volume", "LA vol")):
            v = m.get(key)
            text = "n/a" if v is None else f"{v:.1f}" + ("" if key == "ef_percent" else f" {u}")
            if v is not None and reliable.get(key) is False:
                text += " UNRELIABLE (" + ", ".join(why.get(key, [])[:3]) + ")"
            lines.append(f"{label}: {text}")
    if result.scores.get("ef_regression"):
        lines.append(f"EF (regression head): {result.scores['ef_regression']['ef_percent']:.1f} %")
    if result.scores.get("as"):
        lines.append(f"AS: {result.scores['as']['label']}")
    models = (getattr(result, "provenance", None) or {}).get("models") or {}
    for task, p in sorted(models.items()):
        p = p or {}
        lines.append(f"model {task}: {str(p.get('sha256') or 'no checksum')[:12]}, trained on "
                     f"{str(p.get('trained_on'))[:30]}" + (" (PHANTOMS)" if p.get("trained_on_phantoms") else ""))
    lines += [f"needs weights/data: {k}" for k in sorted(result.needs)]
    return lines


def summary_figure(cine, result, path: Path) -> Path:
    import matplotlib  # deferred: matplotlib, loaded only when a figure is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: as above

    ph = result.phase or {}
    ed = (ph.get("ed_frames") or [0])[0]
    es_after = [f for f in ph.get("es_frames") or [] if f > ed] or (ph.get("es_frames") or [None])
    es = es_after[0]

    frames = blank_outside_sector(cine.frames)
    flags = [f"{f['name']}: {f['reason']}" if isinstance(f, dict) else str(f) for f in result.flags]
    top = 0.25 * min(len(flags), 8) + (0.25 if len(flags) > 8 else 0.0)
    fig = plt.figure(figsize=(11, 8 + top))
    gs = fig.add_gridspec(4, 3, height_ratios=[max(top / 3.0, 0.01), 1.4, 0.8, 0.35])   # ~3 in per unit
    fax = fig.add_subplot(gs[0, :])
    fax.axis("off")
    if flags:
        shown = flags[:8] + ([f"... and {len(flags) - 8} more flags (result.json)"] if len(flags) > 8 else [])
        fax.text(0, 1, "\n".join("FLAG " + f[:150] for f in shown), va="top", ha="left", fontsize=8.5,
                 color="#d00000", family="monospace", fontweight="bold")
    _frame_panel(fig.add_subplot(gs[1, 0]), frames, result.masks, ed, f"ED (frame {ed})")
    if es is not None:
        _frame_panel(fig.add_subplot(gs[1, 1]), frames, result.masks, es, f"ES (frame {es})")
    ax = fig.add_subplot(gs[1, 2])
    ax.axis("off")
    legend = "contours: " + ", ".join(name for name, _, _ in STRUCTURES) + " (green, blue, red)"
    ax.text(0, 1, "\n".join(_numbers(result) + ["", legend]), va="top", ha="left", fontsize=8,
            family="monospace", wrap=True)

    t = cine.frame_times_s
    ax = fig.add_subplot(gs[2, :])
    m = result.measurements or {}
    curve = m.get("lv_volume")
    if curve is not None and any(v is not None for v in curve):
        y = np.array([np.nan if v is None else v for v in curve], dtype=float)
        ax.plot(t, y, "o-", color="#e6194b", ms=3)
        ax.set_ylabel(f"LV volume ({m.get('unit')})")
    else:
        ax.text(0.5, 0.5, "no LV masks: no volume curve", ha="center", va="center", transform=ax.transAxes)
    ecg_ax = fig.add_subplot(gs[3, :], sharex=ax)
    if cine.ecg is not None:
        ecg_ax.plot(cine.ecg.times_s, cine.ecg.signal, color="#555555", lw=0.6)
    else:
        ecg_ax.text(0.5, 0.5, "no ECG", ha="center", va="center", transform=ecg_ax.transAxes)
    ecg_ax.set_yticks([])
    ecg_ax.set_ylabel("ECG")
    for a in (ax, ecg_ax):
        for f in ph.get("ed_frames", []):
            a.axvline(t[f], color="k", ls="--", lw=0.8)
        for f in ph.get("es_frames", []):
            a.axvline(t[f], color="grey", ls=":", lw=0.8)
    ax.set_xlim(t[0], t[-1] + 1.0 / cine.fps)
    ax.tick_params(labelbottom=False)
    ecg_ax.set_xlabel("time (s)   dashed: ED, dotted: ES")
    fig.suptitle(f"EchoFM analysis: study {result.study_id or 'unnamed'}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
