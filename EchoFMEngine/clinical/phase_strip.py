"""The phase strip: a picture to check ED/ES at a glance (drawn by `python -m EchoFMEngine phase`,
``analysis.phase_command``, and in the analysis summary).

Top: the signal the detector read over time (seconds and frames), each found ED (red) and ES
(blue) marked, weak events dashed, flags in red above. Bottom: the frame at each ED and ES as a
thumbnail, blanked outside the scan sector (no burned-in text or identifiers reach the picture).
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from EchoFMEngine.cine import Cine  # noqa: E402
from EchoFMEngine.clinical.geometry import blank_outside, find_sector  # noqa: E402
from EchoFMEngine.clinical.image_beats import LOW_CONFIDENCE  # noqa: E402
from EchoFMEngine.clinical.phase import Phase  # noqa: E402

MAX_THUMBS = 8


def _thumbnails(cine: Cine, frames: list) -> list:
    sector = find_sector(cine.frames)
    grey = cine.grey()
    shown = grey[frames] if frames else grey[:0]
    if sector is None:  # nothing known to be image content: show nothing rather than text
        return [np.zeros_like(f) for f in shown]
    return list(blank_outside(shown, sector))


def phase_strip_figure(cine: Cine, phase: Phase, title: str = "cine") -> plt.Figure:
    """Signal with ED/ES marks and the ED/ES frames as thumbnails (see the module docstring)."""
    def confident(frames, conf):  # a Phase made without confidences counts every event as sure
        return zip(frames, conf if len(conf) == len(frames) else [1.0] * len(frames))

    events = sorted([(f, "ED", c) for f, c in confident(phase.ed_frames, phase.ed_confidence)] +
                    [(f, "ES", c) for f, c in confident(phase.es_frames, phase.es_confidence)])
    shown = events[:MAX_THUMBS]
    fig = plt.figure(figsize=(12, 5.6 if shown else 3.4))
    grid = fig.add_gridspec(2 if shown else 1, max(1, len(shown)), height_ratios=[1.3, 1] if shown else [1])
    ax = fig.add_subplot(grid[0, :])
    t = np.arange(cine.num_frames) / cine.fps
    if phase.signal is not None and np.isfinite(phase.signal).any():
        ax.plot(t, phase.signal, color="0.2", lw=1.2, label=phase.signal_name or "signal")
    for f, kind, conf in events:
        ax.axvline(f / cine.fps, color="tab:red" if kind == "ED" else "tab:blue",
                   ls="--" if conf < LOW_CONFIDENCE else "-", lw=1.4)
    hr = f"{phase.heart_rate_bpm:.0f} bpm" if phase.heart_rate_bpm else "heart rate unknown"
    ax.set_title(f"{title}: ED/ES from {phase.method}, {len(phase.ed_frames)} ED (red), "
                 f"{len(phase.es_frames)} ES (blue), {hr}; dashed = low confidence", fontsize=10)
    ax.set_xlabel("time (s)")
    ax.set_ylabel(phase.signal_name.split(" (")[0] if phase.signal_name else "signal")
    ax.set_xlim(0, max(t[-1], 1.0 / cine.fps))
    top = ax.secondary_xaxis("top", functions=(lambda s: s * cine.fps, lambda f: f / cine.fps))
    top.set_xlabel("frame", fontsize=8)
    if phase.signal is not None:
        ax.legend(loc="lower right", fontsize=8)
    if phase.flags:
        fig.text(0.01, 0.995, "\n".join(f"! {f['name']}: {f['reason']}" for f in phase.flags),
                 color="red", va="top", fontsize=8)
    for i, (img, (f, kind, conf)) in enumerate(zip(_thumbnails(cine, [e[0] for e in shown]), shown)):
        a = fig.add_subplot(grid[1, i])
        a.imshow(img, cmap="gray", vmin=0, vmax=1)
        a.set_title(f"{kind} frame {f}" + (" (weak)" if conf < LOW_CONFIDENCE else ""), fontsize=8,
                    color="tab:red" if kind == "ED" else "tab:blue")
        a.axis("off")
    fig.tight_layout(rect=(0, 0, 1, 0.93 if phase.flags else 1))
    return fig


def save_phase_strip(cine: Cine, phase: Phase, path, title: str = "cine") -> None:
    """Draw the phase strip of ``cine`` and write it to ``path`` (PNG), freeing the figure."""
    fig = phase_strip_figure(cine, phase, title=title)
    fig.savefig(path, dpi=90)
    plt.close(fig)
