"""The image-beat rules on 1-D volume-like signals with known ED/ES: drift taken off, a skipped
beat halved back, an ES on the clip's first or last frames only where the clip shows the bottom,
and ES at the lowest frame after each stroke."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from EchoFMEngine.clinical import image_beats
from EchoFMEngine.clinical.image_beats import beats_from_signal

FPS = 50.0


def volume(beats: list, start: int = 0, strokes=None) -> tuple[np.ndarray, list, list]:
    """A volume curve of beats of the given lengths (frames): ejection over 35 % of the beat (ED at
    its start), a bottom held 6 % (isovolumic relaxation), rapid filling, then a slow diastasis.
    ``strokes``: the stroke size per beat (default 1). Returns (signal from frame ``start``, ED, ES)."""
    v, ed, es, t = [], [], [], 0
    for i, n in enumerate(beats):
        amp = 1.0 if strokes is None else strokes[i]
        x = np.arange(n) / n
        eject = 0.5 * (1 + np.cos(np.pi * np.clip(x / 0.35, 0, 1)))                   # 1 -> 0
        fill = np.clip((x - 0.41) / 0.25, 0, 1)
        refill = np.where(x < 0.41, 0.0, 0.85 * np.sin(0.5 * np.pi * fill) + 0.15 * np.clip((x - 0.66) / 0.34, 0, 1))
        beat = np.where(x < 0.35, eject, refill)
        v.append(1.0 - amp + amp * beat)
        ed.append(t)
        es.append(t + int(round(0.38 * n)))
        t += n
    v = np.concatenate(v)
    return v[start:], [f - start for f in ed if f >= start], [f - start for f in es if f >= start]


def near(found: list, truth: list, tol: int) -> bool:
    return all(min((abs(f - t) for f in found), default=99) <= tol for t in truth)


def test_a_drifting_signal_keeps_its_beats():
    v, ed, es = volume([40] * 5)
    drifted = v + np.linspace(0.0, 1.6, v.size)                         # a gain ramp of 1.6 strokes
    found = beats_from_signal(drifted, FPS)
    assert abs(found.period_frames - 40) <= 2
    assert near(found.ed, ed, 1) and near(found.es, es, 1)
    assert np.array_equal(found.signal, drifted)                          # the strip shows what was read


def test_without_drift_leaves_a_periodic_signal_and_a_partial_beat_alone():
    v, _, _ = volume([40] * 3 + [25])                                    # ends in a partial beat
    assert image_beats._without_drift(v, 40.0) is v


def test_alternating_strokes_are_two_beats_not_one():
    """Every other beat smaller and on a lower baseline: the signal repeats best at two beats."""
    v, ed, es = volume([36] * 10, strokes=[1.0, 0.55] * 5)
    v = v - np.repeat([0.0, 0.5] * 5, 36) + 0.02 * np.random.default_rng(0).standard_normal(v.size)
    found = beats_from_signal(v, FPS)
    assert abs(found.period_frames - 36) <= 2
    assert len(found.ed) == len(ed) and near(found.ed, ed, 3)  # the baseline step moves ED by up to 3


def test_es_is_the_lowest_frame_after_each_stroke():
    v, ed, es = volume([45] * 4)
    found = beats_from_signal(v, FPS)
    s = ndimage.gaussian_filter1d(v, max(1.0, 0.02 * FPS))
    for g in found.es:
        assert s[g] <= s[max(0, g - 1)] and s[g] <= s[min(v.size - 1, g + 1)]


@pytest.mark.parametrize("cut_at_bottom", [True, False])
def test_an_es_at_the_clip_end_only_where_the_clip_shows_the_bottom(cut_at_bottom):
    v, ed, es = volume([40] * 4)
    end = es[-1] + 2 if cut_at_bottom else es[-1] - 8                    # on the bottom / mid-stroke
    found = beats_from_signal(v[: end + 1], FPS)
    last = [f for f in found.es if f > ed[-1]]
    assert bool(last) == cut_at_bottom
    if cut_at_bottom:
        assert abs(last[0] - es[-1]) <= 2


@pytest.mark.parametrize("start_at_bottom", [True, False])
def test_an_es_at_frame_0_only_where_the_clip_starts_on_the_bottom(start_at_bottom):
    full, ed, es = volume([40] * 4)
    start = es[0] if start_at_bottom else es[0] + 6                      # on the bottom / in the refill
    found = beats_from_signal(full[start:], FPS)
    first = [f for f in found.es if f < found.ed[0]]
    assert bool(first) == start_at_bottom
    if start_at_bottom:
        assert first[0] <= 2
