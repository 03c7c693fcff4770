"""The one-page PNG summary of a study: ED/ES frames with contours, volume curve over the ECG, numbers."""
from __future__ import annotations

from pathlib import Path

import numpy as np

# Contours drawn per structure (labels united), outer first so the endocardium stays visible.
STRUCTURES = [("LV epi", (1, 2), "#3cb44b"), ("LA", (3,), "#4363d8"), ("LV endo", (1,), "#e6194b")]


def _frame_panel(ax, cine, masks, frame, title):
    ax.imshow(cine.frames[frame])
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
        p = max(result.view["probabilities"].values())
        lines.append(f"View: {result.view['label']} (p={p:.2f})")
    ph = result.phase or {}
    if ph:
        hr = ph.get("heart_rate_bpm")
        lines.append(f"ED/ES from {ph.get('method')}; HR " + (f"{hr:.0f} bpm" if hr else "unknown"))
    m = result.measurements
    if m:
        u = m.get("unit")
        for key, label in (("edv", "EDV"), ("esv", "ESV"), ("ef_percent", "EF %"), ("la_volume", "LA vol")):
            v = m.get(key)
            lines.append(f"{label}: " + ("n/a" if v is None else f"{v:.1f}" + ("" if key == "ef_percent" else f" {u}")))
    if result.scores.get("ef_regression"):
        lines.append(f"EF (regression head): {result.scores['ef_regression']['ef_percent']:.1f} %")
    if result.scores.get("as"):
        lines.append(f"AS: {result.scores['as']['label']}")
    lines += [f"flag: {f}" for f in result.flags]
    lines += [f"needs weights/data: {k}" for k in sorted(result.needs)]
    return lines


def summary_figure(cine, result, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ph = result.phase or {}
    ed = (ph.get("ed_frames") or [0])[0]
    es_after = [f for f in ph.get("es_frames") or [] if f > ed] or (ph.get("es_frames") or [None])
    es = es_after[0]
    fig = plt.figure(figsize=(11, 8))
    gs = fig.add_gridspec(3, 3, height_ratios=[1.4, 0.8, 0.35])
    _frame_panel(fig.add_subplot(gs[0, 0]), cine, result.masks, ed, f"ED (frame {ed})")
    if es is not None:
        _frame_panel(fig.add_subplot(gs[0, 1]), cine, result.masks, es, f"ES (frame {es})")
    ax = fig.add_subplot(gs[0, 2])
    ax.axis("off")
    legend = "contours: " + ", ".join(name for name, _, _ in STRUCTURES) + " (green, blue, red)"
    ax.text(0, 1, "\n".join(_numbers(result) + ["", legend]), va="top", ha="left", fontsize=8,
            family="monospace", wrap=True)

    t = cine.frame_times_s
    ax = fig.add_subplot(gs[1, :])
    m = result.measurements or {}
    curve = m.get("lv_volume")
    if curve is not None and any(v is not None for v in curve):
        y = np.array([np.nan if v is None else v for v in curve], dtype=float)
        ax.plot(t, y, "o-", color="#e6194b", ms=3)
        ax.set_ylabel(f"LV volume ({m.get('unit')})")
    else:
        ax.text(0.5, 0.5, "no LV masks: no volume curve", ha="center", va="center", transform=ax.transAxes)
    ecg_ax = fig.add_subplot(gs[2, :], sharex=ax)
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
    fig.suptitle(f"EchoFM analysis: {result.input}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
