"""Propagate drawn or corrected ED/ES segmentations to every frame of a cine (Qt-free).

The user's segmentations (one or more frames) go to :func:`EchoFMEngine.propagate_masks`; the
result becomes a segmentation sequence in the cine's browser whose per-frame source is
``corrected`` (a frame the user drew, copied unchanged) or ``propagated``. The user's nodes are
never written to. The LV volume curve, ED/ES (from the propagated curve unless an ECG is there)
and EDV/ESV/EF are measured on all frames, into a table and a plot. Nothing in the scene changes
when the input is bad or the run is cancelled; :func:`undo_propagation` removes the last result.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from .scene import Logics, all_or_nothing
from . import measurements as meas, segmentation_nodes as sn
from .ecg_nodes import frame_marker_time
from EchoFMEngine.clinical.measure import cardiac_measurements
from EchoFMEngine.clinical.phase import detect_ed_es
from EchoFMEngine.clinical.propagate import propagate_masks

SOURCE = "propagated"
FRAME_SOURCES_ATTR = "EchoFM.frameSources"
ROLE = "propagated-segmentation"


@dataclass
class PropagationResult:
    """What one propagation made: the sequence, its per-frame sources, measurements and nodes."""

    sequence: object
    labels: np.ndarray
    frame_sources: list
    measurements: dict
    nodes: list = field(default_factory=list)    # every node added (sequence, table, plot parts)
    table: object = None                          # the measurements table node


def known_frames(segs: Sequence, reference) -> dict:
    """``{frame: label map}`` of the non-empty segmentation nodes (each carries its frame, EchoFM.frame)."""
    out = {}
    for seg in segs:
        if seg is None:
            continue
        value = seg.GetAttribute(sn.FRAME_ATTR)
        if value in (None, ""):
            raise ValueError(f"segmentation {seg.GetName()!r} does not say which frame it belongs to "
                             f"(attribute {sn.FRAME_ATTR})")
        frame = int(value)
        if frame in out:
            raise ValueError(f"two segmentations are for frame {frame}: keep one")
        out[frame] = sn.segmentation_to_labels(seg, reference)
    if not out:
        raise ValueError("no drawn or corrected segmentation to propagate: draw the LV on a frame first")
    drawn = {f: m for f, m in out.items() if m.any()}   # an untouched empty ES next to a drawn ED is skipped
    if not drawn:
        raise ValueError(f"the segmentation(s) of frame(s) {sorted(out)} are empty: draw the LV on a frame first")
    return drawn


def measure_curve(cine, labels: np.ndarray) -> dict:
    """LV volume per frame, ED/ES (ECG first, else the propagated LV curve), EDV/ESV/EF per beat."""
    phase = detect_ed_es(cine, masks=labels, lv_labels=(1,))
    m = cardiac_measurements(labels, cine.spacing_mm, phase.ed_frames, phase.es_frames,
                             expected_shape=cine.shape)
    m["phase_method"] = phase.method
    return m


def compute_propagation(cine, known: dict, progress: Optional[Callable[[float, str], None]] = None,
                        cancel: Optional[Callable[[], bool]] = None) -> tuple:
    """(label maps of every frame, their measurements) from ``known`` (:func:`known_frames`). Touches no
    scene, so it may run in a worker thread (the web app does, to keep its page live)."""
    labels = propagate_masks(cine, known, progress=progress, cancel=cancel)   # checks the input
    return labels, measure_curve(cine, labels)


def add_propagation(scene, cine_nodes, known: dict, labels: np.ndarray, m: dict, logics: Optional[Logics] = None,
                    name: Optional[str] = None) -> PropagationResult:
    """Put one computed propagation into the scene (sequence in the cine's browser, table, volume plot)."""
    T = labels.shape[0]
    sources = ["corrected" if f in known else SOURCE for f in range(T)]
    base = cine_nodes.sequence.GetName()
    name = name or f"{base} masks (propagated)"
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    with all_or_nothing(scene):
        seq = sn.masks_to_segmentation_sequence(scene, cine_nodes, labels, list(range(T)), logics=logics,
                                                name=name, source="AI")
        for node in (seq, cine_nodes.browser.GetProxyNode(seq)):
            if node is not None:
                node.SetAttribute(sn.SOURCE_ATTR, SOURCE)
                node.SetAttribute(FRAME_SOURCES_ATTR, json.dumps(sources))
                node.SetAttribute("EchoFM.knownFrames", json.dumps(sorted(known)))
        seq.SetAttribute("EchoFM.role", ROLE)
        table = meas.measurements_table(scene, m,
                                        f"{base} measurements (propagated masks)")
        times = [frame_marker_time(cine_nodes.browser, i) for i in range(T)]
        meas.volume_curve_plot(scene, times, list(m["lv_volume"]), name=f"{base} LV volume (propagated masks)",
                               unit=m["unit"])
        table.SetAttribute("EchoFM.role", "measurements")
    made = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())
            if scene.GetNthNode(i).GetID() not in before]
    return PropagationResult(seq, labels, sources, m, made, table)


def propagate_segmentations(scene, cine_nodes, cine, segs: Sequence, logics: Optional[Logics] = None,
                            progress: Optional[Callable[[float, str], None]] = None,
                            cancel: Optional[Callable[[], bool]] = None,
                            name: Optional[str] = None) -> PropagationResult:
    """Masks on every frame of ``cine`` from the user's segmentations ``segs``; see the module doc.
    ValueError (bad input) and PropagationCancelled leave the scene unchanged."""
    known = known_frames(segs, cine_nodes.proxy)
    labels, m = compute_propagation(cine, known, progress=progress, cancel=cancel)
    return add_propagation(scene, cine_nodes, known, labels, m, logics=logics, name=name)


def undo_propagation(scene, result: PropagationResult, browser=None) -> None:
    """Remove everything one propagation added (sequence, its proxy, table, plot): the scene is as
    before it ran."""
    if browser is not None and result.sequence is not None and result.sequence.GetScene() is scene:
        proxy = browser.GetProxyNode(result.sequence)
        browser.RemoveSynchronizedSequenceNode(result.sequence.GetID())
        if proxy is not None and proxy.GetScene() is scene:
            scene.RemoveNode(proxy)
    for node in reversed(result.nodes):
        if node is not None and node.GetScene() is scene:
            scene.RemoveNode(node)


def frame_sources(seq) -> list:
    """Per-frame source (``corrected`` / ``propagated``) of a propagated sequence ([] otherwise)."""
    return json.loads(seq.GetAttribute(FRAME_SOURCES_ATTR) or "[]") if seq is not None else []
